//! The job spec: what a user submits (TOML), strictly validated.
//!
//! Unknown keys, wrong types and impossible values are errors that name the
//! field path (`train.global_batch`) and say what is allowed. Relative paths are
//! resolved against the spec file's folder when the spec is loaded, so the
//! accepted spec (handed to workers as JSON) holds absolute paths.
//! Every field is documented in docs/job-spec.md.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A whole job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub job: JobSection,
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
    #[serde(default)]
    pub workers: WorkersSpec,
    #[serde(default)]
    pub comm: CommSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub elastic: ElasticSpec,
    /// How much of the workers' output each node keeps (`[logs]`).
    #[serde(default)]
    pub logs: LogsSpec,
    /// Only read by `kiln launch`.
    #[serde(default)]
    pub launch: LaunchSpec,
    /// Register the final model in a registry when the job finishes.
    #[serde(default)]
    pub register: Option<RegisterSpec>,
    /// Where job events go (`[[hooks]]`, any number).
    #[serde(default)]
    pub hooks: Vec<HookSpec>,
}

/// `[job]`: identity and the seed everything random derives from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Job name: letters, digits, `-`, `_` and `.`; names the run's folder.
    pub name: String,
    /// Seed of parameter initialisation, data order and synthetic data.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Fully connected layers with ReLU.
    Mlp,
    /// Convolutions (3x3, ReLU, 2x2 max-pool) then a fully connected head.
    Cnn,
    /// A TorchScript module exported from Python: `forward(x) -> logits`, or
    /// (`returns = "loss"`) `forward(batch: Dict[str, Tensor]) -> loss`.
    Torchscript,
    /// A decoder-only transformer language model (GPT-2 architecture) over
    /// token data.
    Gpt,
}

/// What a TorchScript module's `forward` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelReturns {
    /// Logits; kiln applies the loss of the data (cross-entropy on labels or
    /// next tokens).
    #[default]
    Logits,
    /// A scalar loss: the mean over the micro-batch's samples, computed by the
    /// module from the batch's named tensors.
    Loss,
}

/// Position encoding of a `gpt` model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionKind {
    /// A learned embedding per position (`wpe`), as GPT-2.
    #[default]
    Learned,
    /// Rotary embeddings applied to queries and keys.
    Rotary,
}

/// `[model]`: which network to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Which network: `mlp`, `cnn` or `torchscript`.
    pub kind: ModelKind,
    /// Hidden layer widths (mlp; the cnn's head uses the first).
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// Output channels of each convolution block (cnn).
    #[serde(default = "default_channels")]
    pub channels: Vec<usize>,
    /// Shape of one sample as `[channels, height, width]` (cnn); default: one
    /// channel, square, from the number of features.
    #[serde(default)]
    pub input_shape: Option<Vec<usize>>,
    /// TorchScript file (torchscript).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Initial weights from a safetensors file (e.g. `kiln ckpt export` output
    /// or a PyTorch `state_dict` saved with safetensors); names may carry a
    /// `model/` prefix.
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// What a torchscript module's `forward` returns: `logits` or `loss`.
    #[serde(default)]
    pub returns: ModelReturns,
    /// Vocabulary size (gpt; torchscript language models returning logits).
    #[serde(default)]
    pub vocab: Option<usize>,
    /// Longest context of a gpt (positions); default: `data.seq_len`.
    #[serde(default)]
    pub seq_len: Option<usize>,
    /// Transformer blocks (gpt).
    #[serde(default = "default_n_layer")]
    pub n_layer: usize,
    /// Attention heads per block (gpt); must divide `d_model`.
    #[serde(default = "default_n_head")]
    pub n_head: usize,
    /// Width of the residual stream (gpt).
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    /// Dropout probability while training (gpt), 0 to < 1.
    #[serde(default)]
    pub dropout: f64,
    /// Position encoding (gpt): `learned` or `rotary`.
    #[serde(default)]
    pub positions: PositionKind,
}

impl ModelSpec {
    /// A spec of `kind` with every other field at its default.
    pub fn new(kind: ModelKind) -> Self {
        Self {
            kind,
            hidden: default_hidden(),
            channels: default_channels(),
            input_shape: None,
            path: None,
            init: None,
            returns: ModelReturns::default(),
            vocab: None,
            seq_len: None,
            n_layer: default_n_layer(),
            n_head: default_n_head(),
            d_model: default_d_model(),
            dropout: 0.0,
            positions: PositionKind::default(),
        }
    }
}

fn default_n_layer() -> usize {
    4
}
fn default_n_head() -> usize {
    4
}
fn default_d_model() -> usize {
    256
}

fn default_hidden() -> Vec<usize> {
    vec![128]
}
fn default_channels() -> Vec<usize> {
    vec![16, 32]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// Safetensors shards with a float32 `x` (N x features) and an int64 `y` (N).
    Safetensors,
    /// A seeded generator: Gaussian inputs labelled by a fixed random linear teacher.
    Synthetic,
    /// Flat token files (language models): little-endian `uint16` or `uint32`
    /// ids, no header, as `kiln data prepare` (and nanoGPT) writes them.
    Tokens,
}

/// Width of the ids in a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    #[default]
    Uint16,
    Uint32,
}

/// `[data]`: the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Where samples come from: `safetensors` shards or the `synthetic` generator.
    pub kind: DataKind,
    /// Training shard files (safetensors).
    #[serde(default)]
    pub train: Vec<PathBuf>,
    /// Held-out shard files (safetensors); evaluation is skipped when empty.
    #[serde(default)]
    pub eval: Vec<PathBuf>,
    /// Number of classes; default: the largest label + 1 (safetensors), 10 (synthetic).
    #[serde(default)]
    pub classes: Option<usize>,
    /// Synthetic training samples.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Synthetic held-out samples.
    #[serde(default = "default_eval_samples")]
    pub eval_samples: usize,
    /// Synthetic features per sample.
    #[serde(default = "default_features")]
    pub features: usize,
    /// Tokens per training sample (tokens): each sample is a window of
    /// `seq_len` inputs and the `seq_len` next tokens as targets.
    #[serde(default)]
    pub seq_len: Option<usize>,
    /// Width of the token ids (tokens): `uint16` or `uint32`.
    #[serde(default)]
    pub token_dtype: TokenDtype,
}

fn default_samples() -> usize {
    8192
}
fn default_eval_samples() -> usize {
    1024
}
fn default_features() -> usize {
    784
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Optimizer steps to run.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Samples per step over all ranks; fixed whatever the world size.
    #[serde(default = "default_global_batch")]
    pub global_batch: usize,
    /// Largest forward/backward batch on one rank (gradient accumulation);
    /// default: the rank's whole slice.
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// Evaluate every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_interval: u64,
    /// Print a progress line every this many steps.
    #[serde(default = "default_log_interval")]
    pub log_interval: u64,
    /// Intra-op threads per worker; default: cores / workers, at least 1.
    #[serde(default)]
    pub threads_per_worker: Option<usize>,
    /// Arithmetic of forward and backward: `fp32`, or `bf16` (matrix products
    /// in bfloat16; master weights, gradients and optimizer state stay fp32).
    #[serde(default)]
    pub precision: Precision,
    /// Clip gradients to this global L2 norm (after the all-reduce, so every
    /// rank clips alike); none when absent.
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
}

/// Floating-point format of a computation or a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

fn default_steps() -> u64 {
    100
}
fn default_global_batch() -> usize {
    64
}
fn default_log_interval() -> u64 {
    10
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            global_batch: default_global_batch(),
            micro_batch: None,
            eval_interval: 0,
            log_interval: default_log_interval(),
            threads_per_worker: None,
            precision: Precision::default(),
            clip_grad_norm: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent with optional momentum.
    Sgd,
    /// Adam with decoupled weight decay.
    Adamw,
}

/// `[optimizer]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// Which update rule: `sgd` or `adamw`.
    #[serde(default = "default_optimizer")]
    pub kind: OptimizerKind,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// SGD momentum (0 disables it).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Decoupled weight decay (AdamW) or L2 penalty (SGD).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW decay rate of the first moment.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// AdamW decay rate of the second moment.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// AdamW term added to the denominator for numerical stability.
    #[serde(default = "default_eps")]
    pub eps: f64,
}

fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn default_lr() -> f64 {
    1e-3
}
fn default_momentum() -> f64 {
    0.9
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            kind: default_optimizer(),
            lr: default_lr(),
            momentum: default_momentum(),
            weight_decay: 0.0,
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warm-up to `optimizer.lr`, then constant.
    Constant,
    /// Linear warm-up to `optimizer.lr`, then cosine decay to `min_lr` at the last step.
    Cosine,
}

/// `[schedule]`: the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Shape of the learning rate over the steps: `constant` or `cosine`.
    #[serde(default = "default_schedule")]
    pub kind: ScheduleKind,
    /// Steps of linear warm-up from 0 (both kinds).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Floor of the cosine decay.
    #[serde(default)]
    pub min_lr: f64,
}

fn default_schedule() -> ScheduleKind {
    ScheduleKind::Constant
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            kind: default_schedule(),
            warmup_steps: 0,
            min_lr: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CUDA when a device is present, else CPU.
    Auto,
    /// CPU, even where a GPU is present.
    Cpu,
    /// CUDA; a worker fails when it has no device.
    Cuda,
}

/// `[workers]`: processes per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSpec {
    /// Worker processes per node (one per device on GPU nodes).
    #[serde(default = "default_nproc")]
    pub nproc: usize,
    /// Where workers compute.
    #[serde(default = "default_device")]
    pub device: DeviceKind,
}

fn default_nproc() -> usize {
    1
}
fn default_device() -> DeviceKind {
    DeviceKind::Auto
}

impl Default for WorkersSpec {
    fn default() -> Self {
        Self {
            nproc: default_nproc(),
            device: default_device(),
        }
    }
}

/// `[comm]`: collectives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommSpec {
    /// Gradient bucket size in MiB.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Deadline of every collective read, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// Format of gradients on the wire: `fp32`, or `bf16` (half the bytes;
    /// summed in fp32 and rounded once per hop).
    #[serde(default)]
    pub grad_dtype: Precision,
    /// All-reduce each gradient bucket as soon as backward has completed it,
    /// overlapped with the rest of backward (results are identical either way).
    #[serde(default = "default_true")]
    pub overlap: bool,
}

fn default_bucket_mb() -> f64 {
    25.0
}
fn default_timeout_secs() -> f64 {
    30.0
}

impl Default for CommSpec {
    fn default() -> Self {
        Self {
            bucket_mb: default_bucket_mb(),
            timeout_secs: default_timeout_secs(),
            grad_dtype: Precision::default(),
            overlap: true,
        }
    }
}

/// `[checkpoint]`: when and where training state is saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Where checkpoints go (file:///abs/path, s3://bucket/prefix, gs://..., az://...,
    /// memory://); default: `checkpoints/{job}` under the run's data folder.
    #[serde(default)]
    pub url: Option<String>,
    /// Save every this many steps (0: only the final checkpoint).
    #[serde(default)]
    pub interval: u64,
    /// Save when the job finishes.
    #[serde(default = "default_true")]
    pub final_checkpoint: bool,
    /// Checkpoints kept by retention: the newest `keep_last` ...
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// ... plus every one whose step is a multiple of `keep_every` (0: none).
    #[serde(default)]
    pub keep_every: u64,
    /// zstd level, 1 to 22.
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
    /// Largest piece a tensor is split into, in MiB.
    #[serde(default = "default_chunk_mb")]
    pub chunk_mb: f64,
    /// Background saves that may fail in a row before the job fails.
    #[serde(default = "default_max_consecutive_failures")]
    pub max_consecutive_failures: usize,
    /// Whether chunks are compressed: "auto" (per save, whichever is faster
    /// here, from the measured CPU training leaves and the destination's
    /// write speed), "zstd" (always) or "none" (never).
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Whether the final checkpoint must land: a final save that fails
    /// fails the job (`true`), or the job succeeds without it, with a loud
    /// warning in the log and the job status (`false`).
    #[serde(default = "default_true")]
    pub required: bool,
}

fn default_true() -> bool {
    true
}
fn default_keep_last() -> usize {
    3
}
/// Level 1: on float data byte-grouped, it is both smaller and faster than
/// level 3 (docs/checkpoint-format.md has the measurements).
fn default_compression_level() -> i32 {
    1
}
fn default_chunk_mb() -> f64 {
    8.0
}
fn default_max_consecutive_failures() -> usize {
    3
}
fn default_compression() -> String {
    "auto".into()
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            url: None,
            interval: 0,
            final_checkpoint: true,
            keep_last: default_keep_last(),
            keep_every: 0,
            compression_level: default_compression_level(),
            chunk_mb: default_chunk_mb(),
            max_consecutive_failures: default_max_consecutive_failures(),
            compression: default_compression(),
            required: true,
        }
    }
}

/// `[elastic]`: how many nodes a job runs on and how it rides out failures
/// (multi-node jobs: `kiln agent`; `kiln run` is one node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticSpec {
    /// Fewest nodes the job trains on; below it, the job waits.
    #[serde(default = "default_nodes")]
    pub min_nodes: usize,
    /// Most nodes the job trains on (default: `min_nodes`); more wait as spares.
    #[serde(default)]
    pub max_nodes: Option<usize>,
    /// After a membership change, how long the leader waits for more changes
    /// before it opens the round, in seconds (once `min_nodes` are present).
    #[serde(default = "default_settle_secs")]
    pub settle_secs: f64,
    /// TTL of a node's lease, in seconds: a node silent this long is lost.
    #[serde(default = "default_lease_ttl_secs")]
    pub lease_ttl_secs: u64,
    /// How long a job below `min_nodes` waits for nodes before it fails, in seconds.
    #[serde(default = "default_wait_timeout_secs")]
    pub wait_timeout_secs: f64,
    /// Node or worker failures the job survives before it fails.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// Joins (scale-up events) the job accepts.
    #[serde(default = "default_max_scale_events")]
    pub max_scale_events: u32,
    /// A node that failed is kept out of rounds for this long, in seconds.
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: f64,
}

fn default_nodes() -> usize {
    1
}
fn default_settle_secs() -> f64 {
    0.5
}
fn default_lease_ttl_secs() -> u64 {
    3
}
fn default_wait_timeout_secs() -> f64 {
    300.0
}
fn default_max_failures() -> u32 {
    10
}
fn default_max_scale_events() -> u32 {
    100
}
fn default_cooldown_secs() -> f64 {
    30.0
}

/// `[logs]`: how much of each worker's stdout and stderr a node keeps, in its
/// files and (multi-node jobs) in the store. See docs/logs.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsSpec {
    /// A worker's log file is rotated when it reaches this size, in MiB.
    #[serde(default = "default_log_file_mib")]
    pub file_mib: u64,
    /// Rotated files kept per worker besides the current one (0: none).
    #[serde(default = "default_log_files")]
    pub files: usize,
    /// Newest KiB of log kept in the store per worker (multi-node jobs).
    #[serde(default = "default_log_store_kib")]
    pub store_kib: usize,
}

fn default_log_file_mib() -> u64 {
    16
}
fn default_log_files() -> usize {
    3
}
fn default_log_store_kib() -> usize {
    256
}

impl Default for LogsSpec {
    fn default() -> Self {
        Self {
            file_mib: default_log_file_mib(),
            files: default_log_files(),
            store_kib: default_log_store_kib(),
        }
    }
}

impl Default for ElasticSpec {
    fn default() -> Self {
        Self {
            min_nodes: default_nodes(),
            max_nodes: None,
            settle_secs: default_settle_secs(),
            lease_ttl_secs: default_lease_ttl_secs(),
            wait_timeout_secs: default_wait_timeout_secs(),
            max_failures: default_max_failures(),
            max_scale_events: default_max_scale_events(),
            cooldown_secs: default_cooldown_secs(),
        }
    }
}

impl ElasticSpec {
    /// `max_nodes`, defaulting to `min_nodes`.
    pub fn max_nodes(&self) -> usize {
        self.max_nodes.unwrap_or(self.min_nodes)
    }
}

/// `[launch]`: what `kiln launch slurm|k8s` writes into the generated files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    /// Nodes to allocate (default: `elastic.max_nodes`).
    #[serde(default)]
    pub nodes: Option<usize>,
    /// GPUs per node (0: CPU nodes); one worker per GPU.
    #[serde(default)]
    pub gpus_per_node: usize,
    /// The store agents join through: `etcd://host:port[,host:port...]`, or
    /// `etcds://...?ca=...` with TLS and credentials (see `crate::store_url`).
    #[serde(default)]
    pub store: Option<String>,
    /// Container image (Kubernetes).
    #[serde(default)]
    pub image: Option<String>,
    /// Kubernetes namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Slurm partition.
    #[serde(default)]
    pub partition: Option<String>,
    /// Slurm account.
    #[serde(default)]
    pub account: Option<String>,
    /// Wall-clock limit, `HH:MM:SS` (Slurm `--time`, Kubernetes `activeDeadlineSeconds`).
    #[serde(default)]
    pub time_limit: Option<String>,
    /// CPUs per node to request.
    #[serde(default)]
    pub cpus_per_node: Option<usize>,
    /// Memory per node to request, in GiB.
    #[serde(default)]
    pub memory_gb: Option<usize>,
    /// The kiln binary on the nodes.
    #[serde(default = "default_kiln_bin")]
    pub kiln_bin: String,
}

fn default_namespace() -> String {
    "default".to_string()
}
fn default_kiln_bin() -> String {
    "kiln".to_string()
}

impl Default for LaunchSpec {
    fn default() -> Self {
        Self {
            nodes: None,
            gpus_per_node: 0,
            store: None,
            image: None,
            namespace: default_namespace(),
            partition: None,
            account: None,
            time_limit: None,
            cpus_per_node: None,
            memory_gb: None,
            kiln_bin: default_kiln_bin(),
        }
    }
}

/// `[register]`: register the finished job's model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSpec {
    /// Registry location (same forms as `checkpoint.url`); default: the
    /// `registry` folder beside the job's checkpoint folder.
    #[serde(default)]
    pub registry: Option<String>,
    /// Model name (default: `job.name`).
    #[serde(default)]
    pub name: Option<String>,
    /// Alias to move to the new version (`production`, `staging`, ...).
    #[serde(default)]
    pub alias: Option<String>,
    /// The alias moves only when this eval metric (`eval_accuracy`, ...)...
    #[serde(default)]
    pub metric: Option<String>,
    /// ... is at least this.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Rows of training inputs (and their predictions) kept as the reference
    /// profile for drift detection.
    #[serde(default = "default_reference_rows")]
    pub reference_rows: usize,
}

fn default_reference_rows() -> usize {
    1000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookSink {
    /// One log line per event.
    Log,
    /// An HTTP POST of the event as JSON, signed with HMAC-SHA256.
    Webhook,
    /// A command run once per event, the event as JSON on its stdin.
    Command,
}

/// `[[hooks]]`: one event sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    pub sink: HookSink,
    /// Webhook URL (`http://` or `https://`).
    #[serde(default)]
    pub url: Option<String>,
    /// Environment variable holding the webhook's HMAC key.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File holding the webhook's HMAC key.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Command and arguments (no shell).
    #[serde(default)]
    pub command: Vec<String>,
    /// Event kinds delivered (`job.finished`, `checkpoint.committed`, ...); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Deliveries retried this many times (with exponential backoff) before the
    /// event is dropped with an error in the log.
    #[serde(default = "default_hook_retries")]
    pub max_retries: u32,
    /// Per-delivery timeout, in seconds.
    #[serde(default = "default_hook_timeout_secs")]
    pub timeout_secs: f64,
}

fn default_hook_retries() -> u32 {
    5
}
fn default_hook_timeout_secs() -> f64 {
    10.0
}

/// Why a job spec was refused.
///
/// `Display` is the whole message for a user (the CLI prints it after
/// `error: `): it names the field path and says what is allowed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The spec file could not be read.
    // The I/O error is part of the message rather than a `source`, so that a
    // printed error chain does not repeat it.
    #[error("read job spec {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The text is not TOML (or, from [`JobSpec::from_json`], not JSON) at all.
    #[error("invalid {format}: {message}{}", position(*line, *column))]
    Syntax {
        format: &'static str,
        message: String,
        line: Option<usize>,
        column: Option<usize>,
    },
    /// A field is unknown, missing, of the wrong type or names an unknown variant.
    /// `line` is the line of the spec file, when it is known.
    #[error("{}{message}{}", field_prefix(field), position(*line, None))]
    Parse {
        field: String,
        message: String,
        line: Option<usize>,
    },
    /// The spec is well formed but a value is impossible.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A `--set` argument is malformed.
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(" (line {line}, column {column})"),
        (Some(line), None) => format!(" (line {line})"),
        _ => String::new(),
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Longest accepted `job.name`; it names folders and store keys.
const MAX_JOB_NAME_CHARS: usize = 64;
/// Longest accepted duration, in seconds (30 days): far above any real
/// timeout, far below what `Duration::from_secs_f64` cannot represent.
const MAX_SECS: f64 = 30.0 * 24.0 * 3600.0;
/// Bounds on sizes, so a typo fails at validation with the field's name
/// rather than as an allocation failure or overflow deep inside a worker.
const MAX_NPROC: usize = 1024;
const MAX_WIDTH: usize = 1 << 20;
const MAX_LAYERS: usize = 4096;
const MAX_VOCAB: usize = 1 << 24;
const MAX_SEQ_LEN: usize = 1 << 20;
const MAX_GLOBAL_BATCH: usize = 1 << 24;
const MAX_MB: f64 = 65536.0;
const MAX_SYNTHETIC_VALUES: usize = 1 << 30;

impl JobSpec {
    /// Reads a TOML file, applies `--set key.path=value` overrides, deserializes
    /// strictly, resolves relative paths (`data.train`, `data.eval`, `model.path`)
    /// against the file's folder (making them absolute), and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|error| SpecError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let base_dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        Self::from_toml_str(&text, base_dir, overrides)
    }

    /// [`JobSpec::load`] for a spec already in memory; relative paths are
    /// resolved against `base_dir` (itself made absolute against the current
    /// directory).
    pub fn from_toml_str(
        text: &str,
        base_dir: &Path,
        overrides: &[String],
    ) -> Result<JobSpec, SpecError> {
        let mut spec = parse_toml(text, overrides)?;
        spec.resolve_paths(base_dir)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Semantic checks (also used after a world size change).
    ///
    /// Batch divisibility is checked at `workers.nproc` ranks (one node); a
    /// caller that knows the real world size checks it with
    /// [`JobSpec::micro_batch_at`]. Files named by the spec must exist here.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_job()?;
        self.validate_workers()?;
        self.validate_model()?;
        self.validate_data()?;
        self.validate_train()?;
        self.validate_optimizer()?;
        self.validate_schedule()?;
        self.validate_comm()?;
        self.validate_checkpoint()?;
        self.validate_elastic()?;
        self.validate_logs()?;
        self.validate_launch()?;
        self.validate_register()?;
        self.validate_hooks()
    }

    /// Samples per rank per step at `world_size`; error if `train.global_batch`
    /// does not divide.
    pub fn per_rank_batch(&self, world_size: usize) -> Result<usize, SpecError> {
        self.per_rank_batch_over(world_size, &format!("world size {world_size}"))
    }

    /// Micro-batch size at `world_size` (`train.micro_batch` or the whole
    /// per-rank batch).
    pub fn micro_batch_at(&self, world_size: usize) -> Result<usize, SpecError> {
        let per_rank = self.per_rank_batch(world_size)?;
        self.micro_batch_of(per_rank, world_size)
    }

    /// The spec as handed to workers and stored under `jobs/{job}/spec`.
    pub fn to_json(&self) -> String {
        // Cannot fail: every map key is a string, and paths are checked to be
        // UTF-8 when they are resolved.
        serde_json::to_string(self).expect("a job spec serializes to json")
    }

    /// Reads [`JobSpec::to_json`]'s output; unknown fields are errors that name
    /// their path. It does not validate: the spec was validated when it was
    /// accepted (call [`JobSpec::validate`] to check it again here).
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let spec: JobSpec =
            serde_path_to_error::deserialize(&mut deserializer).map_err(json_error)?;
        deserializer
            .end()
            .map_err(|error| json_syntax_error(&error))?;
        Ok(spec)
    }

    fn resolve_paths(&mut self, base_dir: &Path) -> Result<(), SpecError> {
        for (index, path) in self.data.train.iter_mut().enumerate() {
            *path = resolve(base_dir, path, &format!("data.train[{index}]"))?;
        }
        for (index, path) in self.data.eval.iter_mut().enumerate() {
            *path = resolve(base_dir, path, &format!("data.eval[{index}]"))?;
        }
        if let Some(path) = &mut self.model.init {
            *path = resolve(base_dir, path, "model.init")?;
        }
        if let Some(path) = &mut self.model.path {
            *path = resolve(base_dir, path, "model.path")?;
        }
        Ok(())
    }

    fn validate_job(&self) -> Result<(), SpecError> {
        let name = &self.job.name;
        if name.is_empty() {
            return Err(invalid("job.name", "must not be empty"));
        }
        let chars = name.chars().count();
        if chars > MAX_JOB_NAME_CHARS {
            return Err(invalid(
                "job.name",
                format!("{chars} characters, at most {MAX_JOB_NAME_CHARS} allowed"),
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(invalid(
                "job.name",
                format!(
                    "{name:?} holds {bad:?}; allowed are letters a-z A-Z, digits, '.', '_' and '-'"
                ),
            ));
        }
        // The name becomes a folder name.
        if name == "." || name == ".." {
            return Err(invalid(
                "job.name",
                format!("{name:?} is not a usable folder name"),
            ));
        }
        Ok(())
    }

    fn validate_workers(&self) -> Result<(), SpecError> {
        at_least_one("workers.nproc", self.workers.nproc)?;
        at_most("workers.nproc", self.workers.nproc, MAX_NPROC)
    }

    fn validate_model(&self) -> Result<(), SpecError> {
        let model = &self.model;
        if model.hidden.is_empty() {
            return Err(invalid(
                "model.hidden",
                "must hold at least one layer width",
            ));
        }
        widths_at_least_one("model.hidden", &model.hidden)?;
        widths_at_least_one("model.channels", &model.channels)?;
        widths_at_most("model.hidden", &model.hidden, MAX_WIDTH)?;
        widths_at_most("model.channels", &model.channels, MAX_WIDTH)?;
        at_most("model.hidden (layers)", model.hidden.len(), MAX_LAYERS)?;
        at_most("model.channels (blocks)", model.channels.len(), MAX_LAYERS)?;
        at_most("model.n_layer", model.n_layer, MAX_LAYERS)?;
        at_most("model.n_head", model.n_head, MAX_WIDTH)?;
        at_most("model.d_model", model.d_model, MAX_WIDTH)?;
        if let Some(vocab) = model.vocab {
            at_most("model.vocab", vocab, MAX_VOCAB)?;
        }
        if let Some(context) = model.seq_len {
            at_least_one("model.seq_len", context)?;
            at_most("model.seq_len", context, MAX_SEQ_LEN)?;
        }
        if let Some(shape) = &model.input_shape {
            if shape.len() != 3 {
                return Err(invalid(
                    "model.input_shape",
                    format!("expected 3 dimensions [channels, height, width], got {shape:?}"),
                ));
            }
            widths_at_least_one("model.input_shape", shape)?;
        }
        match (model.kind, &model.path) {
            (ModelKind::Torchscript, None) => {
                return Err(invalid(
                    "model.path",
                    "required when model.kind = \"torchscript\"",
                ));
            }
            (ModelKind::Torchscript, Some(path)) => check_file("model.path", path)?,
            (ModelKind::Mlp | ModelKind::Cnn | ModelKind::Gpt, Some(_)) => {
                return Err(invalid(
                    "model.path",
                    "only applies to model.kind = \"torchscript\"; remove it or change model.kind",
                ));
            }
            (ModelKind::Mlp | ModelKind::Cnn | ModelKind::Gpt, None) => {}
        }
        if model.returns == ModelReturns::Loss && model.kind != ModelKind::Torchscript {
            return Err(invalid(
                "model.returns",
                "only a torchscript module can return its own loss; built-in models return logits",
            ));
        }
        if let Some(init) = &model.init {
            check_file("model.init", init)?;
        }
        if model.kind == ModelKind::Cnn {
            self.validate_cnn_shape()?;
        }
        if model.kind == ModelKind::Gpt {
            self.validate_gpt()?;
        }
        let language_model = model.kind == ModelKind::Gpt
            || (model.kind == ModelKind::Torchscript && model.returns == ModelReturns::Logits);
        if self.data.kind == DataKind::Tokens
            && !language_model
            && model.kind != ModelKind::Torchscript
        {
            return Err(invalid(
                "model.kind",
                format!(
                    "{:?} classifies feature vectors and cannot train on data.kind = \"tokens\"; \
                     use \"gpt\" or a \"torchscript\" module",
                    model.kind
                )
                .to_lowercase(),
            ));
        }
        if let Some(vocab) = model.vocab {
            at_least_one("model.vocab", vocab)?;
        }
        if self.data.kind == DataKind::Tokens
            && model.kind == ModelKind::Torchscript
            && model.returns == ModelReturns::Logits
            && model.vocab.is_none()
        {
            return Err(invalid(
                "model.vocab",
                "required for a torchscript language model that returns logits (its last dimension)",
            ));
        }
        Ok(())
    }

    /// A gpt trains on token data, knows its vocabulary, and fits the
    /// sequences it is given.
    fn validate_gpt(&self) -> Result<(), SpecError> {
        let m = &self.model;
        if self.data.kind != DataKind::Tokens {
            return Err(invalid(
                "model.kind",
                "\"gpt\" is a language model: it needs data.kind = \"tokens\"",
            ));
        }
        if m.vocab.is_none() {
            return Err(invalid(
                "model.vocab",
                "required for a gpt (the tokenizer's vocabulary size; `kiln data prepare` writes it to meta.json)",
            ));
        }
        for (field, value) in [
            ("model.n_layer", m.n_layer),
            ("model.n_head", m.n_head),
            ("model.d_model", m.d_model),
        ] {
            at_least_one(field, value)?;
        }
        if !m.d_model.is_multiple_of(m.n_head) {
            return Err(invalid(
                "model.n_head",
                format!("{} does not divide model.d_model = {}", m.n_head, m.d_model),
            ));
        }
        if m.positions == PositionKind::Rotary && !(m.d_model / m.n_head).is_multiple_of(2) {
            return Err(invalid(
                "model.positions",
                format!(
                    "rotary positions need an even head width; d_model / n_head = {}",
                    m.d_model / m.n_head
                ),
            ));
        }
        if !(m.dropout.is_finite() && (0.0..1.0).contains(&m.dropout)) {
            return Err(invalid(
                "model.dropout",
                format!("{} must be at least 0 and below 1", m.dropout),
            ));
        }
        if let (Some(context), Some(seq_len)) = (m.seq_len, self.data.seq_len)
            && context < seq_len
        {
            return Err(invalid(
                "model.seq_len",
                format!("{context} is shorter than data.seq_len = {seq_len}"),
            ));
        }
        Ok(())
    }

    /// The context length of a language model: `model.seq_len`, else `data.seq_len`.
    pub fn context_len(&self) -> Option<usize> {
        self.model.seq_len.or(self.data.seq_len)
    }

    /// A cnn needs convolution blocks and, where the number of features is known
    /// from the spec (synthetic data), an input shape that holds exactly them.
    fn validate_cnn_shape(&self) -> Result<(), SpecError> {
        if self.model.channels.is_empty() {
            return Err(invalid(
                "model.channels",
                "must hold at least one convolution block when model.kind = \"cnn\"",
            ));
        }
        if self.data.kind != DataKind::Synthetic {
            return Ok(());
        }
        let features = self.data.features;
        match &self.model.input_shape {
            Some(shape) => {
                let values: usize = shape.iter().product();
                if values != features {
                    return Err(invalid(
                        "model.input_shape",
                        format!("{shape:?} holds {values} values but data.features = {features}"),
                    ));
                }
            }
            None => {
                let side = features.isqrt();
                if side * side != features {
                    return Err(invalid(
                        "model.input_shape",
                        format!(
                            "required when data.features = {features} is not a perfect square \
                             (the default is [1, s, s] with s * s = data.features)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), SpecError> {
        let data = &self.data;
        match data.kind {
            DataKind::Safetensors => {
                if data.train.is_empty() {
                    return Err(invalid(
                        "data.train",
                        "must list at least one file when data.kind = \"safetensors\"",
                    ));
                }
                for (index, path) in data.train.iter().enumerate() {
                    check_file(&format!("data.train[{index}]"), path)?;
                }
                for (index, path) in data.eval.iter().enumerate() {
                    check_file(&format!("data.eval[{index}]"), path)?;
                }
            }
            DataKind::Tokens => {
                match data.seq_len {
                    None => {
                        return Err(invalid(
                            "data.seq_len",
                            "required when data.kind = \"tokens\" (tokens per training sample)",
                        ));
                    }
                    Some(n) => {
                        at_least_one("data.seq_len", n)?;
                        at_most("data.seq_len", n, MAX_SEQ_LEN)?;
                    }
                }
                if data.train.is_empty() {
                    return Err(invalid(
                        "data.train",
                        "must list at least one token file when data.kind = \"tokens\"",
                    ));
                }
                for (index, path) in data.train.iter().enumerate() {
                    check_file(&format!("data.train[{index}]"), path)?;
                }
                for (index, path) in data.eval.iter().enumerate() {
                    check_file(&format!("data.eval[{index}]"), path)?;
                }
                if data.classes.is_some() {
                    return Err(invalid(
                        "data.classes",
                        "does not apply to token data; the vocabulary is model.vocab",
                    ));
                }
            }
            DataKind::Synthetic => {
                for (field, list) in [("data.train", &data.train), ("data.eval", &data.eval)] {
                    if !list.is_empty() {
                        return Err(invalid(
                            field,
                            "only applies to data.kind = \"safetensors\"; \
                             synthetic data is sized by data.samples and data.eval_samples",
                        ));
                    }
                }
                at_least_one("data.samples", data.samples)?;
                at_least_one("data.features", data.features)?;
                let values =
                    (data.samples as u128 + data.eval_samples as u128) * data.features as u128;
                if values > MAX_SYNTHETIC_VALUES as u128 {
                    return Err(invalid(
                        "data.samples",
                        format!(
                            "(data.samples + data.eval_samples) x data.features = {values} values; \
                             synthetic data is held in memory, at most {MAX_SYNTHETIC_VALUES} (4 GiB)"
                        ),
                    ));
                }
            }
        }
        if data.kind != DataKind::Tokens && data.seq_len.is_some() {
            return Err(invalid(
                "data.seq_len",
                "only applies to data.kind = \"tokens\"",
            ));
        }
        if let Some(classes) = data.classes
            && classes < 2
        {
            return Err(invalid(
                "data.classes",
                format!("{classes} must be at least 2"),
            ));
        }
        Ok(())
    }

    fn validate_train(&self) -> Result<(), SpecError> {
        let train = &self.train;
        if train.steps < 1 {
            return Err(invalid("train.steps", "must be at least 1"));
        }
        at_least_one("train.global_batch", train.global_batch)?;
        at_most("train.global_batch", train.global_batch, MAX_GLOBAL_BATCH)?;
        if let Some(micro_batch) = train.micro_batch {
            at_least_one("train.micro_batch", micro_batch)?;
        }
        if train.log_interval < 1 {
            return Err(invalid("train.log_interval", "must be at least 1"));
        }
        if let Some(threads) = train.threads_per_worker {
            at_least_one("train.threads_per_worker", threads)?;
        }
        if let Some(norm) = train.clip_grad_norm {
            positive("train.clip_grad_norm", norm)?;
        }
        let nproc = self.workers.nproc;
        let per_rank = self.per_rank_batch_over(nproc, &format!("workers.nproc = {nproc}"))?;
        self.micro_batch_of(per_rank, nproc)?;
        Ok(())
    }

    fn validate_optimizer(&self) -> Result<(), SpecError> {
        let optimizer = &self.optimizer;
        positive("optimizer.lr", optimizer.lr)?;
        unit_interval("optimizer.momentum", optimizer.momentum)?;
        unit_interval("optimizer.beta1", optimizer.beta1)?;
        unit_interval("optimizer.beta2", optimizer.beta2)?;
        positive("optimizer.eps", optimizer.eps)?;
        if !(optimizer.weight_decay.is_finite() && optimizer.weight_decay >= 0.0) {
            return Err(invalid(
                "optimizer.weight_decay",
                format!("{} must be a finite number >= 0", optimizer.weight_decay),
            ));
        }
        Ok(())
    }

    fn validate_schedule(&self) -> Result<(), SpecError> {
        let min_lr = self.schedule.min_lr;
        let lr = self.optimizer.lr;
        if !(min_lr >= 0.0 && min_lr <= lr) {
            return Err(invalid(
                "schedule.min_lr",
                format!("{min_lr} must be between 0 and optimizer.lr = {lr}"),
            ));
        }
        Ok(())
    }

    fn validate_comm(&self) -> Result<(), SpecError> {
        positive("comm.bucket_mb", self.comm.bucket_mb)?;
        at_most_f64("comm.bucket_mb", self.comm.bucket_mb, MAX_MB)?;
        positive("comm.timeout_secs", self.comm.timeout_secs)?;
        duration("comm.timeout_secs", self.comm.timeout_secs)
    }

    fn validate_checkpoint(&self) -> Result<(), SpecError> {
        let c = &self.checkpoint;
        if let Some(url) = &c.url {
            validate_location("checkpoint.url", url)?;
        }
        at_least_one("checkpoint.keep_last", c.keep_last)?;
        at_least_one(
            "checkpoint.max_consecutive_failures",
            c.max_consecutive_failures,
        )?;
        if !(1..=22).contains(&c.compression_level) {
            return Err(invalid(
                "checkpoint.compression_level",
                format!(
                    "{} is not a zstd level; allowed: 1 to 22",
                    c.compression_level
                ),
            ));
        }
        if !["auto", "zstd", "none"].contains(&c.compression.as_str()) {
            return Err(invalid(
                "checkpoint.compression",
                format!(
                    "{:?} is not a codec policy; allowed: \"auto\", \"zstd\", \"none\"",
                    c.compression
                ),
            ));
        }
        positive("checkpoint.chunk_mb", c.chunk_mb)?;
        at_most_f64("checkpoint.chunk_mb", c.chunk_mb, MAX_MB)?;
        if !c.required && self.register.is_some() {
            return Err(invalid(
                "checkpoint.required",
                "false cannot go with [register]: a model is registered from its final \
                 checkpoint, which the job could then end without",
            ));
        }
        Ok(())
    }

    fn validate_logs(&self) -> Result<(), SpecError> {
        let l = &self.logs;
        if l.file_mib == 0 || l.file_mib > 1 << 20 {
            return Err(invalid(
                "logs.file_mib",
                format!("{} must be 1 to 1048576", l.file_mib),
            ));
        }
        if l.files > 1000 {
            return Err(invalid(
                "logs.files",
                format!("{} must be at most 1000", l.files),
            ));
        }
        if l.store_kib == 0 || l.store_kib > 64 << 10 {
            return Err(invalid(
                "logs.store_kib",
                format!("{} must be 1 to 65536", l.store_kib),
            ));
        }
        Ok(())
    }

    fn validate_elastic(&self) -> Result<(), SpecError> {
        let e = &self.elastic;
        at_least_one("elastic.min_nodes", e.min_nodes)?;
        if let Some(max) = e.max_nodes
            && max < e.min_nodes
        {
            return Err(invalid(
                "elastic.max_nodes",
                format!("{max} is below elastic.min_nodes = {}", e.min_nodes),
            ));
        }
        if e.lease_ttl_secs < 2 {
            return Err(invalid(
                "elastic.lease_ttl_secs",
                format!(
                    "{} is too short; etcd grants at least 2 seconds",
                    e.lease_ttl_secs
                ),
            ));
        }
        if e.lease_ttl_secs > MAX_SECS as u64 {
            return Err(invalid(
                "elastic.lease_ttl_secs",
                format!("{} is longer than {MAX_SECS} s (30 days)", e.lease_ttl_secs),
            ));
        }
        non_negative("elastic.settle_secs", e.settle_secs)?;
        duration("elastic.settle_secs", e.settle_secs)?;
        positive("elastic.wait_timeout_secs", e.wait_timeout_secs)?;
        duration("elastic.wait_timeout_secs", e.wait_timeout_secs)?;
        non_negative("elastic.cooldown_secs", e.cooldown_secs)?;
        duration("elastic.cooldown_secs", e.cooldown_secs)
    }

    fn validate_launch(&self) -> Result<(), SpecError> {
        let l = &self.launch;
        if let Some(nodes) = l.nodes {
            at_least_one("launch.nodes", nodes)?;
        }
        if let Some(store) = &l.store {
            validate_store_url("launch.store", store)?;
        }
        if let Some(limit) = &l.time_limit {
            parse_time_limit(limit).ok_or_else(|| {
                invalid(
                    "launch.time_limit",
                    format!("{limit:?} is not a duration; use HH:MM:SS"),
                )
            })?;
        }
        if l.kiln_bin.is_empty() {
            return Err(invalid("launch.kiln_bin", "must not be empty"));
        }
        Ok(())
    }

    fn validate_register(&self) -> Result<(), SpecError> {
        let Some(r) = &self.register else {
            return Ok(());
        };
        if let Some(url) = &r.registry {
            validate_location("register.registry", url)?;
        }
        if r.threshold.is_some() && r.metric.is_none() {
            return Err(invalid(
                "register.threshold",
                "needs register.metric (the eval metric it is compared with)",
            ));
        }
        if r.metric.is_some() && r.alias.is_none() {
            return Err(invalid(
                "register.metric",
                "gates an alias move; set register.alias too",
            ));
        }
        at_least_one("register.reference_rows", r.reference_rows)
    }

    fn validate_hooks(&self) -> Result<(), SpecError> {
        for (i, h) in self.hooks.iter().enumerate() {
            let field = |name: &str| format!("hooks[{i}].{name}");
            match h.sink {
                HookSink::Log => {}
                HookSink::Webhook => {
                    let url = h
                        .url
                        .as_deref()
                        .ok_or_else(|| invalid(field("url"), "required for a webhook sink"))?;
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(invalid(
                            field("url"),
                            format!("{url:?} is not an http:// or https:// URL"),
                        ));
                    }
                }
                HookSink::Command => {
                    if h.command.is_empty() {
                        return Err(invalid(
                            field("command"),
                            "required for a command sink: the program and its arguments",
                        ));
                    }
                }
            }
            if h.secret_env.is_some() && h.secret_file.is_some() {
                return Err(invalid(
                    field("secret_env"),
                    "give secret_env or secret_file, not both",
                ));
            }
            positive(&field("timeout_secs"), h.timeout_secs)?;
            duration(&field("timeout_secs"), h.timeout_secs)?;
        }
        Ok(())
    }

    /// `ranks` names the divisor in the message (`workers.nproc = 3`, `world size 6`).
    fn per_rank_batch_over(&self, world_size: usize, ranks: &str) -> Result<usize, SpecError> {
        let global_batch = self.train.global_batch;
        if world_size == 0 {
            return Err(invalid(
                "train.global_batch",
                "cannot be split over a world size of 0",
            ));
        }
        if global_batch == 0 {
            return Err(invalid("train.global_batch", "must be at least 1"));
        }
        if !global_batch.is_multiple_of(world_size) {
            return Err(invalid(
                "train.global_batch",
                format!(
                    "{global_batch} is not divisible by {ranks} (each rank takes an equal slice)"
                ),
            ));
        }
        Ok(global_batch / world_size)
    }

    fn micro_batch_of(&self, per_rank: usize, world_size: usize) -> Result<usize, SpecError> {
        let Some(micro_batch) = self.train.micro_batch else {
            return Ok(per_rank);
        };
        at_least_one("train.micro_batch", micro_batch)?;
        if !per_rank.is_multiple_of(micro_batch) {
            let global_batch = self.train.global_batch;
            let ranks = if world_size == 1 { "rank" } else { "ranks" };
            return Err(invalid(
                "train.micro_batch",
                format!(
                    "{micro_batch} must divide the per-rank batch {per_rank} \
                     (train.global_batch {global_batch} over {world_size} {ranks})"
                ),
            ));
        }
        Ok(micro_batch)
    }
}

fn at_least_one(field: &str, value: usize) -> Result<(), SpecError> {
    if value < 1 {
        Err(invalid(field, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn widths_at_least_one(field: &str, values: &[usize]) -> Result<(), SpecError> {
    match values.iter().position(|&value| value < 1) {
        Some(index) => Err(invalid(format!("{field}[{index}]"), "must be at least 1")),
        None => Ok(()),
    }
}

fn at_most(field: &str, value: usize, max: usize) -> Result<(), SpecError> {
    if value > max {
        Err(invalid(
            field,
            format!("{value} is above the limit of {max}"),
        ))
    } else {
        Ok(())
    }
}

fn widths_at_most(field: &str, values: &[usize], max: usize) -> Result<(), SpecError> {
    match values.iter().position(|&value| value > max) {
        Some(index) => at_most(&format!("{field}[{index}]"), values[index], max),
        None => Ok(()),
    }
}

fn at_most_f64(field: &str, value: f64, max: f64) -> Result<(), SpecError> {
    if value > max {
        Err(invalid(
            field,
            format!("{value} is above the limit of {max}"),
        ))
    } else {
        Ok(())
    }
}

/// A number of seconds a `Duration` can hold: at most [`MAX_SECS`].
fn duration(field: &str, secs: f64) -> Result<(), SpecError> {
    if secs > MAX_SECS {
        Err(invalid(
            field,
            format!("{secs} s is longer than {MAX_SECS} s (30 days)"),
        ))
    } else {
        Ok(())
    }
}

fn non_negative(field: &str, value: f64) -> Result<(), SpecError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} must be a number >= 0")))
    }
}

/// Checks a store URL (`etcd://`, `etcds://` or `mem://`, see
/// [`crate::store_url`]): syntax only, the files it names are read by whoever
/// opens the store.
pub fn validate_store_url(field: &str, url: &str) -> Result<(), SpecError> {
    crate::store_url::StoreUrl::parse(url)
        .map(drop)
        .map_err(|error| invalid(field, error.to_string()))
}

/// Checks a checkpoint or registry location (`file:///abs`, `s3://`, ...).
pub fn validate_location(field: &str, url: &str) -> Result<(), SpecError> {
    let scheme_ok = ["file://", "s3://", "gs://", "az://", "memory://", "/"]
        .iter()
        .any(|p| url.starts_with(p));
    if scheme_ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{url:?} is not a storage location; use file:///abs/path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or memory://"
            ),
        ))
    }
}

/// Seconds in an `HH:MM:SS` (or `MM:SS`, or `SS`) duration.
pub fn parse_time_limit(text: &str) -> Option<u64> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut seconds = 0u64;
    for (i, part) in parts.iter().enumerate() {
        let value: u64 = part.parse().ok()?;
        if i > 0 && value >= 60 {
            return None;
        }
        seconds = seconds.checked_mul(60)?.checked_add(value)?;
    }
    Some(seconds)
}

fn positive(field: &str, value: f64) -> Result<(), SpecError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} must be a finite number > 0"),
        ))
    }
}

fn unit_interval(field: &str, value: f64) -> Result<(), SpecError> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} must be in [0, 1): at least 0 and below 1"),
        ))
    }
}

fn check_file(field: &str, path: &Path) -> Result<(), SpecError> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => Ok(()),
        Ok(_) => Err(invalid(field, format!("{} is not a file", path.display()))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(invalid(
            field,
            format!("file {} does not exist", path.display()),
        )),
        Err(error) => Err(invalid(
            field,
            format!("cannot read {}: {error}", path.display()),
        )),
    }
}

/// `path` made absolute against `base_dir` (itself made absolute against the
/// current directory). UTF-8 is required so that the spec travels as JSON.
fn resolve(base_dir: &Path, path: &Path, field: &str) -> Result<PathBuf, SpecError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::path::absolute(base_dir.join(path)).map_err(|error| {
            invalid(
                field,
                format!("cannot make {} absolute: {error}", path.display()),
            )
        })?
    };
    if absolute.to_str().is_none() {
        return Err(invalid(
            field,
            format!("{} is not valid utf-8", absolute.display()),
        ));
    }
    Ok(absolute)
}

/// Deserializes the spec from TOML text after applying `--set` overrides.
fn parse_toml(text: &str, overrides: &[String]) -> Result<JobSpec, SpecError> {
    let file_table: toml::Table = text
        .parse()
        .map_err(|error| toml_syntax_error(text, &error))?;
    check_sections(&file_table, Some(text))?;
    if overrides.is_empty() {
        return deserialize_text(text, &file_table);
    }
    let mut table = file_table.clone();
    for arg in overrides {
        apply_override(&mut table, arg)?;
    }
    check_sections(&table, None)?;
    let error = match serde_path_to_error::deserialize(table.clone()) {
        Ok(spec) => return Ok(spec),
        Err(error) => explain_enum_type(toml_field_error(None, &error), &table),
    };
    // The table carries no positions. When the file alone fails the same way,
    // the fault is in the file, and the file knows the line.
    match (error, deserialize_text(text, &file_table)) {
        (
            SpecError::Parse {
                field,
                message,
                line: None,
            },
            Err(SpecError::Parse {
                field: file_field,
                message: file_message,
                line,
            }),
        ) if field == file_field && message == file_message => Err(SpecError::Parse {
            field,
            message,
            line,
        }),
        (error, _) => Err(error),
    }
}

/// `table` is `text` parsed, to explain some errors better.
fn deserialize_text(text: &str, table: &toml::Table) -> Result<JobSpec, SpecError> {
    let deserializer =
        toml::Deserializer::parse(text).map_err(|error| toml_syntax_error(text, &error))?;
    serde_path_to_error::deserialize(deserializer)
        .map_err(|error| explain_enum_type(toml_field_error(Some(text), &error), table))
}

/// The spec's sections, in the order a spec file usually lists them.
const SECTIONS: [&str; 9] = [
    "job",
    "model",
    "data",
    "train",
    "optimizer",
    "schedule",
    "workers",
    "comm",
    "checkpoint",
];

/// serde fills a struct from an array too (`train = [500, 32]` would set
/// `steps` and `global_batch` by position), so sections are checked to be
/// tables before deserializing.
fn check_sections(table: &toml::Table, text: Option<&str>) -> Result<(), SpecError> {
    for name in SECTIONS {
        let Some(value) = table.get(name) else {
            continue;
        };
        if value.is_table() {
            continue;
        }
        return Err(SpecError::Parse {
            field: name.to_owned(),
            message: format!(
                "invalid type: {}, expected a table (a [{name}] section)",
                value.type_str()
            ),
            line: text.and_then(|text| top_level_line(text, name)),
        });
    }
    Ok(())
}

/// Line of the top-level key `name` in `text`.
fn top_level_line(text: &str, name: &str) -> Option<usize> {
    let spans: std::collections::BTreeMap<String, toml::Spanned<toml::Value>> =
        toml::from_str(text).ok()?;
    Some(line_and_column(text, spans.get(name)?.span().start).0)
}

/// The fields whose values name a variant, with the variants allowed.
const ENUM_FIELDS: [(&str, &str, &str); 5] = [
    ("model", "kind", "mlp, cnn, torchscript"),
    ("data", "kind", "safetensors, synthetic"),
    ("optimizer", "kind", "sgd, adamw"),
    ("schedule", "kind", "constant, cosine"),
    ("workers", "device", "auto, cpu, cuda"),
];

/// A variant given as something other than a string gets a message from toml's
/// internals ("wanted string or table"); say what is allowed instead.
fn explain_enum_type(error: SpecError, table: &toml::Table) -> SpecError {
    let SpecError::Parse {
        field,
        message,
        line,
    } = error
    else {
        return error;
    };
    for (section, key, choices) in ENUM_FIELDS {
        if field != format!("{section}.{key}") {
            continue;
        }
        let value = table.get(section).and_then(|section| section.get(key));
        if let Some(value) = value.filter(|value| !value.is_str()) {
            let message = format!(
                "invalid type: {} {value}, expected one of {choices}",
                value.type_str()
            );
            return SpecError::Parse {
                field,
                message,
                line,
            };
        }
    }
    SpecError::Parse {
        field,
        message,
        line,
    }
}

/// Sets `key.path=value` in `table`, creating tables on the way.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), SpecError> {
    let fail = |message: String| SpecError::Override {
        arg: arg.to_owned(),
        message,
    };
    let Some((key, raw_value)) = arg.split_once('=') else {
        return Err(fail(
            "expected key.path=value, e.g. train.steps=500".to_owned(),
        ));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(fail(
            "the key before '=' is empty; expected key.path=value".to_owned(),
        ));
    }
    let segments: Vec<&str> = key.split('.').map(str::trim).collect();
    if segments.iter().any(|segment| segment.is_empty()) {
        return Err(fail(format!(
            "{key:?} has an empty part; expected names joined by '.'"
        )));
    }
    let value = override_value(raw_value);
    let (last, parents) = segments
        .split_last()
        .expect("split yields at least one segment");
    let mut current = table;
    for (depth, segment) in parents.iter().enumerate() {
        let entry = current
            .entry((*segment).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(inner) => inner,
            other => {
                return Err(fail(format!(
                    "{} is a {}, not a table",
                    segments[..=depth].join("."),
                    other.type_str()
                )));
            }
        };
    }
    current.insert((*last).to_owned(), value);
    Ok(())
}

/// A TOML value when `raw` is one (`3`, `0.5`, `true`, `"x"`, `[1, 2]`), else
/// the text itself, so that `optimizer.kind=sgd` needs no quotes.
fn override_value(raw: &str) -> toml::Value {
    let raw = raw.trim();
    raw.parse::<toml::Value>()
        .unwrap_or_else(|_| toml::Value::String(raw.to_owned()))
}

fn toml_syntax_error(text: &str, error: &toml::de::Error) -> SpecError {
    let (line, column) = match error.span() {
        Some(span) => {
            let (line, column) = line_and_column(text, span.start);
            (Some(line), Some(column))
        }
        None => (None, None),
    };
    SpecError::Syntax {
        format: "toml",
        message: plain_message(error.message()),
        line,
        column,
    }
}

/// `text` is the document the error's positions refer to, when there is one.
fn toml_field_error(
    text: Option<&str>,
    error: &serde_path_to_error::Error<toml::de::Error>,
) -> SpecError {
    let line = text
        .zip(error.inner().span())
        .map(|(text, span)| line_and_column(text, span.start).0);
    parse_error(error.path(), &toml_words(error.inner().message()), line)
}

/// serde's data model in TOML's words.
fn toml_words(message: &str) -> String {
    message
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("expected a sequence", "expected an array")
        .replace("expected path string", "expected a path string")
}

fn json_error(error: serde_path_to_error::Error<serde_json::Error>) -> SpecError {
    let inner = error.inner();
    if !inner.is_data() {
        return json_syntax_error(inner);
    }
    let message = json_message(inner);
    parse_error(
        error.path(),
        &message,
        Some(inner.line()).filter(|&line| line > 0),
    )
}

fn json_syntax_error(error: &serde_json::Error) -> SpecError {
    SpecError::Syntax {
        format: "json",
        message: plain_message(&json_message(error)),
        line: Some(error.line()).filter(|&line| line > 0),
        column: Some(error.column()).filter(|&column| column > 0),
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn json_message(error: &serde_json::Error) -> String {
    let full = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_owned()
}

fn parse_error(path: &serde_path_to_error::Path, message: &str, line: Option<usize>) -> SpecError {
    let mut field = path.to_string();
    if field == "." {
        field.clear();
    }
    // serde reports a missing field at its parent; name the field itself.
    if let Some(name) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let (field, message) = if field.is_empty() {
            (name.to_owned(), "required section is missing")
        } else {
            (format!("{field}.{name}"), "required field is missing")
        };
        // The span of a missing field is its whole parent table: no useful line.
        return SpecError::Parse {
            field,
            message: message.to_owned(),
            line: None,
        };
    }
    SpecError::Parse {
        field,
        message: plain_message(message),
        line,
    }
}

/// serde's messages, made to read as the rest of kiln's: no backticks, no
/// repeat of an unknown field's name (the field path already ends with it), and
/// the choices always as "expected one of a, b".
fn plain_message(message: &str) -> String {
    if let Some((_, rest)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    {
        return format!("unknown field{}", plain_choices(rest));
    }
    if let Some((variant, rest)) = message
        .strip_prefix("unknown variant `")
        .and_then(|rest| rest.split_once('`'))
    {
        return format!("unknown variant \"{variant}\"{}", plain_choices(rest));
    }
    message.replace('`', "")
}

/// serde writes two choices as "expected `a` or `b`".
fn plain_choices(choices: &str) -> String {
    if let Some((first, second)) = choices
        .strip_prefix(", expected `")
        .and_then(|rest| rest.strip_suffix('`'))
        .and_then(|rest| rest.split_once("` or `"))
    {
        return format!(", expected one of {first}, {second}");
    }
    choices.replace('`', "")
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |index| index + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

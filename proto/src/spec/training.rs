//! The spec's types for what is trained and how: the job, the model, the
//! data, the training loop, its optimizer and schedule, the workers and their
//! collective (`[job]` to `[comm]`). Every field is documented in
//! docs/job-spec.md.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::operations::{
    CheckpointSpec, ElasticSpec, HookSpec, LaunchSpec, LogsSpec, RegisterSpec, default_true,
};

/// A whole job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `[job]` (required).
    pub job: JobSection,
    /// `[model]` (required).
    pub model: ModelSpec,
    /// `[data]` (required).
    pub data: DataSpec,
    /// `[train]` (its defaults when absent, like every section below).
    #[serde(default)]
    pub train: TrainSpec,
    /// `[optimizer]`.
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    /// `[schedule]`.
    #[serde(default)]
    pub schedule: ScheduleSpec,
    /// `[workers]`.
    #[serde(default)]
    pub workers: WorkersSpec,
    /// `[comm]`.
    #[serde(default)]
    pub comm: CommSpec,
    /// `[checkpoint]`.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// `[elastic]`; one node when absent.
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

/// `model.kind`: which network.
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

/// `data.kind`: where samples come from.
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
    /// Two bytes an id: vocabularies of up to 65,536 tokens.
    #[default]
    Uint16,
    /// Four bytes an id.
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
    /// IEEE single precision.
    #[default]
    Fp32,
    /// bfloat16: fp32's range in half the bytes, with 8 bits of precision.
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

/// `optimizer.kind`: the update rule.
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

/// `schedule.kind`: the shape of the learning rate over the steps.
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

/// `workers.device`: where a worker computes.
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
    /// Whether CPU workers are pinned to cores of their own (see
    /// [`CpuAffinity`]).
    #[serde(default)]
    pub cpu_affinity: CpuAffinity,
}

/// `[workers] cpu_affinity`: which cores a CPU worker may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuAffinity {
    /// On a CPU device, when the node's workers times their threads are
    /// exactly the cores the worker may use, each worker gets cores of its
    /// own (local rank r: the r-th run of `threads_per_worker` of them), so
    /// that ranks never share a core or migrate between cores; otherwise
    /// (more threads than cores, or room left for something else), as
    /// `none`.
    #[default]
    Auto,
    /// Every worker may run on every core the node gives it (the scheduler
    /// places them).
    None,
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
            cpu_affinity: CpuAffinity::default(),
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
    /// How CPU ranks exchange gradients: `auto` (shared memory between ranks
    /// on one host, TCP between hosts) or `tcp` (TCP everywhere).
    #[serde(default)]
    pub transport: CommTransport,
}

/// The CPU ring's transport between neighbouring ranks (`[comm] transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommTransport {
    /// Shared memory where the neighbour is on the same host, else TCP.
    #[default]
    Auto,
    /// TCP on every link.
    Tcp,
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
            transport: CommTransport::default(),
        }
    }
}

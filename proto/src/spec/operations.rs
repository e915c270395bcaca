//! The spec's types for running a job: checkpoints, elasticity, worker logs,
//! cluster launch, model registration and hooks (`[checkpoint]` to
//! `[[hooks]]`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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

pub(super) fn default_true() -> bool {
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

impl RegisterSpec {
    /// Where the registry lives: `registry`, else a `registry` folder beside
    /// the job's checkpoint folder `checkpoint_root` (so `kiln run` with no
    /// URLs keeps everything under its data folder; docs/decisions.md).
    pub fn registry_location(&self, checkpoint_root: &str) -> String {
        if let Some(url) = &self.registry {
            return url.clone();
        }
        let trimmed = checkpoint_root.trim_end_matches('/');
        match trimmed.rsplit_once('/') {
            Some((parent, _)) if !parent.ends_with(':') && !parent.ends_with("//") => {
                format!("{parent}/registry")
            }
            _ => format!("{trimmed}/registry"),
        }
    }

    /// Whether a version with these `metrics` may move `alias`: the gate
    /// metric (looked up as named, then without its `eval_` prefix) is at
    /// least `threshold`; with a metric and no threshold, it only has to be
    /// there; with no metric, always.
    pub fn passes_gate(&self, metrics: &std::collections::BTreeMap<String, f64>) -> bool {
        let value = |name: &str| {
            metrics
                .get(name)
                .or_else(|| metrics.get(name.strip_prefix("eval_").unwrap_or(name)))
                .copied()
        };
        match (&self.metric, self.threshold) {
            (Some(m), Some(threshold)) => value(m).is_some_and(|v| v >= threshold),
            (Some(m), None) => value(m).is_some(),
            _ => true,
        }
    }
}

/// `hooks[].sink`: how a hook delivers its events.
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
    /// How events are delivered; decides which of the fields below apply.
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

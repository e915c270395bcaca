//! Server settings: the TOML file of `kiln serve --config FILE`, which command
//! line flags override, validated strictly (an unknown key or a bad value is an
//! error naming the field and saying what is allowed).
//!
//! ```toml
//! registry = "file:///srv/kiln/registry"
//! models = ["digits@production", "fraud:3"]
//! listen = "0.0.0.0:8000"
//!
//! threads = 1                # libtorch intra-op threads per model instance
//! instances = 0              # compute threads (each its own copy of the network) per version; 0: one per two cores
//!
//! [batching]
//! max_batch_size = 32        # rows per forward pass
//! batch_shapes = [1, 2, 4, 8, 16, 32]  # row counts passes run at (default: powers of two up to max_batch_size)
//! max_queue_delay_us = 0     # how long the oldest request may wait for company
//! queue_capacity = 1024      # requests waiting per version
//! max_queue_bytes = 268435456  # input bytes waiting per version
//! packed_weights = true      # MLPs of >= 1 MiB: weights packed for shapes of >= 8 rows
//! inline_when_idle = true    # a lone request runs on the thread that parsed it
//!
//! [swap]
//! poll_interval_ms = 500     # how often aliases (and `latest`) are read
//!
//! [limits]
//! max_request_bytes = 67108864
//! max_request_rows = 4096
//! request_timeout_ms = 30000
//!
//! [auth]
//! token_file = "/run/secrets/kiln-infer-token"
//!
//! [connections]              # what one client can hold (defaults shown)
//! max_connections = 1024     # open connections; more wait in the kernel's backlog
//! max_in_flight = 1024       # requests being served; more get 503 + Retry-After
//! header_read_timeout_ms = 10000   # connect (TLS handshake included) or first byte -> request head
//! idle_timeout_ms = 75000          # no request on a connection for this long: closed
//! http2_keepalive_interval_ms = 20000  # HTTP/2 pings (0: none)
//! http2_keepalive_timeout_ms = 20000   # unanswered ping: connection closed
//!
//! [tls]                      # optional: HTTPS and gRPC over TLS on the same port
//! cert_file = "/run/secrets/tls.crt"   # PEM chain, leaf first
//! key_file = "/run/secrets/tls.key"    # PEM private key (PKCS#8, PKCS#1 or SEC1)
//!
//! [[hooks]]                  # the job spec's [[hooks]] fields
//! sink = "log"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;
use anyhow::{Context, Result, bail, ensure};
use kiln_checkpoint::registry::Selector;
use kiln_proto::spec::HookSpec;
use serde::{Deserialize, Serialize};

/// Environment variable holding the inference token.
pub const TOKEN_ENV: &str = "KILN_SERVE_TOKEN";
/// Environment variable holding the management token.
pub const ADMIN_TOKEN_ENV: &str = "KILN_SERVE_ADMIN_TOKEN";

/// Everything `kiln serve` needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Registry URL (same forms as checkpoint roots).
    #[serde(default)]
    pub registry: String,
    /// Models to serve: `NAME` (latest version, followed as it moves),
    /// `NAME:VERSION` (pinned) or `NAME@ALIAS` (followed as the alias moves).
    #[serde(default)]
    pub models: Vec<String>,
    /// Address of the one port REST and gRPC share; port 0 picks a free one.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// libtorch's intra-op threads per model version's compute thread; 0
    /// keeps libtorch's default. Default 1: serving batches of small models
    /// gains nothing from intra-op threads, and idle OpenMP threads spin.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Compute threads per served version (Triton's instance group), each
    /// with its own copy of the network, all draining the version's one
    /// queue; 0: for classifiers one per two cores this process may run on
    /// (at least one), divided by `threads` (the other core of each pair
    /// parses requests and encodes answers), for language models one per
    /// core divided by `threads` (a request's milliseconds of compute dwarf
    /// its parsing).
    #[serde(default)]
    pub instances: usize,
    /// `[batching]`: dynamic batching.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// `[swap]`: following aliases.
    #[serde(default)]
    pub swap: SwapConfig,
    /// `[limits]`: request size and time limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[auth]`: token files.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[drift]`: drift monitoring.
    #[serde(default)]
    pub drift: DriftConfig,
    /// `[connections]`: connection caps and timeouts.
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// `[tls]`: certificate and key files.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Where `version.swapped` and `drift.detected` events go.
    #[serde(default)]
    pub hooks: Vec<HookSpec>,
}

/// `[batching]`: dynamic batching, per served model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Rows of one forward pass. Requests are grouped up to this many rows;
    /// a larger request runs in several passes.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// The row counts forward passes run at: a batch of n rows runs at the
    /// smallest shape of at least n, padded with zeros (with `fixed_shape`).
    /// Empty (the default): the powers of two below `max_batch_size`, and
    /// `max_batch_size`. `[max_batch_size]` alone makes every answer
    /// independent of batching, bit for bit, at the price of padding work.
    #[serde(default)]
    pub batch_shapes: Vec<usize>,
    /// How long the oldest waiting request may wait for others to join its
    /// batch, in microseconds; 0: batch only what is already queued.
    #[serde(default = "default_max_queue_delay_us")]
    pub max_queue_delay_us: u64,
    /// Requests that may wait per version; more are refused with 503.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Input bytes (as f32 rows) that may wait per version; a request that
    /// would pass it is refused with 503 and `Retry-After`.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: usize,
    /// Run every forward pass at one of `batch_shapes` (padding with zeros),
    /// so that a request's outputs depend only on its rows and the shape of
    /// its pass, bit for bit: matrix kernels pick different code paths (and
    /// summation orders) for different row counts. Off: passes run at
    /// exactly the rows they hold, and answers may change in their last bits
    /// with whatever else shared the pass.
    #[serde(default = "default_true")]
    pub fixed_shape: bool,
    /// Pack an MLP's weights once for MKL's packed sgemm, for each of
    /// `batch_shapes` of 8 rows and more (about 1.3-2.2x faster passes
    /// there, at about five times the weights' memory per shape; only for
    /// MLPs of at least 1 MiB of weights, and not past 1 GiB of copies).
    #[serde(default = "default_true")]
    pub packed_weights: bool,
    /// With `max_queue_delay_us = 0` and at least 2 cores, a classifier's
    /// request that finds nothing queued and a model instance idle runs at
    /// once on the thread that parsed it instead of
    /// being handed to the compute thread and back (same shape, same answer
    /// bit for bit; two cross-thread wake-ups fewer).
    #[serde(default = "default_true")]
    pub inline_when_idle: bool,
}

/// `[swap]`: following aliases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapConfig {
    /// How often each alias (or `latest`) is read, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Seed of the per-request weighted choice between an alias's versions;
    /// unset: seeded from the clock.
    #[serde(default)]
    pub canary_seed: Option<u64>,
}

/// `[limits]`: what a request may ask for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body (REST) or message (gRPC), in bytes.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Most rows (samples) in one request.
    #[serde(default = "default_max_request_rows")]
    pub max_request_rows: usize,
    /// Time from receipt to response, in milliseconds; a request's own
    /// `timeout` parameter (microseconds, as tritonclient sends it) may
    /// shorten it.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

/// `[auth]`: bearer tokens. Tokens come from these files, else from the
/// environment (`KILN_SERVE_TOKEN`, `KILN_SERVE_ADMIN_TOKEN`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the token inference and metadata requests must carry.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// File holding the token management requests must carry. Without one,
    /// management requests are accepted only from loopback clients of a
    /// loopback listener that name a loopback host (see [`crate::auth`]).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

/// `[connections]`: what clients may hold of the server, so that slow or
/// hostile clients cannot take it over (see `serve/src/listener.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Open connections at once. At the cap the server stops accepting until
    /// one closes: new connections wait in the kernel's listen backlog
    /// rather than being refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests being served at once, over every connection (health probes
    /// and `/metrics` aside); more are answered 503 / `UNAVAILABLE` with
    /// `Retry-After` at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Longest time from accepting a connection (TLS handshake included), or
    /// from the first byte of a request on an idle HTTP/1.1 connection, to
    /// its complete request head; past it the connection is closed.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/2: with a GOAWAY).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Interval of HTTP/2 keepalive pings; 0 sends none.
    #[serde(default = "default_http2_keepalive_interval_ms")]
    pub http2_keepalive_interval_ms: u64,
    /// An HTTP/2 ping unanswered for this long closes the connection.
    #[serde(default = "default_http2_keepalive_timeout_ms")]
    pub http2_keepalive_timeout_ms: u64,
}

/// `[tls]`: serve HTTPS and gRPC over TLS on the listening port (both files,
/// or neither for plain HTTP and h2c).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, the server's certificate first.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file with the certificate's private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `[drift]`: drift monitoring of served inputs and predictions against each
/// version's reference profile (where the version has one): windows of
/// served rows, compared column by column as Evidently does by default
/// (see `serve/src/drift/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    /// Monitor drift at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Served rows per window; each full window is compared with the reference.
    #[serde(default = "default_window_rows")]
    pub window_rows: usize,
    /// Significance level of the p-value tests (KS, chi-square, Z).
    #[serde(default = "default_p_value_threshold")]
    pub p_value_threshold: f64,
    /// Threshold of the distances (Wasserstein, Jensen-Shannon).
    #[serde(default = "default_distance_threshold")]
    pub distance_threshold: f64,
    /// Share of drifted columns at which a window counts as dataset drift.
    #[serde(default = "default_drift_share")]
    pub drift_share: f64,
    /// At most one window per version is evaluated per this many
    /// milliseconds; windows completed in between are skipped (counted), so
    /// that monitoring costs a bounded share of the CPU under any load.
    #[serde(default = "default_min_interval_ms")]
    pub min_interval_ms: u64,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8000))
}
fn default_true() -> bool {
    true
}
fn default_max_batch_size() -> usize {
    32
}
/// No waiting for company by default: requests that arrive while a batch
/// computes are batched anyway, and a lone request is not delayed.
fn default_max_queue_delay_us() -> u64 {
    0
}
fn default_threads() -> usize {
    1
}
fn default_min_interval_ms() -> u64 {
    5000
}
fn default_queue_capacity() -> usize {
    1024
}
fn default_max_queue_bytes() -> usize {
    256 << 20
}
fn default_poll_interval_ms() -> u64 {
    500
}
fn default_max_request_bytes() -> usize {
    64 << 20
}
fn default_max_request_rows() -> usize {
    4096
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_in_flight() -> usize {
    1024
}
/// Clients send their request head right after connecting; 10 s is generous
/// for any real client and short enough that connections held open by
/// clients that never finish their heads are freed quickly.
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
/// Above the 60 s idle timeout of common load balancers, so that the
/// balancer, not the server, closes idle pooled connections (a server that
/// closes first races the balancer's next request on that connection).
fn default_idle_timeout_ms() -> u64 {
    75_000
}
fn default_http2_keepalive_interval_ms() -> u64 {
    20_000
}
fn default_http2_keepalive_timeout_ms() -> u64 {
    20_000
}
fn default_window_rows() -> usize {
    crate::drift::DEFAULT_WINDOW_ROWS
}
fn default_p_value_threshold() -> f64 {
    crate::drift::DEFAULT_P_VALUE_THRESHOLD
}
fn default_distance_threshold() -> f64 {
    crate::drift::DEFAULT_DISTANCE_THRESHOLD
}
fn default_drift_share() -> f64 {
    crate::drift::DEFAULT_DRIFT_SHARE
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            registry: String::new(),
            models: Vec::new(),
            listen: default_listen(),
            threads: default_threads(),
            instances: 0,
            batching: BatchingConfig::default(),
            swap: SwapConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            drift: DriftConfig::default(),
            connections: ConnectionsConfig::default(),
            tls: TlsConfig::default(),
            hooks: Vec::new(),
        }
    }
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch_size(),
            batch_shapes: Vec::new(),
            max_queue_delay_us: default_max_queue_delay_us(),
            queue_capacity: default_queue_capacity(),
            max_queue_bytes: default_max_queue_bytes(),
            fixed_shape: true,
            packed_weights: true,
            inline_when_idle: true,
        }
    }
}

impl Default for SwapConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: default_poll_interval_ms(),
            canary_seed: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: default_max_request_bytes(),
            max_request_rows: default_max_request_rows(),
            request_timeout_ms: default_request_timeout_ms(),
        }
    }
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_in_flight: default_max_in_flight(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            http2_keepalive_interval_ms: default_http2_keepalive_interval_ms(),
            http2_keepalive_timeout_ms: default_http2_keepalive_timeout_ms(),
        }
    }
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_rows: default_window_rows(),
            p_value_threshold: default_p_value_threshold(),
            distance_threshold: default_distance_threshold(),
            drift_share: default_drift_share(),
            min_interval_ms: default_min_interval_ms(),
        }
    }
}

impl ServeConfig {
    /// Reads and checks a config file; relative token, certificate and key
    /// file paths are taken from the file's folder.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        Self::read_file(path).map_err(Error::config)
    }

    fn read_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read serve config {}", path.display()))?;
        let mut config =
            Self::parse(&text).with_context(|| format!("serve config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut config.auth.token_file,
            &mut config.auth.admin_token_file,
            &mut config.tls.cert_file,
            &mut config.tls.key_file,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }

    /// Parses a config from TOML text (no checks beyond the types: see
    /// [`ServeConfig::validate`]).
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        Self::parse(text).map_err(Error::config)
    }

    fn parse(text: &str) -> Result<Self> {
        let deserializer = toml::Deserializer::parse(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().trim().to_string();
            if path.is_empty() || path == "." {
                anyhow::anyhow!("{message}")
            } else {
                anyhow::anyhow!("{path}: {message}")
            }
        })
    }

    /// Checks every value; the error names the field and says what is allowed.
    pub fn validate(&self) -> Result<(), Error> {
        self.check().map_err(Error::config)
    }

    fn check(&self) -> Result<()> {
        ensure!(
            !self.registry.trim().is_empty(),
            "registry: required (a registry URL such as file:///srv/kiln/registry or s3://bucket/registry)"
        );
        ensure!(
            !self.models.is_empty(),
            "models: name at least one model to serve (NAME, NAME:VERSION or NAME@ALIAS)"
        );
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let selector: Selector = m.parse().map_err(|e| anyhow::anyhow!("models[{i}]: {e}"))?;
            if !names.insert(selector.name.clone()) {
                bail!(
                    "models[{i}]: model {} is named twice; serve one selector per model (an alias splits traffic between versions)",
                    selector.name
                );
            }
        }
        let b = &self.batching;
        ensure!(
            (1..=65_536).contains(&b.max_batch_size),
            "batching.max_batch_size: {} is out of range; allowed: 1 to 65536 rows",
            b.max_batch_size
        );
        ensure!(
            b.max_queue_delay_us <= 10_000_000,
            "batching.max_queue_delay_us: {} is out of range; allowed: 0 to 10000000 (10 s)",
            b.max_queue_delay_us
        );
        for (i, &shape) in b.batch_shapes.iter().enumerate() {
            ensure!(
                (1..=b.max_batch_size).contains(&shape),
                "batching.batch_shapes[{i}]: {shape} is out of range; allowed: 1 to max_batch_size ({})",
                b.max_batch_size
            );
        }
        ensure!(
            b.batch_shapes.len() <= 64,
            "batching.batch_shapes: {} shapes; at most 64 (each is warmed up when a version loads)",
            b.batch_shapes.len()
        );
        ensure!(
            (1..=(64usize << 30)).contains(&b.max_queue_bytes),
            "batching.max_queue_bytes: {} is out of range; allowed: 1 to 68719476736 (64 GiB)",
            b.max_queue_bytes
        );
        ensure!(
            (1..=1_000_000).contains(&b.queue_capacity),
            "batching.queue_capacity: {} is out of range; allowed: 1 to 1000000 requests",
            b.queue_capacity
        );
        ensure!(
            (10..=3_600_000).contains(&self.swap.poll_interval_ms),
            "swap.poll_interval_ms: {} is out of range; allowed: 10 to 3600000",
            self.swap.poll_interval_ms
        );
        let l = &self.limits;
        ensure!(
            (1024..=(4usize << 30)).contains(&l.max_request_bytes),
            "limits.max_request_bytes: {} is out of range; allowed: 1024 to 4294967296",
            l.max_request_bytes
        );
        ensure!(
            l.max_request_rows >= 1,
            "limits.max_request_rows: must be at least 1"
        );
        ensure!(
            (1..=3_600_000).contains(&l.request_timeout_ms),
            "limits.request_timeout_ms: {} is out of range; allowed: 1 to 3600000",
            l.request_timeout_ms
        );
        ensure!(
            self.threads <= 1024,
            "threads: {} is out of range; allowed: 0 (libtorch's default) to 1024",
            self.threads
        );
        ensure!(
            self.instances <= 256,
            "instances: {} is out of range; allowed: 0 (one per two cores) to 256",
            self.instances
        );
        self.connections.validate()?;
        self.tls.validate()?;
        self.drift.options().validate().map_err(|e| {
            anyhow::anyhow!(
                "drift.{}",
                e.to_string().trim_start_matches("drift options: ")
            )
        })?;
        Ok(())
    }

    /// The parsed model selectors (call after [`ServeConfig::validate`]).
    pub fn selectors(&self) -> Result<Vec<Selector>, Error> {
        self.models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.parse().map_err(|e| Error::Config {
                    reason: format!("models[{i}]: {e}"),
                })
            })
            .collect()
    }

    /// The row counts forward passes run at, ascending, ending with
    /// `max_batch_size` (call after [`ServeConfig::validate`]).
    pub fn batch_shapes(&self) -> Vec<usize> {
        let max = self.batching.max_batch_size;
        let mut shapes = if self.batching.batch_shapes.is_empty() {
            std::iter::successors(Some(1usize), |s| s.checked_mul(2))
                .take_while(|&s| s < max)
                .collect()
        } else {
            self.batching.batch_shapes.clone()
        };
        shapes.push(max);
        shapes.sort_unstable();
        shapes.dedup();
        shapes
    }

    /// The shapes an MLP's weights are packed for (empty: none).
    pub fn packed_shapes(&self) -> Vec<usize> {
        if !self.batching.packed_weights || !self.batching.fixed_shape {
            return Vec::new();
        }
        self.batch_shapes()
            .into_iter()
            .filter(|&s| s >= crate::packed::MIN_PACKED_ROWS)
            .collect()
    }

    /// Compute threads per language-model version: `instances`, or one per
    /// core this process may run on, divided by `threads`.
    pub fn lm_instances(&self) -> usize {
        if self.instances > 0 {
            return self.instances;
        }
        let cores = available_cores();
        (cores / self.threads.max(1)).max(1)
    }

    /// Compute threads per version: `instances`, or one per two cores this
    /// process may run on (its CPU affinity and quota), divided by `threads`.
    /// Measured on 2 cores (bench/serve.py, MLP 784-1024-1024-10, 32 and 128
    /// connections): one instance answered 10.8k and 14.0k req/s, two 9.1k
    /// and 12.5k: JSON parsing and HTTP take about as long as a small
    /// model's forward pass, and two compute threads starve them.
    pub fn instances(&self) -> usize {
        if self.instances > 0 {
            return self.instances;
        }
        let cores = available_cores();
        (cores / 2 / self.threads.max(1)).max(1)
    }

    /// Whether lone requests run inline (`batching.inline_when_idle`): only
    /// when this process may use at least 2 cores. On one core the hand-off
    /// to the compute thread is a cheap switch (84 us of overhead at
    /// concurrency 1 through the queue, 56-73 inline), while running inline
    /// raised the p99 there from 0.5-1.6 ms to 2.4-5.0 ms (tokio's
    /// `block_in_place` hands the async worker's role to another thread,
    /// which then shares the one core with the pass).
    pub fn inline_when_idle(&self) -> bool {
        self.batching.inline_when_idle && available_cores() >= 2
    }

    /// The batching delay as a duration.
    pub fn max_queue_delay(&self) -> Duration {
        Duration::from_micros(self.batching.max_queue_delay_us)
    }

    /// The alias polling interval as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.swap.poll_interval_ms)
    }

    /// The request time limit as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.request_timeout_ms)
    }
}

/// The cores this process may run on (its CPU affinity and quota).
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl ConnectionsConfig {
    fn validate(&self) -> Result<()> {
        ensure!(
            (1..=1_000_000).contains(&self.max_connections),
            "connections.max_connections: {} is out of range; allowed: 1 to 1000000",
            self.max_connections
        );
        ensure!(
            (1..=1_000_000).contains(&self.max_in_flight),
            "connections.max_in_flight: {} is out of range; allowed: 1 to 1000000",
            self.max_in_flight
        );
        for (field, value, min) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms, 1),
            ("idle_timeout_ms", self.idle_timeout_ms, 1),
            (
                "http2_keepalive_interval_ms",
                self.http2_keepalive_interval_ms,
                0,
            ),
            (
                "http2_keepalive_timeout_ms",
                self.http2_keepalive_timeout_ms,
                1,
            ),
        ] {
            ensure!(
                (min..=3_600_000).contains(&value),
                "connections.{field}: {value} is out of range; allowed: {min} to 3600000"
            );
        }
        Ok(())
    }

    /// The header read timeout as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    /// The idle timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// The HTTP/2 keepalive interval; `None` when pings are off.
    pub fn http2_keepalive_interval(&self) -> Option<Duration> {
        (self.http2_keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(self.http2_keepalive_interval_ms))
    }

    /// How long an HTTP/2 ping may go unanswered.
    pub fn http2_keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.http2_keepalive_timeout_ms)
    }
}

impl TlsConfig {
    /// Whether TLS is on (both files given; see [`Self::validate`]).
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }

    fn validate(&self) -> Result<()> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                bail!(
                    "tls.key_file: required with tls.cert_file (the certificate's private key, PEM)"
                )
            }
            (None, Some(_)) => {
                bail!("tls.cert_file: required with tls.key_file (the certificate chain, PEM)")
            }
            _ => Ok(()),
        }
    }
}

impl DriftConfig {
    /// The monitor options these settings give.
    pub fn options(&self) -> crate::drift::DriftOptions {
        crate::drift::DriftOptions {
            window_rows: self.window_rows,
            p_value_threshold: self.p_value_threshold,
            distance_threshold: self.distance_threshold,
            drift_share: self.drift_share,
        }
    }
}

/// The tokens in force, read once at start.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Required on inference and metadata requests when set.
    pub inference: Option<String>,
    /// Required on management requests when set (and accepted for inference).
    pub admin: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        f.debug_struct("Tokens")
            .field("inference", &self.inference.as_ref().map(|_| "<set>"))
            .field("admin", &self.admin.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl AuthConfig {
    /// Reads the tokens: a configured file wins over the environment. A
    /// token file that is missing, unreadable or empty is an error (a server
    /// that silently ran without the token it was told to use would be open).
    pub fn tokens(&self) -> Result<Tokens, Error> {
        let read = || -> Result<Tokens> {
            Ok(Tokens {
                inference: read_token("auth.token_file", self.token_file.as_deref(), TOKEN_ENV)?,
                admin: read_token(
                    "auth.admin_token_file",
                    self.admin_token_file.as_deref(),
                    ADMIN_TOKEN_ENV,
                )?,
            })
        };
        read().map_err(Error::config)
    }
}

fn read_token(field: &str, file: Option<&Path>, env: &str) -> Result<Option<String>> {
    let token = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{field}: read {}", path.display()))?;
            let token = text.trim().to_string();
            ensure!(!token.is_empty(), "{field}: {} is empty", path.display());
            token
        }
        None => match std::env::var(env) {
            Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
            _ => return Ok(None),
        },
    };
    ensure!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "{field}: a token must be printable ASCII without spaces (it travels in an HTTP header)"
    );
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file_and_rejects_unknown_keys() {
        let c = ServeConfig::from_toml(
            r#"
registry = "memory://r"
models = ["digits@production", "other:2"]
listen = "127.0.0.1:0"
[batching]
max_batch_size = 8
max_queue_delay_us = 500
[swap]
poll_interval_ms = 100
canary_seed = 7
[limits]
max_request_rows = 64
[connections]
max_connections = 10
header_read_timeout_ms = 300
[tls]
cert_file = "c.pem"
key_file = "k.pem"
[[hooks]]
sink = "log"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.batching.max_batch_size, 8);
        assert!(c.batching.fixed_shape);
        assert_eq!(c.batch_shapes(), vec![1, 2, 4, 8]);
        assert_eq!(c.batching.max_queue_bytes, 256 << 20);
        assert_eq!(c.swap.canary_seed, Some(7));
        assert_eq!(c.limits.max_request_bytes, 64 << 20);
        assert_eq!(c.hooks.len(), 1);
        assert_eq!(c.connections.max_connections, 10);
        assert_eq!(c.connections.header_read_timeout_ms, 300);
        assert_eq!(c.connections.max_in_flight, 1024);
        assert!(c.tls.enabled());
        assert_eq!(c.selectors().unwrap()[1].to_string(), "other:2");

        let e = ServeConfig::from_toml("[batching]\nmax_batchsize = 3\n").unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("batching") && e.contains("max_batchsize"), "{e}");
        let e = ServeConfig::from_toml("[connections]\nmax_conns = 3\n").unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("connections") && e.contains("max_conns"), "{e}");
        let e = ServeConfig::from_toml("[tls]\ncert = \"c.pem\"\n").unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("tls") && e.contains("cert"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = ServeConfig {
            registry: "memory://r".into(),
            models: vec!["m".into()],
            ..Default::default()
        };
        c.validate().unwrap();
        c.batching.max_batch_size = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("batching.max_batch_size"), "{e}");
        c.batching.max_batch_size = 24;
        assert_eq!(c.batch_shapes(), vec![1, 2, 4, 8, 16, 24]);
        c.batching.batch_shapes = vec![8, 3, 8];
        assert_eq!(c.batch_shapes(), vec![3, 8, 24]);
        c.batching.batch_shapes = vec![4, 25];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("batching.batch_shapes[1]"), "{e}");
        c.batching.batch_shapes = Vec::new();
        c.batching.max_batch_size = 4;
        c.instances = 3;
        assert_eq!(c.instances(), 3);
        c.instances = 1000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("instances"), "{e}");
        c.instances = 0;
        assert!(c.instances() >= 1);
        c.models = vec!["m@prod".into(), "m:2".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("models[1]") && e.contains("twice"), "{e}");
        c.models = vec!["bad name".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("models[0]"), "{e}");
        c.models = vec!["m".into()];
        c.drift.window_rows = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("drift.window_rows"), "{e}");
        c.drift.window_rows = 100;
        c.connections.max_connections = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("connections.max_connections"), "{e}");
        c.connections.max_connections = 4;
        c.connections.header_read_timeout_ms = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("connections.header_read_timeout_ms"), "{e}");
        c.connections.header_read_timeout_ms = 300;
        c.connections.http2_keepalive_interval_ms = 0;
        c.validate().unwrap();
        c.tls.cert_file = Some("c.pem".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("tls.key_file"), "{e}");
        c.tls.key_file = Some("k.pem".into());
        c.validate().unwrap();
        c.registry = " ".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("registry")
        );
    }

    #[test]
    fn token_files_win_and_must_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "s3cret\n").unwrap();
        let auth = AuthConfig {
            token_file: Some(f.clone()),
            admin_token_file: None,
        };
        let t = auth.tokens().unwrap();
        assert_eq!(t.inference.as_deref(), Some("s3cret"));
        assert!(!format!("{t:?}").contains("s3cret"));
        std::fs::write(&f, "  \n").unwrap();
        let e = auth.tokens().unwrap_err().to_string();
        assert!(e.contains("auth.token_file") && e.contains("empty"), "{e}");
        let missing = AuthConfig {
            token_file: Some(dir.path().join("nope")),
            admin_token_file: None,
        };
        assert!(missing.tokens().is_err());
    }
}

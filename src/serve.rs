//! `kiln serve`: the inference server's command line. Flags override the
//! config file (`--config`); the server itself lives in `kiln-serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_serve::ServeConfig;
use tokio_util::sync::CancellationToken;

/// Arguments of `kiln serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Registry URL (file:///abs, /abs, s3://bucket/prefix, gs://, az://);
    /// default: the config file's, else $KILN_REGISTRY.
    #[arg(long)]
    pub registry: Option<String>,
    /// A model to serve: NAME (its latest version, followed), NAME:VERSION
    /// (pinned) or NAME@ALIAS (followed as the alias moves). Repeatable;
    /// replaces the config file's `models`.
    #[arg(long = "model", value_name = "NAME[@ALIAS|:VERSION]")]
    pub models: Vec<String>,
    /// Address REST and gRPC share; port 0 picks a free one [default: 127.0.0.1:8000].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Server settings (TOML; see docs/serving.md). Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Rows of one forward pass (dynamic batching) [default: 32].
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    /// Row counts forward passes run at, comma-separated (e.g. 1,4,16,32); a
    /// batch runs at the smallest that holds it [default: powers of two up to
    /// --max-batch-size]. `--batch-shapes N` with N = --max-batch-size makes
    /// answers independent of batching, bit for bit.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub batch_shapes: Option<Vec<usize>>,
    /// How long a request may wait for others to batch with, in microseconds [default: 0].
    #[arg(long)]
    pub max_queue_delay_us: Option<u64>,
    /// How often aliases are checked for moves, in milliseconds [default: 500].
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// Seed of the weighted choice between an alias's versions (canaries).
    #[arg(long)]
    pub canary_seed: Option<u64>,
    /// Largest request body or gRPC message, in bytes [default: 67108864].
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// Most rows in one request [default: 4096].
    #[arg(long)]
    pub max_request_rows: Option<usize>,
    /// Time limit of a request, in milliseconds [default: 30000].
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// libtorch intra-op threads of each model instance (0: libtorch's default) [default: 1].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute threads per model version, each with its own copy of the
    /// network (0: one per two cores this process may use, divided by --threads) [default: 0].
    #[arg(long)]
    pub instances: Option<usize>,
    /// File with the inference token (else KILN_SERVE_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// File with the management token (else KILN_SERVE_ADMIN_TOKEN).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Serve HTTPS and gRPC over TLS with this PEM certificate chain (with --tls-key-file).
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of --tls-cert-file.
    #[arg(long)]
    pub tls_key_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The config file (if any) with the flags applied.
    pub fn config(&self) -> Result<ServeConfig> {
        let mut c = match &self.config {
            Some(path) => ServeConfig::from_file(path)?,
            None => ServeConfig::default(),
        };
        if let Some(r) = &self.registry {
            c.registry = r.clone();
        } else if c.registry.is_empty()
            && let Ok(r) = std::env::var("KILN_REGISTRY")
        {
            c.registry = r;
        }
        if !self.models.is_empty() {
            c.models = self.models.clone();
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.max_batch_size {
            c.batching.max_batch_size = v;
        }
        if let Some(v) = &self.batch_shapes {
            c.batching.batch_shapes = v.clone();
        }
        if let Some(v) = self.max_queue_delay_us {
            c.batching.max_queue_delay_us = v;
        }
        if let Some(v) = self.poll_interval_ms {
            c.swap.poll_interval_ms = v;
        }
        if self.canary_seed.is_some() {
            c.swap.canary_seed = self.canary_seed;
        }
        if let Some(v) = self.max_request_bytes {
            c.limits.max_request_bytes = v;
        }
        if let Some(v) = self.max_request_rows {
            c.limits.max_request_rows = v;
        }
        if let Some(v) = self.request_timeout_ms {
            c.limits.request_timeout_ms = v;
        }
        if let Some(v) = self.threads {
            c.threads = v;
        }
        if let Some(v) = self.instances {
            c.instances = v;
        }
        if self.token_file.is_some() {
            c.auth.token_file = self.token_file.clone();
        }
        if self.admin_token_file.is_some() {
            c.auth.admin_token_file = self.admin_token_file.clone();
        }
        if self.tls_cert_file.is_some() {
            c.tls.cert_file = self.tls_cert_file.clone();
        }
        if self.tls_key_file.is_some() {
            c.tls.key_file = self.tls_key_file.clone();
        }
        Ok(c)
    }
}

/// Runs the server until SIGINT or SIGTERM; prints
/// `kiln serve: listening on http://ADDR` (`https://` with TLS) on stdout
/// once every model is ready.
pub async fn run(args: ServeArgs) -> Result<ExitCode> {
    let config = args.config()?;
    let scheme = if config.tls.enabled() {
        "https"
    } else {
        "http"
    };
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
                    let _ = tokio::signal::ctrl_c().await;
                    stop.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: finishing requests in flight");
        stop.cancel();
    });
    let server = kiln_serve::start(config, cancel)
        .await
        .context("start the inference server")?;
    println!(
        "kiln serve: listening on {scheme}://{}",
        server.local_addr()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.wait().await?;
    Ok(ExitCode::SUCCESS)
}

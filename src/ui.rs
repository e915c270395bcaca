//! `kiln ui` (the dashboard over a store, run folders, checkpoint roots,
//! registries and `kiln serve` URLs) and the dashboard's wiring into `kiln
//! run` and `kiln agent`: the metrics history they record ([`RunFeed`],
//! [`AgentHistory`]) and the embedded server (`--ui ADDR`). The dashboard
//! itself is `kiln_ui`; the guide is docs/ui.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_coordinator::keyspace::Keyspace;
use kiln_ui::{JobSources, UiConfig};
use tokio_util::sync::CancellationToken;

/// The environment variable holding the dashboard's token (actions).
pub const TOKEN_ENV: &str = "KILN_UI_TOKEN";

/// Arguments of `kiln ui`.
#[derive(Debug, clap::Args)]
pub struct UiArgs {
    /// Address to serve on. Without a token only a loopback address is
    /// allowed; port 0 picks a free port (the URL is printed).
    #[arg(long, default_value = "127.0.0.1:8790")]
    pub addr: SocketAddr,
    /// A coordination store whose jobs to show: etcd://HOST:PORT[,...].
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// `kiln run` data folders whose finished jobs to show (repeatable).
    #[arg(long = "data-dir", value_name = "DIR", default_value = "kiln-data")]
    pub data_dirs: Vec<PathBuf>,
    /// Checkpoint roots to browse besides those the jobs recorded (repeatable).
    #[arg(long = "checkpoints", value_name = "URL")]
    pub checkpoint_roots: Vec<String>,
    /// Model registries to show besides those the jobs recorded (repeatable;
    /// default: $KILN_REGISTRY).
    #[arg(long = "registry", value_name = "URL")]
    pub registries: Vec<String>,
    /// `kiln serve` base URLs for the Serving page (repeatable).
    #[arg(long = "serve-url", value_name = "URL")]
    pub serve_urls: Vec<String>,
    /// File holding the bearer token that enables actions (cancel, promote,
    /// rollback); default: $KILN_UI_TOKEN; neither: read-only.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

pub async fn run(args: UiArgs) -> anyhow::Result<ExitCode> {
    let token = read_token(args.token_file.as_deref())?;
    let store = match &args.store {
        Some(url) => Some((
            kiln_coordinator::store::connect(url)
                .await
                .with_context(|| format!("connect to the store {url}"))?,
            Keyspace::default(),
        )),
        None => None,
    };
    let mut registries = args.registries.clone();
    if registries.is_empty()
        && let Ok(url) = std::env::var("KILN_REGISTRY")
        && !url.trim().is_empty()
    {
        registries.push(url.trim().to_string());
    }
    for url in &args.serve_urls {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--serve-url {url}: give the server's base URL, http://HOST:PORT");
        }
    }
    let cfg = UiConfig {
        jobs: JobSources {
            store,
            data_dirs: args.data_dirs.clone(),
        },
        checkpoint_roots: args.checkpoint_roots.clone(),
        registries,
        serve_urls: args.serve_urls.clone(),
        token,
    };
    let cancel = CancellationToken::new();
    let dashboard = Dashboard::start(args.addr, cfg, cancel.clone()).await?;
    // Scripts and tests read the URL from this line (port 0 picks one).
    println!("dashboard on {}", dashboard.url());
    crate::coordinator::wait_for_signal().await?;
    cancel.cancel();
    dashboard.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// The token from `file`, else from $KILN_UI_TOKEN; `None`: read-only.
pub fn read_token(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    crate::jobs::token_from(file, TOKEN_ENV)
}

/// A dashboard served in the background of another command.
pub struct Dashboard {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Dashboard {
    /// Binds `addr` (refusing a non-loopback one without a token) and serves
    /// until `cancel` or [`Dashboard::stop`].
    pub async fn start(
        addr: SocketAddr,
        cfg: UiConfig,
        cancel: CancellationToken,
    ) -> anyhow::Result<Dashboard> {
        if let Err(message) = kiln_ui::check_listen(addr, cfg.token.as_deref()) {
            bail!("{message}");
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr} for the dashboard"))?;
        let addr = listener
            .local_addr()
            .context("read the dashboard address")?;
        let task = tokio::spawn(kiln_ui::serve(cfg, listener, cancel.clone()));
        Ok(Dashboard { addr, cancel, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Keeps serving for `linger` (or until SIGINT/SIGTERM), then stops.
    pub async fn linger_then_stop(self, linger: Duration) {
        if !linger.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = crate::coordinator::wait_for_signal() => {}
            }
        }
        self.stop().await;
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        match self.task.await {
            Ok(Err(e)) => tracing::warn!("dashboard: {e}"),
            Err(e) => tracing::warn!("dashboard task: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

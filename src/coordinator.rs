//! `kiln coordinator`: one replica of the coordinator service. Wires the store,
//! the job API (`kiln_coordinator::api`) and the elected background work
//! (`kiln_coordinator::replica`) together; run two or more against one etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use kiln_coordinator::api::{self, BearerAuth, JobApi};
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::replica::{self, LocalLauncher, ReplicaConfig};
use tokio_util::sync::CancellationToken;

use crate::jobs;

/// Arguments of `kiln coordinator`.
#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// The coordination store: etcd://HOST:PORT[,HOST:PORT...] (or mem:// for a
    /// single-replica trial: jobs live as long as the process).
    #[arg(long, value_name = "URL")]
    pub store: String,
    /// Address of the job API (gRPC). Without a token only a loopback address
    /// is allowed; port 0 picks a free port (the address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// File holding the bearer token clients must present (default: the
    /// KILN_COORDINATOR_TOKEN environment variable; neither: no token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Start the agents of submitted jobs: `local` runs `kiln agent`
    /// processes on this machine (only the elected replica launches).
    #[arg(long, value_enum)]
    pub launch: Option<LaunchBackend>,
    /// The kiln binary launched agents run (default: this one).
    #[arg(long, requires = "launch")]
    pub kiln_bin: Option<PathBuf>,
    /// The launched agents' --data-dir: run folders, checkpoints (unless the
    /// spec names checkpoint.url) and agent logs (jobs/JOB/agent-NODE.log).
    #[arg(long, default_value = "kiln-data")]
    pub data_dir: PathBuf,
    /// This replica's name in the election and in job records
    /// (default: HOST-PID).
    #[arg(long)]
    pub name: Option<String>,
    /// TTL of the election lease, in seconds: when the elected replica dies,
    /// another takes over its background work about this long after.
    #[arg(long, default_value_t = 5)]
    pub lease_ttl_secs: u64,
    /// Serve the dashboard (docs/ui.md) over this replica's store on this
    /// address; its actions take the job API's token.
    #[arg(long, value_name = "ADDR")]
    pub ui: Option<SocketAddr>,
    /// Serve the job API over TLS with this PEM certificate (chain); clients
    /// then use https:// and --ca-file.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
}

/// Where launched agents run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LaunchBackend {
    /// `kiln agent` processes on the coordinator's machine.
    Local,
}

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let token = jobs::read_token(args.token_file.as_deref())?;
    let auth = BearerAuth::new(token.as_deref());
    if let Err(message) = api::check_listen(args.listen, &auth) {
        bail!("{message}");
    }
    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => {
            Some(api::ApiTls::from_files(cert, key).map_err(|message| anyhow!(message))?)
        }
        _ => None,
    };
    if tls.is_none() && auth.enabled() && !args.listen.ip().is_loopback() {
        tracing::warn!(
            "the job API on {} is plain gRPC: its bearer token crosses the network in the clear \
             (serve TLS with --tls-cert-file and --tls-key-file, docs/security.md)",
            args.listen
        );
    }
    if args.lease_ttl_secs == 0 {
        bail!("--lease-ttl-secs must be at least 1");
    }
    let name = match &args.name {
        Some(name) => name.clone(),
        None => default_name(),
    };
    kiln_coordinator::keyspace::validate_name("--name", &name)?;
    let launcher = match args.launch {
        None => None,
        Some(LaunchBackend::Local) => {
            if args.store.starts_with("mem://") {
                bail!(
                    "--launch local needs a shared store (etcd://...): agents are separate \
                     processes and cannot reach this process's mem:// store"
                );
            }
            let kiln_bin = match &args.kiln_bin {
                Some(path) => path.clone(),
                None => std::env::current_exe().context("locate the kiln binary")?,
            };
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("create {}", args.data_dir.display()))?;
            let data_dir = args
                .data_dir
                .canonicalize()
                .with_context(|| format!("resolve {}", args.data_dir.display()))?;
            Some(LocalLauncher {
                kiln_bin,
                store_url: args.store.clone(),
                data_dir,
            })
        }
    };

    let store = kiln_coordinator::store::connect(&args.store)
        .await
        .with_context(|| format!("connect to the store {}", args.store))?;
    let ks = Keyspace::default();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("read the listening address")?;

    let shutdown = CancellationToken::new();
    let api = JobApi::new(store.clone(), ks.clone(), name.clone(), shutdown.clone());
    let server = tokio::spawn(api::serve(
        api,
        auth.clone(),
        listener,
        tls,
        shutdown.clone(),
    ));
    let background = tokio::spawn(replica::run_background(
        store.clone(),
        ks.clone(),
        ReplicaConfig {
            name: name.clone(),
            lease_ttl: Duration::from_secs(args.lease_ttl_secs),
            launcher,
        },
        shutdown.clone(),
    ));
    let dashboard = match args.ui {
        Some(ui_addr) => {
            let cfg = kiln_ui::UiConfig {
                jobs: kiln_ui::JobSources {
                    store: Some((store.clone(), ks.clone())),
                    data_dirs: vec![args.data_dir.clone()],
                },
                token: token.clone(),
                ..Default::default()
            };
            let dashboard = crate::ui::Dashboard::start(ui_addr, cfg, shutdown.clone()).await?;
            println!("dashboard on {}", dashboard.url());
            Some(dashboard)
        }
        None => None,
    };
    tracing::info!(
        replica = name,
        %addr,
        auth = auth.enabled(),
        launch = ?args.launch,
        "coordinator serving the job API"
    );
    // Scripts and tests read the address from this line (port 0 picks one).
    println!("listening on {addr}");

    wait_for_signal().await?;
    tracing::info!(replica = name, "shutting down");
    shutdown.cancel();
    if let Some(dashboard) = dashboard {
        dashboard.stop().await;
    }
    background
        .await
        .context("background task")?
        .context("coordinator background work")?;
    server
        .await
        .context("server task")?
        .context("serve the job API")?;
    Ok(ExitCode::SUCCESS)
}

/// `HOST-PID`: unique among the replicas of one machine.
fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coordinator".to_string());
    format!("{host}-{}", std::process::id())
}

/// Returns on SIGINT or SIGTERM.
pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("wait for ctrl-c")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

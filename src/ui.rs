//! `kiln ui` (the dashboard over a store, run folders, checkpoint roots,
//! registries and `kiln serve` URLs) and the dashboard's wiring into `kiln
//! run` and `kiln agent`: the metrics history they record ([`RunFeed`],
//! [`AgentHistory`]) and the embedded server (`--ui ADDR`). The dashboard
//! itself is `kiln_ui`; the guide is docs/ui.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::status::{self, Phase};
use kiln_coordinator::store::Store;
use kiln_proto::worker::RoundStarted;
use kiln_trainer::agent::{AgentEvent, ElasticUpdate};
use kiln_ui::history::{CheckpointMark, EvalMark, RoundMark, Sample};
use kiln_ui::recorder::extra;
use kiln_ui::{JobSources, Record, Recorder, RecorderConfig, UiConfig};
use tokio_util::sync::CancellationToken;

/// The environment variable holding the dashboard's token (actions).
pub const TOKEN_ENV: &str = "KILN_UI_TOKEN";

/// How often `kiln run` writes the history (its store is in memory).
const RUN_FLUSH: Duration = Duration::from_secs(1);

/// How often an agent writes the history to etcd.
const AGENT_FLUSH: Duration = Duration::from_secs(5);

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

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What an agent event adds to the history (rank 0's events only).
fn record_of(event: &AgentEvent, global_batch: usize) -> Option<Record> {
    let at = unix_now();
    match event {
        AgentEvent::Progress { rank: 0, progress } => Some(Record::Progress(
            Sample::from_progress(progress, global_batch, at),
        )),
        AgentEvent::Eval { rank: 0, eval } => Some(Record::Eval(EvalMark {
            step: eval.step,
            at,
            metrics: eval.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        })),
        AgentEvent::Checkpoint { rank: 0, saved } => Some(Record::Checkpoint(CheckpointMark {
            step: saved.step,
            url: saved.url.clone(),
            at,
            bytes_uploaded: saved.bytes_uploaded,
            bytes_reused: saved.bytes_reused,
            blocking_seconds: saved.blocking_seconds,
            durable_seconds: saved.durable_seconds,
            codec: saved.codec.clone(),
        })),
        _ => None,
    }
}

fn round_mark(started: &RoundStarted) -> RoundMark {
    RoundMark {
        round: started.round,
        world_size: started.world_size,
        step: started.step,
        at: unix_now(),
        setup_seconds: started.setup_seconds,
        state_source: match started.state_source {
            s if s < 0 => "checkpoint or fresh".to_string(),
            s => format!("rank {s}"),
        },
    }
}

/// Where a job records its history: the store, and for `kiln run` its run
/// folder too.
pub struct HistoryTarget<'a> {
    pub store: &'a Arc<dyn Store>,
    pub ks: &'a Keyspace,
    pub job: &'a str,
    pub checkpoint_root: &'a str,
    pub registry: Option<String>,
}

impl HistoryTarget<'_> {
    async fn recorder(&self, run_dir: Option<PathBuf>, flush_every: Duration) -> Recorder {
        Recorder::start(RecorderConfig {
            job: self.job.to_string(),
            store: self.store.clone(),
            ks: self.ks.clone(),
            run_dir,
            flush_every,
            checkpoint_root: Some(self.checkpoint_root.to_string()),
            registry: self.registry.clone(),
        })
        .await
    }
}

/// `kiln run`'s side: the job's status in its embedded store (the dashboard's
/// Jobs page) and its history, kept in the run folder after the process ends.
pub struct RunFeed {
    recorder: Recorder,
    global_batch: usize,
    round: u64,
    world_size: u32,
    assigned: Instant,
    seen_step: bool,
}

impl RunFeed {
    /// Marks the job running in its round and starts the history.
    pub async fn start(
        target: HistoryTarget<'_>,
        run_dir: &Path,
        global_batch: usize,
        total_steps: u64,
        round: u64,
        world_size: u32,
    ) -> RunFeed {
        let result = status::update(&**target.store, target.ks, target.job, |s| {
            s.round = round;
            s.world_size = world_size;
            s.total_steps = total_steps;
            s.set_phase(Phase::Running);
            s.extra
                .insert(extra::RUNNER.into(), extra::RUNNER_KILN_RUN.into());
            s.push_event(
                "round",
                crate::run::LOCAL_NODE,
                format!("round {round}: world size {world_size}"),
            );
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(job = target.job, "record the job status: {e}");
        }
        RunFeed {
            recorder: target
                .recorder(Some(run_dir.to_path_buf()), RUN_FLUSH)
                .await,
            global_batch,
            round,
            world_size,
            assigned: Instant::now(),
            seen_step: false,
        }
    }

    pub fn on_event(&mut self, event: &AgentEvent) {
        if let AgentEvent::Progress { rank: 0, progress } = event
            && !self.seen_step
        {
            // `kiln run` has one round; its start is the first step's.
            self.seen_step = true;
            self.recorder
                .record(Record::Round(round_mark(&RoundStarted {
                    round: self.round,
                    world_size: self.world_size,
                    step: progress.step.saturating_sub(1),
                    state_source: -1,
                    setup_seconds: self.assigned.elapsed().as_secs_f64(),
                })));
        }
        if let Some(record) = record_of(event, self.global_batch) {
            self.recorder.record(record);
        }
    }

    /// Writes the history one last time.
    pub async fn finish(self) {
        self.recorder.finish().await;
    }
}

/// Records the end of a `kiln run` job in its store and its run folder
/// (`status.json`, which `kiln ui --data-dir` reads after the process ended).
pub async fn record_run_end(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
    run_dir: &Path,
    error: Option<String>,
) {
    let result = status::update(store, ks, job, |s| match &error {
        None => {
            s.set_phase(Phase::Succeeded);
            s.push_event("finished", crate::run::LOCAL_NODE, "all steps done");
        }
        Some(message) => {
            s.set_phase(Phase::Failed);
            s.message = message.clone();
            s.push_event("failed", crate::run::LOCAL_NODE, message.clone());
        }
    })
    .await;
    if let Err(e) = result {
        tracing::warn!(job, "record the end of the job: {e}");
        return;
    }
    if let Err(e) = kiln_ui::recorder::save_status(store, ks, job, run_dir).await {
        tracing::warn!(job, "{e}");
    }
}

/// `kiln agent`'s side: the node that runs rank 0 records the job's history
/// in the store; when rank 0 moves to another node, that node continues it.
pub struct AgentHistory {
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: String,
    checkpoint_root: String,
    registry: Option<String>,
    global_batch: usize,
    recorder: Option<Recorder>,
}

impl AgentHistory {
    pub fn new(target: HistoryTarget<'_>, global_batch: usize) -> AgentHistory {
        AgentHistory {
            store: target.store.clone(),
            ks: target.ks.clone(),
            job: target.job.to_string(),
            checkpoint_root: target.checkpoint_root.to_string(),
            registry: target.registry,
            global_batch,
            recorder: None,
        }
    }

    /// A new round: record while this node holds rank 0.
    pub async fn on_round(&mut self, first_rank: u32) {
        match (&self.recorder, first_rank == 0) {
            (None, true) => {
                let target = HistoryTarget {
                    store: &self.store,
                    ks: &self.ks,
                    job: &self.job,
                    checkpoint_root: &self.checkpoint_root,
                    registry: self.registry.clone(),
                };
                self.recorder = Some(target.recorder(None, AGENT_FLUSH).await);
            }
            (Some(_), false) => {
                if let Some(r) = self.recorder.take() {
                    r.finish().await;
                }
            }
            _ => {}
        }
    }

    pub fn on_update(&self, update: &ElasticUpdate) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        match update {
            ElasticUpdate::Event(event) => {
                if let Some(record) = record_of(event, self.global_batch) {
                    recorder.record(record);
                }
            }
            ElasticUpdate::RoundStarted { rank: 0, started } => {
                recorder.record(Record::Round(round_mark(started)))
            }
            _ => {}
        }
    }

    /// Writes the history one last time.
    pub async fn finish(self) {
        if let Some(r) = self.recorder {
            r.finish().await;
        }
    }
}

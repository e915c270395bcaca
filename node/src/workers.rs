//! Starting a node's workers: its Prometheus endpoint and `nproc` worker
//! processes under one agent, the same for `kiln run` and `kiln agent`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_trainer::agent::{AgentConfig, LocalWorkers};
use kiln_trainer::logs::LogSink;
use kiln_trainer::metrics::{self, TrainingMetrics};
use tokio_util::sync::CancellationToken;

/// How long workers may take to start and say hello.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`start`] needs.
pub struct WorkerSetup<'a> {
    /// The job id.
    pub job: &'a str,
    /// This node's name (for the log).
    pub node: &'a str,
    /// Worker processes on this node.
    pub nproc: usize,
    /// The node's run folder.
    pub run_dir: &'a Path,
    /// The `kiln` binary the workers are started from (`kiln worker`).
    pub kiln_exe: &'a Path,
    /// Where the workers' lines go ([`crate::logs::sink`]).
    pub log_sink: LogSink,
    /// The address the workers' ring listeners bind and advertise.
    pub bind_host: &'a str,
    /// The metrics endpoint's address; port 0 picks one.
    pub metrics_addr: SocketAddr,
    /// Stops the metrics endpoint.
    pub cancel: &'a CancellationToken,
}

/// A node's started workers and the metrics they report into.
pub struct StartedWorkers {
    /// The worker processes, hello said.
    pub workers: LocalWorkers,
    /// The metrics the agent serves; the workers' progress goes there.
    pub metrics: Arc<TrainingMetrics>,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
}

/// Serves the node's `/metrics` and starts its workers.
pub async fn start(setup: WorkerSetup<'_>) -> anyhow::Result<StartedWorkers> {
    let metrics = Arc::new(TrainingMetrics::default());
    let metrics_addr =
        metrics::serve(metrics.clone(), setup.metrics_addr, setup.cancel.clone()).await?;
    let (job, node) = (setup.job, setup.node);
    tracing::info!(job, node, "metrics on http://{metrics_addr}/metrics");
    let config = AgentConfig {
        job: job.to_string(),
        nproc: setup.nproc,
        run_dir: setup.run_dir.to_path_buf(),
        kiln_exe: setup.kiln_exe.to_path_buf(),
        start_timeout: START_TIMEOUT,
        log_sink: setup.log_sink,
        bind_host: setup.bind_host.to_string(),
    };
    let workers = LocalWorkers::spawn(&config)
        .await
        .context("start workers")?;
    Ok(StartedWorkers {
        workers,
        metrics,
        metrics_addr,
    })
}

//! A node's worker logs: each worker's lines go to the node's rotated files
//! under `{run_dir}/logs` ([`open`]), for a multi-node job also to the store
//! ([`ship_to_store`]), and to the agent's console per [`Echo`]. `kiln logs`
//! reads them back (`kiln_coordinator::logs`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::logs::{self, LogConfig, LogLine, LogStream, NodeLogs};
use kiln_proto::spec::JobSpec;
use kiln_trainer::logs::{LogSink, WorkerLine, WorkerStream};

/// The spec's `[logs]` as the writer's settings.
pub fn config(spec: &JobSpec) -> LogConfig {
    let store_bytes = spec.logs.store_kib << 10;
    LogConfig {
        file_bytes: spec.logs.file_mib << 20,
        files: spec.logs.files,
        store_bytes,
        batch_bytes: store_bytes.min(LogConfig::default().batch_bytes),
        ..LogConfig::default()
    }
}

/// Opens the log folder `{run_dir}/logs` of `node` for writing, with a file
/// for each of its `workers` (empty until the worker prints).
pub fn open(
    run_dir: &Path,
    node: &str,
    spec: &JobSpec,
    workers: usize,
) -> anyhow::Result<NodeLogs> {
    let dir = run_dir.join("logs");
    let logs = NodeLogs::open(&dir, node, config(spec))
        .with_context(|| format!("open the worker log folder {}", dir.display()))?;
    for worker in 0..workers {
        logs.create(worker)?;
    }
    Ok(logs)
}

/// Also ship the node's lines to the store of a multi-node job.
pub async fn ship_to_store(
    logs: NodeLogs,
    store: Arc<dyn kiln_coordinator::store::Store>,
    job: &str,
    spec: &JobSpec,
) -> anyhow::Result<NodeLogs> {
    let node = logs.node().to_string();
    let shipper = logs::LogShipper::start(store, Keyspace::default(), job, &node, config(spec))
        .await
        .context("start shipping worker logs to the store")?;
    Ok(logs.with_shipper(shipper))
}

/// What the agent's own console shows of its workers' lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Nothing (the files and `kiln logs` have them).
    Off,
    /// Every line on stderr, prefixed with node and rank.
    Stderr,
}

/// The sink the agent hands its workers' lines to: the node's files (and
/// store), and the console per `echo`.
pub fn sink(logs: Arc<NodeLogs>, echo: Echo) -> LogSink {
    LogSink::new(move |w: WorkerLine| {
        let stream = match w.stream {
            WorkerStream::Stdout => LogStream::Stdout,
            WorkerStream::Stderr => LogStream::Stderr,
        };
        let line = LogLine::new(w.time.into(), logs.node(), w.rank, stream, &w.text);
        logs.write(w.local_rank, &line);
        if echo == Echo::Stderr {
            let rank = w.rank.map_or("-".to_string(), |r| r.to_string());
            eprintln!("[{} rank {rank}] {}", line.node, line.text);
        }
    })
}

/// How long a finishing agent waits for its last lines to reach the store.
pub const SHIP_FLUSH: Duration = Duration::from_secs(10);

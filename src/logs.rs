//! `kiln logs`: a job's per-rank worker logs, from a data folder (`kiln run`,
//! or one node of `kiln agent`) or from the store (every node of a multi-node
//! job); and the wiring that gives an agent's workers their log files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::logs::{self, LogConfig, LogFilter, LogLine, LogSource, LogStream, NodeLogs};
use kiln_proto::spec::JobSpec;
use kiln_trainer::logs::{LogSink, WorkerLine, WorkerStream};
use tokio_util::sync::CancellationToken;

/// Arguments of `kiln logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The job.
    pub job: String,
    /// Only this node's lines (`local` for `kiln run`).
    #[arg(long)]
    pub node: Option<String>,
    /// Only this global rank's lines.
    #[arg(long)]
    pub rank: Option<u32>,
    /// Only lines written since then: a duration back from now (90s, 5m, 2h,
    /// 1d) or an RFC 3339 time (2026-12-06T13:00:00Z).
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: Option<String>,
    /// Keep printing new lines until the job ends.
    #[arg(long, short)]
    pub follow: bool,
    /// Read the store of a multi-node job (etcd://HOST:PORT[,...]): every
    /// node's lines, as shipped by the agents.
    #[arg(long, conflicts_with = "data_dir")]
    pub store: Option<String>,
    /// Read this data folder (the --data-dir of `kiln run` or of a node's
    /// `kiln agent`) when no --store is given.
    #[arg(long, default_value = "kiln-data")]
    pub data_dir: PathBuf,
}

pub async fn run(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let filter = LogFilter {
        node: args.node.clone(),
        rank: args.rank,
        since: match &args.since {
            Some(text) => Some(logs::since_now(text)?),
            None => None,
        },
    };
    let source = match &args.store {
        Some(url) => LogSource::Store {
            store: kiln_coordinator::store::connect(url)
                .await
                .with_context(|| format!("connect to the store {url}"))?,
            keyspace: Keyspace::default(),
        },
        None => LogSource::Dir(args.data_dir.clone()),
    };
    let mut out = std::io::stdout().lock();
    if !args.follow {
        let lines = logs::read(&source, &args.job, &filter)
            .await
            .with_context(|| format!("read the logs of job {}", args.job))?;
        for line in lines {
            if writeln!(out, "{line}").is_err() {
                break; // stdout closed (| head): not an error
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let mut lines = logs::follow(source, &args.job, filter, cancel)
        .await
        .with_context(|| format!("follow the logs of job {}", args.job))?;
    while let Some(line) = lines.next().await {
        let line = line.with_context(|| format!("follow the logs of job {}", args.job))?;
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

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

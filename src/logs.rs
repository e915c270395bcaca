//! `kiln logs`: a job's per-rank worker logs, from a data folder (`kiln run`,
//! or one node of `kiln agent`) or from the store (every node of a multi-node
//! job); and the wiring that gives an agent's workers their log files.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::logs::{self, LogFilter, LogSource};
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

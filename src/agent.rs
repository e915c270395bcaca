//! `kiln agent`: one per node of a multi-node job (`kiln_node::agent`, whose
//! docs say what a node does): reads the arguments, connects to the store,
//! gets the job's spec, runs the node, prints its events and its end.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kiln_node::agent::{JobSpecError, NodeAgent, NodeConfig, NodeExit};

use crate::CliError;

/// Arguments of `kiln agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The coordination store: etcd://HOST:PORT[,HOST:PORT...] (or mem:// for a
    /// single-process test).
    #[arg(long)]
    pub store: String,
    /// The job id: every agent of a job gives the same.
    #[arg(long)]
    pub job: String,
    /// The job spec (TOML). The first agent stores it with the job; later
    /// agents (and agents without --spec) use the stored one.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Override a spec field, e.g. --set train.steps=50 (repeatable; with --spec).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Worker processes on this node (default: the spec's workers.nproc).
    #[arg(long)]
    pub nproc: Option<usize>,
    /// This node's name in the job, stable across restarts (default: the host name).
    #[arg(long)]
    pub node: Option<String>,
    /// Where this node writes logs and outputs; checkpoints go to
    /// `checkpoints/{job}` under it unless the spec names checkpoint.url
    /// (which all nodes must then share).
    #[arg(long, default_value = "kiln-data")]
    pub data_dir: PathBuf,
    /// Print one JSON object per line on stdout for rounds, progress of this
    /// node's first worker, checkpoints and the end of the job.
    #[arg(long)]
    pub events_json: bool,
    /// Address of the agent's Prometheus endpoint (/metrics); port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_addr: std::net::SocketAddr,
    /// The address this node's workers listen on for the ring and give their
    /// peers (also $KILN_BIND_HOST). Default: this machine's address on the
    /// route to the store's first endpoint, which other nodes reach it by
    /// (127.0.0.1 when the store is on loopback).
    #[arg(long, value_name = "HOST")]
    pub advertise_host: Option<String>,
}

/// Runs `kiln agent`.
pub async fn run(args: AgentArgs) -> Result<ExitCode, CliError> {
    let store = kiln_coordinator::store::connect(&args.store)
        .await
        .with_context(|| format!("connect to the store {}", args.store))?;
    let job = args.job.clone();
    kiln_coordinator::keyspace::validate_name("job", &job).map_err(anyhow::Error::from)?;
    let mut overrides = args.set.clone();
    if let Some(n) = args.nproc {
        overrides.push(format!("workers.nproc={n}"));
    }
    let spec =
        match kiln_node::agent::job_spec(&*store, &job, args.spec.as_deref(), &overrides).await {
            Ok(spec) => spec,
            Err(JobSpecError::Invalid(e)) => return Err(CliError::InvalidSpec(e)),
            Err(JobSpecError::Other(e)) => return Err(e.into()),
        };
    let config = NodeConfig {
        store_url: args.store.clone(),
        job: job.clone(),
        nproc: args.nproc,
        node: args.node.clone(),
        data_dir: args.data_dir.clone(),
        metrics_addr: args.metrics_addr,
        advertise_host: args.advertise_host.clone(),
        kiln_exe: std::env::current_exe().context("locate the kiln binary")?,
    };
    let events_json = args.events_json;
    let events = |node: &str, event: &str, fields: serde_json::Value| {
        if events_json {
            print_event(node, event, fields);
        }
    };
    match NodeAgent::new(store, config, spec, &events).run().await? {
        NodeExit::AlreadyEnded(phase) => {
            println!("job {job} is already {phase}: nothing to do");
            Ok(ExitCode::SUCCESS)
        }
        NodeExit::Finished {
            node,
            round,
            world_size,
        } => {
            if !events_json {
                println!(
                    "job {job}: node {node} finished (world size {world_size}, round {round})"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeExit::Ended(kiln_coordinator::status::Phase::Succeeded) => Ok(ExitCode::SUCCESS),
        NodeExit::Ended(_) | NodeExit::Cancelled => Ok(ExitCode::FAILURE),
    }
}

/// Prints one machine-readable event (`--events-json`): a JSON object a line,
/// with its name, the node and the time added.
fn print_event(node: &str, event: &str, mut fields: serde_json::Value) {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if let Some(map) = fields.as_object_mut() {
        map.insert("event".into(), event.into());
        map.insert("node".into(), node.into());
        map.insert("time".into(), time.into());
    }
    println!("{fields}");
}

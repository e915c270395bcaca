//! Rendezvous latency over a real etcd: how long `n` agents take, from the
//! first join, until every one of them holds the round's plan.
//!
//! One etcd member is started on loopback (`etcd_server::EtcdServer`). Per
//! run, `n` simulated agents live in this process, each with its own
//! `EtcdStore` client (its own connection, as separate machines would have),
//! and one rendezvous leader (`membership::run_leader`, on its own client) with
//! `min_nodes = max_nodes = n`, so the round closes when the last node is
//! present (the settle window is 10 minutes and never ends a round here).
//! Clients connect and the leader starts before the clock does. Then every
//! agent at once calls `membership::join` (lease grant + record put) and
//! `NodeSession::next_plan(0)`. The figure is the time from the first join
//! call to the last agent holding the plan; the run checks that all plans are
//! the same round with every agent in it. Per size it prints one JSON line per
//! run and a summary line with the median. This is a benchmark, not a test: it
//! reports, it never judges timings.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use kiln_coordinator::etcd_server::EtcdServer;
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::membership;
use kiln_coordinator::rendezvous::{NodeRecord, Plan, RendezvousConfig};
use kiln_coordinator::store::Store;
use kiln_coordinator::store::etcd::EtcdStore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Time for n agents to rendezvous over a real etcd (first join to last plan)")]
struct Args {
    /// Comma-separated agent counts.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256")]
    agents: Vec<usize>,
    /// Timed runs per count (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Workers (collective endpoints) per agent: a plan of 256 agents with 8
    /// devices each names 2048 ranks.
    #[arg(long, default_value_t = 8)]
    devices: u32,
    /// Lease TTL of the agents' node records, in seconds.
    #[arg(long, default_value_t = 10)]
    ttl_secs: u64,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// An etcd to use instead of starting one (`host:port`; its keyspace gets
    /// a `bench-*` job per run).
    #[arg(long)]
    etcd: Option<String>,
}

fn main() {
    if let Err(error) = run(Args::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be positive");
    ensure!(args.devices > 0, "--devices must be positive");
    ensure!(
        args.agents.iter().all(|&n| n > 0),
        "--agents: every count must be positive"
    );
    // Started before the runtime: it waits for etcd synchronously.
    let (_etcd, endpoint) = match &args.etcd {
        Some(endpoint) => (None, endpoint.clone()),
        None => {
            let etcd = EtcdServer::start().context("start etcd")?;
            let endpoint = etcd.endpoints().remove(0);
            (Some(etcd), endpoint)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(async {
        for &agents in &args.agents {
            let mut times = Vec::new();
            for run in 0..args.runs {
                let job = format!("bench-{}-{agents}-{run}", std::process::id());
                let timing = tokio::time::timeout(
                    Duration::from_secs(args.timeout_secs),
                    rendezvous(&endpoint, &job, agents, &args),
                )
                .await
                .with_context(|| {
                    format!(
                        "{agents} agents, run {run}: no rendezvous within {} s",
                        args.timeout_secs
                    )
                })??;
                println!(
                    "{}",
                    serde_json::json!({
                        "bench": "rendezvous",
                        "agents": agents,
                        "devices": args.devices,
                        "run": run,
                        "all_joined_s": timing.all_joined.as_secs_f64(),
                        "plan_written_s": timing.plan_written.as_secs_f64(),
                        "all_planned_s": timing.all_planned.as_secs_f64(),
                    })
                );
                times.push(timing.all_planned.as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({
                    "bench": "rendezvous",
                    "summary": true,
                    "agents": agents,
                    "devices": args.devices,
                    "runs": args.runs,
                    "median_s": times[times.len() / 2],
                    "min_s": times[0],
                    "max_s": times[times.len() - 1],
                })
            );
            eprintln!(
                "rendezvous: {agents:>4} agents: median {:.3} s (min {:.3}, max {:.3}) over {} runs",
                times[times.len() / 2],
                times[0],
                times[times.len() - 1],
                args.runs
            );
        }
        anyhow::Ok(())
    })
}

/// When, after the first join call, things happened.
struct Timing {
    /// The last agent's record is in etcd.
    all_joined: Duration,
    /// The first agent saw the plan (≈ the leader wrote it).
    plan_written: Duration,
    /// The last agent holds the plan.
    all_planned: Duration,
}

async fn rendezvous(endpoint: &str, job: &str, agents: usize, args: &Args) -> Result<Timing> {
    let endpoints = vec![endpoint.to_string()];
    let ks = Keyspace::default();
    // Clients first, untimed: an agent connects once at start.
    let mut connecting = Vec::new();
    for _ in 0..=agents {
        let endpoints = endpoints.clone();
        connecting.push(tokio::spawn(
            async move { EtcdStore::connect(&endpoints).await },
        ));
    }
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for task in connecting {
        stores.push(task.await?.context("connect to etcd")?);
    }
    let leader_store = stores.pop().context("the leader's client")?;

    let cancel = CancellationToken::new();
    let cfg = RendezvousConfig {
        job: job.to_string(),
        min_nodes: agents,
        max_nodes: agents,
        settle: Duration::from_secs(600),
        max_failures: 0,
        max_scale_events: 0,
        cooldown: Duration::ZERO,
    };
    let leader = tokio::spawn(membership::run_leader(
        leader_store.clone(),
        ks.clone(),
        cfg,
        None,
        cancel.clone(),
    ));
    // The leader is up and watching before agents arrive, as in a job whose
    // leader won its election first. Its first listing is a few milliseconds.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let ttl = Duration::from_secs(args.ttl_secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, store) in stores.into_iter().enumerate() {
        let ks = ks.clone();
        let job = job.to_string();
        let record = record(i, args.devices);
        tasks.push(tokio::spawn(async move {
            let mut session = membership::join(store, ks, &job, record, ttl).await?;
            let joined = start.elapsed();
            let plan = session.next_plan(0).await?;
            let planned = start.elapsed();
            anyhow::Ok((session, joined, planned, plan))
        }));
    }
    let mut sessions = Vec::new();
    let mut plans: Vec<Plan> = Vec::new();
    let (mut all_joined, mut first_planned, mut all_planned) =
        (Duration::ZERO, Duration::MAX, Duration::ZERO);
    for task in tasks {
        let (session, joined, planned, plan) = task.await?.context("an agent")?;
        all_joined = all_joined.max(joined);
        first_planned = first_planned.min(planned);
        all_planned = all_planned.max(planned);
        sessions.push(session);
        plans.push(plan);
    }
    let plan = &plans[0];
    ensure!(
        plans.iter().all(|p| p == plan),
        "agents got different plans"
    );
    ensure!(
        plan.members.len() == agents && plan.world_size == agents as u32 * args.devices,
        "the plan has {} members and world size {}, expected {agents} and {}",
        plan.members.len(),
        plan.world_size,
        agents as u32 * args.devices
    );

    // A finished job stops its leader before its nodes leave.
    cancel.cancel();
    match leader.await? {
        Ok(()) => {}
        Err(error) => bail!("the leader failed: {error}"),
    }
    for session in sessions {
        session.leave().await.context("leave")?;
    }
    Ok(Timing {
        all_joined,
        plan_written: first_planned,
        all_planned,
    })
}

fn record(i: usize, devices: u32) -> NodeRecord {
    let host = format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256);
    NodeRecord {
        node: format!("node-{i:04}"),
        endpoints: (0..devices)
            .map(|d| format!("{host}:{}", 29500 + d))
            .collect(),
        host,
        devices,
        version: "bench".to_string(),
        presence: None,
    }
}

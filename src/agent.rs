//! `kiln agent`: one per node of a multi-node job. Joins the job's rendezvous
//! over the store (etcd), runs for the job's rendezvous leadership, spawns and
//! supervises this node's workers, and relays rounds to them. A job needs no
//! other process: only etcd.
//!
//! Recovery without a restart: when a node is lost (its lease expires) the
//! leader plans a new round; this agent hands it to its workers, which abort
//! the collective in flight, re-form the ring and receive the training state
//! from the rank that completed the most steps. A worker that dies is replaced
//! by a fresh process (its new endpoint goes into the node record, which opens
//! a new round) that receives the state the same way. When no rank holds a
//! state (every node was restarted), workers resume from the latest durable
//! checkpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use kiln_coordinator::election;
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::membership;
use kiln_coordinator::presence;
use kiln_coordinator::rendezvous::{NodeRecord, RendezvousConfig};
use kiln_coordinator::status::{self, Phase};
use kiln_coordinator::store::{Expect, Store, WatchEvent};
use kiln_proto::spec::JobSpec;
use kiln_trainer::agent::{AgentConfig, AgentEvent, ElasticUpdate, LocalWorkers, RoundAssignment};
use kiln_trainer::metrics::{self, TrainingMetrics};
use tokio_util::sync::CancellationToken;

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

/// The host this node's workers bind and advertise: `--advertise-host`,
/// `$KILN_BIND_HOST`, or the local address the kernel routes to the store's
/// first endpoint (no packet is sent: a UDP socket is only connected).
fn advertised_host(args: &AgentArgs) -> anyhow::Result<String> {
    if let Some(h) = args
        .advertise_host
        .clone()
        .or_else(|| std::env::var("KILN_BIND_HOST").ok())
        .filter(|h| !h.trim().is_empty())
    {
        return Ok(h.trim().to_string());
    }
    // The store is connected already, so its URL parses.
    let first = match kiln_proto::store_url::StoreUrl::parse(&args.store) {
        Ok(kiln_proto::store_url::StoreUrl::Etcd(etcd)) => etcd.endpoints.into_iter().next(),
        _ => None,
    };
    let Some(first) = first else {
        return Ok("127.0.0.1".to_string());
    };
    use std::net::ToSocketAddrs;
    let target = first
        .to_socket_addrs()
        .with_context(|| format!("resolve the store endpoint {first}"))?
        .next()
        .with_context(|| format!("the store endpoint {first} has no address"))?;
    let unspecified: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(unspecified).context("open a routing probe")?;
    probe
        .connect(target)
        .with_context(|| format!("no route to the store endpoint {first}; set --advertise-host"))?;
    Ok(probe
        .local_addr()
        .context("routing probe address")?
        .ip()
        .to_string())
}

/// How long a node whose peers reported the job done waits for its own
/// workers' final reports.
const FINISH_GRACE: Duration = Duration::from_secs(30);

/// How long a node whose job ended waits for its workers to exit before it
/// kills them.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(5);

/// How long a node waits for the stored spec when it was started without one.
const SPEC_WAIT: Duration = Duration::from_secs(60);

pub async fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let store = kiln_coordinator::store::connect(&args.store)
        .await
        .with_context(|| format!("connect to the store {}", args.store))?;
    let ks = Keyspace::default();
    let job = args.job.clone();
    kiln_coordinator::keyspace::validate_name("job", &job)?;
    let spec = match job_spec(&*store, &ks, &job, &args).await {
        Ok(spec) => spec,
        Err(SpecFailure::Invalid(e)) => {
            eprintln!("error: invalid job spec: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(SpecFailure::Other(e)) => return Err(e),
    };
    if let Some(s) = status::read(&*store, &ks, &job).await?
        && s.phase.is_terminal()
    {
        println!("job {job} is already {}: nothing to do", s.phase);
        return Ok(ExitCode::SUCCESS);
    }
    let nproc = args.nproc.unwrap_or(spec.workers.nproc);
    let node = match &args.node {
        Some(n) => n.clone(),
        None => hostname()?,
    };
    kiln_coordinator::keyspace::validate_name("node", &node)?;
    let run_dir = args
        .data_dir
        .join("jobs")
        .join(&job)
        .join("nodes")
        .join(&node);
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("create the node's folder {}", run_dir.display()))?;
    let run_dir = run_dir
        .canonicalize()
        .context("resolve the node's folder")?;
    let checkpoint_url = checkpoint_url(&spec, &args.data_dir, &job)?;
    let ttl = Duration::from_secs(spec.elastic.lease_ttl_secs);

    let cancel = CancellationToken::new();
    let _stop_services = cancel.clone().drop_guard();
    let metrics = Arc::new(TrainingMetrics::default());
    let metrics_addr = metrics::serve(metrics.clone(), args.metrics_addr, cancel.clone()).await?;
    tracing::info!(job, node, "metrics on http://{metrics_addr}/metrics");

    // Worker lines go to {run_dir}/logs, to the store (for `kiln logs --store`)
    // and, prefixed, to this agent's stderr.
    let node_logs = crate::logs::open(&run_dir, &node, &spec, nproc)?;
    let node_logs =
        Arc::new(crate::logs::ship_to_store(node_logs, store.clone(), &job, &spec).await?);
    let host = advertised_host(&args)?;
    tracing::info!(job, node, host, "workers listen on this host");
    let agent_config = AgentConfig {
        job: job.clone(),
        nproc,
        run_dir: run_dir.clone(),
        kiln_exe: std::env::current_exe().context("locate the kiln binary")?,
        start_timeout: Duration::from_secs(60),
        log_sink: crate::logs::sink(node_logs.clone(), crate::logs::Echo::Stderr),
        bind_host: host.clone(),
    };
    let mut workers = LocalWorkers::spawn(&agent_config)
        .await
        .context("start workers")?
        .into_elastic(&job, metrics);
    // Other agents hold a connection to this listener and revoke this node's
    // lease the moment the process dies (coordinator/src/presence.rs).
    let presence = presence::listen(&host, cancel.clone())
        .await
        .context("presence listener")?;
    let mut record = NodeRecord {
        node: node.clone(),
        host,
        endpoints: workers.endpoints(),
        devices: nproc as u32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        presence: Some(presence),
    };
    // A store outage shorter than elastic.wait_timeout_secs is ridden out:
    // the workers train on (they need no store) and the node keeps its place.
    let outage = Duration::from_secs_f64(spec.elastic.wait_timeout_secs);
    let session = membership::join_riding_outages(
        store.clone(),
        ks.clone(),
        &job,
        record.clone(),
        ttl,
        outage,
    )
    .await
    .context("join the job's rendezvous")?;
    tokio::spawn(presence::watch(
        store.clone(),
        ks.clone(),
        job.clone(),
        node.clone(),
        cancel.clone(),
    ));
    let out = Events {
        json: args.events_json,
        node: node.clone(),
    };
    out.emit("joined", serde_json::json!({ "nproc": nproc }));

    // Every agent runs for the job's rendezvous leadership, on its node lease:
    // when the leader's node dies, its lease ends and another agent takes over.
    let rendezvous = RendezvousConfig {
        job: job.clone(),
        min_nodes: spec.elastic.min_nodes,
        max_nodes: spec.elastic.max_nodes(),
        settle: Duration::from_secs_f64(spec.elastic.settle_secs),
        max_failures: spec.elastic.max_failures,
        max_scale_events: spec.elastic.max_scale_events,
        cooldown: Duration::from_secs_f64(spec.elastic.cooldown_secs),
    };
    let leader = tokio::spawn(lead(
        store.clone(),
        ks.clone(),
        rendezvous,
        node.clone(),
        session.lease(),
        cancel.clone(),
    ));
    let mut plans = session.watch_plans(0);
    let mut terminal = tokio::spawn(riding_outages("watch the job's status", {
        let (store, ks, job) = (store.clone(), ks.clone(), job.clone());
        move || watch_terminal(store.clone(), ks.clone(), job.clone())
    }));
    let mut cancel_request = tokio::spawn(riding_outages("watch for a cancel request", {
        let (store, ks, job) = (store.clone(), ks.clone(), job.clone());
        move || status::watch_cancel(store.clone(), ks.clone(), job.clone())
    }));

    let hooks = kiln_hooks::Hooks::new(&spec.hooks).context("hooks")?;
    // The dashboard's history of the job, recorded by the node of rank 0.
    let mut history = crate::ui::AgentHistory::new(
        crate::ui::HistoryTarget {
            store: &store,
            ks: &ks,
            job: &job,
            checkpoint_root: &checkpoint_url,
            registry: spec
                .register
                .as_ref()
                .map(|_| crate::register::registry_url(&spec, &checkpoint_url)),
        },
        spec.train.global_batch,
    );
    let spec_json = spec.to_json();
    let wait_timeout = Duration::from_secs_f64(spec.elastic.wait_timeout_secs);
    let mut round = 0u64;
    let mut first_rank = 0u32;
    let mut world_size = 0u32;
    // Set while this node's workers wait for a round (since when).
    let mut waiting_since: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut finished: BTreeMap<u32, kiln_proto::worker::Finished> = BTreeMap::new();
    // Another node saw the job succeed while this node's workers were finishing.
    let mut job_succeeded = false;
    // Rank 0 said the job ends without its final checkpoint
    // (checkpoint.required = false): the succeeded job's status says so.
    let mut final_checkpoint_missing: Option<String> = None;
    let outcome: anyhow::Result<()> = loop {
        let wait_deadline = waiting_since.map(|since| {
            since
                + if job_succeeded {
                    FINISH_GRACE
                } else {
                    wait_timeout
                }
        });
        tokio::select! {
            plan = plans.recv() => {
                let plan = match plan {
                    Some(Ok(plan)) => plan,
                    Some(Err(e)) => break Err(anyhow!(e).context("follow the job's rounds")),
                    None => break Err(anyhow!("the round watch ended")),
                };
                let Some(member) = plan.member(&node) else { continue };
                round = plan.round;
                first_rank = member.first_rank;
                world_size = plan.world_size;
                out.emit("round", serde_json::json!({
                    "round": round, "world_size": world_size, "first_rank": first_rank,
                }));
                tracing::info!(job, node, round, world_size, first_rank, "new round");
                if first_rank == 0 {
                    hooks.emit(kiln_hooks::Event::of(&job, &kiln_hooks::event::RoundChanged {
                        job: job.clone(),
                        round,
                        previous_round: None,
                        world_size,
                        nodes: plan.members.iter().map(|m| m.node.clone()).collect(),
                        reason: "membership changed".into(),
                    }));
                }
                let assignment = RoundAssignment {
                    round,
                    first_rank,
                    world_size,
                    peers: plan.peers.clone(),
                    spec_json: spec_json.clone(),
                    checkpoint_url: checkpoint_url.clone(),
                    // No rank holding state means every node restarted: resume
                    // from the latest durable checkpoint, if there is one.
                    resume: "auto".to_string(),
                    // Shared by every rank of the job (attempts add the round).
                    run_id: job.clone(),
                    ring_secret: plan.secret_bytes().map_err(|e| anyhow!(e))?,
                };
                workers.assign(&assignment).await?;
                history.on_round(first_rank).await;
                if let Err(e) = status::update(&*store, &ks, &job, |s| {
                    if s.round < round {
                        s.round = round;
                        s.world_size = world_size;
                        s.total_steps = spec.train.steps;
                        if s.set_phase(Phase::Running) {
                            s.message.clear();
                        }
                        s.push_event("round", &node, format!("round {round}: world size {world_size}"));
                    }
                }).await {
                    tracing::warn!(job, "record the round in the job status: {e}");
                }
            }
            update = workers.next() => {
                let Some(update) = update else { break Err(anyhow!("the workers' channel closed")) };
                history.on_update(&update);
                match update {
                    ElasticUpdate::Event(AgentEvent::Progress { rank, progress }) => {
                        if !job_succeeded {
                            waiting_since = None;
                        }
                        if rank == first_rank {
                            out.emit("progress", serde_json::json!({
                                "rank": rank, "round": round, "world_size": world_size,
                                "step": progress.step, "loss": progress.loss,
                            }));
                            if rank == 0 && progress.step % 10 == 0 {
                                let (step, loss) = (progress.step, progress.loss);
                                update_in_background(&store, &ks, &job, move |s| {
                                    if s.step < step {
                                        s.step = step;
                                        s.loss = Some(loss);
                                    }
                                });
                            }
                        }
                    }
                    ElasticUpdate::Event(AgentEvent::Checkpoint { rank, saved }) => {
                        out.emit("checkpoint", serde_json::json!({
                            "rank": rank, "step": saved.step, "url": saved.url,
                        }));
                        if rank == 0 {
                            hooks.emit(kiln_hooks::Event::of(&job, &kiln_hooks::event::CheckpointCommitted {
                                job: job.clone(),
                                step: saved.step,
                                location: saved.url.clone(),
                                world_size,
                                raw_bytes: saved.bytes_uploaded + saved.bytes_reused,
                                uploaded_bytes: saved.bytes_uploaded,
                                elapsed_secs: saved.durable_seconds,
                            }));
                        }
                        let (url, step) = (saved.url.clone(), saved.step);
                        update_in_background(&store, &ks, &job, move |s| {
                            if s.last_checkpoint.as_ref().is_none_or(|c| c.step < step) {
                                s.last_checkpoint = Some(status::CheckpointRef { url: url.clone(), step });
                            }
                        });
                    }
                    ElasticUpdate::Event(AgentEvent::Warning { rank, message }) => {
                        tracing::warn!(job, rank, "{message}");
                        out.emit("warning", serde_json::json!({ "rank": rank, "message": message }));
                        if message.starts_with(kiln_checkpoint::manager::MISSING_FINAL_CHECKPOINT) {
                            final_checkpoint_missing = Some(message.clone());
                        }
                        let detail = format!("rank {rank}: {message}");
                        let _ = status::update(&*store, &ks, &job, |s| {
                            s.push_event("warning", &node, detail.clone());
                        }).await;
                    }
                    ElasticUpdate::Event(AgentEvent::Eval { rank, eval }) => {
                        if rank == first_rank {
                            let metrics: BTreeMap<_, _> = eval.metrics.into_iter().collect();
                            out.emit("eval", serde_json::json!({ "step": eval.step, "metrics": metrics }));
                        }
                    }
                    ElasticUpdate::RoundStarted { rank, started } => {
                        waiting_since = None;
                        if rank == first_rank {
                            out.emit("round_started", serde_json::json!({
                                "round": started.round, "world_size": started.world_size,
                                "step": started.step, "state_source": started.state_source,
                                "setup_seconds": started.setup_seconds,
                            }));
                        }
                    }
                    ElasticUpdate::Interrupted { rank, interrupted } => {
                        tracing::warn!(job, rank, round = interrupted.round, step = interrupted.step,
                            "round interrupted: {}", interrupted.reason);
                        waiting_since.get_or_insert_with(tokio::time::Instant::now);
                    }
                    ElasticUpdate::Finished { rank, finished: f } => {
                        finished.insert(rank, f);
                        if workers.all_finished() {
                            break Ok(());
                        }
                    }
                    ElasticUpdate::Failed { message, .. } => break Err(anyhow!(message)),
                    ElasticUpdate::Died { local_rank, message } => {
                        tracing::warn!(job, node, local_rank, "{message}; replacing it");
                        out.emit("worker_died", serde_json::json!({ "local_rank": local_rank, "message": message }));
                        workers.respawn(local_rank).await.context("replace a dead worker")?;
                        record.endpoints = workers.endpoints();
                        session.update_record(&record).await.context("publish the replaced worker")?;
                        waiting_since.get_or_insert_with(tokio::time::Instant::now);
                    }
                }
            }
            end = &mut terminal, if !job_succeeded => {
                let phase = end.map_err(|e| anyhow!(e))??;
                if phase == Phase::Succeeded && round > 0 && !workers.all_finished() {
                    // Another node reported the end first; this node's workers
                    // are past the final barrier and about to report theirs
                    // (rank 0 registers the model): let them.
                    job_succeeded = true;
                    waiting_since = Some(tokio::time::Instant::now());
                    continue;
                }
                out.emit("stopped", serde_json::json!({ "phase": phase.as_str() }));
                workers.kill_all().await;
                node_logs.close(crate::logs::SHIP_FLUSH).await;
                leave_job(&cancel, leader, session).await;
                return Ok(if phase == Phase::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            request = &mut cancel_request => {
                let request = request.map_err(|e| anyhow!(e))??;
                workers.kill_all().await;
                node_logs.close(crate::logs::SHIP_FLUSH).await;
                let _ = status::update(&*store, &ks, &job, |s| {
                    s.set_phase(Phase::Cancelled);
                    s.message = format!("cancelled by {}: {}", request.by, request.reason);
                }).await;
                out.emit("cancelled", serde_json::json!({ "by": request.by }));
                leave_job(&cancel, leader, session).await;
                return Ok(ExitCode::FAILURE);
            }
            _ = sleep_until_some(wait_deadline) => {
                if job_succeeded {
                    tracing::warn!(job, node, "the job succeeded but this node's workers did not report their end within {FINISH_GRACE:?}");
                    workers.kill_all().await;
                    node_logs.close(crate::logs::SHIP_FLUSH).await;
                    leave_job(&cancel, leader, session).await;
                    return Ok(ExitCode::SUCCESS);
                }
                break Err(anyhow!(
                    "no round could start within elastic.wait_timeout_secs = {} s (too few nodes?)",
                    spec.elastic.wait_timeout_secs
                ));
            }
            _ = session.lost() => break Err(anyhow!("this node's lease expired: the job goes on without it")),
        }
    };

    // The workers' last lines reach the store before the job's status says it
    // ended: they exit (and their output drains) before the logs close.
    workers.close(WORKER_EXIT_GRACE).await;
    node_logs.close(crate::logs::SHIP_FLUSH).await;
    history.finish().await;
    let result = match outcome {
        Ok(()) => {
            let rank0 = finished.get(&0).cloned();
            // The node of rank 0 speaks for the job: events and registration.
            let mut model = None;
            if let Some(f) = &rank0 {
                let eval: BTreeMap<String, f64> = f.eval.clone().into_iter().collect();
                hooks.emit(kiln_hooks::Event::of(
                    &job,
                    &kiln_hooks::event::JobFinished {
                        job: job.clone(),
                        step: f.steps,
                        elapsed_secs: 0.0,
                        checkpoint: (!f.checkpoint_url.is_empty())
                            .then(|| f.checkpoint_url.clone()),
                        metrics: eval,
                    },
                ));
                if spec.register.is_some() {
                    match crate::register::register_final_model(
                        &spec,
                        &job,
                        &checkpoint_url,
                        f,
                        &hooks,
                    )
                    .await
                    {
                        Ok(m) => model = m,
                        Err(e) => tracing::error!(job, "register the model: {e:#}"),
                    }
                }
            }
            if let Some(m) = &model {
                out.emit("registered", serde_json::json!({ "model": m }));
            }
            let _ = status::update(&*store, &ks, &job, |s| {
                if let Some(f) = &rank0 {
                    s.step = f.steps;
                    s.loss = Some(f.final_loss);
                }
                s.set_phase(Phase::Succeeded);
                if let Some(warning) = &final_checkpoint_missing {
                    s.message = format!("WARNING: {warning}");
                }
                s.push_event("finished", &node, "all steps done");
            })
            .await;
            for (rank, f) in &finished {
                let eval: BTreeMap<_, _> = f.eval.clone().into_iter().collect();
                out.emit(
                    "finished",
                    serde_json::json!({
                        "rank": rank, "round": round, "world_size": world_size,
                        "steps": f.steps, "final_loss": f.final_loss, "eval": eval,
                        "weights_digest": f.weights_digest, "weights": f.weights_path,
                        "checkpoint": f.checkpoint_url, "start_step": f.start_step,
                    }),
                );
            }
            if !args.events_json {
                println!(
                    "job {job}: node {node} finished (world size {world_size}, round {round})"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            workers.kill_all().await;
            hooks.emit(kiln_hooks::Event::of(
                &job,
                &kiln_hooks::event::JobFailed {
                    job: job.clone(),
                    error: format!("{e:#}"),
                    step: None,
                    round: Some(round),
                },
            ));
            if !session.is_lost() {
                let message = format!("{e:#}");
                let _ = status::update(&*store, &ks, &job, |s| {
                    s.set_phase(Phase::Failed);
                    s.message = message.clone();
                    s.push_event("failed", &node, message.clone());
                })
                .await;
            }
            Err(e)
        }
    };
    hooks.flush(Duration::from_secs(10)).await;
    leave_job(&cancel, leader, session).await;
    result
}

/// Stops this node's services (metrics, the leadership campaign) and leaves
/// the job (its record goes at once rather than a lease TTL later).
async fn leave_job(
    cancel: &CancellationToken,
    leader: tokio::task::JoinHandle<()>,
    session: membership::NodeSession,
) {
    cancel.cancel();
    let _ = leader.await;
    let _ = session.leave().await;
}

/// Why the job spec could not be had.
enum SpecFailure {
    /// The spec is invalid (exit code 2).
    Invalid(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for SpecFailure {
    fn from(e: anyhow::Error) -> Self {
        SpecFailure::Other(e)
    }
}

/// The job's spec: this agent's `--spec`, stored create-only when the job has
/// none yet; else the stored one (waited for when this agent has none).
async fn job_spec(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
    args: &AgentArgs,
) -> Result<JobSpec, SpecFailure> {
    let key = ks.job_spec(job);
    if let Some(path) = &args.spec {
        let mut overrides = args.set.clone();
        if let Some(n) = args.nproc {
            overrides.push(format!("workers.nproc={n}"));
        }
        let spec =
            JobSpec::load(path, &overrides).map_err(|e| SpecFailure::Invalid(e.to_string()))?;
        let outcome = store
            .compare_and_swap(&key, Expect::Absent, spec.to_json().into_bytes(), None)
            .await
            .map_err(|e| anyhow!(e).context("store the job spec"))?;
        if outcome.swapped() {
            return Ok(spec);
        }
    }
    let deadline = tokio::time::Instant::now() + SPEC_WAIT;
    loop {
        if let Some(kv) = store
            .get(&key)
            .await
            .map_err(|e| anyhow!(e).context("read the job spec"))?
        {
            let text = String::from_utf8(kv.value).context("the stored job spec is not UTF-8")?;
            let spec = JobSpec::from_json(&text)
                .map_err(|e| SpecFailure::Invalid(format!("stored spec of job {job}: {e}")))?;
            return Ok(spec);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SpecFailure::Other(anyhow!(
                "job {job} has no spec in the store after {SPEC_WAIT:?}: give --spec, or submit the job first"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where the job's checkpoints go: the spec's `checkpoint.url`, else a
/// folder under the data folder (shared by nodes only if the folder is).
fn checkpoint_url(spec: &JobSpec, data_dir: &std::path::Path, job: &str) -> anyhow::Result<String> {
    if let Some(url) = &spec.checkpoint.url {
        return Ok(url.clone());
    }
    let dir = data_dir.join("checkpoints").join(job);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(format!(
        "file://{}",
        dir.canonicalize()
            .context("resolve checkpoint folder")?
            .display()
    ))
}

/// Campaigns for the job's rendezvous leadership on this node's lease and,
/// while elected, drives the rendezvous. Returns when cancelled.
///
/// Only the rendezvous itself failing (a restart budget spent) fails the job.
/// A term that ends (the lease expired while this process was paused, a plan
/// write refused because another leader planned or holds the term) or a store
/// error steps down: this node resigns, if the term is still its own, and
/// campaigns again; whoever leads next resumes from the last plan.
async fn lead(
    store: Arc<dyn Store>,
    ks: Keyspace,
    cfg: RendezvousConfig,
    node: String,
    lease: kiln_coordinator::store::LeaseId,
    cancel: CancellationToken,
) {
    let key = ks.job_leader(&cfg.job);
    loop {
        let guard = tokio::select! {
            guard = election::campaign(store.clone(), &key, &node, lease) => guard,
            _ = cancel.cancelled() => return,
        };
        let guard = match guard {
            Ok(guard) => guard,
            Err(e) => {
                tracing::warn!(job = cfg.job, node, "campaign for leadership: {e}");
                if step_down_pause(&cancel).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(job = cfg.job, node, "leading the rendezvous");
        let term = CancellationToken::new();
        let fence = Some(guard.fence());
        let result = tokio::select! {
            result = membership::run_leader(store.clone(), ks.clone(), cfg.clone(), fence, term.clone()) => result,
            lost = guard.lost() => {
                tracing::warn!(job = cfg.job, node, "leadership lost: {lost:?}");
                continue;
            }
            _ = cancel.cancelled() => {
                let _ = guard.resign().await;
                return;
            }
        };
        match result {
            Ok(()) => {}
            Err(e @ kiln_coordinator::Error::RendezvousFailed { .. }) => {
                tracing::error!(job = cfg.job, node, "rendezvous leader: {e}");
                let message = e.to_string();
                let _ = status::update(&*store, &ks, &cfg.job, |s| {
                    s.set_phase(Phase::Failed);
                    s.message = message.clone();
                })
                .await;
                let _ = guard.resign().await;
                return;
            }
            Err(e) => {
                tracing::warn!(
                    job = cfg.job,
                    node,
                    "stepping down as rendezvous leader: {e}"
                );
                // Resigns only a term that is still this one's.
                if let Err(e) = guard.resign().await {
                    tracing::warn!(job = cfg.job, node, "resign the leadership: {e}");
                }
                if step_down_pause(&cancel).await {
                    return;
                }
            }
        }
    }
}

/// The pause before campaigning again; true when cancelled meanwhile.
async fn step_down_pause(cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(500)) => false,
        _ = cancel.cancelled() => true,
    }
}

/// Resolves with the job's phase once it is terminal (another node saw the
/// job finish, fail or get cancelled).
async fn watch_terminal(
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: String,
) -> kiln_coordinator::Result<Phase> {
    let key = ks.job_status(&job);
    loop {
        let (kvs, revision) = store.get_prefix(&key).await?;
        for kv in kvs.iter().filter(|kv| kv.key == key) {
            let s = status::JobStatus::from_json(&key, &kv.value)?;
            if s.phase.is_terminal() {
                return Ok(s.phase);
            }
        }
        let mut watch = store.watch_prefix(&key, Some(revision)).await?;
        loop {
            match watch.try_next().await {
                Ok(Some(WatchEvent::Put(kv))) if kv.key == key => {
                    let s = status::JobStatus::from_json(&key, &kv.value)?;
                    if s.phase.is_terminal() {
                        return Ok(s.phase);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(kiln_coordinator::Error::Unavailable {
                        message: "the store closed the status watch".into(),
                    });
                }
                Err(kiln_coordinator::Error::Compacted { .. }) => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Records progress in the job status without holding up the agent's loop
/// (a store outage would stall it for as long as a store call retries); the
/// edits only ever move the status forward, so their order does not matter.
fn update_in_background(
    store: &Arc<dyn Store>,
    ks: &Keyspace,
    job: &str,
    edit: impl FnMut(&mut status::JobStatus) + Send + 'static,
) {
    let (store, ks, job) = (store.clone(), ks.clone(), job.to_string());
    tokio::spawn(async move {
        if let Err(e) = status::update(&*store, &ks, &job, edit).await {
            tracing::warn!(job, "record progress in the job status: {e}");
        }
    });
}

/// Runs a watch of the store again after an outage (`Unavailable`) instead of
/// failing the node: how long an outage may last is the node lease's
/// business (`join_riding_outages`).
async fn riding_outages<T, F, Fut>(what: &'static str, mut watch: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kiln_coordinator::Result<T>>,
{
    loop {
        match watch().await {
            Err(e @ kiln_coordinator::Error::Unavailable { .. }) => {
                tracing::warn!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other.map_err(|e| anyhow!(e).context(what)),
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("read the host name (give --node)")?;
    Ok(name.trim().to_string())
}

/// Machine-readable events on stdout (`--events-json`), one object a line.
struct Events {
    json: bool,
    node: String,
}

impl Events {
    fn emit(&self, event: &str, mut fields: serde_json::Value) {
        if !self.json {
            return;
        }
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if let Some(map) = fields.as_object_mut() {
            map.insert("event".into(), event.into());
            map.insert("node".into(), self.node.clone().into());
            map.insert("time".into(), time.into());
        }
        println!("{fields}");
    }
}

//! The node agent: one per node of an elastic job ([`NodeAgent`], run by
//! `kiln agent`). It joins the job's rendezvous over the store (etcd), runs for
//! the job's rendezvous leadership, spawns and supervises this node's workers,
//! and relays rounds to them. A job needs no other process: only etcd.
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
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::membership;
use kiln_coordinator::presence;
use kiln_coordinator::rendezvous::{NodeRecord, RendezvousConfig};
use kiln_coordinator::status::{self, Phase};
use kiln_coordinator::store::{Expect, Store};
use kiln_proto::spec::JobSpec;
use kiln_trainer::agent::{AgentEvent, ElasticUpdate, RoundAssignment};
use tokio_util::sync::CancellationToken;

use crate::events::JobEvents;
use crate::history::{AgentHistory, HistoryTarget};
use crate::logs::{self, Echo, SHIP_FLUSH};
use crate::workers::{self, WorkerSetup};

/// What a node agent runs with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The store's URL (`etcd://...`): its first endpoint decides the address
    /// this node's workers advertise.
    pub store_url: String,
    /// The job id: every agent of a job gives the same.
    pub job: String,
    /// Worker processes on this node (default: the spec's `workers.nproc`).
    pub nproc: Option<usize>,
    /// This node's name in the job, stable across restarts (default: the
    /// host name).
    pub node: Option<String>,
    /// Where this node writes logs and outputs; checkpoints go to
    /// `checkpoints/{job}` under it unless the spec names `checkpoint.url`.
    pub data_dir: PathBuf,
    /// Address of the agent's Prometheus endpoint; port 0 picks one.
    pub metrics_addr: SocketAddr,
    /// The address this node's workers listen on and give their peers
    /// (default: `$KILN_BIND_HOST`, else [`advertised_host`]'s route).
    pub advertise_host: Option<String>,
    /// The `kiln` binary the workers are started from.
    pub kiln_exe: PathBuf,
}

/// How a node's part in a job ended (errors aside: the job failed on this
/// node, or this node lost its place in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeExit {
    /// The job had already ended (`phase`) when the node started.
    AlreadyEnded(Phase),
    /// This node's workers finished the job, in `round` at `world_size`.
    Finished {
        /// This node's name.
        node: String,
        /// The last round.
        round: u64,
        /// Its world size.
        world_size: u32,
    },
    /// Another node saw the job end in `phase`; this node's workers were
    /// stopped.
    Ended(Phase),
    /// The job was cancelled.
    Cancelled,
}

/// Where a node agent's machine-readable events go: this node's name, the
/// event's name and its fields (`kiln agent --events-json` prints them, one
/// object a line).
pub type EventSink<'a> = &'a (dyn Fn(&str, &str, serde_json::Value) + Send + Sync);

/// One node of an elastic job: see the module docs.
pub struct NodeAgent<'a> {
    store: Arc<dyn Store>,
    ks: Keyspace,
    config: NodeConfig,
    spec: JobSpec,
    events: EventSink<'a>,
}

/// The host this node's workers bind and advertise: `advertise_host`,
/// `$KILN_BIND_HOST`, or the local address the kernel routes to the store's
/// first endpoint (no packet is sent: a UDP socket is only connected).
pub fn advertised_host(advertise_host: Option<&str>, store_url: &str) -> anyhow::Result<String> {
    if let Some(h) = advertise_host
        .map(str::to_string)
        .or_else(|| std::env::var("KILN_BIND_HOST").ok())
        .filter(|h| !h.trim().is_empty())
    {
        return Ok(h.trim().to_string());
    }
    // The store is connected already, so its URL parses.
    let first = match kiln_proto::store_url::StoreUrl::parse(store_url) {
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

impl<'a> NodeAgent<'a> {
    /// A node of `config.job`, whose spec is `spec` ([`job_spec`]), over
    /// `store`; `events` receives its machine-readable events.
    pub fn new(
        store: Arc<dyn Store>,
        config: NodeConfig,
        spec: JobSpec,
        events: EventSink<'a>,
    ) -> NodeAgent<'a> {
        NodeAgent {
            store,
            ks: Keyspace::default(),
            config,
            spec,
            events,
        }
    }

    /// Runs this node's part of the job to its end.
    pub async fn run(self) -> anyhow::Result<NodeExit> {
        let NodeAgent {
            store,
            ks,
            config: args,
            spec,
            events,
        } = self;
        let job = args.job.clone();
        if let Some(s) = status::read(&*store, &ks, &job).await?
            && s.phase.is_terminal()
        {
            return Ok(NodeExit::AlreadyEnded(s.phase));
        }
        let nproc = args.nproc.unwrap_or(spec.workers.nproc);
        let node = match &args.node {
            Some(n) => n.clone(),
            None => hostname()?,
        };
        kiln_coordinator::keyspace::validate_name("node", &node)?;
        let emit = |event: &str, fields: serde_json::Value| events(&node, event, fields);
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
        let checkpoint_url = kiln_checkpoint::store::job_location(
            spec.checkpoint.url.as_deref(),
            &args.data_dir,
            &job,
        )?;
        let ttl = Duration::from_secs(spec.elastic.lease_ttl_secs);

        let cancel = CancellationToken::new();
        let _stop_services = cancel.clone().drop_guard();
        // Worker lines go to {run_dir}/logs, to the store (for `kiln logs --store`)
        // and, prefixed, to this agent's stderr.
        let node_logs = logs::open(&run_dir, &node, &spec, nproc)?;
        let node_logs = Arc::new(logs::ship_to_store(node_logs, store.clone(), &job, &spec).await?);
        let host = advertised_host(args.advertise_host.as_deref(), &args.store_url)?;
        tracing::info!(job, node, host, "workers listen on this host");
        let started = workers::start(WorkerSetup {
            job: &job,
            node: &node,
            nproc,
            run_dir: &run_dir,
            kiln_exe: &args.kiln_exe,
            log_sink: logs::sink(node_logs.clone(), Echo::Stderr),
            bind_host: &host,
            metrics_addr: args.metrics_addr,
            cancel: &cancel,
        })
        .await?;
        let mut workers = started.workers.into_elastic(&job, started.metrics);
        // The workers build data and model before this node joins, so that
        // no round (the first, or the one a mid-run join opens) waits for them.
        let built = workers
            .prepare(&spec.to_json(), Duration::from_secs(600))
            .await;
        tracing::debug!(job, built, "workers prepared");
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
        emit("joined", serde_json::json!({ "nproc": nproc }));

        // Every agent runs for the job's rendezvous leadership, on its node lease:
        // when the leader's node dies, its lease ends and another agent takes over.
        let rendezvous = RendezvousConfig::from_elastic(&job, &spec.elastic);
        let leader = tokio::spawn(membership::lead_rendezvous(
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
            move || status::watch_terminal(store.clone(), ks.clone(), job.clone())
        }));
        let mut cancel_request = tokio::spawn(riding_outages("watch for a cancel request", {
            let (store, ks, job) = (store.clone(), ks.clone(), job.clone());
            move || status::watch_cancel(store.clone(), ks.clone(), job.clone())
        }));

        let hooks = JobEvents::new(&spec, &job)?;
        // The dashboard's history of the job, recorded by the node of rank 0.
        let mut history = AgentHistory::new(
            HistoryTarget {
                store: &store,
                ks: &ks,
                job: &job,
                checkpoint_root: &checkpoint_url,
                registry: crate::register::registry_location(&spec, &checkpoint_url),
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
                    emit("round", serde_json::json!({
                        "round": round, "world_size": world_size, "first_rank": first_rank,
                    }));
                    tracing::info!(job, node, round, world_size, first_rank, "new round");
                    if first_rank == 0 {
                        hooks.round_changed(&plan);
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
                    if let ElasticUpdate::Event(event) = &update {
                        hooks.on_worker_event(event, world_size);
                    }
                    match update {
                        ElasticUpdate::Event(AgentEvent::Progress { rank, progress }) => {
                            if !job_succeeded {
                                waiting_since = None;
                            }
                            if rank == first_rank {
                                emit("progress", serde_json::json!({
                                    "rank": rank, "round": round, "world_size": world_size,
                                    "step": progress.step, "loss": progress.loss,
                                }));
                                if rank == 0 && progress.step % 10 == 0 {
                                    let (step, loss) = (progress.step, progress.loss);
                                    status::update_in_background(&store, &ks, &job, move |s| {
                                        if s.step < step {
                                            s.step = step;
                                            s.loss = Some(loss);
                                        }
                                    });
                                }
                            }
                        }
                        ElasticUpdate::Event(AgentEvent::Checkpoint { rank, saved }) => {
                            emit("checkpoint", serde_json::json!({
                                "rank": rank, "step": saved.step, "url": saved.url,
                            }));
                            let (url, step) = (saved.url.clone(), saved.step);
                            status::update_in_background(&store, &ks, &job, move |s| {
                                if s.last_checkpoint.as_ref().is_none_or(|c| c.step < step) {
                                    s.last_checkpoint = Some(status::CheckpointRef { url: url.clone(), step });
                                }
                            });
                        }
                        ElasticUpdate::Event(AgentEvent::Warning { rank, message }) => {
                            tracing::warn!(job, rank, "{message}");
                            emit("warning", serde_json::json!({ "rank": rank, "message": message }));
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
                                emit("eval", serde_json::json!({ "step": eval.step, "metrics": metrics }));
                            }
                        }
                        ElasticUpdate::RoundStarted { rank, started } => {
                            waiting_since = None;
                            if rank == first_rank {
                                emit("round_started", serde_json::json!({
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
                            emit("worker_died", serde_json::json!({ "local_rank": local_rank, "message": message }));
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
                    emit("stopped", serde_json::json!({ "phase": phase.as_str() }));
                    workers.kill_all().await;
                    node_logs.close(SHIP_FLUSH).await;
                    leave_job(&cancel, leader, session).await;
                    return Ok(NodeExit::Ended(phase));
                }
                request = &mut cancel_request => {
                    let request = request.map_err(|e| anyhow!(e))??;
                    workers.kill_all().await;
                    node_logs.close(SHIP_FLUSH).await;
                    let _ = status::update(&*store, &ks, &job, |s| {
                        s.set_phase(Phase::Cancelled);
                        s.message = format!("cancelled by {}: {}", request.by, request.reason);
                    }).await;
                    emit("cancelled", serde_json::json!({ "by": request.by }));
                    leave_job(&cancel, leader, session).await;
                    return Ok(NodeExit::Cancelled);
                }
                _ = sleep_until_some(wait_deadline) => {
                    if job_succeeded {
                        tracing::warn!(job, node, "the job succeeded but this node's workers did not report their end within {FINISH_GRACE:?}");
                        workers.kill_all().await;
                        node_logs.close(SHIP_FLUSH).await;
                        leave_job(&cancel, leader, session).await;
                        return Ok(NodeExit::Ended(Phase::Succeeded));
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
        node_logs.close(SHIP_FLUSH).await;
        history.finish().await;
        let result = match outcome {
            Ok(()) => {
                let rank0 = finished.get(&0).cloned();
                // The node of rank 0 speaks for the job: events and registration.
                let mut model = None;
                if let Some(f) = &rank0 {
                    hooks.finished(f, 0.0);
                    if spec.register.is_some() {
                        match crate::register::register_final_model(
                            &spec,
                            &job,
                            &checkpoint_url,
                            f,
                            hooks.hooks(),
                        )
                        .await
                        {
                            Ok(m) => model = m,
                            Err(e) => tracing::error!(job, "register the model: {e:#}"),
                        }
                    }
                }
                if let Some(m) = &model {
                    emit("registered", serde_json::json!({ "model": m }));
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
                    emit(
                        "finished",
                        serde_json::json!({
                            "rank": rank, "round": round, "world_size": world_size,
                            "steps": f.steps, "final_loss": f.final_loss, "eval": eval,
                            "weights_digest": f.weights_digest, "weights": f.weights_path,
                            "checkpoint": f.checkpoint_url, "start_step": f.start_step,
                        }),
                    );
                }
                Ok(NodeExit::Finished {
                    node: node.clone(),
                    round,
                    world_size,
                })
            }
            Err(e) => {
                workers.kill_all().await;
                hooks.failed(&e, round);
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
        hooks.flush().await;
        leave_job(&cancel, leader, session).await;
        result
    }
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
#[derive(Debug)]
pub enum JobSpecError {
    /// The spec is invalid: the message names the field (`kiln agent` exits
    /// with code 2).
    Invalid(String),
    /// The store failed, or no spec came.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for JobSpecError {
    fn from(e: anyhow::Error) -> Self {
        JobSpecError::Other(e)
    }
}

/// The job's spec: `spec_file` with the `overrides`, stored create-only when
/// the job has none yet; else the stored one (waited for when this agent has
/// no file).
pub async fn job_spec(
    store: &dyn Store,
    job: &str,
    spec_file: Option<&Path>,
    overrides: &[String],
) -> Result<JobSpec, JobSpecError> {
    let key = Keyspace::default().job_spec(job);
    if let Some(path) = spec_file {
        let spec =
            JobSpec::load(path, overrides).map_err(|e| JobSpecError::Invalid(e.to_string()))?;
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
                .map_err(|e| JobSpecError::Invalid(format!("stored spec of job {job}: {e}")))?;
            return Ok(spec);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(JobSpecError::Other(anyhow!(
                "job {job} has no spec in the store after {SPEC_WAIT:?}: give --spec, or submit the job first"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`status::riding_outages`], its error in the agent's words.
async fn riding_outages<T, F, Fut>(what: &'static str, watch: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kiln_coordinator::Result<T>>,
{
    status::riding_outages(what, watch)
        .await
        .map_err(|e| anyhow!(e).context(what))
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// This machine's host name, a node's default name.
pub fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("read the host name (give --node)")?;
    Ok(name.trim().to_string())
}

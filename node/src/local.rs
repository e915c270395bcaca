//! `kiln run`'s job: one node, one round, over the process's own memory
//! store. The store, the rendezvous leader and the node's workers are wired
//! as for a multi-node job (the same plan, the same worker assignment), so a
//! `kiln run` job is an elastic job that happens to have one node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::membership;
use kiln_coordinator::rendezvous::{NodeRecord, RendezvousConfig};
use kiln_coordinator::store::Store;
use kiln_proto::spec::JobSpec;
use kiln_proto::worker::Finished;
use kiln_trainer::agent::{AgentEvent, RoundAssignment};
use tokio_util::sync::CancellationToken;

use crate::LOCAL_NODE;
use crate::events::JobEvents;
use crate::history::{HistoryTarget, RunFeed};
use crate::logs::Echo;
use crate::workers::{StartedWorkers, WorkerSetup};

/// How long `kiln run` waits for its own rendezvous plan.
const PLAN_WAIT: Duration = Duration::from_secs(30);

/// What a local run needs besides its spec.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where the run writes logs, weights, checkpoints and the registry
    /// (unless the spec names other places).
    pub data_dir: PathBuf,
    /// Address of the run's Prometheus endpoint; port 0 picks one.
    pub metrics_addr: SocketAddr,
    /// The checkpoint to resume from (`latest`, a step, a manifest URL).
    pub resume: Option<String>,
    /// The `kiln` binary the workers are started from.
    pub kiln_exe: PathBuf,
}

/// The job and its run folder, once its status and history are recorded:
/// whoever records the job's end needs them, however it ends.
#[derive(Debug, Clone)]
pub struct Started {
    /// The job's name.
    pub job: String,
    /// Its run folder (`{data_dir}/jobs/{job}`).
    pub run_dir: PathBuf,
}

/// How a local run ended.
#[derive(Debug, Clone)]
pub struct LocalSummary {
    /// The job's name.
    pub job: String,
    /// What rank 0 finished with (every rank ended with its weights).
    pub rank0: Finished,
    /// The round and its world size.
    pub round: u64,
    /// The ranks that trained.
    pub world_size: u32,
    /// Seconds from the round's assignment to the end.
    pub elapsed_secs: f64,
    /// The run folder.
    pub run_dir: PathBuf,
    /// Where `/metrics` was served.
    pub metrics_addr: SocketAddr,
    /// The job's checkpoint location.
    pub checkpoint_root: String,
    /// The registered model (`NAME:VERSION`), when the spec registers one.
    pub model: Option<String>,
    /// The registry it went to.
    pub registry: Option<String>,
}

/// Runs `spec` as one node over `store`: records the spec, leads the
/// rendezvous, starts the workers, hands them their round, sends the job's
/// events and registers the model. `started` is set once the job's status
/// and history are being recorded; `on_event` sees every worker event (for
/// progress output).
pub async fn run_local(
    spec: &JobSpec,
    config: &LocalConfig,
    store: Arc<dyn Store>,
    ks: Keyspace,
    started: &mut Option<Started>,
    mut on_event: impl FnMut(AgentEvent) + Send,
) -> anyhow::Result<LocalSummary> {
    let job = spec.job.name.clone();
    let nproc = spec.workers.nproc;
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir.join("jobs").join(&job))
        .with_context(|| format!("create run folder under {}", data_dir.display()))?;
    let run_dir: PathBuf = data_dir
        .join("jobs")
        .join(&job)
        .canonicalize()
        .context("resolve run folder")?;
    let spec_json = spec.to_json();
    let checkpoint_url =
        kiln_checkpoint::store::job_location(spec.checkpoint.url.as_deref(), data_dir, &job)?;
    let registry = crate::register::registry_location(spec, &checkpoint_url);

    store
        .put(&ks.job_spec(&job), spec_json.clone().into_bytes(), None)
        .await
        .context("record job spec")?;
    let cancel = CancellationToken::new();
    let _stop_services = cancel.clone().drop_guard();
    let mut leader = tokio::spawn(membership::run_leader(
        store.clone(),
        ks.clone(),
        one_node(&job),
        // The only leader there is: one process over its own memory store.
        None,
        cancel.clone(),
    ));

    // Worker lines go to {run_dir}/logs (read by `kiln logs JOB --data-dir`).
    let node_logs = Arc::new(crate::logs::open(&run_dir, LOCAL_NODE, spec, nproc)?);
    let StartedWorkers {
        workers,
        metrics,
        metrics_addr,
    } = crate::workers::start(WorkerSetup {
        job: &job,
        node: LOCAL_NODE,
        nproc,
        run_dir: &run_dir,
        kiln_exe: &config.kiln_exe,
        log_sink: crate::logs::sink(node_logs, Echo::Off),
        // One machine: the ring stays on loopback.
        bind_host: "127.0.0.1",
        metrics_addr: config.metrics_addr,
        cancel: &cancel,
    })
    .await?;
    let record = NodeRecord {
        node: LOCAL_NODE.to_string(),
        host: "127.0.0.1".to_string(),
        endpoints: workers.endpoints(),
        devices: nproc as u32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        presence: None,
    };
    let mut session = membership::join(
        store.clone(),
        ks.clone(),
        &job,
        record,
        Duration::from_secs(5),
    )
    .await
    .context("join rendezvous")?;
    let plan = tokio::select! {
        plan = session.next_plan(0) => plan.context("wait for the rendezvous plan")?,
        res = &mut leader => return Err(anyhow!("rendezvous leader stopped before a plan: {:?}", res)),
        _ = tokio::time::sleep(PLAN_WAIT) => return Err(anyhow!("no rendezvous plan within 30 s")),
    };
    let member = plan.member(LOCAL_NODE).ok_or_else(|| {
        anyhow!(
            "rendezvous plan of round {} does not include this node",
            plan.round
        )
    })?;
    tracing::info!(
        job,
        round = plan.round,
        world_size = plan.world_size,
        "rendezvous complete"
    );

    let hooks = JobEvents::new(spec, &job)?;
    hooks.started(plan.round, plan.world_size, config.resume.clone());
    let mut feed = RunFeed::start(
        HistoryTarget {
            store: &store,
            ks: &ks,
            job: &job,
            checkpoint_root: &checkpoint_url,
            registry: registry.clone(),
        },
        &run_dir,
        spec.train.global_batch,
        spec.train.steps,
        plan.round,
        plan.world_size,
    )
    .await;
    *started = Some(Started {
        job: job.clone(),
        run_dir: run_dir.clone(),
    });
    let started_at = Instant::now();
    let world_size = plan.world_size;
    let assignment = RoundAssignment {
        round: plan.round,
        first_rank: member.first_rank,
        world_size: plan.world_size,
        peers: plan.peers.clone(),
        spec_json,
        checkpoint_url: checkpoint_url.clone(),
        resume: config.resume.clone().unwrap_or_default(),
        run_id: run_id(),
        ring_secret: plan.secret_bytes().map_err(|e| anyhow!(e))?,
    };
    let outcome = workers
        .run(&job, &run_dir, &assignment, metrics, |event| {
            hooks.on_worker_event(&event, world_size);
            feed.on_event(&event);
            on_event(event)
        })
        .await
        .map_err(anyhow::Error::from);
    feed.finish().await;
    // Stop the leader before leaving: a member leaving a live leader's round
    // counts as a lost node.
    cancel.cancel();
    let leader_result = leader.await;
    let _ = session.leave().await;
    let summary = match outcome {
        Ok(summary) => summary,
        Err(e) => {
            hooks.failed(&e, plan.round);
            hooks.flush().await;
            return Err(e);
        }
    };
    if let Ok(Err(e)) = leader_result {
        return Err(anyhow!("rendezvous leader failed: {e}"));
    }
    let elapsed_secs = started_at.elapsed().as_secs_f64();

    let (_, rank0) = summary
        .finished
        .iter()
        .find(|(r, _)| *r == 0)
        .context("rank 0 did not finish")?;
    for (rank, f) in &summary.finished {
        if f.weights_digest != rank0.weights_digest {
            return Err(anyhow!(
                "ranks diverged: rank {rank} ends with weights {} but rank 0 with {}",
                f.weights_digest,
                rank0.weights_digest
            ));
        }
    }
    hooks.finished(rank0, elapsed_secs);
    let model = match &spec.register {
        Some(_) => {
            crate::register::register_final_model(spec, &job, &checkpoint_url, rank0, hooks.hooks())
                .await?
        }
        None => None,
    };
    hooks.flush().await;
    Ok(LocalSummary {
        job,
        rank0: rank0.clone(),
        round: plan.round,
        world_size,
        elapsed_secs,
        run_dir,
        metrics_addr,
        checkpoint_root: checkpoint_url,
        model,
        registry,
    })
}

/// One node, one round: the spec's `[elastic]` does not apply.
fn one_node(job: &str) -> RendezvousConfig {
    RendezvousConfig {
        job: job.to_string(),
        min_nodes: 1,
        max_nodes: 1,
        settle: Duration::ZERO,
        max_failures: 0,
        max_scale_events: 0,
        cooldown: Duration::ZERO,
    }
}

/// Names this run's save attempts; unique per invocation.
fn run_id() -> String {
    format!(
        "{:x}{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros()),
        std::process::id()
    )
}

//! The agent: one per node. Spawns one `kiln worker` process per device, learns
//! their collective listener addresses (for the rendezvous plan), hands each its
//! assignment, relays their reports, feeds the metrics, and, when one worker
//! fails, stops the others and reports the first failure: never a hang.
//!
//! The agent does not know the store: whoever drives it (kiln-node's `kiln
//! run` and `kiln agent`) joins the rendezvous with [`LocalWorkers::endpoints`]
//! and passes the resulting plan to [`LocalWorkers::run`] (one round) or to
//! [`ElasticWorkers::assign`] (every round of an elastic job).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::frame;
use kiln_proto::worker::{
    AgentMessage, Assignment, CheckpointSaved, EvalResult, Finished, Hello, Interrupted, Progress,
    RoundStarted, WorkerMessage, agent_message, worker_message::Kind as Report,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::error::{Context, Error, Result};
use crate::logs::{Capture, LogSink, RankHandle, TailHandle};
use crate::metrics::TrainingMetrics;

/// How to start this node's workers.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The job's id, for log fields.
    pub job: String,
    /// Worker processes on this node.
    pub nproc: usize,
    /// The run's folder; the sink writes worker logs to `logs/worker-{local_rank}.log`.
    pub run_dir: PathBuf,
    /// The `kiln` binary to start as `kiln worker`.
    pub kiln_exe: PathBuf,
    /// How long workers may take to start and say hello.
    pub start_timeout: Duration,
    /// Receives every line the workers print (see [`crate::logs`]).
    pub log_sink: LogSink,
    /// The address workers bind their ring listeners on and give their peers
    /// (`KILN_BIND_HOST` in their environment).
    pub bind_host: String,
}

/// One round's assignment for this node, from the rendezvous plan.
#[derive(Debug, Clone)]
pub struct RoundAssignment {
    /// The round's number; a newer round aborts an older one in flight.
    pub round: u64,
    /// Global rank of local worker 0; local worker i is `first_rank + i`.
    pub first_rank: u32,
    /// Ranks in the round, over every node.
    pub world_size: u32,
    /// Every rank's collective listener address, by global rank.
    pub peers: Vec<String>,
    /// The accepted job spec, JSON.
    pub spec_json: String,
    /// Checkpoint root URL of the job.
    pub checkpoint_url: String,
    /// Empty (fresh start), "latest", a step, or a manifest URL.
    pub resume: String,
    /// Names this run's save attempts (shared by all ranks).
    pub run_id: String,
    /// The round's ring secret (32 bytes; [`crate::collective::ring::RingSecret`]).
    pub ring_secret: Vec<u8>,
}

/// What the agent hears from its workers while they train.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// A step finished.
    Progress {
        /// The reporting worker's global rank.
        rank: u32,
        /// The step, its loss and timings.
        progress: Progress,
    },
    /// Held-out metrics were computed.
    Eval {
        /// The reporting worker's global rank.
        rank: u32,
        /// The metrics and the step they were taken at.
        eval: EvalResult,
    },
    /// A checkpoint save landed (rank 0 reports the committed checkpoint).
    Checkpoint {
        /// The reporting worker's global rank.
        rank: u32,
        /// The step, its URL and what the save cost.
        saved: CheckpointSaved,
    },
    /// Something the user should know that does not stop training (a failed
    /// save, a resume on other data, ...).
    Warning {
        /// The reporting worker's global rank.
        rank: u32,
        /// The warning, ready to print.
        message: String,
    },
}

/// The workers' final reports, by global rank.
#[derive(Debug, Clone)]
pub struct NodeSummary {
    /// Each local worker's global rank and final report.
    pub finished: Vec<(u32, Finished)>,
}

struct WorkerHandle {
    local_rank: usize,
    pid: u32,
    child: Child,
    hello: Hello,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    log: PathBuf,
    capture: Capture,
}

/// This node's workers, started and connected, waiting for an assignment.
pub struct LocalWorkers {
    workers: Vec<WorkerHandle>,
    cfg: AgentConfig,
}

impl std::fmt::Debug for LocalWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWorkers")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl LocalWorkers {
    /// Starts `cfg.nproc` workers and waits for each one's hello.
    pub async fn spawn(cfg: &AgentConfig) -> Result<Self> {
        let ranks: Vec<usize> = (0..cfg.nproc).collect();
        let workers = start_workers(cfg, &ranks, Role::Slot).await?;
        Ok(Self {
            workers,
            cfg: cfg.clone(),
        })
    }

    /// Collective listener addresses of the local workers, by local rank.
    pub fn endpoints(&self) -> Vec<String> {
        self.workers
            .iter()
            .map(|w| w.hello.ring_addr.clone())
            .collect()
    }

    /// Hands out the assignment and supervises until every worker finished, or
    /// until the first failure (then every worker is killed and the error returned).
    pub async fn run(
        self,
        job: &str,
        run_dir: &Path,
        round: &RoundAssignment,
        metrics: Arc<TrainingMetrics>,
        mut on_event: impl FnMut(AgentEvent) + Send,
    ) -> Result<NodeSummary> {
        let (tx, mut rx) = mpsc::channel::<Update>(1024);
        let mut writers = Vec::new();
        let mut pids = Vec::new();
        let mut logs = Vec::new();
        let mut killers = Vec::new();
        for w in self.workers {
            let local_rank = w.local_rank;
            let assignment = round.assignment(job, run_dir, local_rank, false);
            let attached = attach(w, 0, tx.clone());
            attached.rank.set(assignment.rank);
            let mut writer = attached.writer;
            let msg = AgentMessage {
                kind: Some(agent_message::Kind::Assignment(assignment)),
            };
            writer
                .write_all(&frame::encode(&msg))
                .await
                .with_context(|| format!("send assignment to worker {local_rank}"))?;
            writers.push(writer);
            pids.push(attached.pid);
            logs.push((attached.log, attached.tail));
            killers.push(attached.killer);
        }
        drop(tx);

        let n = pids.len();
        let world = round.world_size;
        let mut finished: Vec<Option<Finished>> = vec![None; n];
        let mut exited: Vec<Option<std::process::ExitStatus>> = vec![None; n];
        let mut failures: Vec<Failure> = Vec::new();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            if failures.is_empty()
                && exited.iter().all(Option::is_some)
                && finished.iter().all(Option::is_some)
            {
                break;
            }
            let next = match grace {
                Some(deadline) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(u) => u,
                    Err(_) => break,
                },
                None => rx.recv().await,
            };
            let Some(update) = next else { break };
            let rank = |i: usize| round.first_rank + i as u32;
            match update {
                Update::Report(i, _, WorkerMessage { kind: Some(kind) }) => match kind {
                    Report::Progress(p) => {
                        if i == 0 {
                            metrics.step.set(p.step as i64);
                            metrics.loss.set(p.loss);
                            metrics.learning_rate.set(p.lr);
                            if p.grad_norm.is_finite() {
                                metrics.grad_norm.set(p.grad_norm);
                            }
                            metrics.step_seconds.observe(p.step_seconds);
                            if p.step_seconds > 0.0 {
                                metrics
                                    .samples_per_second
                                    .set(p.samples as f64 * world as f64 / p.step_seconds);
                            }
                        }
                        metrics.samples.inc_by(p.samples);
                        metrics.allreduce_seconds.inc_by(p.allreduce_seconds);
                        metrics.allreduce_bytes.inc_by(p.allreduce_bytes);
                        on_event(AgentEvent::Progress {
                            rank: rank(i),
                            progress: p,
                        });
                    }
                    Report::Eval(e) => on_event(AgentEvent::Eval {
                        rank: rank(i),
                        eval: e,
                    }),
                    Report::Checkpoint(saved) => {
                        if rank(i) == 0 {
                            metrics.checkpoint_committed(&saved);
                        }
                        on_event(AgentEvent::Checkpoint {
                            rank: rank(i),
                            saved,
                        })
                    }
                    Report::Warning(w) => {
                        tracing::warn!(job, rank = rank(i), "{}", w.message);
                        on_event(AgentEvent::Warning {
                            rank: rank(i),
                            message: w.message,
                        });
                    }
                    Report::Finished(f) => finished[i] = Some(f),
                    Report::Failed(f) => {
                        failures.push(Failure::reported(rank(i), pids[i], f.error))
                    }
                    Report::Interrupted(_) | Report::RoundStarted(_) | Report::Prepared(_) => {}
                    Report::Hello(_) => failures.push(Failure::reported(
                        rank(i),
                        pids[i],
                        "said hello twice".into(),
                    )),
                },
                Update::Report(..) => {}
                Update::Closed(i, _, error) => {
                    if finished[i].is_none() && !failures.iter().any(|f| f.rank == rank(i)) {
                        // The process exit that follows says why; note the channel error if any.
                        if let Some(e) = error {
                            failures.push(Failure::reported(
                                rank(i),
                                pids[i],
                                format!("agent channel failed: {e}"),
                            ));
                        }
                    }
                }
                Update::Exited(i, _, status) => {
                    exited[i] = Some(status);
                    if !status.success() || finished[i].is_none() {
                        let (log, tail) = &logs[i];
                        failures.push(Failure::exited(rank(i), pids[i], status, log, tail));
                    }
                }
            }
            if !failures.is_empty() && grace.is_none() {
                // Others fail right after the first (their peer vanished); gather
                // them briefly so the root cause can be told from the echoes.
                grace = Some(tokio::time::Instant::now() + Duration::from_millis(300));
            }
        }
        if !failures.is_empty() {
            for k in &killers {
                let _ = k.try_send(());
            }
            // Wait for the kills to land so no worker outlives the error.
            while let Ok(Some(update)) =
                tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
            {
                if let Update::Exited(i, _, status) = update {
                    exited[i] = Some(status);
                }
                if exited.iter().all(Option::is_some) {
                    break;
                }
            }
            drop(writers);
            failures.sort_by_key(Failure::severity);
            let first = &failures[0];
            tracing::error!(job, rank = first.rank, pid = first.pid, "worker failed");
            return Err(Error::worker(first.message.clone()));
        }
        Ok(NodeSummary {
            finished: finished
                .into_iter()
                .enumerate()
                .map(|(i, f)| (round.first_rank + i as u32, f.expect("checked above")))
                .collect(),
        })
    }
}

/// What the per-worker tasks tell the supervisor: (local rank, generation, ...).
/// The generation tells a replaced worker's late news from its replacement's.
enum Update {
    Report(usize, u64, WorkerMessage),
    Closed(usize, u64, Option<String>),
    Exited(usize, u64, std::process::ExitStatus),
}

/// A worker whose reports and exit are being watched.
struct Attached {
    pid: u32,
    log: PathBuf,
    rank: RankHandle,
    tail: TailHandle,
    writer: OwnedWriteHalf,
    /// Send `()` to kill the worker.
    killer: mpsc::Sender<()>,
}

/// Starts the tasks that read a worker's reports and wait for its exit.
fn attach(w: WorkerHandle, generation: u64, tx: mpsc::Sender<Update>) -> Attached {
    let WorkerHandle {
        local_rank,
        pid,
        mut child,
        mut reader,
        writer,
        log,
        capture,
        ..
    } = w;
    let (rank, tail) = (capture.rank_handle(), capture.tail_handle());
    let mut capture = capture;
    let reports = tx.clone();
    tokio::spawn(async move {
        loop {
            match read_frame::<WorkerMessage>(&mut reader).await {
                Ok(Some(m)) => {
                    if reports
                        .send(Update::Report(local_rank, generation, m))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {
                    return drop(
                        reports
                            .send(Update::Closed(local_rank, generation, None))
                            .await,
                    );
                }
                Err(e) => {
                    return drop(
                        reports
                            .send(Update::Closed(local_rank, generation, Some(e.to_string())))
                            .await,
                    );
                }
            }
        }
    });
    let (killer, mut kill_rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = kill_rx.recv() => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        // Its last lines, for the failure message, before its exit is told.
        capture.drained().await;
        if let Ok(status) = status {
            let _ = tx
                .send(Update::Exited(local_rank, generation, status))
                .await;
        }
    });
    Attached {
        pid,
        log,
        rank,
        tail,
        writer,
        killer,
    }
}

impl RoundAssignment {
    /// The assignment message of local worker `local_rank`.
    fn assignment(
        &self,
        job: &str,
        run_dir: &Path,
        local_rank: usize,
        elastic: bool,
    ) -> Assignment {
        Assignment {
            job: job.to_string(),
            round: self.round,
            rank: self.first_rank + local_rank as u32,
            world_size: self.world_size,
            peers: self.peers.clone(),
            spec_json: self.spec_json.clone(),
            run_dir: run_dir.display().to_string(),
            device: String::new(),
            checkpoint_url: self.checkpoint_url.clone(),
            resume: self.resume.clone(),
            run_id: self.run_id.clone(),
            elastic,
            ring_secret: self.ring_secret.clone(),
            local_rank: local_rank as u32,
            prepare_only: false,
        }
    }
}

/// What an elastic node's workers did, as [`ElasticWorkers::next`] reports it.
#[derive(Debug)]
pub enum ElasticUpdate {
    /// Progress, evaluation, checkpoints, warnings (as in [`AgentEvent`]).
    Event(AgentEvent),
    /// A worker joined its round and holds the training state.
    RoundStarted {
        /// The worker's global rank in the round.
        rank: u32,
        /// The round, its world size, the step it starts at and where the
        /// state came from.
        started: RoundStarted,
    },
    /// A worker's round broke (a peer died or a newer round came); it waits
    /// for the next assignment with its state.
    Interrupted {
        /// The worker's global rank in the broken round.
        rank: u32,
        /// The round, the step reached and why it broke.
        interrupted: Interrupted,
    },
    /// A worker finished the job.
    Finished {
        /// The worker's global rank in the last round.
        rank: u32,
        /// Its final report.
        finished: Finished,
    },
    /// A worker reported an error that is not a collective's: the job cannot go on.
    Failed {
        /// The worker's global rank.
        rank: u32,
        /// The error, naming the rank and pid.
        message: String,
    },
    /// A worker process ended before finishing (killed, crashed): replace it
    /// with [`ElasticWorkers::respawn`].
    Died {
        /// The dead worker's slot on this node.
        local_rank: usize,
        /// How it ended, with its last lines.
        message: String,
    },
}

/// One worker slot of an elastic node.
struct Slot {
    generation: u64,
    pid: u32,
    log: PathBuf,
    rank: RankHandle,
    tail: TailHandle,
    endpoint: String,
    writer: Option<OwnedWriteHalf>,
    killer: mpsc::Sender<()>,
    finished: bool,
    dead: bool,
    /// The process exited (its output drained).
    exited: bool,
}

/// An elastic node's workers: they live across rounds, take a newer round's
/// assignment at any time (aborting their collective in flight), and a dead
/// one can be replaced by a fresh process that receives the training state
/// from its peers in the next round.
pub struct ElasticWorkers {
    job: String,
    cfg: AgentConfig,
    slots: Vec<Slot>,
    tx: mpsc::Sender<Update>,
    rx: mpsc::Receiver<Update>,
    metrics: Arc<TrainingMetrics>,
    first_rank: u32,
    world_size: u32,
    /// A worker process started before any slot needs it, so that a dead
    /// worker's replacement is a process that has already started (loaded
    /// libtorch, bound its ring listener, said hello): it only needs its
    /// assignment. Started once a round trains (the first, and the one after
    /// a spare was taken).
    spare: Option<tokio::task::JoinHandle<Result<WorkerHandle>>>,
    /// The job spec (JSON) of the latest [`Self::prepare`] or round: what a
    /// spare is told to prepare for.
    spec_json: Option<String>,
    /// Updates read while [`Self::prepare`] waited, for [`Self::next`].
    held: std::collections::VecDeque<Update>,
}

impl std::fmt::Debug for ElasticWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElasticWorkers")
            .field("job", &self.job)
            .field("workers", &self.slots.len())
            .finish()
    }
}

impl LocalWorkers {
    /// Turns the started workers into an elastic node's (see [`ElasticWorkers`]).
    pub fn into_elastic(self, job: &str, metrics: Arc<TrainingMetrics>) -> ElasticWorkers {
        let (tx, rx) = mpsc::channel::<Update>(4096);
        let slots = self
            .workers
            .into_iter()
            .map(|w| {
                let endpoint = w.hello.ring_addr.clone();
                let a = attach(w, 0, tx.clone());
                Slot {
                    generation: 0,
                    pid: a.pid,
                    log: a.log,
                    rank: a.rank,
                    tail: a.tail,
                    endpoint,
                    writer: Some(a.writer),
                    killer: a.killer,
                    finished: false,
                    dead: false,
                    exited: false,
                }
            })
            .collect();
        ElasticWorkers {
            job: job.to_string(),
            cfg: self.cfg,
            slots,
            tx,
            rx,
            metrics,
            first_rank: 0,
            world_size: 0,
            spare: None,
            spec_json: None,
            held: Default::default(),
        }
    }
}

impl ElasticWorkers {
    /// Collective listener addresses of the local workers, by local rank.
    pub fn endpoints(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.endpoint.clone()).collect()
    }

    /// Whether every local worker finished the job.
    pub fn all_finished(&self) -> bool {
        self.slots.iter().all(|s| s.finished)
    }

    /// Tells every worker the job ahead of any round, so that each builds
    /// what a round needs (data, model, buckets) now, and waits (at most
    /// `limit`) until each has: a node that joins the rendezvous only then
    /// never makes a round wait for its workers to build (the stall a node
    /// joining mid-run caused). Workers that cannot build ahead (a GPU
    /// device) answer at once and build when assigned. Returns how many built.
    pub async fn prepare(&mut self, spec_json: &str, limit: Duration) -> usize {
        self.spec_json = Some(spec_json.to_string());
        let mut waiting = std::collections::BTreeSet::new();
        for (local_rank, slot) in self.slots.iter_mut().enumerate() {
            let Some(writer) = slot.writer.as_mut() else {
                continue;
            };
            let msg = prepare_message(&self.job, &self.cfg.run_dir, spec_json, local_rank);
            if writer.write_all(&frame::encode(&msg)).await.is_ok() {
                waiting.insert((local_rank, slot.generation));
            }
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut built = 0;
        while !waiting.is_empty() {
            let update = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(update)) => update,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        job = self.job,
                        "workers still preparing after {limit:?}: joining"
                    );
                    break;
                }
            };
            match update {
                Update::Report(
                    i,
                    g,
                    WorkerMessage {
                        kind: Some(Report::Prepared(p)),
                    },
                ) if waiting.remove(&(i, g)) => built += usize::from(p.built),
                // A worker that died meanwhile is replaced through `next`.
                Update::Exited(i, g, status) => {
                    waiting.remove(&(i, g));
                    self.held.push_back(Update::Exited(i, g, status));
                }
                other => self.held.push_back(other),
            }
        }
        built
    }

    /// Hands every live worker its part of a round (a worker in the middle of
    /// an older round aborts it and joins this one).
    pub async fn assign(&mut self, round: &RoundAssignment) -> Result<()> {
        self.spec_json = Some(round.spec_json.clone());
        self.first_rank = round.first_rank;
        self.world_size = round.world_size;
        for (local_rank, slot) in self.slots.iter_mut().enumerate() {
            if slot.dead || slot.finished {
                continue;
            }
            let Some(writer) = slot.writer.as_mut() else {
                continue;
            };
            slot.rank.set(round.first_rank + local_rank as u32);
            let msg = AgentMessage {
                kind: Some(agent_message::Kind::Assignment(round.assignment(
                    &self.job,
                    &self.cfg.run_dir,
                    local_rank,
                    true,
                ))),
            };
            if let Err(e) = writer.write_all(&frame::encode(&msg)).await {
                // It died; its exit arrives as an update.
                tracing::warn!(local_rank, "send assignment: {e}");
            }
        }
        Ok(())
    }

    /// Replaces a dead worker with a fresh process; its new collective
    /// endpoint goes into the node record, which opens a new round.
    pub async fn respawn(&mut self, local_rank: usize) -> Result<()> {
        let w = match self.take_spare(local_rank).await {
            Some(w) => w,
            None => {
                let mut started = start_workers(&self.cfg, &[local_rank], Role::Slot).await?;
                started
                    .pop()
                    .ok_or_else(|| Error::worker("a replacement worker"))?
            }
        };
        let slot = &mut self.slots[local_rank];
        slot.generation += 1;
        slot.endpoint = w.hello.ring_addr.clone();
        let a = attach(w, slot.generation, self.tx.clone());
        slot.pid = a.pid;
        slot.log = a.log;
        slot.rank = a.rank;
        slot.tail = a.tail;
        slot.writer = Some(a.writer);
        slot.killer = a.killer;
        slot.dead = false;
        slot.finished = false;
        slot.exited = false;
        tracing::info!(
            job = self.job,
            local_rank,
            pid = slot.pid,
            "worker replaced"
        );
        Ok(())
    }

    /// Starts a spare worker in the background (see [`Self::spare`]).
    /// It is told the job at once, to build what a round needs ahead of
    /// its slot (see `prepare_only` in proto/kiln/worker.proto).
    fn start_spare(&mut self) {
        let cfg = self.cfg.clone();
        let prepare = self
            .spec_json
            .as_deref()
            .map(|spec| prepare_message(&self.job, &cfg.run_dir, spec, cfg.nproc));
        self.spare = Some(tokio::spawn(async move {
            // Its lines go to a slot of their own until it is adopted.
            let mut started = start_workers(&cfg, &[cfg.nproc], Role::Spare).await?;
            let mut spare = started
                .pop()
                .ok_or_else(|| Error::worker("a spare worker"))?;
            if let Some(msg) = prepare {
                // A spare that died here is found out when it is taken.
                let _ = spare.writer.write_all(&frame::encode(&msg)).await;
            }
            Ok(spare)
        }));
    }

    /// The spare worker, made slot `local_rank`'s, if one started (waiting
    /// for it if it is still starting: it is nearer ready than a new one)
    /// and is still alive.
    async fn take_spare(&mut self, local_rank: usize) -> Option<WorkerHandle> {
        let mut w = match self.spare.take()?.await {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                tracing::warn!(job = self.job, "the spare worker did not start: {e:#}");
                return None;
            }
            Err(e) => {
                tracing::warn!(job = self.job, "the spare worker's start: {e}");
                return None;
            }
        };
        if !matches!(w.child.try_wait(), Ok(None)) {
            tracing::warn!(job = self.job, pid = w.pid, "the spare worker has died");
            return None;
        }
        w.local_rank = local_rank;
        w.log = worker_log(&self.cfg, local_rank);
        w.capture.set_local_rank(local_rank);
        tracing::debug!(
            job = self.job,
            local_rank,
            pid = w.pid,
            "spare worker adopted"
        );
        Some(w)
    }

    /// Stops the spare worker, if any (dropping its handle kills it).
    fn drop_spare(&mut self) {
        if let Some(task) = self.spare.take() {
            task.abort();
        }
    }

    /// Kills every worker and waits for them to exit (at most a few seconds).
    pub async fn kill_all(&mut self) {
        self.drop_spare();
        for slot in &self.slots {
            let _ = slot.killer.try_send(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.slots.iter().any(|s| !s.dead && !s.finished) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Update::Exited(i, generation, _))) => {
                    if self.slots[i].generation == generation {
                        self.slots[i].dead = true;
                        self.slots[i].exited = true;
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }

    /// Stops the workers the way a finished job does: closes their channels,
    /// waits up to `grace` for them to exit with their last lines drained to
    /// the log sink, then kills what is left.
    pub async fn close(&mut self, grace: Duration) {
        self.drop_spare();
        for slot in &mut self.slots {
            slot.writer = None;
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.slots.iter().any(|s| !s.exited) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Update::Exited(i, generation, _))) => {
                    if self.slots[i].generation == generation {
                        self.slots[i].exited = true;
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        if self.slots.iter().any(|s| !s.exited) {
            self.kill_all().await;
        }
    }

    /// The next thing a worker did. Never returns `None` while a worker lives.
    pub async fn next(&mut self) -> Option<ElasticUpdate> {
        loop {
            let update = match self.held.pop_front() {
                Some(held) => held,
                None => self.rx.recv().await?,
            };
            if let Some(u) = self.apply(update) {
                if matches!(u, ElasticUpdate::RoundStarted { .. }) && self.spare.is_none() {
                    // Once this node trains: a process start (a libtorch load)
                    // during a recovery would take the cores it needs.
                    self.start_spare();
                }
                return Some(u);
            }
        }
    }

    fn apply(&mut self, update: Update) -> Option<ElasticUpdate> {
        let rank = |first: u32, i: usize| first + i as u32;
        match update {
            Update::Report(i, g, WorkerMessage { kind: Some(kind) })
                if self.slots[i].generation == g =>
            {
                let r = rank(self.first_rank, i);
                Some(match kind {
                    Report::Progress(p) => {
                        if i == 0 {
                            self.metrics.step.set(p.step as i64);
                            self.metrics.loss.set(p.loss);
                            self.metrics.learning_rate.set(p.lr);
                            if p.grad_norm.is_finite() {
                                self.metrics.grad_norm.set(p.grad_norm);
                            }
                            self.metrics.step_seconds.observe(p.step_seconds);
                            if p.step_seconds > 0.0 {
                                self.metrics.samples_per_second.set(
                                    p.samples as f64 * self.world_size as f64 / p.step_seconds,
                                );
                            }
                        }
                        self.metrics.samples.inc_by(p.samples);
                        self.metrics.allreduce_seconds.inc_by(p.allreduce_seconds);
                        self.metrics.allreduce_bytes.inc_by(p.allreduce_bytes);
                        ElasticUpdate::Event(AgentEvent::Progress {
                            rank: r,
                            progress: p,
                        })
                    }
                    Report::Eval(eval) => ElasticUpdate::Event(AgentEvent::Eval { rank: r, eval }),
                    Report::Checkpoint(saved) => {
                        if r == 0 {
                            self.metrics.checkpoint_committed(&saved);
                        }
                        ElasticUpdate::Event(AgentEvent::Checkpoint { rank: r, saved })
                    }
                    Report::Warning(w) => ElasticUpdate::Event(AgentEvent::Warning {
                        rank: r,
                        message: w.message,
                    }),
                    Report::RoundStarted(started) => {
                        ElasticUpdate::RoundStarted { rank: r, started }
                    }
                    Report::Interrupted(interrupted) => ElasticUpdate::Interrupted {
                        rank: r,
                        interrupted,
                    },
                    Report::Finished(finished) => {
                        self.slots[i].finished = true;
                        ElasticUpdate::Finished { rank: r, finished }
                    }
                    Report::Failed(f) => ElasticUpdate::Failed {
                        rank: r,
                        message: format!(
                            "worker rank {r} (pid {}) failed: {}",
                            self.slots[i].pid, f.error
                        ),
                    },
                    Report::Hello(_) => ElasticUpdate::Failed {
                        rank: r,
                        message: format!("worker rank {r} said hello twice"),
                    },
                    // A spare's answer to being prepared, read once adopted.
                    Report::Prepared(_) => return None,
                })
            }
            Update::Closed(i, g, Some(error)) if self.slots[i].generation == g => {
                tracing::warn!(
                    job = self.job,
                    local_rank = i,
                    "worker channel failed: {error}"
                );
                None
            }
            Update::Report(..) | Update::Closed(..) => None,
            Update::Exited(i, g, status) if self.slots[i].generation == g => {
                let slot = &mut self.slots[i];
                slot.writer = None;
                slot.exited = true;
                if slot.finished && status.success() {
                    return None;
                }
                slot.dead = true;
                let r = rank(self.first_rank, i);
                let failure = Failure::exited(r, slot.pid, status, &slot.log, &slot.tail);
                Some(ElasticUpdate::Died {
                    local_rank: i,
                    message: failure.message,
                })
            }
            Update::Exited(..) => None,
        }
    }
}

/// Starts the workers of `local_ranks` and waits for each one's hello.
///
/// Each worker talks to the agent over its own end of a socket pair that it
/// inherits as a file descriptor (`--agent-fd`): nothing is bound where
/// another local process could connect and pose as a worker, and a worker's
/// hello is only believed when its pid is the child's.
/// The assignment that tells a worker the job ahead of any round
/// (`prepare_only`: no round, no peers, no secret; the worker builds what a
/// round needs from the spec and waits).
fn prepare_message(job: &str, run_dir: &Path, spec_json: &str, local_rank: usize) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Assignment(Assignment {
            job: job.to_string(),
            spec_json: spec_json.to_string(),
            run_dir: run_dir.display().to_string(),
            local_rank: local_rank as u32,
            elastic: true,
            prepare_only: true,
            ..Assignment::default()
        })),
    }
}

/// Whether a worker is started for its slot or as a spare (see
/// [`ElasticWorkers`]): a spare names itself `kiln-spare` (`/proc/PID/comm`)
/// until it is assigned a slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Slot,
    Spare,
}

/// The environment variable that tells `kiln worker` it starts as a spare.
pub const SPARE_ENV: &str = "KILN_WORKER_SPARE";

/// Where the node's log sink writes slot `local_rank`'s lines.
fn worker_log(cfg: &AgentConfig, local_rank: usize) -> PathBuf {
    cfg.run_dir
        .join("logs")
        .join(format!("worker-{local_rank}.log"))
}

async fn start_workers(
    cfg: &AgentConfig,
    local_ranks: &[usize],
    role: Role,
) -> Result<Vec<WorkerHandle>> {
    let mut children = Vec::with_capacity(local_ranks.len());
    let mut channels = Vec::with_capacity(local_ranks.len());
    for &local_rank in local_ranks {
        let log = worker_log(cfg, local_rank);
        let (out_reader, out) = std::io::pipe().context("create the worker's stdout pipe")?;
        let (err_reader, err) = std::io::pipe().context("create the worker's stderr pipe")?;
        // Both ends are close-on-exec; the child clears it on its own end.
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().context("create the worker's socket pair")?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&cfg.kiln_exe);
        if role == Role::Spare {
            cmd.env(SPARE_ENV, "1");
        }
        cmd.arg("worker")
            .arg("--agent-fd")
            .arg(fd.to_string())
            .arg("--local-rank")
            .arg(local_rank.to_string())
            .env("KILN_BIND_HOST", &cfg.bind_host)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        // SAFETY: prctl and fcntl are async-signal-safe. PR_SET_PDEATHSIG makes
        // the kernel SIGKILL the worker if this process dies, so no worker
        // outlives its agent; clearing FD_CLOEXEC on the worker's end of the
        // pair (and only that descriptor) lets it survive the exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "start worker {local_rank} ({} worker)",
                cfg.kiln_exe.display()
            )
        })?;
        // The child holds its ends now.
        drop(theirs);
        drop(cmd);
        let capture = Capture::start(local_rank, out_reader, err_reader, &cfg.log_sink);
        ours.set_nonblocking(true)
            .context("worker channel non-blocking")?;
        let stream = tokio::net::UnixStream::from_std(ours).context("worker channel")?;
        children.push(Some((local_rank, child, log, capture)));
        channels.push(stream);
    }

    let deadline = tokio::time::Instant::now() + cfg.start_timeout;
    let mut pending: Vec<Option<(Hello, OwnedReadHalf, OwnedWriteHalf)>> =
        Vec::with_capacity(local_ranks.len());
    for ((slot, stream), &expected) in children.iter_mut().zip(channels).zip(local_ranks) {
        let (i, child, log, capture) = slot.as_mut().expect("started above");
        let (mut reader, writer) = stream.into_split();
        // A worker that dies before saying hello is an error now, not a timeout later.
        let hello = tokio::select! {
            read = tokio::time::timeout_at(deadline, read_frame::<WorkerMessage>(&mut reader)) => match read {
                Ok(Ok(Some(WorkerMessage {
                    kind: Some(Report::Hello(h)),
                }))) => h,
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let status = child.wait().await.context("wait for worker")?;
                    capture.drained().await;
                    return Err(Error::worker(format!(
                        "worker {i} exited during start-up ({status}){}",
                        capture.tail_handle().describe(log)
                    )));
                }
                Ok(other) => {
                    return Err(Error::worker(format!(
                        "expected a hello from worker {i}, got {other:?}"
                    )));
                }
                Err(_) => return Err(Error::worker(format!(
                    "worker {i} said no hello within {:?}{}",
                    cfg.start_timeout,
                    capture.tail_handle().describe(log)
                ))),
            },
            status = child.wait() => {
                let status = status.context("wait for worker")?;
                capture.drained().await;
                return Err(Error::worker(format!(
                    "worker {i} exited during start-up ({status}){}",
                    capture.tail_handle().describe(log)
                )));
            }
        };
        if hello.local_rank as usize != expected || Some(hello.pid) != child.id() {
            return Err(Error::worker(format!(
                "worker {i}'s channel said hello as local rank {} pid {}; expected local rank {expected} pid {:?}",
                hello.local_rank,
                hello.pid,
                child.id()
            )));
        }
        pending.push(Some((hello, reader, writer)));
    }
    Ok(pending
        .into_iter()
        .zip(children)
        .map(|(conn, child)| {
            let (hello, reader, writer) = conn.expect("every local rank said hello");
            let (local_rank, child, log, capture) = child.expect("every worker was started");
            WorkerHandle {
                local_rank,
                pid: hello.pid,
                child,
                hello,
                reader,
                writer,
                log,
                capture,
            }
        })
        .collect())
}

/// A worker failure, ranked so that the root cause is reported, not its echoes.
struct Failure {
    rank: u32,
    pid: u32,
    message: String,
    /// 0: died without reporting (killed, crashed); 1: reported its own error;
    /// 2: reported that a peer went away (an echo of someone else's failure).
    class: u8,
}

impl Failure {
    fn reported(rank: u32, pid: u32, error: String) -> Self {
        let echo = error.contains("closed the connection") || error.contains("collective aborted");
        Self {
            rank,
            pid,
            message: format!("worker rank {rank} (pid {pid}) failed: {error}"),
            class: if echo { 2 } else { 1 },
        }
    }

    fn exited(
        rank: u32,
        pid: u32,
        status: std::process::ExitStatus,
        log: &Path,
        tail: &TailHandle,
    ) -> Self {
        use std::os::unix::process::ExitStatusExt;
        let how = match (status.code(), status.signal()) {
            (_, Some(sig)) => format!("was killed by signal {sig}{}", signal_name(sig)),
            (Some(code), _) => format!("exited with status {code}"),
            _ => format!("ended ({status})"),
        };
        let class = if status.signal().is_some() { 0 } else { 3 };
        Self {
            rank,
            pid,
            message: format!("worker rank {rank} (pid {pid}) {how}{}", tail.describe(log)),
            class,
        }
    }

    fn severity(&self) -> u8 {
        self.class
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGBUS => " (SIGBUS)",
        _ => "",
    }
}

async fn read_frame<M: Message + Default>(r: &mut OwnedReadHalf) -> std::io::Result<Option<M>> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; frame::decode_len(header)?];
    r.read_exact(&mut body).await?;
    M::decode(body.as_slice())
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

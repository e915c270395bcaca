//! The dashboard's metrics history of a job, recorded while it trains
//! (`kiln_ui::Recorder`): [`RunFeed`] for `kiln run` (the store and the run
//! folder, kept after the process ends) and [`AgentHistory`] for `kiln agent`
//! (the node of rank 0 records into the store; when rank 0 moves to another
//! node, that node continues it). docs/ui.md is the dashboard's guide.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::status::{self, Phase};
use kiln_coordinator::store::Store;
use kiln_proto::worker::RoundStarted;
use kiln_trainer::agent::{AgentEvent, ElasticUpdate};
use kiln_ui::history::{CheckpointMark, EvalMark, RoundMark, Sample};
use kiln_ui::recorder::extra;
use kiln_ui::{Record, Recorder, RecorderConfig};

use crate::LOCAL_NODE;

/// How often `kiln run` writes the history (its store is in memory).
const RUN_FLUSH: Duration = Duration::from_secs(1);

/// How often an agent writes the history to etcd.
const AGENT_FLUSH: Duration = Duration::from_secs(5);

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What an agent event adds to the history (rank 0's events only).
fn record_of(event: &AgentEvent, global_batch: usize) -> Option<Record> {
    let at = unix_now();
    match event {
        AgentEvent::Progress { rank: 0, progress } => Some(Record::Progress(
            Sample::from_progress(progress, global_batch, at),
        )),
        AgentEvent::Eval { rank: 0, eval } => Some(Record::Eval(EvalMark {
            step: eval.step,
            at,
            metrics: eval.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        })),
        AgentEvent::Checkpoint { rank: 0, saved } => Some(Record::Checkpoint(CheckpointMark {
            step: saved.step,
            url: saved.url.clone(),
            at,
            bytes_uploaded: saved.bytes_uploaded,
            bytes_reused: saved.bytes_reused,
            blocking_seconds: saved.blocking_seconds,
            durable_seconds: saved.durable_seconds,
            codec: saved.codec.clone(),
        })),
        _ => None,
    }
}

fn round_mark(started: &RoundStarted) -> RoundMark {
    RoundMark {
        round: started.round,
        world_size: started.world_size,
        step: started.step,
        at: unix_now(),
        setup_seconds: started.setup_seconds,
        state_source: match started.state_source {
            s if s < 0 => "checkpoint or fresh".to_string(),
            s => format!("rank {s}"),
        },
    }
}

/// Where a job records its history: the store, and for `kiln run` its run
/// folder too.
pub struct HistoryTarget<'a> {
    /// The job's store (the history goes under its keys).
    pub store: &'a Arc<dyn Store>,
    /// Its keyspace.
    pub ks: &'a Keyspace,
    /// The job.
    pub job: &'a str,
    /// The job's checkpoint location, for the dashboard's Checkpoints page.
    pub checkpoint_root: &'a str,
    /// The registry the job registers its model in, if it does.
    pub registry: Option<String>,
}

impl HistoryTarget<'_> {
    async fn recorder(&self, run_dir: Option<PathBuf>, flush_every: Duration) -> Recorder {
        Recorder::start(RecorderConfig {
            job: self.job.to_string(),
            store: self.store.clone(),
            ks: self.ks.clone(),
            run_dir,
            flush_every,
            checkpoint_root: Some(self.checkpoint_root.to_string()),
            registry: self.registry.clone(),
        })
        .await
    }
}

/// `kiln run`'s side: the job's status in its embedded store (the dashboard's
/// Jobs page) and its history, kept in the run folder after the process ends.
pub struct RunFeed {
    recorder: Recorder,
    global_batch: usize,
    round: u64,
    world_size: u32,
    assigned: Instant,
    seen_step: bool,
}

impl RunFeed {
    /// Marks the job running in its round and starts the history.
    pub async fn start(
        target: HistoryTarget<'_>,
        run_dir: &Path,
        global_batch: usize,
        total_steps: u64,
        round: u64,
        world_size: u32,
    ) -> RunFeed {
        let result = status::update(&**target.store, target.ks, target.job, |s| {
            s.round = round;
            s.world_size = world_size;
            s.total_steps = total_steps;
            s.set_phase(Phase::Running);
            s.extra
                .insert(extra::RUNNER.into(), extra::RUNNER_KILN_RUN.into());
            s.push_event(
                "round",
                LOCAL_NODE,
                format!("round {round}: world size {world_size}"),
            );
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(job = target.job, "record the job status: {e}");
        }
        RunFeed {
            recorder: target
                .recorder(Some(run_dir.to_path_buf()), RUN_FLUSH)
                .await,
            global_batch,
            round,
            world_size,
            assigned: Instant::now(),
            seen_step: false,
        }
    }

    /// Records what a worker event adds (rank 0's progress, evals and
    /// checkpoints; the round's start at the first step).
    pub fn on_event(&mut self, event: &AgentEvent) {
        if let AgentEvent::Progress { rank: 0, progress } = event
            && !self.seen_step
        {
            // `kiln run` has one round; its start is the first step's.
            self.seen_step = true;
            self.recorder
                .record(Record::Round(round_mark(&RoundStarted {
                    round: self.round,
                    world_size: self.world_size,
                    step: progress.step.saturating_sub(1),
                    state_source: -1,
                    setup_seconds: self.assigned.elapsed().as_secs_f64(),
                })));
        }
        if let Some(record) = record_of(event, self.global_batch) {
            self.recorder.record(record);
        }
    }

    /// Writes the history one last time.
    pub async fn finish(self) {
        self.recorder.finish().await;
    }
}

/// Records the end of a `kiln run` job in its store and its run folder
/// (`status.json`, which `kiln ui --data-dir` reads after the process ended).
pub async fn record_run_end(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
    run_dir: &Path,
    error: Option<String>,
) {
    let result = status::update(store, ks, job, |s| match &error {
        None => {
            s.set_phase(Phase::Succeeded);
            s.push_event("finished", LOCAL_NODE, "all steps done");
        }
        Some(message) => {
            s.set_phase(Phase::Failed);
            s.message = message.clone();
            s.push_event("failed", LOCAL_NODE, message.clone());
        }
    })
    .await;
    if let Err(e) = result {
        tracing::warn!(job, "record the end of the job: {e}");
        return;
    }
    if let Err(e) = kiln_ui::recorder::save_status(store, ks, job, run_dir).await {
        tracing::warn!(job, "{e}");
    }
}

/// `kiln agent`'s side: the node that runs rank 0 records the job's history
/// in the store; when rank 0 moves to another node, that node continues it.
pub struct AgentHistory {
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: String,
    checkpoint_root: String,
    registry: Option<String>,
    global_batch: usize,
    recorder: Option<Recorder>,
}

impl AgentHistory {
    /// A node's history of the job `target`, recording nothing until this
    /// node holds rank 0 ([`AgentHistory::on_round`]).
    pub fn new(target: HistoryTarget<'_>, global_batch: usize) -> AgentHistory {
        AgentHistory {
            store: target.store.clone(),
            ks: target.ks.clone(),
            job: target.job.to_string(),
            checkpoint_root: target.checkpoint_root.to_string(),
            registry: target.registry,
            global_batch,
            recorder: None,
        }
    }

    /// A new round: record while this node holds rank 0.
    pub async fn on_round(&mut self, first_rank: u32) {
        match (&self.recorder, first_rank == 0) {
            (None, true) => {
                let target = HistoryTarget {
                    store: &self.store,
                    ks: &self.ks,
                    job: &self.job,
                    checkpoint_root: &self.checkpoint_root,
                    registry: self.registry.clone(),
                };
                self.recorder = Some(target.recorder(None, AGENT_FLUSH).await);
            }
            (Some(_), false) => {
                if let Some(r) = self.recorder.take() {
                    r.finish().await;
                }
            }
            _ => {}
        }
    }

    /// Records what a worker's update adds, while this node holds rank 0.
    pub fn on_update(&self, update: &ElasticUpdate) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        match update {
            ElasticUpdate::Event(event) => {
                if let Some(record) = record_of(event, self.global_batch) {
                    recorder.record(record);
                }
            }
            ElasticUpdate::RoundStarted { rank: 0, started } => {
                recorder.record(Record::Round(round_mark(started)))
            }
            _ => {}
        }
    }

    /// Writes the history one last time.
    pub async fn finish(self) {
        if let Some(r) = self.recorder {
            r.finish().await;
        }
    }
}

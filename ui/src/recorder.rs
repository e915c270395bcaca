//! Keeping a job's [`JobHistory`] where the dashboard reads it, during the
//! job and after it: in the store at `jobs/{job}/history` (every job) and in
//! the run folder as `history.json` (`kiln run`, whose store lives only as
//! long as the process).
//!
//! The agent hands each event to [`Recorder::record`], which never blocks
//! (the training loop's relay must not wait on the store); a background task
//! folds events into the history and writes it at most once per
//! [`RecorderConfig::flush_every`], and once more when the job ends
//! ([`Recorder::finish`]). A recorder that starts while the store already
//! holds a history (this node took over rank 0 after a round change)
//! continues it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::status;
use kiln_coordinator::store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::history::{CheckpointMark, EvalMark, JobHistory, RoundMark, Sample};

/// Events buffered between the agent and the recorder's task; beyond this a
/// progress sample is dropped (the history is a downsampled view anyway).
const QUEUE: usize = 4096;

/// The store key of a job's history: `jobs/{job}/history`, beside its status.
pub fn history_key(ks: &Keyspace, job: &str) -> String {
    format!("{}history", ks.job_prefix(job))
}

/// The file name of the history in a run folder.
pub const HISTORY_FILE: &str = "history.json";

/// The file name of the final job status in a run folder (`kiln run`).
pub const STATUS_FILE: &str = "status.json";

/// Status fields the recorder adds through [`status::JobStatus::extra`].
pub mod extra {
    /// Global samples per second at the last recorded step.
    pub const THROUGHPUT: &str = "throughput";
    /// The job's checkpoint root URL, so the dashboard can list its checkpoints.
    pub const CHECKPOINT_ROOT: &str = "checkpoint_root";
    /// The registry the job registers its model in, when it does.
    pub const REGISTRY: &str = "registry";
    /// What runs the job: [`RUNNER_KILN_RUN`], or absent (agents).
    pub const RUNNER: &str = "runner";
    /// A `kiln run` process (its store lives inside it; it stops with Ctrl-C).
    pub const RUNNER_KILN_RUN: &str = "kiln run";
}

/// One thing to add to the history.
#[derive(Debug, Clone)]
pub enum Record {
    /// A training step, into the downsampled series.
    Progress(Sample),
    /// A held-out evaluation.
    Eval(EvalMark),
    /// A round the workers started.
    Round(RoundMark),
    /// A committed checkpoint.
    Checkpoint(CheckpointMark),
}

/// Where and how often a [`Recorder`] writes.
#[derive(Clone)]
pub struct RecorderConfig {
    /// The job whose history this is.
    pub job: String,
    /// The store the history (and the status fields in [`extra`]) go to.
    pub store: Arc<dyn Store>,
    /// The job's keyspace in that store.
    pub ks: Keyspace,
    /// The run folder to write `history.json` into, if any.
    pub run_dir: Option<PathBuf>,
    /// Least time between two writes of the history.
    pub flush_every: Duration,
    /// Recorded in the status for the dashboard ([`extra::CHECKPOINT_ROOT`]).
    pub checkpoint_root: Option<String>,
    /// Recorded in the status for the dashboard ([`extra::REGISTRY`]).
    pub registry: Option<String>,
}

/// The agent's handle on the history task.
#[derive(Debug)]
pub struct Recorder {
    tx: mpsc::Sender<Record>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<JobHistory>,
}

impl Recorder {
    /// Starts the task, continuing the history the store holds for the job.
    pub async fn start(cfg: RecorderConfig) -> Recorder {
        let key = history_key(&cfg.ks, &cfg.job);
        let history = match cfg.store.get(&key).await {
            Ok(Some(kv)) => match serde_json::from_slice::<JobHistory>(&kv.value) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(
                        job = cfg.job,
                        "stored history unreadable, starting anew: {e}"
                    );
                    JobHistory::new(&cfg.job)
                }
            },
            Ok(None) => JobHistory::new(&cfg.job),
            Err(e) => {
                tracing::warn!(job = cfg.job, "read the stored history: {e}");
                JobHistory::new(&cfg.job)
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(cfg, history, rx, stop.clone()));
        Recorder { tx, stop, task }
    }

    /// Queues an event; never waits. Progress beyond the queue is dropped.
    pub fn record(&self, record: Record) {
        if let Err(mpsc::error::TrySendError::Full(r)) = self.tx.try_send(record) {
            tracing::debug!("history queue full: {r:?} dropped");
        }
    }

    /// Writes what was recorded and stops; returns the final history.
    pub async fn finish(self) -> Option<JobHistory> {
        self.stop.cancel();
        drop(self.tx);
        self.task.await.ok()
    }
}

async fn run(
    cfg: RecorderConfig,
    mut history: JobHistory,
    mut rx: mpsc::Receiver<Record>,
    stop: CancellationToken,
) -> JobHistory {
    let mut tick = tokio::time::interval(cfg.flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    loop {
        tokio::select! {
            record = rx.recv() => match record {
                Some(r) => { apply(&mut history, r); dirty = true; }
                None => break,
            },
            _ = tick.tick() => {
                if dirty {
                    flush(&cfg, &history).await;
                    dirty = false;
                }
            }
            _ = stop.cancelled() => {
                // Take what is already queued, then the final write.
                while let Ok(r) = rx.try_recv() {
                    apply(&mut history, r);
                }
                break;
            }
        }
    }
    flush(&cfg, &history).await;
    history
}

fn apply(history: &mut JobHistory, record: Record) {
    match record {
        Record::Progress(sample) => history.series.push(&sample),
        Record::Eval(mark) => history.push_eval(mark),
        Record::Round(mark) => history.push_round(mark),
        Record::Checkpoint(mark) => history.push_checkpoint(mark),
    }
}

/// Writes the history to the store and the run folder, and the latest
/// figures into the job's status. Failures are logged: the job goes on.
async fn flush(cfg: &RecorderConfig, history: &JobHistory) {
    let json = match serde_json::to_vec(history) {
        Ok(json) => json,
        Err(e) => {
            tracing::warn!(job = cfg.job, "serialize the history: {e}");
            return;
        }
    };
    if let Some(dir) = &cfg.run_dir
        && let Err(e) = write_atomically(&dir.join(HISTORY_FILE), &json)
    {
        tracing::warn!(job = cfg.job, "write the history to the run folder: {e}");
    }
    if let Err(e) = cfg
        .store
        .put(&history_key(&cfg.ks, &cfg.job), json, None)
        .await
    {
        tracing::warn!(job = cfg.job, "write the history to the store: {e}");
    }
    let last = history.series.last().map(|b| {
        (
            b.last_step,
            b.metrics.loss.map(|s| s.last),
            b.metrics.throughput.map(|s| s.last),
        )
    });
    let checkpoint = history.checkpoints.last().map(|c| (c.step, c.url.clone()));
    let result = status::update(&*cfg.store, &cfg.ks, &cfg.job, |s| {
        if let Some((step, loss, throughput)) = last
            && s.step <= step
        {
            s.step = step;
            if loss.is_some() {
                s.loss = loss;
            }
            if let Some(t) = throughput {
                s.extra.insert(extra::THROUGHPUT.into(), t.into());
            }
        }
        if let Some((step, url)) = &checkpoint
            && s.last_checkpoint.as_ref().is_none_or(|c| c.step < *step)
        {
            s.last_checkpoint = Some(status::CheckpointRef {
                url: url.clone(),
                step: *step,
            });
        }
        for (name, value) in [
            (extra::CHECKPOINT_ROOT, &cfg.checkpoint_root),
            (extra::REGISTRY, &cfg.registry),
        ] {
            if let Some(v) = value
                && s.extra.get(name).and_then(|x| x.as_str()) != Some(v.as_str())
            {
                s.extra.insert(name.into(), v.clone().into());
            }
        }
    })
    .await;
    if let Err(e) = result {
        tracing::warn!(job = cfg.job, "record progress in the job status: {e}");
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Writes the job's status as the store holds it to `run_dir/status.json`,
/// so `kiln ui --data-dir` shows a `kiln run` job after its process ended.
pub async fn save_status(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
    run_dir: &Path,
) -> Result<(), String> {
    let s = status::read(store, ks, job)
        .await
        .map_err(|e| format!("read the job status: {e}"))?
        .ok_or_else(|| format!("job {job} has no status"))?;
    write_atomically(&run_dir.join(STATUS_FILE), &s.to_json())
        .map_err(|e| format!("write {}: {e}", run_dir.join(STATUS_FILE).display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_coordinator::store::mem::MemStore;

    fn sample(step: u64) -> Sample {
        Sample {
            step,
            at: 1.0,
            loss: 1.0 / step as f64,
            lr: 0.01,
            throughput: 640.0,
            grad_norm: 2.0,
            allreduce_seconds: 0.001,
            step_seconds: 0.1,
        }
    }

    #[tokio::test]
    async fn writes_store_file_and_status_and_continues_a_stored_history() {
        let store: Arc<dyn Store> = MemStore::new();
        let ks = Keyspace::default();
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecorderConfig {
            job: "j".into(),
            store: store.clone(),
            ks: ks.clone(),
            run_dir: Some(dir.path().to_path_buf()),
            flush_every: Duration::from_secs(3600),
            checkpoint_root: Some("file:///tmp/ck".into()),
            registry: None,
        };
        let recorder = Recorder::start(cfg.clone()).await;
        for step in 1..=10 {
            recorder.record(Record::Progress(sample(step)));
        }
        recorder.record(Record::Checkpoint(CheckpointMark {
            step: 10,
            url: "file:///tmp/ck/manifests/10".into(),
            at: 1.0,
            bytes_uploaded: 5,
            bytes_reused: 7,
            blocking_seconds: 0.0,
            durable_seconds: 0.1,
            codec: "zstd".into(),
        }));
        let history = recorder.finish().await.unwrap();
        assert_eq!(history.series.last().unwrap().last_step, 10);

        let stored = store.get(&history_key(&ks, "j")).await.unwrap().unwrap();
        let stored: JobHistory = serde_json::from_slice(&stored.value).unwrap();
        assert_eq!(stored, history);
        let file: JobHistory =
            serde_json::from_slice(&std::fs::read(dir.path().join(HISTORY_FILE)).unwrap()).unwrap();
        assert_eq!(file, history);
        let s = status::read(&*store, &ks, "j").await.unwrap().unwrap();
        assert_eq!((s.step, s.loss), (10, Some(0.1)));
        assert_eq!(s.extra[extra::THROUGHPUT], 640.0);
        assert_eq!(s.extra[extra::CHECKPOINT_ROOT], "file:///tmp/ck");
        assert_eq!(s.last_checkpoint.unwrap().step, 10);

        // Another node takes over rank 0: its recorder continues the series.
        let recorder = Recorder::start(RecorderConfig {
            run_dir: None,
            ..cfg
        })
        .await;
        recorder.record(Record::Progress(sample(11)));
        let history = recorder.finish().await.unwrap();
        let counted: u64 = history.series.buckets().iter().map(|b| b.count).sum();
        assert_eq!(counted, 11);
        assert_eq!(history.checkpoints.len(), 1);

        save_status(&*store, &ks, "j", dir.path()).await.unwrap();
        let saved: status::JobStatus =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATUS_FILE)).unwrap()).unwrap();
        assert_eq!(saved.step, 11);
    }
}

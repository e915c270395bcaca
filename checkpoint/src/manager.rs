//! The training loop's checkpointer: the policy around a [`Checkpointer`].
//!
//! The loop asks [`CheckpointManager::is_due`] after each step and hands the
//! state to [`CheckpointManager::save`]; the manager owns when to save (the
//! interval and the final save), how many background failures in a row the
//! job tolerates, and retention: on rank 0, after every commit (on a thread of
//! its own, so a long job's checkpoints never pile up and the loop never
//! waits for a listing), and once more when the run ends. Background results come
//! back as [`SaveEvent`]s for the caller to report; the loop never needs to
//! know the save pipeline. torchtitan's `CheckpointManager` has the same
//! split.
//!
//! The ranks of a job save together, so they also hear of each other's
//! failures: the caller carries [`CheckpointManager::news`] of every rank
//! over its own channel (the trainer's collective) to
//! [`CheckpointManager::hear`], so that rank 0 never waits for a part that
//! will not come; at the end every rank's [`FinalSave`] goes to every rank
//! and [`CheckpointManager::conclude`] gives all of them one verdict (fail,
//! or go on with a warning when `required` is false).

use std::collections::BTreeMap;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gc::{GcReport, Retention, gc};
use crate::manifest::{CheckpointMeta, Manifest};
use crate::save::{Checkpointer, SaveConfig, SaveOutcome};
use crate::store::CheckpointRoot;
use crate::tensor::TensorView;

/// When to save, how many failures to ride out, what to keep.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPolicy {
    /// Save every this many steps (0: only the final save).
    pub interval: u64,
    /// Save at `total_steps`.
    pub final_checkpoint: bool,
    /// The step the run ends at.
    pub total_steps: u64,
    /// Background saves that may fail in a row before [`CheckpointManager`]
    /// gives up (at least 1).
    pub max_consecutive_failures: usize,
    /// Applied by rank 0 after each commit (in the background) and after
    /// the run's last save committed.
    pub retention: Retention,
    /// Saves of other runs may be writing chunks this recently: never collected.
    pub gc_grace: Duration,
    /// A final save that does not land fails the run (`true`), or the run
    /// ends without it, with a warning (`false`).
    pub required: bool,
}

/// How the warning of a run that ends without its final checkpoint begins
/// (`checkpoint.required = false`), for callers that single it out.
pub const MISSING_FINAL_CHECKPOINT: &str = "the final checkpoint did not land";

/// Once every other rank's saves are over, how much longer a commit waits
/// for a part that still cannot be read (a store showing a write late).
const SETTLED_GRACE: Duration = Duration::from_secs(5);

/// What one rank has to tell the others about its saves since it last did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SaveNews {
    /// Steps whose save failed on this rank, with the cause: no part of
    /// this rank will come for them.
    pub failed: Vec<(u64, String)>,
}

/// How the run's checkpoints ended on one rank (see
/// [`CheckpointManager::conclude`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalSave {
    /// The last checkpoint this run committed (rank 0).
    pub committed: Option<String>,
    /// Why the last checkpoint did not land (or the failure budget ran out).
    pub error: Option<String>,
}

/// The run's verdict on its checkpoints, the same on every rank.
#[derive(Debug, Clone, PartialEq)]
pub enum Conclusion {
    /// The last checkpoint landed (its URL, on rank 0), or none was due.
    Landed(Option<String>),
    /// It did not, and `checkpoint.required = false`: the run ends without
    /// it; the message says why, for a loud warning.
    Missing(String),
}

/// What happened to a background save, for the caller to report.
#[derive(Debug)]
pub enum SaveEvent {
    /// A save finished; `outcome.url` is set on the rank that committed it.
    Saved(SaveOutcome),
    /// A save failed; the job goes on while the failure budget lasts.
    Failed {
        /// What failed and why, for the log.
        message: String,
    },
    /// Retention could not be applied (the checkpoints are intact).
    RetentionFailed {
        /// What failed and why, for the log.
        message: String,
    },
}

/// See the module docs.
pub struct CheckpointManager {
    checkpointer: Checkpointer,
    policy: CheckpointPolicy,
    /// The attempt name saves go under (a broken elastic round's saves never
    /// mix with a later round's).
    attempt: String,
    meta: CheckpointMeta,
    rank: usize,
    failures: usize,
    last_saved: Option<u64>,
    /// The newest checkpoint this manager committed (step, URL); results may
    /// arrive out of step order.
    last_committed: Option<(u64, String)>,
    /// Saves that could not start here, not yet in [`Self::news`].
    unshared: Vec<(u64, String)>,
    /// Rank 0: a commit landed since retention last started.
    retention_due: bool,
    /// Rank 0: retention running in the background (one at a time).
    retention: Option<JoinHandle<Result<GcReport>>>,
}

impl CheckpointManager {
    /// The manager of `rank` of `world_size`: saves go under `root` with
    /// `cfg`, named by `attempt` and carrying `meta`; `policy` says when to
    /// save and what a failure costs. [`Error::Invalid`] for a failure budget
    /// of 0 or anything [`Checkpointer::new`] refuses.
    pub fn new(
        root: CheckpointRoot,
        cfg: SaveConfig,
        rank: usize,
        world_size: usize,
        attempt: String,
        meta: CheckpointMeta,
        policy: CheckpointPolicy,
    ) -> Result<Self> {
        if policy.max_consecutive_failures == 0 {
            return Err(Error::invalid(
                "max_consecutive_failures must be at least 1",
            ));
        }
        Ok(Self {
            checkpointer: Checkpointer::new(root, cfg, rank, world_size)?,
            policy,
            attempt,
            meta,
            rank,
            failures: 0,
            last_saved: None,
            last_committed: None,
            unshared: Vec::new(),
            retention_due: false,
            retention: None,
        })
    }

    /// Where it saves.
    pub fn root(&self) -> &CheckpointRoot {
        self.checkpointer.root()
    }

    /// The step last saved (or resumed from): it is not saved again.
    pub fn last_saved(&self) -> Option<u64> {
        self.last_saved
    }

    /// Carries the last saved step over from an earlier manager of this run.
    pub fn set_last_saved(&mut self, step: Option<u64>) {
        self.last_saved = step;
    }

    /// Readies the save pipeline for `tensors` (the training state, as it
    /// will be saved) so that the first save blocks the loop no longer than
    /// later ones: call it once the state is built, before training.
    /// Nothing is reserved when the policy never saves.
    pub fn reserve<'a>(&mut self, tensors: impl IntoIterator<Item = TensorView<'a>>) -> Result<()> {
        let p = &self.policy;
        if p.interval == 0 && !p.final_checkpoint {
            return Ok(());
        }
        let views: Vec<TensorView<'a>> = tensors.into_iter().collect();
        self.checkpointer.prepare(&views)
    }

    /// The run resumed from `manifest`: its chunks are referenced, not
    /// uploaded again, and its step is not saved again.
    pub fn resumed(&mut self, manifest: &Manifest) {
        self.checkpointer.set_parent(manifest);
        self.last_saved = Some(manifest.step);
    }

    /// Whether this policy ever saves (periodically or at the end).
    pub fn saves(&self) -> bool {
        self.policy.interval > 0 || self.policy.final_checkpoint
    }

    /// Whether the state after `step` completed steps should be saved.
    pub fn is_due(&self, step: u64) -> bool {
        let p = &self.policy;
        let periodic = p.interval > 0 && step.is_multiple_of(p.interval);
        let last = step == p.total_steps && p.final_checkpoint;
        (periodic || last) && self.last_saved != Some(step)
    }

    /// Starts a background save of `tensors` at `step` (blocks only while
    /// this rank's stripe is copied). A save that cannot start counts as a
    /// failure; past the budget the error is returned.
    pub fn save(
        &mut self,
        step: u64,
        tensors: &[TensorView<'_>],
        training_state: serde_json::Value,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<Vec<SaveEvent>> {
        if self.last_saved == Some(step) {
            return Ok(Vec::new());
        }
        let mut meta = self.meta.clone();
        meta.training_state = training_state;
        meta.metrics = metrics.clone();
        match self.checkpointer.save(step, &self.attempt, tensors, &meta) {
            Ok(()) => {
                self.last_saved = Some(step);
                Ok(Vec::new())
            }
            Err(e) => {
                let message = format!("checkpoint at step {step} could not start: {e}");
                self.unshared.push((step, message.clone()));
                self.failed(&message)?;
                Ok(vec![SaveEvent::Failed { message }])
            }
        }
    }

    /// Results of saves that finished since the last call. Past the failure
    /// budget, the error says how many failed and the last cause.
    pub fn poll(&mut self) -> Result<Vec<SaveEvent>> {
        let outcomes = self.checkpointer.poll();
        let mut events = self.account(outcomes)?;
        self.background_retention(&mut events);
        Ok(events)
    }

    /// Rank 0, between steps: reports retention that finished, and starts it
    /// again once a commit has landed since it last started. The collection
    /// follows the rules of [`crate::gc`], so saves still in flight (this
    /// run's, and any other writer's within `gc_grace`) lose nothing.
    fn background_retention(&mut self, events: &mut Vec<SaveEvent>) {
        if let Some(task) = self.retention.take_if(|task| task.is_finished()) {
            report_retention(task, events);
        }
        if !self.retention_due || self.retention.is_some() {
            return;
        }
        self.retention_due = false;
        let root = self.checkpointer.root().clone();
        let (retention, grace) = (self.policy.retention, self.policy.gc_grace);
        let spawned = std::thread::Builder::new()
            .name("kiln-retention".into())
            .spawn(move || gc(&root, &retention, grace, false));
        match spawned {
            Ok(task) => self.retention = Some(task),
            Err(e) => events.push(SaveEvent::RetentionFailed {
                message: format!("retention: start its thread: {e}"),
            }),
        }
    }

    /// Waits for every save in flight: the final checkpoint must land. Rank 0
    /// then applies retention. Returns the events and the last checkpoint
    /// this run committed (rank 0; `None` elsewhere or when nothing was saved).
    pub fn finish(&mut self) -> (Vec<SaveEvent>, Result<Option<String>>) {
        let outcomes = self.checkpointer.flush();
        let last_failed = outcomes
            .iter()
            .rev()
            .find_map(|o| o.as_ref().err())
            .map(|e| e.to_string());
        let mut events = match self.account(outcomes) {
            Ok(events) => events,
            Err(e) => return (Vec::new(), Err(e)),
        };
        if let Some(message) = last_failed {
            return (
                events,
                Err(Error::Conflict {
                    what: format!("the last checkpoint did not land: {message}"),
                }),
            );
        }
        if let Some(task) = self.retention.take() {
            report_retention(task, &mut events);
        }
        if self.rank == 0 && self.last_committed.is_some() {
            match gc(
                self.checkpointer.root(),
                &self.policy.retention,
                self.policy.gc_grace,
                false,
            ) {
                Ok(report) => tracing::info!(
                    deleted = report.manifests_deleted.len(),
                    freed = report.bytes_freed,
                    "retention applied"
                ),
                Err(e) => events.push(SaveEvent::RetentionFailed {
                    message: format!("retention: {e}"),
                }),
            }
        }
        (
            events,
            Ok(self.last_committed.as_ref().map(|(_, url)| url.clone())),
        )
    }

    /// This rank's failed saves since the last call, for the other ranks.
    pub fn news(&mut self) -> SaveNews {
        let mut failed = std::mem::take(&mut self.unshared);
        failed.extend(self.checkpointer.take_failed_steps());
        SaveNews { failed }
    }

    /// Every rank's [`SaveNews`] (indexed by rank): commits here stop
    /// waiting for parts that will not come. `settled`: every other rank has
    /// finished all its saves (it called [`Self::finish`] before its news),
    /// so a part still missing is waited for only a few seconds more.
    pub fn hear(&mut self, news: &[SaveNews], settled: bool) {
        for (rank, n) in news.iter().enumerate() {
            if rank == self.rank {
                continue;
            }
            for (step, cause) in &n.failed {
                self.checkpointer.peer_failed(*step, rank, cause);
            }
        }
        if settled {
            self.checkpointer.peers_settled(SETTLED_GRACE);
        }
    }

    /// The run's verdict from every rank's [`FinalSave`] (what
    /// [`Self::finish`] returned there, in rank order): the same on every
    /// rank. A failure anywhere means the last checkpoint did not land
    /// (rank 0's cause first: it committed or failed last); with
    /// `required` that is an error, else [`Conclusion::Missing`].
    pub fn conclude(&self, all: &[FinalSave]) -> Result<Conclusion> {
        let failure = all
            .iter()
            .enumerate()
            .find_map(|(rank, f)| f.error.as_ref().map(|e| (rank, e)));
        let Some((rank, error)) = failure else {
            let committed = all.first().and_then(|f| f.committed.clone());
            return Ok(Conclusion::Landed(committed));
        };
        let cause = if all.len() > 1 {
            format!("on rank {rank}: {error}")
        } else {
            error.clone()
        };
        if self.policy.required {
            Err(Error::Conflict {
                what: format!("{MISSING_FINAL_CHECKPOINT} (checkpoint.required = true), {cause}"),
            })
        } else {
            Ok(Conclusion::Missing(format!(
                "{MISSING_FINAL_CHECKPOINT}; the run ends without it \
                 (checkpoint.required = false), {cause}"
            )))
        }
    }

    fn account(&mut self, outcomes: Vec<Result<SaveOutcome>>) -> Result<Vec<SaveEvent>> {
        let mut events = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome {
                Ok(o) => {
                    self.failures = 0;
                    if let Some(url) = &o.url
                        && self
                            .last_committed
                            .as_ref()
                            .is_none_or(|(step, _)| *step < o.step)
                    {
                        self.last_committed = Some((o.step, url.clone()));
                    }
                    if o.url.is_some() {
                        self.retention_due = true;
                    }
                    events.push(SaveEvent::Saved(o));
                }
                Err(e) => {
                    let message = format!("checkpoint save failed: {e}");
                    self.failed(&message)?;
                    events.push(SaveEvent::Failed { message });
                }
            }
        }
        Ok(events)
    }

    fn failed(&mut self, message: &str) -> Result<()> {
        self.failures += 1;
        tracing::warn!(failures = self.failures, "{message}");
        if self.failures >= self.policy.max_consecutive_failures {
            return Err(Error::Conflict {
                what: format!(
                    "{} checkpoint saves failed in a row (checkpoint.max_consecutive_failures = {}); last: {message}",
                    self.failures, self.policy.max_consecutive_failures
                ),
            });
        }
        Ok(())
    }
}

/// Waits for a background retention and reports how it went.
fn report_retention(task: JoinHandle<Result<GcReport>>, events: &mut Vec<SaveEvent>) {
    match task.join() {
        Ok(Ok(report)) => tracing::debug!(
            deleted = report.manifests_deleted.len(),
            freed = report.bytes_freed,
            "retention applied"
        ),
        Ok(Err(e)) => events.push(SaveEvent::RetentionFailed {
            message: format!("retention: {e}"),
        }),
        Err(_) => events.push(SaveEvent::RetentionFailed {
            message: "retention: its thread panicked".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(interval: u64, total: u64, final_checkpoint: bool) -> CheckpointManager {
        // Memory roots of one name share a store: one per test.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = CheckpointRoot::open(&format!("memory://manager-test-{n}/ckpt")).unwrap();
        let meta = CheckpointMeta::for_tests();
        let policy = CheckpointPolicy {
            interval,
            final_checkpoint,
            total_steps: total,
            max_consecutive_failures: 2,
            retention: Retention {
                keep_last: 1,
                keep_every: None,
            },
            gc_grace: Duration::ZERO,
            required: true,
        };
        CheckpointManager::new(
            root,
            SaveConfig::default(),
            0,
            1,
            "run".into(),
            meta,
            policy,
        )
        .unwrap()
    }

    #[test]
    fn saves_are_due_at_the_interval_and_the_end_but_never_twice() {
        let mut m = manager(4, 10, true);
        let due: Vec<u64> = (1..=10).filter(|&s| m.is_due(s)).collect();
        assert_eq!(due, [4, 8, 10]);
        m.set_last_saved(Some(8));
        assert!(!m.is_due(8), "a step already saved is not saved again");
        let m = manager(0, 10, false);
        assert!((1..=10).all(|s| !m.is_due(s)));
    }

    #[test]
    fn saves_commit_and_retention_keeps_the_newest() {
        let mut m = manager(1, 3, true);
        let data = vec![7u8; 64];
        let shape = [16usize];
        let view = TensorView {
            name: "model/w",
            dtype: crate::tensor::DType::F32,
            shape: &shape,
            data: &data,
        };
        for step in 1..=3 {
            assert!(m.is_due(step));
            m.save(
                step,
                &[view],
                serde_json::json!({ "step": step }),
                &BTreeMap::new(),
            )
            .unwrap();
        }
        let (events, last) = m.finish();
        let last = last.unwrap().expect("rank 0 committed");
        let latest = crate::resolve(m.root(), "latest").unwrap();
        assert_eq!(latest.step, 3);
        assert_eq!(last, m.root().url_of(&latest.key));
        let saved = events
            .iter()
            .filter(|e| matches!(e, SaveEvent::Saved(o) if o.url.is_some()))
            .count();
        assert!(saved >= 1, "{events:?}");
        assert_eq!(crate::list(m.root()).unwrap().len(), 1, "keep_last = 1");
    }

    #[test]
    fn retention_runs_after_each_commit_while_the_job_trains() {
        let mut m = manager(1, 100, false);
        let shape = [16usize];
        for step in 1..=6u64 {
            // Each step's state differs, so each checkpoint has chunks of its own.
            let data = vec![step as u8; 64];
            let view = TensorView {
                name: "model/w",
                dtype: crate::tensor::DType::F32,
                shape: &shape,
                data: &data,
            };
            m.save(
                step,
                &[view],
                serde_json::json!({ "step": step }),
                &BTreeMap::new(),
            )
            .unwrap();
            // Between steps, as the training loop does, until this save has
            // committed and the retention it started has finished.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let events = m.poll().unwrap();
                assert!(
                    !events
                        .iter()
                        .any(|e| matches!(e, SaveEvent::RetentionFailed { .. })),
                    "{events:?}"
                );
                let committed = m.last_committed.as_ref().is_some_and(|(s, _)| *s == step);
                if committed && !m.retention_due && m.retention.is_none() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "step {step} never settled"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let kept: Vec<Option<u64>> = crate::list(m.root())
                .unwrap()
                .iter()
                .map(|c| c.step)
                .collect();
            assert_eq!(
                kept,
                [Some(step)],
                "keep_last = 1 holds during training, at step {step}"
            );
        }
        let (_, last) = m.finish();
        assert!(last.unwrap().is_some());
        assert_eq!(crate::list(m.root()).unwrap().len(), 1);
    }
}

//! The job events (`[[hooks]]`, docs/hooks.md) a node sends for what its
//! workers report: the same mapping for `kiln run` (one node, one round) and
//! `kiln agent` (a node of an elastic job). The node of rank 0 speaks for the
//! job.

use std::time::Duration;

use anyhow::Context;
use kiln_coordinator::rendezvous::Plan;
use kiln_hooks::{Event, Hooks, event};
use kiln_proto::spec::JobSpec;
use kiln_proto::worker::Finished;
use kiln_trainer::agent::AgentEvent;

/// How long a finishing node waits for its events to be delivered.
pub const HOOK_FLUSH: Duration = Duration::from_secs(10);

/// A job's event sender: its `[[hooks]]` sinks and its name.
#[derive(Clone)]
pub struct JobEvents {
    hooks: Hooks,
    job: String,
}

impl JobEvents {
    /// The sinks of `spec`'s `[[hooks]]`, for the job `job`.
    pub fn new(spec: &JobSpec, job: &str) -> anyhow::Result<JobEvents> {
        Ok(JobEvents {
            hooks: Hooks::new(&spec.hooks).context("hooks")?,
            job: job.to_string(),
        })
    }

    /// The sinks, for events this module does not map (model registration).
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// `job.started`: the first round of a `kiln run` job.
    pub fn started(&self, round: u64, world_size: u32, resumed_from: Option<String>) {
        self.emit(&event::JobStarted {
            job: self.job.clone(),
            round,
            world_size,
            step: 0,
            resumed_from,
        });
    }

    /// `round.changed`: an elastic job's new round `plan`.
    pub fn round_changed(&self, plan: &Plan) {
        self.emit(&event::RoundChanged {
            job: self.job.clone(),
            round: plan.round,
            previous_round: None,
            world_size: plan.world_size,
            nodes: plan.members.iter().map(|m| m.node.clone()).collect(),
            reason: "membership changed".into(),
        });
    }

    /// What a worker's event adds: rank 0's committed checkpoints
    /// (`checkpoint.committed`), saved by a round of `world_size` ranks.
    pub fn on_worker_event(&self, worker_event: &AgentEvent, world_size: u32) {
        if let AgentEvent::Checkpoint { rank: 0, saved } = worker_event {
            self.emit(&event::CheckpointCommitted::from_saved(
                &self.job, world_size, saved,
            ));
        }
    }

    /// `job.finished`: rank 0 finished with `rank0`, `elapsed_secs` after the
    /// job started (0 where the node does not know).
    pub fn finished(&self, rank0: &Finished, elapsed_secs: f64) {
        self.emit(&event::JobFinished::from_rank0(
            &self.job,
            rank0,
            elapsed_secs,
        ));
    }

    /// `job.failed`: the job failed with `error` in `round`.
    pub fn failed(&self, error: &anyhow::Error, round: u64) {
        self.emit(&event::JobFailed::in_round(
            &self.job,
            format!("{error:#}"),
            round,
        ));
    }

    /// Waits (at most [`HOOK_FLUSH`]) for the events sent so far to be
    /// delivered.
    pub async fn flush(&self) {
        self.hooks.flush(HOOK_FLUSH).await;
    }

    fn emit<P: event::EventPayload>(&self, payload: &P) {
        self.hooks.emit(Event::of(&self.job, payload));
    }
}

//! The job record kept in the store at `jobs/{job}/status`, and the cancel
//! request at `jobs/{job}/cancel`.
//!
//! Several processes write one job's status: the job API (submit, cancel), the
//! coordinator replica that launches agents, and every agent of the job
//! (rounds, progress, checkpoints, node events, completion). They never
//! overwrite each other: [`update`] is a read-modify-write loop fenced by the
//! key's `mod_revision`, so a writer that lost a race reads again and applies
//! its change to the winner's record.
//!
//! The record is JSON. Fields this version does not know are kept through
//! updates ([`JobStatus::extra`]), so an older writer never erases what a newer
//! one added.
//!
//! Cancelling is a separate, create-only key: the API writes
//! [`request_cancel`]; agents notice it with [`watch_cancel`] (which resolves
//! at once when the request is already there), stop, and set the phase to
//! [`Phase::Cancelled`].

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keyspace::Keyspace;
use crate::store::{CasOutcome, Expect, KeyValue, Revision, Store, WatchEvent};

/// Node events kept in a status: the newest this many.
pub const MAX_EVENTS: usize = 200;

/// Attempts [`update`] makes before it gives up with [`Error::Conflict`]. Every
/// failed attempt means another writer succeeded, so this bounds only a writer
/// starved by a storm of others.
const MAX_UPDATE_ATTEMPTS: usize = 200;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted; no round has started yet.
    Pending,
    /// Training in a round.
    Running,
    /// Fewer than `elastic.min_nodes` nodes are present; the job waits for more.
    Waiting,
    /// Finished all its steps.
    Succeeded,
    /// Stopped by an error (restart budget spent, worker error, ...).
    Failed,
    /// Stopped by a cancel request.
    Cancelled,
}

impl Phase {
    /// Whether the job is over: succeeded, failed or cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }

    /// The lowercase name used in JSON and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Waiting => "waiting",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A committed checkpoint, as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRef {
    /// The checkpoint's manifest URL, as `kiln ckpt` and `resume` take it.
    pub url: String,
    /// The training step it holds.
    pub step: u64,
}

/// Something that happened to a node of the job, or to the job as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEvent {
    /// When, RFC 3339 in UTC.
    pub at: String,
    /// What: `joined`, `lost`, `round`, `failed`, `launched`, `cancel`, ...
    pub kind: String,
    /// The node it concerns; empty for job-wide events.
    #[serde(default)]
    pub node: String,
    /// Free text for people (`round 3: world size 4`, an error); may be empty.
    #[serde(default)]
    pub detail: String,
}

/// One agent process a coordinator started for the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchedAgent {
    /// The node name the agent was given (`--node`).
    pub node: String,
    /// Its process id on the launching host, once started.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Where its output goes.
    #[serde(default)]
    pub log: String,
}

/// A coordinator's claim to have launched the job's agents. It is written
/// before the agents start, with a compare-and-swap on the status, so that of
/// all coordinator replicas (and leadership terms) exactly one launches a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchRecord {
    /// The launch backend (`local`).
    pub backend: String,
    /// The coordinator replica that launched.
    pub by: String,
    /// When, RFC 3339 in UTC.
    pub at: String,
    /// One per agent, claimed before any starts; each `pid` is set once it has.
    #[serde(default)]
    pub agents: Vec<LaunchedAgent>,
}

/// The record at `jobs/{job}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job's name.
    pub job: String,
    /// Moved by [`JobStatus::set_phase`], which never leaves a terminal phase.
    pub phase: Phase,
    /// The current rendezvous round (0: none yet).
    #[serde(default)]
    pub round: u64,
    /// Ranks in the current round.
    #[serde(default)]
    pub world_size: u32,
    /// Last completed training step.
    #[serde(default)]
    pub step: u64,
    /// `train.steps` of the spec.
    #[serde(default)]
    pub total_steps: u64,
    /// Training loss at `step`, when reported.
    #[serde(default)]
    pub loss: Option<f64>,
    /// The newest checkpoint committed, once there is one.
    #[serde(default)]
    pub last_checkpoint: Option<CheckpointRef>,
    /// When the job was submitted; RFC 3339 in UTC, like every time here.
    #[serde(default)]
    pub submitted_at: Option<String>,
    /// When the job first moved to [`Phase::Running`].
    #[serde(default)]
    pub started_at: Option<String>,
    /// When the job reached a terminal phase.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// When the record last changed.
    #[serde(default)]
    pub updated_at: Option<String>,
    /// Set when a cancel was requested (the request itself is the cancel key).
    #[serde(default)]
    pub cancel_requested_at: Option<String>,
    /// A human line: why it failed, what it waits for.
    #[serde(default)]
    pub message: String,
    /// The newest [`MAX_EVENTS`] events, oldest first.
    #[serde(default)]
    pub events: Vec<NodeEvent>,
    /// Set when a coordinator launched the job's agents.
    #[serde(default)]
    pub launch: Option<LaunchRecord>,
    /// Fields written by a newer kiln, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl JobStatus {
    /// A fresh [`Phase::Pending`] record.
    pub fn new(job: &str) -> Self {
        JobStatus {
            job: job.to_string(),
            phase: Phase::Pending,
            round: 0,
            world_size: 0,
            step: 0,
            total_steps: 0,
            loss: None,
            last_checkpoint: None,
            submitted_at: None,
            started_at: None,
            finished_at: None,
            updated_at: None,
            cancel_requested_at: None,
            message: String::new(),
            events: Vec::new(),
            launch: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Moves to `phase` unless the job is already over (a finished job never
    /// comes back). Stamps `started_at` on the first move to
    /// [`Phase::Running`] and `finished_at` on the move to a terminal phase.
    /// Returns whether the phase is now `phase`.
    pub fn set_phase(&mut self, phase: Phase) -> bool {
        if self.phase == phase {
            return true;
        }
        if self.phase.is_terminal() {
            return false;
        }
        self.phase = phase;
        let now = now_rfc3339();
        if phase == Phase::Running && self.started_at.is_none() {
            self.started_at = Some(now.clone());
        }
        if phase.is_terminal() {
            self.finished_at = Some(now);
        }
        true
    }

    /// Appends an event stamped now, dropping the oldest beyond [`MAX_EVENTS`].
    pub fn push_event(&mut self, kind: &str, node: &str, detail: impl Into<String>) {
        self.events.push(NodeEvent {
            at: now_rfc3339(),
            kind: kind.to_string(),
            node: node.to_string(),
            detail: detail.into(),
        });
        if self.events.len() > MAX_EVENTS {
            let excess = self.events.len() - MAX_EVENTS;
            self.events.drain(..excess);
        }
    }

    /// The record as stored.
    pub fn to_json(&self) -> Vec<u8> {
        // Cannot fail: string keys only, and non-finite floats become null.
        serde_json::to_vec(self).expect("a job status serializes to json")
    }

    /// Reads a stored record; `key` names it in the error.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|error| Error::corrupt(key, error))
    }
}

/// Now, RFC 3339 in UTC with milliseconds (`2026-05-04T12:00:00.123Z`).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The job's status, or `None` when it has none.
pub async fn read(store: &dyn Store, ks: &Keyspace, job: &str) -> Result<Option<JobStatus>> {
    Ok(read_at(store, ks, job).await?.map(|(status, _)| status))
}

/// The job's status with the revision it was last written at.
pub async fn read_at(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
) -> Result<Option<(JobStatus, Revision)>> {
    let key = ks.job_status(job);
    match store.get(&key).await? {
        None => Ok(None),
        Some(kv) => Ok(Some((
            JobStatus::from_json(&key, &kv.value)?,
            kv.mod_revision,
        ))),
    }
}

/// Applies `f` to the job's status and writes it back, atomically with respect
/// to every other writer: the write is a compare-and-swap on the revision that
/// was read, and a lost race reads again and calls `f` again on the newer
/// record (so `f` must be a pure edit of the record it is given). A job with
/// no status starts from [`JobStatus::new`]. When `f` changes nothing, nothing
/// is written. Returns the record as stored.
pub async fn update(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
    mut f: impl FnMut(&mut JobStatus),
) -> Result<JobStatus> {
    crate::keyspace::validate_name("job", job)?;
    let key = ks.job_status(job);
    let mut current: Option<KeyValue> = store.get(&key).await?;
    for _ in 0..MAX_UPDATE_ATTEMPTS {
        let (before, expect) = match &current {
            None => (JobStatus::new(job), Expect::Absent),
            Some(kv) => (
                JobStatus::from_json(&key, &kv.value)?,
                Expect::ModRevision(kv.mod_revision),
            ),
        };
        let mut after = before.clone();
        f(&mut after);
        // The record names its job whatever the closure did.
        after.job = job.to_string();
        if current.is_some() && after == before {
            return Ok(after);
        }
        after.updated_at = Some(now_rfc3339());
        match store
            .compare_and_swap(&key, expect, after.to_json(), None)
            .await?
        {
            CasOutcome::Swapped { .. } => return Ok(after),
            CasOutcome::Failed { current: newer } => {
                current = newer;
                tokio::task::yield_now().await;
            }
        }
    }
    Err(Error::Conflict {
        message: format!(
            "status of job {job} changed under {MAX_UPDATE_ATTEMPTS} attempts in a row to update it"
        ),
    })
}

/// A request to cancel a job, stored at `jobs/{job}/cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// When, RFC 3339 in UTC.
    pub at: String,
    /// Who asked (a coordinator replica, a user), for the record.
    #[serde(default)]
    pub by: String,
    /// Why, as the requester gave it; may be empty.
    #[serde(default)]
    pub reason: String,
}

/// Records a cancel request for `job` with a create-only put. Returns the
/// request in force and whether this call made it (`false`: an earlier
/// request stands; the call is idempotent).
pub async fn request_cancel(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
    by: &str,
    reason: &str,
) -> Result<(CancelRequest, bool)> {
    crate::keyspace::validate_name("job", job)?;
    let key = ks.job_cancel(job);
    let request = CancelRequest {
        at: now_rfc3339(),
        by: by.to_string(),
        reason: reason.to_string(),
    };
    let bytes = serde_json::to_vec(&request).expect("a cancel request serializes to json");
    match store
        .compare_and_swap(&key, Expect::Absent, bytes, None)
        .await?
    {
        CasOutcome::Swapped { .. } => Ok((request, true)),
        CasOutcome::Failed {
            current: Some(current),
        } => Ok((parse_cancel(&key, &current.value)?, false)),
        // Deleted between the failed compare and now; nothing deletes cancel
        // keys, so report the race rather than loop.
        CasOutcome::Failed { current: None } => Err(Error::Conflict {
            message: format!("cancel key {key} changed while it was written"),
        }),
    }
}

/// The job's cancel request, if one was made.
pub async fn cancel_requested(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
) -> Result<Option<CancelRequest>> {
    let key = ks.job_cancel(job);
    match store.get(&key).await? {
        None => Ok(None),
        Some(kv) => parse_cancel(&key, &kv.value).map(Some),
    }
}

/// Resolves when the job has a cancel request: at once when it already has
/// one, otherwise when one is written. Follows the key with a store watch (no
/// polling) and re-lists when the watch falls behind compaction. Ends with an
/// error only when the store does. The future owns what it needs, so it can
/// be spawned or `select!`ed against the work it should stop.
pub fn watch_cancel(
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: impl Into<String>,
) -> impl Future<Output = Result<CancelRequest>> + Send + 'static {
    let job = job.into();
    async move {
        let key = ks.job_cancel(&job);
        follow_key(&*store, &key, "store closed the cancel watch", |value| {
            parse_cancel(&key, value).map(Some)
        })
        .await
    }
}

/// Resolves with the job's phase once it is terminal (another node saw the
/// job finish, fail or get cancelled): at once when it already is. Follows the
/// status with a store watch, like [`watch_cancel`]; ends with an error only
/// when the store does.
pub fn watch_terminal(
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: impl Into<String>,
) -> impl Future<Output = Result<Phase>> + Send + 'static {
    let job = job.into();
    async move {
        let key = ks.job_status(&job);
        follow_key(
            &*store,
            &key,
            "the store closed the status watch",
            |value| {
                let status = JobStatus::from_json(&key, value)?;
                Ok(status.phase.is_terminal().then_some(status.phase))
            },
        )
        .await
    }
}

/// Follows `key` until `found` makes something of its value: lists it, then
/// watches from the listing's revision (nothing written in between is
/// missed), and lists again when the watch falls behind compaction. `closed`
/// is the error when the store ends the watch.
async fn follow_key<T>(
    store: &dyn Store,
    key: &str,
    closed: &'static str,
    mut found: impl FnMut(&[u8]) -> Result<Option<T>>,
) -> Result<T> {
    loop {
        let (kvs, revision) = store.get_prefix(key).await?;
        if let Some(kv) = kvs.iter().find(|kv| kv.key == key)
            && let Some(value) = found(&kv.value)?
        {
            return Ok(value);
        }
        let mut watch = store.watch_prefix(key, Some(revision)).await?;
        loop {
            match watch.try_next().await {
                Ok(Some(WatchEvent::Put(kv))) if kv.key == key => {
                    if let Some(value) = found(&kv.value)? {
                        return Ok(value);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(Error::unavailable(closed)),
                Err(Error::Compacted { .. }) => break,
                Err(error) => return Err(error),
            }
        }
    }
}

fn parse_cancel(key: &str, bytes: &[u8]) -> Result<CancelRequest> {
    serde_json::from_slice(bytes).map_err(|error| Error::corrupt(key, error))
}

/// Runs a watch of the store (such as [`watch_cancel`] or [`watch_terminal`])
/// again after an outage (`Unavailable`) instead of failing: how long an
/// outage may last is the node lease's business
/// ([`join_riding_outages`](crate::membership::join_riding_outages)). `what`
/// names the watch in the log.
pub async fn riding_outages<T, F, Fut>(what: &'static str, mut watch: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    loop {
        match watch().await {
            Err(e @ Error::Unavailable { .. }) => {
                tracing::warn!("{what}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// [`update`] on a spawned task, for progress records that must not hold up
/// their caller's loop (a store outage would stall it for as long as a store
/// call retries). For edits that only ever move the status forward, so their
/// order does not matter; a failure is logged.
pub fn update_in_background(
    store: &Arc<dyn Store>,
    ks: &Keyspace,
    job: &str,
    edit: impl FnMut(&mut JobStatus) + Send + 'static,
) {
    let (store, ks, job) = (store.clone(), ks.clone(), job.to_string());
    tokio::spawn(async move {
        if let Err(e) = update(&*store, &ks, &job, edit).await {
            tracing::warn!(job, "record progress in the job status: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::mem::MemStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_updates_lose_nothing() {
        let store: Arc<dyn Store> = MemStore::new();
        let ks = Keyspace::default();
        let writers = 16;
        let per_writer = 25;
        let mut tasks = Vec::new();
        for writer in 0..writers {
            let store = store.clone();
            let ks = ks.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_writer {
                    update(&*store, &ks, "j", |s| {
                        s.step += 1;
                        s.push_event("progress", &format!("w{writer}"), format!("{i}"));
                    })
                    .await
                    .expect("update");
                }
            }));
        }
        for task in tasks {
            task.await.expect("writer task");
        }
        let status = read(&*store, &ks, "j")
            .await
            .unwrap()
            .expect("status exists");
        assert_eq!(status.step, writers * per_writer);
        assert_eq!(status.job, "j");
        assert_eq!(status.phase, Phase::Pending);
        // Every writer's events are there, in its own order.
        assert_eq!(status.events.len(), MAX_EVENTS);
        for writer in 0..writers {
            let node = format!("w{writer}");
            let mine: Vec<u64> = status
                .events
                .iter()
                .filter(|e| e.node == node)
                .map(|e| e.detail.parse().unwrap())
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{node}: {mine:?}");
        }
    }

    #[tokio::test]
    async fn unchanged_records_are_not_rewritten() {
        let store = MemStore::new();
        let ks = Keyspace::default();
        update(&*store, &ks, "j", |s| s.total_steps = 10)
            .await
            .unwrap();
        let revision = store.revision();
        let status = update(&*store, &ks, "j", |s| s.total_steps = 10)
            .await
            .unwrap();
        assert_eq!(store.revision(), revision);
        assert_eq!(status.total_steps, 10);
    }

    #[tokio::test]
    async fn terminal_phases_are_final() {
        let mut status = JobStatus::new("j");
        assert!(status.set_phase(Phase::Running));
        assert!(status.started_at.is_some());
        assert!(status.finished_at.is_none());
        assert!(status.set_phase(Phase::Cancelled));
        assert!(status.finished_at.is_some());
        assert!(!status.set_phase(Phase::Running));
        assert!(!status.set_phase(Phase::Succeeded));
        assert_eq!(status.phase, Phase::Cancelled);
    }

    #[tokio::test]
    async fn unknown_fields_survive_an_update() {
        let store = MemStore::new();
        let ks = Keyspace::default();
        let key = ks.job_status("j");
        store
            .put(
                &key,
                br#"{"job":"j","phase":"running","step":3,"gpu_hours":1.5}"#.to_vec(),
                None,
            )
            .await
            .unwrap();
        update(&*store, &ks, "j", |s| s.step = 4).await.unwrap();
        let stored: serde_json::Value =
            serde_json::from_slice(&store.get(&key).await.unwrap().unwrap().value).unwrap();
        assert_eq!(stored["step"], 4);
        assert_eq!(stored["gpu_hours"], 1.5);
        assert_eq!(stored["phase"], "running");
    }

    #[tokio::test]
    async fn corrupt_records_are_reported_not_overwritten() {
        let store = MemStore::new();
        let ks = Keyspace::default();
        let key = ks.job_status("j");
        store.put(&key, b"not json".to_vec(), None).await.unwrap();
        let error = update(&*store, &ks, "j", |s| s.step = 1).await.unwrap_err();
        assert!(matches!(error, Error::Corrupt { .. }), "{error}");
        assert_eq!(store.get(&key).await.unwrap().unwrap().value, b"not json");
    }

    #[tokio::test]
    async fn events_are_bounded() {
        let mut status = JobStatus::new("j");
        for i in 0..(MAX_EVENTS + 17) {
            status.push_event("round", "", i.to_string());
        }
        assert_eq!(status.events.len(), MAX_EVENTS);
        assert_eq!(status.events[0].detail, "17");
        assert_eq!(
            status.events.last().unwrap().detail,
            (MAX_EVENTS + 16).to_string()
        );
    }

    #[tokio::test]
    async fn cancel_requests_are_made_once_and_seen_by_watchers() {
        let store: Arc<dyn Store> = MemStore::new();
        let ks = Keyspace::default();
        let watcher = tokio::spawn(watch_cancel(store.clone(), ks.clone(), "j"));
        // The watcher must still be waiting: nothing was requested yet.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watcher.is_finished());
        assert_eq!(cancel_requested(&*store, &ks, "j").await.unwrap(), None);

        let (first, made) = request_cancel(&*store, &ks, "j", "alice", "wrong lr")
            .await
            .unwrap();
        assert!(made);
        let (again, made) = request_cancel(&*store, &ks, "j", "bob", "").await.unwrap();
        assert!(!made);
        assert_eq!(again, first);

        let seen = watcher.await.unwrap().unwrap();
        assert_eq!(seen, first);
        // A watch that starts after the request resolves at once.
        let late = watch_cancel(store.clone(), ks.clone(), "j").await.unwrap();
        assert_eq!(late.reason, "wrong lr");
        // Another job's request does not concern this one.
        let other = tokio::spawn(watch_cancel(store.clone(), ks.clone(), "j2"));
        request_cancel(&*store, &ks, "j2x", "", "").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!other.is_finished());
        other.abort();
    }
}

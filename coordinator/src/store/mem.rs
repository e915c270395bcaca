//! [`MemStore`]: the in-process [`Store`] of `kiln run` and of tests.
//!
//! One mutex guards the whole state; every operation is a short critical
//! section with no `await` inside, so the store is linearizable like etcd.
//! Writes append their events to a bounded history. Watchers pull from that
//! history (each watch is a small task that wakes when the revision moves), so
//! a slow watcher never blocks writers and never loses an event: it lags, and
//! only when it lags past the kept history does its watch end with
//! [`Error::Compacted`]. Lease deadlines run on tokio time (paused time in
//! tests works); a reaper task deletes the keys of expired leases, and every
//! operation first expires overdue leases, so no caller sees a lease alive
//! past its deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    CasOutcome, Expect, Fence, FencedOutcome, KeyValue, LeaseId, Revision, Store, WatchEvent,
    WatchStream,
};
use crate::error::{Error, Result};
use crate::store::check_key;

/// Events kept for watches from a past revision, by default.
pub const DEFAULT_HISTORY_LIMIT: usize = 100_000;

/// Events buffered per watch before the watcher task waits for its reader.
const WATCH_CHANNEL_CAPACITY: usize = 256;

/// An in-process [`Store`] with etcd's semantics.
pub struct MemStore {
    shared: Arc<Shared>,
    /// Ends the reaper and the watcher tasks when the store is dropped.
    shutdown: CancellationToken,
    /// The reaper is spawned on the first lease grant: `new()` may run outside
    /// a tokio runtime, a grant never does.
    reaper_started: AtomicBool,
}

struct Shared {
    state: Mutex<State>,
    /// The current revision, for watcher tasks to wake on.
    revision: watch::Sender<Revision>,
    /// Wakes the reaper when a lease with an earlier deadline appears.
    leases_changed: Notify,
}

struct State {
    revision: Revision,
    keys: BTreeMap<String, KeyValue>,
    /// Events in revision order, for watches from a past revision.
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    /// Highest revision with an event dropped from `history`: watches must
    /// start at or after it.
    compacted: Revision,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

impl MemStore {
    /// An empty store that keeps [`DEFAULT_HISTORY_LIMIT`] events of history.
    pub fn new() -> Arc<MemStore> {
        Self::with_history_limit(DEFAULT_HISTORY_LIMIT)
    }

    /// An empty store that keeps the last `history_limit` events (at least one)
    /// for watches from a past revision.
    pub fn with_history_limit(history_limit: usize) -> Arc<MemStore> {
        let state = State {
            revision: 0,
            keys: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            leases: HashMap::new(),
            next_lease: 1,
        };
        Arc::new(MemStore {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                revision: watch::Sender::new(0),
                leases_changed: Notify::new(),
            }),
            shutdown: CancellationToken::new(),
            reaper_started: AtomicBool::new(false),
        })
    }

    /// The current store revision.
    pub fn revision(&self) -> Revision {
        self.shared.lock().revision
    }

    /// Runs `op` on the state after expiring overdue leases, then wakes the
    /// watchers if the revision moved.
    fn with_state<R>(&self, op: impl FnOnce(&mut State) -> R) -> R {
        let (result, before, after) = {
            let mut state = self.shared.lock();
            let before = state.revision;
            state.expire_due(Instant::now());
            let result = op(&mut state);
            (result, before, state.revision)
        };
        if after != before {
            self.shared.revision.send_replace(after);
        }
        result
    }

    fn start_reaper(&self) {
        if self.reaper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(reap(self.shared.clone(), self.shutdown.clone()));
    }
}

impl Drop for MemStore {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("MemStore")
            .field("revision", &state.revision)
            .field("keys", &state.keys.len())
            .field("leases", &state.leases.len())
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything
        // that could panic, so a poisoned lock still guards a valid state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn record(&mut self, event: WatchEvent) {
        self.history.push_back(event);
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = self.compacted.max(dropped.revision());
            }
        }
    }

    fn put_at(&mut self, revision: Revision, key: &str, value: Vec<u8>, lease: Option<LeaseId>) {
        let old = self
            .keys
            .get(key)
            .map(|old| (old.create_revision, old.lease));
        let create_revision = match old {
            Some((create_revision, old_lease)) => {
                if old_lease != lease {
                    self.detach(key, old_lease);
                }
                create_revision
            }
            None => revision,
        };
        if let Some(id) = lease
            && let Some(lease) = self.leases.get_mut(&id)
        {
            lease.keys.insert(key.to_string());
        }
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision: revision,
            lease,
        };
        self.keys.insert(key.to_string(), kv.clone());
        self.record(WatchEvent::Put(kv));
    }

    fn delete_at(&mut self, revision: Revision, key: &str) -> bool {
        let Some(old) = self.keys.remove(key) else {
            return false;
        };
        self.detach(key, old.lease);
        self.record(WatchEvent::Delete {
            key: key.to_string(),
            mod_revision: revision,
        });
        true
    }

    fn detach(&mut self, key: &str, lease: Option<LeaseId>) {
        if let Some(id) = lease
            && let Some(lease) = self.leases.get_mut(&id)
        {
            lease.keys.remove(key);
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => {
                Err(Error::not_found(format!("lease {id}")))
            }
            _ => Ok(()),
        }
    }

    fn matches(&self, key: &str, expect: &Expect) -> bool {
        let current = self.keys.get(key);
        match (expect, current) {
            (Expect::Absent, current) => current.is_none(),
            (Expect::ModRevision(revision), Some(kv)) => kv.mod_revision == *revision,
            (Expect::Value(value), Some(kv)) => kv.value == *value,
            (_, None) => false,
        }
    }

    /// Ends a lease and deletes its keys, all in one revision (as etcd does).
    fn end_lease(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        if !lease.keys.is_empty() {
            self.revision += 1;
            let revision = self.revision;
            for key in &lease.keys {
                if let Some(old) = self.keys.remove(key) {
                    debug_assert_eq!(old.lease, Some(id));
                    self.record(WatchEvent::Delete {
                        key: key.clone(),
                        mod_revision: revision,
                    });
                }
            }
        }
        true
    }

    fn expire_due(&mut self, now: Instant) {
        let mut due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        for id in due {
            tracing::debug!(lease = id, "lease expired");
            self.end_lease(id);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|lease| lease.deadline).min()
    }
}

/// Deletes the keys of expired leases at their deadlines.
async fn reap(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let (next, moved_to) = {
            let mut state = shared.lock();
            let before = state.revision;
            state.expire_due(Instant::now());
            let moved_to = (state.revision != before).then_some(state.revision);
            (state.next_deadline(), moved_to)
        };
        if let Some(revision) = moved_to {
            shared.revision.send_replace(revision);
        }
        let sleep = async {
            match next {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.leases_changed.notified() => {}
            _ = sleep => {}
        }
    }
}

/// Feeds one watch from the history until its reader goes away, the store
/// shuts down, or it falls behind compaction.
async fn run_watch(
    shared: Arc<Shared>,
    prefix: String,
    mut cursor: Revision,
    events: mpsc::Sender<Result<WatchEvent>>,
    shutdown: CancellationToken,
) {
    let mut revisions = shared.revision.subscribe();
    loop {
        revisions.borrow_and_update();
        let batch = {
            let state = shared.lock();
            if cursor < state.compacted {
                Err(Error::Compacted {
                    requested: cursor,
                    compacted: state.compacted,
                })
            } else {
                let start = state
                    .history
                    .partition_point(|event| event.revision() <= cursor);
                let batch: Vec<WatchEvent> = state
                    .history
                    .range(start..)
                    .filter(|event| event.key().starts_with(&prefix))
                    .cloned()
                    .collect();
                cursor = cursor.max(state.revision);
                Ok(batch)
            }
        };
        match batch {
            Err(error) => {
                tracing::debug!(prefix, %error, "watch ended");
                let _ = events.send(Err(error)).await;
                return;
            }
            Ok(batch) => {
                for event in batch {
                    tokio::select! {
                        sent = events.send(Ok(event)) => if sent.is_err() { return },
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { return },
            _ = events.closed() => return,
            _ = shutdown.cancelled() => return,
        }
    }
}

#[async_trait]
impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        Ok(self.with_state(|state| state.keys.get(key).cloned()))
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        Ok(self.with_state(|state| {
            let kvs = state
                .keys
                .range(prefix.to_string()..)
                .take_while(|(key, _)| key.starts_with(prefix))
                .map(|(_, kv)| kv.clone())
                .collect();
            (kvs, state.revision)
        }))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        check_key(key)?;
        self.with_state(|state| {
            state.check_lease(lease)?;
            state.revision += 1;
            let revision = state.revision;
            state.put_at(revision, key, value, lease);
            Ok(revision)
        })
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        Ok(self.with_state(|state| {
            if !state.keys.contains_key(key) {
                return false;
            }
            state.revision += 1;
            let revision = state.revision;
            state.delete_at(revision, key)
        }))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome> {
        check_key(key)?;
        self.with_state(|state| {
            if !state.matches(key, &expect) {
                return Ok(CasOutcome::Failed {
                    current: state.keys.get(key).cloned(),
                });
            }
            state.check_lease(lease)?;
            state.revision += 1;
            let revision = state.revision;
            state.put_at(revision, key, value, lease);
            Ok(CasOutcome::Swapped { revision })
        })
    }

    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        fence: &Fence,
    ) -> Result<FencedOutcome> {
        check_key(key)?;
        check_key(&fence.key)?;
        self.with_state(|state| {
            let term_holds = state
                .keys
                .get(&fence.key)
                .is_some_and(|kv| kv.create_revision == fence.create_revision);
            if !term_holds {
                return Ok(FencedOutcome::Deposed);
            }
            if !state.matches(key, &expect) {
                return Ok(FencedOutcome::Failed {
                    current: state.keys.get(key).cloned(),
                });
            }
            state.check_lease(lease)?;
            state.revision += 1;
            let revision = state.revision;
            state.put_at(revision, key, value, lease);
            Ok(FencedOutcome::Swapped { revision })
        })
    }

    async fn compare_and_delete(&self, key: &str, expect: Expect) -> Result<CasOutcome> {
        check_key(key)?;
        if expect == Expect::Absent {
            return Err(Error::invalid(
                "compare_and_delete",
                "deleting a key expected to be absent is meaningless",
            ));
        }
        Ok(self.with_state(|state| {
            if !state.matches(key, &expect) {
                return CasOutcome::Failed {
                    current: state.keys.get(key).cloned(),
                };
            }
            state.revision += 1;
            let revision = state.revision;
            state.delete_at(revision, key);
            CasOutcome::Swapped { revision }
        }))
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        from_revision: Option<Revision>,
    ) -> Result<WatchStream> {
        let start = self.with_state(|state| match from_revision {
            None => Ok(state.revision),
            Some(revision) if revision < 0 => Err(Error::invalid(
                "watch revision",
                format!("{revision} is negative"),
            )),
            Some(revision) if revision < state.compacted => Err(Error::Compacted {
                requested: revision,
                compacted: state.compacted,
            }),
            Some(revision) => Ok(revision),
        })?;
        let (sender, receiver) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        tokio::spawn(run_watch(
            self.shared.clone(),
            prefix.to_string(),
            start,
            sender,
            self.shutdown.child_token(),
        ));
        Ok(WatchStream::new(receiver, start))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(Error::invalid("lease ttl", "must be positive"));
        }
        self.start_reaper();
        let id = self.with_state(|state| {
            let id = state.next_lease;
            state.next_lease += 1;
            state.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        });
        self.shared.leases_changed.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.with_state(|state| match state.leases.get_mut(&lease) {
            Some(entry) => {
                entry.deadline = Instant::now() + entry.ttl;
                Ok(())
            }
            None => Err(Error::not_found(format!("lease {lease}"))),
        })
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        if self.with_state(|state| state.end_lease(lease)) {
            Ok(())
        } else {
            Err(Error::not_found(format!("lease {lease}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watch_from_a_compacted_revision_is_refused() {
        let store = MemStore::with_history_limit(4);
        for i in 0..10 {
            store.put(&format!("k/{i}"), vec![], None).await.unwrap();
        }
        // Events 7..=10 are kept: watching from 6 works, from 5 does not.
        let mut watch = store.watch_prefix("k/", Some(6)).await.unwrap();
        assert_eq!(watch.next().await.unwrap().revision(), 7);
        match store.watch_prefix("k/", Some(5)).await {
            Err(Error::Compacted {
                requested: 5,
                compacted: 6,
            }) => {}
            other => panic!("expected a compaction error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_compaction_ends_with_an_error() {
        let store = MemStore::with_history_limit(8);
        let mut watch = store.watch_prefix("k/", None).await.unwrap();
        // The watch task buffers `WATCH_CHANNEL_CAPACITY` events; write far
        // more than that plus the history while nobody reads.
        for i in 0..(WATCH_CHANNEL_CAPACITY as i64 + 100) {
            store.put(&format!("k/{i}"), vec![], None).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut delivered = Vec::new();
        let error = loop {
            match watch.try_next().await {
                Ok(Some(event)) => delivered.push(event.revision()),
                Ok(None) => panic!("watch ended without an error"),
                Err(error) => break error,
            }
        };
        assert!(matches!(error, Error::Compacted { .. }), "{error}");
        // What was delivered before the error has no gap.
        assert_eq!(delivered, (1..=delivered.len() as i64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn dropping_the_store_ends_its_watches() {
        let store = MemStore::new();
        let mut watch = store.watch_prefix("", None).await.unwrap();
        drop(store);
        assert!(watch.try_next().await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn operations_never_see_a_lease_past_its_deadline() {
        let store = MemStore::new();
        let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
        store.put("k", b"v".to_vec(), Some(lease)).await.unwrap();
        // Jump past the deadline without letting the reaper run.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(store.get("k").await.unwrap(), None);
        assert!(matches!(
            store.keep_alive(lease).await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn moving_a_key_to_another_lease_detaches_it_from_the_first() {
        let store = MemStore::new();
        let first = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        let second = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store.put("k", b"1".to_vec(), Some(first)).await.unwrap();
        store.put("k", b"2".to_vec(), Some(second)).await.unwrap();
        store.revoke_lease(first).await.unwrap();
        assert_eq!(store.get("k").await.unwrap().unwrap().value, b"2");
        store.revoke_lease(second).await.unwrap();
        assert_eq!(store.get("k").await.unwrap(), None);
    }
}

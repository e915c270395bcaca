//! Leader election on top of [`Store`]: the leader is whoever created the
//! election key, on its lease.
//!
//! A candidate [`campaign`]s: it creates the key with a compare-and-swap on
//! `Expect::Absent`, attached to its lease; if the key exists it watches it and
//! tries again when it is deleted (the leader [resigned](LeaderGuard::resign),
//! or its lease expired). Candidates are served in no particular order.
//!
//! The election key's revision, [`LeaderGuard::revision`], identifies one term
//! of leadership. Leadership can end without the leader noticing at once (its
//! lease expired while it was stalled), so anything a leader writes must be
//! fenced by the store itself, not by "I believe I am leader": the rendezvous
//! leader writes each plan with a create-only put on its round number, in a
//! transaction that also checks the term ([`LeaderGuard::fence`],
//! [`Store::compare_and_swap_fenced`]).

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::store::{CasOutcome, Expect, Fence, KeyValue, LeaseId, Revision, Store, WatchEvent};

/// Waits until this candidate leads: the election `key` holds `value` on `lease`.
///
/// Cancel a campaign by dropping its future. Over a remote store a campaign
/// dropped while its create was in flight may still have created the key; it is
/// then removed when the lease ends.
pub async fn campaign(
    store: Arc<dyn Store>,
    key: &str,
    value: &str,
    lease: LeaseId,
) -> Result<LeaderGuard> {
    loop {
        let current = match store
            .compare_and_swap(key, Expect::Absent, value.as_bytes().to_vec(), Some(lease))
            .await?
        {
            CasOutcome::Swapped { revision } => {
                tracing::debug!(key, lease, revision, "elected");
                return Ok(LeaderGuard::new(store, key, lease, revision));
            }
            CasOutcome::Failed { current: None } => continue,
            CasOutcome::Failed {
                current: Some(current),
            } => current,
        };
        if current.lease == Some(lease) {
            // Campaigning again on the lease that already holds the key (a
            // retried campaign): that term is ours.
            if current.value == value.as_bytes() {
                return Ok(LeaderGuard::new(store, key, lease, current.create_revision));
            }
            return Err(Error::Conflict {
                message: format!("election key {key} is held on lease {lease} by another value"),
            });
        }
        wait_for_change(&*store, key, current.create_revision).await?;
    }
}

/// The current leader's value, or `None` when nobody leads.
pub async fn leader(store: &dyn Store, key: &str) -> Result<Option<String>> {
    match store.get(key).await? {
        None => Ok(None),
        Some(kv) => String::from_utf8(kv.value)
            .map(Some)
            .map_err(|error| Error::corrupt(key, error)),
    }
}

/// Proof of leadership, returned by [`campaign`].
///
/// Dropping the guard does not resign: the key stays until the lease ends.
/// Call [`resign`](Self::resign) to hand over at once.
pub struct LeaderGuard {
    store: Arc<dyn Store>,
    key: String,
    lease: LeaseId,
    revision: Revision,
}

impl std::fmt::Debug for LeaderGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderGuard")
            .field("key", &self.key)
            .field("lease", &self.lease)
            .field("revision", &self.revision)
            .finish()
    }
}

impl LeaderGuard {
    fn new(store: Arc<dyn Store>, key: &str, lease: LeaseId, revision: Revision) -> Self {
        LeaderGuard {
            store,
            key: key.to_string(),
            lease,
            revision,
        }
    }

    /// The election key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease the election key lives on.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The revision that created the election key: it identifies this term.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The fence of this term: writes made with it land only while the term
    /// lasts ([`Store::compare_and_swap_fenced`]).
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.key.clone(),
            create_revision: self.revision,
        }
    }

    /// Returns once this term has ended: the key was deleted (resigned
    /// elsewhere, or the lease expired) or now belongs to another term.
    pub async fn lost(&self) -> Result<()> {
        wait_for_change(&*self.store, &self.key, self.revision).await
    }

    /// Ends this term now by deleting the election key, if it still belongs to
    /// it (a term that already ended is left alone: the key may be the next
    /// leader's).
    pub async fn resign(self) -> Result<()> {
        let outcome = self
            .store
            .compare_and_delete(&self.key, Expect::ModRevision(self.revision))
            .await?;
        if outcome.swapped() {
            tracing::debug!(key = self.key, lease = self.lease, "resigned");
        }
        Ok(())
    }
}

/// How one term of [`lead_once`] ended.
#[derive(Debug)]
pub enum Term<T> {
    /// `cancel` fired: before the election was won (nothing to resign, `Ok`),
    /// or during the term, which was then resigned (the outcome of resigning).
    Cancelled(Result<()>),
    /// The term ended under the work: the election key was deleted or changed
    /// hands (`Ok`), or watching it failed (the error). Nothing was resigned.
    Lost(Result<()>),
    /// The work returned while the term lasted. The guard is the caller's:
    /// resign it to hand over at once, or drop it to let the lease decide.
    Done(T, LeaderGuard),
}

/// One term of leadership: [`campaign`]s for `key` on `lease` and, once
/// elected, runs the work `lead(fence)` until it returns, the term is lost, or
/// `cancel` fires. The one election loop of kiln: a coordinator replica's
/// background work ([`crate::replica`]) and an agent's rendezvous leadership
/// ([`crate::membership::lead_rendezvous`]) each call it in their own loop,
/// which decides what a lost or failed term means. Errs only when the
/// campaign itself fails.
pub async fn lead_once<T, Fut>(
    store: Arc<dyn Store>,
    key: &str,
    value: &str,
    lease: LeaseId,
    cancel: &CancellationToken,
    lead: impl FnOnce(Fence) -> Fut,
) -> Result<Term<T>>
where
    Fut: Future<Output = T>,
{
    let guard = tokio::select! {
        guard = campaign(store, key, value, lease) => guard?,
        () = cancel.cancelled() => return Ok(Term::Cancelled(Ok(()))),
    };
    let work = lead(guard.fence());
    let outcome = tokio::select! {
        outcome = work => outcome,
        lost = guard.lost() => return Ok(Term::Lost(lost)),
        () = cancel.cancelled() => return Ok(Term::Cancelled(guard.resign().await)),
    };
    Ok(Term::Done(outcome, guard))
}

/// Returns once `key` no longer holds the term created at revision `term`.
async fn wait_for_change(store: &dyn Store, key: &str, term: Revision) -> Result<()> {
    let holds = |kv: &KeyValue| kv.create_revision == term;
    loop {
        // List then watch from the listing's revision: no change can fall in
        // between, and a fresh revision is never compacted.
        let (kvs, revision) = store.get_prefix(key).await?;
        match kvs.iter().find(|kv| kv.key == key) {
            Some(kv) if holds(kv) => {}
            _ => return Ok(()),
        }
        let mut watch = store.watch_prefix(key, Some(revision)).await?;
        loop {
            match watch.try_next().await {
                Ok(Some(WatchEvent::Delete { key: deleted, .. })) if deleted == key => {
                    return Ok(());
                }
                Ok(Some(WatchEvent::Put(kv))) if kv.key == key && !holds(&kv) => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => return Err(Error::unavailable("store closed the election watch")),
                Err(Error::Compacted { .. }) => break,
                Err(error) => return Err(error),
            }
        }
    }
}

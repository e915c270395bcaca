//! The one coordination interface: a revisioned key-value store with
//! compare-and-swap, prefix watches and leases, modelled on the etcd v3 API.
//!
//! Everything else in this crate (election, membership) is written against
//! [`Store`] alone, so it runs unchanged over [`mem::MemStore`] (one process)
//! and over etcd ([`etcd::EtcdStore`], a cluster); [`connect`] opens either
//! from a URL. Every backend must pass [`crate::conformance::run_all`].
//!
//! # Contract
//!
//! - **Revisions.** The store has one revision counter. Every write that
//!   changes something (put, delete that removed a key, swap, lease expiry or
//!   revoke that removed keys) advances it by one and stamps the changed keys
//!   with it (`mod_revision`); a key also keeps the revision that created it
//!   (`create_revision`). A write that deletes several keys at once (a lease
//!   revoke) is one revision with several events.
//! - **Watches.** [`Store::watch_prefix`] delivers, in revision order and without
//!   gaps, every event with a revision greater than `from_revision` for keys that
//!   start with the prefix. Listing with [`Store::get_prefix`] and then watching
//!   from the revision it returns sees every change exactly once. History is
//!   bounded: asking for a revision the store has compacted is
//!   [`Error::Compacted`](crate::Error::Compacted), and a watch that falls
//!   behind compaction ends with that error; the caller re-lists.
//! - **Leases.** A lease lives for its TTL after its grant or its last
//!   keep-alive, then expires: its keys are deleted (watchers see `Delete`
//!   events) and the lease no longer exists ([`Error::NotFound`](crate::Error::NotFound)).
//!   Backends may round a TTL up (etcd counts whole seconds).
//! - **Keys** are non-empty UTF-8 strings compared as bytes, so listings sort
//!   the way etcd sorts them.

pub mod etcd;
pub mod mem;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::Result;

/// A store revision: the value of the store's global write counter.
pub type Revision = i64;

/// A lease identifier, as granted by [`Store::grant_lease`].
pub type LeaseId = i64;

/// A key with its value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The whole key, as written (kiln's start with the keyspace root,
    /// `/kiln/...`).
    pub key: String,
    /// The stored bytes (JSON for kiln's own records).
    pub value: Vec<u8>,
    /// Revision of the write that created the key (kept across updates).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// The lease the key lives on, if any: the key is deleted when the lease ends.
    pub lease: Option<LeaseId>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated; the value is the new one.
    Put(KeyValue),
    /// The key was deleted (explicitly, or because its lease ended).
    Delete {
        /// The deleted key.
        key: String,
        /// Revision of the delete.
        mod_revision: Revision,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the write that caused the event.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// The condition of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist (create-only).
    Absent,
    /// The key exists and was last written at this revision.
    ModRevision(Revision),
    /// The key exists and holds exactly these bytes.
    Value(Vec<u8>),
}

/// What a compare-and-swap (or compare-and-delete) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The condition held and the write happened.
    Swapped {
        /// Revision of the write.
        revision: Revision,
    },
    /// The condition did not hold; nothing was written.
    Failed {
        /// The key as it was when the condition was checked (`None`: absent).
        current: Option<KeyValue>,
    },
}

impl CasOutcome {
    /// Whether the write happened.
    pub fn swapped(&self) -> bool {
        matches!(self, CasOutcome::Swapped { .. })
    }
}

/// A term that a write is fenced by: `key` must still exist and have been
/// created at `create_revision` (an election key and the revision of the
/// leader's term, [`crate::election::LeaderGuard::fence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The election key of the term.
    pub key: String,
    /// The revision that created it: the term's start.
    pub create_revision: Revision,
}

/// What a [fenced](Store::compare_and_swap_fenced) compare-and-swap did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FencedOutcome {
    /// The term held, the condition held, the write happened.
    Swapped {
        /// Revision of the write.
        revision: Revision,
    },
    /// The term held but the condition did not; nothing was written.
    Failed {
        /// The key as it was when the condition was checked (`None`: absent).
        current: Option<KeyValue>,
    },
    /// The term is over (the fence key is gone or belongs to a later term);
    /// nothing was written.
    Deposed,
}

/// A coordination store. See the [module docs](self) for the contract.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key's current value, or `None` when it does not exist.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// All keys that start with `prefix`, sorted by key, and the store revision
    /// they were read at (watch from it to follow changes without a gap).
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;

    /// Creates or replaces the key, on `lease` if given (the lease must exist).
    /// Returns the revision of the write.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision>;

    /// Deletes the key. Returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Writes the key (on `lease` if given) when `expect` holds, atomically.
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome>;

    /// Writes the key like [`compare_and_swap`](Self::compare_and_swap), but
    /// only while `fence` holds, in the same atomic step: a leader's write that
    /// cannot land after its term ended, however long the leader was paused.
    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        fence: &Fence,
    ) -> Result<FencedOutcome>;

    /// Deletes the key when `expect` holds, atomically (a leader resigns only
    /// the key it created). `Expect::Absent` is [`Error::Invalid`](crate::Error::Invalid).
    async fn compare_and_delete(&self, key: &str, expect: Expect) -> Result<CasOutcome>;

    /// Events for keys under `prefix` with revision > `from_revision` (`None`:
    /// from now), in revision order, no gaps. A `from_revision` older than the
    /// kept history is [`Error::Compacted`](crate::Error::Compacted).
    async fn watch_prefix(
        &self,
        prefix: &str,
        from_revision: Option<Revision>,
    ) -> Result<WatchStream>;

    /// Grants a lease that lives for `ttl` unless kept alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Refreshes the lease once (it lives for another TTL).
    /// [`Error::NotFound`](crate::Error::NotFound) when it expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Ends the lease now and deletes its keys.
    /// [`Error::NotFound`](crate::Error::NotFound) when it no longer exists.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
}

/// The receiving end of a watch, as returned by [`Store::watch_prefix`].
///
/// A watch ends when it is dropped, when the store shuts down (`Ok(None)` from
/// [`try_next`](Self::try_next)) or with an error (`Err`, typically
/// [`Error::Compacted`](crate::Error::Compacted) for a watcher that fell behind
/// the kept history). [`last_revision`](Self::last_revision) says where to resume.
#[derive(Debug)]
pub struct WatchStream {
    events: mpsc::Receiver<Result<WatchEvent>>,
    last_revision: Revision,
    ended_with: Option<crate::Error>,
}

impl WatchStream {
    /// Wraps the receiving end of a backend's watch. `start_revision` is the
    /// revision after which events are delivered.
    pub fn new(events: mpsc::Receiver<Result<WatchEvent>>, start_revision: Revision) -> Self {
        WatchStream {
            events,
            last_revision: start_revision,
            ended_with: None,
        }
    }

    /// The next event, or `None` when the watch ended. After `None`,
    /// [`ended_with`](Self::ended_with) says whether it ended with an error.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        match self.try_next().await {
            Ok(event) => event,
            Err(error) => {
                self.ended_with = Some(error);
                None
            }
        }
    }

    /// The next event; `Ok(None)` when the store shut down, `Err` when the watch
    /// ended with an error.
    pub async fn try_next(&mut self) -> Result<Option<WatchEvent>> {
        match self.events.recv().await {
            Some(Ok(event)) => {
                self.last_revision = self.last_revision.max(event.revision());
                Ok(Some(event))
            }
            Some(Err(error)) => Err(error),
            None => Ok(None),
        }
    }

    /// The revision of the last event delivered (or the start revision): a new
    /// watch from it continues this one without a gap.
    pub fn last_revision(&self) -> Revision {
        self.last_revision
    }

    /// The error a watch ended with, once [`next`](Self::next) returned `None`
    /// because of one.
    pub fn ended_with(&self) -> Option<&crate::Error> {
        self.ended_with.as_ref()
    }
}

/// Opens the store a URL names: `etcd://host:port[,host:port...]` (an etcd
/// cluster, through [`etcd::EtcdStore`]), `etcds://...?ca=PATH` (the same over
/// TLS), either with `user=NAME` and `password_file=PATH` parameters for etcd
/// authentication, or `mem://` (a fresh, empty [`mem::MemStore`] of this
/// process). The syntax is [`kiln_proto::store_url`]'s.
///
/// Errors: [`Error::Invalid`](crate::Error::Invalid) for a malformed URL or a
/// file it names that cannot be read;
/// [`Error::Unavailable`](crate::Error::Unavailable) when no etcd endpoint
/// answers (or a server certificate does not verify);
/// [`Error::AccessDenied`](crate::Error::AccessDenied) when etcd refuses the
/// credentials.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    connect_with(url, etcd::EtcdOptions::default()).await
}

/// [`connect`] with the given timings for an etcd store.
pub async fn connect_with(url: &str, options: etcd::EtcdOptions) -> Result<Arc<dyn Store>> {
    let parsed = kiln_proto::store_url::StoreUrl::parse(url)
        .map_err(|error| crate::Error::invalid("store url", error.to_string()))?;
    match parsed {
        kiln_proto::store_url::StoreUrl::Memory => Ok(mem::MemStore::new()),
        kiln_proto::store_url::StoreUrl::Etcd(etcd_url) => {
            let security = etcd::EtcdSecurity::from_url(&etcd_url)?;
            let store: Arc<dyn Store> =
                etcd::EtcdStore::connect_secured(&etcd_url.endpoints, &security, options).await?;
            Ok(store)
        }
    }
}

/// Checks a key argument: non-empty.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(crate::Error::invalid("key", "a key must not be empty"));
    }
    Ok(())
}

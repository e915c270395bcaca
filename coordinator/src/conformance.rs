//! The one test suite every [`Store`] backend must pass.
//!
//! A backend's integration test calls [`run_all`] (or [`run_all_with`] to set
//! lease timings a remote store can honour). Checks panic with a message that
//! names what broke, like any test assertion. Each check works under its own
//! key prefix, unique per run, so the suite can run against a shared store.
//!
//! Timing checks use tokio's clock: with a store that follows it (the memory
//! store) they also pass under paused time.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::{Instant, timeout};

use crate::election::{self, LeaderGuard};
use crate::error::Error;
use crate::store::{
    CasOutcome, Expect, Fence, FencedOutcome, KeyValue, Revision, Store, WatchEvent, WatchStream,
};

/// Timings and place of a conformance run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// TTL of the leases whose expiry is tested.
    pub lease_ttl: Duration,
    /// How late past its TTL a lease may end, and how long an expected event
    /// may take.
    pub slack: Duration,
    /// Root of the keys the run writes.
    pub prefix: String,
}

impl Default for Settings {
    fn default() -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Settings {
            lease_ttl: Duration::from_secs(1),
            slack: Duration::from_secs(1),
            prefix: format!("/kiln-conformance/{nanos}"),
        }
    }
}

/// Leases that must outlive a check.
const LONG_TTL: Duration = Duration::from_secs(60);

/// Runs every check with [`Settings::default`].
pub async fn run_all(store: Arc<dyn Store>) {
    run_all_with(store, Settings::default()).await
}

/// Runs every check: the quick ones one after another, then those that wait
/// on leases side by side.
pub async fn run_all_with(store: Arc<dyn Store>, settings: Settings) {
    let s = &settings;
    let store = &store;
    get_put_delete(store, s).await;
    prefix_listing(store, s).await;
    compare_and_swap(store, s).await;
    compare_and_swap_race(store, s).await;
    compare_and_swap_fenced(store, s).await;
    watch_from_past_revision(store, s).await;
    watch_has_no_gaps_under_concurrent_writes(store, s).await;
    revoke_deletes_keys(store, s).await;
    tokio::join!(
        lease_expiry_deletes_keys(store, s),
        keep_alive_keeps_keys(store, s),
        election_hands_over_on_resign(store, s),
        election_hands_over_on_lease_expiry(store, s),
    );
}

/// Put, get, overwrite and delete one key; revisions move as etcd's do.
pub async fn get_put_delete(store: &Arc<dyn Store>, s: &Settings) {
    let key = format!("{}/kv/a", s.prefix);
    assert_eq!(ok(store.get(&key).await, "get a missing key"), None);
    let first = ok(store.put(&key, b"1".to_vec(), None).await, "put");
    let kv = some(ok(store.get(&key).await, "get"), "the key just put");
    assert_eq!(
        kv,
        KeyValue {
            key: key.clone(),
            value: b"1".to_vec(),
            create_revision: first,
            mod_revision: first,
            lease: None,
        }
    );
    let second = ok(store.put(&key, b"2".to_vec(), None).await, "overwrite");
    assert!(second > first, "revisions must grow: {first} then {second}");
    let kv = some(ok(store.get(&key).await, "get"), "the key just overwritten");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"2"[..], first, second)
    );
    assert!(
        ok(store.delete(&key).await, "delete"),
        "delete must report the key existed"
    );
    assert_eq!(ok(store.get(&key).await, "get a deleted key"), None);
    assert!(
        !ok(store.delete(&key).await, "delete again"),
        "a second delete finds nothing"
    );
    let third = ok(
        store.put(&key, b"3".to_vec(), None).await,
        "put after delete",
    );
    let kv = some(ok(store.get(&key).await, "get"), "the recreated key");
    assert_eq!(
        kv.create_revision, third,
        "a recreated key has a new create revision"
    );
    assert!(
        matches!(
            store.put("", vec![], None).await,
            Err(Error::Invalid { .. })
        ),
        "an empty key must be refused"
    );
}

/// Prefix listings are exact and sorted by key bytes, with the store revision.
pub async fn prefix_listing(store: &Arc<dyn Store>, s: &Settings) {
    let root = format!("{}/list/", s.prefix);
    let mut last = 0;
    for name in ["b", "a/2", "ab", "a/10", "a/1"] {
        last = ok(
            store
                .put(&format!("{root}{name}"), name.as_bytes().to_vec(), None)
                .await,
            "put",
        );
    }
    let (kvs, revision) = ok(store.get_prefix(&format!("{root}a/")).await, "list a/");
    let names: Vec<&str> = kvs.iter().map(|kv| &kv.key[root.len()..]).collect();
    assert_eq!(
        names,
        ["a/1", "a/10", "a/2"],
        "a listing holds exactly the prefix, sorted"
    );
    assert!(
        revision >= last,
        "the listing revision {revision} is older than the last write {last}"
    );
    assert!(
        kvs.iter()
            .all(|kv| kv.value == kv.key.as_bytes()[root.len()..])
    );
    let (kvs, _) = ok(store.get_prefix(&root).await, "list all");
    let names: Vec<&str> = kvs.iter().map(|kv| &kv.key[root.len()..]).collect();
    assert_eq!(names, ["a/1", "a/10", "a/2", "ab", "b"]);
    let (kvs, revision) = ok(
        store.get_prefix(&format!("{root}zzz")).await,
        "list nothing",
    );
    assert!(kvs.is_empty());
    assert!(revision >= last);
}

/// Compare-and-swap on absence, on revision and on value; compare-and-delete.
pub async fn compare_and_swap(store: &Arc<dyn Store>, s: &Settings) {
    let key = format!("{}/cas/k", s.prefix);
    let cas = |expect: Expect, value: &'static [u8]| {
        let key = key.clone();
        async move {
            ok(
                store
                    .compare_and_swap(&key, expect, value.to_vec(), None)
                    .await,
                "compare_and_swap",
            )
        }
    };
    let CasOutcome::Swapped { revision: first } = cas(Expect::Absent, b"1").await else {
        panic!("a create-only swap of a missing key must succeed");
    };
    let current = some(ok(store.get(&key).await, "get"), "the key just created");
    assert_eq!(
        (current.mod_revision, current.value.as_slice()),
        (first, &b"1"[..])
    );
    assert_eq!(
        cas(Expect::Absent, b"x").await,
        CasOutcome::Failed {
            current: Some(current.clone())
        },
        "a create-only swap of an existing key fails and returns the key"
    );
    let CasOutcome::Swapped { revision: second } = cas(Expect::ModRevision(first), b"2").await
    else {
        panic!("a swap on the current revision must succeed");
    };
    assert!(second > first);
    match cas(Expect::ModRevision(first), b"x").await {
        CasOutcome::Failed { current: Some(kv) } => {
            assert_eq!((kv.mod_revision, kv.value.as_slice()), (second, &b"2"[..]));
        }
        other => panic!("a swap on a stale revision must fail, got {other:?}"),
    }
    assert!(
        cas(Expect::Value(b"2".to_vec()), b"3").await.swapped(),
        "a swap on the current value"
    );
    assert!(
        !cas(Expect::Value(b"2".to_vec()), b"x").await.swapped(),
        "a swap on a stale value"
    );
    assert_eq!(
        some(ok(store.get(&key).await, "get"), "the key").value,
        b"3"
    );

    let missing = format!("{}/cas/missing", s.prefix);
    for expect in [Expect::ModRevision(second), Expect::Value(b"3".to_vec())] {
        let outcome = ok(
            store.compare_and_swap(&missing, expect, vec![], None).await,
            "compare_and_swap",
        );
        assert_eq!(
            outcome,
            CasOutcome::Failed { current: None },
            "a missing key matches nothing but Absent"
        );
    }

    // A swap attaches its lease.
    let lease = ok(store.grant_lease(LONG_TTL).await, "grant");
    let leased = format!("{}/cas/leased", s.prefix);
    let outcome = ok(
        store
            .compare_and_swap(&leased, Expect::Absent, vec![], Some(lease))
            .await,
        "swap",
    );
    assert!(outcome.swapped());
    assert_eq!(
        some(ok(store.get(&leased).await, "get"), "the leased key").lease,
        Some(lease)
    );
    ok(store.revoke_lease(lease).await, "revoke");
    assert_eq!(
        ok(store.get(&leased).await, "get"),
        None,
        "revoking the lease deletes the swapped key"
    );

    // Compare-and-delete.
    let current = some(ok(store.get(&key).await, "get"), "the key");
    let stale = ok(
        store
            .compare_and_delete(&key, Expect::ModRevision(first))
            .await,
        "compare_and_delete",
    );
    assert!(!stale.swapped(), "a delete on a stale revision must fail");
    let fresh = ok(
        store
            .compare_and_delete(&key, Expect::ModRevision(current.mod_revision))
            .await,
        "compare_and_delete",
    );
    assert!(
        fresh.swapped(),
        "a delete on the current revision must succeed"
    );
    assert_eq!(ok(store.get(&key).await, "get"), None);
    assert!(
        matches!(
            store.compare_and_delete(&key, Expect::Absent).await,
            Err(Error::Invalid { .. })
        ),
        "deleting on Absent must be refused"
    );
}

/// A fenced swap writes only while its term holds, and says which condition
/// failed: the term (deposed) or the key's own.
pub async fn compare_and_swap_fenced(store: &Arc<dyn Store>, s: &Settings) {
    let term_key = format!("{}/fenced/leader", s.prefix);
    let key = format!("{}/fenced/k", s.prefix);
    let fenced = |fence: Fence, expect: Expect, value: &'static [u8]| {
        let key = key.clone();
        async move {
            ok(
                store
                    .compare_and_swap_fenced(&key, expect, value.to_vec(), None, &fence)
                    .await,
                "compare_and_swap_fenced",
            )
        }
    };
    let lease = ok(store.grant_lease(LONG_TTL).await, "grant_lease");
    let term = ok(
        election::campaign(store.clone(), &term_key, "a", lease).await,
        "campaign",
    );
    let FencedOutcome::Swapped { revision } = fenced(term.fence(), Expect::Absent, b"1").await
    else {
        panic!("a fenced create under a live term must succeed");
    };
    let current = some(ok(store.get(&key).await, "get"), "the key just created");
    assert_eq!(
        (current.mod_revision, current.value.as_slice()),
        (revision, &b"1"[..])
    );
    assert_eq!(
        fenced(term.fence(), Expect::Absent, b"x").await,
        FencedOutcome::Failed {
            current: Some(current.clone())
        },
        "a fenced create of an existing key fails on the key and returns it"
    );
    let stale = term.fence();
    ok(term.resign().await, "resign");
    assert_eq!(
        fenced(stale.clone(), Expect::ModRevision(revision), b"2").await,
        FencedOutcome::Deposed,
        "a write fenced by a resigned term must not land"
    );
    // A later term under the same key is not the old one.
    let next = ok(
        election::campaign(store.clone(), &term_key, "b", lease).await,
        "campaign again",
    );
    assert_eq!(
        fenced(stale, Expect::ModRevision(revision), b"2").await,
        FencedOutcome::Deposed,
        "a write fenced by an old term must not land under a new one"
    );
    assert_eq!(
        some(ok(store.get(&key).await, "get"), "the key").value,
        b"1",
        "a deposed write changed the key"
    );
    assert!(matches!(
        fenced(next.fence(), Expect::ModRevision(revision), b"2").await,
        FencedOutcome::Swapped { .. }
    ));
    ok(store.revoke_lease(lease).await, "revoke_lease");
}

/// Sixteen tasks race a create-only swap: exactly one wins, and its value stays.
pub async fn compare_and_swap_race(store: &Arc<dyn Store>, s: &Settings) {
    let key = format!("{}/race/k", s.prefix);
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let store = store.clone();
            let key = key.clone();
            tokio::spawn(async move {
                (
                    i,
                    store
                        .compare_and_swap(&key, Expect::Absent, vec![i], None)
                        .await,
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, outcome) = task.await.expect("a racing task panicked");
        match ok(outcome, "racing compare_and_swap") {
            CasOutcome::Swapped { .. } => winners.push(i),
            CasOutcome::Failed { current } => {
                assert!(
                    current.is_some(),
                    "a lost race must return the winner's key"
                );
            }
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one racer must win, got {winners:?}"
    );
    assert_eq!(
        some(ok(store.get(&key).await, "get"), "the raced key").value,
        [winners[0]]
    );
}

/// A watch from a past revision replays every change since, in order, then
/// follows live changes; a watch from now sees only what comes after it.
pub async fn watch_from_past_revision(store: &Arc<dyn Store>, s: &Settings) {
    let root = format!("{}/watch/", s.prefix);
    let (_, start) = ok(store.get_prefix(&root).await, "list");
    let a = format!("{root}a");
    let b = format!("{root}b");
    let r1 = ok(store.put(&a, b"1".to_vec(), None).await, "put");
    let r2 = ok(store.put(&b, b"1".to_vec(), None).await, "put");
    ok(
        store
            .put(&format!("{}/elsewhere", s.prefix), vec![], None)
            .await,
        "put",
    );
    assert!(ok(store.delete(&a).await, "delete"));
    let r4 = ok(store.put(&a, b"2".to_vec(), None).await, "put");

    let mut watch = ok(
        store.watch_prefix(&root, Some(start)).await,
        "watch from the past",
    );
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut watch, s.slack, "a replayed event").await);
    }
    let summary: Vec<(&str, &str)> = seen
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) => ("put", &kv.key[root.len()..]),
            WatchEvent::Delete { key, .. } => ("delete", &key[root.len()..]),
        })
        .collect();
    assert_eq!(
        summary,
        [("put", "a"), ("put", "b"), ("delete", "a"), ("put", "a")]
    );
    let revisions: Vec<Revision> = seen.iter().map(WatchEvent::revision).collect();
    assert_eq!((revisions[0], revisions[1], revisions[3]), (r1, r2, r4));
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions must grow: {revisions:?}"
    );
    match &seen[3] {
        WatchEvent::Put(kv) => assert_eq!(kv.create_revision, r4, "a recreated key"),
        other => panic!("expected a put, got {other:?}"),
    }

    let r5 = ok(store.put(&format!("{root}c"), vec![], None).await, "put");
    let live = next_event(&mut watch, s.slack, "a live event").await;
    assert_eq!(
        (live.key(), live.revision()),
        (format!("{root}c").as_str(), r5)
    );
    assert_eq!(watch.last_revision(), r5);

    let mut from_now = ok(store.watch_prefix(&root, None).await, "watch from now");
    let r6 = ok(store.put(&format!("{root}d"), vec![], None).await, "put");
    let first = next_event(&mut from_now, s.slack, "the first event from now").await;
    assert_eq!(
        first.revision(),
        r6,
        "a watch from now must not replay history"
    );
}

/// Events written while a watch from the past catches up all arrive, in order.
pub async fn watch_has_no_gaps_under_concurrent_writes(store: &Arc<dyn Store>, s: &Settings) {
    const WRITES: usize = 300;
    let root = format!("{}/nogap/", s.prefix);
    let (_, start) = ok(store.get_prefix(&root).await, "list");
    let writer = {
        let store = store.clone();
        let root = root.clone();
        tokio::spawn(async move {
            for i in 0..WRITES {
                let key = format!("{root}{i:04}");
                store.put(&key, vec![], None).await.expect("concurrent put");
                if i % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut watch = ok(store.watch_prefix(&root, Some(start)).await, "watch");
    let mut last = start;
    for i in 0..WRITES {
        let event = next_event(&mut watch, s.slack, "a concurrent write").await;
        assert_eq!(
            event.key(),
            format!("{root}{i:04}"),
            "event {i} out of order or missing"
        );
        assert!(event.revision() > last, "revisions must grow");
        last = event.revision();
    }
    writer.await.expect("the writer panicked");
}

/// Revoking a lease deletes its keys (and only them) and ends the lease.
pub async fn revoke_deletes_keys(store: &Arc<dyn Store>, s: &Settings) {
    let root = format!("{}/revoke/", s.prefix);
    let lease = ok(store.grant_lease(LONG_TTL).await, "grant");
    let leased: BTreeSet<String> = ["k1", "k2"].iter().map(|k| format!("{root}{k}")).collect();
    for key in &leased {
        ok(store.put(key, vec![], Some(lease)).await, "put on a lease");
    }
    let free = format!("{root}free");
    ok(store.put(&free, vec![], None).await, "put");
    let mut watch = ok(store.watch_prefix(&root, None).await, "watch");
    ok(store.revoke_lease(lease).await, "revoke");
    let mut deleted = BTreeSet::new();
    for _ in 0..leased.len() {
        match next_event(&mut watch, s.slack, "a delete caused by a revoke").await {
            WatchEvent::Delete { key, .. } => deleted.insert(key),
            other => panic!("expected a delete, got {other:?}"),
        };
    }
    assert_eq!(deleted, leased);
    for key in &leased {
        assert_eq!(
            ok(store.get(key).await, "get"),
            None,
            "{key} outlived its lease"
        );
    }
    assert!(
        ok(store.get(&free).await, "get").is_some(),
        "a key on no lease was deleted"
    );
    assert_not_found(
        store.keep_alive(lease).await,
        "keep_alive of a revoked lease",
    );
    assert_not_found(store.revoke_lease(lease).await, "revoke of a revoked lease");
    assert_not_found(
        store.put(&free, vec![], Some(lease)).await.map(drop),
        "put on a revoked lease",
    );
}

/// A lease left alone expires after its TTL: watchers see its keys deleted.
pub async fn lease_expiry_deletes_keys(store: &Arc<dyn Store>, s: &Settings) {
    let key = format!("{}/expiry/k", s.prefix);
    let started = Instant::now();
    let lease = ok(store.grant_lease(s.lease_ttl).await, "grant");
    ok(
        store.put(&key, b"v".to_vec(), Some(lease)).await,
        "put on a lease",
    );
    let mut watch = ok(store.watch_prefix(&key, None).await, "watch");
    let event = next_event(
        &mut watch,
        s.lease_ttl + s.slack,
        "the delete of an expired lease's key",
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        matches!(event, WatchEvent::Delete { .. }),
        "expected a delete, got {event:?}"
    );
    assert!(
        elapsed >= s.lease_ttl,
        "the lease expired early, after {elapsed:?}"
    );
    assert_eq!(ok(store.get(&key).await, "get"), None);
    assert_not_found(
        store.keep_alive(lease).await,
        "keep_alive of an expired lease",
    );
    assert_not_found(
        store.put(&key, vec![], Some(lease)).await.map(drop),
        "put on an expired lease",
    );
}

/// A lease kept alive outlives its TTL several times, and expires once left alone.
pub async fn keep_alive_keeps_keys(store: &Arc<dyn Store>, s: &Settings) {
    let key = format!("{}/keepalive/k", s.prefix);
    let lease = ok(store.grant_lease(s.lease_ttl).await, "grant");
    ok(
        store.put(&key, b"v".to_vec(), Some(lease)).await,
        "put on a lease",
    );
    let until = Instant::now() + s.lease_ttl * 5 / 2;
    while Instant::now() < until {
        tokio::time::sleep(s.lease_ttl / 4).await;
        ok(store.keep_alive(lease).await, "keep_alive of a live lease");
    }
    assert!(
        ok(store.get(&key).await, "get").is_some(),
        "a key on a lease kept alive expired"
    );
    let mut watch = ok(store.watch_prefix(&key, None).await, "watch");
    let event = next_event(
        &mut watch,
        s.lease_ttl + s.slack,
        "expiry once keep-alives stop",
    )
    .await;
    assert!(
        matches!(event, WatchEvent::Delete { .. }),
        "expected a delete, got {event:?}"
    );
}

/// When the leader resigns, a waiting candidate takes over.
pub async fn election_hands_over_on_resign(store: &Arc<dyn Store>, s: &Settings) {
    let key = format!("{}/election/resign", s.prefix);
    let lease_a = ok(store.grant_lease(LONG_TTL).await, "grant");
    let lease_b = ok(store.grant_lease(LONG_TTL).await, "grant");
    let a = ok(
        election::campaign(store.clone(), &key, "a", lease_a).await,
        "campaign of a",
    );
    assert_eq!(
        ok(election::leader(&**store, &key).await, "leader").as_deref(),
        Some("a")
    );
    let mut b = spawn_campaign(store, &key, "b", lease_b);
    assert!(
        timeout(s.slack / 4, &mut b).await.is_err(),
        "b was elected while a leads"
    );
    ok(a.resign().await, "resign");
    let b = elected(timeout(s.slack, b).await, "b after a resigned");
    assert_eq!(
        ok(election::leader(&**store, &key).await, "leader").as_deref(),
        Some("b")
    );
    assert!(
        timeout(s.slack / 4, b.lost()).await.is_err(),
        "b lost a term nobody ended"
    );
    ok(b.resign().await, "resign");
    assert_eq!(ok(election::leader(&**store, &key).await, "leader"), None);
    for lease in [lease_a, lease_b] {
        ok(store.revoke_lease(lease).await, "revoke");
    }
}

/// When the leader's lease expires, it learns it lost, a waiting candidate
/// takes over, and a late resign of the old term leaves the new one alone.
pub async fn election_hands_over_on_lease_expiry(store: &Arc<dyn Store>, s: &Settings) {
    let key = format!("{}/election/expiry", s.prefix);
    let lease_a = ok(store.grant_lease(s.lease_ttl).await, "grant");
    let lease_b = ok(store.grant_lease(LONG_TTL).await, "grant");
    let a = ok(
        election::campaign(store.clone(), &key, "a", lease_a).await,
        "campaign of a",
    );
    let b = spawn_campaign(store, &key, "b", lease_b);
    let within = s.lease_ttl + s.slack;
    ok(
        timeout(within, a.lost())
            .await
            .expect("a never learnt its lease expired"),
        "lost",
    );
    let b = elected(timeout(within, b).await, "b after a's lease expired");
    assert!(
        b.revision() > a.revision(),
        "a new term has a newer revision"
    );
    ok(a.resign().await, "late resign");
    assert_eq!(
        ok(election::leader(&**store, &key).await, "leader").as_deref(),
        Some("b"),
        "a stale leader's resign deleted the new leader's key"
    );
    ok(b.resign().await, "resign");
    ok(store.revoke_lease(lease_b).await, "revoke");
}

type Campaign = tokio::task::JoinHandle<crate::Result<LeaderGuard>>;

fn spawn_campaign(store: &Arc<dyn Store>, key: &str, value: &'static str, lease: i64) -> Campaign {
    let store = store.clone();
    let key = key.to_string();
    tokio::spawn(async move { election::campaign(store, &key, value, lease).await })
}

fn elected(
    joined: Result<
        Result<crate::Result<LeaderGuard>, tokio::task::JoinError>,
        tokio::time::error::Elapsed,
    >,
    what: &str,
) -> LeaderGuard {
    let joined = joined.unwrap_or_else(|_| panic!("{what}: not elected in time"));
    let result = joined.unwrap_or_else(|error| panic!("{what}: the campaign panicked: {error}"));
    ok(result, what)
}

async fn next_event(watch: &mut WatchStream, within: Duration, what: &str) -> WatchEvent {
    match timeout(within, watch.try_next()).await {
        Err(_) => panic!("{what}: no event within {within:?}"),
        Ok(Ok(Some(event))) => event,
        Ok(Ok(None)) => panic!("{what}: the watch ended"),
        Ok(Err(error)) => panic!("{what}: the watch failed: {error}"),
    }
}

#[track_caller]
fn ok<T>(result: crate::Result<T>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{what}: {error}"),
    }
}

#[track_caller]
fn some<T>(value: Option<T>, what: &str) -> T {
    value.unwrap_or_else(|| panic!("{what} is missing"))
}

#[track_caller]
fn assert_not_found(result: crate::Result<()>, what: &str) {
    match result {
        Err(Error::NotFound { .. }) => {}
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

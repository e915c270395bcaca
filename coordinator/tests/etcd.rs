//! `EtcdStore` against real etcd processes: the shared conformance suite, a
//! dead endpoint in the client's list, a 3-member cluster whose leader is
//! SIGKILLed under load, and the rendezvous (membership) over etcd.
//!
//! Every test starts its own etcd on loopback (free ports, temporary data
//! folder) and kills it when done.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use kiln_coordinator::conformance::{self, Settings};
use kiln_coordinator::etcd_server::{EtcdCluster, EtcdServer};
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::membership::{self, NodeSession};
use kiln_coordinator::rendezvous::{NodeRecord, Plan, RendezvousConfig};
use kiln_coordinator::store::etcd::{EtcdOptions, EtcdStore};
use kiln_coordinator::store::{self, CasOutcome, Expect, Revision, Store, WatchEvent, WatchStream};
use kiln_coordinator::{Error, Result as StoreResult};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// etcd grants leases of whole seconds, at least 2.
const TTL: Duration = Duration::from_secs(2);
/// How long an expected event may take beyond the protocol's own waits
/// (etcd checks lease expiry every 500 ms; the machine is shared).
const SLACK: Duration = Duration::from_secs(5);

async fn start_server() -> anyhow::Result<EtcdServer> {
    tokio::task::spawn_blocking(EtcdServer::start)
        .await?
        .context("start etcd")
}

async fn start_cluster(members: usize) -> anyhow::Result<EtcdCluster> {
    tokio::task::spawn_blocking(move || EtcdCluster::start(members))
        .await?
        .context("start an etcd cluster")
}

/// An address nothing listens on: a port that was free a moment ago.
fn dead_endpoint() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("127.0.0.1:{}", listener.local_addr()?.port()))
}

async fn next_event(watch: &mut WatchStream, within: Duration) -> anyhow::Result<WatchEvent> {
    match timeout(within, watch.try_next()).await {
        Err(_) => bail!("no watch event within {within:?}"),
        Ok(Ok(Some(event))) => Ok(event),
        Ok(Ok(None)) => bail!("the watch ended"),
        Ok(Err(error)) => bail!("the watch failed: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_store_passes_the_conformance_suite() -> anyhow::Result<()> {
    let etcd = start_server().await?;
    let store = EtcdStore::connect(&etcd.endpoints()).await?;
    let settings = Settings {
        lease_ttl: TTL,
        slack: Duration::from_secs(2),
        ..Settings::default()
    };
    conformance::run_all_with(store, settings).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_url_opens_etcd_or_memory_and_bad_urls_are_refused() -> anyhow::Result<()> {
    let etcd = start_server().await?;
    let store = store::connect(&etcd.url()).await?;
    let revision = store.put("/url/k", b"v".to_vec(), None).await?;
    let kv = store.get("/url/k").await?.context("the key just put")?;
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"v"[..], revision)
    );

    let memory = store::connect("mem://").await?;
    assert_eq!(memory.get("/url/k").await?, None, "mem:// is a fresh store");

    for (url, needle) in [
        ("http://127.0.0.1:2379", "is not a store URL"),
        ("etcd://127.0.0.1", "is not host:port"),
        ("etcd://a:1,b:x", "\"b:x\""),
        ("etcd://", "is not host:port"),
    ] {
        match store::connect(url).await {
            Err(Error::Invalid { what, message }) => {
                assert_eq!(what, "store url", "{url}");
                assert!(message.contains(needle), "{url}: {message}");
            }
            Err(other) => bail!("{url}: expected Invalid, got {other}"),
            Ok(_) => bail!("{url}: accepted"),
        }
    }
    match EtcdStore::connect(&["http://127.0.0.1:2379".to_string()]).await {
        Err(Error::Invalid { what, message }) => {
            assert_eq!(what, "etcd endpoint");
            assert!(message.contains("no scheme"), "{message}");
        }
        other => bail!("a scheme in an endpoint: expected Invalid, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_live_endpoint_is_unavailable_naming_the_endpoint() -> anyhow::Result<()> {
    let dead = dead_endpoint()?;
    let mut options = EtcdOptions::default();
    options.request_deadline = Duration::from_millis(500);
    match EtcdStore::connect_with(std::slice::from_ref(&dead), options).await {
        Err(Error::Unavailable { message }) => {
            assert!(message.contains(&dead), "{message}");
        }
        other => bail!("expected Unavailable, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_is_refused() -> anyhow::Result<()> {
    let etcd = start_server().await?;
    let store = EtcdStore::connect(&etcd.endpoints()).await?;
    let mut revisions = Vec::new();
    for i in 0..6 {
        revisions.push(store.put(&format!("/compact/{i}"), vec![], None).await?);
    }
    // Keep history from revisions[3] on.
    store.compact(revisions[3]).await?;
    match store.watch_prefix("/compact/", Some(revisions[1])).await {
        Err(Error::Compacted {
            requested,
            compacted,
        }) => {
            assert_eq!(requested, revisions[1]);
            assert_eq!(
                compacted,
                revisions[3] - 1,
                "the first revision one may watch after"
            );
        }
        Err(other) => bail!("expected Compacted, got {other}"),
        Ok(_) => bail!("a watch from a compacted revision was accepted"),
    }
    // From the first revision still kept, the replay starts at revisions[3].
    let mut watch = store
        .watch_prefix("/compact/", Some(revisions[3] - 1))
        .await?;
    let event = next_event(&mut watch, SLACK).await?;
    assert_eq!(event.revision(), revisions[3]);
    Ok(())
}

/// Every kind of call, `rounds` times, through `store`; any error fails.
async fn exercise(store: &Arc<EtcdStore>, prefix: &str, rounds: usize) -> anyhow::Result<()> {
    let (_, start) = store.get_prefix(prefix).await.context("list")?;
    let mut watch = store
        .watch_prefix(prefix, Some(start))
        .await
        .context("watch")?;
    for i in 0..rounds {
        let key = format!("{prefix}{i:03}");
        let revision = store
            .put(&key, vec![1], None)
            .await
            .with_context(|| format!("put {i}"))?;
        let kv = store
            .get(&key)
            .await
            .with_context(|| format!("get {i}"))?
            .context("a key just put")?;
        ensure!(kv.mod_revision == revision, "get {i}: stale value");
        let swapped = store
            .compare_and_swap(&key, Expect::ModRevision(revision), vec![2], None)
            .await
            .with_context(|| format!("compare_and_swap {i}"))?;
        let CasOutcome::Swapped { revision: swapped } = swapped else {
            bail!("compare_and_swap {i} failed: {swapped:?}");
        };
        let (kvs, _) = store
            .get_prefix(prefix)
            .await
            .with_context(|| format!("list {i}"))?;
        ensure!(kvs.len() == i + 1, "list {i}: {} keys", kvs.len());
        if i % 10 == 0 {
            let lease = store
                .grant_lease(TTL)
                .await
                .with_context(|| format!("grant {i}"))?;
            store
                .keep_alive(lease)
                .await
                .with_context(|| format!("keep_alive {i}"))?;
            store
                .revoke_lease(lease)
                .await
                .with_context(|| format!("revoke {i}"))?;
        }
        for expected in [revision, swapped] {
            let event = next_event(&mut watch, SLACK)
                .await
                .with_context(|| format!("watch event of write {i}"))?;
            ensure!(
                event.key() == key && event.revision() == expected,
                "write {i}: unexpected event {event:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_in_the_list_fails_no_request() -> anyhow::Result<()> {
    let etcd = start_server().await?;
    let live = etcd.endpoints()[0].clone();
    // Dead first (every client starts on it) and dead last.
    let first = EtcdStore::connect(&[dead_endpoint()?, live.clone()]).await?;
    let last = EtcdStore::connect(&[live.clone(), dead_endpoint()?]).await?;
    let (a, b) = tokio::join!(
        exercise(&first, "/dead-first/", 60),
        exercise(&last, "/dead-last/", 60)
    );
    a.context("dead endpoint first")?;
    b.context("dead endpoint last")?;
    Ok(())
}

/// Keeps `lease` alive every half second until `stop`; returns the errors seen.
fn keep_alive(
    store: Arc<EtcdStore>,
    lease: i64,
    stop: CancellationToken,
) -> JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut errors = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return errors,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if let Err(error) = store.keep_alive(lease).await {
                errors.push(error.to_string());
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_leases_and_watches_survive_the_leader_being_killed() -> anyhow::Result<()> {
    let mut cluster = start_cluster(3).await?;
    let leader = cluster.leader_index()?;
    let follower = (leader + 1) % 3;
    let mut endpoints = cluster.endpoints();
    // The writer's client starts on the leader: its connection dies with it.
    endpoints.swap(0, leader);
    let store = EtcdStore::connect(&endpoints).await?;
    endpoints = cluster.endpoints();
    endpoints.swap(0, follower);
    let via_follower = EtcdStore::connect(&endpoints).await?;

    let prefix = "/failover/w/";
    let (_, start) = store.get_prefix(prefix).await?;
    let mut watch = store.watch_prefix(prefix, Some(start)).await?;

    let stop = CancellationToken::new();
    let mut leases = Vec::new();
    for (name, client) in [("leader-first", &store), ("follower-first", &via_follower)] {
        let lease = client.grant_lease(TTL).await?;
        let key = format!("/failover/leases/{name}");
        client.put(&key, vec![], Some(lease)).await?;
        leases.push((key, lease, keep_alive(client.clone(), lease, stop.clone())));
    }

    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let store = store.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut writes: Vec<(String, Revision, Duration)> = Vec::new();
            while !stop.is_cancelled() {
                let key = format!("{prefix}{:05}", writes.len());
                let began = Instant::now();
                let revision = store
                    .put(&key, vec![], None)
                    .await
                    .with_context(|| format!("write {key}"))?;
                writes.push((key, revision, began.elapsed()));
                acked.fetch_add(1, Ordering::SeqCst);
            }
            anyhow::Ok(writes)
        })
    };
    let wait_for = |count: u64| {
        let acked = acked.clone();
        async move {
            while acked.load(Ordering::SeqCst) < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    timeout(Duration::from_secs(30), wait_for(30))
        .await
        .context("the first 30 writes")?;
    let killed_at = acked.load(Ordering::SeqCst);
    let killed = Instant::now();
    cluster.kill(leader)?;
    // Writes resume (EtcdStore's deadline is 30 s; a failover takes ~2 s).
    timeout(Duration::from_secs(60), wait_for(killed_at + 30))
        .await
        .context("30 writes after the leader was killed")?;
    let resumed = killed.elapsed();
    // Two more lease TTLs with keep-alives going through the new leader.
    tokio::time::sleep(TTL * 2).await;
    stop.cancel();
    let writes = writer.await??;

    let new_leader = cluster.leader_index()?;
    assert_ne!(new_leader, leader, "a killed member cannot lead");
    for (key, lease, keeper) in leases {
        let errors = keeper.await?;
        assert!(
            !errors.iter().any(|e| e.contains("not found")),
            "lease {lease} ({key}) was lost: {errors:?}"
        );
        let kv = via_follower
            .get(&key)
            .await?
            .with_context(|| format!("{key} is gone: its lease was lost"))?;
        assert_eq!(kv.lease, Some(lease));
        via_follower.keep_alive(lease).await?;
    }

    // The watch, resumed across the failover, saw every write once, in order.
    let last = writes.last().context("no writes")?.1;
    let mut seen: Vec<(String, Revision)> = Vec::new();
    while seen.last().is_none_or(|(_, r)| *r < last) {
        let event = next_event(&mut watch, SLACK).await?;
        seen.push((event.key().to_string(), event.revision()));
    }
    let written: Vec<(String, Revision)> = writes.iter().map(|(k, r, _)| (k.clone(), *r)).collect();
    // A write retried after its answer was lost may have been applied twice:
    // the watch then has one more event for that key. Every acknowledged write
    // is there, in order, and nothing else is.
    let acknowledged: BTreeSet<&(String, Revision)> = written.iter().collect();
    let missing: Vec<_> = written.iter().filter(|w| !seen.contains(w)).collect();
    assert!(missing.is_empty(), "the watch missed writes: {missing:?}");
    for pair in seen.windows(2) {
        assert!(pair[0].1 < pair[1].1, "out of order: {pair:?}");
    }
    let extra: Vec<_> = seen.iter().filter(|s| !acknowledged.contains(s)).collect();
    assert!(
        extra
            .iter()
            .all(|(key, _)| written.iter().any(|(k, _)| k == key)),
        "the watch saw writes nobody made: {extra:?}"
    );
    // And it is exactly etcd's history: a fresh replay from the same start.
    let mut replay = via_follower.watch_prefix(prefix, Some(start)).await?;
    let mut replayed = Vec::new();
    while replayed.len() < seen.len() {
        let event = next_event(&mut replay, SLACK).await?;
        replayed.push((event.key().to_string(), event.revision()));
    }
    assert_eq!(seen, replayed, "the resumed watch differs from the history");

    // The killed member comes back on its data and catches up.
    tokio::task::block_in_place(|| cluster.restart(leader))?;
    let restarted = EtcdStore::connect(&[cluster.endpoints()[leader].clone()]).await?;
    let (last_key, last_revision, _) = writes.last().context("no writes")?;
    let kv = restarted
        .get(last_key)
        .await?
        .context("the restarted member lacks the last write")?;
    assert_eq!(kv.mod_revision, *last_revision);

    let slowest = writes.iter().map(|(_, _, d)| *d).max().unwrap_or_default();
    eprintln!(
        "leader {leader} killed after {killed_at} writes; 30 more writes within {resumed:.1?}; \
         slowest write {slowest:.1?}; {} writes, {} extra events; new leader {new_leader}",
        writes.len(),
        extra.len()
    );
    Ok(())
}

const JOB: &str = "etcd-job";

fn record(node: &str) -> NodeRecord {
    NodeRecord {
        node: node.to_string(),
        host: format!("{node}.local"),
        endpoints: vec![format!("{node}.local:29500")],
        devices: 1,
        version: "test".to_string(),
        presence: None,
    }
}

fn members(plan: &Plan) -> Vec<&str> {
    plan.members.iter().map(|m| m.node.as_str()).collect()
}

async fn next_plan(
    session: &mut NodeSession,
    after_round: u64,
    within: Duration,
) -> anyhow::Result<Plan> {
    let node = session.node().to_string();
    timeout(within, session.next_plan(after_round))
        .await
        .map_err(|_| anyhow!("{node}: no plan after round {after_round} within {within:?}"))?
        .with_context(|| format!("{node}: wait for a plan"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_rounds_follow_lost_leases_over_etcd() -> anyhow::Result<()> {
    let etcd = start_server().await?;
    let ks = Keyspace::default();
    let cfg = RendezvousConfig {
        job: JOB.to_string(),
        min_nodes: 1,
        max_nodes: 3,
        settle: Duration::from_millis(500),
        max_failures: 10,
        max_scale_events: 10,
        cooldown: Duration::ZERO,
    };
    let leader_store: Arc<dyn Store> = EtcdStore::connect(&etcd.endpoints()).await?;
    let cancel = CancellationToken::new();
    let leader = tokio::spawn(membership::run_leader(
        leader_store.clone(),
        ks.clone(),
        cfg,
        None,
        cancel.clone(),
    ));
    // Each node has its own client, as separate agents would.
    let mut sessions = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        let store: Arc<dyn Store> = EtcdStore::connect(&etcd.endpoints()).await?;
        sessions.push(membership::join(store, ks.clone(), JOB, record(node), TTL).await?);
    }
    let mut first = Vec::new();
    for session in &mut sessions {
        first.push(next_plan(session, 0, SLACK).await?);
    }
    assert!(first.iter().all(|p| *p == first[0]), "{first:?}");
    assert_eq!(members(&first[0]), ["node-a", "node-b", "node-c"]);
    let round = first[0].round;

    // node-c dies: no more keep-alives; etcd expires its lease.
    drop(sessions.pop());
    let second = next_plan(&mut sessions[0], round, TTL + SLACK).await?;
    assert_eq!(second.round, round + 1);
    assert_eq!(members(&second), ["node-a", "node-b"]);
    assert_eq!(next_plan(&mut sessions[1], round, SLACK).await?, second);

    // node-b's lease is revoked from outside (an operator, a fencing agent).
    let b = sessions.pop().context("node-b")?;
    leader_store.revoke_lease(b.lease()).await?;
    let third = next_plan(&mut sessions[0], second.round, SLACK).await?;
    assert_eq!(third.round, second.round + 1);
    assert_eq!(members(&third), ["node-a"]);
    assert!(
        timeout(SLACK, b.lost()).await.is_ok(),
        "node-b never learnt its lease was revoked"
    );

    // The plans are in etcd, one per round, written once.
    let (kvs, _) = leader_store.get_prefix(&ks.rounds_prefix(JOB)).await?;
    let rounds: Vec<u64> = kvs
        .iter()
        .filter_map(|kv| ks.parse_plan(JOB, &kv.key))
        .collect();
    assert_eq!(rounds, [round, round + 1, round + 2]);
    let outcome = leader_store
        .compare_and_swap(&ks.plan(JOB, round), Expect::Absent, vec![], None)
        .await?;
    assert!(
        matches!(outcome, CasOutcome::Failed { current: Some(_) }),
        "a plan key can be written twice"
    );

    cancel.cancel();
    let result: StoreResult<()> = timeout(SLACK, leader).await.context("leader stop")??;
    result.context("leader")?;
    sessions.pop().context("node-a")?.leave().await?;
    Ok(())
}

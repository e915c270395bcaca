//! The rendezvous leader and joining nodes over the memory store.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use kiln_coordinator::Error;
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::membership::{self, NodeSession};
use kiln_coordinator::rendezvous::{NodeRecord, Plan, RendezvousConfig};
use kiln_coordinator::store::Store;
use kiln_coordinator::store::mem::MemStore;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const JOB: &str = "job-1";
const TTL: Duration = Duration::from_secs(1);
/// Scheduling slack on top of the protocol's own waits.
const SLACK: Duration = Duration::from_secs(2);

fn config(min_nodes: usize, max_nodes: usize, settle: Duration) -> RendezvousConfig {
    RendezvousConfig {
        job: JOB.to_string(),
        min_nodes,
        max_nodes,
        settle,
        max_failures: 10,
        max_scale_events: 10,
        cooldown: Duration::ZERO,
    }
}

fn record(node: &str) -> NodeRecord {
    NodeRecord {
        node: node.to_string(),
        host: format!("{node}.local"),
        endpoints: vec![format!("{node}.local:29500"), format!("{node}.local:29501")],
        devices: 2,
        version: "test".to_string(),
        presence: None,
    }
}

struct Cluster {
    store: Arc<dyn Store>,
    ks: Keyspace,
    cancel: CancellationToken,
}

impl Cluster {
    fn new() -> Self {
        Cluster {
            store: MemStore::new(),
            ks: Keyspace::default(),
            cancel: CancellationToken::new(),
        }
    }

    fn leader(&self, cfg: RendezvousConfig) -> JoinHandle<kiln_coordinator::Result<()>> {
        let leader = membership::run_leader(
            self.store.clone(),
            self.ks.clone(),
            cfg,
            None,
            self.cancel.clone(),
        );
        tokio::spawn(leader)
    }

    async fn join(&self, node: &str) -> anyhow::Result<NodeSession> {
        membership::join(self.store.clone(), self.ks.clone(), JOB, record(node), TTL)
            .await
            .with_context(|| format!("join {node}"))
    }

    async fn rounds(&self) -> anyhow::Result<Vec<u64>> {
        let (kvs, _) = self.store.get_prefix(&self.ks.rounds_prefix(JOB)).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| self.ks.parse_plan(JOB, &kv.key))
            .collect())
    }
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

async fn plans(
    sessions: &mut [NodeSession],
    after_round: u64,
    within: Duration,
) -> anyhow::Result<Vec<Plan>> {
    let mut plans = Vec::new();
    for session in sessions {
        plans.push(next_plan(session, after_round, within).await?);
    }
    Ok(plans)
}

fn members(plan: &Plan) -> Vec<(&str, u32)> {
    plan.members
        .iter()
        .map(|m| (m.node.as_str(), m.first_rank))
        .collect()
}

async fn stop(
    cluster: &Cluster,
    leader: JoinHandle<kiln_coordinator::Result<()>>,
) -> anyhow::Result<()> {
    cluster.cancel.cancel();
    timeout(SLACK, leader)
        .await
        .context("leader did not stop")??
        .context("leader")?;
    Ok(())
}

#[tokio::test]
async fn three_nodes_get_the_same_plan() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    // A long settle: the round must close because max_nodes are present.
    let leader = cluster.leader(config(3, 3, Duration::from_secs(60)));
    let mut sessions = Vec::new();
    for node in ["node-c", "node-a", "node-b"] {
        sessions.push(cluster.join(node).await?);
    }
    let plans = plans(&mut sessions, 0, SLACK).await?;
    let plan = &plans[0];
    assert!(
        plans.iter().all(|p| p == plan),
        "nodes got different plans: {plans:?}"
    );
    assert_eq!(plan.round, 1);
    assert_eq!(plan.world_size, 6);
    assert_eq!(members(plan), [("node-a", 0), ("node-b", 2), ("node-c", 4)]);
    assert_eq!(
        plan.peers[2..4],
        ["node-b.local:29500", "node-b.local:29501"]
    );
    assert_eq!(cluster.rounds().await?, [1]);
    stop(&cluster, leader).await
}

#[tokio::test]
async fn a_node_leaving_starts_a_round_with_the_survivors() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let settle = Duration::from_millis(500);
    let leader = cluster.leader(config(2, 3, settle));
    let mut sessions = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        sessions.push(cluster.join(node).await?);
    }
    let first = plans(&mut sessions, 0, SLACK).await?;
    assert_eq!(first[0].round, 1);
    assert_eq!(first[0].members.len(), 3);

    let left = Instant::now();
    sessions.remove(1).leave().await?;
    let second = plans(&mut sessions, 1, settle + TTL + SLACK).await?;
    let elapsed = left.elapsed();
    assert!(elapsed <= settle + TTL, "the new round took {elapsed:?}");
    assert_eq!(second[0], second[1]);
    assert_eq!(second[0].round, 2);
    assert_eq!(members(&second[0]), [("node-a", 0), ("node-c", 2)]);
    assert_eq!(second[0].world_size, 4);
    stop(&cluster, leader).await
}

#[tokio::test(start_paused = true)]
async fn a_node_whose_lease_expires_is_dropped_from_the_next_round() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let settle = Duration::from_secs(3);
    let leader = cluster.leader(config(2, 3, settle));
    let mut sessions = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        sessions.push(cluster.join(node).await?);
    }
    plans(&mut sessions, 0, SLACK).await?;
    // The node dies: no more keep-alives, no leave.
    let died = Instant::now();
    drop(sessions.pop());
    let plan = next_plan(&mut sessions[0], 1, TTL + settle + SLACK).await?;
    let elapsed = died.elapsed();
    // The lease ends within a TTL of the death (its last keep-alive came
    // before it), then membership must settle.
    assert!(
        elapsed >= settle,
        "the round closed before membership settled: {elapsed:?}"
    );
    assert!(
        elapsed <= TTL + settle + Duration::from_millis(100),
        "{elapsed:?}"
    );
    assert_eq!(members(&plan), [("node-a", 0), ("node-b", 2)]);
    stop(&cluster, leader).await
}

#[tokio::test(start_paused = true)]
async fn a_spare_waits_for_a_round_that_includes_it() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let leader = cluster.leader(config(1, 1, Duration::ZERO));
    let mut a = cluster.join("node-a").await?;
    assert_eq!(next_plan(&mut a, 0, SLACK).await?.round, 1);
    let mut spare = cluster.join("node-0").await?;
    let waiting = tokio::spawn(async move {
        let plan = spare.next_plan(0).await;
        (spare, plan)
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !waiting.is_finished(),
        "the spare got a plan while the round was full"
    );
    a.leave().await?;
    let (_spare, plan) = timeout(SLACK, waiting).await??;
    let plan = plan?;
    assert_eq!((plan.round, members(&plan)), (2, vec![("node-0", 0)]));
    stop(&cluster, leader).await
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_forces_a_new_round() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let leader = cluster.leader(config(2, 2, Duration::ZERO));
    let mut sessions = vec![cluster.join("node-a").await?, cluster.join("node-b").await?];
    plans(&mut sessions, 0, SLACK).await?;
    // node-b's agent restarts: the same record, put again on a new lease
    // before the old one expired. Its workers are new: the round must re-form.
    drop(sessions.pop());
    let mut b = cluster.join("node-b").await?;
    let plan = next_plan(&mut b, 1, SLACK).await?;
    assert_eq!(
        (plan.round, members(&plan)),
        (2, vec![("node-a", 0), ("node-b", 2)])
    );
    stop(&cluster, leader).await
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_resumes_the_last_plan() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let first = cluster.leader(config(2, 2, Duration::ZERO));
    let mut sessions = vec![cluster.join("node-a").await?, cluster.join("node-b").await?];
    plans(&mut sessions, 0, SLACK).await?;
    stop(&cluster, first).await?;

    let cluster = Cluster {
        cancel: CancellationToken::new(),
        ..cluster
    };
    let second = cluster.leader(config(1, 2, Duration::ZERO));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        cluster.rounds().await?,
        [1],
        "a takeover with the same nodes needs no new round"
    );
    sessions.pop().context("node-b")?.leave().await?;
    let plan = next_plan(&mut sessions[0], 1, SLACK).await?;
    assert_eq!((plan.round, members(&plan)), (2, vec![("node-a", 0)]));
    stop(&cluster, second).await
}

#[tokio::test(start_paused = true)]
async fn a_leader_stops_when_another_wrote_its_round() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let leader = cluster.leader(config(2, 2, Duration::ZERO));
    let _a = cluster.join("node-a").await?;
    // Let the leader list and start watching.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let foreign = Plan {
        job: JOB.to_string(),
        round: 1,
        world_size: 0,
        members: vec![],
        peers: vec![],
        secret: String::new(),
    };
    let key = cluster.ks.plan(JOB, 1);
    cluster
        .store
        .put(&key, serde_json::to_vec(&foreign)?, None)
        .await?;
    let _b = cluster.join("node-b").await?;
    match timeout(SLACK, leader).await?? {
        Err(Error::Conflict { message }) => assert!(message.contains("round 1"), "{message}"),
        other => bail!("expected a conflict, got {other:?}"),
    }
    Ok(())
}

/// A leader whose term ended while it was paused (its lease expired, another
/// candidate won) cannot plan any round when it resumes: the plan write is
/// fenced by its election term, and it is told to step down.
#[tokio::test(start_paused = true)]
async fn a_deposed_leader_cannot_write_a_plan() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let key = cluster.ks.job_leader(JOB);
    let old_lease = cluster.store.grant_lease(TTL).await?;
    let old =
        kiln_coordinator::election::campaign(cluster.store.clone(), &key, "old", old_lease).await?;
    // The old leader's lease ends (it was stopped); a new leader is elected
    // before the old one notices.
    cluster.store.revoke_lease(old_lease).await?;
    let new_lease = cluster.store.grant_lease(Duration::from_secs(60)).await?;
    let _new =
        kiln_coordinator::election::campaign(cluster.store.clone(), &key, "new", new_lease).await?;
    let leader = tokio::spawn(membership::run_leader(
        cluster.store.clone(),
        cluster.ks.clone(),
        config(1, 1, Duration::ZERO),
        Some(old.fence()),
        cluster.cancel.clone(),
    ));
    let _a = cluster.join("node-a").await?;
    match timeout(SLACK, leader).await?? {
        Err(Error::Conflict { message }) => {
            assert!(message.contains("leadership term"), "{message}")
        }
        other => bail!("expected the deposed leader to step down, got {other:?}"),
    }
    assert_eq!(
        cluster.rounds().await?,
        Vec::<u64>::new(),
        "a deposed leader wrote a plan"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_fails_the_rendezvous() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let mut cfg = config(1, 2, Duration::ZERO);
    cfg.max_scale_events = 0;
    let leader = cluster.leader(cfg);
    let mut a = cluster.join("node-a").await?;
    next_plan(&mut a, 0, SLACK).await?;
    let _b = cluster.join("node-b").await?;
    match timeout(SLACK, leader).await?? {
        Err(Error::RendezvousFailed { job, reason }) => {
            assert_eq!(job, JOB);
            assert!(reason.contains("max_scale_events 0"), "{reason}");
        }
        other => bail!("expected a failed rendezvous, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_plan_ends_when_the_lease_is_lost() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let leader = cluster.leader(config(2, 2, Duration::ZERO));
    let mut a = cluster.join("node-a").await?;
    // Something else ends the lease (an operator, a partition longer than the TTL).
    cluster.store.revoke_lease(a.lease()).await?;
    match timeout(SLACK, a.next_plan(0)).await? {
        Err(Error::NotFound { what }) => assert!(what.contains("node-a"), "{what}"),
        other => bail!("expected NotFound, got {other:?}"),
    }
    assert!(a.is_lost());
    stop(&cluster, leader).await
}

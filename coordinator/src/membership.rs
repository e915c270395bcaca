//! The I/O around the rendezvous: the leader's loop ([`run_leader`]) and a
//! node's side ([`join`], [`NodeSession`]).
//!
//! The leader lists and watches `jobs/{job}/nodes/`, turns record changes into
//! [`Event`]s for the [`Rendezvous`] machine, ticks it at its deadlines, and
//! writes each plan to `jobs/{job}/rounds/{round}/plan` with a create-only
//! compare-and-swap fenced by its election term: the round number keeps two
//! leaders from writing the same round, and the term keeps a deposed leader
//! (paused past its lease, then resumed) from writing any round at all.
//!
//! Every agent of an elastic job runs [`lead_rendezvous`]: it campaigns for
//! the job's leadership on its node lease and, while elected, runs
//! [`run_leader`]; when the leader's node dies its lease ends and another
//! agent takes over from the last plan.
//!
//! A node puts its [`NodeRecord`] on a lease it keeps alive, and waits for a
//! plan that includes it by watching `rounds/`. When the node dies its lease
//! expires, its record disappears, and the leader sees it lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::keyspace::{Keyspace, validate_name};
use crate::rendezvous::{Action, Event, NodeRecord, Plan, Rendezvous, RendezvousConfig};
use crate::store::{
    CasOutcome, Expect, Fence, FencedOutcome, KeyValue, LeaseId, Store, WatchEvent,
};

/// The pause before an agent campaigns again after stepping down.
const STEP_DOWN_PAUSE: Duration = Duration::from_millis(500);

/// Campaigns for `cfg.job`'s rendezvous leadership on this node's `lease`
/// and, while elected, drives the rendezvous ([`run_leader`] fenced by the
/// term). Returns when cancelled (resigning a term it holds).
///
/// Only the rendezvous itself failing (a restart budget spent) fails the job:
/// the job's status says so and this returns. A term that ends (the lease
/// expired while this process was paused, a plan write refused because another
/// leader planned or holds the term) or a store error steps down: this node
/// resigns, if the term is still its own, and campaigns again; whoever leads
/// next resumes from the last plan.
pub async fn lead_rendezvous(
    store: Arc<dyn Store>,
    ks: Keyspace,
    cfg: RendezvousConfig,
    node: String,
    lease: LeaseId,
    cancel: CancellationToken,
) {
    let key = ks.job_leader(&cfg.job);
    loop {
        let term =
            crate::election::lead_once(store.clone(), &key, &node, lease, &cancel, |fence| {
                tracing::info!(job = cfg.job, node, "leading the rendezvous");
                run_leader(
                    store.clone(),
                    ks.clone(),
                    cfg.clone(),
                    Some(fence),
                    CancellationToken::new(),
                )
            })
            .await;
        let (error, guard) = match term {
            Err(e) => {
                tracing::warn!(job = cfg.job, node, "campaign for leadership: {e}");
                if step_down_pause(&cancel).await {
                    return;
                }
                continue;
            }
            Ok(crate::election::Term::Cancelled(_)) => return,
            Ok(crate::election::Term::Lost(lost)) => {
                tracing::warn!(job = cfg.job, node, "leadership lost: {lost:?}");
                continue;
            }
            Ok(crate::election::Term::Done(Ok(()), _)) => continue,
            Ok(crate::election::Term::Done(Err(error), guard)) => (error, guard),
        };
        if let Error::RendezvousFailed { .. } = error {
            tracing::error!(job = cfg.job, node, "rendezvous leader: {error}");
            let message = error.to_string();
            let _ = crate::status::update(&*store, &ks, &cfg.job, |s| {
                s.set_phase(crate::status::Phase::Failed);
                s.message = message.clone();
            })
            .await;
            let _ = guard.resign().await;
            return;
        }
        tracing::warn!(
            job = cfg.job,
            node,
            "stepping down as rendezvous leader: {error}"
        );
        // Resigns only a term that is still this one's.
        if let Err(e) = guard.resign().await {
            tracing::warn!(job = cfg.job, node, "resign the leadership: {e}");
        }
        if step_down_pause(&cancel).await {
            return;
        }
    }
}

/// The pause before campaigning again; true when cancelled meanwhile.
async fn step_down_pause(cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(STEP_DOWN_PAUSE) => false,
        () = cancel.cancelled() => true,
    }
}

/// How long a node waits before following the rounds again after the store
/// was unavailable.
const OUTAGE_RETRY: Duration = Duration::from_millis(500);

/// The leader ticks the machine at its deadlines, and at least this often as
/// a backstop.
const MAX_TICK_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the rendezvous of `cfg.job` as its leader until `cancel` fires
/// (`Ok(())`) or the rendezvous fails.
///
/// The caller must hold the job's leadership (see [`crate::election`]), pass
/// its term's `fence` ([`LeaderGuard::fence`](crate::election::LeaderGuard::fence);
/// `None` only where no other leader can exist, as in one process over a
/// memory store) and cancel this when the term ends. Errors:
/// [`Error::RendezvousFailed`] when a restart budget is spent (the job
/// fails); [`Error::Conflict`] when the term ended or a plan key of the round
/// it was about to write already exists (another leader planned it: step
/// down and campaign again); store errors as they come (step down too).
pub async fn run_leader(
    store: Arc<dyn Store>,
    ks: Keyspace,
    cfg: RendezvousConfig,
    fence: Option<Fence>,
    cancel: CancellationToken,
) -> Result<()> {
    cfg.validate()?;
    let job = cfg.job.clone();
    let mut leader = Leader {
        machine: match latest_plan(&*store, &ks, &job).await? {
            Latest::Plan(plan) => {
                tracing::info!(job, round = plan.round, "resuming from the last plan");
                Rendezvous::resume(cfg, plan)
            }
            Latest::Unreadable(round) => Rendezvous::new(cfg, round),
            Latest::None => Rendezvous::new(cfg, 0),
        },
        store,
        ks,
        job,
        fence,
        known: BTreeMap::new(),
    };
    tokio::select! {
        result = leader.run() => result,
        _ = cancel.cancelled() => Ok(()),
    }
}

struct Leader {
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: String,
    machine: Rendezvous,
    /// The leadership term every plan write is fenced by.
    fence: Option<Fence>,
    /// The lease of each node record fed to the machine: a record that
    /// reappears on another lease is a new incarnation of the node.
    known: BTreeMap<String, Option<LeaseId>>,
}

impl Leader {
    async fn run(&mut self) -> Result<()> {
        let prefix = self.ks.nodes_prefix(&self.job);
        loop {
            let (kvs, revision) = self.store.get_prefix(&prefix).await?;
            self.reconcile(kvs).await?;
            let mut watch = self.store.watch_prefix(&prefix, Some(revision)).await?;
            loop {
                let wake = self
                    .machine
                    .next_deadline()
                    .map(Instant::from_std)
                    .unwrap_or_else(|| Instant::now() + MAX_TICK_INTERVAL)
                    .min(Instant::now() + MAX_TICK_INTERVAL);
                let actions: Vec<Action> = tokio::select! {
                    event = watch.try_next() => match event {
                        Ok(Some(event)) => {
                            let now = now();
                            let events = self.node_events(event);
                            self.machine.on_events(events, now)
                        }
                        Ok(None) => return Err(Error::unavailable("store closed the node watch")),
                        Err(error @ Error::Compacted { .. }) => {
                            tracing::warn!(job = self.job, %error, "node watch fell behind; listing again");
                            break;
                        }
                        Err(error) => return Err(error),
                    },
                    _ = tokio::time::sleep_until(wake) => self.machine.tick(now()),
                };
                self.perform(actions).await?;
            }
        }
    }

    /// Feeds the machine the difference between what it knows and a listing.
    async fn reconcile(&mut self, kvs: Vec<KeyValue>) -> Result<()> {
        let now = now();
        let listed: BTreeMap<String, KeyValue> = kvs
            .into_iter()
            .filter_map(|kv| {
                let node = self.ks.parse_node(&self.job, &kv.key)?.to_string();
                Some((node, kv))
            })
            .collect();
        let mut events: Vec<Event> = Vec::new();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|n| !listed.contains_key(*n))
            .cloned()
            .collect();
        for node in gone {
            self.known.remove(&node);
            events.push(Event::NodeLost { node });
        }
        for kv in listed.into_values() {
            events.extend(self.node_events(WatchEvent::Put(kv)));
        }
        let actions = self.machine.on_events(events, now);
        self.perform(actions).await
    }

    /// The machine events a change of a node record means.
    fn node_events(&mut self, event: WatchEvent) -> Vec<Event> {
        let Some(node) = self
            .ks
            .parse_node(&self.job, event.key())
            .map(str::to_string)
        else {
            return Vec::new();
        };
        let lost = |known: &mut BTreeMap<String, Option<LeaseId>>, node: String| -> Vec<Event> {
            known
                .remove(&node)
                .map(|_| Event::NodeLost { node })
                .into_iter()
                .collect()
        };
        match event {
            WatchEvent::Delete { .. } => lost(&mut self.known, node),
            WatchEvent::Put(kv) => match decode_record(&node, &kv) {
                Ok(record) => match self.known.insert(node.clone(), kv.lease) {
                    Some(previous) if previous != kv.lease => {
                        vec![Event::NodeLost { node }, Event::NodeJoined(record)]
                    }
                    _ => vec![Event::NodeJoined(record)],
                },
                Err(error) => {
                    tracing::warn!(job = self.job, node, %error, "ignoring an unreadable node record");
                    lost(&mut self.known, node)
                }
            },
        }
    }

    async fn perform(&mut self, actions: Vec<Action>) -> Result<()> {
        for action in actions {
            match action {
                Action::WritePlan(plan) => self.write_plan(&plan).await?,
                Action::Waiting { present, min } => {
                    tracing::info!(job = self.job, present, min, "waiting for nodes");
                    // Shown by `kiln status`; the next round's agents set it back to running.
                    let recorded = crate::status::update(&*self.store, &self.ks, &self.job, |s| {
                        if s.phase == crate::status::Phase::Running {
                            s.set_phase(crate::status::Phase::Waiting);
                            s.message = format!("{present} of at least {min} nodes present");
                        }
                    })
                    .await;
                    if let Err(error) = recorded {
                        tracing::warn!(job = self.job, %error, "record the waiting phase");
                    }
                }
                Action::Failed { reason } => {
                    tracing::error!(job = self.job, reason, "rendezvous failed");
                    return Err(Error::RendezvousFailed {
                        job: self.job.clone(),
                        reason,
                    });
                }
            }
        }
        Ok(())
    }

    async fn write_plan(&self, plan: &Plan) -> Result<()> {
        let key = self.ks.plan(&self.job, plan.round);
        let plan = &plan.clone().with_new_secret().map_err(|error| {
            Error::unavailable(format!("draw the ring secret of a plan: {error}"))
        })?;
        let value = serde_json::to_vec(plan).map_err(|error| Error::corrupt(&key, error))?;
        let current = match &self.fence {
            Some(fence) => match self
                .store
                .compare_and_swap_fenced(&key, Expect::Absent, value.clone(), None, fence)
                .await?
            {
                FencedOutcome::Swapped { .. } => None,
                FencedOutcome::Failed { current } => Some(current),
                FencedOutcome::Deposed => {
                    return Err(Error::Conflict {
                        message: format!(
                            "the leadership term of job {} ended before round {} was planned (another leader was elected)",
                            self.job, plan.round
                        ),
                    });
                }
            },
            None => match self
                .store
                .compare_and_swap(&key, Expect::Absent, value.clone(), None)
                .await?
            {
                CasOutcome::Swapped { .. } => None,
                CasOutcome::Failed { current } => Some(current),
            },
        };
        match current {
            None => {
                let nodes: Vec<&str> = plan.members.iter().map(|m| m.node.as_str()).collect();
                tracing::info!(
                    job = self.job,
                    round = plan.round,
                    world_size = plan.world_size,
                    ?nodes,
                    "plan written"
                );
                Ok(())
            }
            // Our own write, answered twice (a retried request to a remote store).
            Some(Some(kv)) if kv.value == value => Ok(()),
            Some(_) => Err(Error::Conflict {
                message: format!(
                    "round {} of job {} was already planned by another leader",
                    plan.round, self.job
                ),
            }),
        }
    }
}

fn now() -> std::time::Instant {
    // Tokio's clock, so that paused time in tests drives the machine too.
    Instant::now().into_std()
}

/// The first plan after `after_round` that includes `node` (see
/// [`NodeSession::next_plan`]).
async fn next_plan_for(
    store: &dyn Store,
    ks: &Keyspace,
    job: &str,
    node: &str,
    lost: &CancellationToken,
    after_round: u64,
) -> Result<Plan> {
    let lease_lost = || {
        Error::not_found(format!(
            "the lease of node {node} in job {job} (it expired)"
        ))
    };
    let for_me = |kv: &KeyValue| -> Result<Option<Plan>> {
        let plan = decode_plan(job, kv)?;
        Ok(plan.member(node).is_some().then_some(plan))
    };
    let prefix = ks.rounds_prefix(job);
    let mut after = after_round;
    loop {
        if lost.is_cancelled() {
            return Err(lease_lost());
        }
        let (kvs, revision) = store.get_prefix(&prefix).await?;
        let newest = kvs
            .iter()
            .filter_map(|kv| ks.parse_plan(job, &kv.key).map(|round| (round, kv)))
            .filter(|(round, _)| *round > after)
            .max_by_key(|(round, _)| *round);
        if let Some((round, kv)) = newest {
            if let Some(plan) = for_me(kv)? {
                return Ok(plan);
            }
            after = round;
        }
        let mut watch = store.watch_prefix(&prefix, Some(revision)).await?;
        loop {
            let event = tokio::select! {
                event = watch.try_next() => event,
                _ = lost.cancelled() => return Err(lease_lost()),
            };
            match event {
                Ok(Some(WatchEvent::Put(kv))) => {
                    let Some(round) = ks.parse_plan(job, &kv.key) else {
                        continue;
                    };
                    if round <= after {
                        continue;
                    }
                    if let Some(plan) = for_me(&kv)? {
                        return Ok(plan);
                    }
                    after = round;
                }
                Ok(Some(WatchEvent::Delete { .. })) => {}
                Ok(None) => return Err(Error::unavailable("store closed the plan watch")),
                Err(Error::Compacted { .. }) => break,
                Err(error) => return Err(error),
            }
        }
    }
}

fn decode_record(node: &str, kv: &KeyValue) -> Result<NodeRecord> {
    let record: NodeRecord =
        serde_json::from_slice(&kv.value).map_err(|error| Error::corrupt(&kv.key, error))?;
    if record.node != node {
        return Err(Error::corrupt(
            &kv.key,
            format!("the record names node {:?}", record.node),
        ));
    }
    record.validate()?;
    Ok(record)
}

fn decode_plan(job: &str, kv: &KeyValue) -> Result<Plan> {
    let plan: Plan =
        serde_json::from_slice(&kv.value).map_err(|error| Error::corrupt(&kv.key, error))?;
    if plan.job != job {
        return Err(Error::corrupt(
            &kv.key,
            format!("the plan is for job {:?}", plan.job),
        ));
    }
    Ok(plan)
}

enum Latest {
    None,
    Plan(Plan),
    /// The newest plan key's round, whose value could not be read.
    Unreadable(u64),
}

async fn latest_plan(store: &dyn Store, ks: &Keyspace, job: &str) -> Result<Latest> {
    let (kvs, _) = store.get_prefix(&ks.rounds_prefix(job)).await?;
    let newest = kvs
        .iter()
        .filter_map(|kv| ks.parse_plan(job, &kv.key).map(|round| (round, kv)))
        .max_by_key(|(round, _)| *round);
    Ok(match newest {
        None => Latest::None,
        Some((round, kv)) => match decode_plan(job, kv) {
            Ok(plan) if plan.round == round => Latest::Plan(plan),
            Ok(_) => Latest::Unreadable(round),
            Err(error) => {
                tracing::warn!(job, round, %error, "the last plan is unreadable; planning after it");
                Latest::Unreadable(round)
            }
        },
    })
}

/// Puts `record` under `jobs/{job}/nodes/` on a new lease of `ttl` and keeps
/// the lease alive (every `ttl / 3`) until the session is left or dropped.
/// The lease counts as lost when the store says it is gone, or when no
/// keep-alive got through for a whole `ttl` (see [`join_riding_outages`]).
pub async fn join(
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: &str,
    record: NodeRecord,
    ttl: Duration,
) -> Result<NodeSession> {
    join_riding_outages(store, ks, job, record, ttl, ttl).await
}

/// [`join`], but a store that cannot be reached counts as an outage, not as
/// a lost lease, for up to `outage` (at least `ttl`): a node rides out an
/// etcd restart or a lost quorum and keeps its place (etcd extends every
/// lease when it elects a leader again). The lease is lost at once when the
/// store, reachable again, says it is gone.
pub async fn join_riding_outages(
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: &str,
    record: NodeRecord,
    ttl: Duration,
    outage: Duration,
) -> Result<NodeSession> {
    validate_name("job", job)?;
    record.validate()?;
    let key = ks.node(job, &record.node);
    let value = serde_json::to_vec(&record).map_err(|error| Error::corrupt(&key, error))?;
    let lease = store.grant_lease(ttl).await?;
    if let Err(error) = store.put(&key, value, Some(lease)).await {
        let _ = store.revoke_lease(lease).await;
        return Err(error);
    }
    tracing::info!(job, node = record.node, lease, "joined");
    let stop = CancellationToken::new();
    let lost = CancellationToken::new();
    let keeper = tokio::spawn(keep_alive(
        store.clone(),
        lease,
        ttl,
        outage.max(ttl),
        stop.clone(),
        lost.clone(),
        format!("{job}/{}", record.node),
    ));
    Ok(NodeSession {
        store,
        ks,
        job: job.to_string(),
        node: record.node,
        lease,
        stop,
        lost,
        keeper: Some(keeper),
    })
}

/// Refreshes `lease` every `ttl / 3` until `stop`; fires `lost` when the lease
/// is gone (or could not be refreshed for `outage`) and returns.
async fn keep_alive(
    store: Arc<dyn Store>,
    lease: LeaseId,
    ttl: Duration,
    outage: Duration,
    stop: CancellationToken,
    lost: CancellationToken,
    member: String,
) {
    let mut interval = tokio::time::interval((ttl / 3).max(Duration::from_millis(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    let mut refreshed = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        match store.keep_alive(lease).await {
            Ok(()) => refreshed = Instant::now(),
            Err(Error::NotFound { .. }) => {
                tracing::warn!(member, lease, "lease expired: the node record is gone");
                lost.cancel();
                return;
            }
            Err(error) if refreshed.elapsed() >= outage => {
                tracing::warn!(member, lease, %error, ?outage, "no keep-alive got through for the longest outage ridden out: the lease is lost");
                lost.cancel();
                return;
            }
            Err(error) => tracing::warn!(member, lease, %error, "keep-alive failed; retrying"),
        }
    }
}

/// A node's membership in a job, returned by [`join`].
///
/// Dropping the session stops the keep-alive: the record disappears when the
/// lease expires. [`leave`](Self::leave) removes it at once.
pub struct NodeSession {
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: String,
    node: String,
    lease: LeaseId,
    /// Stops the keep-alive task.
    stop: CancellationToken,
    /// Fired by the keep-alive task when the lease is gone.
    lost: CancellationToken,
    keeper: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NodeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSession")
            .field("job", &self.job)
            .field("node", &self.node)
            .field("lease", &self.lease)
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

impl NodeSession {
    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease the node record lives on.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Whether the lease is gone (the record with it).
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Returns once the lease is gone: the node is out of the job and must
    /// [`join`] again.
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Waits for a plan that includes this node with a round greater than
    /// `after_round`, and returns it.
    ///
    /// When several such rounds exist already, the newest is returned (an
    /// older one is superseded); when the newest excludes this node (a spare),
    /// this waits for a later one. Errors: [`Error::NotFound`] when the lease
    /// is lost meanwhile, [`Error::Corrupt`] for an unreadable plan.
    pub async fn next_plan(&mut self, after_round: u64) -> Result<Plan> {
        next_plan_for(
            &*self.store,
            &self.ks,
            &self.job,
            &self.node,
            &self.lost,
            after_round,
        )
        .await
    }

    /// Every later plan that includes this node, in round order, on a
    /// channel fed by a task of its own (so the session stays free for
    /// [`update_record`](Self::update_record)). A store outage is retried
    /// for as long as the lease holds; the channel ends after the first other
    /// error (the lease was lost, an unreadable plan).
    pub fn watch_plans(&self, after_round: u64) -> tokio::sync::mpsc::Receiver<Result<Plan>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (store, ks, job, node, lost) = (
            self.store.clone(),
            self.ks.clone(),
            self.job.clone(),
            self.node.clone(),
            self.lost.clone(),
        );
        tokio::spawn(async move {
            let mut after = after_round;
            loop {
                let next = tokio::select! {
                    next = next_plan_for(&*store, &ks, &job, &node, &lost, after) => next,
                    _ = tx.closed() => return,
                };
                if let Err(error @ Error::Unavailable { .. }) = &next {
                    // An outage: the lease (its keep-alive) decides how long
                    // it may last; follow the rounds again once it is over.
                    tracing::warn!(job, node, %error, "following the rounds: the store is unavailable; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(OUTAGE_RETRY) => continue,
                        _ = tx.closed() => return,
                    }
                }
                let stop = next.is_err();
                if let Ok(plan) = &next {
                    after = plan.round;
                }
                if tx.send(next).await.is_err() || stop {
                    return;
                }
            }
        });
        rx
    }

    /// Replaces the node record (same node, same lease), e.g. when a worker
    /// was replaced and listens on a new endpoint: the leader sees the change
    /// and opens a new round.
    pub async fn update_record(&self, record: &NodeRecord) -> Result<()> {
        record.validate()?;
        if record.node != self.node {
            return Err(Error::invalid(
                "node record",
                format!(
                    "names node {} but this session is node {}",
                    record.node, self.node
                ),
            ));
        }
        self.check_lease()?;
        let key = self.ks.node(&self.job, &self.node);
        let value = serde_json::to_vec(record).map_err(|error| Error::corrupt(&key, error))?;
        self.store.put(&key, value, Some(self.lease)).await?;
        Ok(())
    }

    /// Removes the node record now (revokes its lease) and stops the keep-alive.
    pub async fn leave(mut self) -> Result<()> {
        self.stop.cancel();
        if let Some(keeper) = self.keeper.take() {
            // So that no keep-alive races the revoke.
            let _ = keeper.await;
        }
        match self.store.revoke_lease(self.lease).await {
            Ok(()) => {
                tracing::info!(job = self.job, node = self.node, "left");
                Ok(())
            }
            // Already expired: the record is gone, which is what leaving wants.
            Err(Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn check_lease(&self) -> Result<()> {
        if self.is_lost() {
            return Err(self.lease_lost());
        }
        Ok(())
    }

    fn lease_lost(&self) -> Error {
        Error::not_found(format!(
            "lease {} of node {} in job {} (it expired)",
            self.lease, self.node, self.job
        ))
    }
}

impl Drop for NodeSession {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

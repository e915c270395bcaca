//! The rendezvous state machine: which nodes form the next round, and when.
//!
//! It does no I/O and reads no clock: the caller feeds it [`Event`]s and the
//! time ([`Rendezvous::on_event`], [`Rendezvous::tick`]) and carries out the
//! [`Action`]s it returns. [`crate::membership::run_leader`] is that caller in
//! production; the tests below drive it with plain `Instant`s they advance.
//!
//! # Rules
//!
//! - **Present nodes.** A node is present while its record exists
//!   ([`Event::NodeJoined`] until [`Event::NodeLost`]) and it is not cooling
//!   down. A record that changes (new endpoints) is a membership change.
//! - **Opening a round.** Round `r + 1` opens when the members the next plan
//!   would have differ from the last plan's (a node joined, left or changed its
//!   record), or when a member failed. Every membership change restarts the
//!   settle window.
//! - **Closing a round.** An open round closes, emitting
//!   [`Action::WritePlan`], when at least `min_nodes` are present and either
//!   `max_nodes` are present or `settle` has passed since the last membership
//!   change. Below `min_nodes` it emits [`Action::Waiting`] (once per count).
//! - **Members and ranks.** At most `max_nodes` take part: the last plan's
//!   members first, then other nodes by name (a spare never displaces a
//!   healthy member). Ranks follow the members sorted by node name; a node's
//!   ranks are consecutive, one per endpoint.
//! - **Budgets.** A *failure* is a worker failure of a member, or a member lost
//!   (its lease expired or its record was deleted), counted once per node and
//!   round. A *scale event* is a plan, after this leader's first, that admits a
//!   node the previous plan did not have (a node back from a failure counts
//!   too). More than `max_failures` failures or `max_scale_events` scale events
//!   emit [`Action::Failed`]; the machine then does nothing more.
//! - **Cooldown.** A failed node is kept out for `cooldown`: while it cools
//!   down its record is remembered but ignored; when the cooldown has passed it
//!   is admitted at the next `tick` (or event).
//!
//! Budgets are counted by this machine, so they are per leader: a new leader
//! starts with full budgets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keyspace::validate_name;

/// What a node tells the rendezvous about itself (`jobs/{job}/nodes/{node}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's name, unique in the job (a key segment).
    pub node: String,
    /// The host other nodes reach this one at (`--advertise-host`, or the
    /// address it reaches the store from).
    pub host: String,
    /// One collective listener address per local worker, in local rank order.
    pub endpoints: Vec<String>,
    /// Workers the node runs (`workers.nproc`).
    pub devices: u32,
    /// The kiln version the node runs.
    pub version: String,
    /// The agent's presence listener (`host:port`, [`crate::presence`]):
    /// other agents hold a connection to it and revoke this node's lease
    /// when its process dies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<String>,
}

impl NodeRecord {
    /// Checks what the rendezvous relies on: a valid name and at least one endpoint.
    pub fn validate(&self) -> Result<()> {
        validate_name("node", &self.node)?;
        if self.endpoints.is_empty() {
            return Err(Error::invalid(
                "node record",
                format!(
                    "node {} has no endpoints: it needs one per worker",
                    self.node
                ),
            ));
        }
        Ok(())
    }
}

/// One node's place in a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanMember {
    /// The node's name ([`NodeRecord::node`]).
    pub node: String,
    /// Rank of the node's first worker; its workers take consecutive ranks.
    pub first_rank: u32,
    /// The node's collective endpoints, in local rank order, as its record
    /// gave them.
    pub endpoints: Vec<String>,
}

/// The assignment of one round (`jobs/{job}/rounds/{round}/plan`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The job the round belongs to.
    pub job: String,
    /// The fencing token: anything carrying an older round is refused.
    pub round: u64,
    /// Workers in the round over all members (the length of `peers`).
    pub world_size: u32,
    /// Sorted by node name.
    pub members: Vec<PlanMember>,
    /// `peers[rank]`: the collective endpoint of each rank.
    pub peers: Vec<String>,
    /// The round's ring secret, hex (32 random bytes): the ranks' collective
    /// ring admits only connections that prove they know it. Set by the
    /// leader when it writes the plan ([`Plan::with_new_secret`]); anyone who
    /// can read the store can read it, so the store must be protected.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
}

impl Plan {
    /// This plan with a fresh ring secret from the operating system's random
    /// source.
    pub fn with_new_secret(mut self) -> std::io::Result<Self> {
        use std::io::Read;
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        self.secret = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(self)
    }

    /// The ring secret's bytes; an error for a plan without one (written by
    /// an older kiln) or with a malformed one.
    pub fn secret_bytes(&self) -> Result<Vec<u8>, String> {
        let text = &self.secret;
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "round {} of job {} has no valid ring secret (a plan written by another kiln version?)",
                self.round, self.job
            ));
        }
        Ok((0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("checked hex"))
            .collect())
    }

    /// This node's place in the plan, if it is a member.
    pub fn member(&self, node: &str) -> Option<&PlanMember> {
        self.members.iter().find(|m| m.node == node)
    }
}

/// Rendezvous parameters of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// The job's name (a key segment).
    pub job: String,
    /// Fewest nodes a round may start with.
    pub min_nodes: usize,
    /// Most nodes a round takes; more are kept as spares.
    pub max_nodes: usize,
    /// How long membership must stay unchanged before a round closes with
    /// fewer than `max_nodes`.
    pub settle: Duration,
    /// Failures tolerated over the job's life (under this leader).
    pub max_failures: u32,
    /// Scale events tolerated over the job's life (under this leader).
    pub max_scale_events: u32,
    /// How long a failed node is kept out.
    pub cooldown: Duration,
}

impl RendezvousConfig {
    /// The rendezvous of `job` as its spec's `[elastic]` section sets it.
    pub fn from_elastic(job: &str, elastic: &kiln_proto::spec::ElasticSpec) -> RendezvousConfig {
        RendezvousConfig {
            job: job.to_string(),
            min_nodes: elastic.min_nodes,
            max_nodes: elastic.max_nodes(),
            settle: Duration::from_secs_f64(elastic.settle_secs),
            max_failures: elastic.max_failures,
            max_scale_events: elastic.max_scale_events,
            cooldown: Duration::from_secs_f64(elastic.cooldown_secs),
        }
    }

    /// Checks the job name and `1 <= min_nodes <= max_nodes`.
    pub fn validate(&self) -> Result<()> {
        validate_name("job", &self.job)?;
        if self.min_nodes == 0 || self.max_nodes < self.min_nodes {
            return Err(Error::invalid(
                "rendezvous config",
                format!(
                    "need 1 <= min_nodes <= max_nodes, got min_nodes {} and max_nodes {}",
                    self.min_nodes, self.max_nodes
                ),
            ));
        }
        Ok(())
    }
}

/// Something the rendezvous must know about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A node record appeared or changed.
    NodeJoined(NodeRecord),
    /// A node record disappeared (lease expired or key deleted).
    NodeLost {
        /// The lost node's name.
        node: String,
    },
    /// A worker of a node failed.
    WorkerFailed {
        /// The node the worker runs on.
        node: String,
        /// What the worker failed with, for the failure's reason.
        error: String,
    },
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this plan, create-only, at its round.
    WritePlan(Plan),
    /// The job cannot continue.
    Failed {
        /// Why, for the job's status and the user.
        reason: String,
    },
    /// A round is open but too few nodes are present.
    Waiting {
        /// Nodes present (records not cooling down).
        present: usize,
        /// Nodes the round needs (`min_nodes`).
        min: usize,
    },
}

/// The rendezvous of one job, as run by its leader. See the [module docs](self).
#[derive(Debug)]
pub struct Rendezvous {
    cfg: RendezvousConfig,
    /// The last round planned (by this machine or before it).
    round: u64,
    /// The last plan this machine emitted or resumed from.
    last_plan: Option<Plan>,
    /// Nodes that may take part, by name.
    present: BTreeMap<String, NodeRecord>,
    /// Records of nodes that are cooling down, admitted when it ends.
    cooling: BTreeMap<String, NodeRecord>,
    /// When each failed node's cooldown ends (kept even without a record, so
    /// that a rejoin during the cooldown is held back).
    cooldown_until: HashMap<String, Instant>,
    /// When membership last changed: the settle window starts there.
    last_change: Option<Instant>,
    /// A member failed since the last plan: its peers must re-form even if
    /// the membership ends up the same.
    member_failed: bool,
    /// Nodes whose failure this round was already counted.
    failed_this_round: BTreeSet<String>,
    failures: u32,
    scale_events: u32,
    /// The present count last reported with `Waiting`, to report each once.
    waiting_reported: Option<usize>,
    failed: bool,
}

impl Rendezvous {
    /// A machine for a job whose last planned round is `last_round` (0 for a new
    /// job): its first plan is round `last_round + 1`.
    ///
    /// `cfg` should have passed [`RendezvousConfig::validate`].
    pub fn new(cfg: RendezvousConfig, last_round: u64) -> Self {
        debug_assert!(cfg.validate().is_ok(), "invalid rendezvous config {cfg:?}");
        Rendezvous {
            cfg,
            round: last_round,
            last_plan: None,
            present: BTreeMap::new(),
            cooling: BTreeMap::new(),
            cooldown_until: HashMap::new(),
            last_change: None,
            member_failed: false,
            failed_this_round: BTreeSet::new(),
            failures: 0,
            scale_events: 0,
            waiting_reported: None,
            failed: false,
        }
    }

    /// A machine that takes over a job whose last plan is `plan` (a new
    /// leader): when the same nodes come back with the same records, no new
    /// round is needed.
    pub fn resume(cfg: RendezvousConfig, plan: Plan) -> Self {
        let mut machine = Self::new(cfg, plan.round);
        machine.last_plan = Some(plan);
        machine
    }

    /// The last round planned.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The last plan emitted (or resumed from).
    pub fn last_plan(&self) -> Option<&Plan> {
        self.last_plan.as_ref()
    }

    /// Whether the machine emitted [`Action::Failed`].
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Nodes present (not cooling down), sorted by name.
    pub fn present(&self) -> impl Iterator<Item = &str> {
        self.present.keys().map(String::as_str)
    }

    /// The next instant at which [`tick`](Self::tick) may act on its own (a
    /// settle window or a cooldown ends), if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.failed {
            return None;
        }
        let cooldowns = self
            .cooling
            .keys()
            .filter_map(|node| self.cooldown_until.get(node).copied());
        let settle = match self.last_change {
            Some(changed) if self.round_open() && self.present.len() >= self.cfg.min_nodes => {
                Some(changed + self.cfg.settle)
            }
            _ => None,
        };
        cooldowns.chain(settle).min()
    }

    /// Applies an event that happened at `now`.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        self.on_events([event], now)
    }

    /// Applies events that happened together at `now` (a listing of the
    /// store), then acts once: a round does not close on part of a snapshot.
    pub fn on_events(
        &mut self,
        events: impl IntoIterator<Item = Event>,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for event in events {
            if self.failed {
                return actions;
            }
            self.apply(event, now, &mut actions);
        }
        if !self.failed {
            actions.extend(self.tick(now));
        }
        actions
    }

    fn apply(&mut self, event: Event, now: Instant, actions: &mut Vec<Action>) {
        match event {
            Event::NodeJoined(record) => self.node_joined(record, now),
            Event::NodeLost { node } => {
                self.cooling.remove(&node);
                if self.present.remove(&node).is_some() {
                    self.last_change = Some(now);
                    if self.is_member(&node) {
                        let reason = format!("node {node} was lost");
                        self.member_failed_at(&node, reason, now, actions);
                    }
                }
            }
            Event::WorkerFailed { node, error } => {
                if self.is_member(&node) && self.present.contains_key(&node) {
                    let reason = format!("a worker on node {node} failed: {error}");
                    self.member_failed_at(&node, reason, now, actions);
                }
            }
        }
    }

    /// Lets time pass: admits nodes whose cooldown ended and closes the open
    /// round when its conditions hold.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        if self.failed {
            return Vec::new();
        }
        self.admit_cooled(now);
        if !self.round_open() {
            self.waiting_reported = None;
            return Vec::new();
        }
        let present = self.present.len();
        if present < self.cfg.min_nodes {
            if self.waiting_reported == Some(present) {
                return Vec::new();
            }
            self.waiting_reported = Some(present);
            return vec![Action::Waiting {
                present,
                min: self.cfg.min_nodes,
            }];
        }
        self.waiting_reported = None;
        let settled = self
            .last_change
            .is_none_or(|changed| now >= changed + self.cfg.settle);
        if present < self.cfg.max_nodes && !settled {
            return Vec::new();
        }
        self.close_round()
    }

    fn node_joined(&mut self, record: NodeRecord, now: Instant) {
        let node = record.node.clone();
        match self.cooldown_until.get(&node) {
            Some(until) if now < *until => {
                // Held back until the cooldown ends; a record it replaced is gone.
                if self.present.remove(&node).is_some() {
                    self.last_change = Some(now);
                }
                self.cooling.insert(node, record);
                return;
            }
            Some(_) => {
                self.cooldown_until.remove(&node);
            }
            None => {}
        }
        if self.present.get(&node) != Some(&record) {
            self.present.insert(node, record);
            self.last_change = Some(now);
        }
    }

    fn member_failed_at(
        &mut self,
        node: &str,
        reason: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        if !self.failed_this_round.insert(node.to_string()) {
            return;
        }
        self.member_failed = true;
        self.failures += 1;
        tracing::warn!(
            job = self.cfg.job,
            round = self.round,
            node,
            failures = self.failures,
            max_failures = self.cfg.max_failures,
            "{reason}"
        );
        if self.failures > self.cfg.max_failures {
            self.fail(
                format!(
                    "{reason}: {} failures exceed max_failures {}",
                    self.failures, self.cfg.max_failures
                ),
                actions,
            );
            return;
        }
        self.cooldown_until
            .insert(node.to_string(), now + self.cfg.cooldown);
        if let Some(record) = self.present.remove(node) {
            self.cooling.insert(node.to_string(), record);
            self.last_change = Some(now);
        }
    }

    fn admit_cooled(&mut self, now: Instant) {
        let cooled: Vec<String> = self
            .cooldown_until
            .iter()
            .filter(|(_, until)| now >= **until)
            .map(|(node, _)| node.clone())
            .collect();
        for node in cooled {
            self.cooldown_until.remove(&node);
            if let Some(record) = self.cooling.remove(&node) {
                self.present.insert(node, record);
                self.last_change = Some(now);
            }
        }
    }

    fn is_member(&self, node: &str) -> bool {
        self.last_plan
            .as_ref()
            .is_some_and(|plan| plan.member(node).is_some())
    }

    /// The nodes the next plan would take, sorted by name.
    fn selection(&self) -> Vec<&NodeRecord> {
        let mut chosen: BTreeMap<&str, &NodeRecord> = BTreeMap::new();
        let previous = self.last_plan.iter().flat_map(|plan| &plan.members);
        for member in previous {
            if let Some(record) = self.present.get(&member.node) {
                chosen.insert(&member.node, record);
            }
        }
        for (node, record) in &self.present {
            if chosen.len() >= self.cfg.max_nodes {
                break;
            }
            chosen.insert(node, record);
        }
        // A resumed plan may have more members than max_nodes.
        chosen.into_values().take(self.cfg.max_nodes).collect()
    }

    /// Whether the next plan would differ from the last one.
    fn round_open(&self) -> bool {
        let Some(plan) = &self.last_plan else {
            return true;
        };
        if self.member_failed {
            return true;
        }
        let selection = self.selection();
        selection.len() != plan.members.len()
            || selection.iter().zip(&plan.members).any(|(record, member)| {
                record.node != member.node || record.endpoints != member.endpoints
            })
    }

    fn close_round(&mut self) -> Vec<Action> {
        let selection: Vec<NodeRecord> = self.selection().into_iter().cloned().collect();
        let mut actions = Vec::new();
        if let Some(previous) = &self.last_plan {
            let grows = selection
                .iter()
                .any(|record| previous.member(&record.node).is_none());
            if grows {
                self.scale_events += 1;
                if self.scale_events > self.cfg.max_scale_events {
                    let reason = format!(
                        "{} scale events exceed max_scale_events {}",
                        self.scale_events, self.cfg.max_scale_events
                    );
                    self.fail(reason, &mut actions);
                    return actions;
                }
            }
        }
        let mut members = Vec::with_capacity(selection.len());
        let mut peers = Vec::new();
        for record in selection {
            members.push(PlanMember {
                node: record.node,
                first_rank: peers.len() as u32,
                endpoints: record.endpoints.clone(),
            });
            peers.extend(record.endpoints);
        }
        self.round += 1;
        let plan = Plan {
            job: self.cfg.job.clone(),
            round: self.round,
            world_size: peers.len() as u32,
            members,
            peers,
            // The driver adds it as it writes the plan: the machine draws no randomness.
            secret: String::new(),
        };
        self.last_plan = Some(plan.clone());
        self.member_failed = false;
        self.failed_this_round.clear();
        actions.push(Action::WritePlan(plan));
        actions
    }

    fn fail(&mut self, reason: String, actions: &mut Vec<Action>) {
        self.failed = true;
        actions.push(Action::Failed { reason });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn config(min: usize, max: usize) -> RendezvousConfig {
        RendezvousConfig {
            job: "job".to_string(),
            min_nodes: min,
            max_nodes: max,
            settle: 5 * SEC,
            max_failures: 10,
            max_scale_events: 10,
            cooldown: Duration::ZERO,
        }
    }

    fn record(node: &str, workers: usize) -> NodeRecord {
        NodeRecord {
            node: node.to_string(),
            host: format!("{node}.local"),
            endpoints: (0..workers)
                .map(|i| format!("{node}:{}", 7000 + i))
                .collect(),
            devices: workers as u32,
            version: "test".to_string(),
            presence: None,
        }
    }

    fn joined(node: &str) -> Event {
        Event::NodeJoined(record(node, 1))
    }

    fn lost(node: &str) -> Event {
        Event::NodeLost {
            node: node.to_string(),
        }
    }

    fn worker_failed(node: &str) -> Event {
        Event::WorkerFailed {
            node: node.to_string(),
            error: "exit status 1".to_string(),
        }
    }

    fn plans(actions: &[Action]) -> Vec<&Plan> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::WritePlan(plan) => Some(plan),
                _ => None,
            })
            .collect()
    }

    fn only_plan(actions: Vec<Action>) -> Plan {
        match actions.as_slice() {
            [Action::WritePlan(plan)] => plan.clone(),
            other => panic!("expected one plan, got {other:?}"),
        }
    }

    fn nodes(plan: &Plan) -> Vec<&str> {
        plan.members.iter().map(|m| m.node.as_str()).collect()
    }

    #[test]
    fn a_round_closes_at_once_when_max_nodes_are_present() {
        let t0 = Instant::now();
        let mut rdzv = Rendezvous::new(config(2, 3), 0);
        assert_eq!(
            rdzv.on_event(joined("b"), t0),
            [Action::Waiting { present: 1, min: 2 }]
        );
        assert!(
            rdzv.on_event(joined("a"), t0).is_empty(),
            "min reached, settle not passed"
        );
        let plan = only_plan(rdzv.on_event(joined("c"), t0));
        assert_eq!(plan.round, 1);
        assert_eq!(nodes(&plan), ["a", "b", "c"]);
        assert_eq!(rdzv.round(), 1);
    }

    #[test]
    fn a_round_closes_with_min_nodes_once_membership_settles() {
        let t0 = Instant::now();
        let mut rdzv = Rendezvous::new(config(2, 4), 0);
        rdzv.on_event(joined("a"), t0);
        rdzv.on_event(joined("b"), t0 + SEC);
        assert_eq!(rdzv.next_deadline(), Some(t0 + 6 * SEC));
        // Another join restarts the settle window.
        assert!(rdzv.on_event(joined("c"), t0 + 4 * SEC).is_empty());
        assert!(rdzv.tick(t0 + 6 * SEC).is_empty());
        assert!(
            rdzv.tick(t0 + 9 * SEC - Duration::from_millis(1))
                .is_empty()
        );
        let plan = only_plan(rdzv.tick(t0 + 9 * SEC));
        assert_eq!(nodes(&plan), ["a", "b", "c"]);
        // Nothing changed since: no new round, however long we wait.
        assert!(rdzv.tick(t0 + 1000 * SEC).is_empty());
        assert_eq!(rdzv.next_deadline(), None);
    }

    #[test]
    fn below_min_nodes_it_waits_and_reports_each_count_once() {
        let t0 = Instant::now();
        let mut rdzv = Rendezvous::new(config(3, 3), 0);
        assert_eq!(rdzv.tick(t0), [Action::Waiting { present: 0, min: 3 }]);
        assert!(rdzv.tick(t0 + SEC).is_empty());
        assert_eq!(
            rdzv.on_event(joined("a"), t0),
            [Action::Waiting { present: 1, min: 3 }]
        );
        assert!(
            rdzv.tick(t0 + 100 * SEC).is_empty(),
            "settle never closes a round below min"
        );
    }

    #[test]
    fn ranks_follow_sorted_node_names_and_each_node_gets_consecutive_ranks() {
        let t0 = Instant::now();
        let mut rdzv = Rendezvous::new(config(3, 3), 0);
        rdzv.on_event(Event::NodeJoined(record("b", 2)), t0);
        rdzv.on_event(Event::NodeJoined(record("c", 3)), t0);
        let plan = only_plan(rdzv.on_event(Event::NodeJoined(record("a", 1)), t0));
        let ranks: Vec<(&str, u32)> = plan
            .members
            .iter()
            .map(|m| (m.node.as_str(), m.first_rank))
            .collect();
        assert_eq!(ranks, [("a", 0), ("b", 1), ("c", 3)]);
        assert_eq!(plan.world_size, 6);
        assert_eq!(
            plan.peers,
            ["a:7000", "b:7000", "b:7001", "c:7000", "c:7001", "c:7002"]
        );
        assert_eq!(plan.job, "job");
    }

    #[test]
    fn a_membership_change_opens_the_next_round() {
        let t0 = Instant::now();
        let mut rdzv = Rendezvous::new(config(1, 4), 7);
        rdzv.on_event(joined("a"), t0);
        assert_eq!(only_plan(rdzv.tick(t0 + 5 * SEC)).round, 8);
        // The same record again is no change.
        assert!(rdzv.on_event(joined("a"), t0 + 6 * SEC).is_empty());
        assert!(rdzv.tick(t0 + 20 * SEC).is_empty());
        // A changed record is.
        rdzv.on_event(Event::NodeJoined(record("a", 2)), t0 + 21 * SEC);
        let plan = only_plan(rdzv.tick(t0 + 26 * SEC));
        assert_eq!((plan.round, plan.world_size), (9, 2));
        // So is a join.
        rdzv.on_event(joined("b"), t0 + 30 * SEC);
        let plan = only_plan(rdzv.tick(t0 + 35 * SEC));
        assert_eq!((plan.round, nodes(&plan)), (10, vec!["a", "b"]));
    }

    #[test]
    fn spares_wait_and_never_displace_members() {
        let t0 = Instant::now();
        let mut rdzv = Rendezvous::new(config(1, 2), 0);
        rdzv.on_event(joined("b"), t0);
        let plan = only_plan(rdzv.on_event(joined("c"), t0));
        assert_eq!(nodes(&plan), ["b", "c"]);
        // "a" sorts first but the round is full: it is a spare.
        assert!(rdzv.on_event(joined("a"), t0 + SEC).is_empty());
        assert!(rdzv.tick(t0 + 100 * SEC).is_empty());
        // When a member goes, the spare steps in (at once: max is reached).
        let plan = only_plan(rdzv.on_event(lost("c"), t0 + 101 * SEC));
        assert_eq!((plan.round, nodes(&plan)), (2, vec!["a", "b"]));
    }

    #[test]
    fn a_lost_member_is_a_failure_and_the_survivors_form_a_new_round() {
        let t0 = Instant::now();
        let mut rdzv = Rendezvous::new(config(2, 3), 0);
        for node in ["a", "b", "c"] {
            rdzv.on_event(joined(node), t0);
        }
        assert_eq!(rdzv.round(), 1);
        assert!(
            rdzv.on_event(lost("b"), t0 + SEC).is_empty(),
            "settle first"
        );
        let plan = only_plan(rdzv.tick(t0 + 6 * SEC));
        assert_eq!((plan.round, nodes(&plan)), (2, vec!["a", "c"]));
        assert_eq!(plan.members[1].first_rank, 1);
        assert_eq!(rdzv.failures, 1);
        assert_eq!(rdzv.scale_events, 0);
    }

    #[test]
    fn nodes_that_come_and_go_before_the_first_plan_are_not_failures() {
        let t0 = Instant::now();
        let mut cfg = config(2, 2);
        cfg.max_failures = 0;
        let mut rdzv = Rendezvous::new(cfg, 0);
        rdzv.on_event(joined("a"), t0);
        rdzv.on_event(lost("a"), t0);
        rdzv.on_event(joined("b"), t0);
        let actions = rdzv.on_event(joined("a"), t0);
        assert_eq!(nodes(&only_plan(actions)), ["a", "b"]);
    }

    #[test]
    fn failures_beyond_the_budget_fail_the_job() {
        let t0 = Instant::now();
        let mut cfg = config(1, 2);
        cfg.max_failures = 1;
        let mut rdzv = Rendezvous::new(cfg, 0);
        rdzv.on_event(joined("a"), t0);
        rdzv.on_event(joined("b"), t0);
        // First failure: a new round with the same members (cooldown is zero).
        let plan = only_plan(rdzv.on_event(worker_failed("a"), t0 + SEC));
        assert_eq!((plan.round, nodes(&plan)), (2, vec!["a", "b"]));
        // The second one spends the budget.
        let actions = rdzv.on_event(worker_failed("b"), t0 + 2 * SEC);
        match actions.as_slice() {
            [Action::Failed { reason }] => {
                assert!(
                    reason.contains("node b") && reason.contains("max_failures 1"),
                    "{reason}"
                );
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(rdzv.is_failed());
        assert!(rdzv.on_event(joined("c"), t0 + 3 * SEC).is_empty());
        assert!(rdzv.tick(t0 + 100 * SEC).is_empty());
    }

    #[test]
    fn a_failure_is_counted_once_per_node_and_round() {
        let t0 = Instant::now();
        let mut cfg = config(2, 2);
        cfg.max_failures = 1;
        cfg.cooldown = 10 * SEC;
        let mut rdzv = Rendezvous::new(cfg, 0);
        rdzv.on_event(joined("a"), t0);
        rdzv.on_event(Event::NodeJoined(record("b", 2)), t0);
        // Both workers of b fail, then b's lease expires: one failure.
        rdzv.on_event(worker_failed("b"), t0 + SEC);
        rdzv.on_event(worker_failed("b"), t0 + SEC);
        rdzv.on_event(lost("b"), t0 + 2 * SEC);
        assert!(!rdzv.is_failed());
        // Failures of nodes that are not members are stale reports.
        rdzv.on_event(worker_failed("z"), t0 + 2 * SEC);
        assert!(!rdzv.is_failed());
        assert_eq!(rdzv.failures, 1);
    }

    #[test]
    fn scale_events_have_their_own_budget() {
        let t0 = Instant::now();
        let mut cfg = config(1, 10);
        cfg.settle = Duration::ZERO;
        cfg.max_failures = 0;
        cfg.max_scale_events = 1;
        let mut rdzv = Rendezvous::new(cfg, 0);
        // The first plan is no scale event.
        assert_eq!(only_plan(rdzv.on_event(joined("a"), t0)).round, 1);
        assert_eq!(only_plan(rdzv.on_event(joined("b"), t0 + SEC)).round, 2);
        let actions = rdzv.on_event(joined("c"), t0 + 2 * SEC);
        match actions.as_slice() {
            [Action::Failed { reason }] => {
                assert!(reason.contains("max_scale_events 1"), "{reason}")
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(plans(&rdzv.tick(t0 + 3 * SEC)).is_empty());
    }

    #[test]
    fn a_failed_node_is_kept_out_for_its_cooldown() {
        let t0 = Instant::now();
        let mut cfg = config(1, 3);
        cfg.cooldown = 30 * SEC;
        let mut rdzv = Rendezvous::new(cfg, 0);
        for node in ["a", "b", "c"] {
            rdzv.on_event(joined(node), t0);
        }
        let t1 = t0 + 10 * SEC;
        rdzv.on_event(lost("a"), t1);
        let plan = only_plan(rdzv.tick(t1 + 5 * SEC));
        assert_eq!(nodes(&plan), ["b", "c"]);
        // a comes back during its cooldown: ignored.
        assert!(rdzv.on_event(joined("a"), t1 + 10 * SEC).is_empty());
        assert!(rdzv.tick(t1 + 29 * SEC).is_empty());
        assert_eq!(rdzv.present().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(rdzv.next_deadline(), Some(t1 + 30 * SEC));
        // Admitted at the first tick after it; max is reached so the round closes.
        let plan = only_plan(rdzv.tick(t1 + 30 * SEC));
        assert_eq!((plan.round, nodes(&plan)), (3, vec!["a", "b", "c"]));
    }

    #[test]
    fn a_node_whose_worker_failed_is_readmitted_after_its_cooldown() {
        let t0 = Instant::now();
        let mut cfg = config(1, 2);
        cfg.cooldown = 20 * SEC;
        let mut rdzv = Rendezvous::new(cfg, 0);
        rdzv.on_event(joined("a"), t0);
        rdzv.on_event(joined("b"), t0);
        // b's record stays in the store, but b sits out its cooldown.
        rdzv.on_event(worker_failed("b"), t0 + SEC);
        let plan = only_plan(rdzv.tick(t0 + 6 * SEC));
        assert_eq!(nodes(&plan), ["a"]);
        assert!(rdzv.tick(t0 + 20 * SEC).is_empty());
        let plan = only_plan(rdzv.tick(t0 + 21 * SEC));
        assert_eq!((plan.round, nodes(&plan)), (3, vec!["a", "b"]));
    }

    #[test]
    fn a_new_leader_resumes_without_a_new_round_when_nothing_changed() {
        let t0 = Instant::now();
        let mut first = Rendezvous::new(config(2, 2), 0);
        first.on_event(joined("a"), t0);
        let plan = only_plan(first.on_event(joined("b"), t0));

        let mut second = Rendezvous::resume(config(2, 2), plan);
        assert_eq!(second.round(), 1);
        second.on_event(joined("b"), t0 + SEC);
        assert!(second.on_event(joined("a"), t0 + SEC).is_empty());
        assert!(second.tick(t0 + 100 * SEC).is_empty());
        // A change after the takeover opens round 2 as usual.
        second.on_event(lost("b"), t0 + 101 * SEC);
        assert_eq!(
            only_plan(second.on_event(joined("c"), t0 + 102 * SEC)).round,
            2
        );
    }

    #[test]
    fn a_batch_of_events_is_acted_on_as_a_whole() {
        let t0 = Instant::now();
        let mut cfg = config(1, 3);
        cfg.settle = Duration::ZERO;
        let mut rdzv = Rendezvous::new(cfg, 0);
        // One at a time, the first join would close a round of one.
        let plan = only_plan(rdzv.on_events([joined("b"), joined("a")], t0));
        assert_eq!(nodes(&plan), ["a", "b"]);
    }

    #[test]
    fn configs_are_validated() {
        assert!(config(1, 1).validate().is_ok());
        assert!(config(0, 1).validate().is_err());
        assert!(config(3, 2).validate().is_err());
        let mut cfg = config(1, 1);
        cfg.job = "a/b".to_string();
        assert!(cfg.validate().is_err());
        assert!(record("n", 0).validate().is_err());
        assert!(record("n", 1).validate().is_ok());
    }
}

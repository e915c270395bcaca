//! Key names: the one place that spells the keyspace of DESIGN.md §3.
//!
//! ```text
//! {root}/jobs/{job}/spec                      job spec as accepted (JSON)
//! {root}/jobs/{job}/status                    phase, round, world size, step, timings
//! {root}/jobs/{job}/leader                    election key for the rendezvous leader
//! {root}/jobs/{job}/nodes/{node}              node record (JSON NodeRecord), on the node's lease
//! {root}/jobs/{job}/rounds/{round}/plan       the round's plan (JSON Plan)
//! {root}/jobs/{job}/rounds/{round}/ready/{n}  per-node acks
//! {root}/jobs/{job}/progress/{rank}           last completed step, throughput
//! {root}/jobs/{job}/checkpoints/latest        last committed checkpoint
//! {root}/jobs/{job}/cancel                    cancel request (JSON), written once
//! {root}/jobs/{job}/logs/{node}/{worker}/{seq} a batch of a worker's log lines (text)
//! {root}/coordinator/leader                   election key of the coordinator replicas
//! ```
//!
//! Rounds are zero-padded to [`ROUND_DIGITS`] digits so that a listing of
//! `rounds/` is in round order. Job and node names are single path segments
//! (see [`validate_name`]).

use crate::error::{Error, Result};

/// The root of the keyspace unless configured otherwise.
pub const DEFAULT_ROOT: &str = "/kiln";

/// Digits of a round number in a key (rounds sort as strings).
pub const ROUND_DIGITS: usize = 10;

/// Digits of a log batch's sequence number in a key (batches sort as strings).
pub const LOG_SEQ_DIGITS: usize = 20;

/// Longest job or node name accepted (a DNS name fits).
const MAX_NAME_LEN: usize = 253;

/// The key names of every job under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    /// Without a trailing `/`.
    root: String,
}

impl Default for Keyspace {
    fn default() -> Self {
        Keyspace {
            root: DEFAULT_ROOT.to_string(),
        }
    }
}

impl Keyspace {
    /// A keyspace under `root`, which starts with `/` (a trailing `/` is
    /// dropped): `/kiln`, `/team-a/kiln`.
    pub fn new(root: &str) -> Result<Self> {
        let trimmed = root.strip_suffix('/').unwrap_or(root);
        if !trimmed.starts_with('/')
            || trimmed.len() < 2
            || trimmed.contains("//")
            || trimmed.chars().any(char::is_control)
        {
            return Err(Error::invalid(
                "keyspace root",
                format!("{root:?} must look like /kiln: a leading /, no empty segments"),
            ));
        }
        Ok(Keyspace {
            root: trimmed.to_string(),
        })
    }

    /// The root, without a trailing `/`.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Prefix of every job's keys.
    pub fn jobs_prefix(&self) -> String {
        format!("{}/jobs/", self.root)
    }

    /// Prefix of one job's keys.
    pub fn job_prefix(&self, job: &str) -> String {
        format!("{}/jobs/{job}/", self.root)
    }

    /// `jobs/{job}/spec`: the job spec as accepted (JSON).
    pub fn job_spec(&self, job: &str) -> String {
        format!("{}spec", self.job_prefix(job))
    }

    /// `jobs/{job}/status`: phase, round, world size, step, timings.
    pub fn job_status(&self, job: &str) -> String {
        format!("{}status", self.job_prefix(job))
    }

    /// `jobs/{job}/leader`: the election key of the job's rendezvous leader.
    pub fn job_leader(&self, job: &str) -> String {
        format!("{}leader", self.job_prefix(job))
    }

    /// `jobs/{job}/nodes/`: prefix of the node records.
    pub fn nodes_prefix(&self, job: &str) -> String {
        format!("{}nodes/", self.job_prefix(job))
    }

    /// `jobs/{job}/nodes/{node}`: a node's record, on the node's lease.
    pub fn node(&self, job: &str, node: &str) -> String {
        format!("{}{node}", self.nodes_prefix(job))
    }

    /// The node name of a node record key, or `None` for any other key.
    pub fn parse_node<'k>(&self, job: &str, key: &'k str) -> Option<&'k str> {
        let node = key.strip_prefix(&self.nodes_prefix(job))?;
        (!node.is_empty() && !node.contains('/')).then_some(node)
    }

    /// `jobs/{job}/rounds/`: prefix of every round's keys.
    pub fn rounds_prefix(&self, job: &str) -> String {
        format!("{}rounds/", self.job_prefix(job))
    }

    /// `jobs/{job}/rounds/{round}/`: prefix of one round's keys.
    pub fn round_prefix(&self, job: &str, round: u64) -> String {
        format!(
            "{}{round:0width$}/",
            self.rounds_prefix(job),
            width = ROUND_DIGITS
        )
    }

    /// `jobs/{job}/rounds/{round}/plan`: the round's plan, created once (the
    /// round number is the fencing token).
    pub fn plan(&self, job: &str, round: u64) -> String {
        format!("{}plan", self.round_prefix(job, round))
    }

    /// The round of a plan key, or `None` for any other key.
    pub fn parse_plan(&self, job: &str, key: &str) -> Option<u64> {
        let rest = key.strip_prefix(&self.rounds_prefix(job))?;
        let digits = rest.strip_suffix("/plan")?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    /// `jobs/{job}/rounds/{round}/ready/`: prefix of the round's acks.
    pub fn ready_prefix(&self, job: &str, round: u64) -> String {
        format!("{}ready/", self.round_prefix(job, round))
    }

    /// `jobs/{job}/rounds/{round}/ready/{node}`: a node's ack of the round.
    pub fn ready(&self, job: &str, round: u64, node: &str) -> String {
        format!("{}{node}", self.ready_prefix(job, round))
    }

    /// `jobs/{job}/progress/`: prefix of the per-rank progress reports.
    pub fn progress_prefix(&self, job: &str) -> String {
        format!("{}progress/", self.job_prefix(job))
    }

    /// `jobs/{job}/progress/{rank}`: a rank's last completed step and throughput.
    pub fn progress(&self, job: &str, rank: u32) -> String {
        format!("{}{rank}", self.progress_prefix(job))
    }

    /// `jobs/{job}/checkpoints/latest`: the last committed checkpoint.
    pub fn checkpoint_latest(&self, job: &str) -> String {
        format!("{}checkpoints/latest", self.job_prefix(job))
    }

    /// `jobs/{job}/cancel`: a request to cancel the job (JSON
    /// `CancelRequest`), written once by the job API; agents watch for it.
    pub fn job_cancel(&self, job: &str) -> String {
        format!("{}cancel", self.job_prefix(job))
    }

    /// `jobs/{job}/logs/`: prefix of every node's shipped log batches.
    pub fn logs_prefix(&self, job: &str) -> String {
        format!("{}logs/", self.job_prefix(job))
    }

    /// `jobs/{job}/logs/{node}/`: prefix of one node's log batches.
    pub fn node_logs_prefix(&self, job: &str, node: &str) -> String {
        format!("{}{node}/", self.logs_prefix(job))
    }

    /// `jobs/{job}/logs/{node}/{worker}/{seq}`: one batch of log lines of the
    /// node's worker slot `worker` (its local rank). Sequence numbers are
    /// zero-padded to [`LOG_SEQ_DIGITS`] digits so that a listing is in order.
    pub fn log_batch(&self, job: &str, node: &str, worker: usize, seq: u64) -> String {
        format!(
            "{}{worker}/{seq:0width$}",
            self.node_logs_prefix(job, node),
            width = LOG_SEQ_DIGITS
        )
    }

    /// The node, worker slot and sequence number of a log batch key, or `None`
    /// for any other key.
    pub fn parse_log_batch<'k>(&self, job: &str, key: &'k str) -> Option<(&'k str, usize, u64)> {
        let rest = key.strip_prefix(&self.logs_prefix(job))?;
        let mut parts = rest.split('/');
        let (node, worker, seq) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || node.is_empty() || seq.len() != LOG_SEQ_DIGITS {
            return None;
        }
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(worker) || !digits(seq) {
            return None;
        }
        Some((node, worker.parse().ok()?, seq.parse().ok()?))
    }

    /// The job a `jobs/{job}/{leaf}` key belongs to, when the key is exactly
    /// that leaf (`"spec"`, `"status"`): `None` for any other key.
    pub fn parse_job_leaf<'k>(&self, key: &'k str, leaf: &str) -> Option<&'k str> {
        let job = key
            .strip_prefix(&self.jobs_prefix())?
            .strip_suffix(leaf)?
            .strip_suffix('/')?;
        (!job.is_empty() && !job.contains('/')).then_some(job)
    }

    /// `coordinator/leader`: the election key of the coordinator replica that
    /// does background work (launching agents).
    pub fn coordinator_leader(&self) -> String {
        format!("{}/coordinator/leader", self.root)
    }
}

/// Checks that a job or node name is one key segment: non-empty, at most 253
/// bytes, no `/`, no whitespace or control characters, and not `.` or `..`.
/// `what` names the argument in the error (`"job"`, `"node"`).
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let problem = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("is longer than 253 bytes")
    } else if name.contains('/') {
        Some("must not contain '/'")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace or control characters")
    } else if name == "." || name == ".." {
        Some("must not be '.' or '..'")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(Error::invalid(what, format!("{name:?} {problem}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_design() {
        let ks = Keyspace::default();
        assert_eq!(ks.job_spec("j"), "/kiln/jobs/j/spec");
        assert_eq!(ks.job_status("j"), "/kiln/jobs/j/status");
        assert_eq!(ks.job_leader("j"), "/kiln/jobs/j/leader");
        assert_eq!(ks.nodes_prefix("j"), "/kiln/jobs/j/nodes/");
        assert_eq!(ks.node("j", "n1"), "/kiln/jobs/j/nodes/n1");
        assert_eq!(ks.plan("j", 7), "/kiln/jobs/j/rounds/0000000007/plan");
        assert_eq!(
            ks.ready("j", 7, "n1"),
            "/kiln/jobs/j/rounds/0000000007/ready/n1"
        );
        assert_eq!(ks.progress("j", 3), "/kiln/jobs/j/progress/3");
        assert_eq!(ks.checkpoint_latest("j"), "/kiln/jobs/j/checkpoints/latest");
        assert_eq!(ks.job_cancel("j"), "/kiln/jobs/j/cancel");
        assert_eq!(ks.coordinator_leader(), "/kiln/coordinator/leader");
        assert_eq!(
            ks.parse_job_leaf("/kiln/jobs/j/status", "status"),
            Some("j")
        );
        assert_eq!(ks.parse_job_leaf("/kiln/jobs/j/spec", "status"), None);
        assert_eq!(
            ks.parse_job_leaf("/kiln/jobs/j/nodes/status", "status"),
            None
        );
        assert_eq!(ks.parse_job_leaf("/kiln/jobs//status", "status"), None);
    }

    #[test]
    fn rounds_sort_as_strings() {
        let ks = Keyspace::default();
        let mut keys: Vec<String> = [10, 9, 100, 1].iter().map(|r| ks.plan("j", *r)).collect();
        keys.sort();
        let rounds: Vec<u64> = keys
            .iter()
            .map(|k| ks.parse_plan("j", k).unwrap())
            .collect();
        assert_eq!(rounds, [1, 9, 10, 100]);
    }

    #[test]
    fn parsers_accept_only_their_keys() {
        let ks = Keyspace::new("/a/b/").unwrap();
        assert_eq!(ks.root(), "/a/b");
        assert_eq!(ks.parse_node("j", "/a/b/jobs/j/nodes/n1"), Some("n1"));
        assert_eq!(ks.parse_node("j", "/a/b/jobs/j/nodes/n1/x"), None);
        assert_eq!(ks.parse_node("j", "/a/b/jobs/jj/nodes/n1"), None);
        assert_eq!(ks.parse_plan("j", &ks.plan("j", 42)), Some(42));
        assert_eq!(ks.parse_plan("j", &ks.ready("j", 42, "n")), None);
        assert_eq!(ks.parse_plan("j", "/a/b/jobs/j/rounds/x1/plan"), None);
        let batch = ks.log_batch("j", "n1", 2, 7);
        assert_eq!(batch, "/a/b/jobs/j/logs/n1/2/00000000000000000007");
        assert_eq!(ks.parse_log_batch("j", &batch), Some(("n1", 2, 7)));
        assert_eq!(ks.parse_log_batch("j", "/a/b/jobs/j/logs/n1/2"), None);
        assert_eq!(
            ks.parse_log_batch("j", "/a/b/jobs/j/logs/n1/x/00000000000000000007"),
            None
        );
        assert_eq!(ks.parse_log_batch("j", "/a/b/jobs/j/logs/n1/2/7"), None);
    }

    #[test]
    fn bad_roots_and_names_are_refused() {
        for root in ["", "/", "kiln", "/a//b", "//"] {
            assert!(Keyspace::new(root).is_err(), "{root:?}");
        }
        for name in ["", "a/b", "a b", "..", "tab\t"] {
            assert!(validate_name("node", name).is_err(), "{name:?}");
        }
        validate_name("node", "node-0.rack_1").unwrap();
    }
}

//! A coordinator replica's background work, done by one elected replica at a
//! time: launching the agents of submitted jobs.
//!
//! Every replica serves the job API ([`crate::api`]); only the replica that
//! holds the election key `{root}/coordinator/leader` (on its lease) runs
//! [`run_background`]'s work. When it dies its lease expires, another replica
//! wins the election and carries on: all state is in the store, so nothing is
//! lost and nothing is done twice.
//!
//! Launching is fenced by the job's status, not by leadership (leadership can
//! end without the leader noticing at once): a launcher first claims the job
//! with a compare-and-swap that writes a [`LaunchRecord`] into a pending,
//! unclaimed status, and starts agents only when its claim is the one stored.
//! Of any number of replicas, old and new leaders, exactly one launches a job.
//! The price: a launcher that dies between its claim and starting the agents
//! leaves the job claimed and pending; `kiln cancel` and a new submission
//! recover it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::spec::JobSpec;
use tokio_util::sync::CancellationToken;

use crate::election;
use crate::error::{Error, Result};
use crate::keyspace::Keyspace;
use crate::status::{self, JobStatus, LaunchRecord, LaunchedAgent, Phase};
use crate::store::{LeaseId, Store, WatchEvent};

/// Longest pause between attempts after the store failed.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How a replica does its background work.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's name in the election and in the records it writes.
    pub name: String,
    /// TTL of the election lease: a dead leader is replaced about this long
    /// after it died.
    pub lease_ttl: Duration,
    /// Starts agents for submitted jobs; `None`: the elected replica only
    /// holds the election (agents are started by Slurm, Kubernetes or hand).
    pub launcher: Option<LocalLauncher>,
}

/// Starts `kiln agent` processes on this machine, one per node of a job.
#[derive(Debug, Clone)]
pub struct LocalLauncher {
    /// The kiln binary the agents run.
    pub kiln_bin: PathBuf,
    /// The store URL the agents join through (the coordinator's own; it must
    /// be a shared store, not `mem://`).
    pub store_url: String,
    /// The agents' `--data-dir`: run folders, checkpoints (unless the spec
    /// names `checkpoint.url`) and agent logs.
    pub data_dir: PathBuf,
}

/// Campaigns for the coordinator election and, while elected, does the
/// background work, until `cancel` fires (then resigns at once, so another
/// replica takes over without waiting for the lease to expire). Store errors
/// end the term and the replica campaigns again after a backoff.
pub async fn run_background(
    store: Arc<dyn Store>,
    ks: Keyspace,
    config: ReplicaConfig,
    cancel: CancellationToken,
) -> Result<()> {
    let mut backoff = Duration::from_millis(250);
    loop {
        match one_term(&store, &ks, &config, &cancel).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(replica = config.name, %error, "coordinator term ended; campaigning again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cancel.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One lease: campaign, lead until the term ends. `Ok` only when cancelled.
async fn one_term(
    store: &Arc<dyn Store>,
    ks: &Keyspace,
    config: &ReplicaConfig,
    cancel: &CancellationToken,
) -> Result<()> {
    let lease = store.grant_lease(config.lease_ttl).await?;
    // Aborted when this term ends however it ends (also when the task running
    // it is dropped): a dead replica's lease must lapse.
    let mut keeper = AbortOnDrop(tokio::spawn(keep_alive(
        store.clone(),
        lease,
        config.lease_ttl,
    )));
    let key = ks.coordinator_leader();
    let outcome = tokio::select! {
        term = election::lead_once(store.clone(), &key, &config.name, lease, cancel, |fence| {
            tracing::info!(
                replica = config.name,
                term = fence.create_revision,
                "elected: this replica does the background work"
            );
            lead(store, ks, config)
        }) => match term {
            Err(error) => Err(error),
            Ok(election::Term::Cancelled(resigned)) => resigned,
            Ok(election::Term::Lost(lost)) => lost.and(Err(Error::Conflict {
                message: "the coordinator election key changed hands".into(),
            })),
            Ok(election::Term::Done(Ok(()), guard)) => guard.resign().await,
            Ok(election::Term::Done(Err(error), _)) => Err(error),
        },
        lost = &mut keeper.0 => Err(lease_lost(lost)),
    };
    drop(keeper);
    // Ends the term at once (also for a campaign dropped mid-way); the lease
    // may already be gone.
    let _ = store.revoke_lease(lease).await;
    outcome
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lease_lost(outcome: std::result::Result<Error, tokio::task::JoinError>) -> Error {
    match outcome {
        Ok(error) => error,
        Err(error) => Error::unavailable(format!("lease keep-alive task ended: {error}")),
    }
}

/// Keeps `lease` alive every third of its TTL; returns why it stopped (the
/// lease expired, or the store refused for longer than the TTL).
async fn keep_alive(store: Arc<dyn Store>, lease: LeaseId, ttl: Duration) -> Error {
    let period = ttl / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match store.keep_alive(lease).await {
            Ok(()) => last_ok = tokio::time::Instant::now(),
            Err(error @ Error::NotFound { .. }) => return error,
            Err(error) if last_ok.elapsed() >= ttl => return error,
            Err(error) => tracing::warn!(lease, %error, "lease keep-alive failed; retrying"),
        }
    }
}

/// The elected replica's work. Returns only with an error.
async fn lead(store: &Arc<dyn Store>, ks: &Keyspace, config: &ReplicaConfig) -> Result<()> {
    let Some(launcher) = &config.launcher else {
        return std::future::pending().await;
    };
    let prefix = ks.jobs_prefix();
    loop {
        // List every job, then follow changes from the listing's revision:
        // a job submitted at any moment is seen.
        let (kvs, revision) = store.get_prefix(&prefix).await?;
        let mut jobs = std::collections::BTreeSet::new();
        for kv in &kvs {
            if let Some(job) = ks.parse_job_leaf(&kv.key, "spec") {
                jobs.insert(job.to_string());
            }
        }
        for job in jobs {
            consider(store, ks, config, launcher, &job).await?;
        }
        let mut watch = store.watch_prefix(&prefix, Some(revision)).await?;
        loop {
            let event = match watch.try_next().await {
                Ok(Some(event)) => event,
                Ok(None) => return Err(Error::unavailable("the store closed the jobs watch")),
                Err(Error::Compacted { .. }) => break,
                Err(error) => return Err(error),
            };
            let WatchEvent::Put(kv) = event else { continue };
            if let Some(job) = ks.parse_job_leaf(&kv.key, "status") {
                // Most status writes are progress: decide from the value
                // itself whether the job could need agents.
                match JobStatus::from_json(&kv.key, &kv.value) {
                    Ok(record) if wants_agents(&record) => {
                        consider(store, ks, config, launcher, job).await?;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(job, %error, "unreadable job status"),
                }
            } else if let Some(job) = ks.parse_job_leaf(&kv.key, "spec") {
                consider(store, ks, config, launcher, job).await?;
            }
        }
    }
}

/// A job needs agents from a launcher when it was submitted through the job
/// API (a job started by hand has agents already), is still pending, nobody
/// claimed it, and no cancel was requested.
fn wants_agents(record: &JobStatus) -> bool {
    record.phase == Phase::Pending
        && record.submitted_at.is_some()
        && record.launch.is_none()
        && record.cancel_requested_at.is_none()
}

/// Launches the job's agents if it wants them. Errors are the store's (they
/// end the term); a job that cannot be launched is marked failed instead.
async fn consider(
    store: &Arc<dyn Store>,
    ks: &Keyspace,
    config: &ReplicaConfig,
    launcher: &LocalLauncher,
    job: &str,
) -> Result<()> {
    let record = match status::read(&**store, ks, job).await {
        Ok(Some(record)) => record,
        // Submitted jobs have a status; a spec alone is an agent's doing.
        Ok(None) => return Ok(()),
        Err(Error::Corrupt { key, message }) => {
            tracing::warn!(job, key, message, "unreadable job status; not launching");
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    if !wants_agents(&record) {
        return Ok(());
    }
    if status::cancel_requested(&**store, ks, job).await?.is_some() {
        return Ok(());
    }
    let (nodes, _) = store.get_prefix(&ks.nodes_prefix(job)).await?;
    if !nodes.is_empty() {
        tracing::info!(job, "agents already joined the job; not launching more");
        return Ok(());
    }
    let Some(spec_kv) = store.get(&ks.job_spec(job)).await? else {
        return Ok(());
    };
    let spec = match std::str::from_utf8(&spec_kv.value)
        .map_err(|e| e.to_string())
        .and_then(|text| JobSpec::from_json(text).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(error) => {
            fail(
                store,
                ks,
                job,
                format!("stored job spec is unreadable: {error}"),
            )
            .await?;
            return Ok(());
        }
    };
    launch(store, ks, config, launcher, job, &spec).await
}

/// Claims the job, then starts its agents and records their process ids.
async fn launch(
    store: &Arc<dyn Store>,
    ks: &Keyspace,
    config: &ReplicaConfig,
    launcher: &LocalLauncher,
    job: &str,
    spec: &JobSpec,
) -> Result<()> {
    let count = spec.launch.nodes.unwrap_or(spec.elastic.min_nodes).max(1);
    let log_dir = launcher.data_dir.join("jobs").join(job);
    let claim = LaunchRecord {
        backend: "local".to_string(),
        by: config.name.clone(),
        at: status::now_rfc3339(),
        agents: (0..count)
            .map(|i| {
                let node = format!("node-{i}");
                LaunchedAgent {
                    log: log_dir
                        .join(format!("agent-{node}.log"))
                        .display()
                        .to_string(),
                    node,
                    pid: None,
                }
            })
            .collect(),
    };
    let record = status::update(&**store, ks, job, |s| {
        if wants_agents(s) {
            s.launch = Some(claim.clone());
            s.push_event(
                "launched",
                "",
                format!("{count} local agents by coordinator {}", claim.by),
            );
        }
    })
    .await?;
    if record.launch.as_ref() != Some(&claim) {
        tracing::info!(job, "another launcher claimed the job");
        return Ok(());
    }
    tracing::info!(
        job,
        agents = count,
        replica = config.name,
        "launching agents"
    );

    let mut pids = Vec::new();
    for agent in &claim.agents {
        match spawn_agent(store, ks, launcher, job, agent).await {
            Ok(pid) => pids.push((agent.node.clone(), pid)),
            Err(error) => {
                tracing::error!(job, node = agent.node, %error, "agent launch failed");
                fail(
                    store,
                    ks,
                    job,
                    format!("launch agent {}: {error}", agent.node),
                )
                .await?;
                return Ok(());
            }
        }
    }
    status::update(&**store, ks, job, |s| {
        if let Some(launch) = &mut s.launch
            && launch.by == claim.by
            && launch.at == claim.at
        {
            for agent in &mut launch.agents {
                if let Some((_, pid)) = pids.iter().find(|(node, _)| *node == agent.node) {
                    agent.pid = Some(*pid);
                }
            }
        }
    })
    .await?;
    Ok(())
}

/// Starts one `kiln agent` in its own session (`setsid`), so it outlives the
/// coordinator and a terminal's signals to it, with its output appended to
/// its log. A task waits for it and records its exit in the job's events.
async fn spawn_agent(
    store: &Arc<dyn Store>,
    ks: &Keyspace,
    launcher: &LocalLauncher,
    job: &str,
    agent: &LaunchedAgent,
) -> std::io::Result<u32> {
    let log_path = PathBuf::from(&agent.log);
    if let Some(parent) = log_path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut command = tokio::process::Command::new(&launcher.kiln_bin);
    command
        .arg("agent")
        .arg("--store")
        .arg(&launcher.store_url)
        .arg("--job")
        .arg(job)
        .arg("--node")
        .arg(&agent.node)
        .arg("--data-dir")
        .arg(&launcher.data_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("start {}: {error}", launcher.kiln_bin.display()),
        )
    })?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(
        job,
        node = agent.node,
        pid,
        log = agent.log,
        "agent started"
    );
    let store = store.clone();
    let ks = ks.clone();
    let job = job.to_string();
    let node = agent.node.clone();
    // Reaps the agent while this coordinator lives; after it dies, init does.
    tokio::spawn(async move {
        let detail = match child.wait().await {
            Ok(exit) => exit.to_string(),
            Err(error) => format!("wait failed: {error}"),
        };
        tracing::info!(job, node, pid, detail, "agent exited");
        let recorded = status::update(&*store, &ks, &job, |s| {
            s.push_event("agent_exited", &node, format!("pid {pid}: {detail}"));
        })
        .await;
        if let Err(error) = recorded {
            tracing::warn!(job, node, %error, "could not record an agent's exit");
        }
    });
    Ok(pid)
}

async fn fail(store: &Arc<dyn Store>, ks: &Keyspace, job: &str, message: String) -> Result<()> {
    status::update(&**store, ks, job, |s| {
        if s.set_phase(Phase::Failed) {
            s.message = message.clone();
            s.push_event("failed", "", message.clone());
        }
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::store::mem::MemStore;

    const SPEC: &str = r#"
[job]
name = "synth"

[model]
kind = "mlp"
hidden = [8]

[data]
kind = "synthetic"
samples = 256
features = 8

[train]
steps = 5
global_batch = 32
"#;

    /// Records a job the way the job API's submit does.
    async fn submit(store: &dyn Store, ks: &Keyspace, job: &str, overrides: &[&str]) {
        let mut overrides: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
        overrides.push(format!("job.name={job}"));
        let spec = JobSpec::from_toml_str(SPEC, Path::new("."), &overrides).unwrap();
        store
            .put(&ks.job_spec(job), spec.to_json().into_bytes(), None)
            .await
            .unwrap();
        status::update(store, ks, job, |s| {
            s.submitted_at = Some(status::now_rfc3339());
        })
        .await
        .unwrap();
    }

    /// Waits (up to a minute, so a slow machine does not fail the test) until
    /// the job's status satisfies `done`.
    async fn wait_status(
        store: &dyn Store,
        ks: &Keyspace,
        job: &str,
        done: impl Fn(&JobStatus) -> bool,
    ) -> JobStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let record = status::read(store, ks, job).await.unwrap();
            if let Some(record) = record {
                if done(&record) {
                    return record;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "job {job} never reached the expected status: {record:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_leader(store: &dyn Store, ks: &Keyspace, name: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while election::leader(store, &ks.coordinator_leader())
            .await
            .unwrap()
            .as_deref()
            != Some(name)
        {
            assert!(tokio::time::Instant::now() < deadline, "{name} never led");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn replica(name: &str, kiln_bin: &str, data_dir: &Path) -> ReplicaConfig {
        ReplicaConfig {
            name: name.to_string(),
            lease_ttl: Duration::from_millis(600),
            launcher: Some(LocalLauncher {
                kiln_bin: PathBuf::from(kiln_bin),
                store_url: "etcd://127.0.0.1:1".to_string(),
                data_dir: data_dir.to_path_buf(),
            }),
        }
    }

    fn exited(record: &JobStatus) -> usize {
        record
            .events
            .iter()
            .filter(|e| e.kind == "agent_exited")
            .count()
    }

    /// `true` stands in for the kiln binary: these tests are about who
    /// launches what, once; `tests/coordinator.rs` launches real agents.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_elected_replica_launches_each_job_once_and_hands_over() {
        let store: Arc<dyn Store> = MemStore::new();
        let ks = Keyspace::default();
        let dir = tempfile::tempdir().unwrap();
        let stop_a = CancellationToken::new();
        let a = tokio::spawn(run_background(
            store.clone(),
            ks.clone(),
            replica("a", "true", dir.path()),
            stop_a.clone(),
        ));
        wait_leader(&*store, &ks, "a").await;
        let stop_b = CancellationToken::new();
        let b = tokio::spawn(run_background(
            store.clone(),
            ks.clone(),
            replica("b", "true", dir.path()),
            stop_b.clone(),
        ));

        submit(&*store, &ks, "one", &["launch.nodes=2"]).await;
        let one = wait_status(&*store, &ks, "one", |s| exited(s) == 2).await;
        let launch = one.launch.clone().unwrap();
        assert_eq!(launch.by, "a");
        assert_eq!(launch.backend, "local");
        let nodes: Vec<&str> = launch.agents.iter().map(|a| a.node.as_str()).collect();
        assert_eq!(nodes, ["node-0", "node-1"]);
        assert!(launch.agents.iter().all(|a| a.pid.is_some_and(|p| p > 0)));
        assert!(
            one.events
                .iter()
                .filter(|e| e.kind == "agent_exited")
                .all(|e| e.detail.contains("exit status: 0"))
        );

        // A job started by hand (no submission) and a cancelled one get no agents.
        status::update(&*store, &ks, "by-hand", |_| {})
            .await
            .unwrap();
        store
            .put(&ks.job_spec("by-hand"), b"{}".to_vec(), None)
            .await
            .unwrap();

        // A crashes: its task is dropped mid-term, its lease lapses, b takes over.
        a.abort();
        let _ = a.await;
        wait_leader(&*store, &ks, "b").await;
        submit(&*store, &ks, "two", &[]).await;
        let two = wait_status(&*store, &ks, "two", |s| exited(s) == 1).await;
        assert_eq!(two.launch.unwrap().by, "b");
        // b did not launch "one" again.
        let one_now = status::read(&*store, &ks, "one").await.unwrap().unwrap();
        assert_eq!(one_now.launch.as_ref(), Some(&launch));
        assert_eq!(exited(&one_now), 2);
        let by_hand = status::read(&*store, &ks, "by-hand")
            .await
            .unwrap()
            .unwrap();
        assert!(by_hand.launch.is_none());

        stop_b.cancel();
        b.await.unwrap().unwrap();
        // b resigned on the way out.
        assert_eq!(
            election::leader(&*store, &ks.coordinator_leader())
                .await
                .unwrap(),
            None
        );
        stop_a.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_jobs_get_no_agents_and_bad_binaries_fail_the_job() {
        let store: Arc<dyn Store> = MemStore::new();
        let ks = Keyspace::default();
        let dir = tempfile::tempdir().unwrap();

        // Submitted and cancelled before any replica looked.
        submit(&*store, &ks, "cancelled", &[]).await;
        status::request_cancel(&*store, &ks, "cancelled", "test", "")
            .await
            .unwrap();
        let missing = dir.path().join("no-such-kiln");
        submit(&*store, &ks, "broken", &[]).await;
        // Listed after "cancelled": once it failed, "cancelled" was considered.
        submit(&*store, &ks, "last", &[]).await;

        let stop = CancellationToken::new();
        let task = tokio::spawn(run_background(
            store.clone(),
            ks.clone(),
            replica("a", missing.to_str().unwrap(), dir.path()),
            stop.clone(),
        ));
        let broken = wait_status(&*store, &ks, "broken", |s| s.phase == Phase::Failed).await;
        assert!(
            broken.message.contains("no-such-kiln"),
            "{}",
            broken.message
        );
        wait_status(&*store, &ks, "last", |s| s.phase == Phase::Failed).await;
        let cancelled = status::read(&*store, &ks, "cancelled")
            .await
            .unwrap()
            .unwrap();
        assert!(cancelled.launch.is_none(), "{cancelled:#?}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}

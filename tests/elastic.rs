//! Elastic multi-node jobs, end to end: a real etcd on loopback, several
//! `kiln agent` processes (each a "node" with its own worker process), real
//! SIGKILL of whole nodes. Nodes are lost and join mid-run; the job goes on
//! without a restart and ends where a fault-free run ends.
//!
//! Tests run one at a time (a shared lock): each starts etcd and three or four
//! nodes, which would oversubscribe a two-core machine into timeouts.

mod common;

use common::{read_weights, repo};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_coordinator::etcd_server::EtcdServer;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const WAIT: Duration = Duration::from_secs(180);

/// A small job on the digits data: 3 nodes, 1 worker each.
fn spec(dir: &Path, extra: &str) -> PathBuf {
    let data = repo().join("examples/digits/data");
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[job]
name = "elastic"
seed = 5
[model]
kind = "mlp"
hidden = [32]
[data]
kind = "safetensors"
train = ["{data}/train-00000.safetensors", "{data}/train-00001.safetensors"]
[train]
steps = 120
global_batch = 48
log_interval = 1000
threads_per_worker = 1
[optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
[workers]
nproc = 1
device = "cpu"
[checkpoint]
interval = 20
keep_last = 100
[elastic]
min_nodes = 2
max_nodes = 3
lease_ttl_secs = 2
settle_secs = 0.3
cooldown_secs = 1
{extra}
"#,
            data = data.display()
        ),
    )
    .unwrap();
    path
}

/// A temp folder holding the job's spec, with textual `edits` applied to the
/// template above, and an empty data folder shared by the job's nodes.
fn setup(edits: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "");
    let mut text = std::fs::read_to_string(&spec).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "the spec template has no {from:?}");
        text = text.replace(from, to);
    }
    std::fs::write(&spec, text).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    (dir, spec, data)
}

/// Nodes `node-{first}` .. `node-{last}` of `job`.
fn start_nodes(
    store: &str,
    job: &str,
    spec: &Path,
    data: &Path,
    range: std::ops::Range<usize>,
) -> Vec<Node> {
    range
        .map(|i| Node::start(store, job, spec, &format!("node-{i}"), data))
        .collect()
}

/// The finished job's parameters equal a fault-free run's (see [`assert_close`]).
fn assert_fault_free(nodes: &[Node], spec: &Path, dir: &Path) {
    assert_close(&final_weights(nodes), &fault_free_weights(spec, dir));
}

/// One node: a `kiln agent` in its own process group, its JSON events collected.
struct Node {
    name: String,
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Node {
    fn start(etcd: &str, job: &str, spec: &Path, name: &str, data: &Path) -> Node {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["agent", "--store", etcd, "--job", job, "--node", name])
            .arg("--spec")
            .arg(spec)
            .arg("--data-dir")
            .arg(data)
            .arg("--events-json")
            .env("KILN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(data.join(format!("{name}-{}.err", rand_tag()))).unwrap(),
            );
        // Its own process group, so that a node dies whole (agent and workers).
        cmd.process_group(0);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Node {
            name: name.to_string(),
            child,
            events,
        }
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    fn of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    fn last_step(&self) -> u64 {
        self.of("progress")
            .iter()
            .filter_map(|e| e["step"].as_u64())
            .max()
            .unwrap_or(0)
    }

    fn finished(&self) -> bool {
        !self.of("finished").is_empty()
    }

    /// SIGKILL to the whole process group: the node is gone at once.
    fn kill(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "node {} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

fn rand_tag() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn max_step(nodes: &[Node]) -> u64 {
    nodes.iter().map(Node::last_step).max().unwrap_or(0)
}

/// Waits until every live node exits cleanly; every node that trained in a
/// round reports the job finished (a spare, beyond `max_nodes`, never trains
/// and just stops when the job is done).
fn finish(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        let status = node.wait_exit(WAIT);
        assert!(
            status.success(),
            "node {} ended with {status}; events: {:?}",
            node.name,
            node.events()
        );
        let trained = !node.of("round_started").is_empty();
        assert!(
            node.finished() || !trained,
            "node {} trained but did not finish; events: {:?}",
            node.name,
            node.events()
        );
    }
    assert!(nodes.iter().any(Node::finished), "no node finished the job");
}

/// The final parameters written by rank 0 of a finished elastic job.
fn final_weights(nodes: &[Node]) -> Vec<(String, Vec<f32>)> {
    let path = nodes
        .iter()
        .flat_map(|n| n.of("finished"))
        .find_map(|e| {
            e["weights"]
                .as_str()
                .filter(|w| !w.is_empty())
                .map(String::from)
        })
        .expect("rank 0 reports its weights");
    read_weights(&path)
}

/// The same job without faults, on one process (`kiln run`): the update does
/// not depend on the world size, so an elastic run must end at the same
/// parameters up to float summation order.
fn fault_free_weights(spec: &Path, dir: &Path) -> Vec<(String, Vec<f32>)> {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("run")
        .arg(spec)
        .args(["--nproc", "1", "--json", "--data-dir"])
        .arg(dir.join("reference"))
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reference run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    read_weights(summary["weights"].as_str().unwrap())
}

fn assert_close(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len());
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(
        worst < 1e-4,
        "final parameters differ from the fault-free run by up to {worst}"
    );
}

/// Rounds each node took part in, as (round, world size).
fn rounds(node: &Node) -> Vec<(u64, u64)> {
    node.of("round_started")
        .iter()
        .map(|e| {
            (
                e["round"].as_u64().unwrap(),
                e["world_size"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn leader_of(etcd: &EtcdServer, job: &str) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .args(["get", "--print-value-only"])
        .arg(format!("/kiln/jobs/{job}/leader"))
        .output()
        .expect("run etcdctl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Checks the recovery of survivors after `killed` died at `killed_at_step`:
/// a new round at world size 2, the state handed over by a survivor (not a
/// restart from a checkpoint), at most one step redone.
fn check_recovery(survivors: &[&Node], killed_at_step: u64) {
    for node in survivors {
        let after: Vec<Value> = node
            .of("round_started")
            .into_iter()
            .filter(|e| e["world_size"] == 2)
            .collect();
        let first = after
            .first()
            .unwrap_or_else(|| panic!("node {} never trained at world size 2", node.name));
        assert!(
            first["state_source"].as_i64().unwrap() >= 0,
            "the state came from a checkpoint, not a survivor: {first}"
        );
        let resumed_at = first["step"].as_u64().unwrap();
        assert!(
            resumed_at + 1 >= killed_at_step,
            "round at world size 2 started at step {resumed_at}, but step {killed_at_step} had been reached: more than one step redone"
        );
    }
}

#[test]
fn a_node_killed_mid_run_the_job_goes_on_at_world_size_2_and_ends_as_a_fault_free_run() {
    let _serial = serial();
    let (dir, spec, data) = setup(&[]);
    let etcd = EtcdServer::start().unwrap();
    let mut nodes = start_nodes(&etcd.url(), "kill1", &spec, &data, 0..3);
    wait_until("step 40", WAIT, || max_step(&nodes) >= 40);
    // Kill a node that does not lead the rendezvous (the leader case is its own test).
    let leader = leader_of(&etcd, "kill1");
    let victim = nodes.iter().position(|n| n.name != leader).unwrap();
    let killed_at = max_step(&nodes);
    let mut dead = nodes.remove(victim);
    dead.kill();
    finish(&mut nodes);
    let survivors: Vec<&Node> = nodes.iter().collect();
    check_recovery(&survivors, killed_at);
    assert_fault_free(&nodes, &spec, dir.path());
}

/// A node's processes die (SIGKILL of its agent and worker): the other
/// agents see its presence connection close and revoke its lease, so the
/// survivors re-form without waiting for the lease. The lease here is 60 s
/// and the survivors must train at world size 2 within 30 s of the kill:
/// without the presence path the node would stay in the job for the whole
/// minute (this test then fails).
#[test]
fn a_dead_nodes_lease_is_revoked_at_once_and_the_survivors_do_not_wait_for_it() {
    let _serial = serial();
    let (dir, spec, data) = setup(&[("lease_ttl_secs = 2", "lease_ttl_secs = 60")]);
    let etcd = EtcdServer::start().unwrap();
    let mut nodes = start_nodes(&etcd.url(), "fast", &spec, &data, 0..3);
    wait_until("step 40", WAIT, || max_step(&nodes) >= 40);
    let leader = leader_of(&etcd, "fast");
    let victim = nodes.iter().position(|n| n.name != leader).unwrap();
    let killed_at = max_step(&nodes);
    let mut dead = nodes.remove(victim);
    let killed = Instant::now();
    dead.kill();
    wait_until(
        "the survivors at world size 2 (well inside the 60 s lease)",
        Duration::from_secs(30),
        || nodes.iter().all(|n| rounds(n).iter().any(|&(_, w)| w == 2)),
    );
    println!(
        "the survivors trained at world size 2 {:?} after the kill",
        killed.elapsed()
    );
    finish(&mut nodes);
    let survivors: Vec<&Node> = nodes.iter().collect();
    check_recovery(&survivors, killed_at);
    assert_fault_free(&nodes, &spec, dir.path());
}

#[test]
fn the_node_leading_the_rendezvous_is_killed_and_another_takes_over() {
    let _serial = serial();
    let (dir, spec, data) = setup(&[]);
    let etcd = EtcdServer::start().unwrap();
    let mut nodes = start_nodes(&etcd.url(), "lead", &spec, &data, 0..3);
    wait_until("step 30", WAIT, || max_step(&nodes) >= 30);
    let leader = leader_of(&etcd, "lead");
    let victim = nodes
        .iter()
        .position(|n| n.name == leader)
        .unwrap_or_else(|| panic!("leader {leader:?} is not one of the nodes"));
    let killed_at = max_step(&nodes);
    let mut dead = nodes.remove(victim);
    dead.kill();
    finish(&mut nodes);
    let new_leader = leader_of(&etcd, "lead");
    assert_ne!(new_leader, leader, "the dead node still leads");
    let survivors: Vec<&Node> = nodes.iter().collect();
    check_recovery(&survivors, killed_at);
    assert_fault_free(&nodes, &spec, dir.path());
}

#[test]
fn a_node_that_joins_mid_run_grows_the_world_at_the_next_round() {
    let _serial = serial();
    // Long enough that the job is still running when the third node is up.
    let (dir, spec, data) = setup(&[("steps = 120", "steps = 1500")]);
    let etcd = EtcdServer::start().unwrap();
    let mut nodes = start_nodes(&etcd.url(), "grow", &spec, &data, 0..2);
    wait_until("step 30", WAIT, || max_step(&nodes) >= 30);
    let joined_at = max_step(&nodes);
    nodes.push(Node::start(&etcd.url(), "grow", &spec, "node-2", &data));
    finish(&mut nodes);
    let newcomer = rounds(&nodes[2]);
    assert!(
        newcomer.iter().any(|&(_, w)| w == 3),
        "the new node never trained at world size 3: {newcomer:?}"
    );
    let grown = nodes[2]
        .of("round_started")
        .into_iter()
        .find(|e| e["world_size"] == 3)
        .unwrap();
    assert!(
        grown["step"].as_u64().unwrap() >= joined_at,
        "the new node did not receive the state of the running job: {grown}"
    );
    assert!(rounds(&nodes[0]).iter().any(|&(_, w)| w == 2));
    assert_fault_free(&nodes, &spec, dir.path());
}

#[test]
fn every_node_killed_then_restarted_resumes_from_the_latest_durable_checkpoint() {
    let _serial = serial();
    let (dir, spec, data) = setup(&[]);
    let etcd = EtcdServer::start().unwrap();
    let mut nodes = start_nodes(&etcd.url(), "restart", &spec, &data, 0..2);
    let committed = |nodes: &[Node]| -> u64 {
        nodes
            .iter()
            .flat_map(|n| n.of("checkpoint"))
            .filter_map(|e| e["step"].as_u64())
            .max()
            .unwrap_or(0)
    };
    wait_until("a checkpoint at step 40", WAIT, || committed(&nodes) >= 40);
    let latest = committed(&nodes);
    for node in nodes.iter_mut() {
        node.kill();
    }
    let before_restart = max_step(&nodes);
    drop(nodes);
    let mut nodes = start_nodes(&etcd.url(), "restart", &spec, &data, 0..2);
    finish(&mut nodes);
    for node in &nodes {
        let first = node.of("round_started").into_iter().next().unwrap();
        assert_eq!(
            first["state_source"], -1,
            "no survivor held state, so the state must come from a checkpoint: {first}"
        );
        let resumed = first["step"].as_u64().unwrap();
        assert!(
            resumed >= latest && resumed <= before_restart,
            "resumed at step {resumed}; the latest checkpoint seen committed was at {latest}, training had reached {before_restart}"
        );
        assert_eq!(
            resumed % 20,
            0,
            "resumed at step {resumed}, not a checkpoint step"
        );
    }
    assert_fault_free(&nodes, &spec, dir.path());
}

/// A seeded random schedule of kills (whole nodes, or one worker) and joins.
/// The job completes, ends where a fault-free run ends, and every checkpoint
/// committed on the way is still there and verifies. Replay a failure with
/// `KILN_CHAOS_SEED=<seed printed below>`.
#[test]
fn chaos_kills_and_joins_lose_no_committed_checkpoint() {
    let _serial = serial();
    let seed: u64 = std::env::var("KILN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand_tag() as u64);
    println!("chaos seed: {seed} (replay with KILN_CHAOS_SEED={seed})");
    let mut rng = seed;
    let mut next = move |n: u64| {
        // SplitMix64.
        rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    };
    // Up to 3 nodes, down to 1.
    let (dir, spec, data) = setup(&[
        ("min_nodes = 2", "min_nodes = 1"),
        ("steps = 120", "steps = 160"),
    ]);
    let etcd = EtcdServer::start().unwrap();
    let mut live = start_nodes(&etcd.url(), "chaos", &spec, &data, 0..3);
    let mut gone: Vec<Node> = Vec::new();
    let mut names = 3;
    let mut checkpoints: BTreeMap<u64, String> = BTreeMap::new();
    let mut threshold = 15 + next(15);
    for event in 0..4 {
        wait_until(&format!("step {threshold}"), WAIT, || {
            max_step(&live) >= threshold || live.iter().any(Node::finished)
        });
        if live.iter().any(Node::finished) {
            break;
        }
        let action = if live.len() <= 1 { 2 } else { next(3) };
        match action {
            0 => {
                let i = next(live.len() as u64) as usize;
                println!(
                    "chaos {event}: at step {} kill node {}",
                    max_step(&live),
                    live[i].name
                );
                let mut node = live.remove(i);
                node.kill();
                gone.push(node);
            }
            1 => {
                let i = next(live.len() as u64) as usize;
                let agent = live[i].child.id();
                let worker = child_pids(agent).into_iter().next();
                println!(
                    "chaos {event}: at step {} kill the worker of node {}",
                    max_step(&live),
                    live[i].name
                );
                if let Some(pid) = worker {
                    // SAFETY: kill(2) takes plain integers and touches no
                    // memory of ours.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            _ => {
                let name = format!("node-{names}");
                names += 1;
                println!(
                    "chaos {event}: at step {} start node {name}",
                    max_step(&live)
                );
                live.push(Node::start(&etcd.url(), "chaos", &spec, &name, &data));
            }
        }
        threshold = max_step(&live) + 10 + next(20);
    }
    finish(&mut live);
    for node in live.iter().chain(&gone) {
        for e in node.of("checkpoint") {
            checkpoints.insert(
                e["step"].as_u64().unwrap(),
                e["url"].as_str().unwrap().to_string(),
            );
        }
    }
    assert!(!checkpoints.is_empty());
    for (step, url) in &checkpoints {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["ckpt", "verify", url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "committed checkpoint at step {step} ({url}) is lost or corrupt (seed {seed}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_fault_free(&live, &spec, dir.path());
}

/// The processes of `parent` that train (its spare worker, `kiln-spare`, left out).
fn child_pids(parent: u32) -> Vec<u32> {
    all_child_pids(parent)
        .into_iter()
        .filter(|&pid| process_name(pid) != "kiln-spare")
        .collect()
}

/// Children of every thread of `parent` (each thread has its own list, and
/// an agent starts workers from more than one), sorted.
fn all_child_pids(parent: u32) -> Vec<u32> {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = threads
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// `/proc/PID/comm`: what the process calls itself.
fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// An agent keeps one worker process started ahead (`kiln-spare`); when a
/// worker is SIGKILLed, that process takes its slot, so the replacement is
/// already running: no process start, no libtorch load on the recovery
/// path. The spare is the process that trains next, a new spare is started,
/// and the job ends as a fault-free run.
#[test]
fn a_killed_worker_is_replaced_by_the_spare_the_agent_started_ahead() {
    let _serial = serial();
    // Long enough that the job still trains once the spare has started
    // (this job runs hundreds of steps a second).
    let (dir, spec, data) = setup(&[
        ("steps = 120", "steps = 6000"),
        ("interval = 20", "interval = 1000"),
    ]);
    let etcd = EtcdServer::start().unwrap();
    let mut nodes = start_nodes(&etcd.url(), "spare", &spec, &data, 0..3);
    wait_until("step 10", WAIT, || max_step(&nodes) >= 10);
    let agent = nodes[1].child.id();
    let spare_of = |agent: u32| {
        all_child_pids(agent)
            .into_iter()
            .find(|&pid| process_name(pid) == "kiln-spare")
    };
    let mut spare = None;
    wait_until("the agent's spare worker", Duration::from_secs(60), || {
        spare = spare_of(agent);
        spare.is_some()
    });
    let spare = spare.unwrap();
    let workers = child_pids(agent);
    assert_eq!(
        workers.len(),
        1,
        "one worker besides the spare: {workers:?}"
    );
    assert!(!workers.contains(&spare));
    let killed_at = max_step(&nodes);
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    wait_until(
        &format!("training past step {}", killed_at + 10),
        WAIT,
        || max_step(&nodes) >= killed_at + 10,
    );
    assert!(
        !nodes.iter().any(Node::finished),
        "the job ended too soon to look"
    );
    // A new spare calls itself `kiln-spare` once it runs: wait for that.
    let mut next_spare = None;
    wait_until("a new spare", Duration::from_secs(60), || {
        next_spare = spare_of(agent);
        next_spare.is_some()
    });
    assert_ne!(next_spare, Some(spare));
    assert_eq!(
        child_pids(agent),
        [spare],
        "the spare ({spare}) trains in the dead worker's slot"
    );
    assert!(
        nodes[1].of("worker_died").len() == 1,
        "one worker died: {:?}",
        nodes[1].of("worker_died")
    );
    finish(&mut nodes);
    assert_fault_free(&nodes, &spec, dir.path());
}

/// The job's etcd is a 3-member cluster; its leader is SIGKILLed mid-run. The
/// agents' clients move to the surviving members and the job keeps training
/// to the end, at its full world size (no node lost its lease).
#[test]
fn the_etcd_leader_dies_and_the_job_keeps_training() {
    let _serial = serial();
    let (dir, spec, data) = setup(&[
        ("steps = 120", "steps = 800"),
        ("lease_ttl_secs = 2", "lease_ttl_secs = 5"),
    ]);
    let mut cluster = kiln_coordinator::etcd_server::EtcdCluster::start(3).unwrap();
    let url = cluster.url();
    let mut nodes = start_nodes(&url, "etcdha", &spec, &data, 0..2);
    wait_until("step 30", WAIT, || max_step(&nodes) >= 30);
    let leader = cluster.leader_index().unwrap();
    cluster.kill(leader).unwrap();
    let killed_at = max_step(&nodes);
    finish(&mut nodes);
    for node in &nodes {
        assert!(
            node.last_step() > killed_at,
            "node {} made no progress after the etcd leader died",
            node.name
        );
    }
    assert_fault_free(&nodes, &spec, dir.path());
}

fn phase_of(etcd: &EtcdServer, job: &str) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .args(["get", "--print-value-only"])
        .arg(format!("/kiln/jobs/{job}/status"))
        .output()
        .expect("run etcdctl");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str::<Value>(text.trim())
        .ok()
        .and_then(|v| v["phase"].as_str().map(String::from))
        .unwrap_or_default()
}

/// Below `min_nodes` the job waits (its status says so) instead of failing,
/// and goes on when a node comes back.
#[test]
fn below_min_nodes_the_job_waits_and_goes_on_when_a_node_returns() {
    let _serial = serial();
    let (dir, spec, data) = setup(&[
        ("steps = 120", "steps = 200"),
        ("max_nodes = 3", "max_nodes = 2"),
    ]);
    let etcd = EtcdServer::start().unwrap();
    let mut nodes = start_nodes(&etcd.url(), "wait", &spec, &data, 0..2);
    wait_until("step 30", WAIT, || max_step(&nodes) >= 30);
    let mut dead = nodes.remove(1);
    dead.kill();
    wait_until("the waiting phase", WAIT, || {
        phase_of(&etcd, "wait") == "waiting"
    });
    let stalled = max_step(&nodes);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        max_step(&nodes),
        stalled,
        "a lone node trained below min_nodes"
    );
    nodes.push(Node::start(&etcd.url(), "wait", &spec, "node-1", &data));
    finish(&mut nodes);
    assert_eq!(phase_of(&etcd, "wait"), "succeeded");
    assert_fault_free(&nodes, &spec, dir.path());
}

/// The agent leading the rendezvous is paused (SIGSTOP, its process only)
/// for longer than its lease: another node takes over and plans the rounds
/// without it. When the paused agent resumes (SIGCONT) it must not fail the
/// job: its plan writes are fenced by its ended term, so it steps down, and
/// finding its lease gone it leaves. The job succeeds as a fault-free run.
#[test]
fn the_leader_paused_past_its_lease_then_resumed_steps_down_and_the_job_succeeds() {
    let _serial = serial();
    let (dir, spec, data) = setup(&[("steps = 120", "steps = 600")]);
    let etcd = EtcdServer::start().unwrap();
    let mut nodes = start_nodes(&etcd.url(), "pause", &spec, &data, 0..3);
    wait_until("step 30", WAIT, || max_step(&nodes) >= 30);
    let leader = leader_of(&etcd, "pause");
    let paused = nodes
        .iter()
        .position(|n| n.name == leader)
        .unwrap_or_else(|| panic!("leader {leader:?} is not one of the nodes"));
    let mut paused = nodes.remove(paused);
    let pid = paused.child.id() as i32;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until("another leader", WAIT, || {
        let now = leader_of(&etcd, "pause");
        !now.is_empty() && now != leader
    });
    // Past the lease (2 s), and long enough for the others to plan a round.
    wait_until("a round without the paused node", WAIT, || {
        nodes.iter().all(|n| rounds(n).iter().any(|&(_, w)| w == 2))
    });
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    finish(&mut nodes);
    paused.wait_exit(WAIT);
    assert_eq!(phase_of(&etcd, "pause"), "succeeded");
    assert_fault_free(&nodes, &spec, dir.path());
}

/// The job's only etcd member is killed mid-run and started again 35 s later:
/// longer than the 2 s node leases and than one store call retries (30 s),
/// shorter than `elastic.wait_timeout_secs` (300 s). The agents ride the
/// outage out: the workers train on, no node loses its place (etcd extends
/// every lease when it has a leader again), the leader steps down and is
/// elected again instead of failing the job, no new round is planned, and
/// the job succeeds.
#[test]
fn a_store_outage_longer_than_the_lease_is_ridden_out() {
    let _serial = serial();
    let (dir, spec, data) = setup(&[("steps = 120", "steps = 4000")]);
    let mut etcd = kiln_coordinator::etcd_server::EtcdCluster::start(1).unwrap();
    let url = etcd.url();
    let mut nodes = start_nodes(&url, "outage", &spec, &data, 0..2);
    wait_until("step 30", WAIT, || max_step(&nodes) >= 30);
    etcd.kill(0).unwrap();
    let down_at = max_step(&nodes);
    std::thread::sleep(Duration::from_secs(35));
    etcd.restart(0).unwrap();
    finish(&mut nodes);
    for node in &nodes {
        let seen = rounds(node);
        assert!(
            seen.len() == 1 && seen[0].1 == 2,
            "node {} took part in rounds {seen:?}: the outage was not ridden out",
            node.name
        );
        assert!(node.last_step() > down_at);
    }
    assert_fault_free(&nodes, &spec, dir.path());
}

/// The job's status record as etcd holds it.
fn status_of(etcd: &EtcdServer, job: &str) -> Value {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .args(["get", "--print-value-only"])
        .arg(format!("/kiln/jobs/{job}/status"))
        .output()
        .expect("run etcdctl");
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap_or(Value::Null)
}

/// Two nodes, each with its own `--data-dir` and the default checkpoint
/// location (a folder under it): the ranks cannot read each other's writes,
/// so no checkpoint could ever commit. The job stops at its first round,
/// before training, with an error naming each node's location and the fix,
/// instead of waiting minutes for parts that never come. The same two nodes
/// given one shared `checkpoint.url` train and commit.
#[test]
fn nodes_with_their_own_data_dirs_stop_at_once_naming_the_locations_and_the_fix() {
    let _serial = serial();
    let (dir, spec, _) = setup(&[
        ("steps = 120", "steps = 40"),
        ("max_nodes = 3", "max_nodes = 2"),
    ]);
    let etcd = EtcdServer::start().unwrap();
    let data: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("data-{i}")))
        .collect();
    let mut nodes: Vec<Node> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            std::fs::create_dir_all(d).unwrap();
            Node::start(&etcd.url(), "unshared", &spec, &format!("node-{i}"), d)
        })
        .collect();
    // A hang guard, not a performance threshold: without the check this job
    // waits minutes (60 s per checkpoint for a part that never comes).
    for node in nodes.iter_mut() {
        let status = node.wait_exit(Duration::from_secs(120));
        assert!(!status.success(), "node {} succeeded", node.name);
    }
    assert_eq!(max_step(&nodes), 0, "the job trained before the check");
    let status = status_of(&etcd, "unshared");
    assert_eq!(status["phase"], "failed", "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("checkpoint location not shared"),
        "{message}"
    );
    for d in &data {
        let location = format!(
            "file://{}",
            d.canonicalize()
                .unwrap()
                .join("checkpoints/unshared")
                .display()
        );
        assert!(
            message.contains(&location),
            "{location} not named in: {message}"
        );
    }
    assert!(
        message.contains("rank 0 (host") && message.contains("cannot see the probes of rank 1"),
        "{message}"
    );
    assert!(message.contains("checkpoint.url = \"s3://"), "{message}");
    for d in &data {
        let probes = d.join("checkpoints/unshared/probes");
        let left: Vec<_> = std::fs::read_dir(&probes)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "probes left behind: {left:?}");
    }

    // The same nodes, one shared location: the check passes and checkpoints commit.
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "[checkpoint]",
        &format!("[checkpoint]\nurl = \"file://{}\"", shared.display()),
    );
    let shared_spec = dir.path().join("shared.toml");
    std::fs::write(&shared_spec, text).unwrap();
    let mut nodes: Vec<Node> = data
        .iter()
        .enumerate()
        .map(|(i, d)| Node::start(&etcd.url(), "shared", &shared_spec, &format!("node-{i}"), d))
        .collect();
    finish(&mut nodes);
    let committed: Vec<u64> = nodes
        .iter()
        .flat_map(|n| n.of("checkpoint"))
        .filter_map(|e| e["step"].as_u64())
        .collect();
    assert!(
        committed.contains(&40),
        "no final checkpoint committed: {committed:?}"
    );
    assert!(
        shared.join("latest").exists(),
        "latest not in the shared location"
    );
}

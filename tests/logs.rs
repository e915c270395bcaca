//! Per-rank worker logs, end to end with the `kiln` binary: `kiln run` writes
//! them under its data folder and `kiln logs` filters them by rank and time;
//! `--follow` shows lines while the job runs and ends with it; a multi-node
//! job over a real etcd ships every node's lines to the store, where
//! `kiln logs --store` reads them by node.
//!
//! Tests run one at a time (a shared lock): each trains real workers.

mod common;

use common::repo;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_coordinator::etcd_server::EtcdServer;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Generous: only a hang hits it.
const WAIT: Duration = Duration::from_secs(180);

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "info");
    cmd
}

fn output(args: &[&str]) -> Output {
    kiln().args(args).output().unwrap()
}

/// `kiln logs ARGS` that must succeed: its lines.
fn logs(args: &[&str]) -> Vec<String> {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    let out = output(&all);
    assert!(
        out.status.success(),
        "kiln {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// The fields of a `kiln logs` line: time, node, rank field, stream, text.
fn fields(line: &str) -> (String, String, String, String) {
    let parts: Vec<&str> = line.splitn(5, ' ').collect();
    assert!(parts.len() >= 4, "not a log line: {line:?}");
    (
        parts[0].to_string(),
        parts[1].to_string(),
        parts[2].to_string(),
        parts[3].to_string(),
    )
}

/// A digits job of `steps` steps on 2 local workers, a checkpoint every
/// `interval` steps; `extra` continues the `[checkpoint]` table.
fn spec(dir: &Path, steps: u64, interval: u64, extra: &str) -> PathBuf {
    let data = repo().join("examples/digits/data");
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[job]
name = "tiny"
seed = 3
[model]
kind = "mlp"
hidden = [32]
[data]
kind = "safetensors"
train = ["{data}/train-00000.safetensors", "{data}/train-00001.safetensors"]
[train]
steps = {steps}
global_batch = 32
log_interval = 1000
threads_per_worker = 1
[optimizer]
kind = "sgd"
lr = 0.05
[workers]
nproc = 2
device = "cpu"
[checkpoint]
interval = {interval}
{extra}
"#,
            data = data.display()
        ),
    )
    .unwrap();
    path
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let mut status = None;
    wait_until(what, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

/// A child's stdout lines, read on a thread.
fn line_reader(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn kiln_run_logs_filter_by_rank_and_since() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spec = spec(dir.path(), 30, 10, "");
    let out = output(&[
        "run",
        spec.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = data.to_str().unwrap();

    let all = logs(&["tiny", "--data-dir", data]);
    assert!(!all.is_empty());
    let ranks: Vec<String> = all.iter().map(|l| fields(l).2).collect();
    assert!(
        ranks.iter().any(|r| r == "r0") && ranks.iter().any(|r| r == "r1"),
        "{all:#?}"
    );
    assert!(all.iter().all(|l| fields(l).1 == "local"), "{all:#?}");
    // The workers' own log lines (tracing on stderr) are there, per rank.
    assert!(
        all.iter()
            .any(|l| l.contains(" r1 err ") && l.contains("joining round") && l.contains("rank=1")),
        "{all:#?}"
    );
    let times: Vec<String> = all.iter().map(|l| fields(l).0).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {times:#?}"
    );

    let one = logs(&["tiny", "--data-dir", data, "--rank", "1"]);
    assert!(!one.is_empty());
    assert!(one.iter().all(|l| fields(l).2 == "r1"), "{one:#?}");
    let expected: Vec<&String> = all.iter().filter(|l| fields(l).2 == "r1").collect();
    assert_eq!(one.iter().collect::<Vec<_>>(), expected);

    // Since the time of a line in the middle: exactly the lines from then on.
    let cut = &times[times.len() / 2];
    let later = logs(&["tiny", "--data-dir", data, "--since", cut]);
    let expected: Vec<&String> = all.iter().filter(|l| fields(l).0 >= *cut).collect();
    assert!(!later.is_empty() && later.len() < all.len() || times[0] == *cut);
    assert_eq!(later.iter().collect::<Vec<_>>(), expected);
    // A duration: everything written in the last hour is everything.
    assert_eq!(logs(&["tiny", "--data-dir", data, "--since", "1h"]), all);
    assert_eq!(
        logs(&["tiny", "--data-dir", data, "--node", "elsewhere"]),
        Vec::<String>::new()
    );

    for (args, message) in [
        (vec!["logs", "nope", "--data-dir", data], "job nope"),
        (
            vec!["logs", "tiny", "--data-dir", data, "--since", "yesterday"],
            "RFC 3339",
        ),
    ] {
        let out = output(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "kiln {args:?} succeeded");
        assert!(stderr.contains(message), "kiln {args:?}: {stderr}");
    }
}

#[test]
fn follow_shows_lines_while_the_job_runs_and_ends_with_it() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spec = spec(dir.path(), 3000, 1000, "");
    let mut run = kiln()
        .args(["run", spec.to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = run.id() as i32;
    let log = data.join("jobs/tiny/logs/worker-0.log");
    wait_until("the first worker line", || {
        std::fs::read_to_string(&log).is_ok_and(|t| !t.is_empty())
    });
    // Pause the whole run (agent and workers): the job is certainly still
    // running while the follower starts and prints.
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(-pgid, libc::SIGSTOP) };
    let mut follow = kiln()
        .args(["logs", "tiny", "--follow", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_reader(&mut follow);
    let first = lines.recv_timeout(WAIT).expect("a line while the job runs");
    assert!(first.contains(" local r"), "{first}");
    assert!(
        follow.try_wait().unwrap().is_none(),
        "the follower ended while the job was paused"
    );
    assert!(run.try_wait().unwrap().is_none());
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(-pgid, libc::SIGCONT) };
    assert!(wait_exit(&mut run, "the run").success());
    let status = wait_exit(&mut follow, "the follower to end with the job");
    assert!(status.success());
    let mut followed: Vec<String> = std::iter::once(first).chain(lines.try_iter()).collect();
    let mut read = logs(&["tiny", "--data-dir", data.to_str().unwrap()]);
    assert!(read.len() > 1);
    // The follower saw every line exactly once (its order is by arrival).
    followed.sort();
    read.sort();
    assert_eq!(followed, read);
}

#[test]
fn multi_node_logs_are_read_back_from_the_store_by_node() {
    let _guard = serial();
    let etcd = match EtcdServer::start() {
        Ok(etcd) => etcd,
        Err(e) => {
            eprintln!(
                "SKIP multi_node_logs_are_read_back_from_the_store_by_node: no etcd here ({e})"
            );
            return;
        }
    };
    let store = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    // The nodes have their own data folders and share the checkpoint root.
    let extra = format!(
        "url = \"file://{}\"\n[elastic]\nmin_nodes = 2\nlease_ttl_secs = 2\nsettle_secs = 0.3",
        dir.path().join("checkpoints").display()
    );
    let spec = spec(dir.path(), 40, 10, &extra);
    let nodes: Vec<(String, PathBuf, Child)> = (0..2)
        .map(|i| {
            let name = format!("node-{i}");
            let data = dir.path().join(format!("data-{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let child = kiln()
                .args([
                    "agent", "--store", &store, "--job", "multi", "--node", &name, "--nproc", "1",
                ])
                .arg("--spec")
                .arg(&spec)
                .arg("--data-dir")
                .arg(&data)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(format!("{name}.err"))).unwrap())
                .process_group(0)
                .spawn()
                .unwrap();
            (name, data, child)
        })
        .collect();
    for (name, _, mut child) in nodes {
        let status = wait_exit(&mut child, &name);
        let err = std::fs::read_to_string(dir.path().join(format!("{name}.err"))).unwrap();
        assert!(status.success(), "{name}: {status}\n{err}");
        // The agent's console shows its workers' lines, prefixed.
        assert!(err.contains(&format!("[{name} rank ")), "{name}: {err}");
    }

    let all = logs(&["multi", "--store", &store]);
    let nodes_seen: std::collections::BTreeSet<String> = all.iter().map(|l| fields(l).1).collect();
    assert_eq!(
        nodes_seen.into_iter().collect::<Vec<_>>(),
        ["node-0", "node-1"],
        "{all:#?}"
    );
    for i in 0..2 {
        let name = format!("node-{i}");
        let from_store = logs(&["multi", "--store", &store, "--node", &name]);
        assert!(!from_store.is_empty());
        assert!(
            from_store.iter().all(|l| fields(l).1 == name),
            "{from_store:#?}"
        );
        // The store holds what the node's own files hold (a small job fits
        // the store's bound).
        let data = dir.path().join(format!("data-{i}"));
        let from_files = logs(&["multi", "--data-dir", data.to_str().unwrap()]);
        assert_eq!(from_store, from_files, "{name}");
    }
    // One rank's lines come from one node per round; both nodes train in one round here.
    let rank1 = logs(&["multi", "--store", &store, "--rank", "1"]);
    assert!(!rank1.is_empty());
    assert!(rank1.iter().all(|l| fields(l).2 == "r1"), "{rank1:#?}");

    let out = output(&["logs", "nope", "--store", &store]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("job nope"), "{stderr}");
}

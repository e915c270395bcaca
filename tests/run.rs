//! End-to-end tests of `kiln run`: the real binary, real worker processes, real
//! TCP rings, real SIGKILL.
//!
//! Each test starts several processes; they run one at a time (a shared lock)
//! so that two-core machines are not oversubscribed into timeouts.

mod common;

use common::{read_weights, repo};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "warn");
    cmd
}

fn run_ok(args: &[&str], data_dir: &Path) -> serde_json::Value {
    let out = kiln()
        .args(args)
        .arg("--json")
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    summary(&out)
}

fn summary(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {last}"))
}

/// A small synthetic job; `extra` are `--set` overrides.
fn synthetic_spec(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[job]
name = "synthetic"
seed = 11
[model]
kind = "mlp"
hidden = [32]
[data]
kind = "synthetic"
samples = 512
eval_samples = 128
features = 20
classes = 4
[train]
steps = 30
global_batch = 32
log_interval = 10
eval_interval = 10
threads_per_worker = 1
[optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
[workers]
nproc = 1
device = "cpu"
{extra}
"#
        ),
    )
    .unwrap();
    path
}

#[test]
fn digits_example_reaches_its_accuracy_with_two_workers() {
    let _guard = serial();
    let data = tempfile::tempdir().unwrap();
    let spec = repo().join("examples/digits/job.toml");
    let s = run_ok(
        &[
            "run",
            spec.to_str().unwrap(),
            "--nproc",
            "2",
            "--set",
            "workers.device=\"cpu\"",
        ],
        data.path(),
    );
    assert_eq!(s["job"], "digits");
    assert_eq!(s["world_size"], 2);
    assert_eq!(s["steps"], 400);
    let accuracy = s["eval"]["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.95, "held-out accuracy {accuracy} < 0.95: {s}");
    assert!(s["final_loss"].as_f64().unwrap() < 0.2, "{s}");
    assert!(s["samples_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(s["weights_digest"].as_str().unwrap().len(), 64);
    assert!(
        Path::new(s["weights"].as_str().unwrap()).starts_with(data.path().canonicalize().unwrap())
    );
    assert!(
        data.path().join("jobs/digits/logs/worker-1.log").exists(),
        "worker logs go under --data-dir"
    );
}

#[test]
fn update_does_not_depend_on_world_size_and_runs_are_bit_reproducible() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = synthetic_spec(dir.path(), "");
    let spec = spec.to_str().unwrap();
    let one = run_ok(&["run", spec, "--nproc", "1"], &dir.path().join("one"));
    let two = run_ok(&["run", spec, "--nproc", "2"], &dir.path().join("two"));
    // Micro-batching at world size 2 must not change the update either.
    let two_micro = run_ok(
        &["run", spec, "--nproc", "2", "--set", "train.micro_batch=4"],
        &dir.path().join("micro"),
    );
    let two_again = run_ok(&["run", spec, "--nproc", "2"], &dir.path().join("again"));
    assert_eq!(one["world_size"], 1);
    assert_eq!(two["world_size"], 2);
    assert_eq!(
        two["weights_digest"], two_again["weights_digest"],
        "same world size: bit for bit"
    );

    let w1 = read_weights(one["weights"].as_str().unwrap());
    for other in [&two, &two_micro] {
        let w2 = read_weights(other["weights"].as_str().unwrap());
        assert_eq!(w1.len(), w2.len());
        let mut worst = 0f32;
        for ((n1, a), (n2, b)) in w1.iter().zip(&w2) {
            assert_eq!(n1, n2);
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(
            worst < 1e-5,
            "parameters differ by {worst} between world sizes 1 and 2"
        );
    }
    // The training really moved the weights (the comparison is not vacuous).
    let loss = two["final_loss"].as_f64().unwrap();
    assert!(loss < 1.2, "loss {loss} did not fall from ~ln(4)");
    assert!((one["final_loss"].as_f64().unwrap() - loss).abs() < 1e-4);
}

/// Pids of the `kiln worker` children of `parent`.
fn worker_pids(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (after the parenthesised command) is the parent pid.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == parent && cmdline.contains("worker") {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_worker_killed_mid_run_fails_the_run_within_seconds() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = synthetic_spec(dir.path(), "");
    let mut child = kiln()
        .args([
            "run",
            spec.to_str().unwrap(),
            "--nproc",
            "2",
            "--set",
            "train.steps=1000000",
            "--set",
            "train.log_interval=1",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = 0;
    while seen < 5 {
        let line = lines
            .next()
            .expect("kiln run ended before training started")
            .unwrap();
        if line.starts_with("step ") {
            seen += 1;
        }
    }
    let workers = worker_pids(child.id());
    assert_eq!(workers.len(), 2, "expected 2 workers, found {workers:?}");
    let victim = workers[1];
    let killed_at = Instant::now();
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    std::thread::spawn(move || for _ in lines {});
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "kiln run still running 20 s after a worker was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed_at.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("pid {victim}")) && stderr.contains("SIGKILL"),
        "error names the killed worker: {stderr}"
    );
    // No worker is left behind.
    std::thread::sleep(Duration::from_millis(200));
    for pid in workers {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "worker {pid} still alive after the run failed"
        );
    }
    eprintln!("kiln run exited {took:?} after the SIGKILL");
}

#[test]
fn a_worker_error_is_reported_and_stops_the_others() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    // A TorchScript module whose output does not match the data's classes fails
    // inside the workers, after start-up.
    let spec = synthetic_spec(dir.path(), "");
    let model = repo().join("examples/torchscript/model.pt");
    let out = kiln()
        .args(["run", spec.to_str().unwrap(), "--nproc", "2", "--json"])
        .args([
            "--set",
            "model.kind=\"torchscript\"",
            "--set",
            &format!("model.path=\"{}\"", model.display()),
        ])
        .args(["--set", "data.features=64"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("returns shape [1, 10] for a [1, 64] input; expected [1, 4] logits"),
        "{stderr}"
    );
    assert!(
        stderr.contains("worker rank"),
        "the error names the failing worker: {stderr}"
    );
}

#[test]
fn bad_specs_exit_2_with_an_error_naming_the_field() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "unknown key",
            &["--set", "train.globl_batch=3"],
            "train.globl_batch",
        ),
        (
            "wrong type",
            &["--set", "train.steps=\"many\""],
            "train.steps",
        ),
        (
            "bad enum",
            &["--set", "optimizer.kind=adam"],
            "optimizer.kind",
        ),
        (
            "batch not divisible",
            &["--nproc", "3"],
            "train.global_batch",
        ),
        ("zero workers", &["--nproc", "0"], "workers.nproc"),
        ("bad lr", &["--set", "optimizer.lr=-1"], "optimizer.lr"),
        (
            "missing dataset file",
            &[
                "--set",
                "data.kind=\"safetensors\"",
                "--set",
                "data.train=[\"nope.safetensors\"]",
                "--set",
                "data.eval=[]",
            ],
            "nope.safetensors",
        ),
        (
            "malformed override",
            &["--set", "train.steps"],
            "train.steps",
        ),
    ];
    let spec = synthetic_spec(dir.path(), "");
    for (what, args, needle) in cases {
        let out = kiln()
            .arg("run")
            .arg(&spec)
            .args(*args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(stderr.starts_with("error: "), "{what}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{what}: error should name {needle}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{what}: {stderr}"
        );
    }
    let missing = kiln()
        .args(["run", "/nonexistent/job.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/job.toml"));
}

#[test]
fn other_examples_train() {
    let _guard = serial();
    let data = tempfile::tempdir().unwrap();
    for (example, min_accuracy) in [
        ("examples/torchscript/job.toml", 0.9),
        ("examples/cnn/job.toml", 0.9),
    ] {
        let spec = repo().join(example);
        let s = run_ok(
            &[
                "run",
                spec.to_str().unwrap(),
                "--set",
                "train.steps=150",
                "--set",
                "workers.device=\"cpu\"",
            ],
            data.path(),
        );
        let accuracy = s["eval"]["accuracy"].as_f64().unwrap();
        assert!(
            accuracy >= min_accuracy,
            "{example}: accuracy {accuracy}: {s}"
        );
    }
}

#[test]
fn workers_talk_to_their_agent_over_inherited_socket_pairs_that_nobody_else_can_reach() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = synthetic_spec(dir.path(), "");
    let mut child = kiln()
        .args([
            "run",
            spec.to_str().unwrap(),
            "--nproc",
            "2",
            "--set",
            "train.steps=1000000",
            "--set",
            "train.log_interval=1",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while !lines
        .next()
        .expect("kiln run ended before training started")
        .unwrap()
        .starts_with("step ")
    {}
    let workers = worker_pids(child.id());
    assert_eq!(workers.len(), 2, "expected 2 workers, found {workers:?}");
    // No listening socket a local process could connect to and pose as a
    // worker (kiln used to bind `@kiln-agent-{agent pid}-…` in the abstract
    // namespace).
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    let agent_socket = format!("@kiln-agent-{}-", child.id());
    let listening: Vec<&str> = unix.lines().filter(|l| l.contains(&agent_socket)).collect();
    assert!(
        listening.is_empty(),
        "kiln sockets others can reach: {listening:?}"
    );
    for pid in &workers {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("--agent-fd"), "{cmdline}");
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    // A worker started by hand, without its agent's descriptor, refuses.
    let out = kiln()
        .args(["worker", "--agent-fd", "0", "--local-rank", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a socket"), "{stderr}");
}

//! System test of `kiln coordinator`: a real etcd, two coordinator replicas as
//! separate processes, the client commands, real agents launched by the
//! elected replica, and a SIGKILL of the replica that was doing the work.

mod common;

use common::repo;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_coordinator::etcd_server::EtcdServer;
use serde_json::Value;

const TOKEN: &str = "test-token-8d1f0c";

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "info")
        .env("KILN_COORDINATOR_TOKEN", TOKEN)
        .env_remove("KILN_COORDINATOR");
    cmd
}

/// A process killed (SIGKILL) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Agents run in sessions of their own and outlive their coordinator: kill
/// their process groups (agent and workers) when the test ends, however it ends.
#[derive(Default)]
struct Agents(Vec<i32>);

impl Drop for Agents {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: plain syscall; a group that is gone is ESRCH.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// Starts a replica and returns it with the address it serves on.
fn coordinator(name: &str, store: &str, data_dir: &Path) -> (Proc, SocketAddr) {
    let log = data_dir.join(format!("coordinator-{name}.log"));
    let mut child = kiln()
        .args(["coordinator", "--store", store, "--listen", "127.0.0.1:0"])
        .args(["--name", name, "--launch", "local", "--lease-ttl-secs", "2"])
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc { child, log };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "coordinator {name} did not start: {line:?}\n{}",
                proc.log_text()
            )
        })
        .parse()
        .unwrap();
    (proc, addr)
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn run(args: &[&str]) -> Output {
    kiln().args(args).output().unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn status(addr: SocketAddr, job: &str) -> Value {
    let text = run_ok(&["status", job, "--json", "--coordinator", &url(addr)]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status is not JSON ({e}): {text}"))
}

/// Polls the job's status through `addr` until `done` holds; the deadline is
/// generous so that a loaded machine does not fail the test.
fn wait_status(addr: SocketAddr, job: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = status(addr, job);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "job {job} never {what}: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn launched_by(s: &Value) -> Option<&str> {
    s["launch"]["by"].as_str()
}

fn agent_pids(s: &Value) -> Vec<i32> {
    s["launch"]["agents"]
        .as_array()
        .map(|agents| {
            agents
                .iter()
                .filter_map(|a| a["pid"].as_i64())
                .map(|p| p as i32)
                .collect()
        })
        .unwrap_or_default()
}

fn has_pids(s: &Value) -> bool {
    let agents = s["launch"]["agents"].as_array().map_or(0, Vec::len);
    agents > 0 && agent_pids(s).len() == agents
}

/// Follows a job with `kiln status JOB --watch --json` to its end; returns
/// the exit code and the statuses seen.
fn watch(addr: SocketAddr, job: &str) -> (i32, Vec<Value>) {
    let out = run(&[
        "status",
        job,
        "--watch",
        "--json",
        "--coordinator",
        &url(addr),
    ]);
    let seen: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !seen.is_empty(),
        "watch of {job} printed nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), seen)
}

#[test]
fn replicas_share_jobs_and_hand_over_when_the_active_one_dies() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut agents = Agents::default();
    let spec = repo().join("examples/digits/job.toml");
    let spec = spec.to_str().unwrap();
    let small = [
        "--set",
        "train.steps=30",
        "--set",
        "workers.nproc=1",
        "--set",
        "checkpoint.interval=10",
        "--set",
        "elastic.settle_secs=0",
    ];

    // Replica A alone: it wins the election and launches what is submitted.
    let (mut a, addr_a) = coordinator("a", &store, data);
    let mut args = vec!["submit", spec, "--job-id", "first", "--coordinator"];
    let url_a = url(addr_a);
    args.push(&url_a);
    args.extend(small);
    assert_eq!(run_ok(&args).trim(), "submitted job first");
    let first = wait_status(addr_a, "first", "got agents", has_pids);
    assert_eq!(launched_by(&first), Some("a"));
    agents.0.extend(agent_pids(&first));

    // Replica B joins. A job submitted through B is launched by A, the
    // elected replica, not by B.
    let (b, addr_b) = coordinator("b", &store, data);
    let url_b = url(addr_b);
    let mut args = vec!["submit", spec, "--job-id", "held", "--coordinator", &url_b];
    args.extend(small);
    // Two nodes needed, one launched: the job waits for a node that never comes.
    args.extend(["--set", "elastic.min_nodes=2", "--set", "launch.nodes=1"]);
    run_ok(&args);
    let held = wait_status(addr_b, "held", "got agents", has_pids);
    assert_eq!(launched_by(&held), Some("a"));
    agents.0.extend(agent_pids(&held));
    // An invalid spec and a taken id are refused through either replica.
    let out = run(&["submit", spec, "--job-id", "first", "--coordinator", &url_b]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "submit",
        spec,
        "--job-id",
        "bad",
        "--set",
        "train.global_batch=0",
        "--coordinator",
        &url_a,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("train.global_batch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the token nothing is served.
    let out = kiln()
        .env_remove("KILN_COORDINATOR_TOKEN")
        .args(["jobs", "--coordinator", &url_b])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGKILL A, the replica doing the background work.
    a.kill();

    // B shows everything A accepted.
    let jobs: Value =
        serde_json::from_str(&run_ok(&["jobs", "--json", "--coordinator", &url_b])).unwrap();
    let names: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "held"]);
    let table = run_ok(&["jobs", "--coordinator", &url_b]);
    assert!(table.starts_with("JOB"), "{table}");
    assert!(table.contains("first") && table.contains("held"), "{table}");
    let first_via_b = status(addr_b, "first");
    assert_eq!(launched_by(&first_via_b), Some("a"));
    assert!(!first_via_b["submitted_at"].is_null());

    // B takes over the election: a job submitted now is launched by B.
    let mut args = vec!["submit", spec, "--job-id", "after", "--coordinator", &url_b];
    args.extend(small);
    run_ok(&args);
    let after = wait_status(addr_b, "after", "got agents", has_pids);
    assert_eq!(launched_by(&after), Some("b"));
    agents.0.extend(agent_pids(&after));

    // Cancel through B: the held job's agent sees the request and stops it.
    let out = run_ok(&[
        "cancel",
        "held",
        "--reason",
        "test",
        "--coordinator",
        &url_b,
    ]);
    assert!(out.contains("held"), "{out}");
    let (code, seen) = watch(addr_b, "held");
    assert_eq!(seen.last().unwrap()["phase"], "cancelled", "{seen:#?}");
    assert_eq!(code, 1);

    // The agents A launched outlived A: its job finishes, seen through B.
    for job in ["first", "after"] {
        let (code, seen) = watch(addr_b, job);
        let last = seen.last().unwrap();
        assert_eq!(last["phase"], "succeeded", "{job}: {last:#}");
        assert_eq!(last["step"], 30, "{job}: {last:#}");
        assert_eq!(code, 0);
    }
    // Nothing was launched twice.
    for job in ["first", "held", "after"] {
        let s = status(addr_b, job);
        let launches = s["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "launched")
            .count();
        assert_eq!(launches, 1, "{job}: {s:#}");
    }
    // A finished job cannot be cancelled.
    let out = run(&["cancel", "first", "--coordinator", &url_b]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already succeeded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM stops a replica cleanly (it resigns and drains its calls).
    let mut b = b;
    // SAFETY: plain syscall on our own child.
    unsafe {
        libc::kill(b.child.id() as i32, libc::SIGTERM);
    }
    let exit = b.child.wait().unwrap();
    assert!(exit.success(), "{exit}: {}", b.log_text());
}

#[test]
fn an_unauthenticated_coordinator_stays_on_loopback() {
    let out = kiln()
        .env_remove("KILN_COORDINATOR_TOKEN")
        .args(["coordinator", "--store", "mem://", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without a token"), "{stderr}");
    assert!(stderr.contains("KILN_COORDINATOR_TOKEN"), "{stderr}");
}

/// Runs `openssl` in `dir` (Debian's openssl; the base system has it).
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The job API over TLS: a client needs https:// and the CA that signed the
/// coordinator's certificate, the token is still checked, and neither plain
/// gRPC nor another CA gets an answer.
#[test]
fn the_job_api_over_tls_needs_the_ca_and_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let days = ["-days", "1"];
    for (name, cn) in [("ca", "kiln test CA"), ("other", "another CA")] {
        let (key, pem, subj) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN={cn}"),
        );
        openssl(
            d,
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem,
                "-subj", &subj, days[0], days[1],
            ],
        );
    }
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-extfile",
            "san.ext",
            days[0],
            days[1],
        ],
    );

    let log = d.join("coordinator.log");
    let mut child = kiln()
        .args([
            "coordinator",
            "--store",
            "mem://",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert-file")
        .arg(d.join("server.pem"))
        .arg("--tls-key-file")
        .arg(d.join("server.key"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc { child, log };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "the coordinator did not start: {line:?}\n{}",
                proc.log_text()
            )
        })
        .parse()
        .unwrap();
    let https = format!("https://{addr}");
    let ca = d.join("ca.pem");
    let other = d.join("other.pem");
    let (ca, other) = (ca.to_str().unwrap(), other.to_str().unwrap());

    run_ok(&["jobs", "--coordinator", &https, "--ca-file", ca]);

    let refused = |out: Output, what: &str, expect: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{what} was answered");
        assert!(stderr.contains(expect), "{what}: {stderr}");
    };
    refused(
        run(&["jobs", "--coordinator", &https]),
        "https without a CA",
        "--ca-file",
    );
    refused(
        run(&["jobs", "--coordinator", &https, "--ca-file", other]),
        "another CA",
        "connect to the coordinator",
    );
    refused(
        run(&["jobs", "--coordinator", &format!("http://{addr}")]),
        "plain gRPC to a TLS port",
        "",
    );
    let wrong_token = kiln()
        .env("KILN_COORDINATOR_TOKEN", "not-the-token")
        .args(["jobs", "--coordinator", &https, "--ca-file", ca])
        .output()
        .unwrap();
    refused(wrong_token, "a wrong token", "unauthenticated");
}

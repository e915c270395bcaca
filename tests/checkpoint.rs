//! End-to-end checkpoint tests: the real `kiln` binary, real worker processes,
//! real SIGKILL and real crashes inside a save (failpoints, compiled into the
//! test build only), checkpoints on the local filesystem.

mod common;

use common::repo;

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
    cmd.env("KILN_LOG", "warn")
        .env_remove("KILN_CKPT_FAILPOINT");
    cmd
}

fn spec(dir: &Path) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        r#"
[job]
name = "resume"
seed = 3
[model]
kind = "mlp"
hidden = [48, 24]
[data]
kind = "synthetic"
samples = 600
eval_samples = 100
features = 24
classes = 5
[train]
steps = 60
global_batch = 24
log_interval = 1
threads_per_worker = 1
[optimizer]
kind = "adamw"
lr = 0.01
weight_decay = 0.01
[schedule]
kind = "cosine"
warmup_steps = 5
[workers]
nproc = 2
device = "cpu"
[checkpoint]
interval = 5
keep_last = 50
chunk_mb = 0.004
"#,
    )
    .unwrap();
    path
}

fn summary(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kiln failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {last}"))
}

/// `kiln run SPEC EXTRA... --data-dir DATA`.
fn run_cmd(spec: &Path, data: &Path, extra: &[&str]) -> Command {
    let mut cmd = kiln();
    cmd.arg("run")
        .arg(spec)
        .args(extra)
        .arg("--data-dir")
        .arg(data);
    cmd
}

fn run_json(spec: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    summary(&run_cmd(spec, data, extra).arg("--json").output().unwrap())
}

fn root(data: &Path) -> String {
    format!(
        "file://{}",
        data.canonicalize()
            .unwrap()
            .join("checkpoints/resume")
            .display()
    )
}

fn weights(path: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
        .iter()
        .flat_map(|(_, t)| {
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A seed from the clock, printed so a failure can be replayed with KILN_TEST_SEED.
fn seed() -> u64 {
    let seed = std::env::var("KILN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("KILN_TEST_SEED={seed}");
    seed
}

/// Starts `kiln run` and SIGKILLs it (the agent; its workers die with it) once
/// step `kill_at` is done and at least one checkpoint is committed.
fn run_and_kill(spec: &Path, data: &Path, kill_at: u64) -> u64 {
    let mut child = kiln()
        .arg("run")
        .arg(spec)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut committed = 0u64;
    let mut last_step = 0u64;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("checkpoint at step ") {
            committed = rest.split_whitespace().next().unwrap().parse().unwrap();
            // The line says how the save stored its chunks, and why.
            assert!(
                [", stored zstd (", ", stored none ("]
                    .iter()
                    .any(|s| line.contains(s))
                    && line.contains("checkpoint.compression = "),
                "{line}"
            );
        }
        if let Some(rest) = line.strip_prefix("step ") {
            last_step = rest.split('/').next().unwrap().parse().unwrap();
        }
        if last_step >= kill_at && committed > 0 {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run ended before it could be killed (step {last_step})"
    );
    last_step
}

#[test]
fn a_run_killed_at_a_random_step_resumes_bit_for_bit() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let whole = run_json(&spec, &dir.path().join("whole"), &[]);
    assert_eq!(whole["start_step"], 0);

    let kill_at = 8 + seed() % 45;
    let data = dir.path().join("killed");
    let killed_at = run_and_kill(&spec, &data, kill_at);
    let resumed = run_json(&spec, &data, &["--resume", "latest"]);
    let start = resumed["start_step"].as_u64().unwrap();
    eprintln!("killed after step {killed_at}, resumed at step {start}");
    assert!(
        start > 0 && start <= killed_at && start.is_multiple_of(5),
        "resumed at {start}"
    );
    assert_eq!(resumed["steps"], 60);
    assert_eq!(
        resumed["weights_digest"], whole["weights_digest"],
        "resume is bit for bit at the same world size"
    );
    assert_eq!(resumed["final_loss"], whole["final_loss"]);

    // At another world size the run continues too, equal within float tolerance.
    let one = run_json(
        &spec,
        &data,
        &["--resume", &start.to_string(), "--nproc", "1"],
    );
    assert_eq!(one["world_size"], 1);
    let (a, b) = (
        weights(whole["weights"].as_str().unwrap()),
        weights(one["weights"].as_str().unwrap()),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "world size 1 resume differs by {worst}");
}

/// The stored file of the first chunk of tensor `name` in the manifest at `url`.
fn chunk_of(root: &str, manifest_url: &str, name: &str) -> PathBuf {
    let path = manifest_url.strip_prefix("file://").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let tensor = manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap();
    let key = tensor["chunks"][0]["key"].as_str().unwrap();
    PathBuf::from(root.strip_prefix("file://").unwrap()).join(key)
}

#[test]
fn a_flipped_byte_is_caught_by_verify_and_resume_falls_back() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let data = dir.path().join("data");
    let first = run_json(&spec, &data, &["--set", "train.steps=20"]);
    let root = root(&data);
    let latest = first["checkpoint"].as_str().unwrap().to_string();
    assert!(latest.contains("00000000000000000020"), "{latest}");

    let ok = kiln().args(["ckpt", "verify", &root]).output().unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    // fc2 is the last layer: its chunks differ from every earlier checkpoint's.
    let chunk = chunk_of(&root, &latest, "model/fc2.weight");
    let mut bytes = std::fs::read(&chunk).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&chunk, bytes).unwrap();

    let bad = kiln().args(["ckpt", "verify", &root]).output().unwrap();
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("CORRUPT") && stdout.contains("model/fc2.weight"),
        "{stdout}"
    );

    let out = run_cmd(
        &spec,
        &data,
        &["--resume", "latest", "--json", "--set", "train.steps=20"],
    )
    .output()
    .unwrap();
    let resumed = summary(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(resumed["start_step"], 15, "fell back to the parent");
    assert!(
        stderr.contains("WARNING") && stderr.contains("00000000000000000020"),
        "says so loudly: {stderr}"
    );
    assert_eq!(
        resumed["weights_digest"], first["weights_digest"],
        "and redoes the lost steps exactly"
    );
}

#[test]
fn a_crash_in_every_phase_of_a_save_leaves_latest_complete() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    for phase in [
        "chunk-upload:3",
        "after-chunks",
        "after-manifest",
        "during-latest",
    ] {
        let data = dir.path().join(phase.replace(':', "-"));
        let base = run_json(&spec, &data, &["--set", "train.steps=10"]);
        assert!(
            base["checkpoint"]
                .as_str()
                .unwrap()
                .contains("00000000000000000010")
        );
        // Resume and crash inside the first save of the continued run (step 15).
        let started = Instant::now();
        let out = run_cmd(
            &spec,
            &data,
            &["--resume", "latest", "--set", "train.steps=20"],
        )
        .env("KILN_CKPT_FAILPOINT", phase)
        .output()
        .unwrap();
        assert!(
            !out.status.success(),
            "{phase}: the run should have crashed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{phase}: a crash must not hang the run"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("signal 6") || stderr.contains("SIGABRT"),
            "{phase}: {stderr}"
        );

        let root = root(&data);
        let verify = kiln().args(["ckpt", "verify", &root]).output().unwrap();
        let report = String::from_utf8_lossy(&verify.stdout);
        assert!(
            verify.status.success(),
            "{phase}: latest must verify: {report}"
        );
        assert!(
            report.contains("(step 10)") || report.contains("(step 15)"),
            "{phase}: latest is the old or the new checkpoint: {report}"
        );
        // And the job goes on from it.
        let resumed = run_json(
            &spec,
            &data,
            &["--resume", "latest", "--set", "train.steps=20"],
        );
        assert_eq!(resumed["steps"], 20, "{phase}");
    }
}

/// Runs `cmd` to its end, or SIGKILLs it after `limit` and fails: a hang
/// guard, not a performance threshold.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // Its workers die with it (they never outlive their agent).
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the run still had not ended after {limit:?}: it hangs");
        }
    }
}

/// Rank 1's part of the final checkpoint cannot be written (a failpoint that
/// fails the write as a full disk would). Rank 0 does not wait for the part
/// (up to its 10-minute commit timeout): it hears of the failure and the run
/// ends at once. With `checkpoint.required` (the default) it fails naming the
/// cause; with `checkpoint.required = false` it succeeds, with a warning in
/// the log and the summary.
#[test]
fn a_final_save_that_fails_ends_the_run_at_once_failed_or_warned() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let limit = Duration::from_secs(120);
    let mut cmd = run_cmd(
        &spec,
        &dir.path().join("required"),
        &["--set", "train.steps=10", "--set", "checkpoint.interval=0"],
    );
    cmd.env("KILN_CKPT_FAILPOINT", "part-error:1");
    let out = output_within(cmd, limit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run succeeded: {stderr}");
    for expected in [
        "the final checkpoint did not land (checkpoint.required = true)",
        "rank 1 could not save its part",
        "no space left on device",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in: {stderr}");
    }

    let data = dir.path().join("optional");
    let mut cmd = run_cmd(
        &spec,
        &data,
        &[
            "--set",
            "train.steps=10",
            "--set",
            "checkpoint.interval=0",
            "--set",
            "checkpoint.required=false",
            "--json",
        ],
    );
    cmd.env("KILN_CKPT_FAILPOINT", "part-error:1");
    let out = output_within(cmd, limit);
    let report = summary(&out);
    assert_eq!(report["steps"], 10);
    assert_eq!(report["checkpoint"], "", "{report}");
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("the final checkpoint did not land; the run ends without it (checkpoint.required = false)")
            && warnings.contains("rank 1 could not save its part"),
        "{report}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARNING (rank 0): the final checkpoint did not land"),
        "{stderr}"
    );
    assert!(
        !data.join("checkpoints/resume/latest").exists(),
        "a checkpoint committed"
    );
}

#[test]
fn exported_weights_load_in_pytorch_and_give_kiln_s_predictions() {
    let _guard = serial();
    let python = repo().join(".venv/bin/python");
    if !python.exists() {
        panic!("{} is missing: run scripts/bootstrap.sh", python.display());
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let job = repo().join("examples/digits/job.toml");
    let run = run_json(
        &job,
        &data,
        &[
            "--nproc",
            "1",
            "--set",
            "train.steps=150",
            "--set",
            "workers.device=\"cpu\"",
        ],
    );
    let out_file = dir.path().join("digits.safetensors");
    let export = kiln()
        .args(["ckpt", "export", run["checkpoint"].as_str().unwrap()])
        .arg(&out_file)
        .args(["--format", "safetensors"])
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let script = r#"
import sys, json, torch
from safetensors.torch import load_file
weights = {k.removeprefix("model/"): v for k, v in load_file(sys.argv[1]).items()}
data = load_file(sys.argv[2])
x, y = data["x"], data["y"]
h = x
layers = sorted({k.split(".")[0] for k in weights}, key=lambda n: int(n[2:]))
for i, name in enumerate(layers):
    h = torch.nn.functional.linear(h, weights[name + ".weight"], weights[name + ".bias"])
    if i < len(layers) - 1:
        h = torch.relu(h)
loss = torch.nn.functional.cross_entropy(h, y).item()
accuracy = int((h.argmax(-1) == y).sum()) / len(y)
print(json.dumps({"accuracy": accuracy, "loss": loss}))
"#;
    let eval_shard = repo().join("examples/digits/data/eval-00000.safetensors");
    let py = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&out_file)
        .arg(&eval_shard)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let torch: serde_json::Value = serde_json::from_slice(py.stdout.trim_ascii()).unwrap();
    let (ka, ta) = (
        run["eval"]["accuracy"].as_f64().unwrap(),
        torch["accuracy"].as_f64().unwrap(),
    );
    let (kl, tl) = (
        run["eval"]["loss"].as_f64().unwrap(),
        torch["loss"].as_f64().unwrap(),
    );
    assert!((ka - ta).abs() < 1e-9, "accuracy: kiln {ka}, PyTorch {ta}");
    assert!((kl - tl).abs() < 1e-5, "loss: kiln {kl}, PyTorch {tl}");
    assert!(ka > 0.9);

    // And the exported file initialises a model (`model.init`): a run that
    // barely moves (lr 1e-12, one step) predicts what the exported model does.
    let init_file = format!("model.init=\"{}\"", out_file.display());
    let init = run_json(
        &job,
        &dir.path().join("init"),
        &[
            "--nproc",
            "1",
            "--set",
            "train.steps=1",
            "--set",
            "optimizer.lr=1e-12",
            "--set",
            "schedule.min_lr=0",
            "--set",
            "workers.device=\"cpu\"",
            "--set",
            "checkpoint.final_checkpoint=false",
            "--set",
            &init_file,
        ],
    );
    assert_eq!(init["eval"]["accuracy"].as_f64().unwrap(), ka, "{init}");
    assert!(
        (init["eval"]["loss"].as_f64().unwrap() - kl).abs() < 1e-5,
        "{init}"
    );
}

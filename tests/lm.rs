//! End-to-end tests of language-model training through `kiln run`: token
//! data, the built-in gpt, a TorchScript module that returns its own loss,
//! bf16, clipping, exact resume, and the PyTorch twin reading an export.
//!
//! Tests run one at a time (a shared lock): each starts worker processes.

mod common;

use common::{read_weights, repo};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "warn");
    cmd
}

fn run(spec: &Path, data_dir: &Path, extra: &[&str]) -> Output {
    kiln()
        .arg("run")
        .arg(spec)
        .args(extra)
        .arg("--json")
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap()
}

fn run_ok(spec: &Path, data_dir: &Path, extra: &[&str]) -> serde_json::Value {
    let out = run(spec, data_dir, extra);
    assert!(
        out.status.success(),
        "kiln run {extra:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"))
}

/// A small learnable "language" over 64 ids: each token follows from the
/// last by a fixed rule, with a seeded random restart every few tokens.
fn token_stream(n: usize, seed: u64) -> Vec<u16> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut t = 0u16;
    (0..n)
        .map(|_| {
            let r = next();
            t = if r % 7 == 0 {
                (r >> 8) as u16 % 64
            } else {
                (t * 5 + 3) % 64
            };
            t
        })
        .collect()
}

fn write_tokens(path: &Path, tokens: &[u16]) {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// A tiny gpt job over generated token files in `dir`; `extra` is appended
/// to the spec (TOML).
fn lm_spec(dir: &Path, extra: &str) -> PathBuf {
    write_tokens(&dir.join("train.bin"), &token_stream(20_000, 1));
    write_tokens(&dir.join("val.bin"), &token_stream(2_000, 2));
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[job]
name = "tiny-lm"
seed = 5
[model]
kind = "gpt"
vocab = 64
n_layer = 2
n_head = 2
d_model = 32
[data]
kind = "tokens"
train = ["train.bin"]
eval = ["val.bin"]
seq_len = 16
[train]
steps = 12
global_batch = 8
log_interval = 4
threads_per_worker = 1
[optimizer]
kind = "adamw"
lr = 0.01
[checkpoint]
interval = 6
{extra}
"#
        ),
    )
    .unwrap();
    path
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn a_gpt_learns_and_world_sizes_one_and_two_agree() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = lm_spec(dir.path(), "");
    let one = run_ok(&spec, &dir.path().join("one"), &["--nproc", "1"]);
    let two = run_ok(&spec, &dir.path().join("two"), &["--nproc", "2"]);
    let (l1, l2) = (
        one["final_loss"].as_f64().unwrap(),
        two["final_loss"].as_f64().unwrap(),
    );
    assert!(
        (l1 - l2).abs() < 1e-4 * l1.abs().max(1.0),
        "loss at world size 1: {l1}, at 2: {l2}"
    );
    let diff = max_abs_diff(
        &read_weights(one["weights"].as_str().unwrap()),
        &read_weights(two["weights"].as_str().unwrap()),
    );
    // AdamW divides by the root of the second moment, which turns the last
    // bits of a differently ordered sum into differences of up to ~1e-4 per
    // step on weights with tiny gradients; a wrong slice, order or weighting
    // moves weights by the learning rate (1e-2) per step.
    assert!(diff < 2e-3, "weights differ by up to {diff}");
    // It learns: ln(64) = 4.16 is the loss of knowing nothing.
    let eval = &two["eval"];
    let loss = eval["loss"].as_f64().unwrap();
    assert!(loss < 3.6, "held-out loss {loss} after 12 steps");
    assert!(
        (eval["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp(),
        "{eval}"
    );
    assert!(
        two["grad_norm"].is_null(),
        "no clipping, no norm: {}",
        two["grad_norm"]
    );
}

#[test]
fn bf16_with_clipping_and_a_bf16_wire_resumes_bit_for_bit() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = lm_spec(dir.path(), "[comm]\ngrad_dtype = \"bf16\"\n");
    let precision = [
        "--set",
        "train.precision=\"bf16\"",
        "--set",
        "train.clip_grad_norm=0.5",
    ];
    let mut args = vec!["--nproc", "2"];
    args.extend(precision);
    let data = dir.path().join("data");
    let whole = run_ok(&spec, &data, &args);
    let norm = whole["grad_norm"]
        .as_f64()
        .expect("clipping reports the norm");
    assert!(norm.is_finite() && norm > 0.0, "{norm}");
    let mut resumed_args = args.clone();
    resumed_args.extend(["--resume", "6"]);
    let resumed = run_ok(&spec, &data, &resumed_args);
    assert_eq!(resumed["start_step"], 6);
    assert_eq!(
        whole["weights_digest"], resumed["weights_digest"],
        "a bf16 run resumed from step 6 ends with other weights"
    );
    assert_eq!(whole["final_loss"], resumed["final_loss"]);
    // bf16 is not fp32: the same job in fp32 ends elsewhere.
    let mut fp32_args = vec!["--nproc", "2", "--set", "train.clip_grad_norm=0.5"];
    fp32_args.extend(["--set", "comm.grad_dtype=\"fp32\""]);
    let fp32 = run_ok(&spec, &dir.path().join("fp32"), &fp32_args);
    assert_ne!(whole["weights_digest"], fp32["weights_digest"]);
}

#[test]
fn bad_token_data_is_refused_naming_the_file() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = lm_spec(dir.path(), "");
    // An id beyond the vocabulary.
    let mut tokens = token_stream(2_000, 3);
    tokens[777] = 100;
    write_tokens(&dir.path().join("val.bin"), &tokens);
    let out = run(&spec, &dir.path().join("d1"), &["--nproc", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("val.bin") && stderr.contains("100") && stderr.contains("777"),
        "{stderr}"
    );
    // A window longer than the data.
    write_tokens(&dir.path().join("val.bin"), &token_stream(10, 3));
    let out = run(&spec, &dir.path().join("d2"), &["--nproc", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("val.bin") && stderr.contains("seq_len"),
        "{stderr}"
    );
    // A file whose length is not a whole number of ids.
    std::fs::write(dir.path().join("val.bin"), [1u8, 2, 3]).unwrap();
    let out = run(&spec, &dir.path().join("d3"), &["--nproc", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("val.bin"), "{stderr}");
    // The spec itself: a gpt on feature data, and token data without seq_len.
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&bad, text.replace("seq_len = 16\n", "")).unwrap();
    let out = run(&bad, &dir.path().join("d4"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("data.seq_len"), "{stderr}");
}

#[test]
fn a_torchscript_module_that_returns_its_loss_trains_on_tokens() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let module = repo().join("examples/torchscript/lm_loss.pt");
    let spec = lm_spec(dir.path(), "");
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "kind = \"gpt\"\nvocab = 64\nn_layer = 2\nn_head = 2\nd_model = 32\n",
        &format!(
            "kind = \"torchscript\"\nreturns = \"loss\"\npath = {:?}\n",
            module.display().to_string()
        ),
    );
    std::fs::write(&spec, text).unwrap();
    let out = run_ok(
        &spec,
        &dir.path().join("data"),
        &["--nproc", "2", "--set", "train.steps=20"],
    );
    let eval = out["eval"]["loss"].as_f64().unwrap();
    // The module's vocabulary is 256: ln(256) = 5.55 knows nothing.
    assert!(eval < 4.5, "held-out loss of the module's own loss: {eval}");
    assert!(out["eval"].get("accuracy").is_none(), "{}", out["eval"]);
}

#[test]
fn an_exported_gpt_loads_into_the_pytorch_module_with_the_same_loss() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = lm_spec(dir.path(), "");
    let out = run_ok(&spec, &dir.path().join("data"), &["--nproc", "2"]);
    let exported = dir.path().join("export.safetensors");
    let status = kiln()
        .args(["ckpt", "export"])
        .arg(out["checkpoint"].as_str().unwrap())
        .arg(&exported)
        .status()
        .unwrap();
    assert!(status.success());
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/bootstrap.sh",
        python.display()
    );
    // PyTorch reads the export into scripts/kiln_gpt.py's module (strict: the
    // names match) and evaluates the same held-out windows kiln evaluated.
    let script = r#"
import sys, torch
sys.path.insert(0, sys.argv[1] + "/scripts")
from kiln_gpt import GPT
from safetensors.torch import load_file
state = {k.removeprefix("model/"): v for k, v in load_file(sys.argv[2]).items()}
model = GPT(vocab=64, seq_len=16, n_layer=2, n_head=2, d_model=32)
model.load_state_dict(state, strict=True)
model.eval()
import numpy as np
ids = torch.from_numpy(np.fromfile(sys.argv[3], dtype="<u2").astype("int64"))
n = (len(ids) - 1) // 16
x = torch.stack([ids[i * 16 : i * 16 + 16] for i in range(n)])
y = torch.stack([ids[i * 16 + 1 : i * 16 + 17] for i in range(n)])
with torch.no_grad():
    print(model(x, y).item())
"#;
    let py = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(repo())
        .arg(&exported)
        .arg(dir.path().join("val.bin"))
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let torch_loss: f64 = String::from_utf8_lossy(&py.stdout).trim().parse().unwrap();
    let kiln_loss = out["eval"]["loss"].as_f64().unwrap();
    assert!(
        (torch_loss - kiln_loss).abs() < 1e-4,
        "PyTorch {torch_loss} vs kiln {kiln_loss}"
    );
}

#[test]
fn the_overlapped_all_reduce_gives_the_same_weights_as_the_one_after_backward() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = lm_spec(dir.path(), "");
    // Three ranks (sums whose order matters), small buckets (several in
    // flight during backward), and two micro-batches (accumulation first).
    let common = [
        "--nproc",
        "3",
        "--set",
        "train.global_batch=12",
        "--set",
        "train.micro_batch=2",
        "--set",
        "comm.bucket_mb=0.01",
        "--set",
        "train.clip_grad_norm=1.0",
    ];
    let mut after = common.to_vec();
    after.extend(["--set", "comm.overlap=false"]);
    let mut overlapped = common.to_vec();
    overlapped.extend(["--set", "comm.overlap=true"]);
    let a = run_ok(&spec, &dir.path().join("after"), &after);
    let b = run_ok(&spec, &dir.path().join("overlapped"), &overlapped);
    assert_eq!(a["weights_digest"], b["weights_digest"]);
    assert_eq!(a["final_loss"], b["final_loss"]);
    assert_eq!(a["grad_norm"], b["grad_norm"]);
}

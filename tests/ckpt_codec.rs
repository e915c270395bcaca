//! `checkpoint.compression` end to end: the spec field reaches the save
//! pipeline through `kiln run`, each checkpoint's manifest records every
//! rank's codec choice, `kiln ckpt show` says it, and a bad value is refused
//! before anything runs.

use std::path::Path;
use std::process::{Command, Output};

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "warn");
    cmd
}

fn spec(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        r#"
[job]
name = "codec"
seed = 5
[model]
kind = "mlp"
hidden = [64]
[data]
kind = "synthetic"
samples = 256
eval_samples = 0
features = 32
classes = 4
[train]
steps = 4
global_batch = 32
threads_per_worker = 1
[optimizer]
kind = "adamw"
lr = 0.01
[workers]
nproc = 2
device = "cpu"
[checkpoint]
interval = 2
chunk_mb = 0.004
"#,
    )
    .unwrap();
    path
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kiln failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs the job with `checkpoint.compression = value` (the spec's default
/// when `None`) and returns the latest manifest as `kiln ckpt show --json`
/// prints it, and the text `kiln ckpt show` prints.
fn run_with(dir: &Path, value: Option<&str>) -> (serde_json::Value, String) {
    let data = dir.join(value.unwrap_or("default"));
    let mut cmd = kiln();
    cmd.arg("run").arg(spec(dir)).arg("--json");
    if let Some(v) = value {
        cmd.args(["--set", &format!("checkpoint.compression={v}")]);
    }
    let summary = ok(cmd.arg("--data-dir").arg(&data).output().unwrap());
    let summary: serde_json::Value = serde_json::from_str(summary.lines().last().unwrap()).unwrap();
    let root = summary["checkpoint_root"].as_str().unwrap().to_string();
    let json = ok(kiln()
        .args(["ckpt", "show", &root, "--json"])
        .output()
        .unwrap());
    let text = ok(kiln().args(["ckpt", "show", &root]).output().unwrap());
    (serde_json::from_str(&json).unwrap(), text)
}

#[test]
fn every_rank_records_its_codec_and_kiln_ckpt_show_says_it() {
    let dir = tempfile::tempdir().unwrap();
    for (value, policy) in [
        (Some("none"), "none"),
        (Some("zstd"), "zstd"),
        (None, "auto"),
    ] {
        let (m, text) = run_with(dir.path(), value);
        let records = m["compression"].as_array().expect("compression records");
        assert_eq!(records.len(), 2, "one per rank: {m}");
        for (rank, r) in records.iter().enumerate() {
            assert_eq!(r["rank"], rank as u64);
            assert_eq!(r["policy"], policy, "{r}");
            let codec = r["codec"].as_str().unwrap();
            match policy {
                "auto" => assert!(codec == "none" || codec == "zstd", "{r}"),
                fixed => assert_eq!(codec, fixed, "{r}"),
            }
            assert!(!r["reason"].as_str().unwrap().is_empty());
        }
        let codec0 = records[0]["codec"].as_str().unwrap();
        assert!(
            text.contains(&format!("compression rank 0: {policy} -> {codec0}")),
            "{text}"
        );
        if policy == "none" {
            // Every chunk stored as it is: stored = raw + a 32-byte header each.
            let totals = &m["totals"];
            let (raw, stored, chunks) = (
                totals["raw_bytes"].as_u64().unwrap(),
                totals["stored_bytes"].as_u64().unwrap(),
                totals["chunks"].as_u64().unwrap(),
            );
            assert_eq!(stored, raw + 32 * chunks, "{totals}");
        }
    }
}

#[test]
fn an_unknown_codec_policy_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln()
        .arg("run")
        .arg(spec(dir.path()))
        .args(["--set", "checkpoint.compression=lz4"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("checkpoint.compression") && stderr.contains("lz4"),
        "{stderr}"
    );
}

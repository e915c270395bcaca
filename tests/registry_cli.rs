//! End-to-end tests of `kiln registry`: the real binary trains a small job with
//! `kiln run`, then registers its checkpoints, promotes, canaries, shows,
//! rolls back, deletes and reads the history, as a user would; registered
//! checkpoints outlive retention and `kiln ckpt gc` until their version is
//! deleted, and `kiln serve` serves them all along.

mod common;

use common::repo;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "warn").env_remove("KILN_REGISTRY");
    cmd
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "kiln {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `kiln registry ARGS` against `registry` (through KILN_REGISTRY) as
/// user `user`, expecting success.
fn registry_ok(registry: &str, user: &str, args: &[&str]) -> String {
    let out = kiln()
        .arg("registry")
        .args(args)
        .env("KILN_REGISTRY", registry)
        .env("USER", user)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(args, &out));
    String::from_utf8(out.stdout).unwrap()
}

fn registry_json(registry: &str, user: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let stdout = registry_ok(registry, user, &all);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("kiln registry {args:?} printed no JSON ({e}): {stdout}"))
}

/// Runs `kiln registry ARGS`, expecting failure; returns stderr.
fn registry_err(registry: Option<&str>, args: &[&str]) -> String {
    let mut cmd = kiln();
    cmd.arg("registry").args(args);
    if let Some(r) = registry {
        cmd.env("KILN_REGISTRY", r);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{}", describe(args, &out));
    String::from_utf8(out.stderr).unwrap()
}

/// Trains the digits example for 20 steps with a checkpoint every 10.
fn train(data: &Path) -> serde_json::Value {
    train_with(data, &["--set", "train.steps=20"])
}

/// Trains the digits example with a checkpoint every 10 steps and `extra`
/// arguments to `kiln run`.
fn train_with(data: &Path, extra: &[&str]) -> serde_json::Value {
    let spec = repo().join("examples/digits/job.toml");
    let mut args = vec![
        "run",
        spec.to_str().unwrap(),
        "--set",
        "checkpoint.interval=10",
        "--json",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = kiln().args(&args).output().unwrap();
    assert!(out.status.success(), "{}", describe(&args, &out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON summary ({e}): {last}"))
}

fn targets(alias: &serde_json::Value) -> Vec<(u64, u64)> {
    alias["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["version"].as_u64().unwrap(),
                t["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn register_promote_canary_show_rollback_history() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = train(&data);
    let root = run["checkpoint_root"].as_str().unwrap();
    let final_manifest = run["checkpoint"].as_str().unwrap();
    let registry = format!("file://{}", dir.path().join("registry").display());
    let spec = repo().join("examples/digits/job.toml");

    // Version 1: the step-10 checkpoint, by root and step, with the spec file
    // and an extra metric.
    let v1 = registry_json(
        &registry,
        "alice",
        &[
            "register",
            "digits",
            "--checkpoint",
            root,
            "--step",
            "10",
            "--spec",
            spec.to_str().unwrap(),
            "--metric",
            "reviewed=1",
        ],
    );
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["created_by"], "alice");
    assert_eq!(v1["checkpoint"]["root"], root);
    assert_eq!(v1["checkpoint"]["step"], 10);
    assert_eq!(v1["model"]["spec"]["kind"], "mlp");
    assert_eq!(v1["model"]["spec"]["hidden"], serde_json::json!([128, 64]));
    // 8x8 digits: 64 features, 10 classes.
    assert_eq!(v1["model"]["features"], 64);
    assert_eq!(v1["model"]["classes"], 10);
    assert_eq!(
        v1["signature"]["inputs"][0]["shape"],
        serde_json::json!([-1, 64])
    );
    assert_eq!(
        v1["signature"]["outputs"][0]["shape"],
        serde_json::json!([-1, 10])
    );
    assert_eq!(v1["metrics"]["reviewed"], 1.0);
    assert_eq!(v1["lineage"]["job"], "digits");

    // Version 2: the final checkpoint, by the manifest URL `kiln run` printed,
    // with the spec recorded in the checkpoint. Its digest is the one the run
    // reported for its final weights.
    let v2 = registry_json(
        &registry,
        "bob",
        &["register", "digits", "--checkpoint", final_manifest],
    );
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["checkpoint"]["step"], 20);
    assert_eq!(v2["checkpoint"]["digest"], run["weights_digest"]);
    assert_ne!(v1["checkpoint"]["digest"], v2["checkpoint"]["digest"]);
    // Both came from the same run: the same spec, data and code.
    for field in ["spec_hash", "dataset_fingerprint", "code_version"] {
        assert_eq!(v1["lineage"][field], v2["lineage"][field], "{field}");
        assert!(
            !v2["lineage"][field].as_str().unwrap().is_empty(),
            "{field}"
        );
    }

    // Promote v1, then canary v2 at 10%.
    let a = registry_json(
        &registry,
        "carol",
        &["promote", "digits", "1", "--alias", "production"],
    );
    assert_eq!(targets(&a), [(1, 100)]);
    let a = registry_json(
        &registry,
        "carol",
        &[
            "promote",
            "digits",
            "2",
            "--alias",
            "production",
            "--weight",
            "10",
        ],
    );
    assert_eq!(targets(&a), [(1, 90), (2, 10)]);
    assert_eq!(a["generation"], 2);

    let shown = registry_json(&registry, "x", &["show", "digits@production"]);
    assert_eq!(shown["alias"]["alias"], "production");
    let resolved: Vec<(u64, u64)> = shown["resolved"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["version"]["version"].as_u64().unwrap(),
                r["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(resolved, [(1, 90), (2, 10)]);
    assert_eq!(shown["resolved"][1]["version"], v2);
    let latest = registry_json(&registry, "x", &["show", "digits"]);
    assert_eq!(latest["resolved"][0]["version"], v2);
    let human = registry_ok(&registry, "x", &["show", "digits:2"]);
    assert!(
        human.contains("digits:2") && human.contains(run["weights_digest"].as_str().unwrap()),
        "{human}"
    );
    let human = registry_ok(&registry, "x", &["ls", "digits"]);
    assert!(human.contains("production (90%)"), "{human}");
    assert!(human.contains("production (10%)"), "{human}");
    let models = registry_json(&registry, "x", &["ls"]);
    assert_eq!(models[0]["name"], "digits");
    assert_eq!(models[0]["versions"], 2);

    // Roll the canary back, with --registry and --actor instead of the
    // environment.
    let out = kiln()
        .args([
            "registry",
            "--registry",
            &registry,
            "rollback",
            "digits",
            "--alias",
            "production",
            "--actor",
            "dave",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&["rollback"], &out));
    let a: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(targets(&a), [(1, 100)]);
    assert_eq!(a["updated_by"], "dave");

    // The history: both registrations and the three moves, in order.
    let history = registry_json(&registry, "x", &["history", "digits"]);
    let rows: Vec<(u64, String, String, String)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["action"].as_str().unwrap().to_string(),
                e["actor"].as_str().unwrap().to_string(),
                e["to"].to_string(),
            )
        })
        .collect();
    let t = |ts: &[(u64, u32)]| {
        serde_json::Value::Array(
            ts.iter()
                .map(|(v, w)| serde_json::json!({"version": v, "weight": w}))
                .collect(),
        )
        .to_string()
    };
    let expected: Vec<(u64, &str, &str, Option<String>)> = vec![
        (1, "register", "alice", None),
        (2, "register", "bob", None),
        (3, "alias", "carol", Some(t(&[(1, 100)]))),
        (4, "alias", "carol", Some(t(&[(1, 90), (2, 10)]))),
        (5, "alias", "dave", Some(t(&[(1, 100)]))),
    ];
    assert_eq!(rows.len(), expected.len(), "{history:#}");
    for (row, (seq, action, actor, to)) in rows.iter().zip(expected) {
        assert_eq!(
            (row.0, row.1.as_str(), row.2.as_str()),
            (seq, action, actor)
        );
        if let Some(to) = to {
            assert_eq!(row.3, to, "entry {seq}");
        }
    }
    assert_eq!(history[4]["from"].to_string(), t(&[(1, 90), (2, 10)]));
    assert_eq!(history[1]["to"]["version"], 2);

    // Clear errors for what does not exist or does not fit.
    let err = registry_err(Some(&registry), &["show", "digits:9"]);
    assert!(err.contains("model digits version 9"), "{err}");
    let err = registry_err(
        Some(&registry),
        &["rollback", "digits", "--alias", "staging"],
    );
    assert!(err.contains("alias staging of model digits"), "{err}");
    let err = registry_err(
        Some(&registry),
        &["register", "digits", "--checkpoint", root, "--classes", "7"],
    );
    assert!(
        err.contains("do not fit") && err.contains("fc2.bias"),
        "{err}"
    );
    let err = registry_err(
        Some(&registry),
        &["register", "digits", "--checkpoint", root, "--step", "15"],
    );
    assert!(err.contains("step 15"), "{err}");
    // Nothing was registered by the failed calls.
    let versions = registry_json(&registry, "x", &["ls", "digits"]);
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let registry = format!("file://{}", dir.path().display());

    let err = registry_err(None, &["ls"]);
    assert!(
        err.contains("--registry") && err.contains("KILN_REGISTRY"),
        "{err}"
    );
    let err = registry_err(Some(&registry), &["show", "digits:x"]);
    assert!(err.contains("version \"x\""), "{err}");
    let err = registry_err(Some(&registry), &["show", "a/b"]);
    assert!(err.contains("model name \"a/b\""), "{err}");
    let err = registry_err(Some(&registry), &["history", "..x"]);
    assert!(err.contains("not starting with '.'"), "{err}");
    let err = registry_err(
        Some(&registry),
        &[
            "register",
            "m",
            "--checkpoint",
            "/nowhere",
            "--metric",
            "acc",
        ],
    );
    assert!(err.contains("--metric \"acc\""), "{err}");
    let err = registry_err(
        Some(&registry),
        &["promote", "m", "1", "--alias", "prod", "--weight", "0"],
    );
    assert!(err.contains("1-100"), "{err}");
    let err = registry_err(Some(&registry), &["ls", "m", "--registry", "ftp://x/y"]);
    assert!(err.contains("unknown scheme ftp"), "{err}");
    // An empty registry lists nothing, successfully.
    let out = registry_ok(&registry, "x", &["ls"]);
    assert!(out.contains("no models"), "{out}");
}

/// Runs `kiln ckpt ARGS`, expecting success; returns stdout.
fn ckpt_ok(args: &[&str]) -> String {
    let out = kiln().arg("ckpt").args(args).output().unwrap();
    assert!(out.status.success(), "{}", describe(args, &out));
    String::from_utf8(out.stdout).unwrap()
}

/// The steps of the checkpoints under `root`.
fn steps(root: &str) -> Vec<u64> {
    let listed: serde_json::Value =
        serde_json::from_str(ckpt_ok(&["ls", root, "--json"]).trim()).unwrap();
    let mut steps: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    steps.sort_unstable();
    steps
}

/// Starts `kiln serve` on `model` of `registry`: `Ok` once the model answers
/// ready (the server is then killed), `Err(stderr)` when it exits instead.
fn serve_ready(registry: &str, model: &str, dir: &Path) -> Result<(), String> {
    let stderr_path = dir.join("serve.err");
    let mut child = kiln()
        .args(["serve", "--listen", "127.0.0.1:0", "--registry", registry])
        .args(["--model", model])
        .env_remove("KILN_SERVE_TOKEN")
        .env_remove("KILN_SERVE_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // The first line that says where it listens; none when it exits first.
    // The reader drains stdout to the end, so the server never writes to a
    // closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("kiln serve: listening on http://") {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let Ok(addr) = rx.recv() else {
        let _ = child.wait();
        return Err(std::fs::read_to_string(&stderr_path).unwrap_or_default());
    };
    let name = model.split([':', '@']).next().unwrap();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /v2/models/{name}/ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let _ = child.kill();
    let _ = child.wait();
    assert!(answer.starts_with("HTTP/1.1 200"), "ready: {answer}");
    Ok(())
}

/// The scenario: register the step-10 checkpoint, train on with
/// `keep_last = 1`, collect with `kiln ckpt gc`: the registered version
/// still serves. Deleting the version releases its pin; the next gc
/// deletes the checkpoint.
#[test]
fn a_registered_checkpoint_outlives_gc_until_its_version_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = train(&data);
    let root = run["checkpoint_root"].as_str().unwrap().to_string();
    let registry = format!("file://{}", dir.path().join("registry").display());
    let v1 = registry_json(
        &registry,
        "alice",
        &["register", "digits", "--checkpoint", &root, "--step", "10"],
    );
    assert_eq!(
        (v1["version"].as_u64(), v1["checkpoint"]["step"].as_u64()),
        (Some(1), Some(10))
    );

    // Train on to step 40 with keep_last = 1, then collect without grace.
    let on = train_with(
        &data,
        &[
            "--set",
            "train.steps=40",
            "--set",
            "checkpoint.keep_last=1",
            "--resume",
            "latest",
        ],
    );
    assert_eq!(on["checkpoint_root"].as_str(), Some(root.as_str()));
    assert_eq!(steps(&root), [10, 20, 30, 40]);
    let gc = ["gc", root.as_str(), "--keep-last", "1", "--grace-secs", "0"];
    let dry = ckpt_ok(&[&gc[..], &["--dry-run"]].concat());
    assert!(
        dry.contains("digits:1 in ")
            && dry.contains("step 10, keeps manifests/00000000000000000010-"),
        "{dry}"
    );
    let report: serde_json::Value =
        serde_json::from_str(ckpt_ok(&[&gc[..], &["--json"]].concat()).trim()).unwrap();
    let pins = report["pins"].as_array().unwrap();
    let ours = pins
        .iter()
        .find(|p| p["pin"]["registry"] == registry.as_str())
        .unwrap_or_else(|| panic!("no pin of {registry}: {report:#}"));
    assert_eq!(
        (ours["step"].as_u64(), ours["pin"]["version"].as_u64()),
        (Some(10), Some(1))
    );
    // `kiln run` registered its final checkpoints (steps 20 and 40) in the
    // job's own registry: pinned too. Step 30 goes.
    assert_eq!(steps(&root), [10, 20, 40], "{report:#}");
    serve_ready(&registry, "digits:1", dir.path()).expect("digits:1 serves after gc");

    // An alias on the version blocks its deletion.
    registry_ok(
        &registry,
        "bob",
        &["promote", "digits", "1", "--alias", "production"],
    );
    let err = registry_err(Some(&registry), &["delete", "digits:1"]);
    assert!(err.contains("alias production"), "{err}");
    let err = registry_err(Some(&registry), &["delete", "digits@production"]);
    assert!(err.contains("NAME:VERSION"), "{err}");
    registry_ok(
        &registry,
        "alice",
        &["register", "digits", "--checkpoint", &root, "--step", "40"],
    );
    registry_ok(
        &registry,
        "bob",
        &["promote", "digits", "2", "--alias", "production"],
    );
    let deleted = registry_json(&registry, "carol", &["delete", "digits:1"]);
    assert_eq!(
        (deleted["version"].as_u64(), deleted["deleted_by"].as_str()),
        (Some(1), Some("carol"))
    );
    let history = registry_json(&registry, "x", &["history", "digits"]);
    let last = history.as_array().unwrap().last().unwrap();
    assert_eq!(
        (last["action"].as_str(), last["actor"].as_str()),
        (Some("delete"), Some("carol"))
    );

    // The pin is released: the next gc deletes step 10.
    let report: serde_json::Value =
        serde_json::from_str(ckpt_ok(&[&gc[..], &["--json"]].concat()).trim()).unwrap();
    assert!(
        report["manifests_deleted"][0]
            .as_str()
            .is_some_and(|m| m.starts_with("manifests/00000000000000000010-")),
        "{report:#}"
    );
    assert_eq!(steps(&root), [20, 40]);
    let err = serve_ready(&registry, "digits:1", dir.path()).unwrap_err();
    assert!(
        err.contains("version 1") && err.contains("deleted at"),
        "{err}"
    );
    serve_ready(&registry, "digits@production", dir.path()).expect("the alias serves version 2");
}

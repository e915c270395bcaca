//! Crash consistency: a real child process saves and aborts at each
//! failpoint of the save (feature `failpoints`); afterwards `latest` must name
//! a complete checkpoint that verifies: the old one or the new one, never a
//! mix. Runs against the local filesystem and the S3 server.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::*;
use kiln_checkpoint::{
    CheckpointRoot, Checkpointer, OwnedTensor, SaveConfig, list, load, resolve, verify,
};

const CHILD_ENV: &str = "KILN_CKPT_CRASH_CHILD_ROOT";
/// Exit code of a child that got through its save without crashing.
const FINISHED: i32 = 3;

fn cfg() -> SaveConfig {
    SaveConfig {
        chunk_bytes: 32 << 10,
        upload_concurrency: 2,
        ..SaveConfig::default()
    }
}

fn old_state() -> Vec<OwnedTensor> {
    mixed_state(40)
}

/// Every tensor changes, so the new save uploads many chunks.
fn new_state() -> Vec<OwnedTensor> {
    mixed_state(41)
        .into_iter()
        .map(|mut t| {
            if let Some(b) = t.data.first_mut() {
                *b ^= 0xff;
            }
            t
        })
        .collect()
}

/// The child: resume from latest and save step 2, expecting to die inside.
#[test]
fn crash_child() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return; // only meaningful when re-executed by the tests below
    };
    let root = CheckpointRoot::open(&url).expect("child opens root from env");
    let parent = resolve(&root, "latest").expect("child resolves latest");
    let state = new_state();
    let mut c = Checkpointer::new(root, cfg(), 0, 1).unwrap();
    c.set_parent(&parent);
    c.save(2, "crashing", &views(&state), &meta(2)).unwrap();
    let outcomes = c.flush();
    eprintln!("child finished without crashing: {outcomes:?}");
    std::process::exit(FINISHED);
}

fn run_child(
    root: &CheckpointRoot,
    failpoint: Option<&str>,
    env: &[(String, String)],
) -> std::process::ExitStatus {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, root.url())
        .envs(env.iter().cloned());
    match failpoint {
        Some(f) => cmd.env("KILN_CKPT_FAILPOINT", f),
        None => cmd.env_remove("KILN_CKPT_FAILPOINT"),
    };
    cmd.output()
        .map(|o| {
            if !o.status.success() {
                eprintln!(
                    "child stderr: {}",
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .filter(|l| l.contains("failpoint") || l.contains("panicked"))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
            o.status
        })
        .expect("run child")
}

fn crash_in_every_phase(
    make_root: impl Fn() -> CheckpointRoot,
    env: &[(String, String)],
    backend: &str,
) {
    let old = old_state();
    let new = new_state();
    let cases: [(Option<&str>, u64); 5] = [
        (Some("chunk-upload:2"), 1),
        (Some("after-chunks"), 1),
        (Some("after-manifest"), 1),
        (Some("during-latest"), 1),
        // Control: without a crash the new checkpoint wins, so the checks
        // below can tell old from new.
        (None, 2),
    ];
    for (failpoint, expect_step) in cases {
        let label = format!("{backend} {}", failpoint.unwrap_or("no crash"));
        let root = make_root();
        save_world(&root, &cfg(), 1, 1, "first", &old);
        let status = run_child(&root, failpoint, env);
        if failpoint.is_some() {
            assert_eq!(
                status.signal(),
                Some(6),
                "{label}: child should abort, got {status:?}"
            );
        } else {
            assert_eq!(status.code(), Some(FINISHED), "{label}: {status:?}");
        }
        // Latest names a whole checkpoint: the old or the new, and it verifies.
        let m = resolve(&root, "latest").unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(m.step, expect_step, "{label}");
        let report = verify(&root, &m).unwrap();
        assert!(report.ok(), "{label}: {:?}", report.bad_chunks);
        let loaded = load(&root, &m, |_| true).unwrap();
        assert_same_tensors(&loaded, if m.step == 1 { &old } else { &new });
        // Any manifest that exists is complete too (after-manifest leaves
        // one that latest does not name yet).
        for s in list(&root).unwrap() {
            let m = resolve(&root, &s.key).unwrap();
            assert!(verify(&root, &m).unwrap().ok(), "{label}: {}", s.key);
        }
        // The next save (a restarted run) commits over whatever was left.
        save_world(&root, &cfg(), 1, 2, "restarted", &new);
        let m = resolve(&root, "latest").unwrap();
        if expect_step == 1 {
            assert_eq!(m.attempt, "restarted", "{label}");
        }
        assert_same_tensors(&load(&root, &m, |_| true).unwrap(), &new);
        eprintln!("{label}: ok");
    }
}

#[test]
fn crash_in_every_phase_local_filesystem() {
    let dirs = std::cell::RefCell::new(Vec::new());
    crash_in_every_phase(
        || {
            let t = local_root();
            let root = t.root.clone();
            dirs.borrow_mut().push(t);
            root
        },
        &[],
        "local",
    );
}

#[test]
fn crash_in_every_phase_s3() {
    let Some(moto) = moto() else { return };
    crash_in_every_phase(|| moto.root(&unique("crash")), &moto.env(), "s3");
}

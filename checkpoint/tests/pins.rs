//! Pins, branch heads and retention: registered checkpoints survive gc until
//! their version is deleted, every branch's newest checkpoint is kept like
//! `latest`, and a registration racing a gc never ends up naming a deleted
//! checkpoint. Real saves on every backend this machine hosts.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kiln_checkpoint::pin::{self, Pin};
use kiln_checkpoint::registry::{
    CheckpointRef, Lineage, ModelDefinition, NewVersion, Registry, Signature,
};
use kiln_checkpoint::{
    CheckpointManager, CheckpointPolicy, CheckpointRoot, Checkpointer, Error, Manifest, Retention,
    SaveEvent, gc, list, resolve, verify,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const KEEP_ONE: Retention = Retention {
    keep_last: 1,
    keep_every: None,
};

/// Saves `steps` under `attempt`, continuing from `parent` if given (what a
/// run resumed from that checkpoint does); one tensor changes every step.
/// Returns the manifests, in step order.
fn save_line(
    root: &CheckpointRoot,
    attempt: &str,
    parent: Option<&Manifest>,
    steps: std::ops::RangeInclusive<u64>,
    seed: u64,
) -> Vec<Manifest> {
    let mut c = Checkpointer::new(root.clone(), small_chunks(), 0, 1).unwrap();
    if let Some(p) = parent {
        c.set_parent(p);
    }
    let mut state = mixed_state(4);
    for step in steps {
        state[0] = weights_f32(&state[0].name, &state[0].shape, seed * 1000 + step);
        c.save(step, attempt, &views(&state), &meta(step)).unwrap();
        // One at a time, so that each save's parent is the previous one.
        for r in c.flush() {
            r.unwrap();
        }
    }
    let mut out: Vec<Manifest> = list(root)
        .unwrap()
        .into_iter()
        .filter(|s| s.attempt.as_deref() == Some(attempt))
        .map(|s| resolve(root, &s.url).unwrap())
        .collect();
    out.sort_by_key(|m| m.step);
    out
}

fn kept_keys(root: &CheckpointRoot) -> Vec<String> {
    list(root).unwrap().into_iter().map(|s| s.key).collect()
}

fn objects(root: &CheckpointRoot, prefix: &str) -> Vec<String> {
    let root = root.clone();
    let prefix = prefix.to_string();
    runtime().block_on(async move {
        root.list(&prefix)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    })
}

fn new_version(root: &CheckpointRoot, step: u64) -> NewVersion {
    let spec = serde_json::json!({ "kind": "mlp", "hidden": [8] });
    NewVersion {
        checkpoint: CheckpointRef {
            root: root.url().to_string(),
            step,
            digest: "0".repeat(64),
        },
        model: ModelDefinition::classifier(serde_json::from_value(spec).unwrap(), 20, 4),
        signature: Signature::classifier(20, 4),
        metrics: BTreeMap::new(),
        lineage: Lineage::default(),
        reference_profile: None,
        torchscript: None,
        tokenizer: None,
    }
}

#[test]
fn a_pinned_checkpoint_survives_retention_until_its_pin_is_released() {
    for t in all_roots() {
        let line = save_line(&t.root, "run", None, 1..=4, 1);
        let pin = Pin::new(2, "memory://elsewhere/registry", "m", 1, "reg-1", "tester");
        runtime()
            .block_on(pin::pin_checkpoint(&t.root, &pin))
            .unwrap();

        let dry = gc(&t.root, &KEEP_ONE, Duration::ZERO, true).unwrap();
        assert_eq!(dry.pins.len(), 1, "{}", t.backend);
        assert_eq!(dry.pins[0].keeps, [line[1].key.clone()]);
        assert_eq!(dry.pins[0].pin.pin.as_ref(), Some(&pin));
        assert!(dry.pins[0].stored_bytes > 0);
        assert_eq!(
            dry.manifests_deleted,
            [line[0].key.clone(), line[2].key.clone()]
        );
        assert!(
            objects(&t.root, "gc").is_empty(),
            "a dry run writes no marker"
        );

        let report = gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
        assert_eq!(report.manifests_deleted.len(), 2, "{}", t.backend);
        assert_eq!(
            kept_keys(&t.root),
            [line[1].key.clone(), line[3].key.clone()],
            "{}",
            t.backend
        );
        assert!(report.chunks_deleted > 0);
        // Every chunk of the pinned checkpoint is still there.
        let pinned = resolve(&t.root, "2").unwrap();
        assert!(verify(&t.root, &pinned).unwrap().ok(), "{}", t.backend);
        assert!(objects(&t.root, "gc").is_empty(), "the marker is removed");

        runtime()
            .block_on(pin::release_pin(&t.root, 2, "reg-1"))
            .unwrap();
        let report = gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
        assert_eq!(report.manifests_deleted, [line[1].key.clone()]);
        assert!(report.pins.is_empty());
        assert_eq!(kept_keys(&t.root), [line[3].key.clone()], "{}", t.backend);
        assert!(
            verify(&t.root, &resolve(&t.root, "latest").unwrap())
                .unwrap()
                .ok()
        );
    }
}

#[test]
fn an_unreadable_pin_still_keeps_its_step() {
    let t = local_root();
    let line = save_line(&t.root, "run", None, 1..=3, 2);
    let key = pin::pin_key(1, "damaged").unwrap();
    runtime()
        .block_on(t.root.put(
            &key,
            bytes::Bytes::from_static(b"{not json"),
            object_store::PutMode::Create,
        ))
        .unwrap();
    let report = gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
    assert_eq!(report.pins.len(), 1);
    assert!(report.pins[0].pin.unreadable.is_some());
    assert_eq!(report.pins[0].keeps, [line[0].key.clone()]);
    assert_eq!(
        kept_keys(&t.root),
        [line[0].key.clone(), line[2].key.clone()]
    );
}

#[test]
fn the_head_of_a_resumed_branch_is_kept_like_latest() {
    for t in all_roots() {
        let a = save_line(&t.root, "a", None, 1..=4, 3);
        // `--resume 2`: a second run continues from step 2 and saves step 3;
        // latest stays at step 4 of the first line.
        let b = save_line(&t.root, "b", Some(&a[1]), 3..=3, 4);
        assert_eq!(b[0].parent.as_deref(), Some(a[1].key.as_str()));
        assert_eq!(resolve(&t.root, "latest").unwrap().key, a[3].key);

        let report = gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
        let mut heads = report.branch_heads.clone();
        heads.sort();
        assert_eq!(heads, [b[0].key.clone(), a[3].key.clone()], "{}", t.backend);
        let mut kept = kept_keys(&t.root);
        kept.sort();
        assert_eq!(kept, heads, "{}", t.backend);
        assert!(verify(&t.root, &b[0]).unwrap().ok(), "{}", t.backend);
        // A second collection keeps them still.
        let again = gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
        assert!(again.manifests_deleted.is_empty(), "{}", t.backend);
    }
}

#[test]
fn an_ancestor_whose_descendants_were_deleted_is_no_head() {
    for t in all_roots() {
        // Step 1, pinned; then a new run resumes from it and saves 2 and 3.
        let a = save_line(&t.root, "a", None, 1..=1, 5);
        let pin = Pin::new(1, "memory://r/registry", "m", 1, "reg-a", "tester");
        runtime()
            .block_on(pin::pin_checkpoint(&t.root, &pin))
            .unwrap();
        let b = save_line(&t.root, "b", Some(&a[0]), 2..=3, 6);

        let report = gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
        assert_eq!(
            report.manifests_deleted,
            [b[0].key.clone()],
            "{}",
            t.backend
        );
        assert_eq!(report.branch_heads, [b[1].key.clone()], "{}", t.backend);
        // Step 2's link (3 -> 2 -> 1) outlives step 2.
        assert_eq!(objects(&t.root, "lineage").len(), 1, "{}", t.backend);

        runtime()
            .block_on(pin::release_pin(&t.root, 1, "reg-a"))
            .unwrap();
        let report = gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
        assert_eq!(
            report.manifests_deleted,
            [a[0].key.clone()],
            "{}",
            t.backend
        );
        assert_eq!(kept_keys(&t.root), [b[1].key.clone()], "{}", t.backend);
        assert!(
            objects(&t.root, "lineage").is_empty(),
            "a link nothing needs is deleted ({})",
            t.backend
        );
    }
}

#[test]
fn registering_pins_and_deleting_the_version_releases_the_pin() {
    for t in [local_root(), memory_root()] {
        let line = save_line(&t.root, "run", None, 1..=3, 7);
        let rt = runtime();
        let registry = rt
            .block_on(Registry::open(&format!(
                "memory://{}/registry",
                unique("pins-registry")
            )))
            .unwrap();
        let v1 = rt
            .block_on(registry.register("m", new_version(&t.root, 1), "alice"))
            .unwrap();
        let v2 = rt
            .block_on(registry.register("m", new_version(&t.root, 2), "alice"))
            .unwrap();
        assert_eq!((v1.version, v2.version), (1, 2));
        let pins = rt.block_on(pin::list_pins(&t.root)).unwrap();
        let pinned: Vec<(u64, u64)> = pins
            .iter()
            .map(|p| (p.step, p.pin.as_ref().unwrap().version))
            .collect();
        assert_eq!(pinned, [(1, 1), (2, 2)], "{}", t.backend);
        assert_eq!(pins[0].pin.as_ref().unwrap().registry, registry.url());

        gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
        assert_eq!(
            kept_keys(&t.root).len(),
            3,
            "both registered steps and latest"
        );

        // An alias on version 1 blocks its deletion.
        rt.block_on(registry.promote("m", "prod", 1, None, "bob"))
            .unwrap();
        let err = rt
            .block_on(registry.delete_version("m", 1, "carol"))
            .unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { what } if what.contains("alias prod")),
            "{err}"
        );
        let deleted = rt
            .block_on(registry.delete_version("m", 2, "carol"))
            .unwrap();
        assert_eq!((deleted.version, deleted.deleted_by.as_str()), (2, "carol"));
        let err = rt.block_on(registry.version("m", 2)).unwrap_err();
        assert!(err.to_string().contains("deleted at"), "{err}");
        // Deleting again finishes (releases the pin), returns the first deletion.
        let again = rt
            .block_on(registry.delete_version("m", 2, "dave"))
            .unwrap();
        assert_eq!(again, deleted);
        let steps: Vec<u64> = rt
            .block_on(pin::list_pins(&t.root))
            .unwrap()
            .iter()
            .map(|p| p.step)
            .collect();
        assert_eq!(steps, [1], "{}", t.backend);

        // The number is never reused; the log records the deletion.
        let v3 = rt
            .block_on(registry.register("m", new_version(&t.root, 3), "alice"))
            .unwrap();
        assert_eq!(v3.version, 3);
        let versions: Vec<u64> = rt
            .block_on(registry.versions("m"))
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, [1, 3]);
        let history = rt.block_on(registry.history("m")).unwrap();
        let delete = history.iter().find(|e| e.action == "delete").unwrap();
        assert_eq!(
            (delete.actor.as_str(), &delete.to["version"]),
            ("carol", &serde_json::json!(2))
        );

        // Step 2 is free to go; step 1 (pinned) and 3 stay.
        let report = gc(&t.root, &KEEP_ONE, Duration::ZERO, false).unwrap();
        assert_eq!(
            report.manifests_deleted,
            [line[1].key.clone()],
            "{}",
            t.backend
        );

        // A step with no checkpoint is refused, and leaves no pin.
        let err = rt
            .block_on(registry.register("m", new_version(&t.root, 9), "alice"))
            .unwrap_err();
        assert!(
            matches!(&err, Error::NotFound { what } if what.contains("step 9")),
            "{err}"
        );
        assert_eq!(rt.block_on(pin::list_pins(&t.root)).unwrap().len(), 2);
        let err = rt
            .block_on(registry.delete_version("m", 7, "carol"))
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }
}

/// A gc that listed the manifests before the pin was written deletes the
/// checkpoint; the registration, which found its marker, waits for it to end
/// and then refuses, instead of recording a version of a deleted checkpoint.
#[test]
fn a_registration_racing_a_gc_waits_for_it_and_never_names_a_deleted_checkpoint() {
    let t = local_root();
    let line = save_line(&t.root, "run", None, 1..=2, 8);
    let rt = runtime();
    let registry = Registry::from_root(memory_root().root);
    // The marker of a collection in progress (what gc writes before listing).
    let marker = "gc/collection-in-progress.json";
    rt.block_on(t.root.put(
        marker,
        bytes::Bytes::from_static(b"{}"),
        object_store::PutMode::Create,
    ))
    .unwrap();
    let registering = {
        let registry = registry.clone();
        let new = new_version(&t.root, 1);
        rt.spawn(async move { registry.register("m", new, "alice").await })
    };
    // The pin is written; the registration now waits for the collection.
    let mut polls = 0;
    while rt.block_on(pin::list_pins(&t.root)).unwrap().is_empty() {
        polls += 1;
        assert!(polls < 60_000, "the registration never wrote its pin");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        !registering.is_finished(),
        "the registration must wait for the gc"
    );
    // The collection deletes step 1 (it read the pins before the pin existed)
    // and ends.
    rt.block_on(t.root.delete(&line[0].key)).unwrap();
    rt.block_on(t.root.delete(marker)).unwrap();
    let err = rt.block_on(registering).unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { what } if what.contains("step 1")),
        "{err}"
    );
    assert!(rt.block_on(pin::list_pins(&t.root)).unwrap().is_empty());
    assert!(rt.block_on(registry.versions("m")).unwrap().is_empty());

    // With no collection running, registration goes straight through.
    let v = rt
        .block_on(registry.register("m", new_version(&t.root, 2), "alice"))
        .unwrap();
    assert_eq!(v.version, 1);
    assert_eq!(rt.block_on(pin::list_pins(&t.root)).unwrap().len(), 1);
}

/// The training loop's retention (rank 0, after the last save) is the same
/// collection: it keeps a pinned step beside the newest.
#[test]
fn the_training_loops_retention_keeps_pinned_steps() {
    let t = local_root();
    let policy = CheckpointPolicy {
        interval: 1,
        final_checkpoint: true,
        total_steps: 3,
        max_consecutive_failures: 1,
        retention: KEEP_ONE,
        gc_grace: Duration::ZERO,
        required: true,
    };
    let mut m = CheckpointManager::new(
        t.root.clone(),
        small_chunks(),
        0,
        1,
        "run".into(),
        meta(0),
        policy,
    )
    .unwrap();
    let state = mixed_state(9);
    for step in 1..=3 {
        m.save(
            step,
            &views(&state),
            serde_json::json!({ "step": step }),
            &BTreeMap::new(),
        )
        .unwrap();
    }
    // A version registered step 2 while the run went on.
    let pin = Pin::new(2, "memory://r/registry", "m", 1, "reg-loop", "tester");
    runtime().block_on(pin::write_pin(&t.root, &pin)).unwrap();
    let (events, last) = m.finish();
    last.unwrap().expect("rank 0 committed");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SaveEvent::RetentionFailed { .. })),
        "{events:?}"
    );
    let steps: Vec<Option<u64>> = list(&t.root).unwrap().iter().map(|s| s.step).collect();
    assert_eq!(steps, [Some(2), Some(3)]);
}

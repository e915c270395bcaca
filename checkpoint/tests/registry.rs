//! The model registry over every backend this machine can host: local
//! filesystem, memory, and S3 (a real moto server on loopback).
//!
//! Races are real: many registrations or alias moves in flight at once on a
//! multi-threaded runtime, each through its own registry handle (as separate
//! processes would have).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use futures::future::join_all;
use kiln_checkpoint::Error;
use kiln_checkpoint::registry::{
    AliasTarget, CheckpointRef, Lineage, ModelDefinition, ModelTask, NewVersion, Pick, Registry,
    Selector, Signature, spec_hash,
};
use kiln_checkpoint::store::CheckpointRoot;
use sha2::{Digest, Sha256};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// A new version whose every field depends on `i`, so records cannot be
/// confused with each other.
fn new_version(i: u64) -> NewVersion {
    let spec = serde_json::json!({ "kind": "mlp", "hidden": [8 + i as usize] });
    let root = format!("memory://ckpt/job-{i}");
    committed_step(&root, 100 + i);
    NewVersion {
        checkpoint: CheckpointRef {
            root,
            step: 100 + i,
            digest: hex::encode(Sha256::digest(i.to_le_bytes())),
        },
        model: ModelDefinition::classifier(serde_json::from_value(spec).unwrap(), 20, 4),
        signature: Signature::classifier(20, 4),
        metrics: BTreeMap::from([("eval_accuracy".to_string(), i as f64 / 100.0)]),
        lineage: Lineage {
            job: format!("job-{i}"),
            spec_hash: spec_hash(&format!("{{\"job\":{i}}}")),
            dataset_fingerprint: format!("sha256:{i}"),
            code_version: "kiln test".into(),
        },
        reference_profile: None,
        torchscript: None,
        tokenizer: None,
    }
}

/// Puts a manifest of `step` under the in-memory root `root`: registration
/// pins the step and refuses one with no checkpoint, and these tests are
/// about the registry's records, not the checkpoint's contents (the pin
/// tests in `pins.rs` save real ones).
fn committed_step(root: &str, step: u64) {
    let root = CheckpointRoot::open(root).unwrap();
    let key = format!("manifests/{step:020}-test.json");
    // The in-memory store completes at once, on any thread, runtime or not.
    futures::executor::block_on(root.put(
        &key,
        bytes::Bytes::from_static(b"{}"),
        object_store::PutMode::Overwrite,
    ))
    .unwrap();
}

/// A fresh registry on every backend (its own prefix on S3 and memory).
fn registries() -> Vec<(&'static str, Registry, common::TestRoot)> {
    common::all_roots()
        .into_iter()
        .map(|t| (t.backend, Registry::from_root(t.root.clone()), t))
        .collect()
}

/// A second handle on the same location (what another process would open).
fn reopen(backend: &str, root: &CheckpointRoot) -> Registry {
    let root = match backend {
        "s3" => CheckpointRoot::open_with(root.url(), common::moto().unwrap().options()).unwrap(),
        _ => CheckpointRoot::open(root.url()).unwrap(),
    };
    Registry::from_root(root)
}

async fn concurrent_registrations(backend: &str, root: &CheckpointRoot) {
    const N: u64 = 32;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let registry = reopen(backend, root);
            tokio::spawn(async move {
                let got = registry
                    .register("race", new_version(i), &format!("actor-{i}"))
                    .await;
                (i, got)
            })
        })
        .collect();
    let mut by_number = BTreeMap::new();
    for t in join_all(tasks).await {
        let (i, got) = t.unwrap();
        let v = got.unwrap_or_else(|e| panic!("{backend}: registration {i}: {e}"));
        assert_eq!(v.created_by, format!("actor-{i}"), "{backend}");
        assert!(
            by_number.insert(v.version, (i, v)).is_none(),
            "{backend}: two registrations got the same number"
        );
    }
    let numbers: Vec<u64> = by_number.keys().copied().collect();
    assert_eq!(numbers, (1..=N).collect::<Vec<_>>(), "{backend}");

    // Each record round-trips: what the registry returned is what it stored,
    // and holds exactly the registration's content.
    let registry = reopen(backend, root);
    let listed = registry.versions("race").await.unwrap();
    assert_eq!(listed.len(), N as usize, "{backend}");
    for stored in &listed {
        let (i, returned) = &by_number[&stored.version];
        assert_eq!(stored, returned, "{backend}");
        let expected = new_version(*i);
        assert_eq!(stored.checkpoint, expected.checkpoint, "{backend}");
        assert_eq!(stored.model, expected.model, "{backend}");
        assert_eq!(stored.signature, expected.signature, "{backend}");
        assert_eq!(stored.metrics, expected.metrics, "{backend}");
        assert_eq!(stored.lineage, expected.lineage, "{backend}");
        assert_eq!(stored.name, "race");
        assert!(!stored.has_reference_profile && !stored.has_torchscript);
        assert_eq!(
            &registry.version("race", stored.version).await.unwrap(),
            stored
        );
    }
    assert_eq!(
        registry.latest("race").await.unwrap().unwrap().version,
        N,
        "{backend}"
    );

    // The audit log has one entry per registration, numbered 1..=N without
    // gaps, each naming its actor and version.
    let history = registry.history("race").await.unwrap();
    let seqs: Vec<u64> = history.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "{backend}");
    let mut logged = BTreeSet::new();
    for e in &history {
        assert_eq!(e.action, "register");
        assert_eq!(e.model, "race");
        assert_eq!(e.from, None);
        let v = e.to["version"].as_u64().unwrap();
        let (i, _) = &by_number[&v];
        assert_eq!(e.actor, format!("actor-{i}"), "{backend}: entry {}", e.seq);
        assert_eq!(e.to["checkpoint"]["step"], 100 + i);
        logged.insert(v);
    }
    assert_eq!(logged.len(), N as usize, "{backend}");
}

#[test]
fn concurrent_registrations_get_distinct_numbers_on_the_local_filesystem() {
    let t = common::local_root();
    runtime().block_on(concurrent_registrations(t.backend, &t.root));
}

#[test]
fn concurrent_registrations_get_distinct_numbers_in_memory() {
    let t = common::memory_root();
    runtime().block_on(concurrent_registrations(t.backend, &t.root));
}

#[test]
fn concurrent_registrations_get_distinct_numbers_on_s3() {
    let Some(t) = common::s3_root() else { return };
    runtime().block_on(concurrent_registrations(t.backend, &t.root));
}

async fn alias_races(backend: &str, root: &CheckpointRoot) {
    const WRITERS: usize = 16;
    let registry = reopen(backend, root);
    for i in 0..3 {
        registry
            .register("m", new_version(i), "trainer")
            .await
            .unwrap();
    }

    // Creation race: everyone expects the alias not to exist.
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let registry = reopen(backend, root);
            tokio::spawn(async move {
                let target = AliasTarget {
                    version: 1 + (w as u64 % 3),
                    weight: 100,
                };
                registry
                    .set_alias("m", "prod", vec![target], None, &format!("w{w}"))
                    .await
            })
        })
        .collect();
    let (created, conflicts) = tally(backend, join_all(tasks).await);
    assert_eq!(created.len(), 1, "{backend}: creators {created:?}");
    assert_eq!(conflicts, WRITERS - 1, "{backend}");
    let current = registry.alias("m", "prod").await.unwrap().unwrap();
    assert_eq!(
        current, created[0],
        "{backend}: the winner's write is the one stored"
    );
    assert_eq!(current.generation, 1);
    assert_eq!(current.previous, None);

    // Move race: everyone read generation 1 and moves from it.
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let registry = reopen(backend, root);
            let expected = current.clone();
            tokio::spawn(async move {
                let targets = vec![
                    AliasTarget {
                        version: 1,
                        weight: 50 + w as u32,
                    },
                    AliasTarget {
                        version: 2,
                        weight: 50 - w as u32,
                    },
                ];
                registry
                    .set_alias("m", "prod", targets, Some(&expected), &format!("w{w}"))
                    .await
            })
        })
        .collect();
    let (moved, conflicts) = tally(backend, join_all(tasks).await);
    assert_eq!(moved.len(), 1, "{backend}: winners {moved:?}");
    assert_eq!(conflicts, WRITERS - 1);
    let now = registry.alias("m", "prod").await.unwrap().unwrap();
    assert_eq!(now, moved[0]);
    assert_eq!(now.generation, 2);
    assert_eq!(now.previous.as_ref(), Some(&current.targets));

    // A stale expectation loses even when no one else is writing.
    let err = registry
        .set_alias(
            "m",
            "prod",
            vec![AliasTarget {
                version: 3,
                weight: 100,
            }],
            Some(&current),
            "late",
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Conflict { .. })
            && text.contains("alias prod of model m moved")
            && text.contains("expected generation 1, found generation 2"),
        "{backend}: {text}"
    );
    // The history logged the creation and the one move, nothing from losers.
    let history = registry.history("m").await.unwrap();
    let alias_entries: Vec<_> = history.iter().filter(|e| e.action == "alias").collect();
    assert_eq!(alias_entries.len(), 2, "{backend}");
    assert_eq!(alias_entries[0].actor, current.updated_by);
    assert_eq!(alias_entries[1].actor, now.updated_by);
}

/// Winners (the aliases they wrote) and the number of conflicts; any other
/// error fails the test.
fn tally(
    backend: &str,
    results: Vec<
        Result<kiln_checkpoint::Result<kiln_checkpoint::registry::Alias>, tokio::task::JoinError>,
    >,
) -> (Vec<kiln_checkpoint::registry::Alias>, usize) {
    let mut winners = vec![];
    let mut conflicts = 0;
    for r in results {
        match r.unwrap() {
            Ok(a) => winners.push(a),
            Err(Error::Conflict { what }) => {
                assert!(what.contains("moved"), "{backend}: {what}");
                conflicts += 1;
            }
            Err(e) => panic!("{backend}: {e}"),
        }
    }
    (winners, conflicts)
}

#[test]
fn alias_compare_and_swap_has_exactly_one_winner_on_every_backend() {
    let rt = runtime();
    for (backend, _registry, t) in registries() {
        rt.block_on(alias_races(backend, &t.root));
    }
}

async fn promote_canary_rollback_history(backend: &str, registry: &Registry) {
    for i in 1..=3 {
        registry
            .register("clf", new_version(i), "trainer")
            .await
            .unwrap();
    }
    let t = |version, weight| AliasTarget { version, weight };

    // A canary needs a primary to split against.
    let err = registry
        .promote("clf", "prod", 2, Some(10), "alice")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid { .. }) && err.to_string().contains("does not exist yet"),
        "{err}"
    );

    let a = registry
        .promote("clf", "prod", 1, None, "alice")
        .await
        .unwrap();
    assert_eq!(a.targets, [t(1, 100)]);
    assert_eq!(a.previous, None);
    assert_eq!(a.generation, 1);

    let a = registry
        .promote("clf", "prod", 2, Some(10), "bob")
        .await
        .unwrap();
    assert_eq!(a.targets, [t(1, 90), t(2, 10)], "{backend}");
    assert_eq!(a.previous, Some(vec![t(1, 100)]));
    assert_eq!(a.updated_by, "bob");
    let resolved = registry
        .resolve(&"clf@prod".parse().unwrap())
        .await
        .unwrap();
    let got: Vec<(u64, u32)> = resolved.iter().map(|(v, w)| (v.version, *w)).collect();
    assert_eq!(got, [(1, 90), (2, 10)]);
    assert_eq!(resolved[1].0.checkpoint, new_version(2).checkpoint);

    // Changing the canary's weight keeps the same primary.
    let a = registry
        .promote("clf", "prod", 2, Some(25), "bob")
        .await
        .unwrap();
    assert_eq!(a.targets, [t(1, 75), t(2, 25)]);
    // The same promotion again changes nothing.
    let same = registry
        .promote("clf", "prod", 2, Some(25), "bob")
        .await
        .unwrap();
    assert_eq!(same, a);
    // The primary cannot be its own canary.
    let err = registry
        .promote("clf", "prod", 1, Some(5), "bob")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already the primary"), "{err}");

    let a = registry
        .promote("clf", "prod", 2, Some(100), "carol")
        .await
        .unwrap();
    assert_eq!(a.targets, [t(2, 100)]);
    assert_eq!(a.generation, 4);

    // Rollback restores the previous targets; a second rollback undoes it.
    let a = registry.rollback("clf", "prod", "dave").await.unwrap();
    assert_eq!(a.targets, [t(1, 75), t(2, 25)], "{backend}");
    assert_eq!(a.previous, Some(vec![t(2, 100)]));
    assert_eq!(a.updated_by, "dave");
    let a = registry.rollback("clf", "prod", "dave").await.unwrap();
    assert_eq!(a.targets, [t(2, 100)]);

    // Bad promotions.
    for (version, weight, says) in [
        (9, None, "model clf version 9"),
        (3, Some(0), "1-100"),
        (3, Some(101), "1-100"),
    ] {
        let err = registry
            .promote("clf", "prod", version, weight, "x")
            .await
            .unwrap_err();
        assert!(err.to_string().contains(says), "{says}: {err}");
    }
    // An alias set once has nothing to roll back to; a missing one is named.
    registry
        .promote("clf", "staging", 3, None, "x")
        .await
        .unwrap();
    let err = registry.rollback("clf", "staging", "x").await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound { .. }) && err.to_string().contains("nothing to roll back"),
        "{err}"
    );
    let err = registry.rollback("clf", "nope", "x").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { what } if what.contains("alias nope of model clf")),
        "{err}"
    );

    let aliases = registry.aliases("clf").await.unwrap();
    let names: Vec<&str> = aliases.iter().map(|a| a.alias.as_str()).collect();
    assert_eq!(names, ["prod", "staging"], "{backend}");

    // The audit log: every registration and every move, in order, with who
    // did it and the targets before and after.
    let history = registry.history("clf").await.unwrap();
    let targets = |ts: &[(u64, u32)]| {
        serde_json::Value::Array(
            ts.iter()
                .map(|(v, w)| serde_json::json!({ "version": v, "weight": w }))
                .collect(),
        )
    };
    let null = serde_json::Value::Null;
    // (action, actor, alias, from, to); `to` of a registration is checked below.
    let expected = [
        ("register", "trainer", None, null.clone(), null.clone()),
        ("register", "trainer", None, null.clone(), null.clone()),
        ("register", "trainer", None, null.clone(), null.clone()),
        (
            "alias",
            "alice",
            Some("prod"),
            null.clone(),
            targets(&[(1, 100)]),
        ),
        (
            "alias",
            "bob",
            Some("prod"),
            targets(&[(1, 100)]),
            targets(&[(1, 90), (2, 10)]),
        ),
        (
            "alias",
            "bob",
            Some("prod"),
            targets(&[(1, 90), (2, 10)]),
            targets(&[(1, 75), (2, 25)]),
        ),
        (
            "alias",
            "carol",
            Some("prod"),
            targets(&[(1, 75), (2, 25)]),
            targets(&[(2, 100)]),
        ),
        (
            "alias",
            "dave",
            Some("prod"),
            targets(&[(2, 100)]),
            targets(&[(1, 75), (2, 25)]),
        ),
        (
            "alias",
            "dave",
            Some("prod"),
            targets(&[(1, 75), (2, 25)]),
            targets(&[(2, 100)]),
        ),
        (
            "alias",
            "x",
            Some("staging"),
            null.clone(),
            targets(&[(3, 100)]),
        ),
    ];
    assert_eq!(history.len(), expected.len(), "{backend}: {history:#?}");
    for (i, (e, (action, actor, alias, from, to))) in history.iter().zip(expected).enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(e.seq, seq, "{backend}");
        assert_eq!(e.model, "clf");
        assert_eq!(
            (e.action.as_str(), e.actor.as_str(), e.alias.as_deref()),
            (action, actor, alias),
            "{backend}: entry {seq}"
        );
        assert_eq!(
            e.from.clone().unwrap_or(null.clone()),
            from,
            "{backend}: from of {seq}"
        );
        if action == "register" {
            assert_eq!(e.to["version"], seq);
            assert_eq!(e.to["metrics"]["eval_accuracy"], seq as f64 / 100.0);
            assert_eq!(e.to["checkpoint"]["step"], 100 + seq);
        } else {
            assert_eq!(e.to, to, "{backend}: to of entry {seq}");
        }
    }
}

#[test]
fn promote_canary_rollback_and_history_on_every_backend() {
    let rt = runtime();
    for (backend, registry, _t) in registries() {
        rt.block_on(promote_canary_rollback_history(backend, &registry));
    }
}

#[test]
fn blobs_lookups_and_listing() {
    let t = common::local_root();
    let registry = Registry::from_root(t.root.clone());
    runtime().block_on(async {
        assert_eq!(registry.models().await.unwrap(), Vec::<String>::new());
        assert_eq!(registry.latest("nothing").await.unwrap(), None);
        let err = registry
            .resolve(&"nothing".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("model nothing (no versions)"),
            "{err}"
        );

        // A reference profile and a TorchScript module are stored and checked.
        let mut with_blobs = new_version(1);
        with_blobs.model.spec.kind = kiln_proto::spec::ModelKind::Torchscript;
        with_blobs.reference_profile = Some(br#"{"features": [1, 2, 3]}"#.to_vec());
        with_blobs.torchscript = Some(vec![7u8; 1000]);
        let v = registry
            .register("scripted", with_blobs.clone(), "me")
            .await
            .unwrap();
        assert!(v.has_reference_profile && v.has_torchscript);
        assert_eq!(
            registry.reference_profile("scripted", 1).await.unwrap(),
            with_blobs.reference_profile
        );
        assert_eq!(
            registry.torchscript("scripted", 1).await.unwrap(),
            with_blobs.torchscript
        );
        registry
            .register("plain", new_version(2), "me")
            .await
            .unwrap();
        assert_eq!(registry.reference_profile("plain", 1).await.unwrap(), None);
        assert_eq!(registry.torchscript("plain", 1).await.unwrap(), None);
        assert_eq!(registry.models().await.unwrap(), ["plain", "scripted"]);

        // Damaged blobs are caught, not served.
        let blobs = t.root.list("models/scripted/blobs").await.unwrap();
        let script = blobs
            .iter()
            .find(|o| o.key.ends_with(".torchscript.pt"))
            .unwrap();
        let path = t.root.local_dir().unwrap().join(&script.key);
        std::fs::write(&path, vec![8u8; 1000]).unwrap();
        let err = registry.torchscript("scripted", 1).await.unwrap_err();
        assert!(
            matches!(&err, Error::CorruptObject { reason, .. } if reason.contains("sha256")),
            "{err}"
        );

        // Misses name what is missing.
        let err = registry.version("plain", 7).await.unwrap_err();
        assert!(
            matches!(&err, Error::NotFound { what } if what.contains("model plain version 7")),
            "{err}"
        );
        let err = registry
            .resolve(&"plain@prod".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("alias prod of model plain"),
            "{err}"
        );

        // A record from a newer build is refused, not misread.
        let newer = t.root.local_dir().unwrap().join("models/plain/versions");
        std::fs::write(
            newer.join(format!("{:020}.json", 2)),
            br#"{"format_version": 99}"#,
        )
        .unwrap();
        let err = registry.version("plain", 2).await.unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    });
}

/// A language model's version: a gpt with its token signature and tokenizer.
fn language_model(i: u64) -> NewVersion {
    let spec = serde_json::json!({ "kind": "gpt", "vocab": 256, "n_layer": 1 + i as usize });
    NewVersion {
        model: ModelDefinition::language_model(serde_json::from_value(spec).unwrap(), 32, 256),
        signature: Signature::language_model(256),
        tokenizer: Some(br#"{"version": "1.0", "model": {"type": "BPE"}}"#.to_vec()),
        ..new_version(i)
    }
}

#[test]
fn language_models_store_their_tokenizer_at_format_2_and_old_records_stay_readable() {
    let t = common::local_root();
    let registry = Registry::from_root(t.root.clone());
    runtime().block_on(async {
        let new = language_model(1);
        let v = registry.register("lm", new.clone(), "me").await.unwrap();
        assert!(v.has_tokenizer && !v.has_torchscript);
        assert_eq!(v.model.task, ModelTask::LanguageModel);
        assert_eq!(v.model.spec.seq_len, Some(32), "the context is in the spec");
        assert_eq!((v.model.features, v.model.classes), (32, 256));
        assert_eq!(v.signature.inputs[0].name, "input_ids");
        assert_eq!(v.signature.inputs[0].shape, [-1, -1]);
        assert_eq!(registry.version("lm", 1).await.unwrap(), v);
        assert_eq!(registry.tokenizer("lm", 1).await.unwrap(), new.tokenizer);

        // On disk: format 2 with a tokenizer blob, so that a build reading
        // only format 1 refuses it rather than serve it as a classifier.
        let dir = t.root.local_dir().unwrap();
        let read = |key: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(dir.join(key)).unwrap()).unwrap()
        };
        let record = read(&format!("models/lm/versions/{:020}.json", 1));
        assert_eq!(record["format_version"], 2);
        assert_eq!(record["model"]["task"], "language_model");
        assert!(
            record["tokenizer"]["key"]
                .as_str()
                .unwrap()
                .ends_with(".tokenizer.json"),
            "{record}"
        );
        // Classifiers (and aliases) are still written at format 1.
        registry
            .register("plain", new_version(2), "me")
            .await
            .unwrap();
        let plain = read(&format!("models/plain/versions/{:020}.json", 1));
        assert_eq!(plain["format_version"], 1);
        assert!(plain.get("tokenizer").is_none(), "{plain}");
        registry.promote("lm", "prod", 1, None, "me").await.unwrap();
        assert_eq!(read("models/lm/aliases/prod.json")["format_version"], 1);

        // A record written before language models existed (no task, no
        // has_tokenizer, no tokenizer) reads as a classifier without one.
        let mut old = plain.clone();
        let obj = old.as_object_mut().unwrap();
        obj.remove("has_tokenizer");
        obj["model"].as_object_mut().unwrap().remove("task");
        obj["version"] = 2.into();
        std::fs::write(
            dir.join(format!("models/plain/versions/{:020}.json", 2)),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        let v = registry.version("plain", 2).await.unwrap();
        assert_eq!(v.model.task, ModelTask::Classifier);
        assert!(!v.has_tokenizer);
        assert_eq!(registry.tokenizer("plain", 2).await.unwrap(), None);

        // A damaged tokenizer is caught.
        let blobs = t.root.list("models/lm/blobs").await.unwrap();
        let blob = blobs
            .iter()
            .find(|o| o.key.ends_with(".tokenizer.json"))
            .unwrap();
        std::fs::write(dir.join(&blob.key), b"{}").unwrap();
        let err = registry.tokenizer("lm", 1).await.unwrap_err();
        assert!(matches!(err, Error::CorruptObject { .. }), "{err}");
    });
}

#[test]
fn bad_input_is_refused_with_the_field_named() {
    let t = common::memory_root();
    let registry = Registry::from_root(t.root.clone());
    runtime().block_on(async {
        type Change = Box<dyn Fn(&mut NewVersion)>;
        let cases: Vec<(&str, Change, &str)> = vec![
            ("a/b", Box::new(|_| {}), "model name \"a/b\""),
            (".hidden", Box::new(|_| {}), "not starting with '.'"),
            (
                "m",
                Box::new(|n| n.checkpoint.digest = "abc".into()),
                "checkpoint.digest",
            ),
            (
                "m",
                Box::new(|n| {
                    n.metrics.insert("loss".into(), f64::NAN);
                }),
                "metrics.loss is NaN",
            ),
            ("m", Box::new(|n| n.model.classes = 0), "classes (0)"),
            (
                "m",
                Box::new(|n| n.signature.inputs[0].datatype = "FLOAT".into()),
                "datatype \"FLOAT\"",
            ),
            (
                "m",
                Box::new(|n| n.reference_profile = Some(b"not json".to_vec())),
                "reference profile is not JSON",
            ),
            (
                "m",
                Box::new(|n| n.model.spec.kind = kiln_proto::spec::ModelKind::Torchscript),
                "no TorchScript module bytes",
            ),
            (
                "m",
                Box::new(|n| n.torchscript = Some(vec![1])),
                "model.kind is mlp",
            ),
            (
                "m",
                Box::new(|n| n.tokenizer = Some(b"{}".to_vec())),
                "only language models carry one",
            ),
            (
                "m",
                Box::new(|n| n.model.task = ModelTask::LanguageModel),
                "model.kind is mlp; kiln's language models are gpt",
            ),
            (
                "m",
                Box::new(|n| {
                    *n = language_model(0);
                    n.tokenizer = Some(b"not json".to_vec());
                }),
                "the tokenizer is not JSON",
            ),
        ];
        for (name, change, says) in cases {
            let mut new = new_version(0);
            change(&mut new);
            let err = registry.register(name, new, "me").await.unwrap_err();
            assert!(
                matches!(err, Error::Invalid { .. }) && err.to_string().contains(says),
                "{says}: {err}"
            );
        }
        let err = registry
            .register("m", new_version(0), "")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("actor"), "{err}");
        let err = registry
            .set_alias(
                "m",
                "bad/alias",
                vec![AliasTarget {
                    version: 1,
                    weight: 100,
                }],
                None,
                "me",
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("alias \"bad/alias\""), "{err}");
        // Nothing was registered by the refused calls.
        assert_eq!(registry.models().await.unwrap(), Vec::<String>::new());
    });
}

#[test]
fn selectors_refuse_bad_text_with_a_reason() {
    let ok: Selector = " digits@production ".parse().unwrap();
    assert_eq!(ok.name, "digits");
    assert_eq!(ok.pick, Pick::Alias("production".into()));
    assert_eq!(
        "digits:12".parse::<Selector>().unwrap().pick,
        Pick::Version(12)
    );
    for (text, says) in [
        ("", "empty model selector"),
        ("   ", "empty model selector"),
        ("a/b", "model name \"a/b\""),
        ("m:0", "version \"0\" must be a whole number from 1"),
        ("m:x", "version \"x\""),
        ("m:", "version \"\""),
        ("m:-1", "version \"-1\""),
        ("m@", "alias \"\""),
        ("@prod", "model name \"\""),
        (":3", "model name \"\""),
        ("m@a/b", "alias \"a/b\""),
        ("m:1@prod", "both a version and an alias"),
        (".m", "not starting with '.'"),
    ] {
        let err = text.parse::<Selector>().unwrap_err();
        assert!(
            matches!(err, Error::Invalid { .. }) && err.to_string().contains(says),
            "{text:?}: {err}"
        );
    }
}

#[test]
fn local_alias_swaps_exclude_other_handles() {
    // Two handles on one folder: the file lock beside the nested alias key,
    // not an in-process mutex, decides.
    let t = common::local_root();
    let a = Registry::from_root(t.root.clone());
    let b = reopen("local", &t.root);
    runtime().block_on(async {
        a.register("m", new_version(1), "a").await.unwrap();
        a.register("m", new_version(2), "a").await.unwrap();
        let one = AliasTarget {
            version: 1,
            weight: 100,
        };
        let two = AliasTarget {
            version: 2,
            weight: 100,
        };
        let first = a
            .set_alias("m", "prod", vec![one], None, "a")
            .await
            .unwrap();
        let err = b
            .set_alias("m", "prod", vec![two], None, "b")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        let moved = b
            .set_alias("m", "prod", vec![two], Some(&first), "b")
            .await
            .unwrap();
        assert_eq!(a.alias("m", "prod").await.unwrap().unwrap(), moved);
        // The lock file beside the alias is not mistaken for an alias.
        assert_eq!(a.aliases("m").await.unwrap(), [moved]);
    });
}

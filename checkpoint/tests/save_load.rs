//! Save and load end to end over every backend: world sizes, filters,
//! incremental saves, corruption, fallback, GC, export, failures, memory.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use kiln_checkpoint::{
    CheckpointRoot, Checkpointer, DType, Error, Retention, SaveConfig, export_safetensors, gc,
    import_safetensors, list, load, load_latest_verified, resolve, verify,
};

#[test]
fn any_world_size_saves_and_any_loads_byte_identical() {
    let state = mixed_state(1);
    for t in all_roots() {
        let cfg = small_chunks();
        let mut chunk_objects = 0;
        for (i, world) in [1usize, 2, 3].into_iter().enumerate() {
            let step = 10 * (i as u64 + 1);
            let outcomes = save_world(&t.root, &cfg, world, step, "run-a", &state);
            let url = outcomes[0].url.clone().expect("rank 0 commits");
            assert!(outcomes[0].latest_moved);
            assert!(outcomes[1..].iter().all(|o| o.url.is_none()));
            let m = resolve(&t.root, "latest").unwrap();
            assert_eq!(m.step, step, "{}", t.backend);
            assert_eq!(m.world_size as usize, world);
            assert_eq!(t.root.url_of(&m.key), url);
            assert_eq!(m.training_state["cursor"], step * 32);
            // Same state, so the same chunk keys whatever the stripes: later
            // saves (fresh checkpointers, no parent) rewrite, never add.
            let objects = kiln_test_block_on(t.root.list("chunks")).unwrap().len();
            if i == 0 {
                chunk_objects = objects;
            }
            assert_eq!(objects, chunk_objects, "{} world {world}", t.backend);
            assert_eq!(m.totals.chunks as usize, chunk_objects);
            let loaded = load(&t.root, &m, |_| true).unwrap();
            assert_same_tensors(&loaded, &state);
            assert!(verify(&t.root, &m).unwrap().ok());
        }
        // Resolve by step (on latest's chain) and by URL; parents chain back.
        let m20 = resolve(&t.root, "20").unwrap();
        assert_eq!(m20.step, 20);
        let by_url = resolve(&t.root, &t.root.url_of(&m20.key)).unwrap();
        assert_eq!(by_url.key, m20.key);
        let m30 = resolve(&t.root, "latest").unwrap();
        assert_eq!(m30.parent.as_deref(), Some(m20.key.as_str()));
        assert!(matches!(
            resolve(&t.root, "15"),
            Err(Error::NotFound { .. })
        ));

        // Weights only: a subset, still byte-identical.
        let weights = load(&t.root, &m30, |n| n.starts_with("model.")).unwrap();
        let expected: Vec<_> = state
            .iter()
            .filter(|t| t.name.starts_with("model."))
            .cloned()
            .collect();
        assert_eq!(weights.len(), 6);
        assert_same_tensors(&weights, &expected);
        let summaries = list(&t.root).unwrap();
        assert_eq!(summaries.len(), 3);
        assert!(summaries[2].is_latest && !summaries[0].is_latest);
        eprintln!("{}: ok", t.backend);
    }
}

#[test]
fn resuming_at_another_world_size_reuses_every_stored_chunk() {
    let t = memory_root();
    let state = mixed_state(2);
    let cfg = small_chunks();
    save_world(&t.root, &cfg, 2, 1, "first", &state);
    let m = resolve(&t.root, "latest").unwrap();
    // A new run at world size 3 seeds its checkpointers from the manifest.
    let outcomes = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let (root, cfg, m, state) = (t.root.clone(), cfg.clone(), &m, &state);
                s.spawn(move || {
                    let mut c = Checkpointer::new(root, cfg, rank, 3).unwrap();
                    c.set_parent(m);
                    c.save(2, "second", &views(state), &meta(2)).unwrap();
                    c.flush().pop().unwrap().unwrap()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(outcomes[0].bytes_uploaded, 0);
    assert_eq!(outcomes[0].chunks_uploaded, 0);
    assert_eq!(outcomes[0].chunks_reused as u64, m.totals.chunks);
    let m2 = resolve(&t.root, "latest").unwrap();
    assert_eq!(m2.parent.as_deref(), Some(m.key.as_str()));
    assert_same_tensors(&load(&t.root, &m2, |_| true).unwrap(), &state);
}

#[test]
fn changing_half_the_tensors_uploads_about_half_the_bytes() {
    let t = local_root();
    let cfg = small_chunks();
    let mut state: Vec<_> = (0..8)
        .map(|i| weights_f32(&format!("layer{i}.weight"), &[128, 256], 100 + i))
        .collect();
    let mut c = Checkpointer::new(t.root.clone(), cfg, 0, 1).unwrap();
    c.save(1, "run", &views(&state), &meta(1)).unwrap();
    let first = c.flush().pop().unwrap().unwrap();
    assert_eq!(first.bytes_reused, 0);
    // Train only the even layers (the odd half is frozen).
    for (i, tensor) in state.iter_mut().enumerate() {
        if i % 2 == 0 {
            *tensor = weights_f32(&tensor.name, &tensor.shape, 900 + i as u64);
        }
    }
    c.save(2, "run", &views(&state), &meta(2)).unwrap();
    let second = c.flush().pop().unwrap().unwrap();
    let ratio = second.bytes_uploaded as f64 / first.bytes_uploaded as f64;
    eprintln!(
        "incremental: first {} B, second {} B uploaded ({ratio:.3}), {} B reused",
        first.bytes_uploaded, second.bytes_uploaded, second.bytes_reused
    );
    assert!((0.45..0.55).contains(&ratio), "ratio {ratio}");
    assert_eq!(second.chunks_reused, second.chunks_uploaded);
    // Count the objects too: the second save added only the changed chunks.
    let m = resolve(&t.root, "latest").unwrap();
    let chunk_bytes_stored: u64 = kiln_test_block_on(t.root.list("chunks"))
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum();
    assert_eq!(
        chunk_bytes_stored,
        first.bytes_uploaded + second.bytes_uploaded
    );
    assert_same_tensors(&load(&t.root, &m, |_| true).unwrap(), &state);
}

fn flip_byte(root: &CheckpointRoot, key: &str, at: usize) {
    let store = root.object_store();
    let path = root.path(key);
    kiln_test_block_on(async move {
        use object_store::ObjectStoreExt;
        let mut bytes = store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let at = at.min(bytes.len() - 1);
        bytes[at] ^= 0x01;
        store.put(&path, bytes.into()).await.unwrap();
    });
}

fn kiln_test_block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_flipped_byte_is_caught_by_verify_and_load_and_resume_falls_back() {
    for t in all_roots() {
        let cfg = small_chunks();
        let old = mixed_state(3);
        save_world(&t.root, &cfg, 2, 1, "run", &old);
        let mut new = old.clone();
        new[0] = weights_f32(&new[0].name, &new[0].shape, 77); // model.layer0.weight
        save_world(&t.root, &cfg, 2, 2, "run", &new);
        let m = resolve(&t.root, "latest").unwrap();
        let entry = m.tensor("model.layer0.weight").unwrap();
        let bad_key = entry.chunks[1].key.clone();
        // Flip one bit in the middle of the payload.
        flip_byte(&t.root, &bad_key, 1000);

        let report = verify(&t.root, &m).unwrap();
        assert!(!report.ok());
        assert_eq!(report.bad_tensors, ["model.layer0.weight"]);
        assert_eq!(report.bad_chunks.len(), 1);
        assert_eq!(report.bad_chunks[0].index, 1);
        assert_eq!(report.bad_chunks[0].key, bad_key);

        match load(&t.root, &m, |_| true) {
            Err(Error::Corrupt {
                tensor,
                chunk,
                reason,
            }) => {
                assert_eq!(tensor, "model.layer0.weight");
                assert!(
                    chunk.contains(&bad_key) && chunk.starts_with("#1 "),
                    "{chunk}"
                );
                assert!(reason.contains("crc32c"), "{reason}");
            }
            other => panic!("{}: {other:?}", t.backend),
        }
        // Loading a subset that avoids the bad chunk still works.
        assert_eq!(load(&t.root, &m, |n| n == "model.mask").unwrap().len(), 1);

        let (fallback, tensors, warnings) = load_latest_verified(&t.root, |_| true).unwrap();
        assert_eq!(fallback.step, 1, "{}", t.backend);
        assert_same_tensors(&tensors, &old);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("model.layer0.weight") && warnings[0].contains(&bad_key));

        // A missing chunk names tensor and chunk too.
        let m1 = resolve(&t.root, "1").unwrap();
        let gone = m1.tensor("model.layer1.weight").unwrap().chunks[0]
            .key
            .clone();
        kiln_test_block_on(t.root.delete(&gone)).unwrap();
        match load(&t.root, &m1, |_| true) {
            Err(Error::Corrupt {
                tensor,
                chunk,
                reason,
            }) => {
                assert_eq!(tensor, "model.layer1.weight");
                assert!(chunk.contains(&gone));
                assert!(reason.contains("missing"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let err = load_latest_verified(&t.root, |_| true).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }
}

#[test]
fn gc_keeps_what_kept_checkpoints_need_and_frees_the_rest() {
    for t in all_roots() {
        let cfg = small_chunks();
        let mut c = Checkpointer::new(t.root.clone(), cfg, 0, 1).unwrap();
        let mut state = mixed_state(4);
        for step in 1..=6u64 {
            // One tensor changes every step; the rest are shared.
            state[0] = weights_f32(&state[0].name, &state[0].shape, 1000 + step);
            c.save(step, "run", &views(&state), &meta(step)).unwrap();
        }
        for r in c.flush() {
            r.unwrap();
        }
        let retention = Retention {
            keep_last: 2,
            keep_every: Some(3),
        };
        // Within the grace period nothing is deleted but manifests.
        let dry = gc(&t.root, &retention, Duration::from_secs(3600), true).unwrap();
        assert_eq!(dry.manifests_deleted.len(), 0, "young manifests are kept");
        let dry = gc(&t.root, &retention, Duration::ZERO, true).unwrap();
        assert_eq!(dry.manifests_deleted.len(), 3);
        assert_eq!(list(&t.root).unwrap().len(), 6, "dry run deletes nothing");

        let report = gc(&t.root, &retention, Duration::ZERO, false).unwrap();
        let kept: Vec<u64> = list(&t.root)
            .unwrap()
            .iter()
            .filter_map(|s| s.step)
            .collect();
        assert_eq!(kept, [3, 5, 6], "{}", t.backend);
        assert_eq!(report.manifests_deleted.len(), 3);
        // The steps 1, 2, 4 versions of the changing tensor are gone.
        let per_version = resolve(&t.root, "6")
            .unwrap()
            .tensor(&state[0].name)
            .unwrap()
            .chunks
            .len();
        assert_eq!(report.chunks_deleted, 3 * per_version, "{}", t.backend);
        assert!(report.bytes_freed > 0);
        for step in ["3", "5", "6"] {
            let m = resolve(&t.root, step).unwrap();
            assert!(verify(&t.root, &m).unwrap().ok(), "step {step} after gc");
        }
        // A second run finds nothing more to free.
        let again = gc(&t.root, &retention, Duration::ZERO, false).unwrap();
        assert_eq!(again.chunks_deleted + again.manifests_deleted.len(), 0);
    }
}

#[test]
fn gc_grace_protects_chunks_of_a_save_in_progress() {
    let t = local_root();
    let state = mixed_state(5);
    save_world(&t.root, &small_chunks(), 1, 1, "run", &state);
    // Chunks of an uncommitted save: uploaded, no manifest, no part yet.
    let orphan = weights_f32("x", &[1000], 5);
    let plan_root = t.root.clone();
    kiln_test_block_on(async move {
        let raw = &orphan.data;
        let enc = kiln_checkpoint::codec::Encoding::for_dtype(DType::F32);
        let key = kiln_checkpoint::codec::chunk_key(&kiln_checkpoint::codec::address(raw), enc);
        let frame = kiln_checkpoint::codec::encode_chunk(raw, enc, 3).unwrap();
        plan_root
            .put(&key, frame.into(), object_store::PutMode::Overwrite)
            .await
            .unwrap();
    });
    let keep = Retention {
        keep_last: 1,
        keep_every: None,
    };
    // What a write killed before its rename leaves: a staging file, which
    // listings skip; gc removes it once it is older than the grace period.
    let staging = t
        .root
        .local_dir()
        .unwrap()
        .join("chunks/ab/abcd.b3.zst#4242000000000001");
    std::fs::create_dir_all(staging.parent().unwrap()).unwrap();
    std::fs::write(&staging, b"half a chunk").unwrap();
    let r = gc(&t.root, &keep, Duration::from_secs(600), false).unwrap();
    assert_eq!((r.chunks_deleted, r.chunks_in_grace), (0, 1));
    assert_eq!(r.staging_files_deleted, 0);
    assert!(staging.exists());
    let r = gc(&t.root, &keep, Duration::ZERO, true).unwrap();
    assert_eq!(r.staging_files_deleted, 1);
    assert!(staging.exists(), "a dry run deletes nothing");
    let r = gc(&t.root, &keep, Duration::ZERO, false).unwrap();
    assert_eq!(r.chunks_deleted, 1);
    assert_eq!(r.staging_files_deleted, 1);
    assert!(!staging.exists());
    assert!(
        verify(&t.root, &resolve(&t.root, "latest").unwrap())
            .unwrap()
            .ok()
    );
}

#[test]
fn safetensors_export_round_trips() {
    let t = memory_root();
    let state = mixed_state(6);
    save_world(&t.root, &small_chunks(), 2, 7, "run", &state);
    let m = resolve(&t.root, "latest").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    export_safetensors(&t.root, &m, |_| true, &out).unwrap();
    assert_same_tensors(&import_safetensors(&out).unwrap(), &state);
    // The file is plain safetensors: the reference parser reads it, with our
    // metadata, and the data section starts 8-byte aligned.
    let bytes = std::fs::read(&out).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(n % 8, 0);
    assert_eq!(meta.metadata().as_ref().unwrap()["kiln_step"], "7");
    // Weights only.
    export_safetensors(&t.root, &m, |n| n.starts_with("model."), &out).unwrap();
    assert_eq!(import_safetensors(&out).unwrap().len(), 6);
    assert!(!dir.path().join("model.safetensors.tmp").exists());
}

/// A memory store that fails every chunk write once `broken` is set, and
/// delays every chunk write by `delay_ms` (a slow network).
#[derive(Debug, Default)]
struct BrokenStore {
    inner: object_store::memory::InMemory,
    broken: AtomicBool,
    delay_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Display for BrokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BrokenStore")
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for BrokenStore {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 && location.as_ref().contains("chunks/") {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.broken.load(Ordering::SeqCst) && location.as_ref().contains("chunks/") {
            return Err(object_store::Error::Generic {
                store: "broken",
                source: "disk on fire".into(),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[test]
fn background_failures_are_reported_never_swallowed() {
    let store = Arc::new(BrokenStore::default());
    let root = CheckpointRoot::from_store(store.clone(), "ckpt", "broken://ckpt");
    let state = mixed_state(7);
    let mut c = Checkpointer::new(root.clone(), small_chunks(), 0, 1).unwrap();
    c.save(1, "run", &views(&state), &meta(1)).unwrap();
    assert!(c.flush().pop().unwrap().is_ok());
    store.broken.store(true, Ordering::SeqCst);
    let mut changed = state.clone();
    changed[0] = weights_f32(&changed[0].name, &changed[0].shape, 8);
    c.save(2, "run", &views(&changed), &meta(2)).unwrap();
    // poll never blocks; the failure shows up in poll or flush, once.
    let mut outcomes = c.poll();
    outcomes.extend(c.flush());
    assert_eq!(outcomes.len(), 1);
    let err = outcomes.pop().unwrap().unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert!(c.poll().is_empty() && c.flush().is_empty());
    // Latest still names the good checkpoint.
    assert_eq!(resolve(&root, "latest").unwrap().step, 1);
    // The checkpointer keeps working once the store heals.
    store.broken.store(false, Ordering::SeqCst);
    c.save(3, "run", &views(&changed), &meta(3)).unwrap();
    let ok = c.flush().pop().unwrap().unwrap();
    assert_eq!(ok.step, 3);
    let m = resolve(&root, "latest").unwrap();
    assert_same_tensors(&load(&root, &m, |_| true).unwrap(), &changed);
}

#[test]
fn a_rank_that_never_writes_its_part_times_out_the_commit() {
    let t = memory_root();
    let cfg = SaveConfig {
        commit_timeout: Duration::from_millis(300),
        ..small_chunks()
    };
    let state = mixed_state(8);
    let mut c = Checkpointer::new(t.root.clone(), cfg, 0, 2).unwrap();
    c.save(1, "run", &views(&state), &meta(1)).unwrap();
    let err = c.flush().pop().unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("[1]"), "{err}");
    assert!(matches!(
        resolve(&t.root, "latest"),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn overlapping_saves_commit_in_order_and_chain_parents() {
    let t = local_root();
    let mut c = Checkpointer::new(t.root.clone(), small_chunks(), 0, 1).unwrap();
    let mut state = mixed_state(9);
    for step in 1..=4u64 {
        state[3] = weights_f32(&state[3].name, &state[3].shape, step);
        c.save(step, "run", &views(&state), &meta(step)).unwrap();
    }
    let outcomes: Vec<_> = c.flush().into_iter().map(|r| r.unwrap()).collect();
    let steps: Vec<u64> = outcomes.iter().map(|o| o.step).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    assert!(outcomes.iter().all(|o| o.latest_moved));
    let m4 = resolve(&t.root, "latest").unwrap();
    assert_eq!(m4.step, 4);
    let m3 = resolve(&t.root, m4.parent.as_deref().unwrap()).unwrap();
    assert_eq!(m3.step, 3);
    assert_same_tensors(&load(&t.root, &m4, |_| true).unwrap(), &state);
}

#[test]
fn latest_never_moves_back_to_a_smaller_step() {
    let t = memory_root();
    let state = mixed_state(10);
    save_world(&t.root, &small_chunks(), 1, 50, "run-a", &state);
    // Another run (another attempt id) saves an older step: committed, but
    // latest stays at 50; both manifests exist side by side.
    let late = save_world(&t.root, &small_chunks(), 1, 40, "run-b", &state);
    assert!(!late[0].latest_moved);
    assert_eq!(resolve(&t.root, "latest").unwrap().step, 50);
    // Step 40 is off latest's chain: found by listing its key prefix.
    assert_eq!(resolve(&t.root, "40").unwrap().attempt, "run-b");
    // The same step under two attempts never mixes parts.
    save_world(&t.root, &small_chunks(), 1, 60, "run-a", &state);
    save_world(&t.root, &small_chunks(), 1, 60, "run-b", &state);
    assert_eq!(resolve(&t.root, "latest").unwrap().attempt, "run-a");
    assert_eq!(list(&t.root).unwrap().len(), 4);
}

#[test]
fn ranks_with_different_states_are_refused() {
    let t = memory_root();
    let a = mixed_state(11);
    let mut b = a.clone();
    b.pop(); // rank 1 passes one tensor fewer
    let cfg = small_chunks();
    let outcomes = std::thread::scope(|s| {
        let h: Vec<_> = [(0usize, &a), (1, &b)]
            .into_iter()
            .map(|(rank, state)| {
                let (root, cfg) = (t.root.clone(), cfg.clone());
                s.spawn(move || {
                    let mut c = Checkpointer::new(root, cfg, rank, 2).unwrap();
                    c.save(1, "run", &views(state), &meta(1)).unwrap();
                    c.flush().pop().unwrap()
                })
            })
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    let err = outcomes[0].as_ref().unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(matches!(
        resolve(&t.root, "latest"),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn host_memory_stays_within_the_stated_bound() {
    // A slow store, so encoded chunks pile up behind the uploads as far as
    // the pipeline lets them.
    let store = Arc::new(BrokenStore::default());
    store.delay_ms.store(30, Ordering::SeqCst);
    let root = CheckpointRoot::from_store(store, "", "slow://");
    let cfg = SaveConfig {
        chunk_bytes: 1 << 20,
        upload_concurrency: 4,
        threads: 2,
        ..SaveConfig::default()
    };
    let state: Vec<_> = (0..4)
        .map(|i| weights_f32(&format!("w{i}"), &[4 << 20], i)) // 4 × 16 MiB
        .collect();
    let mut c = Checkpointer::new(root, cfg.clone(), 0, 1).unwrap();
    c.save(1, "run", &views(&state), &meta(1)).unwrap();
    c.flush().pop().unwrap().unwrap();
    let stats = c.memory_stats();
    eprintln!("memory: {stats:?}");
    assert_eq!(stats.stripe_buffer_bytes, 64 << 20);
    let pipeline_bound = (cfg.upload_concurrency * 2 * cfg.chunk_bytes) as u64;
    assert!(
        stats.peak_pipeline_bytes <= pipeline_bound,
        "{} > {pipeline_bound}",
        stats.peak_pipeline_bytes
    );
    // The pipeline did fill up (several frames waited for uploads at once),
    // and the limit held: at most upload_concurrency frames.
    let scratch = (cfg.threads * cfg.chunk_bytes) as u64;
    let frames = (stats.peak_pipeline_bytes - scratch) as f64 / cfg.chunk_bytes as f64;
    assert!(
        frames > 3.0 && frames <= 4.1,
        "{frames} frames alive at the peak"
    );
    // A second save reuses the stripe buffer rather than growing it.
    c.save(2, "run", &views(&state), &meta(2)).unwrap();
    c.flush().pop().unwrap().unwrap();
    assert_eq!(c.memory_stats().stripe_buffer_bytes, 64 << 20);
}

/// One U8 tensor `blob` of `len` random (incompressible) bytes.
fn random_blob(len: usize, seed: u64) -> kiln_checkpoint::OwnedTensor {
    let mut rng = Rng::new(seed);
    let data: Vec<u8> = (0..len).map(|_| (rng.next_u64() >> 56) as u8).collect();
    owned("blob", DType::U8, &[len], data)
}

#[test]
fn large_chunks_go_up_as_multipart_uploads() {
    let mut roots = vec![local_root()];
    roots.extend(s3_root());
    for t in roots {
        let cfg = SaveConfig {
            chunk_bytes: 12 << 20,
            multipart_threshold: 6 << 20,
            ..SaveConfig::default()
        };
        // Incompressible bytes, so the stored frame stays above the threshold.
        let state = vec![random_blob(13 << 20, 3)];
        save_world(&t.root, &cfg, 1, 1, "run", &state);
        let m = resolve(&t.root, "latest").unwrap();
        assert_eq!(m.tensors[0].chunks.len(), 2);
        assert!(m.tensors[0].chunks[0].stored_len > 6 << 20);
        assert_same_tensors(&load(&t.root, &m, |_| true).unwrap(), &state);
    }
}

/// Rewrites the checkpoint `latest` names into format version 1 (sha256
/// chunk addresses, `{sha256}.{encoding}` keys), as an older kiln wrote it.
fn rewrite_as_version_1(root: &CheckpointRoot) {
    use kiln_checkpoint::codec::{ChunkHash, decode_chunk, parse_chunk_key};
    use object_store::PutMode;
    kiln_test_block_on(async {
        let latest: serde_json::Value =
            serde_json::from_slice(&root.get("latest").await.unwrap()).unwrap();
        let key = latest["manifest"].as_str().unwrap().to_string();
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&root.get(&key).await.unwrap()).unwrap();
        manifest["format_version"] = 1.into();
        for tensor in manifest["tensors"].as_array_mut().unwrap() {
            for chunk in tensor["chunks"].as_array_mut().unwrap() {
                let v2 = chunk["key"].as_str().unwrap().to_string();
                let id = parse_chunk_key(&v2).unwrap();
                assert_eq!(id.hash, ChunkHash::Blake3);
                let stored = root.get(&v2).await.unwrap();
                let mut raw = vec![0u8; chunk["raw_len"].as_u64().unwrap() as usize];
                decode_chunk(&stored, &mut raw, None).unwrap();
                let sha = ChunkHash::Sha256.hex(&raw);
                let v1 = format!("chunks/{}/{sha}.{}", &sha[..2], id.encoding.key_suffix());
                root.put(&v1, stored, PutMode::Overwrite).await.unwrap();
                root.delete(&v2).await.unwrap();
                chunk["key"] = v1.into();
            }
        }
        let bytes = serde_json::to_vec(&manifest).unwrap();
        root.put(&key, bytes.into(), PutMode::Overwrite)
            .await
            .unwrap();
        let mut latest = latest;
        latest["format_version"] = 1.into();
        let bytes = serde_json::to_vec(&latest).unwrap();
        root.put("latest", bytes.into(), PutMode::Overwrite)
            .await
            .unwrap();
    });
}

#[test]
fn version_1_checkpoints_still_load_and_their_sha256_addresses_are_checked() {
    let t = memory_root();
    let state = mixed_state(11);
    save_world(&t.root, &small_chunks(), 1, 1, "run", &state);
    rewrite_as_version_1(&t.root);
    let m = resolve(&t.root, "latest").unwrap();
    assert_eq!(m.format_version, 1);
    let weight = m.tensor("model.layer0.weight").unwrap();
    assert!(
        !weight.chunks[0].key.contains(".b3."),
        "{:?}",
        weight.chunks
    );
    assert_same_tensors(&load(&t.root, &m, |_| true).unwrap(), &state);
    assert!(verify(&t.root, &m).unwrap().ok());

    // An intact frame stored under another chunk's address passes the crc
    // but not the address check.
    let (a, b) = (&weight.chunks[0], &weight.chunks[1]);
    assert_eq!(a.raw_len, b.raw_len);
    kiln_test_block_on(async {
        let other = t.root.get(&b.key).await.unwrap();
        t.root
            .put(&a.key, other, object_store::PutMode::Overwrite)
            .await
            .unwrap();
    });
    let mut m = m.clone();
    // The manifest's stored length must match for the frame to be decoded.
    let stored_b = m.tensor("model.layer0.weight").unwrap().chunks[1].stored_len;
    let i = m
        .tensors
        .iter()
        .position(|t| t.name == "model.layer0.weight")
        .unwrap();
    m.tensors[i].chunks[0].stored_len = stored_b;
    let report = verify(&t.root, &m).unwrap();
    assert_eq!(report.bad_chunks.len(), 1, "{report:?}");
    assert!(
        report.bad_chunks[0].reason.contains("sha256"),
        "{}",
        report.bad_chunks[0].reason
    );
}

#[test]
fn load_into_fills_the_callers_buffers_and_refuses_mismatched_ones() {
    use kiln_checkpoint::{LoadTarget, load_into};
    for t in all_roots() {
        let state = mixed_state(12);
        save_world(&t.root, &small_chunks(), 2, 1, "run", &state);
        let m = resolve(&t.root, "latest").unwrap();
        let mut buffers: Vec<Vec<u8>> = state.iter().map(|s| vec![0xAA; s.data.len()]).collect();
        let targets = state
            .iter()
            .zip(buffers.iter_mut())
            .map(|(s, data)| LoadTarget {
                name: &s.name,
                dtype: s.dtype,
                shape: &s.shape,
                data,
            })
            .collect();
        load_into(&t.root, &m, targets).unwrap();
        for (s, b) in state.iter().zip(&buffers) {
            assert!(&s.data == b, "{}: {}", t.backend, s.name);
        }

        let first = &state[0];
        let mut short = vec![0u8; first.data.len() - first.dtype.size()];
        let mut wrong_shape = first.shape.clone();
        wrong_shape[0] += 1;
        for (target, what) in [
            (
                LoadTarget {
                    name: "no.such.tensor",
                    dtype: first.dtype,
                    shape: &first.shape,
                    data: &mut short,
                },
                "has no tensor no.such.tensor",
            ),
            (
                LoadTarget {
                    name: &first.name,
                    dtype: first.dtype,
                    shape: &wrong_shape,
                    data: &mut vec![0u8; first.data.len()],
                },
                "the destination is",
            ),
            (
                LoadTarget {
                    name: &first.name,
                    dtype: first.dtype,
                    shape: &first.shape,
                    data: &mut [0u8; 4],
                },
                "(4 bytes)",
            ),
        ] {
            let err = load_into(&t.root, &m, vec![target]).unwrap_err();
            assert!(
                matches!(&err, Error::Invalid { .. }) && err.to_string().contains(what),
                "{err}"
            );
        }
    }
}

#[test]
fn verify_and_export_report_progress_up_to_the_total() {
    use std::sync::Mutex;
    let t = memory_root();
    let state = mixed_state(13);
    save_world(&t.root, &small_chunks(), 1, 1, "run", &state);
    let m = resolve(&t.root, "latest").unwrap();
    let total: u64 = state.iter().map(|s| s.data.len() as u64).sum();
    let chunks: usize = m.tensors.iter().map(|t| t.chunks.len()).sum();

    let seen = Mutex::new(Vec::new());
    let record = |done: u64, all: u64| seen.lock().unwrap().push((done, all));
    assert!(
        kiln_checkpoint::verify_with_progress(&t.root, &m, Some(&record))
            .unwrap()
            .ok()
    );
    let mut calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), chunks);
    calls.sort();
    assert!(calls.iter().all(|&(_, all)| all == total), "{calls:?}");
    assert_eq!(calls.last().unwrap().0, total);
    assert!(calls.windows(2).all(|w| w[0].0 < w[1].0), "{calls:?}");

    seen.lock().unwrap().clear();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("progress.safetensors");
    kiln_checkpoint::export_safetensors_with_progress(
        &t.root,
        &m,
        |n| n.starts_with("model."),
        &out,
        Some(&record),
    )
    .unwrap();
    let model: u64 = state
        .iter()
        .filter(|s| s.name.starts_with("model."))
        .map(|s| s.data.len() as u64)
        .sum();
    let calls = seen.lock().unwrap().clone();
    assert!(
        calls
            .iter()
            .all(|&(done, all)| all == model && done <= model)
    );
    assert_eq!(calls.iter().map(|c| c.0).max(), Some(model));
}

/// Two saves of the same content under different codec policies store a
/// chunk in different encodings under one key (raw and zstd frames share
/// it); the later write replaces the earlier. Every manifest must still
/// load: a chunk is its content, whatever its encoding. (Seen: a second
/// `kiln run` into the same data folder made the first checkpoint "corrupt".)
#[test]
fn a_chunk_rewritten_in_another_encoding_still_loads_for_every_manifest() {
    for t in all_roots() {
        // Compressible, so raw and zstd frames differ in length.
        let data: Vec<u8> = (0..64 << 10).map(|i| (i % 7) as u8).collect();
        let state = vec![owned("blob", DType::U8, &[data.len()], data)];
        let raw = SaveConfig {
            compression: kiln_checkpoint::Compression::None,
            ..SaveConfig::default()
        };
        let zstd = SaveConfig {
            compression: kiln_checkpoint::Compression::Zstd,
            ..SaveConfig::default()
        };
        save_world(&t.root, &raw, 1, 1, "first", &state);
        let first = resolve(&t.root, "1").unwrap();
        save_world(&t.root, &zstd, 1, 2, "second", &state);
        let second = resolve(&t.root, "2").unwrap();
        let (a, b) = (&first.tensors[0].chunks[0], &second.tensors[0].chunks[0]);
        assert_eq!(a.key, b.key, "{}", t.backend);
        assert!(b.stored_len < a.stored_len, "{}: {a:?} {b:?}", t.backend);
        assert_same_tensors(&load(&t.root, &first, |_| true).unwrap(), &state);
        assert_same_tensors(&load(&t.root, &second, |_| true).unwrap(), &state);

        // Damage is still found, and the length difference named with it.
        let stored = kiln_test_block_on(t.root.get(&a.key)).unwrap();
        let short = stored.slice(..stored.len() - 10);
        kiln_test_block_on(t.root.put(&a.key, short, object_store::PutMode::Overwrite)).unwrap();
        for m in [&first, &second] {
            match load(&t.root, m, |_| true) {
                Err(Error::Corrupt { reason, .. }) => {
                    assert!(
                        reason.contains("the manifest says"),
                        "{}: {reason}",
                        t.backend
                    )
                }
                other => panic!("{}: {other:?}", t.backend),
            }
        }
    }
}

#[test]
fn large_chunks_load_through_ranged_reads_and_damage_is_still_named() {
    for t in all_roots() {
        let cfg = SaveConfig {
            chunk_bytes: 40 << 20,
            ..SaveConfig::default()
        };
        // Incompressible, so the stored chunk is above the ranged-read size.
        let state = vec![random_blob(41 << 20, 4)];
        save_world(&t.root, &cfg, 1, 1, "run", &state);
        let m = resolve(&t.root, "latest").unwrap();
        let big = &m.tensors[0].chunks[0];
        assert!(big.stored_len > 32 << 20, "{big:?}");
        assert_same_tensors(&load(&t.root, &m, |_| true).unwrap(), &state);

        // Truncated: the ranged read comes up short; the load says so.
        kiln_test_block_on(async {
            let stored = t.root.get(&big.key).await.unwrap();
            let short = stored.slice(..stored.len() - 1000);
            t.root
                .put(&big.key, short, object_store::PutMode::Overwrite)
                .await
                .unwrap();
        });
        match load(&t.root, &m, |_| true) {
            Err(Error::Corrupt { chunk, reason, .. }) => {
                assert!(chunk.starts_with("#0 "), "{}: {chunk}", t.backend);
                assert!(
                    reason.contains("the manifest says"),
                    "{}: {reason}",
                    t.backend
                );
            }
            other => panic!("{}: {other:?}", t.backend),
        }
        kiln_test_block_on(t.root.delete(&big.key)).unwrap();
        match load(&t.root, &m, |_| true) {
            Err(Error::Corrupt { reason, .. }) => {
                assert!(reason.contains("missing"), "{}: {reason}", t.backend)
            }
            other => panic!("{}: {other:?}", t.backend),
        }
    }
}

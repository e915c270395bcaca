//! The codec policy end to end: `auto` compresses for a slow store and
//! stores raw for a fast one, the fixed modes do what they say, the choice
//! is recorded in the part and the manifest, and every checkpoint loads back
//! bit for bit whatever its chunks' codecs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_same_tensors, meta, views, weights_f32};
use kiln_checkpoint::{
    CheckpointRoot, Checkpointer, Codec, Compression, OwnedTensor, SaveConfig, load, resolve,
};

/// A memory store whose chunk writes go through a link of `bytes_per_sec`
/// (one link shared by all writes): an object store far away.
#[derive(Debug)]
struct SlowLink {
    inner: object_store::memory::InMemory,
    bytes_per_sec: f64,
    /// When the link is next free.
    free_at: std::sync::Mutex<Instant>,
}

impl std::fmt::Display for SlowLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlowLink")
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for SlowLink {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if location.as_ref().contains("chunks/") {
            let transfer =
                Duration::from_secs_f64(payload.content_length() as f64 / self.bytes_per_sec);
            let done = {
                let mut free = self.free_at.lock().unwrap();
                *free = (*free).max(Instant::now()) + transfer;
                *free
            };
            tokio::time::sleep_until(done.into()).await;
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

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn slow_root(bytes_per_sec: f64) -> CheckpointRoot {
    let store = Arc::new(SlowLink {
        inner: Default::default(),
        bytes_per_sec,
        free_at: std::sync::Mutex::new(Instant::now()),
    });
    // A URL of its own: a process carries what a codec policy measured over
    // to the next checkpointer of the same URL (the same destination).
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    CheckpointRoot::from_store(store, "ckpt", &format!("slow://link-{n}/ckpt"))
}

/// 8 MiB of trained-like float32 weights in four tensors.
fn state(seed: u64) -> Vec<OwnedTensor> {
    (0..4)
        .map(|i| weights_f32(&format!("model/layer{i}.weight"), &[512, 1024], seed + i))
        .collect()
}

fn cfg(compression: Compression) -> SaveConfig {
    SaveConfig {
        chunk_bytes: 1 << 20,
        upload_concurrency: 4,
        compression,
        ..SaveConfig::default()
    }
}

/// Prepares (which probes the destination) and waits for the probe's result.
fn prepared(root: &CheckpointRoot, cfg: SaveConfig, state: &[OwnedTensor]) -> Checkpointer {
    let mut c = Checkpointer::new(root.clone(), cfg, 0, 1).unwrap();
    c.prepare(&views(state)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.codec_estimates().write.is_none() {
        assert!(Instant::now() < deadline, "the write probe never reported");
        std::thread::sleep(Duration::from_millis(10));
    }
    c
}

/// Saves, lands, and returns the manifest's one codec record and its stored
/// bytes; checks the checkpoint loads back bit for bit.
fn save(
    c: &mut Checkpointer,
    root: &CheckpointRoot,
    step: u64,
    state: &[OwnedTensor],
) -> (kiln_checkpoint::CompressionRecord, u64) {
    c.save(step, "run", &views(state), &meta(step)).unwrap();
    let outcome = c.flush().pop().unwrap().unwrap();
    let m = resolve(root, &step.to_string()).unwrap();
    assert_eq!(m.compression.len(), 1, "one record per rank");
    assert_eq!(m.compression[0], *outcome.compression, "manifest = outcome");
    assert_same_tensors(&load(root, &m, |_| true).unwrap(), state);
    // The probe left nothing behind.
    let probes = block_on(root.list("chunks/probe")).unwrap();
    assert!(probes.is_empty(), "{probes:?}");
    (m.compression[0].clone(), m.totals.stored_bytes)
}

#[test]
fn auto_compresses_for_a_slow_store_and_stores_raw_for_a_fast_one() {
    let raw = 8u64 << 20;

    // 5 MB/s: writes bound the save, zstd wins whatever the CPU does (at
    // 20 MB/s a machine saturated by other work, 0.05 spare cores, made raw
    // the faster choice, rightly).
    let root = slow_root(5e6);
    let s = state(1);
    let mut c = prepared(&root, cfg(Compression::Auto), &s);
    let (record, stored) = save(&mut c, &root, 1, &s);
    assert_eq!(record.codec, Codec::Zstd, "{}", record.summary());
    assert_eq!(record.policy, Compression::Auto);
    assert_eq!(record.chunks_compressed, record.chunks_uploaded);
    assert!(record.write_gb_s.unwrap() < 0.05, "{record:?}");
    assert!(stored < raw * 9 / 10, "compressed to {stored} of {raw}");

    // In memory: writing costs next to nothing, so raw is faster than any
    // amount of zstd, and the stored bytes are the raw bytes (but for the
    // sampled chunks, compressed to keep measuring).
    let root = CheckpointRoot::open("memory://codec-policy/fast").unwrap();
    let mut c = prepared(&root, cfg(Compression::Auto), &s);
    let (record, stored) = save(&mut c, &root, 1, &s);
    assert_eq!(record.codec, Codec::None, "{}", record.summary());
    assert!(record.predicted_none_s.unwrap() < record.predicted_zstd_s.unwrap());
    assert_eq!(record.chunks_uploaded, 8);
    assert!(record.chunks_compressed <= 1, "{record:?}");
    assert!(stored > raw * 95 / 100, "stored {stored} of {raw}");
    // The next save measured real chunks and decides the same.
    let (record, _) = save(&mut c, &root, 2, &state(2));
    assert_eq!(record.codec, Codec::None, "{}", record.summary());
    assert!(
        record.hash_gb_s.is_some() && record.ratio.is_some(),
        "{record:?}"
    );
}

#[test]
fn fixed_modes_do_what_they_say_whatever_the_store() {
    let raw = 8u64 << 20;
    let s = state(3);
    let root = CheckpointRoot::open("memory://codec-policy/zstd").unwrap();
    let mut c = Checkpointer::new(root.clone(), cfg(Compression::Zstd), 0, 1).unwrap();
    let (record, stored) = save(&mut c, &root, 1, &s);
    assert_eq!(
        (record.policy, record.codec),
        (Compression::Zstd, Codec::Zstd)
    );
    assert!(stored < raw * 9 / 10);

    let root = slow_root(200e6);
    let mut c = Checkpointer::new(root.clone(), cfg(Compression::None), 0, 1).unwrap();
    let (record, stored) = save(&mut c, &root, 1, &s);
    assert_eq!(
        (record.policy, record.codec),
        (Compression::None, Codec::None)
    );
    assert_eq!(record.chunks_compressed, 0);
    assert_eq!(stored, raw + 8 * 32, "raw bytes and a header per chunk");
}

#[test]
fn raw_chunks_written_from_the_stripe_buffer_load_back_on_a_local_root() {
    // Odd tensor lengths: chunks end anywhere within a block; 1 MiB chunks
    // are laid out for direct writes from the stripe buffer.
    let dir = tempfile::tempdir().unwrap();
    let root = CheckpointRoot::open(dir.path().to_str().unwrap()).unwrap();
    let odd = |seed: u64| -> Vec<OwnedTensor> {
        vec![
            weights_f32("model/a.weight", &[1000, 1001], seed),
            weights_f32("model/b.bias", &[3], seed + 1),
            weights_f32("model/c.weight", &[777, 513], seed + 2),
        ]
    };
    let mut c = Checkpointer::new(root.clone(), cfg(Compression::None), 0, 1).unwrap();
    let first = odd(10);
    c.prepare(&views(&first)).unwrap();
    let raw: u64 = first.iter().map(|t| t.data.len() as u64).sum();
    let (record, stored) = save(&mut c, &root, 1, &first);
    assert_eq!(record.codec, Codec::None);
    let m = resolve(&root, "1").unwrap();
    assert_eq!(stored, raw + 32 * m.totals.chunks);
    // Again with one tensor changed: the buffer is reused, the rest referenced.
    let mut second = odd(10);
    second[2] = weights_f32("model/c.weight", &[777, 513], 99);
    let (_, _) = save(&mut c, &root, 2, &second);
    let report = kiln_checkpoint::verify(&root, &resolve(&root, "2").unwrap()).unwrap();
    assert!(report.ok(), "{:?}", report.bad_chunks);
}

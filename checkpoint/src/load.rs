//! Reading checkpoints: resolve, load, verify, fall back, list.
//!
//! Loads never list: `latest` names the manifest, the manifest names every
//! chunk. Chunks are fetched concurrently (whole objects: a chunk is at most
//! `chunk_bytes`, so one GET per chunk already keeps many requests in flight;
//! chunks above 16 MiB as parallel ranged reads)
//! and decoded on parallel threads straight into the output tensors (the
//! caller's own with [`load_into`]); every chunk's crc32c and address hash
//! are checked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use crate::codec::{decode_chunk, parse_chunk_key};
use crate::error::{Error, Result};
use crate::manifest::{LATEST_KEY, LatestRecord, Manifest, TensorEntry, manifest_key};
use crate::store::{CheckpointRoot, block_on};
use crate::tensor::{DType, TensorView};

/// Chunk reads in flight during a load.
const READ_CONCURRENCY: usize = 16;

/// Stored chunks larger than this are fetched as parallel ranged reads of
/// [`RANGE_BYTES`] (chunks written with a large `chunk_bytes`): one stream
/// per object caps a cloud store's throughput well below the link's.
const RANGED_READ_ABOVE: u64 = 16 << 20;
const RANGE_BYTES: u64 = 8 << 20;

/// Fetches one stored chunk whose manifest length is `stored_len`: whole, or
/// in parallel ranges when it is large. A ranged read that fails for any
/// reason but absence falls back to one whole read, so a truncated or
/// replaced object is reported by the checks on its bytes, as for small ones.
async fn fetch_chunk(root: &CheckpointRoot, key: &str, stored_len: u64) -> Result<Bytes> {
    if stored_len <= RANGED_READ_ABOVE {
        return root.get(key).await;
    }
    let ranges = (0..stored_len)
        .step_by(RANGE_BYTES as usize)
        .map(|start| start..(start + RANGE_BYTES).min(stored_len));
    let pieces = futures::future::try_join_all(ranges.map(|r| root.get_range(key, r))).await;
    match pieces {
        Ok(pieces) if pieces.iter().map(|p| p.len() as u64).sum::<u64>() == stored_len => {
            let mut whole = Vec::with_capacity(stored_len as usize);
            for p in pieces {
                whole.extend_from_slice(&p);
            }
            Ok(whole.into())
        }
        Err(e @ Error::NotFound { .. }) => Err(e),
        _ => root.get(key).await,
    }
}

/// A tensor that owns its bytes (little-endian, as saved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedTensor {
    /// See [`TensorView::name`].
    pub name: String,
    /// See [`TensorView::dtype`].
    pub dtype: DType,
    /// See [`TensorView::shape`].
    pub shape: Vec<usize>,
    /// See [`TensorView::data`].
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// The tensor as a view, to save it or export it.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
    }
}

/// Reads and parses the manifest at `key`.
pub async fn read_manifest(root: &CheckpointRoot, key: &str) -> Result<Manifest> {
    let bytes = root.get(key).await.map_err(|e| match e {
        Error::NotFound { .. } => Error::NotFound {
            what: format!("manifest {}", root.url_of(key)),
        },
        e => e,
    })?;
    Manifest::from_json(key, &bytes)
}

/// Reads the `latest` record.
pub async fn read_latest(root: &CheckpointRoot) -> Result<LatestRecord> {
    match root.get_opt(LATEST_KEY).await? {
        Some(b) => LatestRecord::from_json(&b),
        None => Err(Error::NotFound {
            what: format!("{} (no checkpoint committed yet)", root.url_of(LATEST_KEY)),
        }),
    }
}

/// Finds a checkpoint: `"latest"`, a step number, or a manifest key or URL.
pub fn resolve(root: &CheckpointRoot, which: &str) -> Result<Manifest> {
    block_on(resolve_async(root, which))
}

/// [`resolve`], for async callers.
pub async fn resolve_async(root: &CheckpointRoot, which: &str) -> Result<Manifest> {
    let which = which.trim();
    if which == "latest" {
        let latest = read_latest(root).await?;
        return read_manifest(root, &latest.manifest).await;
    }
    if let Ok(step) = which.parse::<u64>() {
        return resolve_step(root, step).await;
    }
    let key = which
        .strip_prefix(root.url())
        .unwrap_or(which)
        .trim_start_matches('/');
    if key.contains("://") {
        return Err(Error::invalid(format!(
            "{which} is not under the checkpoint root {}",
            root.url()
        )));
    }
    read_manifest(root, key).await
}

/// A step: walk back from `latest` through parents (reads only); a step off
/// that chain (another attempt's) is found by listing its key prefix.
async fn resolve_step(root: &CheckpointRoot, step: u64) -> Result<Manifest> {
    if let Ok(latest) = read_latest(root).await {
        let mut next = Some(latest.manifest);
        let mut hops = 0;
        while let Some(key) = next.take() {
            let Ok(m) = read_manifest(root, &key).await else {
                break;
            };
            if m.step == step {
                return Ok(m);
            }
            hops += 1;
            if m.step < step || hops > 10_000 {
                break;
            }
            next = m.parent.clone();
        }
    }
    let prefix = manifest_key(step, "");
    let prefix = prefix.trim_end_matches(".json");
    let mut found: Vec<_> = root
        .list("manifests")
        .await?
        .into_iter()
        .filter(|o| o.key.starts_with(prefix))
        .collect();
    found.sort_by_key(|o| o.last_modified);
    match found.pop() {
        Some(o) => {
            tracing::warn!(step, manifest = %o.key, "step is not on latest's chain; found it by listing");
            read_manifest(root, &o.key).await
        }
        None => Err(Error::NotFound {
            what: format!("a checkpoint of step {step} under {}", root.url()),
        }),
    }
}

/// One chunk that failed to read or check.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    /// The tensor the chunk belongs to.
    pub tensor: String,
    /// The chunk's index within the tensor.
    pub index: usize,
    /// The chunk's key.
    pub key: String,
    /// What the check found (missing, checksum or address mismatch, ...).
    pub reason: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The manifest's key.
    pub manifest: String,
    /// The checkpoint's step.
    pub step: u64,
    /// Tensors in the manifest (all of them are checked).
    pub tensors_checked: usize,
    /// Chunk references read and checked.
    pub chunks_checked: usize,
    /// Decoded bytes of every tensor.
    pub raw_bytes_checked: u64,
    /// Every chunk that failed, in tensor and chunk order.
    pub bad_chunks: Vec<BadChunk>,
    /// Tensors with at least one bad chunk.
    pub bad_tensors: Vec<String>,
}

impl VerifyReport {
    /// Whether every chunk checked out.
    pub fn ok(&self) -> bool {
        self.bad_chunks.is_empty()
    }
}

struct ChunkJob<'a> {
    tensor: usize,
    index: usize,
    entry: &'a TensorEntry,
}

fn chunk_error(job: &ChunkJob<'_>, e: Error) -> Error {
    let chunk = &job.entry.chunks[job.index];
    let label = format!("#{} {}", job.index, chunk.key);
    match e {
        Error::NotFound { .. } => Error::Corrupt {
            tensor: job.entry.name.clone(),
            chunk: label,
            reason: "missing from the store".into(),
        },
        Error::Unavailable { what, source } => Error::Unavailable {
            what: format!("{what} (chunk {label} of tensor {})", job.entry.name),
            source,
        },
        e => e,
    }
}

/// A whole local file read past the page cache, where the platform and
/// filesystem allow (`None`: read it the ordinary way).
#[cfg(target_os = "linux")]
fn read_direct<R>(
    path: &std::path::Path,
    f: impl FnOnce(&[u8]) -> R,
) -> std::io::Result<Option<R>> {
    crate::direct::read(path, f)
}

#[cfg(not(target_os = "linux"))]
fn read_direct<R>(_: &std::path::Path, _: impl FnOnce(&[u8]) -> R) -> std::io::Result<Option<R>> {
    Ok(None)
}

/// Told how far a read has come: called after each chunk, from whichever
/// thread decoded it, with the raw bytes done so far and the total.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Fetches and decodes the chunks of `entries`; with `outputs`, into them
/// (one buffer per entry, of its raw length). Returns the per-chunk errors;
/// with `stop_at_first`, stops fetching after the first.
fn read_chunks(
    root: &CheckpointRoot,
    entries: &[&TensorEntry],
    outputs: Option<Vec<&mut [u8]>>,
    stop_at_first: bool,
    progress: Option<Progress<'_>>,
) -> Vec<(usize, usize, Error)> {
    let mut jobs = Vec::new();
    for (t, entry) in entries.iter().enumerate() {
        for index in 0..entry.chunks.len() {
            jobs.push(ChunkJob {
                tensor: t,
                index,
                entry,
            });
        }
    }
    // One disjoint output slice per job, taken by whichever thread decodes it.
    let slots: Vec<Mutex<Option<&mut [u8]>>> = match outputs {
        Some(outputs) => {
            let mut slots = Vec::with_capacity(jobs.len());
            for (entry, out) in entries.iter().zip(outputs) {
                let mut rest: &mut [u8] = out;
                for c in &entry.chunks {
                    let (mine, tail) = rest.split_at_mut(c.raw_len as usize);
                    slots.push(Mutex::new(Some(mine)));
                    rest = tail;
                }
            }
            slots
        }
        None => Vec::new(),
    };
    let stop = AtomicBool::new(false);
    let errors: Mutex<Vec<(usize, usize, Error)>> = Mutex::new(Vec::new());
    let fail = |job: &ChunkJob<'_>, e: Error| {
        if stop_at_first {
            stop.store(true, Ordering::SeqCst);
        }
        errors
            .lock()
            .expect("errors")
            .push((job.tensor, job.index, chunk_error(job, e)));
    };
    let total: u64 = entries.iter().map(|e| e.raw_len).sum();
    let done = std::sync::atomic::AtomicU64::new(0);
    // Checks and decodes one fetched chunk into its slot (or a scratch
    // buffer when only verifying).
    let decode = |j: usize, stored: &[u8], scratch: &mut Vec<u8>| {
        let job = &jobs[j];
        let chunk = &job.entry.chunks[job.index];
        let dst: &mut [u8] = if slots.is_empty() {
            scratch.resize(chunk.raw_len as usize, 0);
            scratch
        } else {
            slots[j]
                .lock()
                .expect("slot")
                .take()
                .expect("each chunk decoded once")
        };
        // A content-addressed chunk may be stored in another encoding than
        // the manifest's save wrote (a later save of the same content under
        // another codec policy stored it raw or compressed, over the same
        // key): any frame that decodes to the content its address names is
        // that chunk, so its length is not held against it. Other keys must
        // match the manifest's length too.
        let id = parse_chunk_key(&chunk.key);
        let size_differs = stored.len() as u64 != chunk.stored_len;
        let size_note = || {
            format!(
                "stored object is {} bytes, the manifest says {}",
                stored.len(),
                chunk.stored_len
            )
        };
        let checked = match decode_chunk(
            stored,
            dst,
            id.as_ref().map(|id| (id.hash, id.address.as_str())),
        ) {
            Ok(()) if size_differs && id.is_none() => Err(size_note()),
            Ok(()) => Ok(()),
            Err(reason) if size_differs => Err(format!("{}: {reason}", size_note())),
            Err(reason) => Err(reason),
        };
        if let Err(reason) = checked {
            fail(
                job,
                Error::Corrupt {
                    tensor: job.entry.name.clone(),
                    chunk: format!("#{} {}", job.index, chunk.key),
                    reason,
                },
            );
        }
        if let Some(progress) = progress {
            progress(
                done.fetch_add(chunk.raw_len, Ordering::SeqCst) + chunk.raw_len,
                total,
            );
        }
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    if let Some(dir) = root.local_dir() {
        // Local files: each thread reads whole chunks past the page cache
        // (see `crate::direct`) into its own buffer and decodes them. Four
        // threads per core keep reads in flight while others decode.
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..(4 * cores).clamp(4, 16) {
                scope.spawn(|| {
                    let mut scratch = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let j = next.fetch_add(1, Ordering::SeqCst);
                        let Some(job) = jobs.get(j) else { break };
                        let key = &job.entry.chunks[job.index].key;
                        let path = dir.join(key);
                        let read = read_direct(&path, |stored| decode(j, stored, &mut scratch))
                            .and_then(|done| match done {
                                Some(()) => Ok(()),
                                None => std::fs::read(&path).map(|b| decode(j, &b, &mut scratch)),
                            });
                        match read {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(
                                job,
                                Error::NotFound {
                                    what: root.url_of(key),
                                },
                            ),
                            Err(e) => fail(
                                job,
                                Error::Io {
                                    op: "read",
                                    path: path.display().to_string(),
                                    source: e,
                                },
                            ),
                        }
                    }
                });
            }
        });
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel::<(usize, Result<Bytes>)>(READ_CONCURRENCY);
        let rx = Mutex::new(rx);
        std::thread::scope(|scope| {
            for _ in 0..cores.clamp(1, 8) {
                scope.spawn(|| {
                    let mut scratch = Vec::new();
                    loop {
                        let Some((j, fetched)) = rx.lock().expect("chunk queue").blocking_recv()
                        else {
                            break;
                        };
                        match fetched {
                            Ok(stored) => decode(j, &stored, &mut scratch),
                            Err(e) => fail(&jobs[j], e),
                        }
                    }
                });
            }
            let fetch = async {
                let tx = tx;
                let mut reads = futures::stream::iter(0..jobs.len())
                    .take_while(|_| std::future::ready(!stop.load(Ordering::SeqCst)))
                    .map(|j| {
                        let chunk = &jobs[j].entry.chunks[jobs[j].index];
                        async move { (j, fetch_chunk(root, &chunk.key, chunk.stored_len).await) }
                    })
                    .buffer_unordered(READ_CONCURRENCY);
                while let Some(r) = reads.next().await {
                    if tx.send(r).await.is_err() {
                        break;
                    }
                }
            };
            block_on(fetch);
        });
    }
    let mut errors = errors.into_inner().expect("errors");
    errors.sort_by_key(|(t, i, _)| (*t, *i));
    errors
}

/// Loads the tensors whose names pass `filter`, verifying every chunk. A
/// corrupt or missing chunk is an [`Error::Corrupt`] naming tensor and chunk.
pub fn load(
    root: &CheckpointRoot,
    manifest: &Manifest,
    filter: impl Fn(&str) -> bool,
) -> Result<Vec<OwnedTensor>> {
    load_with_progress(root, manifest, filter, None)
}

/// [`load`], telling `progress` how far it has come.
pub fn load_with_progress(
    root: &CheckpointRoot,
    manifest: &Manifest,
    filter: impl Fn(&str) -> bool,
    progress: Option<Progress<'_>>,
) -> Result<Vec<OwnedTensor>> {
    let selected: Vec<&TensorEntry> = manifest
        .tensors
        .iter()
        .filter(|t| filter(&t.name))
        .collect();
    let mut outputs: Vec<Vec<u8>> = selected
        .iter()
        .map(|t| vec![0u8; t.raw_len as usize])
        .collect();
    let errors = read_chunks(
        root,
        &selected,
        Some(outputs.iter_mut().map(|o| o.as_mut_slice()).collect()),
        true,
        progress,
    );
    if let Some((_, _, e)) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(selected
        .into_iter()
        .zip(outputs)
        .map(|(t, data)| OwnedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data,
        })
        .collect())
}

/// Where [`load_into`] puts one tensor: the caller's buffer (a model's
/// parameter, a preallocated state), which must match the saved dtype and
/// shape.
#[derive(Debug)]
pub struct LoadTarget<'a> {
    /// The saved tensor's name.
    pub name: &'a str,
    /// Must equal the saved dtype.
    pub dtype: DType,
    /// Must equal the saved shape.
    pub shape: &'a [usize],
    /// Where the bytes go; exactly the tensor's length.
    pub data: &'a mut [u8],
}

/// Loads the named tensors straight into the caller's buffers, verifying
/// every chunk like [`load`], without allocating the tensors again. A name
/// the checkpoint lacks, or a dtype or shape that differs from the saved
/// one, is an `Invalid` error before anything is read; on a corrupt chunk
/// the buffers hold partial data.
pub fn load_into(
    root: &CheckpointRoot,
    manifest: &Manifest,
    targets: Vec<LoadTarget<'_>>,
) -> Result<()> {
    let mut entries = Vec::with_capacity(targets.len());
    let mut outputs = Vec::with_capacity(targets.len());
    for target in targets {
        let entry = manifest
            .tensors
            .binary_search_by(|t| t.name.as_str().cmp(target.name))
            .map(|i| &manifest.tensors[i])
            .map_err(|_| {
                Error::invalid(format!(
                    "checkpoint {} has no tensor {}",
                    manifest.key, target.name
                ))
            })?;
        if entry.dtype != target.dtype
            || entry.shape != target.shape
            || entry.raw_len != target.data.len() as u64
        {
            return Err(Error::invalid(format!(
                "tensor {} is {:?} {:?} in checkpoint {}, the destination is {:?} {:?} ({} bytes)",
                target.name,
                entry.dtype,
                entry.shape,
                manifest.key,
                target.dtype,
                target.shape,
                target.data.len()
            )));
        }
        entries.push(entry);
        outputs.push(target.data);
    }
    match read_chunks(root, &entries, Some(outputs), true, None)
        .into_iter()
        .next()
    {
        Some((_, _, e)) => Err(e),
        None => Ok(()),
    }
}

/// Re-reads every chunk of `manifest` and checks it; lists every bad one.
/// Store outages are errors, not findings.
pub fn verify(root: &CheckpointRoot, manifest: &Manifest) -> Result<VerifyReport> {
    verify_with_progress(root, manifest, None)
}

/// [`verify`], telling `progress` how far it has come.
pub fn verify_with_progress(
    root: &CheckpointRoot,
    manifest: &Manifest,
    progress: Option<Progress<'_>>,
) -> Result<VerifyReport> {
    let entries: Vec<&TensorEntry> = manifest.tensors.iter().collect();
    let errors = read_chunks(root, &entries, None, false, progress);
    let mut bad_chunks = Vec::new();
    for (t, index, e) in errors {
        match e {
            Error::Corrupt { reason, .. } => {
                let entry = entries[t];
                bad_chunks.push(BadChunk {
                    tensor: entry.name.clone(),
                    index,
                    key: entry.chunks[index].key.clone(),
                    reason,
                })
            }
            other => return Err(other),
        }
    }
    let mut bad_tensors: Vec<String> = bad_chunks.iter().map(|b| b.tensor.clone()).collect();
    bad_tensors.dedup();
    Ok(VerifyReport {
        manifest: manifest.key.clone(),
        step: manifest.step,
        tensors_checked: entries.len(),
        chunks_checked: entries.iter().map(|t| t.chunks.len()).sum(),
        raw_bytes_checked: entries.iter().map(|t| t.raw_len).sum(),
        bad_chunks,
        bad_tensors,
    })
}

/// Loads the newest checkpoint that verifies: `latest`, else its parent, and
/// so on. Every skipped checkpoint is logged with `tracing::error!` and
/// returned as a warning. Store outages are returned as errors (skipping a
/// good checkpoint because the store hiccuped would lose progress).
pub fn load_latest_verified(
    root: &CheckpointRoot,
    filter: impl Fn(&str) -> bool,
) -> Result<(Manifest, Vec<OwnedTensor>, Vec<String>)> {
    let latest = block_on(read_latest(root))?;
    let mut warnings = Vec::new();
    let mut next = Some(latest.manifest.clone());
    // The latest record carries the parent too, for when the newest manifest
    // itself is unreadable.
    let mut fallback_parent = latest.parent.clone();
    let mut hops = 0;
    while let Some(key) = next.take() {
        hops += 1;
        if hops > 10_000 {
            break;
        }
        let manifest = match block_on(read_manifest(root, &key)) {
            Ok(m) => m,
            Err(e) if e.is_data_loss() => {
                let w = format!(
                    "checkpoint {} is unreadable, trying its parent: {e}",
                    root.url_of(&key)
                );
                tracing::error!(manifest = %key, error = %e, "checkpoint manifest unreadable; falling back");
                warnings.push(w);
                next = fallback_parent.take();
                continue;
            }
            Err(e) => return Err(e),
        };
        fallback_parent = None;
        match load(root, &manifest, &filter) {
            Ok(tensors) => return Ok((manifest, tensors, warnings)),
            Err(e) if e.is_data_loss() => {
                tracing::error!(
                    manifest = %key,
                    step = manifest.step,
                    error = %e,
                    "checkpoint does not verify; falling back to its parent"
                );
                warnings.push(format!(
                    "checkpoint {} (step {}) does not verify, trying its parent: {e}",
                    root.url_of(&key),
                    manifest.step
                ));
                next = manifest.parent.clone();
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::NotFound {
        what: format!(
            "a checkpoint that verifies under {} ({})",
            root.url(),
            if warnings.is_empty() {
                "none".to_string()
            } else {
                warnings.join("; ")
            }
        ),
    })
}

/// One line of `kiln ckpt ls`.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestSummary {
    /// The manifest's key.
    pub key: String,
    /// The manifest's URL, as `kiln ckpt` commands take it.
    pub url: String,
    /// The step; from the key when the manifest is unreadable, `None` when
    /// the key does not name one either.
    pub step: Option<u64>,
    /// [`Manifest::attempt`]. This and the fields below up to `parent` are
    /// `None` (the counts 0) when the manifest is unreadable.
    pub attempt: Option<String>,
    /// [`Manifest::job`].
    pub job: Option<String>,
    /// [`Manifest::created_at`].
    pub created_at: Option<String>,
    /// [`Manifest::world_size`].
    pub world_size: Option<u32>,
    /// [`Totals::tensors`](crate::manifest::Totals::tensors).
    pub tensors: u64,
    /// [`Totals::raw_bytes`](crate::manifest::Totals::raw_bytes).
    pub raw_bytes: u64,
    /// [`Totals::stored_bytes`](crate::manifest::Totals::stored_bytes).
    pub stored_bytes: u64,
    /// [`Manifest::parent`].
    pub parent: Option<String>,
    /// Whether `latest` names this manifest.
    pub is_latest: bool,
    /// Set when the manifest could not be read or parsed.
    pub error: Option<String>,
}

/// Every manifest under the root, oldest step first (lists: tools only).
pub fn list(root: &CheckpointRoot) -> Result<Vec<ManifestSummary>> {
    block_on(list_async(root))
}

/// [`list`], for async callers.
pub async fn list_async(root: &CheckpointRoot) -> Result<Vec<ManifestSummary>> {
    let latest = match read_latest(root).await {
        Ok(l) => Some(l.manifest),
        Err(Error::NotFound { .. } | Error::CorruptObject { .. }) => None,
        Err(e) => return Err(e),
    };
    let objects = root.list("manifests").await?;
    let root = Arc::new(root.clone());
    let mut out: Vec<ManifestSummary> = futures::stream::iter(objects)
        .map(|o| {
            let root = root.clone();
            let latest = latest.clone();
            async move {
                let is_latest = latest.as_deref() == Some(o.key.as_str());
                match read_manifest(&root, &o.key).await {
                    Ok(m) => ManifestSummary {
                        url: root.url_of(&o.key),
                        key: o.key,
                        step: Some(m.step),
                        attempt: Some(m.attempt),
                        job: Some(m.job),
                        created_at: Some(m.created_at),
                        world_size: Some(m.world_size),
                        tensors: m.totals.tensors,
                        raw_bytes: m.totals.raw_bytes,
                        stored_bytes: m.totals.stored_bytes,
                        parent: m.parent,
                        is_latest,
                        error: None,
                    },
                    Err(e) => ManifestSummary {
                        url: root.url_of(&o.key),
                        step: crate::manifest::step_of_manifest_key(&o.key),
                        key: o.key,
                        attempt: None,
                        job: None,
                        created_at: None,
                        world_size: None,
                        tensors: 0,
                        raw_bytes: 0,
                        stored_bytes: 0,
                        parent: None,
                        is_latest,
                        error: Some(e.to_string()),
                    },
                }
            }
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;
    out.sort_by(|a, b| (a.step, &a.created_at, &a.key).cmp(&(b.step, &b.created_at, &b.key)));
    Ok(out)
}

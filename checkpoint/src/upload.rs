//! A save's background half: each chunk of the stripe hashed (unless the
//! copy did), looked up among the chunks already stored, framed (compressed
//! or raw) and uploaded, at most `upload_concurrency` at once; then the
//! rank's part, and on rank 0 the commit ([`crate::commit`], driven here).
//! [`crate::save::Checkpointer::save`] hands it a [`SaveJob`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::PutMode;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

use crate::codec::{
    Encoding, HEADER_LEN, address, chunk_key, encode_chunk_into, encode_raw_into, raw_frame_header,
};
use crate::commit::{Action, Commit, CommitInput, Event};
use crate::compression::{CodecPolicy, CompressionRecord, Decision, Observation};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::manifest::{
    CheckpointMeta, ChunkRef, FORMAT_VERSION, LATEST_KEY, LatestRecord, PartRecord, now_rfc3339,
    part_key,
};
use crate::measure::{IdleClock, WriteMeter, cpu_clock};
use crate::plan::ChunkPlan;
use crate::pool::CpuPool;
use crate::save::{SaveConfig, SaveOutcome};
use crate::store::CheckpointRoot;
use crate::stripe::{ChunkDigest, StripeBuffer};

/// Chunks this rank knows are stored, with their stored length and the
/// sequence number of the last save that referenced them. Only the chunks of
/// the latest save (and of `set_parent`) are kept, so a reused chunk is
/// always one a recent part or manifest references (see the GC rules).
#[derive(Default)]
pub(crate) struct KnownChunks {
    pub(crate) map: HashMap<String, (u64, u64)>,
}

/// Frame buffers handed back after their upload, for the next chunks to
/// encode into. At most `upload_concurrency` frames exist at once (one per
/// permit), so the pool never holds more than that.
#[derive(Default)]
pub(crate) struct FramePool(Mutex<Vec<Vec<u8>>>);

impl FramePool {
    fn take(&self) -> Vec<u8> {
        self.0.lock().expect("frame pool").pop().unwrap_or_default()
    }

    /// Takes back the buffer of an uploaded frame if nothing else holds it
    /// (an HTTP client may keep a reference a little longer; then it is
    /// simply dropped). Says whether it did.
    fn give(&self, frame: Bytes) -> bool {
        match frame.try_into_mut() {
            Ok(frame) => {
                self.0.lock().expect("frame pool").push(frame.into());
                true
            }
            Err(_) => false,
        }
    }
}

/// What the other ranks said about their saves (through the caller's own
/// channel: see [`crate::CheckpointManager::news`]), for the commits of this
/// rank to stop waiting for parts that will never come.
#[derive(Default)]
pub(crate) struct PeerNews {
    /// Steps whose save failed on another rank: (rank, cause).
    pub(crate) failed: HashMap<u64, (usize, String)>,
    /// Every other rank's saves are over; a part still missing then is
    /// waited for until this instant at most.
    pub(crate) settled_until: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct MemoryCounter {
    live: AtomicU64,
    pub(crate) peak: AtomicU64,
}

impl MemoryCounter {
    fn add(&self, n: u64) {
        let now = self.live.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
    fn sub(&self, n: u64) {
        self.live.fetch_sub(n, Ordering::SeqCst);
    }
}

/// Everything a background save needs.
pub(crate) struct SaveJob {
    pub(crate) seq: u64,
    pub(crate) step: u64,
    pub(crate) attempt: String,
    pub(crate) rank: usize,
    pub(crate) world_size: usize,
    pub(crate) plan: Arc<ChunkPlan>,
    pub(crate) stripe: std::ops::Range<usize>,
    /// Offset of each stripe chunk in the buffer.
    pub(crate) offsets: Vec<usize>,
    /// Raw chunks are written from the buffer (laid out for it).
    pub(crate) in_place: bool,
    /// Each chunk's address and raw frame header, when the copy computed
    /// them (`Decision::digest_while_copying`).
    pub(crate) digests: Vec<Option<ChunkDigest>>,
    pub(crate) buffer: Arc<StripeBuffer>,
    pub(crate) meta: CheckpointMeta,
    pub(crate) cfg: SaveConfig,
    pub(crate) root: CheckpointRoot,
    pub(crate) pool: Arc<CpuPool>,
    pub(crate) known: Arc<Mutex<KnownChunks>>,
    pub(crate) memory: Arc<MemoryCounter>,
    pub(crate) frames: Arc<FramePool>,
    pub(crate) started: Instant,
    pub(crate) blocking: Duration,
    pub(crate) last_committed: Arc<Mutex<Option<String>>>,
    /// This save's codec, and the policy its measurements go back to.
    pub(crate) decision: Decision,
    pub(crate) policy: Arc<Mutex<CodecPolicy>>,
    pub(crate) idle: Arc<IdleClock>,
    pub(crate) peers: Arc<Mutex<PeerNews>>,
}

/// What one chunk cost on its CPU thread (seconds of that thread's CPU).
#[derive(Clone, Copy, Default)]
struct ChunkCost {
    /// `None`: hashed while copying.
    hash_s: Option<f64>,
    encode_s: f64,
    /// `Some(true)`: through zstd; `Some(false)`: framed raw; `None`: reused.
    compressed: Option<bool>,
}

enum Prepared {
    Reused {
        key: String,
        stored_len: u64,
        cost: ChunkCost,
    },
    Encoded {
        key: String,
        frame: Vec<u8>,
        cost: ChunkCost,
    },
    /// A raw frame whose body is the chunk where it lies in the stripe
    /// buffer (local roots: written from there with direct I/O).
    RawInPlace {
        key: String,
        header: [u8; HEADER_LEN],
        cost: ChunkCost,
    },
}

/// A chunk's preparation: done at once, or on the CPU pool.
enum PreparedChunk {
    Ready(std::io::Result<Prepared>),
    Pool(oneshot::Receiver<std::io::Result<Prepared>>),
}

/// What it takes to prepare one chunk for upload: hash it (unless the copy
/// did), look it up among the stored chunks, and frame it (compressed, raw,
/// or only a header when it is written from the stripe buffer).
struct ChunkWork {
    buffer: Arc<StripeBuffer>,
    offset: usize,
    len: usize,
    digest: Option<ChunkDigest>,
    encoding: Encoding,
    compress: bool,
    in_place: bool,
    level: i32,
    known: Arc<Mutex<KnownChunks>>,
    frames: Arc<FramePool>,
    memory: Arc<MemoryCounter>,
}

impl ChunkWork {
    fn needs_cpu(&self) -> bool {
        self.digest.is_none() || self.compress || !self.in_place
    }

    fn run(self) -> std::io::Result<Prepared> {
        let raw = &self.buffer.data[self.offset..self.offset + self.len];
        let mut cost = ChunkCost::default();
        let (address, header) = match self.digest {
            Some((address, header)) => (address, Some(header)),
            None => {
                let t0 = cpu_clock();
                let a = address(raw);
                cost.hash_s = Some(cpu_clock() - t0);
                (a, None)
            }
        };
        let key = chunk_key(&address, self.encoding);
        let stored = self
            .known
            .lock()
            .expect("known chunks")
            .map
            .get(&key)
            .map(|e| e.0);
        if let Some(stored_len) = stored {
            return Ok(Prepared::Reused {
                key,
                stored_len,
                cost,
            });
        }
        if self.in_place && !self.compress {
            // Written from the stripe buffer itself: only the header is
            // made here.
            let t1 = cpu_clock();
            let header = header.unwrap_or_else(|| raw_frame_header(raw));
            cost.encode_s = cpu_clock() - t1;
            cost.compressed = Some(false);
            return Ok(Prepared::RawInPlace { key, header, cost });
        }
        // Frame memory counts from its allocation until it is dropped,
        // including while it waits in the pool.
        let mut frame = self.frames.take();
        let before = frame.capacity() as u64;
        let t1 = cpu_clock();
        if self.compress {
            if let Err(e) = encode_chunk_into(raw, self.encoding, self.level, &mut frame) {
                self.memory.sub(before);
                return Err(e);
            }
        } else {
            encode_raw_into(raw, &mut frame);
        }
        cost.encode_s = cpu_clock() - t1;
        cost.compressed = Some(self.compress);
        self.memory.add(frame.capacity() as u64 - before);
        Ok(Prepared::Encoded { key, frame, cost })
    }
}

/// One chunk's bytes in the stripe buffer, kept alive while it is written.
struct StripeSlice {
    buffer: Arc<StripeBuffer>,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for StripeSlice {
    fn as_ref(&self) -> &[u8] {
        &self.buffer.data[self.range.clone()]
    }
}

struct ChunkDone {
    reference: ChunkRef,
    uploaded: bool,
    cost: ChunkCost,
}

impl SaveJob {
    /// Runs the save; whatever happens, signals this save's commit slot only
    /// after the previous save's, so commits stay in save order even when a
    /// save fails before its commit.
    pub(crate) async fn run(
        self,
        mut previous: Option<oneshot::Receiver<()>>,
        commit_done: oneshot::Sender<()>,
    ) -> Result<SaveOutcome> {
        let idle = self.idle.clone();
        let result = self.run_body(&mut previous).await;
        idle.save_ends();
        if let Some(previous) = previous {
            let _ = previous.await;
        }
        let _ = commit_done.send(());
        result
    }

    /// The save in order: upload the stripe's chunks, learn from what they
    /// cost, write the part, and on rank 0 commit (after the previous save's
    /// commit).
    async fn run_body(
        self,
        previous_commit: &mut Option<oneshot::Receiver<()>>,
    ) -> Result<SaveOutcome> {
        let step = self.step;
        let SaveJob {
            seq,
            attempt,
            rank,
            world_size,
            plan,
            stripe,
            offsets,
            in_place,
            digests,
            buffer,
            meta,
            cfg,
            root,
            pool,
            known,
            memory,
            frames,
            started,
            blocking,
            last_committed,
            decision,
            policy,
            peers,
            ..
        } = self;
        let meter = Arc::new(Mutex::new(WriteMeter::default()));
        let chunks = StripeUpload {
            seq,
            plan: &plan,
            stripe: stripe.clone(),
            offsets: &offsets,
            in_place,
            digests,
            buffer,
            cfg: &cfg,
            root: &root,
            pool: &pool,
            known: &known,
            memory: &memory,
            frames: &frames,
            decision: &decision,
            meter: &meter,
        }
        .run()
        .await?;
        let record = observe_costs(&chunks, decision.record, &meter, &policy);
        let count = |uploaded: bool| chunks.iter().filter(|c| c.uploaded == uploaded).count();
        let bytes = |uploaded: bool| -> u64 {
            chunks
                .iter()
                .filter(|c| c.uploaded == uploaded)
                .map(|c| c.reference.stored_len)
                .sum()
        };
        let part = PartRecord {
            format_version: FORMAT_VERSION,
            step,
            attempt: attempt.clone(),
            rank: rank as u32,
            world_size: world_size as u32,
            layout: plan.layout_digest(),
            first_chunk: stripe.start as u64,
            bytes_uploaded: bytes(true),
            bytes_reused: bytes(false),
            chunks_uploaded: count(true) as u64,
            chunks_reused: count(false) as u64,
            chunks: chunks.into_iter().map(|c| c.reference).collect(),
            compression: Some(record.clone()),
        };
        write_part(&root, &part, &attempt, rank, world_size).await?;
        known
            .lock()
            .expect("known chunks")
            .map
            .retain(|_, (_, s)| *s >= seq);
        failpoint::hit("after-chunks");

        let mut outcome = SaveOutcome {
            step,
            url: None,
            bytes_uploaded: part.bytes_uploaded,
            bytes_reused: part.bytes_reused,
            chunks_uploaded: part.chunks_uploaded as usize,
            chunks_reused: part.chunks_reused as usize,
            blocking,
            durable_after: Duration::ZERO,
            rank,
            latest_moved: false,
            compression: Box::new(record),
        };
        if rank != 0 {
            outcome.durable_after = started.elapsed();
            return Ok(outcome);
        }

        // The committer: commits happen in save order.
        if let Some(previous) = previous_commit.take() {
            let _ = previous.await;
        }
        let input = CommitInput {
            step,
            attempt: attempt.clone(),
            world_size,
            plan,
            meta,
            parent: parent_of(&root, &last_committed).await?,
            timeout: cfg.commit_timeout,
            created_at: now_rfc3339(),
        };
        let committed = drive_commit(&root, input, part, &peers).await?;
        *last_committed.lock().expect("last committed") = Some(committed.manifest.key.clone());
        if !committed.latest_moved {
            tracing::warn!(
                step,
                manifest = %committed.manifest.key,
                "checkpoint committed but latest already names a newer step; latest not moved"
            );
        }
        let parts = &committed.parts;
        outcome.url = Some(root.url_of(&committed.manifest.key));
        outcome.bytes_uploaded = parts.iter().map(|p| p.bytes_uploaded).sum();
        outcome.bytes_reused = parts.iter().map(|p| p.bytes_reused).sum();
        outcome.chunks_uploaded = parts.iter().map(|p| p.chunks_uploaded as usize).sum();
        outcome.chunks_reused = parts.iter().map(|p| p.chunks_reused as usize).sum();
        outcome.latest_moved = committed.latest_moved;
        outcome.durable_after = started.elapsed();
        tracing::info!(
            step,
            url = outcome.url.as_deref().unwrap_or(""),
            uploaded = outcome.bytes_uploaded,
            reused = outcome.bytes_reused,
            durable_ms = outcome.durable_after.as_millis() as u64,
            codec = outcome.compression.codec.as_str(),
            "checkpoint committed"
        );
        Ok(outcome)
    }
}

/// One rank's stripe of a save and where its chunks go: the upload loop.
struct StripeUpload<'a> {
    seq: u64,
    plan: &'a ChunkPlan,
    stripe: std::ops::Range<usize>,
    offsets: &'a [usize],
    in_place: bool,
    digests: Vec<Option<ChunkDigest>>,
    buffer: Arc<StripeBuffer>,
    cfg: &'a SaveConfig,
    root: &'a CheckpointRoot,
    pool: &'a CpuPool,
    known: &'a Arc<Mutex<KnownChunks>>,
    memory: &'a Arc<MemoryCounter>,
    frames: &'a Arc<FramePool>,
    decision: &'a Decision,
    meter: &'a Arc<Mutex<WriteMeter>>,
}

impl StripeUpload<'_> {
    /// Prepares (hash, look up, frame) and writes every chunk of the stripe,
    /// at most `upload_concurrency` at once; stops at the first failure. The
    /// stripe buffer is let go as soon as the loop has handed out every
    /// chunk (only in-place writes still hold it), so the next save can
    /// have it back.
    async fn run(self) -> Result<Vec<ChunkDone>> {
        let StripeUpload {
            seq,
            plan,
            stripe,
            offsets,
            in_place,
            mut digests,
            buffer,
            cfg,
            root,
            pool,
            known,
            memory,
            frames,
            decision,
            meter,
        } = self;
        let permits = Arc::new(Semaphore::new(cfg.upload_concurrency));
        let mut tasks = JoinSet::new();
        let mut chunks: Vec<Option<ChunkDone>> = (0..stripe.len()).map(|_| None).collect();
        let mut first_error: Option<Error> = None;
        for (i, index) in stripe.clone().enumerate() {
            // Reap finished uploads as we go so an early failure stops the save.
            while let Some(done) = tasks.try_join_next() {
                record(done, &mut chunks, &mut first_error);
            }
            if first_error.is_some() {
                break;
            }
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let c = plan.chunks[index];
            let encoding = Encoding::for_dtype(plan.tensors[c.tensor].dtype);
            let (offset, len) = (offsets[i], c.len);
            let compress = decision.compresses(i);
            let work = ChunkWork {
                buffer: buffer.clone(),
                offset,
                len,
                digest: digests[i].take(),
                encoding,
                compress,
                in_place,
                level: cfg.compression_level,
                known: known.clone(),
                frames: frames.clone(),
                memory: memory.clone(),
            };
            // A raw chunk hashed while copying and written in place leaves
            // no CPU work: it need not wait for a (maybe idle-priority)
            // pool thread.
            let prepared = if work.needs_cpu() {
                PreparedChunk::Pool(pool.run(move || work.run()))
            } else {
                PreparedChunk::Ready(work.run())
            };
            let write = ChunkWrite {
                seq,
                offset,
                len,
                // Only a chunk written from the stripe buffer keeps it from
                // going home once the CPU work is done.
                buffer: (in_place && !compress).then(|| buffer.clone()),
                root: root.clone(),
                known: known.clone(),
                memory: memory.clone(),
                frames: frames.clone(),
                cfg: cfg.clone(),
                meter: meter.clone(),
            };
            tasks.spawn(async move {
                let _permit = permit;
                Ok::<_, Error>((i, write.run(prepared).await?))
            });
        }
        drop(buffer);
        while let Some(done) = tasks.join_next().await {
            record(done, &mut chunks, &mut first_error);
            if first_error.is_some() {
                tasks.abort_all();
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(chunks
            .into_iter()
            .map(|c| c.expect("every chunk finished"))
            .collect())
    }
}

/// Where one prepared chunk goes, on its upload task.
struct ChunkWrite {
    seq: u64,
    offset: usize,
    len: usize,
    /// The stripe buffer, for a raw chunk written in place.
    buffer: Option<Arc<StripeBuffer>>,
    root: CheckpointRoot,
    known: Arc<Mutex<KnownChunks>>,
    memory: Arc<MemoryCounter>,
    frames: Arc<FramePool>,
    cfg: SaveConfig,
    meter: Arc<Mutex<WriteMeter>>,
}

impl ChunkWrite {
    /// Waits for the chunk's CPU work, writes it unless it is stored already,
    /// and records it among the known chunks.
    async fn run(self, prepared: PreparedChunk) -> Result<ChunkDone> {
        let ChunkWrite {
            seq,
            offset,
            len,
            buffer,
            root,
            known,
            memory,
            frames,
            cfg,
            meter,
        } = self;
        let prepared = match prepared {
            PreparedChunk::Ready(p) => p,
            PreparedChunk::Pool(p) => p.await.map_err(|_| Error::Cancelled {
                what: "compression pool shut down".into(),
            })?,
        }
        .map_err(|e| Error::invalid(format!("compress chunk: {e}")))?;
        let (key, stored_len, uploaded, cost) = match prepared {
            Prepared::Reused {
                key,
                stored_len,
                cost,
            } => (key, stored_len, false, cost),
            Prepared::RawInPlace { key, header, cost } => {
                let stored_len = (HEADER_LEN + len) as u64;
                let body = StripeSlice {
                    buffer: buffer.expect("kept for an in-place chunk"),
                    range: offset..offset + len,
                };
                WriteMeter::begin(&meter);
                let put = root
                    .put_frame_parts(&key, header, body, cfg.multipart_threshold, cfg.chunk_bytes)
                    .await;
                WriteMeter::end(&meter, if put.is_ok() { stored_len } else { 0 });
                put?;
                failpoint::chunk_uploaded();
                (key, stored_len, true, cost)
            }
            Prepared::Encoded { key, frame, cost } => {
                let size = frame.capacity() as u64;
                let stored_len = frame.len() as u64;
                let frame = Bytes::from(frame);
                WriteMeter::begin(&meter);
                let put = root
                    .put_object(
                        &key,
                        frame.clone(),
                        cfg.multipart_threshold,
                        cfg.chunk_bytes,
                    )
                    .await;
                WriteMeter::end(&meter, if put.is_ok() { stored_len } else { 0 });
                if !frames.give(frame) {
                    memory.sub(size);
                }
                put?;
                failpoint::chunk_uploaded();
                (key, stored_len, true, cost)
            }
        };
        known
            .lock()
            .expect("known chunks")
            .map
            .insert(key.clone(), (stored_len, seq));
        Ok(ChunkDone {
            reference: ChunkRef {
                key,
                raw_len: len as u64,
                stored_len,
            },
            uploaded,
            cost,
        })
    }
}

/// What the chunks cost, back to the codec policy (its next decisions) and
/// into this save's compression record.
fn observe_costs(
    chunks: &[ChunkDone],
    mut record: CompressionRecord,
    meter: &Mutex<WriteMeter>,
    policy: &Mutex<CodecPolicy>,
) -> CompressionRecord {
    let mut observed = Observation::default();
    for c in chunks {
        let (raw, cost) = (c.reference.raw_len, c.cost);
        if let Some(hash_s) = cost.hash_s {
            observed.hashed.add(raw, hash_s);
        }
        match cost.compressed {
            Some(true) => {
                observed.compressed.add(raw, cost.encode_s);
                observed.compressed_stored_bytes += c.reference.stored_len;
                record.chunks_compressed += 1;
            }
            Some(false) => observed.framed_raw.add(raw, cost.encode_s),
            None => {}
        }
        record.chunks_uploaded += u64::from(c.uploaded);
    }
    observed.written = meter.lock().expect("write meter").throughput();
    policy.lock().expect("codec policy").observe(&observed);
    record
}

/// Writes this rank's part (overwriting an earlier attempt's).
async fn write_part(
    root: &CheckpointRoot,
    part: &PartRecord,
    attempt: &str,
    rank: usize,
    world_size: usize,
) -> Result<()> {
    let key = part_key(part.step, attempt, rank, world_size);
    let json = serde_json::to_vec_pretty(part).expect("part serializes");
    if failpoint::part_write_fails(rank) {
        return Err(Error::Io {
            op: "write part (failpoint part-error)",
            path: root.url_of(&key),
            source: std::io::Error::other("no space left on device"),
        });
    }
    root.put(&key, Bytes::from(json), PutMode::Overwrite)
        .await?;
    Ok(())
}

/// The parent of the next manifest: the last checkpoint this rank committed,
/// else the one `latest` names (a resumed run's first save).
async fn parent_of(
    root: &CheckpointRoot,
    last_committed: &Mutex<Option<String>>,
) -> Result<Option<String>> {
    let last = last_committed.lock().expect("last committed").clone();
    Ok(match last {
        Some(p) => Some(p),
        None => root
            .get_opt(LATEST_KEY)
            .await?
            .and_then(|b| LatestRecord::from_json(&b).ok())
            .map(|l| l.manifest),
    })
}

fn record(
    done: std::result::Result<Result<(usize, ChunkDone)>, tokio::task::JoinError>,
    chunks: &mut [Option<ChunkDone>],
    first_error: &mut Option<Error>,
) {
    match done {
        Ok(Ok((i, c))) => chunks[i] = Some(c),
        Ok(Err(e)) => {
            first_error.get_or_insert(e);
        }
        Err(e) if e.is_cancelled() => {}
        Err(e) => {
            first_error.get_or_insert(Error::Cancelled {
                what: format!("chunk task failed: {e}"),
            });
        }
    }
}

/// Performs the commit machine's actions.
async fn drive_commit(
    root: &CheckpointRoot,
    input: CommitInput,
    own_part: PartRecord,
    peers: &Mutex<PeerNews>,
) -> Result<crate::commit::CommitOutcome> {
    let (step, attempt, world) = (input.step, input.attempt.clone(), input.world_size);
    let (mut commit, mut actions) = Commit::new(input, own_part, Instant::now());
    let mut latest: Option<crate::store::Versioned> = None;
    loop {
        let mut events = Vec::new();
        for action in actions.drain(..) {
            match action {
                Action::ReadParts(ranks) => {
                    let reads = ranks.into_iter().map(|r| {
                        let key = part_key(step, &attempt, r, world);
                        async move {
                            let part = match root.get_opt(&key).await? {
                                Some(b) => Some(PartRecord::from_json(&key, &b)?),
                                None => None,
                            };
                            Ok::<_, Error>(Event::PartRead { rank: r, part })
                        }
                    });
                    events.extend(futures::future::try_join_all(reads).await?);
                }
                Action::WaitUntil(t) => {
                    tokio::time::sleep_until(t.into()).await;
                    events.push(Event::Tick);
                }
                Action::WriteManifest(m) => {
                    let json = Bytes::from(m.to_json());
                    let event = match root.put(&m.key, json.clone(), PutMode::Create).await {
                        Ok(()) => Event::ManifestWritten,
                        Err(Error::AlreadyExists { .. }) => {
                            // Ours from a retried request, or another writer's.
                            if root.get(&m.key).await? == json {
                                Event::ManifestWritten
                            } else {
                                Event::ManifestConflict
                            }
                        }
                        Err(e) => return Err(e),
                    };
                    failpoint::hit("after-manifest");
                    events.push(event);
                }
                Action::ReadLatest => {
                    latest = root.read_versioned(LATEST_KEY).await?;
                    let record = match &latest {
                        None => None,
                        Some(v) => match LatestRecord::from_json(&v.value) {
                            Ok(r) => Some(r),
                            Err(e) => {
                                // An unreadable `latest` is replaced rather
                                // than blocking every future commit.
                                tracing::error!(error = %e, "latest is unreadable; replacing it");
                                None
                            }
                        },
                    };
                    events.push(Event::LatestRead(record));
                }
                Action::SwapLatest(record) => {
                    let json = Bytes::from(serde_json::to_vec_pretty(&record).expect("serializes"));
                    let swapped = root
                        .compare_and_swap(LATEST_KEY, latest.as_ref(), json)
                        .await?;
                    events.push(Event::LatestSwapped(swapped));
                }
                Action::Done(outcome) => return Ok(*outcome),
                Action::Fail(e) => return Err(e),
            }
        }
        if events.is_empty() {
            return Err(Error::invalid("commit protocol stalled"));
        }
        // What the other ranks said since: it goes in first, so the events
        // above act on it.
        {
            let news = peers.lock().expect("peer news");
            if let Some((rank, cause)) = news.failed.get(&step) {
                events.insert(
                    0,
                    Event::PeerFailed {
                        rank: *rank,
                        cause: cause.clone(),
                    },
                );
            }
            if let Some(until) = news.settled_until {
                events.insert(0, Event::PeersSettled { until });
            }
        }
        let now = Instant::now();
        for e in events {
            actions.extend(commit.on_event(e, now));
        }
    }
}

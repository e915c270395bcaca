//! The save pipeline: [`Checkpointer`].
//!
//! `prepare` (once, before training) makes the reusable host buffer resident
//! and probes the machine for the codec policy ([`crate::compression`]).
//! `save` asks the policy how to save, copies this rank's stripe into the
//! buffer (hashing each chunk on the way when the machine is too busy to do
//! it in the background) and returns. In the background, on the
//! process-wide I/O runtime, each chunk of the stripe takes an upload permit
//! (at most `upload_concurrency` chunks are between "start hashing" and
//! "upload finished"), is hashed unless the copy did, looked up in the set
//! of chunks already stored, and otherwise framed on the checkpointer's own
//! CPU pool (byte-grouped and compressed, or raw), then uploaded; on a local
//! root a raw chunk is written from the buffer itself. The pool runs at idle
//! priority when asked (`low_priority`). When every chunk is durable the
//! rank writes its part; rank 0 then runs the commit protocol
//! ([`crate::commit`]) and moves `latest`. What each save measured goes back
//! to the policy.
//!
//! Peak extra host memory: the stripe buffer (this rank's share of the state)
//! + at most `upload_concurrency` encoded frames (each ≤ chunk_bytes + 32 +
//!   zstd's bound slack; kept from one chunk and save to the next, so their
//!   pages are faulted in once) + one grouping scratch of chunk_bytes per CPU
//!   thread + on a local root one aligned direct-write buffer per writing
//!   thread (at most `upload_concurrency`): ≤ stripe + upload_concurrency × 3
//!   × chunk_bytes when threads ≤ upload_concurrency.
//!   [`Checkpointer::memory_stats`] measures it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::codec::HEADER_LEN;
use crate::compression::{CodecPolicy, Compression, CompressionRecord, Estimates, Observation};
use crate::error::{Error, Result};
use crate::manifest::{CheckpointMeta, Manifest, validate_attempt};
use crate::measure::{IdleClock, probe_cpu, probe_write};
use crate::plan::ChunkPlan;
use crate::pool::CpuPool;
use crate::store::{CheckpointRoot, io_runtime};
use crate::stripe::{StripeBuffer, capacity_for, chunk_offsets, copy_parallel, resident_zeroed};
use crate::tensor::TensorView;
use crate::upload::{FramePool, KnownChunks, MemoryCounter, PeerNews, SaveJob};

/// Chunks at least this large are laid out in the stripe buffer for direct
/// writes from it (see [`crate::stripe::chunk_offsets`]).
const IN_PLACE_MIN_CHUNK: usize = 256 << 10;

/// How a [`Checkpointer`] saves.
#[derive(Clone, Debug)]
pub struct SaveConfig {
    /// zstd level of the chunks that are not byte-grouped (default 1, the
    /// job spec's `checkpoint.compression_level` default).
    pub compression_level: i32,
    /// Largest piece of a tensor stored as one chunk (default 8 MiB).
    pub chunk_bytes: usize,
    /// Chunks being compressed or uploaded at once (default 8).
    pub upload_concurrency: usize,
    /// Objects above this many bytes go up as multipart uploads (default 16 MiB).
    pub multipart_threshold: usize,
    /// How long the committer waits for the other ranks' parts (default 10 min).
    pub commit_timeout: Duration,
    /// Compression threads (default 2).
    pub threads: usize,
    /// Whether chunks are compressed: per save by measurement (`Auto`, the
    /// default), always, or never. See [`crate::compression`].
    pub compression: Compression,
    /// Run hashing and compression at the lowest CPU priority (`SCHED_IDLE`
    /// on Linux), on cores the caller leaves idle, so that a save slows the
    /// training step as little as it can. While the caller waits for a save
    /// (the next `save` needs the stripe buffer back, `flush`),
    /// normal-priority helper threads take over. Default off; the trainer
    /// turns it on.
    pub low_priority: bool,
}

impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig {
            compression_level: 1,
            chunk_bytes: 8 << 20,
            upload_concurrency: 8,
            multipart_threshold: 16 << 20,
            commit_timeout: Duration::from_secs(600),
            threads: 2,
            compression: Compression::Auto,
            low_priority: false,
        }
    }
}

/// What one background save did.
#[derive(Clone, Debug)]
pub struct SaveOutcome {
    /// The step saved.
    pub step: u64,
    /// The manifest URL, on the committer (rank 0); `None` on other ranks.
    pub url: Option<String>,
    /// Stored bytes uploaded: this rank's, or on the committer the whole
    /// checkpoint's (from every rank's part).
    pub bytes_uploaded: u64,
    /// Stored bytes referenced without uploading (already stored); counted
    /// like `bytes_uploaded`.
    pub bytes_reused: u64,
    /// Chunks uploaded, counted like `bytes_uploaded`.
    pub chunks_uploaded: usize,
    /// Chunks already stored, counted like `bytes_uploaded`.
    pub chunks_reused: usize,
    /// Time `save` blocked the caller.
    pub blocking: Duration,
    /// From the call to `save` until this rank's part (or, on the committer,
    /// the commit) was durable.
    pub durable_after: Duration,
    /// The rank that saved.
    pub rank: usize,
    /// On the committer: whether `latest` now names this checkpoint (false
    /// when it already named a newer step). Always false on other ranks.
    pub latest_moved: bool,
    /// This rank's codec choice and what it rested on (boxed: it is most
    /// of the outcome's size).
    pub compression: Box<CompressionRecord>,
}

/// Host memory the pipeline used, measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryStats {
    /// Capacity of the reusable stripe buffer.
    pub stripe_buffer_bytes: u64,
    /// Peak bytes of encoded frames held at once (being uploaded or kept for
    /// reuse), plus the CPU threads' grouping scratch.
    pub peak_pipeline_bytes: u64,
    /// The stated bound: stripe + upload_concurrency × 3 × chunk_bytes.
    pub bound_bytes: u64,
}

/// Per-rank, long-lived saver. See the module docs.
pub struct Checkpointer {
    root: CheckpointRoot,
    cfg: SaveConfig,
    rank: usize,
    world_size: usize,
    pool: Arc<CpuPool>,
    stripe: Option<Vec<u8>>,
    stripe_home: mpsc::Sender<Vec<u8>>,
    stripe_returned: mpsc::Receiver<Vec<u8>>,
    outcomes_tx: mpsc::Sender<Result<SaveOutcome>>,
    outcomes_rx: mpsc::Receiver<Result<SaveOutcome>>,
    in_flight: usize,
    known: Arc<Mutex<KnownChunks>>,
    seq: u64,
    /// Resolves when the previous save's commit finished, so commits happen
    /// in save order.
    previous_commit: Option<oneshot::Receiver<()>>,
    /// Manifest key of the last commit (or of `set_parent`): the next
    /// manifest's parent.
    last_committed: Arc<Mutex<Option<String>>>,
    memory: Arc<MemoryCounter>,
    frames: Arc<FramePool>,
    /// Capacity of the stripe buffer at the last save (it may be away).
    stripe_capacity: u64,
    /// Whether the next save compresses; fed by every save's measurements.
    policy: Arc<Mutex<CodecPolicy>>,
    idle: Arc<IdleClock>,
    /// What the other ranks said about their saves; read by this rank's commits.
    peers: Arc<Mutex<PeerNews>>,
    /// Steps whose save failed here, with the cause, not yet taken by
    /// [`Checkpointer::take_failed_steps`] (for the other ranks to hear).
    failed_steps: Arc<Mutex<Vec<(u64, String)>>>,
}

impl Checkpointer {
    /// The saver of `rank` of `world_size` under `root`. It starts its CPU
    /// threads, and takes over the codec estimates an earlier checkpointer of
    /// this process measured for the same root. [`Error::Invalid`] for a rank
    /// outside the world, or sizes in `cfg` too small to work with.
    pub fn new(
        root: CheckpointRoot,
        cfg: SaveConfig,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::invalid(format!(
                "rank {rank} of world size {world_size}"
            )));
        }
        if cfg.chunk_bytes < 8 || cfg.upload_concurrency == 0 || cfg.threads == 0 {
            return Err(Error::invalid(format!(
                "save config needs chunk_bytes >= 8, upload_concurrency >= 1, threads >= 1: {cfg:?}"
            )));
        }
        let (stripe_home, stripe_returned) = mpsc::channel();
        let (outcomes_tx, outcomes_rx) = mpsc::channel();
        Ok(Checkpointer {
            pool: Arc::new(CpuPool::new(cfg.threads, rank, cfg.low_priority)?),
            policy: Arc::new(Mutex::new(
                CodecPolicy::new(cfg.compression, rank).with_estimates(carried_estimates(&root)),
            )),
            idle: Default::default(),
            peers: Default::default(),
            failed_steps: Default::default(),
            root,
            cfg,
            rank,
            world_size,
            stripe: Some(Vec::new()),
            stripe_home,
            stripe_returned,
            outcomes_tx,
            outcomes_rx,
            in_flight: 0,
            known: Default::default(),
            seq: 0,
            previous_commit: None,
            last_committed: Default::default(),
            memory: Default::default(),
            frames: Default::default(),
            stripe_capacity: 0,
        })
    }

    /// Where it saves.
    pub fn root(&self) -> &CheckpointRoot {
        &self.root
    }

    /// Makes the first save of `tensors` cost what later ones do: sizes this
    /// rank's stripe buffer for them and faults its pages in now, before
    /// training, on `threads` threads. Without it the first save's copy
    /// page-faults a fresh buffer of the stripe's size (measured through
    /// `kiln run` on a 1.2 GB state: 368 ms against 89 ms for later saves).
    /// Only the tensors' names, dtypes and shapes matter; a later save of a
    /// larger state grows the buffer again.
    ///
    /// With `compression = Auto` it also measures, for the first save's
    /// codec choice, this machine's hashing and compression speed (one
    /// synthetic chunk) and, in the background, the destination's write
    /// throughput (`upload_concurrency` chunk-sized objects, at least 1 MiB
    /// each, written at once under `chunks/probe/`, then deleted), unless an
    /// earlier checkpointer of this process measured this destination (an
    /// elastic job's next round: its measurements carry over). From here on
    /// the idle CPU between saves is measured: what training leaves to a save.
    pub fn prepare(&mut self, tensors: &[TensorView<'_>]) -> Result<()> {
        let plan = ChunkPlan::new(tensors, self.cfg.chunk_bytes)?;
        let stripe = plan.stripe(self.rank, self.world_size);
        let lens: Vec<usize> = plan.chunks[stripe].iter().map(|c| c.len).collect();
        let needed = capacity_for(&lens, self.in_place());
        let buffer = self.take_stripe_buffer();
        let buffer = if buffer.capacity() < needed {
            drop(buffer);
            resident_zeroed(needed, self.cfg.threads)
        } else {
            buffer
        };
        self.stripe_capacity = buffer.capacity() as u64;
        self.stripe = Some(buffer);
        let measured = self.codec_estimates();
        if self.cfg.compression == Compression::Auto && measured.hash_per_core.is_none() {
            let probe = probe_cpu(
                self.cfg.chunk_bytes.min(8 << 20),
                self.cfg.compression_level,
            );
            self.policy.lock().expect("codec policy").observe(&probe);
        }
        if self.cfg.compression == Compression::Auto && measured.write.is_none() {
            let (root, policy) = (self.root.clone(), self.policy.clone());
            // At least 1 MiB an object: smaller writes measure latency.
            let (bytes, n) = (
                self.cfg.chunk_bytes.max(1 << 20),
                self.cfg.upload_concurrency,
            );
            io_runtime().spawn(async move {
                match probe_write(&root, bytes, n).await {
                    Ok(written) => policy.lock().expect("codec policy").observe(&Observation {
                        written,
                        ..Observation::default()
                    }),
                    Err(e) => tracing::warn!(error = %e, "checkpoint write probe failed"),
                }
            });
        }
        self.idle.mark();
        Ok(())
    }

    /// Whether raw chunks are written straight from the stripe buffer: on a
    /// local root (direct I/O), with chunks large enough that a block of
    /// padding per chunk is nothing.
    fn in_place(&self) -> bool {
        cfg!(target_os = "linux")
            && self.root.local_dir().is_some()
            && self.cfg.chunk_bytes >= IN_PLACE_MIN_CHUNK
    }

    /// The stripe buffer, waiting (with the pool boosted) while the previous
    /// save still reads it.
    fn take_stripe_buffer(&mut self) -> Vec<u8> {
        if let Some(b) = self.stripe.take() {
            return b;
        }
        self.pool.boost(true);
        let b = self
            .stripe_returned
            .recv()
            .expect("the checkpointer holds a sender");
        self.pool.boost(false);
        b
    }

    /// Saves in the background after copying this rank's stripe; see the
    /// crate docs for the protocol.
    pub fn save(
        &mut self,
        step: u64,
        attempt: &str,
        tensors: &[TensorView<'_>],
        meta: &CheckpointMeta,
    ) -> Result<()> {
        let started = Instant::now();
        validate_attempt(attempt)?;
        let plan = Arc::new(ChunkPlan::new(tensors, self.cfg.chunk_bytes)?);
        let stripe = plan.stripe(self.rank, self.world_size);
        let by_name: HashMap<&str, &TensorView<'_>> = tensors.iter().map(|t| (t.name, t)).collect();

        // The only wait of a save: the previous save still compressing from
        // the one stripe buffer.
        let mut buffer = self.take_stripe_buffer();
        let sources: Vec<&[u8]> = plan.chunks[stripe.clone()]
            .iter()
            .map(|c| {
                let t = by_name[plan.tensors[c.tensor].name.as_str()];
                &t.data[c.offset..c.offset + c.len]
            })
            .collect();
        let lens: Vec<usize> = sources.iter().map(|s| s.len()).collect();
        let stripe_len: usize = lens.iter().sum();
        let in_place = self.in_place();
        let needed = capacity_for(&lens, in_place);
        if buffer.capacity() < needed {
            // A fresh zeroed allocation is lazily mapped: its pages are
            // first touched by the parallel copy below, not by a serial fill.
            // (`prepare` faults them in before training instead.)
            buffer = vec![0; needed];
        } else {
            // Keeps the capacity (and the address) across saves.
            buffer.resize(needed, 0);
        }
        let spare_cores = self.idle.save_starts();
        let decision = {
            let mut policy = self.policy.lock().expect("codec policy");
            policy.observe(&Observation {
                spare_cores,
                ..Observation::default()
            });
            policy.decide(stripe_len as u64, self.cfg.threads)
        };
        let offsets = chunk_offsets(&lens, buffer.as_ptr() as usize, in_place, HEADER_LEN);
        let digests = copy_parallel(
            &sources,
            &offsets,
            &mut buffer,
            self.cfg.threads,
            decision.digest_while_copying,
        );
        self.stripe_capacity = buffer.capacity() as u64;
        let buffer = Arc::new(StripeBuffer {
            data: buffer,
            home: self.stripe_home.clone(),
        });
        let blocking = started.elapsed();
        self.seq += 1;
        let (commit_done, next_commit) = oneshot::channel();
        let job = SaveJob {
            seq: self.seq,
            step,
            attempt: attempt.to_string(),
            rank: self.rank,
            world_size: self.world_size,
            plan,
            stripe,
            offsets,
            in_place,
            digests,
            buffer,
            meta: meta.clone(),
            cfg: self.cfg.clone(),
            root: self.root.clone(),
            pool: self.pool.clone(),
            known: self.known.clone(),
            memory: self.memory.clone(),
            frames: self.frames.clone(),
            started,
            blocking,
            last_committed: self.last_committed.clone(),
            decision,
            policy: self.policy.clone(),
            idle: self.idle.clone(),
            peers: self.peers.clone(),
        };
        let runtime = io_runtime();
        let previous = self.previous_commit.replace(next_commit);
        let task = runtime.spawn(job.run(previous, commit_done));
        let tx = self.outcomes_tx.clone();
        let failed_steps = self.failed_steps.clone();
        runtime.spawn(async move {
            let outcome = match task.await {
                Ok(r) => r,
                Err(e) => Err(Error::Cancelled {
                    what: format!("save of step {step}: background task failed: {e}"),
                }),
            };
            if let Err(e) = &outcome {
                // Before the outcome is sent: once `flush` returned, every
                // failure is here.
                failed_steps
                    .lock()
                    .expect("failed steps")
                    .push((step, e.to_string()));
            }
            let _ = tx.send(outcome);
        });
        self.in_flight += 1;
        Ok(())
    }

    /// Outcomes of background saves finished since the last call. Never blocks.
    pub fn poll(&mut self) -> Vec<Result<SaveOutcome>> {
        let mut out = Vec::new();
        while let Ok(r) = self.outcomes_rx.try_recv() {
            self.in_flight -= 1;
            out.push(r);
        }
        if !out.is_empty() {
            self.carry_estimates();
        }
        out
    }

    /// Leaves what the codec policy measured for the next checkpointer of
    /// this location (see [`carried`]): after every save, since a broken
    /// elastic round's checkpointer is dropped late, on a thread of its own.
    fn carry_estimates(&self) {
        let measured = self.codec_estimates();
        carried()
            .lock()
            .expect("carried estimates")
            .insert(self.root.url().to_string(), measured);
    }

    /// Waits for every in-flight save; returns their outcomes. The caller
    /// waits, so the pool's normal-priority helpers join in meanwhile.
    pub fn flush(&mut self) -> Vec<Result<SaveOutcome>> {
        let mut out = self.poll();
        if self.in_flight > 0 {
            self.pool.boost(true);
        }
        while self.in_flight > 0 {
            match self.outcomes_rx.recv() {
                Ok(r) => {
                    self.in_flight -= 1;
                    out.push(r);
                }
                Err(_) => break,
            }
        }
        self.pool.boost(false);
        self.carry_estimates();
        out
    }

    /// Steps whose save failed on this rank since the last call, with the
    /// cause: what the other ranks need to hear (see
    /// [`Checkpointer::peer_failed`]).
    pub fn take_failed_steps(&self) -> Vec<(u64, String)> {
        std::mem::take(&mut *self.failed_steps.lock().expect("failed steps"))
    }

    /// Another rank's save of `step` failed: a commit of that step here
    /// fails at once with `cause` instead of waiting for the rank's part.
    pub fn peer_failed(&self, step: u64, rank: usize, cause: &str) {
        self.peers
            .lock()
            .expect("peer news")
            .failed
            .entry(step)
            .or_insert_with(|| (rank, cause.to_string()));
    }

    /// Every other rank's saves are over (each part written, or its failure
    /// told through [`Checkpointer::peer_failed`]): commits here wait for a
    /// part still missing at most `grace` longer (a store that shows a write
    /// a little late), then fail saying the location does not look shared.
    pub fn peers_settled(&self, grace: Duration) {
        let until = Instant::now() + grace;
        let mut news = self.peers.lock().expect("peer news");
        news.settled_until = Some(news.settled_until.map_or(until, |u| u.min(until)));
    }

    /// Saves in flight (submitted, outcome not yet taken by poll/flush).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Seeds the set of stored chunks from a loaded manifest (at resume) and
    /// makes it the next manifest's parent.
    pub fn set_parent(&mut self, manifest: &Manifest) {
        let mut known = self.known.lock().expect("known chunks");
        for t in &manifest.tensors {
            for c in &t.chunks {
                known
                    .map
                    .insert(c.key.clone(), (c.stored_len, self.seq + 1));
            }
        }
        *self.last_committed.lock().expect("last committed") = Some(manifest.key.clone());
    }

    /// What the codec policy has measured so far (see [`crate::compression`]).
    pub fn codec_estimates(&self) -> crate::compression::Estimates {
        self.policy
            .lock()
            .expect("codec policy")
            .estimates()
            .clone()
    }

    /// Memory the pipeline used so far (see the module docs for the bound).
    pub fn memory_stats(&self) -> MemoryStats {
        let chunk = self.cfg.chunk_bytes as u64;
        let stripe = self.stripe_capacity;
        MemoryStats {
            stripe_buffer_bytes: stripe,
            peak_pipeline_bytes: self.memory.peak.load(Ordering::SeqCst)
                + self.cfg.threads as u64 * chunk * if self.pool.helpers_ran() { 2 } else { 1 }
                + match self.root.local_dir() {
                    Some(_) => direct_buffer_bytes(),
                    None => 0,
                },
            bound_bytes: stripe + self.cfg.upload_concurrency as u64 * 3 * chunk,
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Saves in flight finish (or fail) before the pool goes away; their
        // outcomes are handled here since nobody else will see them.
        for r in self.flush() {
            if let Err(e) = r {
                tracing::error!(rank = self.rank, error = %e, "checkpoint save failed at shutdown");
            }
        }
    }
}

/// What the codec policies of this process measured, by checkpoint location,
/// for the next checkpointer of the same location: an elastic job's worker
/// starts one per round, and each would otherwise probe the machine and the
/// destination again and choose its first save on a probe alone.
fn carried() -> &'static Mutex<HashMap<String, Estimates>> {
    static CARRIED: OnceLock<Mutex<HashMap<String, Estimates>>> = OnceLock::new();
    CARRIED.get_or_init(Default::default)
}

fn carried_estimates(root: &CheckpointRoot) -> Estimates {
    carried()
        .lock()
        .expect("carried estimates")
        .get(root.url())
        .cloned()
        .unwrap_or_default()
}

/// The process's direct-write buffers (local roots; see `crate::direct`;
/// shared by every checkpointer of the process, so an over-estimate when
/// several save at once).
fn direct_buffer_bytes() -> u64 {
    #[cfg(target_os = "linux")]
    return crate::direct::buffer_bytes();
    #[cfg(not(target_os = "linux"))]
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::Throughput;
    use crate::tensor::DType;

    /// A checkpointer whose policy believes the machine is busy training
    /// next to a fast disk, so that saves hash while copying.
    fn starved(root: &CheckpointRoot) -> Checkpointer {
        let cfg = SaveConfig {
            chunk_bytes: 1 << 20,
            compression: Compression::None,
            ..SaveConfig::default()
        };
        let c = Checkpointer::new(root.clone(), cfg, 0, 1).unwrap();
        c.policy.lock().unwrap().observe(&Observation {
            spare_cores: Some(0.01),
            written: Throughput {
                bytes: 1 << 30,
                seconds: 1.0,
            },
            ..Observation::default()
        });
        c
    }

    #[test]
    fn the_codec_policy_carries_its_measurements_to_the_next_checkpointer_of_a_root() {
        // An elastic job's worker makes a checkpointer per round; the second
        // must not start blind (or probe the destination again).
        let root = CheckpointRoot::open("memory://carried-estimates/ckpt").unwrap();
        let cfg = SaveConfig {
            chunk_bytes: 1 << 20,
            compression: Compression::Auto,
            ..SaveConfig::default()
        };
        let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
        let shape = [data.len() / 4];
        let view = TensorView {
            name: "model/w",
            dtype: DType::F32,
            shape: &shape,
            data: &data,
        };
        let meta = CheckpointMeta::for_tests();
        let mut first = Checkpointer::new(root.clone(), cfg.clone(), 0, 1).unwrap();
        assert_eq!(first.codec_estimates(), Estimates::default());
        first.prepare(&[view]).unwrap();
        first.save(1, "r1", &[view], &meta).unwrap();
        for outcome in first.flush() {
            outcome.unwrap();
        }
        let measured = first.codec_estimates();
        assert!(
            measured.hash_per_core.is_some() && measured.write.is_some(),
            "{measured:?}"
        );
        drop(first);

        let second = Checkpointer::new(root.clone(), cfg.clone(), 0, 2).unwrap();
        assert_eq!(second.codec_estimates(), measured);
        let elsewhere = CheckpointRoot::open("memory://carried-estimates-other/ckpt").unwrap();
        let other = Checkpointer::new(elsewhere, cfg, 0, 1).unwrap();
        assert_eq!(
            other.codec_estimates(),
            Estimates::default(),
            "measurements belong to their destination"
        );
    }

    #[test]
    fn chunks_hashed_while_copying_store_and_load_like_any_other() {
        let data: Vec<Vec<u8>> = [(3 << 20) + 12, 4096, 8]
            .iter()
            .enumerate()
            .map(|(t, &n)| (0..n).map(|i| ((i * 31 + t * 7) % 251) as u8).collect())
            .collect();
        let shapes: Vec<[usize; 1]> = data.iter().map(|d| [d.len() / 4]).collect();
        let names = ["a", "b", "c"];
        let views: Vec<TensorView<'_>> = data
            .iter()
            .zip(&shapes)
            .zip(names)
            .map(|((d, shape), name)| TensorView {
                name,
                dtype: DType::F32,
                shape,
                data: d,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        // A local root (raw chunks written from the buffer) and a store.
        for root in [
            CheckpointRoot::open(dir.path().to_str().unwrap()).unwrap(),
            CheckpointRoot::open("memory://hashed-while-copying/x").unwrap(),
        ] {
            let mut c = starved(&root);
            c.save(1, "run", &views, &CheckpointMeta::default())
                .unwrap();
            let outcome = c.flush().pop().unwrap().unwrap();
            assert!(
                outcome.compression.hashed_while_copying,
                "{:?}",
                outcome.compression
            );
            let m = crate::resolve(&root, "1").unwrap();
            let loaded = crate::load(&root, &m, |_| true).unwrap();
            for (got, want) in loaded.iter().zip(&data) {
                assert!(got.data == *want, "{} on {}", got.name, root.url());
            }
            assert!(crate::verify(&root, &m).unwrap().ok());
            // Unchanged, the next save references every chunk.
            c.save(2, "run", &views, &CheckpointMeta::default())
                .unwrap();
            let again = c.flush().pop().unwrap().unwrap();
            assert_eq!(again.chunks_uploaded, 0, "{again:?}");
        }
    }
}

//! The kiln half of the checkpoint side-by-side (bench/ckpt.py runs it next
//! to `torch.save` and PyTorch Distributed Checkpoint on the same state and
//! prints the table; bench/ckpt_peer.py is the PyTorch half).
//!
//! `ckpt_bench save --state S --root R` reads the safetensors file S into
//! memory (the training state, held before any timing starts), then saves it
//! twice with one in-process [`Checkpointer`] at world size 1 to the local
//! root R:
//!
//! 1. a warm-up save (step 1) of the state with the lowest bit of every
//!    element flipped, so that it shares no chunk with the measured save
//!    (kiln stores a chunk whose content is already stored only once) while
//!    still allocating the reusable stripe buffer, as every save after a
//!    trainer's first does. The bits are flipped back before step 2;
//! 2. the measured save (step 2) of the exact bytes of S.
//!
//! Stall is the wall time of the `save` call; time to durable runs from that
//! call until `flush` returns the outcome (the engine's `durable_after`:
//! chunks, part, manifest and `latest` written and synced: the engine writes
//! chunks itself with `O_DIRECT`, `fdatasync`s each before renaming it into
//! place and syncs its directory, and writes the rest through `object_store`'s
//! `LocalFileSystem::with_fsync(true)`, which does the same). As a
//! check, the pages of R's files still dirty or under writeback right after
//! that are counted with cachestat(2) (`unsynced_pages_after_durable`, 0 when
//! the engine's durability is real).
//! Peak extra memory is the process's RSS high-water mark (VmHWM, reset
//! through /proc/self/clear_refs) over both saves, minus RSS before the first.
//!
//! `ckpt_bench load --root R --state S` allocates, untimed, a zero-filled
//! resident buffer per tensor of S (names, dtypes and shapes from its header,
//! as the DCP side preallocates its state), times `resolve(latest)` +
//! `load_into` those buffers (every chunk fetched, checksummed and decoded in
//! place), then, untimed, checks the loaded bytes against S unless
//! `--no-verify`.
//!
//! Each prints one JSON line on stdout. A benchmark, not a test: it reports
//! timings and never judges them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use kiln_checkpoint::{
    CheckpointMeta, CheckpointRoot, Checkpointer, DType, LoadTarget, SaveConfig, TensorView,
    load_into, resolve,
};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "kiln checkpoint save/load timings on a safetensors state (world size 1)")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Save the state twice (warm-up, measured) and report the measured save.
    Save {
        /// The state: a safetensors file, read into memory before timing.
        #[arg(long)]
        state: PathBuf,
        /// The checkpoint root, a local directory (created; should be empty).
        #[arg(long)]
        root: PathBuf,
        /// Compression threads; default: every core, as `kiln run` gives a
        /// single worker per node.
        #[arg(long)]
        threads: Option<usize>,
        /// zstd level; default 1, the job spec's `[checkpoint] compression_level`
        /// default.
        #[arg(long, default_value_t = 1)]
        level: i32,
        /// Chunks compressed or uploaded at once; default: the engine's.
        #[arg(long)]
        upload_concurrency: Option<usize>,
        /// Skip the warm-up save: the measured save allocates the stripe buffer.
        #[arg(long)]
        no_warmup: bool,
    },
    /// Load the latest checkpoint under the root and report the time.
    Load {
        #[arg(long)]
        root: PathBuf,
        /// The saved state (safetensors): its header gives the buffers to
        /// load into; its bytes check the loaded ones (untimed).
        #[arg(long)]
        state: PathBuf,
        /// Skip the check against the state's bytes.
        #[arg(long)]
        no_verify: bool,
    },
}

fn main() {
    if let Err(err) = run(Args::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Save {
            state,
            root,
            threads,
            level,
            upload_concurrency,
            no_warmup,
        } => save(
            &state,
            &root,
            threads,
            level,
            upload_concurrency,
            !no_warmup,
        ),
        Command::Load {
            root,
            state,
            no_verify,
        } => load_latest(&root, &state, !no_verify),
    }
}

/// A safetensors file held in memory, with where each tensor lies in it.
struct State {
    bytes: Vec<u8>,
    tensors: Vec<TensorPlace>,
}

struct TensorPlace {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

impl State {
    fn read(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("read state {}", path.display()))?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("parse safetensors header of {}", path.display()))?;
        let data_start = 8 + header_len;
        let mut tensors = Vec::new();
        for (name, info) in metadata.tensors() {
            let dtype = dtype_of(info.dtype)
                .with_context(|| format!("read tensor {name} of {}", path.display()))?;
            let (a, b) = info.data_offsets;
            tensors.push(TensorPlace {
                name,
                dtype,
                shape: info.shape.clone(),
                range: data_start + a..data_start + b,
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(State { bytes, tensors })
    }

    fn views(&self) -> Vec<TensorView<'_>> {
        self.tensors
            .iter()
            .map(|t| TensorView {
                name: &t.name,
                dtype: t.dtype,
                shape: &t.shape,
                data: &self.bytes[t.range.clone()],
            })
            .collect()
    }

    fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.range.len() as u64).sum()
    }

    /// Flips the lowest bit of every element (little-endian: its first
    /// byte); calling it twice restores the state.
    fn flip_lowest_bits(&mut self) {
        for t in &self.tensors {
            let step = t.dtype.size();
            for byte in self.bytes[t.range.clone()].iter_mut().step_by(step) {
                *byte ^= 1;
            }
        }
    }
}

fn dtype_of(d: safetensors::Dtype) -> Result<DType> {
    DType::from_safetensors(d)
        .with_context(|| format!("dtype {d:?} is not supported by kiln checkpoints"))
}

/// A field of /proc/self/status in bytes (`VmRSS`, `VmHWM`).
fn proc_status_bytes(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parse {field} in /proc/self/status"))?;
            return Ok(kib * 1024);
        }
    }
    bail!("no {field} in /proc/self/status")
}

/// Resets VmHWM to the current RSS; false where the kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn save(
    state_path: &Path,
    root_dir: &Path,
    threads: Option<usize>,
    level: i32,
    upload_concurrency: Option<usize>,
    warmup: bool,
) -> Result<()> {
    let mut state = State::read(state_path)?;
    let root_dir =
        std::path::absolute(root_dir).with_context(|| format!("resolve {}", root_dir.display()))?;
    let root = CheckpointRoot::open(&format!("file://{}", root_dir.display()))
        .context("open checkpoint root")?;
    // What `kiln run` uses with the spec's defaults at one worker per node
    // (8 MiB chunks, zstd level 1, every core), unless told otherwise.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let defaults = SaveConfig::default();
    let cfg = SaveConfig {
        compression_level: level,
        threads: threads.unwrap_or(cores),
        upload_concurrency: upload_concurrency.unwrap_or(defaults.upload_concurrency),
        ..defaults
    };
    let (threads, level, upload_concurrency) =
        (cfg.threads, cfg.compression_level, cfg.upload_concurrency);
    let mut checkpointer =
        Checkpointer::new(root.clone(), cfg, 0, 1).context("create checkpointer")?;
    let meta = CheckpointMeta {
        world_size: 1,
        job: "ckpt-bench".into(),
        training_state: json!({ "source": state_path.display().to_string() }),
        ..Default::default()
    };

    let rss_before = proc_status_bytes("VmRSS")?;
    let peak_reset = reset_peak_rss();

    let mut first = None;
    if warmup {
        state.flip_lowest_bits();
        let (stall, durable) =
            timed_save(&mut checkpointer, 1, &state, &meta).context("warm-up save (step 1)")?;
        state.flip_lowest_bits();
        first = Some(json!({ "stall_s": stall, "durable_s": durable }));
    }
    let (stall, durable, outcome) = {
        let started = Instant::now();
        checkpointer
            .save(2, "bench", &state.views(), &meta)
            .context("save step 2")?;
        let stall = started.elapsed().as_secs_f64();
        let outcome = flush_one(&mut checkpointer).context("save step 2")?;
        (stall, started.elapsed().as_secs_f64(), outcome)
    };
    let peak_rss = proc_status_bytes("VmHWM")?;
    let memory = checkpointer.memory_stats();

    // Right after durable_after, before anything else touches the files: any
    // page of them still dirty or under writeback would mean durable_after
    // came before the data was on disk.
    let unsynced_pages = unsynced_pages_under(&root_dir)?;
    let bytes_stored = stored_bytes_of_latest(&root, &root_dir)?;

    println!(
        "{}",
        json!({
            "system": "kiln",
            "state_bytes": state.data_bytes(),
            "tensors": state.tensors.len(),
            "threads": threads,
            "compression_level": level,
            "upload_concurrency": upload_concurrency,
            "stall_s": stall,
            "durable_s": durable,
            "engine_blocking_s": outcome.blocking.as_secs_f64(),
            "engine_durable_after_s": outcome.durable_after.as_secs_f64(),
            "first_save": first,
            "unsynced_pages_after_durable": unsynced_pages,
            "bytes_stored": bytes_stored,
            "bytes_uploaded": outcome.bytes_uploaded,
            "bytes_reused": outcome.bytes_reused,
            "chunks": outcome.chunks_uploaded + outcome.chunks_reused,
            "rss_before": rss_before,
            "peak_rss": peak_rss,
            "peak_extra_bytes": if peak_reset { Some(peak_rss.saturating_sub(rss_before)) } else { None },
            "engine_stripe_buffer_bytes": memory.stripe_buffer_bytes,
            "engine_peak_pipeline_bytes": memory.peak_pipeline_bytes,
            "engine_bound_bytes": memory.bound_bytes,
            "url": outcome.url,
        })
    );
    Ok(())
}

/// One save and its flush: (stall, durable) in seconds.
fn timed_save(
    checkpointer: &mut Checkpointer,
    step: u64,
    state: &State,
    meta: &CheckpointMeta,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    checkpointer.save(step, "bench", &state.views(), meta)?;
    let stall = started.elapsed().as_secs_f64();
    flush_one(checkpointer)?;
    Ok((stall, started.elapsed().as_secs_f64()))
}

fn flush_one(checkpointer: &mut Checkpointer) -> Result<kiln_checkpoint::SaveOutcome> {
    let mut outcomes = checkpointer.flush();
    ensure!(
        outcomes.len() == 1,
        "expected one save outcome, got {}",
        outcomes.len()
    );
    Ok(outcomes.pop().expect("one outcome")?)
}

/// Bytes on disk of the checkpoint `latest` names: its chunk files (each
/// once), manifest, parts and `latest` itself.
fn stored_bytes_of_latest(root: &CheckpointRoot, dir: &Path) -> Result<u64> {
    let manifest = resolve(root, "latest").context("resolve latest")?;
    let mut keys: HashSet<String> = manifest.chunk_keys().map(str::to_string).collect();
    keys.insert(manifest.key.clone());
    keys.insert("latest".into());
    let parts = dir.join(format!("parts/{:020}-{}", manifest.step, manifest.attempt));
    for entry in std::fs::read_dir(&parts).with_context(|| format!("list {}", parts.display()))? {
        let entry = entry.with_context(|| format!("list {}", parts.display()))?;
        let path = entry.path();
        let key = path
            .strip_prefix(dir)
            .expect("listed under the root")
            .to_string_lossy()
            .into_owned();
        keys.insert(key);
    }
    let mut total = 0;
    for key in keys {
        let path = dir.join(&key);
        total += std::fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .len();
    }
    Ok(total)
}

/// Pages of the files under `dir` that the page cache holds dirty or under
/// writeback, counted with cachestat(2) (Linux 6.5+); `None` where the kernel
/// lacks it.
fn unsynced_pages_under(dir: &Path) -> Result<Option<u64>> {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("list {}", d.display()))? {
            let path = entry
                .with_context(|| format!("list {}", d.display()))?
                .path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let file =
                std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            match cachestat(&file) {
                Ok(stat) => total += stat.nr_dirty + stat.nr_writeback,
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("cachestat {}", path.display())),
            }
        }
    }
    Ok(Some(total))
}

/// `struct cachestat_range` of linux/mman.h.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of linux/mman.h (counts in pages).
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)] // the kernel's layout: every field must be there, only two are read
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// cachestat(2) over the whole file (libc has no wrapper yet).
fn cachestat(file: &std::fs::File) -> std::io::Result<Cachestat> {
    use std::os::fd::AsRawFd;
    const SYS_CACHESTAT: libc::c_long = 451; // the same number on every architecture
    let range = CachestatRange { off: 0, len: 0 }; // len 0: to the end of the file
    let mut stat = Cachestat::default();
    // SAFETY: the pointers are to live values of the layouts the kernel
    // expects, the kernel writes only `stat`, and flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(stat)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The tensors of a safetensors file (name, dtype, shape), sorted by name,
/// from its header alone.
fn state_layout(path: &Path) -> Result<Vec<(String, DType, Vec<usize>)>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("parse safetensors header of {}", path.display()))?;
    let mut layout = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype: safetensors::Dtype = serde_json::from_value(info["dtype"].clone())
            .with_context(|| format!("dtype of {name}"))?;
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone())
            .with_context(|| format!("shape of {name}"))?;
        layout.push((name, dtype_of(dtype)?, shape));
    }
    layout.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(layout)
}

fn load_latest(root_dir: &Path, state_path: &Path, verify: bool) -> Result<()> {
    let root_dir =
        std::path::absolute(root_dir).with_context(|| format!("resolve {}", root_dir.display()))?;
    let layout = state_layout(state_path)?;
    // Zero-filled buffers with every page touched (resident, as torch.zeros'
    // are), not calloc's untouched pages.
    let mut buffers: Vec<Vec<u8>> = layout
        .iter()
        .map(|(_, dtype, shape)| {
            let len = shape.iter().product::<usize>() * dtype.size();
            let mut b = vec![0u8; len];
            for page in b.chunks_mut(4096) {
                page[0] = std::hint::black_box(0);
            }
            b
        })
        .collect();
    let rss_before = proc_status_bytes("VmRSS")?;
    let peak_reset = reset_peak_rss();
    let started = Instant::now();
    let root = CheckpointRoot::open(&format!("file://{}", root_dir.display()))
        .context("open checkpoint root")?;
    let manifest = resolve(&root, "latest").context("resolve latest")?;
    let targets = layout
        .iter()
        .zip(buffers.iter_mut())
        .map(|((name, dtype, shape), data)| LoadTarget {
            name,
            dtype: *dtype,
            shape,
            data,
        })
        .collect();
    load_into(&root, &manifest, targets).context("load latest")?;
    let load_s = started.elapsed().as_secs_f64();
    let peak_rss = proc_status_bytes("VmHWM")?;
    let loaded_bytes: u64 = buffers.iter().map(|b| b.len() as u64).sum();
    ensure!(
        manifest.tensors.len() == layout.len(),
        "the checkpoint has {} tensors, the state {}",
        manifest.tensors.len(),
        layout.len()
    );

    let verified = if verify {
        let state = State::read(state_path)?;
        for (want, got) in state.views().iter().zip(&buffers) {
            ensure!(
                want.data == got.as_slice(),
                "loaded tensor {} differs from the state's",
                want.name
            );
        }
        Some(true)
    } else {
        None
    };
    println!(
        "{}",
        json!({
            "system": "kiln",
            "load_s": load_s,
            "loaded_bytes": loaded_bytes,
            "tensors": buffers.len(),
            "load_peak_extra_bytes": if peak_reset { Some(peak_rss.saturating_sub(rss_before)) } else { None },
            "verified": verified,
        })
    );
    Ok(())
}

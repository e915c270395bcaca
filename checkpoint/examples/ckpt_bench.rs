//! Quick figures for the checkpoint engine on this machine: compressed size
//! with and without byte grouping, and save/load throughput on the local
//! filesystem.
//!
//! `cargo run -p kiln-checkpoint --example ckpt_bench [MiB] [DIR]`
//! (default 256 MiB of float32 under the system temporary directory).

use std::time::Instant;

use anyhow::Context;
use kiln_checkpoint::codec::{Encoding, encode_chunk};
use kiln_checkpoint::testdata::Rng;
use kiln_checkpoint::{
    CheckpointMeta, CheckpointRoot, Checkpointer, DType, SaveConfig, TensorView, load, resolve,
    verify,
};

fn f32_bytes(n: usize, seed: u64, f: impl Fn(&mut Rng) -> f32) -> Vec<u8> {
    let mut rng = Rng::from_state(seed | 1);
    (0..n).flat_map(|_| f(&mut rng).to_le_bytes()).collect()
}

fn to_bf16(f32s: &[u8]) -> Vec<u8> {
    f32s.chunks_exact(4)
        .flat_map(|b| {
            let bits = u32::from_le_bytes(b.try_into().expect("4 bytes"));
            (((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16).to_le_bytes()
        })
        .collect()
}

fn compressed(data: &[u8], group: u8, level: i32) -> anyhow::Result<(usize, f64)> {
    let chunk = 8 << 20;
    let start = Instant::now();
    let mut total = 0;
    for piece in data.chunks(chunk) {
        total += encode_chunk(piece, Encoding { group }, level)?.len();
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((total, data.len() as f64 / secs / (1 << 20) as f64))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let base = args
        .get(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);

    println!("## stored/raw size (8 MiB chunks), 64 MiB samples; encode speed on one thread");
    let n = 16 << 20; // elements
    let weights = f32_bytes(n, 7, |r| r.normal(0.02));
    let exp_avg_sq = f32_bytes(n, 8, |r| {
        let g = r.normal(1e-3);
        g * g
    });
    let bf16 = to_bf16(&weights);
    let samples: [(&str, &[u8], DType); 3] = [
        ("f32 weights N(0, 0.02)", &weights, DType::F32),
        ("f32 adam exp_avg_sq", &exp_avg_sq, DType::F32),
        ("bf16 weights N(0, 0.02)", &bf16, DType::BF16),
    ];
    println!("| data | level | zstd only | MiB/s | byte-grouped + zstd | MiB/s |");
    println!("|---|---|---|---|---|---|");
    for (name, data, dtype) in samples {
        for level in [1, 3] {
            let (plain, plain_speed) = compressed(data, 1, level)?;
            let (grouped, speed) = compressed(data, Encoding::for_dtype(dtype).group, level)?;
            println!(
                "| {name} | {level} | {:.3} | {plain_speed:.0} | {:.3} | {speed:.0} |",
                plain as f64 / data.len() as f64,
                grouped as f64 / data.len() as f64
            );
        }
    }

    {
        let mut out = vec![1u8; weights.len()];
        kiln_checkpoint::codec::byte_group(&weights, 4, &mut out);
        let t = Instant::now();
        kiln_checkpoint::codec::byte_group(&weights, 4, &mut out);
        let group = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let a = kiln_checkpoint::codec::address(&weights);
        let sha = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let c = crc32c::crc32c(&weights);
        let crc = t.elapsed().as_secs_f64();
        let mb = weights.len() as f64 / (1 << 20) as f64;
        println!(
            "\nper thread: byte grouping {:.0} MiB/s, sha256 {:.0} MiB/s, crc32c {:.0} MiB/s ({}, {c:x})",
            mb / group,
            mb / sha,
            mb / crc,
            &a[..8]
        );
    }

    println!("\n## save/load {mib} MiB float32 (64 tensors), local filesystem, defaults");
    let dir = tempfile::tempdir_in(&base).context("create temporary directory")?;
    let root = CheckpointRoot::open(dir.path().to_str().context("utf-8 path")?)?;
    let tensors = 64;
    let per = (mib << 20) / tensors / 4;
    let data: Vec<Vec<u8>> = (0..tensors)
        .map(|i| f32_bytes(per, 100 + i as u64, |r| r.normal(0.02)))
        .collect();
    let names: Vec<String> = (0..tensors)
        .map(|i| format!("layer{i:02}.weight"))
        .collect();
    let shape = [per];
    let views: Vec<TensorView<'_>> = (0..tensors)
        .map(|i| TensorView {
            name: &names[i],
            dtype: DType::F32,
            shape: &shape,
            data: &data[i],
        })
        .collect();
    let level: i32 = std::env::var("KILN_BENCH_LEVEL")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(SaveConfig::default().compression_level);
    println!("(zstd level {level})");
    let cfg = SaveConfig {
        compression_level: level,
        ..SaveConfig::default()
    };
    let c_cfg = cfg.clone();
    let mut c = Checkpointer::new(root.clone(), cfg, 0, 1)?;
    for (step, label) in [(1u64, "first save"), (2, "unchanged (all reused)")] {
        let start = Instant::now();
        c.save(step, "bench", &views, &CheckpointMeta::default())?;
        let blocking = start.elapsed();
        let outcome = c.flush().pop().context("one outcome")??;
        println!(
            "{label}: blocking {:.1} ms, durable after {:.0} ms ({:.0} MiB/s), uploaded {:.1} MiB ({:.3} of raw)",
            blocking.as_secs_f64() * 1e3,
            outcome.durable_after.as_secs_f64() * 1e3,
            mib as f64 / outcome.durable_after.as_secs_f64(),
            outcome.bytes_uploaded as f64 / (1 << 20) as f64,
            outcome.bytes_uploaded as f64 / (mib << 20) as f64,
        );
    }
    println!("memory: {:?}", c.memory_stats());
    {
        // The same save into memory: the CPU side alone (no disk, no fsync).
        let mem = CheckpointRoot::open("memory://bench/x")?;
        let mut c = Checkpointer::new(mem, c_cfg.clone(), 0, 1)?;
        c.save(1, "bench", &views, &CheckpointMeta::default())?;
        let outcome = c.flush().pop().context("one outcome")??;
        println!(
            "same save into memory:// (CPU only): durable after {:.0} ms ({:.0} MiB/s)",
            outcome.durable_after.as_secs_f64() * 1e3,
            mib as f64 / outcome.durable_after.as_secs_f64()
        );
    }
    let m = resolve(&root, "latest")?;
    let start = Instant::now();
    let loaded = load(&root, &m, |_| true)?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        loaded.len() == tensors && loaded[5].data == data[5],
        "loaded bytes differ"
    );
    println!(
        "load: {:.0} ms ({:.0} MiB/s)",
        secs * 1e3,
        mib as f64 / secs
    );
    drop(loaded);
    let start = Instant::now();
    let report = verify(&root, &m)?;
    anyhow::ensure!(report.ok(), "verify failed: {:?}", report.bad_chunks);
    println!("verify: {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

//! Single-core throughput of each stage of the chunk pipeline, on float data
//! shaped like trained weights and Adam moments, and what the byte planes'
//! zstd setting buys against plain levels (the figures quoted in `codec.rs`):
//! `cargo run --release -p kiln-checkpoint --example codec_speed [MiB]`.

use std::time::Instant;

use kiln_checkpoint::codec::{
    ChunkHash, Encoding, address, byte_group, byte_ungroup, decode_chunk, encode_chunk,
};
use kiln_checkpoint::tensor::DType;

/// Roughly normal f32 values with standard deviation `scale`.
fn normal_f32(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    kiln_checkpoint::testdata::Rng::from_state(seed | 1).normal_f32(n, scale)
}

/// Runs `f` once to warm up, then `reps` times; prints MB/s of `bytes`.
fn rate(label: &str, bytes: usize, mut f: impl FnMut()) {
    let reps = 8;
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    let mbs = (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e6;
    println!("{label:<36} {mbs:>8.0} MB/s");
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map_or(8, |a| a.parse().expect("MiB"));
    let weights = normal_f32(mib << 18, 0.02, 7);
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let data = [
        ("f32 weights", DType::F32, f32_bytes(&weights)),
        (
            "f32 exp_avg_sq",
            DType::F32,
            f32_bytes(&weights.iter().map(|v| v * v * 1e-3).collect::<Vec<_>>()),
        ),
        (
            "bf16 weights",
            DType::BF16,
            weights
                .iter()
                .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
        ),
    ];
    let raw = &data[0].2;
    let n = raw.len();
    let mut dst = vec![0u8; n];
    rate("sha256 (format 1 addresses)", n, || {
        std::hint::black_box(ChunkHash::Sha256.hex(raw));
    });
    rate("blake3 (format 2 addresses)", n, || {
        std::hint::black_box(ChunkHash::Blake3.hex(raw));
    });
    rate("crc32c", n, || {
        std::hint::black_box(crc32c::crc32c(raw));
    });
    rate("memcpy", n, || dst.copy_from_slice(raw));
    rate("byte_group 4", n, || byte_group(raw, 4, &mut dst));
    let grouped = dst.clone();
    rate("byte_ungroup 4", n, || byte_ungroup(&grouped, 4, &mut dst));
    assert_eq!(&dst, raw);

    for (name, dtype, raw) in &data {
        let n = raw.len();
        let mut dst = vec![0u8; n];
        let enc = Encoding::for_dtype(*dtype);
        let stored = encode_chunk(raw, enc, 1).expect("encode");
        println!("{name}: stored / raw {:.3}", stored.len() as f64 / n as f64);
        rate(&format!("  encode {name}"), n, || {
            std::hint::black_box(encode_chunk(raw, enc, 1).expect("encode"));
        });
        rate(&format!("  decode {name}"), n, || {
            decode_chunk(&stored, &mut dst, None).expect("decode")
        });
        let addr = address(raw);
        rate(&format!("  decode + check address {name}"), n, || {
            decode_chunk(&stored, &mut dst, Some((ChunkHash::CURRENT, &addr))).expect("decode")
        });
    }

    // The sign-and-exponent plane of f32 weights under plain zstd levels and
    // under the planes' setting (fastest search, literals entropy-coded).
    let mut grouped = vec![0u8; n];
    byte_group(raw, 4, &mut grouped);
    let plane = &grouped[3 * n / 4..];
    use zstd::zstd_safe::{CParameter, ParamSwitch};
    for (label, level, force_literals) in [
        ("zstd 1", 1, false),
        ("zstd 3", 3, false),
        ("zstd 9", 9, false),
        ("zstd -1000, literals forced", -1000, true),
    ] {
        let mut c = zstd::bulk::Compressor::new(level).expect("zstd");
        if force_literals {
            c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))
                .expect("zstd parameter");
        }
        let packed = c.compress(plane).expect("compress");
        println!(
            "exponent plane, {label}: stored / raw {:.3}",
            packed.len() as f64 / plane.len() as f64
        );
        rate("  compress", plane.len(), || {
            std::hint::black_box(c.compress(plane).expect("compress"));
        });
        let mut out = vec![0u8; plane.len()];
        rate("  decompress", plane.len(), || {
            zstd::bulk::decompress_to_buffer(&packed, &mut out).expect("decompress");
        });
    }
}

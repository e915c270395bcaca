//! Chunk encoding: byte grouping, zstd, the stored frame and its checks.
//!
//! A stored chunk is a 32-byte header followed by the payload:
//!
//! ```text
//! 0  magic "KLNC"         4  frame version (1)    5  codec (0 raw, 1 zstd)
//! 6  group (element size the bytes were grouped by; 1 = not grouped)
//! 7  reserved (0)         8  raw length (u64 LE)  16 payload length (u64 LE)
//! 24 reserved (0, 4 bytes)                         28 crc32c (u32 LE) of bytes 0..28 and the payload
//! ```
//!
//! The chunk's address is the sha256 of its raw (decoded) bytes; the key also
//! carries the requested grouping, so differently encoded copies of the same
//! bytes never share a key. Decoding checks the crc (the stored bytes), then
//! decodes and checks the sha256 against the address (the meaning).

use std::cell::RefCell;

use sha2::{Digest, Sha256};

use crate::tensor::DType;

pub const CHUNK_MAGIC: [u8; 4] = *b"KLNC";
pub const CHUNK_FRAME_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 32;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// How a chunk's bytes are transformed before zstd: grouped by `group`-byte
/// elements (all byte 0s, then all byte 1s, ...) or not at all (`group == 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub group: u8,
}

impl Encoding {
    /// Floats are byte-grouped by their element size; everything else is not.
    pub fn for_dtype(dtype: DType) -> Self {
        let group = match dtype {
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 => dtype.size() as u8,
            _ => 1,
        };
        Encoding { group }
    }

    /// The key suffix naming the encoding (`bg4.zst`, `zst`, ...).
    pub fn key_suffix(self) -> &'static str {
        match self.group {
            2 => "bg2.zst",
            4 => "bg4.zst",
            8 => "bg8.zst",
            _ => "zst",
        }
    }
}

/// Hex sha256 of `raw`: the chunk's address.
pub fn address(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))
}

/// The object key of a chunk (relative to the checkpoint root).
pub fn chunk_key(address: &str, encoding: Encoding) -> String {
    format!(
        "chunks/{}/{}.{}",
        &address[..2],
        address,
        encoding.key_suffix()
    )
}

/// Splits a chunk key back into (address, encoding); `None` if it is not one.
pub fn parse_chunk_key(key: &str) -> Option<(String, Encoding)> {
    let name = key.rsplit('/').next()?;
    let (address, suffix) = name.split_once('.')?;
    if address.len() != 64 || !address.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let group = match suffix {
        "bg2.zst" => 2,
        "bg4.zst" => 4,
        "bg8.zst" => 8,
        "zst" => 1,
        _ => return None,
    };
    Some((address.to_string(), Encoding { group }))
}

fn group_n<const N: usize>(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / N;
    let mut planes: [&mut [u8]; N] = std::array::from_fn(|_| &mut [][..]);
    let mut rest = &mut dst[..n * N];
    for plane in planes.iter_mut() {
        let (head, tail) = rest.split_at_mut(n);
        *plane = head;
        rest = tail;
    }
    for (i, element) in src.chunks_exact(N).enumerate() {
        for b in 0..N {
            planes[b][i] = element[b];
        }
    }
    dst[n * N..].copy_from_slice(&src[n * N..]);
}

fn ungroup_n<const N: usize>(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / N;
    let mut planes: [&[u8]; N] = [&[][..]; N];
    for (b, plane) in planes.iter_mut().enumerate() {
        *plane = &src[b * n..(b + 1) * n];
    }
    for (i, element) in dst.chunks_exact_mut(N).enumerate() {
        for b in 0..N {
            element[b] = planes[b][i];
        }
    }
    dst[n * N..].copy_from_slice(&src[n * N..]);
}

/// Regroups `src` by byte significance into `dst` (same length). Trailing
/// bytes that do not fill an element are copied as they are.
pub fn byte_group(src: &[u8], group: u8, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len());
    match group {
        2 => group_n::<2>(src, dst),
        4 => group_n::<4>(src, dst),
        8 => group_n::<8>(src, dst),
        _ => dst.copy_from_slice(src),
    }
}

/// The inverse of [`byte_group`].
pub fn byte_ungroup(src: &[u8], group: u8, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len());
    match group {
        2 => ungroup_n::<2>(src, dst),
        4 => ungroup_n::<4>(src, dst),
        8 => ungroup_n::<8>(src, dst),
        _ => dst.copy_from_slice(src),
    }
}

thread_local! {
    // zstd contexts are costly to create (~100s of KiB); keep one per pool thread.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..28]), payload)
}

/// Encodes `raw` into a stored chunk frame (header + payload). Falls back to
/// storing the raw bytes when zstd does not make them smaller.
pub fn encode_chunk(raw: &[u8], encoding: Encoding, level: i32) -> std::io::Result<Vec<u8>> {
    let bound = zstd::zstd_safe::compress_bound(raw.len());
    let mut out = Vec::with_capacity(HEADER_LEN + bound.max(raw.len()));
    out.resize(HEADER_LEN + bound, 0);
    let compressed = SCRATCH.with(|scratch| -> std::io::Result<usize> {
        let mut scratch = scratch.borrow_mut();
        let input: &[u8] = if encoding.group > 1 {
            scratch.resize(raw.len(), 0);
            byte_group(raw, encoding.group, &mut scratch);
            &scratch
        } else {
            raw
        };
        COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().map(|(l, _)| *l) != Some(level) {
                *c = Some((level, zstd::bulk::Compressor::new(level)?));
            }
            let (_, compressor) = c.as_mut().expect("compressor just set");
            compressor.compress_to_buffer(input, &mut out[HEADER_LEN..])
        })
    })?;
    let (codec, group, payload_len) = if compressed < raw.len() {
        (CODEC_ZSTD, encoding.group, compressed)
    } else {
        out.truncate(HEADER_LEN);
        out.extend_from_slice(raw);
        (CODEC_RAW, 1, raw.len())
    };
    out.truncate(HEADER_LEN + payload_len);
    let (header, payload) = out.split_at_mut(HEADER_LEN);
    header[0..4].copy_from_slice(&CHUNK_MAGIC);
    header[4] = CHUNK_FRAME_VERSION;
    header[5] = codec;
    header[6] = group;
    header[7] = 0;
    header[8..16].copy_from_slice(&(raw.len() as u64).to_le_bytes());
    header[16..24].copy_from_slice(&(payload_len as u64).to_le_bytes());
    header[24..28].fill(0);
    let crc = crc_of(header, payload);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a stored frame into `dst` (which must have the raw length the
/// manifest records) and checks the crc and, when given, the sha256 address.
/// The error is the reason, for the caller to name tensor and chunk.
pub fn decode_chunk(
    stored: &[u8],
    dst: &mut [u8],
    expected_address: Option<&str>,
) -> Result<(), String> {
    if stored.len() < HEADER_LEN {
        return Err(format!("stored object is {} bytes, shorter than a header", stored.len()));
    }
    let (header, payload) = stored.split_at(HEADER_LEN);
    if header[0..4] != CHUNK_MAGIC {
        return Err("bad magic".into());
    }
    if header[4] != CHUNK_FRAME_VERSION {
        return Err(format!("unknown chunk frame version {}", header[4]));
    }
    let raw_len = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let payload_len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if payload_len != payload.len() as u64 {
        return Err(format!(
            "payload is {} bytes, header says {payload_len}",
            payload.len()
        ));
    }
    let crc = u32::from_le_bytes(header[28..32].try_into().expect("4 bytes"));
    let actual = crc_of(header, payload);
    if crc != actual {
        return Err(format!("crc32c mismatch: stored {crc:08x}, computed {actual:08x}"));
    }
    if raw_len != dst.len() as u64 {
        return Err(format!(
            "raw length {raw_len} differs from the manifest's {}",
            dst.len()
        ));
    }
    let group = header[6];
    match header[5] {
        CODEC_RAW => {
            if payload.len() != dst.len() {
                return Err("raw payload length mismatch".into());
            }
            dst.copy_from_slice(payload);
        }
        CODEC_ZSTD => {
            let decompress = |into: &mut [u8]| -> Result<(), String> {
                DECOMPRESSOR.with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                    }
                    let n = d
                        .as_mut()
                        .expect("decompressor just set")
                        .decompress_to_buffer(payload, into)
                        .map_err(|e| format!("zstd: {e}"))?;
                    if n != into.len() {
                        return Err(format!("decompressed {n} bytes, expected {}", into.len()));
                    }
                    Ok(())
                })
            };
            if group > 1 {
                SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    scratch.resize(dst.len(), 0);
                    decompress(&mut scratch)?;
                    byte_ungroup(&scratch, group, dst);
                    Ok::<_, String>(())
                })?;
            } else {
                decompress(dst)?;
            }
        }
        other => return Err(format!("unknown codec {other}")),
    }
    if let Some(expected) = expected_address {
        let got = address(dst);
        if got != expected {
            return Err(format!("sha256 {got} does not match the address"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(n: usize) -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..n)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let f = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
                f.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn grouping_round_trips_for_every_width_and_odd_tails() {
        for group in [1u8, 2, 4, 8] {
            for len in [0usize, 1, 7, 8, 9, 64, 1001] {
                let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let mut grouped = vec![0; len];
                byte_group(&src, group, &mut grouped);
                let mut back = vec![0; len];
                byte_ungroup(&grouped, group, &mut back);
                assert_eq!(src, back, "group {group} len {len}");
            }
        }
        // Grouping really regroups: the first plane holds every element's byte 0.
        let src = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut g = [0u8; 8];
        byte_group(&src, 4, &mut g);
        assert_eq!(g, [1, 5, 2, 6, 3, 7, 4, 8]);
    }

    #[test]
    fn frame_round_trips_and_detects_every_flipped_byte() {
        let raw = floats(2048);
        let enc = Encoding::for_dtype(DType::F32);
        let stored = encode_chunk(&raw, enc, 3).unwrap();
        assert!(stored.len() < raw.len() + HEADER_LEN);
        let addr = address(&raw);
        let mut out = vec![0; raw.len()];
        decode_chunk(&stored, &mut out, Some(&addr)).unwrap();
        assert_eq!(out, raw);
        for i in (0..stored.len()).step_by(stored.len() / 97 + 1) {
            let mut bad = stored.clone();
            bad[i] ^= 0x10;
            assert!(
                decode_chunk(&bad, &mut out, Some(&addr)).is_err(),
                "flip at {i} undetected"
            );
        }
        // A wrong address is caught even when the frame is intact.
        let err = decode_chunk(&stored, &mut out, Some(&address(b"other"))).unwrap_err();
        assert!(err.contains("sha256"), "{err}");
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut x = 1u64;
        let raw: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let stored = encode_chunk(&raw, Encoding { group: 1 }, 3).unwrap();
        assert_eq!(stored[5], CODEC_RAW);
        assert_eq!(stored.len(), raw.len() + HEADER_LEN);
        let mut out = vec![0; raw.len()];
        decode_chunk(&stored, &mut out, Some(&address(&raw))).unwrap();
        assert_eq!(out, raw);
    }

    #[test]
    fn keys_parse_back() {
        let a = address(b"x");
        for group in [1u8, 2, 4, 8] {
            let key = chunk_key(&a, Encoding { group });
            assert_eq!(parse_chunk_key(&key), Some((a.clone(), Encoding { group })));
        }
        assert_eq!(parse_chunk_key("chunks/ab/notahash.zst"), None);
    }
}

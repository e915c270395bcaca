//! Chunk encoding: byte grouping, zstd, the stored frame and its checks.
//!
//! A stored chunk is a 32-byte header followed by the payload:
//!
//! ```text
//! 0  magic "KLNC"         4  frame version (1)    5  codec (0 raw, 1 zstd, 2 zstd per byte plane)
//! 6  group (element size the bytes were grouped by; 1 = not grouped)
//! 7  reserved (0)         8  raw length (u64 LE)  16 payload length (u64 LE)
//! 24 reserved (0, 4 bytes)                         28 crc32c (u32 LE) of bytes 0..28 and the payload
//! ```
//!
//! The chunk's address is a hash of its raw (decoded) bytes: BLAKE3 since
//! format version 2 (`{hex}.b3.{encoding}`), sha256 in version 1 checkpoints
//! (`{hex}.{encoding}`, still read). The key also carries the requested
//! grouping, so differently encoded copies of the same bytes never share a
//! key. Decoding checks the crc (the stored bytes), then decodes and checks
//! the hash against the address (the meaning).

use std::cell::RefCell;

use sha2::{Digest, Sha256};

use crate::tensor::DType;

/// The first four bytes of every stored chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"KLNC";
/// The frame version this build writes and the newest it reads (byte 4).
pub const CHUNK_FRAME_VERSION: u8 = 1;
/// Bytes of the frame header before the payload.
pub const HEADER_LEN: usize = 32;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// How a chunk's bytes are transformed before zstd: grouped by `group`-byte
/// elements (all byte 0s, then all byte 1s, ...) or not at all (`group == 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Element size in bytes the chunk is grouped by: 1, 2, 4 or 8.
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

/// The hash a chunk's address is computed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkHash {
    /// Format version 1.
    Sha256,
    /// Format version 2 on: ~3.5x sha256's speed here (6.4 against 1.8 GB/s
    /// per core, with SHA-NI), and as collision-resistant.
    Blake3,
}

impl ChunkHash {
    /// The hash new chunks are stored under.
    pub const CURRENT: ChunkHash = ChunkHash::Blake3;

    /// Hex hash of `raw` with this function.
    pub fn hex(self, raw: &[u8]) -> String {
        match self {
            ChunkHash::Sha256 => hex::encode(Sha256::digest(raw)),
            ChunkHash::Blake3 => blake3::hash(raw).to_hex().to_string(),
        }
    }

    /// `sha256` or `blake3`, for messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "sha256",
            ChunkHash::Blake3 => "blake3",
        }
    }

    fn key_tag(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "",
            ChunkHash::Blake3 => "b3.",
        }
    }
}

/// What a chunk key says: the hash of the raw bytes and how they are encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkId {
    /// The function the address was computed with (from the key's `b3.` tag).
    pub hash: ChunkHash,
    /// Lowercase hex digest of the raw bytes.
    pub address: String,
    /// The grouping the key names (`bg4.zst`: 4); the frame may still hold
    /// the bytes raw.
    pub encoding: Encoding,
}

/// Hex hash of `raw` under [`ChunkHash::CURRENT`]: the chunk's address.
pub fn address(raw: &[u8]) -> String {
    ChunkHash::CURRENT.hex(raw)
}

/// The object key (relative to the checkpoint root) of a chunk whose
/// [`address`] is `address`.
pub fn chunk_key(address: &str, encoding: Encoding) -> String {
    format!(
        "chunks/{}/{}.{}{}",
        &address[..2],
        address,
        ChunkHash::CURRENT.key_tag(),
        encoding.key_suffix()
    )
}

/// Reads a chunk key back; `None` if it is not one.
///
/// The whole key is checked, not just its last segment: exactly
/// `chunks/{first two of the address}/{address}.{tag}{encoding}`, the
/// address 64 lowercase hex digits, so that a manifest or part record cannot
/// point a load (or a copy, or a delete) at any other object of the root.
pub fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    let (dir, name) = key.strip_prefix("chunks/")?.split_once('/')?;
    let (address, suffix) = name.split_once('.')?;
    if address.len() != 64
        || !address
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    if dir != &address[..2] {
        return None;
    }
    let (hash, suffix) = match suffix.strip_prefix(ChunkHash::Blake3.key_tag()) {
        Some(rest) => (ChunkHash::Blake3, rest),
        None => (ChunkHash::Sha256, suffix),
    };
    let group = match suffix {
        "bg2.zst" => 2,
        "bg4.zst" => 4,
        "bg8.zst" => 8,
        "zst" => 1,
        _ => return None,
    };
    Some(ChunkId {
        hash,
        address: address.to_string(),
        encoding: Encoding { group },
    })
}

// Grouping reads each element as one little-endian integer and shifts its
// bytes out (and back in): written this way the loops vectorise, ~12 GB/s per
// core here against ~3.5 GB/s for a byte-by-byte transpose.
macro_rules! grouping {
    ($group:ident, $ungroup:ident, $int:ty) => {
        fn $group(src: &[u8], dst: &mut [u8]) {
            const N: usize = std::mem::size_of::<$int>();
            let n = src.len() / N;
            let (planes, tail) = dst.split_at_mut(n * N);
            let mut planes: [&mut [u8]; N] = {
                let mut it = planes.chunks_exact_mut(n.max(1));
                std::array::from_fn(|_| it.next().unwrap_or(&mut []))
            };
            for (i, element) in src.chunks_exact(N).enumerate() {
                let v = <$int>::from_le_bytes(element.try_into().expect("N bytes"));
                for (b, plane) in planes.iter_mut().enumerate() {
                    plane[i] = (v >> (8 * b)) as u8;
                }
            }
            tail.copy_from_slice(&src[n * N..]);
        }

        fn $ungroup(src: &[u8], dst: &mut [u8]) {
            const N: usize = std::mem::size_of::<$int>();
            let n = src.len() / N;
            let (planes, tail) = src.split_at(n * N);
            let planes: [&[u8]; N] = {
                let mut it = planes.chunks_exact(n.max(1));
                std::array::from_fn(|_| it.next().unwrap_or(&[]))
            };
            for (i, element) in dst.chunks_exact_mut(N).enumerate() {
                let mut v: $int = 0;
                for (b, plane) in planes.iter().enumerate() {
                    v |= (plane[i] as $int) << (8 * b);
                }
                element.copy_from_slice(&v.to_le_bytes());
            }
            dst[n * N..].copy_from_slice(tail);
        }
    };
}

grouping!(group_2, ungroup_2, u16);
grouping!(group_4, ungroup_4, u32);
grouping!(group_8, ungroup_8, u64);

/// Regroups `src` by byte significance into `dst` (same length). Trailing
/// bytes that do not fill an element are copied as they are.
pub fn byte_group(src: &[u8], group: u8, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len());
    match group {
        2 => group_2(src, dst),
        4 => group_4(src, dst),
        8 => group_8(src, dst),
        _ => dst.copy_from_slice(src),
    }
}

/// The inverse of [`byte_group`].
pub fn byte_ungroup(src: &[u8], group: u8, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len());
    match group {
        2 => ungroup_2(src, dst),
        4 => ungroup_4(src, dst),
        8 => ungroup_8(src, dst),
        _ => dst.copy_from_slice(src),
    }
}

/// How a compressor is set up: a zstd level (ungrouped chunks), or the
/// setting for the byte planes of grouped floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Level(i32),
    Planes,
}

/// The planes' zstd level: the fastest match search there is. A float's
/// sign-and-exponent plane is a stream of few distinct symbols with few long
/// repeats, so nearly all of its gain is the entropy coding of literals. With
/// literal compression forced on (zstd turns it off at negative levels), this
/// setting stored the exponent plane of normal(0, 0.02) weights in 0.34 of its
/// size at ~0.7-1.1 GB/s and decoded it at ~2.5 GB/s, where level 1 gave 0.37
/// at 0.32 GB/s (and 0.9 GB/s to decode), level 3 0.42 and level 9 0.40 at 33
/// MB/s (`cargo run --release -p kiln-checkpoint --example codec_speed`).
/// Long runs (zeros, repeated rows) are still found and stored as matches.
const PLANE_LEVEL: i32 = -1000;

thread_local! {
    // zstd contexts are costly to create (~100s of KiB); keep one per pool thread.
    static COMPRESSOR: RefCell<Option<(Setting, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    // Grouped bytes (one chunk) and one compressed plane, reused per thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static PACKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..28]), payload)
}

const PLANE_RAW: u8 = 0;
const PLANE_ZSTD: u8 = 1;
const CODEC_PLANES: u8 = 2;

fn compressor(setting: Setting) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    use zstd::zstd_safe::{CParameter, ParamSwitch};
    match setting {
        Setting::Level(level) => zstd::bulk::Compressor::new(level),
        Setting::Planes => {
            let mut c = zstd::bulk::Compressor::new(PLANE_LEVEL)?;
            c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))?;
            Ok(c)
        }
    }
}

/// Compresses `input` into the thread's `PACKED` buffer and hands it to `f`.
fn with_compressed<T>(
    input: &[u8],
    setting: Setting,
    f: impl FnOnce(&[u8]) -> T,
) -> std::io::Result<T> {
    PACKED.with(|packed| {
        let mut packed = packed.borrow_mut();
        packed.clear();
        packed.reserve(zstd::zstd_safe::compress_bound(input.len()));
        COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().map(|(s, _)| *s) != Some(setting) {
                *c = Some((setting, compressor(setting)?));
            }
            let (_, compressor) = c.as_mut().expect("compressor just set");
            compressor.compress_to_buffer(input, &mut *packed)
        })?;
        Ok(f(&packed))
    })
}

fn write_header(out: &mut [u8], codec: u8, group: u8, raw_len: usize) {
    let (header, payload) = out.split_at_mut(HEADER_LEN);
    header.copy_from_slice(&header_for(codec, group, raw_len, payload));
}

/// A header without its crc (bytes 28..32 zero).
fn header_prefix(codec: u8, group: u8, raw_len: usize, payload_len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&CHUNK_MAGIC);
    header[4] = CHUNK_FRAME_VERSION;
    header[5] = codec;
    header[6] = group;
    header[8..16].copy_from_slice(&(raw_len as u64).to_le_bytes());
    header[16..24].copy_from_slice(&(payload_len as u64).to_le_bytes());
    header
}

fn header_for(codec: u8, group: u8, raw_len: usize, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = header_prefix(codec, group, raw_len, payload.len());
    let crc = crc_of(&header, payload);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    header
}

/// A chunk's [`address`] and its raw frame's header
/// ([`raw_frame_header`]), computed piece by piece as the bytes go by: the
/// save pipeline digests each piece while it is still in cache from being
/// copied, instead of reading the whole chunk twice more later.
pub struct RawFrameDigest {
    hasher: blake3::Hasher,
    header: [u8; HEADER_LEN],
    crc: u32,
    remaining: usize,
}

impl RawFrameDigest {
    /// For a chunk of `len` bytes.
    pub fn new(len: usize) -> Self {
        // The address is the current hash, which this digest computes.
        const { assert!(matches!(ChunkHash::CURRENT, ChunkHash::Blake3)) };
        let header = header_prefix(CODEC_RAW, 1, len, len);
        RawFrameDigest {
            hasher: blake3::Hasher::new(),
            crc: crc32c::crc32c(&header[..28]),
            header,
            remaining: len,
        }
    }

    /// The chunk's next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.remaining -= bytes.len();
    }

    /// The address and the raw frame header, once every byte went by.
    pub fn finish(mut self) -> (String, [u8; HEADER_LEN]) {
        assert_eq!(self.remaining, 0, "digest of a chunk not seen whole");
        self.header[28..32].copy_from_slice(&self.crc.to_le_bytes());
        (self.hasher.finalize().to_hex().to_string(), self.header)
    }
}

/// The header of `raw`'s raw frame (codec 0): the stored chunk is this
/// header followed by `raw` itself, so a writer can send both from where
/// they are without assembling the frame ([`encode_raw_into`] does).
pub fn raw_frame_header(raw: &[u8]) -> [u8; HEADER_LEN] {
    header_for(CODEC_RAW, 1, raw.len(), raw)
}

/// Encodes `raw` into a stored chunk frame (header + payload).
///
/// Grouped data is compressed plane by plane (codec 2): each byte plane is
/// zstd-compressed on its own (at level -1000, the crate's `PLANE_LEVEL`,
/// whatever `level` says) and kept raw when that does not save at least 1/64
/// of it.
/// The low mantissa planes of trained floats are noise, and storing them raw
/// costs a memcpy; the exponent plane compresses well on its own. Ungrouped
/// data is one zstd frame at `level` (codec 1). Either way the raw bytes are stored (codec 0) when
/// compression does not make them smaller.
pub fn encode_chunk(raw: &[u8], encoding: Encoding, level: i32) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_chunk_into(raw, encoding, level, &mut out)?;
    Ok(out)
}

/// [`encode_chunk`] into `out` (cleared first), reusing its allocation: a
/// fresh 8 MiB buffer per chunk costs its page faults every time, which on
/// two cores took longer than compressing the chunk.
pub fn encode_chunk_into(
    raw: &[u8],
    encoding: Encoding,
    level: i32,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let group = encoding.group as usize;
    out.clear();
    out.reserve(HEADER_LEN + raw.len() + 9 * group + 64);
    out.resize(HEADER_LEN, 0);
    let codec = if group > 1 {
        let n = raw.len() / group;
        SCRATCH.with(|scratch| -> std::io::Result<()> {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(raw.len(), 0);
            byte_group(raw, encoding.group, &mut scratch);
            for b in 0..group {
                let plane = &scratch[b * n..(b + 1) * n];
                with_compressed(plane, Setting::Planes, |packed| {
                    let (mode, bytes) = if packed.len() + plane.len() / 64 < plane.len() {
                        (PLANE_ZSTD, packed)
                    } else {
                        (PLANE_RAW, plane)
                    };
                    out.push(mode);
                    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                    out.extend_from_slice(bytes);
                })?;
            }
            out.extend_from_slice(&scratch[n * group..]);
            Ok(())
        })?;
        CODEC_PLANES
    } else {
        with_compressed(raw, Setting::Level(level), |packed| {
            out.extend_from_slice(packed)
        })?;
        CODEC_ZSTD
    };
    let (codec, group) = if out.len() - HEADER_LEN < raw.len() {
        (codec, encoding.group)
    } else {
        out.truncate(HEADER_LEN);
        out.extend_from_slice(raw);
        (CODEC_RAW, 1)
    };
    write_header(out, codec, group, raw.len());
    Ok(())
}

/// Frames `raw` as it is (codec 0) into `out` (cleared first, allocation
/// reused): what a save stores when the codec policy finds compression would
/// make it slower ([`crate::compression`]). Readers need nothing new: codec 0
/// is the frame zstd falls back to when it does not shrink a chunk.
pub fn encode_raw_into(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(HEADER_LEN + raw.len());
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(raw);
    write_header(out, CODEC_RAW, 1, raw.len());
}

fn decompress_into(payload: &[u8], into: &mut [u8]) -> Result<(), String> {
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
}

/// Decodes the planes of a codec-2 payload into `grouped` (raw length).
fn decode_planes(mut payload: &[u8], group: usize, grouped: &mut [u8]) -> Result<(), String> {
    let n = grouped.len() / group;
    for b in 0..group {
        if payload.len() < 9 {
            return Err(format!("plane {b}: truncated plane header"));
        }
        let mode = payload[0];
        let len = u64::from_le_bytes(payload[1..9].try_into().expect("8 bytes")) as usize;
        payload = &payload[9..];
        if payload.len() < len {
            return Err(format!(
                "plane {b}: {len} bytes announced, {} left",
                payload.len()
            ));
        }
        let (bytes, rest) = payload.split_at(len);
        payload = rest;
        let into = &mut grouped[b * n..(b + 1) * n];
        match mode {
            PLANE_RAW if len == n => into.copy_from_slice(bytes),
            PLANE_RAW => return Err(format!("plane {b}: raw plane of {len} bytes, expected {n}")),
            PLANE_ZSTD => decompress_into(bytes, into).map_err(|e| format!("plane {b}: {e}"))?,
            other => return Err(format!("plane {b}: unknown mode {other}")),
        }
    }
    let tail = &mut grouped[n * group..];
    if payload.len() != tail.len() {
        return Err(format!(
            "{} trailing bytes, expected {}",
            payload.len(),
            tail.len()
        ));
    }
    tail.copy_from_slice(payload);
    Ok(())
}

/// Decodes a stored frame into `dst` (which must have the raw length the
/// manifest records) and checks the crc and, when given, the address (with
/// the hash that produced it).
/// The error is the reason, for the caller to name tensor and chunk.
pub fn decode_chunk(
    stored: &[u8],
    dst: &mut [u8],
    expected_address: Option<(ChunkHash, &str)>,
) -> Result<(), String> {
    if stored.len() < HEADER_LEN {
        return Err(format!(
            "stored object is {} bytes, shorter than a header",
            stored.len()
        ));
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
        return Err(format!(
            "crc32c mismatch: stored {crc:08x}, computed {actual:08x}"
        ));
    }
    if raw_len != dst.len() as u64 {
        return Err(format!(
            "raw length {raw_len} differs from the manifest's {}",
            dst.len()
        ));
    }
    let group = header[6];
    let grouped_codec = |dst: &mut [u8], decode: &dyn Fn(&mut [u8]) -> Result<(), String>| {
        if group > 1 {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize(dst.len(), 0);
                decode(&mut scratch)?;
                byte_ungroup(&scratch, group, dst);
                Ok::<_, String>(())
            })
        } else {
            decode(dst)
        }
    };
    match header[5] {
        CODEC_RAW => {
            if payload.len() != dst.len() {
                return Err("raw payload length mismatch".into());
            }
            dst.copy_from_slice(payload);
        }
        CODEC_ZSTD => grouped_codec(dst, &|into| decompress_into(payload, into))?,
        CODEC_PLANES if group > 1 => {
            grouped_codec(dst, &|into| decode_planes(payload, group as usize, into))?
        }
        other => return Err(format!("unknown codec {other} (group {group})")),
    }
    if let Some((hash, expected)) = expected_address {
        let got = hash.hex(dst);
        if got != expected {
            return Err(format!("{} {got} does not match the address", hash.name()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Roughly normal values with standard deviation 0.02, like trained weights.
    fn floats(n: usize) -> Vec<u8> {
        crate::testdata::Rng::from_state(0x9e3779b97f4a7c15)
            .normal_f32(n, 0.02)
            .into_iter()
            .flat_map(f32::to_le_bytes)
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
        decode_chunk(&stored, &mut out, Some((ChunkHash::CURRENT, &addr))).unwrap();
        assert_eq!(out, raw);
        for i in (0..stored.len()).step_by(stored.len() / 97 + 1) {
            let mut bad = stored.clone();
            bad[i] ^= 0x10;
            assert!(
                decode_chunk(&bad, &mut out, Some((ChunkHash::CURRENT, &addr))).is_err(),
                "flip at {i} undetected"
            );
        }
        // A wrong address is caught even when the frame is intact.
        let err = decode_chunk(
            &stored,
            &mut out,
            Some((ChunkHash::CURRENT, &address(b"other"))),
        )
        .unwrap_err();
        assert!(err.contains("blake3"), "{err}");
    }

    #[test]
    fn floats_are_compressed_per_plane_with_noise_planes_kept_raw() {
        let raw = floats(4096);
        let stored = encode_chunk(&raw, Encoding::for_dtype(DType::F32), 3).unwrap();
        assert_eq!(stored[5], CODEC_PLANES);
        // Plane 0 (lowest mantissa byte) is noise: stored raw, right after
        // the header; the top plane (sign, exponent) is compressed.
        assert_eq!(
            stored[HEADER_LEN],
            PLANE_RAW,
            "{:?}",
            &stored[HEADER_LEN..HEADER_LEN + 9]
        );
        let n = raw.len() / 4;
        let mut at = HEADER_LEN;
        let mut modes = vec![];
        for _ in 0..4 {
            modes.push(stored[at]);
            at += 9 + u64::from_le_bytes(stored[at + 1..at + 9].try_into().unwrap()) as usize;
        }
        assert_eq!(modes[3], PLANE_ZSTD, "{modes:?} ({n} elements)");
        let mut out = vec![0; raw.len()];
        decode_chunk(
            &stored,
            &mut out,
            Some((ChunkHash::CURRENT, &address(&raw))),
        )
        .unwrap();
        assert_eq!(out, raw);
        // Tails that are not a whole element, and every width.
        for (group, len) in [(2u8, 1001usize), (4, 4099), (8, 8 * 300 + 5)] {
            let raw: Vec<u8> = raw.iter().cycle().take(len).copied().collect();
            let stored = encode_chunk(&raw, Encoding { group }, 1).unwrap();
            let mut out = vec![0; len];
            decode_chunk(
                &stored,
                &mut out,
                Some((ChunkHash::CURRENT, &address(&raw))),
            )
            .unwrap();
            assert_eq!(out, raw, "group {group}");
        }
        // Integers: one zstd frame.
        let ints: Vec<u8> = (0..4096u32).flat_map(|i| (i % 7).to_le_bytes()).collect();
        let stored = encode_chunk(&ints, Encoding::for_dtype(DType::I32), 3).unwrap();
        assert_eq!(stored[5], CODEC_ZSTD);
        let mut out = vec![0; ints.len()];
        decode_chunk(&stored, &mut out, None).unwrap();
        assert_eq!(out, ints);
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut x = 1u64;
        let raw: Vec<u8> = (0..4096)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let stored = encode_chunk(&raw, Encoding { group: 1 }, 3).unwrap();
        assert_eq!(stored[5], CODEC_RAW);
        assert_eq!(stored.len(), raw.len() + HEADER_LEN);
        let mut out = vec![0; raw.len()];
        decode_chunk(
            &stored,
            &mut out,
            Some((ChunkHash::CURRENT, &address(&raw))),
        )
        .unwrap();
        assert_eq!(out, raw);
    }

    #[test]
    fn raw_frames_decode_and_are_checked_like_any_other() {
        let raw = floats(1000);
        let mut stored = vec![1, 2, 3];
        encode_raw_into(&raw, &mut stored);
        assert_eq!((stored[5], stored[6]), (CODEC_RAW, 1));
        assert_eq!(stored.len(), HEADER_LEN + raw.len());
        let addr = address(&raw);
        let mut out = vec![0; raw.len()];
        decode_chunk(&stored, &mut out, Some((ChunkHash::CURRENT, &addr))).unwrap();
        assert_eq!(out, raw);
        assert_eq!(stored[..HEADER_LEN], raw_frame_header(&raw));
        stored[HEADER_LEN + 7] ^= 1;
        assert!(decode_chunk(&stored, &mut out, Some((ChunkHash::CURRENT, &addr))).is_err());
    }

    #[test]
    fn a_digest_piece_by_piece_equals_the_address_and_header_of_the_whole() {
        for len in [0usize, 1, 1000, 4096, 100_003] {
            let raw: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
            for piece in [1usize, 64, 4096, 1 << 20] {
                let mut d = RawFrameDigest::new(len);
                for p in raw.chunks(piece) {
                    d.update(p);
                }
                assert_eq!(
                    d.finish(),
                    (address(&raw), raw_frame_header(&raw)),
                    "{len} by {piece}"
                );
            }
        }
    }

    #[test]
    fn keys_parse_back() {
        let a = address(b"x");
        for group in [1u8, 2, 4, 8] {
            let key = chunk_key(&a, Encoding { group });
            let id = parse_chunk_key(&key).unwrap();
            assert_eq!(
                (id.hash, &id.address, id.encoding),
                (ChunkHash::CURRENT, &a, Encoding { group })
            );
        }
        // Version 1 keys: sha256, no tag.
        let sha = ChunkHash::Sha256.hex(b"x");
        let id = parse_chunk_key(&format!("chunks/{}/{sha}.bg4.zst", &sha[..2])).unwrap();
        assert_eq!(
            (id.hash, id.address, id.encoding.group),
            (ChunkHash::Sha256, sha, 4)
        );
        assert_eq!(parse_chunk_key("chunks/ab/x.b3.bg4.zst"), None);
        assert_eq!(
            parse_chunk_key(&format!("chunks/aa/{}.b3.lz4", "a".repeat(64))),
            None
        );
        assert_eq!(parse_chunk_key("chunks/ab/notahash.zst"), None);
        // Only the exact key form: no other folder, no traversal, no case games.
        let good = chunk_key(&a, Encoding { group: 4 });
        assert!(parse_chunk_key(&good).is_some());
        for bad in [
            format!("../{good}"),
            format!("other/{good}"),
            good.replacen("chunks/", "chunks/../", 1),
            good.replacen(&format!("chunks/{}/", &a[..2]), "chunks/zz/", 1),
            good.replacen("chunks/", "", 1),
            good.to_uppercase(),
            format!("{good}/x"),
        ] {
            assert_eq!(parse_chunk_key(&bad), None, "{bad}");
        }
    }
}

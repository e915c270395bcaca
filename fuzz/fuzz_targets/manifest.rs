//! Checkpoint records read back from storage: the manifest (with its
//! sorting, size arithmetic and chunk key checks), parts, `latest`, chunk
//! keys, chunk frames as a load decodes them, and the model registry's
//! version, alias, audit and tombstone records with their key checks.
//!
//! Input: one selector byte (which record), then the record's bytes.
#![no_main]

use kiln_checkpoint::codec::{ChunkHash, HEADER_LEN, decode_chunk, parse_chunk_key};
use kiln_checkpoint::manifest::{
    LatestRecord, Manifest, PartRecord, step_of_manifest_key, validate_attempt,
};
use kiln_checkpoint::registry::{Selector, fuzzing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let key = "manifests/00000000000000000007-a.json";
    match which % 5 {
        0 => {
            if let Ok(m) = Manifest::from_json(key, bytes) {
                // What load and verify do next with a checked manifest.
                for chunk in m.chunk_keys() {
                    assert!(parse_chunk_key(chunk).is_some());
                }
                for t in &m.tensors {
                    assert!(m.tensor(&t.name).is_some());
                }
                let _ = m.meta();
            }
        }
        1 => {
            let _ = PartRecord::from_json("parts/x/rank-00000-of-00001.json", bytes);
            let _ = LatestRecord::from_json(bytes);
        }
        2 => fuzzing::decode_records(bytes),
        3 => chunk_frame(bytes),
        _ => {
            if let Ok(text) = std::str::from_utf8(bytes) {
                let _ = parse_chunk_key(text);
                let _ = step_of_manifest_key(text);
                let _ = validate_attempt(text);
                if let Ok(s) = text.parse::<Selector>() {
                    assert_eq!(s.to_string().parse::<Selector>().ok(), Some(s));
                }
            }
        }
    }
});

/// A stored chunk frame decoded into a slot of the length the manifest
/// gives (the first two bytes); then again with its payload length and crc
/// fixed up and a slot of the length its header gives (up to 1 MiB), so
/// that the codecs behind those checks are reached.
fn chunk_frame(bytes: &[u8]) {
    let Some((len, frame)) = bytes.split_first_chunk::<2>() else {
        return;
    };
    let mut dst = vec![0u8; usize::from(u16::from_le_bytes(*len))];
    let _ = decode_chunk(frame, &mut dst, None);
    if frame.len() < HEADER_LEN {
        return;
    }
    let mut fixed = frame.to_vec();
    let payload_len = (frame.len() - HEADER_LEN) as u64;
    fixed[16..24].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed[..28]), &fixed[HEADER_LEN..]);
    fixed[28..32].copy_from_slice(&crc.to_le_bytes());
    let raw_len = u64::from_le_bytes(fixed[8..16].try_into().expect("8 bytes"));
    if raw_len <= 1 << 20 {
        dst = vec![0u8; raw_len as usize];
    }
    let address = "0".repeat(64);
    let _ = decode_chunk(&fixed, &mut dst, Some((ChunkHash::Blake3, &address)));
}

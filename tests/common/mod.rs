//! Helpers shared by the end-to-end tests (each `tests/*.rs` is its own crate
//! and includes this module with `mod common;`, using what it needs).
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root. Read at run time, not with `env!`: the scripts share
/// one target folder between clones, and a test binary built in another clone
/// (unchanged sources are not rebuilt) would carry that clone's path.
pub fn repo() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"))
}

/// The tensors of a safetensors file of float32 tensors (as `kiln run`
/// writes the final weights), sorted by name.
pub fn read_weights(path: &str) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

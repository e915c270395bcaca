//! safetensors export (so PyTorch reads kiln checkpoints) and import (to
//! initialise a model from one).
//!
//! Export streams: it writes the header, then loads and writes tensors in
//! batches of about [`EXPORT_BATCH_BYTES`], so memory stays bounded by the
//! batch (or the largest tensor), not the checkpoint. The file is written to
//! a temporary name, fsynced and renamed into place.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::load::{OwnedTensor, Progress, load_with_progress};
use crate::manifest::{Manifest, TensorEntry};
use crate::store::CheckpointRoot;
use crate::tensor::{DType, TensorView};

/// Tensors loaded at once while exporting.
pub const EXPORT_BATCH_BYTES: u64 = 256 << 20;

fn io<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// Writes the tensors of `manifest` that pass `filter` to a safetensors file.
pub fn export_safetensors(
    root: &CheckpointRoot,
    manifest: &Manifest,
    filter: impl Fn(&str) -> bool,
    out: &Path,
) -> Result<()> {
    export_safetensors_with_progress(root, manifest, filter, out, None)
}

/// [`export_safetensors`], telling `progress` how many of the selected
/// tensors' bytes have been read.
pub fn export_safetensors_with_progress(
    root: &CheckpointRoot,
    manifest: &Manifest,
    filter: impl Fn(&str) -> bool,
    out: &Path,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    let selected: Vec<&TensorEntry> = manifest
        .tensors
        .iter()
        .filter(|t| filter(&t.name))
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("kiln_step".to_string(), manifest.step.to_string());
    metadata.insert("kiln_manifest".to_string(), manifest.key.clone());
    metadata.insert("kiln_job".to_string(), manifest.job.clone());
    let entries: Vec<(&str, DType, &[usize], u64)> = selected
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.raw_len))
        .collect();
    let (header, offset) = safetensors_header(&entries, metadata);

    let tmp = out.with_extension("safetensors.tmp");
    let file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let result = (|| -> Result<()> {
        w.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(&header))
            .map_err(io("write", &tmp))?;
        let mut batch: Vec<&str> = Vec::new();
        let mut batch_bytes = 0u64;
        let mut written = 0u64;
        let mut flush =
            |batch: &mut Vec<&str>, w: &mut std::io::BufWriter<std::fs::File>| -> Result<()> {
                if batch.is_empty() {
                    return Ok(());
                }
                let names: std::collections::HashSet<&str> = batch.iter().copied().collect();
                let before = written;
                let report = |done: u64, _: u64| {
                    if let Some(progress) = progress {
                        progress(before + done, offset);
                    }
                };
                // `load` returns tensors in manifest (name) order, the order of
                // the offsets above.
                for t in load_with_progress(root, manifest, |n| names.contains(n), Some(&report))? {
                    w.write_all(&t.data).map_err(io("write", &tmp))?;
                    written += t.data.len() as u64;
                }
                batch.clear();
                Ok(())
            };
        for t in &selected {
            if batch_bytes + t.raw_len > EXPORT_BATCH_BYTES {
                flush(&mut batch, &mut w)?;
                batch_bytes = 0;
            }
            batch.push(&t.name);
            batch_bytes += t.raw_len;
        }
        flush(&mut batch, &mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| io("write", &tmp)(e.into_error()))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, out).map_err(io("rename", out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The header of a safetensors file holding `entries` (name, dtype, shape,
/// bytes) back to back in that order, padded so the data starts 8-byte
/// aligned as safetensors' own writer does; and the data's total length.
fn safetensors_header(
    entries: &[(&str, DType, &[usize], u64)],
    metadata: BTreeMap<String, String>,
) -> (Vec<u8>, u64) {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::to_value(metadata).expect("string map"),
    );
    let mut offset = 0u64;
    for (name, dtype, shape, len) in entries {
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype.name(),
                "shape": shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).expect("header serializes");
    while !(header.len() + 8).is_multiple_of(8) {
        header.push(b' ');
    }
    (header, offset)
}

/// Writes in-memory tensors (a run's final weights) to a safetensors file
/// that PyTorch's `safetensors.torch.load_file` reads: written to a
/// temporary name, fsynced, renamed into place.
pub fn write_safetensors(tensors: &[TensorView<'_>], out: &Path) -> Result<()> {
    for t in tensors {
        let expected = t.shape.iter().product::<usize>() * t.dtype.size();
        if t.data.len() != expected {
            return Err(Error::invalid(format!(
                "tensor {} holds {} bytes; {:?} {:?} needs {expected}",
                t.name,
                t.data.len(),
                t.dtype,
                t.shape
            )));
        }
    }
    let mut sorted: Vec<&TensorView<'_>> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    let entries: Vec<(&str, DType, &[usize], u64)> = sorted
        .iter()
        .map(|t| (t.name, t.dtype, t.shape, t.data.len() as u64))
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let (header, _) = safetensors_header(&entries, metadata);
    let tmp = out.with_extension("safetensors.tmp");
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(&header))
            .map_err(io("write", &tmp))?;
        for t in &sorted {
            w.write_all(t.data).map_err(io("write", &tmp))?;
        }
        let file = w
            .into_inner()
            .map_err(|e| io("write", &tmp)(e.into_error()))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, out).map_err(io("rename", out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads every tensor of a safetensors file, sorted by name.
pub fn import_safetensors(path: &Path) -> Result<Vec<OwnedTensor>> {
    let bytes = std::fs::read(path).map_err(io("read", path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::invalid(format!(
            "{} is not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let Some(dtype) = DType::from_safetensors(view.dtype()) else {
            return Err(Error::Unsupported {
                what: format!(
                    "tensor {name} of {}: dtype {:?}",
                    path.display(),
                    view.dtype()
                ),
            });
        };
        out.push(OwnedTensor {
            name,
            dtype,
            shape: view.shape().to_vec(),
            data: view.data().to_vec(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

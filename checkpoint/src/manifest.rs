//! The objects that describe checkpoints: manifest, part, `latest`, and the
//! key layout under a checkpoint root. JSON only: nothing executes on load.
//!
//! ```text
//! chunks/{aa}/{blake3}.b3.{encoding}            immutable, content-addressed
//!                                              (version 1: {sha256}.{encoding})
//! parts/{step:020}-{attempt}/rank-{r:05}-of-{w:05}.json   one per rank and save
//! manifests/{step:020}-{attempt}.json           one per checkpoint, create-only
//! latest                                        moved by compare-and-swap
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::compression::CompressionRecord;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The version of the format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;

/// The key of the `latest` record.
pub const LATEST_KEY: &str = "latest";

/// Trainer-supplied metadata saved with a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, Default, PartialEq)]
pub struct CheckpointMeta {
    /// Step, sample cursor, RNG states, optimizer step count, schedule
    /// position: whatever the trainer needs to continue exactly.
    pub training_state: serde_json::Value,
    /// The job spec as run (JSON).
    pub job_spec: serde_json::Value,
    /// What wrote the checkpoint (`kiln 0.1.0`).
    pub code_version: String,
    /// A digest of the training and held-out data; a resume refuses a
    /// checkpoint whose data differs.
    pub dataset_fingerprint: String,
    /// Ranks of the run that saved (the number of stripes).
    pub world_size: u32,
    /// The newest held-out metrics at the save; non-finite values are
    /// dropped at commit (JSON has no NaN).
    pub metrics: BTreeMap<String, f64>,
    /// The job's name.
    pub job: String,
}

#[cfg(test)]
impl CheckpointMeta {
    /// Metadata for the crate's unit tests (job `j`, world size 1).
    pub(crate) fn for_tests() -> Self {
        CheckpointMeta {
            code_version: "test".into(),
            world_size: 1,
            job: "j".into(),
            ..CheckpointMeta::default()
        }
    }
}

/// A reference to one stored chunk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkRef {
    /// Key relative to the root: `chunks/{aa}/{blake3}.b3.{encoding}`
    /// (format version 1: `chunks/{aa}/{sha256}.{encoding}`).
    pub key: String,
    /// Bytes of the chunk decoded.
    pub raw_len: u64,
    /// Bytes of the stored object (the frame, compressed or not).
    pub stored_len: u64,
}

/// One tensor of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorEntry {
    /// The tensor's name (`model/fc1.weight`), unique in the checkpoint.
    pub name: String,
    /// Element type; with `shape`, fixes `raw_len`.
    pub dtype: DType,
    /// Dimensions, outermost first; empty for a scalar.
    pub shape: Vec<usize>,
    /// Bytes of the tensor (sum of its chunks' `raw_len`).
    pub raw_len: u64,
    /// The tensor's bytes are these chunks' decoded bytes, in order.
    pub chunks: Vec<ChunkRef>,
}

/// Sums over the whole checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Totals {
    /// Tensors in the checkpoint.
    pub tensors: u64,
    /// Chunk references, one per piece of the plan (a chunk referenced
    /// twice counts twice).
    pub chunks: u64,
    /// Bytes of every tensor, decoded.
    pub raw_bytes: u64,
    /// Stored bytes the chunk references add up to.
    pub stored_bytes: u64,
    /// Stored bytes this save uploaded (the rest were already stored).
    pub uploaded_bytes: u64,
}

/// A checkpoint: everything needed to load it, and how it came to be.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The format it was written in; a reader refuses one newer than
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The job's name.
    pub job: String,
    /// The training step the checkpoint holds.
    pub step: u64,
    /// The id of the run that saved it (see [`validate_attempt`]).
    pub attempt: String,
    /// RFC 3339, UTC, of the commit.
    pub created_at: String,
    /// Manifest key of the checkpoint this one follows (the committer's
    /// previous commit, the one it resumed from, or the `latest` it found).
    pub parent: Option<String>,
    /// World size of the save (the number of stripes).
    pub world_size: u32,
    /// Largest piece a tensor was split into, in bytes.
    pub chunk_bytes: u64,
    /// Sorted by name.
    pub tensors: Vec<TensorEntry>,
    /// See [`CheckpointMeta::training_state`].
    pub training_state: serde_json::Value,
    /// See [`CheckpointMeta::job_spec`].
    pub job_spec: serde_json::Value,
    /// See [`CheckpointMeta::code_version`].
    pub code_version: String,
    /// See [`CheckpointMeta::dataset_fingerprint`].
    pub dataset_fingerprint: String,
    /// See [`CheckpointMeta::metrics`].
    pub metrics: BTreeMap<String, f64>,
    /// Sums over the checkpoint, for listings and reports.
    pub totals: Totals,
    /// Each rank's codec choice for this save and what it rested on (from
    /// the parts; empty in manifests written before the codec policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compression: Vec<CompressionRecord>,
    /// Where this manifest was read from or written to (not stored).
    #[serde(skip)]
    pub key: String,
}

impl Manifest {
    /// The trainer's metadata as it was saved.
    pub fn meta(&self) -> CheckpointMeta {
        CheckpointMeta {
            training_state: self.training_state.clone(),
            job_spec: self.job_spec.clone(),
            code_version: self.code_version.clone(),
            dataset_fingerprint: self.dataset_fingerprint.clone(),
            world_size: self.world_size,
            metrics: self.metrics.clone(),
            job: self.job.clone(),
        }
    }

    /// Every chunk key the checkpoint references.
    pub fn chunk_keys(&self) -> impl Iterator<Item = &str> {
        self.tensors
            .iter()
            .flat_map(|t| t.chunks.iter().map(|c| c.key.as_str()))
    }

    /// The tensor named `name`, if the checkpoint has one (a binary search:
    /// the tensors are sorted).
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serializes")
    }

    /// Parses and checks a manifest read from `key`.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptObject {
            key: key.to_string(),
            reason,
        };
        let mut m: Manifest = decode_versioned("manifest", key, bytes, FORMAT_VERSION)?;
        m.key = key.to_string();
        for pair in m.tensors.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(corrupt(format!(
                    "tensors not sorted by name at {}",
                    pair[1].name
                )));
            }
        }
        // Sizes come from the file: every product and sum is checked, so a
        // hostile or damaged manifest is refused rather than wrapping around.
        let mut total: u64 = 0;
        for t in &m.tensors {
            let bytes = t
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .and_then(|n| n.checked_mul(t.dtype.size() as u64));
            let sum = t
                .chunks
                .iter()
                .try_fold(0u64, |s, c| s.checked_add(c.raw_len));
            if bytes != Some(t.raw_len) || sum != Some(t.raw_len) {
                return Err(corrupt(format!(
                    "tensor {} has shape {:?} ({} bytes) but its chunks hold {} bytes",
                    t.name,
                    t.shape,
                    t.raw_len,
                    sum.map_or("more than 2^64".to_string(), |s| s.to_string())
                )));
            }
            total = total.checked_add(t.raw_len).ok_or_else(|| {
                corrupt(format!(
                    "tensors up to {} hold more than 2^64 bytes",
                    t.name
                ))
            })?;
            for c in &t.chunks {
                if crate::codec::parse_chunk_key(&c.key).is_none() {
                    return Err(corrupt(format!("bad chunk key {} in {}", c.key, t.name)));
                }
            }
        }
        Ok(m)
    }
}

/// One rank's contribution to a save: the chunks of its stripe.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartRecord {
    /// See [`Manifest::format_version`].
    pub format_version: u32,
    /// The step saved.
    pub step: u64,
    /// The saving run's id; the committer reads only parts of its own attempt.
    pub attempt: String,
    /// The rank that wrote the part: its stripe's index.
    pub rank: u32,
    /// Ranks of the save.
    pub world_size: u32,
    /// [`crate::plan::ChunkPlan::layout_digest`] of the state the rank saved.
    pub layout: String,
    /// Index of the stripe's first chunk in the canonical plan.
    pub first_chunk: u64,
    /// The stripe's chunks, in plan order.
    pub chunks: Vec<ChunkRef>,
    /// Stored bytes of the stripe's chunks this rank uploaded.
    pub bytes_uploaded: u64,
    /// Stored bytes of the stripe's chunks that were already stored.
    pub bytes_reused: u64,
    /// The stripe's chunks this rank uploaded.
    pub chunks_uploaded: u64,
    /// The stripe's chunks that were already stored.
    pub chunks_reused: u64,
    /// The rank's codec choice (absent in parts written before the policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionRecord>,
}

impl PartRecord {
    /// Parses a part read from `key`: [`Error::CorruptObject`] when it is not
    /// a part, [`Error::Unsupported`] when it is newer than this build.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Self> {
        let p: PartRecord = serde_json::from_slice(bytes).map_err(|e| Error::CorruptObject {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        if p.format_version > FORMAT_VERSION {
            return Err(Error::Unsupported {
                what: format!("part {key} has format version {}", p.format_version),
            });
        }
        Ok(p)
    }
}

/// The `latest` record: which manifest is the newest committed checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LatestRecord {
    /// See [`Manifest::format_version`].
    pub format_version: u32,
    /// The step of the manifest.
    pub step: u64,
    /// The manifest's key (`manifests/...json`), relative to the root.
    pub manifest: String,
    /// The manifest's attempt.
    pub attempt: String,
    /// The manifest's parent, so a reader can fall back even when the latest
    /// manifest itself is unreadable.
    pub parent: Option<String>,
    /// RFC 3339, UTC, of the move.
    pub updated_at: String,
}

impl LatestRecord {
    /// Parses the `latest` record ([`Error::CorruptObject`] when it is not
    /// one). Its version is not checked here: the manifest it names is
    /// checked when read.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::CorruptObject {
            key: LATEST_KEY.into(),
            reason: e.to_string(),
        })
    }
}

/// Checks an attempt id: it becomes part of object keys.
pub fn validate_attempt(attempt: &str) -> Result<()> {
    let ok = !attempt.is_empty()
        && attempt.len() <= 128
        && attempt
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !attempt.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "attempt {attempt:?} must be 1-128 characters of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

/// The key of the manifest of `step` saved by `attempt`: zero-padded so
/// that key order is step order.
pub fn manifest_key(step: u64, attempt: &str) -> String {
    format!("manifests/{step:020}-{attempt}.json")
}

/// The key of `rank`'s part of the save of `step` by `attempt`.
pub fn part_key(step: u64, attempt: &str, rank: usize, world_size: usize) -> String {
    format!("parts/{step:020}-{attempt}/rank-{rank:05}-of-{world_size:05}.json")
}

/// The step a manifest key names, if it is one.
pub fn step_of_manifest_key(key: &str) -> Option<u64> {
    let name = key.strip_prefix("manifests/")?.strip_suffix(".json")?;
    let (step, _attempt) = name.split_once('-')?;
    (step.len() == 20).then(|| step.parse().ok())?
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Parses a JSON record read from `key` (a `what`: "manifest", "pin", ...)
/// that carries a `format_version`, refusing one newer than `reads_up_to`
/// before reading the rest; anything malformed is [`Error::CorruptObject`].
pub(crate) fn decode_versioned<T: serde::de::DeserializeOwned>(
    what: &str,
    key: &str,
    bytes: &[u8],
    reads_up_to: u32,
) -> Result<T> {
    let corrupt = |e: serde_json::Error| Error::CorruptObject {
        key: key.to_string(),
        reason: e.to_string(),
    };
    #[derive(Deserialize)]
    struct Version {
        format_version: u32,
    }
    let v: Version = serde_json::from_slice(bytes).map_err(corrupt)?;
    if v.format_version > reads_up_to {
        return Err(Error::Unsupported {
            what: format!(
                "{what} {key} has format version {}, this build reads up to {reads_up_to}",
                v.format_version
            ),
        });
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_step_and_parse_back() {
        let a = manifest_key(9, "run-a");
        let b = manifest_key(10, "run-a");
        assert!(a < b, "zero padding keeps lexicographic = numeric order");
        assert_eq!(step_of_manifest_key(&b), Some(10));
        assert_eq!(step_of_manifest_key("manifests/x.json"), None);
        assert!(validate_attempt("run_1.2-x").is_ok());
        for bad in ["", "a/b", "..", "a b", ".hidden"] {
            assert!(validate_attempt(bad).is_err(), "{bad}");
        }
    }

    /// A manifest of one U8 tensor of `shape` in chunks of `lens` bytes
    /// under `key`.
    fn manifest_json(shape: &[u64], raw_len: u64, chunks: &[(String, u64)]) -> Vec<u8> {
        let chunks: Vec<serde_json::Value> = chunks
            .iter()
            .map(|(key, len)| serde_json::json!({"key": key, "raw_len": len, "stored_len": len}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "format_version": FORMAT_VERSION, "job": "j", "step": 1, "attempt": "a",
            "created_at": "", "parent": null, "world_size": 1, "chunk_bytes": 8,
            "tensors": [{"name": "t", "dtype": "U8", "shape": shape, "raw_len": raw_len, "chunks": chunks}],
            "training_state": null, "job_spec": null, "code_version": "", "dataset_fingerprint": "",
            "metrics": {}, "totals": {"tensors": 1, "chunks": 1, "raw_bytes": raw_len, "stored_bytes": raw_len, "uploaded_bytes": 0}
        }))
        .unwrap()
    }

    #[test]
    fn sizes_are_checked_without_overflow_and_keys_in_full() {
        let key = crate::codec::chunk_key(
            &crate::codec::address(b"x"),
            crate::codec::Encoding { group: 1 },
        );
        let ok = manifest_json(&[2, 4], 8, &[(key.clone(), 8)]);
        Manifest::from_json("m", &ok).unwrap();
        // Products and sums that wrap around in 64 bits are refused, not wrapped.
        let huge = u64::MAX / 2 + 1;
        for bad in [
            manifest_json(&[huge, 2], 0, &[(key.clone(), 0)]),
            manifest_json(&[8], 8, &[(key.clone(), u64::MAX), (key.clone(), 9)]),
            manifest_json(&[2, 4], 9, &[(key.clone(), 8)]),
        ] {
            let err = Manifest::from_json("m", &bad).unwrap_err();
            assert!(matches!(err, Error::CorruptObject { .. }), "{err}");
        }
        // A chunk key must be a chunk key in full, not just end like one.
        let bad = manifest_json(&[2, 4], 8, &[(format!("registry/{key}"), 8)]);
        let err = Manifest::from_json("m", &bad).unwrap_err().to_string();
        assert!(err.contains("bad chunk key"), "{err}");
    }

    #[test]
    fn newer_format_versions_are_refused_not_misread() {
        let err = Manifest::from_json("m", br#"{"format_version": 3}"#).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let err = Manifest::from_json("m", b"{not json").unwrap_err();
        assert!(matches!(err, Error::CorruptObject { .. }), "{err}");
    }
}

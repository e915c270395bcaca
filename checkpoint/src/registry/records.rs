//! The records as stored: their keys under the registry root, the versioned
//! JSON they are written as (`manifest::decode_versioned`), and the blobs
//! (reference profile, TorchScript module, tokenizer) a version points at.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Result;

use super::REGISTRY_FORMAT_VERSION;
use super::types::{Alias, AliasTarget, AuditEntry, ModelVersion};
use super::validate::validate_segment;

/// A content-addressed blob a version points at.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(super) struct BlobRef {
    pub(super) key: String,
    pub(super) sha256: String,
    pub(super) bytes: u64,
}

impl BlobRef {
    /// Whether the key is the one `put_blob` makes for this content:
    /// `models/{name}/blobs/{sha256}.{kind}`, a valid model name, the
    /// recorded sha256 (64 lowercase hex digits), a known kind. A record
    /// cannot then point a read at any other object of the registry's root.
    pub(super) fn key_is_its_own(&self) -> bool {
        let Some(rest) = self.key.strip_prefix("models/") else {
            return false;
        };
        let Some((name, file)) = rest.split_once("/blobs/") else {
            return false;
        };
        let Some((sha, kind)) = file.split_once('.') else {
            return false;
        };
        validate_segment("model name", name).is_ok()
            && sha == self.sha256
            && sha.len() == 64
            && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && matches!(kind, "profile.json" | "torchscript.pt" | "tokenizer.json")
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct StoredVersion {
    pub(super) format_version: u32,
    #[serde(flatten)]
    pub(super) version: ModelVersion,
    pub(super) reference_profile: Option<BlobRef>,
    pub(super) torchscript: Option<BlobRef>,
    /// A language model's tokenizer; absent from records of format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) tokenizer: Option<BlobRef>,
    /// Unique to one registration attempt: two registrations never write the
    /// same bytes, which is how a retried put recognises its own.
    pub(super) registration_id: String,
}

#[derive(Serialize, Deserialize)]
pub(super) struct StoredAlias {
    pub(super) format_version: u32,
    #[serde(flatten)]
    pub(super) alias: Alias,
    /// Unique to one write, as compare-and-swap requires.
    pub(super) write_id: String,
}

#[derive(Serialize, Deserialize)]
pub(super) struct StoredAudit {
    pub(super) format_version: u32,
    #[serde(flatten)]
    pub(super) entry: AuditEntry,
    /// Unique to one append, so a retried put recognises its own entry.
    pub(super) entry_id: String,
}

pub(super) fn versions_prefix(name: &str) -> String {
    format!("models/{name}/versions")
}
pub(super) fn version_key(name: &str, version: u64) -> String {
    format!("models/{name}/versions/{version:020}.json")
}
pub(super) fn deleted_prefix(name: &str) -> String {
    format!("models/{name}/deleted")
}
pub(super) fn deleted_key(name: &str, version: u64) -> String {
    format!("models/{name}/deleted/{version:020}.json")
}
pub(super) fn aliases_prefix(name: &str) -> String {
    format!("models/{name}/aliases")
}
pub(super) fn alias_key(name: &str, alias: &str) -> String {
    format!("models/{name}/aliases/{alias}.json")
}
pub(super) fn history_prefix(name: &str) -> String {
    format!("models/{name}/history")
}
pub(super) fn history_key(name: &str, seq: u64) -> String {
    format!("models/{name}/history/{seq:020}.json")
}

/// The number in `{prefix}/{n:020}.json`, if `key` is such a key.
pub(super) fn numbered(prefix: &str, key: &str) -> Option<u64> {
    let n = key
        .strip_prefix(prefix)?
        .strip_prefix('/')?
        .strip_suffix(".json")?;
    (n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// Parses a record, refusing a newer format than this build reads.
pub(super) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    crate::manifest::decode_versioned("registry record", key, bytes, REGISTRY_FORMAT_VERSION)
}

pub(super) fn encode<T: Serialize>(value: &T) -> Bytes {
    // Cannot fail: string map keys, finite floats (validated), no custom
    // serializers that error.
    Bytes::from(serde_json::to_vec_pretty(value).expect("registry records serialize"))
}

/// An id no other writer, in this process or another, will produce.
pub(crate) fn unique_id() -> String {
    use std::hash::BuildHasher;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // RandomState is seeded from the operating system's randomness.
    let random = std::collections::hash_map::RandomState::new().hash_one(n);
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(nanos.to_le_bytes());
    h.update(n.to_le_bytes());
    h.update(random.to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

pub(super) fn targets_json(targets: &[AliasTarget]) -> serde_json::Value {
    serde_json::to_value(targets).expect("alias targets serialize")
}

pub(super) fn show_targets(targets: &[AliasTarget]) -> String {
    let parts: Vec<String> = targets
        .iter()
        .map(|t| format!("{}:{}%", t.version, t.weight))
        .collect();
    parts.join(", ")
}

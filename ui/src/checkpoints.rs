//! The Checkpoints page's figures: a root's manifests with their sizes, what
//! each save reused, the root's deduplication ratio, one manifest's tensors,
//! and verification results (kept per manifest for as long as the dashboard
//! runs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use kiln_checkpoint::load::{self, VerifyReport};
use kiln_checkpoint::manifest::Manifest;
use kiln_checkpoint::store::CheckpointRoot;
use serde::Serialize;

/// Manifests read to compute a root's deduplication ratio: the newest this many.
const MAX_MANIFESTS_READ: usize = 500;

/// One checkpoint of a root. The fields the manifest holds are `None` (or
/// zero) when it could not be read (see `error`).
#[derive(Debug, Clone, Serialize)]
pub struct ManifestRow {
    /// The manifest's key under the root (`manifests/{step}-{attempt}.json`).
    pub key: String,
    /// The step saved; from the key when the manifest could not be read.
    pub step: Option<u64>,
    /// The job that saved it.
    pub job: Option<String>,
    /// RFC 3339, UTC, of the commit.
    pub created_at: Option<String>,
    /// Ranks that saved it.
    pub world_size: Option<u32>,
    /// Tensors in the state.
    pub tensors: u64,
    /// Bytes of the state (decoded).
    pub raw_bytes: u64,
    /// Bytes of its chunks as stored (after compression).
    pub stored_bytes: u64,
    /// Stored bytes this save uploaded.
    pub uploaded_bytes: u64,
    /// Stored bytes it found already stored (content addressing).
    pub reused_bytes: u64,
    /// The codecs its ranks stored chunks with (`zstd`, `none`), sorted,
    /// without repeats.
    pub codec: Vec<String>,
    /// Manifest key of the checkpoint this one follows.
    pub parent: Option<String>,
    /// Whether the root's `latest` names it.
    pub is_latest: bool,
    /// Set when the manifest could not be read.
    pub error: Option<String>,
    /// The last verification from this dashboard, if any.
    pub verify: Option<VerifySummary>,
}

/// A root as the Checkpoints page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RootSummary {
    /// The checkpoint root's URL.
    pub url: String,
    /// Its newest manifests (at most 500), oldest step first.
    pub manifests: Vec<ManifestRow>,
    /// Sum of the raw bytes of every checkpoint listed.
    pub logical_bytes: u64,
    /// Stored bytes of the distinct chunks they reference.
    pub unique_stored_bytes: u64,
    /// `logical_bytes / unique_stored_bytes`: what content addressing and
    /// compression save together.
    pub dedup_ratio: Option<f64>,
}

/// The outcome of one verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifySummary {
    /// Whether every chunk read back and matched its address (false too
    /// when the verification could not run).
    pub ok: bool,
    /// RFC 3339, UTC, of the verification.
    pub at: String,
    /// Chunks read and checked.
    pub chunks_checked: usize,
    /// Decoded bytes of those chunks.
    pub raw_bytes_checked: u64,
    /// Chunks missing, unreadable or not matching their address.
    pub bad_chunks: usize,
    /// Tensors with at least one bad chunk.
    pub bad_tensors: Vec<String>,
    /// Set when the verification could not run (store unreachable).
    pub error: Option<String>,
}

impl VerifySummary {
    fn of(result: &Result<VerifyReport, String>) -> Self {
        let at = kiln_coordinator::status::now_rfc3339();
        match result {
            Ok(r) => VerifySummary {
                ok: r.ok(),
                at,
                chunks_checked: r.chunks_checked,
                raw_bytes_checked: r.raw_bytes_checked,
                bad_chunks: r.bad_chunks.len(),
                bad_tensors: r.bad_tensors.clone(),
                error: None,
            },
            Err(e) => VerifySummary {
                ok: false,
                at,
                chunks_checked: 0,
                raw_bytes_checked: 0,
                bad_chunks: 0,
                bad_tensors: Vec::new(),
                error: Some(e.clone()),
            },
        }
    }
}

/// Verification results by (root URL, manifest key).
#[derive(Debug, Default)]
pub struct VerifyResults {
    results: Mutex<HashMap<(String, String), VerifySummary>>,
}

impl VerifyResults {
    fn get(&self, root: &str, key: &str) -> Option<VerifySummary> {
        let results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        results.get(&(root.to_string(), key.to_string())).cloned()
    }

    fn put(&self, root: &str, key: &str, summary: VerifySummary) {
        let mut results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        results.insert((root.to_string(), key.to_string()), summary);
    }
}

/// Lists a root's manifests, oldest step first, with the dedup ratio.
pub async fn root_summary(
    url: &str,
    verified: &VerifyResults,
) -> Result<RootSummary, kiln_checkpoint::Error> {
    let root = CheckpointRoot::open(url)?;
    let latest = match load::read_latest(&root).await {
        Ok(l) => Some(l.manifest),
        Err(_) => None,
    };
    let mut objects = match root.list("manifests").await {
        Ok(objects) => objects,
        Err(kiln_checkpoint::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let skip = objects.len().saturating_sub(MAX_MANIFESTS_READ);
    let mut rows = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut logical_bytes = 0u64;
    let mut unique_stored_bytes = 0u64;
    for o in objects.into_iter().skip(skip) {
        let is_latest = latest.as_deref() == Some(o.key.as_str());
        let verify = verified.get(url, &o.key);
        match load::read_manifest(&root, &o.key).await {
            Ok(m) => {
                logical_bytes += m.totals.raw_bytes;
                for t in &m.tensors {
                    for c in &t.chunks {
                        if seen.insert(c.key.clone()) {
                            unique_stored_bytes += c.stored_len;
                        }
                    }
                }
                rows.push(ManifestRow {
                    step: Some(m.step),
                    job: Some(m.job.clone()),
                    created_at: Some(m.created_at.clone()),
                    world_size: Some(m.world_size),
                    tensors: m.totals.tensors,
                    raw_bytes: m.totals.raw_bytes,
                    stored_bytes: m.totals.stored_bytes,
                    uploaded_bytes: m.totals.uploaded_bytes,
                    reused_bytes: m
                        .totals
                        .stored_bytes
                        .saturating_sub(m.totals.uploaded_bytes),
                    codec: codecs(&m),
                    parent: m.parent.clone(),
                    is_latest,
                    error: None,
                    verify,
                    key: o.key,
                });
            }
            Err(e) => rows.push(ManifestRow {
                step: kiln_checkpoint::manifest::step_of_manifest_key(&o.key),
                job: None,
                created_at: None,
                world_size: None,
                tensors: 0,
                raw_bytes: 0,
                stored_bytes: 0,
                uploaded_bytes: 0,
                reused_bytes: 0,
                codec: Vec::new(),
                parent: None,
                is_latest,
                error: Some(e.to_string()),
                verify,
                key: o.key,
            }),
        }
    }
    rows.sort_by(|a, b| (a.step, &a.created_at).cmp(&(b.step, &b.created_at)));
    Ok(RootSummary {
        url: url.to_string(),
        manifests: rows,
        logical_bytes,
        unique_stored_bytes,
        dedup_ratio: (unique_stored_bytes > 0)
            .then(|| logical_bytes as f64 / unique_stored_bytes as f64),
    })
}

fn codecs(m: &Manifest) -> Vec<String> {
    let mut out: Vec<String> = m
        .compression
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .ok()
                .and_then(|v| v.get("codec").and_then(|c| c.as_str()).map(String::from))
                .unwrap_or_default()
        })
        .filter(|c| !c.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// One tensor of a manifest.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRow {
    /// The tensor's name in the state (`model/fc0.weight`, `optim/...`).
    pub name: String,
    /// Its element type (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Bytes of its data (decoded).
    pub raw_bytes: u64,
    /// Bytes of its chunks as stored.
    pub stored_bytes: u64,
    /// Chunks it is split into.
    pub chunks: usize,
}

/// One manifest, as its page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestDetail {
    /// The checkpoint root's URL.
    pub url: String,
    /// The manifest's key under the root.
    pub key: String,
    /// The step saved.
    pub step: u64,
    /// The job that saved it.
    pub job: String,
    /// The id all ranks of the saving run agreed on (the trainer's run id).
    pub attempt: String,
    /// RFC 3339, UTC, of the commit.
    pub created_at: String,
    /// Manifest key of the checkpoint this one follows.
    pub parent: Option<String>,
    /// Ranks that saved it.
    pub world_size: u32,
    /// The code version the job recorded.
    pub code_version: String,
    /// The dataset fingerprint the job recorded.
    pub dataset_fingerprint: String,
    /// Metrics saved with the checkpoint (`loss`, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Tensor, chunk and byte totals.
    pub totals: kiln_checkpoint::manifest::Totals,
    /// Its tensors, sorted by name.
    pub tensors: Vec<TensorRow>,
    /// The last verification from this dashboard, if any.
    pub verify: Option<VerifySummary>,
}

/// One manifest's tensors and provenance.
pub async fn manifest_detail(
    url: &str,
    key: &str,
    verified: &VerifyResults,
) -> Result<ManifestDetail, kiln_checkpoint::Error> {
    let root = CheckpointRoot::open(url)?;
    let m = load::read_manifest(&root, key).await?;
    let tensors = m
        .tensors
        .iter()
        .map(|t| TensorRow {
            name: t.name.clone(),
            dtype: format!("{:?}", t.dtype),
            shape: t.shape.clone(),
            raw_bytes: t.raw_len,
            stored_bytes: t.chunks.iter().map(|c| c.stored_len).sum(),
            chunks: t.chunks.len(),
        })
        .collect();
    Ok(ManifestDetail {
        url: url.to_string(),
        key: key.to_string(),
        step: m.step,
        job: m.job.clone(),
        attempt: m.attempt.clone(),
        created_at: m.created_at.clone(),
        parent: m.parent.clone(),
        world_size: m.world_size,
        code_version: m.code_version.clone(),
        dataset_fingerprint: m.dataset_fingerprint.clone(),
        metrics: m.metrics.clone(),
        totals: m.totals.clone(),
        tensors,
        verify: verified.get(url, key),
    })
}

/// Re-reads and checks every chunk of one manifest (on a blocking thread)
/// and remembers the outcome.
pub async fn verify(url: &str, key: &str, verified: &VerifyResults) -> VerifySummary {
    let (u, k) = (url.to_string(), key.to_string());
    let result = tokio::task::spawn_blocking(move || -> Result<VerifyReport, String> {
        let root = CheckpointRoot::open(&u).map_err(|e| e.to_string())?;
        let manifest = load::resolve(&root, &k).map_err(|e| e.to_string())?;
        load::verify(&root, &manifest).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("verification stopped: {e}")));
    let summary = VerifySummary::of(&result);
    verified.put(url, key, summary.clone());
    summary
}

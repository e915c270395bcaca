//! Retention and garbage collection (lists: tools only, never loads).
//!
//! Kept manifests: the `keep_last` newest by step, every one whose step is a
//! multiple of `keep_every`, the one `latest` names, every one of a pinned
//! step (a registered model version, see [`crate::pin`]), the head of every
//! branch (below), and any younger than the grace period (a commit in
//! progress). The collector deletes the other manifests first, then every
//! chunk that no kept manifest references, that no part younger than the
//! grace period references (a save in progress), and whose last modification
//! is older than the grace period (a save in progress that has not written
//! its part yet). Parts older than the grace period are deleted too: they
//! only matter until their commit.
//!
//! # Branches
//!
//! A run resumed from an older step (`--resume STEP`) starts a branch: its
//! first manifest's `parent` is that step's manifest, and `latest` stays on
//! the other line until the branch passes its step. A branch's head is a
//! manifest no other manifest descends from, through `parent` links; heads
//! are kept like `latest`. Deleting a manifest would cut the links through
//! it, and an ancestor whose descendants were all deleted would look like a
//! head; so before a manifest that lies between kept ones is deleted, its
//! link is recorded as an empty object
//! `lineage/{step:020}-{attempt}/{parent step:020}-{parent attempt}`, and
//! records nothing needs any more are deleted. A manifest a crash left
//! behind before `latest` moved to it is a head too (a complete checkpoint
//! nothing continued from), kept until deleted by hand.
//!
//! # Against registrations
//!
//! A collection writes its marker (`gc/{id}.json`) before it lists anything
//! and reads the pins after listing the manifests; [`crate::pin`] says why a
//! registration then never loses its checkpoint. A dry run writes no marker.
//!
//! The grace period must exceed the time between two saves plus the time a
//! save takes: a save may reference (not re-upload) a chunk its previous save
//! uploaded, and the previous save's part is what protects it until the new
//! part or manifest is written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::load::{read_latest, read_manifest};
use crate::manifest::{Manifest, PartRecord};
use crate::pin::{Collection, FoundPin, list_pins};
use crate::store::{CheckpointRoot, ListedObject, block_on};

const CONCURRENCY: usize = 16;

/// The folder of the links of deleted manifests (see the module docs).
pub const LINEAGE_PREFIX: &str = "lineage";

/// Which checkpoints to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The newest this many manifests, by step, are kept.
    pub keep_last: usize,
    /// Every manifest whose step is a multiple of this is kept too (`None`
    /// or 0: none).
    pub keep_every: Option<u64>,
}

/// What a collection did (or would do, on a dry run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Nothing was deleted: the report says what a collection would do.
    pub dry_run: bool,
    /// Keys of the manifests kept, oldest step first.
    pub manifests_kept: Vec<String>,
    /// Keys of the manifests deleted (or to be deleted).
    pub manifests_deleted: Vec<String>,
    /// Manifests that could not be parsed: left alone, reported.
    pub manifests_unreadable: Vec<String>,
    /// The pins found, each with the manifests it keeps.
    pub pins: Vec<PinReport>,
    /// Kept manifests that are the head of a branch (nothing descends from
    /// them), `latest`'s included.
    pub branch_heads: Vec<String>,
    /// Chunks a kept manifest or a recent part references.
    pub chunks_kept: usize,
    /// Unreferenced but younger than the grace period.
    pub chunks_in_grace: usize,
    /// Unreferenced chunks older than the grace period, deleted.
    pub chunks_deleted: usize,
    /// Stored bytes of the deleted chunks and staging files.
    pub bytes_freed: u64,
    /// Parts older than the grace period, deleted.
    pub parts_deleted: usize,
    /// Local roots: staging files (`name#digits`) of writes a crash cut
    /// short, older than the grace period; listings never show them.
    pub staging_files_deleted: usize,
}

/// One pin and what it keeps.
#[derive(Debug, Clone, Serialize)]
pub struct PinReport {
    /// The pin as found.
    #[serde(flatten)]
    pub pin: FoundPin,
    /// The manifests of the pinned step (none: the step's checkpoint is
    /// already gone).
    pub keeps: Vec<String>,
    /// Their stored bytes (chunks shared with other checkpoints counted in
    /// each).
    pub stored_bytes: u64,
}

/// Applies `retention` under `root`; see the module docs.
pub fn gc(
    root: &CheckpointRoot,
    retention: &Retention,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport> {
    block_on(gc_async(root, *retention, grace, dry_run))
}

/// [`gc`], for async callers.
pub async fn gc_async(
    root: &CheckpointRoot,
    retention: Retention,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport> {
    let grace = chrono::Duration::from_std(grace)
        .map_err(|_| Error::invalid(format!("grace {grace:?} is too long")))?;
    if dry_run {
        return collect(root, retention, grace, true).await;
    }
    // Announced before anything is listed: a registration that pins a step
    // while this runs waits for it (crate::pin).
    let collection = Collection::begin(root).await?;
    let report = collect(root, retention, grace, false).await;
    collection.end().await;
    report
}

async fn collect(
    root: &CheckpointRoot,
    retention: Retention,
    grace: chrono::Duration,
    dry_run: bool,
) -> Result<GcReport> {
    let cutoff = chrono::Utc::now() - grace;
    let mut report = GcReport {
        dry_run,
        ..Default::default()
    };
    let latest = match read_latest(root).await {
        Ok(l) => Some(l.manifest),
        Err(Error::NotFound { .. }) => None,
        Err(e @ Error::CorruptObject { .. }) => {
            // keep_last still keeps the newest; the next commit replaces it.
            tracing::warn!(error = %e, "latest is unreadable; gc goes by retention alone");
            None
        }
        Err(e) => return Err(e),
    };

    let listed = root.list("manifests").await?;
    let root_arc = Arc::new(root.clone());
    let read: Vec<_> = futures::stream::iter(listed)
        .map(|o| {
            let root = root_arc.clone();
            async move {
                let m = read_manifest(&root, &o.key).await;
                (o, m)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut manifests: Vec<(ListedObject, Manifest)> = Vec::new();
    for (o, m) in read {
        match m {
            Ok(m) => manifests.push((o, m)),
            Err(e @ (Error::CorruptObject { .. } | Error::Unsupported { .. })) => {
                tracing::warn!(manifest = %o.key, error = %e, "gc leaves an unreadable manifest alone");
                report.manifests_unreadable.push(o.key);
            }
            // Deleted since the listing: nothing to keep.
            Err(Error::NotFound { .. }) => {}
            // Without every manifest we cannot know which chunks are needed.
            Err(e) => return Err(e),
        }
    }
    // After the manifests were listed (crate::pin).
    let pins = list_pins(root).await?;
    let pinned: HashSet<u64> = pins.iter().map(|p| p.step).collect();
    let lineage = read_lineage(root).await?;

    manifests.sort_by(|(_, a), (_, b)| (a.step, &a.created_at).cmp(&(b.step, &b.created_at)));
    let mut parents: HashMap<String, String> = lineage.clone();
    for (_, m) in &manifests {
        if let Some(p) = &m.parent {
            parents.insert(m.key.clone(), p.clone());
        }
    }
    let existing: HashSet<&str> = manifests.iter().map(|(_, m)| m.key.as_str()).collect();
    let ancestors = ancestors_of(existing.iter().copied(), &parents);
    let n = manifests.len();
    let mut keep = vec![false; n];
    for (i, (o, m)) in manifests.iter().enumerate() {
        let head = !ancestors.contains(m.key.as_str());
        if head {
            report.branch_heads.push(m.key.clone());
        }
        keep[i] = i + retention.keep_last >= n
            || retention
                .keep_every
                .is_some_and(|k| k > 0 && m.step % k == 0)
            || latest.as_deref() == Some(m.key.as_str())
            || pinned.contains(&m.step)
            || head
            || o.last_modified > cutoff;
    }
    let mut protected: HashSet<String> = HashSet::new();
    let mut doomed = Vec::new();
    let mut by_step: BTreeMap<u64, Vec<&Manifest>> = BTreeMap::new();
    for ((_, m), kept) in manifests.iter().zip(&keep) {
        if *kept {
            protected.extend(m.chunk_keys().map(str::to_string));
            report.manifests_kept.push(m.key.clone());
            by_step.entry(m.step).or_default().push(m);
        } else {
            doomed.push(m.key.clone());
        }
    }
    report.pins = pins
        .into_iter()
        .map(|pin| {
            let kept = by_step.get(&pin.step).map(Vec::as_slice).unwrap_or(&[]);
            PinReport {
                keeps: kept.iter().map(|m| m.key.clone()).collect(),
                stored_bytes: kept.iter().map(|m| m.totals.stored_bytes).sum(),
                pin,
            }
        })
        .collect();

    // Links through the manifests about to go, so that heads stay heads.
    let kept_keys: HashSet<&str> = report.manifests_kept.iter().map(String::as_str).collect();
    let needed = needed_links(&kept_keys, &parents);
    let new_links: Vec<String> = doomed
        .iter()
        .filter(|k| needed.contains(k.as_str()) && !lineage.contains_key(*k))
        .filter_map(|k| lineage_key(k, parents.get(k)?))
        .collect();
    let stale_links: Vec<String> = lineage
        .iter()
        .filter(|(k, _)| !needed.contains(k.as_str()))
        .filter_map(|(k, p)| lineage_key(k, p))
        .collect();
    if !dry_run {
        put_all(root, &new_links).await?;
        delete_all(root, &doomed).await?;
        delete_all(root, &stale_links).await?;
    }
    report.manifests_deleted = doomed;

    // Parts: young ones protect their chunks (saves in progress), old ones go.
    let mut old_parts = Vec::new();
    for o in root.list("parts").await? {
        if o.last_modified > cutoff {
            if let Some(b) = root.get_opt(&o.key).await? {
                match PartRecord::from_json(&o.key, &b) {
                    Ok(p) => protected.extend(p.chunks.into_iter().map(|c| c.key)),
                    Err(e) => tracing::warn!(part = %o.key, error = %e, "unreadable part"),
                }
            }
        } else {
            old_parts.push(o.key);
        }
    }
    report.parts_deleted = old_parts.len();
    if !dry_run {
        delete_all(root, &old_parts).await?;
    }

    let mut doomed_chunks = Vec::new();
    for o in root.list("chunks").await? {
        if protected.contains(&o.key) {
            report.chunks_kept += 1;
        } else if o.last_modified > cutoff {
            report.chunks_in_grace += 1;
        } else {
            report.bytes_freed += o.size;
            doomed_chunks.push(o.key);
        }
    }
    report.chunks_deleted = doomed_chunks.len();
    if !dry_run {
        delete_all(root, &doomed_chunks).await?;
    }
    if let Some(dir) = root.local_dir() {
        let (count, bytes) =
            stale_staging_files(&dir.join("chunks"), grace, dry_run).map_err(|source| {
                Error::Io {
                    op: "clean staging files under",
                    path: dir.join("chunks").display().to_string(),
                    source,
                }
            })?;
        report.staging_files_deleted = count;
        report.bytes_freed += bytes;
    }
    tracing::info!(
        dry_run,
        manifests_deleted = report.manifests_deleted.len(),
        chunks_deleted = report.chunks_deleted,
        bytes_freed = report.bytes_freed,
        pins = report.pins.len(),
        "checkpoint gc"
    );
    Ok(report)
}

// ----- branches -----

/// Every manifest key some manifest in `from` descends from, following
/// `parents` (manifests' own links and recorded ones).
fn ancestors_of<'a>(
    from: impl Iterator<Item = &'a str>,
    parents: &'a HashMap<String, String>,
) -> HashSet<&'a str> {
    let mut seen: HashSet<&str> = HashSet::new();
    for key in from {
        let mut next = parents.get(key);
        while let Some(p) = next {
            if !seen.insert(p.as_str()) {
                break; // walked from here already
            }
            next = parents.get(p);
        }
    }
    seen
}

/// The deleted or doomed manifests whose links must be recorded: those a
/// kept manifest descends from through them to another kept manifest.
fn needed_links(kept: &HashSet<&str>, parents: &HashMap<String, String>) -> HashSet<String> {
    let mut needed = HashSet::new();
    for key in kept {
        // The chain below `key` up to the next kept manifest.
        let mut between: Vec<&str> = Vec::new();
        let mut next = parents.get(*key);
        while let Some(p) = next {
            if kept.contains(p.as_str()) {
                needed.extend(between.drain(..).map(str::to_string));
                break;
            }
            if between.len() > parents.len() {
                break; // a cycle: only a damaged store has one
            }
            between.push(p.as_str());
            next = parents.get(p);
        }
    }
    needed
}

/// `lineage/{child}/{parent}` for the manifest keys `manifests/{child}.json`
/// and `manifests/{parent}.json`.
fn lineage_key(child: &str, parent: &str) -> Option<String> {
    let name = |k: &str| {
        let n = k.strip_prefix("manifests/")?.strip_suffix(".json")?;
        (!n.is_empty() && !n.contains('/')).then(|| n.to_string())
    };
    Some(format!(
        "{LINEAGE_PREFIX}/{}/{}",
        name(child)?,
        name(parent)?
    ))
}

/// The recorded links: deleted manifest key to its parent's key.
async fn read_lineage(root: &CheckpointRoot) -> Result<HashMap<String, String>> {
    let mut links = HashMap::new();
    for o in root.list(LINEAGE_PREFIX).await? {
        let parsed = o
            .key
            .strip_prefix(LINEAGE_PREFIX)
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.split_once('/'))
            .filter(|(c, p)| !c.is_empty() && !p.is_empty() && !p.contains('/'));
        match parsed {
            Some((child, parent)) => {
                links.insert(
                    format!("manifests/{child}.json"),
                    format!("manifests/{parent}.json"),
                );
            }
            None => tracing::warn!(key = %o.key, "not a lineage record; ignored"),
        }
    }
    Ok(links)
}

async fn put_all(root: &CheckpointRoot, keys: &[String]) -> Result<()> {
    let results: Vec<Result<()>> = futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let root = root.clone();
            async move {
                root.put(&k, bytes::Bytes::new(), object_store::PutMode::Overwrite)
                    .await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Finds (and unless `dry_run` deletes) the staging files under the local
/// `chunks` folder older than `grace`: what a write killed before its rename
/// leaves (`crate::store::staging_name`). Returns their count and bytes.
fn stale_staging_files(
    chunks: &std::path::Path,
    grace: chrono::Duration,
    dry_run: bool,
) -> std::io::Result<(usize, u64)> {
    let grace = grace.to_std().unwrap_or_default();
    let (mut count, mut bytes) = (0, 0);
    let Ok(prefixes) = std::fs::read_dir(chunks) else {
        return Ok((0, 0)); // no chunk written yet
    };
    for prefix in prefixes {
        let prefix = prefix?;
        if !prefix.file_type()?.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(prefix.path())? {
            let file = file?;
            let staging = file
                .file_name()
                .to_str()
                .is_some_and(crate::store::is_staging_name);
            let meta = file.metadata()?;
            let age = meta.modified()?.elapsed().unwrap_or_default();
            if staging && meta.is_file() && age > grace {
                count += 1;
                bytes += meta.len();
                if !dry_run {
                    std::fs::remove_file(file.path())?;
                }
            }
        }
    }
    Ok((count, bytes))
}

async fn delete_all(root: &CheckpointRoot, keys: &[String]) -> Result<()> {
    let results: Vec<Result<()>> = futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let root = root.clone();
            async move { root.delete(&k).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

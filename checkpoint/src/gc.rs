//! Retention and garbage collection (lists: tools only, never loads).
//!
//! Kept manifests: the `keep_last` newest by step, every one whose step is a
//! multiple of `keep_every`, the one `latest` names, and any younger than the
//! grace period (a commit in progress). The collector deletes the other
//! manifests first, then every chunk that no kept manifest references, that
//! no part younger than the grace period references (a save in progress),
//! and whose last modification is older than the grace period (a save in
//! progress that has not written its part yet). Parts older than the grace
//! period are deleted too: they only matter until their commit.
//!
//! The grace period must exceed the time between two saves plus the time a
//! save takes: a save may reference (not re-upload) a chunk its previous save
//! uploaded, and the previous save's part is what protects it until the new
//! part or manifest is written.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::load::{read_latest, read_manifest};
use crate::manifest::{Manifest, PartRecord};
use crate::store::{CheckpointRoot, block_on};

const CONCURRENCY: usize = 16;

/// Which checkpoints to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: usize,
    pub keep_every: Option<u64>,
}

/// What a collection did (or would do, on a dry run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub manifests_kept: Vec<String>,
    pub manifests_deleted: Vec<String>,
    /// Manifests that could not be parsed: left alone, reported.
    pub manifests_unreadable: Vec<String>,
    pub chunks_kept: usize,
    /// Unreferenced but younger than the grace period.
    pub chunks_in_grace: usize,
    pub chunks_deleted: usize,
    pub bytes_freed: u64,
    pub parts_deleted: usize,
    /// Local roots: staging files (`name#digits`) of writes a crash cut
    /// short, older than the grace period; listings never show them.
    pub staging_files_deleted: usize,
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

pub async fn gc_async(
    root: &CheckpointRoot,
    retention: Retention,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport> {
    let grace = chrono::Duration::from_std(grace)
        .map_err(|_| Error::invalid(format!("grace {grace:?} is too long")))?;
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
    let mut manifests: Vec<(crate::store::ListedObject, Manifest)> = Vec::new();
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
    manifests.sort_by(|(_, a), (_, b)| (a.step, &a.created_at).cmp(&(b.step, &b.created_at)));
    let n = manifests.len();
    let mut keep = vec![false; n];
    for (i, (o, m)) in manifests.iter().enumerate() {
        keep[i] = i + retention.keep_last >= n
            || retention
                .keep_every
                .is_some_and(|k| k > 0 && m.step % k == 0)
            || latest.as_deref() == Some(m.key.as_str())
            || o.last_modified > cutoff;
    }
    let mut protected: HashSet<String> = HashSet::new();
    let mut doomed = Vec::new();
    for ((_, m), kept) in manifests.iter().zip(&keep) {
        if *kept {
            protected.extend(m.chunk_keys().map(str::to_string));
            report.manifests_kept.push(m.key.clone());
        } else {
            doomed.push(m.key.clone());
        }
    }
    if !dry_run {
        delete_all(root, &doomed).await?;
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
        "checkpoint gc"
    );
    Ok(report)
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

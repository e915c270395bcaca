//! Where the dashboard finds jobs: a coordination store (every job with a
//! status under its keyspace) and run folders (`DATA_DIR/jobs/{job}/` with the
//! `status.json` and `history.json` a finished `kiln run` leaves). A job in
//! both is shown from the store, which is the live record.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::status::JobStatus;
use kiln_coordinator::store::Store;
use serde::Serialize;

use crate::history::JobHistory;
use crate::recorder::{HISTORY_FILE, STATUS_FILE, extra, history_key};

/// The places jobs are read from.
#[derive(Clone, Default)]
pub struct JobSources {
    /// The coordination store and the keyspace its jobs live under; `None`:
    /// run folders only.
    pub store: Option<(Arc<dyn Store>, Keyspace)>,
    /// `kiln run` data folders (`--data-dir`).
    pub data_dirs: Vec<PathBuf>,
}

/// One line of the Jobs page.
#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    /// The job's id.
    pub job: String,
    /// `pending`, `running`, `waiting`, `succeeded`, `failed` or `cancelled`.
    pub phase: String,
    /// Ranks in the current (or last) round.
    pub world_size: u32,
    /// The current rendezvous round (0: none yet).
    pub round: u64,
    /// Last completed training step.
    pub step: u64,
    /// `train.steps` of the spec.
    pub total_steps: u64,
    /// Training loss at `step`; `None` when not reported or not finite.
    pub loss: Option<f64>,
    /// Global samples per second at the last recorded step, when recorded.
    pub throughput: Option<f64>,
    /// Step of the last committed checkpoint.
    pub last_checkpoint: Option<u64>,
    /// RFC 3339, UTC.
    pub started_at: Option<String>,
    /// RFC 3339, UTC; `None` while the job runs.
    pub finished_at: Option<String>,
    /// RFC 3339, UTC, of the record's last change.
    pub updated_at: Option<String>,
    /// `store` or the run folder it was read from.
    pub source: String,
}

impl JobRow {
    fn of(s: &JobStatus, source: &str) -> Self {
        JobRow {
            job: s.job.clone(),
            phase: s.phase.as_str().to_string(),
            world_size: s.world_size,
            round: s.round,
            step: s.step,
            total_steps: s.total_steps,
            loss: s.loss.filter(|l| l.is_finite()),
            throughput: s.extra.get(extra::THROUGHPUT).and_then(|v| v.as_f64()),
            last_checkpoint: s.last_checkpoint.as_ref().map(|c| c.step),
            started_at: s.started_at.clone(),
            finished_at: s.finished_at.clone(),
            updated_at: s.updated_at.clone(),
            source: source.to_string(),
        }
    }
}

/// Everything the Job page shows but its logs.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    /// The job's record.
    pub status: JobStatus,
    /// The spec as accepted (JSON), when known (from the store only).
    pub spec: Option<serde_json::Value>,
    /// `store` or the run folder it was read from.
    pub source: String,
}

/// Why a job could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The store could not be read, or a job record (from the store or a
    /// run folder's `status.json`) does not parse.
    #[error("{0}")]
    Store(#[from] kiln_coordinator::Error),
    /// A run folder's file, or a history in the store, could not be read or
    /// parsed.
    #[error("read {path}: {error}")]
    File {
        /// The file's path, or the store key.
        path: String,
        /// What went wrong.
        error: String,
    },
}

impl JobSources {
    /// Every job, newest first (by start, then by name).
    pub async fn list(&self) -> Result<Vec<JobRow>, JobsError> {
        let mut rows: Vec<JobRow> = Vec::new();
        if let Some((store, ks)) = &self.store {
            let (kvs, _) = store.get_prefix(&ks.jobs_prefix()).await?;
            for kv in kvs {
                let Some(job) = ks.parse_job_leaf(&kv.key, "status") else {
                    continue;
                };
                match JobStatus::from_json(&kv.key, &kv.value) {
                    Ok(s) => rows.push(JobRow::of(&s, "store")),
                    Err(e) => tracing::warn!(job, "unreadable job status: {e}"),
                }
            }
        }
        for (status, dir) in self.folder_statuses() {
            if !rows.iter().any(|r| r.job == status.job) {
                rows.push(JobRow::of(&status, &dir.display().to_string()));
            }
        }
        rows.sort_by(|a, b| {
            (b.started_at.as_deref(), &a.job).cmp(&(a.started_at.as_deref(), &b.job))
        });
        Ok(rows)
    }

    /// One job's status and spec, or `None` when no source knows it.
    pub async fn job(&self, job: &str) -> Result<Option<JobDetail>, JobsError> {
        if let Some((store, ks)) = &self.store
            && let Some(status) = kiln_coordinator::status::read(&**store, ks, job).await?
        {
            let spec = store
                .get(&ks.job_spec(job))
                .await?
                .and_then(|kv| serde_json::from_slice(&kv.value).ok());
            return Ok(Some(JobDetail {
                status,
                spec,
                source: "store".into(),
            }));
        }
        for dir in self.run_folders(job) {
            let path = dir.join(STATUS_FILE);
            if let Some(bytes) = read_optional(&path)? {
                let status = JobStatus::from_json(&path.display().to_string(), &bytes)?;
                return Ok(Some(JobDetail {
                    status,
                    spec: None,
                    source: dir.display().to_string(),
                }));
            }
        }
        Ok(None)
    }

    /// The job's history, from the store or its run folder.
    pub async fn history(&self, job: &str) -> Result<Option<JobHistory>, JobsError> {
        if let Some((store, ks)) = &self.store
            && let Some(kv) = store.get(&history_key(ks, job)).await?
        {
            return serde_json::from_slice(&kv.value)
                .map(Some)
                .map_err(|e| JobsError::File {
                    path: kv.key,
                    error: e.to_string(),
                });
        }
        for dir in self.run_folders(job) {
            let path = dir.join(HISTORY_FILE);
            if let Some(bytes) = read_optional(&path)? {
                return serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| JobsError::File {
                        path: path.display().to_string(),
                        error: e.to_string(),
                    });
            }
        }
        Ok(None)
    }

    /// Every checkpoint root and registry the jobs recorded.
    pub async fn recorded_locations(&self) -> (Vec<String>, Vec<String>) {
        let mut roots = Vec::new();
        let mut registries = Vec::new();
        let mut statuses: Vec<JobStatus> =
            self.folder_statuses().into_iter().map(|(s, _)| s).collect();
        if let Some((store, ks)) = &self.store
            && let Ok((kvs, _)) = store.get_prefix(&ks.jobs_prefix()).await
        {
            statuses.extend(kvs.iter().filter_map(|kv| {
                ks.parse_job_leaf(&kv.key, "status")?;
                JobStatus::from_json(&kv.key, &kv.value).ok()
            }));
        }
        for s in statuses {
            for (name, list) in [
                (extra::CHECKPOINT_ROOT, &mut roots),
                (extra::REGISTRY, &mut registries),
            ] {
                if let Some(url) = s.extra.get(name).and_then(|v| v.as_str())
                    && !list.iter().any(|u| u == url)
                {
                    list.push(url.to_string());
                }
            }
        }
        (roots, registries)
    }

    fn run_folders(&self, job: &str) -> Vec<PathBuf> {
        if kiln_coordinator::keyspace::validate_name("job", job).is_err() {
            return Vec::new();
        }
        self.data_dirs
            .iter()
            .map(|d| d.join("jobs").join(job))
            .collect()
    }

    /// The `status.json` of every run folder.
    fn folder_statuses(&self) -> Vec<(JobStatus, PathBuf)> {
        let mut out = Vec::new();
        for data in &self.data_dirs {
            let Ok(entries) = std::fs::read_dir(data.join("jobs")) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path().join(STATUS_FILE);
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                match JobStatus::from_json(&path.display().to_string(), &bytes) {
                    Ok(s) => out.push((s, entry.path())),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        out
    }
}

fn read_optional(path: &std::path::Path) -> Result<Option<Vec<u8>>, JobsError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JobsError::File {
            path: path.display().to_string(),
            error: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_coordinator::status::{self, Phase};
    use kiln_coordinator::store::mem::MemStore;

    #[tokio::test]
    async fn lists_store_jobs_and_finished_run_folders() {
        let store: Arc<dyn Store> = MemStore::new();
        let ks = Keyspace::default();
        status::update(&*store, &ks, "live", |s| {
            s.set_phase(Phase::Running);
            s.step = 5;
            s.extra.insert(extra::THROUGHPUT.into(), 100.0.into());
        })
        .await
        .unwrap();
        let data = tempfile::tempdir().unwrap();
        let folder = data.path().join("jobs/old");
        std::fs::create_dir_all(&folder).unwrap();
        let mut old = JobStatus::new("old");
        old.set_phase(Phase::Succeeded);
        std::fs::write(folder.join(STATUS_FILE), old.to_json()).unwrap();
        // The same job in the store and a folder shows once, from the store.
        let dup = data.path().join("jobs/live");
        std::fs::create_dir_all(&dup).unwrap();
        std::fs::write(dup.join(STATUS_FILE), JobStatus::new("live").to_json()).unwrap();

        let sources = JobSources {
            store: Some((store, ks)),
            data_dirs: vec![data.path().to_path_buf()],
        };
        let rows = sources.list().await.unwrap();
        let names: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.job.as_str(), r.phase.as_str()))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&("live", "running")));
        assert!(names.contains(&("old", "succeeded")));
        let live = rows.iter().find(|r| r.job == "live").unwrap();
        assert_eq!(
            (live.step, live.throughput, live.source.as_str()),
            (5, Some(100.0), "store")
        );
        assert_eq!(
            sources.job("old").await.unwrap().unwrap().status.phase,
            Phase::Succeeded
        );
        assert!(sources.job("nope").await.unwrap().is_none());
        assert!(sources.job("../etc").await.unwrap().is_none());
    }
}

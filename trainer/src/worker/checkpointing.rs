//! The worker's side of checkpoints: resuming, the round's
//! `CheckpointManager` (whose policy lives in `kiln-checkpoint`), and
//! reporting what became of background saves.

use std::time::Duration;

use anyhow::{Context, Result};
use kiln_checkpoint::{
    CheckpointManager, CheckpointMeta, CheckpointPolicy, CheckpointRoot, Manifest, OwnedTensor,
    Retention, SaveConfig, SaveEvent,
};
use kiln_proto::spec::JobSpec;
use kiln_proto::worker::{Assignment, CheckpointSaved, Warning, worker_message::Kind as Report};

use super::channel::Reporter;

/// Loads what `--resume` names: `latest` falls back to the newest checkpoint
/// that verifies (with warnings saying what was skipped).
pub(super) fn load_for_resume(
    root: &CheckpointRoot,
    which: &str,
) -> Result<(Manifest, Vec<OwnedTensor>, Vec<String>)> {
    if which == "latest" {
        let (m, t, warnings) =
            kiln_checkpoint::load_latest_verified(root, |_| true).with_context(|| {
                format!(
                    "load the latest checkpoint that verifies under {}",
                    root.url()
                )
            })?;
        Ok((m, t, warnings))
    } else {
        let m = kiln_checkpoint::resolve(root, which)
            .with_context(|| format!("find checkpoint {which} under {}", root.url()))?;
        let t = kiln_checkpoint::load(root, &m, |_| true)
            .with_context(|| format!("load checkpoint {}", m.key))?;
        Ok((m, t, Vec::new()))
    }
}

/// The checkpoint manager of one round: where saves go, the save pipeline's
/// settings, and the spec's policy (interval, failure budget, retention).
pub(super) fn checkpoint_manager(
    spec: &JobSpec,
    a: &Assignment,
    rank: usize,
    world: usize,
    fingerprint: &str,
) -> Result<CheckpointManager> {
    let root = CheckpointRoot::open(&a.checkpoint_url)
        .with_context(|| format!("open checkpoint root {}", a.checkpoint_url))?;
    let cfg = SaveConfig {
        compression_level: spec.checkpoint.compression_level,
        chunk_bytes: ((spec.checkpoint.chunk_mb * (1 << 20) as f64) as usize).max(4096),
        // The node's cores are shared by its workers, as for training.
        threads: (std::thread::available_parallelism().map_or(1, |n| n.get())
            / spec.workers.nproc.max(1))
        .max(1),
        compression: spec
            .checkpoint
            .compression
            .parse()
            .context("checkpoint.compression")?,
        // Hashing and compression use only the cores training leaves idle.
        low_priority: true,
        // A save of an elastic round that broke waits for parts that will
        // never come; it gives up sooner than a save of a healthy job.
        commit_timeout: if a.elastic {
            Duration::from_secs(60)
        } else {
            SaveConfig::default().commit_timeout
        },
        ..SaveConfig::default()
    };
    let meta = CheckpointMeta {
        training_state: serde_json::Value::Null,
        job_spec: serde_json::from_str(&a.spec_json).context("job spec as JSON")?,
        code_version: concat!("kiln ", env!("CARGO_PKG_VERSION")).to_string(),
        dataset_fingerprint: fingerprint.to_string(),
        world_size: world as u32,
        metrics: Default::default(),
        job: a.job.clone(),
    };
    let policy = CheckpointPolicy {
        interval: spec.checkpoint.interval,
        final_checkpoint: spec.checkpoint.final_checkpoint,
        total_steps: spec.train.steps,
        max_consecutive_failures: spec.checkpoint.max_consecutive_failures,
        retention: Retention {
            keep_last: spec.checkpoint.keep_last,
            keep_every: (spec.checkpoint.keep_every > 0).then_some(spec.checkpoint.keep_every),
        },
        // Never delete chunks a save of another run may be writing now.
        gc_grace: Duration::from_secs(300),
    };
    // Each round of an elastic job saves under its own attempt names: a save
    // of a broken round never mixes with a later one's.
    let attempt = if a.elastic {
        format!("{}-r{}", a.run_id, a.round)
    } else {
        a.run_id.clone()
    };
    CheckpointManager::new(root, cfg, rank, world, attempt, meta, policy)
        .context("start checkpointer")
}

/// Tells the agent what became of background saves.
pub(super) fn report_saves(events: Vec<SaveEvent>, reporter: &mut Reporter) -> Result<()> {
    for event in events {
        match event {
            SaveEvent::Saved(o) => {
                if let Some(url) = o.url {
                    reporter.send(Report::Checkpoint(CheckpointSaved {
                        step: o.step,
                        url,
                        bytes_uploaded: o.bytes_uploaded,
                        bytes_reused: o.bytes_reused,
                        blocking_seconds: o.blocking.as_secs_f64(),
                        durable_seconds: o.durable_after.as_secs_f64(),
                        codec: o.compression.codec.as_str().to_string(),
                        codec_policy: o.compression.policy.as_str().to_string(),
                    }))?;
                }
            }
            SaveEvent::Failed { message } | SaveEvent::RetentionFailed { message } => {
                reporter.send(Report::Warning(Warning { message }))?;
            }
        }
    }
    Ok(())
}

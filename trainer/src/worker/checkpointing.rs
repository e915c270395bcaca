//! The worker's side of checkpoints: resuming, the round's
//! `CheckpointManager` (whose policy lives in `kiln-checkpoint`), reporting
//! what became of background saves, and what the ranks tell each other
//! about the checkpoint location over the round's collective: the probe
//! that proves it shared ([`prove_shared_storage`]), failed saves
//! ([`share_news`]) and the verdict on the final checkpoint
//! ([`finish_saves`]).

use std::time::Duration;

use kiln_checkpoint::probe::{self, ProbeRecord, Sighting};
use kiln_checkpoint::{
    CheckpointManager, CheckpointMeta, CheckpointPolicy, CheckpointRoot, Conclusion, FinalSave,
    Manifest, OwnedTensor, Retention, SaveConfig, SaveEvent, SaveNews,
};
use kiln_proto::spec::JobSpec;
use kiln_proto::worker::{Assignment, CheckpointSaved, Warning, worker_message::Kind as Report};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tch::{Device, Kind, Tensor};

use super::channel::Reporter;
use crate::collective::Collective;
use crate::error::{Context, Result};

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
        required: spec.checkpoint.required,
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

/// Proves, before anything is saved or resumed, that every rank of the round
/// reads the others' writes under the checkpoint location (see
/// `kiln_checkpoint::probe`). Every rank reaches the same verdict; when the
/// location is not shared, the error names each rank's location, who could
/// not see whom, and the fix.
pub(super) fn prove_shared_storage(
    root: &CheckpointRoot,
    a: &Assignment,
    rank: usize,
    world: usize,
    comm: &mut dyn Collective,
    device: Device,
) -> Result<()> {
    let id = format!("{}-r{}", a.run_id, a.round);
    let mine = probe::write_probe(root, &id, ProbeRecord::new(root, rank, world));
    let records: Vec<ProbeRecord> =
        exchange(comm, device, &mine).context("exchange checkpoint location probes")?;
    let seen = probe::read_probes(root, &id, rank, &records);
    let sightings: Vec<Vec<Sighting>> =
        exchange(comm, device, &seen).context("exchange what each rank's probe read found")?;
    // Every rank has read every probe by now.
    if mine.write_error.is_empty()
        && let Err(e) = probe::remove_probe(root, &id, rank)
    {
        tracing::warn!(probe = %probe::probe_key(&id, rank), "remove the checkpoint location probe: {e}");
    }
    probe::verdict(&records, &sightings)?;
    Ok(())
}

/// Tells every rank which saves failed here, and hears the same from them,
/// so that the committing rank stops waiting for parts that will not come
/// (see `CheckpointManager::hear`). Every rank calls it at the same points.
pub(super) fn share_news(
    checkpoints: &mut CheckpointManager,
    comm: &mut dyn Collective,
    device: Device,
    settled: bool,
) -> Result<()> {
    let news: Vec<SaveNews> = exchange(comm, device, &checkpoints.news())
        .context("tell the other ranks about failed checkpoint saves")?;
    checkpoints.hear(&news, settled);
    Ok(())
}

/// The end of the run's checkpoints, on every rank together: the ranks that
/// only write parts finish first and say how their saves went; then rank 0
/// finishes its commits (which no longer wait for parts that will not come)
/// and every rank hears every rank's outcome, so all reach one verdict at
/// once instead of timing out at the final barrier. Returns the last
/// checkpoint committed (rank 0), or the error that ends the run
/// (`checkpoint.required = true`); with `required = false` a final save that
/// did not land is a warning.
pub(super) fn finish_saves(
    checkpoints: &mut CheckpointManager,
    rank: usize,
    comm: &mut dyn Collective,
    device: Device,
    reporter: &mut Reporter,
) -> Result<Option<String>> {
    let world = comm.world_size();
    let mut finish = |checkpoints: &mut CheckpointManager| -> Result<FinalSave> {
        let (events, landed) = checkpoints.finish();
        report_saves(events, reporter)?;
        Ok(match landed {
            Ok(committed) => FinalSave {
                committed,
                error: None,
            },
            Err(e) => FinalSave {
                committed: None,
                error: Some(e.to_string()),
            },
        })
    };
    let outcomes = if world == 1 {
        vec![finish(checkpoints)?]
    } else {
        let early = if rank == 0 {
            None
        } else {
            Some(finish(checkpoints)?)
        };
        share_news(checkpoints, comm, device, true)?;
        let mine = match early {
            Some(outcome) => outcome,
            None => finish(checkpoints)?,
        };
        exchange(comm, device, &mine).context("agree on the final checkpoint")?
    };
    match checkpoints.conclude(&outcomes)? {
        Conclusion::Landed(url) => Ok(url.filter(|_| rank == 0)),
        Conclusion::Missing(message) => {
            tracing::warn!("{message}");
            if rank == 0 {
                reporter.send(Report::Warning(Warning { message }))?;
            }
            Ok(None)
        }
    }
}

/// Gathers one value from every rank (JSON over the collective, in rank
/// order): the lengths first, then the bytes padded to the longest.
fn exchange<T: Serialize + DeserializeOwned>(
    comm: &mut dyn Collective,
    device: Device,
    mine: &T,
) -> Result<Vec<T>> {
    let world = comm.world_size();
    let bytes = serde_json::to_vec(mine).context("encode for the other ranks")?;
    let mut lengths = Tensor::zeros([world as i64], (Kind::Int64, device));
    comm.all_gather(
        &Tensor::from_slice(&[bytes.len() as i64]).to_device(device),
        &mut lengths,
    )?;
    let lengths = Vec::<i64>::try_from(lengths.to_device(Device::Cpu)).context("read lengths")?;
    let longest = lengths.iter().copied().max().unwrap_or(0).max(1) as usize;
    let mut padded = bytes;
    padded.resize(longest, 0);
    let mut all = Tensor::zeros([(world * longest) as i64], (Kind::Uint8, device));
    comm.all_gather(&Tensor::from_slice(&padded).to_device(device), &mut all)?;
    let all = Vec::<u8>::try_from(all.to_device(Device::Cpu)).context("read gathered bytes")?;
    all.chunks(longest)
        .zip(&lengths)
        .enumerate()
        .map(|(r, (chunk, &len))| {
            let len = usize::try_from(len)
                .ok()
                .filter(|&l| l <= chunk.len())
                .with_context(|| format!("rank {r} announced {len} bytes"))?;
            serde_json::from_slice(&chunk[..len])
                .with_context(|| format!("decode what rank {r} sent"))
        })
        .collect()
}

//! `kiln ckpt`: look at, check, export and collect checkpoints.
//!
//! A checkpoint is named by its root and a selector (`--step latest|N`), or by
//! the URL of its manifest (`.../manifests/....json`, as `kiln run` prints it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use kiln_checkpoint::{CheckpointRoot, Manifest, Retention};

#[derive(Debug, Subcommand)]
pub enum CkptCommand {
    /// List the checkpoints under a root (newest last).
    Ls {
        /// Checkpoint root URL (file:///..., s3://bucket/prefix, ...) or folder.
        root: String,
        #[arg(long)]
        json: bool,
    },
    /// Show one checkpoint's manifest: tensors, training state, lineage.
    Show {
        /// Root URL (with --step) or a manifest URL.
        ckpt: String,
        #[arg(long, default_value = "latest")]
        step: String,
        #[arg(long)]
        json: bool,
    },
    /// Re-read every chunk and check it; the exit code says the verdict (0 good, 1 corrupt).
    Verify {
        ckpt: String,
        #[arg(long, default_value = "latest")]
        step: String,
        #[arg(long)]
        json: bool,
    },
    /// Export a checkpoint to a file PyTorch reads.
    Export {
        ckpt: String,
        /// Output file.
        out: PathBuf,
        #[arg(long, default_value = "latest")]
        step: String,
        #[arg(long, default_value = "safetensors", value_parser = ["safetensors"])]
        format: String,
        /// Export optimizer state too (default: model weights only).
        #[arg(long)]
        all: bool,
    },
    /// Apply retention and delete chunks no kept checkpoint references.
    /// Registered model versions' checkpoints (pins) and the newest
    /// checkpoint of every branch are always kept; --dry-run lists them.
    Gc {
        root: String,
        #[arg(long, default_value_t = 3)]
        keep_last: usize,
        /// Also keep every checkpoint whose step is a multiple of this.
        #[arg(long)]
        keep_every: Option<u64>,
        /// Unreferenced chunks younger than this many seconds are kept (an
        /// in-flight save may be writing them).
        #[arg(long, default_value_t = 600)]
        grace_secs: u64,
        /// Say what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Opens the root and finds the manifest a command names.
fn open(ckpt: &str, step: &str) -> Result<(CheckpointRoot, Manifest)> {
    let (root_url, which) = match ckpt.rsplit_once("/manifests/") {
        Some((root, name)) if name.ends_with(".json") => {
            (root.to_string(), format!("manifests/{name}"))
        }
        _ => (ckpt.to_string(), step.to_string()),
    };
    let root = CheckpointRoot::open(&root_url)
        .with_context(|| format!("open checkpoint root {root_url}"))?;
    let manifest = kiln_checkpoint::resolve(&root, &which)
        .with_context(|| format!("find checkpoint {which} under {}", root.url()))?;
    Ok((root, manifest))
}

/// What `kiln ckpt show` says of each rank's codec choice: every rank's
/// when there are a few, else rank 0's and how many ranks stored raw.
fn compression_lines(records: &[kiln_checkpoint::CompressionRecord]) -> Vec<String> {
    const EVERY_RANK_UP_TO: usize = 4;
    if records.is_empty() {
        return vec!["(not recorded: written before the codec policy)".into()];
    }
    if records.len() <= EVERY_RANK_UP_TO {
        return records
            .iter()
            .map(|r| format!("rank {}: {}", r.rank, r.summary()))
            .collect();
    }
    let raw = records
        .iter()
        .filter(|r| r.codec == kiln_checkpoint::Codec::None)
        .count();
    vec![
        format!("rank {}: {}", records[0].rank, records[0].summary()),
        format!(
            "{raw} of {} ranks stored raw, {} compressed",
            records.len(),
            records.len() - raw
        ),
    ]
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// A progress bar on stderr for a long read (`verify`, `export`), shown only
/// on a terminal and never with `--json`; cleared when done.
fn transfer_bar(what: &str, quiet: bool) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    (!quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0); // draws on stderr
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} {{bar:40}} {{binary_bytes}}/{{binary_total_bytes}}  {{binary_bytes_per_sec}}  [{{elapsed}} < {{eta}}]"
            ))
            .expect("static template"),
        );
        bar
    })
}

/// The callback that moves `bar` (none without a bar).
fn bar_progress(bar: &Option<indicatif::ProgressBar>) -> Option<impl Fn(u64, u64) + Sync + '_> {
    bar.as_ref().map(|bar| {
        move |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        }
    })
}

pub fn run(cmd: CkptCommand) -> Result<ExitCode> {
    match cmd {
        CkptCommand::Ls { root, json } => {
            let root = CheckpointRoot::open(&root)
                .with_context(|| format!("open checkpoint root {root}"))?;
            let list = kiln_checkpoint::list(&root).context("list checkpoints")?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:>8}  {:<25}  {:>5}  {:>7}  {:>10}  {:>10}  manifest",
                "step", "created", "world", "tensors", "raw", "stored"
            );
            for m in &list {
                let step = m.step.map_or("?".to_string(), |s| s.to_string());
                let latest = if m.is_latest { "  (latest)" } else { "" };
                match &m.error {
                    Some(e) => println!("{step:>8}  unreadable: {e}  {}", m.key),
                    None => println!(
                        "{step:>8}  {:<25}  {:>5}  {:>7}  {:>10}  {:>10}  {}{latest}",
                        m.created_at.as_deref().unwrap_or("?"),
                        m.world_size.map_or("?".to_string(), |w| w.to_string()),
                        m.tensors,
                        mb(m.raw_bytes),
                        mb(m.stored_bytes),
                        m.key
                    ),
                }
            }
            if list.is_empty() {
                println!("(no checkpoints under {})", root.url());
            }
            Ok(ExitCode::SUCCESS)
        }
        CkptCommand::Show { ckpt, step, json } => {
            let (root, m) = open(&ckpt, &step)?;
            if json {
                println!("{}", serde_json::to_string(&m)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("checkpoint  {}", root.url_of(&m.key));
            println!(
                "job         {}  step {}  world size at save {}",
                m.job, m.step, m.world_size
            );
            println!("created     {}", m.created_at);
            println!("parent      {}", m.parent.as_deref().unwrap_or("-"));
            println!("format      v{}  code {}", m.format_version, m.code_version);
            println!("dataset     {}", m.dataset_fingerprint);
            println!("state       {}", m.training_state);
            if !m.metrics.is_empty() {
                let parts: Vec<String> = m
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .collect();
                println!("metrics     {}", parts.join(", "));
            }
            println!("totals      {}", serde_json::to_string(&m.totals)?);
            for line in compression_lines(&m.compression) {
                println!("compression {line}");
            }
            println!(
                "{:<40}  {:<5}  {:<16}  {:>7}",
                "tensor", "dtype", "shape", "chunks"
            );
            for t in &m.tensors {
                println!(
                    "{:<40}  {:<5}  {:<16}  {:>7}",
                    t.name,
                    t.dtype.name(),
                    format!("{:?}", t.shape),
                    t.chunks.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CkptCommand::Verify { ckpt, step, json } => {
            let (root, m) = open(&ckpt, &step)?;
            let bar = transfer_bar("verify", json);
            let progress = bar_progress(&bar);
            let report = kiln_checkpoint::verify_with_progress(
                &root,
                &m,
                progress
                    .as_ref()
                    .map(|p| p as kiln_checkpoint::Progress<'_>),
            )
            .context("verify checkpoint")?;
            drop(progress);
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else if report.ok() {
                println!(
                    "ok: {} (step {}): {} tensors, {} chunks, {} checked",
                    root.url_of(&m.key),
                    m.step,
                    report.tensors_checked,
                    report.chunks_checked,
                    mb(report.raw_bytes_checked)
                );
            } else {
                println!("CORRUPT: {} (step {})", root.url_of(&m.key), m.step);
                for b in &report.bad_chunks {
                    println!(
                        "  tensor {} chunk {} ({}): {}",
                        b.tensor, b.index, b.key, b.reason
                    );
                }
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        CkptCommand::Export {
            ckpt,
            out,
            step,
            format,
            all,
        } => {
            if format != "safetensors" {
                bail!("unknown export format {format}; allowed: safetensors");
            }
            let (root, m) = open(&ckpt, &step)?;
            let bar = transfer_bar("export", false);
            let progress = bar_progress(&bar);
            kiln_checkpoint::export_safetensors_with_progress(
                &root,
                &m,
                |name| all || name.starts_with("model/"),
                &out,
                progress
                    .as_ref()
                    .map(|p| p as kiln_checkpoint::Progress<'_>),
            )
            .with_context(|| format!("export {} to {}", m.key, out.display()))?;
            drop(progress);
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            println!("exported step {} of {} to {}", m.step, m.job, out.display());
            Ok(ExitCode::SUCCESS)
        }
        CkptCommand::Gc {
            root,
            keep_last,
            keep_every,
            grace_secs,
            dry_run,
            json,
        } => {
            let root = CheckpointRoot::open(&root)
                .with_context(|| format!("open checkpoint root {root}"))?;
            let retention = Retention {
                keep_last,
                keep_every,
            };
            let report =
                kiln_checkpoint::gc(&root, &retention, Duration::from_secs(grace_secs), dry_run)
                    .context("collect garbage")?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!(
                    "kept {} checkpoints; {verb} {} checkpoints and {} chunks ({}); {} unreferenced chunks within the grace period",
                    report.manifests_kept.len(),
                    report.manifests_deleted.len(),
                    report.chunks_deleted,
                    mb(report.bytes_freed),
                    report.chunks_in_grace
                );
                if report.staging_files_deleted > 0 {
                    println!(
                        "{verb} {} staging files of interrupted writes",
                        report.staging_files_deleted
                    );
                }
                print_pins_and_heads(&report);
                for m in &report.manifests_deleted {
                    println!("  {verb} {m}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The pins of a gc report with what each keeps, and the branch heads kept.
fn print_pins_and_heads(report: &kiln_checkpoint::GcReport) {
    if report.pins.is_empty() {
        println!("no pins (no registered model version names a checkpoint here)");
    } else {
        println!("pins (registered model versions; their checkpoints are kept):");
    }
    for p in &report.pins {
        let who = match (&p.pin.pin, &p.pin.unreadable) {
            (Some(pin), _) => format!(
                "{}:{} in {} (registered by {} at {})",
                pin.model, pin.version, pin.registry, pin.created_by, pin.created_at
            ),
            (None, Some(why)) => format!("{} (unreadable: {why})", p.pin.key),
            (None, None) => p.pin.key.clone(),
        };
        if p.keeps.is_empty() {
            println!("  {who}: step {}, no checkpoint of it is left", p.pin.step);
        } else {
            println!(
                "  {who}: step {}, keeps {} ({})",
                p.pin.step,
                p.keeps.join(", "),
                mb(p.stored_bytes)
            );
        }
    }
    if report.branch_heads.len() > 1 {
        println!("branch heads (the newest checkpoint of each line of training; kept):");
        for h in &report.branch_heads {
            println!("  {h}");
        }
    }
}

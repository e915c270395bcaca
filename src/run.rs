//! `kiln run`: the zero-setup single-machine path. Reads the spec, serves the
//! dashboard with `--ui`, runs the job as one node over an embedded store
//! (`kiln_node::local`), prints progress and the summary.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::store::Store;
use kiln_coordinator::store::mem::MemStore;
use kiln_node::local::{LocalConfig, Started};
use kiln_proto::spec::JobSpec;
use kiln_trainer::agent::AgentEvent;
use tokio_util::sync::CancellationToken;

use crate::{CliError, RunArgs};

/// Runs the job; with `--ui`, serves the dashboard over the run's store while
/// it runs (and `--ui-linger` seconds after). The job's end is recorded in
/// the store and in its run folder, whichever way it ends.
pub async fn run(args: RunArgs) -> Result<(), CliError> {
    let store: Arc<dyn Store> = MemStore::new();
    let ks = Keyspace::default();
    let dashboard = match args.ui {
        Some(addr) => {
            let cfg = kiln_ui::UiConfig {
                jobs: kiln_ui::JobSources {
                    store: Some((store.clone(), ks.clone())),
                    data_dirs: vec![args.data_dir.clone()],
                },
                token: crate::ui::read_token(None)?,
                ..Default::default()
            };
            let dashboard =
                crate::ui::Dashboard::start(addr, cfg, CancellationToken::new()).await?;
            let line = format!("dashboard on {}", dashboard.url());
            if args.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            Some(dashboard)
        }
        None => None,
    };
    let mut started: Option<Started> = None;
    let result = run_job(&args, store.clone(), ks.clone(), &mut started).await;
    if let Some(Started { job, run_dir }) = &started {
        let error = match &result {
            Ok(()) => None,
            Err(CliError::InvalidSpec(message) | CliError::Invalid(message)) => {
                Some(message.clone())
            }
            Err(CliError::Failed(e)) => Some(format!("{e:#}")),
        };
        kiln_node::history::record_run_end(&*store, &ks, job, run_dir, error).await;
    }
    if let Some(dashboard) = dashboard {
        if args.ui_linger > 0 {
            eprintln!(
                "dashboard stays on {} for {} s (Ctrl-C stops it)",
                dashboard.url(),
                args.ui_linger
            );
        }
        dashboard
            .linger_then_stop(Duration::from_secs(args.ui_linger))
            .await;
    }
    result
}

/// The job itself: its spec read here, the run `kiln_node::local`'s, the
/// progress and summary printed here. Sets `started` once the job's status and
/// history are being recorded.
async fn run_job(
    args: &RunArgs,
    store: Arc<dyn Store>,
    ks: Keyspace,
    started: &mut Option<Started>,
) -> Result<(), CliError> {
    let mut overrides = args.set.clone();
    if let Some(n) = args.nproc {
        overrides.push(format!("workers.nproc={n}"));
    }
    let spec =
        JobSpec::load(&args.job, &overrides).map_err(|e| CliError::InvalidSpec(e.to_string()))?;
    let config = LocalConfig {
        data_dir: args.data_dir.clone(),
        metrics_addr: args.metrics_addr,
        resume: args.resume.clone(),
        kiln_exe: std::env::current_exe().context("locate the kiln binary")?,
    };
    let mut printer = Printer::new(&spec, args.json);
    let outcome = kiln_node::local::run_local(&spec, &config, store, ks, started, |event| {
        printer.on_event(event)
    })
    .await;
    printer.finish();
    let s = outcome?;
    let rank0 = &s.rank0;
    let eval: BTreeMap<String, f64> = rank0.eval.clone().into_iter().collect();
    let mut report = serde_json::json!({
        "job": s.job,
        "world_size": s.world_size,
        "steps": rank0.steps,
        "final_loss": rank0.final_loss,
        "grad_norm": rank0.grad_norm.is_finite().then_some(rank0.grad_norm),
        "eval": eval,
        "samples_per_sec": rank0.samples_per_sec,
        "weights_digest": rank0.weights_digest,
        "weights": rank0.weights_path,
        "checkpoint": rank0.checkpoint_url,
        "checkpoint_root": s.checkpoint_root,
        "resumed_from": rank0.resumed_from,
        "start_step": rank0.start_step,
        "round": s.round,
        "elapsed_secs": s.elapsed_secs,
        "run_dir": s.run_dir,
        "metrics_addr": s.metrics_addr.to_string(),
        "warnings": printer.warnings,
    });
    if let Some(model) = &s.model {
        report["model"] = model.clone().into();
        report["registry"] = s.registry.clone().into();
    }
    if args.json {
        println!("{report}");
    } else {
        println!(
            "job {}: {} workers, {} steps in {:.1} s ({:.0} samples/s), final loss {:.4}",
            s.job,
            s.world_size,
            rank0.steps,
            s.elapsed_secs,
            rank0.samples_per_sec,
            rank0.final_loss
        );
        if !eval.is_empty() {
            let parts: Vec<String> = eval.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            println!("held-out: {}", parts.join(", "));
        }
        println!(
            "weights: {} (sha256 {})",
            rank0.weights_path, rank0.weights_digest
        );
        if let Some(model) = &s.model {
            println!(
                "registered model {model} in {}",
                s.registry.as_deref().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Progress: a line per logging interval (stdout, or stderr under --json so the
/// summary stays the last stdout line), or a bar when stdout is a terminal.
struct Printer {
    steps: u64,
    log_interval: u64,
    global_batch: usize,
    json: bool,
    bar: Option<indicatif::ProgressBar>,
    last: (Instant, u64),
    /// Every warning the workers reported, for the summary.
    warnings: Vec<String>,
}

impl Printer {
    fn new(spec: &JobSpec, json: bool) -> Self {
        let bar = (!json && std::io::stdout().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(spec.train.steps);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]",
                )
                .expect("static template"),
            );
            bar
        });
        Self {
            steps: spec.train.steps,
            log_interval: spec.train.log_interval.max(1),
            global_batch: spec.train.global_batch,
            json,
            bar,
            last: (Instant::now(), 0),
            warnings: Vec::new(),
        }
    }

    fn line(&self, text: String) {
        match (&self.bar, self.json) {
            (Some(bar), _) => bar.println(text),
            (None, true) => eprintln!("{text}"),
            (None, false) => println!("{text}"),
        }
    }

    fn on_event(&mut self, event: AgentEvent) {
        match event {
            AgentEvent::Progress {
                rank: 0,
                progress: p,
            } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(p.step);
                    bar.set_message(format!("loss {:.4}", p.loss));
                }
                if p.step % self.log_interval == 0 || p.step == self.steps {
                    let (at, step) = self.last;
                    let secs = at.elapsed().as_secs_f64();
                    let rate = (p.step - step) as f64 * self.global_batch as f64 / secs.max(1e-9);
                    self.last = (Instant::now(), p.step);
                    let norm = if p.grad_norm.is_finite() {
                        format!("  grad norm {:.3}", p.grad_norm)
                    } else {
                        String::new()
                    };
                    self.line(format!(
                        "step {}/{}  loss {:.4}  lr {:.2e}{norm}  {:.0} samples/s",
                        p.step, self.steps, p.loss, p.lr, rate
                    ));
                }
            }
            AgentEvent::Checkpoint { rank: 0, saved } => self.line(format!(
                "checkpoint at step {} committed: {} ({:.1} MB uploaded, {:.1} MB reused, training blocked {:.1} ms, durable after {:.0} ms){}",
                saved.step,
                saved.url,
                saved.bytes_uploaded as f64 / 1e6,
                saved.bytes_reused as f64 / 1e6,
                saved.blocking_seconds * 1e3,
                saved.durable_seconds * 1e3,
                if saved.codec.is_empty() {
                    String::new()
                } else {
                    format!(", stored {} (checkpoint.compression = {})", saved.codec, saved.codec_policy)
                }
            )),
            AgentEvent::Warning { rank, message } => {
                self.line(format!("WARNING (rank {rank}): {message}"));
                self.warnings.push(format!("rank {rank}: {message}"));
            }
            AgentEvent::Eval { rank: 0, eval } => {
                let metrics: BTreeMap<_, _> = eval.metrics.into_iter().collect();
                let parts: Vec<String> =
                    metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
                self.line(format!("eval at step {}: {}", eval.step, parts.join(", ")));
            }
            _ => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

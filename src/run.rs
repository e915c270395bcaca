//! `kiln run`: the zero-setup single-machine path. Wires an embedded store, the
//! rendezvous leader and this node's agent together, then prints progress and
//! the summary.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use kiln_coordinator::keyspace::Keyspace;
use kiln_coordinator::membership;
use kiln_coordinator::rendezvous::{NodeRecord, RendezvousConfig};
use kiln_coordinator::store::Store;
use kiln_coordinator::store::mem::MemStore;
use kiln_node::LOCAL_NODE;
use kiln_node::events::JobEvents;
use kiln_node::history::{HistoryTarget, RunFeed};
use kiln_node::logs::Echo;
use kiln_node::workers::{StartedWorkers, WorkerSetup};
use kiln_proto::spec::JobSpec;
use kiln_trainer::agent::{AgentEvent, RoundAssignment};
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
    let mut started: Option<(String, PathBuf)> = None;
    let result = run_job(&args, store.clone(), ks.clone(), &mut started).await;
    if let Some((job, run_dir)) = &started {
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

/// The job itself; sets `started` to the job's name and run folder once its
/// status and history are being recorded.
async fn run_job(
    args: &RunArgs,
    store: Arc<dyn Store>,
    ks: Keyspace,
    started: &mut Option<(String, PathBuf)>,
) -> Result<(), CliError> {
    let mut overrides = args.set.clone();
    if let Some(n) = args.nproc {
        overrides.push(format!("workers.nproc={n}"));
    }
    let spec =
        JobSpec::load(&args.job, &overrides).map_err(|e| CliError::InvalidSpec(e.to_string()))?;
    let job = spec.job.name.clone();
    let nproc = spec.workers.nproc;
    std::fs::create_dir_all(args.data_dir.join("jobs").join(&job))
        .with_context(|| format!("create run folder under {}", args.data_dir.display()))?;
    let run_dir: PathBuf = args
        .data_dir
        .join("jobs")
        .join(&job)
        .canonicalize()
        .context("resolve run folder")?;
    let spec_json = spec.to_json();
    let checkpoint_url =
        kiln_checkpoint::store::job_location(spec.checkpoint.url.as_deref(), &args.data_dir, &job)
            .map_err(anyhow::Error::from)?;
    let registry = kiln_node::register::registry_location(&spec, &checkpoint_url);
    // Names this run's save attempts; unique per invocation.
    let run_id = format!(
        "{:x}{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros()),
        std::process::id()
    );

    store
        .put(&ks.job_spec(&job), spec_json.clone().into_bytes(), None)
        .await
        .context("record job spec")?;
    let cancel = CancellationToken::new();
    let _stop_services = cancel.clone().drop_guard();
    // One node, one round: the spec's [elastic] does not apply.
    let leader_config = RendezvousConfig {
        job: job.clone(),
        min_nodes: 1,
        max_nodes: 1,
        settle: Duration::ZERO,
        max_failures: 0,
        max_scale_events: 0,
        cooldown: Duration::ZERO,
    };
    let mut leader = tokio::spawn(membership::run_leader(
        store.clone(),
        ks.clone(),
        leader_config,
        // The only leader there is: one process over its own memory store.
        None,
        cancel.clone(),
    ));

    // Worker lines go to {run_dir}/logs (read by `kiln logs JOB --data-dir`).
    let node_logs = Arc::new(kiln_node::logs::open(&run_dir, LOCAL_NODE, &spec, nproc)?);
    let StartedWorkers {
        workers,
        metrics,
        metrics_addr,
    } = kiln_node::workers::start(WorkerSetup {
        job: &job,
        node: LOCAL_NODE,
        nproc,
        run_dir: &run_dir,
        kiln_exe: &std::env::current_exe().context("locate the kiln binary")?,
        log_sink: kiln_node::logs::sink(node_logs, Echo::Off),
        // One machine: the ring stays on loopback.
        bind_host: "127.0.0.1",
        metrics_addr: args.metrics_addr,
        cancel: &cancel,
    })
    .await?;
    let record = NodeRecord {
        node: LOCAL_NODE.to_string(),
        host: "127.0.0.1".to_string(),
        endpoints: workers.endpoints(),
        devices: nproc as u32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        presence: None,
    };
    let mut session = membership::join(
        store.clone(),
        ks.clone(),
        &job,
        record,
        Duration::from_secs(5),
    )
    .await
    .context("join rendezvous")?;
    let plan = tokio::select! {
        plan = session.next_plan(0) => plan.context("wait for the rendezvous plan")?,
        res = &mut leader => return Err(anyhow!("rendezvous leader stopped before a plan: {:?}", res).into()),
        _ = tokio::time::sleep(Duration::from_secs(30)) => return Err(anyhow!("no rendezvous plan within 30 s").into()),
    };
    let member = plan
        .members
        .iter()
        .find(|m| m.node == LOCAL_NODE)
        .ok_or_else(|| {
            anyhow!(
                "rendezvous plan of round {} does not include this node",
                plan.round
            )
        })?;
    tracing::info!(
        job,
        round = plan.round,
        world_size = plan.world_size,
        "rendezvous complete"
    );

    let hooks = JobEvents::new(&spec, &job)?;
    hooks.started(plan.round, plan.world_size, args.resume.clone());
    let mut feed = RunFeed::start(
        HistoryTarget {
            store: &store,
            ks: &ks,
            job: &job,
            checkpoint_root: &checkpoint_url,
            registry: registry.clone(),
        },
        &run_dir,
        spec.train.global_batch,
        spec.train.steps,
        plan.round,
        plan.world_size,
    )
    .await;
    *started = Some((job.clone(), run_dir.clone()));
    let started = Instant::now();
    let mut printer = Printer::new(&spec, args.json);
    let world_size = plan.world_size;
    let assignment = RoundAssignment {
        round: plan.round,
        first_rank: member.first_rank,
        world_size: plan.world_size,
        peers: plan.peers.clone(),
        spec_json,
        checkpoint_url: checkpoint_url.clone(),
        resume: args.resume.clone().unwrap_or_default(),
        run_id,
        ring_secret: plan.secret_bytes().map_err(|e| anyhow!(e))?,
    };
    let outcome = workers
        .run(&job, &run_dir, &assignment, metrics, |event| {
            hooks.on_worker_event(&event, world_size);
            feed.on_event(&event);
            printer.on_event(event)
        })
        .await;
    printer.finish();
    feed.finish().await;
    // Stop the leader before leaving: a member leaving a live leader's round
    // counts as a lost node.
    cancel.cancel();
    let leader_result = leader.await;
    let _ = session.leave().await;
    let summary = match outcome {
        Ok(summary) => summary,
        Err(e) => {
            hooks.failed(&e, plan.round);
            hooks.flush().await;
            return Err(e.into());
        }
    };
    if let Ok(Err(e)) = leader_result {
        return Err(anyhow!("rendezvous leader failed: {e}").into());
    }
    let elapsed = started.elapsed().as_secs_f64();

    let (_, rank0) = summary
        .finished
        .iter()
        .find(|(r, _)| *r == 0)
        .context("rank 0 did not finish")?;
    for (rank, f) in &summary.finished {
        if f.weights_digest != rank0.weights_digest {
            return Err(anyhow!(
                "ranks diverged: rank {rank} ends with weights {} but rank 0 with {}",
                f.weights_digest,
                rank0.weights_digest
            )
            .into());
        }
    }
    let eval: BTreeMap<String, f64> = rank0.eval.clone().into_iter().collect();
    hooks.finished(rank0, elapsed);
    let model = match &spec.register {
        Some(_) => {
            kiln_node::register::register_final_model(
                &spec,
                &job,
                &checkpoint_url,
                rank0,
                hooks.hooks(),
            )
            .await?
        }
        None => None,
    };
    hooks.flush().await;
    let mut report = serde_json::json!({
        "job": job,
        "world_size": plan.world_size,
        "steps": rank0.steps,
        "final_loss": rank0.final_loss,
        "grad_norm": rank0.grad_norm.is_finite().then_some(rank0.grad_norm),
        "eval": eval,
        "samples_per_sec": rank0.samples_per_sec,
        "weights_digest": rank0.weights_digest,
        "weights": rank0.weights_path,
        "checkpoint": rank0.checkpoint_url,
        "checkpoint_root": checkpoint_url,
        "resumed_from": rank0.resumed_from,
        "start_step": rank0.start_step,
        "round": plan.round,
        "elapsed_secs": elapsed,
        "run_dir": run_dir,
        "metrics_addr": metrics_addr.to_string(),
        "warnings": printer.warnings,
    });
    if let Some(model) = &model {
        report["model"] = model.clone().into();
        report["registry"] = registry.clone().into();
    }
    if args.json {
        println!("{report}");
    } else {
        println!(
            "job {job}: {} workers, {} steps in {elapsed:.1} s ({:.0} samples/s), final loss {:.4}",
            plan.world_size, rank0.steps, rank0.samples_per_sec, rank0.final_loss
        );
        if !eval.is_empty() {
            let parts: Vec<String> = eval.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            println!("held-out: {}", parts.join(", "));
        }
        println!(
            "weights: {} (sha256 {})",
            rank0.weights_path, rank0.weights_digest
        );
        if let Some(model) = &model {
            println!(
                "registered model {model} in {}",
                registry.as_deref().unwrap_or_default()
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

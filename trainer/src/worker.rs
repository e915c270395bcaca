//! One training rank, top-down: connect to the agent, learn the assignment,
//! build the collective, data and model, then step until done and report.
//!
//! The worker never talks to the store. Everything it learns comes in one
//! `Assignment` from its agent; everything it says goes back as `WorkerMessage`
//! frames on the same local socket.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kiln_checkpoint::{
    CheckpointMeta, CheckpointRoot, Checkpointer, DType, Manifest, OwnedTensor, Retention,
    SaveConfig, SaveOutcome, TensorView, weights_digest,
};
use kiln_proto::frame;
use kiln_proto::spec::JobSpec;
use kiln_proto::worker::{
    AgentMessage, Assignment, CheckpointSaved, EvalResult, Failed, Finished, Hello, Progress,
    Warning, WorkerMessage, agent_message, worker_message::Kind as Report,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

use crate::collective::nccl::{self, NcclCollective};
use crate::collective::ring::RingCollective;
use crate::collective::{AbortHandle, Collective};
use crate::data::{self, Dataset, GlobalSampler};
use crate::device;
use kiln_models::{self as model, Net};
use crate::optim::{self, Optimizer};
use crate::state::{self, TrainingState};

/// Where a worker finds its agent.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// Abstract Unix socket name of the agent.
    pub agent_socket: String,
    pub local_rank: u32,
}

/// Connects an abstract-namespace Unix socket (no file to clean up, no path length issue).
pub fn connect_abstract(name: &str) -> std::io::Result<UnixStream> {
    UnixStream::connect_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)
}

/// Runs one worker to completion. Errors are also reported to the agent.
pub fn run(args: &WorkerArgs) -> Result<()> {
    let stream = connect_abstract(&args.agent_socket)
        .with_context(|| format!("connect to agent socket @{}", args.agent_socket))?;
    let mut reporter = Reporter {
        stream: stream.try_clone().context("clone agent socket")?,
    };
    let mut incoming = stream;
    // The ring listener is bound before Hello so its address can go into the plan.
    let host = std::env::var("KILN_BIND_HOST").unwrap_or_else(|_| "127.0.0.1".to_string());
    let listener = TcpListener::bind((host.as_str(), 0))
        .with_context(|| format!("bind collective listener on {host}"))?;
    let ring_addr = listener
        .local_addr()
        .context("collective listener address")?
        .to_string();
    reporter.send(Report::Hello(Hello {
        local_rank: args.local_rank,
        pid: std::process::id(),
        ring_addr,
    }))?;

    let assignment = match frame::read::<AgentMessage, _>(&mut incoming)
        .context("read assignment from agent")?
    {
        Some(AgentMessage {
            kind: Some(agent_message::Kind::Assignment(a)),
        }) => a,
        Some(AgentMessage {
            kind: Some(agent_message::Kind::Stop(stop)),
        }) => {
            tracing::info!(reason = %stop.reason, "stopped before an assignment");
            return Ok(());
        }
        other => bail!("expected an assignment from the agent, got {other:?}"),
    };
    let abort = AbortHandle::default();
    watch_agent(incoming, abort.clone());

    let result = train(
        &assignment,
        args.local_rank as usize,
        &listener,
        &abort,
        &mut reporter,
    );
    if let Err(e) = &result {
        // Best effort: the agent may already be gone.
        let _ = reporter.send(Report::Failed(Failed {
            error: format!("{e:#}"),
        }));
    }
    result
}

/// Reports to the agent.
struct Reporter {
    stream: UnixStream,
}

impl Reporter {
    fn send(&mut self, kind: Report) -> Result<()> {
        frame::write(&mut self.stream, &WorkerMessage { kind: Some(kind) })
            .context("send report to agent")
    }
}

/// Aborts the collectives and exits when the agent says stop or goes away, so a
/// worker never outlives its round blocked on a peer.
fn watch_agent(mut incoming: UnixStream, abort: AbortHandle) {
    std::thread::Builder::new()
        .name("agent-watch".into())
        .spawn(move || {
            let reason = match frame::read::<AgentMessage, _>(&mut incoming) {
                Ok(Some(AgentMessage {
                    kind: Some(agent_message::Kind::Stop(s)),
                })) => s.reason,
                Ok(_) => "agent closed the channel".to_string(),
                Err(e) => format!("agent channel failed: {e}"),
            };
            tracing::warn!(%reason, "stopping");
            abort.abort();
            let _ = std::io::stderr().flush();
            std::process::exit(143);
        })
        .expect("spawn agent watcher thread");
}

fn train(
    a: &Assignment,
    local_rank: usize,
    listener: &TcpListener,
    abort: &AbortHandle,
    reporter: &mut Reporter,
) -> Result<()> {
    let spec = JobSpec::from_json(&a.spec_json).context("parse job spec from assignment")?;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    ensure!(
        rank < world && a.peers.len() == world,
        "inconsistent assignment: rank {rank}, world {world}, {} peers",
        a.peers.len()
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = spec
        .train
        .threads_per_worker
        .unwrap_or((cores / spec.workers.nproc.max(1)).max(1));
    tch::set_num_threads(threads as i32);
    let device = device::resolve(spec.workers.device, local_rank).map_err(anyhow::Error::msg)?;
    tracing::info!(job = %a.job, round = a.round, rank, world, threads, ?device, "worker starting");

    let timeout = Duration::from_secs_f64(spec.comm.timeout_secs);
    let mut ring = RingCollective::connect(a.round, rank, &a.peers, listener, timeout)
        .with_context(|| format!("connect collective ring of round {}", a.round))?;
    let mut comm: Box<dyn Collective> = match device {
        Device::Cuda(index) => {
            ensure!(
                nccl::nccl_available(),
                "CUDA tensors need NCCL, and no NCCL library could be loaded"
            );
            let mut id = if rank == 0 {
                NcclCollective::unique_id()?
            } else {
                [0u8; 128]
            };
            ring.broadcast_bytes(&mut id, 0)
                .context("share the NCCL id")?;
            Box::new(
                // The worker's own abort handle, so the wait for peers to join
                // can itself be aborted.
                NcclCollective::with_abort_handle(rank, world, id, index as i64, abort.clone())
                    .context("create NCCL communicator")?,
            )
        }
        _ => Box::new(ring),
    };
    let comm_abort = comm.abort_handle();
    abort.on_abort(move || comm_abort.abort());

    tch::manual_seed(spec.job.seed as i64);
    let splits = data::load(&spec.data, spec.job.seed).context("load data")?;
    let vs = VarStore::new(device);
    let net = model::build(&spec.model, splits.train.features, splits.classes, &vs)
        .context("build model")?;
    let named = model::named_parameters(&vs);
    let mut params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    if let Some(init) = &spec.model.init {
        state::init_from_safetensors(init, &named).context("model.init")?;
    }
    // Every rank starts from rank 0's parameters, whatever their initialisation.
    for p in &params {
        comm.broadcast(&mut p.detach(), 0)
            .context("broadcast initial parameters")?;
    }

    let per_rank = spec.per_rank_batch(world)?;
    let micro = spec.micro_batch_at(world)?;
    let global_batch = spec.train.global_batch;
    let bucket_bytes = (spec.comm.bucket_mb * (1 << 20) as f64) as usize;
    let mut buckets = GradBuckets::new(&params, bucket_bytes.max(4), device)?;
    let mut sampler = GlobalSampler::new(spec.job.seed, splits.train.len(), global_batch);
    let mut opt = Optimizer::new(&spec.optimizer, &params);
    let steps = spec.train.steps;
    let mut loss = f64::NAN;
    let mut eval = BTreeMap::new();
    let mut timed_from: Option<(Instant, u64)> = None;

    let fingerprint = splits.fingerprint();
    let mut saver = Saver::new(&spec, a, rank, world, &fingerprint)?;
    let mut start_step = 0;
    let mut resumed_from = String::new();
    if !a.resume.is_empty() {
        let (manifest, loaded, warnings) = load_for_resume(&saver.root, &a.resume)?;
        for w in warnings {
            reporter.send(Report::Warning(Warning { message: w }))?;
        }
        let state: TrainingState = serde_json::from_value(manifest.training_state.clone())
            .with_context(|| format!("read training state of checkpoint {}", manifest.key))?;
        ensure!(
            state.optimizer == format!("{:?}", opt.kind()).to_lowercase(),
            "checkpoint {} holds {} optimizer state but the spec asks for {:?}",
            manifest.key,
            state.optimizer,
            opt.kind()
        );
        ensure!(
            state.step <= steps,
            "checkpoint {} is at step {} beyond train.steps = {steps}",
            manifest.key,
            state.step
        );
        if manifest.dataset_fingerprint != fingerprint {
            let message = format!(
                "checkpoint {} was saved on other data (fingerprint {} != {}); the run continues, but not exactly",
                manifest.key, manifest.dataset_fingerprint, fingerprint
            );
            reporter.send(Report::Warning(Warning { message }))?;
        }
        state::restore(&loaded, &named, &mut opt)
            .with_context(|| format!("restore from checkpoint {}", manifest.key))?;
        opt.steps = state.optimizer_steps;
        start_step = state.step;
        loss = state.loss.unwrap_or(f64::NAN);
        resumed_from = saver.root.url_of(&manifest.key);
        saver.resumed(&manifest);
        tracing::info!(rank, step = start_step, checkpoint = %resumed_from, "resumed");
    }

    for step in start_step..steps {
        let started = Instant::now();
        let lr = optim::learning_rate(&spec.optimizer, &spec.schedule, step, steps);
        for p in params.iter_mut() {
            p.zero_grad();
        }
        let indices = sampler.rank_slice(step, rank, per_rank);
        let mut local_loss = 0.0;
        for chunk in indices.chunks(micro) {
            let (xs, ys) = splits.train.batch(chunk, device);
            let logits = net.forward(&xs);
            // Weighted by the global batch: summed over ranks, the gradient is the
            // global mean's, whatever the world size and micro-batching.
            let l = logits.cross_entropy_loss::<Tensor>(&ys, None, Reduction::Sum, -100, 0.0)
                / global_batch as f64;
            l.backward();
            local_loss += l.double_value(&[]);
        }
        let reduce_started = Instant::now();
        loss = buckets
            .all_reduce(&params, comm.as_mut(), local_loss)
            .context("all-reduce gradients")?;
        let reduce_seconds = reduce_started.elapsed().as_secs_f64();
        opt.step(&mut params, lr);
        if !loss.is_finite() {
            bail!(
                "loss is {loss} at step {}: training diverged (lower optimizer.lr?)",
                step + 1
            );
        }
        reporter.send(Report::Progress(Progress {
            step: step + 1,
            loss,
            step_seconds: started.elapsed().as_secs_f64(),
            samples: per_rank as u64,
            allreduce_seconds: reduce_seconds,
            allreduce_bytes: if world > 1 { buckets.bytes() as u64 } else { 0 },
            lr,
        }))?;
        // Throughput excludes the first step (allocations, first-touch, connection warm-up).
        if timed_from.is_none() {
            timed_from = Some((Instant::now(), step + 1));
        }
        let done = step + 1;
        let interval = spec.checkpoint.interval;
        if (interval > 0 && done % interval == 0)
            || (done == steps && spec.checkpoint.final_checkpoint)
        {
            let training_state = TrainingState {
                step: done,
                sample_cursor: sampler.cursor(done),
                optimizer: format!("{:?}", opt.kind()).to_lowercase(),
                optimizer_steps: opt.steps,
                schedule_position: done,
                schedule_total: steps,
                seed: spec.job.seed,
                world_size: world as u32,
                loss: Some(loss),
            };
            let tensors = state::state_tensors(&named, &opt)?;
            saver.save(done, &tensors, training_state, &eval)?;
        }
        saver.poll(reporter)?;
        let interval = spec.train.eval_interval;
        if interval > 0 && (step + 1) % interval == 0 && step + 1 < steps && !splits.eval.is_empty()
        {
            eval = evaluate(&net, &splits.eval, rank, world, device, comm.as_mut())?;
            reporter.send(Report::Eval(EvalResult {
                step: step + 1,
                metrics: eval.clone().into_iter().collect(),
            }))?;
        }
    }
    let samples_per_sec = match timed_from {
        Some((t, done)) if steps > done => {
            ((steps - done) as usize * global_batch) as f64 / t.elapsed().as_secs_f64()
        }
        _ => 0.0,
    };
    if !splits.eval.is_empty() {
        eval = evaluate(&net, &splits.eval, rank, world, device, comm.as_mut())?;
        reporter.send(Report::Eval(EvalResult {
            step: steps,
            metrics: eval.clone().into_iter().collect(),
        }))?;
    }

    let checkpoint_url = saver.finish(reporter)?;
    let host: Vec<(String, DType, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(name, t)| {
            let dtype = state::dtype_of(t.kind())?;
            let shape = t.size().iter().map(|&d| d as usize).collect();
            Ok((name.clone(), dtype, shape, model::to_host_bytes(t)))
        })
        .collect::<Result<_>>()?;
    let views: Vec<TensorView<'_>> = host
        .iter()
        .map(|(n, d, s, b)| TensorView {
            name: n,
            dtype: *d,
            shape: s,
            data: b,
        })
        .collect();
    let digest = weights_digest(&views);
    let weights_path = if rank == 0 {
        let path = Path::new(&a.run_dir).join("weights.safetensors");
        write_safetensors(&views, &path)?;
        path.display().to_string()
    } else {
        String::new()
    };
    comm.barrier().context("final barrier")?;
    reporter.send(Report::Finished(Finished {
        steps,
        final_loss: loss,
        eval: eval.into_iter().collect(),
        samples_per_sec,
        weights_digest: digest,
        weights_path,
        checkpoint_url: if rank == 0 {
            checkpoint_url.unwrap_or_else(|| resumed_from.clone())
        } else {
            String::new()
        },
        resumed_from,
        start_step,
    }))?;
    Ok(())
}

/// Loads what `--resume` names: `latest` falls back to the newest checkpoint
/// that verifies (with warnings saying what was skipped).
fn load_for_resume(
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

/// The training loop's side of checkpointing: when to save, what goes with a
/// save, and what to do with background results (report commits, count
/// failures in a row, fail the job past the budget).
struct Saver {
    root: CheckpointRoot,
    checkpointer: Checkpointer,
    run_id: String,
    meta: CheckpointMeta,
    max_failures: usize,
    failures: usize,
    last_saved: Option<u64>,
    last_committed: Option<String>,
    retention: Retention,
    rank: usize,
}

impl Saver {
    fn new(
        spec: &JobSpec,
        a: &Assignment,
        rank: usize,
        world: usize,
        fingerprint: &str,
    ) -> Result<Self> {
        let root = CheckpointRoot::open(&a.checkpoint_url)
            .with_context(|| format!("open checkpoint root {}", a.checkpoint_url))?;
        let cfg = SaveConfig {
            compression_level: spec.checkpoint.compression_level,
            chunk_bytes: ((spec.checkpoint.chunk_mb * (1 << 20) as f64) as usize).max(4096),
            // The node's cores are shared by its workers, as for training.
            threads: (std::thread::available_parallelism().map_or(1, |n| n.get())
                / spec.workers.nproc.max(1))
            .max(1),
            ..SaveConfig::default()
        };
        let checkpointer =
            Checkpointer::new(root.clone(), cfg, rank, world).context("start checkpointer")?;
        let meta = CheckpointMeta {
            training_state: serde_json::Value::Null,
            job_spec: serde_json::from_str(&a.spec_json).context("job spec as JSON")?,
            code_version: concat!("kiln ", env!("CARGO_PKG_VERSION")).to_string(),
            dataset_fingerprint: fingerprint.to_string(),
            world_size: world as u32,
            metrics: Default::default(),
            job: a.job.clone(),
        };
        let retention = Retention {
            keep_last: spec.checkpoint.keep_last,
            keep_every: (spec.checkpoint.keep_every > 0).then_some(spec.checkpoint.keep_every),
        };
        Ok(Self {
            root,
            checkpointer,
            run_id: a.run_id.clone(),
            meta,
            max_failures: spec.checkpoint.max_consecutive_failures,
            failures: 0,
            last_saved: None,
            last_committed: None,
            retention,
            rank,
        })
    }

    /// Chunks of the checkpoint resumed from are referenced, not uploaded again.
    fn resumed(&mut self, manifest: &Manifest) {
        self.checkpointer.set_parent(manifest);
        self.last_saved = Some(manifest.step);
    }

    /// Starts a background save of `tensors` at `step` (blocks only while this
    /// rank's stripe is copied).
    fn save(
        &mut self,
        step: u64,
        tensors: &[state::StateTensor],
        training_state: TrainingState,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<()> {
        if self.last_saved == Some(step) {
            return Ok(());
        }
        let views: Vec<TensorView<'_>> = tensors.iter().map(|t| t.view()).collect();
        let mut meta = self.meta.clone();
        meta.training_state =
            serde_json::to_value(training_state).context("training state as JSON")?;
        meta.metrics = metrics.clone();
        match self.checkpointer.save(step, &self.run_id, &views, &meta) {
            Ok(()) => self.last_saved = Some(step),
            Err(e) => self.failed(format!("checkpoint at step {step} could not start: {e}"))?,
        }
        Ok(())
    }

    fn poll(&mut self, reporter: &mut Reporter) -> Result<()> {
        let outcomes = self.checkpointer.poll();
        self.handle(outcomes, reporter)
    }

    fn handle(
        &mut self,
        outcomes: Vec<kiln_checkpoint::Result<SaveOutcome>>,
        reporter: &mut Reporter,
    ) -> Result<()> {
        for outcome in outcomes {
            match outcome {
                Ok(o) => {
                    self.failures = 0;
                    if let Some(url) = o.url {
                        reporter.send(Report::Checkpoint(CheckpointSaved {
                            step: o.step,
                            url: url.clone(),
                            bytes_uploaded: o.bytes_uploaded,
                            bytes_reused: o.bytes_reused,
                            blocking_seconds: o.blocking.as_secs_f64(),
                            durable_seconds: o.durable_after.as_secs_f64(),
                        }))?;
                        self.last_committed = Some(url);
                    }
                }
                Err(e) => {
                    let message = format!("checkpoint save failed: {e}");
                    reporter.send(Report::Warning(Warning {
                        message: message.clone(),
                    }))?;
                    self.failed(message)?;
                }
            }
        }
        Ok(())
    }

    fn failed(&mut self, message: String) -> Result<()> {
        self.failures += 1;
        tracing::warn!(failures = self.failures, "{message}");
        if self.failures >= self.max_failures {
            bail!(
                "{} checkpoint saves failed in a row (checkpoint.max_consecutive_failures = {}); last: {message}",
                self.failures,
                self.max_failures
            );
        }
        Ok(())
    }

    /// Waits for every save in flight; the final checkpoint must land. Rank 0
    /// then applies retention. Returns the last checkpoint this run committed.
    fn finish(&mut self, reporter: &mut Reporter) -> Result<Option<String>> {
        let outcomes = self.checkpointer.flush();
        if let Some(Err(e)) = outcomes.iter().find(|o| o.is_err()) {
            let message = format!("the last checkpoint did not land: {e}");
            self.handle(outcomes, reporter)?;
            bail!(message);
        }
        self.handle(outcomes, reporter)?;
        if self.rank == 0 && self.last_committed.is_some() {
            // Grace: never delete chunks a save of another run may be writing now.
            match kiln_checkpoint::gc(&self.root, &self.retention, Duration::from_secs(300), false)
            {
                Ok(report) => tracing::info!(
                    deleted = report.manifests_deleted.len(),
                    freed = report.bytes_freed,
                    "retention applied"
                ),
                Err(e) => reporter.send(Report::Warning(Warning {
                    message: format!("retention: {e}"),
                }))?,
            }
        }
        Ok(self.last_committed.clone())
    }
}

/// Accuracy and mean loss over the held-out set; each rank evaluates a slice.
fn evaluate(
    net: &Net,
    data: &Dataset,
    rank: usize,
    world: usize,
    device: Device,
    comm: &mut dyn Collective,
) -> Result<BTreeMap<String, f64>> {
    let range = data::eval_slice(data.len(), rank, world);
    let indices: Vec<usize> = range.collect();
    let (mut correct, mut loss_sum) = (0i64, 0f64);
    tch::no_grad(|| {
        for chunk in indices.chunks(1024) {
            let (xs, ys) = data.batch(chunk, device);
            let logits = net.forward(&xs);
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(&ys, None, Reduction::Sum, -100, 0.0)
                .double_value(&[]);
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&ys)
                .sum(Kind::Int64)
                .int64_value(&[]);
        }
    });
    let mut totals =
        Tensor::from_slice(&[correct as f64, loss_sum, indices.len() as f64]).to_device(device);
    comm.all_reduce_sum(&mut totals)
        .context("all-reduce evaluation totals")?;
    let totals =
        Vec::<f64>::try_from(totals.to_device(Device::Cpu)).context("read evaluation totals")?;
    let count = totals[2].max(1.0);
    Ok(BTreeMap::from([
        ("accuracy".to_string(), totals[0] / count),
        ("loss".to_string(), totals[1] / count),
    ]))
}

/// Gradients travel in flat buckets of about `bucket_bytes`, in parameter-name
/// order; the last bucket carries one extra element, the rank's weighted loss,
/// so the global loss costs no extra collective.
struct GradBuckets {
    buckets: Vec<Bucket>,
}

struct Bucket {
    flat: Tensor,
    /// (parameter index, offset, elements).
    members: Vec<(usize, i64, i64)>,
    /// Whether the members' `.grad` tensors are views into `flat`: backward then
    /// accumulates straight into the bucket and no copy is needed either way.
    aliased: bool,
}

impl GradBuckets {
    fn new(params: &[Tensor], bucket_bytes: usize, device: Device) -> Result<Self> {
        let mut groups: Vec<Vec<(usize, i64, i64)>> = vec![Vec::new()];
        let mut filled = 0usize;
        for (i, p) in params.iter().enumerate() {
            ensure!(
                p.kind() == Kind::Float,
                "parameter {i} is {:?}; gradient buckets hold float32",
                p.kind()
            );
            let n = p.numel() as i64;
            if filled > 0 && filled + n as usize * 4 > bucket_bytes {
                groups.push(Vec::new());
                filled = 0;
            }
            let group = groups.last_mut().expect("one group at least");
            let offset = group.last().map_or(0, |&(_, o, n)| o + n);
            group.push((i, offset, n));
            filled += n as usize * 4;
        }
        let last = groups.len() - 1;
        // Materialise every gradient (a zero backward), so that each can be
        // re-pointed at its slot of a bucket.
        let zero: Tensor = params.iter().map(|p| (p * 0.0).sum(Kind::Float)).sum();
        zero.backward();
        let buckets = groups
            .into_iter()
            .enumerate()
            .map(|(i, members)| {
                let len = members.iter().map(|m| m.2).sum::<i64>() + i64::from(i == last);
                let flat = Tensor::zeros([len], (Kind::Float, device));
                let aliased = members.iter().all(|&(p, offset, n)| {
                    let view = flat.narrow(0, offset, n).view(params[p].size().as_slice());
                    let mut grad = params[p].grad();
                    grad.set_data(&view);
                    // libtorch accumulates into a defined gradient in place, so the
                    // alias holds; checked, and copying stays the fallback.
                    params[p].grad().data_ptr() == view.data_ptr()
                });
                tracing::debug!(bucket = i, aliased, "gradient bucket");
                Bucket {
                    flat,
                    members,
                    aliased,
                }
            })
            .collect();
        Ok(Self { buckets })
    }

    /// Bytes all-reduced per step.
    fn bytes(&self) -> usize {
        self.buckets.iter().map(|b| b.flat.numel() * 4).sum()
    }

    /// Sums every parameter's gradient over all ranks in place; returns the
    /// global loss (the sum of the ranks' weighted losses).
    fn all_reduce(
        &mut self,
        params: &[Tensor],
        comm: &mut dyn Collective,
        local_loss: f64,
    ) -> Result<f64> {
        if comm.world_size() == 1 {
            return Ok(local_loss);
        }
        let last = self.buckets.len() - 1;
        let mut loss = local_loss;
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            tch::no_grad(|| {
                for &(p, offset, n) in bucket.members.iter().filter(|_| !bucket.aliased) {
                    let grad = params[p].grad();
                    let mut slot = bucket.flat.narrow(0, offset, n);
                    if grad.defined() {
                        slot.copy_(&grad.view([-1]));
                    } else {
                        let _ = slot.zero_();
                    }
                }
                if i == last {
                    let _ = bucket
                        .flat
                        .narrow(0, bucket.flat.numel() as i64 - 1, 1)
                        .fill_(local_loss);
                }
            });
            comm.all_reduce_sum(&mut bucket.flat)?;
            tch::no_grad(|| {
                for &(p, offset, n) in bucket.members.iter().filter(|_| !bucket.aliased) {
                    let mut grad = params[p].grad();
                    if grad.defined() {
                        grad.copy_(&bucket.flat.narrow(0, offset, n).view_as(&grad));
                    }
                }
            });
            if i == last {
                loss = bucket.flat.double_value(&[bucket.flat.numel() as i64 - 1]);
            }
        }
        Ok(loss)
    }
}

/// Writes tensors to a safetensors file (written to a temporary name, then renamed).
fn write_safetensors(views: &[TensorView<'_>], path: &Path) -> Result<()> {
    use safetensors::Dtype as S;
    let st: Vec<(String, safetensors::tensor::TensorView<'_>)> = views
        .iter()
        .map(|v| {
            let dtype = match v.dtype {
                DType::F64 => S::F64,
                DType::F32 => S::F32,
                DType::F16 => S::F16,
                DType::BF16 => S::BF16,
                DType::I64 => S::I64,
                DType::I32 => S::I32,
                DType::I16 => S::I16,
                DType::I8 => S::I8,
                DType::U8 => S::U8,
                DType::Bool => S::BOOL,
            };
            let view = safetensors::tensor::TensorView::new(dtype, v.shape.to_vec(), v.data)
                .with_context(|| format!("tensor {} for safetensors", v.name))?;
            Ok((v.name.to_string(), view))
        })
        .collect::<Result<_>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(st, None, &tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

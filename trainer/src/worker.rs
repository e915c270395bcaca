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
    AgentMessage, Assignment, CheckpointSaved, EvalResult, Failed, Finished, Hello, Interrupted,
    Progress, RoundStarted, Warning, WorkerMessage, agent_message, worker_message::Kind as Report,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

use crate::collective::nccl::{self, NcclCollective};
use crate::collective::ring::RingCollective;
use crate::collective::{AbortHandle, Collective, CollectiveError};
use crate::data::{self, Dataset, GlobalSampler};
use crate::device;
use crate::optim::{self, Optimizer};
use crate::state::{self, TrainingState};
use kiln_models::{self as model, Net};

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
    let rounds = Rounds::default();
    watch_agent(incoming, rounds.clone());

    let result = train(
        assignment,
        args.local_rank as usize,
        &listener,
        &rounds,
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

/// The rounds a worker is handed: the agent-watch thread offers newer
/// assignments (aborting the round in flight), the training loop takes them.
#[derive(Clone, Default)]
struct Rounds {
    inner: std::sync::Arc<(std::sync::Mutex<RoundsState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct RoundsState {
    pending: Option<Assignment>,
    current: AbortHandle,
}

impl Rounds {
    /// A newer assignment: it replaces any pending one and aborts the round in flight.
    fn offer(&self, a: Assignment) {
        let (lock, ready) = &*self.inner;
        let mut state = lock.lock().expect("rounds lock");
        if state.pending.as_ref().is_some_and(|p| p.round >= a.round) {
            return;
        }
        state.pending = Some(a);
        state.current.abort();
        ready.notify_all();
    }

    /// Aborts the round in flight (the agent said stop).
    fn abort(&self) {
        self.inner.0.lock().expect("rounds lock").current.abort();
    }

    /// The newest pending assignment, if any.
    fn take_pending(&self) -> Option<Assignment> {
        self.inner.0.lock().expect("rounds lock").pending.take()
    }

    /// Blocks until an assignment is pending, and takes it.
    fn wait_next(&self) -> Assignment {
        let (lock, ready) = &*self.inner;
        let mut state = lock.lock().expect("rounds lock");
        loop {
            if let Some(a) = state.pending.take() {
                return a;
            }
            state = ready.wait(state).expect("rounds lock");
        }
    }

    /// A fresh abort handle for a round that starts now (an offer made after
    /// this call aborts it).
    fn begin(&self) -> AbortHandle {
        let mut state = self.inner.0.lock().expect("rounds lock");
        state.current = AbortHandle::default();
        if state.pending.is_some() {
            state.current.abort();
        }
        state.current.clone()
    }
}

/// Relays the agent's later messages: a newer assignment goes to the training
/// loop (aborting the round in flight); stop, or the agent going away, aborts
/// the collectives and exits, so a worker never outlives its agent blocked on a peer.
fn watch_agent(mut incoming: UnixStream, rounds: Rounds) {
    std::thread::Builder::new()
        .name("agent-watch".into())
        .spawn(move || {
            let reason = loop {
                match frame::read::<AgentMessage, _>(&mut incoming) {
                    Ok(Some(AgentMessage {
                        kind: Some(agent_message::Kind::Assignment(a)),
                    })) => {
                        tracing::info!(round = a.round, "newer round assigned");
                        rounds.offer(a);
                    }
                    Ok(Some(AgentMessage {
                        kind: Some(agent_message::Kind::Stop(s)),
                    })) => break s.reason,
                    Ok(_) => break "agent closed the channel".to_string(),
                    Err(e) => break format!("agent channel failed: {e}"),
                }
            };
            tracing::warn!(%reason, "stopping");
            rounds.abort();
            let _ = std::io::stderr().flush();
            std::process::exit(143);
        })
        .expect("spawn agent watcher thread");
}

/// Whether an error came from a collective (a peer died, the round was
/// aborted): in an elastic job the worker keeps its state and waits for the
/// next round instead of failing.
fn is_collective_failure(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| cause.downcast_ref::<CollectiveError>().is_some())
}

/// What a worker keeps across rounds: the model, the optimizer, the data and
/// where training stands.
struct Training {
    spec: JobSpec,
    device: Device,
    splits: data::Splits,
    net: Net,
    /// Keeps the parameters' storage alive.
    _vs: VarStore,
    named: Vec<(String, Tensor)>,
    params: Vec<Tensor>,
    opt: Optimizer,
    buckets: GradBuckets,
    sampler: GlobalSampler,
    fingerprint: String,
    /// Steps completed; `None` until this worker holds a training state
    /// (initialised, resumed, or received from a peer).
    step: Option<u64>,
    loss: f64,
    eval: BTreeMap<String, f64>,
    start_step: u64,
    resumed_from: String,
    /// The step of the checkpoint last saved (or resumed from), so that a
    /// step is not saved twice across rounds.
    last_saved: Option<u64>,
    /// Savers of earlier rounds whose saves may still be in flight; dropped
    /// on a thread of their own when replaced (a commit waiting for a dead
    /// rank's part must not block training).
    retired: Vec<std::thread::JoinHandle<()>>,
}

fn train(
    first: Assignment,
    local_rank: usize,
    listener: &TcpListener,
    rounds: &Rounds,
    reporter: &mut Reporter,
) -> Result<()> {
    let spec = JobSpec::from_json(&first.spec_json).context("parse job spec from assignment")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = spec
        .train
        .threads_per_worker
        .unwrap_or((cores / spec.workers.nproc.max(1)).max(1));
    tch::set_num_threads(threads as i32);
    let device = device::resolve(spec.workers.device, local_rank).map_err(anyhow::Error::msg)?;
    tracing::info!(job = %first.job, threads, ?device, "worker starting");

    tch::manual_seed(spec.job.seed as i64);
    let splits = data::load(&spec.data, spec.job.seed).context("load data")?;
    let vs = VarStore::new(device);
    let net = model::build(&spec.model, splits.train.features, splits.classes, &vs)
        .context("build model")?;
    let named = model::named_parameters(&vs);
    let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let bucket_bytes = (spec.comm.bucket_mb * (1 << 20) as f64) as usize;
    let buckets = GradBuckets::new(&params, bucket_bytes.max(4), device)?;
    let sampler = GlobalSampler::new(spec.job.seed, splits.train.len(), spec.train.global_batch);
    let opt = Optimizer::new(&spec.optimizer, &params);
    let fingerprint = splits.fingerprint();
    let mut t = Training {
        spec,
        device,
        splits,
        net,
        _vs: vs,
        named,
        params,
        opt,
        buckets,
        sampler,
        fingerprint,
        step: None,
        loss: f64::NAN,
        eval: BTreeMap::new(),
        start_step: 0,
        resumed_from: String::new(),
        last_saved: None,
        retired: Vec::new(),
    };

    let mut assignment = first;
    loop {
        if let Some(newer) = rounds.take_pending() {
            assignment = newer;
        }
        let abort = rounds.begin();
        match t.run_round(&assignment, listener, &abort, reporter) {
            Ok(()) => break,
            Err(e) if assignment.elastic && (abort.is_aborted() || is_collective_failure(&e)) => {
                let step = t.step.unwrap_or(0);
                tracing::warn!(round = assignment.round, step, "round interrupted: {e:#}");
                reporter.send(Report::Interrupted(Interrupted {
                    round: assignment.round,
                    step,
                    reason: format!("{e:#}"),
                }))?;
                assignment = rounds.wait_next();
            }
            Err(e) => return Err(e),
        }
    }
    for handle in t.retired.drain(..) {
        let _ = handle.join();
    }
    Ok(())
}

impl Training {
    /// Trains in one round until the job is done (`Ok`) or the round breaks.
    fn run_round(
        &mut self,
        a: &Assignment,
        listener: &TcpListener,
        abort: &AbortHandle,
        reporter: &mut Reporter,
    ) -> Result<()> {
        let setup_started = Instant::now();
        let (rank, world) = (a.rank as usize, a.world_size as usize);
        ensure!(
            rank < world && a.peers.len() == world,
            "inconsistent assignment: rank {rank}, world {world}, {} peers",
            a.peers.len()
        );
        let spec = self.spec.clone();
        let device = self.device;
        tracing::info!(job = %a.job, round = a.round, rank, world, "joining round");
        let timeout = Duration::from_secs_f64(spec.comm.timeout_secs);
        let mut ring = RingCollective::connect_abortable(
            a.round,
            rank,
            &a.peers,
            listener,
            timeout,
            abort.clone(),
        )
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
                    // The round's abort handle, so the wait for peers to join
                    // can itself be aborted.
                    NcclCollective::with_abort_handle(rank, world, id, index as i64, abort.clone())
                        .context("create NCCL communicator")?,
                )
            }
            _ => Box::new(ring),
        };
        let comm_abort = comm.abort_handle();
        abort.on_abort(move || comm_abort.abort());

        // A new saver per round: stripes and the committing rank follow the plan.
        let mut saver = Saver::new(&spec, a, rank, world, &self.fingerprint)?;
        saver.last_saved = self.last_saved;
        let source = self.sync_state(a, rank, world, comm.as_mut(), &mut saver, reporter)?;
        let start = self.step.expect("state synchronised");
        if a.elastic {
            reporter.send(Report::RoundStarted(RoundStarted {
                round: a.round,
                world_size: a.world_size,
                step: start,
                state_source: source.map_or(-1, |r| r as i32),
                setup_seconds: setup_started.elapsed().as_secs_f64(),
            }))?;
        }
        let result = self.steps(a, rank, world, comm.as_mut(), &mut saver, reporter);
        self.last_saved = saver.last_saved;
        if result.is_err() {
            // Saves of this round may wait for parts that will never come.
            self.retire(saver);
        } else {
            drop(saver);
        }
        result
    }

    /// Makes every rank hold the same training state: the ranks agree on the
    /// highest completed step, and the rank holding it (the lowest such rank)
    /// broadcasts parameters, optimizer state and counters to the ranks that
    /// are behind or have none. When no rank holds a state, every rank
    /// initialises: from a checkpoint when resuming, else from rank 0's
    /// parameters. Returns the rank the state came from, if any.
    fn sync_state(
        &mut self,
        a: &Assignment,
        rank: usize,
        world: usize,
        comm: &mut dyn Collective,
        saver: &mut Saver,
        reporter: &mut Reporter,
    ) -> Result<Option<usize>> {
        let mine = self.step.map_or(-1.0, |s| s as f64);
        let mut steps = Tensor::zeros([world as i64], (Kind::Double, self.device));
        comm.all_gather(
            &Tensor::from_slice(&[mine]).to_device(self.device),
            &mut steps,
        )
        .context("agree on the completed step")?;
        let steps = Vec::<f64>::try_from(steps.to_device(Device::Cpu)).context("read steps")?;
        let best = steps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if best < 0.0 {
            self.initialise(a, comm, saver, reporter)?;
            return Ok(None);
        }
        let source = steps
            .iter()
            .position(|&s| s == best)
            .expect("the maximum is one of the steps");
        if steps.iter().all(|&s| s == best) {
            return Ok(Some(source));
        }
        let mut header = Tensor::from_slice(&[
            self.step.unwrap_or(0) as f64,
            self.opt.steps as f64,
            self.loss,
        ])
        .to_device(self.device);
        comm.broadcast(&mut header, source)
            .context("broadcast the training counters")?;
        for p in &self.params {
            comm.broadcast(&mut p.detach(), source)
                .context("broadcast parameters")?;
        }
        for (_, tensors) in self.opt.buffers() {
            for t in tensors {
                comm.broadcast(&mut t.detach(), source)
                    .context("broadcast optimizer state")?;
            }
        }
        let header = Vec::<f64>::try_from(header.to_device(Device::Cpu)).context("read header")?;
        if rank != source {
            tracing::info!(
                round = a.round,
                step = header[0],
                source,
                "received the training state"
            );
        }
        self.step = Some(header[0] as u64);
        self.opt.steps = header[1] as u64;
        self.loss = header[2];
        Ok(Some(source))
    }

    /// No rank holds a state: resume from a checkpoint (`resume` says which;
    /// `auto`: the latest that verifies, if any) or start fresh from rank 0's
    /// parameters.
    fn initialise(
        &mut self,
        a: &Assignment,
        comm: &mut dyn Collective,
        saver: &mut Saver,
        reporter: &mut Reporter,
    ) -> Result<()> {
        let which = match a.resume.as_str() {
            "auto" => {
                let any = kiln_checkpoint::list(&saver.root)
                    .with_context(|| format!("list checkpoints under {}", saver.root.url()))?;
                if any.is_empty() { "" } else { "latest" }
            }
            other => other,
        };
        if which.is_empty() {
            if let Some(init) = &self.spec.model.init {
                state::init_from_safetensors(init, &self.named).context("model.init")?;
            }
            // Every rank starts from rank 0's parameters, whatever their initialisation.
            for p in &self.params {
                comm.broadcast(&mut p.detach(), 0)
                    .context("broadcast initial parameters")?;
            }
            self.step = Some(0);
            return Ok(());
        }
        let steps = self.spec.train.steps;
        let (manifest, loaded, warnings) = load_for_resume(&saver.root, which)?;
        for w in warnings {
            reporter.send(Report::Warning(Warning { message: w }))?;
        }
        let state: TrainingState = serde_json::from_value(manifest.training_state.clone())
            .with_context(|| format!("read training state of checkpoint {}", manifest.key))?;
        ensure!(
            state.optimizer == format!("{:?}", self.opt.kind()).to_lowercase(),
            "checkpoint {} holds {} optimizer state but the spec asks for {:?}",
            manifest.key,
            state.optimizer,
            self.opt.kind()
        );
        ensure!(
            state.step <= steps,
            "checkpoint {} is at step {} beyond train.steps = {steps}",
            manifest.key,
            state.step
        );
        if manifest.dataset_fingerprint != self.fingerprint {
            let message = format!(
                "checkpoint {} was saved on other data (fingerprint {} != {}); the run continues, but not exactly",
                manifest.key, manifest.dataset_fingerprint, self.fingerprint
            );
            reporter.send(Report::Warning(Warning { message }))?;
        }
        state::restore(&loaded, &self.named, &mut self.opt)
            .with_context(|| format!("restore from checkpoint {}", manifest.key))?;
        self.opt.steps = state.optimizer_steps;
        self.step = Some(state.step);
        self.start_step = state.step;
        self.loss = state.loss.unwrap_or(f64::NAN);
        self.resumed_from = saver.root.url_of(&manifest.key);
        saver.resumed(&manifest);
        self.last_saved = Some(manifest.step);
        tracing::info!(step = state.step, checkpoint = %self.resumed_from, "resumed");
        Ok(())
    }

    /// Hands a saver whose saves may never commit to a thread that waits for
    /// them (bounded by the commit timeout), so training goes on.
    fn retire(&mut self, saver: Saver) {
        match std::thread::Builder::new()
            .name("retired-saver".into())
            .spawn(move || drop(saver))
        {
            Ok(handle) => self.retired.push(handle),
            Err(e) => tracing::warn!("retire a checkpoint saver: {e}"),
        }
    }

    /// The training loop of one round, from the synchronised step to the end.
    fn steps(
        &mut self,
        a: &Assignment,
        rank: usize,
        world: usize,
        comm: &mut dyn Collective,
        saver: &mut Saver,
        reporter: &mut Reporter,
    ) -> Result<()> {
        let spec = self.spec.clone();
        let device = self.device;
        let per_rank = spec.per_rank_batch(world)?;
        let micro = spec.micro_batch_at(world)?;
        let global_batch = spec.train.global_batch;
        let steps = spec.train.steps;
        let first = self.step.expect("state synchronised");
        let mut timed_from: Option<(Instant, u64)> = None;
        for step in first..steps {
            let started = Instant::now();
            let lr = optim::learning_rate(&spec.optimizer, &spec.schedule, step, steps);
            for p in self.params.iter_mut() {
                p.zero_grad();
            }
            let indices = self.sampler.rank_slice(step, rank, per_rank);
            let mut local_loss = 0.0;
            for chunk in indices.chunks(micro) {
                let (xs, ys) = self.splits.train.batch(chunk, device);
                let logits = self.net.forward(&xs);
                // Weighted by the global batch: summed over ranks, the gradient is the
                // global mean's, whatever the world size and micro-batching.
                let l = logits.cross_entropy_loss::<Tensor>(&ys, None, Reduction::Sum, -100, 0.0)
                    / global_batch as f64;
                l.backward();
                local_loss += l.double_value(&[]);
            }
            let reduce_started = Instant::now();
            let loss = self
                .buckets
                .all_reduce(&self.params, comm, local_loss)
                .context("all-reduce gradients")?;
            let reduce_seconds = reduce_started.elapsed().as_secs_f64();
            self.opt.step(&mut self.params, lr);
            self.loss = loss;
            self.step = Some(step + 1);
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
                allreduce_bytes: if world > 1 {
                    self.buckets.bytes() as u64
                } else {
                    0
                },
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
                    sample_cursor: self.sampler.cursor(done),
                    optimizer: format!("{:?}", self.opt.kind()).to_lowercase(),
                    optimizer_steps: self.opt.steps,
                    schedule_position: done,
                    schedule_total: steps,
                    seed: spec.job.seed,
                    world_size: world as u32,
                    loss: Some(loss),
                };
                let tensors = state::state_tensors(&self.named, &self.opt)?;
                saver.save(done, &tensors, training_state, &self.eval)?;
            }
            saver.poll(reporter)?;
            let interval = spec.train.eval_interval;
            if interval > 0
                && (step + 1) % interval == 0
                && step + 1 < steps
                && !self.splits.eval.is_empty()
            {
                self.eval = evaluate(&self.net, &self.splits.eval, rank, world, device, comm)?;
                reporter.send(Report::Eval(EvalResult {
                    step: step + 1,
                    metrics: self.eval.clone().into_iter().collect(),
                }))?;
            }
        }
        let samples_per_sec = match timed_from {
            Some((t, done)) if steps > done => {
                ((steps - done) as usize * global_batch) as f64 / t.elapsed().as_secs_f64()
            }
            _ => 0.0,
        };
        if !self.splits.eval.is_empty() {
            self.eval = evaluate(&self.net, &self.splits.eval, rank, world, device, comm)?;
            reporter.send(Report::Eval(EvalResult {
                step: steps,
                metrics: self.eval.clone().into_iter().collect(),
            }))?;
        }

        let checkpoint_url = saver.finish(reporter)?;
        let host: Vec<(String, DType, Vec<usize>, Vec<u8>)> = self
            .named
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
        let reference_profile_path = match (&spec.register, rank) {
            (Some(register), 0) => {
                let path = Path::new(&a.run_dir).join("reference-profile.json");
                self.write_reference_profile(register.reference_rows, &path)?;
                path.display().to_string()
            }
            _ => String::new(),
        };
        comm.barrier().context("final barrier")?;
        reporter.send(Report::Finished(Finished {
            steps,
            final_loss: self.loss,
            eval: self.eval.clone().into_iter().collect(),
            samples_per_sec,
            weights_digest: digest,
            weights_path,
            checkpoint_url: if rank == 0 {
                checkpoint_url.unwrap_or_else(|| self.resumed_from.clone())
            } else {
                String::new()
            },
            resumed_from: self.resumed_from.clone(),
            start_step: self.start_step,
            features: self.splits.train.features as u32,
            classes: self.splits.classes as u32,
            reference_profile_path,
        }))?;
        Ok(())
    }

    /// The reference profile for drift detection: up to `rows` training
    /// inputs (a seeded sample, in the first epoch's order) and the trained
    /// model's predicted class for each, written as JSON to `path`.
    fn write_reference_profile(&self, rows: usize, path: &Path) -> Result<()> {
        use kiln_checkpoint::profile::{ProfileOptions, ReferenceProfile, Task};
        let data = &self.splits.train;
        let order = self.sampler.epoch_order(0);
        let indices: Vec<usize> = order.iter().take(rows).map(|&i| i as usize).collect();
        let (xs, _) = data.batch(&indices, Device::Cpu);
        let predictions: Vec<f64> = tch::no_grad(|| {
            let logits = self.net.forward(&xs.to_device(self.device));
            Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))
        })
        .context("predictions for the reference profile")?
        .into_iter()
        .map(|c| c as f64)
        .collect();
        let inputs = Vec::<f32>::try_from(xs.view([-1])).context("reference inputs")?;
        let options = ProfileOptions {
            max_rows: rows.max(1),
            seed: self.spec.job.seed,
        };
        let profile = ReferenceProfile::from_model_io(
            &inputs,
            data.features,
            None,
            &predictions,
            Task::Classification,
            &options,
        )
        .context("build the reference profile")?;
        std::fs::write(path, profile.to_json_bytes())
            .with_context(|| format!("write {}", path.display()))
    }
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
            // A save of an elastic round that broke waits for parts that will
            // never come; it gives up sooner than a save of a healthy job.
            commit_timeout: if a.elastic {
                Duration::from_secs(60)
            } else {
                SaveConfig::default().commit_timeout
            },
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
            // Each round of an elastic job saves under its own attempt names:
            // a save of a broken round never mixes with a later one's.
            run_id: if a.elastic {
                format!("{}-r{}", a.run_id, a.round)
            } else {
                a.run_id.clone()
            },
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

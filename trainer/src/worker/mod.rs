//! One training rank, top-down: connect to the agent, learn the assignment,
//! build the collective, data and model, then step until done and report.
//!
//! The worker never talks to the store. Everything it learns comes in one
//! `Assignment` from its agent; everything it says goes back as `WorkerMessage`
//! frames on the same local socket.
//!
//! # Layout
//!
//! - this file: the agent channel, rounds (state synchronisation, resume) and
//!   the training loop (`Training::steps`), which reads like torchtitan's
//!   `train()`: step, let the checkpoint manager decide whether to save,
//!   evaluate now and then, finish.
//! - `step`: one training step and the loss of each objective.
//! - `buckets`: gradient buckets and clipping by the global norm.
//! - `eval`: held-out metrics and the reference profile.
//! - checkpoint policy (interval, failure budget, retention) lives in
//!   `kiln_checkpoint::CheckpointManager`.

mod buckets;
mod channel;
mod checkpointing;
mod eval;
mod hooks;
mod step;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_checkpoint::{CheckpointManager, DType, TensorView, weights_digest};
use kiln_proto::frame;
use kiln_proto::spec::{CommTransport, CpuAffinity, JobSpec};
use kiln_proto::worker::{
    AgentMessage, Assignment, EvalResult, Failed, Finished, Hello, Interrupted, Progress,
    RoundStarted, Warning, agent_message, worker_message::Kind as Report,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::collective::nccl::{self, NcclCollective};
use crate::collective::ring::{RingCollective, RingSecret, Transport};
use crate::collective::{AbortHandle, Collective};
use crate::data::{self, GlobalSampler};
use crate::error::{Context, Error, Result};
use crate::optim::{self, Optimizer};
use crate::state::{self, TrainingState};
use crate::{affinity, device};
use buckets::GradBuckets;
use channel::{Reporter, Rounds, agent_channel, watch_agent};
use checkpointing::{
    checkpoint_manager, finish_saves, load_for_resume, prove_shared_storage, report_saves,
    share_news,
};
use kiln_models::{self as model, Net};
use step::{Objective, StepContext};

/// Where a worker finds its agent.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The inherited file descriptor of this worker's end of the socket pair
    /// its agent made for it (nothing else can connect to it).
    pub agent_fd: i32,
    /// The slot on its node the agent started it for (`--local-rank`),
    /// named back in its hello; a spare learns its real slot from its first
    /// assignment.
    pub local_rank: u32,
}

/// Runs one worker to completion. Errors are also reported to the agent.
pub fn run(args: &WorkerArgs) -> Result<()> {
    let stream = agent_channel(args.agent_fd)?;
    let mut reporter = Reporter {
        stream: stream.try_clone().context("clone agent socket")?,
    };
    let mut incoming = stream;
    // A spare (see `agent::ElasticWorkers`) shows itself as such until a slot
    // is its: tools that pick a node's workers from /proc pass over it.
    let spare = std::env::var_os(crate::agent::SPARE_ENV).is_some();
    if spare {
        set_process_name(c"kiln-spare");
    }
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

    let Some(mut assignment) = next_assignment(&mut incoming)? else {
        return Ok(());
    };
    // A spare may be told the job ahead of its slot: it builds what a round
    // needs (data, model, buckets) now, so that taking a slot costs only
    // joining the round.
    let mut prepared = None;
    if assignment.prepare_only {
        prepared = prepare(&assignment);
        reporter.send(Report::Prepared(kiln_proto::worker::Prepared {
            built: prepared.is_some(),
        }))?;
        let Some(next) = next_assignment(&mut incoming)? else {
            return Ok(());
        };
        assignment = next;
    }
    if spare {
        set_process_name(c"kiln");
    }
    let rounds = Rounds::default();
    watch_agent(incoming, rounds.clone());

    let result = train(assignment, prepared, &listener, &rounds, &mut reporter);
    if let Err(e) = &result {
        // Best effort: the agent may already be gone.
        let _ = reporter.send(Report::Failed(Failed {
            error: format!("{e:#}"),
        }));
    }
    result
}

/// The agent's next assignment; `None` when it said stop.
fn next_assignment(incoming: &mut std::os::unix::net::UnixStream) -> Result<Option<Assignment>> {
    match frame::read::<AgentMessage, _>(incoming).context("read assignment from agent")? {
        Some(AgentMessage {
            kind: Some(agent_message::Kind::Assignment(a)),
        }) => Ok(Some(a)),
        Some(AgentMessage {
            kind: Some(agent_message::Kind::Stop(stop)),
        }) => {
            tracing::info!(reason = %stop.reason, "stopped before an assignment");
            Ok(None)
        }
        other => Err(Error::failed(format!(
            "expected an assignment from the agent, got {other:?}"
        ))),
    }
}

/// What a spare built ahead of its slot, for the job spec it was built from.
struct Prepared {
    spec_json: String,
    training: Training,
}

/// Builds a spare's training ahead of its slot, on the CPU only (a GPU
/// spare does not know its device until it has a slot). `None`: build it
/// once assigned (a failure here is reported then, by the same build).
fn prepare(a: &Assignment) -> Option<Prepared> {
    let spec = JobSpec::from_json(&a.spec_json).ok()?;
    if !matches!(
        device::resolve(spec.workers.device, a.local_rank as usize),
        Ok(Device::Cpu)
    ) {
        return None;
    }
    match Training::build(spec, a.local_rank as usize, &a.job) {
        Ok(training) => Some(Prepared {
            spec_json: a.spec_json.clone(),
            training,
        }),
        Err(e) => {
            tracing::debug!("prepare ahead of a slot: {e:#}");
            None
        }
    }
}

/// Sets this process's name (`/proc/PID/comm`, what `ps` and `top` show).
fn set_process_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // (longer ones are cut); `name` is one and outlives the call.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    if rc != 0 {
        tracing::debug!("prctl(PR_SET_NAME): {}", std::io::Error::last_os_error());
    }
}

/// Pins this CPU worker to cores of its own when the node's workers fit
/// (`[workers] cpu_affinity = "auto"`); returns them. A failure to pin is
/// logged, never fatal: the worker runs unpinned.
fn pin_to_own_cores(local_rank: usize, workers: usize, threads: usize) -> Option<Vec<usize>> {
    let allowed = affinity::allowed_cores()
        .inspect_err(|e| tracing::warn!("read this worker's CPU affinity: {e}"))
        .ok()?;
    let cores = affinity::cores_for(local_rank, workers, threads, &allowed)?;
    match affinity::pin_process(&cores) {
        Ok(()) => Some(cores),
        Err(e) => {
            tracing::warn!(?cores, "pin the worker to its cores: {e}; running unpinned");
            None
        }
    }
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
    objective: Objective,
    fingerprint: String,
    /// Steps completed; `None` until this worker holds a training state
    /// (initialised, resumed, or received from a peer).
    step: Option<u64>,
    loss: f64,
    /// Global gradient norm of the last step (NaN when not computed).
    grad_norm: f64,
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

impl Training {
    /// Everything a worker keeps across rounds, built from the job spec for
    /// slot `local_rank` of its node: data, model, optimizer, buckets.
    fn build(spec: JobSpec, local_rank: usize, job: &str) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = spec
            .train
            .threads_per_worker
            .unwrap_or((cores / spec.workers.nproc.max(1)).max(1));
        let device = device::resolve(spec.workers.device, local_rank).map_err(Error::invalid)?;
        let pinned = if device == Device::Cpu && spec.workers.cpu_affinity == CpuAffinity::Auto {
            pin_to_own_cores(local_rank, spec.workers.nproc, threads)
        } else {
            None
        };
        // After pinning: OpenMP's threads inherit the cores.
        tch::set_num_threads(threads as i32);
        tracing::info!(job, threads, ?device, cores = ?pinned, "worker starting");

        tch::manual_seed(spec.job.seed as i64);
        let splits =
            data::load(&spec.data, spec.job.seed, spec.model.vocab).context("load data")?;
        let objective = Objective::of(&spec);
        if objective == Objective::Classification {
            let table = splits
                .train
                .table()
                .ok_or_else(|| Error::invalid("classification needs a table"))?;
            if table.features() == 0 || table.labels().is_none() {
                return Err(Error::invalid(format!(
                    "{} models classify: the data needs float features `x` and integer labels `y` \
                     (found fields {:?}); a TorchScript module with model.returns = \"loss\" takes any fields",
                    format!("{:?}", spec.model.kind).to_lowercase(),
                    table
                        .fields
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                )));
            }
        }
        let vs = VarStore::new(device);
        let io = model::ModelIo {
            features: splits.train.features(),
            classes: splits.classes,
            context: spec.data.seq_len,
        };
        let net =
            model::build_with(&spec.model, io, spec.train.precision, &vs).context("build model")?;
        let named = model::named_parameters(&vs);
        let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let bucket_bytes = (spec.comm.bucket_mb * (1 << 20) as f64) as usize;
        if splits.train.is_empty() {
            return Err(Error::invalid("data.train holds no samples"));
        }
        // Buckets follow the order backward readies gradients, seen on one
        // backward of the first training sample (the same on every rank, whatever
        // the step a run starts at), so the first bucket is complete first.
        let order = hooks::ready_order(&params, || {
            tch::manual_seed(spec.job.seed as i64);
            let batch = splits.train.batch(&[(None, 0)], device)?;
            objective.loss_sum(&net, &batch, true)?.backward();
            Ok(())
        })
        .context("find the order backward readies gradients in")?;
        let bf16_wire = spec.comm.grad_dtype == kiln_proto::spec::Precision::Bf16;
        let buckets = GradBuckets::new(
            &params,
            &order,
            bucket_bytes.max(4),
            device,
            bf16_wire,
            spec.comm.overlap,
        )?;
        tracing::info!(overlap = buckets.overlapped(), "gradient buckets");
        let sampler =
            GlobalSampler::new(spec.job.seed, splits.train.len(), spec.train.global_batch);
        let opt = Optimizer::new(&spec.optimizer, &params);
        let fingerprint = splits.fingerprint();
        Ok(Training {
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
            objective,
            fingerprint,
            step: None,
            loss: f64::NAN,
            grad_norm: f64::NAN,
            eval: BTreeMap::new(),
            start_step: 0,
            resumed_from: String::new(),
            last_saved: None,
            retired: Vec::new(),
        })
    }
}

fn train(
    first: Assignment,
    prepared: Option<Prepared>,
    listener: &TcpListener,
    rounds: &Rounds,
    reporter: &mut Reporter,
) -> Result<()> {
    let mut t = match prepared {
        Some(p) if p.spec_json == first.spec_json => {
            tracing::info!(job = %first.job, "worker starting (built ahead as a spare)");
            p.training
        }
        _ => {
            let spec =
                JobSpec::from_json(&first.spec_json).context("parse job spec from assignment")?;
            // A spare learns its slot from its first assignment.
            Training::build(spec, first.local_rank as usize, &first.job)?
        }
    };

    let mut assignment = first;
    loop {
        if let Some(newer) = rounds.take_pending() {
            assignment = newer;
        }
        let abort = rounds.begin();
        match t.run_round(&assignment, listener, &abort, reporter) {
            Ok(()) => break,
            Err(e) if assignment.elastic && (abort.is_aborted() || e.is_collective()) => {
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
        if rank >= world || a.peers.len() != world {
            return Err(Error::failed(format!(
                "inconsistent assignment: rank {rank}, world {world}, {} peers",
                a.peers.len()
            )));
        }
        let spec = self.spec.clone();
        let device = self.device;
        tracing::info!(job = %a.job, round = a.round, rank, world, "joining round");
        let timeout = Duration::from_secs_f64(spec.comm.timeout_secs);
        let secret = RingSecret::from_bytes(&a.ring_secret)
            .map_err(|e| Error::failed(format!("the assignment of round {}: {e}", a.round)))?;
        let mut ring = RingCollective::connect_abortable(
            a.round,
            rank,
            &a.peers,
            listener,
            &secret,
            timeout,
            match spec.comm.transport {
                CommTransport::Auto => Transport::Auto,
                CommTransport::Tcp => Transport::Tcp,
            },
            abort.clone(),
        )
        .with_context(|| format!("connect collective ring of round {}", a.round))?;
        let mut comm: Box<dyn Collective> = match device {
            Device::Cuda(index) => {
                if !nccl::nccl_available() {
                    return Err(Error::failed(
                        "CUDA tensors need NCCL, and no NCCL library could be loaded",
                    ));
                }
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

        // A new checkpoint manager per round: stripes and the committing rank
        // follow the plan.
        let mut checkpoints = checkpoint_manager(&spec, a, rank, world, &self.fingerprint)?;
        checkpoints.set_last_saved(self.last_saved);
        // Ranks that cannot read each other's writes could never commit a
        // checkpoint (nor resume from one): stop now, saying why.
        if world > 1 && (checkpoints.saves() || !a.resume.is_empty()) {
            prove_shared_storage(checkpoints.root(), a, rank, world, comm.as_mut(), device)
                .context("check that every rank shares the checkpoint location")?;
        }
        let source = self.sync_state(a, rank, world, comm.as_mut(), &mut checkpoints, reporter)?;
        checkpoints
            .reserve(
                state::state_tensors(&self.named, &self.opt)?
                    .iter()
                    .map(|t| t.view()),
            )
            .context("reserve checkpoint buffers")?;
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
        let result = self.steps(a, rank, world, comm.as_mut(), &mut checkpoints, reporter);
        self.last_saved = checkpoints.last_saved();
        if result.is_err() {
            // Saves of this round may wait for parts that will never come.
            self.retire(checkpoints);
        } else {
            drop(checkpoints);
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
        checkpoints: &mut CheckpointManager,
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
            self.initialise(a, comm, checkpoints, reporter)?;
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
        checkpoints: &mut CheckpointManager,
        reporter: &mut Reporter,
    ) -> Result<()> {
        let root = checkpoints.root().clone();
        let which = match a.resume.as_str() {
            "auto" => {
                let any = kiln_checkpoint::list(&root)
                    .with_context(|| format!("list checkpoints under {}", root.url()))?;
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
        let (manifest, loaded, warnings) = load_for_resume(&root, which)?;
        for w in warnings {
            reporter.send(Report::Warning(Warning { message: w }))?;
        }
        let state: TrainingState = serde_json::from_value(manifest.training_state.clone())
            .with_context(|| format!("read training state of checkpoint {}", manifest.key))?;
        if state.optimizer != format!("{:?}", self.opt.kind()).to_lowercase() {
            return Err(Error::invalid(format!(
                "checkpoint {} holds {} optimizer state but the spec asks for {:?}",
                manifest.key,
                state.optimizer,
                self.opt.kind()
            )));
        }
        if state.step > steps {
            return Err(Error::invalid(format!(
                "checkpoint {} is at step {} beyond train.steps = {steps}",
                manifest.key, state.step
            )));
        }
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
        self.resumed_from = root.url_of(&manifest.key);
        checkpoints.resumed(&manifest);
        self.last_saved = Some(manifest.step);
        tracing::info!(step = state.step, checkpoint = %self.resumed_from, "resumed");
        Ok(())
    }

    /// Hands a checkpoint manager whose saves may never commit to a thread
    /// that waits for them (bounded by the commit timeout), so training goes on.
    fn retire(&mut self, checkpoints: CheckpointManager) {
        match std::thread::Builder::new()
            .name("retired-saver".into())
            .spawn(move || drop(checkpoints))
        {
            Ok(handle) => self.retired.push(handle),
            Err(e) => tracing::warn!("retire a checkpoint saver: {e}"),
        }
    }

    /// The training loop of one round, from the synchronised step to the end:
    /// step, let the checkpoint manager decide whether to save, evaluate now
    /// and then; at the end, evaluate, land the last checkpoint, write the
    /// weights and report.
    fn steps(
        &mut self,
        a: &Assignment,
        rank: usize,
        world: usize,
        comm: &mut dyn Collective,
        checkpoints: &mut CheckpointManager,
        reporter: &mut Reporter,
    ) -> Result<()> {
        let spec = self.spec.clone();
        let per_rank = spec.per_rank_batch(world)?;
        let micro_batch = spec.micro_batch_at(world)?;
        let global_batch = spec.train.global_batch;
        let steps = spec.train.steps;
        let first = self.step.expect("state synchronised");
        let mut timed_from: Option<(Instant, u64)> = None;
        for step in first..steps {
            let started = Instant::now();
            let lr = optim::learning_rate(&spec.optimizer, &spec.schedule, step, steps);
            let samples = self.sampler.rank_samples(step, rank, per_rank);
            let first_position = self.sampler.cursor(step) + (rank * per_rank) as u64;
            let outcome = step::train_step(
                &self.net,
                &mut self.params,
                &mut self.opt,
                &mut self.buckets,
                &self.splits.train,
                &samples,
                first_position,
                self.device,
                StepContext {
                    objective: self.objective,
                    global_batch,
                    micro_batch,
                    lr,
                    clip: spec.train.clip_grad_norm,
                    seed: spec.job.seed,
                    comm: &mut *comm,
                },
            )
            .with_context(|| format!("step {}", step + 1))?;
            let done = step + 1;
            self.loss = outcome.loss;
            self.grad_norm = outcome.grad_norm;
            self.step = Some(done);
            reporter.send(Report::Progress(Progress {
                step: done,
                loss: outcome.loss,
                step_seconds: started.elapsed().as_secs_f64(),
                samples: per_rank as u64,
                allreduce_seconds: outcome.reduce_seconds,
                allreduce_bytes: if world > 1 {
                    self.buckets.bytes() as u64
                } else {
                    0
                },
                lr,
                grad_norm: outcome.grad_norm,
            }))?;
            // Throughput excludes the first step (allocations, first-touch, connection warm-up).
            if timed_from.is_none() {
                timed_from = Some((Instant::now(), done));
            }
            if checkpoints.is_due(done) {
                if world > 1 {
                    // Every rank is here: earlier saves that failed anywhere
                    // stop rank 0's commits from waiting for their parts.
                    share_news(checkpoints, comm, self.device, false)?;
                }
                let tensors = state::state_tensors(&self.named, &self.opt)?;
                let views: Vec<TensorView<'_>> = tensors.iter().map(|t| t.view()).collect();
                let training_state = self.training_state(done, world);
                let training_state =
                    serde_json::to_value(training_state).context("training state as JSON")?;
                let events = checkpoints.save(done, &views, training_state, &self.eval)?;
                report_saves(events, reporter)?;
            }
            report_saves(checkpoints.poll()?, reporter)?;
            let interval = spec.train.eval_interval;
            if interval > 0 && done % interval == 0 && done < steps && !self.splits.eval.is_empty()
            {
                self.evaluate(done, rank, world, comm, reporter)?;
            }
        }
        let samples_per_sec = match timed_from {
            Some((t, done)) if steps > done => {
                ((steps - done) as usize * global_batch) as f64 / t.elapsed().as_secs_f64()
            }
            _ => 0.0,
        };
        if !self.splits.eval.is_empty() {
            self.evaluate(steps, rank, world, comm, reporter)?;
        }
        let checkpoint_url = finish_saves(checkpoints, rank, comm, self.device, reporter)?;
        self.finish(
            a,
            rank,
            steps,
            samples_per_sec,
            checkpoint_url,
            comm,
            reporter,
        )
    }

    /// The scalar state saved with a checkpoint after `done` steps.
    fn training_state(&self, done: u64, world: usize) -> TrainingState {
        TrainingState {
            step: done,
            sample_cursor: self.sampler.cursor(done),
            optimizer: format!("{:?}", self.opt.kind()).to_lowercase(),
            optimizer_steps: self.opt.steps,
            schedule_position: done,
            schedule_total: self.spec.train.steps,
            seed: self.spec.job.seed,
            world_size: world as u32,
            loss: Some(self.loss),
        }
    }

    fn evaluate(
        &mut self,
        step: u64,
        rank: usize,
        world: usize,
        comm: &mut dyn Collective,
        reporter: &mut Reporter,
    ) -> Result<()> {
        self.eval = eval::evaluate(
            &self.net,
            self.objective,
            &self.splits.eval,
            rank,
            world,
            self.device,
            comm,
        )?;
        reporter.send(Report::Eval(EvalResult {
            step,
            metrics: self.eval.clone().into_iter().collect(),
        }))
    }

    /// The end of the run: the weights digest, the final weights (rank 0,
    /// through the checkpoint crate's safetensors writer), the reference
    /// profile when the model is registered, a last barrier, `Finished`.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        a: &Assignment,
        rank: usize,
        steps: u64,
        samples_per_sec: f64,
        checkpoint_url: Option<String>,
        comm: &mut dyn Collective,
        reporter: &mut Reporter,
    ) -> Result<()> {
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
            kiln_checkpoint::write_safetensors(&views, &path)
                .with_context(|| format!("write final weights {}", path.display()))?;
            path.display().to_string()
        } else {
            String::new()
        };
        let reference_profile_path = match (&self.spec.register, rank, self.splits.train.table()) {
            (Some(register), 0, Some(table)) if self.objective == Objective::Classification => {
                let path = Path::new(&a.run_dir).join("reference-profile.json");
                eval::write_reference_profile(
                    &self.net,
                    table,
                    &self.sampler.epoch_order(0),
                    register.reference_rows,
                    self.spec.job.seed,
                    self.device,
                    &path,
                )?;
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
            features: self.splits.train.features() as u32,
            classes: self.splits.classes as u32,
            reference_profile_path,
            grad_norm: self.grad_norm,
        }))?;
        Ok(())
    }
}

//! Dynamic batching: per served version, a bounded queue of requests and
//! one or more compute threads (instances), each owning a copy of the
//! network, draining it into forward passes.
//!
//! A free instance takes the oldest request, then waits until either the
//! batch holds `max_batch_size` rows or the oldest request has waited
//! `max_queue_delay` (0 by default: only what is already queued joins),
//! whichever comes first; a request that would overflow the batch starts the
//! next one. A request larger than a batch runs alone, in several passes.
//! While one instance computes, the next takes the next batch.
//!
//! Passes run at a few fixed row counts (`shapes`: by default the powers of
//! two up to `max_batch_size`), each the smallest that holds the batch,
//! padded with zeros: a lone request costs one row's work, not a full
//! batch's. Matrix kernels pick different code paths (and summation orders)
//! for different row counts, which changes the last bits of a sample's
//! logits; at a given shape each row's result depends only on that row. So
//! an answer is a function of its rows and the shape of its pass, bit for
//! bit; between shapes answers agree to float rounding (see docs/serving.md,
//! "The numerical contract"; tests check both). `shapes = [max_batch_size]`
//! makes answers independent of batching altogether.
//!
//! The queue is bounded in requests and in bytes; past either bound a
//! request is refused at once (503 with `Retry-After`), never buffered.
//!
//! Under light load (no queue delay, the default; nothing queued, an
//! instance idle, and the last batch a lone request too), a request runs at
//! once on the thread that parsed it (`inline_when_idle`, on by default
//! where the server may use 2 cores or more, see
//! [`crate::ServeConfig::inline_when_idle`]): it would have been a batch of
//! its own anyway, at the same shape, so its answer is the same bit for bit,
//! and it skips two hand-offs between threads (to the compute thread and
//! back), each a wake-up that costs tens of microseconds when the other
//! thread sleeps on another core. Only when the tokio runtime can move its
//! other tasks away meanwhile (multi-threaded: `block_in_place`). The last
//! batch must have been alone because under load the queue is empty for a
//! moment after every batch: a request run alone then would hold the
//! instance for a one-row pass while the others queue, costing a 32-row
//! batch about a 1-row pass's time.
//!
//! When the last sender is dropped (the version was swapped out and its
//! in-flight requests are done) the instances drain what is queued and exit,
//! freeing their networks.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{ErrorKind, ModelError, RequestError};
use crate::metrics::{Metrics, VersionLabels};
use crate::model::ServingNet;

/// Batching settings of one version.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// Most rows of one forward pass; a larger request runs in several.
    pub max_batch_size: usize,
    /// Row counts passes run at (with `fixed_shape`): ascending, the last
    /// one `max_batch_size`.
    pub shapes: Vec<usize>,
    /// How long the oldest waiting request may wait for others to join its
    /// batch; zero: batch only what is already queued.
    pub max_queue_delay: Duration,
    /// Requests that may wait; more are refused (503).
    pub queue_capacity: usize,
    /// Input bytes that may wait.
    pub max_queue_bytes: usize,
    /// Run every pass at one of `shapes` (padded), so that an answer
    /// depends only on its rows, bit for bit; off: passes run at the rows
    /// they hold.
    pub fixed_shape: bool,
    /// libtorch intra-op threads of each compute thread (0: libtorch's
    /// default). Set on the compute thread itself: OpenMP's thread count is
    /// per thread.
    pub threads: usize,
    /// Compute threads, each with its own copy of the network.
    pub instances: usize,
    /// Compute threads of a language model.
    pub lm_instances: usize,
    /// Shapes an MLP's weights are packed for (see [`crate::packed`]).
    pub packed_shapes: Vec<usize>,
    /// Without a queue delay, a classifier's request that finds nothing
    /// queued and an instance idle runs on the calling thread (see the
    /// module doc).
    pub inline_when_idle: bool,
}

impl BatchSettings {
    /// The row count a pass of `rows` rows runs at.
    pub fn shape_for(&self, rows: usize) -> usize {
        if !self.fixed_shape {
            return rows;
        }
        self.shapes
            .iter()
            .copied()
            .find(|&s| s >= rows)
            .unwrap_or(self.max_batch_size)
    }
}

/// A request's rows waiting for a forward pass: `f32` features for a
/// classifier, `i64` token ids for a language model.
pub struct Job<T = f32> {
    /// Rows of the request.
    pub rows: usize,
    /// rows x width values, row-major.
    pub values: Vec<T>,
    /// When it was queued, for the queue-time metric and batching delay.
    pub enqueued: Instant,
    /// Where its logits (or the pass's failure) go; closed when the caller
    /// gave up, and then the job is skipped.
    pub reply: oneshot::Sender<Result<JobOutput, RequestError>>,
}

impl<T> Job<T> {
    fn bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<T>()
    }
}

/// A request's logits and how it was served.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// rows x classes, row-major.
    pub logits: Vec<f32>,
    /// Time from enqueue to the start of its batch's first pass.
    pub queued: Duration,
    /// Rows in the batch it ran in (padding excluded).
    pub batch_rows: usize,
    /// Its batch's forward passes.
    pub compute: Duration,
}

/// What batching needs to know of a queued request.
pub(crate) trait Queued {
    /// Rows it adds to a batch.
    fn rows(&self) -> usize;
    fn enqueued(&self) -> Instant;
    /// Whether it may start a batch that others join (false: it runs alone,
    /// at once).
    fn batches(&self) -> bool {
        true
    }
    /// Whether it may run in one pass with `first`, the batch's oldest.
    fn joins(&self, _first: &Self) -> bool {
        true
    }
}

impl<T> Queued for Job<T> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn enqueued(&self) -> Instant {
        self.enqueued
    }
}

/// The sending side of a version's queue. Dropping every clone stops the
/// compute threads once the queue is drained.
#[derive(Clone)]
pub struct BatchQueue {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
}

/// What the senders and the compute threads of a version share (everything
/// but the sender, whose clones keep the queue open).
struct Shared {
    /// Input bytes queued and not yet taken by a compute thread (a request
    /// a compute thread carries over to its next batch included).
    queued_bytes: AtomicUsize,
    /// The instances' networks, each locked by whoever runs a pass on it:
    /// its compute thread, or a request run inline.
    instances: Vec<Mutex<ServingNet>>,
    /// Whether the last batch of any instance was a lone request (light
    /// load), which inline runs need.
    last_alone: AtomicBool,
    settings: BatchSettings,
    metrics: Metrics,
    labels: VersionLabels,
}

/// What the instances of a version share: the receiving end, and a request
/// taken but left for the next batch (it would have overflowed the last, or
/// could not join it).
pub(crate) struct Intake<J> {
    rx: Receiver<J>,
    carry: Option<J>,
}

impl<J> Intake<J> {
    pub(crate) fn new(rx: Receiver<J>) -> Arc<Mutex<Intake<J>>> {
        Arc::new(Mutex::new(Intake { rx, carry: None }))
    }
}

/// Starts a compute thread per item of `nets` (a network, or an index of
/// one), named after `name` (`name.i` when there are several), each running
/// `run` on its item.
pub(crate) fn spawn_instances<N: Send + 'static>(
    nets: Vec<N>,
    name: &str,
    run: impl Fn(N) + Clone + Send + 'static,
) -> std::io::Result<()> {
    let count = nets.len();
    for (i, net) in nets.into_iter().enumerate() {
        let thread = if count > 1 {
            format!("{name}.{i}")
        } else {
            name.to_string()
        };
        let run = run.clone();
        std::thread::Builder::new()
            .name(thread)
            .spawn(move || run(net))?;
    }
    Ok(())
}

impl BatchQueue {
    /// Starts one compute thread per network of `nets` (a version's
    /// instances); `name` names the threads.
    pub fn start(
        nets: Vec<ServingNet>,
        settings: BatchSettings,
        metrics: Metrics,
        labels: VersionLabels,
        name: String,
    ) -> std::io::Result<BatchQueue> {
        let (tx, rx) = std::sync::mpsc::sync_channel(settings.queue_capacity);
        let intake = Intake::new(rx);
        let shared = Arc::new(Shared {
            queued_bytes: AtomicUsize::new(0),
            instances: nets.into_iter().map(Mutex::new).collect(),
            last_alone: AtomicBool::new(true),
            settings,
            metrics,
            labels,
        });
        let threads = shared.clone();
        spawn_instances((0..shared.instances.len()).collect(), &name, move |i| {
            compute_loop(i, &threads, &intake)
        })?;
        Ok(BatchQueue { tx, shared })
    }

    /// Runs `job` at once on this thread under light load (nothing queued,
    /// an instance idle, the last batch alone; see the module doc), else
    /// queues it like
    /// [`BatchQueue::submit`]. Either way its answer goes to `job.reply`.
    pub fn run_or_submit(&self, job: Job) -> Result<(), RequestError> {
        let shared = &*self.shared;
        let settings = &shared.settings;
        // Blocking is fine on no runtime at all, and on a multi-threaded
        // one's worker inside `block_in_place`; not on a current-thread one.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let multi_thread = runtime
            .as_ref()
            .is_some_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        // With a queue delay a lone request waits for company instead.
        if !settings.inline_when_idle
            || !settings.max_queue_delay.is_zero()
            || job.rows > settings.max_batch_size
            || shared.queued_bytes.load(Ordering::SeqCst) != 0
            || !shared.last_alone.load(Ordering::Relaxed)
            || (runtime.is_some() && !multi_thread)
        {
            return self.submit(job);
        }
        // An instance whose lock is free is idle: its compute thread waits
        // for the queue, which is empty.
        let Some(net) = shared.instances.iter().find_map(|i| i.try_lock().ok()) else {
            return self.submit(job);
        };
        let run = || {
            use_threads(settings.threads);
            shared.metrics.count_inline(&shared.labels);
            Passes::features(&net, settings).run_batch(
                vec![job],
                &shared.metrics,
                &shared.labels,
                |rows, values| Ok(net.forward(rows, values)?),
            );
        };
        if multi_thread {
            tokio::task::block_in_place(run);
        } else {
            run();
        }
        Ok(())
    }

    /// Queues a job; refuses at once when the queue is full (in requests or
    /// in bytes).
    pub fn submit(&self, job: Job) -> Result<(), RequestError> {
        let queued_bytes = &self.shared.queued_bytes;
        let max_bytes = self.shared.settings.max_queue_bytes;
        let bytes = job.bytes();
        if bytes > max_bytes {
            return Err(RequestError::new(
                ErrorKind::TooLarge,
                format!(
                    "the request's inputs take {bytes} bytes as f32; this server queues at most {} bytes per model (batching.max_queue_bytes)",
                    max_bytes
                ),
            ));
        }
        let before = queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        if before + bytes > max_bytes {
            queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
            return Err(RequestError::unavailable(
                "the model's request queue is full (bytes); retry later",
            ));
        }
        self.tx.try_send(job).map_err(|e| {
            queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
            refused(e)
        })
    }
}

/// The answer to a request its version's queue did not take.
pub(crate) fn refused<J>(e: TrySendError<J>) -> RequestError {
    match e {
        TrySendError::Full(_) => {
            RequestError::unavailable("the model's request queue is full; retry later")
        }
        TrySendError::Disconnected(_) => {
            RequestError::unavailable("the model version stopped; retry")
        }
    }
}

/// Sets this thread's libtorch intra-op threads to `threads` (0: leave
/// libtorch's default), once per thread: OpenMP's count is per thread, and
/// a pass's bits depend on it.
fn use_threads(threads: usize) {
    thread_local! {
        static SET: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    if threads > 0 && SET.get() != threads {
        tch::set_num_threads(threads as i32);
        SET.set(threads);
    }
}

fn compute_loop(instance: usize, shared: &Shared, intake: &Mutex<Intake<Job>>) {
    let settings = &shared.settings;
    use_threads(settings.threads);
    let net = &shared.instances[instance];
    let passes = Passes::features(&lock(net), settings);
    while let Some(batch) = take_batch(intake, settings) {
        // A request run inline may hold the network: this batch waits for it.
        let net = lock(net);
        let taken: usize = batch.iter().map(Job::bytes).sum();
        shared.queued_bytes.fetch_sub(taken, Ordering::SeqCst);
        // Requests whose caller gave up (timed out, disconnected) are skipped.
        let batch: Vec<Job> = batch
            .into_iter()
            .filter(|job| !job.reply.is_closed())
            .collect();
        if !batch.is_empty() {
            shared.last_alone.store(batch.len() == 1, Ordering::Relaxed);
            passes.run_batch(batch, &shared.metrics, &shared.labels, |rows, values| {
                Ok(net.forward(rows, values)?)
            });
        }
    }
    let labels = &shared.labels;
    tracing::debug!(model = %labels.model, version = %labels.version, "compute thread stopped");
}

/// Locks an instance's network; a pass that panicked while holding it was
/// caught (see [`catch`]), so the network is still whole.
fn lock(net: &Mutex<ServingNet>) -> std::sync::MutexGuard<'_, ServingNet> {
    net.lock().unwrap_or_else(|e| e.into_inner())
}

/// The next batch from the shared intake (see [`next_batch`]); the lock is
/// held only while the batch is gathered, never while it runs.
pub(crate) fn take_batch<J: Queued>(
    intake: &Mutex<Intake<J>>,
    settings: &BatchSettings,
) -> Option<Vec<J>> {
    let mut intake = intake.lock().unwrap_or_else(|e| e.into_inner());
    next_batch(&mut intake, settings)
}

/// The next batch: the oldest request and those that join it (see the
/// module doc); `None` once every sender is gone and the queue is empty.
fn next_batch<J: Queued>(intake: &mut Intake<J>, settings: &BatchSettings) -> Option<Vec<J>> {
    let first = match intake.carry.take() {
        Some(job) => job,
        None => intake.rx.recv().ok()?,
    };
    if !first.batches() {
        return Some(vec![first]);
    }
    let deadline = first.enqueued() + settings.max_queue_delay;
    let mut rows = first.rows();
    let mut batch = vec![first];
    while rows < settings.max_batch_size {
        let wait = deadline.saturating_duration_since(Instant::now());
        let next = if wait.is_zero() {
            intake.rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
        } else {
            intake.rx.recv_timeout(wait)
        };
        match next {
            Ok(job) if rows + job.rows() > settings.max_batch_size || !job.joins(&batch[0]) => {
                intake.carry = Some(job);
                break;
            }
            Ok(job) => {
                rows += job.rows();
                batch.push(job);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// How a compute thread runs a batch's rows through its network: passes of
/// at most `max_batch_size` rows, each at its shape (see
/// [`BatchSettings::shape_for`]), padded with rows of `pad`.
pub(crate) struct Passes<'a, T> {
    /// Values per row.
    pub width: usize,
    /// What padding rows hold (a valid input).
    pub pad: T,
    /// Logits per row.
    pub classes: usize,
    pub settings: &'a BatchSettings,
}

impl<'a> Passes<'a, f32> {
    /// Rows of a classifier's features, padded with zeros.
    fn features(net: &ServingNet, settings: &'a BatchSettings) -> Passes<'a, f32> {
        Passes {
            width: net.features(),
            pad: 0.0,
            classes: net.classes(),
            settings,
        }
    }
}

impl<T: Copy> Passes<'_, T> {
    /// Runs `batch` as one batch through `pass` (rows, values -> logits) and
    /// answers each job with its rows' logits. libtorch panics become errors.
    pub(crate) fn run_batch(
        &self,
        batch: Vec<Job<T>>,
        metrics: &Metrics,
        labels: &VersionLabels,
        mut pass: impl FnMut(usize, &[T]) -> anyhow::Result<Vec<f32>>,
    ) {
        let started = Instant::now();
        let rows: usize = batch.iter().map(|j| j.rows).sum();
        let result = if let [job] = batch.as_slice() {
            catch(|| self.in_passes(rows, &job.values, &mut pass))
        } else {
            let mut values = Vec::with_capacity(rows * self.width);
            for job in &batch {
                values.extend_from_slice(&job.values);
            }
            catch(|| self.in_passes(rows, &values, &mut pass))
        };
        let compute = started.elapsed();
        metrics.observe_batch(labels, rows, compute);
        match result {
            Ok(logits) => {
                let mut at = 0;
                for job in batch {
                    let n = job.rows * self.classes;
                    let queued = started.saturating_duration_since(job.enqueued);
                    metrics.observe_queue(labels, queued);
                    let _ = job.reply.send(Ok(JobOutput {
                        logits: logits[at..at + n].to_vec(),
                        queued,
                        batch_rows: rows,
                        compute,
                    }));
                    at += n;
                }
            }
            Err(e) => {
                tracing::error!(model = %labels.model, version = %labels.version, error = %format!("{e:#}"), "forward pass failed");
                for job in batch {
                    let _ = job.reply.send(Err(RequestError::internal(format!(
                        "inference failed: {e:#}"
                    ))));
                }
            }
        }
    }

    /// Logits of `rows` rows (`values`: rows x width), computed in passes of
    /// at most `max_batch_size` rows, each run at its shape, padded.
    pub(crate) fn in_passes(
        &self,
        rows: usize,
        values: &[T],
        pass: &mut impl FnMut(usize, &[T]) -> anyhow::Result<Vec<f32>>,
    ) -> anyhow::Result<Vec<f32>> {
        let (width, classes) = (self.width, self.classes);
        let step = self.settings.max_batch_size;
        let mut logits = Vec::with_capacity(rows * classes);
        let mut padded = Vec::new();
        for start in (0..rows).step_by(step) {
            let n = step.min(rows - start);
            let chunk = &values[start * width..(start + n) * width];
            let shape = self.settings.shape_for(n);
            if shape > n {
                padded.clear();
                padded.extend_from_slice(chunk);
                padded.resize(shape * width, self.pad);
                let out = pass(shape, &padded)?;
                logits.extend_from_slice(&out[..n * classes]);
            } else {
                logits.extend(pass(n, chunk)?);
            }
        }
        Ok(logits)
    }

    /// Runs a few passes at every shape (and at one row when shapes are
    /// off) so the first real request does not pay for libtorch's lazy
    /// initialisation (kernel selection, allocator growth).
    pub(crate) fn warm_up(
        &self,
        mut pass: impl FnMut(usize, &[T]) -> anyhow::Result<Vec<f32>>,
    ) -> anyhow::Result<()> {
        let settings = self.settings;
        let padding = vec![self.pad; settings.max_batch_size * self.width];
        let mut shapes = settings.shapes.clone();
        if !settings.fixed_shape {
            shapes.insert(0, 1);
        }
        for _ in 0..2 {
            for &shape in &shapes {
                self.in_passes(shape, &padding[..shape * self.width], &mut pass)?;
            }
        }
        Ok(())
    }
}

/// Runs `f`, turning a libtorch panic into an error.
pub(crate) fn catch<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(anyhow::anyhow!("libtorch failed: {what}"))
    })
}

/// Warms a classifier up at every shape (see [`Passes::warm_up`]). A failed
/// pass is `Internal`: `warm up: ` and the pass's error.
pub fn warm_up(net: &ServingNet, settings: &BatchSettings) -> Result<(), ModelError> {
    Passes::features(net, settings)
        .warm_up(|rows, values| Ok(net.forward(rows, values)?))
        .map_err(|e| ModelError::internal("warm up", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(shapes: &[usize], fixed: bool) -> BatchSettings {
        BatchSettings {
            max_batch_size: *shapes.last().unwrap(),
            shapes: shapes.to_vec(),
            max_queue_delay: Duration::ZERO,
            queue_capacity: 4,
            max_queue_bytes: 1 << 20,
            fixed_shape: fixed,
            threads: 1,
            instances: 1,
            lm_instances: 1,
            packed_shapes: Vec::new(),
            inline_when_idle: true,
        }
    }

    #[test]
    fn a_pass_runs_at_the_smallest_shape_that_holds_it() {
        let s = settings(&[1, 2, 4, 8, 16, 24], true);
        let got: Vec<usize> = [1, 2, 3, 5, 8, 9, 17, 24]
            .iter()
            .map(|&n| s.shape_for(n))
            .collect();
        assert_eq!(got, vec![1, 2, 4, 8, 8, 16, 24, 24]);
        let s = settings(&[32], true);
        assert_eq!(s.shape_for(1), 32);
        let s = settings(&[1, 2, 4], false);
        assert_eq!(s.shape_for(3), 3);
    }
}

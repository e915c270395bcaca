//! Dynamic batching: one compute thread per served version, owning its
//! network, draining a bounded queue of requests into forward passes.
//!
//! The thread takes the oldest request, then waits until either the batch
//! holds `max_batch_size` rows or the oldest request has waited
//! `max_queue_delay`, whichever comes first; a request that would overflow
//! the batch starts the next one. A request larger than a batch runs alone,
//! in several passes.
//!
//! Outputs do not depend on batch composition: with `fixed_shape` (the
//! default) every pass runs at exactly `max_batch_size` rows, padding with
//! zeros, because matrix kernels pick different code paths (and summation
//! orders) for different row counts, which changes the last bits of a
//! sample's logits; at a fixed shape each row's result depends only on that
//! row. The tests check batched against unbatched results bit for bit.
//!
//! When the last sender is dropped (the version was swapped out and its
//! in-flight requests are done) the thread drains what is queued and exits,
//! freeing the network.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::RequestError;
use crate::metrics::{Metrics, VersionLabels};
use crate::model::ServingNet;

/// Batching settings of one version.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    pub queue_capacity: usize,
    pub fixed_shape: bool,
    /// libtorch intra-op threads of the compute thread (0: libtorch's default).
    /// Set on the compute thread itself: OpenMP's thread count is per thread.
    pub threads: usize,
}

/// A request's rows waiting for a forward pass.
pub struct Job {
    pub rows: usize,
    /// rows x features, row-major.
    pub values: Vec<f32>,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<JobOutput, RequestError>>,
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
}

/// The sending side of a version's queue. Dropping every clone stops the
/// compute thread once the queue is drained.
#[derive(Clone)]
pub struct BatchQueue {
    tx: SyncSender<Job>,
}

impl BatchQueue {
    /// Starts the compute thread of `net`; `name` names the thread.
    pub fn start(
        net: ServingNet,
        settings: BatchSettings,
        metrics: Metrics,
        labels: VersionLabels,
        name: String,
    ) -> std::io::Result<BatchQueue> {
        let (tx, rx) = std::sync::mpsc::sync_channel(settings.queue_capacity);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || compute_loop(net, rx, settings, metrics, labels))?;
        Ok(BatchQueue { tx })
    }

    /// Queues a job; refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), RequestError> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(RequestError::unavailable(
                "the model's request queue is full; retry later",
            )),
            Err(TrySendError::Disconnected(_)) => Err(RequestError::unavailable(
                "the model version stopped; retry",
            )),
        }
    }
}

fn compute_loop(
    net: ServingNet,
    rx: Receiver<Job>,
    settings: BatchSettings,
    metrics: Metrics,
    labels: VersionLabels,
) {
    if settings.threads > 0 {
        tch::set_num_threads(settings.threads as i32);
    }
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let deadline = first.enqueued + settings.max_queue_delay;
        let mut rows = first.rows;
        let mut batch = vec![first];
        while rows < settings.max_batch_size {
            let wait = deadline.saturating_duration_since(Instant::now());
            let next = if wait.is_zero() {
                rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
            } else {
                rx.recv_timeout(wait)
            };
            match next {
                Ok(job) if rows + job.rows > settings.max_batch_size => {
                    carry = Some(job);
                    break;
                }
                Ok(job) => {
                    rows += job.rows;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // Requests whose caller gave up (timed out, disconnected) are skipped.
        batch.retain(|job| !job.reply.is_closed());
        if !batch.is_empty() {
            run_batch(&net, batch, &settings, &metrics, &labels);
        }
    }
    tracing::debug!(model = %labels.model, version = %labels.version, "compute thread stopped");
}

fn run_batch(
    net: &ServingNet,
    batch: Vec<Job>,
    settings: &BatchSettings,
    metrics: &Metrics,
    labels: &VersionLabels,
) {
    let started = Instant::now();
    let rows: usize = batch.iter().map(|j| j.rows).sum();
    let features = net.features();
    let mut values = Vec::with_capacity(rows * features);
    for job in &batch {
        values.extend_from_slice(&job.values);
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        forward_in_passes(net, rows, &values, settings)
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(anyhow::anyhow!("libtorch failed: {what}"))
    });
    let compute = started.elapsed();
    metrics.observe_batch(labels, rows, compute);
    match result {
        Ok(logits) => {
            let classes = net.classes();
            let mut at = 0;
            for job in batch {
                let n = job.rows * classes;
                let queued = started.saturating_duration_since(job.enqueued);
                metrics.observe_queue(labels, queued);
                let _ = job.reply.send(Ok(JobOutput {
                    logits: logits[at..at + n].to_vec(),
                    queued,
                    batch_rows: rows,
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

/// Logits of `rows` rows, computed in passes of at most `max_batch_size`
/// rows (exactly that many, zero-padded, with `fixed_shape`).
fn forward_in_passes(
    net: &ServingNet,
    rows: usize,
    values: &[f32],
    settings: &BatchSettings,
) -> anyhow::Result<Vec<f32>> {
    let (features, classes) = (net.features(), net.classes());
    let pass = settings.max_batch_size;
    let mut logits = Vec::with_capacity(rows * classes);
    let mut padded = Vec::new();
    for start in (0..rows).step_by(pass) {
        let n = pass.min(rows - start);
        let chunk = &values[start * features..(start + n) * features];
        if settings.fixed_shape && n < pass {
            padded.clear();
            padded.extend_from_slice(chunk);
            padded.resize(pass * features, 0.0);
            let out = net.forward(pass, &padded)?;
            logits.extend_from_slice(&out[..n * classes]);
        } else {
            logits.extend(net.forward(n, chunk)?);
        }
    }
    Ok(logits)
}

/// Runs a few passes so the first real request does not pay for libtorch's
/// lazy initialisation (kernel selection, allocator growth).
pub fn warm_up(net: &ServingNet, settings: &BatchSettings) -> anyhow::Result<()> {
    let rows = settings.max_batch_size;
    let zeros = vec![0.0f32; rows * net.features()];
    for _ in 0..3 {
        forward_in_passes(net, rows, &zeros, settings)?;
        if !settings.fixed_shape {
            forward_in_passes(net, 1, &zeros[..net.features()], settings)?;
        }
    }
    Ok(())
}

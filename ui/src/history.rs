//! A job's metrics history: the progress series (step, loss, learning rate,
//! throughput, gradient norm, all-reduce and step time), held-out metrics,
//! rounds and checkpoints, kept small enough to live in one store value.
//!
//! The series is downsampled by step: it holds at most `capacity` buckets,
//! each covering an aligned range of `span` steps (a power of two). A new
//! sample joins the bucket of its range or opens the next one; when a sample
//! would open bucket `capacity + 1`, the span doubles and neighbouring
//! buckets merge pairwise. Every bucket keeps, per metric, the minimum,
//! maximum, last value and sum (so the mean), so a spike survives any amount
//! of merging. A million-step job with the default capacity ends with at most
//! 512 buckets of 2048 steps each (about 100 KB of JSON).
//!
//! Pure data, no I/O: [`crate::recorder`] feeds and persists it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Buckets a series keeps unless told otherwise.
pub const DEFAULT_CAPACITY: usize = 512;

/// Rounds, checkpoints and evaluations a history keeps: the newest this many.
pub const MAX_MARKS: usize = 200;

/// One training step's figures, as rank 0 reported them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The optimizer step just taken.
    pub step: u64,
    /// Unix time in seconds when the agent saw the step.
    pub at: f64,
    /// Global mean training loss of the step.
    pub loss: f64,
    /// Learning rate the step used.
    pub lr: f64,
    /// Global samples per second of the step.
    pub throughput: f64,
    /// Global L2 norm of the gradients before clipping; NaN when the job
    /// does not compute it (`train.clip_grad_norm` unset).
    pub grad_norm: f64,
    /// Seconds rank 0 spent in the step's gradient all-reduce.
    pub allreduce_seconds: f64,
    /// Wall-clock seconds of the whole step on rank 0.
    pub step_seconds: f64,
}

impl Sample {
    /// A sample from a worker's progress report; `global_batch` turns step
    /// time into global throughput.
    pub fn from_progress(p: &kiln_proto::worker::Progress, global_batch: usize, at: f64) -> Self {
        let throughput = if p.step_seconds > 0.0 {
            global_batch as f64 / p.step_seconds
        } else {
            f64::NAN
        };
        Sample {
            step: p.step,
            at,
            loss: p.loss,
            lr: p.lr,
            throughput,
            grad_norm: p.grad_norm,
            allreduce_seconds: p.allreduce_seconds,
            step_seconds: p.step_seconds,
        }
    }
}

/// Minimum, maximum, last and sum of one metric over a bucket's samples.
/// Non-finite values are left out (a bucket without any has no `Stat`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Smallest value.
    pub min: f64,
    /// Largest value: a spike survives any merging.
    pub max: f64,
    /// The value of the bucket's newest sample that had one.
    pub last: f64,
    /// Sum of the values, for the mean.
    pub sum: f64,
    /// Values summed (finite ones).
    pub n: u64,
}

impl Stat {
    fn of(value: f64) -> Option<Stat> {
        value.is_finite().then_some(Stat {
            min: value,
            max: value,
            last: value,
            sum: value,
            n: 1,
        })
    }

    /// `earlier` followed by `later`.
    fn merge(earlier: Option<Stat>, later: Option<Stat>) -> Option<Stat> {
        match (earlier, later) {
            (None, x) | (x, None) => x,
            (Some(a), Some(b)) => Some(Stat {
                min: a.min.min(b.min),
                max: a.max.max(b.max),
                last: b.last,
                sum: a.sum + b.sum,
                n: a.n + b.n,
            }),
        }
    }

    /// Mean of the values (`sum / n`).
    pub fn mean(&self) -> f64 {
        self.sum / self.n as f64
    }
}

/// The metrics of a bucket, one [`Stat`] each;
/// `None` where no sample of the bucket had a finite value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// [`Sample::loss`].
    pub loss: Option<Stat>,
    /// [`Sample::lr`].
    pub lr: Option<Stat>,
    /// [`Sample::throughput`], samples per second.
    pub throughput: Option<Stat>,
    /// [`Sample::grad_norm`]; `None` when the job does not compute it.
    pub grad_norm: Option<Stat>,
    /// [`Sample::allreduce_seconds`].
    pub allreduce_seconds: Option<Stat>,
    /// [`Sample::step_seconds`].
    pub step_seconds: Option<Stat>,
}

impl Metrics {
    fn of(s: &Sample) -> Self {
        Metrics {
            loss: Stat::of(s.loss),
            lr: Stat::of(s.lr),
            throughput: Stat::of(s.throughput),
            grad_norm: Stat::of(s.grad_norm),
            allreduce_seconds: Stat::of(s.allreduce_seconds),
            step_seconds: Stat::of(s.step_seconds),
        }
    }

    fn merge(a: &Metrics, b: &Metrics) -> Metrics {
        Metrics {
            loss: Stat::merge(a.loss, b.loss),
            lr: Stat::merge(a.lr, b.lr),
            throughput: Stat::merge(a.throughput, b.throughput),
            grad_norm: Stat::merge(a.grad_norm, b.grad_norm),
            allreduce_seconds: Stat::merge(a.allreduce_seconds, b.allreduce_seconds),
            step_seconds: Stat::merge(a.step_seconds, b.step_seconds),
        }
    }
}

/// The samples of one aligned range of steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Step of the bucket's oldest sample.
    pub first_step: u64,
    /// Step of its newest sample.
    pub last_step: u64,
    /// Unix seconds of the oldest sample.
    pub first_at: f64,
    /// Unix seconds of the newest sample.
    pub last_at: f64,
    /// Samples merged into the bucket.
    pub count: u64,
    /// The figures over those samples.
    pub metrics: Metrics,
}

impl Bucket {
    fn of(s: &Sample) -> Self {
        Bucket {
            first_step: s.step,
            last_step: s.step,
            first_at: s.at,
            last_at: s.at,
            count: 1,
            metrics: Metrics::of(s),
        }
    }

    /// `self` followed by `later`.
    fn absorb(&mut self, later: &Bucket) {
        self.last_step = later.last_step;
        self.last_at = later.last_at;
        self.count += later.count;
        self.metrics = Metrics::merge(&self.metrics, &later.metrics);
    }
}

/// The downsampled progress series of a job (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressSeries {
    capacity: usize,
    /// Steps per bucket: a power of two.
    span: u64,
    buckets: Vec<Bucket>,
}

impl Default for ProgressSeries {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl ProgressSeries {
    /// A series of at most `capacity` buckets (at least 2).
    pub fn with_capacity(capacity: usize) -> Self {
        ProgressSeries {
            capacity: capacity.max(2),
            span: 1,
            buckets: Vec::new(),
        }
    }

    /// The buckets, oldest first.
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Steps per bucket now: a power of two that doubles as the series
    /// outgrows its capacity.
    pub fn span(&self) -> u64 {
        self.span
    }

    /// The newest bucket, whose `last` values are the latest figures.
    pub fn last(&self) -> Option<&Bucket> {
        self.buckets.last()
    }

    /// Adds a sample. A step at or before the last one recorded means the job
    /// went back (it resumed from an older checkpoint): buckets from that
    /// step on are dropped first, so the series shows the run as it went on.
    pub fn push(&mut self, sample: &Sample) {
        if self
            .buckets
            .last()
            .is_some_and(|b| sample.step <= b.last_step)
        {
            self.buckets.retain(|b| b.last_step < sample.step);
        }
        let index = sample.step / self.span;
        match self.buckets.last_mut() {
            Some(last) if last.first_step / self.span == index => last.absorb(&Bucket::of(sample)),
            _ => self.buckets.push(Bucket::of(sample)),
        }
        while self.buckets.len() > self.capacity {
            self.span *= 2;
            self.rebucket();
        }
    }

    /// Merges neighbours that fall into one range of the current span.
    fn rebucket(&mut self) {
        let mut merged: Vec<Bucket> = Vec::with_capacity(self.buckets.len() / 2 + 1);
        for b in self.buckets.drain(..) {
            match merged.last_mut() {
                Some(last) if last.first_step / self.span == b.first_step / self.span => {
                    last.absorb(&b)
                }
                _ => merged.push(b),
            }
        }
        self.buckets = merged;
    }
}

/// A round the job's workers started, as rank 0 saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMark {
    /// The rendezvous round.
    pub round: u64,
    /// Workers in the round, over every node.
    pub world_size: u32,
    /// The step the round started from.
    pub step: u64,
    /// Unix seconds.
    pub at: f64,
    /// From the assignment to the first step: the recovery's duration for
    /// every round after the first.
    pub setup_seconds: f64,
    /// Where the state came from: a rank (broadcast), a checkpoint, or fresh.
    pub state_source: String,
}

/// A committed checkpoint, as rank 0's save reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMark {
    /// The step saved.
    pub step: u64,
    /// The checkpoint's manifest URL.
    pub url: String,
    /// Unix seconds when the agent heard of the commit.
    pub at: f64,
    /// Stored bytes uploaded for the checkpoint (every rank's, as the
    /// committer counts them).
    pub bytes_uploaded: u64,
    /// Stored bytes referenced without uploading: chunks an earlier
    /// checkpoint already stored.
    pub bytes_reused: u64,
    /// How long training was blocked by the save.
    pub blocking_seconds: f64,
    /// From the save call until the checkpoint was committed.
    pub durable_seconds: f64,
    /// How rank 0 stored its chunks (`zstd`, `none`; empty when unknown).
    #[serde(default)]
    pub codec: String,
}

/// Held-out metrics at a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMark {
    /// The step evaluated.
    pub step: u64,
    /// Unix seconds when the agent heard of it.
    pub at: f64,
    /// Each held-out metric by name (`loss`, `accuracy`, ...).
    pub metrics: BTreeMap<String, f64>,
}

/// Everything the dashboard shows of a job's past: the record the agent
/// keeps at `jobs/{job}/history` and in `kiln run`'s run folder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobHistory {
    /// The job's id.
    pub job: String,
    /// Training progress, downsampled.
    pub series: ProgressSeries,
    /// Held-out evaluations, oldest first, the newest [`MAX_MARKS`] kept.
    #[serde(default)]
    pub evals: Vec<EvalMark>,
    /// Rounds, oldest first, the newest [`MAX_MARKS`] kept.
    #[serde(default)]
    pub rounds: Vec<RoundMark>,
    /// Committed checkpoints, oldest first, the newest [`MAX_MARKS`] kept.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointMark>,
}

impl JobHistory {
    /// An empty history of `job`.
    pub fn new(job: &str) -> Self {
        JobHistory {
            job: job.to_string(),
            ..Default::default()
        }
    }

    /// Records an evaluation, dropping the oldest beyond [`MAX_MARKS`].
    pub fn push_eval(&mut self, mark: EvalMark) {
        push_bounded(&mut self.evals, mark);
    }

    /// Records a round, dropping the oldest beyond [`MAX_MARKS`].
    pub fn push_round(&mut self, mark: RoundMark) {
        push_bounded(&mut self.rounds, mark);
    }

    /// Records a checkpoint, dropping the oldest beyond [`MAX_MARKS`].
    pub fn push_checkpoint(&mut self, mark: CheckpointMark) {
        push_bounded(&mut self.checkpoints, mark);
    }
}

fn push_bounded<T>(marks: &mut Vec<T>, mark: T) {
    marks.push(mark);
    if marks.len() > MAX_MARKS {
        let excess = marks.len() - MAX_MARKS;
        marks.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64, loss: f64) -> Sample {
        Sample {
            step,
            at: step as f64,
            loss,
            lr: 0.1,
            throughput: 100.0,
            grad_norm: f64::NAN,
            allreduce_seconds: 0.001,
            step_seconds: 0.01,
        }
    }

    #[test]
    fn keeps_every_sample_until_full() {
        let mut s = ProgressSeries::with_capacity(8);
        for step in 1..=8 {
            s.push(&sample(step, step as f64));
        }
        assert_eq!(s.span(), 1);
        assert_eq!(s.buckets().len(), 8);
        assert!(s.buckets().iter().all(|b| b.count == 1));
        assert_eq!(s.last().unwrap().metrics.loss.unwrap().last, 8.0);
        // A metric that is never finite has no statistics.
        assert!(s.buckets().iter().all(|b| b.metrics.grad_norm.is_none()));
    }

    #[test]
    fn a_million_steps_stay_within_capacity_and_keep_extremes() {
        let mut s = ProgressSeries::with_capacity(512);
        for step in 1..=1_000_000u64 {
            // A single spike at step 777_777 must survive every merge.
            let loss = if step == 777_777 { 50.0 } else { 1.0 };
            s.push(&sample(step, loss));
        }
        let buckets = s.buckets();
        assert!(buckets.len() <= 512, "{} buckets", buckets.len());
        assert!(s.span().is_power_of_two());
        // Every sample is counted exactly once and the ranges are ordered.
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 1_000_000);
        assert_eq!(buckets[0].first_step, 1);
        assert_eq!(buckets.last().unwrap().last_step, 1_000_000);
        for w in buckets.windows(2) {
            assert!(w[0].last_step < w[1].first_step);
        }
        let max = buckets
            .iter()
            .map(|b| b.metrics.loss.unwrap().max)
            .fold(f64::MIN, f64::max);
        assert_eq!(max, 50.0);
        let spike = buckets
            .iter()
            .find(|b| (b.first_step..=b.last_step).contains(&777_777))
            .unwrap();
        assert_eq!(spike.metrics.loss.unwrap().max, 50.0);
        assert_eq!(spike.metrics.loss.unwrap().min, 1.0);
        // The serialized series stays small enough for one etcd value.
        let json = serde_json::to_vec(&s).unwrap();
        assert!(json.len() < 400_000, "{} bytes", json.len());
    }

    #[test]
    fn merging_keeps_min_max_last_and_mean() {
        let mut s = ProgressSeries::with_capacity(2);
        for (step, loss) in [(0, 4.0), (1, 2.0), (2, 6.0), (3, 1.0)] {
            s.push(&sample(step, loss));
        }
        // 4 steps into at most 2 buckets: span 2, [0,1] and [2,3].
        assert_eq!(s.span(), 2);
        let b = s.buckets();
        assert_eq!(b.len(), 2);
        let first = b[0].metrics.loss.unwrap();
        assert_eq!(
            (first.min, first.max, first.last, first.mean()),
            (2.0, 4.0, 2.0, 3.0)
        );
        let second = b[1].metrics.loss.unwrap();
        assert_eq!((second.min, second.max, second.last), (1.0, 6.0, 1.0));
        assert_eq!((b[1].first_step, b[1].last_step, b[1].count), (2, 3, 2));
    }

    #[test]
    fn going_back_to_an_older_step_drops_what_came_after() {
        let mut s = ProgressSeries::with_capacity(64);
        for step in 1..=30 {
            s.push(&sample(step, 1.0));
        }
        // Resumed from a checkpoint at step 20: steps 21.. are replayed.
        s.push(&sample(21, 2.0));
        assert_eq!(s.last().unwrap().last_step, 21);
        assert_eq!(s.buckets().iter().map(|b| b.count).sum::<u64>(), 21);
        assert_eq!(s.last().unwrap().metrics.loss.unwrap().last, 2.0);
    }

    #[test]
    fn history_round_trips_through_json_and_bounds_its_marks() {
        let mut h = JobHistory::new("digits");
        h.series.push(&sample(1, 0.5));
        for step in 0..(MAX_MARKS as u64 + 10) {
            h.push_eval(EvalMark {
                step,
                at: 0.0,
                metrics: BTreeMap::from([("eval_loss".to_string(), 0.1)]),
            });
        }
        assert_eq!(h.evals.len(), MAX_MARKS);
        assert_eq!(h.evals[0].step, 10);
        let back: JobHistory = serde_json::from_slice(&serde_json::to_vec(&h).unwrap()).unwrap();
        assert_eq!(back, h);
    }
}

//! The drift monitor: rolling windows of served rows (inputs and
//! predictions), handed back full to be evaluated against the prepared
//! reference wherever the caller likes (see the module docs of `drift`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_checkpoint::profile::ReferenceProfile;
use serde::Serialize;

use super::compare::{DriftError, DriftOptions, DriftReport, PreparedReference};

/// A served value the monitor can record (converted to `f64`).
pub trait DriftValue: Copy {
    /// The value as `f64` (integers above 2^53 lose precision).
    fn to_f64(self) -> f64;
}

macro_rules! drift_value {
    ($($t:ty),*) => {$(
        impl DriftValue for $t {
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    )*};
}
drift_value!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);

impl DriftValue for bool {
    fn to_f64(self) -> f64 {
        if self { 1.0 } else { 0.0 }
    }
}

/// Counters of a monitor, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MonitorStats {
    /// Rows observed since the monitor started.
    pub rows_observed: u64,
    /// Windows filled (handed back by `observe`).
    pub windows_completed: u64,
    /// Windows evaluated.
    pub windows_evaluated: u64,
    /// Evaluated windows with dataset drift.
    pub dataset_drift_windows: u64,
}

#[derive(Debug)]
struct Shared {
    reference: PreparedReference,
    options: DriftOptions,
    latest: Mutex<Option<DriftReport>>,
    rows_observed: AtomicU64,
    windows_completed: AtomicU64,
    windows_evaluated: AtomicU64,
    dataset_drift_windows: AtomicU64,
}

/// The window being filled. Rows are appended as they come, row-major (a
/// row's features, then its predictions): one contiguous copy per request,
/// where appending to one vector per column touched as many cache lines as
/// the row has values (`perf`, 1-core server, the 784-feature MLP at 32
/// connections: 3.6% of its time, 0.5% row-major). The columns the tests need are cut out when the window is
/// evaluated, off the request path.
#[derive(Debug)]
struct Window {
    values: Vec<f64>,
    rows: usize,
    index: u64,
}

/// Rolling windows of served rows compared with a reference profile. See the
/// [module docs](super) for the tests and the threading model. Share it with
/// an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct DriftMonitor {
    shared: Arc<Shared>,
    window: Mutex<Window>,
}

/// A full window, handed back by [`DriftMonitor::observe`], to evaluate.
#[derive(Debug)]
pub struct CompletedWindow {
    shared: Arc<Shared>,
    index: u64,
    /// Row-major: `rows` rows of the profile's features then predictions.
    values: Vec<f64>,
    rows: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DriftMonitor {
    /// A monitor of served traffic against `profile`.
    pub fn new(profile: &ReferenceProfile, options: DriftOptions) -> Result<Self, DriftError> {
        options.validate()?;
        let reference = PreparedReference::new(profile);
        let window = Window {
            values: window_buffer(&reference, options.window_rows),
            rows: 0,
            index: 0,
        };
        Ok(DriftMonitor {
            shared: Arc::new(Shared {
                reference,
                options,
                latest: Mutex::new(None),
                rows_observed: AtomicU64::new(0),
                windows_completed: AtomicU64::new(0),
                windows_evaluated: AtomicU64::new(0),
                dataset_drift_windows: AtomicU64::new(0),
            }),
            window: Mutex::new(window),
        })
    }

    /// The options in force.
    pub fn options(&self) -> &DriftOptions {
        &self.shared.options
    }

    /// The prepared reference (numbers of feature and prediction columns).
    pub fn reference(&self) -> &PreparedReference {
        &self.shared.reference
    }

    /// Records served rows: `inputs` is the row-major `[rows, n_features]`
    /// matrix of input features (the profile's feature columns, in order) and
    /// `predictions` the `[rows, n_predictions]` outputs (the profile's
    /// prediction columns). Returns the windows this call completed (usually
    /// none), for the caller to [`evaluate`](CompletedWindow::evaluate).
    ///
    /// Fails, recording nothing, when the shapes do not fit the profile.
    pub fn observe<I: DriftValue, P: DriftValue>(
        &self,
        inputs: &[I],
        predictions: &[P],
    ) -> Result<Vec<CompletedWindow>, DriftError> {
        let reference = &self.shared.reference;
        let (nf, np) = (reference.n_features(), reference.n_predictions());
        let rows = rows_of(inputs.len(), nf, predictions.len(), np)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let capacity = self.shared.options.window_rows;
        let mut done = Vec::new();
        let mut window = lock(&self.window);
        let mut start = 0;
        while start < rows {
            let take = (capacity - window.rows).min(rows - start);
            for r in start..start + take {
                let values = &mut window.values;
                values.extend(inputs[r * nf..(r + 1) * nf].iter().map(|v| v.to_f64()));
                values.extend(predictions[r * np..(r + 1) * np].iter().map(|v| v.to_f64()));
            }
            window.rows += take;
            start += take;
            if window.rows == capacity {
                let fresh = window_buffer(reference, capacity);
                done.push(CompletedWindow {
                    shared: self.shared.clone(),
                    index: window.index,
                    values: std::mem::replace(&mut window.values, fresh),
                    rows: window.rows,
                });
                window.rows = 0;
                window.index += 1;
            }
        }
        drop(window);
        self.shared
            .rows_observed
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.shared
            .windows_completed
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// [`observe`](Self::observe), then evaluates the completed windows on
    /// the calling thread.
    pub fn observe_and_evaluate<I: DriftValue, P: DriftValue>(
        &self,
        inputs: &[I],
        predictions: &[P],
    ) -> Result<Vec<DriftReport>, DriftError> {
        Ok(self
            .observe(inputs, predictions)?
            .into_iter()
            .map(CompletedWindow::evaluate)
            .collect())
    }

    /// The report of the latest window evaluated (by window index).
    pub fn latest_report(&self) -> Option<DriftReport> {
        lock(&self.shared.latest).clone()
    }

    /// Rows in the window being filled.
    pub fn pending_rows(&self) -> usize {
        lock(&self.window).rows
    }

    /// Counters since the monitor started.
    pub fn stats(&self) -> MonitorStats {
        let s = &self.shared;
        MonitorStats {
            rows_observed: s.rows_observed.load(Ordering::Relaxed),
            windows_completed: s.windows_completed.load(Ordering::Relaxed),
            windows_evaluated: s.windows_evaluated.load(Ordering::Relaxed),
            dataset_drift_windows: s.dataset_drift_windows.load(Ordering::Relaxed),
        }
    }
}

impl CompletedWindow {
    /// The window's index (0 for the first window of the monitor).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Rows in the window.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Runs the tests (CPU work: run it off async threads) and records the
    /// report as the monitor's latest unless a later window was recorded first.
    pub fn evaluate(self) -> DriftReport {
        let shared = &self.shared;
        let report = shared
            .reference
            .compare(&self.columns(), self.index, &shared.options)
            .expect("a window has one column per profile column");
        shared.windows_evaluated.fetch_add(1, Ordering::Relaxed);
        if report.dataset_drift {
            shared.dataset_drift_windows.fetch_add(1, Ordering::Relaxed);
        }
        let mut latest = lock(&shared.latest);
        if latest.as_ref().is_none_or(|l| l.window < report.window) {
            *latest = Some(report.clone());
        }
        report
    }

    /// The values of each profile column (profile order; columns that are
    /// neither features nor predictions stay empty).
    fn columns(&self) -> Vec<Vec<f64>> {
        let reference = &self.shared.reference;
        let nf = reference.n_features();
        let width = nf + reference.n_predictions();
        let mut columns = vec![Vec::new(); reference.columns.len()];
        let offsets = reference.features.iter().enumerate();
        let offsets =
            offsets.chain((reference.predictions.iter().enumerate()).map(|(k, c)| (nf + k, c)));
        for (offset, &c) in offsets {
            columns[c] = self.values[offset..]
                .iter()
                .step_by(width)
                .take(self.rows)
                .copied()
                .collect();
        }
        columns
    }
}

/// An empty window's row-major buffer, room for `rows` rows made up front.
fn window_buffer(reference: &PreparedReference, rows: usize) -> Vec<f64> {
    Vec::with_capacity(rows * (reference.n_features() + reference.n_predictions()))
}

/// Rows in an observation, checking that inputs and predictions agree with
/// the profile's numbers of columns.
fn rows_of(
    n_inputs: usize,
    nf: usize,
    n_predictions: usize,
    np: usize,
) -> Result<usize, DriftError> {
    let shape = |reason: String| Err(DriftError::Shape { reason });
    let from_inputs = match nf {
        0 if n_inputs > 0 => {
            return shape(format!(
                "{n_inputs} input values but the profile has no feature columns"
            ));
        }
        0 => None,
        _ if !n_inputs.is_multiple_of(nf) => {
            return shape(format!(
                "{n_inputs} input values is not a whole number of rows of {nf} features"
            ));
        }
        _ => Some(n_inputs / nf),
    };
    let from_predictions = match np {
        0 if n_predictions > 0 => {
            return shape(format!(
                "{n_predictions} prediction values but the profile has no prediction columns"
            ));
        }
        0 => None,
        _ if !n_predictions.is_multiple_of(np) => {
            return shape(format!(
                "{n_predictions} prediction values is not a whole number of rows of {np} outputs"
            ));
        }
        _ => Some(n_predictions / np),
    };
    match (from_inputs, from_predictions) {
        (Some(a), Some(b)) if a != b => shape(format!(
            "{a} input rows but {b} prediction rows: give one prediction row per input row"
        )),
        (Some(a), _) => Ok(a),
        (None, Some(b)) => Ok(b),
        (None, None) => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        assert_eq!(rows_of(6, 3, 2, 1).unwrap(), 2);
        assert!(rows_of(7, 3, 2, 1).is_err());
        assert!(rows_of(6, 3, 3, 1).is_err());
        assert!(rows_of(0, 0, 2, 0).is_err());
        assert_eq!(rows_of(0, 0, 4, 2).unwrap(), 2);
    }
}

//! Drift monitoring wired into serving: each version with a reference
//! profile gets a [`DriftMonitor`]; served inputs and predicted classes feed
//! it; each full window is evaluated on the blocking pool and published as
//! gauges (`kiln_drift_share`, `kiln_drift_detected`, per model, version and
//! column) and, when a column or the whole window starts drifting, as a
//! `drift.detected` hook event.
//!
//! Events are edge-triggered per column: one when a column's verdict turns
//! to drifted, none while it stays drifted, so a lasting shift does not
//! flood the hooks. The whole window's verdict is the column `_all`
//! (statistic `share_drifted`, threshold `drift_share`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use kiln_checkpoint::profile::ReferenceProfile;
use kiln_hooks::Hooks;
use kiln_hooks::event::DriftDetected;

use crate::drift::{CompletedWindow, DriftMonitor, DriftOptions, DriftReport};
use crate::error::ModelError;
use crate::metrics::{DriftLabels, Metrics, VersionLabels};

/// The whole window's pseudo-column in gauges and events.
pub const ALL_COLUMNS: &str = "_all";

/// Drift monitoring of one served version.
#[derive(Debug)]
pub struct VersionDrift {
    monitor: DriftMonitor,
    /// Columns (and `_all`) drifted in the latest evaluated window.
    drifted: Mutex<BTreeSet<String>>,
    /// Least time between two evaluations.
    min_interval: std::time::Duration,
    /// When the last evaluation started, and whether one is running.
    evaluation: Mutex<(Option<std::time::Instant>, bool)>,
    /// Completed windows not evaluated (an evaluation was running or too recent).
    skipped: std::sync::atomic::AtomicU64,
}

impl VersionDrift {
    /// A monitor over a version's reference profile (JSON bytes from the
    /// registry), checked to fit the model: one feature column per input
    /// value and one prediction column (the predicted class). A profile
    /// that does not parse is `Storage` (its source `CorruptObject`, or
    /// `Unsupported` for a newer format), one that does not fit the model
    /// `Unservable`, options out of range (the configuration's checks let
    /// none through) `Internal`.
    pub fn new(
        profile: &[u8],
        features: usize,
        options: DriftOptions,
    ) -> Result<VersionDrift, ModelError> {
        let profile = ReferenceProfile::from_json_bytes(profile)
            .map_err(|e| ModelError::storage("parse the reference profile", e))?;
        let monitor = DriftMonitor::new(&profile, options)
            .map_err(|e| ModelError::internal("drift options", e))?;
        let r = monitor.reference();
        if r.n_features() != features || r.n_predictions() > 1 {
            return Err(ModelError::unservable(format!(
                "the reference profile has {} feature and {} prediction columns; the model takes {features} features and predicts one class",
                r.n_features(),
                r.n_predictions()
            )));
        }
        Ok(VersionDrift {
            monitor,
            drifted: Mutex::new(BTreeSet::new()),
            min_interval: std::time::Duration::ZERO,
            evaluation: Mutex::new((None, false)),
            skipped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Evaluates at most one window per `interval` (see `[drift] min_interval_ms`).
    pub fn with_min_interval(mut self, interval: std::time::Duration) -> VersionDrift {
        self.min_interval = interval;
        self
    }

    /// Completed windows skipped so far to bound monitoring's CPU share.
    pub fn skipped_windows(&self) -> u64 {
        self.skipped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Claims the right to evaluate a window now: none running, and the last
    /// one started at least `min_interval` ago.
    fn try_begin(&self) -> bool {
        let mut state = self.evaluation.lock().expect("drift evaluation lock");
        let due = state.0.is_none_or(|at| at.elapsed() >= self.min_interval);
        if state.1 || !due {
            return false;
        }
        *state = (Some(std::time::Instant::now()), true);
        true
    }

    fn end(&self) {
        self.evaluation.lock().expect("drift evaluation lock").1 = false;
    }

    /// Records served rows; returns the windows they completed.
    pub fn observe(&self, inputs: &[f32], predictions: &[i64]) -> Vec<CompletedWindow> {
        let predictions: &[i64] = if self.monitor.reference().n_predictions() == 0 {
            &[]
        } else {
            predictions
        };
        match self.monitor.observe(inputs, predictions) {
            Ok(windows) => windows,
            Err(e) => {
                // Shapes were checked at load; log rather than fail a request.
                tracing::warn!(error = %e, "drift observation refused");
                Vec::new()
            }
        }
    }

    /// The latest window's report, if any was evaluated.
    pub fn latest(&self) -> Option<DriftReport> {
        self.monitor.latest_report()
    }

    /// Publishes a report: gauges, and events for newly drifted columns.
    pub fn publish(
        &self,
        report: &DriftReport,
        labels: &VersionLabels,
        metrics: &Metrics,
        hooks: &Hooks,
    ) {
        let label = |column: &str| DriftLabels {
            model: labels.model.clone(),
            version: labels.version.clone(),
            column: column.to_string(),
        };
        metrics.set_drift(
            &label(ALL_COLUMNS),
            report.share_drifted,
            report.dataset_drift,
        );
        for c in &report.columns {
            metrics.set_drift(&label(&c.column), c.score, c.drifted);
        }
        let now: BTreeSet<String> = report
            .columns
            .iter()
            .filter(|c| c.drifted)
            .map(|c| c.column.clone())
            .chain(report.dataset_drift.then(|| ALL_COLUMNS.to_string()))
            .collect();
        let newly: Vec<String> = {
            let mut drifted = self.drifted.lock().unwrap_or_else(|e| e.into_inner());
            let newly = now.difference(&drifted).cloned().collect();
            *drifted = now;
            newly
        };
        if newly.is_empty() {
            return;
        }
        let version: u64 = labels.version.parse().unwrap_or(0);
        tracing::warn!(model = %labels.model, version, window = report.window, share = report.share_drifted, columns = ?newly, "drift detected");
        for column in newly {
            let (statistic, score, threshold) = if column == ALL_COLUMNS {
                (
                    "share_drifted".to_string(),
                    report.share_drifted,
                    report.drift_share,
                )
            } else {
                match report.column(&column) {
                    Some(c) => (c.test.name().to_string(), c.score, c.threshold),
                    None => continue,
                }
            };
            hooks.emit(kiln_hooks::Event::of(
                "kiln-serve",
                &DriftDetected {
                    model: labels.model.clone(),
                    version,
                    feature: column,
                    statistic,
                    score,
                    threshold,
                    window_rows: report.rows as u64,
                },
            ));
        }
    }
}

/// Evaluates completed windows off the async threads and publishes them.
pub fn evaluate_in_background(
    drift: Arc<VersionDrift>,
    windows: Vec<CompletedWindow>,
    labels: VersionLabels,
    metrics: Metrics,
    hooks: Hooks,
) {
    let completed = windows.len() as u64;
    // The newest window speaks for the others completed with it.
    let Some(window) = windows.into_iter().last() else {
        return;
    };
    if !drift.try_begin() {
        drift
            .skipped
            .fetch_add(completed, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    drift
        .skipped
        .fetch_add(completed - 1, std::sync::atomic::Ordering::Relaxed);
    // Its own thread at the lowest ordinary priority (nice 19): an
    // evaluation (hundreds of exact KS tests) takes little CPU from serving,
    // so a saturated server serves at nearly full speed and evaluates
    // slowly. Not SCHED_IDLE: measured on 2 cores, requests then stalled a
    // whole scheduler tick (p99 4.2 ms against 1.0 ms at one connection),
    // waiting, it seems, for a lock the starved evaluation held. At most one
    // evaluation per version runs (`try_begin`).
    let evaluate = move || {
        kiln_checkpoint::sys::nice_current_thread();
        let report = window.evaluate();
        drift.end();
        drift.publish(&report, &labels, &metrics, &hooks);
    };
    if let Err(e) = std::thread::Builder::new()
        .name("serve-drift".into())
        .spawn(evaluate)
    {
        tracing::warn!(error = %e, "could not start a drift evaluation thread");
    }
}

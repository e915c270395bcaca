//! Drift detection on served inputs and predictions, as Evidently does it by
//! default.
//!
//! A [`DriftMonitor`] collects served rows (input features and predictions)
//! into windows of a fixed number of rows; each completed window is compared,
//! column by column, with the model version's [`ReferenceProfile`], and the
//! result is a [`DriftReport`]. The tests, their selection and their thresholds
//! mirror Evidently's defaults (`evidently.calculations.stattests`):
//!
//! | reference rows | column | distinct values (reference and window) | test | drift when |
//! |---|---|---|---|---|
//! | <= 1000 | numerical | > 5 | two-sample Kolmogorov-Smirnov | p <= 0.05 |
//! | <= 1000 | numerical or categorical | 3.. (numerical: 3..=5) | chi-square | p < 0.05 |
//! | <= 1000 | numerical or categorical | <= 2 | Z-test for two proportions | p < 0.05 |
//! | > 1000 | numerical | > 5 | Wasserstein distance / std(reference) | >= 0.1 |
//! | > 1000 | numerical (<= 5 values) or categorical | any | Jensen-Shannon distance | >= 0.1 |
//!
//! The window is dataset-drifted when at least half of its tested columns
//! drifted (Evidently's `drift_share = 0.5`, compared with `>=`).
//!
//! Non-finite values (NaN, infinities) are dropped before every test, as
//! Evidently drops them; a column left with no values in a window is reported
//! in [`DriftReport::skipped`] and does not count towards the share.
//!
//! The statistics match scipy (`ks_2samp`, `chisquare`, `norm`,
//! `wasserstein_distance`, `spatial.distance.jensenshannon`) to about 1e-10
//! relative (see `serve/tests/drift.rs`), with one documented difference:
//! [`ks_2samp`] always computes the exact p-value, where scipy's
//! `method="auto"` switches to an asymptotic one when a sample has more than
//! 10000 values.
//!
//! # Threads
//!
//! [`DriftMonitor::observe`] is cheap: it copies the rows into the current
//! window under a mutex and never runs a test. When a window completes it hands
//! the window back as a [`CompletedWindow`]; the caller runs
//! [`CompletedWindow::evaluate`] (milliseconds of CPU for large windows or many
//! columns) wherever it likes: on a blocking pool from async code
//! (`tokio::task::spawn_blocking`), or inline with
//! [`DriftMonitor::observe_and_evaluate`]. Evaluating records the report as the
//! monitor's [`latest_report`](DriftMonitor::latest_report).

//! # Layout
//!
//! - `stats`: the tests (Kolmogorov-Smirnov, chi-square, Z, Wasserstein,
//!   Jensen-Shannon), their selection, and the special functions behind
//!   their p-values; pure functions over samples.
//! - `compare`: options, reports, and a reference profile prepared for
//!   comparing windows with it.
//! - `monitor`: the rolling windows of served rows, and their evaluation.
//!
//! Everything public is re-exported here: callers name `drift::X`.

mod compare;
mod monitor;
mod stats;

pub use compare::{
    ColumnDrift, DriftError, DriftOptions, DriftReport, PreparedReference, SkippedColumn,
};
pub use monitor::{CompletedWindow, DriftMonitor, DriftValue, MonitorStats};
pub use stats::{
    ChiSquareResult, KsResult, ScoreKind, StatTest, WassersteinResult, ZTestResult, chi2_sf,
    chisquare_vs_reference, default_test, jensenshannon_categorical, ks_2samp, normal_sf,
    wasserstein_distance, wasserstein_normed, z_test_proportions,
};

/// Reference sizes up to this use p-value tests; above, distances (Evidently).
pub const SMALL_REFERENCE_ROWS: usize = 1000;

/// Columns with at most this many distinct values (reference and window
/// together) get frequency tests even when numerical (Evidently).
pub const FEW_VALUES: usize = 5;

/// Default significance level of the p-value tests.
pub const DEFAULT_P_VALUE_THRESHOLD: f64 = 0.05;

/// Default drift threshold of the distances.
pub const DEFAULT_DISTANCE_THRESHOLD: f64 = 0.1;

/// Default share of drifted columns at which a window is dataset-drifted.
pub const DEFAULT_DRIFT_SHARE: f64 = 0.5;

/// Default rows per window; right for references above 1000 rows, too large
/// for smaller ones (see [`DriftOptions::for_reference_rows`]).
pub const DEFAULT_WINDOW_ROWS: usize = 1000;

//! Comparing a window of served values with the reference profile, column
//! by column: options, reports, and the reference prepared once (sorted and
//! counted) for repeated comparisons.

use kiln_checkpoint::profile::{ColumnKind, ColumnRole, ReferenceProfile};
use serde::Serialize;

use super::stats::{
    ScoreKind, StatTest, chisquare_counts, counts, default_test, jensenshannon_counts,
    ks_2samp_sorted, merge_counts, population_std, sorted, wasserstein_sorted, z_test_counts,
};
use super::{
    DEFAULT_DISTANCE_THRESHOLD, DEFAULT_DRIFT_SHARE, DEFAULT_P_VALUE_THRESHOLD,
    DEFAULT_WINDOW_ROWS, SMALL_REFERENCE_ROWS,
};

/// Thresholds and windows of a [`DriftMonitor`](super::DriftMonitor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftOptions {
    /// Rows per window (at least 1).
    pub window_rows: usize,
    /// Significance level of the p-value tests (KS, chi-square, Z), in (0, 1).
    pub p_value_threshold: f64,
    /// Threshold of the distances (Wasserstein, Jensen-Shannon), above 0.
    pub distance_threshold: f64,
    /// Share of tested columns that must drift for dataset drift, in (0, 1].
    pub drift_share: f64,
}

impl Default for DriftOptions {
    fn default() -> Self {
        DriftOptions {
            window_rows: DEFAULT_WINDOW_ROWS,
            p_value_threshold: DEFAULT_P_VALUE_THRESHOLD,
            distance_threshold: DEFAULT_DISTANCE_THRESHOLD,
            drift_share: DEFAULT_DRIFT_SHARE,
        }
    }
}

impl DriftOptions {
    /// The defaults with a window suited to a reference of `reference_rows`
    /// rows. Above 1000 rows (distances) the window is 1000 rows: smaller
    /// windows' own sampling noise crosses the 0.1 thresholds. Up to 1000
    /// rows (p-values) it is a tenth of the reference, at least 100 rows:
    /// Evidently's chi-square takes the reference proportions as exact, so
    /// its false-positive rate grows with window / reference (about 7-8% at
    /// 0.1, 22-49% at 1.0 for 3-10 categories; docs/monitoring.md).
    pub fn for_reference_rows(reference_rows: usize) -> Self {
        let window_rows = if reference_rows > SMALL_REFERENCE_ROWS {
            DEFAULT_WINDOW_ROWS
        } else {
            (reference_rows / 10).max(100)
        };
        DriftOptions {
            window_rows,
            ..DriftOptions::default()
        }
    }

    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), DriftError> {
        let bad = |field: &'static str, reason: String| Err(DriftError::Options { field, reason });
        if self.window_rows == 0 {
            return bad("window_rows", "is 0; allowed: 1 or more".into());
        }
        if !(self.p_value_threshold > 0.0 && self.p_value_threshold < 1.0) {
            return bad(
                "p_value_threshold",
                format!(
                    "is {}; allowed: between 0 and 1, exclusive",
                    self.p_value_threshold
                ),
            );
        }
        if !(self.distance_threshold > 0.0 && self.distance_threshold.is_finite()) {
            return bad(
                "distance_threshold",
                format!(
                    "is {}; allowed: a finite number above 0",
                    self.distance_threshold
                ),
            );
        }
        if !(self.drift_share > 0.0 && self.drift_share <= 1.0) {
            return bad(
                "drift_share",
                format!("is {}; allowed: above 0, up to 1", self.drift_share),
            );
        }
        Ok(())
    }

    fn threshold(&self, test: StatTest) -> f64 {
        match test.score_kind() {
            ScoreKind::PValue => self.p_value_threshold,
            ScoreKind::Distance => self.distance_threshold,
        }
    }
}

/// A bad option or a badly shaped observation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DriftError {
    /// A [`DriftOptions`] field is out of range.
    #[error("drift options: {field} {reason}")]
    Options {
        /// The field's name (`window_rows`, ...).
        field: &'static str,
        /// Its value and what is allowed.
        reason: String,
    },
    /// Inputs or predictions do not fit the reference profile's columns.
    #[error("drift observation: {reason}")]
    Shape {
        /// What does not fit.
        reason: String,
    },
}

/// One column's test in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnDrift {
    /// Column name (as in the reference profile).
    pub column: String,
    /// Feature or prediction.
    pub role: ColumnRole,
    /// Numerical or categorical (from the profile).
    pub kind: ColumnKind,
    /// The test run.
    pub test: StatTest,
    /// The test's statistic: KS D, chi-square, z, the raw Wasserstein
    /// distance, or the Jensen-Shannon distance. The chi-square statistic is
    /// infinite (JSON `null`) when the window holds a category the reference
    /// never saw.
    pub statistic: f64,
    /// The drift score compared with the threshold: the p-value, the
    /// normalised Wasserstein distance, or the Jensen-Shannon distance.
    pub score: f64,
    /// Whether `score` is a p-value or a distance.
    pub score_kind: ScoreKind,
    /// The threshold `score` was compared with.
    pub threshold: f64,
    /// Whether the column drifted.
    pub drifted: bool,
    /// Finite values of the column in the window.
    pub current_values: usize,
    /// Distinct values over reference and window (what chose the test).
    pub unique_values: usize,
}

/// A column that could not be tested in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkippedColumn {
    /// Column name.
    pub column: String,
    /// Why (e.g. no finite value in the window).
    pub reason: String,
}

/// The comparison of one window with the reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftReport {
    /// Index of the window, counting from 0 since the monitor started.
    pub window: u64,
    /// Rows in the window.
    pub rows: usize,
    /// Rows in the reference profile (decides p-values or distances).
    pub reference_rows: usize,
    /// One entry per tested column, in profile order.
    pub columns: Vec<ColumnDrift>,
    /// Columns without a test in this window.
    pub skipped: Vec<SkippedColumn>,
    /// Tested columns that drifted.
    pub drifted_columns: usize,
    /// `drifted_columns / columns.len()` (0 when nothing was tested).
    pub share_drifted: f64,
    /// The share at which the window counts as dataset drift.
    pub drift_share: f64,
    /// Whether `share_drifted >= drift_share`.
    pub dataset_drift: bool,
}

impl DriftReport {
    /// The entry of column `name`, if it was tested.
    pub fn column(&self, name: &str) -> Option<&ColumnDrift> {
        self.columns.iter().find(|c| c.column == name)
    }
}

/// A reference profile prepared for repeated comparisons: values sorted and
/// counted once.
#[derive(Debug)]
pub struct PreparedReference {
    pub(super) columns: Vec<PreparedColumn>,
    rows: usize,
    /// Profile column index of each feature, in input order.
    pub(super) features: Vec<usize>,
    /// Profile column index of each prediction output.
    pub(super) predictions: Vec<usize>,
}

#[derive(Debug)]
pub(super) struct PreparedColumn {
    name: String,
    role: ColumnRole,
    kind: ColumnKind,
    sorted: Vec<f64>,
    counts: Vec<(f64, u64)>,
    std: f64,
}

impl PreparedReference {
    /// Prepares `profile`.
    pub fn new(profile: &ReferenceProfile) -> Self {
        let columns: Vec<PreparedColumn> = profile
            .columns()
            .iter()
            .map(|c| {
                // A profile holds finite values only; filter anyway so that a
                // hand-made one cannot poison the tests.
                let finite: Vec<f64> = c
                    .values()
                    .iter()
                    .copied()
                    .filter(|v| v.is_finite())
                    .collect();
                let sorted = sorted(&finite);
                PreparedColumn {
                    name: c.name().to_string(),
                    role: c.role(),
                    kind: c.kind(),
                    counts: counts(&sorted),
                    std: population_std(&sorted),
                    sorted,
                }
            })
            .collect();
        let index = |role| {
            columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.role == role)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        PreparedReference {
            features: index(ColumnRole::Feature),
            predictions: index(ColumnRole::Prediction),
            rows: profile.rows(),
            columns,
        }
    }

    /// Number of feature columns (values per input row).
    pub fn n_features(&self) -> usize {
        self.features.len()
    }

    /// Number of prediction columns (values per prediction row).
    pub fn n_predictions(&self) -> usize {
        self.predictions.len()
    }

    /// Compares a window with the reference. `current[c]` holds the window's
    /// values of the profile's column `c` (profile order); non-finite values
    /// are dropped. Fails when `current` does not have one entry per column.
    pub fn compare(
        &self,
        current: &[Vec<f64>],
        window: u64,
        options: &DriftOptions,
    ) -> Result<DriftReport, DriftError> {
        if current.len() != self.columns.len() {
            return Err(DriftError::Shape {
                reason: format!(
                    "{} columns of current values for a profile of {} columns",
                    current.len(),
                    self.columns.len()
                ),
            });
        }
        let rows = current.iter().map(Vec::len).max().unwrap_or(0);
        let mut columns = Vec::with_capacity(self.columns.len());
        let mut skipped = Vec::new();
        for (reference, values) in self.columns.iter().zip(current) {
            match reference.test(values, options) {
                Ok(drift) => columns.push(drift),
                Err(reason) => skipped.push(SkippedColumn {
                    column: reference.name.clone(),
                    reason,
                }),
            }
        }
        let drifted_columns = columns.iter().filter(|c| c.drifted).count();
        let share_drifted = if columns.is_empty() {
            0.0
        } else {
            drifted_columns as f64 / columns.len() as f64
        };
        Ok(DriftReport {
            window,
            rows,
            reference_rows: self.rows,
            dataset_drift: !columns.is_empty() && share_drifted >= options.drift_share,
            columns,
            skipped,
            drifted_columns,
            share_drifted,
            drift_share: options.drift_share,
        })
    }
}

impl PreparedColumn {
    fn test(&self, values: &[f64], options: &DriftOptions) -> Result<ColumnDrift, String> {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() {
            return Err(format!(
                "no finite value in the window ({} values)",
                values.len()
            ));
        }
        if self.sorted.is_empty() {
            return Err("no finite value in the reference".to_string());
        }
        let current = sorted(&finite);
        let current_counts = counts(&current);
        let unique_values = merge_counts(&self.counts, &current_counts).len();
        let test = default_test(self.kind, self.sorted.len(), unique_values);
        let failed = || format!("{} test could not run", test.name());
        let (statistic, score) = match test {
            StatTest::KolmogorovSmirnov => {
                let r = ks_2samp_sorted(&self.sorted, &current).ok_or_else(failed)?;
                (r.statistic, r.p_value)
            }
            StatTest::ChiSquare => {
                let r = chisquare_counts(&self.counts, &current_counts).ok_or_else(failed)?;
                (r.statistic, r.p_value)
            }
            StatTest::ZTest => {
                let r = z_test_counts(&self.counts, &current_counts).ok_or_else(failed)?;
                (r.statistic, r.p_value)
            }
            StatTest::Wasserstein => {
                let d = wasserstein_sorted(&self.sorted, &current).ok_or_else(failed)?;
                (d, d / self.std.max(0.001))
            }
            StatTest::JensenShannon => {
                let d = jensenshannon_counts(&self.counts, &current_counts).ok_or_else(failed)?;
                (d, d)
            }
        };
        let threshold = options.threshold(test);
        Ok(ColumnDrift {
            column: self.name.clone(),
            role: self.role,
            kind: self.kind,
            test,
            statistic,
            score,
            score_kind: test.score_kind(),
            threshold,
            drifted: test.drifted(score, threshold),
            current_values: finite.len(),
            unique_values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_suit_the_reference() {
        assert_eq!(DriftOptions::for_reference_rows(5000).window_rows, 1000);
        assert_eq!(DriftOptions::for_reference_rows(1001).window_rows, 1000);
        assert_eq!(DriftOptions::for_reference_rows(1000).window_rows, 100);
        assert_eq!(DriftOptions::for_reference_rows(300).window_rows, 100);
        assert_eq!(
            DriftOptions::for_reference_rows(800).p_value_threshold,
            DEFAULT_P_VALUE_THRESHOLD
        );
    }
}

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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_checkpoint::profile::{ColumnKind, ColumnRole, ReferenceProfile};
use serde::Serialize;

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

// ---------------------------------------------------------------------------
// Tests and their selection
// ---------------------------------------------------------------------------

/// A statistical test, named as Evidently names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum StatTest {
    /// Two-sample Kolmogorov-Smirnov, two-sided, exact p-value.
    #[serde(rename = "ks")]
    KolmogorovSmirnov,
    /// Pearson's chi-square of the window's category counts against the
    /// reference proportions scaled to the window's size.
    #[serde(rename = "chisquare")]
    ChiSquare,
    /// Z-test for the difference of two proportions (binary columns).
    #[serde(rename = "z")]
    ZTest,
    /// First Wasserstein distance divided by the reference's standard deviation.
    #[serde(rename = "wasserstein")]
    Wasserstein,
    /// Jensen-Shannon distance (base 2) of the category frequencies.
    #[serde(rename = "jensenshannon")]
    JensenShannon,
}

/// What a test's score is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    /// A p-value: drift when small.
    PValue,
    /// A distance: drift when large.
    Distance,
}

impl StatTest {
    /// Evidently's name of the test (`ks`, `chisquare`, `z`, `wasserstein`,
    /// `jensenshannon`).
    pub fn name(self) -> &'static str {
        match self {
            StatTest::KolmogorovSmirnov => "ks",
            StatTest::ChiSquare => "chisquare",
            StatTest::ZTest => "z",
            StatTest::Wasserstein => "wasserstein",
            StatTest::JensenShannon => "jensenshannon",
        }
    }

    /// Whether the score is a p-value or a distance.
    pub fn score_kind(self) -> ScoreKind {
        match self {
            StatTest::KolmogorovSmirnov | StatTest::ChiSquare | StatTest::ZTest => {
                ScoreKind::PValue
            }
            StatTest::Wasserstein | StatTest::JensenShannon => ScoreKind::Distance,
        }
    }

    /// Whether `score` means drift at `threshold`, with Evidently's
    /// comparisons: `p <= t` for KS, `p < t` for chi-square and Z, `d >= t`
    /// for the distances.
    pub fn drifted(self, score: f64, threshold: f64) -> bool {
        match self {
            StatTest::KolmogorovSmirnov => score <= threshold,
            StatTest::ChiSquare | StatTest::ZTest => score < threshold,
            StatTest::Wasserstein | StatTest::JensenShannon => score >= threshold,
        }
    }
}

/// Evidently's default test (`_get_default_stattest`) for a column of `kind`
/// with `reference_rows` reference values and `unique_values` distinct values
/// over the reference and the window together.
pub fn default_test(kind: ColumnKind, reference_rows: usize, unique_values: usize) -> StatTest {
    let small = reference_rows <= SMALL_REFERENCE_ROWS;
    match (small, kind) {
        (true, ColumnKind::Numerical) if unique_values > FEW_VALUES => StatTest::KolmogorovSmirnov,
        (true, _) if unique_values > 2 => StatTest::ChiSquare,
        (true, _) => StatTest::ZTest,
        (false, ColumnKind::Numerical) if unique_values > FEW_VALUES => StatTest::Wasserstein,
        (false, _) => StatTest::JensenShannon,
    }
}

/// The result of [`ks_2samp`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KsResult {
    /// The largest distance between the two empirical distribution functions.
    pub statistic: f64,
    /// The exact two-sided p-value.
    pub p_value: f64,
}

/// Two-sample, two-sided Kolmogorov-Smirnov test, as
/// `scipy.stats.ks_2samp(a, b)` with the exact p-value (scipy's `auto` for
/// samples of up to 10000 values). `None` when a sample is empty.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> Option<KsResult> {
    ks_2samp_sorted(&sorted(a), &sorted(b))
}

fn ks_2samp_sorted(a: &[f64], b: &[f64]) -> Option<KsResult> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (n1, n2) = (a.len() as u64, b.len() as u64);
    let g = gcd(n1, n2);
    let (n1g, n2g) = ((n1 / g) as i128, (n2 / g) as i128);
    // cdf_a - cdf_b at a point is (i/n1 - j/n2) = (i*n2g - j*n1g) / lcm, so the
    // statistic in units of 1/lcm is an exact integer.
    let (mut i, mut j) = (0usize, 0usize);
    let mut h: i128 = 0;
    while i < a.len() || j < b.len() {
        let x = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) => x.min(y),
            (Some(&x), None) => x,
            (None, Some(&y)) => y,
            (None, None) => unreachable!(),
        };
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        h = h.max((i as i128 * n2g - j as i128 * n1g).abs());
    }
    let lcm = (n1 / g) as f64 * n2 as f64;
    let statistic = h as f64 / lcm;
    let p_value = if h == 0 {
        1.0
    } else {
        ks_exact_p(n1.max(n2), n1.min(n2), g, h as u64)
    };
    Some(KsResult {
        statistic,
        p_value: p_value.clamp(0.0, 1.0),
    })
}

/// P(D >= h / lcm(m, n)) for two samples of sizes `m >= n` with gcd `g`: the
/// share of monotone lattice paths from (0, 0) to (m, n) that leave the band
/// `|n/g * i - m/g * j| < h` (Hodges 1958). The recursion works on the share
/// itself, f(i, j) = (i f(i-1, j) + j f(i, j-1)) / (i + j) with f = 1 outside
/// the band, so small p-values lose no precision to cancellation (the form
/// Viehmann 2021 recommends, which scipy also uses). Cost: O(m * band width).
fn ks_exact_p(m: u64, n: u64, g: u64, h: u64) -> f64 {
    let (mg, ng, h) = ((m / g) as i128, (n / g) as i128, h as i128);
    let n_us = n as usize;
    // Inside points of column i: j in lo..=hi, where |ng*i - mg*j| < h.
    let band = |i: i128| -> Option<(usize, usize)> {
        let lo = ((ng * i - h).div_euclid(mg) + 1).max(0);
        let hi = (ng * i + h - 1).div_euclid(mg).min(n as i128);
        (lo <= hi).then_some((lo as usize, hi as usize))
    };
    let mut prev = vec![0.0f64; n_us + 1];
    let mut cur = vec![0.0f64; n_us + 1];
    // Column 0: every inside point is reached by inside paths only (share 0).
    let Some((mut prev_lo, mut prev_hi)) = band(0) else {
        return 1.0;
    };
    for i in 1..=m as i128 {
        // An empty band means that every path has left it.
        let Some((lo, hi)) = band(i) else {
            return 1.0;
        };
        let fi = i as f64;
        for j in lo..=hi {
            let up = if (prev_lo..=prev_hi).contains(&j) {
                prev[j]
            } else {
                1.0
            };
            let left = if j == 0 {
                0.0
            } else if j > lo {
                cur[j - 1]
            } else {
                1.0
            };
            let fj = j as f64;
            cur[j] = (fi * up + fj * left) / (fi + fj);
        }
        std::mem::swap(&mut prev, &mut cur);
        (prev_lo, prev_hi) = (lo, hi);
    }
    // (m, n) lies on the diagonal, inside the band.
    prev[n_us]
}

/// The result of a chi-square test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChiSquareResult {
    /// Pearson's statistic; infinite when the window holds a category the
    /// reference never saw.
    pub statistic: f64,
    /// Degrees of freedom: categories - 1.
    pub dof: usize,
    /// The p-value (0 when the statistic is infinite).
    pub p_value: f64,
}

/// Evidently's chi-square test: the current counts of each category (over the
/// union of reference and current categories) against the expected counts
/// `reference count * len(current) / len(reference)`, as
/// `scipy.stats.chisquare(f_obs, f_exp)`. A category absent from the reference
/// has expected count 0, so its presence in the window makes the statistic
/// infinite and the p-value 0 (what scipy returns). `None` when a sample is
/// empty or there is only one category.
pub fn chisquare_vs_reference(reference: &[f64], current: &[f64]) -> Option<ChiSquareResult> {
    chisquare_counts(&counts(&sorted(reference)), &counts(&sorted(current)))
}

fn chisquare_counts(reference: &[(f64, u64)], current: &[(f64, u64)]) -> Option<ChiSquareResult> {
    let n_ref: u64 = reference.iter().map(|c| c.1).sum();
    let n_cur: u64 = current.iter().map(|c| c.1).sum();
    if n_ref == 0 || n_cur == 0 {
        return None;
    }
    let pairs = merge_counts(reference, current);
    if pairs.len() < 2 {
        return None;
    }
    let k_norm = n_cur as f64 / n_ref as f64;
    let statistic: f64 = pairs
        .iter()
        .map(|&(r, c)| {
            let expected = r as f64 * k_norm;
            let diff = c as f64 - expected;
            if expected == 0.0 {
                f64::INFINITY
            } else {
                diff * diff / expected
            }
        })
        .sum();
    let dof = pairs.len() - 1;
    Some(ChiSquareResult {
        statistic,
        dof,
        p_value: chi2_sf(statistic, dof as f64),
    })
}

/// The result of [`z_test_proportions`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZTestResult {
    /// z = (p_ref - p_cur) / sqrt(P (1 - P) (1/n_ref + 1/n_cur)), P pooled; 0
    /// when both samples hold the same single value.
    pub statistic: f64,
    /// Two-sided p-value, 2 (1 - Phi(|z|)).
    pub p_value: f64,
}

/// Evidently's Z-test for two proportions: values equal to the smallest
/// category count as 0, the other as 1. `None` when a sample is empty or there
/// are more than two categories.
pub fn z_test_proportions(reference: &[f64], current: &[f64]) -> Option<ZTestResult> {
    z_test_counts(&counts(&sorted(reference)), &counts(&sorted(current)))
}

fn z_test_counts(reference: &[(f64, u64)], current: &[(f64, u64)]) -> Option<ZTestResult> {
    let n1: u64 = reference.iter().map(|c| c.1).sum();
    let n2: u64 = current.iter().map(|c| c.1).sum();
    if n1 == 0 || n2 == 0 {
        return None;
    }
    if reference.len() == 1 && current.len() == 1 && reference[0].0 == current[0].0 {
        return Some(ZTestResult {
            statistic: 0.0,
            p_value: 1.0,
        });
    }
    let pairs = merge_counts(reference, current);
    if pairs.len() > 2 {
        return None;
    }
    // Ones are the values other than the smallest category.
    let ones_ref: u64 = pairs.iter().skip(1).map(|p| p.0).sum();
    let ones_cur: u64 = pairs.iter().skip(1).map(|p| p.1).sum();
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let p1 = ones_ref as f64 / n1f;
    let p2 = ones_cur as f64 / n2f;
    let pooled = (p1 * n1f + p2 * n2f) / (n1f + n2f);
    let z = (p1 - p2) / (pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n2f)).sqrt();
    Some(ZTestResult {
        statistic: z,
        p_value: (2.0 * normal_sf(z.abs())).min(1.0),
    })
}

/// The result of [`wasserstein_normed`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WassersteinResult {
    /// The first Wasserstein distance, in the column's units.
    pub distance: f64,
    /// `distance / max(std(reference), 0.001)` (population std), Evidently's
    /// drift score.
    pub normed: f64,
}

/// The first Wasserstein distance between two samples, as
/// `scipy.stats.wasserstein_distance(u, v)`. `None` when a sample is empty.
pub fn wasserstein_distance(u: &[f64], v: &[f64]) -> Option<f64> {
    wasserstein_sorted(&sorted(u), &sorted(v))
}

/// Evidently's `wasserstein` drift score. `None` when a sample is empty.
pub fn wasserstein_normed(reference: &[f64], current: &[f64]) -> Option<WassersteinResult> {
    let reference = sorted(reference);
    let distance = wasserstein_sorted(&reference, &sorted(current))?;
    Some(WassersteinResult {
        distance,
        normed: distance / population_std(&reference).max(0.001),
    })
}

fn wasserstein_sorted(u: &[f64], v: &[f64]) -> Option<f64> {
    if u.is_empty() || v.is_empty() {
        return None;
    }
    let (nu, nv) = (u.len() as f64, v.len() as f64);
    let (mut i, mut j) = (0usize, 0usize);
    let mut total = 0.0;
    // Walk the merged values; between consecutive ones both CDFs are flat.
    let mut x = u[0].min(v[0]);
    loop {
        while i < u.len() && u[i] <= x {
            i += 1;
        }
        while j < v.len() && v[j] <= x {
            j += 1;
        }
        let next = match (u.get(i), v.get(j)) {
            (Some(&a), Some(&b)) => a.min(b),
            (Some(&a), None) => a,
            (None, Some(&b)) => b,
            (None, None) => break,
        };
        total += (i as f64 / nu - j as f64 / nv).abs() * (next - x);
        x = next;
    }
    Some(total)
}

/// Evidently's `jensenshannon` drift score for categorical data: the
/// Jensen-Shannon distance (base 2, so in [0, 1]) between the reference's and
/// the window's category frequencies over the union of their categories, as
/// `scipy.spatial.distance.jensenshannon(p, q, 2)`. `None` when a sample is
/// empty.
pub fn jensenshannon_categorical(reference: &[f64], current: &[f64]) -> Option<f64> {
    jensenshannon_counts(&counts(&sorted(reference)), &counts(&sorted(current)))
}

fn jensenshannon_counts(reference: &[(f64, u64)], current: &[(f64, u64)]) -> Option<f64> {
    let n_ref: u64 = reference.iter().map(|c| c.1).sum();
    let n_cur: u64 = current.iter().map(|c| c.1).sum();
    if n_ref == 0 || n_cur == 0 {
        return None;
    }
    let rel_entr = |x: f64, y: f64| if x > 0.0 { x * (x / y).ln() } else { 0.0 };
    let divergence: f64 = merge_counts(reference, current)
        .iter()
        .map(|&(r, c)| {
            let p = r as f64 / n_ref as f64;
            let q = c as f64 / n_cur as f64;
            let m = (p + q) / 2.0;
            rel_entr(p, m) + rel_entr(q, m)
        })
        .sum();
    Some((divergence / std::f64::consts::LN_2 / 2.0).max(0.0).sqrt())
}

// ---------------------------------------------------------------------------
// Special functions
// ---------------------------------------------------------------------------

/// Survival function of the chi-square distribution with `dof` degrees of
/// freedom: Q(dof/2, x/2).
pub fn chi2_sf(x: f64, dof: f64) -> f64 {
    if x.is_nan() || dof.is_nan() || dof <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(dof / 2.0, x / 2.0)
}

/// Survival function of the standard normal distribution, 1 - Phi(z),
/// computed without cancellation for large z.
pub fn normal_sf(z: f64) -> f64 {
    if z.is_nan() {
        return f64::NAN;
    }
    // 1 - Phi(z) = erfc(z / sqrt 2) / 2, and erfc(t) = Q(1/2, t^2) for t >= 0.
    let t2 = z * z / 2.0;
    if z >= 0.0 {
        0.5 * gamma_q(0.5, t2)
    } else {
        0.5 * (1.0 + gamma_p(0.5, t2))
    }
}

/// ln Gamma(x) for x > 0 (Lanczos, g = 7, 9 terms; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (k, &c) in C.iter().enumerate().skip(1) {
        sum += c / (x + k as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// x^a e^-x / Gamma(a), the common factor of the incomplete gamma functions.
fn gamma_prefactor(a: f64, x: f64) -> f64 {
    (a * x.ln() - x - ln_gamma(a)).exp()
}

/// Regularised lower incomplete gamma P(a, x).
fn gamma_p(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        0.0
    } else if x < a + 1.0 {
        gamma_series(a, x)
    } else {
        1.0 - gamma_continued_fraction(a, x)
    }
}

/// Regularised upper incomplete gamma Q(a, x) = 1 - P(a, x).
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        1.0
    } else if x.is_infinite() {
        0.0
    } else if x < a + 1.0 {
        1.0 - gamma_series(a, x)
    } else {
        gamma_continued_fraction(a, x)
    }
}

/// P(a, x) by its power series; converges fast for x < a + 1.
fn gamma_series(a: f64, x: f64) -> f64 {
    let mut term = 1.0 / a;
    let mut sum = term;
    let mut ap = a;
    for _ in 0..10_000 {
        ap += 1.0;
        term *= x / ap;
        sum += term;
        if term.abs() < sum.abs() * 1e-17 {
            break;
        }
    }
    sum * gamma_prefactor(a, x)
}

/// Q(a, x) by Legendre's continued fraction (modified Lentz); converges fast
/// for x >= a + 1.
fn gamma_continued_fraction(a: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..10_000 {
        let an = -(i as f64) * (i as f64 - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    gamma_prefactor(a, x) * h
}

// ---------------------------------------------------------------------------
// Small helpers over samples
// ---------------------------------------------------------------------------

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The finite values, sorted (`-0.0` counted as `0.0`). Every public test
/// goes through here, so NaNs and infinities are dropped as Evidently drops
/// them (and cannot stall the merges, which assume a total order).
fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| x + 0.0)
        .collect();
    v.sort_unstable_by(f64::total_cmp);
    v
}

/// Distinct values of a sorted sample and their counts.
fn counts(sorted: &[f64]) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = Vec::new();
    for &x in sorted {
        match out.last_mut() {
            Some((v, n)) if *v == x => *n += 1,
            _ => out.push((x, 1)),
        }
    }
    out
}

/// (reference count, current count) for each value of the union, ascending.
fn merge_counts(reference: &[(f64, u64)], current: &[(f64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(reference.len().max(current.len()));
    let (mut i, mut j) = (0, 0);
    while i < reference.len() || j < current.len() {
        match (reference.get(i), current.get(j)) {
            (Some(&(a, na)), Some(&(b, nb))) if a == b => {
                out.push((na, nb));
                i += 1;
                j += 1;
            }
            (Some(&(a, na)), Some(&(b, _))) if a < b => {
                out.push((na, 0));
                i += 1;
            }
            (Some(&(_, na)), None) => {
                out.push((na, 0));
                i += 1;
            }
            (_, Some(&(_, nb))) => {
                out.push((0, nb));
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

fn population_std(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt()
}

// ---------------------------------------------------------------------------
// Comparing a window with the reference
// ---------------------------------------------------------------------------

/// Thresholds and windows of a [`DriftMonitor`].
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
    Options { field: &'static str, reason: String },
    /// Inputs or predictions do not fit the reference profile's columns.
    #[error("drift observation: {reason}")]
    Shape { reason: String },
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
    columns: Vec<PreparedColumn>,
    rows: usize,
    /// Profile column index of each feature, in input order.
    features: Vec<usize>,
    /// Profile column index of each prediction output.
    predictions: Vec<usize>,
}

#[derive(Debug)]
struct PreparedColumn {
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

// ---------------------------------------------------------------------------
// The monitor
// ---------------------------------------------------------------------------

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

#[derive(Debug)]
struct Window {
    /// Values of each profile column (profile order).
    columns: Vec<Vec<f64>>,
    rows: usize,
    index: u64,
}

/// Rolling windows of served rows compared with a reference profile. See the
/// [module docs](self) for the tests and the threading model. Share it with
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
    columns: Vec<Vec<f64>>,
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
            columns: empty_columns(reference.columns.len(), options.window_rows),
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
            for (k, &c) in reference.features.iter().enumerate() {
                let column = &mut window.columns[c];
                column.extend((start..start + take).map(|r| inputs[r * nf + k].to_f64()));
            }
            for (k, &c) in reference.predictions.iter().enumerate() {
                let column = &mut window.columns[c];
                column.extend((start..start + take).map(|r| predictions[r * np + k].to_f64()));
            }
            window.rows += take;
            start += take;
            if window.rows == capacity {
                let fresh = empty_columns(window.columns.len(), capacity);
                done.push(CompletedWindow {
                    shared: self.shared.clone(),
                    index: window.index,
                    columns: std::mem::replace(&mut window.columns, fresh),
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
            .compare(&self.columns, self.index, &shared.options)
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
}

fn empty_columns(n: usize, capacity: usize) -> Vec<Vec<f64>> {
    (0..n).map(|_| Vec::with_capacity(capacity)).collect()
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
    fn special_functions_hit_known_values() {
        // Textbook values: chi2 critical points and normal tails.
        assert!((chi2_sf(3.841_458_820_694_124, 1.0) - 0.05).abs() < 1e-13);
        assert!((chi2_sf(7.814_727_903_251_178, 3.0) - 0.05).abs() < 1e-13);
        assert!((normal_sf(1.959_963_984_540_054) - 0.025).abs() < 1e-14);
        assert!((normal_sf(0.0) - 0.5).abs() < 1e-15);
        assert!((normal_sf(-1.0) - 0.841_344_746_068_542_9).abs() < 1e-14);
        // Far tail keeps relative precision: 1 - Phi(10) = 7.6198530241605e-24.
        let tail = normal_sf(10.0);
        assert!(
            (tail / 7.619_853_024_160_527e-24 - 1.0).abs() < 1e-10,
            "{tail}"
        );
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-14);
        assert!((ln_gamma(10.0) - 362_880f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn selection_follows_evidently() {
        use ColumnKind::*;
        use StatTest::*;
        assert_eq!(default_test(Numerical, 1000, 6), KolmogorovSmirnov);
        assert_eq!(default_test(Numerical, 1000, 5), ChiSquare);
        assert_eq!(default_test(Numerical, 1000, 2), ZTest);
        assert_eq!(default_test(Categorical, 1000, 40), ChiSquare);
        assert_eq!(default_test(Categorical, 1000, 2), ZTest);
        assert_eq!(default_test(Categorical, 1000, 1), ZTest);
        assert_eq!(default_test(Numerical, 1001, 6), Wasserstein);
        assert_eq!(default_test(Numerical, 1001, 5), JensenShannon);
        assert_eq!(default_test(Categorical, 1001, 2), JensenShannon);
        assert_eq!(default_test(Categorical, 1001, 50), JensenShannon);
    }

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

    #[test]
    fn thresholds_compare_as_evidently_does() {
        assert!(StatTest::KolmogorovSmirnov.drifted(0.05, 0.05));
        assert!(!StatTest::ChiSquare.drifted(0.05, 0.05));
        assert!(!StatTest::ZTest.drifted(0.05, 0.05));
        assert!(StatTest::Wasserstein.drifted(0.1, 0.1));
        assert!(!StatTest::JensenShannon.drifted(0.099, 0.1));
    }

    #[test]
    fn ks_exact_agrees_with_path_counting_on_small_samples() {
        // Brute force: enumerate every interleaving of m and n values
        // (all distinct) and count those with D >= the observed one.
        fn brute(m: usize, n: usize, h_lcm: f64) -> f64 {
            let total = m + n;
            let (mut hit, mut all) = (0u64, 0u64);
            for mask in 0u32..(1 << total) {
                if mask.count_ones() as usize != m {
                    continue;
                }
                all += 1;
                let (mut i, mut j, mut d) = (0.0f64, 0.0f64, 0.0f64);
                for bit in 0..total {
                    if mask & (1 << bit) != 0 {
                        i += 1.0;
                    } else {
                        j += 1.0;
                    }
                    d = d.max((i / m as f64 - j / n as f64).abs());
                }
                if d >= h_lcm - 1e-12 {
                    hit += 1;
                }
            }
            hit as f64 / all as f64
        }
        for (m, n) in [(3, 2), (4, 4), (5, 3), (6, 4), (7, 5), (6, 6)] {
            let g = gcd(m, n);
            let lcm = m * n / g;
            for h in 1..=lcm {
                let exact = ks_exact_p(m.max(n), m.min(n), g, h);
                let expected = brute(m as usize, n as usize, h as f64 / lcm as f64);
                assert!(
                    (exact - expected).abs() < 1e-12,
                    "m={m} n={n} h={h}: {exact} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(rows_of(6, 3, 2, 1).unwrap(), 2);
        assert!(rows_of(7, 3, 2, 1).is_err());
        assert!(rows_of(6, 3, 3, 1).is_err());
        assert!(rows_of(0, 0, 2, 0).is_err());
        assert_eq!(rows_of(0, 0, 4, 2).unwrap(), 2);
    }
}

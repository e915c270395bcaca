//! The statistical tests drift detection runs, their selection (Evidently's
//! defaults), and the special functions behind their p-values: pure
//! functions over samples, checked against scipy in serve/tests/drift.rs.

use kiln_checkpoint::profile::ColumnKind;
use serde::Serialize;

use super::{FEW_VALUES, SMALL_REFERENCE_ROWS};

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

pub(super) fn ks_2samp_sorted(a: &[f64], b: &[f64]) -> Option<KsResult> {
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

pub(super) fn chisquare_counts(
    reference: &[(f64, u64)],
    current: &[(f64, u64)],
) -> Option<ChiSquareResult> {
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

pub(super) fn z_test_counts(
    reference: &[(f64, u64)],
    current: &[(f64, u64)],
) -> Option<ZTestResult> {
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

pub(super) fn wasserstein_sorted(u: &[f64], v: &[f64]) -> Option<f64> {
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

pub(super) fn jensenshannon_counts(
    reference: &[(f64, u64)],
    current: &[(f64, u64)],
) -> Option<f64> {
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

pub(super) fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The finite values, sorted (`-0.0` counted as `0.0`). Every public test
/// goes through here, so NaNs and infinities are dropped as Evidently drops
/// them (and cannot stall the merges, which assume a total order).
pub(super) fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| x + 0.0)
        .collect();
    v.sort_unstable_by(f64::total_cmp);
    v
}

/// Distinct values of a sorted sample and their counts.
pub(super) fn counts(sorted: &[f64]) -> Vec<(f64, u64)> {
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
pub(super) fn merge_counts(reference: &[(f64, u64)], current: &[(f64, u64)]) -> Vec<(u64, u64)> {
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

pub(super) fn population_std(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt()
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
}

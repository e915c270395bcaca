//! The reference data profile of one model version, for drift detection.
//!
//! A [`ReferenceProfile`] holds, for every column the server will watch (the
//! model's input features and its predictions), a sample of the raw values the
//! model saw in training and the column's kind (numerical or categorical). The
//! trainer builds it at the end of a job from training inputs and the model's
//! predictions on them; the registry stores its bytes ([`to_json_bytes`])
//! opaquely next to the model version; the server's drift monitor
//! (`kiln_serve::drift`) compares windows of served traffic with it.
//!
//! Raw values are kept, not histograms, because the tests Evidently runs by
//! default (Kolmogorov-Smirnov, chi-square, Z-test, Wasserstein, Jensen-Shannon)
//! need them. A profile holds at most [`ProfileOptions::max_rows`] rows: larger
//! inputs are subsampled by rows, with a seeded selection that is part of the
//! format (the same inputs and seed give the same sample on every machine and
//! every version that reads format 1).
//!
//! # Column kinds
//!
//! Kinds are inferred as Evidently infers them (`_get_column_type`), adapted
//! to values that arrive as `f64`:
//!
//! - a feature is categorical when all its values are whole numbers (what
//!   pandas would hold as an integer column) and it has at most
//!   [`CATEGORICAL_MAX_UNIQUE`] distinct values; otherwise numerical;
//! - a prediction is categorical when the task is not regression and it has at
//!   most [`CATEGORICAL_MAX_UNIQUE`] distinct values, or when the task is
//!   classification and a value lies outside `[0, 1]` (class labels rather
//!   than probabilities); otherwise numerical.
//!
//! A caller that knows better passes the kind in [`ColumnSpec::kind`]. A
//! binary column is one with two distinct values ([`ColumnProfile::is_binary`]);
//! it is not a kind of its own, because Evidently decides binary tests from
//! the distinct values of reference and current data together.
//!
//! [`to_json_bytes`]: ReferenceProfile::to_json_bytes

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Format version of the JSON a profile serialises to.
pub const PROFILE_FORMAT_VERSION: u32 = 1;

/// Rows a profile keeps by default; more are subsampled.
pub const DEFAULT_MAX_ROWS: usize = 5000;

/// Evidently's `NUMBER_UNIQUE_AS_CATEGORICAL`: integer columns with at most
/// this many distinct values are categorical.
pub const CATEGORICAL_MAX_UNIQUE: usize = 5;

/// Name given to the prediction column by [`ReferenceProfile::from_model_io`].
pub const PREDICTION_COLUMN: &str = "prediction";

/// Whether a column holds quantities or labels; decides which tests apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnKind {
    /// Quantities: distances and the Kolmogorov-Smirnov test apply.
    Numerical,
    /// Labels (values are category codes): frequency tests apply.
    Categorical,
}

/// What a column is to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnRole {
    /// An input feature.
    Feature,
    /// An output of the model (a predicted class, a score, a regression value).
    Prediction,
}

/// The model's task, which Evidently uses to type prediction columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Predictions are class labels or class probabilities.
    Classification,
    /// Predictions are quantities.
    Regression,
    /// Not known; predictions with few distinct values count as categorical.
    #[default]
    Unspecified,
}

/// A column to build: its name, role and, optionally, its kind (inferred when
/// `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    /// Column name, unique within the profile (e.g. `x0`, `prediction`).
    pub name: String,
    /// Feature or prediction.
    pub role: ColumnRole,
    /// The kind to use instead of inferring one.
    pub kind: Option<ColumnKind>,
}

impl ColumnSpec {
    /// An input feature whose kind is inferred.
    pub fn feature(name: impl Into<String>) -> Self {
        ColumnSpec {
            name: name.into(),
            role: ColumnRole::Feature,
            kind: None,
        }
    }

    /// A prediction column whose kind is inferred.
    pub fn prediction(name: impl Into<String>) -> Self {
        ColumnSpec {
            name: name.into(),
            role: ColumnRole::Prediction,
            kind: None,
        }
    }

    /// The same column with its kind given rather than inferred.
    pub fn with_kind(mut self, kind: ColumnKind) -> Self {
        self.kind = Some(kind);
        self
    }
}

/// How a profile is built from more rows than it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileOptions {
    /// The most rows kept (at least 1). Note that the drift monitor picks its
    /// tests from the number of rows kept: p-value tests up to 1000 rows,
    /// distances above.
    pub max_rows: usize,
    /// Seed of the row subsample.
    pub seed: u64,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            max_rows: DEFAULT_MAX_ROWS,
            seed: 0,
        }
    }
}

/// One column of a profile: its name, role, kind and reference values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnProfile {
    name: String,
    role: ColumnRole,
    kind: ColumnKind,
    /// Whether the kind was given by the builder's caller (`false`: inferred);
    /// kept so that a reader can tell a decision from a guess.
    kind_given: bool,
    /// The sampled values, in the order of the rows they came from.
    values: Vec<f64>,
}

impl ColumnProfile {
    /// The column's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Feature or prediction.
    pub fn role(&self) -> ColumnRole {
        self.role
    }

    /// Numerical or categorical.
    pub fn kind(&self) -> ColumnKind {
        self.kind
    }

    /// Whether the kind was given rather than inferred.
    pub fn kind_given(&self) -> bool {
        self.kind_given
    }

    /// The reference values (finite), one per kept row.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The number of distinct values.
    pub fn unique_count(&self) -> usize {
        unique_count(&self.values)
    }

    /// Whether the column has exactly two distinct values.
    pub fn is_binary(&self) -> bool {
        self.unique_count() == 2
    }
}

/// The reference data of one model version: named columns of sampled values
/// with their kinds. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceProfile {
    format_version: u32,
    task: Task,
    /// Rows given to the builder, before subsampling.
    rows_seen: u64,
    /// Seed of the subsample (meaningful when `rows_seen` exceeds the rows kept).
    sample_seed: u64,
    columns: Vec<ColumnProfile>,
}

impl ReferenceProfile {
    /// Builds a profile from column-major values: `columns[c]` holds column
    /// `c`'s value for every row, in row order, as described by `specs[c]`.
    ///
    /// Fails, naming the column (and row), when there are no columns, specs and
    /// columns differ in number, a name is empty or repeated, columns differ in
    /// length, there are no rows, or a value is not finite.
    pub fn from_columns(
        specs: Vec<ColumnSpec>,
        columns: Vec<Vec<f64>>,
        task: Task,
        options: &ProfileOptions,
    ) -> Result<Self> {
        if specs.len() != columns.len() {
            return Err(invalid(format!(
                "{} column specs for {} columns of values: give one spec per column",
                specs.len(),
                columns.len()
            )));
        }
        check_specs(&specs)?;
        if options.max_rows == 0 {
            return Err(invalid("max_rows is 0: it must be at least 1"));
        }
        let rows = columns[0].len();
        if rows == 0 {
            return Err(invalid("no rows: a profile needs at least one row"));
        }
        for (spec, values) in specs.iter().zip(&columns) {
            if values.len() != rows {
                return Err(invalid(format!(
                    "column `{}` has {} values but column `{}` has {rows}: columns must have one value per row",
                    spec.name,
                    values.len(),
                    specs[0].name
                )));
            }
            if let Some(row) = values.iter().position(|v| !v.is_finite()) {
                return Err(invalid(format!(
                    "column `{}`, row {row}: value {} is not finite; a profile holds finite numbers only",
                    spec.name, values[row]
                )));
            }
        }
        let columns = if rows > options.max_rows {
            let keep = sample_rows(rows, options.max_rows, options.seed);
            columns
                .into_iter()
                .map(|c| keep.iter().map(|&r| c[r]).collect())
                .collect()
        } else {
            columns
        };
        let columns = specs
            .into_iter()
            .zip(columns)
            .map(|(spec, values)| ColumnProfile {
                kind: spec
                    .kind
                    .unwrap_or_else(|| infer_kind(spec.role, task, &values)),
                kind_given: spec.kind.is_some(),
                name: spec.name,
                role: spec.role,
                values,
            })
            .collect();
        Ok(ReferenceProfile {
            format_version: PROFILE_FORMAT_VERSION,
            task,
            rows_seen: rows as u64,
            sample_seed: options.seed,
            columns,
        })
    }

    /// Builds a profile from rows: `rows[r][c]` is row `r`'s value of the
    /// column `specs[c]`. Fails like [`from_columns`](Self::from_columns), and
    /// when a row's length is not the number of specs.
    pub fn from_rows<R: AsRef<[f64]>>(
        specs: Vec<ColumnSpec>,
        rows: &[R],
        task: Task,
        options: &ProfileOptions,
    ) -> Result<Self> {
        let mut columns = vec![Vec::with_capacity(rows.len()); specs.len()];
        for (r, row) in rows.iter().enumerate() {
            let row = row.as_ref();
            if row.len() != specs.len() {
                return Err(invalid(format!(
                    "row {r} has {} values, expected {} (one per column spec)",
                    row.len(),
                    specs.len()
                )));
            }
            for (column, &v) in columns.iter_mut().zip(row) {
                column.push(v);
            }
        }
        Self::from_columns(specs, columns, task, options)
    }

    /// Builds the usual profile of a model: `inputs` is the row-major
    /// `[rows, n_features]` matrix of training inputs and `predictions` the
    /// model's output for each row (one value per row, e.g. the predicted
    /// class). Features are named `feature_names` or `x0..x{n-1}`; the
    /// prediction column is [`PREDICTION_COLUMN`]. All kinds are inferred.
    pub fn from_model_io(
        inputs: &[f32],
        n_features: usize,
        feature_names: Option<&[String]>,
        predictions: &[f64],
        task: Task,
        options: &ProfileOptions,
    ) -> Result<Self> {
        let rows = predictions.len();
        if n_features.checked_mul(rows) != Some(inputs.len()) {
            return Err(invalid(format!(
                "inputs hold {} values but {rows} predictions x {n_features} features need {}",
                inputs.len(),
                rows.saturating_mul(n_features)
            )));
        }
        let mut specs: Vec<ColumnSpec> = match feature_names {
            Some(names) if names.len() != n_features => {
                return Err(invalid(format!(
                    "{} feature names for {n_features} features",
                    names.len()
                )));
            }
            Some(names) => names.iter().map(ColumnSpec::feature).collect(),
            None => (0..n_features)
                .map(|i| ColumnSpec::feature(format!("x{i}")))
                .collect(),
        };
        specs.push(ColumnSpec::prediction(PREDICTION_COLUMN));
        let mut columns: Vec<Vec<f64>> = (0..n_features)
            .map(|f| {
                inputs
                    .iter()
                    .skip(f)
                    .step_by(n_features)
                    .map(|&v| f64::from(v))
                    .collect()
            })
            .collect();
        columns.push(predictions.to_vec());
        Self::from_columns(specs, columns, task, options)
    }

    /// The JSON bytes the registry stores.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a reference profile serialises: its values are finite")
    }

    /// Parses and checks profile bytes. A newer format version is
    /// [`Error::Unsupported`]; anything malformed is [`Error::CorruptObject`]
    /// with the path of the bad field.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct Version {
            format_version: Option<u32>,
        }
        let version: Version = serde_json::from_slice(bytes)
            .map_err(|e| corrupt(format!("not a JSON object: {e}")))?;
        match version.format_version {
            None => return Err(corrupt("missing field `format_version`".to_string())),
            Some(v) if v > PROFILE_FORMAT_VERSION => {
                return Err(Error::Unsupported {
                    what: format!(
                        "reference profile format version {v}, this build reads up to {PROFILE_FORMAT_VERSION}"
                    ),
                });
            }
            Some(0) => return Err(corrupt("format_version 0 does not exist".to_string())),
            Some(_) => {}
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let profile: ReferenceProfile = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| corrupt(format!("at `{}`: {}", e.path(), e.inner())))?;
        profile.check().map_err(corrupt)?;
        Ok(profile)
    }

    /// Format version of this profile.
    pub fn format_version(&self) -> u32 {
        self.format_version
    }

    /// The model's task.
    pub fn task(&self) -> Task {
        self.task
    }

    /// Rows kept (the length of every column).
    pub fn rows(&self) -> usize {
        self.columns[0].values.len()
    }

    /// Rows given to the builder, before subsampling.
    pub fn rows_seen(&self) -> u64 {
        self.rows_seen
    }

    /// Seed of the row subsample.
    pub fn sample_seed(&self) -> u64 {
        self.sample_seed
    }

    /// All columns, features and predictions, in build order.
    pub fn columns(&self) -> &[ColumnProfile] {
        &self.columns
    }

    /// The column called `name`.
    pub fn column(&self, name: &str) -> Option<&ColumnProfile> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The feature columns, in order.
    pub fn features(&self) -> impl Iterator<Item = &ColumnProfile> {
        self.columns
            .iter()
            .filter(|c| c.role == ColumnRole::Feature)
    }

    /// The prediction columns, in order.
    pub fn predictions(&self) -> impl Iterator<Item = &ColumnProfile> {
        self.columns
            .iter()
            .filter(|c| c.role == ColumnRole::Prediction)
    }

    /// The invariants the builder guarantees, checked on decoded bytes.
    fn check(&self) -> std::result::Result<(), String> {
        if self.columns.is_empty() {
            return Err("no columns".to_string());
        }
        let mut names = HashSet::new();
        let rows = self.columns[0].values.len();
        if rows == 0 {
            return Err(format!("column `{}` has no values", self.columns[0].name));
        }
        for (i, c) in self.columns.iter().enumerate() {
            if c.name.is_empty() {
                return Err(format!("columns[{i}] has an empty name"));
            }
            if !names.insert(c.name.as_str()) {
                return Err(format!("column name `{}` appears twice", c.name));
            }
            if c.values.len() != rows {
                return Err(format!(
                    "column `{}` has {} values but column `{}` has {rows}",
                    c.name,
                    c.values.len(),
                    self.columns[0].name
                ));
            }
            if let Some(row) = c.values.iter().position(|v| !v.is_finite()) {
                return Err(format!(
                    "column `{}`, row {row}: value is not finite",
                    c.name
                ));
            }
        }
        if (rows as u64) > self.rows_seen {
            return Err(format!(
                "{rows} rows kept but rows_seen is {}",
                self.rows_seen
            ));
        }
        Ok(())
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Invalid {
        reason: format!("reference profile: {}", reason.into()),
    }
}

fn corrupt(reason: String) -> Error {
    Error::CorruptObject {
        key: "reference profile".to_string(),
        reason,
    }
}

fn check_specs(specs: &[ColumnSpec]) -> Result<()> {
    if specs.is_empty() {
        return Err(invalid("no columns: a profile needs at least one column"));
    }
    let mut names = HashSet::new();
    for (i, spec) in specs.iter().enumerate() {
        if spec.name.is_empty() {
            return Err(invalid(format!("column {i} has an empty name")));
        }
        if !names.insert(spec.name.as_str()) {
            return Err(invalid(format!(
                "column name `{}` appears twice: names must be unique",
                spec.name
            )));
        }
    }
    Ok(())
}

/// Evidently's kind inference (`_get_column_type`) over `f64` values; see the
/// module docs.
pub fn infer_kind(role: ColumnRole, task: Task, values: &[f64]) -> ColumnKind {
    let few_values = unique_count(values) <= CATEGORICAL_MAX_UNIQUE;
    let categorical = match role {
        ColumnRole::Feature => few_values && values.iter().all(|v| v.fract() == 0.0),
        ColumnRole::Prediction => {
            (task != Task::Regression && few_values)
                || (task == Task::Classification
                    && values.iter().any(|&v| !(0.0..=1.0).contains(&v)))
        }
    };
    if categorical {
        ColumnKind::Categorical
    } else {
        ColumnKind::Numerical
    }
}

/// Distinct values, with `-0.0` and `0.0` the same value (as pandas counts).
fn unique_count(values: &[f64]) -> usize {
    let mut bits: Vec<u64> = values.iter().map(|&v| (v + 0.0).to_bits()).collect();
    bits.sort_unstable();
    bits.dedup();
    bits.len()
}

/// Chooses `keep` of `rows` row indices, in increasing order, with selection
/// sampling (Knuth's Algorithm S) driven by SplitMix64 from `seed`: every
/// subset of `keep` rows is equally likely, and the choice depends only on
/// (`rows`, `keep`, `seed`). Part of the profile format: do not change it
/// without a new format version.
pub fn sample_rows(rows: usize, keep: usize, seed: u64) -> Vec<usize> {
    let keep = keep.min(rows);
    let mut rng = SplitMix64(seed);
    let mut chosen = Vec::with_capacity(keep);
    for r in 0..rows {
        let needed = (keep - chosen.len()) as u64;
        if needed == 0 {
            break;
        }
        let left = (rows - r) as u64;
        if rng.below(left) < needed {
            chosen.push(r);
        }
    }
    chosen
}

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast and identical everywhere.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..bound` (`bound > 0`), by rejection so that no
    /// value is favoured.
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }
}

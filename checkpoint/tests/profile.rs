//! Reference profiles: kind inference, subsampling, JSON round trip and the
//! errors a caller or a damaged object gets.

use kiln_checkpoint::Error;
use kiln_checkpoint::profile::{
    ColumnKind, ColumnRole, ColumnSpec, PREDICTION_COLUMN, PROFILE_FORMAT_VERSION, ProfileOptions,
    ReferenceProfile, Task, infer_kind, sample_rows,
};

fn opts(max_rows: usize, seed: u64) -> ProfileOptions {
    ProfileOptions { max_rows, seed }
}

/// A small deterministic sequence for test data (not the crate's sampler).
fn lcg(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

#[test]
fn kinds_are_inferred_as_evidently_infers_them() {
    let n = 200;
    let u = lcg(1, n);
    let continuous: Vec<f64> = u.iter().map(|x| x * 10.0 - 5.0).collect();
    let int_few: Vec<f64> = u.iter().map(|x| (x * 3.0).floor()).collect(); // 0,1,2
    let int_many: Vec<f64> = u.iter().map(|x| (x * 40.0).floor()).collect();
    let float_few: Vec<f64> = u.iter().map(|x| (x * 3.0).floor() + 0.5).collect();
    let classes: Vec<f64> = u.iter().map(|x| (x * 10.0).floor()).collect(); // 0..9
    let probabilities = u.clone();
    let binary_labels: Vec<f64> = u.iter().map(|x| if *x < 0.3 { 1.0 } else { 0.0 }).collect();

    let specs = vec![
        ColumnSpec::feature("continuous"),
        ColumnSpec::feature("int_few"),
        ColumnSpec::feature("int_many"),
        ColumnSpec::feature("float_few"),
        ColumnSpec::feature("forced").with_kind(ColumnKind::Categorical),
        ColumnSpec::prediction("classes"),
        ColumnSpec::prediction("probabilities"),
        ColumnSpec::prediction("binary"),
    ];
    let columns = vec![
        continuous.clone(),
        int_few,
        int_many,
        float_few,
        continuous,
        classes.clone(),
        probabilities.clone(),
        binary_labels.clone(),
    ];
    let p = ReferenceProfile::from_columns(specs, columns, Task::Classification, &opts(1000, 0))
        .unwrap();
    let kind = |name: &str| p.column(name).unwrap().kind();
    assert_eq!(kind("continuous"), ColumnKind::Numerical);
    assert_eq!(kind("int_few"), ColumnKind::Categorical);
    assert_eq!(kind("int_many"), ColumnKind::Numerical);
    assert_eq!(kind("float_few"), ColumnKind::Numerical);
    assert_eq!(kind("forced"), ColumnKind::Categorical);
    assert!(p.column("forced").unwrap().kind_given());
    assert!(!p.column("continuous").unwrap().kind_given());
    // Classification: labels outside [0, 1] are categorical however many;
    // probabilities are numerical; few values are categorical.
    assert_eq!(kind("classes"), ColumnKind::Categorical);
    assert_eq!(kind("probabilities"), ColumnKind::Numerical);
    assert_eq!(kind("binary"), ColumnKind::Categorical);
    assert!(p.column("binary").unwrap().is_binary());
    assert!(!p.column("int_few").unwrap().is_binary());
    assert_eq!(p.column("int_few").unwrap().unique_count(), 3);

    // The task changes how predictions are typed.
    use ColumnRole::Prediction;
    assert_eq!(
        infer_kind(Prediction, Task::Regression, &binary_labels),
        ColumnKind::Numerical
    );
    assert_eq!(
        infer_kind(Prediction, Task::Unspecified, &binary_labels),
        ColumnKind::Categorical
    );
    assert_eq!(
        infer_kind(Prediction, Task::Unspecified, &classes),
        ColumnKind::Numerical
    );
    assert_eq!(
        infer_kind(Prediction, Task::Classification, &probabilities),
        ColumnKind::Numerical
    );
}

#[test]
fn json_round_trip_keeps_everything() {
    let u = lcg(7, 50);
    let p = ReferenceProfile::from_columns(
        vec![ColumnSpec::feature("a"), ColumnSpec::prediction("p")],
        vec![u.clone(), u.iter().map(|x| (x * 4.0).floor()).collect()],
        Task::Classification,
        &opts(1000, 3),
    )
    .unwrap();
    let bytes = p.to_json_bytes();
    let back = ReferenceProfile::from_json_bytes(&bytes).unwrap();
    assert_eq!(back, p);
    assert_eq!(back.format_version(), PROFILE_FORMAT_VERSION);
    // Values survive bit for bit (serde_json prints shortest round-trip floats).
    assert_eq!(back.column("a").unwrap().values(), &u[..]);
    assert_eq!(back.task(), Task::Classification);
    assert_eq!(back.rows(), 50);
    assert_eq!(back.rows_seen(), 50);
}

#[test]
fn large_inputs_are_subsampled_by_rows_stably() {
    let n = 10_000;
    let a: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let b: Vec<f64> = a.iter().map(|x| 2.0 * x + 1.0).collect();
    let build = |seed| {
        ReferenceProfile::from_columns(
            vec![ColumnSpec::feature("a"), ColumnSpec::feature("b")],
            vec![a.clone(), b.clone()],
            Task::Regression,
            &opts(1000, seed),
        )
        .unwrap()
    };
    let p = build(42);
    assert_eq!(p.rows(), 1000);
    assert_eq!(p.rows_seen(), n as u64);
    assert_eq!(p.sample_seed(), 42);
    let (ka, kb) = (
        p.column("a").unwrap().values(),
        p.column("b").unwrap().values(),
    );
    // Whole rows are kept, in their original order, without repeats.
    for (x, y) in ka.iter().zip(kb) {
        assert_eq!(*y, 2.0 * x + 1.0);
    }
    assert!(ka.windows(2).all(|w| w[0] < w[1]));
    // The sample spreads over the whole input (mean index near n/2; the
    // standard error of the mean of 1000 of 10000 indices is ~87).
    let mean = ka.iter().sum::<f64>() / ka.len() as f64;
    assert!((mean - 4999.5).abs() < 500.0, "mean index {mean}");
    // Same seed, same sample; another seed, another sample.
    assert_eq!(build(42), p);
    assert_ne!(build(43).column("a").unwrap().values(), ka);
    // And it survives serialisation.
    assert_eq!(
        ReferenceProfile::from_json_bytes(&p.to_json_bytes()).unwrap(),
        p
    );
}

#[test]
fn every_row_is_equally_likely_to_be_kept() {
    // 20000 seeds choosing 5 of 20 rows: each row is kept with probability
    // 1/4; the standard deviation of the observed share is 0.0031.
    let (rows, keep, seeds) = (20, 5, 20_000u64);
    let mut kept = vec![0u32; rows];
    for seed in 0..seeds {
        let chosen = sample_rows(rows, keep, seed);
        assert_eq!(chosen.len(), keep);
        assert!(chosen.windows(2).all(|w| w[0] < w[1]));
        for r in chosen {
            kept[r] += 1;
        }
    }
    for (r, &k) in kept.iter().enumerate() {
        let share = k as f64 / seeds as f64;
        assert!((share - 0.25).abs() < 0.015, "row {r} kept {share}");
    }
    // Keeping at least as many rows as there are keeps them all.
    assert_eq!(sample_rows(4, 10, 1), vec![0, 1, 2, 3]);
}

#[test]
fn the_sample_is_part_of_the_format() {
    // Pinned so that a change of the sampler (which would change every
    // profile built from the same data) is caught: bump the format version
    // if it must change.
    assert_eq!(sample_rows(100, 5, 0), sample_rows(100, 5, 0));
    let pinned = sample_rows(1_000_000, 3, 2024);
    assert_eq!(pinned.len(), 3);
    assert_eq!(pinned, PINNED_SAMPLE.to_vec(), "sampler changed");
}

/// `sample_rows(1_000_000, 3, 2024)` of format version 1.
const PINNED_SAMPLE: [usize; 3] = [140523, 369404, 688692];

#[test]
fn model_io_builds_named_feature_and_prediction_columns() {
    // 3 rows x 2 features.
    let inputs = [1.0f32, 10.0, 2.0, 20.0, 3.0, 30.0];
    let predictions = [0.0, 1.0, 1.0];
    let p = ReferenceProfile::from_model_io(
        &inputs,
        2,
        None,
        &predictions,
        Task::Classification,
        &ProfileOptions::default(),
    )
    .unwrap();
    let names: Vec<&str> = p.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["x0", "x1", PREDICTION_COLUMN]);
    assert_eq!(p.column("x0").unwrap().values(), &[1.0, 2.0, 3.0]);
    assert_eq!(p.column("x1").unwrap().values(), &[10.0, 20.0, 30.0]);
    assert_eq!(p.features().count(), 2);
    assert_eq!(p.predictions().count(), 1);
    assert_eq!(
        p.column(PREDICTION_COLUMN).unwrap().role(),
        ColumnRole::Prediction
    );

    let named = ReferenceProfile::from_model_io(
        &inputs,
        2,
        Some(&["age".to_string(), "income".to_string()]),
        &predictions,
        Task::Classification,
        &ProfileOptions::default(),
    )
    .unwrap();
    assert_eq!(
        named.column("income").unwrap().values(),
        &[10.0, 20.0, 30.0]
    );

    let err = ReferenceProfile::from_model_io(
        &inputs,
        4,
        None,
        &predictions,
        Task::Classification,
        &ProfileOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("inputs hold 6 values") && err.contains("need 12"),
        "{err}"
    );
    let err = ReferenceProfile::from_model_io(
        &inputs,
        2,
        Some(&["only".to_string()]),
        &predictions,
        Task::Classification,
        &ProfileOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("1 feature names for 2 features"), "{err}");
}

fn build_err(specs: Vec<ColumnSpec>, columns: Vec<Vec<f64>>, max_rows: usize) -> String {
    match ReferenceProfile::from_columns(specs, columns, Task::Unspecified, &opts(max_rows, 0)) {
        Err(e @ Error::Invalid { .. }) => e.to_string(),
        other => panic!("expected an invalid error, got {other:?}"),
    }
}

#[test]
fn bad_input_is_refused_with_the_column_named() {
    let f = ColumnSpec::feature;
    let e = build_err(
        vec![f("a"), f("b")],
        vec![vec![1.0, 2.0], vec![1.0, f64::NAN]],
        10,
    );
    assert!(
        e.contains("column `b`, row 1") && e.contains("not finite"),
        "{e}"
    );
    let e = build_err(vec![f("a"), f("b")], vec![vec![1.0, 2.0], vec![1.0]], 10);
    assert!(
        e.contains("column `b` has 1 values but column `a` has 2"),
        "{e}"
    );
    let e = build_err(vec![f("a"), f("a")], vec![vec![1.0], vec![1.0]], 10);
    assert!(e.contains("`a` appears twice"), "{e}");
    let e = build_err(vec![f("")], vec![vec![1.0]], 10);
    assert!(e.contains("empty name"), "{e}");
    let e = build_err(vec![], vec![], 10);
    assert!(e.contains("no columns"), "{e}");
    let e = build_err(vec![f("a")], vec![vec![]], 10);
    assert!(e.contains("no rows"), "{e}");
    let e = build_err(vec![f("a")], vec![vec![1.0], vec![2.0]], 10);
    assert!(e.contains("1 column specs for 2 columns"), "{e}");
    let e = build_err(vec![f("a")], vec![vec![1.0]], 0);
    assert!(e.contains("max_rows is 0"), "{e}");
    let e = ReferenceProfile::from_rows(
        vec![f("a"), f("b")],
        &[vec![1.0, 2.0], vec![3.0]],
        Task::Unspecified,
        &ProfileOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("row 1 has 1 values, expected 2"), "{e}");
}

#[test]
fn rows_and_columns_builders_agree() {
    let rows: Vec<Vec<f64>> = (0..30).map(|i| vec![i as f64, (i % 3) as f64]).collect();
    let specs = || vec![ColumnSpec::feature("i"), ColumnSpec::feature("m")];
    let by_rows =
        ReferenceProfile::from_rows(specs(), &rows, Task::Unspecified, &opts(10, 5)).unwrap();
    let by_columns = ReferenceProfile::from_columns(
        specs(),
        vec![
            rows.iter().map(|r| r[0]).collect(),
            rows.iter().map(|r| r[1]).collect(),
        ],
        Task::Unspecified,
        &opts(10, 5),
    )
    .unwrap();
    assert_eq!(by_rows, by_columns);
    assert_eq!(by_rows.rows(), 10);
}

fn decode_err(json: &str) -> Error {
    ReferenceProfile::from_json_bytes(json.as_bytes()).unwrap_err()
}

#[test]
fn damaged_or_newer_bytes_are_refused_clearly() {
    let good = ReferenceProfile::from_columns(
        vec![ColumnSpec::feature("a")],
        vec![vec![1.0, 2.0]],
        Task::Regression,
        &ProfileOptions::default(),
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&good.to_json_bytes()).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = json.clone();
        f(&mut v);
        v.to_string()
    };

    let e = decode_err(&with(&|v| v["format_version"] = 2.into()));
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("format version 2"),
        "{e}"
    );
    let e = decode_err(&with(&|v| {
        v.as_object_mut().unwrap().remove("format_version");
    }));
    assert!(
        e.to_string().contains("missing field `format_version`"),
        "{e}"
    );
    let e = decode_err("not json");
    assert!(matches!(e, Error::CorruptObject { .. }), "{e}");
    let e = decode_err(&with(&|v| v["columns"][0]["kind"] = "ordinal".into()));
    let msg = e.to_string();
    assert!(
        msg.contains("columns[0].kind") && msg.contains("ordinal"),
        "{msg}"
    );
    let e = decode_err(&with(&|v| v["columns"][0]["colour"] = "red".into()));
    assert!(e.to_string().contains("colour"), "{e}");
    let e = decode_err(&with(&|v| {
        v["columns"][0]["values"] = serde_json::json!([]);
    }));
    assert!(e.to_string().contains("has no values"), "{e}");
    let e = decode_err(&with(&|v| {
        let mut second = v["columns"][0].clone();
        second["name"] = "b".into();
        second["values"] = serde_json::json!([1.0]);
        v["columns"].as_array_mut().unwrap().push(second);
    }));
    assert!(
        e.to_string()
            .contains("column `b` has 1 values but column `a` has 2"),
        "{e}"
    );
    let e = decode_err(&with(&|v| {
        let first = v["columns"][0].clone();
        v["columns"].as_array_mut().unwrap().push(first);
    }));
    assert!(e.to_string().contains("appears twice"), "{e}");
    let e = decode_err(&with(&|v| v["columns"] = serde_json::json!([])));
    assert!(e.to_string().contains("no columns"), "{e}");
}

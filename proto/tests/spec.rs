//! The job spec as a user meets it: loading, defaults, paths, every class of
//! refusal (each message must name the field), `--set` overrides and the JSON
//! form workers receive.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_proto::spec::{
    DataKind, DeviceKind, JobSpec, ModelKind, OptimizerKind, ScheduleKind, SpecError,
};

/// The smallest spec that is accepted.
const MINIMAL: &str = r#"
[job]
name = "tiny"

[model]
kind = "mlp"

[data]
kind = "synthetic"
"#;

fn overrides(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

/// A spec from `text` with `args` applied, in a folder that holds nothing.
fn parse(text: &str, args: &[&str]) -> Result<JobSpec, SpecError> {
    let dir = tempfile::tempdir().expect("create temp dir");
    JobSpec::from_toml_str(text, dir.path(), &overrides(args))
}

/// The message of the error that `text` with `args` must give.
fn error_of(text: &str, args: &[&str]) -> String {
    match parse(text, args) {
        Ok(spec) => panic!("expected an error, got {spec:?}"),
        Err(error) => error.to_string(),
    }
}

fn assert_contains(message: &str, expected: &str) {
    assert!(
        message.contains(expected),
        "message {message:?} lacks {expected:?}"
    );
}

/// 1-based number of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|line| line.starts_with(prefix))
        .expect("text has the line")
        + 1
}

fn touch(path: &Path) {
    fs::create_dir_all(path.parent().expect("file has a folder")).expect("create folder");
    fs::write(path, b"").expect("write file");
}

#[test]
fn minimal_spec_loads_with_defaults() {
    let spec = parse(MINIMAL, &[]).expect("minimal spec loads");

    assert_eq!(spec.job.name, "tiny");
    assert_eq!(spec.job.seed, 0);
    assert_eq!(spec.model.kind, ModelKind::Mlp);
    assert_eq!(spec.model.hidden, vec![128]);
    assert_eq!(spec.model.channels, vec![16, 32]);
    assert_eq!(spec.model.input_shape, None);
    assert_eq!(spec.model.path, None);
    assert_eq!(spec.data.kind, DataKind::Synthetic);
    assert!(spec.data.train.is_empty() && spec.data.eval.is_empty());
    assert_eq!(spec.data.classes, None);
    assert_eq!(
        (
            spec.data.samples,
            spec.data.eval_samples,
            spec.data.features
        ),
        (8192, 1024, 784)
    );
    assert_eq!(spec.train.steps, 100);
    assert_eq!(spec.train.global_batch, 64);
    assert_eq!(spec.train.micro_batch, None);
    assert_eq!(spec.train.eval_interval, 0);
    assert_eq!(spec.train.log_interval, 10);
    assert_eq!(spec.train.threads_per_worker, None);
    assert_eq!(spec.optimizer.kind, OptimizerKind::Adamw);
    assert_eq!(spec.optimizer.lr, 1e-3);
    assert_eq!(spec.optimizer.momentum, 0.9);
    assert_eq!(spec.optimizer.weight_decay, 0.0);
    assert_eq!(
        (
            spec.optimizer.beta1,
            spec.optimizer.beta2,
            spec.optimizer.eps
        ),
        (0.9, 0.999, 1e-8)
    );
    assert_eq!(spec.schedule.kind, ScheduleKind::Constant);
    assert_eq!((spec.schedule.warmup_steps, spec.schedule.min_lr), (0, 0.0));
    assert_eq!(spec.workers.nproc, 1);
    assert_eq!(spec.workers.device, DeviceKind::Auto);
    assert_eq!((spec.comm.bucket_mb, spec.comm.timeout_secs), (25.0, 30.0));
}

#[test]
fn load_resolves_relative_paths_against_the_spec_folder() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let root = dir.path();
    touch(&root.join("jobs/data/train-0.safetensors"));
    touch(&root.join("jobs/data/train-1.safetensors"));
    touch(&root.join("jobs/data/eval-0.safetensors"));
    touch(&root.join("jobs/model.pt"));
    let elsewhere = root.join("elsewhere/train-2.safetensors");
    touch(&elsewhere);
    let spec_path = root.join("jobs/job.toml");
    fs::write(
        &spec_path,
        format!(
            r#"
[job]
name = "paths"
[model]
kind = "torchscript"
path = "model.pt"
[data]
kind = "safetensors"
train = ["data/train-0.safetensors", "./data/train-1.safetensors", "{}"]
eval = ["data/eval-0.safetensors"]
"#,
            elsewhere.display()
        ),
    )
    .expect("write spec");

    let spec = JobSpec::load(&spec_path, &[]).expect("spec loads");

    let folder = root.join("jobs");
    assert_eq!(
        spec.data.train,
        vec![
            folder.join("data/train-0.safetensors"),
            folder.join("data/train-1.safetensors"),
            elsewhere,
        ]
    );
    assert_eq!(spec.data.eval, vec![folder.join("data/eval-0.safetensors")]);
    assert_eq!(spec.model.path, Some(folder.join("model.pt")));
    let all: Vec<&PathBuf> = spec
        .data
        .train
        .iter()
        .chain(&spec.data.eval)
        .chain(&spec.model.path)
        .collect();
    assert!(
        all.iter().all(|path| path.is_absolute() && path.is_file()),
        "{all:?}"
    );
}

#[test]
fn relative_base_dir_is_made_absolute() {
    let spec = JobSpec::from_toml_str(MINIMAL, Path::new("some/folder"), &[])
        .expect("synthetic spec needs no files");
    // Nothing to resolve in a synthetic spec; a torchscript path shows the base.
    assert!(spec.model.path.is_none());
    let error = JobSpec::from_toml_str(
        MINIMAL,
        Path::new("some/folder"),
        &overrides(&["model.kind=torchscript", "model.path=net.pt"]),
    )
    .expect_err("net.pt does not exist");
    let expected = std::env::current_dir()
        .expect("current dir")
        .join("some/folder/net.pt");
    assert_eq!(
        error.to_string(),
        format!("model.path: file {} does not exist", expected.display())
    );
}

#[test]
fn load_of_a_missing_file_names_it() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let path = dir.path().join("absent.toml");
    let error = JobSpec::load(&path, &[]).expect_err("file is absent");
    assert!(matches!(error, SpecError::Read { .. }), "{error:?}");
    assert_contains(
        &error.to_string(),
        &format!("read job spec {}: ", path.display()),
    );
}

#[test]
fn unknown_key_names_the_field_the_choices_and_the_line() {
    let text = format!("{MINIMAL}\n[train]\nglobl_batch = 32\n");
    let message = error_of(&text, &[]);
    assert_contains(
        &message,
        "train.globl_batch: unknown field, expected one of steps, global_batch, micro_batch",
    );
    let line = line_of(&text, "globl_batch");
    assert!(message.ends_with(&format!("(line {line})")), "{message}");
}

#[test]
fn unknown_section_is_refused() {
    let message = error_of(&format!("{MINIMAL}\n[trian]\nsteps = 3\n"), &[]);
    assert_contains(
        &message,
        "trian: unknown field, expected one of job, model, data, train",
    );
}

#[test]
fn wrong_type_names_the_field_and_the_expected_type() {
    let text = format!("{MINIMAL}\n[train]\nglobal_batch = \"big\"\n");
    let message = error_of(&text, &[]);
    assert_eq!(
        message,
        format!(
            "train.global_batch: invalid type: string \"big\", expected usize (line {})",
            line_of(&text, "global_batch")
        )
    );

    let message = error_of(&format!("{MINIMAL}\n[train]\nsteps = -5\n"), &[]);
    assert_contains(
        &message,
        "train.steps: invalid value: integer -5, expected u64",
    );

    let message = error_of(&format!("{MINIMAL}\n[train]\nmicro_batch = 1.5\n"), &[]);
    assert_contains(
        &message,
        "train.micro_batch: invalid type: floating point 1.5",
    );

    let text = MINIMAL.replace("kind = \"mlp\"", "kind = \"mlp\"\nhidden = [64, \"x\"]");
    assert_contains(
        &error_of(&text, &[]),
        "model.hidden[1]: invalid type: string \"x\"",
    );
}

#[test]
fn bad_enum_lists_the_variants() {
    let message = error_of(&format!("{MINIMAL}\n[optimizer]\nkind = \"adam\"\n"), &[]);
    assert_contains(
        &message,
        "optimizer.kind: unknown variant \"adam\", expected one of sgd, adamw",
    );
    let message = error_of(&MINIMAL.replace("\"synthetic\"", "\"parquet\""), &[]);
    assert_contains(
        &message,
        "data.kind: unknown variant \"parquet\", expected one of safetensors, synthetic",
    );
}

#[test]
fn a_variant_of_the_wrong_type_lists_the_variants() {
    let fields = [
        ("model.kind", "mlp, cnn, torchscript"),
        ("data.kind", "safetensors, synthetic"),
        ("optimizer.kind", "sgd, adamw"),
        ("schedule.kind", "constant, cosine"),
        ("workers.device", "auto, cpu, cuda"),
    ];
    for (field, choices) in fields {
        // serde's own list for an unknown variant: the wrong-type message must agree.
        let bogus = format!("{field}=bogus");
        assert_contains(
            &error_of(MINIMAL, &[&bogus]),
            &format!("{field}: unknown variant \"bogus\", expected one of {choices}"),
        );
        let number = format!("{field}=3");
        assert_eq!(
            error_of(MINIMAL, &[&number]),
            format!("{field}: invalid type: integer 3, expected one of {choices}")
        );
    }
    let text = format!("{MINIMAL}\n[optimizer]\nkind = [\"sgd\"]\n");
    assert_eq!(
        error_of(&text, &[]),
        format!(
            "optimizer.kind: invalid type: array [\"sgd\"], expected one of sgd, adamw (line {})",
            line_of(&text, "kind = [")
        )
    );
}

#[test]
fn a_section_given_as_an_array_is_refused() {
    // serde would fill the struct by position: steps = 500, global_batch = 32.
    let text = format!("train = [500, 32]\n{MINIMAL}");
    assert_eq!(
        error_of(&text, &[]),
        format!(
            "train: invalid type: array, expected a table (a [train] section) (line {})",
            line_of(&text, "train = ")
        )
    );
    assert_eq!(
        error_of(MINIMAL, &["comm=[1.0, 2.0]"]),
        "comm: invalid type: array, expected a table (a [comm] section)"
    );
}

#[test]
fn missing_required_fields_and_sections_are_named() {
    let message = error_of(&MINIMAL.replace("name = \"tiny\"", ""), &[]);
    assert_eq!(message, "job.name: required field is missing");
    let message = error_of(&MINIMAL.replace("[model]\nkind = \"mlp\"", ""), &[]);
    assert_eq!(message, "model: required section is missing");
}

#[test]
fn toml_syntax_error_gives_line_and_column() {
    let error = parse("[job]\nname = \"x\"\nseed 3\n", &[]).expect_err("not toml");
    assert!(
        matches!(error, SpecError::Syntax { line: Some(3), .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.starts_with("invalid toml: "), "{message}");
    assert_contains(&message, "(line 3, column ");
    assert!(!message.contains('\n'), "one line: {message:?}");
}

/// Every impossible value, as `--set` arguments on the minimal spec, with the
/// message it must give.
#[test]
fn impossible_values_name_the_field_and_what_is_allowed() {
    let cases: &[(&[&str], &str)] = &[
        (&["job.name=\"\""], "job.name: must not be empty"),
        (
            &["job.name=\"my job\""],
            "job.name: \"my job\" holds ' '; allowed are letters",
        ),
        (&["job.name=run/1"], "job.name: \"run/1\" holds '/'"),
        (
            &["job.name=.."],
            "job.name: \"..\" is not a usable folder name",
        ),
        (
            &["job.name=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"],
            "job.name: 65 characters, at most 64 allowed",
        ),
        (&["train.steps=0"], "train.steps: must be at least 1"),
        (
            &["train.global_batch=0"],
            "train.global_batch: must be at least 1",
        ),
        (
            &["train.global_batch=100", "workers.nproc=3"],
            "train.global_batch: 100 is not divisible by workers.nproc = 3 \
             (each rank takes an equal slice)",
        ),
        (&["workers.nproc=0"], "workers.nproc: must be at least 1"),
        (
            &["train.micro_batch=0"],
            "train.micro_batch: must be at least 1",
        ),
        (
            &[
                "train.global_batch=64",
                "workers.nproc=2",
                "train.micro_batch=24",
            ],
            "train.micro_batch: 24 must divide the per-rank batch 32",
        ),
        (
            &["train.log_interval=0"],
            "train.log_interval: must be at least 1",
        ),
        (
            &["train.threads_per_worker=0"],
            "train.threads_per_worker: must be at least 1",
        ),
        (
            &["model.hidden=[]"],
            "model.hidden: must hold at least one layer width",
        ),
        (
            &["model.hidden=[32, 0]"],
            "model.hidden[1]: must be at least 1",
        ),
        (
            &["model.channels=[0]"],
            "model.channels[0]: must be at least 1",
        ),
        (
            &["model.input_shape=[1, 28]"],
            "model.input_shape: expected 3 dimensions [channels, height, width], got [1, 28]",
        ),
        (
            &["model.input_shape=[1, 0, 28]"],
            "model.input_shape[1]: must be at least 1",
        ),
        (
            &["model.kind=torchscript"],
            "model.path: required when model.kind = \"torchscript\"",
        ),
        (
            &["model.path=net.pt"],
            "model.path: only applies to model.kind = \"torchscript\"",
        ),
        (
            &["model.kind=cnn", "model.channels=[]"],
            "model.channels: must hold at least one",
        ),
        (
            &["model.kind=cnn", "data.features=10"],
            "model.input_shape: required when data.features = 10 is not a perfect square",
        ),
        (
            &[
                "model.kind=cnn",
                "model.input_shape=[3, 8, 8]",
                "data.features=64",
            ],
            "model.input_shape: [3, 8, 8] holds 192 values but data.features = 64",
        ),
        (
            &["data.kind=safetensors"],
            "data.train: must list at least one file",
        ),
        (
            &["data.train=[\"a.safetensors\"]"],
            "data.train: only applies to data.kind = \"safetensors\"",
        ),
        (
            &["data.eval=[\"a.safetensors\"]"],
            "data.eval: only applies to data.kind = \"safetensors\"",
        ),
        (&["data.samples=0"], "data.samples: must be at least 1"),
        (&["data.features=0"], "data.features: must be at least 1"),
        (&["data.classes=1"], "data.classes: 1 must be at least 2"),
        (
            &["optimizer.lr=0"],
            "optimizer.lr: 0 must be a finite number > 0",
        ),
        (
            &["optimizer.lr=nan"],
            "optimizer.lr: NaN must be a finite number > 0",
        ),
        (
            &["optimizer.lr=inf"],
            "optimizer.lr: inf must be a finite number > 0",
        ),
        (
            &["optimizer.momentum=1.0"],
            "optimizer.momentum: 1 must be in [0, 1)",
        ),
        (
            &["optimizer.momentum=-0.1"],
            "optimizer.momentum: -0.1 must be in [0, 1)",
        ),
        (
            &["optimizer.beta1=1"],
            "optimizer.beta1: 1 must be in [0, 1)",
        ),
        (
            &["optimizer.beta2=1.5"],
            "optimizer.beta2: 1.5 must be in [0, 1)",
        ),
        (
            &["optimizer.eps=0"],
            "optimizer.eps: 0 must be a finite number > 0",
        ),
        (
            &["optimizer.weight_decay=-1"],
            "optimizer.weight_decay: -1 must be a finite number >= 0",
        ),
        (
            &["optimizer.weight_decay=inf"],
            "optimizer.weight_decay: inf must be a finite number",
        ),
        (
            &["optimizer.lr=0.1", "schedule.min_lr=0.2"],
            "schedule.min_lr: 0.2 must be between 0 and optimizer.lr = 0.1",
        ),
        (
            &["schedule.min_lr=-0.1"],
            "schedule.min_lr: -0.1 must be between 0",
        ),
        (
            &["comm.bucket_mb=0"],
            "comm.bucket_mb: 0 must be a finite number > 0",
        ),
        (
            &["comm.bucket_mb=inf"],
            "comm.bucket_mb: inf must be a finite number > 0",
        ),
        (
            &["comm.timeout_secs=-1"],
            "comm.timeout_secs: -1 must be a finite number > 0",
        ),
    ];
    for (args, expected) in cases {
        let error = parse(MINIMAL, args).expect_err(&format!("{args:?} must be refused"));
        assert!(
            matches!(error, SpecError::Invalid { .. }),
            "{args:?}: {error:?}"
        );
        assert_contains(&error.to_string(), expected);
    }
}

#[test]
fn the_same_values_in_a_file_are_refused_the_same_way() {
    let text = format!("{MINIMAL}\n[train]\nglobal_batch = 100\n[workers]\nnproc = 3\n");
    assert_eq!(
        error_of(&text, &[]),
        "train.global_batch: 100 is not divisible by workers.nproc = 3 \
         (each rank takes an equal slice)"
    );
}

#[test]
fn missing_data_files_are_named_with_their_index_and_absolute_path() {
    let dir = tempfile::tempdir().expect("create temp dir");
    touch(&dir.path().join("train-0.safetensors"));
    let text = r#"
[job]
name = "files"
[model]
kind = "mlp"
[data]
kind = "safetensors"
train = ["train-0.safetensors", "train-1.safetensors"]
"#;
    let error = JobSpec::from_toml_str(text, dir.path(), &[]).expect_err("train-1 is absent");
    assert_eq!(
        error.to_string(),
        format!(
            "data.train[1]: file {} does not exist",
            dir.path().join("train-1.safetensors").display()
        )
    );

    let error = JobSpec::from_toml_str(text, dir.path(), &overrides(&["data.train=[\".\"]"]))
        .expect_err("a folder is not a shard");
    assert_contains(&error.to_string(), "data.train[0]: ");
    assert_contains(&error.to_string(), " is not a file");

    touch(&dir.path().join("train-1.safetensors"));
    let error = JobSpec::from_toml_str(text, dir.path(), &overrides(&["data.eval=[\"e.st\"]"]))
        .expect_err("eval file is absent");
    assert_contains(&error.to_string(), "data.eval[0]: file ");
    JobSpec::from_toml_str(text, dir.path(), &[]).expect("both shards exist now");
}

#[test]
fn overrides_change_values_and_add_missing_sections() {
    // MINIMAL has no [train], [optimizer], [comm] or [workers] section.
    let spec = parse(
        MINIMAL,
        &[
            "train.steps=500",
            "train.global_batch = 128",
            "optimizer.kind=sgd",
            "optimizer.lr=0.5",
            "job.name=\"renamed\"",
            "model.hidden=[32, 16]",
            "comm.timeout_secs=5",
            "workers.device=cpu",
            "workers.nproc=4",
            "data.classes=3",
        ],
    )
    .expect("overrides are valid");
    assert_eq!(spec.train.steps, 500);
    assert_eq!(spec.train.global_batch, 128);
    assert_eq!(
        spec.train.log_interval, 10,
        "untouched fields keep their defaults"
    );
    assert_eq!(spec.optimizer.kind, OptimizerKind::Sgd);
    assert_eq!(spec.optimizer.lr, 0.5);
    assert_eq!(spec.job.name, "renamed");
    assert_eq!(spec.model.hidden, vec![32, 16]);
    assert_eq!(spec.comm.timeout_secs, 5.0);
    assert_eq!(spec.workers.device, DeviceKind::Cpu);
    assert_eq!(spec.workers.nproc, 4);
    assert_eq!(spec.data.classes, Some(3));

    // A later override wins, and overrides beat the file.
    let text = format!("{MINIMAL}\n[train]\nsteps = 7\n");
    let spec = parse(&text, &["train.steps=8", "train.steps=9"]).expect("valid");
    assert_eq!(spec.train.steps, 9);
}

#[test]
fn a_bad_override_value_gives_the_field_error_of_a_bad_file() {
    let error = parse(MINIMAL, &["train.global_batch=big"]).expect_err("not a number");
    assert!(matches!(error, SpecError::Parse { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "train.global_batch: invalid type: string \"big\", expected usize"
    );

    assert_contains(
        &error_of(MINIMAL, &["optimizer.kind=adam"]),
        "optimizer.kind: unknown variant \"adam\", expected one of sgd, adamw",
    );
    assert_contains(
        &error_of(MINIMAL, &["train.globl_batch=3"]),
        "train.globl_batch: unknown field, expected one of steps, global_batch",
    );
    assert_contains(
        &error_of(MINIMAL, &["job=3"]),
        "job: invalid type: integer, expected a table (a [job] section)",
    );
}

#[test]
fn a_fault_in_the_file_keeps_its_line_when_overrides_are_given() {
    let text = format!("{MINIMAL}\n[train]\nglobal_batch = \"big\"\n");
    let message = error_of(&text, &["train.steps=5"]);
    assert_eq!(
        message,
        format!(
            "train.global_batch: invalid type: string \"big\", expected usize (line {})",
            line_of(&text, "global_batch")
        )
    );
    // The override's own fault has no line in the file.
    let message = error_of(MINIMAL, &["train.steps=\"many\""]);
    assert!(!message.contains("line"), "{message}");
}

#[test]
fn malformed_overrides_name_the_argument() {
    let cases: &[(&str, &str)] = &[
        ("train.steps", "--set train.steps: expected key.path=value"),
        ("=3", "--set =3: the key before '=' is empty"),
        ("  =3", "--set   =3: the key before '=' is empty"),
        (
            "train..steps=3",
            "--set train..steps=3: \"train..steps\" has an empty part",
        ),
        (".steps=3", "--set .steps=3: \".steps\" has an empty part"),
        (
            "job.name.first=x",
            "--set job.name.first=x: job.name is a string, not a table",
        ),
    ];
    for (arg, expected) in cases {
        let error = parse(MINIMAL, &[arg]).expect_err(&format!("{arg:?} is malformed"));
        assert!(
            matches!(&error, SpecError::Override { arg: got, .. } if got == arg),
            "{error:?}"
        );
        assert_contains(&error.to_string(), expected);
    }
}

#[test]
fn override_values_fall_back_to_plain_strings() {
    // `a=b` is not a TOML value, so the whole text after the first '=' is the name.
    let error = parse(MINIMAL, &["job.name=a=b"]).expect_err("'=' is not allowed in a name");
    assert_contains(&error.to_string(), "job.name: \"a=b\" holds '='");
    let spec = parse(MINIMAL, &["job.name=run-2.v1"]).expect("bare name");
    assert_eq!(spec.job.name, "run-2.v1");
}

#[test]
fn batch_sizes_at_a_world_size() {
    let spec = parse(MINIMAL, &["train.global_batch=96", "train.micro_batch=8"]).expect("valid");
    assert_eq!(spec.per_rank_batch(1).expect("divides"), 96);
    assert_eq!(spec.per_rank_batch(4).expect("divides"), 24);
    assert_eq!(spec.micro_batch_at(4).expect("divides"), 8);
    assert_eq!(
        spec.per_rank_batch(5).expect_err("96 over 5").to_string(),
        "train.global_batch: 96 is not divisible by world size 5 (each rank takes an equal slice)"
    );
    assert_contains(
        &spec
            .micro_batch_at(32)
            .expect_err("per-rank batch 3")
            .to_string(),
        "train.micro_batch: 8 must divide the per-rank batch 3 (train.global_batch 96 over 32 ranks)",
    );
    assert!(spec.per_rank_batch(0).is_err());

    let spec = parse(MINIMAL, &["train.global_batch=96"]).expect("valid");
    assert_eq!(spec.micro_batch_at(3).expect("whole slice"), 32);
}

#[test]
fn validate_catches_a_world_size_change() {
    let mut spec = parse(MINIMAL, &["train.global_batch=64"]).expect("valid");
    spec.validate().expect("still valid");
    spec.workers.nproc = 3;
    assert_contains(
        &spec.validate().expect_err("64 over 3").to_string(),
        "train.global_batch: 64 is not divisible by workers.nproc = 3",
    );
}

#[test]
fn json_round_trip_is_exact() {
    let dir = tempfile::tempdir().expect("create temp dir");
    touch(&dir.path().join("train.safetensors"));
    touch(&dir.path().join("net.pt"));
    let text = r#"
[job]
name = "round-trip"
seed = 17
[model]
kind = "torchscript"
path = "net.pt"
input_shape = [1, 8, 8]
[data]
kind = "safetensors"
train = ["train.safetensors"]
classes = 10
[train]
steps = 3
global_batch = 12
micro_batch = 3
threads_per_worker = 2
[optimizer]
kind = "sgd"
lr = 0.1
weight_decay = 1e-4
[schedule]
kind = "cosine"
warmup_steps = 1
min_lr = 0.001
[workers]
nproc = 2
device = "cuda"
[comm]
bucket_mb = 0.5
timeout_secs = 2.5
"#;
    let spec = JobSpec::from_toml_str(text, dir.path(), &[]).expect("valid");
    let json = spec.to_json();
    assert!(json.contains("\"micro_batch\":3"), "{json}");
    let back = JobSpec::from_json(&json).expect("own json reads back");
    assert_eq!(back, spec);
    assert_eq!(back.to_json(), json);

    let minimal = parse(MINIMAL, &[]).expect("valid");
    assert_eq!(
        JobSpec::from_json(&minimal.to_json()).expect("reads back"),
        minimal
    );
}

#[test]
fn json_is_read_strictly() {
    let json = parse(MINIMAL, &[]).expect("valid").to_json();
    let tampered = json.replacen("\"steps\":", "\"stepz\":", 1);
    assert_contains(
        &JobSpec::from_json(&tampered)
            .expect_err("unknown field")
            .to_string(),
        "train.stepz: unknown field, expected one of steps",
    );
    let error = JobSpec::from_json(&json[..json.len() - 1]).expect_err("truncated");
    assert!(
        matches!(error, SpecError::Syntax { format: "json", .. }),
        "{error:?}"
    );
    assert!(error.to_string().starts_with("invalid json: "), "{error}");
    let error = JobSpec::from_json(&format!("{json} x")).expect_err("trailing characters");
    assert_contains(&error.to_string(), "invalid json: trailing characters");
}

/// The examples in docs/job-spec.md are accepted as written, with the paths of
/// the digits example resolved in `examples/digits/`.
#[test]
fn the_examples_in_the_docs_load() {
    let root = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..");
    let docs = fs::read_to_string(root.join("docs/job-spec.md")).expect("read docs/job-spec.md");
    let examples: Vec<&str> = docs
        .split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split_once("```").map(|(toml, _)| toml))
        .filter(|toml| toml.contains("[job]"))
        .collect();
    assert_eq!(examples.len(), 2, "the full example and the smallest one");
    for example in examples {
        JobSpec::from_toml_str(example, &root.join("examples/digits"), &[])
            .unwrap_or_else(|error| panic!("{error}\nin\n{example}"));
    }
}

#[test]
fn huge_values_are_refused_naming_the_field_before_anything_panics() {
    for (arg, field) in [
        ("elastic.settle_secs=1e20", "elastic.settle_secs"),
        (
            "elastic.wait_timeout_secs=1e300",
            "elastic.wait_timeout_secs",
        ),
        ("elastic.cooldown_secs=1e12", "elastic.cooldown_secs"),
        (
            "elastic.lease_ttl_secs=99999999999",
            "elastic.lease_ttl_secs",
        ),
        ("comm.timeout_secs=1e20", "comm.timeout_secs"),
        ("comm.bucket_mb=1e12", "comm.bucket_mb"),
        ("checkpoint.chunk_mb=1e12", "checkpoint.chunk_mb"),
        ("workers.nproc=100000", "workers.nproc"),
        ("model.hidden=[10000000]", "model.hidden[0]"),
        ("data.samples=100000000000", "data.samples"),
        ("train.global_batch=1000000000000", "train.global_batch"),
    ] {
        let message = error_of(MINIMAL, &[arg]);
        assert_contains(&message, field);
    }
    // A language model's sizes too.
    let lm = r#"
[job]
name = "lm"
[model]
kind = "gpt"
vocab = 256
[data]
kind = "tokens"
train = []
seq_len = 16
"#;
    for (arg, field) in [
        ("model.vocab=100000000000", "model.vocab"),
        ("model.n_layer=100000", "model.n_layer"),
        ("data.seq_len=100000000000", "data.seq_len"),
    ] {
        assert_contains(&error_of(lm, &[arg]), field);
    }
}

#[test]
fn language_model_fields_are_checked_together() {
    let lm = r#"
[job]
name = "lm"
[model]
kind = "gpt"
vocab = 256
d_model = 64
n_head = 4
[data]
kind = "synthetic"
"#;
    assert_contains(&error_of(lm, &[]), "data.kind = \"tokens\"");
    let tokens = lm.replace(
        "kind = \"synthetic\"",
        "kind = \"tokens\"\ntrain = [\"x.bin\"]\nseq_len = 8",
    );
    assert_contains(&error_of(&tokens, &[]), "data.train[0]");
    assert_contains(&error_of(&tokens, &["model.n_head=5"]), "model.n_head");
    assert_contains(&error_of(&tokens, &["model.dropout=1.0"]), "model.dropout");
    assert_contains(
        &error_of(
            &tokens,
            &[
                "model.positions=\"rotary\"",
                "model.d_model=12",
                "model.n_head=4",
            ],
        ),
        "model.positions",
    );
    assert_contains(
        &error_of(MINIMAL, &["model.returns=\"loss\""]),
        "model.returns",
    );
    assert_contains(&error_of(MINIMAL, &["data.seq_len=8"]), "data.seq_len");
    assert_contains(
        &error_of(MINIMAL, &["train.clip_grad_norm=0"]),
        "train.clip_grad_norm",
    );
    assert_contains(
        &error_of(MINIMAL, &["train.precision=\"fp8\""]),
        "train.precision",
    );
    assert_contains(
        &error_of(MINIMAL, &["comm.grad_dtype=\"fp16\""]),
        "comm.grad_dtype",
    );
}

#[test]
fn cpu_affinity_defaults_to_auto_and_takes_none() {
    use kiln_proto::spec::CpuAffinity;
    assert_eq!(
        parse(MINIMAL, &[]).expect("minimal").workers.cpu_affinity,
        CpuAffinity::Auto
    );
    let none = parse(MINIMAL, &["workers.cpu_affinity=\"none\""]).expect("none is allowed");
    assert_eq!(none.workers.cpu_affinity, CpuAffinity::None);
    assert_contains(
        &error_of(MINIMAL, &["workers.cpu_affinity=\"numa\""]),
        "workers.cpu_affinity",
    );
}

#[test]
fn checkpoint_required_defaults_to_true_and_cannot_go_with_register() {
    assert!(parse(MINIMAL, &[]).expect("minimal").checkpoint.required);
    let optional = parse(MINIMAL, &["checkpoint.required=false"]).expect("false is allowed");
    assert!(!optional.checkpoint.required);
    assert_contains(
        &error_of(MINIMAL, &["checkpoint.required=maybe"]),
        "checkpoint.required: invalid type: string \"maybe\", expected a boolean",
    );
    let registered = format!("{MINIMAL}\n[register]\nname = \"tiny\"\n");
    assert_contains(
        &error_of(&registered, &["checkpoint.required=false"]),
        "checkpoint.required: false cannot go with [register]",
    );
}

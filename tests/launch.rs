//! End-to-end tests of `kiln launch slurm|k8s`: the real binary writes the
//! files; the sbatch script is checked by bash and executed with a stand-in
//! `srun` (Slurm itself cannot run here) that starts its command once per
//! "node", and the Kubernetes manifests are parsed as YAML (by the Rust crate
//! and, independently, by PyYAML when the project venv is present).

mod common;

use common::repo;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_coordinator::etcd_server::EtcdServer;
use serde::Deserialize;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_LOG", "warn")
        .args(args)
        .output()
        .unwrap()
}

fn stdout_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A synthetic job with a `[launch]` section; `extra` is appended.
fn spec(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[job]
name = "launch-test"
seed = 3
[model]
kind = "mlp"
hidden = [16]
[data]
kind = "synthetic"
samples = 256
features = 8
classes = 4
[train]
steps = 20
global_batch = 48
[workers]
nproc = 2
device = "cpu"
[elastic]
min_nodes = 2
max_nodes = 3
{extra}
"#
        ),
    )
    .unwrap();
    path
}

const GPU_LAUNCH: &str = r#"
[launch]
nodes = 3
gpus_per_node = 4
store = "etcd://10.1.0.1:2379,10.1.0.2:2379"
partition = "gpu-a"
account = "ml-team"
time_limit = "26:30:00"
cpus_per_node = 32
memory_gb = 200
image = "registry.example/kiln:1.2"
namespace = "training"
"#;

fn sbatch_options(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .map(str::to_string)
        .collect()
}

fn bash_syntax_ok(script: &Path) {
    let out = Command::new("bash").arg("-n").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "bash -n rejected the script:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn slurm_script_has_the_requested_allocation_and_one_srun_of_kiln_agent() {
    let dir = tempfile::tempdir().unwrap();
    let job = spec(dir.path(), GPU_LAUNCH);
    let out = kiln(&["launch", "slurm", job.to_str().unwrap()]);
    let script = stdout_ok(&out, "kiln launch slurm");
    let path = dir.path().join("job.sbatch");
    std::fs::write(&path, &script).unwrap();
    bash_syntax_ok(&path);
    assert!(script.starts_with("#!/bin/bash\n"), "{script}");

    let options = sbatch_options(&script);
    for expected in [
        "--job-name=launch-test",
        "--nodes=3",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--cpus-per-task=32",
        "--mem=200G",
        "--partition=gpu-a",
        "--account=ml-team",
        "--time=1-02:30:00",
        "--requeue",
        "--open-mode=append",
        // min_nodes 2 of 3: a lost node must not end the allocation.
        "--no-kill",
    ] {
        assert!(
            options.iter().any(|o| o == expected),
            "missing #SBATCH {expected} in {options:?}"
        );
    }
    assert!(options.iter().any(|o| o.starts_with("--output=")));

    let srun: Vec<&str> = script.lines().filter(|l| l.starts_with("srun ")).collect();
    assert_eq!(srun.len(), 1, "{script}");
    assert!(srun[0].contains("--kill-on-bad-exit=0"), "{}", srun[0]);
    assert!(srun[0].contains("--gpus-per-node=4"), "{}", srun[0]);
    // The command srun runs continues on the next lines.
    let command: String = script
        .split_once(srun[0])
        .unwrap()
        .1
        .lines()
        .take(3)
        .collect::<Vec<_>>()
        .join("\n");
    for expected in [
        "kiln agent",
        "--store etcd://10.1.0.1:2379,10.1.0.2:2379",
        "--job launch-test",
        "--spec \"$KILN_SPEC_DIR/job.toml\"",
        "--nproc 4",
        "SLURMD_NODENAME",
    ] {
        assert!(
            command.contains(expected),
            "{expected:?} not in:\n{command}"
        );
    }
}

#[test]
fn slurm_without_gpus_or_elasticity_asks_for_no_gpus_and_lets_slurm_requeue() {
    let dir = tempfile::tempdir().unwrap();
    let job = spec(dir.path(), "[launch]\nstore = \"etcd://h:1\"");
    let out = kiln(&[
        "launch",
        "slurm",
        job.to_str().unwrap(),
        "--nodes",
        "2",
        "--job-id",
        "run-7",
    ]);
    let script = stdout_ok(&out, "kiln launch slurm");
    let options = sbatch_options(&script);
    assert!(options.contains(&"--nodes=2".to_string()), "{options:?}");
    assert!(options.contains(&"--job-name=run-7".to_string()));
    assert!(
        !options.iter().any(|o| o.starts_with("--gpus")),
        "{options:?}"
    );
    assert!(
        !options.iter().any(|o| o.starts_with("--time")),
        "{options:?}"
    );
    assert!(!options.contains(&"--no-kill".to_string()), "{options:?}");
    assert!(options.contains(&"--requeue".to_string()));
    assert!(script.contains("--job run-7 "), "{script}");
    // workers.nproc when there are no GPUs.
    assert!(script.contains("--nproc 2"), "{script}");
}

/// A stand-in for `srun`: records its options, then runs its command once per
/// node, all at once as on real nodes, with the variables Slurm sets in each
/// task; its status is the worst of the tasks'.
const FAKE_SRUN: &str = r#"#!/bin/bash
set -u
nodes=1
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
  printf '%s\n' "$1" >> "$FAKE_SRUN_LOG"
  shift
done
pids=()
for ((i = 0; i < nodes; i++)); do
  if [[ ${FAKE_SRUN_NODENAMES:-1} == 1 ]]; then
    SLURM_NODEID=$i SLURM_PROCID=$i SLURMD_NODENAME="cn-$((i + 10))" "$@" &
  else
    (unset SLURMD_NODENAME; SLURM_NODEID=$i SLURM_PROCID=$i exec "$@") &
  fi
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || { r=$?; (( r > rc )) && rc=$r; }
done
exit $rc
"#;

/// Stands in for the kiln binary: records its arguments and the spec it was given.
const RECORDER: &str = r#"#!/bin/bash
out="$RECORD_DIR/$SLURM_NODEID"
printf '%s\n' "$@" > "$out.args"
while [[ $# -gt 0 ]]; do
  if [[ $1 == --spec ]]; then cp "$2" "$out.spec"; fi
  shift
done
"#;

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs the generated script as sbatch would, on `nodes` stand-in nodes;
/// returns each node's agent arguments and spec text, and srun's options.
fn run_script(
    script: &Path,
    bin: &Path,
    records: &Path,
    nodes: usize,
    nodenames: bool,
) -> (Vec<(Vec<String>, String)>, Vec<String>) {
    let slurm_job_id = format!("t{}", std::process::id());
    let srun_log = records.join("srun.log");
    // The node-local temporary space the tasks write the spec into.
    let tmp = records.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new("bash")
        .arg(script)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("SLURM_JOB_ID", &slurm_job_id)
        .env("SLURM_JOB_NUM_NODES", nodes.to_string())
        .env("FAKE_SRUN_LOG", &srun_log)
        .env("FAKE_SRUN_NODENAMES", if nodenames { "1" } else { "0" })
        .env("RECORD_DIR", records)
        .env("TMPDIR", &tmp)
        .env_remove("SLURMD_NODENAME")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the script failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let per_node = (0..nodes)
        .map(|i| {
            let args = std::fs::read_to_string(records.join(format!("{i}.args")))
                .unwrap_or_else(|e| panic!("node {i} ran no agent: {e}"));
            let spec = std::fs::read_to_string(records.join(format!("{i}.spec"))).unwrap();
            (args.lines().map(str::to_string).collect(), spec)
        })
        .collect();
    let srun_options = std::fs::read_to_string(&srun_log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    (per_node, srun_options)
}

#[test]
fn slurm_script_runs_one_agent_per_node_with_that_nodes_identity() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    // A kiln_bin path that needs quoting: a space and a single quote.
    let tools = dir.path().join("my tools");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&tools).unwrap();
    write_executable(&bin.join("srun"), FAKE_SRUN);
    let recorder = tools.join("kiln's");
    write_executable(&recorder, RECORDER);

    let job = spec(dir.path(), "[launch]\nstore = \"etcd://127.0.0.1:2379\"");
    let script = dir.path().join("job.sbatch");
    let kiln_bin = format!("launch.kiln_bin={}", recorder.display());
    let out = kiln(&[
        "launch",
        "slurm",
        job.to_str().unwrap(),
        "--set",
        &kiln_bin,
        "--set",
        "train.steps=7",
        "--output",
        script.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("sbatch"));
    bash_syntax_ok(&script);

    for nodenames in [true, false] {
        let records = tempfile::tempdir().unwrap();
        let (nodes, srun_options) = run_script(&script, &bin, records.path(), 3, nodenames);
        assert!(
            srun_options.contains(&"--nodes=3".to_string()),
            "{srun_options:?}"
        );
        assert!(srun_options.contains(&"--kill-on-bad-exit=0".to_string()));
        assert!(srun_options.contains(&"--ntasks-per-node=1".to_string()));
        for (i, (args, spec_text)) in nodes.iter().enumerate() {
            let node = if nodenames {
                format!("cn-{}", i + 10)
            } else {
                format!("node-{i}")
            };
            // The spec is in a private folder of the node's $TMPDIR, under a
            // name nobody can predict: `kiln-{slurm job}.{random}/job.toml`.
            let spec_at = args
                .iter()
                .position(|a| a == "--spec")
                .expect("the agent gets --spec");
            let spec_path = PathBuf::from(&args[spec_at + 1]);
            let folder = spec_path.parent().unwrap();
            let name = folder.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                folder.parent() == Some(records.path().join("tmp").as_path())
                    && name.starts_with(&format!("kiln-t{}.", std::process::id()))
                    && name.len() > format!("kiln-t{}.", std::process::id()).len() + 8,
                "spec at {}",
                spec_path.display()
            );
            let mode = std::fs::metadata(folder).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", folder.display());
            let spec_path = spec_path.display().to_string();
            let expected = [
                "agent",
                "--store",
                "etcd://127.0.0.1:2379",
                "--job",
                "launch-test",
                "--nproc",
                "2",
                "--spec",
                &spec_path,
                "--node",
                &node,
            ];
            assert_eq!(args, &expected, "node {i}");
            // The spec each node got is the effective one, overrides applied.
            let spec: toml::Table = toml::from_str(spec_text).unwrap();
            assert_eq!(spec["train"]["steps"].as_integer(), Some(7), "{spec_text}");
            assert_eq!(spec["job"]["name"].as_str(), Some("launch-test"));
            assert_eq!(
                spec["launch"]["store"].as_str(),
                Some("etcd://127.0.0.1:2379")
            );
        }
    }
}

#[derive(Debug, Deserialize)]
struct Object {
    kind: String,
    metadata: serde_yaml_ng::Value,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    spec: serde_yaml_ng::Value,
}

fn parse_manifests(text: &str) -> Vec<Object> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Object::deserialize(doc).unwrap())
        .collect()
}

fn pyyaml_kinds(path: &Path) -> Option<Vec<String>> {
    let python = repo().join(".venv/bin/python");
    if !python.exists() {
        eprintln!("no .venv/bin/python: PyYAML cross-check skipped");
        return None;
    }
    let out = Command::new(python)
        .args([
            "-c",
            "import sys, yaml; print(' '.join(d['kind'] for d in yaml.safe_load_all(open(sys.argv[1])) if d))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PyYAML could not read the manifests: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn k8s_manifests_are_a_configmap_a_headless_service_and_an_indexed_job() {
    let dir = tempfile::tempdir().unwrap();
    let job = spec(dir.path(), GPU_LAUNCH);
    let output = dir.path().join("job.yaml");
    let out = kiln(&[
        "launch",
        "k8s",
        job.to_str().unwrap(),
        "--set",
        "train.steps=9",
        "--job-id",
        "Launch_Test.2",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&output).unwrap();
    let objects = parse_manifests(&text);
    let kinds: Vec<&str> = objects.iter().map(|o| o.kind.as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Service", "Job"]);
    if let Some(py) = pyyaml_kinds(&output) {
        assert_eq!(py, kinds);
    }
    for o in &objects {
        assert_eq!(o.metadata["namespace"].as_str(), Some("training"));
    }

    // The ConfigMap holds the effective spec.
    let spec_text = &objects[0].data["job.toml"];
    let spec: toml::Table = toml::from_str(spec_text).unwrap();
    assert_eq!(spec["train"]["steps"].as_integer(), Some(9));
    assert_eq!(spec["train"]["global_batch"].as_integer(), Some(48));
    assert_eq!(spec["launch"]["gpus_per_node"].as_integer(), Some(4));

    let service = &objects[1];
    assert_eq!(service.metadata["name"].as_str(), Some("launch-test-2"));
    assert_eq!(service.spec["clusterIP"].as_str(), Some("None"));

    let job = &objects[2].spec;
    assert_eq!(job["completionMode"].as_str(), Some("Indexed"));
    assert_eq!(job["completions"].as_u64(), Some(3));
    assert_eq!(job["parallelism"].as_u64(), Some(3));
    assert_eq!(
        job["activeDeadlineSeconds"].as_u64(),
        Some(26 * 3600 + 1800)
    );
    let pod = &job["template"]["spec"];
    assert_eq!(pod["subdomain"].as_str(), Some("launch-test-2"));
    // The Service selects the Job's pods.
    let pod_labels = &job["template"]["metadata"]["labels"];
    let selector = service.spec["selector"].as_mapping().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(&pod_labels[k.as_str().unwrap()], v, "selector {k:?}");
    }
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"].as_str(),
        Some("registry.example/kiln:1.2")
    );
    let strings = |v: &serde_yaml_ng::Value| -> Vec<String> {
        v.as_sequence()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(strings(&container["command"]), ["kiln"]);
    let args = strings(&container["args"]);
    assert_eq!(
        args,
        [
            "agent",
            "--store",
            "etcd://10.1.0.1:2379,10.1.0.2:2379",
            "--job",
            "Launch_Test.2",
            "--spec",
            "/etc/kiln/job.toml",
            "--nproc",
            "4",
            "--node",
            "node-$(KILN_NODE_INDEX)",
            "--data-dir",
            "/var/lib/kiln",
            "--metrics-addr",
            "0.0.0.0:9400",
        ]
    );
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(9400));
    let env = &container["env"][0];
    assert_eq!(env["name"].as_str(), Some("KILN_NODE_INDEX"));
    assert!(
        env["valueFrom"]["fieldRef"]["fieldPath"]
            .as_str()
            .unwrap()
            .contains("job-completion-index")
    );
    let resources = &container["resources"];
    assert_eq!(resources["limits"]["nvidia.com/gpu"].as_str(), Some("4"));
    assert_eq!(resources["requests"]["nvidia.com/gpu"].as_str(), Some("4"));
    assert_eq!(resources["requests"]["cpu"].as_str(), Some("32"));
    assert_eq!(resources["requests"]["memory"].as_str(), Some("200Gi"));
    // The spec volume comes from the ConfigMap and is mounted where --spec points.
    let config_map = objects[0].metadata["name"].as_str().unwrap();
    let volumes = pod["volumes"].as_sequence().unwrap();
    let spec_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(config_map))
        .expect("a volume from the ConfigMap");
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == spec_volume["name"])
        .expect("the spec volume is mounted");
    assert_eq!(mount["mountPath"].as_str(), Some("/etc/kiln"));
}

#[test]
fn k8s_without_gpus_requests_none_and_image_comes_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let job = repo().join("examples/digits/job.toml");
    let out = kiln(&[
        "launch",
        "k8s",
        job.to_str().unwrap(),
        "--store",
        "etcd://etcd.kiln:2379",
        "--image",
        "kiln:dev",
        "--nodes",
        "2",
    ]);
    let text = stdout_ok(&out, "kiln launch k8s");
    let objects = parse_manifests(&text);
    let job = &objects[2].spec;
    assert_eq!(job["completions"].as_u64(), Some(2));
    assert!(job.get("activeDeadlineSeconds").is_none());
    let container = &job["template"]["spec"]["containers"][0];
    assert_eq!(container["image"].as_str(), Some("kiln:dev"));
    assert!(
        !serde_yaml_ng::to_string(&container["resources"])
            .unwrap()
            .contains("nvidia.com/gpu")
    );
    // The example's relative data paths are absolute in the ConfigMap's spec.
    let spec: toml::Table = toml::from_str(&objects[0].data["job.toml"]).unwrap();
    let train = spec["data"]["train"].as_array().unwrap();
    let first = train[0].as_str().unwrap();
    assert!(
        first.starts_with('/') && first.ends_with("examples/digits/data/train-00000.safetensors"),
        "{first}"
    );
    let _ = dir;
}

fn fails(args: &[&str], code: i32, needles: &[&str]) {
    let out = kiln(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "kiln {args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "kiln {args:?} printed a file");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

#[test]
fn bad_input_is_refused_with_an_error_naming_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let no_store = spec(dir.path(), "").to_str().unwrap().to_string();
    let j = no_store.as_str();
    fails(
        &["launch", "slurm", j],
        2,
        &["no store", "launch.store", "--store"],
    );
    fails(&["launch", "k8s", j, "--image", "x"], 2, &["--store"]);
    fails(
        &["launch", "slurm", j, "--store", "mem://"],
        2,
        &["--store", "etcd://"],
    );
    fails(
        &["launch", "slurm", j, "--store", "etcd://nohost"],
        2,
        &["--store", "host:port"],
    );
    fails(
        &["launch", "k8s", j, "--store", "etcd://h:1"],
        2,
        &["launch.image", "--image"],
    );
    fails(
        &[
            "launch",
            "slurm",
            j,
            "--store",
            "etcd://h:1",
            "--set",
            "train.steps",
        ],
        2,
        &["--set train.steps"],
    );
    fails(
        &[
            "launch",
            "slurm",
            j,
            "--store",
            "etcd://h:1",
            "--set",
            "launch.time_limit=\"soon\"",
        ],
        2,
        &["launch.time_limit"],
    );
    // min_nodes is 2.
    fails(
        &[
            "launch",
            "slurm",
            j,
            "--store",
            "etcd://h:1",
            "--nodes",
            "1",
        ],
        2,
        &["--nodes", "elastic.min_nodes"],
    );
    // 48 does not split over 3 nodes x 5 workers.
    fails(
        &[
            "launch",
            "slurm",
            j,
            "--store",
            "etcd://h:1",
            "--set",
            "launch.gpus_per_node=5",
        ],
        2,
        &["train.global_batch", "3 nodes x 5 workers"],
    );
    fails(
        &[
            "launch",
            "slurm",
            j,
            "--store",
            "etcd://h:1",
            "--job-id",
            "a/b",
        ],
        2,
        &["--job-id"],
    );
    fails(
        &[
            "launch",
            "slurm",
            j,
            "--store",
            "etcd://h:1",
            "--set",
            "launch.partition=\"a b\"",
        ],
        2,
        &["launch.partition"],
    );
    fails(
        &[
            "launch",
            "k8s",
            j,
            "--store",
            "etcd://h:1",
            "--image",
            "x",
            "--set",
            "launch.namespace=Prod",
        ],
        2,
        &["launch.namespace"],
    );
    // The image flag belongs to k8s only (clap's usage error).
    fails(
        &[
            "launch",
            "slurm",
            j,
            "--store",
            "etcd://h:1",
            "--image",
            "x",
        ],
        2,
        &["--image"],
    );
    fails(
        &[
            "launch",
            "slurm",
            "/nonexistent/job.toml",
            "--store",
            "etcd://h:1",
        ],
        2,
        &["/nonexistent/job.toml"],
    );
}

/// Longest a real-agent run may take before the test calls it hung.
const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs the generated script as sbatch would, in `submit_dir`, with the
/// stand-in `srun` of `bin` on PATH; kills the whole process group if it hangs.
fn sbatch(
    script: &Path,
    bin: &Path,
    submit_dir: &Path,
    nodes: usize,
    slurm_job_id: &str,
) -> Output {
    use std::os::unix::process::CommandExt;
    let logs = submit_dir.join(format!("script-{}.log", std::process::id()));
    let mut child = Command::new("bash")
        .arg(script)
        .current_dir(submit_dir)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("SLURM_JOB_ID", slurm_job_id)
        .env("SLURM_JOB_NUM_NODES", nodes.to_string())
        .env("FAKE_SRUN_LOG", &logs)
        .env("KILN_LOG", "warn")
        .env("TMPDIR", submit_dir)
        .env_remove("SLURMD_NODENAME")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    // Read the pipes on threads so that a chatty run cannot block on them.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).ok();
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut v).ok();
        v
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > HANG_GUARD {
            // SAFETY: signals only the process group this test started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            panic!("the script did not finish within {HANG_GUARD:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    }
}

fn job_status(etcd: &EtcdServer, job: &str) -> serde_json::Value {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .args(["get", "--print-value-only"])
        .arg(format!("/kiln/jobs/{job}/status"))
        .output()
        .expect("run etcdctl");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("no job status in etcd ({e}): {text:?}"))
}

#[test]
fn slurm_script_starts_real_agents_that_train_together_and_a_requeue_rejoins_the_job() {
    let etcd = EtcdServer::start().expect("start etcd (scripts/bootstrap.sh installs it)");
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let submit = dir.path().join("submit");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&submit).unwrap();
    write_executable(&bin.join("srun"), FAKE_SRUN);
    let job = spec(dir.path(), "");
    let script = dir.path().join("job.sbatch");
    let kiln_bin = format!("launch.kiln_bin={}", env!("CARGO_BIN_EXE_kiln"));
    let checkpoints = format!("checkpoint.url=\"file://{}/ckpt\"", dir.path().display());
    let out = kiln(&[
        "launch",
        "slurm",
        job.to_str().unwrap(),
        "--store",
        &etcd.url(),
        "--nodes",
        "2",
        "--set",
        &kiln_bin,
        "--set",
        "workers.nproc=1",
        "--set",
        "train.steps=30",
        "--set",
        "train.threads_per_worker=1",
        "--set",
        &checkpoints,
        "--set",
        "checkpoint.interval=10",
        "--output",
        script.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let slurm_job_id = format!("e{}", std::process::id());
    let first = sbatch(&script, &bin, &submit, 2, &slurm_job_id);
    assert!(
        first.status.success(),
        "the job failed: {}\nstdout:\n{}\nstderr:\n{}",
        first.status,
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    let status = job_status(&etcd, "launch-test");
    assert_eq!(status["phase"], "succeeded", "{status:#}");
    assert_eq!(status["world_size"], 2, "{status:#}");
    assert_eq!(status["total_steps"], 30, "{status:#}");
    // Both agents trained to the end, each under the identity its node gave it.
    let finished: std::collections::BTreeSet<&str> = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "finished")
        .filter_map(|e| e["node"].as_str())
        .collect();
    assert_eq!(
        finished,
        ["cn-10", "cn-11"].into(),
        "nodes that finished: {status:#}"
    );
    for node in ["cn-10", "cn-11"] {
        let folder = submit.join("kiln-data/jobs/launch-test/nodes").join(node);
        assert!(folder.is_dir(), "no folder {}", folder.display());
    }

    // A requeue runs the same script again: its agents join the same job,
    // which is over, and do nothing.
    let again = sbatch(&script, &bin, &submit, 2, &slurm_job_id);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success(),
        "the requeued run failed: {}\n{stdout}\n{}",
        again.status,
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        stdout
            .matches("job launch-test is already succeeded: nothing to do")
            .count(),
        2,
        "{stdout}"
    );
    assert_eq!(job_status(&etcd, "launch-test")["phase"], "succeeded");
}

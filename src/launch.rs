//! `kiln launch slurm|k8s`: writes the files that start a job on a cluster.
//!
//! Both backends start one `kiln agent` per node; the agents meet in etcd
//! (`launch.store`), elect a rendezvous leader and train. What the backends add
//! is how a node learns its identity and where the spec comes from:
//!
//! - Slurm: an `sbatch` script. `srun` starts one task per node; each task writes
//!   the spec (embedded in the script) to a node-local file and runs the agent
//!   with `--node` from `SLURMD_NODENAME` (`node-$SLURM_NODEID` when unset).
//! - Kubernetes: a ConfigMap holding the spec, a headless Service and an indexed
//!   `batch/v1` Job whose pod `i` runs the agent as `--node node-i`.
//!
//! The embedded spec is the *effective* one: the file with `--set` overrides
//! applied and relative paths made absolute, so what runs is what was checked
//! here. The kiln job id is written into the files, so a requeued Slurm job or a
//! restarted pod rejoins the same job in etcd and resumes from its latest
//! checkpoint. docs/launch.md is the user guide.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use kiln_proto::spec::{JobSpec, parse_time_limit, validate_store_url};
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub enum LaunchCommand {
    /// Write an sbatch script that runs one `kiln agent` per node (submit it
    /// with `sbatch`).
    Slurm(LaunchArgs),
    /// Write Kubernetes manifests: a ConfigMap with the spec, a headless Service
    /// and an indexed Job with one agent pod per node (`kubectl apply -f`).
    K8s(K8sArgs),
}

/// Arguments both backends take.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// The job spec (TOML).
    pub job: PathBuf,
    /// Override a spec field, e.g. --set train.steps=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The store the agents join through (overrides launch.store): etcd
    /// endpoints, with TLS and credentials as parameters (docs/coordination.md).
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
    pub store: Option<String>,
    /// Nodes to allocate (overrides launch.nodes).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub nodes: Option<u32>,
    /// Where to write the file (default: stdout).
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// The kiln job id the agents join (default: job.name). Keep it when you
    /// relaunch a job to resume it.
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
}

/// Arguments of `kiln launch k8s`.
#[derive(Debug, clap::Args)]
pub struct K8sArgs {
    #[command(flatten)]
    pub common: LaunchArgs,
    /// Container image holding kiln (overrides launch.image).
    #[arg(long)]
    pub image: Option<String>,
}

/// Why a launch file was not written: bad input (exit code 2, like a bad spec
/// for `kiln run`) or anything else (exit code 1).
enum LaunchError {
    Input(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for LaunchError {
    fn from(e: anyhow::Error) -> Self {
        LaunchError::Other(e)
    }
}

fn input(message: impl Into<String>) -> LaunchError {
    LaunchError::Input(message.into())
}

/// Runs `kiln launch`: writes the file, or says which input is wrong.
pub fn run(cmd: LaunchCommand) -> anyhow::Result<ExitCode> {
    let result = match cmd {
        LaunchCommand::Slurm(args) => {
            prepare(&args, None).and_then(|l| Ok((render_slurm(&l)?, args.output, Backend::Slurm)))
        }
        LaunchCommand::K8s(args) => prepare(&args.common, args.image)
            .and_then(|l| Ok((render_k8s(&l)?, args.common.output, Backend::K8s))),
    };
    match result {
        Ok((text, output, backend)) => {
            write_output(&text, output.as_deref(), backend)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(LaunchError::Input(message)) => {
            eprintln!("error: {message}");
            Ok(ExitCode::from(2))
        }
        Err(LaunchError::Other(e)) => Err(e),
    }
}

#[derive(Clone, Copy)]
enum Backend {
    Slurm,
    K8s,
}

fn write_output(text: &str, output: Option<&Path>, backend: Backend) -> anyhow::Result<()> {
    let Some(path) = output else {
        print!("{text}");
        return Ok(());
    };
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    let hint = match backend {
        Backend::Slurm => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("make {} executable", path.display()))?;
            format!("sbatch {}", path.display())
        }
        Backend::K8s => format!("kubectl apply -f {}", path.display()),
    };
    eprintln!("wrote {}; start the job with: {hint}", path.display());
    Ok(())
}

/// Everything a backend writes, checked.
struct Launch {
    /// The effective spec; its `launch` section holds the command-line values.
    spec: JobSpec,
    /// `spec` as TOML: what the agents read.
    spec_toml: String,
    /// Absolute path of the spec file, for the generated file's header.
    source: PathBuf,
    job_id: String,
    store: String,
    nodes: usize,
    /// Workers per node (`--nproc` of every agent).
    nproc: usize,
    /// Wall-clock limit in seconds.
    time_limit_secs: Option<u64>,
}

/// Loads the spec, applies the command line and checks what both backends need.
fn prepare(args: &LaunchArgs, image: Option<String>) -> Result<Launch, LaunchError> {
    let mut spec =
        JobSpec::load(&args.job, &args.set).map_err(|e| input(format!("invalid job spec: {e}")))?;
    let source = std::path::absolute(&args.job)
        .with_context(|| format!("resolve {}", args.job.display()))?;

    let (store, store_field) = match (&args.store, &spec.launch.store) {
        (Some(url), _) => (url.clone(), "--store"),
        (None, Some(url)) => (url.clone(), "launch.store"),
        (None, None) => {
            return Err(input(
                "no store: set launch.store in the spec or pass --store \
                 etcd://HOST:PORT[,HOST:PORT...] (agents on different nodes meet through \
                 etcd; see docs/launch.md)",
            ));
        }
    };
    validate_store_url(store_field, &store).map_err(|e| input(e.to_string()))?;
    let Some(rest) = store
        .strip_prefix("etcd://")
        .or_else(|| store.strip_prefix("etcds://"))
    else {
        return Err(input(format!(
            "{store_field}: {store:?} is the in-process store of `kiln run`; agents on \
             several nodes need etcd://HOST:PORT[,HOST:PORT...] (or etcds://)"
        )));
    };
    let (endpoints, parameters) = rest.split_once('?').unwrap_or((rest, ""));
    // The URL goes into shell scripts, comments and manifests: host names and
    // addresses, and parameters that are paths and names (TLS files, user).
    let host_char = |c: char| c.is_ascii_alphanumeric() || ".-_[]:".contains(c);
    if let Some(bad) = endpoints.chars().find(|&c| !host_char(c) && c != ',') {
        return Err(input(format!(
            "{store_field}: {store:?} holds {bad:?}; a host is a name or an IP address \
             (IPv6 in brackets)"
        )));
    }
    let parameter_char = |c: char| c.is_ascii_alphanumeric() || "._-/%=&+:,~".contains(c);
    if let Some(bad) = parameters.chars().find(|&c| !parameter_char(c)) {
        return Err(input(format!(
            "{store_field}: a parameter of the store URL holds {bad:?}; write it as a %XX \
             escape"
        )));
    }
    spec.launch.store = Some(store.clone());
    if let Some(image) = image {
        spec.launch.image = Some(image);
    }

    let elastic = &spec.elastic;
    let (nodes, nodes_field) = match (args.nodes, spec.launch.nodes) {
        (Some(n), _) => (n as usize, "--nodes"),
        (None, Some(n)) => (n, "launch.nodes"),
        (None, None) => (
            elastic.max_nodes(),
            "launch.nodes (default elastic.max_nodes)",
        ),
    };
    if nodes < elastic.min_nodes {
        return Err(input(format!(
            "{nodes_field}: {nodes} nodes is below elastic.min_nodes = {}; the job would \
             wait for nodes that never come",
            elastic.min_nodes
        )));
    }
    spec.launch.nodes = Some(nodes);

    let nproc = if spec.launch.gpus_per_node > 0 {
        spec.launch.gpus_per_node
    } else {
        spec.workers.nproc
    };
    check_world_sizes(&spec, nodes, nproc)?;

    let job_id = args.job_id.clone().unwrap_or_else(|| spec.job.name.clone());
    check_job_id(&job_id)?;

    let time_limit_secs = match &spec.launch.time_limit {
        None => None,
        Some(text) => match parse_time_limit(text) {
            Some(0) => {
                return Err(input(
                    "launch.time_limit: must be longer than 0 seconds (leave it out for no limit)",
                ));
            }
            Some(secs) => Some(secs),
            None => {
                return Err(input(format!(
                    "launch.time_limit: {text:?} is not a duration; use HH:MM:SS"
                )));
            }
        },
    };

    if spec.checkpoint.url.is_none() {
        eprintln!(
            "warning: checkpoint.url is not set, so every node checkpoints under its own \
             --data-dir; a restarted or requeued job resumes only if that folder is shared \
             (set checkpoint.url to s3://, gs://, az:// or a shared file:// path)"
        );
    }
    let spec_toml = effective_toml(&spec, &source)?;
    Ok(Launch {
        spec,
        spec_toml,
        source,
        job_id,
        store,
        nodes,
        nproc,
        time_limit_secs,
    })
}

/// The global batch must split evenly at the full training world size (an
/// error) and should at every smaller size the job may shrink to (a warning).
fn check_world_sizes(spec: &JobSpec, nodes: usize, nproc: usize) -> Result<(), LaunchError> {
    let most = nodes.min(spec.elastic.max_nodes());
    if let Err(e) = spec.micro_batch_at(most * nproc) {
        return Err(input(format!(
            "invalid job spec at {most} nodes x {nproc} workers: {e}"
        )));
    }
    let uneven: Vec<String> = (spec.elastic.min_nodes..most)
        .filter(|n| spec.micro_batch_at(n * nproc).is_err())
        .map(|n| format!("{n} nodes ({} ranks)", n * nproc))
        .collect();
    if !uneven.is_empty() {
        eprintln!(
            "warning: train.global_batch = {} does not split evenly at {}; the job fails \
             if it shrinks to that size",
            spec.train.global_batch,
            uneven.join(", ")
        );
    }
    Ok(())
}

/// A job id names store keys and files: the rules of `job.name`.
fn check_job_id(id: &str) -> Result<(), LaunchError> {
    let chars = id.chars().count();
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if chars == 0 || chars > 64 || !id.chars().all(allowed) || id == "." || id == ".." {
        return Err(input(format!(
            "--job-id: {id:?} is not a job id; use 1 to 64 letters a-z A-Z, digits, \
             '.', '_' and '-' (not \".\" or \"..\")"
        )));
    }
    Ok(())
}

/// Serializes the effective spec and checks that it reads back as the same spec.
fn effective_toml(spec: &JobSpec, source: &Path) -> Result<String, LaunchError> {
    let body = toml::to_string(spec).context("write the effective job spec as TOML")?;
    let base = source.parent().unwrap_or(Path::new("/"));
    match JobSpec::from_toml_str(&body, base, &[]) {
        Ok(back) if back == *spec => {}
        Ok(_) => {
            return Err(LaunchError::Other(anyhow::anyhow!(
                "the effective job spec does not read back as the same spec"
            )));
        }
        Err(e) => {
            return Err(LaunchError::Other(anyhow::anyhow!(
                "the effective job spec does not read back: {e}"
            )));
        }
    }
    Ok(format!(
        "# Effective job spec written by `kiln launch` from {source:?}\n\
         # (--set overrides applied, paths absolute).\n{body}"
    ))
}

// ---------------------------------------------------------------------------
// Slurm

/// `value` quoted for a POSIX shell: as is when it holds only safe characters,
/// else in single quotes (a `'` inside becomes `'\''`).
fn shell_quote(value: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !value.is_empty() && value.chars().all(safe) {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// A value on an `#SBATCH` line: sbatch reads these lines itself (no shell), so
/// whitespace, quotes and `#` would change their meaning.
fn sbatch_value(field: &str, value: &str) -> Result<String, LaunchError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && !"'\"\\`$#;".contains(c));
    if ok {
        Ok(value.to_string())
    } else {
        Err(input(format!(
            "{field}: {value:?} cannot go on an #SBATCH line; use letters, digits and \
             punctuation other than quotes, '\\', '`', '$', '#' and ';', without spaces"
        )))
    }
}

/// Slurm's `--time`: `[D-]HH:MM:SS`.
fn slurm_time(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let hms = format!(
        "{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    if days > 0 {
        format!("{days}-{hms}")
    } else {
        hms
    }
}

/// The per-task program `srun` runs on every node, under `bash -c`. It is
/// constant text (every value comes through the environment or `"$@"`), so no
/// user value needs quoting twice: it writes the spec into a private folder
/// that `mktemp -d` makes under the node's `$TMPDIR` (mode 0700, a name no
/// other user can predict or pre-create), then runs the agent command given
/// as arguments with that spec and the node's identity appended, evaluated on
/// that node. The folder is left for the job's temporary space to be cleaned
/// with it (the agent replaces this shell).
const SLURM_TASK: &str = r#"umask 077 && KILN_SPEC_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kiln-$SLURM_JOB_ID.XXXXXXXXXX") && cat <<<"$KILN_SPEC_TOML" > "$KILN_SPEC_DIR/job.toml" && exec "$@" --spec "$KILN_SPEC_DIR/job.toml" --node "${SLURMD_NODENAME:-node-$SLURM_NODEID}""#;

/// Largest spec the script passes through the environment: Linux refuses a
/// single environment string over 128 KiB (`MAX_ARG_STRLEN`).
const MAX_ENV_SPEC_BYTES: usize = 120 * 1024;

fn render_slurm(l: &Launch) -> Result<String, LaunchError> {
    let launch = &l.spec.launch;
    if l.spec_toml.len() > MAX_ENV_SPEC_BYTES {
        return Err(input(format!(
            "the effective job spec is {} bytes; the sbatch script passes it to the nodes \
             in an environment variable, which holds at most {MAX_ENV_SPEC_BYTES} bytes \
             (list fewer data files, e.g. larger shards)",
            l.spec_toml.len()
        )));
    }
    let job = &l.job_id;
    let mut sbatch = vec![
        format!("--job-name={}", sbatch_value("--job-id", job)?),
        format!("--nodes={}", l.nodes),
        "--ntasks-per-node=1".to_string(),
    ];
    if launch.gpus_per_node > 0 {
        sbatch.push(format!("--gpus-per-node={}", launch.gpus_per_node));
    }
    if let Some(cpus) = launch.cpus_per_node {
        sbatch.push(format!("--cpus-per-task={cpus}"));
    }
    if let Some(gb) = launch.memory_gb {
        sbatch.push(format!("--mem={gb}G"));
    }
    if let Some(partition) = &launch.partition {
        sbatch.push(format!(
            "--partition={}",
            sbatch_value("launch.partition", partition)?
        ));
    }
    if let Some(account) = &launch.account {
        sbatch.push(format!(
            "--account={}",
            sbatch_value("launch.account", account)?
        ));
    }
    if let Some(secs) = l.time_limit_secs {
        sbatch.push(format!("--time={}", slurm_time(secs)));
    }
    sbatch.push("--requeue".to_string());
    sbatch.push("--open-mode=append".to_string());
    sbatch.push(format!("--output=kiln-{job}-%j.out"));
    // Elastic: when the job can train on fewer nodes than it allocates, a lost
    // node should not end the allocation; the survivors carry on. Otherwise
    // Slurm requeues the whole job (--requeue) and it resumes from its latest
    // checkpoint.
    let elastic = l.spec.elastic.min_nodes < l.nodes;
    if elastic {
        sbatch.push("--no-kill".to_string());
    }

    let mut srun = vec![
        "srun".to_string(),
        "--export=ALL".to_string(),
        "--nodes=\"$SLURM_JOB_NUM_NODES\"".to_string(),
        "--ntasks-per-node=1".to_string(),
    ];
    if let Some(cpus) = launch.cpus_per_node {
        // srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05).
        srun.push(format!("--cpus-per-task={cpus}"));
    }
    if launch.gpus_per_node > 0 {
        srun.push(format!("--gpus-per-node={}", launch.gpus_per_node));
    }
    // One agent exiting (a failed node) must not take the others down, and
    // the others must be allowed to finish: the rendezvous handles the loss.
    srun.push("--kill-on-bad-exit=0".to_string());
    srun.push("--wait=0".to_string());
    if elastic {
        // Without it the step ends when one of its nodes fails.
        srun.push("--no-kill".to_string());
    }
    let agent = [
        shell_quote(&launch.kiln_bin),
        "agent".to_string(),
        "--store".to_string(),
        shell_quote(&l.store),
        "--job".to_string(),
        shell_quote(job),
        "--nproc".to_string(),
        l.nproc.to_string(),
    ];

    let mut s = String::new();
    let w = &mut s;
    // Writing to a String cannot fail.
    let _ = writeln!(w, "#!/bin/bash");
    let _ = writeln!(w, "# Generated by `kiln launch slurm` from {:?}.", l.source);
    let _ = writeln!(
        w,
        "# Submit with `sbatch FILE`; see docs/launch.md. Every node runs one kiln agent;"
    );
    let _ = writeln!(w, "# the agents meet in etcd ({}) as job {job:?}.", l.store);
    for option in &sbatch {
        let _ = writeln!(w, "#SBATCH {option}");
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "set -euo pipefail");
    let _ = writeln!(
        w,
        ": \"${{SLURM_JOB_ID:?this script runs under Slurm: submit it with sbatch}}\""
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "# Requeue-friendly: the kiln job id is fixed in this script, so a requeued run\n\
         # (node failure, preemption, `scontrol requeue`) rejoins the same job in etcd and\n\
         # resumes from its latest checkpoint; the log is appended to (--open-mode=append)."
    );
    if elastic {
        let _ = writeln!(
            w,
            "# Elastic: elastic.min_nodes = {} of {} nodes, so a lost node does not end the\n\
             # allocation (--no-kill); the remaining agents continue in a new round.",
            l.spec.elastic.min_nodes, l.nodes
        );
    }
    let _ = writeln!(
        w,
        "echo \"kiln: job {job}, slurm job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, \
         nodes $SLURM_JOB_NUM_NODES\" >&2"
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "# The effective job spec; each task writes it to a private node-local folder."
    );
    let _ = writeln!(w, "export KILN_SPEC_TOML={}", shell_quote(&l.spec_toml));
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "# One task per node; its --node is evaluated on that node (the single quotes\n\
         # keep this shell from expanding it)."
    );
    let _ = writeln!(w, "{} \\", srun.join(" "));
    let _ = writeln!(w, "  bash -c {} kiln-task \\", shell_quote(SLURM_TASK));
    let _ = writeln!(w, "  {}", agent.join(" "));
    Ok(s)
}

// ---------------------------------------------------------------------------
// Kubernetes

/// Where the ConfigMap's spec is mounted in the agent pods.
const K8S_SPEC_DIR: &str = "/etc/kiln";
const K8S_SPEC_FILE: &str = "job.toml";
/// The agent's `--data-dir` in a pod: an `emptyDir`, so logs (and local
/// checkpoints) outlive a container restart and the image may be read-only.
const K8S_DATA_DIR: &str = "/var/lib/kiln";
/// The agent's Prometheus endpoint in a pod (its own network namespace, so a
/// fixed port cannot collide).
const K8S_METRICS_PORT: u16 = 9400;

/// A DNS-1123 label from a job id: lower case, `-` for anything else, at most
/// 47 characters so that `NAME-spec` and the pods' hostnames `NAME-INDEX` fit
/// in 63.
fn k8s_name(job_id: &str) -> Result<String, LaunchError> {
    let mut name = String::new();
    for c in job_id.chars() {
        let c = if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '-'
        };
        if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
            name.push(c);
        }
    }
    name.truncate(47);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        return Err(input(format!(
            "--job-id: {job_id:?} has no letter or digit to name Kubernetes objects with"
        )));
    }
    Ok(name)
}

fn check_dns_label(field: &str, value: &str) -> Result<(), LaunchError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(input(format!(
            "{field}: {value:?} is not a Kubernetes name; use 1 to 63 lower-case letters, \
             digits and '-', starting and ending with a letter or digit"
        )))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigMap {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    data: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Service {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    spec: ServiceSpec,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: &'static str,
    selector: BTreeMap<String, String>,
    /// DNS names exist from pod start, before any readiness.
    publish_not_ready_addresses: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Job {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    spec: JobSpecK8s,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobSpecK8s {
    completion_mode: &'static str,
    completions: usize,
    parallelism: usize,
    backoff_limit: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    active_deadline_seconds: Option<u64>,
    template: PodTemplate,
}

#[derive(Serialize)]
struct PodTemplate {
    metadata: PodMeta,
    spec: PodSpec,
}

#[derive(Serialize)]
struct PodMeta {
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    restart_policy: &'static str,
    subdomain: String,
    containers: Vec<Container>,
    volumes: Vec<Volume>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: &'static str,
    image: String,
    command: Vec<String>,
    args: Vec<String>,
    ports: Vec<ContainerPort>,
    env: Vec<EnvVar>,
    resources: Resources,
    volume_mounts: Vec<VolumeMount>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: &'static str,
    container_port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: &'static str,
    value_from: EnvVarSource,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvVarSource {
    field_ref: FieldRef,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: &'static str,
}

#[derive(Serialize)]
struct Resources {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    requests: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    limits: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: &'static str,
    mount_path: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_only: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    config_map: Option<ConfigMapVolume>,
    #[serde(skip_serializing_if = "Option::is_none")]
    empty_dir: Option<EmptyDir>,
}

#[derive(Serialize)]
struct ConfigMapVolume {
    name: String,
    items: Vec<KeyToPath>,
}

#[derive(Serialize)]
struct KeyToPath {
    key: &'static str,
    path: &'static str,
}

#[derive(Serialize)]
struct EmptyDir {
    #[serde(skip_serializing_if = "Option::is_none")]
    medium: Option<&'static str>,
}

/// Kubernetes refuses a ConfigMap over 1 MiB; a little is kept for metadata.
const MAX_CONFIG_MAP_BYTES: usize = 1000 * 1024;

/// The environment variable the pods' `--node` is built from.
const NODE_INDEX_ENV: &str = "KILN_NODE_INDEX";

fn render_k8s(l: &Launch) -> Result<String, LaunchError> {
    let launch = &l.spec.launch;
    let image = match launch.image.as_deref() {
        Some(image) if !image.is_empty() && !image.chars().any(char::is_whitespace) => image,
        Some(image) => {
            return Err(input(format!(
                "launch.image: {image:?} is not a container image reference"
            )));
        }
        None => {
            return Err(input(
                "no container image: set launch.image in the spec or pass --image \
                 (an image with kiln on its PATH, or at launch.kiln_bin)",
            ));
        }
    };
    let namespace = &launch.namespace;
    check_dns_label("launch.namespace", namespace)?;
    if l.spec_toml.len() > MAX_CONFIG_MAP_BYTES {
        return Err(input(format!(
            "the effective job spec is {} bytes; a ConfigMap holds at most \
             {MAX_CONFIG_MAP_BYTES} (list fewer data files, e.g. larger shards)",
            l.spec_toml.len()
        )));
    }
    let name = k8s_name(&l.job_id)?;
    let labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/name", "kiln"),
        ("app.kubernetes.io/instance", name.as_str()),
        ("app.kubernetes.io/component", "agent"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let meta = |name: String| ObjectMeta {
        name,
        namespace: namespace.clone(),
        labels: labels.clone(),
    };
    let selector: BTreeMap<String, String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != "app.kubernetes.io/component")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    let config_map_name = format!("{name}-spec");
    let config_map = ConfigMap {
        api_version: "v1",
        kind: "ConfigMap",
        metadata: meta(config_map_name.clone()),
        data: [(K8S_SPEC_FILE.to_string(), l.spec_toml.clone())].into(),
    };
    let service = Service {
        api_version: "v1",
        kind: "Service",
        metadata: meta(name.clone()),
        spec: ServiceSpec {
            cluster_ip: "None",
            selector,
            publish_not_ready_addresses: true,
        },
    };

    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpus) = launch.cpus_per_node {
        requests.insert("cpu", cpus.to_string());
    }
    if let Some(gb) = launch.memory_gb {
        requests.insert("memory", format!("{gb}Gi"));
        limits.insert("memory", format!("{gb}Gi"));
    }
    let gpus = launch.gpus_per_node;
    if gpus > 0 {
        // An extended resource: requests must equal limits.
        requests.insert("nvidia.com/gpu", gpus.to_string());
        limits.insert("nvidia.com/gpu", gpus.to_string());
    }
    let mut volume_mounts = vec![
        VolumeMount {
            name: "spec",
            mount_path: K8S_SPEC_DIR,
            read_only: Some(true),
        },
        VolumeMount {
            name: "data",
            mount_path: K8S_DATA_DIR,
            read_only: None,
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "spec",
            config_map: Some(ConfigMapVolume {
                name: config_map_name,
                items: vec![KeyToPath {
                    key: K8S_SPEC_FILE,
                    path: K8S_SPEC_FILE,
                }],
            }),
            empty_dir: None,
        },
        Volume {
            name: "data",
            config_map: None,
            empty_dir: Some(EmptyDir { medium: None }),
        },
    ];
    if gpus > 0 {
        // NCCL's shared-memory transport outgrows a container's 64 MiB /dev/shm.
        volume_mounts.push(VolumeMount {
            name: "dshm",
            mount_path: "/dev/shm",
            read_only: None,
        });
        volumes.push(Volume {
            name: "dshm",
            config_map: None,
            empty_dir: Some(EmptyDir {
                medium: Some("Memory"),
            }),
        });
    }
    let args = vec![
        "agent".to_string(),
        "--store".to_string(),
        l.store.clone(),
        "--job".to_string(),
        l.job_id.clone(),
        "--spec".to_string(),
        format!("{K8S_SPEC_DIR}/{K8S_SPEC_FILE}"),
        "--nproc".to_string(),
        l.nproc.to_string(),
        "--node".to_string(),
        // Kubernetes expands $(VAR) in args from the container's environment.
        format!("node-$({NODE_INDEX_ENV})"),
        "--data-dir".to_string(),
        K8S_DATA_DIR.to_string(),
        "--metrics-addr".to_string(),
        format!("0.0.0.0:{K8S_METRICS_PORT}"),
    ];
    let job = Job {
        api_version: "batch/v1",
        kind: "Job",
        metadata: meta(name.clone()),
        spec: JobSpecK8s {
            completion_mode: "Indexed",
            completions: l.nodes,
            parallelism: l.nodes,
            // Pod restarts the job survives; the same budget as the runtime's.
            backoff_limit: l.spec.elastic.max_failures,
            active_deadline_seconds: l.time_limit_secs,
            template: PodTemplate {
                metadata: PodMeta {
                    labels: labels.clone(),
                },
                spec: PodSpec {
                    // A failed agent restarts in place, keeps its index (its
                    // node identity) and rejoins the job.
                    restart_policy: "OnFailure",
                    subdomain: name.clone(),
                    containers: vec![Container {
                        name: "agent",
                        image: image.to_string(),
                        command: vec![launch.kiln_bin.clone()],
                        args,
                        ports: vec![ContainerPort {
                            name: "metrics",
                            container_port: K8S_METRICS_PORT,
                        }],
                        env: vec![EnvVar {
                            name: NODE_INDEX_ENV,
                            value_from: EnvVarSource {
                                field_ref: FieldRef {
                                    field_path: "metadata.annotations['batch.kubernetes.io/job-completion-index']",
                                },
                            },
                        }],
                        resources: Resources { requests, limits },
                        volume_mounts,
                    }],
                    volumes,
                },
            },
        },
    };

    let header = format!(
        "# Generated by `kiln launch k8s` from {:?}.\n\
         # Apply with `kubectl apply -f FILE`; see docs/launch.md. Pod i of the Job runs\n\
         # `kiln agent --node node-i`; the agents meet in etcd ({}) as job {:?}.\n",
        l.source, l.store, l.job_id
    );
    let docs = [
        serde_yaml_ng::to_string(&config_map),
        serde_yaml_ng::to_string(&service),
        serde_yaml_ng::to_string(&job),
    ];
    let mut out = header;
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&doc.context("write Kubernetes manifest as YAML")?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_safe_words_and_quotes_the_rest() {
        assert_eq!(
            shell_quote("etcd://10.0.0.1:2379,h:2"),
            "etcd://10.0.0.1:2379,h:2"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's $HOME"), r"'it'\''s $HOME'");
    }

    #[test]
    fn slurm_time_uses_days_past_24_hours() {
        assert_eq!(slurm_time(90), "00:01:30");
        assert_eq!(slurm_time(12 * 3600), "12:00:00");
        assert_eq!(slurm_time(50 * 3600 + 61), "2-02:01:01");
    }

    #[test]
    fn k8s_names_are_dns_labels() {
        assert_eq!(k8s_name("Digits_CNN.v2").ok(), Some("digits-cnn-v2".into()));
        assert_eq!(k8s_name("-a--b-").ok(), Some("a-b".into()));
        assert!(k8s_name("___").is_err());
        let long = k8s_name(&"x".repeat(64)).ok().unwrap_or_default();
        assert_eq!(long.len(), 47);
    }
}

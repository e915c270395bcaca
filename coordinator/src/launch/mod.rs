//! Launch backends: the files that start a job on a cluster (`kiln launch
//! slurm|k8s`).
//!
//! Both backends start one `kiln agent` per node; the agents meet in etcd
//! (`launch.store`), elect a rendezvous leader and train. What the backends add
//! is how a node learns its identity and where the spec comes from:
//!
//! - [`slurm`]: an `sbatch` script. `srun` starts one task per node; each task
//!   writes the spec (embedded in the script) to a node-local file and runs the
//!   agent with `--node` from `SLURMD_NODENAME` (`node-$SLURM_NODEID` when unset).
//! - [`k8s`]: a ConfigMap holding the spec, a headless Service and an indexed
//!   `batch/v1` Job whose pod `i` runs the agent as `--node node-i`.
//!
//! The embedded spec is the *effective* one: the file with `--set` overrides
//! applied and relative paths made absolute, so what runs is what was checked
//! here. The kiln job id is written into the files, so a requeued Slurm job or a
//! restarted pod rejoins the same job in etcd and resumes from its latest
//! checkpoint. [`prepare`] checks the request once for both backends;
//! [`render`] writes a backend's file. No I/O beyond reading the spec file.
//! docs/launch.md is the user guide.

pub mod k8s;
pub mod slurm;

use std::path::{Path, PathBuf};

use kiln_proto::spec::{JobSpec, parse_time_limit, validate_store_url};

/// What to launch: the spec file and the command line's overrides.
#[derive(Debug, Clone, Default)]
pub struct LaunchRequest {
    /// The job spec (TOML).
    pub job: PathBuf,
    /// Spec overrides, `KEY=VALUE`.
    pub set: Vec<String>,
    /// The store the agents join through (overrides `launch.store`).
    pub store: Option<String>,
    /// Nodes to allocate (overrides `launch.nodes`).
    pub nodes: Option<u32>,
    /// The kiln job id the agents join (default: `job.name`).
    pub job_id: Option<String>,
    /// Container image holding kiln (overrides `launch.image`; Kubernetes).
    pub image: Option<String>,
}

/// The two launch backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An `sbatch` script.
    Slurm,
    /// Kubernetes manifests.
    K8s,
}

/// Why a launch file was not written.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The spec or the request is wrong: the message says which field and
    /// how to fix it (the CLI exits with code 2, like a bad spec for `kiln run`).
    #[error("{0}")]
    Invalid(String),
    /// Anything else (the spec file's path could not be resolved, the
    /// effective spec did not serialize).
    #[error("{0}")]
    Internal(String),
}

fn input(message: impl Into<String>) -> LaunchError {
    LaunchError::Invalid(message.into())
}

fn internal(message: impl Into<String>) -> LaunchError {
    LaunchError::Internal(message.into())
}

/// The file `backend` writes for the checked launch `l`.
pub fn render(backend: Backend, l: &Launch) -> Result<String, LaunchError> {
    match backend {
        Backend::Slurm => slurm::render(l),
        Backend::K8s => k8s::render(l),
    }
}

/// Everything a backend writes, checked.
pub struct Launch {
    /// The effective spec; its `launch` section holds the command-line values.
    pub spec: JobSpec,
    /// `spec` as TOML: what the agents read.
    pub spec_toml: String,
    /// Absolute path of the spec file, for the generated file's header.
    pub source: PathBuf,
    /// The job's id in the store (`--job-id`, default the spec's job name).
    pub job_id: String,
    /// The store URL every agent connects to (`etcd://` or `etcds://`; never
    /// `mem://`).
    pub store: String,
    /// Nodes to allocate, at least `elastic.min_nodes`.
    pub nodes: usize,
    /// Workers per node (`--nproc` of every agent).
    pub nproc: usize,
    /// Wall-clock limit in seconds.
    pub time_limit_secs: Option<u64>,
}

/// Loads the spec, applies the command line and checks what both backends need.
pub fn prepare(args: &LaunchRequest, mut warn: impl FnMut(&str)) -> Result<Launch, LaunchError> {
    let mut spec =
        JobSpec::load(&args.job, &args.set).map_err(|e| input(format!("invalid job spec: {e}")))?;
    let source = std::path::absolute(&args.job)
        .map_err(|e| internal(format!("resolve {}: {e}", args.job.display())))?;

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
    if let Some(image) = &args.image {
        spec.launch.image = Some(image.clone());
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
    check_world_sizes(&spec, nodes, nproc, &mut warn)?;

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
        warn(
            "checkpoint.url is not set, so every node checkpoints under its own \
             --data-dir; a restarted or requeued job resumes only if that folder is shared \
             (set checkpoint.url to s3://, gs://, az:// or a shared file:// path)",
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
fn check_world_sizes(
    spec: &JobSpec,
    nodes: usize,
    nproc: usize,
    warn: &mut impl FnMut(&str),
) -> Result<(), LaunchError> {
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
        warn(&format!(
            "train.global_batch = {} does not split evenly at {}; the job fails if it \
             shrinks to that size",
            spec.train.global_batch,
            uneven.join(", ")
        ));
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
    let body = toml::to_string(spec)
        .map_err(|e| internal(format!("write the effective job spec as TOML: {e}")))?;
    let base = source.parent().unwrap_or(Path::new("/"));
    match JobSpec::from_toml_str(&body, base, &[]) {
        Ok(back) if back == *spec => {}
        Ok(_) => {
            return Err(internal(
                "the effective job spec does not read back as the same spec",
            ));
        }
        Err(e) => {
            return Err(internal(format!(
                "the effective job spec does not read back: {e}"
            )));
        }
    }
    Ok(format!(
        "# Effective job spec written by `kiln launch` from {source:?}\n\
         # (--set overrides applied, paths absolute).\n{body}"
    ))
}

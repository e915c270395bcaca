//! `kiln launch slurm|k8s`: the command line of the launch backends
//! (`kiln_coordinator::launch`): reads the arguments, prints the warnings,
//! writes the file (or says which input is wrong). docs/launch.md is the user
//! guide.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use kiln_coordinator::launch::{self, Backend, LaunchError, LaunchRequest};

use crate::CliError;

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

impl LaunchArgs {
    fn request(&self, image: Option<String>) -> LaunchRequest {
        LaunchRequest {
            job: self.job.clone(),
            set: self.set.clone(),
            store: self.store.clone(),
            nodes: self.nodes,
            job_id: self.job_id.clone(),
            image,
        }
    }
}

/// Runs `kiln launch`: writes the file, or says which input is wrong.
pub fn run(cmd: LaunchCommand) -> Result<ExitCode, CliError> {
    let (request, output, backend) = match cmd {
        LaunchCommand::Slurm(args) => (args.request(None), args.output, Backend::Slurm),
        LaunchCommand::K8s(args) => (
            args.common.request(args.image),
            args.common.output,
            Backend::K8s,
        ),
    };
    let warn = |warning: &str| eprintln!("warning: {warning}");
    match launch::prepare(&request, warn).and_then(|l| launch::render(backend, &l)) {
        Ok(text) => {
            write_output(&text, output.as_deref(), backend)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(LaunchError::Invalid(message)) => Err(CliError::Invalid(message)),
        Err(e @ LaunchError::Internal(_)) => Err(CliError::Failed(e.into())),
    }
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

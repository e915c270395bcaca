//! `kiln`: the command-line interface. Argument parsing and wiring only; the
//! parts live in the workspace crates (see docs/sourcetree.md).

mod agent;
mod ckpt;
mod coordinator;
mod data;
mod generate;
mod jobs;
mod launch;
mod logs;
mod output;
mod registry;
mod run;
mod serve;
mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Distributed training runtime and checkpoint system"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job on this machine: embedded store, rendezvous leader and agent in
    /// one process, N local worker processes.
    Run(RunArgs),
    /// One node of a multi-node job: joins the job's rendezvous over etcd,
    /// runs this node's workers, survives the loss of other nodes.
    Agent(agent::AgentArgs),
    /// Checkpoints: ls, show, verify, export, gc.
    #[command(subcommand)]
    Ckpt(ckpt::CkptCommand),
    /// Language-model data: prepare (text files to token files and a tokenizer).
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Continue a prompt with a trained language model (a gpt's weights).
    Generate(generate::GenerateArgs),
    /// Model registry: ls, show, register, promote, rollback, history.
    Registry(registry::RegistryArgs),
    /// Serve the job API (gRPC) over a store; run several replicas against one
    /// etcd. With --launch local, the elected replica starts submitted jobs' agents.
    Coordinator(coordinator::CoordinatorArgs),
    /// Submit a job spec to a coordinator.
    Submit(jobs::SubmitArgs),
    /// A job's status (--watch to follow it), or a table of every job.
    Status(jobs::StatusArgs),
    /// Cancel a job.
    Cancel(jobs::CancelArgs),
    /// List the coordinator's jobs.
    Jobs(jobs::JobsArgs),
    /// Write launch files: an sbatch script (slurm) or Kubernetes manifests (k8s)
    /// that start one `kiln agent` per node.
    #[command(subcommand)]
    Launch(launch::LaunchCommand),
    /// A job's worker logs, per node and rank: from a data folder (`kiln run`,
    /// one node) or from the store (every node of a multi-node job).
    Logs(logs::LogsArgs),
    /// Serve registry models over the Open Inference Protocol (REST + gRPC on
    /// one port): dynamic batching, hot swap on alias moves, canaries, metrics.
    Serve(serve::ServeArgs),
    /// The web dashboard: jobs with live curves, checkpoints, the registry,
    /// serving metrics (docs/ui.md).
    Ui(ui::UiArgs),
    /// One training rank; started by an agent, not by users.
    #[command(hide = true)]
    Worker {
        /// The inherited descriptor of this worker's end of its agent's socket pair.
        #[arg(long)]
        agent_fd: i32,
        #[arg(long)]
        local_rank: u32,
    },
}

/// Arguments of `kiln run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The job spec (TOML).
    pub job: PathBuf,
    /// Worker processes (sets workers.nproc).
    #[arg(long)]
    pub nproc: Option<usize>,
    /// Override a spec field, e.g. --set train.steps=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where the run writes logs, weights, checkpoints (unless checkpoint.url
    /// is set) and the registry (unless register.registry is set).
    #[arg(long, default_value = "kiln-data")]
    pub data_dir: PathBuf,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Continue from a checkpoint: `latest` (the newest that verifies), a step,
    /// or a checkpoint URL.
    #[arg(long, value_name = "latest|STEP|URL")]
    pub resume: Option<String>,
    /// Address of the agent's Prometheus endpoint (/metrics); port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_addr: SocketAddr,
    /// Serve the dashboard (docs/ui.md) on this address while the job runs;
    /// port 0 picks one (the URL is printed). Actions need $KILN_UI_TOKEN.
    #[arg(long, value_name = "ADDR")]
    pub ui: Option<SocketAddr>,
    /// Keep the dashboard up this many seconds after the job ends (Ctrl-C
    /// stops it sooner). `kiln ui` shows finished runs from their run folders.
    #[arg(long, value_name = "SECS", default_value_t = 0, requires = "ui")]
    pub ui_linger: u64,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// A multi-threaded runtime for the async commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start async runtime")
}

/// Why a command failed, and so its exit code: wrong input exits with 2,
/// anything else with 1. Commands return it (or an `anyhow::Error`, which is
/// [`CliError::Failed`]); [`report`] prints it.
#[derive(Debug)]
pub enum CliError {
    /// The job spec is invalid (`error: invalid job spec: ...`, exit code 2).
    InvalidSpec(String),
    /// Other wrong input, the message naming what to fix (`error: ...`, exit
    /// code 2): a launch request.
    Invalid(String),
    /// Anything else, printed with its chain (exit code 1).
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Failed(e)
    }
}

/// Runs an async command on [`runtime`] and turns its result into an exit code.
fn block_on<F, E>(command: F) -> ExitCode
where
    F: std::future::Future<Output = Result<ExitCode, E>>,
    E: Into<CliError>,
{
    match runtime() {
        Ok(rt) => report(rt.block_on(command).map_err(Into::into)),
        Err(e) => report(Err(e.into())),
    }
}

/// The exit code of a command's result; errors are printed, with their chain.
fn report(result: Result<ExitCode, CliError>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(CliError::InvalidSpec(message)) => {
            eprintln!("error: invalid job spec: {message}");
            ExitCode::from(2)
        }
        Err(CliError::Invalid(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(CliError::Failed(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Run(args) => block_on(async { run::run(args).await.map(|()| ExitCode::SUCCESS) }),
        Command::Agent(args) => block_on(agent::run(args)),
        Command::Ckpt(cmd) => report(ckpt::run(cmd).map_err(Into::into)),
        Command::Data(cmd) => report(data::run(cmd).map_err(Into::into)),
        Command::Generate(args) => report(generate::run(args).map_err(Into::into)),
        Command::Registry(args) => block_on(registry::run(args)),
        Command::Coordinator(args) => block_on(coordinator::run(args)),
        Command::Submit(args) => block_on(jobs::submit(args)),
        Command::Status(args) => block_on(jobs::status(args)),
        Command::Cancel(args) => block_on(jobs::cancel(args)),
        Command::Jobs(args) => block_on(jobs::jobs(args)),
        Command::Launch(cmd) => report(launch::run(cmd)),
        Command::Logs(args) => block_on(logs::run(args)),
        Command::Ui(args) => block_on(ui::run(args)),
        Command::Serve(args) => {
            if std::env::var_os("OMP_WAIT_POLICY").is_none() {
                // SAFETY: no other thread exists yet (the async runtime starts
                // in block_on below), so nothing reads the environment concurrently.
                // Idle OpenMP threads then sleep instead of spinning between batches.
                unsafe { std::env::set_var("OMP_WAIT_POLICY", "PASSIVE") };
            }
            block_on(serve::run(args))
        }
        Command::Worker {
            agent_fd,
            local_rank,
        } => {
            let args = kiln_trainer::worker::WorkerArgs {
                agent_fd,
                local_rank,
            };
            report(
                kiln_trainer::worker::run(&args)
                    .map(|()| ExitCode::SUCCESS)
                    .map_err(|e| CliError::Failed(e.into())),
            )
        }
    }
}

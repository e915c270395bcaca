//! The job API's client commands: `kiln submit`, `kiln status`, `kiln cancel`
//! and `kiln jobs`, talking gRPC to `kiln coordinator`. Human tables by
//! default, `--json` for scripts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_proto::job::v1::job_service_client::JobServiceClient;
use kiln_proto::job::{AUTHORIZATION, ServiceError, v1};
use serde_json::{Value, json};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::output::{or_dash, table};

/// Environment variable holding the bearer token (client and coordinator).
pub const TOKEN_ENV: &str = "KILN_COORDINATOR_TOKEN";

/// How to reach the coordinator; shared by every client command.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The coordinator's job API, http://HOST:PORT or https://HOST:PORT
    /// (default: the KILN_COORDINATOR environment variable, else
    /// http://127.0.0.1:7070).
    #[arg(long, value_name = "URL")]
    pub coordinator: Option<String>,
    /// File holding the bearer token (default: the KILN_COORDINATOR_TOKEN
    /// environment variable).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed an https:// coordinator's
    /// certificate (default: the KILN_COORDINATOR_CA environment variable).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// Environment variable naming the CA file of an https:// coordinator.
pub const CA_ENV: &str = "KILN_COORDINATOR_CA";

/// Arguments of `kiln submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The job spec (TOML).
    pub spec: PathBuf,
    /// Override a spec field, e.g. --set train.steps=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The job id (default: the spec's job.name); it must be new.
    #[arg(long)]
    pub job_id: Option<String>,
    /// Print the accepted job as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Arguments of `kiln status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The job; without it, a table of every job.
    pub job: Option<String>,
    /// Follow the job until it is over: a line per change. Exits 0 when it
    /// succeeded, 1 when it failed or was cancelled.
    #[arg(long, requires = "job")]
    pub watch: bool,
    /// JSON instead of a table (with --watch: one object per line).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Arguments of `kiln cancel`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The job.
    pub job: String,
    /// Why, for the job's record.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Print the job's status as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Arguments of `kiln jobs`.
#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    /// One JSON object: {"jobs": [...]}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The job API's bearer token: the file's content when a file is given,
/// else $KILN_COORDINATOR_TOKEN, else none.
pub fn read_token(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    token_from(file, TOKEN_ENV)
}

/// A bearer token: the file's content when a file is given, else the
/// environment variable `env`, else none.
pub fn token_from(file: Option<&Path>, env: &str) -> anyhow::Result<Option<String>> {
    if let Some(path) = file {
        return kiln_coordinator::api::read_token_file(path)
            .map(Some)
            .map_err(anyhow::Error::msg);
    }
    match std::env::var(env) {
        Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
        _ => Ok(None),
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

type Client = JobServiceClient<InterceptedService<Channel, BearerToken>>;

/// Environment variable naming the coordinator when --coordinator is not given.
pub const COORDINATOR_ENV: &str = "KILN_COORDINATOR";

/// Where the job API is when nothing says otherwise.
const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let url = match &args.coordinator {
        Some(url) => url.clone(),
        None => std::env::var(COORDINATOR_ENV)
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string()),
    };
    let url = &url;
    let tls = if url.starts_with("https://") {
        let ca = match &args.ca_file {
            Some(path) => path.clone(),
            None => match std::env::var_os(CA_ENV).filter(|v| !v.is_empty()) {
                Some(path) => PathBuf::from(path),
                None => bail!(
                    "--coordinator {url:?} is https://: give the CA certificate that signed its \
                     certificate with --ca-file (or {CA_ENV})"
                ),
            },
        };
        let pem = std::fs::read(&ca)
            .with_context(|| format!("read the CA certificate {}", ca.display()))?;
        Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
    } else if url.starts_with("http://") {
        None
    } else {
        bail!("--coordinator {url:?}: expected http://HOST:PORT or https://HOST:PORT");
    };
    let token = read_token(args.token_file.as_deref())?;
    let header = match token {
        None => None,
        Some(token) => Some(
            format!("Bearer {token}")
                .parse::<MetadataValue<Ascii>>()
                .context("the token must be printable ASCII")?,
        ),
    };
    let mut endpoint = Channel::from_shared(url.clone())
        .with_context(|| format!("--coordinator {url:?} is not a URL"))?
        .connect_timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .with_context(|| format!("TLS settings for {url}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connect to the coordinator at {url}"))?;
    Ok(JobServiceClient::with_interceptor(
        channel,
        BearerToken(header),
    ))
}

/// A failed call as a readable error: `submit job: invalid argument: ...`.
fn call_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", ServiceError::from(status))
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("read job spec {}", args.spec.display()))?;
    // Relative paths in the spec are relative to its file, as for `kiln run`.
    let base_dir = match args.spec.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base_dir = base_dir
        .canonicalize()
        .with_context(|| format!("resolve {}", base_dir.display()))?;
    let mut client = connect(&args.client).await?;
    let response = client
        .submit(v1::SubmitRequest {
            spec_toml: text,
            overrides: args.set,
            job_id: args.job_id.unwrap_or_default(),
            base_dir: base_dir.display().to_string(),
        })
        .await
        .map_err(|status| call_error("submit job", status))?
        .into_inner();
    if args.json {
        let status = response.status.as_ref().map(status_json);
        println!("{}", json!({ "job": response.job, "status": status }));
    } else {
        println!("submitted job {}", response.job);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    let Some(job) = args.job else {
        return list(&mut client, args.json).await;
    };
    if !args.watch {
        let status = client
            .get(v1::GetRequest { job: job.clone() })
            .await
            .map_err(|status| call_error(&format!("get job {job}"), status))?
            .into_inner();
        if args.json {
            println!("{}", status_json(&status));
        } else {
            print!("{}", status_text(&status));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = client
        .watch(v1::WatchRequest { job: job.clone() })
        .await
        .map_err(|status| call_error(&format!("watch job {job}"), status))?
        .into_inner();
    let mut last: Option<v1::JobStatus> = None;
    while let Some(status) = stream
        .message()
        .await
        .map_err(|status| call_error(&format!("watch job {job}"), status))?
    {
        if args.json {
            println!("{}", status_json(&status));
        } else {
            for event in new_events(last.as_ref(), &status) {
                println!("{}", event_line(event));
            }
            println!("{}", watch_line(&status));
        }
        last = Some(status);
    }
    match last {
        Some(status) if status.phase() == v1::Phase::Succeeded => Ok(ExitCode::SUCCESS),
        Some(status) if status.phase().is_terminal() => Ok(ExitCode::FAILURE),
        _ => bail!("the watch of job {job} ended before the job did"),
    }
}

pub async fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    let response = client
        .cancel(v1::CancelRequest {
            job: args.job.clone(),
            reason: args.reason,
        })
        .await
        .map_err(|status| call_error(&format!("cancel job {}", args.job), status))?
        .into_inner();
    let status = response.status.unwrap_or_default();
    if args.json {
        println!(
            "{}",
            json!({ "requested": response.requested, "status": status_json(&status) })
        );
    } else if status.phase() == v1::Phase::Cancelled {
        println!("job {} is cancelled", args.job);
    } else if response.requested {
        println!(
            "cancel of job {} requested; its agents stop it ({} now)",
            args.job,
            status.phase().label()
        );
    } else {
        println!(
            "cancel of job {} was already requested ({} now)",
            args.job,
            status.phase().label()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    list(&mut client, args.json).await
}

async fn list(client: &mut Client, json: bool) -> anyhow::Result<ExitCode> {
    let jobs = client
        .list(v1::ListRequest {})
        .await
        .map_err(|status| call_error("list jobs", status))?
        .into_inner()
        .jobs;
    if json {
        let jobs: Vec<Value> = jobs.iter().map(summary_json).collect();
        println!("{}", json!({ "jobs": jobs }));
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        [
            "JOB",
            "PHASE",
            "STEP",
            "WORLD",
            "ROUND",
            "LOSS",
            "SUBMITTED",
            "MESSAGE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for job in &jobs {
        rows.push(vec![
            job.job.clone(),
            job.phase().label().to_string(),
            format!("{}/{}", job.step, job.total_steps),
            job.world_size.to_string(),
            job.round.to_string(),
            job.loss.map_or("-".to_string(), |l| format!("{l:.4}")),
            or_dash(&job.submitted_at).to_string(),
            job.message.clone(),
        ]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// Events shown in a status: the newest this many.
const SHOWN_EVENTS: usize = 10;

fn status_text(s: &v1::JobStatus) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |k: &str, v: String| rows.push(vec![k.to_string(), v]);
    row("job", s.job.clone());
    row("phase", s.phase().label().to_string());
    row(
        "round",
        format!("{} (world size {})", s.round, s.world_size),
    );
    row(
        "step",
        match s.loss {
            Some(loss) => format!("{}/{}  loss {loss:.4}", s.step, s.total_steps),
            None => format!("{}/{}", s.step, s.total_steps),
        },
    );
    row(
        "checkpoint",
        s.last_checkpoint
            .as_ref()
            .map_or("-".to_string(), |c| format!("{} (step {})", c.url, c.step)),
    );
    row("submitted", or_dash(&s.submitted_at).to_string());
    row("started", or_dash(&s.started_at).to_string());
    row("finished", or_dash(&s.finished_at).to_string());
    if !s.cancel_requested_at.is_empty() {
        row("cancel", format!("requested {}", s.cancel_requested_at));
    }
    if let Some(launch) = &s.launch {
        let agents: Vec<String> = launch
            .agents
            .iter()
            .map(|a| format!("{} pid {}", a.node, a.pid))
            .collect();
        row(
            "launch",
            format!(
                "{} by {} at {} ({})",
                launch.backend,
                launch.by,
                launch.at,
                agents.join(", ")
            ),
        );
    }
    if !s.message.is_empty() {
        row("message", s.message.clone());
    }
    let mut out = table(&rows);
    if !s.events.is_empty() {
        let skip = s.events.len().saturating_sub(SHOWN_EVENTS);
        out.push_str(&format!(
            "\nevents (last {} of {}):\n",
            s.events.len() - skip,
            s.events.len()
        ));
        let mut rows = vec![["AT", "KIND", "NODE", "DETAIL"].map(String::from).to_vec()];
        for e in &s.events[skip..] {
            rows.push(vec![
                e.at.clone(),
                e.kind.clone(),
                or_dash(&e.node).to_string(),
                e.detail.clone(),
            ]);
        }
        for line in table(&rows).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The events of `now` that `before` did not have (events only get appended;
/// the oldest fall off).
fn new_events<'a>(before: Option<&v1::JobStatus>, now: &'a v1::JobStatus) -> &'a [v1::NodeEvent] {
    let Some(before) = before else {
        return &now.events;
    };
    match before.events.last() {
        None => &now.events,
        Some(last) => match now.events.iter().rposition(|e| e == last) {
            Some(i) => &now.events[i + 1..],
            None => &now.events,
        },
    }
}

fn event_line(e: &v1::NodeEvent) -> String {
    let node = if e.node.is_empty() {
        String::new()
    } else {
        format!(" {}", e.node)
    };
    format!("{}  {}{node}  {}", e.at, e.kind, e.detail)
}

fn watch_line(s: &v1::JobStatus) -> String {
    let mut line = format!(
        "{}  {}  round {}  world {}  step {}/{}",
        or_dash(&s.updated_at),
        s.phase().label(),
        s.round,
        s.world_size,
        s.step,
        s.total_steps
    );
    if let Some(loss) = s.loss {
        line.push_str(&format!("  loss {loss:.4}"));
    }
    if !s.message.is_empty() {
        line.push_str(&format!("  {}", s.message));
    }
    line
}

fn status_json(s: &v1::JobStatus) -> Value {
    let opt = |t: &str| (!t.is_empty()).then(|| t.to_string());
    json!({
        "job": s.job,
        "phase": s.phase().label(),
        "round": s.round,
        "world_size": s.world_size,
        "step": s.step,
        "total_steps": s.total_steps,
        "loss": s.loss,
        "last_checkpoint": s.last_checkpoint.as_ref().map(|c| json!({"url": c.url, "step": c.step})),
        "submitted_at": opt(&s.submitted_at),
        "started_at": opt(&s.started_at),
        "finished_at": opt(&s.finished_at),
        "updated_at": opt(&s.updated_at),
        "cancel_requested_at": opt(&s.cancel_requested_at),
        "message": s.message,
        "events": s.events.iter().map(|e| json!({
            "at": e.at, "kind": e.kind, "node": e.node, "detail": e.detail,
        })).collect::<Vec<_>>(),
        "launch": s.launch.as_ref().map(|l| json!({
            "backend": l.backend,
            "by": l.by,
            "at": l.at,
            "agents": l.agents.iter().map(|a| json!({
                "node": a.node,
                "pid": (a.pid != 0).then_some(a.pid),
                "log": a.log,
            })).collect::<Vec<_>>(),
        })),
    })
}

fn summary_json(s: &v1::JobSummary) -> Value {
    let opt = |t: &str| (!t.is_empty()).then(|| t.to_string());
    json!({
        "job": s.job,
        "phase": s.phase().label(),
        "round": s.round,
        "world_size": s.world_size,
        "step": s.step,
        "total_steps": s.total_steps,
        "loss": s.loss,
        "submitted_at": opt(&s.submitted_at),
        "updated_at": opt(&s.updated_at),
        "message": s.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec![
                "JOB".to_string(),
                "PHASE".to_string(),
                "MESSAGE".to_string(),
            ],
            vec![
                "a-long-job".to_string(),
                "running".to_string(),
                String::new(),
            ],
            vec![
                "b".to_string(),
                "failed".to_string(),
                "worker 3 died".to_string(),
            ],
        ];
        assert_eq!(
            table(&rows),
            "JOB         PHASE    MESSAGE\na-long-job  running\nb           failed   worker 3 died\n"
        );
    }

    #[test]
    fn only_new_events_are_printed_while_watching() {
        let event = |d: &str| v1::NodeEvent {
            at: "t".into(),
            kind: "round".into(),
            node: String::new(),
            detail: d.into(),
        };
        let before = v1::JobStatus {
            events: vec![event("1"), event("2")],
            ..Default::default()
        };
        let now = v1::JobStatus {
            events: vec![event("2"), event("3"), event("4")],
            ..Default::default()
        };
        let details: Vec<&str> = new_events(Some(&before), &now)
            .iter()
            .map(|e| e.detail.as_str())
            .collect();
        assert_eq!(details, ["3", "4"]);
        assert_eq!(new_events(None, &now).len(), 3);
        assert!(new_events(Some(&now), &now).is_empty());
    }
}

//! The agent: one per node. Spawns one `kiln worker` process per device, learns
//! their collective listener addresses (for the rendezvous plan), hands each its
//! assignment, relays their reports, feeds the metrics, and, when one worker
//! fails, stops the others and reports the first failure: never a hang.
//!
//! The agent does not know the store: whoever drives it (the CLI's `kiln run`,
//! later `kiln agent`) joins the rendezvous with [`LocalWorkers::endpoints`] and
//! passes the resulting plan to [`LocalWorkers::run`].

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr as UnixAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_proto::frame;
use kiln_proto::worker::{
    AgentMessage, Assignment, CheckpointSaved, EvalResult, Finished, Hello, Progress,
    WorkerMessage, agent_message, worker_message::Kind as Report,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::metrics::TrainingMetrics;

/// How to start this node's workers.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub job: String,
    /// Worker processes on this node.
    pub nproc: usize,
    /// The run's folder; worker logs go to `logs/worker-{local_rank}.log`.
    pub run_dir: PathBuf,
    /// The `kiln` binary to start as `kiln worker`.
    pub kiln_exe: PathBuf,
    /// How long workers may take to start and say hello.
    pub start_timeout: Duration,
}

/// One round's assignment for this node, from the rendezvous plan.
#[derive(Debug, Clone)]
pub struct RoundAssignment {
    pub round: u64,
    /// Global rank of local worker 0; local worker i is `first_rank + i`.
    pub first_rank: u32,
    pub world_size: u32,
    pub peers: Vec<String>,
    /// The accepted job spec, JSON.
    pub spec_json: String,
    /// Checkpoint root URL of the job.
    pub checkpoint_url: String,
    /// Empty (fresh start), "latest", a step, or a manifest URL.
    pub resume: String,
    /// Names this run's save attempts (shared by all ranks).
    pub run_id: String,
}

/// What the agent hears from its workers while they train.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    Progress { rank: u32, progress: Progress },
    Eval { rank: u32, eval: EvalResult },
    Checkpoint { rank: u32, saved: CheckpointSaved },
    Warning { rank: u32, message: String },
}

/// The workers' final reports, by global rank.
#[derive(Debug, Clone)]
pub struct NodeSummary {
    pub finished: Vec<(u32, Finished)>,
}

struct WorkerHandle {
    local_rank: usize,
    pid: u32,
    child: Child,
    hello: Hello,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    log: PathBuf,
}

/// This node's workers, started and connected, waiting for an assignment.
pub struct LocalWorkers {
    workers: Vec<WorkerHandle>,
}

impl std::fmt::Debug for LocalWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWorkers")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl LocalWorkers {
    /// Starts `cfg.nproc` workers and waits for each one's hello.
    pub async fn spawn(cfg: &AgentConfig) -> Result<Self> {
        let logs = cfg.run_dir.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("create log folder {}", logs.display()))?;
        let name = format!("kiln-agent-{}-{:x}", std::process::id(), rand_suffix());
        let std_listener = std::os::unix::net::UnixListener::bind_addr(
            &UnixAddr::from_abstract_name(name.as_bytes()).context("agent socket name")?,
        )
        .context("bind agent socket")?;
        std_listener
            .set_nonblocking(true)
            .context("agent socket non-blocking")?;
        let listener = tokio::net::UnixListener::from_std(std_listener).context("agent socket")?;

        let mut children = Vec::with_capacity(cfg.nproc);
        for local_rank in 0..cfg.nproc {
            let log = logs.join(format!("worker-{local_rank}.log"));
            let out =
                std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
            let err = out.try_clone().context("clone log file")?;
            let mut cmd = Command::new(&cfg.kiln_exe);
            cmd.arg("worker")
                .arg("--agent-socket")
                .arg(&name)
                .arg("--local-rank")
                .arg(local_rank.to_string())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true);
            // SAFETY: prctl is async-signal-safe; it makes the kernel SIGKILL the
            // worker if this process dies, so no worker outlives its agent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().with_context(|| {
                format!(
                    "start worker {local_rank} ({} worker)",
                    cfg.kiln_exe.display()
                )
            })?;
            children.push(Some((child, log)));
        }

        let mut pending: Vec<Option<(Hello, OwnedReadHalf, OwnedWriteHalf)>> =
            (0..cfg.nproc).map(|_| None).collect();
        let deadline = tokio::time::Instant::now() + cfg.start_timeout;
        let mut connected = 0;
        while connected < cfg.nproc {
            // A worker that dies before saying hello is an error now, not a timeout later.
            for (i, slot) in children.iter_mut().enumerate() {
                if let Some((child, log)) = slot
                    && let Ok(Some(status)) = child.try_wait()
                {
                    bail!(
                        "worker {i} exited during start-up ({status}){}",
                        log_tail(log)
                    );
                }
            }
            let accepted = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)),
                listener.accept(),
            )
            .await;
            let (stream, _) = match accepted {
                Ok(r) => r.context("accept worker connection")?,
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    bail!(
                        "{} of {} workers said hello within {:?}",
                        connected,
                        cfg.nproc,
                        cfg.start_timeout
                    )
                }
                Err(_) => continue,
            };
            let (mut reader, writer) = stream.into_split();
            let hello =
                match tokio::time::timeout_at(deadline, read_frame::<WorkerMessage>(&mut reader))
                    .await
                {
                    Ok(Ok(Some(WorkerMessage {
                        kind: Some(Report::Hello(h)),
                    }))) => h,
                    Ok(other) => bail!("expected a hello from a new worker, got {other:?}"),
                    Err(_) => bail!(
                        "a worker connected but said no hello within {:?}",
                        cfg.start_timeout
                    ),
                };
            let i = hello.local_rank as usize;
            if i >= cfg.nproc || pending[i].is_some() {
                bail!("unexpected hello from local rank {i}");
            }
            pending[i] = Some((hello, reader, writer));
            connected += 1;
        }
        let workers = pending
            .into_iter()
            .zip(children)
            .enumerate()
            .map(|(local_rank, (conn, child))| {
                let (hello, reader, writer) = conn.expect("every local rank said hello");
                let (child, log) = child.expect("every worker was started");
                WorkerHandle {
                    local_rank,
                    pid: hello.pid,
                    child,
                    hello,
                    reader,
                    writer,
                    log,
                }
            })
            .collect();
        Ok(Self { workers })
    }

    /// Collective listener addresses of the local workers, by local rank.
    pub fn endpoints(&self) -> Vec<String> {
        self.workers
            .iter()
            .map(|w| w.hello.ring_addr.clone())
            .collect()
    }

    /// Hands out the assignment and supervises until every worker finished, or
    /// until the first failure (then every worker is killed and the error returned).
    pub async fn run(
        self,
        job: &str,
        run_dir: &Path,
        round: &RoundAssignment,
        metrics: Arc<TrainingMetrics>,
        mut on_event: impl FnMut(AgentEvent) + Send,
    ) -> Result<NodeSummary> {
        enum Update {
            Report(usize, WorkerMessage),
            Closed(usize, Option<String>),
            Exited(usize, std::process::ExitStatus),
        }
        let (tx, mut rx) = mpsc::channel::<Update>(1024);
        let mut writers = Vec::new();
        let mut pids = Vec::new();
        let mut logs = Vec::new();
        let mut killers = Vec::new();
        for w in self.workers {
            let WorkerHandle {
                local_rank,
                pid,
                mut child,
                mut reader,
                mut writer,
                log,
                ..
            } = w;
            let assignment = Assignment {
                job: job.to_string(),
                round: round.round,
                rank: round.first_rank + local_rank as u32,
                world_size: round.world_size,
                peers: round.peers.clone(),
                spec_json: round.spec_json.clone(),
                run_dir: run_dir.display().to_string(),
                device: String::new(),
                checkpoint_url: round.checkpoint_url.clone(),
                resume: round.resume.clone(),
                run_id: round.run_id.clone(),
            };
            let msg = AgentMessage {
                kind: Some(agent_message::Kind::Assignment(assignment)),
            };
            writer
                .write_all(&frame::encode(&msg))
                .await
                .with_context(|| format!("send assignment to worker {local_rank}"))?;
            writers.push(writer);
            pids.push(pid);
            logs.push(log);
            let reports = tx.clone();
            tokio::spawn(async move {
                loop {
                    match read_frame::<WorkerMessage>(&mut reader).await {
                        Ok(Some(m)) => {
                            if reports.send(Update::Report(local_rank, m)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            return drop(reports.send(Update::Closed(local_rank, None)).await);
                        }
                        Err(e) => {
                            return drop(
                                reports
                                    .send(Update::Closed(local_rank, Some(e.to_string())))
                                    .await,
                            );
                        }
                    }
                }
            });
            let (kill_tx, mut kill_rx) = mpsc::channel::<()>(1);
            killers.push(kill_tx);
            let exits = tx.clone();
            tokio::spawn(async move {
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = kill_rx.recv() => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                if let Ok(status) = status {
                    let _ = exits.send(Update::Exited(local_rank, status)).await;
                }
            });
        }
        drop(tx);

        let n = pids.len();
        let world = round.world_size;
        let mut finished: Vec<Option<Finished>> = vec![None; n];
        let mut exited: Vec<Option<std::process::ExitStatus>> = vec![None; n];
        let mut failures: Vec<Failure> = Vec::new();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            if failures.is_empty()
                && exited.iter().all(Option::is_some)
                && finished.iter().all(Option::is_some)
            {
                break;
            }
            let next = match grace {
                Some(deadline) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(u) => u,
                    Err(_) => break,
                },
                None => rx.recv().await,
            };
            let Some(update) = next else { break };
            let rank = |i: usize| round.first_rank + i as u32;
            match update {
                Update::Report(i, WorkerMessage { kind: Some(kind) }) => match kind {
                    Report::Progress(p) => {
                        if i == 0 {
                            metrics.step.set(p.step as i64);
                            metrics.loss.set(p.loss);
                            metrics.learning_rate.set(p.lr);
                            metrics.step_seconds.observe(p.step_seconds);
                            if p.step_seconds > 0.0 {
                                metrics
                                    .samples_per_second
                                    .set(p.samples as f64 * world as f64 / p.step_seconds);
                            }
                        }
                        metrics.samples.inc_by(p.samples);
                        metrics.allreduce_seconds.inc_by(p.allreduce_seconds);
                        metrics.allreduce_bytes.inc_by(p.allreduce_bytes);
                        on_event(AgentEvent::Progress {
                            rank: rank(i),
                            progress: p,
                        });
                    }
                    Report::Eval(e) => on_event(AgentEvent::Eval {
                        rank: rank(i),
                        eval: e,
                    }),
                    Report::Checkpoint(saved) => on_event(AgentEvent::Checkpoint {
                        rank: rank(i),
                        saved,
                    }),
                    Report::Warning(w) => {
                        tracing::warn!(job, rank = rank(i), "{}", w.message);
                        on_event(AgentEvent::Warning {
                            rank: rank(i),
                            message: w.message,
                        });
                    }
                    Report::Finished(f) => finished[i] = Some(f),
                    Report::Failed(f) => {
                        failures.push(Failure::reported(rank(i), pids[i], f.error))
                    }
                    Report::Hello(_) => failures.push(Failure::reported(
                        rank(i),
                        pids[i],
                        "said hello twice".into(),
                    )),
                },
                Update::Report(..) => {}
                Update::Closed(i, error) => {
                    if finished[i].is_none() && !failures.iter().any(|f| f.rank == rank(i)) {
                        // The process exit that follows says why; note the channel error if any.
                        if let Some(e) = error {
                            failures.push(Failure::reported(
                                rank(i),
                                pids[i],
                                format!("agent channel failed: {e}"),
                            ));
                        }
                    }
                }
                Update::Exited(i, status) => {
                    exited[i] = Some(status);
                    if !status.success() || finished[i].is_none() {
                        failures.push(Failure::exited(rank(i), pids[i], status, &logs[i]));
                    }
                }
            }
            if !failures.is_empty() && grace.is_none() {
                // Others fail right after the first (their peer vanished); gather
                // them briefly so the root cause can be told from the echoes.
                grace = Some(tokio::time::Instant::now() + Duration::from_millis(300));
            }
        }
        if !failures.is_empty() {
            for k in &killers {
                let _ = k.try_send(());
            }
            // Wait for the kills to land so no worker outlives the error.
            while let Ok(Some(update)) =
                tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
            {
                if let Update::Exited(i, status) = update {
                    exited[i] = Some(status);
                }
                if exited.iter().all(Option::is_some) {
                    break;
                }
            }
            drop(writers);
            failures.sort_by_key(Failure::severity);
            let first = &failures[0];
            tracing::error!(job, rank = first.rank, pid = first.pid, "worker failed");
            bail!("{}", first.message);
        }
        Ok(NodeSummary {
            finished: finished
                .into_iter()
                .enumerate()
                .map(|(i, f)| (round.first_rank + i as u32, f.expect("checked above")))
                .collect(),
        })
    }
}

/// A worker failure, ranked so that the root cause is reported, not its echoes.
struct Failure {
    rank: u32,
    pid: u32,
    message: String,
    /// 0: died without reporting (killed, crashed); 1: reported its own error;
    /// 2: reported that a peer went away (an echo of someone else's failure).
    class: u8,
}

impl Failure {
    fn reported(rank: u32, pid: u32, error: String) -> Self {
        let echo = error.contains("closed the connection") || error.contains("collective aborted");
        Self {
            rank,
            pid,
            message: format!("worker rank {rank} (pid {pid}) failed: {error}"),
            class: if echo { 2 } else { 1 },
        }
    }

    fn exited(rank: u32, pid: u32, status: std::process::ExitStatus, log: &Path) -> Self {
        use std::os::unix::process::ExitStatusExt;
        let how = match (status.code(), status.signal()) {
            (_, Some(sig)) => format!("was killed by signal {sig}{}", signal_name(sig)),
            (Some(code), _) => format!("exited with status {code}"),
            _ => format!("ended ({status})"),
        };
        let class = if status.signal().is_some() { 0 } else { 3 };
        Self {
            rank,
            pid,
            message: format!("worker rank {rank} (pid {pid}) {how}{}", log_tail(log)),
            class,
        }
    }

    fn severity(&self) -> u8 {
        self.class
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGBUS => " (SIGBUS)",
        _ => "",
    }
}

/// The last lines of a worker's log, to put beside its failure.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
    format!("; last lines of {}:\n  {tail}", log.display())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

async fn read_frame<M: Message + Default>(r: &mut OwnedReadHalf) -> std::io::Result<Option<M>> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; frame::decode_len(header)?];
    r.read_exact(&mut body).await?;
    M::decode(body.as_slice())
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

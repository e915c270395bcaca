//! A closed-loop HTTP load generator for the serving benchmark (bench/serve.py).
//!
//! `--concurrency N` opens N keep-alive HTTP/1.1 connections; each sends the
//! same POST body, waits for the whole response, and sends the next one at
//! once (closed loop: the offered load is what the server can answer). Every
//! level runs a warm-up (connections opened, nothing recorded) and then a
//! measured window of fixed length; every request that completes inside the
//! window is recorded, with its latency from just before the request was
//! written to the end of the response body. Requests still in flight when the
//! window closes are dropped, not recorded.
//!
//! The generator runs on one thread (a current-thread tokio runtime), so it
//! takes at most one core from the servers it measures; hyper's client costs a
//! few microseconds per request, far below what the servers spend.
//!
//! Output: one JSON line per level on stdout (`concurrency`, `requests`,
//! `errors`, `rps`, `p50_ms`, `p90_ms`, `p99_ms`, `mean_ms`, `max_ms`,
//! `first_error`), a short summary per level on stderr.
//!
//! ```sh
//! loadgen --url http://127.0.0.1:8000/v2/models/digits/infer --body-file body.json \
//!     --concurrency 1,8,32 --duration-s 10 --warmup-s 2 --expect '"predictions"'
//! ```

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Closed-loop HTTP POST load at one or more concurrency levels.
#[derive(Parser, Debug)]
#[command(name = "loadgen")]
struct Args {
    /// Target URL, `http://HOST:PORT/PATH` (plain HTTP only).
    #[arg(long)]
    url: String,
    /// File holding the request body, sent unchanged with every request.
    #[arg(long)]
    body_file: PathBuf,
    /// Content type of the body.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Concurrency levels (connections, each with one request in flight), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Length of each level's measured window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Warm-up before each level's window, in seconds (nothing recorded).
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// A byte string every response body must contain; a 200 response without
    /// it counts as an error.
    #[arg(long)]
    expect: Option<String>,
    /// A label copied into every JSON line (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
}

/// Where requests go, parsed once from `--url`.
struct Target {
    /// `host:port`, for connecting and for the Host header.
    authority: String,
    path: String,
    content_type: String,
    body: Bytes,
    expect: Option<Vec<u8>>,
}

/// What one connection recorded during a level.
#[derive(Default)]
struct ConnectionRecord {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl ConnectionRecord {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// The outcome of one request that reached the server.
enum Outcome {
    Ok,
    /// The server answered, but not as expected; the connection stays usable.
    Refused(String),
}

fn main() -> Result<()> {
    let args = Args::parse();
    let uri: Uri = args
        .url
        .parse()
        .with_context(|| format!("parse --url '{}'", args.url))?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must start with http:// (got '{}')", args.url);
    }
    let Some(authority) = uri.authority().map(|a| a.to_string()) else {
        bail!("--url must name a host and port (got '{}')", args.url);
    };
    if uri.port_u16().is_none() {
        bail!("--url must name a port (got '{}')", args.url);
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!(
            "--concurrency must list levels of at least 1 (got {:?})",
            args.concurrency
        );
    }
    if !(args.duration_s > 0.0 && args.duration_s.is_finite()) {
        bail!(
            "--duration-s must be a positive number of seconds (got {})",
            args.duration_s
        );
    }
    if !(args.warmup_s >= 0.0 && args.warmup_s.is_finite()) {
        bail!(
            "--warmup-s must be zero or a positive number of seconds (got {})",
            args.warmup_s
        );
    }
    let body = std::fs::read(&args.body_file)
        .with_context(|| format!("read --body-file {}", args.body_file.display()))?;
    let target = Rc::new(Target {
        authority,
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string()),
        content_type: args.content_type.clone(),
        body: Bytes::from(body),
        expect: args
            .expect
            .as_ref()
            .filter(|e| !e.is_empty())
            .map(|e| e.as_bytes().to_vec()),
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        for &concurrency in &args.concurrency {
            let line = run_level(
                &target,
                concurrency,
                Duration::from_secs_f64(args.warmup_s),
                Duration::from_secs_f64(args.duration_s),
                &args.label,
            )
            .await?;
            println!("{line}");
        }
        Ok(())
    })
}

/// Runs one concurrency level and returns its JSON line.
async fn run_level(
    target: &Rc<Target>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    label: &str,
) -> Result<serde_json::Value> {
    let window_start = Instant::now() + warmup;
    let window_end = window_start + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::task::spawn_local(connection_loop(Rc::clone(target), window_start, window_end))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let record = task.await.context("join a connection task")?;
        latencies.extend(record.latencies_ns);
        errors += record.errors;
        if first_error.is_none() {
            first_error = record.first_error;
        }
    }
    latencies.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    let percentile = |q: f64| -> Option<f64> {
        if latencies.is_empty() {
            return None;
        }
        // Nearest rank: the smallest value with at least q of the samples at or below it.
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        Some(ms(latencies[rank - 1]))
    };
    let requests = latencies.len();
    let mean = (requests > 0)
        .then(|| latencies.iter().map(|&ns| ns as f64).sum::<f64>() / requests as f64 / 1e6);
    let rps = requests as f64 / duration.as_secs_f64();
    let (p50, p99) = (percentile(0.50), percentile(0.99));
    eprintln!(
        "loadgen{}: concurrency {concurrency}: {requests} requests, {rps:.0} req/s, p50 {} ms, p99 {} ms, {errors} errors",
        if label.is_empty() {
            String::new()
        } else {
            format!(" [{label}]")
        },
        p50.map_or("n/a".into(), |v| format!("{v:.3}")),
        p99.map_or("n/a".into(), |v| format!("{v:.3}")),
    );
    Ok(serde_json::json!({
        "label": label,
        "concurrency": concurrency,
        "duration_s": duration.as_secs_f64(),
        "requests": requests,
        "errors": errors,
        "rps": rps,
        "p50_ms": p50,
        "p90_ms": percentile(0.90),
        "p99_ms": p99,
        "mean_ms": mean,
        "max_ms": latencies.last().map(|&ns| ms(ns)),
        "first_error": first_error,
    }))
}

/// One connection's closed loop: (re)connect, send, await the whole answer,
/// record it when it completed inside the window, repeat until the window ends.
async fn connection_loop(
    target: Rc<Target>,
    window_start: Instant,
    window_end: Instant,
) -> ConnectionRecord {
    let mut record = ConnectionRecord::default();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    while Instant::now() < window_end {
        let conn = match &mut sender {
            Some(conn) => conn,
            None => match connect(&target.authority).await {
                Ok(conn) => sender.insert(conn),
                Err(e) => {
                    if Instant::now() >= window_start {
                        record.error(format!("{e:#}"));
                    }
                    // Do not spin on a refused connection.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        let outcome = send_one(conn, &target).await;
        let done = Instant::now();
        if done > window_end {
            break;
        }
        let recorded = done >= window_start;
        match outcome {
            Ok(Outcome::Ok) if recorded => record
                .latencies_ns
                .push(u64::try_from((done - started).as_nanos()).unwrap_or(u64::MAX)),
            Ok(Outcome::Ok) => {}
            Ok(Outcome::Refused(what)) => {
                if recorded {
                    record.error(what);
                }
            }
            Err(e) => {
                if recorded {
                    record.error(format!("{e:#}"));
                }
                sender = None; // the connection is broken: open another
            }
        }
    }
    record
}

/// Opens one keep-alive HTTP/1.1 connection; its driver runs as a local task.
async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect to {authority}"))?;
    stream.set_nodelay(true).context("set TCP_NODELAY")?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::task::spawn_local(async move {
        // Ends when the sender is dropped or the server closes; errors surface
        // on the next request through the sender.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends the body once and reads the whole response.
async fn send_one(conn: &mut SendRequest<Full<Bytes>>, target: &Target) -> Result<Outcome> {
    conn.ready().await.context("wait for the connection")?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(target.path.as_str())
        .header(HOST, target.authority.as_str())
        .header(CONTENT_TYPE, target.content_type.as_str())
        .body(Full::new(target.body.clone()))
        .context("build the request")?;
    let response = conn
        .send_request(request)
        .await
        .context("send the request")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("read the response body")?
        .to_bytes();
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Ok(Outcome::Refused(format!("HTTP {status}: {text}")));
    }
    if let Some(expect) = &target.expect
        && !body.windows(expect.len()).any(|w| w == expect.as_slice())
    {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Ok(Outcome::Refused(format!(
            "HTTP 200 without the expected '{}': {text}",
            String::from_utf8_lossy(expect)
        )));
    }
    Ok(Outcome::Ok)
}

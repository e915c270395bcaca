//! One delivery attempt per sink kind: log, webhook, command.
//!
//! Each attempt ends in an [`Outcome`]; the dispatcher (`dispatch.rs`) decides
//! about retries.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::config::{Secret, Target};
use crate::signature::sign;

/// Header naming the event kind.
pub const HEADER_EVENT: &str = "X-Kiln-Event";
/// Header with the event id; the same on every retry of a delivery.
pub const HEADER_DELIVERY: &str = "X-Kiln-Delivery";
/// Header with the Unix time (seconds) the attempt was signed at.
pub const HEADER_TIMESTAMP: &str = "X-Kiln-Timestamp";
/// Header with `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub const HEADER_SIGNATURE: &str = "X-Kiln-Signature";

/// Most bytes of a command's stdout or stderr kept for the log; the rest is
/// read and counted, not kept.
const MAX_OUTPUT_BYTES: usize = 16 * 1024;
/// Most bytes of a refusing webhook's response body quoted in the log.
const MAX_RESPONSE_QUOTE: usize = 512;

/// An event ready to send: serialized once, shared by every sink and retry.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) kind: String,
    pub(crate) id: String,
    pub(crate) body: Bytes,
}

/// How one attempt ended.
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome {
    Delivered,
    /// Worth another attempt (connection failure, timeout, 5xx, 429, command
    /// failure); `retry_after` is the receiver's own request, if any.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Will fail the same way again (4xx other than 429, a redirect, an
    /// unrunnable program).
    GiveUp {
        reason: String,
    },
}

fn retry(reason: impl Into<String>) -> Outcome {
    Outcome::Retry {
        reason: reason.into(),
        retry_after: None,
    }
}

/// Makes one attempt to deliver `delivery` to `target`, within `timeout`.
pub(crate) async fn attempt(
    target: &Target,
    client: Option<&reqwest::Client>,
    index: usize,
    delivery: &Delivery,
    timeout: Duration,
) -> Outcome {
    match target {
        Target::Log => {
            // The body is JSON built by `Event::to_json`, hence UTF-8.
            let event = String::from_utf8_lossy(&delivery.body);
            tracing::info!(hook = index, kind = %delivery.kind, id = %delivery.id, %event, "hook event");
            Outcome::Delivered
        }
        Target::Webhook { url, secret } => {
            let Some(client) = client else {
                return Outcome::GiveUp {
                    reason: "no http client was built".into(),
                };
            };
            webhook(client, url, secret.as_ref(), delivery, timeout).await
        }
        Target::Command { program, args } => command(program, args, index, delivery, timeout).await,
    }
}

async fn webhook(
    client: &reqwest::Client,
    url: &reqwest::Url,
    secret: Option<&Secret>,
    delivery: &Delivery,
    timeout: Duration,
) -> Outcome {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    let mut request = client
        .post(url.clone())
        .timeout(timeout)
        .header(CONTENT_TYPE, "application/json")
        .header(HEADER_EVENT, &delivery.kind)
        .header(HEADER_DELIVERY, &delivery.id)
        .header(HEADER_TIMESTAMP, &timestamp)
        .body(delivery.body.clone());
    if let Some(secret) = secret {
        request = request.header(
            HEADER_SIGNATURE,
            sign(&secret.0, &timestamp, &delivery.body),
        );
    }
    let response = match request.send().await {
        Ok(response) => response,
        // A kind that is not a valid header value, and the like: never better.
        Err(error) if error.is_builder() => {
            return Outcome::GiveUp {
                reason: error_chain(&error),
            };
        }
        Err(error) => {
            // Connection refused or reset, DNS, TLS, timeouts: the receiver may
            // be back later. It dedupes on X-Kiln-Delivery if a reset hid a
            // success.
            let what = if error.is_timeout() {
                format!("timed out after {}s", timeout.as_secs_f64())
            } else {
                error_chain(&error)
            };
            return retry(what);
        }
    };
    let status = response.status();
    if status.is_success() {
        return Outcome::Delivered;
    }
    let retry_after = retry_after(&response);
    let quote = response_quote(response).await;
    let reason = if quote.is_empty() {
        format!("http {status}")
    } else {
        format!("http {status}: {quote}")
    };
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Outcome::Retry {
            reason,
            retry_after,
        }
    } else if status.is_redirection() {
        // Redirects are not followed: a signed body must not travel to a host
        // nobody configured. The URL should name the final endpoint.
        Outcome::GiveUp {
            reason: format!("{reason} (redirects are not followed: configure the final URL)"),
        }
    } else {
        Outcome::GiveUp { reason }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The start of a response body, on one line, for the log.
async fn response_quote(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    // A bounded read: a receiver's error page is not worth more.
    while bytes.len() < MAX_RESPONSE_QUOTE {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(MAX_RESPONSE_QUOTE);
    String::from_utf8_lossy(&bytes)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

async fn command(
    program: &str,
    args: &[String],
    index: usize,
    delivery: &Delivery,
    timeout: Duration,
) -> Outcome {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("KILN_EVENT", &delivery.kind)
        .env("KILN_DELIVERY", &delivery.id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own process group, so that a timeout kills what it started too
    // (`sh -c '...'` runs its commands as children).
    #[cfg(unix)]
    command.process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let reason = format!("start {program:?}: {error}");
            return match error.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    Outcome::GiveUp { reason }
                }
                _ => retry(reason),
            };
        }
    };
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let body = delivery.body.clone();
    let write = async move {
        let Some(mut stdin) = stdin else {
            return Ok(());
        };
        stdin.write_all(&body).await?;
        stdin.shutdown().await
    };
    let run = async {
        tokio::join!(
            write,
            read_capped(stdout),
            read_capped(stderr),
            child.wait()
        )
    };
    let finished = tokio::time::timeout(timeout, run).await;
    let (written, stdout, stderr, status) = match finished {
        Ok(results) => results,
        Err(_) => {
            kill_group(&mut child).await;
            return retry(format!(
                "{program:?} timed out after {}s and was killed",
                timeout.as_secs_f64()
            ));
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(error) => return retry(format!("wait for {program:?}: {error}")),
    };
    log_output(index, delivery, "stdout", &stdout, status.success());
    log_output(index, delivery, "stderr", &stderr, status.success());
    if !status.success() {
        let tail = stderr.text.lines().last().unwrap_or("").trim().to_string();
        return retry(if tail.is_empty() {
            format!("{program:?} exited with {status}")
        } else {
            format!("{program:?} exited with {status}: {tail}")
        });
    }
    if let Err(error) = written {
        // It succeeded without reading all of stdin: its choice (a broken pipe).
        tracing::debug!(hook = index, id = %delivery.id, %error, "hook command did not read the whole event");
    }
    Outcome::Delivered
}

/// Kills the command's process group, then the command itself, and reaps it.
async fn kill_group(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        // SAFETY: kill(2) with a negative pid signals the process group we
        // created for this child (`process_group(0)` made its pid the group id);
        // the child is not reaped yet, so the id is still ours.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    // Kills (if still alive) and waits, so no zombie remains.
    let _ = child.kill().await;
}

/// What a command wrote on one stream (its start) and how much in all.
struct Captured {
    text: String,
    total: usize,
}

async fn read_capped(stream: Option<impl AsyncRead + Unpin>) -> Captured {
    let mut kept = Vec::new();
    let mut total = 0;
    if let Some(mut stream) = stream {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    let room = MAX_OUTPUT_BYTES.saturating_sub(kept.len());
                    kept.extend_from_slice(&buffer[..n.min(room)]);
                }
            }
        }
    }
    Captured {
        text: String::from_utf8_lossy(&kept).into_owned(),
        total,
    }
}

fn log_output(index: usize, delivery: &Delivery, stream: &str, captured: &Captured, success: bool) {
    let text = captured.text.trim_end();
    if text.is_empty() {
        return;
    }
    let dropped = captured.total.saturating_sub(MAX_OUTPUT_BYTES);
    let output = if dropped > 0 {
        format!("{text}\n[{dropped} more bytes not shown]")
    } else {
        text.to_string()
    };
    if success {
        tracing::info!(hook = index, kind = %delivery.kind, id = %delivery.id, stream, %output, "hook command output");
    } else {
        tracing::warn!(hook = index, kind = %delivery.kind, id = %delivery.id, stream, %output, "hook command output");
    }
}

/// An error and its causes on one line (`reqwest` puts the useful part, such
/// as "connection refused", in the causes).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

//! Hooks against real receivers: an HTTP listener on loopback (axum), real
//! commands (`sh`), the real tracing log.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use kiln_hooks::event::{CheckpointCommitted, JobStarted, NodeLost};
use kiln_hooks::{Event, HookOptions, Hooks, SinkStats, kind, verify_signature};
use kiln_proto::spec::{HookSink, HookSpec};
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore};

/// Long enough never to be reached when things work; reaching it fails the test.
const FLUSH: Duration = Duration::from_secs(60);

fn fast_options() -> HookOptions {
    HookOptions {
        backoff_base: Duration::from_millis(5),
        backoff_cap: Duration::from_millis(20),
        ..HookOptions::default()
    }
}

fn webhook(url: &str) -> HookSpec {
    HookSpec {
        sink: HookSink::Webhook,
        url: Some(url.to_string()),
        secret_env: None,
        secret_file: None,
        command: Vec::new(),
        events: Vec::new(),
        max_retries: 5,
        timeout_secs: 10.0,
    }
}

fn command(args: &[&str]) -> HookSpec {
    HookSpec {
        sink: HookSink::Command,
        url: None,
        command: args.iter().map(|a| a.to_string()).collect(),
        ..webhook("unused")
    }
}

fn sample_event(step: u64) -> Event {
    Event::of(
        "digits",
        &CheckpointCommitted {
            job: "digits".into(),
            step,
            location: format!("file:///runs/digits/ckpt/{step}"),
            world_size: 2,
            raw_bytes: 1 << 20,
            uploaded_bytes: 1 << 18,
            elapsed_secs: 0.5,
        },
    )
}

/// What the receiver does with one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Status(u16),
    /// Never answers (the sender's timeout must fire).
    Hang,
}

#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
    /// The status the receiver answered with.
    status: u16,
}

#[derive(Default)]
struct ReceiverState {
    /// Replies for the coming requests, in order; 200 once empty.
    script: Mutex<VecDeque<Reply>>,
    received: Mutex<Vec<Received>>,
    arrived: Notify,
    /// When set, each request waits for a permit before it is answered.
    gate: Option<Arc<Semaphore>>,
}

/// A real HTTP server on 127.0.0.1, stopped on drop.
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    async fn start(script: &[Reply], gate: Option<Arc<Semaphore>>) -> Result<Receiver> {
        let state = Arc::new(ReceiverState {
            script: Mutex::new(script.iter().copied().collect()),
            gate,
            ..ReceiverState::default()
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the receiver")?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver serves");
        });
        Ok(Receiver { url, state, server })
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits until `count` requests have arrived.
    async fn wait_for(&self, count: usize) {
        loop {
            let arrived = self.state.arrived.notified();
            let mut arrived = std::pin::pin!(arrived);
            arrived.as_mut().enable();
            if self.state.received.lock().unwrap().len() >= count {
                return;
            }
            arrived.await;
        }
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Status(200));
    let status = match reply {
        Reply::Status(code) => code,
        Reply::Hang => 0,
    };
    state.received.lock().unwrap().push(Received {
        headers,
        body,
        status,
    });
    state.arrived.notify_waiters();
    if let Some(gate) = &state.gate {
        gate.acquire().await.expect("gate open").forget();
    }
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code).expect("valid status"),
        Reply::Hang => std::future::pending().await,
    }
}

fn header<'a>(request: &'a Received, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("ascii header")
}

fn stats(delivered: u64, failed: u64, dropped: u64, retries: u64) -> (u64, u64, u64, u64) {
    (delivered, failed, dropped, retries)
}

fn counts(stats: &SinkStats) -> (u64, u64, u64, u64) {
    (stats.delivered, stats.failed, stats.dropped, stats.retries)
}

#[tokio::test]
async fn webhook_delivers_signed_json() -> Result<()> {
    let receiver = Receiver::start(&[], None).await?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("hook.key");
    std::fs::write(&key_file, "correct horse battery staple\n")?;
    let mut spec = webhook(&receiver.url);
    spec.secret_file = Some(key_file);
    let hooks = Hooks::with_options(&[spec], fast_options())?;

    let event = sample_event(400);
    hooks.emit(event.clone());
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");

    let received = receiver.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(header(request, "content-type"), "application/json");
    assert_eq!(header(request, "x-kiln-event"), "checkpoint.committed");
    assert_eq!(header(request, "x-kiln-delivery"), event.id);
    let arrived: Event = serde_json::from_slice(&request.body)?;
    assert_eq!(arrived, event);

    let timestamp = header(request, "x-kiln-timestamp");
    let sent_at: u64 = timestamp.parse()?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    ensure!(
        sent_at <= now.as_secs(),
        "timestamp {sent_at} is in the future"
    );
    let signature = header(request, "x-kiln-signature");
    let key = b"correct horse battery staple";
    assert!(verify_signature(key, timestamp, &request.body, signature));
    assert!(!verify_signature(
        b"wrong key",
        timestamp,
        &request.body,
        signature
    ));

    // Recomputed here, from the documented scheme, without the crate.
    let mut mac = Hmac::<Sha256>::new_from_slice(key)?;
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(signature, expected);

    // And with the Python receiver snippet of docs/hooks.md, as a receiver would.
    verify_with_documented_python(key, timestamp, &request.body, signature)?;
    verify_with_documented_python_rejects(key, timestamp, &request.body)?;

    assert_eq!(counts(&hooks.stats()[0]), stats(1, 0, 0, 0));
    Ok(())
}

/// The first ```python block of docs/hooks.md.
fn documented_python() -> Result<String> {
    let doc = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("../docs/hooks.md");
    let text = std::fs::read_to_string(&doc).with_context(|| format!("read {}", doc.display()))?;
    let start = text
        .find("```python\n")
        .context("docs/hooks.md has no python block")?
        + "```python\n".len();
    let end = start
        + text[start..]
            .find("```")
            .context("unterminated python block")?;
    Ok(text[start..end].to_string())
}

/// Runs the documented `verify(secret, timestamp, body, signature)` in python3;
/// returns what it printed.
fn run_documented_python(
    key: &[u8],
    timestamp: &str,
    body: &[u8],
    signature: &str,
) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let body_file = dir.path().join("body");
    std::fs::write(&body_file, body)?;
    let script = format!(
        "{}\nimport sys\nbody = open(sys.argv[3], 'rb').read()\nprint(verify(sys.argv[1].encode(), sys.argv[2], body, sys.argv[4]))\n",
        documented_python()?
    );
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(std::str::from_utf8(key)?)
        .arg(timestamp)
        .arg(&body_file)
        .arg(signature)
        .output()
        .context("run python3 (needed to check the documented receiver snippet)")?;
    ensure!(
        output.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_string())
}

fn verify_with_documented_python(
    key: &[u8],
    timestamp: &str,
    body: &[u8],
    signature: &str,
) -> Result<()> {
    assert_eq!(
        run_documented_python(key, timestamp, body, signature)?,
        "True"
    );
    Ok(())
}

fn verify_with_documented_python_rejects(key: &[u8], timestamp: &str, body: &[u8]) -> Result<()> {
    let forged = kiln_hooks::sign(b"another key", timestamp, body);
    assert_eq!(
        run_documented_python(key, timestamp, body, &forged)?,
        "False"
    );
    Ok(())
}

#[tokio::test]
async fn unsigned_webhook_has_no_signature_header() -> Result<()> {
    let receiver = Receiver::start(&[], None).await?;
    let hooks = Hooks::with_options(&[webhook(&receiver.url)], fast_options())?;
    hooks.emit(sample_event(1));
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].headers.get("x-kiln-signature").is_none());
    assert!(received[0].headers.get("x-kiln-timestamp").is_some());
    Ok(())
}

#[tokio::test]
async fn server_errors_are_retried_until_delivered_once() -> Result<()> {
    let receiver = Receiver::start(&[Reply::Status(500), Reply::Status(500)], None).await?;
    let hooks = Hooks::with_options(&[webhook(&receiver.url)], fast_options())?;
    let event = sample_event(7);
    hooks.emit(event.clone());
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");

    let received = receiver.received();
    let statuses: Vec<u16> = received.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    // The same delivery each time; it succeeded exactly once.
    for request in &received {
        assert_eq!(header(request, "x-kiln-delivery"), event.id);
        assert_eq!(serde_json::from_slice::<Event>(&request.body)?, event);
    }
    assert_eq!(received.iter().filter(|r| r.status == 200).count(), 1);
    assert_eq!(counts(&hooks.stats()[0]), stats(1, 0, 0, 2));
    Ok(())
}

#[tokio::test]
async fn too_many_requests_and_timeouts_are_retried() -> Result<()> {
    let receiver = Receiver::start(&[Reply::Status(429), Reply::Hang], None).await?;
    let mut spec = webhook(&receiver.url);
    spec.timeout_secs = 0.2;
    let hooks = Hooks::with_options(&[spec], fast_options())?;
    hooks.emit(sample_event(8));
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    let statuses: Vec<u16> = receiver.received().iter().map(|r| r.status).collect();
    // 0: the request that got no answer before the sender's timeout.
    assert_eq!(statuses, [429, 0, 200]);
    assert_eq!(counts(&hooks.stats()[0]), stats(1, 0, 0, 2));
    Ok(())
}

#[tokio::test]
async fn client_errors_are_not_retried() -> Result<()> {
    let receiver = Receiver::start(&[Reply::Status(400)], None).await?;
    let hooks = Hooks::with_options(&[webhook(&receiver.url)], fast_options())?;
    hooks.emit(sample_event(9));
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    // Would have been answered 200 had it been retried.
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(counts(&hooks.stats()[0]), stats(0, 1, 0, 0));
    Ok(())
}

#[tokio::test]
async fn refused_connections_are_retried_then_given_up() -> Result<()> {
    // A port that was free a moment ago and has no listener now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut spec = webhook(&format!("http://127.0.0.1:{port}/hook"));
    spec.max_retries = 2;
    let hooks = Hooks::with_options(&[spec], fast_options())?;
    hooks.emit(sample_event(10));
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    assert_eq!(counts(&hooks.stats()[0]), stats(0, 1, 0, 2));
    Ok(())
}

#[tokio::test]
async fn flush_waits_for_delivery() -> Result<()> {
    let gate = Arc::new(Semaphore::new(0));
    let receiver = Receiver::start(&[], Some(gate.clone())).await?;
    let hooks = Hooks::with_options(&[webhook(&receiver.url)], fast_options())?;
    hooks.emit(sample_event(11));
    receiver.wait_for(1).await;

    // The receiver holds the request: it cannot have been delivered.
    assert!(!hooks.flush(Duration::from_millis(50)).await);
    assert_eq!(hooks.pending(), 1);
    assert_eq!(hooks.stats()[0].delivered, 0);

    let flushing = tokio::spawn({
        let hooks = hooks.clone();
        async move { hooks.flush(FLUSH).await }
    });
    gate.add_permits(1);
    ensure!(flushing.await?, "flush did not finish");
    // Flush returned only once the delivery was done.
    assert_eq!(hooks.pending(), 0);
    assert_eq!(counts(&hooks.stats()[0]), stats(1, 0, 0, 0));
    Ok(())
}

#[tokio::test]
async fn full_queue_drops_new_events_without_waiting() -> Result<()> {
    let gate = Arc::new(Semaphore::new(0));
    let receiver = Receiver::start(&[], Some(gate.clone())).await?;
    let options = HookOptions {
        queue_capacity: 1,
        ..fast_options()
    };
    let hooks = Hooks::with_options(&[webhook(&receiver.url)], options)?;
    let events: Vec<Event> = (0..4).map(sample_event).collect();
    hooks.emit(events[0].clone());
    // The first is in flight (held by the receiver); the queue is empty.
    receiver.wait_for(1).await;
    for event in &events[1..] {
        hooks.emit(event.clone());
    }
    // One fits in the queue, two are dropped.
    assert_eq!(counts(&hooks.stats()[0]), stats(0, 0, 2, 0));

    gate.add_permits(10);
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    let ids: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| header(r, "x-kiln-delivery").to_string())
        .collect();
    assert_eq!(ids, [events[0].id.clone(), events[1].id.clone()]);
    assert_eq!(counts(&hooks.stats()[0]), stats(2, 0, 2, 0));
    Ok(())
}

fn quoted(path: &Path) -> String {
    path.to_str().expect("utf-8 temp path").to_string()
}

#[tokio::test]
async fn command_gets_the_event_on_stdin() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("event.json");
    let env_out = dir.path().join("env.txt");
    let spec = command(&[
        "sh",
        "-c",
        r#"cat > "$1"; printf '%s %s' "$KILN_EVENT" "$KILN_DELIVERY" > "$2""#,
        "sh",
        &quoted(&out),
        &quoted(&env_out),
    ]);
    let hooks = Hooks::with_options(&[spec], fast_options())?;
    let event = Event::of(
        "digits",
        &JobStarted {
            job: "digits".into(),
            round: 1,
            world_size: 4,
            step: 0,
            resumed_from: None,
        },
    );
    hooks.emit(event.clone());
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    let written: Event = serde_json::from_slice(&std::fs::read(&out)?)?;
    assert_eq!(written, event);
    assert_eq!(
        std::fs::read_to_string(&env_out)?,
        format!("job.started {}", event.id)
    );
    assert_eq!(counts(&hooks.stats()[0]), stats(1, 0, 0, 0));
    Ok(())
}

#[tokio::test]
async fn failing_command_is_retried_then_given_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let attempts = dir.path().join("attempts");
    let mut spec = command(&[
        "sh",
        "-c",
        r#"cat >/dev/null; echo attempt >> "$1"; echo "no route to pager" >&2; exit 3"#,
        "sh",
        &quoted(&attempts),
    ]);
    spec.max_retries = 2;
    let hooks = Hooks::with_options(&[spec], fast_options())?;
    hooks.emit(sample_event(12));
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    assert_eq!(std::fs::read_to_string(&attempts)?.lines().count(), 3);
    assert_eq!(counts(&hooks.stats()[0]), stats(0, 1, 0, 2));
    Ok(())
}

#[tokio::test]
async fn command_timeout_kills_it_and_what_it_started() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pid_file = dir.path().join("sleep.pid");
    let mut spec = command(&[
        "sh",
        "-c",
        r#"sleep 600 & echo $! > "$1"; wait"#,
        "sh",
        &quoted(&pid_file),
    ]);
    spec.timeout_secs = 0.5;
    spec.max_retries = 0;
    let hooks = Hooks::with_options(&[spec], fast_options())?;
    hooks.emit(sample_event(13));
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    assert_eq!(counts(&hooks.stats()[0]), stats(0, 1, 0, 0));

    // The grandchild (`sleep`) was in the command's process group: killed too.
    let pid = std::fs::read_to_string(&pid_file)?.trim().to_string();
    let stat = format!("/proc/{pid}/stat");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Gone, or a zombie waiting for a parent that does not reap.
        let state = std::fs::read_to_string(&stat)
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|rest| rest.chars().next()));
        match state {
            None | Some(Some('Z')) | Some(Some('X')) => break,
            Some(other) => {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "sleep {pid} still alive (state {other:?})"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn hooks_take_only_the_kinds_they_ask_for() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let append = |file: &Path| {
        vec![
            "sh".to_string(),
            "-c".to_string(),
            r#"cat >> "$1"; echo >> "$1""#.to_string(),
            "sh".to_string(),
            quoted(file),
        ]
    };
    let checkpoints = dir.path().join("checkpoints");
    let jobs = dir.path().join("jobs");
    let everything = dir.path().join("everything");
    let mut specs = Vec::new();
    for (file, events) in [
        (&checkpoints, vec!["checkpoint.committed"]),
        (&jobs, vec!["job.*", "node.lost"]),
        (&everything, vec![]),
    ] {
        let mut spec = command(&[]);
        spec.command = append(file);
        spec.events = events.into_iter().map(String::from).collect();
        specs.push(spec);
    }
    let hooks = Hooks::with_options(&specs, fast_options())?;
    hooks.emit(Event::of(
        "digits",
        &JobStarted {
            job: "digits".into(),
            round: 1,
            world_size: 1,
            step: 0,
            resumed_from: None,
        },
    ));
    hooks.emit(sample_event(100));
    hooks.emit(Event::of(
        "digits",
        &NodeLost {
            job: "digits".into(),
            node: "n1".into(),
            round: 1,
            reason: "lease expired".into(),
        },
    ));
    hooks.emit(Event::new(
        kind::DRIFT_DETECTED,
        "server-a",
        serde_json::json!({}),
    ));
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");

    let kinds = |file: &Path| -> Result<Vec<String>> {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        text.lines()
            .map(|line| Ok(serde_json::from_str::<Event>(line)?.kind))
            .collect()
    };
    assert_eq!(kinds(&checkpoints)?, ["checkpoint.committed"]);
    assert_eq!(kinds(&jobs)?, ["job.started", "node.lost"]);
    assert_eq!(
        kinds(&everything)?,
        [
            "job.started",
            "checkpoint.committed",
            "node.lost",
            "drift.detected"
        ]
    );
    let delivered: Vec<u64> = hooks.stats().iter().map(|s| s.delivered).collect();
    assert_eq!(delivered, [1, 2, 4]);
    Ok(())
}

/// Collects what the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// A current-thread runtime: the delivery task runs on this thread, where the
// capturing subscriber is the default.
#[tokio::test(flavor = "current_thread")]
async fn log_sink_writes_the_event_json() -> Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let spec = HookSpec {
        sink: HookSink::Log,
        url: None,
        ..command(&[])
    };
    let hooks = Hooks::with_options(&[spec], fast_options())?;
    let event = sample_event(21);
    hooks.emit(event.clone());
    ensure!(hooks.flush(FLUSH).await, "flush did not finish");
    let text = String::from_utf8(captured.0.lock().unwrap().clone())?;
    let line = text
        .lines()
        .find(|line| line.contains("hook event"))
        .with_context(|| format!("no hook event line in {text:?}"))?;
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains(&event.to_json()), "{line}");
    Ok(())
}

#[tokio::test]
async fn bad_specs_name_the_hook_and_field() -> Result<()> {
    let receiver_url = "http://127.0.0.1:9/hook";
    let mut missing_file = webhook(receiver_url);
    missing_file.secret_file = Some("/nonexistent/kiln/hook.key".into());
    let error = Hooks::new(&[webhook(receiver_url), missing_file])
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("hooks[1].secret_file: read /nonexistent/kiln/hook.key: "),
        "{error}"
    );

    let mut typo = webhook(receiver_url);
    typo.events = vec!["job.finshed".into()];
    let options = HookOptions {
        field_prefix: "serve.hooks".into(),
        ..HookOptions::default()
    };
    let error = Hooks::with_options(&[typo], options)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("serve.hooks[0].events[0]: unknown event kind \"job.finshed\""),
        "{error}"
    );
    Ok(())
}

#[test]
fn hooks_need_a_runtime_but_none_does_not() {
    let error = Hooks::new(&[command(&["true"])]).unwrap_err();
    assert!(matches!(error, kiln_hooks::Error::NoRuntime), "{error}");
    let none = Hooks::new(&[]).unwrap();
    assert!(none.is_empty());
    none.emit(sample_event(1));
    assert!(none.stats().is_empty());
    assert_eq!(Hooks::none().pending(), 0);
}

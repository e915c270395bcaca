//! Hostile clients against a real server, in process: each test sends one
//! attack over real sockets (raw TCP, raw HTTP/2 frames, reqwest, tonic,
//! hyper) and checks that the server refuses it the way docs/serving.md
//! says and goes on serving. Timeouts in these configs are short (hundreds
//! of milliseconds) so the tests are quick; no test asserts a performance
//! figure.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{dial, url};
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_checkpoint::CheckpointRoot;
use kiln_checkpoint::registry::{ModelDefinition, Registry, Signature};
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::inference::model_infer_request::InferInputTensor;
use kiln_proto::inference::{InferTensorContents, ModelInferRequest, ServerMetadataRequest};
use kiln_proto::spec::{ModelKind, ModelSpec};
use kiln_serve::{RunningServer, ServeConfig};
use serde_json::{Value, json};
use tch::Device;
use tch::nn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const FEATURES: usize = 8;
const CLASSES: usize = 3;

// ----- fixture: one version of model `m` in a real registry -----

fn spec() -> ModelSpec {
    ModelSpec {
        hidden: vec![16],
        channels: vec![],
        ..ModelSpec::new(ModelKind::Mlp)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    registry_url: String,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = format!("file://{}", dir.path().join("ckpt").display());
        let registry_url = format!("file://{}", dir.path().join("registry").display());
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = kiln_models::build(&spec(), FEATURES, CLASSES, &vs).unwrap();
        let root = CheckpointRoot::open(&ckpt).unwrap();
        let digest = common::save_checkpoint(&root, 1, &common::parameters(&vs), "hostile-test");
        let rt = common::runtime();
        rt.block_on(async {
            let registry = Registry::open(&registry_url).await.unwrap();
            let version = common::new_version(
                &ckpt,
                1,
                digest,
                ModelDefinition::classifier(spec(), FEATURES, CLASSES),
                Signature::classifier(FEATURES, CLASSES),
                "hostile-test",
            );
            registry.register("m", version, "test").await.unwrap();
        });
        Fixture {
            _dir: dir,
            registry_url,
            rt,
        }
    }

    fn config(&self) -> ServeConfig {
        let mut c = ServeConfig {
            registry: self.registry_url.clone(),
            models: vec!["m".into()],
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        c.batching.max_batch_size = 4;
        c.drift.enabled = false;
        c
    }

    fn start(&self, config: ServeConfig) -> RunningServer {
        common::start(&self.rt, config)
    }

    fn stop(&self, server: RunningServer) {
        self.rt.block_on(server.shutdown()).unwrap();
    }
}

fn infer_body() -> String {
    json!({"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32",
                       "data": vec![0.25; FEATURES]}]})
    .to_string()
}

fn grpc_infer(model: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, FEATURES as i64],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: vec![0.25; FEATURES],
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`):
/// status, lowercased head, body.
async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    split_response(&out)
}

fn split_response(out: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(out).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Reads until the server closes the connection (EOF or reset); panics if
/// it is still open after `within`.
async fn expect_closed(s: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

async fn metrics_text(server: &RunningServer) -> String {
    let r = reqwest::get(url(server, "/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

// ----- a strict reader of the exposition format -----

/// One sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Parses OpenMetrics / Prometheus text strictly: every line a comment
/// (`# HELP|TYPE|UNIT name ...`), a sample `name{label="value",...} value`
/// with only `\\`, `\"` and `\n` escapes in values, or the final `# EOF`.
/// Panics naming the first line that is not.
fn parse_exposition(text: &str) -> Vec<Sample> {
    fn name_ok(n: &str) -> bool {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "the exposition must end with # EOF"
    );
    let mut samples = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let bad = |why: &str| -> ! { panic!("line {}: {why}: {line:?}\n{text}", i + 1) };
        if *line == "# EOF" {
            if i + 1 != lines.len() {
                bad("# EOF before the end");
            }
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let kind = parts.next().unwrap_or_default();
            if !["HELP", "TYPE", "UNIT"].contains(&kind) {
                bad("unknown comment");
            }
            if !parts.next().is_some_and(name_ok) {
                bad("bad metric name in comment");
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad("no value"));
        let name = &line[..name_end];
        if !name_ok(name) {
            bad("bad metric name");
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            loop {
                // label name
                let start = chars.peek().map(|&(i, _)| i).unwrap_or_else(|| bad("cut"));
                if inner[start..].starts_with('}') {
                    rest = &inner[start + 1..];
                    break;
                }
                let eq = inner[start..].find("=\"").unwrap_or_else(|| bad("no =\""));
                let lname = &inner[start..start + eq];
                if !name_ok(lname) {
                    bad("bad label name");
                }
                while chars.peek().is_some_and(|&(i, _)| i < start + eq + 2) {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        None => bad("unterminated label value"),
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => bad("bad escape in label value"),
                        },
                        Some((_, c)) => value.push(c),
                    }
                }
                labels.push((lname.to_string(), value));
                match chars.next() {
                    Some((_, ',')) => {}
                    Some((i, '}')) => {
                        rest = &inner[i + 1..];
                        break;
                    }
                    _ => bad("expected , or } after a label"),
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| bad("no space before the value"));
        let value = value.split(' ').next().unwrap_or_default();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| bad("value is not a number")),
        };
        samples.push((name.to_string(), labels, value));
    }
    samples
}

// ----- metrics labels -----

#[test]
fn client_model_names_never_become_labels_and_metrics_stay_parseable() {
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("t");
    std::fs::write(&token, "infer-secret").unwrap();
    let mut config = f.config();
    config.auth.token_file = Some(token);
    let server = f.start(config);
    f.rt.block_on(async {
        let c = reqwest::Client::new();
        let hostile = [
            "random-3f9a7c".to_string(),
            "quote%22%7D%201%0Akiln_fake_total%207".to_string(), // `"} 1\nkiln_fake_total 7`
            "new%0Aline".to_string(),
            "back%5Cslash".to_string(),
            "x".repeat(2000),
        ];
        for name in &hostile {
            for token in ["infer-secret", "wrong"] {
                let r = c
                    .post(url(&server, &format!("/v2/models/{name}/infer")))
                    .bearer_auth(token)
                    .body(infer_body())
                    .send()
                    .await
                    .unwrap();
                let want = if token == "wrong" { 401 } else { 404 };
                assert_eq!(r.status(), want, "{name}");
            }
        }
        // The served model without the right token is not named either.
        let r = c
            .post(url(&server, "/v2/models/m/infer"))
            .body(infer_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        // gRPC: hostile names with and without a token.
        let mut g = GrpcInferenceServiceClient::connect(url(&server, ""))
            .await
            .unwrap();
        for name in ["grpc\"name\n{", "grpc-random-77"] {
            let e = g.model_infer(grpc_infer(name)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            let mut r = tonic::Request::new(grpc_infer(name));
            r.metadata_mut()
                .insert("authorization", "Bearer infer-secret".parse().unwrap());
            let e = g.model_infer(r).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound);
        }
        // A served model with the token is named.
        let r = c
            .post(url(&server, "/v2/models/m/infer"))
            .bearer_auth("infer-secret")
            .body(infer_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);

        let text = metrics_text(&server).await;
        assert!(!text.contains("kiln_fake"), "{text}");
        let samples = parse_exposition(&text);
        let mut models = std::collections::BTreeSet::new();
        for (_, labels, _) in &samples {
            for (k, v) in labels {
                if k == "model" {
                    models.insert(v.clone());
                }
            }
        }
        let want: std::collections::BTreeSet<String> =
            ["_unknown", "m"].iter().map(|s| s.to_string()).collect();
        assert_eq!(models, want, "{text}");
        let unknown = |protocol: &str, kind: &str| {
            let series = format!(
                "kiln_serve_errors_total{{model=\"_unknown\",version=\"\",protocol=\"{protocol}\",kind=\"{kind}\"}}"
            );
            metric(&text, &series)
        };
        assert_eq!(unknown("http", "unauthorized"), 6.0);
        assert_eq!(unknown("http", "not_found"), 5.0);
        assert_eq!(unknown("grpc", "unauthorized"), 2.0);
        assert_eq!(unknown("grpc", "not_found"), 2.0);
    });
    f.stop(server);
}

// ----- connection limits and timeouts -----

#[test]
fn stalled_connections_are_closed_at_the_header_timeout_and_do_not_lock_clients_out() {
    let f = Fixture::new();
    let mut config = f.config();
    config.connections.max_connections = 4;
    config.connections.header_read_timeout_ms = 300;
    let server = f.start(config);
    let addr = dial(&server);
    f.rt.block_on(async {
        // Take every connection slot: two unfinished heads, one silent
        // connection, one that trickles a header byte every 50 ms. All four
        // connect before the real client, so the accept loop (first come,
        // first served) gives them the slots.
        let t0 = tokio::time::Instant::now();
        let mut stalled = Vec::new();
        for head in [
            "GET /v2/health/live HTTP/1.1\r\nHost: x\r\n",
            "POST /v2/models/m/infer HTTP/1.1\r\n",
            "",
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            stalled.push(s);
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        let trickler = tokio::spawn(async move {
            s.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").await.unwrap();
            let started = tokio::time::Instant::now();
            // Until the server closes it (a write fails) or 10 s pass.
            while started.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if s.write_all(b"a").await.is_err() {
                    return true;
                }
                let mut b = [0u8; 1];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
                {
                    return true;
                }
            }
            false
        });
        // A real client behind them: waits in the backlog until a stalled
        // connection times out (no sooner than the header timeout), then is served.
        let (status, _, _) = raw_http(
            addr,
            "GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "served before a slot was free"
        );
        for (i, s) in stalled.iter_mut().enumerate() {
            let seen = expect_closed(s, Duration::from_secs(5), &format!("stalled {i}")).await;
            assert!(seen.is_empty(), "no answer to an unfinished head: {seen:?}");
        }
        assert!(
            trickler.await.unwrap(),
            "the trickling connection was not closed"
        );
        let text = metrics_text(&server).await;
        assert!(
            metric(
                &text,
                "kiln_serve_connection_timeouts_total{kind=\"header\"}"
            ) >= 4.0,
            "{text}"
        );
    });
    f.stop(server);
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_idle_timeout_not_the_header_timeout() {
    let f = Fixture::new();
    let mut config = f.config();
    config.connections.header_read_timeout_ms = 300;
    config.connections.idle_timeout_ms = 1000;
    config.connections.http2_keepalive_interval_ms = 0;
    let server = f.start(config);
    let addr = dial(&server);
    f.rt.block_on(async {
        let request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = vec![0u8; 4096];
        for round in 0..2 {
            s.write_all(request).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let (status, _, _) = split_response(&buf[..n]);
            assert_eq!(status, 200, "round {round}");
            // Idle longer than the header timeout: still open for the next request.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        let seen = expect_closed(&mut s, Duration::from_secs(5), "idle HTTP/1.1").await;
        assert!(seen.is_empty(), "{seen:?}");

        // HTTP/2: an open connection without streams gets a GOAWAY, then is closed.
        let mut h2 = TcpStream::connect(addr).await.unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        let seen = expect_closed(&mut h2, Duration::from_secs(5), "idle HTTP/2").await;
        assert!(frame_types(&seen).contains(&GOAWAY), "{seen:?}");
        let text = metrics_text(&server).await;
        assert!(metric(&text, "kiln_serve_connection_timeouts_total{kind=\"idle\"}") >= 2.0);
    });
    f.stop(server);
}

const PING: u8 = 6;
const GOAWAY: u8 = 7;

/// The types of the HTTP/2 frames in `bytes` (server to client: no preface).
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len =
            (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[test]
fn an_http2_client_that_stops_answering_pings_is_disconnected() {
    let f = Fixture::new();
    let mut config = f.config();
    config.connections.http2_keepalive_interval_ms = 100;
    config.connections.http2_keepalive_timeout_ms = 200;
    config.connections.idle_timeout_ms = 60_000;
    let server = f.start(config);
    let addr = dial(&server);
    f.rt.block_on(async {
        let mut h2 = TcpStream::connect(addr).await.unwrap();
        // Preface, empty SETTINGS, and an ACK of the server's SETTINGS; then silence.
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x04\x01\x00\x00\x00\x00")
            .await
            .unwrap();
        let seen = expect_closed(&mut h2, Duration::from_secs(5), "unresponsive HTTP/2").await;
        assert!(frame_types(&seen).contains(&PING), "{seen:?}");
    });
    f.stop(server);
}

// ----- overload -----

#[test]
fn past_the_in_flight_cap_requests_get_503_or_unavailable_with_retry_after() {
    let f = Fixture::new();
    let mut config = f.config();
    config.connections.max_in_flight = 1;
    let server = f.start(config);
    let addr = dial(&server);
    f.rt.block_on(async {
        // One request in flight: its body never finishes arriving.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(
            b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\"",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;

        let r = reqwest::Client::new()
            .post(url(&server, "/v2/models/m/infer"))
            .body(infer_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert!(v["error"].as_str().unwrap().contains("limit of 1 requests"), "{v}");

        let mut g = GrpcInferenceServiceClient::connect(url(&server, ""))
            .await
            .unwrap();
        let e = g
            .server_metadata(ServerMetadataRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert_eq!(e.metadata().get("retry-after").unwrap(), "1");
        // Probes are not counted: an overloaded server is still alive.
        assert!(g.server_live(kiln_proto::inference::ServerLiveRequest {}).await.is_ok());
        let (status, _, _) = raw_http(
            addr,
            "GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);

        // The slow request ends: the slot is free again.
        drop(slow);
        let mut ok = false;
        for _ in 0..50 {
            let r = reqwest::Client::new()
                .post(url(&server, "/v2/models/m/infer"))
                .body(infer_body())
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok, "the in-flight slot was not given back");
        let text = metrics_text(&server).await;
        assert_eq!(
            metric(
                &text,
                "kiln_serve_errors_total{model=\"_unknown\",version=\"\",protocol=\"http\",kind=\"unavailable\"}"
            ),
            1.0
        );
        assert_eq!(metric(&text, "kiln_serve_in_flight_requests"), 0.0, "every permit given back (/metrics is not counted)");
    });
    f.stop(server);
}

// ----- gRPC: token and sizes before decoding -----

/// Sends a gRPC call whose body is `prefix` and then never ends; returns the
/// response's `grpc-status` (from the headers of a trailers-only answer, or
/// the trailers).
async fn grpc_with_stalled_body(
    addr: SocketAddr,
    method: &str,
    token: Option<&str>,
    prefix: Vec<u8>,
) -> (i32, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
    tx.unbounded_send(Ok(Frame::data(Bytes::from(prefix))))
        .unwrap();
    let mut request = hyper::Request::post(format!(
        "http://{addr}/inference.GRPCInferenceService/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    if let Some(t) = token {
        request = request.header("authorization", format!("Bearer {t}"));
    }
    let request = request.body(StreamBody::new(rx)).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("no answer within 5 s: the server waited for the body")
        .unwrap();
    let status = |h: &hyper::HeaderMap| {
        h.get("grpc-status")
            .map(|v| v.to_str().unwrap().parse::<i32>().unwrap())
    };
    let message = |h: &hyper::HeaderMap| {
        h.get("grpc-message")
            .map(|v| percent_decode(v.to_str().unwrap()))
            .unwrap_or_default()
    };
    let headers = response.headers().clone();
    drop(tx);
    if let Some(code) = status(&headers) {
        return (code, message(&headers));
    }
    let trailers = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .trailers()
        .cloned()
        .unwrap_or_default();
    (
        status(&trailers).expect("no grpc-status"),
        message(&trailers),
    )
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn frame_header(len: u32) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&len.to_be_bytes());
    v
}

#[test]
fn grpc_is_refused_before_decoding_without_a_token_and_past_the_size_limits() {
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("t");
    std::fs::write(&token, "infer-secret").unwrap();
    let mut config = f.config();
    config.auth.token_file = Some(token);
    config.limits.max_request_bytes = 1 << 20;
    let server = f.start(config);
    let addr = dial(&server);
    f.rt.block_on(async {
        let unauthenticated = tonic::Code::Unauthenticated as i32;
        let exhausted = tonic::Code::ResourceExhausted as i32;
        // No token: refused on the headers, although the message (which
        // claims 1 MiB, within the limit) never finishes arriving.
        let mut prefix = frame_header(1 << 20);
        prefix.extend_from_slice(&[0u8; 1024]);
        let (code, message) = grpc_with_stalled_body(addr, "ModelInfer", None, prefix).await;
        assert_eq!(code, unauthenticated, "{message}");
        // A length prefix of 4 GiB: refused at once, nothing allocated or awaited.
        let (code, message) =
            grpc_with_stalled_body(addr, "ModelInfer", Some("infer-secret"), frame_header(u32::MAX))
                .await;
        assert_eq!(code, exhausted, "{message}");
        assert!(message.contains("4294967295 bytes"), "{message}");
        // Other methods take small messages only.
        let (code, message) = grpc_with_stalled_body(
            addr,
            "ModelMetadata",
            Some("infer-secret"),
            frame_header(1 << 20),
        )
        .await;
        assert_eq!(code, exhausted, "{message}");

        // Packed integers: 300 KB on the wire, 28 bytes each once decoded.
        let mut g = GrpcInferenceServiceClient::connect(url(&server, ""))
            .await
            .unwrap();
        let authorized = |m: ModelInferRequest| {
            let mut r = tonic::Request::new(m);
            r.metadata_mut()
                .insert("authorization", "Bearer infer-secret".parse().unwrap());
            r
        };
        let mut packed = grpc_infer("m");
        packed.inputs[0].datatype = "INT64".into();
        packed.inputs[0].shape = vec![300_000 / FEATURES as i64, FEATURES as i64];
        packed.inputs[0].contents = Some(InferTensorContents {
            int64_contents: vec![0; 300_000],
            ..Default::default()
        });
        let e = g.model_infer(authorized(packed)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("decodes to"), "{e}");
        // Empty outputs: 2 wire bytes each.
        let mut outputs = grpc_infer("m");
        outputs.outputs = vec![Default::default(); 200_000];
        let e = g.model_infer(authorized(outputs)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");

        // And the server serves on.
        let r = g.model_infer(authorized(grpc_infer("m"))).await.unwrap();
        assert_eq!(r.into_inner().raw_output_contents.len(), 2);
        let text = metrics_text(&server).await;
        assert!(
            metric(
                &text,
                "kiln_serve_errors_total{model=\"_unknown\",version=\"\",protocol=\"grpc\",kind=\"too_large\"}"
            ) >= 4.0
        );
    });
    f.stop(server);
}

// ----- management -----

async fn index(
    c: &reqwest::Client,
    server: &RunningServer,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut r = c.post(url(server, "/v2/repository/index"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[test]
fn management_needs_json_and_refuses_proxied_requests_without_a_token() {
    let f = Fixture::new();
    let server = f.start(f.config());
    f.rt.block_on(async {
        let c = reqwest::Client::new();
        assert_eq!(index(&c, &server, &[JSON]).await.0, 200);
        // Cross-site form posts and no-CORS fetches cannot send JSON.
        for ct in [
            None,
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("text/plain"),
        ] {
            let headers: Vec<(&str, &str)> = ct.map(|v| ("content-type", v)).into_iter().collect();
            let (status, body) = index(&c, &server, &headers).await;
            assert_eq!(status, 415, "{ct:?}: {body}");
            let r = c
                .post(url(&server, "/v2/repository/models/m/unload"))
                .header("content-type", ct.unwrap_or("text/plain"))
                .body("name=m")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 415, "{ct:?}");
        }
        // Reading the index is a GET, no body: allowed.
        assert_eq!(
            c.get(url(&server, "/v2/repository/index"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        // Through a proxy on this machine, loopback means nothing.
        for proxy in [
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
        ] {
            let (status, body) = index(&c, &server, &[JSON, proxy]).await;
            assert_eq!(status, 403, "{proxy:?}: {body}");
            assert!(body.contains("proxy"), "{body}");
        }
        // Still served: nothing was unloaded.
        let r = c
            .post(url(&server, "/v2/models/m/infer"))
            .body(infer_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    f.stop(server);
}

#[test]
fn management_on_a_non_loopback_listener_needs_the_management_token() {
    let f = Fixture::new();
    let mut config = f.config();
    config.listen = "0.0.0.0:0".parse().unwrap();
    let server = f.start(config);
    f.rt.block_on(async {
        let c = reqwest::Client::new();
        // From loopback, but the server is reachable from everywhere.
        let (status, body) = index(&c, &server, &[JSON]).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("non-loopback"), "{body}");
        let r = c
            .post(url(&server, "/v2/repository/models/m/unload"))
            .header(JSON.0, JSON.1)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        // Inference is unaffected.
        let r = c
            .post(url(&server, "/v2/models/m/infer"))
            .body(infer_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    f.stop(server);

    let dir = tempfile::tempdir().unwrap();
    let mut config = f.config();
    config.listen = "0.0.0.0:0".parse().unwrap();
    set_admin_token(&mut config, dir.path());
    let server = f.start(config);
    f.rt.block_on(async {
        let c = reqwest::Client::new();
        assert_eq!(index(&c, &server, &[JSON]).await.0, 401);
        let auth = ("authorization", "Bearer admin-secret");
        assert_eq!(index(&c, &server, &[JSON, auth]).await.0, 200);
        assert_eq!(index(&c, &server, &[auth]).await.0, 415);
    });
    f.stop(server);
}

/// Sets `config`'s management token to `admin-secret`, from a file in `dir`.
fn set_admin_token(config: &mut ServeConfig, dir: &std::path::Path) {
    let admin = dir.join("a");
    std::fs::write(&admin, "admin-secret").unwrap();
    config.auth.admin_token_file = Some(admin);
}

/// DNS rebinding: a web page whose name an attacker rebinds to 127.0.0.1
/// reaches a loopback server from the visitor's browser but names its own
/// host, so token-less management answers only loopback host names (421
/// otherwise) and changes nothing; with the management token, or for
/// inference, the host does not matter.
#[test]
fn token_less_management_answers_only_loopback_host_names() {
    let f = Fixture::new();
    let server = f.start(f.config());
    let port = dial(&server).port();
    f.rt.block_on(async {
        let c = reqwest::Client::new();
        for host in [
            format!("evil.example:{port}"),
            format!("localhost.evil.example:{port}"),
        ] {
            let rebound = ("host", host.as_str());
            let (status, body) = index(&c, &server, &[JSON, rebound]).await;
            assert_eq!(status, 421, "{host}: {body}");
            assert!(body.contains("rebound"), "{body}");
            for action in ["unload", "load"] {
                let r = c
                    .post(url(&server, &format!("/v2/repository/models/m/{action}")))
                    .header(JSON.0, JSON.1)
                    .header("host", &host)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 421, "{action} for {host}");
            }
            // Inference is not management: the host does not matter.
            let r = c
                .post(url(&server, "/v2/models/m/infer"))
                .header("host", &host)
                .body(infer_body())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{host}");
        }
        // Nothing was unloaded or reloaded.
        let (status, body) = index(&c, &server, &[JSON]).await;
        assert_eq!(status, 200, "{body}");
        let listed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
        assert_eq!(listed[0]["name"], "m", "{listed}");
        // Loopback names pass.
        for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
            let (status, body) = index(&c, &server, &[JSON, ("host", host.as_str())]).await;
            assert_eq!(status, 200, "{host}: {body}");
        }
        let r = c
            .post(url(&server, "/v2/repository/models/m/unload"))
            .header(JSON.0, JSON.1)
            .header("host", format!("localhost:{port}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    f.stop(server);

    // With the management token, a rebound host name changes nothing.
    let dir = tempfile::tempdir().unwrap();
    let mut config = f.config();
    set_admin_token(&mut config, dir.path());
    let server = f.start(config);
    let port = dial(&server).port();
    f.rt.block_on(async {
        let c = reqwest::Client::new();
        let host = format!("evil.example:{port}");
        let auth = ("authorization", "Bearer admin-secret");
        let (status, body) = index(&c, &server, &[JSON, auth, ("host", host.as_str())]).await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = index(&c, &server, &[JSON, ("host", host.as_str())]).await;
        assert_eq!(status, 401);
    });
    f.stop(server);
}

// ----- TLS -----

struct Tls {
    _dir: tempfile::TempDir,
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
    cert_pem: String,
}

/// A self-signed certificate for `localhost` and 127.0.0.1.
fn self_signed() -> Tls {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, signing_key.serialize_pem()).unwrap();
    Tls {
        _dir: dir,
        cert_file,
        key_file,
        cert_pem: cert.pem(),
    }
}

#[test]
fn tls_serves_rest_and_grpc_to_real_clients() {
    let f = Fixture::new();
    let tls = self_signed();
    let mut config = f.config();
    config.tls.cert_file = Some(tls.cert_file.clone());
    config.tls.key_file = Some(tls.key_file.clone());
    let server = f.start(config);
    let addr = dial(&server);
    f.rt.block_on(async {
        // REST over HTTPS, HTTP/1.1 and HTTP/2 (ALPN), verifying the certificate.
        let ca = reqwest::Certificate::from_pem(tls.cert_pem.as_bytes()).unwrap();
        for http1 in [true, false] {
            let mut b = reqwest::Client::builder()
                .tls_certs_only([ca.clone()])
                .resolve("localhost", addr);
            if http1 {
                b = b.http1_only();
            }
            let c = b.build().unwrap();
            let base = format!("https://localhost:{}", addr.port());
            let r = c
                .get(format!("{base}/v2/health/ready"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let want = if http1 {
                reqwest::Version::HTTP_11
            } else {
                reqwest::Version::HTTP_2
            };
            assert_eq!(r.version(), want);
            let r = c
                .post(format!("{base}/v2/models/m/infer"))
                .body(infer_body())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(v["outputs"][0]["shape"], json!([1, CLASSES]));
        }
        // A client that does not trust the certificate is refused.
        let untrusting = reqwest::Client::builder()
            .resolve("localhost", addr)
            .build()
            .unwrap();
        assert!(
            untrusting
                .get(format!("https://localhost:{}/v2/health/live", addr.port()))
                .send()
                .await
                .is_err()
        );
        // Plain HTTP on the TLS port gets no HTTP answer.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let seen = expect_closed(&mut s, Duration::from_secs(5), "plain HTTP on TLS").await;
        assert!(
            !seen.starts_with(b"HTTP/"),
            "{:?}",
            String::from_utf8_lossy(&seen)
        );

        // gRPC over TLS with ALPN h2.
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        roots
            .add(
                rustls::pki_types::CertificateDer::from_pem_slice(tls.cert_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://localhost:{}", addr.port()))
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_: hyper::Uri| {
                    let connector = connector.clone();
                    async move {
                        let tcp = TcpStream::connect(addr).await?;
                        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                        let tls = connector.connect(name, tcp).await?;
                        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                        Ok::<_, std::io::Error>(TokioIo::new(tls))
                    }
                }))
                .await
                .unwrap();
        let mut g = GrpcInferenceServiceClient::new(channel);
        let r = g.model_infer(grpc_infer("m")).await.unwrap().into_inner();
        assert_eq!(r.model_name, "m");
        assert_eq!(r.raw_output_contents[0].len(), CLASSES * 4);
    });
    f.stop(server);
}

#[test]
fn bad_tls_files_stop_the_server_with_the_field_named() {
    let f = Fixture::new();
    let tls = self_signed();
    let mut config = f.config();
    config.tls.cert_file = Some(tls.key_file.clone());
    config.tls.key_file = Some(tls.key_file.clone());
    let e =
        f.rt.block_on(kiln_serve::start(config, CancellationToken::new()))
            .unwrap_err();
    assert!(format!("{e:#}").contains("tls.cert_file"), "{e:#}");
    let mut config = f.config();
    config.tls.cert_file = Some(tls.cert_file.clone());
    config.tls.key_file = Some(tls.cert_file.clone());
    let e =
        f.rt.block_on(kiln_serve::start(config, CancellationToken::new()))
            .unwrap_err();
    assert!(format!("{e:#}").contains("tls.key_file"), "{e:#}");
}

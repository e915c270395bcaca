//! End-to-end tests of `kiln serve`: the real binary serving a model trained
//! by `kiln run` and registered through the registry API, driven by the
//! unmodified `tritonclient` Python package (HTTP and gRPC) and by raw HTTP.
//!
//! Answers are compared bit for bit with PyTorch running the same weights
//! (exported from the same checkpoint) at the server's fixed batch shape; see
//! tests/serve_client.py. Over TLS (`[tls]` in the config file, a self-signed
//! certificate for `localhost`), the same clients verify the certificate
//! against its CA and are refused without it. Tests run one at a time (a
//! shared lock): each starts a training run, a server and Python clients on a
//! small machine.

mod common;

use common::repo;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_checkpoint::registry::{
    CheckpointRef, Lineage, ModelDefinition, NewVersion, Registry, Signature,
};
use kiln_checkpoint::{CheckpointRoot, TensorView};
use kiln_proto::spec::{ModelKind, ModelSpec};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "warn").env_remove("KILN_REGISTRY");
    cmd
}

fn python() -> PathBuf {
    repo().join(".venv/bin/python")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Trains the digits example for 30 steps (checkpoints at 10, 20, 30);
/// returns the checkpoint root URL.
fn train(data_dir: &Path) -> String {
    let out = kiln()
        .args(["run", "examples/digits/job.toml", "--json"])
        .args(["--set", "train.steps=30", "--set", "checkpoint.interval=10"])
        .arg("--data-dir")
        .arg(data_dir)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    summary["checkpoint_root"].as_str().unwrap().to_string()
}

/// Registers the checkpoint of `step` as a new version of `digits` in the
/// registry at `registry_url` and exports its weights for PyTorch.
fn register(registry_url: &str, root_url: &str, step: u64, dir: &Path) -> (u64, PathBuf) {
    let root = CheckpointRoot::open(root_url).unwrap();
    let manifest = kiln_checkpoint::resolve(&root, &step.to_string()).unwrap();
    let weights = kiln_checkpoint::load(&root, &manifest, |n| n.starts_with("model/")).unwrap();
    let views: Vec<TensorView<'_>> = weights
        .iter()
        .map(|t| TensorView {
            name: &t.name["model/".len()..],
            ..t.view()
        })
        .collect();
    let digest = kiln_checkpoint::weights_digest(&views);
    let path = dir.join(format!("weights-{step}.safetensors"));
    kiln_checkpoint::export_safetensors(&root, &manifest, |n| n.starts_with("model/"), &path)
        .unwrap();
    let new = NewVersion {
        checkpoint: CheckpointRef {
            root: root_url.to_string(),
            step,
            digest,
        },
        model: ModelDefinition::classifier(
            ModelSpec {
                hidden: vec![128, 64],
                channels: vec![],
                ..ModelSpec::new(ModelKind::Mlp)
            },
            64,
            10,
        ),
        signature: Signature::classifier(64, 10),
        metrics: Default::default(),
        lineage: Lineage {
            job: "digits".into(),
            spec_hash: "0".repeat(64),
            dataset_fingerprint: "digits".into(),
            code_version: "test".into(),
        },
        reference_profile: None,
        torchscript: None,
        tokenizer: None,
    };
    let version = runtime().block_on(async {
        let registry = Registry::open(registry_url).await.unwrap();
        registry.register("digits", new, "test").await.unwrap()
    });
    (version.version, path)
}

fn registry_do<T>(url: &str, f: impl AsyncFnOnce(Registry) -> T) -> T {
    runtime().block_on(async {
        let registry = Registry::open(url).await.unwrap();
        f(registry).await
    })
}

/// A `kiln serve` process, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Whether it announced `https://` (TLS configured).
    https: bool,
    stderr: PathBuf,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Server {
        let stderr = dir.join(format!("serve-{}.err", std::process::id()));
        let mut cmd = kiln();
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("KILN_SERVE_TOKEN")
            .env_remove("KILN_SERVE_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("kiln serve: listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let (https, addr) = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => match url.split_once("://") {
                Some(("http", addr)) => (false, addr.parse().unwrap()),
                Some(("https", addr)) => (true, addr.parse().unwrap()),
                _ => panic!("kiln serve announced {url:?}"),
            },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "kiln serve did not start:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        Server {
            child,
            addr,
            https,
            stderr,
        }
    }

    fn url(&self) -> String {
        self.addr.to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed on drop (a failed assertion must not leave it running).
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A minimal HTTP/1.1 exchange: (status, headers, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body; ignore a reset.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {}", String::from_utf8_lossy(&out)));
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, out[split + 4..].to_vec())
}

/// Asserts an OIP error: `status` and `{"error": "...contains..."}`.
fn expect_error(got: (u16, String, Vec<u8>), status: u16, contains: &str) {
    let (code, head, body) = got;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, status, "{head}\n{text}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains(contains), "{msg:?} lacks {contains:?}");
}

/// Runs the Python client; returns its last stdout line as JSON.
/// The batching arguments every server here runs with: one shape of
/// `rows` rows, so answers are independent of batching, bit for bit (the
/// client compares with passes of exactly this many rows), and one thread.
fn one_shape(rows: &str) -> [&str; 6] {
    [
        "--max-batch-size",
        rows,
        "--batch-shapes",
        rows,
        "--threads",
        "1",
    ]
}

fn client(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(repo().join("tests/serve_client.py"))
        .args(args)
        .env("KILN_TEST_TORCH_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "serve_client.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

/// Asserts what `serve_checks` in tests/serve_client.py found: server and
/// model health and the model's metadata over HTTP and gRPC, and answers of
/// `version` equal to PyTorch's bit for bit over HTTP binary, HTTP JSON and gRPC.
fn assert_serves(r: &serde_json::Value, version: &str) {
    for protocol in ["http", "grpc"] {
        let p = &r[protocol];
        assert_eq!(p["live"], true, "{protocol}: {p}");
        assert_eq!(p["server_ready"], true, "{protocol}: {p}");
        assert_eq!(p["model_ready"], true, "{protocol}: {p}");
        assert_eq!(
            p["metadata_inputs"],
            serde_json::json!([{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]),
            "{protocol}"
        );
    }
    for mode in ["http_binary", "http_json", "grpc"] {
        let m = &r["modes"][mode];
        assert_eq!(m["version"], version, "{mode}");
        assert_eq!(m["bitwise"], true, "{mode}: {m}");
        assert_eq!(m["predictions"], true, "{mode}: {m}");
    }
}

/// Sum of `kiln_serve_requests_total` of one version over protocols.
fn answered(addr: SocketAddr, version: u64) -> f64 {
    let (_, _, body) = http(addr, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(body).unwrap();
    let prefix = format!("kiln_serve_requests_total{{model=\"digits\",version=\"{version}\",");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn gauge(addr: SocketAddr, line_prefix: &str) -> Option<f64> {
    let (_, _, body) = http(addr, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn tritonclient_http_and_grpc_answers_match_pytorch_bit_for_bit() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = train(&dir.path().join("data"));
    let registry = format!("file://{}", dir.path().join("registry").display());
    let (version, weights) = register(&registry, &root, 30, dir.path());
    assert_eq!(version, 1);
    registry_do(&registry, async |r| {
        r.promote("digits", "production", 1, None, "test")
            .await
            .unwrap()
    });
    let server = Server::start(
        &[
            &["--registry", &registry, "--model", "digits@production"][..],
            &one_shape("16"),
        ]
        .concat(),
        &[],
        dir.path(),
    );
    let r = client(&[
        "roundtrip",
        "--url",
        &server.url(),
        "--weights",
        weights.to_str().unwrap(),
        "--batch",
        "16",
        "--rows",
        "37",
    ]);
    eprintln!("{r}");
    assert!(!server.https);
    assert_serves(&r, "1");
    let c = &r["concurrent"];
    assert_eq!(c["answered"], 80, "{c}");
    assert_eq!(c["failures"], serde_json::json!([]), "{c}");
    assert_eq!(c["mismatches"], serde_json::json!([]), "{c}");
    // The server saw batches of several requests (8 concurrent clients).
    let batches = gauge(
        server.addr,
        "kiln_serve_batch_size_count{model=\"digits\",version=\"1\"}",
    )
    .unwrap();
    let rows = gauge(
        server.addr,
        "kiln_serve_batch_size_sum{model=\"digits\",version=\"1\"}",
    )
    .unwrap();
    eprintln!("{batches} batches, {rows} rows");
    let status = server.stop();
    assert!(
        status.success(),
        "kiln serve exited with {status} on SIGTERM"
    );
}

#[test]
fn swap_rollback_and_canary_under_load_fail_no_request() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = train(&dir.path().join("data"));
    let registry = format!("file://{}", dir.path().join("registry").display());
    let (v1, w1) = register(&registry, &root, 10, dir.path());
    let (v2, w2) = register(&registry, &root, 30, dir.path());
    assert_eq!((v1, v2), (1, 2));
    registry_do(&registry, async |r| {
        r.promote("digits", "production", 1, None, "test")
            .await
            .unwrap()
    });
    let server = Server::start(
        &[
            &["--registry", &registry, "--model", "digits@production"][..],
            &one_shape("8"),
            &["--poll-interval-ms", "100", "--canary-seed", "7"],
        ]
        .concat(),
        &[],
        dir.path(),
    );
    let stop_file = dir.path().join("stop");
    let versions = format!("1={},2={}", w1.display(), w2.display());
    let mut load = ChildGuard(Some(
        Command::new(python())
            .arg(repo().join("tests/serve_client.py"))
            .args([
                "load",
                "--url",
                &server.url(),
                "--batch",
                "8",
                "--threads",
                "4",
            ])
            .args(["--versions", &versions])
            .arg("--stop-file")
            .arg(&stop_file)
            .env("KILN_TEST_TORCH_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let addr = server.addr;

    wait_until("answers from version 1", || answered(addr, 1) > 30.0);
    registry_do(&registry, async |r| {
        r.promote("digits", "production", 2, None, "test")
            .await
            .unwrap()
    });
    wait_until("answers from version 2", || answered(addr, 2) > 30.0);

    // Roll back: the alias moves back to version 1.
    let before = answered(addr, 1);
    registry_do(&registry, async |r| {
        r.rollback("digits", "production", "test").await.unwrap()
    });
    wait_until("answers from version 1 after the rollback", || {
        answered(addr, 1) > before + 30.0
    });

    // Canary: 20% of the traffic to version 2.
    registry_do(&registry, async |r| {
        r.promote("digits", "production", 2, Some(20), "test")
            .await
            .unwrap()
    });
    let weight2 = "kiln_serve_version_weight{model=\"digits\",version=\"2\"}";
    wait_until("the canary split", || gauge(addr, weight2) == Some(20.0));
    let (a1, a2) = (answered(addr, 1), answered(addr, 2));
    wait_until("400 canary answers", || {
        answered(addr, 1) + answered(addr, 2) - a1 - a2 >= 400.0
    });
    let (d1, d2) = (answered(addr, 1) - a1, answered(addr, 2) - a2);
    let share = d2 / (d1 + d2);
    eprintln!("canary: {d1} answers from version 1, {d2} from version 2 ({share:.3})");
    // n >= 400 at p = 0.2: standard deviation <= 0.02; 0.1..0.3 is 5 sigma.
    assert!((0.1..=0.3).contains(&share), "canary share {share}");

    std::fs::write(&stop_file, b"").unwrap();
    let out = load.0.take().unwrap().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    eprintln!("load: {r}");
    assert_eq!(r["failures"], 0, "requests failed during swaps: {r}");
    assert_eq!(
        r["mismatches"], 0,
        "answers not from the version they named: {r}"
    );
    assert!(r["answers"]["1"].as_u64().unwrap() > 0 && r["answers"]["2"].as_u64().unwrap() > 0);
    assert_eq!(
        gauge(addr, "kiln_serve_swaps_total{model=\"digits\"}"),
        Some(3.0),
        "{}",
        server.log()
    );
    assert!(server.stop().success());
}

#[test]
fn limits_tokens_and_bad_requests_over_the_wire() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = train(&dir.path().join("data"));
    let registry = format!("file://{}", dir.path().join("registry").display());
    let (_, weights) = register(&registry, &root, 30, dir.path());
    let admin = dir.path().join("admin-token");
    std::fs::write(&admin, "admin-secret\n").unwrap();
    let server = Server::start(
        &[
            &["--registry", &registry, "--model", "digits"][..],
            &one_shape("16"),
            &[
                "--max-request-bytes",
                "65536",
                "--max-request-rows",
                "100",
                "--admin-token-file",
                admin.to_str().unwrap(),
            ],
        ]
        .concat(),
        &[("KILN_SERVE_TOKEN", "infer-secret")],
        dir.path(),
    );
    let a = server.addr;
    let auth = ("Authorization", "Bearer infer-secret");
    let infer = "/v2/models/digits/infer";
    let one = |rows: usize, cols: usize| {
        serde_json::json!({"inputs": [{"name": "input", "shape": [rows, cols], "datatype": "FP32",
                                       "data": vec![0.5; rows * cols]}]})
        .to_string()
    };

    // Tokens.
    expect_error(
        http(a, "POST", infer, &[], one(1, 64).as_bytes()),
        401,
        "bearer token",
    );
    expect_error(
        http(
            a,
            "POST",
            infer,
            &[("Authorization", "Bearer nope")],
            one(1, 64).as_bytes(),
        ),
        401,
        "bearer token",
    );
    let (code, _, _) = http(a, "POST", infer, &[auth], one(1, 64).as_bytes());
    assert_eq!(code, 200);
    let (code, _, _) = http(a, "GET", "/v2/health/ready", &[], b"");
    assert_eq!(code, 200, "health needs no token");
    expect_error(
        http(
            a,
            "POST",
            "/v2/repository/models/digits/unload",
            &[auth],
            b"",
        ),
        401,
        "management",
    );
    // tritonclient with the token (HTTP and gRPC metadata) works.
    let r = client(&[
        "roundtrip",
        "--url",
        &server.url(),
        "--weights",
        weights.to_str().unwrap(),
        "--batch",
        "16",
        "--rows",
        "5",
        "--token",
        "infer-secret",
    ]);
    assert_serves(&r, "1");

    // Malformed and oversized requests: 4xx with the protocol's error JSON.
    let h = &[auth];
    expect_error(
        http(a, "POST", infer, h, b"{\"inputs\": ["),
        400,
        "invalid request JSON",
    );
    expect_error(
        http(a, "POST", infer, h, one(1, 63).as_bytes()),
        400,
        "shape [1, 63]",
    );
    expect_error(
        http(a, "POST", infer, h, one(101, 64).as_bytes()),
        413,
        "100 rows",
    );
    expect_error(
        http(a, "POST", infer, h, &vec![b' '; 70_000]),
        413,
        "65536 bytes",
    );
    expect_error(
        http(
            a,
            "POST",
            infer,
            &[auth, ("Inference-Header-Content-Length", "abc")],
            b"{}",
        ),
        400,
        "Inference-Header-Content-Length",
    );
    let head = r#"{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","parameters":{"binary_data_size":256}}]}"#;
    let mut body = head.as_bytes().to_vec();
    body.extend_from_slice(&[0u8; 100]);
    let len = head.len().to_string();
    expect_error(
        http(
            a,
            "POST",
            infer,
            &[auth, ("Inference-Header-Content-Length", &len)],
            &body,
        ),
        400,
        "binary_data_size is 256",
    );
    expect_error(
        http(a, "POST", "/v2/models/nope/infer", h, one(1, 64).as_bytes()),
        404,
        "nope",
    );
    // Still healthy and serving after all that.
    let (code, _, _) = http(a, "POST", infer, h, one(100, 64).as_bytes());
    assert_eq!(code, 200);

    // Metrics: latency histograms and error counters by model and version.
    let (_, _, body) = http(a, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(body).unwrap();
    for want in [
        "kiln_serve_request_duration_seconds_count{model=\"digits\",version=\"1\",protocol=\"grpc\"}",
        "kiln_serve_queue_duration_seconds_count{model=\"digits\",version=\"1\"}",
        "kiln_serve_compute_duration_seconds_count{model=\"digits\",version=\"1\"}",
        "kiln_serve_batch_size_bucket{le=\"1.0\",model=\"digits\",version=\"1\"}",
        // Unauthenticated requests never name a model in the metrics.
        "kiln_serve_errors_total{model=\"_unknown\",version=\"\",protocol=\"http\",kind=\"unauthorized\"} 2",
        "kiln_serve_errors_total{model=\"digits\",version=\"1\",protocol=\"http\",kind=\"too_large\"} 1",
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }
    // Management with the management token.
    let (code, _, body) = http(
        a,
        "POST",
        "/v2/repository/models/digits/unload",
        &[
            ("Authorization", "Bearer admin-secret"),
            ("Content-Type", "application/json"),
        ],
        b"",
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    expect_error(
        http(a, "POST", infer, h, one(1, 64).as_bytes()),
        404,
        "not served",
    );
    assert!(server.stop().success());
}

#[test]
fn tritonclient_over_tls_verifies_the_certificate_and_matches_pytorch() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = train(&dir.path().join("data"));
    let registry = format!("file://{}", dir.path().join("registry").display());
    let (_, weights) = register(&registry, &root, 30, dir.path());
    // A self-signed certificate for `localhost` only: it is its own CA, and
    // a client that dials 127.0.0.1 must find that name missing.
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca = dir.path().join("cert.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), signing_key.serialize_pem()).unwrap();
    // Relative paths: taken from the config file's folder.
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        "[tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n",
    )
    .unwrap();
    let server = Server::start(
        &[
            &[
                "--config",
                config.to_str().unwrap(),
                "--registry",
                &registry,
                "--model",
                "digits",
            ][..],
            &one_shape("16"),
        ]
        .concat(),
        &[],
        dir.path(),
    );
    assert!(server.https, "kiln serve with [tls] announced http://");
    let r = client(&[
        "tls",
        "--url",
        &format!("localhost:{}", server.addr.port()),
        "--ca",
        ca.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--batch",
        "16",
        "--rows",
        "37",
    ]);
    eprintln!("{r}");
    assert_serves(&r, "1");
    // Refused during the handshake, for the certificate: not trusted (no CA),
    // or trusted but not for the name dialled. The messages are Python's ssl
    // module's (HTTP) and gRPC core's.
    for (protocol, name_check) in [
        ("http", "IP address mismatch"),
        ("grpc", "Hostname Verification Check failed"),
    ] {
        let untrusted = r["untrusted"][protocol]
            .as_str()
            .unwrap_or_else(|| panic!("{protocol}: a client without the CA was served: {r}"));
        assert!(
            untrusted.contains("CERTIFICATE_VERIFY_FAILED"),
            "{protocol}: {untrusted}"
        );
        let wrong_name = r["wrong_name"][protocol]
            .as_str()
            .unwrap_or_else(|| panic!("{protocol}: a client dialling 127.0.0.1 was served: {r}"));
        assert!(wrong_name.contains(name_check), "{protocol}: {wrong_name}");
    }
    assert!(server.stop().success());
}

#[test]
fn bad_arguments_fail_with_errors_naming_the_setting() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let registry = format!("file://{}", dir.path().join("registry").display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--model".into(), "digits".into()],
            "registry: required",
        ),
        (
            vec!["--registry".into(), registry.clone()],
            "models: name at least one",
        ),
        (
            vec![
                "--registry".into(),
                registry.clone(),
                "--model".into(),
                "a b".into(),
            ],
            "models[0]",
        ),
        (
            vec![
                "--registry".into(),
                registry.clone(),
                "--model".into(),
                "digits".into(),
                "--max-batch-size".into(),
                "0".into(),
            ],
            "batching.max_batch_size",
        ),
        (
            vec![
                "--registry".into(),
                registry.clone(),
                "--model".into(),
                "digits".into(),
            ],
            "model digits (no versions)",
        ),
    ];
    for (args, want) in cases {
        let out = kiln()
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let config = dir.path().join("serve.toml");
    std::fs::write(&config, "registry = \"x\"\n[batching]\nmax_batch = 4\n").unwrap();
    let out = kiln()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("batching") && stderr.contains("max_batch"),
        "{stderr}"
    );
}

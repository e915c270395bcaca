//! End-to-end tests of `kiln serve` on a language model: the real `kiln`
//! binary prepares text (`kiln data prepare --tokenizer byte`), trains a tiny
//! gpt that registers itself (`[register]`) or is registered by hand
//! (`kiln registry register`), and serves it; `curl` and a Python client
//! (tests/serve_lm_client.py: tritonclient for `infer` on token ids, urllib
//! for Triton's generate extension, PyTorch on the exported weights) check
//! the answers.
//!
//! Tests run one at a time (a shared lock): each trains, serves and runs
//! clients on a small machine.

mod common;

use common::repo;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_LOG", "warn")
        .env_remove("KILN_REGISTRY")
        .env_remove("KILN_SERVE_TOKEN")
        .env_remove("KILN_SERVE_ADMIN_TOKEN");
    cmd
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn last_json(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"))
}

// The model of every test: byte-level tokens, a context of 32.
const VOCAB: usize = 256;
const SEQ_LEN: usize = 32;
const N_LAYER: usize = 2;
const N_HEAD: usize = 2;
const D_MODEL: usize = 32;

/// Writes a small seeded "English" corpus and prepares it with the byte
/// tokenizer into `dir/data` (train.bin, val.bin, tokenizer.json, meta.json).
fn prepare(dir: &Path) {
    let words = [
        "the", "kiln", "glowed", "and", "a", "potter", "shaped", "clay", "into", "bowls", "while",
        "rain", "fell", "on", "quiet", "town", "at", "night", "fire", "cooled",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut text = String::new();
    for _ in 0..1500 {
        let n = 5 + next(8);
        let line: Vec<&str> = (0..n).map(|_| words[next(words.len())]).collect();
        text.push_str("The ");
        text.push_str(&line.join(" "));
        text.push_str(".\n");
    }
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    ok(
        kiln()
            .args(["data", "prepare"])
            .arg(&corpus)
            .arg("--out")
            .arg(dir.join("data"))
            .args(["--tokenizer", "byte"])
            .output()
            .unwrap(),
        "kiln data prepare",
    );
}

/// A tiny gpt job over `dir/data`; `extra` is appended (TOML).
fn job(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[job]
name = "tiny-lm"
seed = 3
[model]
kind = "gpt"
vocab = {VOCAB}
n_layer = {N_LAYER}
n_head = {N_HEAD}
d_model = {D_MODEL}
[data]
kind = "tokens"
train = ["data/train.bin"]
eval = ["data/val.bin"]
seq_len = {SEQ_LEN}
token_dtype = "uint16"
[train]
steps = 60
global_batch = 8
log_interval = 20
threads_per_worker = 1
[optimizer]
kind = "adamw"
lr = 0.01
[checkpoint]
interval = 30
{extra}
"#
        ),
    )
    .unwrap();
    path
}

/// `kiln run --json`: the summary.
fn train(spec: &Path, dir: &Path) -> serde_json::Value {
    let out = kiln()
        .arg("run")
        .arg(spec)
        .arg("--json")
        .arg("--data-dir")
        .arg(dir.join("kd"))
        .output()
        .unwrap();
    last_json(&ok(out, "kiln run"))
}

/// `kiln ckpt export CHECKPOINT FILE`: weights PyTorch and `kiln generate` read.
fn export(checkpoint: &str, file: &Path) {
    ok(
        kiln()
            .args(["ckpt", "export", checkpoint])
            .arg(file)
            .output()
            .unwrap(),
        "kiln ckpt export",
    );
}

/// A `kiln serve` process, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Server {
        let stderr = dir.join("serve.err");
        let mut cmd = kiln();
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--poll-interval-ms", "100"])
            .args(args)
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
                if let Some(addr) = line.strip_prefix("kiln serve: listening on http://") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a.parse().unwrap(),
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
            stderr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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
                "kiln serve did not stop on SIGTERM:\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
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

/// `curl -X POST URL -d BODY` (with `extra` arguments): (status, body).
fn curl(url: &str, body: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-N", "-X", "POST", url, "-d", body])
        .args(["-H", "content-type: application/json"])
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .output()
        .expect("run curl");
    let text = ok(out, "curl");
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_string())
}

/// The text of a `/generate` answer (which must be a 200).
fn text_output(answer: (u16, String)) -> (String, String) {
    let (status, body) = answer;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model_name"], "tiny-lm", "{v}");
    let text = v["text_output"]
        .as_str()
        .unwrap_or_else(|| panic!("no text_output: {v}"))
        .to_string();
    (v["model_version"].as_str().unwrap().to_string(), text)
}

/// The pieces of a `/generate_stream` answer (which must be a 200).
fn stream_pieces(answer: (u16, String)) -> Vec<String> {
    let (status, body) = answer;
    assert_eq!(status, 200, "{body}");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|event| {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"));
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert!(v.get("error").is_none(), "{v}");
            v["text_output"].as_str().unwrap().to_string()
        })
        .collect()
}

fn generate_body(prompt: &str, max_tokens: usize, temperature: f64, seed: u64) -> String {
    serde_json::json!({
        "text_input": prompt,
        "parameters": {"max_tokens": max_tokens, "temperature": temperature, "seed": seed},
    })
    .to_string()
}

/// `kiln generate` on a run's weights: the text after the prompt.
fn cli_generate(
    spec: &Path,
    weights: &Path,
    prompt: &str,
    max_tokens: usize,
    temperature: f64,
    seed: u64,
) -> String {
    let stdout = ok(
        kiln()
            .arg("generate")
            .arg(spec)
            .arg("--weights")
            .arg(weights)
            .args(["--prompt", prompt])
            .args(["--max-tokens", &max_tokens.to_string()])
            .args(["--temperature", &temperature.to_string()])
            .args(["--seed", &seed.to_string()])
            .output()
            .unwrap(),
        "kiln generate",
    );
    // It prints the prompt, the continuation and a line break.
    let text = stdout.strip_suffix('\n').unwrap();
    text.strip_prefix(prompt).unwrap().to_string()
}

/// A `[[hooks]]` section (TOML) whose command appends each event of `kinds`
/// to `file`, one JSON object a line.
fn event_hook(file: &Path, kinds: &[&str]) -> String {
    let script = format!("cat >> '{0}' && echo >> '{0}'", file.display());
    format!(
        "[[hooks]]\nsink = \"command\"\ncommand = [\"sh\", \"-c\", {}]\nevents = {}\n",
        serde_json::to_string(&script).unwrap(),
        serde_json::to_string(kinds).unwrap()
    )
}

fn read_events(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn metric(server: &Server, prefix: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-sS", &server.url("/metrics")])
        .output()
        .unwrap();
    let text = ok(out, "curl /metrics");
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn a_registered_gpt_serves_generate_and_infer_to_curl_and_python_clients() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    prepare(dir);
    let events = dir.join("events.jsonl");
    let spec = job(
        dir,
        &format!(
            "[register]\nalias = \"production\"\n{}",
            event_hook(&events, &["model.registered", "alias.moved"])
        ),
    );
    let summary = train(&spec, dir);
    assert_eq!(summary["model"], "tiny-lm:1", "{summary}");
    let registry = summary["registry"].as_str().unwrap().to_string();

    // Hooks hear of the registration (with the language model's metrics)
    // and of the alias move.
    let events = read_events(&events);
    let registered = events
        .iter()
        .find(|e| e["kind"] == "model.registered")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(registered["payload"]["model"], "tiny-lm");
    assert_eq!(registered["payload"]["version"], 1);
    assert!(registered["payload"]["metrics"]["eval_perplexity"].is_number());
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "alias.moved" && e["payload"]["to_version"] == 1),
        "{events:?}"
    );

    // What the registry holds: a language model with its tokenizer.
    let show = last_json(&ok(
        kiln()
            .args(["registry", "--registry", &registry, "--json"])
            .args(["show", "tiny-lm@production"])
            .output()
            .unwrap(),
        "kiln registry show",
    ));
    let v = &show["resolved"][0]["version"];
    assert_eq!(v["model"]["task"], "language_model", "{v}");
    assert_eq!(v["model"]["features"], SEQ_LEN);
    assert_eq!(v["model"]["classes"], VOCAB);
    assert_eq!(v["has_tokenizer"], true);
    assert_eq!(v["has_reference_profile"], true, "the token profile: {v}");
    assert_eq!(v["signature"]["inputs"][0]["name"], "input_ids");
    assert_eq!(v["signature"]["inputs"][0]["datatype"], "INT64");
    assert_eq!(
        v["signature"]["outputs"][0]["shape"],
        serde_json::json!([-1, VOCAB])
    );
    let loss = v["metrics"]["eval_loss"].as_f64().unwrap();
    let ppl = v["metrics"]["eval_perplexity"].as_f64().unwrap();
    assert!((ppl - loss.exp()).abs() < 1e-6 * ppl, "{v}");
    assert!(loss < (VOCAB as f64).ln(), "it learned something: {loss}");

    let server = Server::start(
        &["--registry", &registry, "--model", "tiny-lm@production"],
        &[("KILN_SERVE_TOKEN", "s3cret")],
        dir,
    );
    let auth = ["-H", "authorization: Bearer s3cret"];
    let generate = server.url("/v2/models/tiny-lm/generate");
    let prompt = "The kiln";

    // The inference token is required.
    let (status, body) = curl(&generate, &generate_body(prompt, 4, 1.0, 1), &[]);
    assert_eq!(status, 401, "{body}");

    // Text out; the same seed, the same text; another seed, another text.
    let (version, first) = text_output(curl(&generate, &generate_body(prompt, 24, 1.0, 1), &auth));
    assert_eq!(version, "1");
    assert!(!first.is_empty());
    let (_, again) = text_output(curl(&generate, &generate_body(prompt, 24, 1.0, 1), &auth));
    assert_eq!(again, first, "the same seed gave another text");
    let (_, other) = text_output(curl(&generate, &generate_body(prompt, 24, 1.0, 2), &auth));
    assert_ne!(other, first, "seeds 1 and 2 gave the same 24 tokens");

    // Streamed: one event per token, adding up to the same text.
    let pieces = stream_pieces(curl(
        &server.url("/v2/models/tiny-lm/generate_stream"),
        &generate_body(prompt, 24, 1.0, 1),
        &auth,
    ));
    // One event per token (and one more if the last ended inside a character).
    assert!((24..=25).contains(&pieces.len()), "{pieces:?}");
    assert_eq!(pieces.concat(), first);

    // `kiln generate` on the run's final weights writes the same text.
    let final_weights = Path::new(summary["weights"].as_str().unwrap());
    assert_eq!(
        cli_generate(&spec, final_weights, prompt, 24, 1.0, 1),
        first
    );

    // Bad requests: 400 with the protocol's error object, naming the problem.
    for (body, says) in [
        (r#"{"text_input": ""}"#.to_string(), "text_input is empty"),
        (
            serde_json::json!({"text_input": "x".repeat(SEQ_LEN + 1)}).to_string(),
            "context is 32 tokens",
        ),
        (generate_body(prompt, 0, 1.0, 1), "max_tokens is 0"),
        (
            generate_body(prompt, SEQ_LEN + 1, 1.0, 1),
            "max_tokens is 33",
        ),
        (generate_body(prompt, 4, -1.0, 1), "temperature is -1"),
        (
            r#"{"text_input": "a", "parameters": {"top_k": 0}}"#.to_string(),
            "top_k is 0",
        ),
        (
            r#"{"text_input": "a""#.to_string(),
            "invalid generate request JSON",
        ),
    ] {
        let (status, text) = curl(&generate, &body, &auth);
        assert_eq!(status, 400, "{body}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"].as_str().unwrap().contains(says), "{body}: {v}");
    }

    // tritonclient (infer on input_ids, HTTP and gRPC) and urllib (generate)
    // against PyTorch on the exported weights.
    let weights = dir.join("export.safetensors");
    export(summary["checkpoint"].as_str().unwrap(), &weights);
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/serve_lm_client.py"))
        .args(["--url", &server.addr.to_string(), "--model", "tiny-lm"])
        .arg("--weights")
        .arg(&weights)
        .arg("--repo")
        .arg(repo())
        .args([
            "--vocab",
            &VOCAB.to_string(),
            "--seq-len",
            &SEQ_LEN.to_string(),
        ])
        .args([
            "--n-layer",
            &N_LAYER.to_string(),
            "--n-head",
            &N_HEAD.to_string(),
        ])
        .args(["--d-model", &D_MODEL.to_string()])
        .args(["--prompt", prompt, "--token", "s3cret"])
        .output()
        .unwrap();
    let report = last_json(&ok(out, "serve_lm_client.py"));
    assert_eq!(report["infer_checked"], 9, "{report}");
    assert!(
        report["infer_max_abs_diff"].as_f64().unwrap() < 1e-4,
        "{report}"
    );

    // Counted by model, version and protocol.
    let requests = |protocol: &str| {
        metric(
            &server,
            &format!(
                "kiln_serve_requests_total{{model=\"tiny-lm\",version=\"1\",protocol=\"{protocol}\"}}"
            ),
        )
    };
    assert!(requests("http") >= 12.0, "{}", requests("http"));
    assert_eq!(requests("grpc"), 3.0);
    let refused = metric(
        &server,
        "kiln_serve_errors_total{model=\"tiny-lm\",version=\"1\",protocol=\"http\",kind=\"bad_request\"}",
    );
    assert!(refused >= 6.0, "{refused}");
    assert!(server.stop().success());
}

#[test]
fn kiln_registry_register_takes_a_gpt_checkpoint_and_the_server_follows_its_alias() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    prepare(dir);
    let spec = job(dir, "");
    let summary = train(&spec, dir);
    assert!(
        summary["model"].is_null(),
        "no [register], no version: {summary}"
    );
    let root = summary["checkpoint_root"].as_str().unwrap().to_string();
    let registry = format!("file://{}", dir.join("registry").display());
    let registry_cmd = |args: &[&str]| {
        let mut cmd = kiln();
        cmd.args(["registry", "--registry", &registry, "--json"])
            .args(args);
        cmd.output().unwrap()
    };

    // A gpt has a context and a vocabulary, not features and classes.
    let out = registry_cmd(&[
        "register",
        "tiny-lm",
        "--checkpoint",
        &root,
        "--features",
        "3",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--features and --classes do not apply"),
        "{stderr}"
    );

    // The checkpoints of steps 30 and 60 become versions 1 and 2, each with
    // the tokenizer found beside the spec's training data.
    for (step, version) in [("30", 1), ("60", 2)] {
        let v = last_json(&ok(
            registry_cmd(&["register", "tiny-lm", "--checkpoint", &root, "--step", step]),
            "kiln registry register",
        ));
        assert_eq!(v["version"], version, "{v}");
        assert_eq!(v["model"]["task"], "language_model");
        assert_eq!(v["has_tokenizer"], true);
        assert_eq!(v["has_reference_profile"], true);
        assert_eq!(v["checkpoint"]["step"].to_string(), step);
    }
    ok(
        registry_cmd(&["promote", "tiny-lm", "1", "--alias", "prod"]),
        "kiln registry promote",
    );

    // The server's hooks hear of the swap.
    let events = dir.join("serve-events.jsonl");
    let config = dir.join("serve.toml");
    std::fs::write(&config, event_hook(&events, &["version.swapped"])).unwrap();
    let config = config.display().to_string();
    let server = Server::start(
        &[
            "--registry",
            &registry,
            "--model",
            "tiny-lm@prod",
            "--config",
            &config,
        ],
        &[],
        dir,
    );
    let generate = server.url("/v2/models/tiny-lm/generate");
    let body = generate_body("The", 20, 0.0, 0);
    let (version, _) = text_output(curl(&generate, &body, &[]));
    assert_eq!(version, "1");

    // Promote version 2: the server swaps to it, and it answers what
    // `kiln generate` says the final weights write.
    ok(
        registry_cmd(&["promote", "tiny-lm", "2", "--alias", "prod"]),
        "kiln registry promote",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let (version, text) = text_output(curl(&generate, &body, &[]));
        if version == "2" {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not swap to version 2"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let final_weights = Path::new(summary["weights"].as_str().unwrap());
    assert_eq!(cli_generate(&spec, final_weights, "The", 20, 0.0, 0), text);
    assert!(server.stop().success());
    let swapped = read_events(&events);
    assert!(
        swapped.iter().any(|e| e["kind"] == "version.swapped"
            && e["payload"]["from_version"] == 1
            && e["payload"]["to_version"] == 2
            && e["payload"]["alias"] == "prod"),
        "{swapped:?}"
    );
}

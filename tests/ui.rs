//! The dashboard in a real browser: headless Chromium, driven through
//! chromedriver's WebDriver API, against a running `kiln run --ui`, `kiln
//! serve` and `kiln ui`. Checks that pages render without console errors,
//! the loss curve gains points while the job trains, the job list shows the
//! right phase after it ends, a canary weight shows after `kiln registry
//! promote --weight`, actions need the token, and nothing overflows a narrow
//! window. Screenshots of every page (1280x800 and 390x844) are written to
//! `$CARGO_TARGET_TMPDIR/ui-screenshots/` (with the shared target folder:
//! `$KILN_CACHE/target/tmp/ui-screenshots/`).
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/bootstrap.sh
//! installs them); without them the test fails and says so.

mod browser;
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use browser::Browser;
use common::repo;
use serde_json::{Value, json};

/// Failure bounds for waits (never timing assertions).
const LONG: Duration = Duration::from_secs(300);
const SHORT: Duration = Duration::from_secs(60);

/// A `kiln` process whose output lines are collected; killed on drop.
struct Kiln {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Kiln {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Kiln {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(args)
            .env("KILN_LOG", "warn")
            .env_remove("KILN_REGISTRY")
            .env_remove("KILN_UI_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Kiln {
            child,
            stdout,
            stderr,
            name: format!("kiln {}", args.first().unwrap_or(&"")),
        }
    }

    fn output(&self) -> String {
        format!(
            "{} stdout:\n{}\nstderr:\n{}",
            self.name,
            self.stdout.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap().join("\n")
        )
    }

    /// The first line (stdout or stderr) starting with `prefix`, without it.
    async fn line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            for lines in [&self.stdout, &self.stderr] {
                if let Some(l) = lines
                    .lock()
                    .unwrap()
                    .iter()
                    .find_map(|l| l.strip_prefix(prefix))
                {
                    return l.trim().to_string();
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before printing {prefix:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} line within {limit:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `signal` and waits for the exit status.
    async fn stop(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + SHORT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not stop", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kiln_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fails on any console error the pages logged since the last check.
async fn assert_no_console_errors(b: &Browser, page: &str) {
    let errors: Vec<Value> = b
        .console()
        .await
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors on {page}: {errors:#?}");
}

/// Checks the page does not overflow horizontally, then screenshots it.
async fn check_and_shoot(b: &Browser, out: &Path, name: &str) {
    let fits = b
        .eval("return [document.documentElement.scrollWidth, window.innerWidth]")
        .await;
    let (scroll, inner) = (fits[0].as_f64().unwrap(), fits[1].as_f64().unwrap());
    assert!(
        scroll <= inner,
        "{name}: the page is {scroll} px wide in a {inner} px window"
    );
    b.screenshot(&out.join(format!("{name}.png"))).await;
    assert_no_console_errors(b, name).await;
}

/// Scripts that are truthy once a page shows its data.
const JOBS_READY: &str = "return document.querySelector('#jobs-table tr[data-job=\"digits\"]')";
const JOB_READY: &str = "const s = document.getElementById('chart-loss'); return s && Number(s.dataset.samples) > 0 && document.querySelector('#job-checkpoints tr[data-step]')";
const CHECKPOINTS_READY: &str = "return document.querySelector('#manifests-table tr[data-key]')";
const REGISTRY_READY: &str =
    "return document.querySelector('.aliases tr[data-alias=\"production\"]')";
const SERVING_READY: &str =
    "return document.querySelector('.serving-table tr[data-model=\"digits\"]')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let (chromium, chromedriver) = browser::locate().unwrap_or_else(|m| panic!("{m}"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    println!("screenshots in {}", out.display());
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let spec = repo().join("examples/digits/job.toml");

    // A job long enough to watch it train (tens of seconds here).
    let mut run = Kiln::spawn(
        &[
            "run",
            spec.to_str().unwrap(),
            "--set",
            "train.steps=20000",
            "--set",
            "checkpoint.interval=5000",
            "--set",
            "train.eval_interval=2000",
            "--set",
            "train.log_interval=5000",
            "--ui",
            "127.0.0.1:0",
            "--ui-linger",
            "600",
            "--json",
            "--data-dir",
            data_dir,
        ],
        // The workers' info lines are the logs the job page shows.
        &[("KILN_LOG", "info")],
    );
    let url = run.line("dashboard on ", LONG).await;
    let b = Browser::start(&chromium, &chromedriver, &out.join("chromedriver.log")).await;
    b.resize(1280, 800).await;

    // The job page while it trains: the curve covers more steps at a later
    // poll, in a render whose status still says running.
    b.goto(&format!("{url}#/jobs/digits")).await;
    let samples_while_running = "const s = document.getElementById('chart-loss'); \
         const p = document.querySelector('#job-phase [data-phase]'); \
         return s && p && p.dataset.phase === 'running' ? Number(s.dataset.samples) : 0";
    let first = b
        .wait_for("the loss curve's first points", samples_while_running, LONG)
        .await
        .as_f64()
        .unwrap();
    let later = b
        .wait_for(
            "the loss curve to gain points while the job runs",
            &format!(
                "const n = (() => {{ {samples_while_running} }})(); return n > {first} ? n : 0"
            ),
            LONG,
        )
        .await
        .as_f64()
        .unwrap();
    assert!(later > first);
    let drawn = b
        .eval("return Number(document.getElementById('chart-loss').dataset.points)")
        .await;
    assert!(drawn.as_f64().unwrap() >= 2.0, "loss curve points: {drawn}");
    check_and_shoot(&b, &out, "job-running-1280").await;
    b.goto(&format!("{url}#/jobs")).await;
    b.wait_for("the running job in the list", JOBS_READY, SHORT)
        .await;
    check_and_shoot(&b, &out, "jobs-running-1280").await;

    // The job ends: the list shows it succeeded (through the phase filter).
    // The summary is the line that starts with `{` (stripped by `line`).
    let summary = format!("{{{}", run.line("{", LONG).await);
    let summary: Value = serde_json::from_str(&summary).unwrap();
    let registry = summary["registry"]
        .as_str()
        .expect("a registry")
        .to_string();
    let root = summary["checkpoint_root"].as_str().unwrap().to_string();
    b.goto(&format!("{url}#/jobs?phase=succeeded")).await;
    b.wait_for(
        "the finished job's phase",
        "return document.querySelector('#jobs-table tr[data-job=\"digits\"][data-phase=\"succeeded\"]')",
        SHORT,
    )
    .await;
    check_and_shoot(&b, &out, "jobs-1280").await;
    b.goto(&format!("{url}#/jobs/digits")).await;
    b.wait_for("the finished job page", JOB_READY, SHORT).await;
    let evals = b
        .eval("return document.querySelectorAll('#job-evals tbody tr').length")
        .await;
    assert!(evals.as_u64().unwrap() >= 2, "held-out rows: {evals}");
    // The workers' logs, then only rank 1's.
    b.wait_for(
        "the workers' log lines",
        "const p = document.getElementById('job-logs'); return p && Number(p.dataset.lines) > 0",
        SHORT,
    )
    .await;
    b.eval("document.getElementById('logs-rank').value = '1'")
        .await;
    b.wait_for(
        "only rank 1's log lines",
        "const p = document.getElementById('job-logs'); \
         return Number(p.dataset.lines) > 0 && p.textContent.split('\\n').every((l) => l.includes(' r1 '))",
        SHORT,
    )
    .await;
    b.eval("document.getElementById('logs-rank').value = ''")
        .await;
    check_and_shoot(&b, &out, "job-1280").await;

    // Checkpoints: browse the root and verify one from the page.
    b.goto(&format!("{url}#/checkpoints")).await;
    b.wait_for("the manifests", CHECKPOINTS_READY, SHORT).await;
    b.eval("document.querySelector('#manifests-table button[data-verify]').click()")
        .await;
    b.wait_for(
        "a verified checkpoint",
        "return document.querySelector('#manifests-table .ok')",
        LONG,
    )
    .await;
    check_and_shoot(&b, &out, "checkpoints-1280").await;

    // A canary: a second version from an earlier checkpoint at 10 percent.
    let registry_env = [("KILN_REGISTRY", registry.as_str())];
    kiln_ok(
        &[
            "registry",
            "register",
            "digits",
            "--checkpoint",
            &root,
            "--step",
            "15000",
        ],
        &registry_env,
    );
    kiln_ok(
        &[
            "registry",
            "promote",
            "digits",
            "2",
            "--alias",
            "production",
            "--weight",
            "10",
        ],
        &registry_env,
    );
    b.goto(&format!("{url}#/registry")).await;
    b.wait_for(
        "the canary weight",
        "const t = document.querySelector('.aliases tr[data-alias=\"production\"] .alias-targets'); \
         return t && t.textContent.includes('v2 10%') && t.textContent.includes('v1 90%')",
        SHORT,
    )
    .await;
    check_and_shoot(&b, &out, "registry-1280").await;

    // The run's dashboard stops on SIGINT while it lingers.
    let status = run.stop(libc::SIGINT).await;
    assert!(
        status.success(),
        "kiln run ended with {status}:\n{}",
        run.output()
    );

    // Serving: `kiln serve` with traffic, seen through `kiln ui`, which also
    // shows the finished run from its run folder.
    let mut serve = Kiln::spawn(
        &[
            "serve",
            "--registry",
            &registry,
            "--model",
            "digits@production",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let serve_url = serve.line("kiln serve: listening on ", LONG).await;
    let http = reqwest::Client::new();
    let request = json!({ "inputs": [{
        "name": "input", "datatype": "FP32", "shape": [1, 64], "data": vec![0.5f32; 64],
    }]});
    for _ in 0..40 {
        browser::post_json(
            &http,
            &format!("{serve_url}/v2/models/digits/infer"),
            &request,
        )
        .await;
    }
    let token_file = data.path().join("ui-token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let mut ui = Kiln::spawn(
        &[
            "ui",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
            "--serve-url",
            &serve_url,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    let ui_url = ui.line("dashboard on ", LONG).await;
    // On loopback, a request for another host name (a DNS name rebound to
    // 127.0.0.1 by a web page) is refused; the loopback names are served.
    let rebound = http
        .get(format!("{ui_url}/api/jobs"))
        .header("Host", "rebound.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), reqwest::StatusCode::MISDIRECTED_REQUEST);
    let port = ui_url.rsplit(':').next().unwrap().trim_end_matches('/');
    let local = http
        .get(format!("http://localhost:{port}/api/jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(local.status(), reqwest::StatusCode::OK);
    b.goto(&format!("{ui_url}#/jobs")).await;
    b.wait_for(
        "the finished run from its folder",
        "return document.querySelector('#jobs-table tr[data-job=\"digits\"][data-phase=\"succeeded\"]')",
        SHORT,
    )
    .await;
    b.goto(&format!("{ui_url}#/serving")).await;
    b.wait_for(
        "per-version serving figures with a request rate",
        "const r = [...document.querySelectorAll('.serving-table tr[data-model=\"digits\"]')]; \
         const v = (n) => r.find((x) => x.dataset.version === n); \
         return v('1') && v('2') && v('2').cells[2].textContent === '10%' \
           && Number(v('1').cells[3].textContent) > 0 && v('1').cells[4].textContent.endsWith('/s')",
        SHORT,
    )
    .await;
    check_and_shoot(&b, &out, "serving-1280").await;

    // Actions need the token: refused without it, done with it.
    let rollback = json!({ "registry": registry, "model": "digits", "alias": "production" });
    let refused = http
        .post(format!("{ui_url}api/registry/rollback"))
        .header("content-type", "application/json")
        .body(rollback.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let done = http
        .post(format!("{ui_url}api/registry/rollback"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer s3cret-token")
        .body(rollback.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        done.status().is_success(),
        "rollback: {}",
        done.text().await.unwrap()
    );
    b.goto(&format!("{ui_url}#/registry")).await;
    b.wait_for(
        "the rolled-back alias",
        "const t = document.querySelector('.aliases tr[data-alias=\"production\"] .alias-targets'); \
         return t && t.textContent.trim() === 'v1 100%'",
        SHORT,
    )
    .await;

    // A phone-sized window: every page fits its width.
    b.resize(390, 844).await;
    for (page, ready, name) in [
        ("#/jobs", JOBS_READY, "jobs-390"),
        ("#/jobs/digits", JOB_READY, "job-390"),
        ("#/checkpoints", CHECKPOINTS_READY, "checkpoints-390"),
        ("#/registry", REGISTRY_READY, "registry-390"),
        ("#/serving", SERVING_READY, "serving-390"),
    ] {
        b.goto(&format!("{ui_url}{page}")).await;
        b.wait_for(name, ready, SHORT).await;
        check_and_shoot(&b, &out, name).await;
    }
    let inner = b.eval("return window.innerWidth").await;
    assert!(inner.as_f64().unwrap() <= 400.0, "narrow window: {inner}");

    let status = ui.stop(libc::SIGTERM).await;
    assert!(
        status.success(),
        "kiln ui ended with {status}:\n{}",
        ui.output()
    );
    serve.stop(libc::SIGTERM).await;
    for name in [
        "jobs-1280",
        "job-1280",
        "checkpoints-1280",
        "registry-1280",
        "serving-1280",
        "job-390",
    ] {
        assert!(out.join(format!("{name}.png")).exists(), "{name}.png");
    }
}

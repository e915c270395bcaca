//! Checks of the monitoring examples under `deploy/`: the Prometheus scrape
//! configuration (`deploy/prometheus/kiln.yml`, with its alerting rules)
//! passes `promtool`, the Grafana dashboard (`deploy/grafana/kiln.json`) is a
//! well-formed dashboard, and every metric the dashboard and the rules query
//! is one kiln really exports.
//!
//! "Really exports" is read from real endpoints, not from a list kept here:
//! the test trains the digits example with `kiln run --metrics-addr`, scrapes
//! the agent's `/metrics` once a checkpoint is committed, registers that
//! checkpoint, starts `kiln serve` on it and scrapes the server's `/metrics`.
//! Every family is declared by its `# TYPE` line whether or not it has
//! samples yet (prometheus-client writes the descriptor of every registered
//! metric), so families that only fill under load (drift, language-model
//! tokens, timeouts) are seen too.
//!
//! Needs `promtool` (Debian's `prometheus` package; scripts/bootstrap.sh
//! installs it); without it the promtool test fails and says so.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::repo;
use serde_json::Value;

/// Failure bound for waits on the processes (never a timing assertion).
const LONG: Duration = Duration::from_secs(300);

const PROMETHEUS_CONFIG: &str = "deploy/prometheus/kiln.yml";
const PROMETHEUS_RULES: &str = "deploy/prometheus/kiln-rules.yml";
const DASHBOARD: &str = "deploy/grafana/kiln.json";

/// `promtool check config` accepts the scrape configuration; it also checks
/// the rule files the configuration names, so the alerting rules are checked
/// with it.
#[test]
fn prometheus_config_passes_promtool() {
    let out = Command::new("promtool")
        .args(["check", "config", PROMETHEUS_CONFIG])
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it with scripts/bootstrap.sh \
                 (Debian's `prometheus` package)"
            )
        });
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check config {PROMETHEUS_CONFIG} failed:\n{output}"
    );
    assert!(
        output.contains("1 rule files found"),
        "the configuration should load {PROMETHEUS_RULES}:\n{output}"
    );
}

/// The dashboard is one Grafana can import: a title, a uid, a schema
/// version, a datasource variable that every query goes through, `job` and
/// `instance` variables; every panel (rows' nested panels included) has a
/// title and an id no other panel has, and every panel that is not a row
/// has a datasource and at least one query.
#[test]
fn grafana_dashboard_is_well_formed() {
    let dashboard = load_dashboard();
    for key in ["title", "uid"] {
        assert!(
            dashboard[key].as_str().is_some_and(|s| !s.is_empty()),
            "the dashboard needs a {key}"
        );
    }
    assert!(dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36);

    let variables: BTreeMap<&str, &str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["type"].as_str().unwrap()))
        .collect();
    assert_eq!(variables.get("datasource"), Some(&"datasource"));
    assert_eq!(variables.get("job"), Some(&"query"));
    assert_eq!(variables.get("instance"), Some(&"query"));

    let panels = all_panels(&dashboard);
    assert!(panels.len() > 10, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no id"));
        assert!(ids.insert(id), "panel id {id} is used twice (at {title:?})");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title:?} must query the dashboard's datasource variable"
        );
        let targets = panel["targets"].as_array().map_or(&[][..], |t| &t[..]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.is_empty(), "panel {title:?} has a query without expr");
            assert!(
                expr.contains("$job") && expr.contains("$instance"),
                "panel {title:?} ignores the job/instance variables: {expr}"
            );
        }
    }
    assert!(
        panels
            .iter()
            .any(|p| p["type"] == "row" && p["panels"].as_array().is_some_and(|n| !n.is_empty())),
        "expected a collapsed row with nested panels (walked above)"
    );
}

/// Every `kiln_*` series the dashboard's queries (panels and variables) and
/// the alerting rules name is one a real `kiln run` or `kiln serve` exposes.
///
/// A name must match an exposed series exactly: a histogram `h` is queried
/// as `h_bucket`, `h_sum` or `h_count`, a counter `c` as `c_total`, a gauge by
/// its name. That is stricter than stripping suffixes: a query of a bare
/// histogram name, or of a counter without `_total`, returns nothing in
/// Prometheus and fails here.
#[test]
fn dashboard_and_rules_query_only_metrics_kiln_exports() {
    let dashboard = load_dashboard();
    let mut queried: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for panel in all_panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            for name in metric_names(target["expr"].as_str().unwrap_or_default()) {
                queried
                    .entry(name)
                    .or_default()
                    .insert(format!("panel {title:?}"));
            }
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let query = variable["definition"].as_str().unwrap_or_default();
        for name in metric_names(query) {
            queried
                .entry(name)
                .or_default()
                .insert(format!("variable {}", variable["name"]));
        }
    }
    let rules = std::fs::read_to_string(repo().join(PROMETHEUS_RULES)).unwrap();
    // Expressions and annotations; comments may name a family in prose.
    let rules: Vec<&str> = rules
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect();
    for name in metric_names(&rules.join("\n")) {
        queried
            .entry(name)
            .or_default()
            .insert(PROMETHEUS_RULES.to_string());
    }
    assert!(queried.len() > 20, "too few metrics found: {queried:?}");

    let exported = scrape_kiln();
    let missing: Vec<String> = queried
        .iter()
        .filter(|(name, _)| !exported.series.contains_key(*name))
        .map(|(name, users)| {
            let users: Vec<&str> = users.iter().map(String::as_str).collect();
            format!("{name} (in {})", users.join(", "))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported by kiln run or kiln serve:\n  {}\nexported:\n  {}",
        missing.join("\n  "),
        exported
            .series
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );

    // Both endpoints are on the dashboard.
    let shown: BTreeSet<&(&str, String)> =
        queried.keys().map(|name| &exported.series[name]).collect();
    for source in ["kiln run", "kiln serve"] {
        assert!(
            shown.iter().any(|(from, _)| *from == source),
            "the dashboard shows nothing from {source}"
        );
    }
    // Not a failure: families left off the dashboard, for whoever extends it.
    for (family, (source, kind)) in &exported.families {
        if !shown.iter().any(|(_, f)| f == family) {
            println!("not on the dashboard: {family} ({kind}, {source})");
        }
    }
}

// ----- the dashboard -----

fn load_dashboard() -> Value {
    let path = repo().join(DASHBOARD);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Every panel: the top-level ones and those nested in (collapsed) rows.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The identifiers `kiln_[a-z0-9_]+` in a PromQL expression (or any text).
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kiln_") {
        // Not the tail of a longer identifier (`my_kiln_x`).
        let starts_identifier = !rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at + "kiln_".len()..];
        let len = tail.find(|c: char| !is_name_char(c)).unwrap_or(tail.len());
        if starts_identifier && len > 0 {
            names.insert(format!("kiln_{}", &tail[..len]));
        }
        rest = &tail[len..];
    }
    names
}

// ----- the real endpoints -----

/// What kiln exposes, read from its `/metrics` bodies.
struct Exported {
    /// Series name (`kiln_x_bucket`, `kiln_y_total`, `kiln_z`) -> where it
    /// came from (`kiln run`, `kiln serve`) and its family.
    series: BTreeMap<String, (&'static str, String)>,
    /// Family name -> where it came from and its kind.
    families: BTreeMap<String, (&'static str, String)>,
}

impl Exported {
    /// Adds the families of one exposition (OpenMetrics text) from `source`.
    fn add(&mut self, source: &'static str, body: &str) {
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let (Some(family), Some(kind)) = (words.next(), words.next()) else {
                panic!("malformed TYPE line from {source}: {line}");
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            for suffix in suffixes {
                self.series
                    .insert(format!("{family}{suffix}"), (source, family.to_string()));
            }
            self.families
                .insert(family.to_string(), (source, kind.to_string()));
        }
    }
}

/// Trains the digits example until a checkpoint is committed, scraping the
/// run's `/metrics`; registers that checkpoint and scrapes a `kiln serve` of
/// it.
fn scrape_kiln() -> Exported {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().canonicalize().unwrap();
    let mut exported = Exported {
        series: BTreeMap::new(),
        families: BTreeMap::new(),
    };

    // A job far longer than needed: it is killed once it has checkpointed.
    let mut run = Process::spawn(
        kiln()
            .args(["run", "examples/digits/job.toml", "--nproc", "1"])
            .args(["--set", "workers.device=\"cpu\""])
            .args(["--set", "train.steps=1000000"])
            .args(["--set", "checkpoint.interval=20"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data_dir),
        // tracing's line: `... metrics on http://ADDR/metrics job="digits"`.
        Source::Stderr,
        "metrics on http://",
    );
    let addr = run.wait_for_line();
    let addr = addr.split("/metrics").next().unwrap().to_string();
    let deadline = Instant::now() + LONG;
    let (body, checkpoint_step) = loop {
        let body = http_get(&addr, "/metrics")
            .unwrap_or_else(|e| panic!("scrape kiln run at {addr}: {e}\n{}", run.log()));
        let step = sample_value(&body, "kiln_checkpoint_step").unwrap_or(0.0);
        if step > 0.0 {
            break (body, step as u64);
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint after {LONG:?}; last scrape:\n{body}\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        sample_value(&body, "kiln_train_step").unwrap_or(0.0) >= checkpoint_step as f64,
        "{body}"
    );
    exported.add("kiln run", &body);
    drop(run); // SIGKILL; its workers die with it (PR_SET_PDEATHSIG).

    let registry = format!("file://{}", data_dir.join("registry").display());
    let checkpoints = format!("file://{}", data_dir.join("checkpoints/digits").display());
    let out = kiln()
        .args(["registry", "register", "digits", "--registry", &registry])
        .args(["--checkpoint", &checkpoints])
        .args(["--step", &checkpoint_step.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln registry register failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut serve = Process::spawn(
        kiln().args(["serve", "--listen", "127.0.0.1:0"]).args([
            "--registry",
            &registry,
            "--model",
            "digits",
        ]),
        Source::Stdout,
        "kiln serve: listening on http://",
    );
    let addr = serve.wait_for_line();
    let body = http_get(addr.trim(), "/metrics")
        .unwrap_or_else(|e| panic!("scrape kiln serve at {addr}: {e}\n{}", serve.log()));
    exported.add("kiln serve", &body);
    exported
}

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.current_dir(repo())
        .env("KILN_LOG", "info")
        .env_remove("KILN_REGISTRY")
        .env_remove("KILN_SERVE_TOKEN")
        .env_remove("KILN_SERVE_ADMIN_TOKEN");
    cmd
}

/// Which output of a process announces its address.
enum Source {
    Stdout,
    Stderr,
}

/// A kiln process whose output is collected (for failure messages) and
/// watched for the line that gives its address; killed on drop.
struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    announced: mpsc::Receiver<String>,
}

impl Process {
    /// Starts `cmd` and watches `source` for a line containing `marker`.
    fn spawn(cmd: &mut Command, source: Source, marker: &'static str) -> Process {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, announced) = mpsc::channel();
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        let (watched, other) = match source {
            Source::Stdout => (stdout, stderr),
            Source::Stderr => (stderr, stdout),
        };
        for (pipe, watch) in [(watched, Some(tx)), (other, None)] {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let (Some(tx), Some(at)) = (&watch, line.find(marker)) {
                        let _ = tx.send(line[at + marker.len()..].to_string());
                    }
                    let mut sink = sink.lock().unwrap();
                    // Enough to explain a failure; a long run logs a lot.
                    if sink.len() < 400 {
                        sink.push(line);
                    }
                }
            });
        }
        Process {
            child,
            lines,
            announced,
        }
    }

    /// The rest of the first line holding the marker (the address onwards).
    fn wait_for_line(&mut self) -> String {
        match self.announced.recv_timeout(LONG) {
            Ok(rest) => rest,
            Err(_) => panic!("no address announced in {LONG:?}:\n{}", self.log()),
        }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from `addr` (HOST:PORT); the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    // HTTP/1.0: the answer is not chunked and ends when the server closes.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response: {response}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("answered {head}"));
    }
    Ok(body.to_string())
}

/// The value of an unlabelled sample `name` in an exposition.
fn sample_value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

/// The name scanner finds whole `kiln_` identifiers only.
#[test]
fn metric_names_are_whole_identifiers() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(kiln_serve_batch_size_bucket{job=~"$job"}[5m]))) / my_kiln_x + kiln_train_loss"#;
    assert_eq!(
        metric_names(expr).into_iter().collect::<Vec<_>>(),
        ["kiln_serve_batch_size_bucket", "kiln_train_loss"]
    );
    assert!(metric_names(r#"{__name__=~"kiln_.+"}"#).is_empty());
}

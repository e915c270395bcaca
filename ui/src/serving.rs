//! The Serving page's figures, from a `kiln serve`'s Prometheus `/metrics`
//! (names in `serve/src/metrics.rs`): per model version, requests and their
//! rate, errors, p50/p99 request latency, mean batch size, traffic weight and
//! drift gauges. Rates are differences between this scrape and the previous
//! one of the same server ([`Scrapes`]); quantiles come from the cumulative
//! histogram buckets (since the server started).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// One sample line of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct PromSample {
    /// The metric name, with its suffix (`_total`, `_bucket`, `_sum`).
    pub name: String,
    /// Label values by name, unescaped.
    pub labels: BTreeMap<String, String>,
    /// The sample's value (`+Inf` and `-Inf` included).
    pub value: f64,
}

/// Parses the Prometheus text format (comments skipped; timestamps ignored).
/// Malformed lines are skipped: one odd line must not hide the rest.
pub fn parse_prometheus(text: &str) -> Vec<PromSample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<PromSample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let split = line.find(['{', ' ', '\t'])?;
    let (name, rest) = line.split_at(split);
    let mut labels = BTreeMap::new();
    let rest = match rest.strip_prefix('{') {
        Some(body) => {
            let close = parse_labels_from(body, &mut labels)?;
            &body[close + 1..]
        }
        None => rest,
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(PromSample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` into `labels`; returns the index of the closing `}`.
fn parse_labels_from(body: &str, labels: &mut BTreeMap<String, String>) -> Option<usize> {
    let bytes: Vec<(usize, char)> = body.char_indices().collect();
    let mut i = 0;
    loop {
        while i < bytes.len() && matches!(bytes[i].1, ',' | ' ') {
            i += 1;
        }
        if i < bytes.len() && bytes[i].1 == '}' {
            return Some(bytes[i].0);
        }
        let start = i;
        while i < bytes.len() && bytes[i].1 != '=' {
            i += 1;
        }
        let name: String = bytes[start..i].iter().map(|(_, c)| c).collect();
        i += 1;
        if bytes.get(i)?.1 != '"' {
            return None;
        }
        i += 1;
        let mut value = String::new();
        loop {
            let c = bytes.get(i)?.1;
            i += 1;
            match c {
                '\\' => {
                    let e = bytes.get(i)?.1;
                    i += 1;
                    value.push(if e == 'n' { '\n' } else { e });
                }
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(name.trim().to_string(), value);
    }
}

/// One model version's figures on the Serving page.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VersionFigures {
    /// The model's name (`_unknown` for requests the server could not
    /// attribute).
    pub model: String,
    /// Empty for requests refused before a version was chosen.
    pub version: String,
    /// Requests answered since the server started, over both protocols.
    pub requests_total: f64,
    /// Requests refused or failed since the server started, every kind.
    pub errors_total: f64,
    /// Per second since the previous scrape of this server; `None` on the first.
    pub request_rate: Option<f64>,
    /// Errors per second, like `request_rate`.
    pub error_rate: Option<f64>,
    /// Median request latency since the server started; `None` without
    /// requests.
    pub p50_seconds: Option<f64>,
    /// 99th percentile request latency, like `p50_seconds`.
    pub p99_seconds: Option<f64>,
    /// Rows per forward pass; `None` before the first pass.
    pub mean_batch_size: Option<f64>,
    /// Forward passes run since the server started.
    pub batches: f64,
    /// Percent of the model's traffic (`kiln_serve_version_weight`).
    pub weight: Option<f64>,
    /// Drift statistic by column (`_all`: share of drifted columns).
    pub drift_share: BTreeMap<String, f64>,
    /// Columns whose drift is detected.
    pub drift_detected: Vec<String>,
}

/// A scrape of one server, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct ServingSummary {
    /// The server's base URL (`http://HOST:PORT`).
    pub url: String,
    /// Per model version, sorted by model then version.
    pub versions: Vec<VersionFigures>,
    /// Connections open at the scrape; `None` when the server does not say.
    pub open_connections: Option<f64>,
    /// Requests being answered at the scrape; `None` when the server does
    /// not say.
    pub in_flight_requests: Option<f64>,
    /// Seconds between this scrape and the previous one (rates' window).
    pub window_seconds: Option<f64>,
}

/// Summarises one scrape (without rates).
pub fn summarize(url: &str, samples: &[PromSample]) -> ServingSummary {
    let mut versions: BTreeMap<(String, String), VersionFigures> = BTreeMap::new();
    // (model, version) -> le -> cumulative count, summed over protocols.
    let mut latency: BTreeMap<(String, String), BTreeMap<OrdF64, f64>> = BTreeMap::new();
    let mut batch_sum: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut open_connections = None;
    let mut in_flight_requests = None;
    for s in samples {
        let key = || {
            (
                s.labels.get("model").cloned().unwrap_or_default(),
                s.labels.get("version").cloned().unwrap_or_default(),
            )
        };
        match s.name.as_str() {
            "kiln_serve_requests_total" => {
                entry(&mut versions, key()).requests_total += s.value;
            }
            "kiln_serve_errors_total" => {
                entry(&mut versions, key()).errors_total += s.value;
            }
            "kiln_serve_request_duration_seconds_bucket" => {
                if let Some(le) = s.labels.get("le").and_then(|le| parse_le(le)) {
                    *latency
                        .entry(key())
                        .or_default()
                        .entry(OrdF64(le))
                        .or_default() += s.value;
                }
            }
            "kiln_serve_batch_size_sum" => *batch_sum.entry(key()).or_default() += s.value,
            "kiln_serve_batch_size_count" => {
                entry(&mut versions, key()).batches += s.value;
            }
            "kiln_serve_version_weight" => {
                entry(&mut versions, key()).weight = Some(s.value);
            }
            "kiln_drift_share" => {
                let column = s.labels.get("column").cloned().unwrap_or_default();
                entry(&mut versions, key())
                    .drift_share
                    .insert(column, s.value);
            }
            "kiln_drift_detected" if s.value > 0.0 => {
                let column = s.labels.get("column").cloned().unwrap_or_default();
                entry(&mut versions, key()).drift_detected.push(column);
            }
            "kiln_serve_open_connections" => open_connections = Some(s.value),
            "kiln_serve_in_flight_requests" => in_flight_requests = Some(s.value),
            _ => {}
        }
    }
    for (key, buckets) in &latency {
        if let Some(v) = versions.get_mut(key) {
            v.p50_seconds = quantile(buckets, 0.5);
            v.p99_seconds = quantile(buckets, 0.99);
        }
    }
    for (key, sum) in &batch_sum {
        if let Some(v) = versions.get_mut(key)
            && v.batches > 0.0
        {
            v.mean_batch_size = Some(sum / v.batches);
        }
    }
    ServingSummary {
        url: url.to_string(),
        versions: versions.into_values().collect(),
        open_connections,
        in_flight_requests,
        window_seconds: None,
    }
}

fn entry(
    versions: &mut BTreeMap<(String, String), VersionFigures>,
    (model, version): (String, String),
) -> &mut VersionFigures {
    versions
        .entry((model.clone(), version.clone()))
        .or_insert_with(|| VersionFigures {
            model,
            version,
            ..Default::default()
        })
}

/// A float ordered for use as a map key (bucket bounds are never NaN).
#[derive(Debug, Clone, Copy)]
struct OrdF64(f64);
impl PartialEq for OrdF64 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn parse_le(le: &str) -> Option<f64> {
    match le {
        "+Inf" => Some(f64::INFINITY),
        v => v.parse().ok(),
    }
}

/// The `q` quantile of cumulative histogram buckets, interpolated linearly
/// inside the bucket it falls in (as Prometheus' `histogram_quantile` does).
/// `None` without observations; the largest finite bound when it falls in
/// the `+Inf` bucket.
fn quantile(buckets: &BTreeMap<OrdF64, f64>, q: f64) -> Option<f64> {
    let total = *buckets.get(&OrdF64(f64::INFINITY))?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for (le, &count) in buckets {
        if count >= rank {
            if le.0.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let fraction = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le.0 - lower) * fraction);
        }
        lower = le.0;
        below = count;
    }
    None
}

/// The previous scrape of each server, for rates.
#[derive(Debug, Default)]
pub struct Scrapes {
    previous: Mutex<HashMap<String, (Instant, ServingSummary)>>,
}

impl Scrapes {
    /// Adds rates to `now` from the previous scrape of the same URL, and
    /// remembers `now`.
    pub fn with_rates(&self, mut now: ServingSummary) -> ServingSummary {
        let at = Instant::now();
        let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((then, before)) = previous.get(&now.url) {
            let secs = at.duration_since(*then).as_secs_f64();
            if secs > 0.0 {
                now.window_seconds = Some(secs);
                for v in &mut now.versions {
                    if let Some(b) = before
                        .versions
                        .iter()
                        .find(|b| b.model == v.model && b.version == v.version)
                    {
                        // A restarted server's counters go down: no rate then.
                        let dr = v.requests_total - b.requests_total;
                        let de = v.errors_total - b.errors_total;
                        v.request_rate = (dr >= 0.0).then_some(dr / secs);
                        v.error_rate = (de >= 0.0).then_some(de / secs);
                    }
                }
            }
        }
        previous.insert(now.url.clone(), (at, now.clone()));
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP kiln_serve_requests Inference requests answered
# TYPE kiln_serve_requests counter
kiln_serve_requests_total{model="digits",version="1",protocol="http"} 30
kiln_serve_requests_total{model="digits",version="1",protocol="grpc"} 10
kiln_serve_requests_total{model="digits",version="2",protocol="http"} 4
kiln_serve_errors_total{model="digits",version="",protocol="http",kind="bad_request"} 2
kiln_serve_request_duration_seconds_bucket{le="0.001",model="digits",version="1",protocol="http"} 10
kiln_serve_request_duration_seconds_bucket{le="0.002",model="digits",version="1",protocol="http"} 30
kiln_serve_request_duration_seconds_bucket{le="+Inf",model="digits",version="1",protocol="http"} 30
kiln_serve_request_duration_seconds_bucket{le="0.001",model="digits",version="1",protocol="grpc"} 10
kiln_serve_request_duration_seconds_bucket{le="0.002",model="digits",version="1",protocol="grpc"} 10
kiln_serve_request_duration_seconds_bucket{le="+Inf",model="digits",version="1",protocol="grpc"} 10
kiln_serve_batch_size_sum{model="digits",version="1"} 40
kiln_serve_batch_size_count{model="digits",version="1"} 8
kiln_serve_version_weight{model="digits",version="1"} 90
kiln_serve_version_weight{model="digits",version="2"} 10
kiln_drift_share{model="digits",version="1",column="_all"} 0.25
kiln_drift_detected{model="digits",version="1",column="_all"} 1
kiln_drift_detected{model="digits",version="1",column="x3"} 0
kiln_serve_open_connections 3
weird line without value
odd{label="with \"quote\", and comma"} 1.5
"#;

    #[test]
    fn parses_the_exposition_format() {
        let samples = parse_prometheus(TEXT);
        let odd = samples.iter().find(|s| s.name == "odd").unwrap();
        assert_eq!(odd.labels["label"], "with \"quote\", and comma");
        assert_eq!(odd.value, 1.5);
        assert!(!samples.iter().any(|s| s.name == "weird"));
        let le = samples
            .iter()
            .find(|s| s.labels.get("le").map(String::as_str) == Some("+Inf"))
            .unwrap();
        assert_eq!(le.labels["protocol"], "http");
    }

    #[test]
    fn summarises_per_version_with_quantiles_and_rates() {
        let summary = summarize("http://s", &parse_prometheus(TEXT));
        let v1 = summary.versions.iter().find(|v| v.version == "1").unwrap();
        assert_eq!(v1.requests_total, 40.0);
        assert_eq!(v1.weight, Some(90.0));
        assert_eq!(v1.mean_batch_size, Some(5.0));
        // 40 observations: 20 at or below 1 ms, 20 in (1, 2] ms.
        assert_eq!(v1.p50_seconds, Some(0.001));
        let p99 = v1.p99_seconds.unwrap();
        assert!((p99 - 0.00198).abs() < 1e-9, "{p99}");
        assert_eq!(v1.drift_share["_all"], 0.25);
        assert_eq!(v1.drift_detected, vec!["_all".to_string()]);
        let v2 = summary.versions.iter().find(|v| v.version == "2").unwrap();
        assert_eq!((v2.weight, v2.p50_seconds), (Some(10.0), None));
        let refused = summary
            .versions
            .iter()
            .find(|v| v.version.is_empty())
            .unwrap();
        assert_eq!(refused.errors_total, 2.0);
        assert_eq!(summary.open_connections, Some(3.0));

        let scrapes = Scrapes::default();
        let first = scrapes.with_rates(summary.clone());
        assert!(first.versions.iter().all(|v| v.request_rate.is_none()));
        let mut later = summary;
        later
            .versions
            .iter_mut()
            .for_each(|v| v.requests_total += 10.0);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let second = scrapes.with_rates(later);
        let rate = second.versions[0].request_rate.unwrap();
        assert!(rate > 0.0);
        assert!(second.window_seconds.unwrap() > 0.0);
    }
}

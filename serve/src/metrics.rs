//! The server's Prometheus metrics (`GET /metrics`), labelled by model and
//! version.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `kiln_serve_request_duration_seconds` | histogram | model, version, protocol |
//! | `kiln_serve_queue_duration_seconds` | histogram | model, version |
//! | `kiln_serve_compute_duration_seconds` | histogram | model, version |
//! | `kiln_serve_overhead_seconds` | histogram (a request's time in the server outside its batch's forward passes: parsing, queueing, hand-offs, encoding; fine buckets from 5 us) | model, version, protocol |
//! | `kiln_serve_batch_size` | histogram (rows per batch) | model, version |
//! | `kiln_serve_inline_batches_total` | counter (lone requests run on the thread that parsed them, skipping the queue) | model, version |
//! | `kiln_serve_prompt_tokens` | histogram (tokens per generate prompt) | model, version |
//! | `kiln_serve_generated_tokens` | histogram (tokens per finished generation) | model, version |
//! | `kiln_serve_requests_total` | counter (answered requests) | model, version, protocol |
//! | `kiln_serve_errors_total` | counter (failed requests) | model, version, protocol, kind |
//! | `kiln_serve_version_weight` | gauge (% of the model's traffic) | model, version |
//! | `kiln_serve_swaps_total` | counter | model |
//! | `kiln_serve_load_failures_total` | counter (new versions that failed to load) | model |
//! | `kiln_drift_share` | gauge (share of drifted columns, 0-1) | model, version, column |
//! | `kiln_drift_detected` | gauge (0 or 1) | model, version, column |
//! | `kiln_serve_open_connections` | gauge | |
//! | `kiln_serve_in_flight_requests` | gauge (requests under the in-flight cap) | |
//! | `kiln_serve_connection_timeouts_total` | counter (connections closed) | kind (`header`, `idle`) |
//!
//! `version` is empty on errors that happen before a version is chosen (an
//! unknown model, a malformed body); `column` is `_all` for the version's
//! overall drift verdict.
//!
//! # Label values from clients
//!
//! A label value is a time series for as long as the process lives, so a
//! client must not be able to make new ones: the `model` label of a request
//! is the model's name only when the model is served and the request passed
//! its token check; otherwise it is [`UNKNOWN_MODEL`] (`_unknown`), also for
//! refusals before the model is known (in-flight cap, gRPC requests refused
//! before decoding). Every label value is also bounded to
//! [`MAX_LABEL_BYTES`] and escaped here (`\`, `"`, newline), because
//! prometheus-client 0.23 writes label values as they are: a quote or
//! newline would otherwise corrupt the whole exposition.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `model` label of requests for a model that is not served, that were
/// not authenticated, or that were refused before their model was known.
pub const UNKNOWN_MODEL: &str = "_unknown";

/// Longest label value, in bytes; longer ones are cut (at a character boundary).
pub const MAX_LABEL_BYTES: usize = 128;

/// A label value as the exposition may carry it: at most
/// [`MAX_LABEL_BYTES`] of the original, `\`, `"` and newline escaped, other
/// control characters replaced by `?`.
pub fn label_value(value: &str) -> Cow<'_, str> {
    let clean = value.len() <= MAX_LABEL_BYTES
        && !value
            .chars()
            .any(|c| c == '\\' || c == '"' || c.is_control());
    if clean {
        return Cow::Borrowed(value);
    }
    let mut end = value.len().min(MAX_LABEL_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 8);
    for c in value[..end].chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Label sets whose values are made safe (see [`label_value`]) before use.
trait Sanitize: Clone {
    fn sanitized(&self) -> Cow<'_, Self>;
}

/// Implements [`Sanitize`] for a label struct of string fields.
macro_rules! sanitize {
    ($ty:ident { $($field:ident),+ }) => {
        impl Sanitize for $ty {
            fn sanitized(&self) -> Cow<'_, Self> {
                if $(matches!(label_value(&self.$field), Cow::Borrowed(_)))&&+ {
                    return Cow::Borrowed(self);
                }
                Cow::Owned($ty { $($field: label_value(&self.$field).into_owned()),+ })
            }
        }
    };
}

/// Why connections were closed by the server's timeouts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    /// `header` (no complete request head in time) or `idle`.
    pub kind: String,
}

/// A served version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    /// The model's name.
    pub model: String,
    /// The version number, in decimal.
    pub version: String,
}

/// A request, by where it went and how it came.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The model's name; [`UNKNOWN_MODEL`] until the request is known to
    /// be for a served model and passed its token check.
    pub model: String,
    /// The version that answered; empty before one was chosen.
    pub version: String,
    /// `http` or `grpc`.
    pub protocol: String,
}

/// A failed request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// As in [`RequestLabels`].
    pub model: String,
    /// As in [`RequestLabels`].
    pub version: String,
    /// `http` or `grpc`.
    pub protocol: String,
    /// `bad_request`, `not_found`, `timeout`, ...
    pub kind: String,
}

/// A model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The model's name.
    pub model: String,
}

/// One drift column of a version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    /// The model's name.
    pub model: String,
    /// The version number, in decimal.
    pub version: String,
    /// The column's name in the reference profile, or `_all` for the
    /// window as a whole.
    pub column: String,
}

sanitize!(VersionLabels { model, version });
sanitize!(RequestLabels {
    model,
    version,
    protocol
});
sanitize!(ErrorLabels {
    model,
    version,
    protocol,
    kind
});
sanitize!(ModelLabels { model });
sanitize!(DriftLabels {
    model,
    version,
    column
});

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 50 us .. ~105 s.
    Histogram::new(exponential_buckets(50e-6, 2.0, 22))
}

fn overhead_histogram() -> Histogram {
    // 5 us .. ~30 ms in steps of 25%: fine enough to read a p50 of tens of us.
    Histogram::new(exponential_buckets(5e-6, 1.25, 40))
}

fn rows_histogram() -> Histogram {
    // 1 .. 65536 rows.
    Histogram::new(exponential_buckets(1.0, 2.0, 17))
}

struct Inner {
    registry: Registry,
    request_duration: HistogramFamily<RequestLabels>,
    queue_duration: HistogramFamily<VersionLabels>,
    compute_duration: HistogramFamily<VersionLabels>,
    overhead: HistogramFamily<RequestLabels>,
    batch_size: HistogramFamily<VersionLabels>,
    inline_batches: Family<VersionLabels, Counter>,
    prompt_tokens: HistogramFamily<VersionLabels>,
    generated_tokens: HistogramFamily<VersionLabels>,
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    weight: Family<VersionLabels, Gauge>,
    swaps: Family<ModelLabels, Counter>,
    load_failures: Family<ModelLabels, Counter>,
    drift_share: Family<DriftLabels, Gauge<f64, AtomicU64>>,
    drift_detected: Family<DriftLabels, Gauge>,
    open_connections: Gauge,
    in_flight: Gauge,
    connection_timeouts: Family<TimeoutLabels, Counter>,
}

/// The server's metrics; cheap to clone (shared).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let request_duration =
            HistogramFamily::new_with_constructor(seconds_histogram as fn() -> _);
        let queue_duration = HistogramFamily::new_with_constructor(seconds_histogram as fn() -> _);
        let compute_duration =
            HistogramFamily::new_with_constructor(seconds_histogram as fn() -> _);
        let overhead = HistogramFamily::new_with_constructor(overhead_histogram as fn() -> _);
        let batch_size = HistogramFamily::new_with_constructor(rows_histogram as fn() -> _);
        let inline_batches = Family::<VersionLabels, Counter>::default();
        let prompt_tokens = HistogramFamily::new_with_constructor(rows_histogram as fn() -> _);
        let generated_tokens = HistogramFamily::new_with_constructor(rows_histogram as fn() -> _);
        let requests = Family::<RequestLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let weight = Family::<VersionLabels, Gauge>::default();
        let swaps = Family::<ModelLabels, Counter>::default();
        let load_failures = Family::<ModelLabels, Counter>::default();
        let drift_share = Family::<DriftLabels, Gauge<f64, AtomicU64>>::default();
        let drift_detected = Family::<DriftLabels, Gauge>::default();
        let open_connections = Gauge::default();
        let in_flight = Gauge::default();
        let connection_timeouts = Family::<TimeoutLabels, Counter>::default();
        registry.register(
            "serve_request_duration_seconds",
            "Time from receipt to response of inference requests",
            request_duration.clone(),
        );
        registry.register(
            "serve_queue_duration_seconds",
            "Time inference requests waited for their batch",
            queue_duration.clone(),
        );
        registry.register(
            "serve_compute_duration_seconds",
            "Forward pass time of one batch",
            compute_duration.clone(),
        );
        registry.register(
            "serve_overhead_seconds",
            "Time an answered inference request spent in the server outside its batch's forward passes (parsing, queueing, hand-offs, encoding)",
            overhead.clone(),
        );
        registry.register(
            "serve_batch_size",
            "Rows per batch (padding excluded)",
            batch_size.clone(),
        );
        registry.register(
            "serve_inline_batches",
            "Lone requests run at once on the thread that parsed them (nothing queued, an instance idle)",
            inline_batches.clone(),
        );
        registry.register(
            "serve_prompt_tokens",
            "Tokens in the prompts of generate requests (language models)",
            prompt_tokens.clone(),
        );
        registry.register(
            "serve_generated_tokens",
            "Tokens generated by finished generations (language models)",
            generated_tokens.clone(),
        );
        registry.register(
            "serve_requests",
            "Inference requests answered",
            requests.clone(),
        );
        registry.register(
            "serve_errors",
            "Inference requests that failed, by kind",
            errors.clone(),
        );
        registry.register(
            "serve_version_weight",
            "Share of the model's traffic routed to the version, in percent",
            weight.clone(),
        );
        registry.register(
            "serve_swaps",
            "Times the served versions of a model changed",
            swaps.clone(),
        );
        registry.register(
            "serve_load_failures",
            "New versions of a model that failed to load (the old ones kept serving)",
            load_failures.clone(),
        );
        registry.register(
            "drift_share",
            "Share of drifted columns (column _all) or the column's drift statistic",
            drift_share.clone(),
        );
        registry.register(
            "drift_detected",
            "Whether drift is detected (1) or not (0)",
            drift_detected.clone(),
        );
        registry.register(
            "serve_open_connections",
            "Client connections open",
            open_connections.clone(),
        );
        registry.register(
            "serve_in_flight_requests",
            "Requests being served (those the in-flight cap counts)",
            in_flight.clone(),
        );
        registry.register(
            "serve_connection_timeouts",
            "Connections the server closed: no complete request head in time (header) or no request for too long (idle)",
            connection_timeouts.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                request_duration,
                queue_duration,
                compute_duration,
                overhead,
                batch_size,
                inline_batches,
                prompt_tokens,
                generated_tokens,
                requests,
                errors,
                weight,
                swaps,
                load_failures,
                drift_share,
                drift_detected,
                open_connections,
                in_flight,
                connection_timeouts,
            }),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }

    /// An answered request.
    pub fn observe_request(&self, labels: &RequestLabels, took: Duration) {
        let labels = labels.sanitized();
        self.inner.requests.get_or_create(&labels).inc();
        self.inner
            .request_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A failed request.
    pub fn observe_error(&self, labels: &RequestLabels, kind: &str, took: Duration) {
        let l = ErrorLabels {
            model: labels.model.clone(),
            version: labels.version.clone(),
            protocol: labels.protocol.clone(),
            kind: kind.to_string(),
        };
        self.inner.errors.get_or_create(&l.sanitized()).inc();
        self.inner
            .request_duration
            .get_or_create(&labels.sanitized())
            .observe(took.as_secs_f64());
    }

    /// An answered request's time in the server outside its batch's forward
    /// passes, measured once its response is encoded.
    pub fn observe_overhead(&self, labels: &RequestLabels, overhead: Duration) {
        self.inner
            .overhead
            .get_or_create(labels)
            .observe(overhead.as_secs_f64());
    }

    /// A request's wait for its batch.
    pub fn observe_queue(&self, labels: &VersionLabels, waited: Duration) {
        self.inner
            .queue_duration
            .get_or_create(&labels.sanitized())
            .observe(waited.as_secs_f64());
    }

    /// One batch: its rows and its compute time.
    pub fn observe_batch(&self, labels: &VersionLabels, rows: usize, took: Duration) {
        let labels = labels.sanitized();
        self.inner
            .batch_size
            .get_or_create(&labels)
            .observe(rows as f64);
        self.inner
            .compute_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A lone request run on the thread that parsed it.
    pub fn count_inline(&self, labels: &VersionLabels) {
        self.inner
            .inline_batches
            .get_or_create(&labels.sanitized())
            .inc();
    }

    /// A generate request's prompt length, in tokens.
    pub fn observe_prompt(&self, labels: &VersionLabels, tokens: usize) {
        self.inner
            .prompt_tokens
            .get_or_create(&labels.sanitized())
            .observe(tokens as f64);
    }

    /// A finished generation's length, in tokens.
    pub fn observe_generated(&self, labels: &VersionLabels, tokens: usize) {
        self.inner
            .generated_tokens
            .get_or_create(&labels.sanitized())
            .observe(tokens as f64);
    }

    /// The traffic weights of a model's versions after a (re)load: versions
    /// no longer served drop to 0.
    pub fn set_weights(&self, model: &str, weights: &[(u64, u32)], previous: &[u64]) {
        for v in previous {
            self.inner
                .weight
                .get_or_create(&VersionLabels {
                    model: label_value(model).into_owned(),
                    version: v.to_string(),
                })
                .set(0);
        }
        for (v, w) in weights {
            self.inner
                .weight
                .get_or_create(&VersionLabels {
                    model: label_value(model).into_owned(),
                    version: v.to_string(),
                })
                .set(i64::from(*w));
        }
    }

    /// A swap of a model's versions.
    pub fn count_swap(&self, model: &str) {
        self.inner
            .swaps
            .get_or_create(&ModelLabels {
                model: label_value(model).into_owned(),
            })
            .inc();
    }

    /// A failed load of a model's new versions.
    pub fn count_load_failure(&self, model: &str) {
        self.inner
            .load_failures
            .get_or_create(&ModelLabels {
                model: label_value(model).into_owned(),
            })
            .inc();
    }

    /// One drift column's statistic and verdict.
    pub fn set_drift(&self, labels: &DriftLabels, share: f64, detected: bool) {
        let labels = labels.sanitized();
        self.inner.drift_share.get_or_create(&labels).set(share);
        self.inner
            .drift_detected
            .get_or_create(&labels)
            .set(i64::from(detected));
    }

    /// The gauge of open client connections.
    pub fn open_connections(&self) -> &Gauge {
        &self.inner.open_connections
    }

    /// The gauge of requests under the in-flight cap.
    pub fn in_flight(&self) -> &Gauge {
        &self.inner.in_flight
    }

    /// A connection closed by a timeout (`header` or `idle`).
    pub fn count_connection_timeout(&self, kind: &'static str) {
        self.inner
            .connection_timeouts
            .get_or_create(&TimeoutLabels {
                kind: kind.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::default();
        let r = RequestLabels {
            model: "digits".into(),
            version: "2".into(),
            protocol: "http".into(),
        };
        m.observe_request(&r, Duration::from_millis(3));
        m.observe_error(&r, "bad_request", Duration::from_millis(1));
        let v = VersionLabels {
            model: "digits".into(),
            version: "2".into(),
        };
        m.observe_batch(&v, 5, Duration::from_micros(300));
        m.observe_queue(&v, Duration::from_micros(20));
        m.set_weights("digits", &[(2, 100)], &[1]);
        m.observe_prompt(&v, 7);
        m.observe_generated(&v, 20);
        let text = m.encode();
        for want in [
            "kiln_serve_requests_total{model=\"digits\",version=\"2\",protocol=\"http\"} 1",
            "kiln_serve_errors_total{model=\"digits\",version=\"2\",protocol=\"http\",kind=\"bad_request\"} 1",
            "kiln_serve_batch_size_sum{model=\"digits\",version=\"2\"} 5",
            "kiln_serve_queue_duration_seconds_count{model=\"digits\",version=\"2\"} 1",
            "kiln_serve_compute_duration_seconds_bucket",
            "kiln_serve_request_duration_seconds_count{model=\"digits\",version=\"2\",protocol=\"http\"} 2",
            "kiln_serve_version_weight{model=\"digits\",version=\"1\"} 0",
            "kiln_serve_version_weight{model=\"digits\",version=\"2\"} 100",
            "kiln_serve_prompt_tokens_sum{model=\"digits\",version=\"2\"} 7",
            "kiln_serve_generated_tokens_count{model=\"digits\",version=\"2\"} 1",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_bounded_and_escaped() {
        assert!(matches!(label_value("digits-2"), Cow::Borrowed("digits-2")));
        assert_eq!(label_value("a\"b\\c\nd\re"), "a\\\"b\\\\c\\nd?e");
        let long = "é".repeat(100);
        let cut = label_value(&long);
        assert!(cut.len() <= MAX_LABEL_BYTES && cut.chars().all(|c| c == 'é'));

        let m = Metrics::default();
        let hostile = RequestLabels {
            model: "x\"} 1\nkiln_fake_total 7\n#".into(),
            version: String::new(),
            protocol: "http".into(),
        };
        m.observe_error(&hostile, "not_found", Duration::from_millis(1));
        let text = m.encode();
        assert!(!text.contains("\nkiln_fake_total"), "{text}");
        assert!(
            text.contains(r#"model="x\"} 1\nkiln_fake_total 7\n#""#),
            "{text}"
        );
    }
}

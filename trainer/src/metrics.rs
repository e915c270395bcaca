//! The agent's Prometheus metrics and their HTTP endpoint (`/metrics`, `/healthz`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::error::{Context, Result};

/// Training metrics of one node, fed from its workers' progress reports.
/// Exported with the prefix `kiln_` under the names registered in `default`
/// (`kiln_train_step_seconds`, ...); docs/monitoring.md lists them.
pub struct TrainingMetrics {
    registry: Registry,
    /// Wall time of one step, seconds (rank 0's reports).
    pub step_seconds: Histogram,
    /// Global samples per second over the last step (rank 0's reports).
    pub samples_per_second: Gauge<f64, AtomicU64>,
    /// Global mean loss of the last step.
    pub loss: Gauge<f64, AtomicU64>,
    /// Learning rate of the last step.
    pub learning_rate: Gauge<f64, AtomicU64>,
    /// Global gradient norm before clipping (set when clipping is on).
    pub grad_norm: Gauge<f64, AtomicU64>,
    /// Last completed step.
    pub step: Gauge<i64>,
    /// Seconds the steps waited for the gradient all-reduce, summed over local ranks.
    pub allreduce_seconds: Counter<f64, AtomicU64>,
    /// Gradient bytes all-reduced, summed over local ranks.
    pub allreduce_bytes: Counter,
    /// Samples consumed by the local ranks.
    pub samples: Counter,
    /// Checkpoints committed (fed from rank 0's reports).
    pub checkpoints: Counter,
    /// Step of the last committed checkpoint.
    pub checkpoint_step: Gauge<i64>,
    /// Checkpoint bytes uploaded as new chunks.
    pub checkpoint_uploaded_bytes: Counter,
    /// Checkpoint bytes reused from earlier checkpoints, not uploaded.
    pub checkpoint_reused_bytes: Counter,
    /// How long a save held training up.
    pub checkpoint_blocking_seconds: Histogram,
    /// From the save's start until its manifest was durable.
    pub checkpoint_durable_seconds: Histogram,
}

impl std::fmt::Debug for TrainingMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingMetrics").finish_non_exhaustive()
    }
}

impl Default for TrainingMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let step_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let samples_per_second = Gauge::<f64, AtomicU64>::default();
        let loss = Gauge::<f64, AtomicU64>::default();
        let learning_rate = Gauge::<f64, AtomicU64>::default();
        let grad_norm = Gauge::<f64, AtomicU64>::default();
        let step = Gauge::<i64>::default();
        let allreduce_seconds = Counter::<f64, AtomicU64>::default();
        let allreduce_bytes = Counter::default();
        let samples = Counter::default();
        let checkpoints = Counter::default();
        let checkpoint_step = Gauge::<i64>::default();
        let checkpoint_uploaded_bytes = Counter::default();
        let checkpoint_reused_bytes = Counter::default();
        let checkpoint_blocking_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let checkpoint_durable_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "checkpoints",
            "Checkpoints committed (rank 0's node)",
            checkpoints.clone(),
        );
        registry.register(
            "checkpoint_step",
            "Step of the last committed checkpoint",
            checkpoint_step.clone(),
        );
        registry.register(
            "checkpoint_uploaded_bytes",
            "Checkpoint bytes uploaded (new chunks)",
            checkpoint_uploaded_bytes.clone(),
        );
        registry.register(
            "checkpoint_reused_bytes",
            "Checkpoint bytes reused from earlier checkpoints (not uploaded)",
            checkpoint_reused_bytes.clone(),
        );
        registry.register(
            "checkpoint_blocking_seconds",
            "Seconds a checkpoint save blocked training",
            checkpoint_blocking_seconds.clone(),
        );
        registry.register(
            "checkpoint_durable_seconds",
            "Seconds from a checkpoint save's start until it was durable",
            checkpoint_durable_seconds.clone(),
        );
        registry.register(
            "train_step_seconds",
            "Wall time of one training step (rank 0)",
            step_seconds.clone(),
        );
        registry.register(
            "train_samples_per_second",
            "Global samples per second over the last step",
            samples_per_second.clone(),
        );
        registry.register(
            "train_loss",
            "Global mean loss of the last step",
            loss.clone(),
        );
        registry.register(
            "train_learning_rate",
            "Learning rate of the last step",
            learning_rate.clone(),
        );
        registry.register(
            "train_grad_norm",
            "Global L2 norm of the gradients of the last step, before clipping",
            grad_norm.clone(),
        );
        registry.register("train_step", "Last completed step", step.clone());
        registry.register(
            "allreduce_seconds",
            "Seconds spent in gradient all-reduce, all local ranks",
            allreduce_seconds.clone(),
        );
        registry.register(
            "allreduce_bytes",
            "Gradient bytes all-reduced, all local ranks",
            allreduce_bytes.clone(),
        );
        registry.register(
            "train_samples",
            "Samples consumed by local ranks",
            samples.clone(),
        );
        Self {
            registry,
            step_seconds,
            samples_per_second,
            loss,
            learning_rate,
            grad_norm,
            step,
            allreduce_seconds,
            allreduce_bytes,
            samples,
            checkpoints,
            checkpoint_step,
            checkpoint_uploaded_bytes,
            checkpoint_reused_bytes,
            checkpoint_blocking_seconds,
            checkpoint_durable_seconds,
        }
    }
}

impl TrainingMetrics {
    /// Records a committed checkpoint (call for rank 0's report only).
    pub fn checkpoint_committed(&self, saved: &kiln_proto::worker::CheckpointSaved) {
        self.checkpoints.inc();
        self.checkpoint_step.set(saved.step as i64);
        self.checkpoint_uploaded_bytes.inc_by(saved.bytes_uploaded);
        self.checkpoint_reused_bytes.inc_by(saved.bytes_reused);
        self.checkpoint_blocking_seconds
            .observe(saved.blocking_seconds);
        self.checkpoint_durable_seconds
            .observe(saved.durable_seconds);
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until `cancel`; returns the bound address.
pub async fn serve(
    metrics: Arc<TrainingMetrics>,
    addr: SocketAddr,
    cancel: CancellationToken,
) -> Result<SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind metrics endpoint {addr}"))?;
    let bound = listener.local_addr().context("metrics endpoint address")?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn endpoint_serves_what_was_recorded() {
        let metrics = Arc::new(TrainingMetrics::default());
        metrics.step_seconds.observe(0.02);
        metrics.loss.set(0.5);
        metrics.allreduce_bytes.inc_by(4096);
        let cancel = CancellationToken::new();
        let addr = serve(
            metrics.clone(),
            "127.0.0.1:0".parse().unwrap(),
            cancel.clone(),
        )
        .await
        .unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("kiln_train_step_seconds_count 1"), "{body}");
        assert!(body.contains("kiln_train_loss 0.5"), "{body}");
        assert!(body.contains("kiln_allreduce_bytes_total 4096"), "{body}");
        cancel.cancel();
    }
}

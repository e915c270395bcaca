//! Starting a server: bind, serve (health answers at once), load the
//! configured models; and the one router of the port that REST and gRPC
//! share.
//!
//! One port serves both protocols: the accept loop ([`crate::listener`])
//! serves HTTP/1.1 and HTTP/2 (h2c, or either over TLS) on the same socket,
//! and each request goes to the gRPC service when its `content-type` is
//! `application/grpc` (every gRPC request carries it) and to the REST router
//! otherwise.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use kiln_checkpoint::registry::Registry;
use kiln_hooks::Hooks;
use kiln_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::batcher::BatchSettings;
use crate::config::ServeConfig;
use crate::deployment::Loader;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::server::ServerState;

/// A server that is listening and ready.
pub struct RunningServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    task: JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// The address it listens on (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (tests, embedding).
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Stops accepting, lets requests in flight finish (up to 10 s:
    /// [`crate::listener::SHUTDOWN_GRACE`]), and delivers pending hook
    /// events (up to 5 s).
    pub async fn shutdown(self) -> Result<(), Error> {
        self.state.cancel.cancel();
        self.wait().await
    }

    /// Runs until the server's cancellation token fires (see
    /// [`ServerState::cancel`]), then shuts down as [`Self::shutdown`].
    pub async fn wait(self) -> Result<(), Error> {
        self.state.cancel.cancelled().await;
        // The listener drops connections at its grace; this is a backstop.
        let backstop = crate::listener::SHUTDOWN_GRACE + Duration::from_secs(1);
        let result = match tokio::time::timeout(backstop, self.task).await {
            Ok(Ok(r)) => r.map_err(|e| Error::Serve {
                reason: e.to_string(),
            }),
            Ok(Err(e)) => Err(Error::Serve {
                reason: format!("server task failed: {e}"),
            }),
            Err(_) => {
                tracing::warn!("connections still open 10 s after shutdown began; closing");
                Ok(())
            }
        };
        self.state.hooks.flush(Duration::from_secs(5)).await;
        result
    }
}

/// Binds, starts serving (health answers at once), loads every configured
/// model, and returns once all are ready. `cancel` stops the server.
pub async fn start(config: ServeConfig, cancel: CancellationToken) -> Result<RunningServer, Error> {
    config.validate()?;
    let tokens = config.auth.tokens()?;
    let selectors = config.selectors()?;
    if config.threads > 0 {
        tch::set_num_threads(config.threads as i32);
    }
    let registry = Registry::open(&config.registry)
        .await
        .map_err(|source| Error::Registry {
            url: config.registry.clone(),
            source,
        })?;
    let hooks = Hooks::new(&config.hooks).map_err(|e| Error::Config {
        reason: format!("hooks: {e:#}"),
    })?;
    let metrics = Metrics::default();
    let batch = BatchSettings {
        max_batch_size: config.batching.max_batch_size,
        shapes: config.batch_shapes(),
        max_queue_delay: config.max_queue_delay(),
        queue_capacity: config.batching.queue_capacity,
        max_queue_bytes: config.batching.max_queue_bytes,
        fixed_shape: config.batching.fixed_shape,
        threads: config.threads,
        instances: config.instances(),
        lm_instances: config.lm_instances(),
        packed_shapes: config.packed_shapes(),
        inline_when_idle: config.inline_when_idle(),
    };
    let seed = config.swap.canary_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let tls = crate::listener::tls_acceptor(&config.tls)?;
    let listen = |source| Error::Listen {
        addr: config.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen)?;
    let addr = listener.local_addr().map_err(listen)?;
    let state = Arc::new(ServerState {
        loader: Loader {
            registry: registry.clone(),
            batch,
            metrics: metrics.clone(),
            drift: config.drift.enabled.then(|| config.drift.options()),
            drift_interval: std::time::Duration::from_millis(config.drift.min_interval_ms),
        },
        config,
        registry,
        tokens,
        metrics,
        deployments: RwLock::new(BTreeMap::new()),
        hooks,
        ready: AtomicBool::new(false),
        rng: Mutex::new(seed),
        cancel,
    });
    let app = app(state.clone());
    let limits = crate::listener::Limits::from(&state.config.connections);
    let task = tokio::spawn(crate::listener::serve(
        listener,
        app,
        tls,
        limits,
        state.metrics.clone(),
        state.cancel.clone(),
    ));
    let running = RunningServer {
        addr,
        state: state.clone(),
        task,
    };
    for selector in selectors {
        let what = selector.to_string();
        if let Err(e) = state.load_model(selector).await {
            state.cancel.cancel();
            let _ = running.wait().await;
            return Err(Error::Model {
                model: what,
                reason: e.to_string(),
            });
        }
    }
    state.ready.store(true, Ordering::SeqCst);
    tracing::info!(%addr, models = state.all_deployments().len(), "serving");
    Ok(running)
}

/// The one router of the port: gRPC by content type (through
/// [`crate::grpc_guard`]: token and sizes checked before tonic decodes),
/// REST otherwise.
pub fn app(state: Arc<ServerState>) -> Router {
    let rest = crate::http::router(state.clone());
    let grpc_service =
        GrpcInferenceServiceServer::new(crate::grpc::InferenceService::new(state.clone()))
            .max_decoding_message_size(state.config.limits.max_request_bytes);
    let grpc = tonic::service::Routes::new(grpc_service)
        .prepare()
        .into_axum_router();
    Router::new().fallback_service(tower::service_fn(move |req: Request<Body>| {
        let is_grpc = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let (state, grpc, rest) = (state.clone(), grpc.clone(), rest.clone());
        async move {
            Ok::<Response, Infallible>(if is_grpc {
                crate::grpc_guard::guard(state, grpc, req).await
            } else {
                rest.oneshot(req).await.unwrap_or_else(|e| match e {})
            })
        }
    }))
}

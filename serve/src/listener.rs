//! The accept loop of the one port: HTTP/1.1 and HTTP/2 (h2c, or either over
//! TLS), with the limits that keep slow or hostile clients from taking the
//! server over.
//!
//! - **Connection cap** (`connections.max_connections`): a semaphore permit
//!   per open connection, taken *before* `accept`. At the cap the loop stops
//!   accepting until a connection closes, so new connections wait in the
//!   kernel's listen backlog (bounded by the kernel) instead of being accepted
//!   and closed: a burst of stalled connections then delays a real client by
//!   at most the header timeout, where accept-and-close would refuse it.
//! - **Header read timeout** (`connections.header_read_timeout_ms`): from
//!   accepting a connection (TLS handshake included) to its first complete
//!   request head, and on an idle HTTP/1.1 connection from the first byte of
//!   the next request to its complete head. Past it the connection is
//!   dropped. (hyper's own HTTP/1 header timeout also runs while a keep-alive
//!   connection waits for its next request, which would make it the idle
//!   timeout too; it is off and this one takes its place.)
//! - **Idle timeout** (`connections.idle_timeout_ms`): a connection with no
//!   request in flight for this long is shut down gracefully (HTTP/1: closed;
//!   HTTP/2: GOAWAY), then dropped if it is not gone a header timeout later.
//!   Idleness counts requests, not bytes, so HTTP/2 pings do not keep an
//!   unused connection open.
//! - **HTTP/2 keepalive** (`connections.http2_keepalive_*`): hyper pings the
//!   client and closes the connection when a ping goes unanswered, so a
//!   vanished client's streams (a long generation) are not served forever.
//! - **In-flight cap** (`connections.max_in_flight`): a permit per request,
//!   held until its response body is sent or dropped; without one the
//!   request is answered at once with 503 (gRPC: `UNAVAILABLE`) and
//!   `Retry-After`. Health probes and `/metrics` are not counted, so an
//!   overloaded server still reports itself alive.
//! - **Shutdown**: on cancellation the loop stops accepting and every
//!   connection shuts down gracefully; requests in flight get
//!   [`SHUTDOWN_GRACE`] to finish before their connections are dropped.
//!
//! Each request gets the client's address as axum's
//! `ConnectInfo<SocketAddr>` (management checks use it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, header};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::{ConnectionsConfig, TlsConfig};
use crate::error::RequestError;
use crate::metrics::{Metrics, RequestLabels, UNKNOWN_MODEL};

/// How long requests in flight may take to finish once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Paths the in-flight cap does not count: probes and scrapes must still be
/// answered when the server is saturated.
const UNCOUNTED_PATHS: &[&str] = &[
    "/v2/health/live",
    "/v2/health/ready",
    "/metrics",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
];

/// The limits the loop enforces (see the module docs), each its
/// `[connections]` setting (see [`ConnectionsConfig`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at once; at the cap the loop stops accepting.
    pub max_connections: usize,
    /// Requests served at once (probes and `/metrics` aside); more get 503.
    pub max_in_flight: usize,
    /// From accepting a connection, or a request's first byte on an idle
    /// HTTP/1.1 connection, to its complete head.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings; `None` sends none.
    pub http2_keepalive_interval: Option<Duration>,
    /// An HTTP/2 ping unanswered this long closes the connection.
    pub http2_keepalive_timeout: Duration,
}

impl From<&ConnectionsConfig> for Limits {
    fn from(c: &ConnectionsConfig) -> Self {
        Limits {
            max_connections: c.max_connections,
            max_in_flight: c.max_in_flight,
            header_read_timeout: c.header_read_timeout(),
            idle_timeout: c.idle_timeout(),
            http2_keepalive_interval: c.http2_keepalive_interval(),
            http2_keepalive_timeout: c.http2_keepalive_timeout(),
        }
    }
}

/// The TLS acceptor of `[tls]`, or `None` when TLS is off. The certificate
/// chain and key are read once, here; ALPN offers `h2` and `http/1.1`, so
/// gRPC and REST clients each get their protocol. rustls uses the aws-lc-rs
/// provider (the one the rest of the tree already builds).
pub fn tls_acceptor(tls: &TlsConfig) -> Result<Option<TlsAcceptor>, crate::error::Error> {
    acceptor(tls).map_err(crate::error::Error::config)
}

fn acceptor(tls: &TlsConfig) -> Result<Option<TlsAcceptor>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "tls.cert_file: read PEM certificates from {}",
                cert_file.display()
            )
        })?;
    ensure!(
        !certs.is_empty(),
        "tls.cert_file: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        cert_file.display()
    );
    let key = PrivateKeyDer::from_pem_file(key_file).with_context(|| {
        format!(
            "tls.key_file: read a PEM private key from {}",
            key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("tls: protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "tls: the key in {} does not fit the certificate in {}",
                key_file.display(),
                cert_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// What every connection task shares.
struct Shared {
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    builder: auto::Builder<TokioExecutor>,
    in_flight: Arc<Semaphore>,
    metrics: Metrics,
    cancel: CancellationToken,
}

/// Serves `app` on `listener` until `cancel` fires, then waits for every
/// connection to finish (at most [`SHUTDOWN_GRACE`] each).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    metrics: Metrics,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header timeout is ours (see the module docs).
    builder.http1().header_read_timeout(None).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let shared = Arc::new(Shared {
        app,
        tls,
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
        limits,
        builder,
        metrics,
        cancel: cancel.clone(),
    });
    loop {
        // A slot first, then a connection: at the cap, clients wait in the backlog.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = cancel.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = cancel.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Small answers go out at once (gRPC and REST answers are one write).
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(shared.clone(), stream, peer, permit));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // Out of file descriptors or memory: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed; retrying in 100 ms");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = cancel.cancelled() => break,
                }
            }
        }
    }
    drop(listener);
    // Every connection holds a permit until it is gone.
    let all = u32::try_from(shared.limits.max_connections).unwrap_or(u32::MAX);
    let _ = connections.acquire_many(all).await;
    Ok(())
}

/// Accept errors that concern one connection only (the loop goes on at once).
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let metrics = shared.metrics.clone();
    metrics.open_connections().inc();
    let now = Instant::now();
    let activity = Arc::new(Activity::new(now, now + shared.limits.header_read_timeout));
    match shared.tls.clone() {
        None => serve_connection(&shared, stream, peer, activity).await,
        Some(acceptor) => {
            let deadline = activity.head_deadline().unwrap_or_else(Instant::now);
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_connection(&shared, tls, peer, activity).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => {
                    metrics.count_connection_timeout("header");
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        }
    }
    metrics.open_connections().dec();
}

/// Why a connection's watchdog wakes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// No complete request head in time: drop the connection.
    Header,
    /// No request for the idle timeout: shut down gracefully.
    Idle,
    /// A graceful shutdown did not finish in time: drop the connection.
    Closing,
    /// A request is in flight: nothing to do until it ends.
    Busy,
}

async fn serve_connection<I>(shared: &Arc<Shared>, io: I, peer: SocketAddr, activity: Arc<Activity>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(WatchedIo {
        inner: io,
        activity: activity.clone(),
        header_read_timeout: shared.limits.header_read_timeout,
    });
    let service = {
        let shared = shared.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let shared = shared.clone();
            let activity = activity.clone();
            async move { Ok::<_, Infallible>(handle(&shared, &activity, peer, request).await) }
        })
    };
    let conn = shared.builder.serve_connection(io, service);
    tokio::pin!(conn);
    let limits = &shared.limits;
    let mut closing: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let (deadline, wake) = match closing {
            Some(at) => (at, Wake::Closing),
            None => activity.next_wake(limits.idle_timeout),
        };
        if wake != Wake::Busy && deadline <= now {
            match wake {
                Wake::Header => {
                    shared.metrics.count_connection_timeout("header");
                    tracing::debug!(%peer, "no complete request head in time; closing");
                    return;
                }
                Wake::Idle => {
                    shared.metrics.count_connection_timeout("idle");
                    tracing::debug!(%peer, "idle; closing");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(now + limits.header_read_timeout);
                    continue;
                }
                Wake::Closing => {
                    tracing::debug!(%peer, "connection did not close in time; dropping it");
                    return;
                }
                Wake::Busy => unreachable!("busy has no deadline"),
            }
        }
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = activity.changed.notified() => {}
            _ = shared.cancel.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + SHUTDOWN_GRACE);
            }
            _ = tokio::time::sleep_until(deadline), if wake != Wake::Busy => {}
        }
    }
}

/// One request: the in-flight cap, the client's address, the app, and a
/// guard that lives as long as the response body.
async fn handle(
    shared: &Shared,
    activity: &Arc<Activity>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let received = std::time::Instant::now();
    activity.request_started();
    let mut guard = RequestGuard {
        activity: activity.clone(),
        in_flight: None,
    };
    if !UNCOUNTED_PATHS.contains(&request.uri().path()) {
        match shared.in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                shared.metrics.in_flight().inc();
                guard.in_flight = Some((permit, shared.metrics.clone()));
            }
            Err(_) => {
                let grpc = is_grpc(&request);
                let e = RequestError::unavailable(format!(
                    "the server is serving its limit of {} requests; retry later",
                    shared.limits.max_in_flight
                ));
                let labels = RequestLabels {
                    model: UNKNOWN_MODEL.to_string(),
                    version: String::new(),
                    protocol: if grpc { "grpc" } else { "http" }.to_string(),
                };
                shared
                    .metrics
                    .observe_error(&labels, e.label(), received.elapsed());
                let response = if grpc {
                    tonic::Status::from(e).into_http::<Body>()
                } else {
                    e.into_response()
                };
                return with_guard(response, guard);
            }
        }
    }
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = match shared.app.clone().oneshot(request.map(Body::new)).await {
        Ok(r) => r,
        Err(e) => match e {},
    };
    with_guard(response, guard)
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Keeps `guard` alive until the response body is finished or dropped.
fn with_guard(response: Response<Body>, guard: RequestGuard) -> Response<Body> {
    response.map(|body| {
        Body::new(body.map_frame(move |frame| {
            let _ = &guard;
            frame
        }))
    })
}

/// Ends a request's accounting: its in-flight permit and its connection's
/// activity.
struct RequestGuard {
    activity: Arc<Activity>,
    in_flight: Option<(OwnedSemaphorePermit, Metrics)>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some((_, metrics)) = &self.in_flight {
            metrics.in_flight().dec();
        }
        self.activity.request_ended(Instant::now());
    }
}

// ----- per-connection activity -----

/// The HTTP/2 client preface; a connection starting otherwise is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug)]
enum Protocol {
    /// The first bytes seen so far (a prefix of the HTTP/2 preface).
    Unknown(Vec<u8>),
    Http1,
    Http2,
}

#[derive(Debug)]
struct ActivityState {
    protocol: Protocol,
    /// Requests whose responses are not finished.
    active: usize,
    /// When the request head being read must be complete.
    head_deadline: Option<Instant>,
    /// Since when no request has been in flight.
    idle_since: Instant,
}

/// What a connection's watchdog needs to know: bytes read (to start the
/// header clock), requests started and ended.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
    /// Wakes the watchdog to recompute its deadline.
    changed: Notify,
}

impl Activity {
    /// A connection accepted at `now`, whose first request head is due by
    /// `head_deadline`.
    fn new(now: Instant, head_deadline: Instant) -> Self {
        Activity {
            state: Mutex::new(ActivityState {
                protocol: Protocol::Unknown(Vec::new()),
                active: 0,
                head_deadline: Some(head_deadline),
                idle_since: now,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn head_deadline(&self) -> Option<Instant> {
        self.lock().head_deadline
    }

    /// The watchdog's next deadline and what to do then.
    fn next_wake(&self, idle_timeout: Duration) -> (Instant, Wake) {
        let s = self.lock();
        match s.head_deadline {
            Some(at) => (at, Wake::Header),
            None if s.active > 0 => (s.idle_since, Wake::Busy),
            None => (s.idle_since + idle_timeout, Wake::Idle),
        }
    }

    /// Bytes arrived: tells HTTP/1 from HTTP/2 and starts the header clock
    /// on an idle HTTP/1 connection.
    fn on_read(&self, bytes: &[u8], now: Instant, header_read_timeout: Duration) {
        let mut s = self.lock();
        let mut notify = false;
        if let Protocol::Unknown(seen) = &mut s.protocol {
            let want = H2_PREFACE.len() - seen.len();
            seen.extend_from_slice(&bytes[..bytes.len().min(want)]);
            if !H2_PREFACE.starts_with(seen) {
                s.protocol = Protocol::Http1;
            } else if seen.len() == H2_PREFACE.len() {
                // HTTP/2 from here on: requests are streams, and an open
                // connection without streams is idle, not slow.
                s.protocol = Protocol::Http2;
                s.head_deadline = None;
                s.idle_since = now;
                notify = true;
            }
        }
        if matches!(s.protocol, Protocol::Http1) && s.active == 0 && s.head_deadline.is_none() {
            s.head_deadline = Some(now + header_read_timeout);
            notify = true;
        }
        drop(s);
        if notify {
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        // (No clock: a request start only stops the header clock.)
        let mut s = self.lock();
        s.active += 1;
        s.head_deadline = None;
        drop(s);
        self.changed.notify_one();
    }

    fn request_ended(&self, now: Instant) {
        let mut s = self.lock();
        s.active = s.active.saturating_sub(1);
        if s.active == 0 {
            s.idle_since = now;
        }
        drop(s);
        self.changed.notify_one();
    }
}

/// A connection's byte stream, reporting reads to its [`Activity`].
struct WatchedIo<I> {
    inner: I,
    activity: Arc<Activity>,
    header_read_timeout: Duration,
}

impl<I: AsyncRead + Unpin> AsyncRead for WatchedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                self.activity
                    .on_read(new, Instant::now(), self.header_read_timeout);
            }
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WatchedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Duration = Duration::from_millis(300);
    const IDLE: Duration = Duration::from_secs(5);

    #[test]
    fn http1_header_clock_starts_at_accept_and_at_each_new_request() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let a = Activity::new(t0, t0 + HEADER);
        assert_eq!(a.next_wake(IDLE), (t0 + HEADER, Wake::Header));
        a.on_read(b"GET / HT", at(100), HEADER);
        // Still the clock started at accept, not a new one per byte.
        assert_eq!(a.next_wake(IDLE), (t0 + HEADER, Wake::Header));
        a.request_started();
        assert_eq!(a.next_wake(IDLE).1, Wake::Busy);
        a.request_ended(at(1000));
        assert_eq!(a.next_wake(IDLE), (at(1000) + IDLE, Wake::Idle));
        // The next request's first byte starts a new header clock.
        a.on_read(b"G", at(2000), HEADER);
        assert_eq!(a.next_wake(IDLE), (at(2000) + HEADER, Wake::Header));
        a.on_read(b"ET / HTTP/1.1", at(2100), HEADER);
        assert_eq!(a.next_wake(IDLE), (at(2000) + HEADER, Wake::Header));
        // Two requests in flight (pipelined): busy until both end.
        a.request_started();
        a.request_started();
        a.request_ended(at(3000));
        assert_eq!(a.next_wake(IDLE).1, Wake::Busy);
        a.request_ended(at(4000));
        assert_eq!(a.next_wake(IDLE), (at(4000) + IDLE, Wake::Idle));
    }

    #[test]
    fn http2_is_idle_not_slow_between_streams() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let a = Activity::new(t0, t0 + HEADER);
        a.on_read(&H2_PREFACE[..10], at(10), HEADER);
        assert_eq!(a.next_wake(IDLE), (t0 + HEADER, Wake::Header));
        a.on_read(&H2_PREFACE[10..], at(20), HEADER);
        assert_eq!(a.next_wake(IDLE), (at(20) + IDLE, Wake::Idle));
        // Pings and settings frames do not start a header clock.
        a.on_read(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00", at(30), HEADER);
        assert_eq!(a.next_wake(IDLE), (at(20) + IDLE, Wake::Idle));
    }
}

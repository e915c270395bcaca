//! [`EtcdStore`]: the [`Store`] over an etcd v3 cluster, through `etcd-client`.
//!
//! # Endpoints and retries
//!
//! The store keeps one gRPC client per endpoint rather than one client
//! balancing over all of them: tonic's balancer keeps sending a share of the
//! requests to a dead member (TOOLCHAIN.md measured ~20% failures with one dead
//! endpoint in three). Instead every request goes to one *preferred* endpoint,
//! the first of the list at start. When an endpoint cannot be reached (connect
//! refused, connection broken, no answer within
//! [`EtcdOptions::attempt_timeout`]) or its member has lost the cluster's
//! leader, it is marked down for a cool-down (doubling per failure, capped at
//! [`EtcdOptions::max_endpoint_cooldown`]), the preferred endpoint moves to the
//! next one that is up, and the request is retried there at once. Transient
//! cluster conditions (a leader election in progress: "leader changed", "no
//! leader", "request timed out", "too many requests") are retried after an
//! exponential backoff with jitter ([`EtcdOptions::min_backoff`] to
//! [`EtcdOptions::max_backoff`]). A call gives up after
//! [`EtcdOptions::request_deadline`] with [`Error::Unavailable`] naming the
//! last endpoint and error. List the endpoints in a different order on
//! different machines to spread clients over the members.
//!
//! A retried write may have been applied by an attempt whose answer was lost
//! (a leader that died after committing it). The callers in this crate allow for
//! that: a create-only swap that finds its own value is a success to them
//! ([`crate::election::campaign`], the rendezvous plan writer). Here, a revoke
//! that finds its lease gone after such an attempt succeeds; a `delete` may
//! then report `false` for a key it deleted; a `grant_lease` may leave an
//! unused lease that expires after its TTL.
//!
//! # Watches
//!
//! Each watch is one gRPC watch stream served by a task. When the stream breaks
//! (its member died, lost its leader, or the connection dropped) the task opens
//! a new one, on another endpoint if needed, from the revision after the last
//! event it delivered, so the reader sees no gap and no repeat. A watch ends
//! with [`Error::Compacted`] when etcd no longer has the history it needs, and
//! with [`Error::Unavailable`] when no endpoint accepts a new stream within
//! [`EtcdOptions::request_deadline`].
//!
//! # Leases
//!
//! etcd counts lease TTLs in whole seconds: a TTL is rounded up, and to at
//! least [`MIN_LEASE_TTL`] (etcd's own floor with its default election
//! timeout). `keep_alive` is one refresh on its own keep-alive stream.
//!
//! # TLS and authentication
//!
//! [`EtcdSecurity`] (read from an `etcds://` / `?user=` store URL by
//! [`EtcdSecurity::from_url`]) adds TLS (the servers' certificates must chain to
//! the given CA; optionally a client certificate) and an etcd user. Each
//! endpoint's client authenticates before its first request (so an endpoint
//! that is down at start does not fail the connect) and then carries etcd's
//! token. etcd expires tokens (simple tokens after `--auth-token-ttl`, 300 s by
//! default, of disuse): `etcd-client`'s automatic token refresh
//! (`with_auto_token_refresh`) re-authenticates and repeats a request that was
//! refused with an invalid token, including the opening of watch and
//! keep-alive streams. Refused credentials and missing permissions are
//! [`Error::AccessDenied`]; a certificate that does not verify is
//! [`Error::Unavailable`] at once, naming the TLS error, without retries.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use kiln_proto::store_url::{EtcdUrl, PASSWORD_ENV};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{
    CasOutcome, Expect, Fence, FencedOutcome, KeyValue, LeaseId, Revision, Store, WatchEvent,
    WatchStream, check_key,
};
use crate::error::{Error, Result};

/// The shortest lease etcd grants with its default timings; shorter TTLs are
/// raised to it.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Events buffered per watch before the watch task waits for its reader (etcd
/// then buffers on its side without losing anything).
const WATCH_CHANNEL_CAPACITY: usize = 256;

/// A watch stream that breaks sooner than this after it opened counts as a
/// quick break: the next resume waits a backoff first.
const QUICK_BREAK: Duration = Duration::from_secs(10);

/// Keys per page of a prefix listing: pages stay far below gRPC's 4 MiB
/// message limit for the small values kiln stores.
const LIST_PAGE: i64 = 1000;

/// Timings of an [`EtcdStore`]'s requests. The defaults suit a cluster on one
/// network: a leader failover (about 2 s with etcd's default timings) is
/// ridden out well within the deadline.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// The longest one call keeps retrying before it fails with
    /// [`Error::Unavailable`]; also how long a broken watch tries to resume.
    pub request_deadline: Duration,
    /// The longest one attempt may take before it is abandoned and retried
    /// (etcd itself gives up on a stuck proposal after about 7 s).
    pub attempt_timeout: Duration,
    /// The longest a TCP connect to an endpoint may take.
    pub connect_timeout: Duration,
    /// First wait between attempts after a transient error; doubles per attempt.
    pub min_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// How long an endpoint that failed is passed over, the first time.
    pub endpoint_cooldown: Duration,
    /// Longest cool-down of an endpoint that keeps failing.
    pub max_endpoint_cooldown: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            request_deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            endpoint_cooldown: Duration::from_secs(1),
            max_endpoint_cooldown: Duration::from_secs(30),
        }
    }
}

/// How an [`EtcdStore`] protects its connections: TLS settings and an etcd
/// user. `Debug` shows whether TLS is on and the user name, never the password.
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    /// `Some`: connect with TLS (`https://` endpoints).
    tls: Option<TlsOptions>,
    credentials: Option<Credentials>,
}

#[derive(Clone)]
struct Credentials {
    user: String,
    password: String,
}

impl EtcdSecurity {
    /// Plain text, no authentication (an `etcd://` URL without parameters).
    pub fn none() -> Self {
        EtcdSecurity::default()
    }

    /// Reads the files a store URL names: the CA, the client certificate and
    /// key, the password file (else the password from `KILN_ETCD_PASSWORD`).
    /// Errors ([`Error::Invalid`]) name the parameter and the path.
    pub fn from_url(url: &EtcdUrl) -> Result<Self> {
        let tls = match &url.tls {
            None => None,
            Some(tls) => {
                let ca = read_pem("ca", &tls.ca, "CERTIFICATE")?;
                let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
                if let Some(client) = &tls.client {
                    let cert = read_pem("cert", &client.cert, "CERTIFICATE")?;
                    let key = read_pem("key", &client.key, "PRIVATE KEY")?;
                    config = config.identity(Identity::from_pem(cert, key));
                }
                Some(config)
            }
        };
        let credentials = match &url.user {
            None => None,
            Some(user) => {
                let password = match &url.password_file {
                    Some(path) => {
                        let text = read_file("password_file", path)?;
                        let text = String::from_utf8(text).map_err(|_| {
                            Error::invalid(
                                "store url",
                                format!("password_file={}: not UTF-8 text", path.display()),
                            )
                        })?;
                        text.lines().next().unwrap_or("").to_string()
                    }
                    None => std::env::var(PASSWORD_ENV).unwrap_or_default(),
                };
                if password.is_empty() {
                    return Err(Error::invalid(
                        "store url",
                        format!(
                            "user={user} needs a password: give password_file=PATH in the \
                             store URL or set {PASSWORD_ENV} (the password file is empty or \
                             the variable unset)"
                        ),
                    ));
                }
                Some(Credentials {
                    user: user.clone(),
                    password,
                })
            }
        };
        Ok(EtcdSecurity { tls, credentials })
    }

    /// Connects with TLS, trusting the CA certificate(s) in `ca_pem`.
    pub fn with_tls_ca(mut self, ca_pem: impl AsRef<[u8]>) -> Self {
        self.tls = Some(TlsOptions::new().ca_certificate(Certificate::from_pem(ca_pem)));
        self
    }

    /// Authenticates as etcd user `user`.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The etcd user requests authenticate as, if any.
    pub fn user(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.user.as_str())
    }
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.is_tls())
            .field("user", &self.user())
            .finish()
    }
}

fn read_file(parameter: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| {
        Error::invalid(
            "store url",
            format!("{parameter}={}: cannot read it: {error}", path.display()),
        )
    })
}

/// Reads a PEM file and checks that it holds a `-----BEGIN ...{label}-----`
/// block (tonic would otherwise fail later with a vaguer message).
fn read_pem(parameter: &str, path: &Path, label: &str) -> Result<Vec<u8>> {
    let bytes = read_file(parameter, path)?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.ends_with(&format!("{label}-----")));
    if !found {
        return Err(Error::invalid(
            "store url",
            format!("{parameter}={}: no PEM {label} in it", path.display()),
        ));
    }
    Ok(bytes)
}

/// A [`Store`] on an etcd cluster. See the [module docs](self) for how it
/// handles endpoints, retries, watches and leases.
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// Ends the watch tasks when the store is dropped.
    shutdown: CancellationToken,
}

struct Inner {
    endpoints: Vec<Endpoint>,
    /// Index of the endpoint requests go to while it is up.
    preferred: AtomicUsize,
    options: EtcdOptions,
    /// The etcd user each endpoint's client authenticates as.
    credentials: Option<Credentials>,
    /// Whether the endpoints are reached over TLS.
    tls: bool,
    /// Whether any request has succeeded yet (see `closed_without_answer`).
    answered: AtomicBool,
}

struct Endpoint {
    /// `host:port`, as given.
    address: String,
    client: Client,
    /// Whether `client` holds a token (with credentials to renew it): set by
    /// its first successful authentication.
    authenticated: AtomicBool,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// Failures since the endpoint last answered; sets the cool-down.
    failures: u32,
    /// Passed over until then.
    down_until: Option<Instant>,
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`host:port` each) with
    /// [`EtcdOptions::default`], and checks that one of them answers.
    pub async fn connect(endpoints: &[String]) -> Result<Arc<Self>> {
        Self::connect_with(endpoints, EtcdOptions::default()).await
    }

    /// Connects with the given timings. Errors: [`Error::Invalid`] for an empty
    /// list or an endpoint that is not `host:port`; [`Error::Unavailable`] when
    /// no endpoint answers within [`EtcdOptions::request_deadline`].
    pub async fn connect_with(endpoints: &[String], options: EtcdOptions) -> Result<Arc<Self>> {
        Self::connect_secured(endpoints, &EtcdSecurity::none(), options).await
    }

    /// Connects with TLS and/or authentication. Errors as
    /// [`connect_with`](Self::connect_with), and [`Error::AccessDenied`] when
    /// etcd refuses the credentials; a server certificate that does not verify
    /// against the CA is [`Error::Unavailable`] naming the TLS error.
    pub async fn connect_secured(
        endpoints: &[String],
        security: &EtcdSecurity,
        options: EtcdOptions,
    ) -> Result<Arc<Self>> {
        if endpoints.is_empty() {
            return Err(Error::invalid(
                "etcd endpoints",
                "the list is empty; give at least one host:port",
            ));
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            // Finds a silently dead connection (a partition) in ~15 s; etcd
            // refuses pings more often than every 5 s.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // A member without a leader refuses requests (and ends watches)
            // instead of stalling them: the request moves to another member.
            .with_require_leader(true);
        let connect = match &security.tls {
            Some(tls) => connect.with_tls(tls.clone()),
            None => connect,
        };
        // Re-authenticate and repeat a request refused for an expired token.
        let connect = connect.with_auto_token_refresh(security.credentials.is_some());
        let scheme = if security.is_tls() { "https" } else { "http" };
        let mut members = Vec::with_capacity(endpoints.len());
        for address in endpoints {
            check_endpoint(address)?;
            // No request is made here (no user in `connect`): endpoints
            // authenticate on first use, see `Inner::authenticate`.
            let client = Client::connect([format!("{scheme}://{address}")], Some(connect.clone()))
                .await
                .map_err(|error| {
                    Error::invalid(
                        "etcd endpoint",
                        format!("{address:?}: {}", describe(&error)),
                    )
                })?;
            members.push(Endpoint {
                address: address.clone(),
                client,
                authenticated: AtomicBool::new(false),
                health: Mutex::new(Health::default()),
            });
        }
        let store = EtcdStore {
            inner: Arc::new(Inner {
                endpoints: members,
                preferred: AtomicUsize::new(0),
                options,
                credentials: security.credentials.clone(),
                tls: security.is_tls(),
                answered: AtomicBool::new(false),
            }),
            shutdown: CancellationToken::new(),
        };
        store
            .inner
            .call("connect", |mut client| async move {
                client.status().await.map(drop)
            })
            .await
            .map_err(|failure| failure.into_error("connect to etcd"))?;
        Ok(Arc::new(store))
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner
            .endpoints
            .iter()
            .map(|e| e.address.clone())
            .collect()
    }

    /// Discards the history before `revision` (etcd's compaction): watches from
    /// earlier revisions then fail with [`Error::Compacted`]. For operators and
    /// tests; kiln itself never compacts.
    pub async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner
            .call("compact", |mut client| async move {
                client.compact(revision, None).await.map(drop)
            })
            .await
            .map_err(|failure| failure.into_error("compact"))
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints())
            .field("tls", &self.inner.tls)
            .field(
                "user",
                &self.inner.credentials.as_ref().map(|c| c.user.as_str()),
            )
            .field(
                "preferred",
                &self.inner.endpoints[self.inner.preferred.load(Ordering::Relaxed)].address,
            )
            .finish()
    }
}

fn check_endpoint(address: &str) -> Result<()> {
    let ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !ok || address.contains("://") {
        return Err(Error::invalid(
            "etcd endpoint",
            format!("{address:?} is not host:port (no scheme, e.g. 127.0.0.1:2379)"),
        ));
    }
    Ok(())
}

/// What one failed attempt means for the next.
#[derive(Debug)]
enum Verdict {
    /// etcd answered, and asking again will not change the answer.
    Refused(Refusal),
    /// Worth another attempt.
    Retry {
        /// The endpoint is unreachable or cut off from the leader: pass it over.
        blame_endpoint: bool,
        /// The request may have been applied although its answer was lost.
        maybe_applied: bool,
    },
}

/// An answer etcd will give again.
#[derive(Debug)]
struct Refusal {
    code: Code,
    message: String,
}

/// How a call ended without a result.
#[derive(Debug)]
enum Failure {
    /// etcd refused the request. `maybe_applied`: an earlier attempt may have
    /// been applied (the refusal may be the consequence of it).
    Refused {
        refusal: Refusal,
        maybe_applied: bool,
    },
    /// No endpoint answered in time.
    GaveUp(Error),
}

impl Failure {
    /// The crate error for a failure with no operation-specific meaning.
    fn into_error(self, what: &str) -> Error {
        match self {
            Failure::GaveUp(error) => error,
            Failure::Refused { refusal, .. } => refusal.into_error(what),
        }
    }
}

impl Refusal {
    fn is_lease_not_found(&self) -> bool {
        self.code == Code::NotFound && self.message.contains("lease not found")
    }

    fn is_compacted(&self) -> bool {
        self.code == Code::OutOfRange && self.message.contains("compacted")
    }

    fn is_future_revision(&self) -> bool {
        self.code == Code::OutOfRange && self.message.contains("future revision")
    }

    fn into_error(self, what: &str) -> Error {
        let message = self.message;
        match self.code {
            Code::PermissionDenied => Error::access_denied(format!(
                "{what}: {message} (the etcd user's roles do not allow this key range)"
            )),
            Code::Unauthenticated => Error::access_denied(format!("{what}: {message}")),
            // Not an answer of etcd's: a TLS handshake or a connection that
            // cannot work (see `classify`, `closed_without_answer`).
            Code::Unavailable => Error::unavailable(format!("{what}: {message}")),
            Code::InvalidArgument if message.contains("authentication failed") => {
                Error::access_denied(format!(
                    "{what}: {message} (check the store URL's user and password)"
                ))
            }
            Code::InvalidArgument if message.contains("user name is empty") => {
                Error::access_denied(format!(
                    "{what}: {message}: etcd requires authentication; add user=NAME to the \
                     store URL and give its password (password_file= or {PASSWORD_ENV})"
                ))
            }
            Code::FailedPrecondition if message.contains("authentication is not enabled") => {
                Error::invalid(
                    what,
                    format!("{message}: remove user= from the store URL, or enable auth in etcd"),
                )
            }
            Code::NotFound => Error::not_found(format!("{what}: {message}")),
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                Error::invalid(what, message)
            }
            _ => Error::unavailable(format!("{what}: etcd refused: {message}")),
        }
    }
}

/// Sorts an etcd client error into refused (final) or worth retrying.
fn classify(error: &etcd_client::Error) -> Verdict {
    use etcd_client::Error as E;
    let retry = |blame_endpoint, maybe_applied| Verdict::Retry {
        blame_endpoint,
        maybe_applied,
    };
    if describe(error).contains(INVALID_TOKEN) {
        // A stream refused in-band (a watch not created), which etcd-client's
        // token refresh does not see: `call_on` re-authenticates the endpoint.
        return retry(false, false);
    }
    if let Some(tls_error) = tls_failure(error) {
        // A certificate that does not verify will not verify next time.
        return Verdict::Refused(Refusal {
            code: Code::Unavailable,
            message: format!("TLS handshake failed: {tls_error}"),
        });
    }
    match error {
        E::GRpcStatus(status) => {
            let message = status.message();
            match status.code() {
                Code::Unavailable => {
                    if message.contains("no leader") {
                        // Not proposed; another member may have a leader.
                        retry(true, false)
                    } else if message.contains("leader changed") || message.contains("timed out") {
                        // Proposed, outcome unknown; the member itself is fine.
                        retry(false, true)
                    } else if message.contains("connect") {
                        // tcp connect error / error trying to connect: never sent.
                        retry(true, false)
                    } else {
                        // Connection broken mid-request, member stopping, ...
                        retry(true, true)
                    }
                }
                Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted => {
                    retry(false, true)
                }
                // h2 and hyper failures of a broken connection surface as these.
                Code::Unknown | Code::Internal | Code::Cancelled => retry(true, true),
                code => Verdict::Refused(Refusal {
                    code,
                    message: message.to_string(),
                }),
            }
        }
        E::TransportError(_) => retry(true, false),
        E::IoError(_) => retry(true, true),
        E::LeaseKeepAliveError(message) if message.contains("lease not found") => {
            Verdict::Refused(Refusal {
                code: Code::NotFound,
                message: "etcdserver: requested lease not found".to_string(),
            })
        }
        // The client's own stream plumbing: a stream that closed early.
        E::WatchError(_) | E::LeaseKeepAliveError(_) => retry(true, true),
        other => Verdict::Refused(Refusal {
            code: Code::Unknown,
            message: other.to_string(),
        }),
    }
}

/// etcd's answer to an expired (or otherwise unknown) auth token.
const INVALID_TOKEN: &str = "invalid auth token";

/// An error with its causes (etcd-client's errors do not expose their source,
/// and a tonic status keeps the interesting part, such as a TLS alert, there).
fn describe(error: &etcd_client::Error) -> String {
    use etcd_client::Error as E;
    use std::error::Error as _;
    let (mut text, mut source) = match error {
        E::GRpcStatus(status) => (status.message().to_string(), status.source()),
        E::TransportError(transport) => (transport.to_string(), transport.source()),
        other => (other.to_string(), None),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether a failure is a connection the server closed before any HTTP/2
/// answer: what a TLS-only etcd port does to a plain-text client.
fn closed_without_answer(message: &str) -> bool {
    ["broken pipe", "connection reset", "connection closed"]
        .iter()
        .any(|needle| message.contains(needle))
}

/// The TLS error in a failed request, if the failure was a TLS handshake that
/// cannot succeed (a certificate that does not verify, an alert from the peer).
fn tls_failure(error: &etcd_client::Error) -> Option<String> {
    let text = describe(error);
    let lower = text.to_ascii_lowercase();
    ["certificate", "received fatal alert", "tls handshake"]
        .iter()
        .any(|needle| lower.contains(needle))
        .then_some(text)
}

impl Endpoint {
    fn is_up(&self, now: Instant) -> bool {
        self.health().down_until.is_none_or(|until| until <= now)
    }

    fn down_until(&self) -> Option<Instant> {
        self.health().down_until
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mark_up(&self) {
        let mut health = self.health();
        if health.failures > 0 {
            tracing::info!(endpoint = self.address, "etcd endpoint answers again");
        }
        *health = Health::default();
    }

    fn mark_down(&self, options: &EtcdOptions, error: &str) {
        let now = Instant::now();
        let mut health = self.health();
        if health.down_until.is_some_and(|until| until > now) {
            // Concurrent requests failing on it count once.
            return;
        }
        health.failures = health.failures.saturating_add(1);
        let doublings = (health.failures - 1).min(16);
        let cooldown = options
            .endpoint_cooldown
            .saturating_mul(1 << doublings)
            .min(options.max_endpoint_cooldown);
        health.down_until = Some(now + cooldown);
        if health.failures == 1 {
            tracing::warn!(
                endpoint = self.address,
                error,
                ?cooldown,
                "etcd endpoint failed; using the others"
            );
        } else {
            tracing::debug!(
                endpoint = self.address,
                error,
                ?cooldown,
                "etcd endpoint still failing"
            );
        }
    }
}

impl Inner {
    /// The endpoint to send the next attempt to: the preferred one if it is
    /// up, else the next that is up (which becomes preferred), else the one
    /// whose cool-down ends first.
    fn pick(&self) -> usize {
        let count = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % count;
        let now = Instant::now();
        for step in 0..count {
            let index = (start + step) % count;
            if self.endpoints[index].is_up(now) {
                if step != 0 {
                    self.preferred.store(index, Ordering::Relaxed);
                }
                return index;
            }
        }
        (0..count)
            .min_by_key(|&i| self.endpoints[i].down_until())
            .unwrap_or(start)
    }

    fn any_other_up(&self, index: usize) -> bool {
        let now = Instant::now();
        self.endpoints
            .iter()
            .enumerate()
            .any(|(i, e)| i != index && e.is_up(now))
    }

    /// Runs `op` against an endpoint's client until it succeeds, etcd refuses
    /// it, or the deadline passes. Returns the result and the endpoint index.
    async fn call_on<T, F, Fut>(&self, what: &str, mut op: F) -> Result<(T, usize), Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let options = &self.options;
        let started = Instant::now();
        let deadline = started + options.request_deadline;
        let mut backoff = options.min_backoff;
        let mut maybe_applied = false;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let index = self.pick();
            let endpoint = &self.endpoints[index];
            let attempt = tokio::time::timeout(options.attempt_timeout, async {
                self.authenticate(endpoint).await?;
                op(endpoint.client.clone()).await
            });
            let (verdict, message) = match attempt.await {
                Ok(Ok(value)) => {
                    endpoint.mark_up();
                    self.answered.store(true, Ordering::Relaxed);
                    return Ok((value, index));
                }
                Ok(Err(error)) => {
                    let message = describe(&error);
                    if message.contains(INVALID_TOKEN) {
                        endpoint.authenticated.store(false, Ordering::Release);
                    }
                    if !self.tls
                        && !self.answered.load(Ordering::Relaxed)
                        && closed_without_answer(&message)
                    {
                        // Not retried for the request deadline: the port most
                        // likely wants TLS, and will want it next time.
                        return Err(Failure::Refused {
                            refusal: Refusal {
                                code: Code::Unavailable,
                                message: format!(
                                    "{} closed the plain-text connection without answering \
                                     ({message}); if etcd serves TLS there, use \
                                     etcds://HOST:PORT?ca=PATH",
                                    endpoint.address
                                ),
                            },
                            maybe_applied,
                        });
                    }
                    (classify(&error), message)
                }
                Err(_) => (
                    Verdict::Retry {
                        blame_endpoint: true,
                        maybe_applied: true,
                    },
                    format!("no answer within {:?}", options.attempt_timeout),
                ),
            };
            match verdict {
                Verdict::Refused(refusal) => {
                    endpoint.mark_up();
                    return Err(Failure::Refused {
                        refusal,
                        maybe_applied,
                    });
                }
                Verdict::Retry {
                    blame_endpoint,
                    maybe_applied: applied,
                } => {
                    maybe_applied |= applied;
                    if blame_endpoint {
                        endpoint.mark_down(options, &message);
                    }
                    // Another endpoint is up: switching to it costs nothing.
                    let switch_now = blame_endpoint && self.any_other_up(index);
                    let wait = if switch_now {
                        Duration::ZERO
                    } else {
                        jitter(backoff)
                    };
                    if Instant::now() + wait >= deadline {
                        return Err(Failure::GaveUp(Error::unavailable(format!(
                            "{what}: etcd did not answer after {attempts} attempts in {:.1?}; last error from {}: {message}",
                            started.elapsed(),
                            endpoint.address
                        ))));
                    }
                    tracing::debug!(
                        what,
                        endpoint = endpoint.address,
                        attempts,
                        error = message,
                        ?wait,
                        "etcd request failed; retrying"
                    );
                    if !switch_now {
                        tokio::time::sleep(wait).await;
                        backoff = (backoff * 2).min(options.max_backoff);
                    }
                }
            }
        }
    }

    /// Authenticates the endpoint's client once, with the store's
    /// credentials (none: nothing to do). From then on the client renews its
    /// token by itself when etcd says it expired.
    async fn authenticate(&self, endpoint: &Endpoint) -> Result<(), etcd_client::Error> {
        let Some(credentials) = &self.credentials else {
            return Ok(());
        };
        if endpoint.authenticated.load(Ordering::Acquire) {
            return Ok(());
        }
        // Clones of a client share its credentials and token.
        endpoint
            .client
            .clone()
            .update_user(Some((
                credentials.user.clone(),
                credentials.password.clone(),
            )))
            .await?;
        endpoint.authenticated.store(true, Ordering::Release);
        Ok(())
    }

    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(what, op).await.map(|(value, _)| value)
    }

    /// Opens a watch stream on `range` for events after `after` (`None`: from
    /// now) and waits until etcd confirms it.
    async fn open_watch(
        &self,
        range: &KeyRange,
        after: Option<Revision>,
    ) -> Result<(etcd_client::WatchStream, OpenedWatch), Failure> {
        let ((stream, revision), index) = self
            .call_on("watch", |mut client| {
                let mut options = WatchOptions::new().with_range(range.end.clone());
                if let Some(after) = after {
                    options = options.with_start_revision(after + 1);
                }
                let start = range.start.clone();
                async move {
                    let mut stream = client.watch(start, Some(options)).await?;
                    match stream.message().await? {
                        Some(response) if response.created() && !response.canceled() => {
                            let revision = response.header().map_or(0, |h| h.revision());
                            Ok((stream, revision))
                        }
                        Some(response) => Err(etcd_client::Error::WatchError(format!(
                            "watch not created: {}",
                            response.cancel_reason()
                        ))),
                        None => Err(etcd_client::Error::WatchError(
                            "the watch stream closed before it was created".to_string(),
                        )),
                    }
                }
            })
            .await?;
        Ok((
            stream,
            OpenedWatch {
                start: after.unwrap_or(revision),
                current: revision,
                index,
            },
        ))
    }

    /// Lists a key range at one revision, page by page.
    async fn list(&self, range: &KeyRange) -> Result<(Vec<KeyValue>, Revision)> {
        'listing: loop {
            let mut kvs = Vec::new();
            let mut start = range.start.clone();
            let mut at: Option<Revision> = None;
            loop {
                let page = self
                    .call("list", |mut client| {
                        let mut options = GetOptions::new()
                            .with_range(range.end.clone())
                            .with_limit(LIST_PAGE);
                        if let Some(at) = at {
                            options = options.with_revision(at);
                        }
                        let start = start.clone();
                        async move { client.get(start, Some(options)).await }
                    })
                    .await;
                let page = match page {
                    Ok(page) => page,
                    // Compacted between two pages: list again at the newest revision.
                    Err(Failure::Refused { refusal, .. })
                        if refusal.is_compacted() && at.is_some() =>
                    {
                        continue 'listing;
                    }
                    Err(failure) => return Err(failure.into_error("list")),
                };
                let revision = header_revision(page.header())?;
                let at = *at.get_or_insert(revision);
                for kv in page.kvs() {
                    kvs.push(key_value(kv)?);
                }
                match page.kvs().last() {
                    Some(last) if page.more() => {
                        start = last.key().to_vec();
                        start.push(0);
                    }
                    _ => return Ok((kvs, at)),
                }
            }
        }
    }

    /// Whether a watch of `range` after `after` would find its history
    /// compacted (a read at `after + 1` is refused exactly then).
    async fn compacted_since(&self, range: &KeyRange, after: Revision) -> Result<bool> {
        let probe = self
            .call("check compaction", |mut client| {
                let options = GetOptions::new()
                    .with_range(range.end.clone())
                    .with_revision(after + 1)
                    .with_count_only();
                let start = range.start.clone();
                async move { client.get(start, Some(options)).await }
            })
            .await;
        match probe {
            Ok(_) => Ok(false),
            Err(Failure::Refused { refusal, .. }) if refusal.is_compacted() => Ok(true),
            // A member behind the one that created the watch.
            Err(Failure::Refused { refusal, .. }) if refusal.is_future_revision() => Ok(false),
            Err(failure) => Err(failure.into_error("watch")),
        }
    }
}

/// Where a new watch stream stands.
struct OpenedWatch {
    /// The revision events are delivered after.
    start: Revision,
    /// The store revision when etcd created the watch.
    current: Revision,
    /// The endpoint serving the stream.
    index: usize,
}

/// A little randomness in backoffs, so that clients that failed together do
/// not retry in lockstep: 75%..125% of `base`.
fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = f64::from(nanos % 1000) / 1000.0; // 0..1
    base.mul_f64(0.75 + spread / 2.0)
}

/// A key range `[start, end)` as etcd takes it.
#[derive(Debug, Clone)]
struct KeyRange {
    start: Vec<u8>,
    end: Vec<u8>,
}

impl KeyRange {
    /// Every key that starts with `prefix` (every key for `""`).
    fn prefix(prefix: &str) -> KeyRange {
        let mut end = prefix.as_bytes().to_vec();
        while let Some(last) = end.pop() {
            if last < 0xff {
                end.push(last + 1);
                return KeyRange {
                    start: prefix.as_bytes().to_vec(),
                    end,
                };
            }
        }
        // Empty, or all 0xff: to the end of the keyspace.
        let start = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.as_bytes().to_vec()
        };
        KeyRange {
            start,
            end: vec![0],
        }
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| Error::unavailable("etcd answered without a response header"))
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = std::str::from_utf8(kv.key())
        .map_err(|_| Error::corrupt(String::from_utf8_lossy(kv.key()), "the key is not UTF-8"))?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

fn watch_event(event: &etcd_client::Event) -> Result<WatchEvent> {
    let kv = event
        .kv()
        .ok_or_else(|| Error::unavailable("etcd sent a watch event without a key"))?;
    let kv = key_value(kv)?;
    Ok(match event.event_type() {
        etcd_client::EventType::Put => WatchEvent::Put(kv),
        etcd_client::EventType::Delete => WatchEvent::Delete {
            key: kv.key,
            mod_revision: kv.mod_revision,
        },
    })
}

fn lease_options(lease: Option<LeaseId>) -> PutOptions {
    match lease {
        Some(id) => PutOptions::new().with_lease(id),
        None => PutOptions::new(),
    }
}

/// The error of a write on `lease` that etcd refused.
fn lease_write_error(failure: Failure, lease: Option<LeaseId>, what: &str) -> Error {
    match (failure, lease) {
        (Failure::Refused { refusal, .. }, Some(id)) if refusal.is_lease_not_found() => {
            Error::not_found(format!("lease {id}"))
        }
        (failure, _) => failure.into_error(what),
    }
}

/// The compares of a transaction that holds when `expect` does.
fn conditions(key: &str, expect: &Expect) -> Vec<Compare> {
    match expect {
        Expect::Absent => vec![Compare::create_revision(key, CompareOp::Equal, 0)],
        // A missing key has mod revision 0: make sure it exists too.
        Expect::ModRevision(revision) => vec![
            Compare::version(key, CompareOp::Greater, 0),
            Compare::mod_revision(key, CompareOp::Equal, *revision),
        ],
        // etcd fails a value compare on a missing key.
        Expect::Value(value) => vec![Compare::value(key, CompareOp::Equal, value.clone())],
    }
}

/// The outcome of a transaction `if conditions then write else get key`.
fn cas_outcome(response: &etcd_client::TxnResponse) -> Result<CasOutcome> {
    if response.succeeded() {
        return Ok(CasOutcome::Swapped {
            revision: header_revision(response.header())?,
        });
    }
    let current = match response.op_responses().first() {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().map(key_value).transpose()?,
        _ => {
            return Err(Error::unavailable(
                "etcd answered a failed compare-and-swap without the current key",
            ));
        }
    };
    Ok(CasOutcome::Failed { current })
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let response = self
            .inner
            .call("get", |mut client| {
                let key = key.to_string();
                async move { client.get(key, None).await }
            })
            .await
            .map_err(|failure| failure.into_error("get"))?;
        response.kvs().first().map(key_value).transpose()
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        self.inner.list(&KeyRange::prefix(prefix)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        check_key(key)?;
        let response = self
            .inner
            .call("put", |mut client| {
                let (key, value) = (key.to_string(), value.clone());
                async move { client.put(key, value, Some(lease_options(lease))).await }
            })
            .await
            .map_err(|failure| lease_write_error(failure, lease, "put"))?;
        header_revision(response.header())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let response = self
            .inner
            .call("delete", |mut client| {
                let key = key.to_string();
                async move { client.delete(key, None).await }
            })
            .await
            .map_err(|failure| failure.into_error("delete"))?;
        Ok(response.deleted() > 0)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome> {
        check_key(key)?;
        let response = self
            .inner
            .call("compare_and_swap", |mut client| {
                let txn = Txn::new()
                    .when(conditions(key, &expect))
                    .and_then([TxnOp::put(key, value.clone(), Some(lease_options(lease)))])
                    .or_else([TxnOp::get(key, None)]);
                async move { client.txn(txn).await }
            })
            .await
            .map_err(|failure| lease_write_error(failure, lease, "compare_and_swap"))?;
        cas_outcome(&response)
    }

    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        fence: &Fence,
    ) -> Result<FencedOutcome> {
        check_key(key)?;
        check_key(&fence.key)?;
        let response = self
            .inner
            .call("compare_and_swap_fenced", |mut client| {
                let mut when = conditions(key, &expect);
                when.push(Compare::create_revision(
                    fence.key.as_str(),
                    CompareOp::Equal,
                    fence.create_revision,
                ));
                let txn = Txn::new()
                    .when(when)
                    .and_then([TxnOp::put(key, value.clone(), Some(lease_options(lease)))])
                    .or_else([TxnOp::get(key, None), TxnOp::get(fence.key.as_str(), None)]);
                async move { client.txn(txn).await }
            })
            .await
            .map_err(|failure| lease_write_error(failure, lease, "compare_and_swap_fenced"))?;
        if response.succeeded() {
            return Ok(FencedOutcome::Swapped {
                revision: header_revision(response.header())?,
            });
        }
        let got = |i: usize| -> Result<Option<KeyValue>> {
            match response.op_responses().get(i) {
                Some(TxnOpResponse::Get(get)) => get.kvs().first().map(key_value).transpose(),
                _ => Err(Error::unavailable(
                    "etcd answered a failed fenced compare-and-swap without the keys it read",
                )),
            }
        };
        let term_holds = got(1)?.is_some_and(|kv| kv.create_revision == fence.create_revision);
        if !term_holds {
            return Ok(FencedOutcome::Deposed);
        }
        Ok(FencedOutcome::Failed { current: got(0)? })
    }

    async fn compare_and_delete(&self, key: &str, expect: Expect) -> Result<CasOutcome> {
        check_key(key)?;
        if expect == Expect::Absent {
            return Err(Error::invalid(
                "compare_and_delete",
                "deleting a key expected to be absent is meaningless",
            ));
        }
        let response = self
            .inner
            .call("compare_and_delete", |mut client| {
                let txn = Txn::new()
                    .when(conditions(key, &expect))
                    .and_then([TxnOp::delete(key, None)])
                    .or_else([TxnOp::get(key, None)]);
                async move { client.txn(txn).await }
            })
            .await
            .map_err(|failure| failure.into_error("compare_and_delete"))?;
        cas_outcome(&response)
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        from_revision: Option<Revision>,
    ) -> Result<WatchStream> {
        if let Some(revision) = from_revision
            && revision < 0
        {
            return Err(Error::invalid(
                "watch revision",
                format!("{revision} is negative"),
            ));
        }
        let range = KeyRange::prefix(prefix);
        let (mut stream, opened) = self
            .inner
            .open_watch(&range, from_revision)
            .await
            .map_err(|failure| failure.into_error("watch"))?;
        // etcd reports a compacted start only later, on the stream: ask now,
        // so that the caller gets the error from this call. A watch of the
        // present (from the current revision on) needs no check.
        if let Some(after) = from_revision
            && after < opened.current
            && self.inner.compacted_since(&range, after).await?
        {
            return Err(compaction_of(&mut stream, after, &self.inner.options).await);
        }
        let (sender, receiver) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        tokio::spawn(
            WatchTask {
                inner: self.inner.clone(),
                range,
                prefix: prefix.to_string(),
                last: opened.start,
                events: sender,
                shutdown: self.shutdown.child_token(),
            }
            .run(stream, opened.index),
        );
        Ok(WatchStream::new(receiver, opened.start))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(Error::invalid("lease ttl", "must be positive"));
        }
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds.max(MIN_LEASE_TTL.as_secs()))
            .map_err(|_| Error::invalid("lease ttl", format!("{ttl:?} is too long")))?;
        let response = self
            .inner
            .call("grant_lease", |mut client| async move {
                client.lease_grant(seconds, None).await
            })
            .await
            .map_err(|failure| failure.into_error("lease ttl"))?;
        if !response.error().is_empty() {
            return Err(Error::unavailable(format!(
                "grant a lease: etcd refused: {}",
                response.error()
            )));
        }
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.inner
            .call("keep_alive", |mut client| async move {
                client.lease_keep_alive(lease).await.map(drop)
            })
            .await
            .map_err(|failure| lease_write_error(failure, Some(lease), "keep_alive"))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let revoked = self
            .inner
            .call("revoke_lease", |mut client| async move {
                client.lease_revoke(lease).await.map(drop)
            })
            .await;
        match revoked {
            Ok(()) => Ok(()),
            // An earlier attempt revoked it; its answer was lost.
            Err(Failure::Refused {
                refusal,
                maybe_applied: true,
            }) if refusal.is_lease_not_found() => Ok(()),
            Err(failure) => Err(lease_write_error(failure, Some(lease), "revoke_lease")),
        }
    }
}

/// Reads a watch whose start was found compacted until etcd says from which
/// revision it still has history, and builds the error.
async fn compaction_of(
    stream: &mut etcd_client::WatchStream,
    after: Revision,
    options: &EtcdOptions,
) -> Error {
    let deadline = Instant::now() + options.attempt_timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(response))) if response.compact_revision() > 0 => {
                return Error::Compacted {
                    requested: after,
                    compacted: response.compact_revision() - 1,
                };
            }
            Ok(Ok(Some(_))) => {}
            // etcd did not say: the next revision is surely not available.
            _ => {
                return Error::Compacted {
                    requested: after,
                    compacted: after + 1,
                };
            }
        }
    }
}

/// Feeds one [`WatchStream`] from etcd, resuming broken streams.
struct WatchTask {
    inner: Arc<Inner>,
    range: KeyRange,
    prefix: String,
    /// Revision of the last event delivered (or the start): a new stream
    /// starts after it.
    last: Revision,
    events: mpsc::Sender<Result<WatchEvent>>,
    shutdown: CancellationToken,
}

impl WatchTask {
    async fn run(mut self, mut stream: etcd_client::WatchStream, mut index: usize) {
        let options = self.inner.options.clone();
        let mut opened_at = Instant::now();
        // Streams that broke in a row, each soon after it opened, and since
        // when: a stream etcd keeps refusing must not spin, nor retry forever.
        let mut quick_breaks = 0u32;
        let mut breaking_since = Instant::now();
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = self.events.closed() => return,
                _ = self.shutdown.cancelled() => return,
            };
            let broken = match message {
                Ok(Some(response)) => {
                    if response.compact_revision() > 0 {
                        tracing::warn!(
                            prefix = self.prefix,
                            last = self.last,
                            "watch fell behind compaction"
                        );
                        let error = Error::Compacted {
                            requested: self.last,
                            compacted: response.compact_revision() - 1,
                        };
                        self.deliver(Err(error)).await;
                        return;
                    }
                    if response.canceled() {
                        format!("etcd cancelled the watch: {}", response.cancel_reason())
                    } else {
                        // Events of one revision (a lease revoke deleting
                        // several keys) come in one response; a replacing
                        // stream may repeat whole revisions up to `floor`.
                        let floor = self.last;
                        for event in response.events() {
                            let event = match watch_event(event) {
                                Ok(event) => event,
                                Err(error) => {
                                    self.deliver(Err(error)).await;
                                    return;
                                }
                            };
                            let revision = event.revision();
                            if revision <= floor {
                                // Already delivered by the stream this one replaced.
                                continue;
                            }
                            if !self.deliver(Ok(event)).await {
                                return;
                            }
                            self.last = revision;
                        }
                        continue;
                    }
                }
                Ok(None) => "etcd closed the watch stream".to_string(),
                Err(error) => {
                    let message = describe(&error);
                    if let Verdict::Retry {
                        blame_endpoint: true,
                        ..
                    } = classify(&error)
                    {
                        self.inner.endpoints[index].mark_down(&self.inner.options, &message);
                    }
                    message
                }
            };
            tracing::info!(
                prefix = self.prefix,
                last = self.last,
                error = broken,
                "watch stream broke; resuming"
            );
            if opened_at.elapsed() >= QUICK_BREAK {
                quick_breaks = 0;
                breaking_since = Instant::now();
            } else {
                quick_breaks += 1;
            }
            if quick_breaks > 0 {
                if breaking_since.elapsed() >= options.request_deadline {
                    let error = Error::unavailable(format!(
                        "watch of {}: streams kept breaking for {:.1?}: {broken}",
                        self.prefix,
                        breaking_since.elapsed()
                    ));
                    tracing::warn!(prefix = self.prefix, %error, "watch ended");
                    self.deliver(Err(error)).await;
                    return;
                }
                let doublings = (quick_breaks - 1).min(16);
                let wait = jitter(
                    options
                        .min_backoff
                        .saturating_mul(1 << doublings)
                        .min(options.max_backoff),
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.events.closed() => return,
                    _ = self.shutdown.cancelled() => return,
                }
            }
            let reopened = tokio::select! {
                reopened = self.inner.open_watch(&self.range, Some(self.last)) => reopened,
                _ = self.events.closed() => return,
                _ = self.shutdown.cancelled() => return,
            };
            match reopened {
                Ok((new_stream, opened)) => {
                    stream = new_stream;
                    index = opened.index;
                    opened_at = Instant::now();
                }
                Err(failure) => {
                    let error = failure.into_error("resume a watch");
                    tracing::warn!(prefix = self.prefix, %error, "watch ended");
                    self.deliver(Err(error)).await;
                    return;
                }
            }
        }
    }

    /// Hands an event to the reader; false when the reader or the store is gone.
    async fn deliver(&self, event: Result<WatchEvent>) -> bool {
        tokio::select! {
            sent = self.events.send(event) => sent.is_ok(),
            _ = self.shutdown.cancelled() => false,
        }
    }
}

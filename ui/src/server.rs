//! The HTTP server: the pages (embedded, [`crate::assets`]) and the JSON API
//! they poll.
//!
//! ```text
//! GET  /api/info                               what this dashboard reads; whether actions are on
//! GET  /api/jobs?phase=P                       the Jobs page
//! GET  /api/jobs/{job}                         status (rounds, events) and spec
//! GET  /api/jobs/{job}/history                 the downsampled series, evals, rounds, checkpoints
//! POST /api/jobs/{job}/cancel                  (token)
//! GET  /api/jobs/{job}/logs?node=N&rank=R&since=S&tail=T   the workers' newest lines
//! GET  /api/checkpoints                        known roots
//! GET  /api/checkpoints/root?url=U             a root's manifests and dedup ratio
//! GET  /api/checkpoints/manifest?url=U&key=K   one manifest's tensors
//! POST /api/checkpoints/verify                 {url, key}: re-read and check every chunk
//! GET  /api/registry                           every model of every known registry
//! POST /api/registry/promote                   (token) {registry, model, alias, version, weight}
//! POST /api/registry/rollback                  (token) {registry, model, alias}
//! GET  /api/serving                            each configured `kiln serve`'s figures
//! ```
//!
//! A job's logs are read as `kiln logs` reads them: from the store when it
//! holds the job's lines, else from the data folders of [`JobSources`].
//!
//! Reads need nothing; actions need the bearer token the dashboard was
//! started with, in an `authorization` header (never a cookie, so another
//! site cannot make a browser act). Without a token the dashboard is
//! read-only. Checkpoint roots and serving URLs are the configured ones and
//! those the jobs recorded: a request cannot make the dashboard open any
//! other location. On a loopback address the dashboard answers only
//! requests that name a loopback host (DNS rebinding; see
//! [`kiln_proto::http_host`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::checkpoints::{self, VerifyResults};
use crate::jobs::JobSources;
use crate::recorder::extra;
use crate::serving::{self, Scrapes};

/// How long a scrape of a `kiln serve` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who the registry's audit log names for actions taken here.
const ACTOR: &str = "kiln-ui";

/// What the dashboard reads and whether it may act.
#[derive(Clone, Default)]
pub struct UiConfig {
    /// Where jobs (status, spec, history, logs) are read from.
    pub jobs: JobSources,
    /// Checkpoint roots to offer besides those the jobs recorded.
    pub checkpoint_roots: Vec<String>,
    /// Registries to show besides those the jobs recorded.
    pub registries: Vec<String>,
    /// `kiln serve` base URLs (`http://HOST:PORT`) for the Serving page.
    pub serve_urls: Vec<String>,
    /// The bearer token that enables actions; `None`: read-only.
    pub token: Option<String>,
}

struct AppState {
    cfg: UiConfig,
    verified: VerifyResults,
    /// One verification at a time: each re-reads a whole checkpoint.
    verify_gate: Semaphore,
    scrapes: Scrapes,
    http: reqwest::Client,
}

/// Refuses an unauthenticated dashboard beyond this machine: without a token,
/// `addr` must be loopback (reads show specs, metrics and locations).
pub fn check_listen(addr: std::net::SocketAddr, token: Option<&str>) -> Result<(), String> {
    if token.is_some() || addr.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "refusing to serve the dashboard on {addr} without a token: give --token-file (or \
         KILN_UI_TOKEN), or listen on a loopback address (127.0.0.1)"
    ))
}

/// Serves the dashboard on `listener` until `cancel`.
pub async fn serve(
    cfg: UiConfig,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let mut app = router(cfg);
    if listener.local_addr()?.ip().is_loopback() {
        app = app.layer(axum::middleware::from_fn(loopback_host_only));
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// A dashboard on a loopback address answers only requests that name a
/// loopback host. A web page whose DNS name an attacker rebinds to 127.0.0.1
/// is same-origin to the browser, so without this check it could read what
/// the dashboard shows (specs, metrics, locations) from any site the user
/// visits. Actions need the token, which the page never has.
async fn loopback_host_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if kiln_proto::http_host::is_loopback(host) {
        return next.run(request).await;
    }
    ApiError(
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "this dashboard listens on a loopback address and answers only requests for \
             localhost, 127.0.0.1 or [::1], not {host:?} (a DNS name rebound to this machine?)"
        ),
    )
    .into_response()
}

/// The dashboard's routes over `cfg`.
pub fn router(cfg: UiConfig) -> Router {
    let state = Arc::new(AppState {
        cfg,
        verified: VerifyResults::default(),
        verify_gate: Semaphore::new(1),
        scrapes: Scrapes::default(),
        http: reqwest::Client::builder()
            .timeout(SCRAPE_TIMEOUT)
            .build()
            .unwrap_or_default(),
    });
    Router::new()
        .route("/", get(crate::assets::index))
        .route("/assets/{name}", get(crate::assets::asset))
        .route("/api/info", get(info))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{job}", get(job))
        .route("/api/jobs/{job}/history", get(history))
        .route("/api/jobs/{job}/cancel", post(cancel_job))
        .route("/api/jobs/{job}/logs", get(job_logs))
        .route("/api/checkpoints", get(roots))
        .route("/api/checkpoints/root", get(root))
        .route("/api/checkpoints/manifest", get(manifest))
        .route("/api/checkpoints/verify", post(verify))
        .route("/api/registry", get(registry))
        .route("/api/registry/promote", post(promote))
        .route("/api/registry/rollback", post(rollback))
        .route("/api/serving", get(serving_page))
        .fallback(not_found)
        .with_state(state)
}

/// An API error: a status and a message for the page.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn bad_gateway(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_GATEWAY, e.to_string())
}

fn ok(value: impl serde::Serialize) -> ApiResult {
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(serde_json::to_value(value).map_err(bad_gateway)?),
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such page or API".into())
}

/// Checks the bearer token of an action.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.cfg.token else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "this dashboard is read-only: start it with a token (--token-file or KILN_UI_TOKEN) to enable actions".into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing authorization: `Bearer <token>`".into(),
            )
        })?;
    if kiln_coordinator::api::constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError(StatusCode::UNAUTHORIZED, "wrong token".into()))
    }
}

async fn info(State(state): State<Arc<AppState>>) -> ApiResult {
    let (roots, registries) = known_locations(&state).await;
    ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "actions": state.cfg.token.is_some(),
        "store": state.cfg.jobs.store.is_some(),
        "data_dirs": state.cfg.jobs.data_dirs,
        "checkpoint_roots": roots,
        "registries": registries,
        "serve_urls": state.cfg.serve_urls,
    }))
}

#[derive(Deserialize)]
struct PhaseFilter {
    phase: Option<String>,
}

async fn list_jobs(
    State(state): State<Arc<AppState>>,
    Query(filter): Query<PhaseFilter>,
) -> ApiResult {
    let mut rows = state.cfg.jobs.list().await.map_err(bad_gateway)?;
    if let Some(phase) = filter.phase.filter(|p| !p.is_empty() && p != "all") {
        rows.retain(|r| r.phase == phase);
    }
    ok(json!({ "jobs": rows, "now": kiln_coordinator::status::now_rfc3339() }))
}

async fn job(State(state): State<Arc<AppState>>, Path(job): Path<String>) -> ApiResult {
    match state.cfg.jobs.job(&job).await.map_err(bad_gateway)? {
        Some(detail) => ok(detail),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no job {job}"))),
    }
}

async fn history(State(state): State<Arc<AppState>>, Path(job): Path<String>) -> ApiResult {
    match state.cfg.jobs.history(&job).await.map_err(bad_gateway)? {
        Some(h) => ok(h),
        // Not an error: the job has not reported a step yet.
        None => ok(crate::history::JobHistory::new(&job)),
    }
}

/// Lines a logs request returns at most (the newest).
const MAX_LOG_LINES: usize = 2000;

#[derive(Deserialize)]
struct LogsQuery {
    node: Option<String>,
    rank: Option<u32>,
    /// A duration back from now (90s, 5m) or an RFC 3339 time.
    since: Option<String>,
    /// The newest this many lines (default and most: 2000).
    tail: Option<usize>,
}

/// A job's worker logs, as `kiln logs` reads them: from the store when it
/// has the job's lines (multi-node jobs ship them there), otherwise from the
/// data folders (`kiln run`, or the nodes of agents sharing one).
async fn job_logs(
    State(state): State<Arc<AppState>>,
    Path(job): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult {
    use kiln_coordinator::logs::{self, LogFilter, LogSource};
    let since = match q.since.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(text) => Some(
            logs::since_now(text).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?,
        ),
        None => None,
    };
    let filter = LogFilter {
        node: q.node.filter(|n| !n.is_empty()),
        rank: q.rank,
        since,
    };
    let mut sources = Vec::new();
    if let Some((store, keyspace)) = &state.cfg.jobs.store {
        sources.push(LogSource::Store {
            store: store.clone(),
            keyspace: keyspace.clone(),
        });
    }
    sources.extend(state.cfg.jobs.data_dirs.iter().cloned().map(LogSource::Dir));
    let mut lines = Vec::new();
    for source in &sources {
        match logs::read(source, &job, &filter).await {
            Ok(found) if !found.is_empty() => {
                lines = found;
                break;
            }
            Ok(_) | Err(kiln_coordinator::Error::NotFound { .. }) => {}
            Err(e) => return Err(bad_gateway(e)),
        }
    }
    let tail = q.tail.unwrap_or(MAX_LOG_LINES).min(MAX_LOG_LINES);
    let total = lines.len();
    let rows: Vec<serde_json::Value> = lines
        .into_iter()
        .skip(total.saturating_sub(tail))
        .map(|l| {
            json!({
                "time": l.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "node": l.node,
                "rank": l.rank,
                "stream": l.stream.as_str(),
                "text": l.text,
            })
        })
        .collect();
    ok(json!({ "lines": rows, "total": total }))
}

async fn cancel_job(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> ApiResult {
    authorize(&state, &headers)?;
    let Some((store, ks)) = &state.cfg.jobs.store else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this dashboard reads run folders only: a job is cancelled through its store".into(),
        ));
    };
    let status = kiln_coordinator::status::read(&**store, ks, &job)
        .await
        .map_err(bad_gateway)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {job}")))?;
    if status.extra.get(extra::RUNNER).and_then(|v| v.as_str()) == Some(extra::RUNNER_KILN_RUN) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "a `kiln run` job stops with Ctrl-C in its terminal; cancel acts on jobs run by `kiln agent`".into(),
        ));
    }
    if status.phase.is_terminal() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("job {job} is already {}", status.phase),
        ));
    }
    let (request, made) = kiln_coordinator::status::request_cancel(
        &**store,
        ks,
        &job,
        ACTOR,
        "cancelled from the dashboard",
    )
    .await
    .map_err(bad_gateway)?;
    ok(json!({ "requested_at": request.at, "new": made }))
}

/// Configured locations first, then those the jobs recorded.
async fn known_locations(state: &AppState) -> (Vec<String>, Vec<String>) {
    let (recorded_roots, recorded_registries) = state.cfg.jobs.recorded_locations().await;
    let mut roots = state.cfg.checkpoint_roots.clone();
    for r in recorded_roots {
        if !roots.contains(&r) {
            roots.push(r);
        }
    }
    let mut registries = state.cfg.registries.clone();
    for r in recorded_registries {
        if !registries.contains(&r) {
            registries.push(r);
        }
    }
    (roots, registries)
}

async fn known_root(state: &AppState, url: &str) -> Result<(), ApiError> {
    if known_locations(state).await.0.iter().any(|r| r == url) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{url} is not a checkpoint root this dashboard knows: give it with --checkpoints"
            ),
        ))
    }
}

async fn known_registry(state: &AppState, url: &str) -> Result<(), ApiError> {
    if known_locations(state).await.1.iter().any(|r| r == url) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{url} is not a registry this dashboard knows: give it with --registry"),
        ))
    }
}

async fn roots(State(state): State<Arc<AppState>>) -> ApiResult {
    ok(json!({ "roots": known_locations(&state).await.0 }))
}

#[derive(Deserialize)]
struct RootQuery {
    url: String,
    key: Option<String>,
}

async fn root(State(state): State<Arc<AppState>>, Query(q): Query<RootQuery>) -> ApiResult {
    known_root(&state, &q.url).await?;
    ok(checkpoints::root_summary(&q.url, &state.verified)
        .await
        .map_err(bad_gateway)?)
}

async fn manifest(State(state): State<Arc<AppState>>, Query(q): Query<RootQuery>) -> ApiResult {
    known_root(&state, &q.url).await?;
    let key = q
        .key
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "key is required".into()))?;
    match checkpoints::manifest_detail(&q.url, &key, &state.verified).await {
        Ok(detail) => ok(detail),
        Err(e @ kiln_checkpoint::Error::NotFound { .. }) => {
            Err(ApiError(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(e) => Err(bad_gateway(e)),
    }
}

#[derive(Deserialize)]
struct VerifyBody {
    url: String,
    key: String,
}

async fn verify(State(state): State<Arc<AppState>>, Json(body): Json<VerifyBody>) -> ApiResult {
    known_root(&state, &body.url).await?;
    let _permit = state
        .verify_gate
        .acquire()
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    ok(checkpoints::verify(&body.url, &body.key, &state.verified).await)
}

async fn registry(State(state): State<Arc<AppState>>) -> ApiResult {
    let mut views = Vec::new();
    for url in known_locations(&state).await.1 {
        views.push(match crate::registry::registry_view(&url).await {
            Ok(view) => serde_json::to_value(view).map_err(bad_gateway)?,
            Err(e) => json!({ "url": url, "models": [], "error": e.to_string() }),
        });
    }
    ok(json!({ "registries": views }))
}

#[derive(Deserialize)]
struct PromoteBody {
    registry: String,
    model: String,
    alias: String,
    version: u64,
    weight: Option<u32>,
}

async fn promote(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(body): Json<PromoteBody>,
) -> ApiResult {
    let registry = registry_for_action(&state, &headers, &body.registry).await?;
    match registry
        .promote(&body.model, &body.alias, body.version, body.weight, ACTOR)
        .await
    {
        Ok(alias) => ok(alias),
        Err(e) => Err(registry_error(e)),
    }
}

#[derive(Deserialize)]
struct RollbackBody {
    registry: String,
    model: String,
    alias: String,
}

async fn rollback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(body): Json<RollbackBody>,
) -> ApiResult {
    let registry = registry_for_action(&state, &headers, &body.registry).await?;
    match registry.rollback(&body.model, &body.alias, ACTOR).await {
        Ok(alias) => ok(alias),
        Err(e) => Err(registry_error(e)),
    }
}

/// A known registry opened for an action, once the token is checked.
async fn registry_for_action(
    state: &AppState,
    headers: &HeaderMap,
    url: &str,
) -> Result<kiln_checkpoint::registry::Registry, ApiError> {
    authorize(state, headers)?;
    known_registry(state, url).await?;
    kiln_checkpoint::registry::Registry::open(url)
        .await
        .map_err(bad_gateway)
}

fn registry_error(e: kiln_checkpoint::Error) -> ApiError {
    let status = match &e {
        kiln_checkpoint::Error::NotFound { .. } => StatusCode::NOT_FOUND,
        kiln_checkpoint::Error::Conflict { .. } => StatusCode::CONFLICT,
        kiln_checkpoint::Error::Invalid { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    ApiError(status, e.to_string())
}

async fn serving_page(State(state): State<Arc<AppState>>) -> ApiResult {
    let mut servers = Vec::new();
    for url in &state.cfg.serve_urls {
        let metrics = format!("{}/metrics", url.trim_end_matches('/'));
        let scraped = async {
            let response = state.http.get(&metrics).send().await?;
            response.error_for_status()?.text().await
        }
        .await;
        servers.push(match scraped {
            Ok(text) => {
                let summary = serving::summarize(url, &serving::parse_prometheus(&text));
                serde_json::to_value(state.scrapes.with_rates(summary)).map_err(bad_gateway)?
            }
            Err(e) => {
                json!({ "url": url, "versions": [], "error": format!("scrape {metrics}: {e}") })
            }
        });
    }
    ok(json!({ "servers": servers }))
}

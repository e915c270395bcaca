//! The job API (`kiln.job.v1.JobService`, `proto/kiln/job.proto`) over a
//! [`Store`]: submit, get, watch, cancel and list jobs.
//!
//! The service keeps no state of its own: every answer is read from the store
//! and every change is written to it (the spec with a create-only put, the
//! status with [`status::update`], a cancel with [`status::request_cancel`]).
//! So any number of coordinator replicas serve the same jobs consistently, and
//! a replica that dies loses nothing.
//!
//! Authentication is one shared bearer token ([`BearerAuth`]): every call
//! carries `authorization: Bearer <token>`, compared in constant time. A
//! coordinator without a token serves loopback only ([`check_listen`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use kiln_proto::job::v1;
use kiln_proto::job::v1::job_service_server::{JobService, JobServiceServer};
use kiln_proto::job::{AUTHORIZATION, ServiceError};
use kiln_proto::spec::JobSpec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::keyspace::{Keyspace, validate_name};
use crate::status::{self, JobStatus, Phase};
use crate::store::{CasOutcome, Expect, Store, WatchEvent};

/// Statuses buffered per watching client before the watch waits for it.
const WATCH_BUFFER: usize = 16;

/// The job service over a store. Cheap to clone.
#[derive(Clone)]
pub struct JobApi {
    store: Arc<dyn Store>,
    ks: Keyspace,
    /// Names this replica in records it writes (`submitted via ...`).
    replica: String,
    /// Where relative spec paths resolve when a request names no folder.
    default_base_dir: PathBuf,
    /// Ends open watches when the server shuts down.
    shutdown: CancellationToken,
}

impl JobApi {
    /// A service over `store` under `ks`; `replica` names this replica in the
    /// records it writes; `shutdown` ends open watch streams.
    pub fn new(
        store: Arc<dyn Store>,
        ks: Keyspace,
        replica: impl Into<String>,
        shutdown: CancellationToken,
    ) -> Self {
        JobApi {
            store,
            ks,
            replica: replica.into(),
            default_base_dir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            shutdown,
        }
    }

    /// The tonic service, with `auth` checking every call.
    pub fn into_service(
        self,
        auth: BearerAuth,
    ) -> tonic::service::interceptor::InterceptedService<JobServiceServer<JobApi>, BearerAuth> {
        JobServiceServer::with_interceptor(self, auth)
    }

    async fn submit_job(
        &self,
        request: v1::SubmitRequest,
    ) -> Result<v1::SubmitResponse, ServiceError> {
        let base_dir = if request.base_dir.is_empty() {
            self.default_base_dir.clone()
        } else {
            PathBuf::from(&request.base_dir)
        };
        let mut spec = JobSpec::from_toml_str(&request.spec_toml, &base_dir, &request.overrides)?;
        if !request.job_id.is_empty() {
            // The id becomes the spec's name, so the job is named the same in
            // the store, in run folders and in checkpoints.
            spec.job.name = request.job_id.clone();
            spec.validate().map_err(|error| {
                ServiceError::InvalidArgument(format!("job id {:?}: {error}", request.job_id))
            })?;
        }
        let job = spec.job.name.clone();
        validate_name("job", &job).map_err(service_error)?;

        let spec_key = self.ks.job_spec(&job);
        match self
            .store
            .compare_and_swap(&spec_key, Expect::Absent, spec.to_json().into_bytes(), None)
            .await
            .map_err(service_error)?
        {
            CasOutcome::Swapped { .. } => {}
            CasOutcome::Failed { .. } => {
                return Err(ServiceError::AlreadyExists(format!(
                    "job {job} already exists; submit under another id (--job-id)"
                )));
            }
        }
        let total_steps = spec.train.steps;
        let replica = self.replica.clone();
        let record = status::update(&*self.store, &self.ks, &job, |s| {
            if s.submitted_at.is_none() {
                s.submitted_at = Some(status::now_rfc3339());
                s.push_event("submitted", "", format!("via coordinator {replica}"));
            }
            s.total_steps = total_steps;
        })
        .await
        .map_err(service_error)?;
        tracing::info!(job, replica = self.replica, "job submitted");
        Ok(v1::SubmitResponse {
            job,
            status: Some(to_proto(&record)),
        })
    }

    /// The job's status; a job whose spec is stored but that has no status yet
    /// is pending. `NotFound` when neither exists.
    async fn get_job(&self, job: &str) -> Result<JobStatus, ServiceError> {
        validate_name("job", job).map_err(service_error)?;
        if let Some(record) = status::read(&*self.store, &self.ks, job)
            .await
            .map_err(service_error)?
        {
            return Ok(record);
        }
        if self
            .store
            .get(&self.ks.job_spec(job))
            .await
            .map_err(service_error)?
            .is_some()
        {
            return Ok(JobStatus::new(job));
        }
        Err(not_found(job))
    }

    async fn cancel_job(
        &self,
        job: &str,
        reason: &str,
    ) -> Result<v1::CancelResponse, ServiceError> {
        let current = self.get_job(job).await?;
        match current.phase {
            Phase::Succeeded | Phase::Failed => {
                return Err(ServiceError::FailedPrecondition(format!(
                    "job {job} already {}{}",
                    current.phase,
                    current
                        .finished_at
                        .as_deref()
                        .map(|at| format!(" at {at}"))
                        .unwrap_or_default()
                )));
            }
            Phase::Cancelled => {
                return Ok(v1::CancelResponse {
                    status: Some(to_proto(&current)),
                    requested: false,
                });
            }
            Phase::Pending | Phase::Running | Phase::Waiting => {}
        }
        let (request, made) =
            status::request_cancel(&*self.store, &self.ks, job, &self.replica, reason)
                .await
                .map_err(service_error)?;
        // Nobody runs the job when no node has a record and no rendezvous
        // leader is elected: nobody would see the request, so cancel it here.
        // An agent that starts later finds the request at once and stops.
        let (nodes, _) = self
            .store
            .get_prefix(&self.ks.nodes_prefix(job))
            .await
            .map_err(service_error)?;
        let leader = self
            .store
            .get(&self.ks.job_leader(job))
            .await
            .map_err(service_error)?;
        let nobody_runs = nodes.is_empty() && leader.is_none();
        let by = request.by.clone();
        let record = status::update(&*self.store, &self.ks, job, |s| {
            if s.cancel_requested_at.is_none() {
                s.cancel_requested_at = Some(request.at.clone());
                let why = if request.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", request.reason)
                };
                s.push_event("cancel", "", format!("requested via coordinator {by}{why}"));
            }
            if nobody_runs && s.set_phase(Phase::Cancelled) && s.message.is_empty() {
                s.message = "cancelled while no agent was running".to_string();
            }
        })
        .await
        .map_err(service_error)?;
        tracing::info!(job, nobody_runs, replica = self.replica, "cancel requested");
        Ok(v1::CancelResponse {
            status: Some(to_proto(&record)),
            requested: made,
        })
    }

    async fn list_jobs(&self) -> Result<Vec<v1::JobSummary>, ServiceError> {
        // One listing of the whole jobs prefix: a consistent snapshot.
        let (kvs, _) = self
            .store
            .get_prefix(&self.ks.jobs_prefix())
            .await
            .map_err(service_error)?;
        let mut jobs: BTreeMap<String, Option<JobStatus>> = BTreeMap::new();
        for kv in &kvs {
            if let Some(job) = self.ks.parse_job_leaf(&kv.key, "status") {
                let record = JobStatus::from_json(&kv.key, &kv.value).map_err(service_error)?;
                jobs.insert(job.to_string(), Some(record));
            } else if let Some(job) = self.ks.parse_job_leaf(&kv.key, "spec") {
                jobs.entry(job.to_string()).or_insert(None);
            }
        }
        Ok(jobs
            .into_iter()
            .map(|(job, record)| summary(&record.unwrap_or_else(|| JobStatus::new(&job))))
            .collect())
    }
}

type WatchResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::JobStatus, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        Ok(Response::new(self.submit_job(request.into_inner()).await?))
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::JobStatus>, Status> {
        let record = self.get_job(&request.into_inner().job).await?;
        Ok(Response::new(to_proto(&record)))
    }

    type WatchStream = WatchResponseStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let job = request.into_inner().job;
        // Unknown jobs fail the call itself, not the stream.
        self.get_job(&job).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let api = self.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                outcome = follow_status(&api, &job, &tx) => outcome,
                () = tx.closed() => Ok(()),
                () = api.shutdown.cancelled() => Err(ServiceError::Unavailable("coordinator is shutting down".into())),
            };
            if let Err(error) = outcome {
                let _ = tx.send(Err(error.into())).await;
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.cancel_job(&request.job, &request.reason).await?,
        ))
    }

    async fn list(
        &self,
        _: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        Ok(Response::new(v1::ListResponse {
            jobs: self.list_jobs().await?,
        }))
    }
}

/// Sends the job's status and then every change to it, until the job is over.
/// Lists then watches from the listing's revision (no change is missed) and
/// lists again when the watch falls behind compaction; a status already sent
/// is not sent twice.
async fn follow_status(
    api: &JobApi,
    job: &str,
    tx: &mpsc::Sender<Result<v1::JobStatus, Status>>,
) -> Result<(), ServiceError> {
    let key = api.ks.job_status(job);
    let mut sent_revision = 0;
    let mut sent_synthetic = false;
    let send = |record: JobStatus| async move {
        // A closed channel means the client left: the select in `watch` ends us.
        let _ = tx.send(Ok(to_proto(&record))).await;
        record.phase.is_terminal()
    };
    loop {
        let (kvs, revision) = api.store.get_prefix(&key).await.map_err(service_error)?;
        match kvs.iter().find(|kv| kv.key == key) {
            Some(kv) if kv.mod_revision > sent_revision => {
                sent_revision = kv.mod_revision;
                let record = JobStatus::from_json(&key, &kv.value).map_err(service_error)?;
                if send(record).await {
                    return Ok(());
                }
            }
            Some(_) => {}
            None if !sent_synthetic => {
                // Submitted (the spec is there) but no status written yet.
                sent_synthetic = true;
                send(JobStatus::new(job)).await;
            }
            None => {}
        }
        let mut watch = api
            .store
            .watch_prefix(&key, Some(revision))
            .await
            .map_err(service_error)?;
        loop {
            match watch.try_next().await {
                Ok(Some(WatchEvent::Put(kv))) if kv.key == key => {
                    if kv.mod_revision <= sent_revision {
                        continue;
                    }
                    sent_revision = kv.mod_revision;
                    let record = JobStatus::from_json(&key, &kv.value).map_err(service_error)?;
                    if send(record).await {
                        return Ok(());
                    }
                }
                Ok(Some(WatchEvent::Delete { key: deleted, .. })) if deleted == key => {
                    return Err(not_found(job));
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(ServiceError::Unavailable(
                        "the store closed the status watch".into(),
                    ));
                }
                Err(Error::Compacted { .. }) => break,
                Err(error) => return Err(service_error(error)),
            }
        }
    }
}

fn not_found(job: &str) -> ServiceError {
    ServiceError::NotFound(format!("no job {job}"))
}

/// The service error a store error becomes.
pub fn service_error(error: Error) -> ServiceError {
    let message = error.to_string();
    match error {
        Error::NotFound { .. } => ServiceError::NotFound(message),
        Error::AlreadyExists { .. } => ServiceError::AlreadyExists(message),
        Error::Invalid { .. } => ServiceError::InvalidArgument(message),
        Error::Conflict { .. } | Error::Compacted { .. } => ServiceError::Aborted(message),
        Error::Unavailable { .. } | Error::Timeout { .. } => ServiceError::Unavailable(message),
        _ => ServiceError::Internal(message),
    }
}

/// The wire form of a status.
pub fn to_proto(record: &JobStatus) -> v1::JobStatus {
    v1::JobStatus {
        job: record.job.clone(),
        phase: phase_to_proto(record.phase) as i32,
        round: record.round,
        world_size: record.world_size,
        step: record.step,
        total_steps: record.total_steps,
        loss: record.loss,
        last_checkpoint: record.last_checkpoint.as_ref().map(|c| v1::Checkpoint {
            url: c.url.clone(),
            step: c.step,
        }),
        submitted_at: record.submitted_at.clone().unwrap_or_default(),
        started_at: record.started_at.clone().unwrap_or_default(),
        finished_at: record.finished_at.clone().unwrap_or_default(),
        updated_at: record.updated_at.clone().unwrap_or_default(),
        cancel_requested_at: record.cancel_requested_at.clone().unwrap_or_default(),
        message: record.message.clone(),
        events: record
            .events
            .iter()
            .map(|e| v1::NodeEvent {
                at: e.at.clone(),
                kind: e.kind.clone(),
                node: e.node.clone(),
                detail: e.detail.clone(),
            })
            .collect(),
        launch: record.launch.as_ref().map(|l| v1::Launch {
            backend: l.backend.clone(),
            by: l.by.clone(),
            at: l.at.clone(),
            agents: l
                .agents
                .iter()
                .map(|a| v1::LaunchedAgent {
                    node: a.node.clone(),
                    pid: a.pid.unwrap_or(0),
                    log: a.log.clone(),
                })
                .collect(),
        }),
    }
}

fn summary(record: &JobStatus) -> v1::JobSummary {
    v1::JobSummary {
        job: record.job.clone(),
        phase: phase_to_proto(record.phase) as i32,
        round: record.round,
        world_size: record.world_size,
        step: record.step,
        total_steps: record.total_steps,
        loss: record.loss,
        submitted_at: record.submitted_at.clone().unwrap_or_default(),
        updated_at: record.updated_at.clone().unwrap_or_default(),
        message: record.message.clone(),
    }
}

fn phase_to_proto(phase: Phase) -> v1::Phase {
    match phase {
        Phase::Pending => v1::Phase::Pending,
        Phase::Running => v1::Phase::Running,
        Phase::Waiting => v1::Phase::Waiting,
        Phase::Succeeded => v1::Phase::Succeeded,
        Phase::Failed => v1::Phase::Failed,
        Phase::Cancelled => v1::Phase::Cancelled,
    }
}

/// Checks the bearer token of every call. Without a token every call passes
/// (the coordinator then listens on loopback only, see [`check_listen`]).
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("BearerAuth")
            .field("token", &self.expected.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl BearerAuth {
    /// Calls must carry `token`; `None` lets every call in.
    pub fn new(token: Option<&str>) -> Self {
        BearerAuth {
            expected: token.map(|t| Arc::from(t.as_bytes())),
        }
    }

    /// Whether a token is required.
    pub fn enabled(&self) -> bool {
        self.expected.is_some()
    }

    /// Checks one `authorization` header value.
    fn check(&self, header: Option<&[u8]>) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let Some(header) = header else {
            return Err(Status::unauthenticated(
                "missing authorization: this coordinator requires a bearer token (KILN_COORDINATOR_TOKEN or --token-file)",
            ));
        };
        let presented = header
            .strip_prefix(b"Bearer ")
            .or_else(|| header.strip_prefix(b"bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        if constant_time_eq(presented, expected) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong bearer token"))
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get(AUTHORIZATION).map(|v| v.as_bytes());
        self.check(header)?;
        Ok(request)
    }
}

/// Compares a presented secret with the expected one in time that depends
/// only on the expected one's length (not on where they first differ).
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = (presented.len() != expected.len()) as u8;
    for (i, e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(!*e);
        diff |= std::hint::black_box(p ^ e);
    }
    diff == 0
}

/// Refuses to serve an unauthenticated API beyond this machine: without a
/// token, `addr` must be a loopback address.
pub fn check_listen(addr: SocketAddr, auth: &BearerAuth) -> Result<(), String> {
    if auth.enabled() || addr.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "refusing to serve the job API on {addr} without a token: anyone who can reach it could \
         submit and cancel jobs; set KILN_COORDINATOR_TOKEN or --token-file, or listen on a \
         loopback address (127.0.0.1)"
    ))
}

/// Reads a token file: its content without surrounding whitespace, which must
/// not be empty.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("read token file {}: {error}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "token in {} holds whitespace or control characters; a bearer token is one printable word",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// Serves the job API on `listener` until `shutdown` fires, then waits for
/// calls in flight (open watches end with `Unavailable`).
pub async fn serve(
    api: JobApi,
    auth: BearerAuth,
    listener: tokio::net::TcpListener,
    tls: Option<ApiTls>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    server(tls.as_ref())?
        .add_service(api.into_service(auth))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// The job API's TLS identity: a PEM certificate chain and its private key.
#[derive(Clone)]
pub struct ApiTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl ApiTls {
    /// Reads the two PEM files and checks that they make a TLS identity.
    pub fn from_files(cert: &Path, key: &Path) -> Result<ApiTls, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("read the {what} {}: {e}", path.display()))
        };
        let tls = ApiTls {
            cert_pem: read("TLS certificate", cert)?,
            key_pem: read("TLS key", key)?,
        };
        server(Some(&tls)).map_err(|e| {
            format!(
                "the TLS certificate {} and key {} do not make an identity: {e}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(tls)
    }
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls").finish_non_exhaustive()
    }
}

/// A server builder, serving TLS (rustls) with `tls` when given.
fn server(tls: Option<&ApiTls>) -> Result<tonic::transport::Server, tonic::transport::Error> {
    let builder = tonic::transport::Server::builder();
    match tls {
        None => Ok(builder),
        Some(tls) => builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kiln_proto::job::v1::job_service_client::JobServiceClient;
    use tonic::Code;
    use tonic::transport::Channel;

    use super::*;
    use crate::store::mem::MemStore;

    const SPEC: &str = r#"
[job]
name = "synth"

[model]
kind = "mlp"
hidden = [8]

[data]
kind = "synthetic"
samples = 256
eval_samples = 64
features = 8

[train]
steps = 5
global_batch = 32
"#;

    /// A job API on a loopback port over a fresh memory store.
    struct Fixture {
        store: Arc<dyn Store>,
        ks: Keyspace,
        addr: SocketAddr,
        shutdown: CancellationToken,
        server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl Fixture {
        async fn start(token: Option<&str>) -> Fixture {
            let store: Arc<dyn Store> = MemStore::new();
            let ks = Keyspace::default();
            let shutdown = CancellationToken::new();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let api = JobApi::new(store.clone(), ks.clone(), "test", shutdown.clone());
            let server = tokio::spawn(serve(
                api,
                BearerAuth::new(token),
                listener,
                None,
                shutdown.clone(),
            ));
            Fixture {
                store,
                ks,
                addr,
                shutdown,
                server,
            }
        }

        /// A client that sends `token` (if any).
        async fn client(
            &self,
            token: Option<&str>,
        ) -> JobServiceClient<
            tonic::service::interceptor::InterceptedService<
                Channel,
                impl tonic::service::Interceptor + use<>,
            >,
        > {
            let channel = Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let header = token.map(|t| format!("Bearer {t}").parse().unwrap());
            JobServiceClient::with_interceptor(channel, move |mut request: Request<()>| {
                if let Some(header) = &header {
                    request
                        .metadata_mut()
                        .insert(AUTHORIZATION, Clone::clone(header));
                }
                Ok(request)
            })
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.server.await.unwrap().unwrap();
        }
    }

    fn submit_request(job_id: &str) -> v1::SubmitRequest {
        v1::SubmitRequest {
            spec_toml: SPEC.to_string(),
            overrides: vec![],
            job_id: job_id.to_string(),
            base_dir: String::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submit_get_list_cancel() {
        let fx = Fixture::start(None).await;
        let mut client = fx.client(None).await;

        let response = client
            .submit(v1::SubmitRequest {
                overrides: vec!["train.steps=7".into()],
                ..submit_request("")
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.job, "synth");
        let status = response.status.unwrap();
        assert_eq!(status.phase(), v1::Phase::Pending);
        assert_eq!(status.total_steps, 7);
        assert!(!status.submitted_at.is_empty());
        // The spec is stored as accepted, overrides applied.
        let stored = fx
            .store
            .get(&fx.ks.job_spec("synth"))
            .await
            .unwrap()
            .unwrap();
        let spec = JobSpec::from_json(std::str::from_utf8(&stored.value).unwrap()).unwrap();
        assert_eq!(spec.train.steps, 7);

        let second = client
            .submit(submit_request("synth-2"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(second.job, "synth-2");
        let stored = fx
            .store
            .get(&fx.ks.job_spec("synth-2"))
            .await
            .unwrap()
            .unwrap();
        let spec = JobSpec::from_json(std::str::from_utf8(&stored.value).unwrap()).unwrap();
        assert_eq!(spec.job.name, "synth-2");

        let got = client
            .get(v1::GetRequest {
                job: "synth".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got, status);

        // An agent reports progress; Get and List show it.
        status::update(&*fx.store, &fx.ks, "synth-2", |s| {
            s.set_phase(Phase::Running);
            s.step = 3;
            s.world_size = 2;
        })
        .await
        .unwrap();
        let jobs = client
            .list(v1::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .jobs;
        let names: Vec<&str> = jobs.iter().map(|j| j.job.as_str()).collect();
        assert_eq!(names, ["synth", "synth-2"]);
        assert_eq!(jobs[1].phase(), v1::Phase::Running);
        assert_eq!((jobs[1].step, jobs[1].world_size), (3, 2));

        // Nobody runs "synth": cancel takes effect at once.
        let cancelled = client
            .cancel(v1::CancelRequest {
                job: "synth".into(),
                reason: "not needed".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(cancelled.requested);
        let status = cancelled.status.unwrap();
        assert_eq!(status.phase(), v1::Phase::Cancelled);
        assert!(!status.finished_at.is_empty());
        assert!(status.events.iter().any(|e| e.kind == "cancel"));
        // Cancelling again is a no-op.
        let again = client
            .cancel(v1::CancelRequest {
                job: "synth".into(),
                reason: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!again.requested);

        // "synth-2" has a node: the request is recorded for its agents, which
        // stop it; the phase is theirs to set.
        let lease = fx.store.grant_lease(Duration::from_secs(30)).await.unwrap();
        fx.store
            .put(&fx.ks.node("synth-2", "n0"), b"{}".to_vec(), Some(lease))
            .await
            .unwrap();
        let watcher = tokio::spawn(status::watch_cancel(
            fx.store.clone(),
            fx.ks.clone(),
            "synth-2",
        ));
        let cancelled = client
            .cancel(v1::CancelRequest {
                job: "synth-2".into(),
                reason: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let status = cancelled.status.unwrap();
        assert_eq!(status.phase(), v1::Phase::Running);
        assert!(!status.cancel_requested_at.is_empty());
        watcher.await.unwrap().unwrap();

        // A finished job cannot be cancelled.
        status::update(&*fx.store, &fx.ks, "synth-2", |s| {
            s.set_phase(Phase::Succeeded);
        })
        .await
        .unwrap();
        let error = client
            .cancel(v1::CancelRequest {
                job: "synth-2".into(),
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");

        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests_are_refused_with_the_reason() {
        let fx = Fixture::start(None).await;
        let mut client = fx.client(None).await;
        client.submit(submit_request("")).await.unwrap();

        let duplicate = client.submit(submit_request("")).await.unwrap_err();
        assert_eq!(duplicate.code(), Code::AlreadyExists);
        assert!(
            duplicate.message().contains("synth"),
            "{}",
            duplicate.message()
        );

        let invalid = client
            .submit(v1::SubmitRequest {
                overrides: vec!["train.global_batch=0".into()],
                ..submit_request("other")
            })
            .await
            .unwrap_err();
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert!(
            invalid.message().contains("train.global_batch"),
            "{}",
            invalid.message()
        );

        let unknown_key = client
            .submit(v1::SubmitRequest {
                spec_toml: format!("{SPEC}\n[train.extra]\nx = 1\n"),
                ..submit_request("other")
            })
            .await
            .unwrap_err();
        assert_eq!(unknown_key.code(), Code::InvalidArgument);

        let bad_id = client.submit(submit_request("a/b")).await.unwrap_err();
        assert_eq!(bad_id.code(), Code::InvalidArgument);
        assert!(bad_id.message().contains("job id"), "{}", bad_id.message());

        // Nothing was stored for refused submissions.
        let (kvs, _) = fx.store.get_prefix(&fx.ks.jobs_prefix()).await.unwrap();
        assert!(
            kvs.iter()
                .all(|kv| kv.key.starts_with(&fx.ks.job_prefix("synth"))),
            "{kvs:?}"
        );

        for job in ["nope", ""] {
            let error = client
                .get(v1::GetRequest { job: job.into() })
                .await
                .unwrap_err();
            let expected = if job.is_empty() {
                Code::InvalidArgument
            } else {
                Code::NotFound
            };
            assert_eq!(error.code(), expected, "{job:?}: {error:?}");
        }
        let error = client
            .cancel(v1::CancelRequest {
                job: "nope".into(),
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::NotFound);
        let error = client
            .watch(v1::WatchRequest { job: "nope".into() })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::NotFound);
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_need_the_right_token() {
        let fx = Fixture::start(Some("s3cret-token")).await;
        for token in [
            None,
            Some("wrong"),
            Some("s3cret-token-longer"),
            Some("s3cret-toke"),
        ] {
            let mut client = fx.client(token).await;
            let error = client.list(v1::ListRequest {}).await.unwrap_err();
            assert_eq!(error.code(), Code::Unauthenticated, "{token:?}");
            let error = client.submit(submit_request("")).await.unwrap_err();
            assert_eq!(error.code(), Code::Unauthenticated, "{token:?}");
            let error = client
                .watch(v1::WatchRequest {
                    job: "synth".into(),
                })
                .await
                .unwrap_err();
            assert_eq!(error.code(), Code::Unauthenticated, "{token:?}");
        }
        let (kvs, _) = fx.store.get_prefix(&fx.ks.jobs_prefix()).await.unwrap();
        assert!(kvs.is_empty(), "{kvs:?}");

        let mut client = fx.client(Some("s3cret-token")).await;
        client.submit(submit_request("")).await.unwrap();
        assert_eq!(
            client
                .list(v1::ListRequest {})
                .await
                .unwrap()
                .into_inner()
                .jobs
                .len(),
            1
        );
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_follows_the_status_to_the_end() {
        let fx = Fixture::start(None).await;
        let mut client = fx.client(None).await;
        client.submit(submit_request("")).await.unwrap();
        let mut stream = client
            .watch(v1::WatchRequest {
                job: "synth".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.phase(), v1::Phase::Pending);

        let store = fx.store.clone();
        let ks = fx.ks.clone();
        let writer = tokio::spawn(async move {
            for step in 1..=5 {
                status::update(&*store, &ks, "synth", |s| {
                    s.set_phase(Phase::Running);
                    s.step = step;
                })
                .await
                .unwrap();
            }
            status::update(&*store, &ks, "synth", |s| {
                s.set_phase(Phase::Succeeded);
            })
            .await
            .unwrap();
        });
        let mut seen = Vec::new();
        while let Some(status) = stream.message().await.unwrap() {
            seen.push((status.phase(), status.step));
        }
        writer.await.unwrap();
        // Every change, in order, and the stream ends after the terminal one.
        let expected: Vec<_> = (1..=5)
            .map(|step| (v1::Phase::Running, step))
            .chain([(v1::Phase::Succeeded, 5)])
            .collect();
        assert_eq!(seen, expected);
        fx.stop().await;
    }

    #[test]
    fn unauthenticated_apis_stay_on_loopback() {
        let open = BearerAuth::new(None);
        let closed = BearerAuth::new(Some("t"));
        let lan: SocketAddr = "10.1.2.3:7070".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let local6: SocketAddr = "[::1]:7070".parse().unwrap();
        assert!(
            check_listen(lan, &open)
                .unwrap_err()
                .contains("KILN_COORDINATOR_TOKEN")
        );
        assert!(check_listen(any, &open).is_err());
        check_listen(local, &open).unwrap();
        check_listen(local6, &open).unwrap();
        check_listen(any, &closed).unwrap();
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
        let auth = BearerAuth::new(Some("abc"));
        assert!(auth.check(Some(b"Bearer abc")).is_ok());
        assert!(auth.check(Some(b"Bearer abd")).is_err());
        assert!(auth.check(Some(b"abc")).is_err());
        assert!(auth.check(None).is_err());
        assert!(!format!("{auth:?}").contains("abc"));
    }
}

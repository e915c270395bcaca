//! Why a request failed, and how each protocol says so; [`Error`], why a
//! server could not start or stopped; and [`ModelError`], why a model
//! version could not be loaded or run.
//!
//! Every refusal carries a message for the client; REST sends it as the Open
//! Inference Protocol's error object `{"error": "..."}` with the status below,
//! gRPC as a `tonic::Status` with the matching code.
//!
//! Every "unavailable, try again" answer (503, `UNAVAILABLE`: a full queue,
//! the in-flight cap) says when to retry: `Retry-After` (REST) or
//! `retry-after` metadata (gRPC), in seconds, so that well-behaved clients
//! back off instead of hammering an overloaded server.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Why a server could not start, or stopped: the public error of
/// kiln-serve's entry points ([`crate::start`], [`crate::ServeConfig`]'s
/// readers and checks, [`crate::RunningServer::wait`]). The variants say
/// what the caller should do: fix the configuration (`Config`), check or
/// retry the registry (`Registry`), register or select another model
/// version (`Model`), free or change the address (`Listen`), or look at the
/// server's log (`Serve`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing, out of range or unreadable: the config file,
    /// a token, certificate or key file, a hook. The reason names the field.
    #[error("{reason}")]
    Config {
        /// What is wrong, naming the field or file.
        reason: String,
    },

    /// The registry could not be opened (a bad URL, a store that is down).
    #[error("open registry {url}: {source}")]
    Registry {
        /// The registry URL configured.
        url: String,
        /// Why it could not be opened.
        #[source]
        source: kiln_checkpoint::Error,
    },

    /// A configured model could not be served: no such version or alias,
    /// its checkpoint missing, damaged or not the one registered, or a
    /// definition this build cannot serve.
    #[error("load model {model}: {reason}")]
    Model {
        /// The model as configured (`m`, `m:3`, `m@production`).
        model: String,
        /// Why it could not be served ([`ModelError`]'s message).
        reason: String,
    },

    /// The listening address could not be bound or read.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address configured.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The server failed while serving (its accept loop or its task).
    #[error("serve: {reason}")]
    Serve {
        /// What failed.
        reason: String,
    },
}

impl Error {
    /// A configuration error from a module's own error (its whole chain).
    pub(crate) fn config(e: impl std::fmt::Display) -> Error {
        Error::Config {
            reason: format!("{e:#}"),
        }
    }
}

/// Why a model version could not be loaded, or a forward pass failed: the
/// error of [`crate::model::ServingNet`], [`crate::deployment::Loader`] and
/// [`crate::ServerState::load_model`], and of the steps a load takes
/// ([`crate::signature::IoSpec::of`], the warm-ups, [`crate::packed::PackedMlp`],
/// [`crate::monitor::VersionDrift::new`]) and of [`crate::lm::TextStream`].
/// The variants say what the caller
/// should do: select or register another version (`NotFound`,
/// `Unservable`), retry or repair the storage (`Storage`; its source says
/// which), or look at the server's log (`Internal`). A message says which
/// step failed, prefixed with the version (`m:3: ...`) where a load failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The registry has no such model (no versions) or alias.
    #[error("not found: {what}")]
    NotFound {
        /// The model or alias, and the registry looked in.
        what: String,
    },

    /// Reading the registry or the version's checkpoint failed: retrying
    /// may help when the source is `Unavailable` or `Timeout`; a source for
    /// which [`kiln_checkpoint::Error::is_data_loss`] holds means the data is
    /// missing or damaged (a `NotFound` source: no such version, or a
    /// checkpoint collected since).
    #[error("{context}: {source}")]
    Storage {
        /// What was being read, as a verb phrase (`m:3: load weights of step 40`).
        context: String,
        /// The registry's or checkpoint engine's error.
        #[source]
        source: kiln_checkpoint::Error,
    },

    /// The version cannot be served as registered: its checkpoint is not the
    /// one registered or holds no weights, its weights, signature,
    /// tokenizer or reference profile do not fit the network its definition
    /// builds, a blob the registry lists is missing, or the network returned
    /// outputs of the wrong shape.
    #[error("{reason}")]
    Unservable {
        /// What does not fit, naming the version where a load failed.
        reason: String,
    },

    /// A failure inside the server: libtorch, packing weights, a temporary
    /// file, a thread, a forward pass asked the wrong question.
    #[error("{reason}")]
    Internal {
        /// What failed, with its cause.
        reason: String,
    },
}

impl ModelError {
    /// Whether the model, alias, version or checkpoint asked for does not
    /// exist (404 from management), as opposed to a failure reading it.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ModelError::NotFound { .. }
                | ModelError::Storage {
                    source: kiln_checkpoint::Error::NotFound { .. },
                    ..
                }
        )
    }

    /// A `Storage` error: `source` while doing `context`.
    pub(crate) fn storage(context: impl Into<String>, source: kiln_checkpoint::Error) -> Self {
        ModelError::Storage {
            context: context.into(),
            source,
        }
    }

    /// An `Unservable` error.
    pub(crate) fn unservable(reason: impl Into<String>) -> Self {
        ModelError::Unservable {
            reason: reason.into(),
        }
    }

    /// An `Internal` error: `cause` (its whole chain) while doing `context`.
    pub(crate) fn internal(context: impl std::fmt::Display, cause: impl std::fmt::Display) -> Self {
        ModelError::Internal {
            reason: format!("{context}: {cause:#}"),
        }
    }
}

/// Seconds a client is asked to wait before retrying an unavailable answer.
pub const RETRY_AFTER_SECS: u32 = 1;

/// What kind of failure, by what a client should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or does not fit the model (fix the request).
    BadRequest,
    /// No credentials, or the wrong ones.
    Unauthorized,
    /// A management call from where management is not allowed.
    Forbidden,
    /// A token-less management call to a loopback listener that names
    /// another host (a DNS name rebound to this machine): 421.
    Misdirected,
    /// No such model, version or endpoint.
    NotFound,
    /// Bigger than the server's limits (bytes or rows).
    TooLarge,
    /// A content encoding the server does not read.
    UnsupportedMediaType,
    /// Not ready, or the model's queue is full (retry later).
    Unavailable,
    /// The request did not finish within its time limit.
    Timeout,
    /// A bug or a failure inside the server.
    Internal,
}

/// A failed request: its kind and a message for the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// What the client should do about it; decides the status code.
    pub kind: ErrorKind,
    /// What is wrong and what is allowed, for the client.
    pub message: String,
}

impl RequestError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// Something not found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Unavailable for now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// An internal failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short label for metrics (`bad_request`, `timeout`, ...).
    pub fn label(&self) -> &'static str {
        match self.kind {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Misdirected => "misdirected",
            ErrorKind::NotFound => "not_found",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
        }
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut response = (
            self.status(),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if self.kind == ErrorKind::Unavailable {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_SECS),
            );
        }
        response
    }
}

impl From<RequestError> for tonic::Status {
    fn from(e: RequestError) -> Self {
        let code = match e.kind {
            ErrorKind::BadRequest | ErrorKind::UnsupportedMediaType => tonic::Code::InvalidArgument,
            ErrorKind::Unauthorized => tonic::Code::Unauthenticated,
            ErrorKind::Forbidden | ErrorKind::Misdirected => tonic::Code::PermissionDenied,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::TooLarge => tonic::Code::ResourceExhausted,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Timeout => tonic::Code::DeadlineExceeded,
            ErrorKind::Internal => tonic::Code::Internal,
        };
        let mut status = tonic::Status::new(code, e.message);
        if e.kind == ErrorKind::Unavailable {
            status
                .metadata_mut()
                .insert("retry-after", RETRY_AFTER_SECS.into());
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_answers_say_when_to_retry() {
        let e = RequestError::unavailable("the queue is full");
        let r = e.clone().into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
        let s = tonic::Status::from(e);
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get("retry-after").unwrap(), "1");
        let r = RequestError::bad_request("no").into_response();
        assert!(r.headers().get("retry-after").is_none());
    }
}

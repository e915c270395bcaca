//! The job API of `kiln coordinator` (`proto/kiln/job.proto`): generated
//! messages, server and client, and the one mapping between service errors
//! and gRPC status codes, used by the server to answer and by clients to
//! tell what went wrong.

/// Generated messages, the `JobService` server trait and its client.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/kiln.job.v1.rs"));
}

use tonic::Code;

use crate::spec::SpecError;

/// Metadata key of the bearer token on every call.
pub const AUTHORIZATION: &str = "authorization";

/// Why a job API call failed, as the service reports it and a client reads it.
///
/// The message is the whole text for a user; the variant says what a caller
/// can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request is impossible: a bad spec or job id (the message names the
    /// field and says what is allowed).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No such job.
    #[error("not found: {0}")]
    NotFound(String),
    /// The job id is taken.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The job is in a state that does not allow the call (cancelling a
    /// finished job).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The token is missing or wrong.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A concurrent writer won; the call may be retried.
    #[error("aborted: {0}")]
    Aborted(String),
    /// The coordinator or its store cannot be reached; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a corrupt record, a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<SpecError> for ServiceError {
    fn from(error: SpecError) -> Self {
        ServiceError::InvalidArgument(format!("job spec: {error}"))
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ServiceError::NotFound(m) => tonic::Status::not_found(m),
            ServiceError::AlreadyExists(m) => tonic::Status::already_exists(m),
            ServiceError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            ServiceError::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            ServiceError::Aborted(m) => tonic::Status::aborted(m),
            ServiceError::Unavailable(m) => tonic::Status::unavailable(m),
            ServiceError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

impl From<tonic::Status> for ServiceError {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ServiceError::InvalidArgument(message),
            Code::NotFound => ServiceError::NotFound(message),
            Code::AlreadyExists => ServiceError::AlreadyExists(message),
            Code::FailedPrecondition => ServiceError::FailedPrecondition(message),
            Code::Unauthenticated | Code::PermissionDenied => {
                ServiceError::Unauthenticated(message)
            }
            Code::Aborted => ServiceError::Aborted(message),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                ServiceError::Unavailable(message)
            }
            code => ServiceError::Internal(format!("{code:?}: {message}")),
        }
    }
}

impl v1::Phase {
    /// The lowercase name shown in tables and JSON: `pending`, `running`, ...
    pub fn label(self) -> &'static str {
        match self {
            v1::Phase::Unspecified => "unknown",
            v1::Phase::Pending => "pending",
            v1::Phase::Running => "running",
            v1::Phase::Waiting => "waiting",
            v1::Phase::Succeeded => "succeeded",
            v1::Phase::Failed => "failed",
            v1::Phase::Cancelled => "cancelled",
        }
    }

    /// Whether a job in this phase is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            v1::Phase::Succeeded | v1::Phase::Failed | v1::Phase::Cancelled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        for error in [
            ServiceError::InvalidArgument("train.steps: must be > 0".into()),
            ServiceError::NotFound("job j".into()),
            ServiceError::AlreadyExists("job j".into()),
            ServiceError::FailedPrecondition("job j already succeeded".into()),
            ServiceError::Unauthenticated("wrong token".into()),
            ServiceError::Aborted("busy".into()),
            ServiceError::Unavailable("store".into()),
        ] {
            let status = tonic::Status::from(error.clone());
            assert_eq!(ServiceError::from(status), error);
        }
    }

    #[test]
    fn spec_errors_are_invalid_arguments_that_name_the_field() {
        let error = crate::spec::JobSpec::from_toml_str(
            "[job]\nname = \"a\"\n[model]\nkind = \"nope\"\n",
            std::path::Path::new("."),
            &[],
        )
        .unwrap_err();
        let status = tonic::Status::from(ServiceError::from(error));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("model.kind"),
            "{}",
            status.message()
        );
    }
}

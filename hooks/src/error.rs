//! The crate's error.

/// Why hooks could not be set up. Delivery failures are not errors of the
/// caller: they are retried, then logged and counted ([`crate::SinkStats`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A hook is misconfigured, or its secret or program cannot be found.
    #[error("{field}: {message}")]
    InvalidSpec {
        /// Path of the culprit (`hooks[1].secret_env`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Hooks with sinks were built outside a tokio runtime: delivery runs on
    /// background tasks.
    #[error("hooks deliver events on tokio tasks: create them inside a tokio runtime")]
    NoRuntime,
    /// The HTTP client for webhooks could not be built (TLS set-up).
    #[error("build the webhook http client: {0}")]
    HttpClient(String),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::InvalidSpec {
        field: field.into(),
        message: message.into(),
    }
}

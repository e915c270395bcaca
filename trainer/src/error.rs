//! The one public error of kiln-trainer: variants grouped by what the caller does.

use std::fmt;

use crate::collective::CollectiveError;

/// What went wrong training, reading a job's data or supervising workers.
///
/// What a caller does about each variant:
/// - `Collective`: the round is broken (a peer died or left, the round was
///   aborted). In an elastic job the worker keeps its state and waits for the
///   next round; otherwise the job ends.
/// - `Invalid`: the job spec, the data, or the checkpoint it resumes from
///   cannot make this job; the user fixes them, a retry fails the same way.
/// - `Checkpoint`, `Model`: the checkpoint engine's or the model's own error,
///   whose variant says more (whether a retry or an older checkpoint helps,
///   whether the spec or libtorch is at fault).
/// - `Io`: a local file, pipe, socket or process operation failed.
/// - `Worker`: a worker process failed or did not start (the agent's view).
/// - `Failed`: anything else that ends the job (training diverged, libtorch
///   failed, the agent and a worker disagree).
///
/// Variants with a typed cause keep it as the error's `source`, and `what`
/// says what was being done, outermost step first, joined by `: ` (empty when
/// the cause speaks for itself). Variants without one carry the whole message.
/// Printed with `{:#}`, here or through `anyhow`, an error reads as a chain:
/// `step 12: all-reduce gradients: all_reduce: rank 1 closed the connection (...)`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The job spec, the data or the checkpoint named to resume from do not
    /// make this job (a missing field, a malformed shard, a checkpoint of
    /// another optimizer, ...): fix them.
    Invalid {
        /// What is wrong, naming the spec field or file.
        reason: String,
    },
    /// A collective failed: the round ends.
    Collective {
        /// What the rank was doing when it failed (may be empty).
        what: String,
        /// The collective's error.
        source: CollectiveError,
    },
    /// A checkpoint operation failed.
    Checkpoint {
        /// What was being done (may be empty).
        what: String,
        /// The checkpoint engine's error.
        source: kiln_checkpoint::Error,
    },
    /// The model could not be built or run.
    Model {
        /// What was being done (may be empty).
        what: String,
        /// The model's error.
        source: kiln_models::Error,
    },
    /// A local I/O operation failed: the agent channel, a worker's pipes or
    /// process, a listener, a file.
    Io {
        /// The operation, as a verb phrase (may be empty).
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A worker process failed, or did not start and say hello; the message
    /// names its rank, its pid and, when it died, its last lines.
    Worker {
        /// The failure as the agent reports it.
        message: String,
    },
    /// Anything else that ends the job: the loss diverged, libtorch failed,
    /// a message from the agent made no sense.
    Failed {
        /// The message, with its causes.
        reason: String,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Error::Invalid {
            reason: reason.into(),
        }
    }

    pub(crate) fn failed(reason: impl Into<String>) -> Self {
        Error::Failed {
            reason: reason.into(),
        }
    }

    pub(crate) fn worker(message: impl Into<String>) -> Self {
        Error::Worker {
            message: message.into(),
        }
    }

    /// Whether a collective failed: in an elastic job the round ends and the
    /// worker waits for the next one instead of failing.
    pub fn is_collective(&self) -> bool {
        matches!(self, Error::Collective { .. })
    }

    /// This error as a step of `outer`: `outer` goes in front of what the
    /// error already says.
    pub(crate) fn context(self, outer: impl fmt::Display) -> Self {
        let join = |inner: String| {
            if inner.is_empty() {
                outer.to_string()
            } else {
                format!("{outer}: {inner}")
            }
        };
        match self {
            Error::Invalid { reason } => Error::Invalid {
                reason: join(reason),
            },
            Error::Failed { reason } => Error::Failed {
                reason: join(reason),
            },
            Error::Worker { message } => Error::Worker {
                message: join(message),
            },
            Error::Collective { what, source } => Error::Collective {
                what: join(what),
                source,
            },
            Error::Checkpoint { what, source } => Error::Checkpoint {
                what: join(what),
                source,
            },
            Error::Model { what, source } => Error::Model {
                what: join(what),
                source,
            },
            Error::Io { what, source } => Error::Io {
                what: join(what),
                source,
            },
        }
    }

    /// The error's own message and its typed cause, if any.
    fn parts(&self) -> (&str, Option<&(dyn std::error::Error + 'static)>) {
        match self {
            Error::Invalid { reason } | Error::Failed { reason } => (reason, None),
            Error::Worker { message } => (message, None),
            Error::Collective { what, source } => (what, Some(source)),
            Error::Checkpoint { what, source } => (what, Some(source)),
            Error::Model { what, source } => (what, Some(source)),
            Error::Io { what, source } => (what, Some(source)),
        }
    }
}

// Display and source by hand rather than by thiserror: an error without
// context is its cause (the cause's message, the cause's causes), so that a
// chain printed with `{:#}` never shows an empty step or a message twice.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts() {
            ("", Some(cause)) => write!(f, "{cause}")?,
            (what, _) => f.write_str(what)?,
        }
        if f.alternate() {
            let mut next = std::error::Error::source(self);
            while let Some(cause) = next {
                write!(f, ": {cause}")?;
                next = cause.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.parts() {
            ("", Some(cause)) => cause.source(),
            (_, cause) => cause,
        }
    }
}

/// `e` and its causes, joined by `: ` (what anyhow's `{:#}` prints).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

impl From<CollectiveError> for Error {
    fn from(source: CollectiveError) -> Self {
        Error::Collective {
            what: String::new(),
            source,
        }
    }
}

impl From<kiln_checkpoint::Error> for Error {
    fn from(source: kiln_checkpoint::Error) -> Self {
        Error::Checkpoint {
            what: String::new(),
            source,
        }
    }
}

impl From<kiln_models::Error> for Error {
    fn from(source: kiln_models::Error) -> Self {
        Error::Model {
            what: String::new(),
            source,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::Io {
            what: String::new(),
            source,
        }
    }
}

/// Token files that cannot be read or hold ids past the vocabulary: data to fix.
impl From<kiln_text::Error> for Error {
    fn from(e: kiln_text::Error) -> Self {
        Error::invalid(chain(&e))
    }
}

/// A job spec the worker was handed that does not parse or fit the world size.
impl From<kiln_proto::spec::SpecError> for Error {
    fn from(e: kiln_proto::spec::SpecError) -> Self {
        Error::invalid(chain(&e))
    }
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::failed(chain(&e))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::failed(chain(&e))
    }
}

/// `anyhow`'s `context` for the crate's errors: the step goes in front of
/// what the error says, and a typed cause stays typed.
pub(crate) trait Context<T> {
    /// Adds `what` as the outermost step.
    fn context(self, what: impl fmt::Display) -> Result<T>;
    /// Adds `what()` as the outermost step, computed only on an error.
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }

    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}

/// A missing value is a [`Error::Failed`] with `what` as its message.
impl<T> Context<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::failed(what.to_string()))
    }

    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| Error::failed(what().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_reads_like_an_anyhow_chain() {
        let bare = Error::from(CollectiveError::Aborted);
        assert_eq!(format!("{bare:#}"), "collective aborted");
        assert!(std::error::Error::source(&bare).is_none());

        let e: Result<()> = Err(CollectiveError::PeerClosed {
            op: "all_reduce",
            peer: 1,
        })
        .context("all-reduce gradients")
        .context("step 3");
        let e = e.unwrap_err();
        assert!(e.is_collective());
        assert_eq!(e.to_string(), "step 3: all-reduce gradients");
        let expected = "step 3: all-reduce gradients: all_reduce: rank 1 closed the connection (it died or left the round)";
        assert_eq!(format!("{e:#}"), expected);
        assert_eq!(format!("{:#}", anyhow::Error::from(e)), expected);

        let io = std::io::Error::other("disk on fire");
        let e: Result<()> = Err(io).context("write weights").context("finish");
        let e = e.unwrap_err();
        assert!(!e.is_collective());
        assert_eq!(format!("{e:#}"), "finish: write weights: disk on fire");
        let e = Error::invalid("data.train: no samples").context("load data");
        assert_eq!(format!("{e:#}"), "load data: data.train: no samples");
        assert!(std::error::Error::source(&e).is_none());
    }
}

//! The crate's one error type.

use crate::store::Revision;

/// Why a coordination call failed.
///
/// Variants name what a caller can act on: retry after [`Error::Unavailable`],
/// re-list and re-watch after [`Error::Compacted`], step down after
/// [`Error::Conflict`] (another leader wrote first), give up after
/// [`Error::RendezvousFailed`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key, lease or other named thing does not exist (a lease that expired
    /// no longer exists).
    #[error("{what} not found")]
    NotFound {
        /// The thing, in words (`lease 7587...`, `job digits`).
        what: String,
    },
    /// A create-only write found the thing already there.
    #[error("{what} already exists")]
    AlreadyExists {
        /// The thing, in words.
        what: String,
    },
    /// A compare-and-swap lost to a concurrent writer, or a fencing token
    /// (a rendezvous round) was already taken.
    #[error("conflict: {message}")]
    Conflict {
        /// Who won, or what was taken.
        message: String,
    },
    /// A watch asked for history the store no longer keeps.
    #[error(
        "revision {requested} is compacted: watches must start at revision {compacted} or later"
    )]
    Compacted {
        /// The revision the watch asked to start from.
        requested: Revision,
        /// The oldest revision the store still keeps.
        compacted: Revision,
    },
    /// A stored value could not be decoded.
    #[error("corrupt value at {key}: {message}")]
    Corrupt {
        /// The key whose value is corrupt.
        key: String,
        /// What the decoder said.
        message: String,
    },
    /// A deadline passed.
    #[error("timed out: {what}")]
    Timeout {
        /// What was waited for, in words.
        what: String,
    },
    /// The operation was cancelled by its caller.
    #[error("cancelled")]
    Cancelled,
    /// The store cannot be reached, or it shut down while a call waited on it.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// The client's or the store's own error.
        message: String,
    },
    /// The store refused the credentials, or the user may not do this (etcd
    /// authentication and roles). Retrying does not help; fix the store URL's
    /// credentials or the user's permissions.
    #[error("store access denied: {message}")]
    AccessDenied {
        /// The store's refusal.
        message: String,
    },
    /// An argument is impossible (empty key, zero TTL, `min_nodes > max_nodes`, ...).
    #[error("invalid {what}: {message}")]
    Invalid {
        /// The argument, in words.
        what: String,
        /// Why it is impossible.
        message: String,
    },
    /// The rendezvous spent a restart budget or otherwise cannot continue.
    #[error("rendezvous of job {job} failed: {reason}")]
    RendezvousFailed {
        /// The job whose rendezvous ended.
        job: String,
        /// Why, for the user.
        reason: String,
    },
}

impl Error {
    pub(crate) fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Error::Unavailable {
            message: message.into(),
        }
    }

    pub(crate) fn access_denied(message: impl Into<String>) -> Self {
        Error::AccessDenied {
            message: message.into(),
        }
    }

    pub(crate) fn corrupt(key: impl Into<String>, message: impl ToString) -> Self {
        Error::Corrupt {
            key: key.into(),
            message: message.to_string(),
        }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

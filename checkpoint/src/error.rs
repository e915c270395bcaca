//! The one public error of kiln-checkpoint: variants a caller can act on.

/// What went wrong with a checkpoint operation.
///
/// Store errors are mapped onto these variants by what a caller would do about
/// them: retry (`Unavailable`, `Timeout`), fall back to an older checkpoint
/// (`Corrupt`, `NotFound`), or give up (`Invalid`, `Unsupported`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An object the operation needs does not exist (a manifest, `latest`, a chunk).
    #[error("not found: {what}")]
    NotFound {
        /// The object, by URL or key.
        what: String,
    },

    /// A create-only write found the object already there.
    #[error("already exists: {key}")]
    AlreadyExists {
        /// The object's key or URL.
        key: String,
    },

    /// A compare-and-swap lost, or two writers disagree on an object.
    #[error("conflict: {what}")]
    Conflict {
        /// What was contended, and how it was lost.
        what: String,
    },

    /// Stored bytes do not decode or do not match their checksum or address.
    #[error("corrupt chunk {chunk} of tensor {tensor}: {reason}")]
    Corrupt {
        /// The tensor the chunk belongs to.
        tensor: String,
        /// The chunk's index within the tensor and its key (`#3 chunks/...`).
        chunk: String,
        /// What the check found (a missing object is one).
        reason: String,
    },

    /// A manifest, part or `latest` record that is not valid.
    #[error("corrupt object {key}: {reason}")]
    CorruptObject {
        /// The record's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Waited longer than allowed (e.g. for the other ranks' parts).
    #[error("timed out: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
    },

    /// The store failed or could not be reached; retrying may help.
    #[error("store unavailable: {what}: {source}")]
    Unavailable {
        /// The operation and the key it was on.
        what: String,
        /// The store client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A bad argument or configuration (a URL, a tensor whose bytes do not match
    /// its shape, a world size of zero, ...).
    #[error("invalid: {reason}")]
    Invalid {
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// Something this build cannot do (a newer format version, a codec, a store
    /// operation).
    #[error("unsupported: {what}")]
    Unsupported {
        /// What was asked, and what this build supports.
        what: String,
    },

    /// A local file operation failed (export, import, lock files).
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation, as a verb (`read`, `write`, `create directory`).
        op: &'static str,
        /// The file or folder, or what the operation was on.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The ranks of a job cannot read each other's writes under the
    /// checkpoint location (see [`crate::probe`]): no checkpoint could ever
    /// commit, so stop and fix the location rather than retry.
    #[error("checkpoint location not shared: {what}")]
    NotShared {
        /// Which rank could not read which other rank's write, and where.
        what: String,
    },

    /// The checkpointer was shut down while work was pending.
    #[error("cancelled: {what}")]
    Cancelled {
        /// What stopped, and why.
        what: String,
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

    /// Maps an object store error on `key` (`what` says which operation).
    pub(crate) fn store(what: &str, key: &str, e: object_store::Error) -> Self {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => Error::NotFound {
                what: key.to_string(),
            },
            E::AlreadyExists { .. } => Error::AlreadyExists {
                key: key.to_string(),
            },
            E::Precondition { .. } => Error::Conflict {
                what: format!("{what} {key}: precondition failed"),
            },
            E::NotSupported { .. } | E::NotImplemented { .. } => Error::Unsupported {
                what: format!("{what} {key}: {e}"),
            },
            other => Error::Unavailable {
                what: format!("{what} {key}"),
                source: Box::new(other),
            },
        }
    }

    /// Whether falling back to an older checkpoint may help (the data of this
    /// one is damaged or missing), as opposed to a store outage.
    pub fn is_data_loss(&self) -> bool {
        matches!(
            self,
            Error::Corrupt { .. } | Error::CorruptObject { .. } | Error::NotFound { .. }
        )
    }
}

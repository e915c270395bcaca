//! The one public error of kiln-text, grouped by what a caller does about it.

use std::path::{Path, PathBuf};

/// What went wrong reading text, tokenizing it or reading and writing token files.
///
/// A caller fixes its input for `NotFound` and `Invalid`, looks at the disk for
/// `Io`, and at the tokenizer for `Tokenizer`. Every variant that concerns a file
/// names it; `what` says which kind of file it is ("text file", "token file",
/// "tokenizer file", "data meta file"), so a message reads on its own:
/// `token file data/train.bin: token 70000 at position 1234 is beyond the vocabulary of 50304`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file the operation needs does not exist.
    #[error("{what} {}: not found", path.display())]
    NotFound {
        /// The kind of file ("token file", ...).
        what: &'static str,
        /// The missing file.
        path: PathBuf,
    },

    /// Input that cannot be used as given: a token file of the wrong length or
    /// with ids past the vocabulary, an empty text, an unreadable tokenizer
    /// file, an option out of range (then `path` is `None`).
    #[error("{}{message}", prefix(what, path.as_deref()))]
    Invalid {
        /// The kind of file; empty for an option.
        what: &'static str,
        /// The file at fault, if the error is about one.
        path: Option<PathBuf>,
        /// What is wrong with it.
        message: String,
    },

    /// A file operation failed (permissions, a full disk, ...).
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The operation as a verb phrase: "read text file", "write token file".
        op: &'static str,
        /// The file operated on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The tokenizer library failed to encode, decode, train or serialize.
    #[error("tokenizer: {message}")]
    Tokenizer {
        /// The library's error, as it words it.
        message: String,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn prefix(what: &str, path: Option<&Path>) -> String {
    match path {
        Some(path) => format!("{what} {}: ", path.display()),
        None => String::new(),
    }
}

impl Error {
    /// An `Invalid` error about one file.
    pub(crate) fn invalid(what: &'static str, path: &Path, message: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            path: Some(path.to_path_buf()),
            message: message.into(),
        }
    }

    /// An `Invalid` error about an option or the input as a whole.
    pub(crate) fn invalid_option(message: impl Into<String>) -> Self {
        Error::Invalid {
            what: "",
            path: None,
            message: message.into(),
        }
    }

    /// An I/O error on `path` while reading it: a missing file becomes `NotFound`.
    pub(crate) fn read(
        what: &'static str,
        op: &'static str,
        path: &Path,
        source: std::io::Error,
    ) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                what,
                path: path.to_path_buf(),
            }
        } else {
            Error::io(op, path, source)
        }
    }

    /// An I/O error on `path` (writes: a missing folder is not a missing input).
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn tokenizer(source: impl std::fmt::Display) -> Self {
        Error::Tokenizer {
            message: source.to_string(),
        }
    }
}

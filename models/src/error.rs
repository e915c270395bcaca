//! The one public error of kiln-models: variants a caller can act on.

/// What went wrong building or running a network.
///
/// Grouped by who fixes it: the spec (`Config`, and `Module` for the
/// TorchScript file it names), the caller's tensors and arguments (`Input`),
/// or nobody in particular (`Torch`: libtorch failed while the model ran).
/// Messages name the spec field or the shapes involved; a variant with a
/// `source` keeps libtorch's own message in the error chain, not in its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The spec's `[model]` (or a [`GptConfig`](crate::gpt::GptConfig)) does
    /// not make a network, or not one that fits the data: a required field is
    /// missing, sizes do not divide, a precision the model does not support.
    #[error("{reason}")]
    Config {
        /// What is wrong, naming the spec field.
        reason: String,
    },

    /// A TorchScript module cannot be loaded, or does not do what the spec
    /// says: its forward fails on the data's shape, returns logits of another
    /// shape, or not a scalar loss. `source` is libtorch's error, if it gave one.
    #[error("{what}")]
    Module {
        /// What was done with the module and how it failed.
        what: String,
        /// libtorch's error; `None` when the module ran but returned the wrong thing.
        #[source]
        source: Option<tch::TchError>,
    },

    /// The caller's input does not fit the model: tokens that are not int64
    /// [batch, time], more positions than the context, targets of another
    /// shape, a KV cache of another batch, a prompt token outside the
    /// vocabulary, a sampling parameter out of range.
    #[error("{reason}")]
    Input {
        /// What does not fit, with the shapes or values involved.
        reason: String,
    },

    /// libtorch failed while the model ran (an embedding lookup finding a
    /// token id outside the vocabulary, a copy to the host, ...); `what` says
    /// which step.
    #[error("{what}")]
    Torch {
        /// The step that failed, as a verb phrase.
        what: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn config(reason: impl Into<String>) -> Self {
        Error::Config {
            reason: reason.into(),
        }
    }

    pub(crate) fn input(reason: impl Into<String>) -> Self {
        Error::Input {
            reason: reason.into(),
        }
    }

    pub(crate) fn module(what: impl Into<String>, source: Option<tch::TchError>) -> Self {
        Error::Module {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn torch(what: impl Into<String>) -> impl FnOnce(tch::TchError) -> Self {
        let what = what.into();
        move |source| Error::Torch { what, source }
    }
}

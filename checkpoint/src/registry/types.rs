//! The registry's public types: what a caller registers ([`NewVersion`],
//! [`ModelParts`]), what it reads back ([`ModelVersion`], [`Alias`],
//! [`AuditEntry`]), the model's definition and signature, and the selectors
//! (`NAME`, `NAME:VERSION`, `NAME@ALIAS`) that name versions.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use kiln_proto::spec::ModelSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

use super::validate::validate_segment;

/// What to register: everything a version records, minus what the registry
/// assigns (name, number, time, actor).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NewVersion {
    /// The committed checkpoint that holds the weights; it is pinned before
    /// the version becomes visible.
    pub checkpoint: CheckpointRef,
    /// The network the weights belong to.
    pub model: ModelDefinition,
    /// The inputs and outputs a server accepts and returns.
    pub signature: Signature,
    /// Named figures recorded with the version (`eval_loss`, ...); finite
    /// values only.
    pub metrics: BTreeMap<String, f64>,
    /// Where the weights came from.
    pub lineage: Lineage,
    /// Reference data profile for drift detection (opaque JSON), stored as its
    /// own object.
    #[serde(skip)]
    pub reference_profile: Option<Vec<u8>>,
    /// The TorchScript module's bytes; required when `model.spec.kind` is
    /// `torchscript` (the training machine's `model.path` is not the server's).
    #[serde(skip)]
    pub torchscript: Option<Vec<u8>>,
    /// A language model's tokenizer (a Hugging Face `tokenizer.json`), stored
    /// as its own object so that a server turns text into ids exactly as
    /// training did; language models only.
    #[serde(skip)]
    pub tokenizer: Option<Vec<u8>>,
}

/// The model half of a [`NewVersion`]: what a server builds and checks
/// requests against, and the files it needs besides the weights.
#[derive(Debug, Clone)]
pub struct ModelParts {
    /// The network and its input and output sizes.
    pub model: ModelDefinition,
    /// The inputs and outputs it serves.
    pub signature: Signature,
    /// See [`NewVersion::reference_profile`].
    pub reference_profile: Option<Vec<u8>>,
    /// See [`NewVersion::torchscript`].
    pub torchscript: Option<Vec<u8>>,
    /// See [`NewVersion::tokenizer`].
    pub tokenizer: Option<Vec<u8>>,
}

/// Who made a checkpoint's weights, for a version's [`Lineage`].
#[derive(Debug, Clone)]
pub struct TrainedBy<'a> {
    /// The job.
    pub job: String,
    /// The job spec the weights were trained with (overrides included), as
    /// JSON; the lineage records its [`spec_hash`].
    pub spec_json: &'a str,
    /// The code that trained them (`kiln 0.1.0`).
    pub code_version: String,
}

impl NewVersion {
    /// The version of the committed checkpoint `manifest` under the root
    /// `root` whose model weights have the digest `digest`: the checkpoint
    /// reference and the lineage (the spec's hash, the manifest's dataset
    /// fingerprint) are filled in here. Both ways a model is registered build
    /// their version with it: a finished job's (`kiln run`, `kiln agent`) and
    /// `kiln registry register`'s.
    pub fn from_checkpoint(
        root: &str,
        manifest: &crate::Manifest,
        digest: String,
        trained_by: TrainedBy<'_>,
        metrics: BTreeMap<String, f64>,
        parts: ModelParts,
    ) -> NewVersion {
        NewVersion {
            checkpoint: CheckpointRef {
                root: root.to_string(),
                step: manifest.step,
                digest,
            },
            model: parts.model,
            signature: parts.signature,
            metrics,
            lineage: Lineage {
                job: trained_by.job,
                spec_hash: spec_hash(trained_by.spec_json),
                dataset_fingerprint: manifest.dataset_fingerprint.clone(),
                code_version: trained_by.code_version,
            },
            reference_profile: parts.reference_profile,
            torchscript: parts.torchscript,
            tokenizer: parts.tokenizer,
        }
    }
}

/// Where a version's weights are: a committed checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRef {
    /// The checkpoint root URL.
    pub root: String,
    /// The checkpoint's step.
    pub step: u64,
    /// The weights digest ([`crate::weights_digest`] of the model's parameters,
    /// sha256 hex), so a loader can check it got the right weights.
    pub digest: String,
}

/// How to build the network the weights belong to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelDefinition {
    /// The job spec's `[model]` section.
    pub spec: ModelSpec,
    /// Input features per sample; for a language model, its context length
    /// (most tokens it sees, `seq_len`).
    pub features: usize,
    /// Output classes (logits per sample); for a language model, its
    /// vocabulary size (logits per position).
    pub classes: usize,
    /// What the network does with its input; records written before language
    /// models existed have none and are classifiers.
    #[serde(default)]
    pub task: ModelTask,
}

/// What a registered network computes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelTask {
    /// Flat features `[n, features]` to logits `[n, classes]`.
    #[default]
    Classifier,
    /// Token ids `[n, t]` (t <= `features`, the context) to next-token logits
    /// over `classes` ids.
    LanguageModel,
}

impl ModelDefinition {
    /// A classifier of `features` inputs and `classes` outputs.
    pub fn classifier(spec: ModelSpec, features: usize, classes: usize) -> ModelDefinition {
        ModelDefinition {
            spec,
            features,
            classes,
            task: ModelTask::Classifier,
        }
    }

    /// A language model with a context of `context` tokens over `vocab` ids.
    /// The spec's `seq_len` is set to the context, so that the definition
    /// builds the same network without the job's data section.
    pub fn language_model(mut spec: ModelSpec, context: usize, vocab: usize) -> ModelDefinition {
        spec.seq_len = Some(context);
        ModelDefinition {
            spec,
            features: context,
            classes: vocab,
            task: ModelTask::LanguageModel,
        }
    }

    /// Whether this is a language model.
    pub fn is_language_model(&self) -> bool {
        self.task == ModelTask::LanguageModel
    }
}

/// The model's inputs and outputs, as the inference protocol describes them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// The tensors a request carries.
    pub inputs: Vec<TensorSignature>,
    /// The tensors a response carries.
    pub outputs: Vec<TensorSignature>,
}

/// One named tensor of a signature.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorSignature {
    /// The name a request or response uses for it (`input`, `logits`).
    pub name: String,
    /// Open Inference Protocol datatype: `"FP32"`, `"INT64"`, ...
    pub datatype: String,
    /// Dimensions; `-1` means any size (the batch).
    pub shape: Vec<i64>,
}

/// Where a version came from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Lineage {
    /// The job that trained the weights.
    pub job: String,
    /// [`spec_hash`] of the job spec the weights were trained with.
    pub spec_hash: String,
    /// The checkpoint's [`CheckpointMeta::dataset_fingerprint`](crate::CheckpointMeta::dataset_fingerprint).
    pub dataset_fingerprint: String,
    /// The code that trained them (`kiln 0.1.0`).
    pub code_version: String,
}

/// A registered, immutable model version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelVersion {
    /// The model's name.
    pub name: String,
    /// 1, 2, ...: assigned by the registry at registration, never reused.
    pub version: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The actor that registered it (a user name, `unknown`).
    pub created_by: String,
    /// See [`NewVersion::checkpoint`].
    pub checkpoint: CheckpointRef,
    /// See [`NewVersion::model`].
    pub model: ModelDefinition,
    /// See [`NewVersion::signature`].
    pub signature: Signature,
    /// See [`NewVersion::metrics`].
    pub metrics: BTreeMap<String, f64>,
    /// See [`NewVersion::lineage`].
    pub lineage: Lineage,
    /// Whether a reference data profile is stored with the version.
    pub has_reference_profile: bool,
    /// Whether a TorchScript module is stored with the version.
    pub has_torchscript: bool,
    /// Whether a tokenizer is stored with the version (language models).
    #[serde(default)]
    pub has_tokenizer: bool,
}

/// A movable name for weighted versions of one model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Alias {
    /// The model whose versions it names.
    pub model: String,
    /// The alias's name (`production`).
    pub alias: String,
    /// Weights sum to 100.
    pub targets: Vec<AliasTarget>,
    /// The targets before the last move (what a rollback restores).
    pub previous: Option<Vec<AliasTarget>>,
    /// 1 when created, one more with every move: what compare-and-swap compares.
    pub generation: u64,
    /// RFC 3339, UTC, of the last move.
    pub updated_at: String,
    /// The actor of the last move.
    pub updated_by: String,
}

/// One version of an alias and its share of traffic (percent).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct AliasTarget {
    /// A version of the alias's model.
    pub version: u64,
    /// Percent of requests, 1 to 100.
    pub weight: u32,
}

/// One entry of a model's audit log.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AuditEntry {
    /// 1, 2, ...: the entry's place in the log.
    pub seq: u64,
    /// RFC 3339, UTC.
    pub at: String,
    /// Who made the change (a user name, `unknown`).
    pub actor: String,
    /// `"register"`, `"alias"` or `"delete"`.
    pub action: String,
    /// The model changed.
    pub model: String,
    /// The alias moved (`"alias"` entries).
    pub alias: Option<String>,
    /// The alias's targets before the move (`null` when it was created).
    pub from: Option<serde_json::Value>,
    /// The alias's new targets, the registered version's number, checkpoint
    /// and metrics, or the deleted version's number and checkpoint.
    pub to: serde_json::Value,
}

/// Which version(s) of a model: `NAME` (the latest), `NAME:3`, `NAME@production`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// The model's name.
    pub name: String,
    /// Which of its versions.
    pub pick: Pick,
}

/// The part of a [`Selector`] after the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pick {
    /// `NAME`: the highest-numbered version.
    Latest,
    /// `NAME:3`: that version.
    Version(u64),
    /// `NAME@production`: the versions the alias points at, with their weights.
    Alias(String),
}

/// sha256 hex of a job spec's JSON (`JobSpec::to_json`): the lineage's spec hash.
pub fn spec_hash(spec_json: &str) -> String {
    hex::encode(Sha256::digest(spec_json.as_bytes()))
}

impl Signature {
    /// The signature of kiln's classifiers: an `FP32` `input` of
    /// `[-1, features]` and `FP32` `logits` of `[-1, classes]`.
    pub fn classifier(features: usize, classes: usize) -> Signature {
        Signature {
            inputs: vec![TensorSignature {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![-1, features as i64],
            }],
            outputs: vec![TensorSignature {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![-1, classes as i64],
            }],
        }
    }

    /// The signature of kiln's language models: `INT64` `input_ids` of
    /// `[-1, -1]` (a batch of sequences of up to the context's length) and
    /// `FP32` `logits` of `[-1, vocab]`: the next token's logits, after each
    /// sequence's last position.
    pub fn language_model(vocab: usize) -> Signature {
        Signature {
            inputs: vec![TensorSignature {
                name: "input_ids".into(),
                datatype: "INT64".into(),
                shape: vec![-1, -1],
            }],
            outputs: vec![TensorSignature {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![-1, vocab as i64],
            }],
        }
    }
}

impl Alias {
    /// The target with the largest weight (the first of equals): the version
    /// a canary is split against.
    pub fn primary(&self) -> Option<AliasTarget> {
        primary(&self.targets)
    }
}

pub(super) fn primary(targets: &[AliasTarget]) -> Option<AliasTarget> {
    targets
        .iter()
        .copied()
        .reduce(|best, t| if t.weight > best.weight { t } else { best })
}

// ----- selectors -----

impl FromStr for Selector {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::invalid(
                "empty model selector: expected NAME, NAME:VERSION or NAME@ALIAS",
            ));
        }
        if s.contains('@') && s.contains(':') {
            return Err(Error::invalid(format!(
                "model selector {s:?} names both a version and an alias: use NAME:VERSION or NAME@ALIAS"
            )));
        }
        let (name, pick) =
            if let Some((name, alias)) = s.split_once('@') {
                validate_segment("alias", alias)
                    .map_err(|e| Error::invalid(format!("model selector {s:?}: {}", reason(e))))?;
                (name, Pick::Alias(alias.to_string()))
            } else if let Some((name, version)) = s.split_once(':') {
                let v = version.parse::<u64>().ok().filter(|&v| v >= 1).ok_or_else(|| {
                Error::invalid(format!(
                    "model selector {s:?}: version {version:?} must be a whole number from 1"
                ))
            })?;
                (name, Pick::Version(v))
            } else {
                (s, Pick::Latest)
            };
        validate_segment("model name", name)
            .map_err(|e| Error::invalid(format!("model selector {s:?}: {}", reason(e))))?;
        Ok(Selector {
            name: name.to_string(),
            pick,
        })
    }
}

pub(super) fn reason(e: Error) -> String {
    match e {
        Error::Invalid { reason } => reason,
        other => other.to_string(),
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pick {
            Pick::Latest => write!(f, "{}", self.name),
            Pick::Version(v) => write!(f, "{}:{v}", self.name),
            Pick::Alias(a) => write!(f, "{}@{a}", self.name),
        }
    }
}

//! Registering a model version: a finished job's model (`[register]` in the
//! job spec, by `kiln run` and `kiln agent`: [`register_final_model`]) and a
//! checkpoint registered by hand (`kiln registry register`) build their
//! version the same way: [`model_parts`] (the model definition, its
//! signature, the TorchScript module, a language model's tokenizer and token
//! profile) and `NewVersion::from_checkpoint` (the checkpoint and the
//! lineage). The registry's location and the alias's promotion gate are the
//! spec's (`RegisterSpec::registry_location`, `RegisterSpec::passes_gate`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use kiln_checkpoint::CheckpointRoot;
use kiln_checkpoint::registry::{
    ModelDefinition, ModelParts, NewVersion, Registry, Signature, TrainedBy,
};
use kiln_hooks::{Event, Hooks, event};
use kiln_proto::spec::{JobSpec, ModelKind};
use kiln_proto::worker::Finished;

/// The registry of the job `spec` whose checkpoints are under
/// `checkpoint_root`, when the spec registers its model.
pub fn registry_location(spec: &JobSpec, checkpoint_root: &str) -> Option<String> {
    spec.register
        .as_ref()
        .map(|r| r.registry_location(checkpoint_root))
}

/// What a language model (`model.kind = "gpt"`) registers: its definition
/// (context and vocabulary), its token signature and its tokenizer, the
/// `tokenizer.json` beside the spec's first training file when there is one
/// (where `kiln data prepare` writes it).
pub struct LanguageModelParts {
    /// The gpt with its context and vocabulary.
    pub model: ModelDefinition,
    /// Token ids in, logits out.
    pub signature: Signature,
    /// `tokenizer.json` beside the first training file, when there is one.
    pub tokenizer: Option<Vec<u8>>,
}

/// The [`LanguageModelParts`] of `spec`, a gpt job.
pub fn language_model_parts(spec: &JobSpec) -> anyhow::Result<LanguageModelParts> {
    let m = &spec.model;
    if m.kind != ModelKind::Gpt {
        bail!("model.kind must be gpt for a language model");
    }
    let vocab = m.vocab.context("model.vocab: required for a gpt")?;
    let context = m
        .seq_len
        .or(spec.data.seq_len)
        .context("model.seq_len (or data.seq_len): required for a gpt")?;
    let path = spec
        .data
        .train
        .first()
        .and_then(|p| p.parent())
        .map(|dir| dir.join(kiln_text::TOKENIZER_FILE))
        .filter(|p| p.is_file());
    let tokenizer = match &path {
        None => None,
        Some(path) => Some(read_tokenizer(path, vocab)?),
    };
    Ok(LanguageModelParts {
        model: ModelDefinition::language_model(m.clone(), context, vocab),
        signature: Signature::language_model(vocab),
        tokenizer,
    })
}

/// The name of a language model's drift column: one token of a prompt a row.
pub const TOKEN_COLUMN: &str = "token";

/// A language model's reference profile for drift detection: the token
/// distribution of its held-out data (else its training data), as one
/// categorical column ([`TOKEN_COLUMN`]) of at most `rows` tokens drawn with
/// the profile's seeded selection. The server compares the tokens of served
/// prompts with it. `None` when the spec names no token file.
pub fn token_reference_profile(spec: &JobSpec, rows: usize) -> anyhow::Result<Option<Vec<u8>>> {
    use kiln_checkpoint::profile::{
        ColumnKind, ColumnSpec, ProfileOptions, ReferenceProfile, Task, sample_rows,
    };
    let Some(path) = spec.data.eval.first().or(spec.data.train.first()) else {
        return Ok(None);
    };
    let dtype = match spec.data.token_dtype {
        kiln_proto::spec::TokenDtype::Uint16 => kiln_text::TokenDtype::U16,
        kiln_proto::spec::TokenDtype::Uint32 => kiln_text::TokenDtype::U32,
    };
    let file = kiln_text::TokenFile::open(path, dtype)
        .with_context(|| format!("open token file {}", path.display()))?;
    if file.is_empty() || rows == 0 {
        return Ok(None);
    }
    let seed = spec.job.seed;
    let tokens: Vec<f64> = sample_rows(file.len(), rows, seed)
        .into_iter()
        .map(|i| f64::from(file.get(i)))
        .collect();
    let options = ProfileOptions {
        max_rows: rows,
        seed,
    };
    let profile = ReferenceProfile::from_columns(
        vec![ColumnSpec::feature(TOKEN_COLUMN).with_kind(ColumnKind::Categorical)],
        vec![tokens],
        Task::Unspecified,
        &options,
    )
    .context("build the token reference profile")?;
    Ok(Some(profile.to_json_bytes()))
}

/// The bytes of the tokenizer file `path`, checked to load and to make only
/// ids below the model's vocabulary `vocab`.
pub fn read_tokenizer(path: &Path, vocab: usize) -> anyhow::Result<Vec<u8>> {
    let tokenizer = kiln_text::Tokenizer::from_file(path)
        .with_context(|| format!("load the tokenizer {}", path.display()))?;
    if tokenizer.vocab_size() > vocab {
        bail!(
            "the tokenizer {} makes {} ids but the model's vocabulary is {vocab}: the model could not take every prompt",
            path.display(),
            tokenizer.vocab_size()
        );
    }
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// What the model of `spec` registers besides its weights: for a language
/// model (`model.kind = "gpt"`) its [`LanguageModelParts`], the tokenizer
/// `tokenizer` when given (else the one beside the training data) and, unless
/// `reference_profile` is given, the token profile of its data
/// (`reference_rows` tokens); for a classifier the definition for
/// `classifier`'s (features, classes) and `reference_profile`. A TorchScript
/// model carries its module (`model.path`).
pub fn model_parts(
    spec: &JobSpec,
    classifier: Option<(usize, usize)>,
    tokenizer: Option<&Path>,
    reference_profile: Option<Vec<u8>>,
    reference_rows: usize,
) -> anyhow::Result<ModelParts> {
    let (model, signature, tokenizer) = if spec.model.kind == ModelKind::Gpt {
        let parts = language_model_parts(spec)?;
        let tokenizer = match tokenizer {
            Some(path) => Some(read_tokenizer(path, parts.model.classes)?),
            None => parts.tokenizer,
        };
        (parts.model, parts.signature, tokenizer)
    } else {
        let (features, classes) =
            classifier.context("a classifier's features and classes are not known")?;
        if tokenizer.is_some() {
            bail!("--tokenizer: only a language model (model.kind = \"gpt\") carries a tokenizer");
        }
        (
            ModelDefinition::classifier(spec.model.clone(), features, classes),
            Signature::classifier(features, classes),
            None,
        )
    };
    let torchscript = match spec.model.kind {
        ModelKind::Torchscript => {
            let path = spec
                .model
                .path
                .as_ref()
                .context("model.path: required for a torchscript model")?;
            Some(std::fs::read(path).with_context(|| {
                format!("read TorchScript module {} (model.path)", path.display())
            })?)
        }
        _ => None,
    };
    let reference_profile = match reference_profile {
        Some(profile) => Some(profile),
        // A language model's profile is the token distribution of its data.
        None if spec.model.kind == ModelKind::Gpt => token_reference_profile(spec, reference_rows)?,
        None => None,
    };
    Ok(ModelParts {
        model,
        signature,
        reference_profile,
        torchscript,
        tokenizer,
    })
}

/// Registers rank 0's final model; returns `NAME:VERSION`, or `None` (with a
/// warning) when the run has no checkpoint to register.
pub async fn register_final_model(
    spec: &JobSpec,
    job: &str,
    checkpoint_root: &str,
    rank0: &Finished,
    hooks: &Hooks,
) -> anyhow::Result<Option<String>> {
    let register = spec
        .register
        .as_ref()
        .context("the spec has no [register] section")?;
    let name = register
        .name
        .clone()
        .unwrap_or_else(|| spec.job.name.clone());
    if rank0.checkpoint_url.is_empty() {
        tracing::warn!(
            job,
            "not registered: the run has no checkpoint to register (set checkpoint.final_checkpoint = true)"
        );
        return Ok(None);
    }
    let root = CheckpointRoot::open(checkpoint_root)
        .with_context(|| format!("open checkpoint root {checkpoint_root}"))?;
    let manifest = kiln_checkpoint::resolve(&root, &rank0.checkpoint_url)
        .with_context(|| format!("read the final checkpoint {}", rank0.checkpoint_url))?;
    let eval: BTreeMap<String, f64> = rank0
        .eval
        .iter()
        .map(|(k, v)| (format!("eval_{k}"), *v))
        .chain([("final_loss".to_string(), rank0.final_loss)])
        .collect();
    let reference_profile =
        if spec.model.kind == ModelKind::Gpt || rank0.reference_profile_path.is_empty() {
            None
        } else {
            Some(
                std::fs::read(&rank0.reference_profile_path)
                    .with_context(|| format!("read {}", rank0.reference_profile_path))?,
            )
        };
    let classifier = Some((rank0.features as usize, rank0.classes as usize));
    let parts = model_parts(
        spec,
        classifier,
        None,
        reference_profile,
        register.reference_rows,
    )?;
    if spec.model.kind == ModelKind::Gpt && parts.tokenizer.is_none() {
        tracing::warn!(
            job,
            "registering a language model without a tokenizer (no tokenizer.json beside the first training file): kiln serve answers infer on token ids but not generate"
        );
    }
    let spec_json = spec.to_json();
    let new = NewVersion::from_checkpoint(
        checkpoint_root,
        &manifest,
        rank0.weights_digest.clone(),
        TrainedBy {
            job: job.to_string(),
            spec_json: &spec_json,
            code_version: concat!("kiln ", env!("CARGO_PKG_VERSION")).to_string(),
        },
        eval.clone(),
        parts,
    );
    let registry_url = register.registry_location(checkpoint_root);
    let registry = Registry::open(&registry_url)
        .await
        .with_context(|| format!("open the registry {registry_url}"))?;
    let actor = format!("job {job}");
    let version = registry
        .register(&name, new, &actor)
        .await
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("register model {name} in {registry_url}"))?;
    hooks.emit(Event::of(
        job,
        &event::ModelRegistered {
            model: name.clone(),
            version: version.version,
            checkpoint: rank0.checkpoint_url.clone(),
            job: Some(job.to_string()),
            metrics: eval.clone(),
        },
    ));
    if let Some(alias) = &register.alias {
        if register.passes_gate(&eval) {
            let before = registry.alias(&name, alias).await.ok().flatten();
            registry
                .promote(&name, alias, version.version, None, &actor)
                .await
                .map_err(|e| anyhow!(e))
                .with_context(|| format!("move alias {alias} of {name}"))?;
            hooks.emit(Event::of(
                job,
                &event::AliasMoved {
                    model: name.clone(),
                    alias: alias.clone(),
                    from_version: before.and_then(|a| a.primary()).map(|t| t.version),
                    to_version: version.version,
                },
            ));
        } else {
            tracing::warn!(
                model = name,
                alias,
                "the gate metric {:?} did not reach {:?}: alias not moved",
                register.metric,
                register.threshold
            );
        }
    }
    Ok(Some(format!("{name}:{}", version.version)))
}

//! Registering a finished job's model (`[register]` in the job spec): the
//! final checkpoint, the model definition, its signature, eval metrics,
//! lineage and the reference profile (classifiers) or the tokenizer (language
//! models) go into the registry as a new version; the alias moves when the
//! gate metric passes.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow, bail};
use kiln_checkpoint::CheckpointRoot;
use kiln_checkpoint::registry::{
    CheckpointRef, Lineage, ModelDefinition, NewVersion, Registry, Signature, spec_hash,
};
use kiln_hooks::{Event, Hooks, event};
use kiln_proto::spec::{JobSpec, ModelKind};
use kiln_proto::worker::Finished;

/// Where the registry of a job lives: `register.registry`, else a `registry`
/// folder beside the job's checkpoint folder.
pub fn registry_url(spec: &JobSpec, checkpoint_root: &str) -> String {
    if let Some(url) = spec.register.as_ref().and_then(|r| r.registry.clone()) {
        return url;
    }
    let trimmed = checkpoint_root.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((parent, _)) if !parent.ends_with(':') && !parent.ends_with("//") => {
            format!("{parent}/registry")
        }
        _ => format!("{trimmed}/registry"),
    }
}

/// What a language model (`model.kind = "gpt"`) registers: its definition
/// (context and vocabulary), its token signature and its tokenizer, the
/// `tokenizer.json` beside the spec's first training file when there is one
/// (where `kiln data prepare` writes it).
pub struct LanguageModelParts {
    pub model: ModelDefinition,
    pub signature: Signature,
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
pub fn read_tokenizer(path: &std::path::Path, vocab: usize) -> anyhow::Result<Vec<u8>> {
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

/// The value of the eval metric `name` (`eval_accuracy` or `accuracy`).
fn metric(eval: &BTreeMap<String, f64>, name: &str) -> Option<f64> {
    eval.get(name)
        .or_else(|| eval.get(name.strip_prefix("eval_").unwrap_or(name)))
        .copied()
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
    let reference_profile = if spec.model.kind == ModelKind::Gpt {
        token_reference_profile(spec, register.reference_rows)?
    } else if rank0.reference_profile_path.is_empty() {
        None
    } else {
        Some(
            std::fs::read(&rank0.reference_profile_path)
                .with_context(|| format!("read {}", rank0.reference_profile_path))?,
        )
    };
    let torchscript = match (&spec.model.kind, &spec.model.path) {
        (ModelKind::Torchscript, Some(path)) => Some(
            std::fs::read(path)
                .with_context(|| format!("read the TorchScript module {}", path.display()))?,
        ),
        _ => None,
    };
    let spec_json = spec.to_json();
    let (model, signature, tokenizer) = if spec.model.kind == ModelKind::Gpt {
        let parts = language_model_parts(spec)?;
        if parts.tokenizer.is_none() {
            tracing::warn!(
                job,
                "registering a language model without a tokenizer (no tokenizer.json beside the first training file): kiln serve answers infer on token ids but not generate"
            );
        }
        (parts.model, parts.signature, parts.tokenizer)
    } else {
        let (features, classes) = (rank0.features as usize, rank0.classes as usize);
        (
            ModelDefinition::classifier(spec.model.clone(), features, classes),
            Signature::classifier(features, classes),
            None,
        )
    };
    let new = NewVersion {
        checkpoint: CheckpointRef {
            root: checkpoint_root.to_string(),
            step: manifest.step,
            digest: rank0.weights_digest.clone(),
        },
        model,
        signature,
        metrics: eval.clone(),
        lineage: Lineage {
            job: job.to_string(),
            spec_hash: spec_hash(&spec_json),
            dataset_fingerprint: manifest.dataset_fingerprint.clone(),
            code_version: concat!("kiln ", env!("CARGO_PKG_VERSION")).to_string(),
        },
        reference_profile,
        torchscript,
        tokenizer,
    };
    let registry_url = registry_url(spec, checkpoint_root);
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
        let passes = match (&register.metric, register.threshold) {
            (Some(m), Some(threshold)) => metric(&eval, m).is_some_and(|v| v >= threshold),
            (Some(m), None) => metric(&eval, m).is_some(),
            _ => true,
        };
        if passes {
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

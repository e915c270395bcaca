//! `kiln registry`: the model registry (`kiln_checkpoint::registry`) from the
//! command line: list, show, register a checkpoint by hand, promote, roll
//! back, delete a version, and read the audit log. Human tables by default, `--json` for scripts.
//!
//! The registry is named by `--registry URL` or `KILN_REGISTRY`; changes are
//! recorded under `--actor` (default `$USER`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Subcommand;
use kiln_checkpoint::registry::{
    Alias, AliasTarget, AuditEntry, ModelVersion, NewVersion, Pick, Registry, Selector, TrainedBy,
};
use kiln_checkpoint::{CheckpointRoot, Manifest, OwnedTensor, TensorView};
use kiln_proto::spec::{DataKind, JobSpec, ModelKind, ModelSpec};

use crate::output::or_dash;

/// Arguments of `kiln registry`.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Registry location: file:///path (or a folder), s3://bucket/prefix,
    /// gs://..., az://...; default: $KILN_REGISTRY.
    #[arg(long, global = true, value_name = "URL")]
    pub registry: Option<String>,
    /// Who makes the change, as the audit log records it; default: $USER.
    #[arg(long, global = true)]
    pub actor: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: RegistryCommand,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// List the models, or the versions of one model with their aliases.
    Ls { name: Option<String> },
    /// Show a version: NAME (the latest), NAME:VERSION or NAME@ALIAS.
    Show { selector: String },
    /// Register a committed checkpoint as the next version of NAME.
    Register {
        name: String,
        /// Checkpoint root URL, or a manifest URL as `kiln run` prints it.
        #[arg(long, value_name = "ROOT_URL")]
        checkpoint: String,
        /// Which checkpoint under the root: `latest` or a step.
        #[arg(long, default_value = "latest", value_name = "latest|STEP")]
        step: String,
        /// The job spec whose `[model]` section the weights belong to;
        /// default: the spec recorded in the checkpoint.
        #[arg(long, value_name = "JOB.toml")]
        spec: Option<PathBuf>,
        /// A metric to record (repeatable); adds to, or overrides, the
        /// checkpoint's own metrics.
        #[arg(long = "metric", value_name = "KEY=VALUE")]
        metrics: Vec<String>,
        /// Input features per sample; default: read from the weights, else
        /// from the spec's data.
        #[arg(long)]
        features: Option<usize>,
        /// Output classes; default: read from the weights, else from the spec's data.
        #[arg(long)]
        classes: Option<usize>,
        /// A reference data profile (JSON) for drift detection; default for
        /// a gpt: the token distribution of the spec's held-out (else
        /// training) token file.
        #[arg(long, value_name = "FILE")]
        reference_profile: Option<PathBuf>,
        /// A language model's tokenizer (tokenizer.json); default: the one
        /// beside the spec's first training file, if there is one.
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
    },
    /// Point an alias at a version; with --weight below 100, as a canary
    /// beside the alias's current primary version.
    Promote {
        name: String,
        version: u64,
        #[arg(long)]
        alias: String,
        /// Percent of the traffic for VERSION (1-100; default 100).
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Move an alias back to the targets it had before its last move.
    Rollback {
        name: String,
        #[arg(long)]
        alias: String,
    },
    /// The audit log of a model: registrations, deletions and alias moves,
    /// oldest first.
    History { name: String },
    /// Delete a version (NAME:VERSION) and release the pin that keeps its
    /// checkpoint from retention; refused while an alias points at it. Its
    /// number is never reused.
    Delete { selector: String },
}

/// Runs a `kiln registry` command.
pub async fn run(args: RegistryArgs) -> Result<ExitCode> {
    let url = registry_url(args.registry)?;
    let registry = Registry::open(&url)
        .await
        .with_context(|| format!("open registry {url}"))?;
    let actor = args
        .actor
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|| "unknown".to_string());
    let json = args.json;
    match args.command {
        RegistryCommand::Ls { name: None } => list_models(&registry, json).await?,
        RegistryCommand::Ls { name: Some(name) } => list_versions(&registry, &name, json).await?,
        RegistryCommand::Show { selector } => show(&registry, &selector, json).await?,
        RegistryCommand::Register {
            name,
            checkpoint,
            step,
            spec,
            metrics,
            features,
            classes,
            reference_profile,
            tokenizer,
        } => {
            let new = new_version(&Registration {
                checkpoint,
                step,
                spec,
                metrics,
                features,
                classes,
                reference_profile,
                tokenizer,
            })
            .await?;
            let v = registry
                .register(&name, new, &actor)
                .await
                .with_context(|| format!("register {name} in {url}"))?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "registered {}:{} (checkpoint {} step {}, weights sha256 {})",
                    v.name, v.version, v.checkpoint.root, v.checkpoint.step, v.checkpoint.digest
                );
            }
        }
        RegistryCommand::Promote {
            name,
            version,
            alias,
            weight,
        } => {
            let a = registry
                .promote(&name, &alias, version, weight, &actor)
                .await
                .with_context(|| format!("promote {name}:{version} to {alias}"))?;
            print_alias_move(&a, json)?;
        }
        RegistryCommand::Rollback { name, alias } => {
            let a = registry
                .rollback(&name, &alias, &actor)
                .await
                .with_context(|| format!("roll back alias {alias} of {name}"))?;
            print_alias_move(&a, json)?;
        }
        RegistryCommand::Delete { selector } => {
            let selector: Selector = selector.parse().context("read the model selector")?;
            let Pick::Version(version) = selector.pick else {
                bail!(
                    "delete takes NAME:VERSION (one version), not {selector}: list the versions with `kiln registry ls {}`",
                    selector.name
                );
            };
            let name = selector.name;
            let deleted = registry
                .delete_version(&name, version, &actor)
                .await
                .with_context(|| format!("delete {name}:{version} from {url}"))?;
            if json {
                println!("{}", serde_json::to_string(&deleted)?);
            } else {
                println!(
                    "deleted {name}:{version} (by {} at {}); the pin of its checkpoint (step {} under {}) is released: `kiln ckpt gc` may now delete that checkpoint",
                    deleted.deleted_by,
                    deleted.deleted_at,
                    deleted.checkpoint.step,
                    deleted.checkpoint.root
                );
            }
        }
        RegistryCommand::History { name } => {
            let entries = registry
                .history(&name)
                .await
                .with_context(|| format!("read the history of {name}"))?;
            print_history(&name, &entries, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn registry_url(flag: Option<String>) -> Result<String> {
    if let Some(url) = flag {
        return Ok(url);
    }
    match std::env::var("KILN_REGISTRY") {
        Ok(url) if !url.trim().is_empty() => Ok(url),
        _ => bail!(
            "no registry given: pass --registry URL (file:///path, s3://bucket/prefix, ...) or set KILN_REGISTRY=URL"
        ),
    }
}

// ----- listing and showing -----

async fn list_models(registry: &Registry, json: bool) -> Result<()> {
    let names = registry.models().await.context("list models")?;
    let mut rows = Vec::with_capacity(names.len());
    for name in &names {
        let versions = registry
            .versions(name)
            .await
            .with_context(|| format!("list versions of {name}"))?;
        let aliases = registry
            .aliases(name)
            .await
            .with_context(|| format!("list aliases of {name}"))?;
        rows.push((name, versions, aliases));
    }
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, versions, aliases)| {
                serde_json::json!({
                    "name": name,
                    "versions": versions.len(),
                    "latest": versions.last(),
                    "aliases": aliases,
                })
            })
            .collect();
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("(no models in {})", registry.url());
        return Ok(());
    }
    println!(
        "{:<24}  {:>8}  {:>6}  {:<24}  aliases",
        "model", "versions", "latest", "created"
    );
    for (name, versions, aliases) in &rows {
        let latest = versions.last();
        let shown: Vec<String> = aliases
            .iter()
            .map(|a| format!("{}->{}", a.alias, targets(&a.targets)))
            .collect();
        println!(
            "{:<24}  {:>8}  {:>6}  {:<24}  {}",
            name,
            versions.len(),
            latest.map_or("-".to_string(), |v| v.version.to_string()),
            latest.map_or("-", |v| v.created_at.as_str()),
            shown.join("  ")
        );
    }
    Ok(())
}

async fn list_versions(registry: &Registry, name: &str, json: bool) -> Result<()> {
    let versions = registry
        .versions(name)
        .await
        .with_context(|| format!("list versions of {name}"))?;
    let aliases = registry
        .aliases(name)
        .await
        .with_context(|| format!("list aliases of {name}"))?;
    if json {
        let out = serde_json::json!({ "name": name, "versions": versions, "aliases": aliases });
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if versions.is_empty() {
        println!("(model {name} has no versions in {})", registry.url());
        return Ok(());
    }
    println!(
        "{:>7}  {:<24}  {:<12}  {:>8}  {:<30}  aliases",
        "version", "created", "by", "step", "metrics"
    );
    for v in &versions {
        let pointing: Vec<String> = aliases
            .iter()
            .filter_map(|a| {
                let t = a.targets.iter().find(|t| t.version == v.version)?;
                Some(if t.weight == 100 {
                    a.alias.clone()
                } else {
                    format!("{} ({}%)", a.alias, t.weight)
                })
            })
            .collect();
        println!(
            "{:>7}  {:<24}  {:<12}  {:>8}  {:<30}  {}",
            v.version,
            v.created_at,
            v.created_by,
            v.checkpoint.step,
            metrics(&v.metrics),
            pointing.join(", ")
        );
    }
    Ok(())
}

async fn show(registry: &Registry, selector: &str, json: bool) -> Result<()> {
    let selector: Selector = selector.parse().context("read the model selector")?;
    let alias = match &selector.pick {
        Pick::Alias(a) => registry
            .alias(&selector.name, a)
            .await
            .with_context(|| format!("read {selector}"))?,
        _ => None,
    };
    let resolved = registry
        .resolve(&selector)
        .await
        .with_context(|| format!("find {selector}"))?;
    if json {
        let out = serde_json::json!({
            "selector": selector.to_string(),
            "alias": alias,
            "resolved": resolved
                .iter()
                .map(|(v, w)| serde_json::json!({ "weight": w, "version": v }))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if let Some(a) = &alias {
        println!(
            "alias       {}@{} -> {}  (generation {}, set by {} at {}; previous {})",
            a.model,
            a.alias,
            targets(&a.targets),
            a.generation,
            a.updated_by,
            a.updated_at,
            a.previous.as_deref().map_or("-".to_string(), targets)
        );
    }
    for (i, (v, weight)) in resolved.iter().enumerate() {
        if i > 0 || alias.is_some() {
            println!();
        }
        print_version(v, *weight);
    }
    Ok(())
}

fn print_version(v: &ModelVersion, weight: u32) {
    let share = if weight == 100 {
        String::new()
    } else {
        format!("  ({weight}% of the traffic)")
    };
    println!("version     {}:{}{share}", v.name, v.version);
    println!("created     {} by {}", v.created_at, v.created_by);
    println!(
        "checkpoint  {}  step {}",
        v.checkpoint.root, v.checkpoint.step
    );
    println!("weights     sha256 {}", v.checkpoint.digest);
    if v.model.is_language_model() {
        println!(
            "model       {}  context {}  (language model)",
            describe_model(&v.model.spec),
            v.model.features
        );
    } else {
        println!(
            "model       {}  features {}  classes {}",
            describe_model(&v.model.spec),
            v.model.features,
            v.model.classes
        );
    }
    let side = |ts: &[kiln_checkpoint::registry::TensorSignature]| {
        let parts: Vec<String> = ts
            .iter()
            .map(|t| format!("{} {} {:?}", t.name, t.datatype, t.shape))
            .collect();
        parts.join(", ")
    };
    println!(
        "signature   {} -> {}",
        side(&v.signature.inputs),
        side(&v.signature.outputs)
    );
    println!("metrics     {}", metrics(&v.metrics));
    println!(
        "lineage     job {}  spec sha256 {}  dataset {}  code {}",
        or_dash(&v.lineage.job),
        or_dash(&v.lineage.spec_hash),
        or_dash(&v.lineage.dataset_fingerprint),
        or_dash(&v.lineage.code_version)
    );
    println!(
        "extras      reference profile: {}  torchscript: {}  tokenizer: {}",
        yes_no(v.has_reference_profile),
        yes_no(v.has_torchscript),
        yes_no(v.has_tokenizer)
    );
}

fn describe_model(spec: &ModelSpec) -> String {
    match spec.kind {
        ModelKind::Mlp => format!("mlp hidden {:?}", spec.hidden),
        ModelKind::Cnn => format!(
            "cnn channels {:?} hidden {:?}{}",
            spec.channels,
            spec.hidden,
            spec.input_shape
                .as_ref()
                .map_or(String::new(), |s| format!(" input {s:?}"))
        ),
        ModelKind::Torchscript => format!(
            "torchscript {}",
            spec.path
                .as_ref()
                .map_or("-".to_string(), |p| p.display().to_string())
        ),
        ModelKind::Gpt => format!(
            "gpt vocab {} layers {} heads {} width {}",
            spec.vocab.unwrap_or(0),
            spec.n_layer,
            spec.n_head,
            spec.d_model
        ),
    }
}

fn print_alias_move(a: &Alias, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(a)?);
    } else {
        println!(
            "{}@{} -> {}  (generation {}, was {})",
            a.model,
            a.alias,
            targets(&a.targets),
            a.generation,
            a.previous.as_deref().map_or("unset".to_string(), targets)
        );
    }
    Ok(())
}

fn print_history(name: &str, entries: &[AuditEntry], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(entries)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("(no history for model {name})");
        return Ok(());
    }
    println!(
        "{:>4}  {:<24}  {:<12}  {:<8}  {:<10}  {:<20}  to",
        "seq", "at", "actor", "action", "alias", "from"
    );
    for e in entries {
        let show = |v: &serde_json::Value| match e.action.as_str() {
            "alias" => serde_json::from_value::<Vec<AliasTarget>>(v.clone())
                .map_or_else(|_| v.to_string(), |t| targets(&t)),
            "register" | "delete" => {
                match (v["version"].as_u64(), v["checkpoint"]["step"].as_u64()) {
                    (Some(version), Some(step)) => format!("version {version} (step {step})"),
                    _ => v.to_string(),
                }
            }
            _ => v.to_string(),
        };
        println!(
            "{:>4}  {:<24}  {:<12}  {:<8}  {:<10}  {:<20}  {}",
            e.seq,
            e.at,
            e.actor,
            e.action,
            e.alias.as_deref().unwrap_or("-"),
            e.from.as_ref().map_or("-".to_string(), show),
            show(&e.to)
        );
    }
    Ok(())
}

fn targets(ts: &[AliasTarget]) -> String {
    let parts: Vec<String> = ts
        .iter()
        .map(|t| format!("{}:{}%", t.version, t.weight))
        .collect();
    parts.join(",")
}

fn metrics(m: &BTreeMap<String, f64>) -> String {
    if m.is_empty() {
        return "-".to_string();
    }
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
    parts.join(" ")
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

// ----- registering a checkpoint by hand -----

/// What `kiln registry register` was given.
struct Registration {
    checkpoint: String,
    step: String,
    spec: Option<PathBuf>,
    metrics: Vec<String>,
    features: Option<usize>,
    classes: Option<usize>,
    reference_profile: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
}

/// Builds a version from a committed checkpoint: its manifest gives the step,
/// lineage and metrics; its model weights give the digest and, for built-in
/// models, the features and classes; the model is then built from the spec and
/// every parameter checked against the checkpoint, so a registered definition
/// always loads its weights.
async fn new_version(r: &Registration) -> Result<NewVersion> {
    let extra_metrics = parse_metrics(&r.metrics)?;
    let (root_url, which) = match r.checkpoint.rsplit_once("/manifests/") {
        Some((root, name)) if name.ends_with(".json") => {
            (root.to_string(), format!("manifests/{name}"))
        }
        _ => (r.checkpoint.clone(), r.step.clone()),
    };
    let root = CheckpointRoot::open(&root_url)
        .with_context(|| format!("open checkpoint root {root_url}"))?;
    let (manifest, weights) = {
        let root = root.clone();
        let which = which.clone();
        tokio::task::spawn_blocking(move || -> Result<(Manifest, Vec<OwnedTensor>)> {
            let manifest = kiln_checkpoint::resolve(&root, &which)
                .with_context(|| format!("find checkpoint {which} under {}", root.url()))?;
            let weights = kiln_checkpoint::load(&root, &manifest, |n| n.starts_with("model/"))
                .with_context(|| format!("load the model weights of {}", manifest.key))?;
            Ok((manifest, weights))
        })
        .await
        .context("load checkpoint")??
    };
    ensure!(
        !weights.is_empty(),
        "checkpoint {} holds no model weights (tensors named model/...)",
        root.url_of(&manifest.key)
    );
    let weights: Vec<OwnedTensor> = weights
        .into_iter()
        .map(|mut t| {
            t.name = t.name["model/".len()..].to_string();
            t
        })
        .collect();
    let views: Vec<TensorView<'_>> = weights.iter().map(OwnedTensor::view).collect();
    let digest = kiln_checkpoint::weights_digest(&views);

    let recorded = if manifest.job_spec.is_null() {
        None
    } else {
        Some(
            JobSpec::from_json(&manifest.job_spec.to_string())
                .with_context(|| format!("read the job spec recorded in {}", manifest.key))?,
        )
    };
    let spec = match (&r.spec, &recorded) {
        (Some(path), _) => {
            JobSpec::load(path, &[]).with_context(|| format!("load job spec {}", path.display()))?
        }
        (None, Some(spec)) => spec.clone(),
        (None, None) => bail!(
            "checkpoint {} records no job spec: pass --spec JOB.toml",
            root.url_of(&manifest.key)
        ),
    };
    // The spec the weights were trained with (overrides included) is the
    // lineage, whichever spec names the model here.
    let lineage_spec = recorded.as_ref().unwrap_or(&spec);

    let shapes: BTreeMap<String, Vec<usize>> = weights
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let classifier = if spec.model.kind == ModelKind::Gpt {
        ensure!(
            r.features.is_none() && r.classes.is_none(),
            "--features and --classes do not apply to a gpt: its context and vocabulary come from the spec"
        );
        None
    } else {
        ensure!(
            r.tokenizer.is_none(),
            "--tokenizer: only a language model (model.kind = \"gpt\") carries a tokenizer"
        );
        Some(dimensions(&spec, &shapes, r.features, r.classes).await?)
    };
    let reference_profile = match &r.reference_profile {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("read reference profile {}", path.display()))?,
        ),
        None => None,
    };
    let rows = spec.register.as_ref().map_or(1000, |r| r.reference_rows);
    let parts = kiln_node::register::model_parts(
        &spec,
        classifier,
        r.tokenizer.as_deref(),
        reference_profile,
        rows,
    )?;
    let m = &parts.model;
    check_fit(&m.spec, m.features, m.classes, shapes).await?;
    let mut metrics = manifest.metrics.clone();
    metrics.extend(extra_metrics);
    Ok(NewVersion::from_checkpoint(
        root.url(),
        &manifest,
        digest,
        TrainedBy {
            job: manifest.job.clone(),
            spec_json: &lineage_spec.to_json(),
            code_version: manifest.code_version.clone(),
        },
        metrics,
        parts,
    ))
}

fn parse_metrics(args: &[String]) -> Result<BTreeMap<String, f64>> {
    args.iter()
        .map(|a| {
            let parsed = a.split_once('=').and_then(|(k, v)| {
                let v: f64 = v.trim().parse().ok()?;
                (!k.trim().is_empty() && v.is_finite()).then(|| (k.trim().to_string(), v))
            });
            parsed.ok_or_else(|| {
                anyhow!(
                    "--metric {a:?}: expected KEY=VALUE with a finite number, e.g. --metric eval_accuracy=0.93"
                )
            })
        })
        .collect()
}

/// Features and classes: the flags, else what the weights' shapes say (built-in
/// models), else the spec's data (synthetic: its settings; shards: read them).
async fn dimensions(
    spec: &JobSpec,
    shapes: &BTreeMap<String, Vec<usize>>,
    features: Option<usize>,
    classes: Option<usize>,
) -> Result<(usize, usize)> {
    let dim = |name: &str, axis: usize| shapes.get(name).and_then(|s| s.get(axis).copied());
    let m = &spec.model;
    let (from_weights_features, from_weights_classes) = match m.kind {
        ModelKind::Mlp => (
            dim("fc0.weight", 1),
            dim(&format!("fc{}.weight", m.hidden.len()), 0),
        ),
        ModelKind::Cnn => (
            m.input_shape.as_ref().map(|s| s.iter().product()),
            dim("fc1.weight", 0),
        ),
        ModelKind::Torchscript => (None, None),
        // Registered as a language model (see `new_version`).
        ModelKind::Gpt => bail!("a gpt has a context and a vocabulary, not features and classes"),
    };
    let features = features.or(from_weights_features);
    let classes = classes.or(from_weights_classes);
    if let (Some(f), Some(c)) = (features, classes) {
        return Ok((f, c));
    }
    let (data_features, data_classes) = match spec.data.kind {
        DataKind::Synthetic => (spec.data.features, spec.data.classes.unwrap_or(10)),
        DataKind::Tokens => bail!(
            "on token data, only a gpt registers (as a language model); pass --features and --classes for another model"
        ),
        DataKind::Safetensors => {
            let data = spec.data.clone();
            let seed = spec.job.seed;
            let splits =
                tokio::task::spawn_blocking(move || kiln_trainer::data::load(&data, seed, None))
                .await
                .context("read the training data")?
                .context(
                    "read the spec's data to learn the features and classes (or pass --features and --classes)",
                )?;
            (splits.train.features(), splits.classes)
        }
    };
    Ok((
        features.unwrap_or(data_features),
        classes.unwrap_or(data_classes),
    ))
}

/// Builds the model on the CPU and checks that every parameter has a weight of
/// the same shape in the checkpoint, and the checkpoint no weight the model lacks.
async fn check_fit(
    model: &ModelSpec,
    features: usize,
    classes: usize,
    mut shapes: BTreeMap<String, Vec<usize>>,
) -> Result<()> {
    let model = model.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        kiln_models::build(&model, features, classes, &vs).with_context(|| {
            format!("build the model for {features} features and {classes} classes")
        })?;
        let fit = |problem: String| {
            anyhow!(
                "the checkpoint's weights do not fit the model for {features} features and {classes} classes: {problem} (check --spec, --features and --classes)"
            )
        };
        for (name, t) in kiln_models::named_parameters(&vs) {
            let want: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            match shapes.remove(&name) {
                None => return Err(fit(format!("parameter {name} is not in the checkpoint"))),
                Some(have) if have != want => {
                    return Err(fit(format!(
                        "parameter {name} is {want:?} in the model but {have:?} in the checkpoint"
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = shapes.keys().next() {
            return Err(fit(format!(
                "the checkpoint has weight {extra}, which the model does not"
            )));
        }
        Ok(())
    })
    .await
    .context("check the model against the weights")?
}

//! `kiln generate`: text from a trained language model (a job's final
//! weights), on this machine. The model is `kiln_models::gpt`, the tokenizer
//! `kiln_text::Tokenizer`; this is argument parsing, loading and output.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail, ensure};
use kiln_proto::spec::{JobSpec, ModelKind};

/// Arguments of `kiln generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The job spec the model was trained with (its `[model]` and `[data]`).
    pub job: PathBuf,
    /// The trained weights: `weights.safetensors` of a run, or `kiln ckpt export` output.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// The tokenizer (default: `tokenizer.json` beside the spec's first training file).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate (fewer when the context fills).
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override a spec field, e.g. --set model.seq_len=256 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let spec = JobSpec::load(&args.job, &args.overrides)
        .with_context(|| format!("load job spec {}", args.job.display()))?;
    if spec.model.kind != ModelKind::Gpt {
        bail!(
            "{}: model.kind is {:?}; kiln generate runs a gpt",
            args.job.display(),
            spec.model.kind
        );
    }
    let tokenizer_path = match &args.tokenizer {
        Some(path) => path.clone(),
        None => spec
            .data
            .train
            .first()
            .and_then(|p| p.parent())
            .map(|dir| dir.join(kiln_text::TOKENIZER_FILE))
            .context("the spec names no training file; pass --tokenizer")?,
    };
    let tokenizer = kiln_text::Tokenizer::from_file(&tokenizer_path)
        .with_context(|| format!("load tokenizer {}", tokenizer_path.display()))?;
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let io = kiln_models::ModelIo {
        context: spec.data.seq_len,
        ..Default::default()
    };
    let net = kiln_models::build_with(&spec.model, io, kiln_proto::spec::Precision::Fp32, &vs)
        .context("build the model")?;
    vs.load(&args.weights)
        .with_context(|| format!("load weights {}", args.weights.display()))?;
    let kiln_models::Net::Gpt(gpt) = net else {
        bail!("the spec does not build a gpt");
    };
    let prompt: Vec<i64> = tokenizer
        .encode(&args.prompt)
        .context("tokenize the prompt")?
        .into_iter()
        .map(i64::from)
        .collect();
    ensure!(!prompt.is_empty(), "the prompt is empty");
    let tokens = gpt
        .generate(
            &prompt,
            args.max_tokens,
            args.temperature,
            args.top_k,
            args.seed,
            |_| true,
        )
        .context("generate")?;
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let text = tokenizer
        .decode(&ids)
        .context("decode the generated tokens")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}{}", args.prompt, text).context("write the text")?;
    Ok(ExitCode::SUCCESS)
}

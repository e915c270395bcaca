//! `kiln data`: turn text into the token files a language model trains on.
//! The work is `kiln_text::prepare`; this is its argument parsing and output.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use kiln_text::{PrepareOptions, TokenizerChoice};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Tokenize text files into a data folder: train.bin and val.bin (flat
    /// uint16/uint32 token ids), tokenizer.json and meta.json.
    Prepare(PrepareArgs),
}

/// Arguments of `kiln data prepare`.
#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// UTF-8 text files, joined in this order by a blank line.
    #[arg(required = true, value_name = "TEXT")]
    pub inputs: Vec<PathBuf>,
    /// The data folder to write (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// `byte` (one token per byte, the default) or a Hugging Face tokenizer.json
    /// (a file named `byte` is given as `./byte`).
    #[arg(long, value_name = "byte|FILE.json", conflicts_with = "train_bpe")]
    pub tokenizer: Option<String>,
    /// Train a byte-level BPE tokenizer on the inputs with this many ids (> 256).
    #[arg(long, value_name = "VOCAB")]
    pub train_bpe: Option<usize>,
    /// The share of tokens, from the end, held out for validation: in (0, 0.5].
    #[arg(long, default_value_t = kiln_text::DEFAULT_VAL_FRACTION, value_name = "F")]
    pub val_fraction: f64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: DataCommand) -> Result<ExitCode> {
    match cmd {
        DataCommand::Prepare(args) => prepare(args),
    }
}

fn prepare(args: PrepareArgs) -> Result<ExitCode> {
    let tokenizer = match (args.tokenizer.as_deref(), args.train_bpe) {
        (_, Some(vocab)) => TokenizerChoice::TrainBpe(vocab),
        (None | Some("byte"), None) => TokenizerChoice::Byte,
        (Some(file), None) => TokenizerChoice::File(PathBuf::from(file)),
    };
    let opts = PrepareOptions {
        inputs: args.inputs,
        out: args.out,
        tokenizer,
        val_fraction: args.val_fraction,
    };
    let report = kiln_text::prepare(&opts).context("prepare data")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

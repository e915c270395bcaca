//! kiln-text: the data side of language models, without libtorch.
//!
//! Text becomes a *data folder* (`kiln data prepare`, [`prepare`]): token ids
//! in flat files that the trainer memory-maps ([`TokenFile`]), the tokenizer
//! that made them ([`Tokenizer`], also what the server uses to turn prompts
//! into ids and back), and a `meta.json` ([`DataMeta`]) saying how to read
//! them.
//!
//! ```text
//! data/
//!   train.bin       little-endian uint16 (vocabulary <= 65,536) or uint32 ids, no header
//!   val.bin         the held-out tail of the same token stream
//!   tokenizer.json  a Hugging Face tokenizer
//!   meta.json       {"vocab_size", "token_dtype", "train_tokens", "val_tokens",
//!                    "tokenizer": "byte"|"bpe"|"file", "sources", "bytes"}
//! ```
//!
//! The token files have nanoGPT's `train.bin` layout, so
//! `numpy.memmap("train.bin", dtype=numpy.uint16)` reads them too.
//!
//! # Layout
//!
//! - [`tokens`]: token files: [`TokenDtype`], [`TokenFile`] (memory-mapped
//!   reads, vocabulary checks), [`write_tokens`] (atomic writes).
//! - [`tokenizer`]: [`Tokenizer`] over Hugging Face `tokenizers`: one token
//!   per byte, a `tokenizer.json`, or byte-level BPE trained on a corpus.
//! - [`prepare`](mod@prepare): text files to a data folder; [`DataMeta`].
//! - [`error`]: the crate's one [`Error`].
//!
//! # Example
//!
//! ```
//! # fn main() -> Result<(), kiln_text::Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let corpus = dir.path().join("corpus.txt");
//! # std::fs::write(&corpus, "the quick brown fox jumps over the lazy dog\n".repeat(10)).unwrap();
//! use kiln_text::{DataMeta, PrepareOptions, TokenFile, prepare};
//!
//! let data = dir.path().join("data");
//! let report = prepare(&PrepareOptions::new(vec![corpus], data.clone()))?;
//! println!("{report}");
//!
//! let meta = DataMeta::read(&data)?;
//! let train = TokenFile::open(&DataMeta::train_path(&data), meta.token_dtype)?;
//! train.check_vocab(meta.vocab_size)?;
//! let mut window = [0i64; 8];
//! train.read_i64(0, &mut window)?;
//! assert_eq!(window[0], i64::from(b't'));
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod error;
pub mod prepare;
pub mod tokenizer;
pub mod tokens;

pub use error::{Error, Result};
pub use prepare::{
    DEFAULT_VAL_FRACTION, DataMeta, META_FILE, PrepareOptions, PrepareReport, TOKENIZER_FILE,
    TRAIN_FILE, TokenizerChoice, TokenizerKind, VAL_FILE, prepare,
};
pub use tokenizer::Tokenizer;
pub use tokens::{TokenDtype, TokenFile, write_tokens};

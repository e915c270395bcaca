//! `kiln data prepare`: text files to a data folder a language model trains on
//! (`train.bin`, `val.bin`, `tokenizer.json`, `meta.json`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::tokens::{TokenDtype, write_atomically, write_tokens};

/// The training split's token file in a data folder.
pub const TRAIN_FILE: &str = "train.bin";
/// The held-out split's token file.
pub const VAL_FILE: &str = "val.bin";
/// The tokenizer that produced the ids (Hugging Face `tokenizer.json`).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// [`DataMeta`]; written last, so its presence means the folder is complete.
pub const META_FILE: &str = "meta.json";

/// The share of tokens held out when none is given.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;

/// Placed between two input files' texts, so that one file's last line and
/// the next one's first do not read as one sentence.
const DOCUMENT_SEPARATOR: &str = "\n\n";

/// Which tokenizer `prepare` uses.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerChoice {
    /// One token per byte ([`Tokenizer::byte_level`]).
    Byte,
    /// A Hugging Face `tokenizer.json`.
    File(PathBuf),
    /// Byte-level BPE trained on the inputs, with at most this many ids.
    TrainBpe(usize),
}

/// Where a data folder's tokenizer came from, as `meta.json` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per byte.
    Byte,
    /// Byte-level BPE trained on the inputs.
    Bpe,
    /// A `tokenizer.json` the user gave.
    File,
}

impl TokenizerKind {
    /// The name in `meta.json`.
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Byte => "byte",
            TokenizerKind::Bpe => "bpe",
            TokenizerKind::File => "file",
        }
    }
}

/// What `prepare` does.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Text files, concatenated in this order.
    pub inputs: Vec<PathBuf>,
    /// The data folder (created if missing; the four files are replaced).
    pub out: PathBuf,
    /// How the text becomes ids.
    pub tokenizer: TokenizerChoice,
    /// The share of tokens, taken from the end, held out for validation: in (0, 0.5].
    pub val_fraction: f64,
}

impl PrepareOptions {
    /// Byte tokens and [`DEFAULT_VAL_FRACTION`].
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
        PrepareOptions {
            inputs,
            out,
            tokenizer: TokenizerChoice::Byte,
            val_fraction: DEFAULT_VAL_FRACTION,
        }
    }
}

/// A data folder's `meta.json`: what the trainer and the server need to read
/// the token files and size the model's vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataMeta {
    /// Ids are below this (the model's embedding needs at least this many rows).
    pub vocab_size: usize,
    /// The ids' width in the token files (`uint16` for vocabularies up to
    /// 65,536, else `uint32`).
    pub token_dtype: TokenDtype,
    /// Tokens in `train.bin`.
    pub train_tokens: usize,
    /// Tokens in `val.bin`.
    pub val_tokens: usize,
    /// Where `tokenizer.json` came from.
    pub tokenizer: TokenizerKind,
    /// The input files, as given.
    pub sources: Vec<String>,
    /// Total size of the input files in bytes.
    pub bytes: u64,
}

impl DataMeta {
    /// Reads `dir/meta.json`.
    pub fn read(dir: &Path) -> Result<DataMeta> {
        const WHAT: &str = "data meta file";
        let path = dir.join(META_FILE);
        let json =
            std::fs::read(&path).map_err(|e| Error::read(WHAT, "read data meta file", &path, e))?;
        serde_json::from_slice(&json).map_err(|e| Error::invalid(WHAT, &path, e.to_string()))
    }

    /// The training split's token file in the data folder `dir`.
    pub fn train_path(dir: &Path) -> PathBuf {
        dir.join(TRAIN_FILE)
    }

    /// The held-out split's token file in `dir`.
    pub fn val_path(dir: &Path) -> PathBuf {
        dir.join(VAL_FILE)
    }

    /// The tokenizer file in `dir`.
    pub fn tokenizer_path(dir: &Path) -> PathBuf {
        dir.join(TOKENIZER_FILE)
    }
}

/// What `prepare` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareReport {
    /// The training split's token file.
    pub train: PathBuf,
    /// The held-out split's token file.
    pub val: PathBuf,
    /// The tokenizer file.
    pub tokenizer: PathBuf,
    /// The `meta.json` written.
    pub meta_path: PathBuf,
    /// What it says.
    pub meta: DataMeta,
    /// Invalid UTF-8 sequences replaced by U+FFFD, over all inputs.
    pub replaced_sequences: usize,
}

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.meta;
        let tokens = m.train_tokens + m.val_tokens;
        writeln!(
            f,
            "read {} file(s), {} bytes; {} tokenizer, vocabulary {}; {tokens} tokens ({:.2} bytes a token)",
            m.sources.len(),
            m.bytes,
            m.tokenizer.name(),
            m.vocab_size,
            m.bytes as f64 / tokens as f64
        )?;
        if self.replaced_sequences > 0 {
            writeln!(
                f,
                "replaced {} invalid UTF-8 sequence(s) with U+FFFD",
                self.replaced_sequences
            )?;
        }
        writeln!(
            f,
            "train: {} tokens ({}) -> {}",
            m.train_tokens,
            m.token_dtype,
            self.train.display()
        )?;
        writeln!(
            f,
            "val:   {} tokens ({}) -> {}",
            m.val_tokens,
            m.token_dtype,
            self.val.display()
        )?;
        write!(
            f,
            "tokenizer -> {}, meta -> {}",
            self.tokenizer.display(),
            self.meta_path.display()
        )
    }
}

/// One input file's text.
struct Document {
    text: String,
    /// Invalid UTF-8 sequences replaced in `text`.
    replaced: usize,
    bytes: u64,
}

/// Reads the text files, tokenizes them (joined by a blank line), splits the
/// tokens into train (the first `1 - val_fraction`) and validation (the rest)
/// and writes the data folder. All text and all ids are held in memory (about
/// 5 bytes a token beyond the text): fine up to a few hundred million tokens.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    let f = opts.val_fraction;
    if !(f > 0.0 && f <= 0.5) {
        return Err(Error::invalid_option(format!(
            "the validation fraction must be in (0, 0.5], not {f}"
        )));
    }
    if opts.inputs.is_empty() {
        return Err(Error::invalid_option("no input text files"));
    }
    if let TokenizerChoice::TrainBpe(vocab) = opts.tokenizer
        && vocab <= 256
    {
        return Err(Error::invalid_option(format!(
            "a byte-level BPE vocabulary must be larger than the 256 bytes, not {vocab}"
        )));
    }

    // Every input is read and checked before any tokenizer work starts.
    let documents = opts
        .inputs
        .iter()
        .map(|path| read_text(path))
        .collect::<Result<Vec<_>>>()?;

    let (tokenizer, kind) = match &opts.tokenizer {
        TokenizerChoice::Byte => (Tokenizer::byte_level(), TokenizerKind::Byte),
        TokenizerChoice::File(path) => (Tokenizer::from_file(path)?, TokenizerKind::File),
        TokenizerChoice::TrainBpe(vocab) => (
            Tokenizer::train_bpe_on(documents.iter().map(|d| d.text.as_str()), *vocab)?,
            TokenizerKind::Bpe,
        ),
    };
    let vocab_size = tokenizer.vocab_size();

    let separator = tokenizer.encode(DOCUMENT_SEPARATOR)?;
    let mut ids = Vec::new();
    for (i, document) in documents.iter().enumerate() {
        if i > 0 {
            ids.extend_from_slice(&separator);
        }
        ids.extend(tokenizer.encode(&document.text)?);
    }
    if let Some((position, id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab_size)
    {
        // Only a tokenizer.json with gaps in its ids can do this.
        return Err(Error::Tokenizer {
            message: format!(
                "id {id} at position {position} is beyond the tokenizer's vocabulary size {vocab_size}"
            ),
        });
    }

    let val_tokens = (ids.len() as f64 * f).round() as usize;
    let train_tokens = ids.len() - val_tokens;
    if train_tokens < 2 || val_tokens < 2 {
        return Err(Error::invalid_option(format!(
            "the text gives {} tokens: a validation fraction of {f} leaves {train_tokens} for \
             training and {val_tokens} for validation; each split needs at least 2",
            ids.len()
        )));
    }

    std::fs::create_dir_all(&opts.out)
        .map_err(|e| Error::io("create data folder", &opts.out, e))?;
    let dtype = TokenDtype::for_vocab(vocab_size);
    let train = DataMeta::train_path(&opts.out);
    let val = DataMeta::val_path(&opts.out);
    let tokenizer_path = DataMeta::tokenizer_path(&opts.out);
    let meta_path = opts.out.join(META_FILE);
    // meta.json goes first out and last in: a reader never pairs it with
    // token files from another run.
    if let Err(e) = std::fs::remove_file(&meta_path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(Error::io("remove old data meta file", &meta_path, e));
    }
    write_tokens(&train, &ids[..train_tokens], dtype)?;
    write_tokens(&val, &ids[train_tokens..], dtype)?;
    tokenizer.save(&tokenizer_path)?;
    let meta = DataMeta {
        vocab_size,
        token_dtype: dtype,
        train_tokens,
        val_tokens,
        tokenizer: kind,
        sources: opts
            .inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        bytes: documents.iter().map(|d| d.bytes).sum(),
    };
    let json = serde_json::to_vec_pretty(&meta)
        .map_err(|e| Error::io("write data meta file", &meta_path, e.into()))?;
    write_atomically(&meta_path, "write data meta file", |w| {
        use std::io::Write;
        w.write_all(&json)?;
        w.write_all(b"\n")
    })?;

    Ok(PrepareReport {
        train,
        val,
        tokenizer: tokenizer_path,
        meta_path,
        meta,
        replaced_sequences: documents.iter().map(|d| d.replaced).sum(),
    })
}

/// Reads one input; bytes that are not UTF-8 become U+FFFD and are counted.
fn read_text(path: &Path) -> Result<Document> {
    const WHAT: &str = "text file";
    let bytes = std::fs::read(path).map_err(|e| Error::read(WHAT, "read text file", path, e))?;
    let size = bytes.len() as u64;
    let (text, replaced) = match String::from_utf8(bytes) {
        Ok(text) => (text, 0),
        Err(e) => {
            let bytes = e.into_bytes();
            // One replacement per invalid chunk, as from_utf8_lossy makes them.
            let replaced = bytes
                .utf8_chunks()
                .filter(|c| !c.invalid().is_empty())
                .count();
            (String::from_utf8_lossy(&bytes).into_owned(), replaced)
        }
    };
    if text.trim().is_empty() {
        return Err(Error::invalid(WHAT, path, "empty or only whitespace"));
    }
    Ok(Document {
        text,
        replaced,
        bytes: size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::TokenFile;

    fn write(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn writes_four_consistent_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.txt", "héllo wörld\n".repeat(50).as_bytes());
        let b = write(dir.path(), "b.txt", b"second file, \xff not utf-8\n");
        let out = dir.path().join("data");
        let report = prepare(&PrepareOptions::new(
            vec![a.clone(), b.clone()],
            out.clone(),
        ))
        .unwrap();

        let meta = DataMeta::read(&out).unwrap();
        assert_eq!(meta, report.meta);
        assert_eq!(meta.vocab_size, 256);
        assert_eq!(meta.token_dtype, TokenDtype::U16);
        assert_eq!(meta.tokenizer, TokenizerKind::Byte);
        assert_eq!(
            meta.sources,
            [a.display().to_string(), b.display().to_string()]
        );
        let a_len = std::fs::metadata(&a).unwrap().len();
        let b_len = std::fs::metadata(&b).unwrap().len();
        assert_eq!(meta.bytes, a_len + b_len);
        assert_eq!(report.replaced_sequences, 1);

        // Byte tokens: one per byte of the joined text, U+FFFD being 3 bytes for 1.
        let total = (a_len + 2 + b_len + 2) as usize;
        assert_eq!(meta.train_tokens + meta.val_tokens, total);
        assert_eq!(meta.val_tokens, (total as f64 * 0.1).round() as usize);

        let train = TokenFile::open(&report.train, meta.token_dtype).unwrap();
        let val = TokenFile::open(&report.val, meta.token_dtype).unwrap();
        assert_eq!(
            (train.len(), val.len()),
            (meta.train_tokens, meta.val_tokens)
        );
        train.check_vocab(meta.vocab_size).unwrap();

        // The files decode back to the inputs joined by a blank line.
        let tokenizer = Tokenizer::from_file(&report.tokenizer).unwrap();
        let ids: Vec<u32> = (0..train.len())
            .map(|i| train.get(i))
            .chain((0..val.len()).map(|i| val.get(i)))
            .collect();
        let text = tokenizer.decode(&ids).unwrap();
        let want = format!(
            "{}\n\n{}",
            std::fs::read_to_string(&a).unwrap(),
            String::from_utf8_lossy(&std::fs::read(&b).unwrap())
        );
        assert_eq!(text, want);
        assert!(
            report
                .to_string()
                .contains("replaced 1 invalid UTF-8 sequence"),
            "{report}"
        );

        let names: std::collections::BTreeSet<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            [META_FILE, TOKENIZER_FILE, TRAIN_FILE, VAL_FILE]
                .map(String::from)
                .into()
        );
    }

    #[test]
    fn trains_bpe_and_uses_a_tokenizer_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = "the kiln fires the clay; the clay becomes a pot.\n".repeat(200);
        let input = write(dir.path(), "in.txt", text.as_bytes());
        let bpe_out = dir.path().join("bpe");
        let mut opts = PrepareOptions::new(vec![input.clone()], bpe_out.clone());
        opts.tokenizer = TokenizerChoice::TrainBpe(300);
        opts.val_fraction = 0.5;
        let report = prepare(&opts).unwrap();
        assert_eq!(report.meta.tokenizer, TokenizerKind::Bpe);
        assert!(report.meta.vocab_size <= 300);
        let bpe_tokens = report.meta.train_tokens + report.meta.val_tokens;
        assert!(
            bpe_tokens < text.len() / 2,
            "{bpe_tokens} tokens for {} bytes",
            text.len()
        );
        // (0.5 of an even count splits evenly.)
        assert!(report.meta.train_tokens.abs_diff(report.meta.val_tokens) <= 1);

        // The saved tokenizer, given back as a file, gives the same ids.
        let file_out = dir.path().join("file");
        let mut opts = PrepareOptions::new(vec![input], file_out.clone());
        opts.tokenizer = TokenizerChoice::File(report.tokenizer.clone());
        opts.val_fraction = 0.5;
        let again = prepare(&opts).unwrap();
        assert_eq!(again.meta.tokenizer, TokenizerKind::File);
        assert_eq!(again.meta.train_tokens, report.meta.train_tokens);
        assert_eq!(
            std::fs::read(bpe_out.join(TRAIN_FILE)).unwrap(),
            std::fs::read(file_out.join(TRAIN_FILE)).unwrap()
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = write(dir.path(), "good.txt", b"some text here\n");
        let out = dir.path().join("out");
        let err =
            |inputs: Vec<PathBuf>| prepare(&PrepareOptions::new(inputs, out.clone())).unwrap_err();

        let missing = dir.path().join("missing.txt");
        let e = err(vec![good.clone(), missing.clone()]);
        assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("text file {}: not found", missing.display())
        );

        let blank = write(dir.path(), "blank.txt", b" \n\t\n");
        let e = err(vec![blank.clone(), good.clone()]).to_string();
        assert_eq!(
            e,
            format!("text file {}: empty or only whitespace", blank.display())
        );
        let empty = write(dir.path(), "empty.txt", b"");
        assert!(err(vec![empty]).to_string().contains("empty.txt"));

        assert!(err(vec![]).to_string().contains("no input"));
        // Nothing was written for any of them.
        assert!(!out.exists());
    }

    #[test]
    fn options_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let input = write(dir.path(), "in.txt", b"abcdefghijklmnopqrstuvwxyz\n");
        for f in [0.0, -0.1, 0.51, 1.0, f64::NAN] {
            let mut opts = PrepareOptions::new(vec![input.clone()], dir.path().join("out"));
            opts.val_fraction = f;
            let e = prepare(&opts).unwrap_err().to_string();
            assert!(
                e.contains("validation fraction must be in (0, 0.5]"),
                "{f}: {e}"
            );
        }
        // 4 byte tokens at 0.1: 0 for validation.
        let tiny = write(dir.path(), "tiny.txt", b"abcd");
        let e = prepare(&PrepareOptions::new(vec![tiny], dir.path().join("out")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gives 4 tokens") && e.contains("at least 2"),
            "{e}"
        );

        let mut opts = PrepareOptions::new(vec![input], dir.path().join("out"));
        opts.tokenizer = TokenizerChoice::TrainBpe(100);
        assert!(
            prepare(&opts)
                .unwrap_err()
                .to_string()
                .contains("larger than the 256 bytes")
        );
    }

    #[test]
    fn meta_read_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = DataMeta::read(dir.path()).unwrap_err();
        assert!(
            matches!(e, Error::NotFound { .. }) && e.to_string().contains(META_FILE),
            "{e}"
        );
        std::fs::write(dir.path().join(META_FILE), "{\"vocab_size\": 5}").unwrap();
        let e = DataMeta::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.starts_with("data meta file ") && e.contains("missing field"),
            "{e}"
        );
    }
}

//! Tokenizers: a thin wrapper over Hugging Face `tokenizers` with the three
//! ways kiln gets one (bytes, a `tokenizer.json`, BPE trained on a corpus).

use std::path::{Path, PathBuf};

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::error::{Error, Result};
use crate::tokens::write_atomically;

const WHAT: &str = "tokenizer file";

/// Long texts are encoded in pieces of about this many bytes (see [`Tokenizer::encode`]).
const PIECE_BYTES: usize = 64 << 10;
/// Pieces encoded at once (in parallel), bounding the memory of the
/// intermediate encodings to about `PIECES_PER_BATCH * PIECE_BYTES` of text.
const PIECES_PER_BATCH: usize = 64;

/// A tokenizer: text to token ids and back.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Whether splitting a long text after a line break leaves its encoding
    /// unchanged (true for GPT-2-style byte-level pre-tokenization), so that
    /// `encode` may work in bounded pieces.
    splits_at_lines: bool,
}

impl Tokenizer {
    /// One token per byte: ids 0..=255 are the byte values. Encodes any UTF-8
    /// text losslessly with no training. Built as GPT-2 does: a BPE model over
    /// the 256 byte-level characters, here with no merges.
    pub fn byte_level() -> Tokenizer {
        let byte_chars = gpt2_byte_chars();
        let vocab: [(String, u32); 256] =
            std::array::from_fn(|b| (byte_chars[b].to_string(), b as u32));
        let model = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .expect("a vocabulary of 256 distinct characters and no merges is a valid BPE");
        Tokenizer::with_byte_level(model)
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let json =
            std::fs::read(path).map_err(|e| Error::read(WHAT, "read tokenizer file", path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&json)
            .map_err(|e| Error::invalid(WHAT, path, format!("not a tokenizer.json: {e}")))?;
        Ok(Tokenizer::new(inner))
    }

    /// Trains a byte-level BPE tokenizer (GPT-2's scheme) on the text files
    /// `files`, with at most `vocab` ids. Every byte is in the initial
    /// alphabet, so no text is out of vocabulary; `vocab` must exceed 256.
    /// Bytes that are not UTF-8 are replaced by U+FFFD, as `prepare` does.
    pub fn train_bpe(files: &[PathBuf], vocab: usize) -> Result<Tokenizer> {
        let mut texts = Vec::with_capacity(files.len());
        for path in files {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::read("text file", "read text file", path, e))?;
            texts.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        Tokenizer::train_bpe_on(texts.iter().map(String::as_str), vocab)
    }

    /// [`Tokenizer::train_bpe`] on texts already in memory.
    pub fn train_bpe_on<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab: usize,
    ) -> Result<Tokenizer> {
        if vocab <= 256 {
            return Err(Error::invalid_option(format!(
                "a byte-level BPE vocabulary must be larger than the 256 bytes, not {vocab}"
            )));
        }
        let mut tokenizer = Tokenizer::with_byte_level(BPE::default());
        let trainer = BpeTrainer::builder()
            .vocab_size(vocab)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        // Lines are the trainer's sequences: it counts words in parallel over them.
        let lines = texts.flat_map(|text| text.split_inclusive('\n'));
        tokenizer
            .inner
            .train(&mut TrainerWrapper::BpeTrainer(trainer), lines)
            .map_err(Error::tokenizer)?;
        Ok(tokenizer)
    }

    fn with_byte_level(model: BPE) -> Tokenizer {
        let mut inner = tokenizers::Tokenizer::new(model);
        // One value serves as pre-tokenizer (bytes to characters, GPT-2's
        // word pattern) and decoder (characters back to bytes).
        let byte_level = ByteLevel::default()
            .add_prefix_space(false)
            .trim_offsets(false);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        Tokenizer::new(inner)
    }

    fn new(inner: tokenizers::Tokenizer) -> Tokenizer {
        // GPT-2's pattern never joins a line break to the non-space character
        // after it, so such a position is always a word boundary; other
        // pre-tokenizers (or a normalizer, or a prefix space added to each
        // piece) could make pieces encode differently from the whole.
        let splits_at_lines = inner.get_normalizer().is_none()
            && matches!(
                inner.get_pre_tokenizer(),
                Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space
            );
        Tokenizer {
            inner,
            splits_at_lines,
        }
    }

    /// Encodes `text` to token ids, without special tokens (no BOS/EOS or
    /// `[CLS]` added). For byte-level tokenizers a long text is encoded in
    /// pieces of ~64 KiB cut after line breaks, in parallel, with the same
    /// result as encoding it whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if !self.splits_at_lines || text.len() <= PIECE_BYTES {
            let encoding = self
                .inner
                .encode_fast(text, false)
                .map_err(Error::tokenizer)?;
            return Ok(encoding.get_ids().to_vec());
        }
        let pieces = split_after_lines(text, PIECE_BYTES);
        let mut ids = Vec::with_capacity(text.len() / 2);
        for batch in pieces.chunks(PIECES_PER_BATCH) {
            let encodings = self
                .inner
                .encode_batch_fast(batch.to_vec(), false)
                .map_err(Error::tokenizer)?;
            for encoding in encodings {
                ids.extend_from_slice(encoding.get_ids());
            }
        }
        Ok(ids)
    }

    /// Decodes token ids to text. Special tokens are kept. A sequence that
    /// ends inside a multi-byte character decodes that character to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(Error::tokenizer)
    }

    /// Number of ids, added (special) tokens included: every id `encode`
    /// returns is below it.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Saves as a Hugging Face `tokenizer.json` (written whole, then renamed).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(true).map_err(Error::tokenizer)?;
        write_atomically(path, "write tokenizer file", |w| {
            use std::io::Write;
            w.write_all(json.as_bytes())
        })
    }
}

/// GPT-2's `bytes_to_unicode`: byte `b` is shown as the character at index
/// `b` (printable bytes as themselves, the rest shifted past U+0100), which is
/// how the ByteLevel pre-tokenizer spells bytes.
fn gpt2_byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        chars[b as usize] = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("U+0100..U+0143 are characters")
        };
    }
    chars
}

/// Cuts `text` into pieces of at least `min_bytes` (the last may be shorter),
/// each ending after a line break that is followed by a non-whitespace
/// character. A text with no such place stays whole.
fn split_after_lines(text: &str, min_bytes: usize) -> Vec<&str> {
    let mut pieces = Vec::with_capacity(text.len() / min_bytes + 1);
    let mut rest = text;
    while rest.len() > min_bytes {
        let bytes = rest.as_bytes();
        let cut = (min_bytes..bytes.len())
            .find(|&i| bytes[i - 1] == b'\n' && !rest[i..].starts_with(char::is_whitespace));
        let Some(cut) = cut else { break };
        let (piece, tail) = rest.split_at(cut);
        pieces.push(piece);
        rest = tail;
    }
    pieces.push(rest);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &[&str] = &[
        "hello world",
        "  leading and trailing spaces  ",
        "line one\nline two\r\n\n\ttabbed\n",
        "unicode: héllo wörld, 日本語, emoji 🦀🔥, combining e\u{301}, nul \0 end",
        "",
        " ",
        "\u{FFFD} replacement char stays",
    ];

    #[test]
    fn byte_chars_are_the_byte_level_alphabet() {
        let ours: std::collections::HashSet<char> = gpt2_byte_chars().into_iter().collect();
        let theirs: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours.len(), 256);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn byte_level_is_one_id_per_byte_and_lossless() {
        let t = Tokenizer::byte_level();
        assert_eq!(t.vocab_size(), 256);
        for s in SAMPLES {
            let ids = t.encode(s).unwrap();
            let bytes: Vec<u32> = s.bytes().map(u32::from).collect();
            assert_eq!(ids, bytes, "{s:?}");
            assert_eq!(t.decode(&ids).unwrap(), *s);
        }
    }

    #[test]
    fn long_texts_encode_in_pieces_as_if_whole() {
        let line = "The quick brown fox, 42 times — déjà vu.\n\n  indented\n";
        let text = line.repeat(4000); // ~230 KB: several pieces
        let pieces = split_after_lines(&text, PIECE_BYTES);
        assert!(pieces.len() > 2);
        assert_eq!(pieces.concat(), text);

        let byte = Tokenizer::byte_level();
        let ids = byte.encode(&text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(byte.decode(&ids).unwrap(), text);

        let bpe = Tokenizer::train_bpe_on([text.as_str()].into_iter(), 400).unwrap();
        assert!(bpe.splits_at_lines);
        let whole = bpe.inner.encode_fast(text.as_str(), false).unwrap();
        assert_eq!(bpe.encode(&text).unwrap(), whole.get_ids());
    }

    #[test]
    fn split_keeps_whitespace_runs_together() {
        let pieces = split_after_lines("aaaa\n\n bbbb\ncccc\n", 3);
        assert_eq!(pieces, ["aaaa\n\n bbbb\n", "cccc\n"]);
        assert_eq!(
            split_after_lines("no line breaks at all", 3),
            ["no line breaks at all"]
        );
    }

    /// A corpus with repeated words (so merges happen) and rare characters.
    fn corpus() -> String {
        let words = [
            "kiln",
            "training",
            "tokens",
            "gradient",
            "checkpoint",
            "the",
            "of",
        ];
        let mut text = String::new();
        let mut state = 7u64;
        for i in 0..20_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(words[(state >> 33) as usize % words.len()]);
            text.push(if i % 13 == 12 { '\n' } else { ' ' });
        }
        text.push_str("rare: ñ 漢字 🦀\n");
        text
    }

    #[test]
    fn trained_bpe_stays_within_vocab_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.txt");
        std::fs::write(&path, corpus()).unwrap();
        let t = Tokenizer::train_bpe(std::slice::from_ref(&path), 300).unwrap();
        assert!(
            t.vocab_size() <= 300 && t.vocab_size() > 256,
            "{}",
            t.vocab_size()
        );

        let text = "the gradient of the checkpoint\n";
        let ids = t.encode(text).unwrap();
        assert!(
            ids.len() < text.len(),
            "merges shorten common words: {ids:?}"
        );
        assert!(ids.iter().all(|&id| (id as usize) < t.vocab_size()));
        for s in SAMPLES.iter().chain([&text]) {
            assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), *s);
        }

        // Saved and loaded, it encodes the same.
        let saved = dir.path().join("tokenizer.json");
        t.save(&saved).unwrap();
        let loaded = Tokenizer::from_file(&saved).unwrap();
        assert_eq!(loaded.vocab_size(), t.vocab_size());
        assert_eq!(loaded.encode(text).unwrap(), ids);
        assert!(loaded.splits_at_lines);
    }

    #[test]
    fn bpe_vocab_must_exceed_the_bytes() {
        let e = Tokenizer::train_bpe_on(["abc"].into_iter(), 256).unwrap_err();
        assert!(e.to_string().contains("larger than the 256 bytes"), "{e}");
        let e = Tokenizer::train_bpe(&[PathBuf::from("/no/such/corpus.txt")], 300).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }) && e.to_string().contains("corpus.txt"));
    }

    #[test]
    fn from_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let e = Tokenizer::from_file(&missing).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
        assert!(e.to_string().starts_with("tokenizer file "), "{e}");

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
        let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
        assert!(
            e.contains("bad.json") && e.contains("not a tokenizer.json"),
            "{e}"
        );
    }

    #[test]
    fn byte_level_saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        Tokenizer::byte_level().save(&path).unwrap();
        let t = Tokenizer::from_file(&path).unwrap();
        assert_eq!(t.vocab_size(), 256);
        assert_eq!(t.encode("Aé").unwrap(), [0x41, 0xC3, 0xA9]);
    }
}

//! Token files: flat little-endian `uint16` or `uint32` token ids, no header
//! (nanoGPT's `train.bin`), memory-mapped for reading and replaced atomically
//! when written.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const WHAT: &str = "token file";

/// The width of the ids in a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenDtype {
    /// Little-endian `uint16`: vocabularies of up to 65,536 ids.
    #[serde(rename = "uint16")]
    U16,
    /// Little-endian `uint32`.
    #[serde(rename = "uint32")]
    U32,
}

impl TokenDtype {
    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    /// The narrowest dtype that holds every id of a vocabulary of `vocab` ids
    /// (`uint16` up to 65,536).
    pub fn for_vocab(vocab: usize) -> TokenDtype {
        if vocab <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// The largest id this dtype holds.
    pub fn max_id(self) -> u32 {
        match self {
            TokenDtype::U16 => u16::MAX as u32,
            TokenDtype::U32 => u32::MAX,
        }
    }

    /// The name used in `meta.json` (and by numpy): "uint16" or "uint32".
    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::U16 => "uint16",
            TokenDtype::U32 => "uint32",
        }
    }
}

impl std::fmt::Display for TokenDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A token file opened for reading: memory-mapped, never read whole.
///
/// Token files are replaced by rename ([`write_tokens`]), never rewritten in
/// place, so a mapping keeps seeing the file it opened.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    dtype: TokenDtype,
    map: Mmap,
}

impl TokenFile {
    /// Opens and maps `path`. Fails, naming the file, when it is missing, empty
    /// or not a whole number of `dtype` tokens long.
    pub fn open(path: &Path, dtype: TokenDtype) -> Result<TokenFile> {
        let file = File::open(path).map_err(|e| Error::read(WHAT, "open token file", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat token file", path, e))?
            .len();
        if len == 0 {
            return Err(Error::invalid(WHAT, path, "empty (no tokens)"));
        }
        if len % dtype.width() as u64 != 0 {
            return Err(Error::invalid(
                WHAT,
                path,
                format!(
                    "length {len} bytes is not a multiple of {} ({dtype} tokens)",
                    dtype.width()
                ),
            ));
        }
        // SAFETY: the mapping is read-only and kiln never modifies a token file
        // in place (writers rename a new file over it, which leaves this
        // mapping on the old inode). A third party truncating the file while it
        // is mapped is outside what this type defends against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("map token file", path, e))?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            dtype,
            map,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The width of its ids.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.map.len() / self.dtype.width()
    }

    /// Always false for an opened file (empty files are refused); here for the
    /// `len`/`is_empty` pair.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes, e.g. to hash the data a run trained on.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Token `i`.
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`, as slice indexing does; [`TokenFile::read_i64`]
    /// checks instead.
    pub fn get(&self, i: usize) -> u32 {
        let w = self.dtype.width();
        decode(self.dtype, &self.map[i * w..(i + 1) * w])
    }

    /// Copies `out.len()` tokens starting at token `start` into `out` (as
    /// `i64`, the dtype of embedding indices). Fails if the range runs past
    /// the end.
    pub fn read_i64(&self, start: usize, out: &mut [i64]) -> Result<()> {
        let w = self.dtype.width();
        let end = start
            .checked_add(out.len())
            .filter(|&end| end <= self.len())
            .ok_or_else(|| {
                Error::invalid(
                    WHAT,
                    &self.path,
                    format!(
                        "read of {} tokens at position {start} runs past the end ({} tokens)",
                        out.len(),
                        self.len()
                    ),
                )
            })?;
        let bytes = &self.map[start * w..end * w];
        match self.dtype {
            TokenDtype::U16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = i64::from(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            TokenDtype::U32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
        }
        Ok(())
    }

    /// The largest id in the file (a full scan).
    pub fn max_token(&self) -> Option<u32> {
        self.ids().max()
    }

    /// Checks that every id is below `vocab` (a full scan); the error names the
    /// first offending position and id.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        match self.ids().position(|id| id as usize >= vocab) {
            None => Ok(()),
            Some(position) => Err(Error::invalid(
                WHAT,
                &self.path,
                format!(
                    "token {} at position {position} is beyond the vocabulary of {vocab}",
                    self.get(position)
                ),
            )),
        }
    }

    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        let dtype = self.dtype;
        self.map
            .chunks_exact(dtype.width())
            .map(move |b| decode(dtype, b))
    }
}

fn decode(dtype: TokenDtype, b: &[u8]) -> u32 {
    match dtype {
        TokenDtype::U16 => u32::from(u16::from_le_bytes([b[0], b[1]])),
        TokenDtype::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    }
}

/// Writes `tokens` to `path` as flat little-endian `dtype` ids: to a temporary
/// name beside it, synced, then renamed over `path`, so readers see the old
/// file or the whole new one. Fails if a token does not fit `dtype` or there
/// are no tokens (an empty token file cannot be opened).
pub fn write_tokens(path: &Path, tokens: &[u32], dtype: TokenDtype) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::invalid(WHAT, path, "no tokens to write"));
    }
    if let Some((position, id)) = tokens
        .iter()
        .enumerate()
        .find(|&(_, &id)| id > dtype.max_id())
    {
        return Err(Error::invalid(
            WHAT,
            path,
            format!("token {id} at position {position} does not fit {dtype}"),
        ));
    }
    write_atomically(path, "write token file", |w| {
        for &id in tokens {
            match dtype {
                TokenDtype::U16 => w.write_all(&(id as u16).to_le_bytes())?,
                TokenDtype::U32 => w.write_all(&id.to_le_bytes())?,
            }
        }
        Ok(())
    })
}

/// Writes a file through `fill` under a temporary name in the same folder,
/// syncs it and renames it to `path`. The temporary file is removed on error.
pub(crate) fn write_atomically(
    path: &Path,
    op: &'static str,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(op, path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        for (dtype, ids) in [
            (TokenDtype::U16, vec![0, 1, 255, 256, 65535]),
            (TokenDtype::U32, vec![0, 65536, 70000, u32::MAX]),
        ] {
            let path = dir.path().join(format!("{dtype}.bin"));
            write_tokens(&path, &ids, dtype).unwrap();
            assert_eq!(
                std::fs::metadata(&path).unwrap().len() as usize,
                ids.len() * dtype.width()
            );
            let file = TokenFile::open(&path, dtype).unwrap();
            assert_eq!(file.len(), ids.len());
            assert!(!file.is_empty());
            assert_eq!(file.path(), path);
            assert_eq!(
                (0..file.len()).map(|i| file.get(i)).collect::<Vec<_>>(),
                ids
            );
            assert_eq!(file.max_token(), ids.iter().copied().max());
            let mut out = vec![0i64; ids.len() - 1];
            file.read_i64(1, &mut out).unwrap();
            let want: Vec<i64> = ids[1..].iter().map(|&id| i64::from(id)).collect();
            assert_eq!(out, want);
        }
    }

    #[test]
    fn layout_is_flat_little_endian() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        write_tokens(&path, &[1, 0x0203], TokenDtype::U16).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [1, 0, 3, 2]);
        assert_eq!(
            TokenFile::open(&path, TokenDtype::U16).unwrap().bytes(),
            [1, 0, 3, 2]
        );
    }

    #[test]
    fn read_past_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        write_tokens(&path, &[1, 2, 3], TokenDtype::U16).unwrap();
        let file = TokenFile::open(&path, TokenDtype::U16).unwrap();
        let mut out = [0i64; 2];
        file.read_i64(1, &mut out).unwrap();
        assert_eq!(out, [2, 3]);
        let e = file.read_i64(2, &mut out).unwrap_err().to_string();
        assert!(e.contains("t.bin") && e.contains("position 2"), "{e}");
        assert!(file.read_i64(usize::MAX, &mut out).is_err());
        file.read_i64(3, &mut []).unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.bin");
        let e = TokenFile::open(&missing, TokenDtype::U16).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.bin"), "{e}");

        let odd = dir.path().join("odd.bin");
        std::fs::write(&odd, [0u8; 7]).unwrap();
        let e = TokenFile::open(&odd, TokenDtype::U32)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "token file {}: length 7 bytes is not a multiple of 4 (uint32 tokens)",
                odd.display()
            )
        );
        // 7 bytes is no whole number of uint16 tokens either; 8 is of both.
        assert!(TokenFile::open(&odd, TokenDtype::U16).is_err());

        let empty = dir.path().join("empty.bin");
        std::fs::write(&empty, []).unwrap();
        let e = TokenFile::open(&empty, TokenDtype::U16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty.bin") && e.contains("empty"), "{e}");
    }

    #[test]
    fn check_vocab_names_the_first_offender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.bin");
        write_tokens(&path, &[5, 50303, 70000, 80000], TokenDtype::U32).unwrap();
        let file = TokenFile::open(&path, TokenDtype::U32).unwrap();
        file.check_vocab(80001).unwrap();
        let e = file.check_vocab(50304).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "token file {}: token 70000 at position 2 is beyond the vocabulary of 50304",
                path.display()
            )
        );
    }

    #[test]
    fn write_refuses_ids_that_do_not_fit_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let e = write_tokens(&path, &[1, 65536], TokenDtype::U16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token 65536 at position 1 does not fit uint16"),
            "{e}"
        );
        assert!(write_tokens(&path, &[], TokenDtype::U16).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A write into a missing folder is an I/O error naming the file.
        let nested = dir.path().join("no/such/t.bin");
        let e = write_tokens(&nested, &[1], TokenDtype::U16).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
    }

    #[test]
    fn dtype_names_and_choice() {
        assert_eq!(
            serde_json::to_string(&TokenDtype::U16).unwrap(),
            "\"uint16\""
        );
        assert_eq!(
            serde_json::from_str::<TokenDtype>("\"uint32\"").unwrap(),
            TokenDtype::U32
        );
        assert_eq!(TokenDtype::for_vocab(256), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65536), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65537), TokenDtype::U32);
    }
}

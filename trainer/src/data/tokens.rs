//! Language-model samples: windows of `seq_len + 1` tokens over memory-mapped
//! token files (`kiln data prepare`'s or nanoGPT's `train.bin` layout).
//!
//! A file of `n` tokens holds `(n - 1) / seq_len` non-overlapping windows;
//! window `w` of a file starts at `shift + w * seq_len`, where the shift is a
//! seeded function of (seed, epoch, file) within the file's slack (the
//! tokens the windows leave over, fewer than `seq_len`), so each epoch sees
//! slightly different cuts without any window leaving the file. Held-out
//! windows are never shifted. Which windows a step takes is the global
//! sampler's business, so the same (seed, step) gives the same tokens at every
//! world size and after a resume.

use std::path::PathBuf;

use kiln_text::TokenFile;
use tch::{Device, Tensor};

use super::SplitMix64;
use crate::error::{Context, Error, Result};

/// The windows of a list of token files, numbered file after file.
pub struct TokenWindows {
    files: Vec<TokenFile>,
    seq_len: usize,
    /// The first global window index of each file, and the total at the end.
    starts: Vec<usize>,
    seed: u64,
}

impl std::fmt::Debug for TokenWindows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenWindows")
            .field("files", &self.files.len())
            .field("seq_len", &self.seq_len)
            .field("windows", &self.len())
            .finish()
    }
}

impl TokenWindows {
    /// Opens (memory-maps) `paths`; with `vocab`, every id is checked to be
    /// below it. A file too short for one window is an error naming it.
    pub fn open(
        paths: &[PathBuf],
        dtype: kiln_text::TokenDtype,
        seq_len: usize,
        vocab: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        if seq_len < 1 {
            return Err(Error::invalid("data.seq_len must be at least 1"));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut starts = vec![0];
        for path in paths {
            let file = TokenFile::open(path, dtype)
                .with_context(|| format!("open token file {}", path.display()))?;
            if file.len() <= seq_len {
                return Err(Error::invalid(format!(
                    "token file {} holds {} tokens, fewer than data.seq_len + 1 = {} (one window of inputs and next-token targets); lower data.seq_len or add text",
                    path.display(),
                    file.len(),
                    seq_len + 1
                )));
            }
            if let Some(vocab) = vocab {
                file.check_vocab(vocab)?;
            }
            let windows = (file.len() - 1) / seq_len;
            starts.push(starts.last().copied().unwrap_or(0) + windows);
            files.push(file);
        }
        Ok(Self {
            files,
            seq_len,
            starts,
            seed,
        })
    }

    /// Windows over all files.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Whether no file was named (no held-out data).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per sample's inputs; a window holds one more (the last target).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Copies window `index` (shifted for `epoch`; unshifted for `None`) into
    /// `out`, which holds `seq_len + 1` tokens.
    fn window(&self, index: usize, epoch: Option<u64>, out: &mut [i64]) -> Result<()> {
        let f = self.starts.partition_point(|&s| s <= index) - 1;
        let file = &self.files[f];
        let w = index - self.starts[f];
        let windows = self.starts[f + 1] - self.starts[f];
        let slack = (file.len() - 1) - windows * self.seq_len;
        let shift = match epoch {
            Some(epoch) if slack > 0 => {
                let mut rng = SplitMix64::new(
                    self.seed
                        ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        ^ (f as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
                        ^ 0x70ce,
                );
                (rng.next_u64() % (slack as u64 + 1)) as usize
            }
            _ => 0,
        };
        file.read_i64(shift + w * self.seq_len, out)
            .with_context(|| format!("read window {w} of {}", file.path().display()))
    }

    /// `tokens` and `targets` (int64 [n, seq_len], targets one position
    /// ahead) of the given (epoch, window) samples.
    pub fn batch(
        &self,
        samples: &[(Option<u64>, usize)],
        device: Device,
    ) -> Result<Vec<(String, Tensor)>> {
        let row = self.seq_len + 1;
        let mut buf = vec![0i64; samples.len() * row];
        for (&(epoch, index), out) in samples.iter().zip(buf.chunks_exact_mut(row)) {
            self.window(index, epoch, out)?;
        }
        let all = Tensor::from_slice(&buf).view([samples.len() as i64, row as i64]);
        let n = self.seq_len as i64;
        Ok(vec![
            (
                "tokens".to_string(),
                all.narrow(1, 0, n).contiguous().to_device(device),
            ),
            (
                "targets".to_string(),
                all.narrow(1, 1, n).contiguous().to_device(device),
            ),
        ])
    }

    /// Feeds the files' contents to a hasher: whole files up to 256 MiB, then
    /// the length and 1 MiB at each of 64 evenly spaced places, so a worker
    /// does not read a large corpus end to end at start-up.
    pub fn hash_into(&self, h: &mut impl sha2::Digest) {
        const WHOLE: usize = 256 << 20;
        const SAMPLES: usize = 64;
        const SAMPLE: usize = 1 << 20;
        h.update((self.seq_len as u64).to_le_bytes());
        for file in &self.files {
            let bytes = file.bytes();
            h.update((bytes.len() as u64).to_le_bytes());
            if bytes.len() <= WHOLE {
                h.update(bytes);
            } else {
                let step = (bytes.len() - SAMPLE) / (SAMPLES - 1);
                for i in 0..SAMPLES {
                    let at = i * step;
                    h.update(&bytes[at..at + SAMPLE]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_text::TokenDtype;

    fn file(dir: &std::path::Path, name: &str, tokens: &[u32]) -> PathBuf {
        let path = dir.join(name);
        kiln_text::write_tokens(&path, tokens, TokenDtype::U16).unwrap();
        path
    }

    fn rows(batch: &[(String, Tensor)], field: usize) -> Vec<Vec<i64>> {
        Vec::<Vec<i64>>::try_from(&batch[field].1).unwrap()
    }

    #[test]
    fn windows_give_next_token_targets_and_shift_by_epoch_within_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // 23 tokens, seq_len 5: (23 - 1) / 5 = 4 windows, slack 2.
        let tokens: Vec<u32> = (100..123).collect();
        let a = file(dir.path(), "a.bin", &tokens);
        let w = TokenWindows::open(&[a], TokenDtype::U16, 5, Some(200), 9).unwrap();
        assert_eq!(w.len(), 4);
        let batch = w.batch(&[(None, 0), (None, 3)], Device::Cpu).unwrap();
        assert_eq!(batch[0].0, "tokens");
        assert_eq!(
            rows(&batch, 0),
            [[100, 101, 102, 103, 104], [115, 116, 117, 118, 119]]
        );
        assert_eq!(
            rows(&batch, 1),
            [[101, 102, 103, 104, 105], [116, 117, 118, 119, 120]]
        );
        // Shifted windows stay inside the file and are a pure function of the epoch.
        let mut shifts = std::collections::BTreeSet::new();
        for epoch in 0..32 {
            let b = w.batch(&[(Some(epoch), 3)], Device::Cpu).unwrap();
            let first = rows(&b, 0)[0][0];
            assert!((115..=117).contains(&first), "epoch {epoch}: {first}");
            assert_eq!(
                rows(&w.batch(&[(Some(epoch), 3)], Device::Cpu).unwrap(), 0)[0][0],
                first
            );
            shifts.insert(first);
        }
        assert!(shifts.len() > 1, "epochs cut the text differently");
    }

    #[test]
    fn windows_are_numbered_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = file(dir.path(), "a.bin", &(0..9).collect::<Vec<_>>());
        let b = file(dir.path(), "b.bin", &(50..59).collect::<Vec<_>>());
        let w = TokenWindows::open(&[a, b], TokenDtype::U16, 4, None, 0).unwrap();
        assert_eq!(w.len(), 4);
        let batch = w.batch(&[(None, 2)], Device::Cpu).unwrap();
        assert_eq!(rows(&batch, 0), [[50, 51, 52, 53]]);
    }

    #[test]
    fn bad_token_data_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let short = file(dir.path(), "short.bin", &[1, 2, 3]);
        let err = format!(
            "{:#}",
            TokenWindows::open(&[short], TokenDtype::U16, 8, None, 0).unwrap_err()
        );
        assert!(
            err.contains("short.bin") && err.contains("data.seq_len"),
            "{err}"
        );
        let big = file(dir.path(), "big.bin", &[1, 2, 3, 300, 4, 5]);
        let err = format!(
            "{:#}",
            TokenWindows::open(&[big], TokenDtype::U16, 2, Some(256), 0).unwrap_err()
        );
        assert!(err.contains("big.bin") && err.contains("300"), "{err}");
        let missing = dir.path().join("missing.bin");
        let err = format!(
            "{:#}",
            TokenWindows::open(&[missing], TokenDtype::U16, 2, None, 0).unwrap_err()
        );
        assert!(err.contains("missing.bin"), "{err}");
    }
}

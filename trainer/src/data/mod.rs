//! Datasets and the global sampler.
//!
//! A job's data is a [`Data`]: a table of named per-sample tensors held in
//! memory (safetensors shards, or the seeded generator; [`table`]) or windows
//! over memory-mapped token files (language models; [`tokens`]). Which
//! samples a step consumes is a pure function of (seed, step, rank, world
//! size): a global order per epoch (a seeded Fisher-Yates shuffle) and a
//! global sample cursor (`step * global_batch`), so any rank at any world size
//! can compute its slice without talking to others, and the cursor is all a
//! checkpoint needs to continue the order exactly.

pub mod table;
pub mod tokens;

use kiln_proto::spec::{DataKind, DataSpec, TokenDtype};
use tch::{Device, Tensor};

use crate::error::{Context, Error, Result};

pub use table::{Dataset, Field, FieldValues, read_shard};
pub use tokens::TokenWindows;

/// One split of a job's data.
#[derive(Debug)]
pub enum Data {
    /// Named per-sample tensors in memory (safetensors shards, synthetic data).
    Table(Dataset),
    /// Windows over memory-mapped token files (language models).
    Tokens(TokenWindows),
}

/// A sample of a step: its epoch (`None`: held-out, never shifted) and index.
pub type Sample = (Option<u64>, usize);

impl Data {
    /// Samples (windows, for tokens).
    pub fn len(&self) -> usize {
        match self {
            Data::Table(t) => t.len(),
            Data::Tokens(w) => w.len(),
        }
    }

    /// Whether the split holds no samples (no held-out data was named).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The named tensors of `samples` on `device`: a table's fields, or
    /// `tokens` and `targets` for token data.
    pub fn batch(&self, samples: &[Sample], device: Device) -> Result<Vec<(String, Tensor)>> {
        match self {
            Data::Table(t) => {
                let indices: Vec<usize> = samples.iter().map(|s| s.1).collect();
                Ok(t.batch(&indices, device))
            }
            Data::Tokens(w) => w.batch(samples, device),
        }
    }

    /// Values per sample of a table's `x` (0 otherwise).
    pub fn features(&self) -> usize {
        match self {
            Data::Table(t) => t.features(),
            Data::Tokens(_) => 0,
        }
    }

    /// The table, if this is one.
    pub fn table(&self) -> Option<&Dataset> {
        match self {
            Data::Table(t) => Some(t),
            Data::Tokens(_) => None,
        }
    }
}

/// Training and held-out data of a job.
#[derive(Debug)]
pub struct Splits {
    /// The samples training steps draw from (`data.train`).
    pub train: Data,
    /// Empty when the spec names no held-out data.
    pub eval: Data,
    /// Classes of labelled tables (0 for other data).
    pub classes: usize,
}

impl Splits {
    /// sha256 over the data of both splits: recorded with each checkpoint so
    /// a resume on other data is noticed.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for d in [&self.train, &self.eval] {
            match d {
                Data::Table(t) => t.hash_into(&mut h),
                Data::Tokens(w) => w.hash_into(&mut h),
            }
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}

/// Loads (or generates) the job's data. `vocab`, for token data, is checked
/// against every id.
pub fn load(spec: &DataSpec, seed: u64, vocab: Option<usize>) -> Result<Splits> {
    match spec.kind {
        DataKind::Safetensors => {
            let mut train = Dataset::default();
            for path in &spec.train {
                train.append(read_shard(path)?, &path.display().to_string())?;
            }
            let mut eval = Dataset::default();
            for path in &spec.eval {
                eval.append(read_shard(path)?, &path.display().to_string())?;
            }
            if train.is_empty() {
                return Err(Error::invalid(
                    "data.train: the training shards hold no samples",
                ));
            }
            if !eval.is_empty() {
                let fields = |d: &Dataset| {
                    d.fields
                        .iter()
                        .map(|f| format!("{} {:?}", f.name, f.shape))
                        .collect::<Vec<_>>()
                };
                if fields(&eval) != fields(&train) {
                    return Err(Error::invalid(format!(
                        "held-out shards hold fields {:?}, training shards hold {:?}",
                        fields(&eval),
                        fields(&train)
                    )));
                }
            }
            let seen = train.classes().max(eval.classes());
            let classes = spec.classes.unwrap_or(seen);
            if seen > classes {
                return Err(Error::invalid(format!(
                    "data.classes = {classes} but the shards hold label {}",
                    seen.saturating_sub(1)
                )));
            }
            Ok(Splits {
                train: Data::Table(train),
                eval: Data::Table(eval),
                classes,
            })
        }
        DataKind::Synthetic => {
            let classes = spec.classes.unwrap_or(10);
            let teacher = table::Teacher::new(seed, spec.features, classes);
            Ok(Splits {
                train: Data::Table(teacher.generate(seed, 0, spec.samples)),
                eval: Data::Table(teacher.generate(seed, 1, spec.eval_samples)),
                classes,
            })
        }
        DataKind::Tokens => {
            let seq_len = spec
                .seq_len
                .ok_or_else(|| Error::invalid("data.seq_len: required for token data"))?;
            let dtype = match spec.token_dtype {
                TokenDtype::Uint16 => kiln_text::TokenDtype::U16,
                TokenDtype::Uint32 => kiln_text::TokenDtype::U32,
            };
            let train = TokenWindows::open(&spec.train, dtype, seq_len, vocab, seed)
                .context("data.train")?;
            let eval =
                TokenWindows::open(&spec.eval, dtype, seq_len, vocab, seed).context("data.eval")?;
            Ok(Splits {
                train: Data::Tokens(train),
                eval: Data::Tokens(eval),
                classes: 0,
            })
        }
    }
}

/// SplitMix64: small, fast, and the same on every platform (the data order must
/// not depend on a library's RNG version).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose whole state is `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller; one value per call, simple over fast).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Uniform in [0, n) without modulo bias worth caring about (n < 2^32).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
}

/// Which samples each step consumes: a seeded order per epoch, a global cursor.
#[derive(Debug)]
pub struct GlobalSampler {
    seed: u64,
    len: usize,
    global_batch: usize,
    /// The permutation of the epoch last asked for (steps walk epochs in order).
    cached: Option<(u64, Vec<u32>)>,
}

impl GlobalSampler {
    /// The sampler of `len` samples (at least 1; panics otherwise) taken
    /// `global_batch` per step, in orders seeded by `seed`.
    pub fn new(seed: u64, len: usize, global_batch: usize) -> Self {
        assert!(len > 0, "a sampler needs at least one sample");
        Self {
            seed,
            len,
            global_batch,
            cached: None,
        }
    }

    /// The global sample cursor before `step` (0-based): samples consumed so far.
    pub fn cursor(&self, step: u64) -> u64 {
        step * self.global_batch as u64
    }

    /// The order of `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.len as u32).collect();
        let mut rng =
            SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xd134_2543_de82_ef95) ^ 0x5a3c);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order
    }

    /// Sample indices of `rank`'s slice of `step`: positions
    /// `[cursor + rank * per_rank, cursor + (rank + 1) * per_rank)` of the global order.
    pub fn rank_slice(&mut self, step: u64, rank: usize, per_rank: usize) -> Vec<usize> {
        self.rank_samples(step, rank, per_rank)
            .into_iter()
            .map(|(_, i)| i)
            .collect()
    }

    /// [`GlobalSampler::rank_slice`] with each sample's epoch.
    pub fn rank_samples(&mut self, step: u64, rank: usize, per_rank: usize) -> Vec<Sample> {
        let start = self.cursor(step) + (rank * per_rank) as u64;
        (start..start + per_rank as u64)
            .map(|p| self.at(p))
            .collect()
    }

    fn at(&mut self, position: u64) -> Sample {
        let epoch = position / self.len as u64;
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.cached = Some((epoch, self.epoch_order(epoch)));
        }
        let order = &self.cached.as_ref().expect("cached above").1;
        (
            Some(epoch),
            order[(position % self.len as u64) as usize] as usize,
        )
    }
}

/// The contiguous slice `[start, end)` of `len` held-out samples that `rank` evaluates.
pub fn eval_slice(len: usize, rank: usize, world_size: usize) -> std::ops::Range<usize> {
    (len * rank / world_size)..(len * (rank + 1) / world_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_of_all_ranks_cover_the_global_batch_whatever_the_world_size() {
        let mut s = GlobalSampler::new(7, 100, 24);
        for step in [0u64, 3, 4, 9] {
            let whole = s.rank_slice(step, 0, 24);
            for world in [2usize, 3, 4] {
                let per = 24 / world;
                let joined: Vec<usize> = (0..world)
                    .flat_map(|r| s.rank_slice(step, r, per))
                    .collect();
                assert_eq!(joined, whole, "step {step} world {world}");
            }
        }
    }

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let s = GlobalSampler::new(1, 50, 10);
        let (a, b) = (s.epoch_order(0), s.epoch_order(1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>());
        assert_ne!(a, b);
        assert_eq!(
            a,
            GlobalSampler::new(1, 50, 10).epoch_order(0),
            "same seed, same order"
        );
        assert_ne!(
            a,
            GlobalSampler::new(2, 50, 10).epoch_order(0),
            "other seed, other order"
        );
    }

    #[test]
    fn a_step_crossing_an_epoch_boundary_takes_the_next_epoch_order() {
        let mut s = GlobalSampler::new(3, 10, 4);
        // Step 2 covers positions 8..12: the last two of epoch 0, the first two of epoch 1.
        let got = s.rank_slice(2, 0, 4);
        let (e0, e1) = (s.epoch_order(0), s.epoch_order(1));
        assert_eq!(
            got,
            vec![
                e0[8] as usize,
                e0[9] as usize,
                e1[0] as usize,
                e1[1] as usize
            ]
        );
    }

    #[test]
    fn synthetic_data_is_seeded_and_learnable_shape() {
        let spec = DataSpec {
            kind: DataKind::Synthetic,
            train: vec![],
            eval: vec![],
            classes: Some(4),
            samples: 200,
            eval_samples: 50,
            features: 8,
            seq_len: None,
            token_dtype: Default::default(),
        };
        let table = |s: &Splits| match (&s.train, &s.eval) {
            (Data::Table(t), Data::Table(e)) => (t.clone(), e.clone()),
            _ => panic!("synthetic data is a table"),
        };
        let a = load(&spec, 5, None).unwrap();
        let b = load(&spec, 5, None).unwrap();
        let (at, ae) = table(&a);
        assert_eq!(at, table(&b).0);
        assert_eq!((a.train.len(), a.eval.len(), a.classes), (200, 50, 4));
        let first = |d: &Dataset| d.batch(&[0], Device::Cpu)[0].1.shallow_clone();
        assert!(
            !first(&at).equal(&first(&ae)),
            "held-out samples are a separate stream"
        );
        // Every class appears: the teacher is not degenerate.
        assert_eq!(at.classes(), 4);
        let c = load(&spec, 6, None).unwrap();
        assert_ne!(at, table(&c).0);
    }

    #[test]
    fn eval_slices_partition_the_held_out_set() {
        for world in 1..5 {
            let mut covered = 0;
            for r in 0..world {
                let s = eval_slice(359, r, world);
                assert_eq!(s.start, covered);
                covered = s.end;
            }
            assert_eq!(covered, 359);
        }
    }
}

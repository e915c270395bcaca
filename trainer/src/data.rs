//! Datasets and the global sampler.
//!
//! A dataset is held in memory as row-major float32 features and int64 labels,
//! loaded from safetensors shards (`x`: F32 [N, features], `y`: I64 or I32 [N])
//! or made by a seeded generator. Which samples a step consumes is a pure
//! function of (seed, step, rank, world size): a global order per epoch (a seeded
//! Fisher-Yates shuffle) and a global sample cursor (`step * global_batch`), so
//! any rank at any world size can compute its slice without talking to others,
//! and the cursor is all a checkpoint needs to continue the order exactly.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use kiln_proto::spec::{DataKind, DataSpec};
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Tensor};

/// Samples in memory.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Row-major features, `len() * features` values.
    pub x: Vec<f32>,
    pub y: Vec<i64>,
    pub features: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The largest label + 1.
    pub fn classes(&self) -> usize {
        self.y.iter().copied().max().map_or(0, |m| m as usize + 1)
    }

    /// Gathers `indices` into a batch on `device`: features [n, features] float32
    /// and labels [n] int64.
    pub fn batch(&self, indices: &[usize], device: Device) -> (Tensor, Tensor) {
        let f = self.features;
        let mut x = Vec::with_capacity(indices.len() * f);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            x.extend_from_slice(&self.x[i * f..(i + 1) * f]);
            y.push(self.y[i]);
        }
        let xs = Tensor::from_slice(&x).view([indices.len() as i64, f as i64]);
        let ys = Tensor::from_slice(&y);
        (xs.to_device(device), ys.to_device(device))
    }

    fn append(&mut self, other: Dataset, what: &str) -> Result<()> {
        if self.is_empty() && self.features == 0 {
            *self = other;
            return Ok(());
        }
        ensure!(
            other.features == self.features,
            "{what} has {} features per sample, earlier shards have {}",
            other.features,
            self.features
        );
        self.x.extend(other.x);
        self.y.extend(other.y);
        Ok(())
    }
}

/// Training and held-out data of a job.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Dataset,
    pub eval: Dataset,
    pub classes: usize,
}

impl Splits {
    /// sha256 over every sample and label of both splits: recorded with each
    /// checkpoint so a resume on other data is noticed.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for d in [&self.train, &self.eval] {
            h.update((d.features as u64).to_le_bytes());
            h.update((d.len() as u64).to_le_bytes());
            for v in &d.x {
                h.update(v.to_le_bytes());
            }
            for l in &d.y {
                h.update(l.to_le_bytes());
            }
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}

/// Loads (or generates) the job's data.
pub fn load(spec: &DataSpec, seed: u64) -> Result<Splits> {
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
            if !eval.is_empty() {
                ensure!(
                    eval.features == train.features,
                    "held-out shards have {} features per sample, training shards have {}",
                    eval.features,
                    train.features
                );
            }
            ensure!(
                !train.is_empty(),
                "data.train: the training shards hold no samples"
            );
            let seen = train.classes().max(eval.classes());
            let classes = spec.classes.unwrap_or(seen);
            ensure!(
                seen <= classes,
                "data.classes = {classes} but the shards hold label {}",
                seen - 1
            );
            Ok(Splits {
                train,
                eval,
                classes,
            })
        }
        DataKind::Synthetic => {
            let classes = spec.classes.unwrap_or(10);
            let teacher = Teacher::new(seed, spec.features, classes);
            Ok(Splits {
                train: teacher.generate(seed, 0, spec.samples),
                eval: teacher.generate(seed, 1, spec.eval_samples),
                classes,
            })
        }
    }
}

/// Reads one safetensors shard with `x` (F32 [N, F]) and `y` (I64 or I32 [N]).
pub fn read_shard(path: &Path) -> Result<Dataset> {
    let bytes =
        std::fs::read(path).with_context(|| format!("read data shard {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parse safetensors shard {}", path.display()))?;
    let x = st
        .tensor("x")
        .with_context(|| format!("shard {}: tensor `x`", path.display()))?;
    let y = st
        .tensor("y")
        .with_context(|| format!("shard {}: tensor `y`", path.display()))?;
    if x.dtype() != Dtype::F32 || x.shape().len() != 2 {
        bail!(
            "shard {}: `x` must be F32 [samples, features], found {:?} {:?}",
            path.display(),
            x.dtype(),
            x.shape()
        );
    }
    let (n, features) = (x.shape()[0], x.shape()[1]);
    if y.shape() != [n] {
        bail!(
            "shard {}: `y` must have shape [{n}], found {:?}",
            path.display(),
            y.shape()
        );
    }
    let xs = x
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let ys: Vec<i64> = match y.dtype() {
        Dtype::I64 => y
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => y
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
            .collect(),
        other => bail!(
            "shard {}: `y` must be I64 or I32, found {other:?}",
            path.display()
        ),
    };
    if let Some(bad) = ys.iter().find(|&&l| l < 0) {
        bail!("shard {}: negative label {bad}", path.display());
    }
    Ok(Dataset {
        x: xs,
        y: ys,
        features,
    })
}

/// A fixed random linear teacher: Gaussian inputs, label = argmax(x W).
struct Teacher {
    weights: Vec<f32>,
    features: usize,
    classes: usize,
}

impl Teacher {
    fn new(seed: u64, features: usize, classes: usize) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x7ea_c4e5);
        let weights = (0..features * classes).map(|_| rng.normal()).collect();
        Self {
            weights,
            features,
            classes,
        }
    }

    /// `stream` separates training (0) and held-out (1) samples of one seed.
    fn generate(&self, seed: u64, stream: u64, n: usize) -> Dataset {
        let mut rng = SplitMix64::new(seed.wrapping_mul(0x9e37_79b9).wrapping_add(stream + 1));
        let f = self.features;
        let mut x = Vec::with_capacity(n * f);
        let mut y = Vec::with_capacity(n);
        let mut logits = vec![0f32; self.classes];
        for _ in 0..n {
            let start = x.len();
            x.extend((0..f).map(|_| rng.normal()));
            logits.iter_mut().for_each(|l| *l = 0.0);
            for (i, &xi) in x[start..].iter().enumerate() {
                let row = &self.weights[i * self.classes..(i + 1) * self.classes];
                for (l, &w) in logits.iter_mut().zip(row) {
                    *l += xi * w;
                }
            }
            let label = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            y.push(label as i64);
        }
        Dataset { x, y, features: f }
    }
}

/// SplitMix64: small, fast, and the same on every platform (the data order must
/// not depend on a library's RNG version).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

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
        let start = self.cursor(step) + (rank * per_rank) as u64;
        (start..start + per_rank as u64)
            .map(|p| self.at(p))
            .collect()
    }

    fn at(&mut self, position: u64) -> usize {
        let epoch = position / self.len as u64;
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.cached = Some((epoch, self.epoch_order(epoch)));
        }
        let order = &self.cached.as_ref().expect("cached above").1;
        order[(position % self.len as u64) as usize] as usize
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
        };
        let a = load(&spec, 5).unwrap();
        let b = load(&spec, 5).unwrap();
        assert_eq!(a.train.x, b.train.x);
        assert_eq!(a.train.y, b.train.y);
        assert_eq!((a.train.len(), a.eval.len(), a.classes), (200, 50, 4));
        assert_ne!(
            a.train.x[..8],
            a.eval.x[..8],
            "held-out samples are a separate stream"
        );
        // Every class appears: the teacher is not degenerate.
        assert_eq!(a.train.classes(), 4);
        let c = load(&spec, 6).unwrap();
        assert_ne!(a.train.x, c.train.x);
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

    #[test]
    fn shards_load_and_bad_shards_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.safetensors");
        let x: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let y: Vec<u8> = [0i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [
            (
                "x",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 3], &x).unwrap(),
            ),
            (
                "y",
                safetensors::tensor::TensorView::new(Dtype::I64, vec![2], &y).unwrap(),
            ),
        ];
        safetensors::serialize_to_file(tensors, None, &good).unwrap();
        let d = read_shard(&good).unwrap();
        assert_eq!((d.len(), d.features, d.classes()), (2, 3, 3));
        assert_eq!(d.x[3..], [4.0, 5.0, 6.0]);

        let bad = dir.path().join("bad.safetensors");
        let tensors = [(
            "x",
            safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 3], &x).unwrap(),
        )];
        safetensors::serialize_to_file(tensors, None, &bad).unwrap();
        let err = format!("{:#}", read_shard(&bad).unwrap_err());
        assert!(
            err.contains("bad.safetensors") && err.contains("`y`"),
            "{err}"
        );
    }
}

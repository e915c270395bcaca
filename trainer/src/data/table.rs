//! Samples held in memory as named tensors: one row per sample in every field.
//!
//! Safetensors shards hold any number of fields (`x`, `y`, `image`, `target`,
//! `anchor`, ...), each with the samples along its first dimension. Built-in
//! classifiers read `x` (float32 features) and `y` (integer labels); a
//! TorchScript module that returns its own loss receives every field by name.
//! The synthetic generator makes an `x`/`y` table.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Tensor};

use super::SplitMix64;
use crate::error::{Context, Error, Result, chain};

/// The values of one field, every sample's row back to back.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValues {
    /// Floating-point data (F32; F64, F16 and BF16 shards are widened or
    /// narrowed to float32).
    F32(Vec<f32>),
    /// Integer data (I64; I32, I16, I8, U8 and BOOL shards are widened).
    I64(Vec<i64>),
}

impl FieldValues {
    fn len(&self) -> usize {
        match self {
            FieldValues::F32(v) => v.len(),
            FieldValues::I64(v) => v.len(),
        }
    }
}

/// One named field of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The tensor's name in the shard (`x`, `y`, `tokens`, ...).
    pub name: String,
    /// Shape of one sample's row (empty for a scalar per sample).
    pub shape: Vec<usize>,
    /// Every sample's row, back to back.
    pub values: FieldValues,
}

impl Field {
    /// Values per sample.
    pub fn row_len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Samples in memory, as named fields sorted by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// The fields, sorted by name, each with one row per sample.
    pub fields: Vec<Field>,
    len: usize,
}

impl Dataset {
    /// A table of float32 features `x` [n, features] and int64 labels `y`,
    /// one per sample.
    pub fn classification(x: Vec<f32>, y: Vec<i64>, features: usize) -> Self {
        let len = y.len();
        Self {
            fields: vec![
                Field {
                    name: "x".into(),
                    shape: vec![features],
                    values: FieldValues::F32(x),
                },
                Field {
                    name: "y".into(),
                    shape: vec![],
                    values: FieldValues::I64(y),
                },
            ],
            len,
        }
    }

    /// Samples (rows of every field).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no samples (or no fields yet).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The field called `name`, if the table has one.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Values per sample of `x` (0 without an `x`).
    pub fn features(&self) -> usize {
        self.field("x").map_or(0, Field::row_len)
    }

    /// The integer labels `y`, one per sample, if the table has them.
    pub fn labels(&self) -> Option<&[i64]> {
        match self.field("y") {
            Some(Field {
                values: FieldValues::I64(y),
                shape,
                ..
            }) if shape.is_empty() => Some(y),
            _ => None,
        }
    }

    /// The largest label + 1 (0 without labels).
    pub fn classes(&self) -> usize {
        self.labels()
            .and_then(|y| y.iter().copied().max())
            .map_or(0, |m| m as usize + 1)
    }

    /// Gathers `indices` into a batch on `device`: every field as a tensor
    /// [n, row shape...] (float32 or int64), by name.
    pub fn batch(&self, indices: &[usize], device: Device) -> Vec<(String, Tensor)> {
        self.fields
            .iter()
            .map(|f| {
                let row = f.row_len();
                let mut shape = vec![indices.len() as i64];
                shape.extend(f.shape.iter().map(|&d| d as i64));
                let t = match &f.values {
                    FieldValues::F32(v) => Tensor::from_slice(&gather(v, row, indices)),
                    FieldValues::I64(v) => Tensor::from_slice(&gather(v, row, indices)),
                };
                (f.name.clone(), t.view(shape.as_slice()).to_device(device))
            })
            .collect()
    }

    /// `x` of `indices` as float32 [n, features] (classifiers, profiles).
    pub fn features_of(&self, indices: &[usize], device: Device) -> Result<Tensor> {
        let Some(Field {
            values: FieldValues::F32(x),
            ..
        }) = self.field("x")
        else {
            return Err(Error::invalid("the data has no float32 field `x`"));
        };
        let f = self.features();
        Ok(Tensor::from_slice(&gather(x, f, indices))
            .view([indices.len() as i64, f as i64])
            .to_device(device))
    }

    /// Appends `other`'s samples; both must have the same fields.
    pub fn append(&mut self, other: Dataset, what: &str) -> Result<()> {
        if self.fields.is_empty() {
            *self = other;
            return Ok(());
        }
        let names = |d: &Dataset| {
            d.fields
                .iter()
                .map(|f| format!("{} {:?}", f.name, f.shape))
                .collect::<Vec<_>>()
        };
        if names(self) != names(&other) {
            return Err(Error::invalid(format!(
                "{what} holds fields {:?} (name, per-sample shape), earlier shards hold {:?}",
                names(&other),
                names(self)
            )));
        }
        for (mine, theirs) in self.fields.iter_mut().zip(other.fields) {
            match (&mut mine.values, theirs.values) {
                (FieldValues::F32(a), FieldValues::F32(b)) => a.extend(b),
                (FieldValues::I64(a), FieldValues::I64(b)) => a.extend(b),
                _ => {
                    return Err(Error::invalid(format!(
                        "{what}: field `{}` is float in one shard and integer in another",
                        mine.name
                    )));
                }
            }
        }
        self.len += other.len;
        Ok(())
    }

    /// Feeds every field (name, shape, values) to a hasher; an `x`/`y` table
    /// hashes as it always did, so fingerprints of existing data stay put.
    pub fn hash_into(&self, h: &mut impl sha2::Digest) {
        if let (Some(FieldValues::F32(x)), Some(y), 2) = (
            self.field("x").map(|f| &f.values),
            self.labels(),
            self.fields.len(),
        ) {
            h.update((self.features() as u64).to_le_bytes());
            h.update((self.len as u64).to_le_bytes());
            for v in x {
                h.update(v.to_le_bytes());
            }
            for l in y {
                h.update(l.to_le_bytes());
            }
            return;
        }
        h.update((self.len as u64).to_le_bytes());
        for f in &self.fields {
            h.update(f.name.as_bytes());
            h.update([0]);
            for d in &f.shape {
                h.update((*d as u64).to_le_bytes());
            }
            match &f.values {
                FieldValues::F32(v) => v.iter().for_each(|x| h.update(x.to_le_bytes())),
                FieldValues::I64(v) => v.iter().for_each(|x| h.update(x.to_le_bytes())),
            }
        }
    }
}

fn gather<T: Copy>(values: &[T], row: usize, indices: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(indices.len() * row);
    for &i in indices {
        out.extend_from_slice(&values[i * row..(i + 1) * row]);
    }
    out
}

/// Reads one safetensors shard: every tensor is a field with the samples
/// along its first dimension; all fields must hold the same number of samples.
pub fn read_shard(path: &Path) -> Result<Dataset> {
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("read data shard {shown}"))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::invalid(format!("parse safetensors shard {shown}: {}", chain(&e))))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::invalid(format!("shard {shown}: holds no tensors")));
    }
    let mut fields = Vec::with_capacity(names.len());
    let mut len = None;
    for name in names {
        let t = st.tensor(&name).map_err(|e| {
            Error::invalid(format!("shard {shown}: tensor `{name}`: {}", chain(&e)))
        })?;
        let Some((&n, row)) = t.shape().split_first() else {
            return Err(Error::invalid(format!(
                "shard {shown}: `{name}` is a scalar; fields hold one row per sample along their first dimension"
            )));
        };
        match len {
            None => len = Some(n),
            Some(len) if len != n => {
                return Err(Error::invalid(format!(
                    "shard {shown}: `{name}` holds {n} samples, other fields hold {len}"
                )));
            }
            _ => {}
        }
        let data = t.data();
        let values = match t.dtype() {
            Dtype::F32 => FieldValues::F32(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Dtype::F64 => FieldValues::F32(
                data.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
            ),
            Dtype::BF16 => FieldValues::F32(
                data.chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
            ),
            Dtype::I64 => FieldValues::I64(
                data.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            ),
            Dtype::I32 => FieldValues::I64(
                data.chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                    .collect(),
            ),
            Dtype::I16 => FieldValues::I64(
                data.chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]) as i64)
                    .collect(),
            ),
            Dtype::I8 => FieldValues::I64(data.iter().map(|&b| b as i8 as i64).collect()),
            Dtype::U8 | Dtype::BOOL => FieldValues::I64(data.iter().map(|&b| b as i64).collect()),
            other => {
                return Err(Error::invalid(format!(
                    "shard {shown}: `{name}` is {other:?}; fields must be F32, F64, BF16, I64, I32, I16, I8, U8 or BOOL"
                )));
            }
        };
        debug_assert_eq!(values.len(), n * row.iter().product::<usize>());
        fields.push(Field {
            name,
            shape: row.to_vec(),
            values,
        });
    }
    let data = Dataset {
        fields,
        len: len.unwrap_or(0),
    };
    if let Some(field) = data.field("y") {
        match (&field.values, field.shape.is_empty()) {
            (FieldValues::I64(y), true) => {
                if let Some(bad) = y.iter().find(|&&l| l < 0) {
                    return Err(Error::invalid(format!(
                        "shard {shown}: negative label {bad} in `y`"
                    )));
                }
            }
            _ => {
                return Err(Error::invalid(format!(
                    "shard {shown}: `y` must be integer labels of shape [samples], found {} {:?}",
                    if matches!(field.values, FieldValues::F32(_)) {
                        "float"
                    } else {
                        "integer"
                    },
                    field.shape
                )));
            }
        }
    }
    if let Some(x) = data.field("x")
        && !matches!(x.values, FieldValues::F32(_))
    {
        return Err(Error::invalid(format!(
            "shard {shown}: `x` must be floating point [samples, features...]"
        )));
    }
    Ok(data)
}

/// A fixed random linear teacher: Gaussian inputs, label = argmax(x W).
pub(super) struct Teacher {
    weights: Vec<f32>,
    features: usize,
    classes: usize,
}

impl Teacher {
    pub(super) fn new(seed: u64, features: usize, classes: usize) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x7ea_c4e5);
        let weights = (0..features * classes).map(|_| rng.normal()).collect();
        Self {
            weights,
            features,
            classes,
        }
    }

    /// `stream` separates training (0) and held-out (1) samples of one seed.
    pub(super) fn generate(&self, seed: u64, stream: u64, n: usize) -> Dataset {
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
        Dataset::classification(x, y, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
        let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    *n,
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn classification_shards_load_and_bad_shards_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.safetensors");
        let y: Vec<u8> = [0i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        write(
            &good,
            vec![
                ("x", Dtype::F32, vec![2, 3], f32s(&[1., 2., 3., 4., 5., 6.])),
                ("y", Dtype::I64, vec![2], y),
            ],
        );
        let d = read_shard(&good).unwrap();
        assert_eq!((d.len(), d.features(), d.classes()), (2, 3, 3));
        let batch = d.batch(&[1], Device::Cpu);
        assert_eq!(batch[0].0, "x");
        assert_eq!(
            Vec::<f32>::try_from(batch[0].1.view([-1])).unwrap(),
            [4.0, 5.0, 6.0]
        );

        let bad = dir.path().join("bad.safetensors");
        let y3: Vec<u8> = [0i64, 1, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        write(
            &bad,
            vec![
                ("x", Dtype::F32, vec![2, 3], f32s(&[0.; 6])),
                ("y", Dtype::I64, vec![3], y3),
            ],
        );
        let err = format!("{:#}", read_shard(&bad).unwrap_err());
        assert!(
            err.contains("bad.safetensors") && err.contains("`y` holds 3 samples"),
            "{err}"
        );
    }

    #[test]
    fn any_named_fields_become_batches_of_their_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.safetensors");
        let target: Vec<u8> = [0.5f32, -1.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write(
            &path,
            vec![
                ("anchor", Dtype::F32, vec![3, 2, 2], f32s(&[0.; 12])),
                ("target", Dtype::F32, vec![3], target),
                ("ids", Dtype::I32, vec![3, 4], vec![1; 48]),
            ],
        );
        let d = read_shard(&path).unwrap();
        assert_eq!((d.len(), d.features(), d.labels()), (3, 0, None));
        let batch = d.batch(&[2, 0], Device::Cpu);
        let shapes: Vec<(String, Vec<i64>, tch::Kind)> = batch
            .iter()
            .map(|(n, t)| (n.clone(), t.size(), t.kind()))
            .collect();
        assert_eq!(
            shapes,
            vec![
                ("anchor".into(), vec![2, 2, 2], tch::Kind::Float),
                ("ids".into(), vec![2, 4], tch::Kind::Int64),
                ("target".into(), vec![2], tch::Kind::Float),
            ]
        );
        assert_eq!(
            Vec::<f32>::try_from(&batch[2].1).unwrap(),
            [2.0, 0.5],
            "rows follow the indices"
        );
        // Appending a shard with other fields is refused, naming it.
        let mut other = Dataset::classification(vec![0.0; 4], vec![0, 1], 2);
        let err = other
            .append(d, "pairs.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pairs.safetensors"), "{err}");
    }
}

//! The weights digest: one sha256 over a model's parameters in a canonical
//! order, so two runs (or a run and a checkpoint) compare bit for bit.
//!
//! For each tensor, sorted by name: the name's length (u64 LE) and bytes, the
//! dtype name's length and bytes, the rank (u64 LE), each dimension (u64 LE),
//! the data length (u64 LE) and the data. Lengths make the encoding unambiguous.

use sha2::{Digest, Sha256};

use crate::tensor::TensorView;

/// Hex sha256 of `tensors` in canonical order (the input order does not matter).
///
/// # Panics
/// If two tensors share a name or a view's bytes do not match its dtype and shape:
/// both are bugs in the caller, not conditions of the data.
pub fn weights_digest(tensors: &[TensorView<'_>]) -> String {
    let mut sorted: Vec<&TensorView<'_>> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    let mut hasher = Sha256::new();
    for pair in sorted.windows(2) {
        assert_ne!(
            pair[0].name, pair[1].name,
            "duplicate tensor name in digest"
        );
    }
    for t in sorted {
        assert!(
            t.is_consistent(),
            "tensor {} has {} bytes for {:?} {:?}",
            t.name,
            t.data.len(),
            t.dtype,
            t.shape
        );
        let put = |h: &mut Sha256, bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(&mut hasher, t.name.as_bytes());
        put(&mut hasher, t.dtype.name().as_bytes());
        hasher.update((t.shape.len() as u64).to_le_bytes());
        for &d in t.shape {
            hasher.update((d as u64).to_le_bytes());
        }
        put(&mut hasher, t.data);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn view<'a>(name: &'a str, shape: &'a [usize], data: &'a [u8]) -> TensorView<'a> {
        TensorView {
            name,
            dtype: DType::U8,
            shape,
            data,
        }
    }

    #[test]
    fn order_independent_but_content_sensitive() {
        let a = view("a", &[2], &[1, 2]);
        let b = view("b", &[1], &[3]);
        assert_eq!(weights_digest(&[a, b]), weights_digest(&[b, a]));
        let b2 = view("b", &[1], &[4]);
        assert_ne!(weights_digest(&[a, b]), weights_digest(&[a, b2]));
        // Same bytes, other shape or name: different digest.
        let a_flat = view("a", &[1, 2], &[1, 2]);
        assert_ne!(weights_digest(&[a, b]), weights_digest(&[a_flat, b]));
        let renamed = view("c", &[1], &[3]);
        assert_ne!(weights_digest(&[a, b]), weights_digest(&[a, renamed]));
    }

    #[test]
    #[should_panic(expected = "duplicate")]
    fn duplicate_names_are_a_bug() {
        let a = view("a", &[1], &[1]);
        weights_digest(&[a, a]);
    }
}

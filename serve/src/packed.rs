//! MKL's packed sgemm for the linear layers of served MLPs.
//!
//! At the row counts a server runs (a few to a few dozen), a linear layer's
//! forward pass spends about half its time copying the weight matrix into
//! the layout the matrix kernel wants, on every call (`perf`:
//! `mkl_blas_avx512_sgemm_scopy_right48_ea` as large as the kernel itself).
//! PyTorch's `mkl::_mkl_reorder_linear_weight` packs a weight once for a
//! given row count and `mkl::_mkl_linear` reuses it (csrc/mkl_linear.cpp
//! reaches both through the dispatcher). Measured on this machine's CPU, one
//! thread, the MLP 784-1024-1024-10: 443 against 961 µs at 8 rows, 625
//! against 911 at 16, 951 against 1,227 at 32; at 1 row it is slower (447
//! against 415), so only shapes of 8 rows and more are packed. A packed copy
//! takes about five times its weight's memory, per packed shape.
//!
//! Numerics: a packed pass is as deterministic as a plain one (the same rows
//! at the same shape give the same bits), and agrees with it to f32
//! rounding; the server's contract (docs/serving.md) is per shape, so it
//! holds.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_void};

use tch::Tensor;

use crate::error::ModelError;

unsafe extern "C" {
    fn kiln_mkl_linear_available() -> i32;
    fn kiln_mkl_pack(
        weight: *mut c_void,
        rows: i64,
        out: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    fn kiln_mkl_linear(
        x: *mut c_void,
        packed: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        rows: i64,
        out: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

/// Smallest row count worth packing for (measured: see the module doc).
pub const MIN_PACKED_ROWS: usize = 8;

/// Whether this libtorch has the packed operators (it is built with MKL).
pub fn available() -> bool {
    // SAFETY: no arguments; it only looks operators up.
    unsafe { kiln_mkl_linear_available() == 1 }
}

fn ptr(t: &Tensor) -> *mut c_void {
    // The shim reads through the pointer; it never writes the tensor.
    t.as_ptr() as *mut c_void
}

/// Runs a shim call that makes one tensor, turning its error into ours
/// (`Internal`, with the shim's message).
fn made(
    call: impl FnOnce(*mut *mut c_void, *mut c_char, usize) -> i32,
) -> Result<Tensor, ModelError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let mut error = [0 as c_char; 512];
    let rc = call(&mut out, error.as_mut_ptr(), error.len());
    if rc != 0 || out.is_null() {
        // SAFETY: the shim wrote a NUL-terminated message (snprintf) on failure.
        let message = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy();
        return Err(ModelError::Internal {
            reason: message.into_owned(),
        });
    }
    // SAFETY: on success `out` is a new heap `at::Tensor*` that nothing else
    // owns; tch frees it when the Tensor drops.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

struct Layer {
    weight: Tensor,
    bias: Tensor,
    /// The packed weight for passes of each row count.
    packed: BTreeMap<usize, Tensor>,
}

/// An MLP's layers (linear, ReLU between) with their weights packed for a
/// few row counts.
pub struct PackedMlp {
    layers: Vec<Layer>,
    bytes: usize,
}

impl std::fmt::Debug for PackedMlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMlp")
            .field("layers", &self.layers.len())
            .field("shapes", &self.shapes())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl PackedMlp {
    /// Packs `layers` (weight [out, in] and bias [out], f32, in order) for
    /// passes of each of `shapes` rows. Fails (`Internal`) on no layers or
    /// when MKL cannot pack a weight.
    pub fn new(layers: Vec<(Tensor, Tensor)>, shapes: &[usize]) -> Result<PackedMlp, ModelError> {
        if layers.is_empty() {
            return Err(ModelError::Internal {
                reason: "an MLP without layers".into(),
            });
        }
        let mut bytes = 0;
        let mut out = Vec::with_capacity(layers.len());
        for (weight, bias) in layers {
            let mut packed = BTreeMap::new();
            for &rows in shapes {
                let p = made(|out, error, len| {
                    // SAFETY: `weight` is a live tensor; the shim writes `out`
                    // and at most `len` bytes of `error`.
                    unsafe { kiln_mkl_pack(ptr(&weight), rows as i64, out, error, len) }
                })
                .map_err(|e| {
                    ModelError::internal(
                        format!("pack a {:?} weight for {rows} rows", weight.size()),
                        e,
                    )
                })?;
                bytes += p.numel() * p.kind().elt_size_in_bytes();
                packed.insert(rows, p);
            }
            out.push(Layer {
                weight,
                bias,
                packed,
            });
        }
        Ok(PackedMlp { layers: out, bytes })
    }

    /// Bytes the packed copies take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The row counts packed for.
    pub fn shapes(&self) -> Vec<usize> {
        self.layers[0].packed.keys().copied().collect()
    }

    /// Whether passes of `rows` rows run packed.
    pub fn handles(&self, rows: usize) -> bool {
        self.layers[0].packed.contains_key(&rows)
    }

    /// The MLP's output for `x` ([rows, in]), `rows` one of [`Self::shapes`];
    /// other rows, or MKL failing, are `Internal`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let rows = x.size()[0] as usize;
        let last = self.layers.len() - 1;
        let mut h = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let packed = layer
                .packed
                .get(&rows)
                .ok_or_else(|| ModelError::Internal {
                    reason: format!("no packed weight for {rows} rows"),
                })?;
            let y = made(|out, error, len| {
                // SAFETY: every tensor is live for the call; the shim writes
                // `out` and at most `len` bytes of `error`.
                unsafe {
                    kiln_mkl_linear(
                        ptr(&h),
                        ptr(packed),
                        ptr(&layer.weight),
                        ptr(&layer.bias),
                        rows as i64,
                        out,
                        error,
                        len,
                    )
                }
            })?;
            h = if i < last { y.relu() } else { y };
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn packed_passes_agree_with_plain_ones_and_are_deterministic() {
        if !available() {
            eprintln!("SKIPPED: this libtorch has no mkl:: operators");
            return;
        }
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let dims = [(96i64, 40i64), (96, 96), (5, 96)];
        let layers: Vec<(Tensor, Tensor)> = dims
            .iter()
            .map(|&(o, i)| (Tensor::randn([o, i], opts) / 8.0, Tensor::randn([o], opts)))
            .collect();
        let plain = |x: &Tensor| {
            let mut h = x.shallow_clone();
            for (k, (w, b)) in layers.iter().enumerate() {
                h = h.linear(w, Some(b));
                if k < layers.len() - 1 {
                    h = h.relu();
                }
            }
            h
        };
        let net = PackedMlp::new(
            layers
                .iter()
                .map(|(w, b)| (w.shallow_clone(), b.shallow_clone()))
                .collect(),
            &[8, 16],
        )
        .unwrap();
        assert_eq!(net.shapes(), vec![8, 16]);
        assert!(net.handles(16) && !net.handles(4));
        assert!(net.bytes() > 0);
        tch::no_grad(|| {
            let x = Tensor::randn([16, 40], opts);
            let y = net.forward(&x).unwrap();
            let want = plain(&x);
            let diff = f64::try_from((&y - &want).abs().max()).unwrap();
            assert!(diff < 1e-4, "{diff}");
            // The same rows at the same shape: the same bits, whatever the
            // other rows hold.
            let again = net.forward(&x).unwrap();
            assert!(y.equal(&again));
            let other = Tensor::cat(&[x.narrow(0, 0, 4), Tensor::zeros([12, 40], opts)], 0);
            let y2 = net.forward(&other).unwrap();
            assert!(y.narrow(0, 0, 4).equal(&y2.narrow(0, 0, 4)));
            assert!(net.forward(&Tensor::randn([4, 40], opts)).is_err());
        });
    }
}

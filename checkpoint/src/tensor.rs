//! Typed byte views of tensors.

use serde::{Deserialize, Serialize};

/// Element types a checkpoint can hold; names follow safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DType {
    /// IEEE double precision.
    F64,
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16: the upper half of an `F32`.
    BF16,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned byte.
    U8,
    /// One byte per element, 0 or 1.
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The safetensors name (`F32`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// The element type of a safetensors dtype; `None` for the ones a
    /// checkpoint cannot hold (the float8 and unsigned 16 to 64-bit types).
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::BOOL => DType::Bool,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::I16 => DType::I16,
            S::I32 => DType::I32,
            S::I64 => DType::I64,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            _ => return None,
        })
    }
}

/// A named tensor as little-endian bytes, borrowed from wherever it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorView<'a> {
    /// The tensor's name, unique in a state (`model/fc1.weight`).
    pub name: &'a str,
    /// How to read the bytes; with `shape`, fixes their length.
    pub dtype: DType,
    /// Dimensions, outermost first; empty for a scalar.
    pub shape: &'a [usize],
    /// The elements, row-major, little-endian; [`TensorView::is_consistent`]
    /// says whether the length fits `dtype` and `shape`.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements the shape describes.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the byte length matches dtype and shape.
    pub fn is_consistent(&self) -> bool {
        self.numel() * self.dtype.size() == self.data.len()
    }
}

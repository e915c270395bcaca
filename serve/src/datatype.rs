//! Tensor datatypes of the Open Inference Protocol v2 (KServe v2) and their
//! mapping to checkpoint dtypes.

use kiln_checkpoint::DType;
use serde::{Deserialize, Serialize};

/// A tensor datatype as the protocol spells it (`"FP32"`, `"INT64"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Datatype {
    /// `BOOL`: one byte per element, 0 or 1.
    #[serde(rename = "BOOL")]
    Bool,
    /// `UINT8`: unsigned, 1 byte.
    #[serde(rename = "UINT8")]
    Uint8,
    /// `INT8`: signed, 1 byte.
    #[serde(rename = "INT8")]
    Int8,
    /// `INT16`: signed, 2 bytes.
    #[serde(rename = "INT16")]
    Int16,
    /// `INT32`: signed, 4 bytes.
    #[serde(rename = "INT32")]
    Int32,
    /// `INT64`: signed, 8 bytes.
    #[serde(rename = "INT64")]
    Int64,
    /// `FP16`: IEEE 754 half precision, 2 bytes.
    #[serde(rename = "FP16")]
    Fp16,
    /// `BF16`: bfloat16, 2 bytes.
    #[serde(rename = "BF16")]
    Bf16,
    /// `FP32`: IEEE 754 single precision, 4 bytes.
    #[serde(rename = "FP32")]
    Fp32,
    /// `FP64`: IEEE 754 double precision, 8 bytes.
    #[serde(rename = "FP64")]
    Fp64,
}

impl From<DType> for Datatype {
    fn from(d: DType) -> Self {
        match d {
            DType::Bool => Datatype::Bool,
            DType::U8 => Datatype::Uint8,
            DType::I8 => Datatype::Int8,
            DType::I16 => Datatype::Int16,
            DType::I32 => Datatype::Int32,
            DType::I64 => Datatype::Int64,
            DType::F16 => Datatype::Fp16,
            DType::BF16 => Datatype::Bf16,
            DType::F32 => Datatype::Fp32,
            DType::F64 => Datatype::Fp64,
        }
    }
}

impl From<Datatype> for DType {
    fn from(d: Datatype) -> Self {
        match d {
            Datatype::Bool => DType::Bool,
            Datatype::Uint8 => DType::U8,
            Datatype::Int8 => DType::I8,
            Datatype::Int16 => DType::I16,
            Datatype::Int32 => DType::I32,
            Datatype::Int64 => DType::I64,
            Datatype::Fp16 => DType::F16,
            Datatype::Bf16 => DType::BF16,
            Datatype::Fp32 => DType::F32,
            Datatype::Fp64 => DType::F64,
        }
    }
}

/// Every datatype, in the protocol's order.
pub const ALL: [Datatype; 10] = [
    Datatype::Bool,
    Datatype::Uint8,
    Datatype::Int8,
    Datatype::Int16,
    Datatype::Int32,
    Datatype::Int64,
    Datatype::Fp16,
    Datatype::Bf16,
    Datatype::Fp32,
    Datatype::Fp64,
];

impl Datatype {
    /// Bytes per element in the binary tensor data extension.
    pub fn size(self) -> usize {
        DType::from(self).size()
    }

    /// The protocol's name (`"FP32"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Bf16 => "BF16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
        }
    }

    /// The datatype a protocol name names, if kiln serves it.
    pub fn parse(name: &str) -> Option<Datatype> {
        ALL.into_iter().find(|d| d.as_str() == name)
    }
}

impl std::fmt::Display for Datatype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_round_trip() {
        assert_eq!(serde_json::to_string(&Datatype::Fp32).unwrap(), "\"FP32\"");
        let d: Datatype = serde_json::from_str("\"INT64\"").unwrap();
        assert_eq!(d, Datatype::Int64);
        assert!(serde_json::from_str::<Datatype>("\"FLOAT\"").is_err());
        for d in [DType::F32, DType::BF16, DType::I64, DType::U8, DType::Bool] {
            assert_eq!(DType::from(Datatype::from(d)), d);
            assert_eq!(Datatype::from(d).size(), d.size());
        }
        for d in ALL {
            assert_eq!(Datatype::parse(d.as_str()), Some(d));
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
        }
        assert_eq!(Datatype::parse("BYTES"), None);
    }
}

//! The protocol-neutral form of an inference request and response, between
//! the REST and gRPC front ends and the models; decoding of input tensor data
//! (binary, JSON or typed lists) into the model's `f32` rows, and encoding of
//! outputs.
//!
//! Decoding is strict: the input's name, datatype and shape must match the
//! version's signature, the element count must match the shape, integers
//! must fit their datatype, and every failure names the tensor and says what
//! was expected.

use std::time::Duration;

use bytes::Bytes;

use crate::datatype::Datatype;
use crate::error::{ErrorKind, RequestError};
use crate::signature::IoSpec;

/// An input tensor as received.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    /// The input's name; checked against the signature.
    pub name: String,
    /// As the client spelled it; checked against the signature.
    pub datatype: String,
    /// As the client gave it (possibly negative or overflowing: checked
    /// when decoded).
    pub shape: Vec<i64>,
    /// Its elements, not yet converted.
    pub data: InputData,
}

/// An input tensor's elements as they arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum InputData {
    /// Little-endian bytes (the binary data extension, gRPC raw contents).
    Raw(Bytes),
    /// Numbers from JSON or typed gRPC lists, row-major.
    Numbers(Vec<Number>),
    /// Booleans from JSON or gRPC `bool_contents`.
    Bools(Vec<bool>),
    /// A JSON tensor's `data` as text, converted (by [`parse_json_data`])
    /// once the element count its shape allows is known.
    Json(Bytes),
}

/// A number as a client sent it: integers stay exact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// An integer that fits `i64` (JSON, gRPC's signed lists).
    Int(i64),
    /// An unsigned integer: past `i64::MAX` in JSON, or from gRPC's
    /// unsigned lists.
    Uint(u64),
    /// A floating-point number: JSON with a fraction or exponent (or an
    /// integer past 64 bits), gRPC's float lists.
    Float(f64),
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    /// The output's name; checked against the signature.
    pub name: String,
    /// REST only: send this output as binary data (`binary_data` parameter);
    /// `None`: the request's default.
    pub binary: Option<bool>,
}

/// A request in protocol-neutral form.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: Option<String>,
    /// The inputs as received (the signature allows exactly one).
    pub inputs: Vec<InputTensor>,
    /// `None`: every output of the version.
    pub outputs: Option<Vec<RequestedOutput>>,
    /// REST only: outputs default to binary data (`binary_data_output`).
    pub binary_output: bool,
    /// The client's own time limit (`timeout` parameter).
    pub timeout: Option<Duration>,
}

/// An output tensor's elements.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    /// `FP32` values (logits, probabilities).
    F32(Vec<f32>),
    /// `INT64` values (predicted classes).
    I64(Vec<i64>),
}

/// One output of a response.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    /// The output's name in the signature.
    pub name: String,
    /// Its datatype (that of `data`).
    pub datatype: Datatype,
    /// Rows first.
    pub shape: Vec<i64>,
    /// Its elements, row-major.
    pub data: OutputData,
    /// REST: send as binary data.
    pub binary: bool,
}

/// A response in protocol-neutral form.
#[derive(Debug, Clone, PartialEq)]
pub struct InferResponse {
    /// The model asked for.
    pub model_name: String,
    /// The version that answered, in decimal.
    pub model_version: String,
    /// The request's id, echoed.
    pub id: Option<String>,
    /// The outputs asked for, in the order asked (else the signature's).
    pub outputs: Vec<OutputTensor>,
    /// The forward passes of its batch (not sent; for the overhead metric).
    pub compute: Duration,
}

impl OutputData {
    /// Elements as little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            OutputData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Elements as a flat JSON array. `f32` values are written as their exact
    /// `f64` value, so that a reader parsing either `f32` or `f64` gets the
    /// same bits back (the shortest `f32` spelling, parsed as `f64` and then
    /// rounded to `f32`, can land on a neighbour).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            OutputData::F32(v) => v
                .iter()
                .map(|&x| {
                    serde_json::Number::from_f64(f64::from(x))
                        .map(serde_json::Value::Number)
                        .unwrap_or(serde_json::Value::Null)
                })
                .collect(),
            OutputData::I64(v) => v.iter().map(|&x| serde_json::Value::from(x)).collect(),
        }
    }

    /// Whether every value can be written as JSON (NaN and infinities cannot).
    pub fn json_safe(&self) -> bool {
        match self {
            OutputData::F32(v) => v.iter().all(|x| x.is_finite()),
            OutputData::I64(_) => true,
        }
    }
}

/// A request's input decoded for the model: `rows` samples of
/// `features` values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedInput {
    /// Samples in the request.
    pub rows: usize,
    /// rows x features values.
    pub values: Vec<f32>,
}

fn bad(message: String) -> RequestError {
    RequestError::bad_request(message)
}

/// A language model request's token ids: `rows` sequences of `len` ids each,
/// row-major, every id below the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInput {
    /// Sequences in the request.
    pub rows: usize,
    /// Ids per sequence (1 to the model's context).
    pub len: usize,
    /// rows x len ids.
    pub ids: Vec<i64>,
}

/// The one input of a request, checked for the version's name and datatype.
fn the_input<'a>(io: &IoSpec, inputs: &'a [InputTensor]) -> Result<&'a InputTensor, RequestError> {
    let want = &io.input;
    let t = match inputs {
        [t] => t,
        [] => {
            return Err(bad(format!(
                "the request has no inputs; the model takes one: {} ({} {:?})",
                want.name, want.datatype, want.shape
            )));
        }
        more => {
            let names: Vec<&str> = more.iter().map(|t| t.name.as_str()).collect();
            return Err(bad(format!(
                "the request has {} inputs ({}); the model takes one: {}",
                more.len(),
                names.join(", "),
                want.name
            )));
        }
    };
    if t.name != want.name {
        return Err(bad(format!(
            "unexpected input {:?}; the model's input is {:?}",
            t.name, want.name
        )));
    }
    if t.datatype != want.datatype.as_str() {
        return Err(bad(format!(
            "input {}: datatype {:?} does not match the model's {}",
            t.name, t.datatype, want.datatype
        )));
    }
    Ok(t)
}

fn check_rows(name: &str, rows: usize, max_rows: usize) -> Result<(), RequestError> {
    if rows == 0 {
        return Err(bad(format!("input {name}: a batch of 0 rows")));
    }
    if rows > max_rows {
        return Err(RequestError::new(
            ErrorKind::TooLarge,
            format!(
                "input {name}: {rows} rows is more than this server's limit of {max_rows} rows per request"
            ),
        ));
    }
    Ok(())
}

/// Checks `inputs` against the version's input and decodes them.
pub fn decode_inputs(
    io: &IoSpec,
    inputs: &[InputTensor],
    max_rows: usize,
) -> Result<DecodedInput, RequestError> {
    let want = &io.input;
    let t = the_input(io, inputs)?;
    let shape_ok = t.shape.len() == want.shape.len()
        && t.shape.iter().all(|&d| d >= 0)
        && t.shape[1..] == want.shape[1..];
    if !shape_ok {
        return Err(bad(format!(
            "input {}: shape {:?} does not match the model's {:?} (-1: any number of rows)",
            t.name, t.shape, want.shape
        )));
    }
    let rows = t.shape[0] as usize;
    check_rows(&t.name, rows, max_rows)?;
    let numel = rows * io.features;
    let data = elements(t, numel)?;
    let values = match &*data {
        InputData::Raw(bytes) => decode_raw(&t.name, want.datatype, bytes, numel)?,
        InputData::Numbers(numbers) => {
            check_count(&t.name, numbers.len(), numel)?;
            numbers
                .iter()
                .enumerate()
                .map(|(i, &n)| number_to_f32(&t.name, want.datatype, i, n))
                .collect::<Result<_, _>>()?
        }
        InputData::Bools(bools) => {
            if want.datatype != Datatype::Bool {
                return Err(bad(format!(
                    "input {}: booleans given for a {} tensor",
                    t.name, want.datatype
                )));
            }
            check_count(&t.name, bools.len(), numel)?;
            bools.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect()
        }
        InputData::Json(_) => unreachable!("JSON data is parsed above"),
    };
    Ok(DecodedInput { rows, values })
}

/// Checks `inputs` against a language model's input (`[batch, t]` integer
/// ids, `1 <= t <= context`, every id below the vocabulary) and decodes them.
pub fn decode_token_ids(
    io: &IoSpec,
    inputs: &[InputTensor],
    max_rows: usize,
) -> Result<TokenInput, RequestError> {
    let t = the_input(io, inputs)?;
    let (context, vocab) = (io.features, io.classes);
    let (rows, len) = match t.shape.as_slice() {
        &[rows, len] if rows >= 0 && len >= 0 => (rows as usize, len as usize),
        shape => {
            return Err(bad(format!(
                "input {}: shape {shape:?} must be [batch, tokens] (the model's is {:?})",
                t.name, io.input.shape
            )));
        }
    };
    check_rows(&t.name, rows, max_rows)?;
    if len == 0 {
        return Err(bad(format!("input {}: sequences of 0 tokens", t.name)));
    }
    if len > context {
        return Err(bad(format!(
            "input {}: sequences of {len} tokens are longer than the model's context of {context}",
            t.name
        )));
    }
    if let Some(fixed) = io.input.shape.get(1).filter(|&&d| d != -1)
        && len as i64 != *fixed
    {
        return Err(bad(format!(
            "input {}: shape {:?} does not match the model's {:?}",
            t.name, t.shape, io.input.shape
        )));
    }
    let numel = rows * len;
    let data = elements(t, numel)?;
    let ids: Vec<i64> = match &*data {
        InputData::Raw(bytes) => {
            let size = io.input.datatype.size();
            if bytes.len() != numel * size {
                return Err(bad(format!(
                    "input {}: {} bytes of data for {numel} {} values ({} bytes)",
                    t.name,
                    bytes.len(),
                    io.input.datatype,
                    numel * size
                )));
            }
            match io.input.datatype {
                Datatype::Int32 => bytes
                    .chunks_exact(4)
                    .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect(),
                _ => bytes
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            }
        }
        InputData::Numbers(numbers) => {
            check_count(&t.name, numbers.len(), numel)?;
            numbers
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    match n {
                        Number::Int(v) => Ok(v),
                        Number::Uint(u) => i64::try_from(u).map_err(|_| u64::MAX as i64),
                        Number::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
                        Number::Float(_) => Err(-1),
                    }
                    .map_err(|_| {
                        bad(format!(
                            "input {}: element {i} ({}) is not a token id (a whole number)",
                            t.name,
                            show(n)
                        ))
                    })
                })
                .collect::<Result<_, _>>()?
        }
        InputData::Bools(_) => {
            return Err(bad(format!(
                "input {}: booleans given for token ids",
                t.name
            )));
        }
        InputData::Json(_) => unreachable!("JSON data is parsed above"),
    };
    if let Some(i) = ids.iter().position(|&id| id < 0 || id >= vocab as i64) {
        return Err(bad(format!(
            "input {}: element {i} is token {}, outside the vocabulary of {vocab} ids (0 to {})",
            t.name,
            ids[i],
            vocab - 1
        )));
    }
    Ok(TokenInput { rows, len, ids })
}

/// `t`'s elements: JSON text parsed (refused past `numel` elements), other
/// data as it came.
fn elements(
    t: &InputTensor,
    numel: usize,
) -> Result<std::borrow::Cow<'_, InputData>, RequestError> {
    Ok(match &t.data {
        InputData::Json(text) => std::borrow::Cow::Owned(parse_json_data(&t.name, text, numel)?),
        data => std::borrow::Cow::Borrowed(data),
    })
}

fn check_count(name: &str, got: usize, want: usize) -> Result<(), RequestError> {
    if got != want {
        return Err(bad(format!(
            "input {name}: {got} values for a shape that holds {want}"
        )));
    }
    Ok(())
}

fn decode_raw(
    name: &str,
    datatype: Datatype,
    bytes: &[u8],
    numel: usize,
) -> Result<Vec<f32>, RequestError> {
    let size = datatype.size();
    if bytes.len() != numel * size {
        return Err(bad(format!(
            "input {name}: {} bytes of data for {numel} {datatype} values ({} bytes)",
            bytes.len(),
            numel * size
        )));
    }
    let out = match datatype {
        Datatype::Fp32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Datatype::Fp64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Datatype::Fp16 => bytes
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Datatype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        Datatype::Int64 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Datatype::Int32 => bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
            .collect(),
        Datatype::Int16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Datatype::Int8 => bytes.iter().map(|&b| f32::from(b as i8)).collect(),
        Datatype::Uint8 => bytes.iter().map(|&b| f32::from(b)).collect(),
        Datatype::Bool => {
            if let Some(i) = bytes.iter().position(|&b| b > 1) {
                return Err(bad(format!(
                    "input {name}: byte {i} is {}; a BOOL element is 0 or 1",
                    bytes[i]
                )));
            }
            bytes.iter().map(|&b| f32::from(b)).collect()
        }
    };
    Ok(out)
}

fn number_to_f32(
    name: &str,
    datatype: Datatype,
    index: usize,
    n: Number,
) -> Result<f32, RequestError> {
    let int_range = |lo: i64, hi: i64| -> Result<f32, RequestError> {
        let v: Option<i64> = match n {
            Number::Int(i) => Some(i),
            Number::Uint(u) => i64::try_from(u).ok(),
            Number::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
            Number::Float(_) => None,
        };
        match v {
            Some(v) if (lo..=hi).contains(&v) => Ok(v as f32),
            _ => Err(bad(format!(
                "input {name}: element {index} ({}) is not a {datatype} (an integer from {lo} to {hi})",
                show(n)
            ))),
        }
    };
    match datatype {
        Datatype::Fp32 | Datatype::Fp64 | Datatype::Fp16 | Datatype::Bf16 => Ok(match n {
            Number::Int(i) => i as f32,
            Number::Uint(u) => u as f32,
            Number::Float(f) => f as f32,
        }),
        Datatype::Int64 => int_range(i64::MIN, i64::MAX),
        Datatype::Int32 => int_range(i32::MIN.into(), i32::MAX.into()),
        Datatype::Int16 => int_range(i16::MIN.into(), i16::MAX.into()),
        Datatype::Int8 => int_range(i8::MIN.into(), i8::MAX.into()),
        Datatype::Uint8 => int_range(0, 255),
        Datatype::Bool => Err(bad(format!(
            "input {name}: element {index} ({}) is a number; BOOL elements are true or false",
            show(n)
        ))),
    }
}

fn show(n: Number) -> String {
    match n {
        Number::Int(i) => i.to_string(),
        Number::Uint(u) => u.to_string(),
        Number::Float(f) => f.to_string(),
    }
}

/// IEEE half precision to single (exact: every half is a single).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: shift the mantissa up to an implicit leading one.
            let mut e: u32 = 127 - 15 + 1;
            let mut m = mant;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// Deepest nesting of `data` arrays accepted.
const MAX_DATA_DEPTH: usize = 64;

/// Flattens a JSON tensor's `data` (flat or nested row-major arrays of
/// numbers or booleans), given as its JSON text, into numbers or booleans;
/// refuses more than `max_elements` of them as soon as it sees one more (so
/// memory never grows past what the tensor's shape allows).
///
/// This is the fast path for large FP32 tensors: the request's JSON is
/// parsed with `data` kept as raw text (`serde_json::value::RawValue`, which
/// checks its syntax without converting numbers), then one pass over the
/// bytes converts each element straight into a flat vector, integers exactly
/// and other numbers with a correctly rounded parser (`fast-float2`). No
/// JSON tree is built. `serve/examples/json_parse.rs` measures it against
/// the tree and the binary extension.
pub fn parse_json_data(
    name: &str,
    text: &[u8],
    max_elements: usize,
) -> Result<InputData, RequestError> {
    let holds = |what: &str| {
        bad(format!(
            "input {name}: data holds {what}; expected numbers or booleans in (nested) arrays"
        ))
    };
    let mut numbers: Vec<Number> = Vec::with_capacity(max_elements.min(text.len() / 2 + 1));
    let mut bools: Vec<bool> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < text.len() {
        if numbers.len() + bools.len() > max_elements {
            return Err(bad(format!(
                "input {name}: more than {max_elements} values for a shape that holds {max_elements}"
            )));
        }
        match text[i] {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => i += 1,
            b'[' => {
                depth += 1;
                if depth > MAX_DATA_DEPTH {
                    return Err(bad(format!(
                        "input {name}: data is nested more than {MAX_DATA_DEPTH} arrays deep"
                    )));
                }
                i += 1;
            }
            b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b't' if text[i..].starts_with(b"true") => {
                bools.push(true);
                i += 4;
            }
            b'f' if text[i..].starts_with(b"false") => {
                bools.push(false);
                i += 5;
            }
            b'-' | b'0'..=b'9' => {
                let (number, len) = parse_number(&text[i..]).ok_or_else(|| {
                    let end = text[i..]
                        .iter()
                        .position(|&b| matches!(b, b',' | b']' | b' ' | b'\n' | b'\r' | b'\t'))
                        .map_or(text.len(), |n| i + n);
                    holds(&format!("{:?}", String::from_utf8_lossy(&text[i..end])))
                })?;
                numbers.push(number);
                i += len;
            }
            b'n' => return Err(holds("null")),
            b'"' => return Err(holds("a string")),
            b'{' => return Err(holds("an object")),
            other => return Err(holds(&format!("{:?}", char::from(other)))),
        }
    }
    if numbers.len() + bools.len() > max_elements {
        return Err(bad(format!(
            "input {name}: more than {max_elements} values for a shape that holds {max_elements}"
        )));
    }
    match (numbers.is_empty(), bools.is_empty()) {
        (_, true) => Ok(InputData::Numbers(numbers)),
        (true, false) => Ok(InputData::Bools(bools)),
        (false, false) => Err(bad(format!(
            "input {name}: data mixes numbers and booleans"
        ))),
    }
}

/// The JSON number at the start of `text` and its length in bytes:
/// integers exactly (as `i64`, else `u64`), anything else as the nearest
/// `f64`. `None` when no number ends cleanly there (at a delimiter or the end).
fn parse_number(text: &[u8]) -> Option<(Number, usize)> {
    let negative = text.first() == Some(&b'-');
    let digits = text[usize::from(negative)..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let end = usize::from(negative) + digits;
    let ends_cleanly = |at: usize| {
        text.get(at)
            .is_none_or(|b| matches!(b, b',' | b']' | b' ' | b'\n' | b'\r' | b'\t'))
    };
    if digits > 0 && ends_cleanly(end) {
        // An integer: exact when it fits 64 bits.
        let mut magnitude: u64 = 0;
        let mut exact = true;
        for &b in &text[usize::from(negative)..end] {
            match magnitude
                .checked_mul(10)
                .and_then(|m| m.checked_add(u64::from(b - b'0')))
            {
                Some(m) => magnitude = m,
                None => {
                    exact = false;
                    break;
                }
            }
        }
        if exact {
            if !negative {
                return Some((
                    i64::try_from(magnitude).map_or(Number::Uint(magnitude), Number::Int),
                    end,
                ));
            }
            if magnitude <= i64::MAX as u64 + 1 {
                return Some((Number::Int((magnitude as i64).wrapping_neg()), end));
            }
        }
    }
    match fast_float2::parse_partial::<f64, _>(text) {
        Ok((v, n)) if n > 0 && ends_cleanly(n) => Some((Number::Float(v), n)),
        _ => None,
    }
}

/// Flattens a JSON tensor already parsed into a tree (`data`: flat or
/// nested row-major arrays) into numbers or booleans.
pub fn json_data(name: &str, data: &serde_json::Value) -> Result<InputData, RequestError> {
    parse_json_data(name, data.to_string().as_bytes(), usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_checkpoint::registry::Signature;

    fn io() -> IoSpec {
        IoSpec::from_signature(&Signature::classifier(3, 2), 3, 2).unwrap()
    }

    fn input(datatype: &str, shape: &[i64], data: InputData) -> InputTensor {
        InputTensor {
            name: "input".into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    #[test]
    fn decodes_raw_and_json_alike() {
        let values = [1.5f32, -2.0, 3.25, 0.0, 1e-8, 7.0];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = decode_inputs(
            &io(),
            &[input("FP32", &[2, 3], InputData::Raw(raw.into()))],
            10,
        )
        .unwrap();
        assert_eq!(a.rows, 2);
        assert_eq!(a.values, values);
        let json: serde_json::Value = serde_json::json!([[1.5, -2.0, 3.25], [0.0, 1e-8, 7]]);
        let data = json_data("input", &json).unwrap();
        let b = decode_inputs(&io(), &[input("FP32", &[2, 3], data)], 10).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn refuses_mismatches_with_a_reason() {
        let io = io();
        let err = |t: InputTensor, max: usize| decode_inputs(&io, &[t], max).unwrap_err();
        let nums = |n: usize| InputData::Numbers(vec![Number::Float(0.5); n]);
        let e = err(input("FP64", &[1, 3], nums(3)), 10);
        assert!(e.message.contains("datatype \"FP64\""), "{e}");
        let e = err(input("FP32", &[1, 4], nums(4)), 10);
        assert!(e.message.contains("shape [1, 4]"), "{e}");
        let e = err(input("FP32", &[2, 3], nums(5)), 10);
        assert!(e.message.contains("5 values"), "{e}");
        let e = err(input("FP32", &[11, 3], nums(33)), 10);
        assert_eq!(e.kind, ErrorKind::TooLarge);
        let e = err(
            input("FP32", &[1, 3], InputData::Raw(vec![0u8; 11].into())),
            10,
        );
        assert!(e.message.contains("11 bytes"), "{e}");
        let e = err(input("FP32", &[0, 3], nums(0)), 10);
        assert!(e.message.contains("0 rows"), "{e}");
        let e = err(input("FP32", &[-1, 3], nums(3)), 10);
        assert!(e.message.contains("shape"), "{e}");
        let mut t = input("FP32", &[1, 3], nums(3));
        t.name = "x".into();
        assert!(err(t, 10).message.contains("\"input\""));
        let e = decode_inputs(&io, &[], 10).unwrap_err();
        assert!(e.message.contains("no inputs"), "{e}");
        assert!(json_data("input", &serde_json::json!([1, "a"])).is_err());
        assert!(json_data("input", &serde_json::json!([1, true])).is_err());
    }

    #[test]
    fn integer_datatypes_are_range_checked() {
        let sig = Signature {
            inputs: vec![kiln_checkpoint::registry::TensorSignature {
                name: "input".into(),
                datatype: "UINT8".into(),
                shape: vec![-1, 2],
            }],
            outputs: vec![],
        };
        let io = IoSpec::from_signature(&sig, 2, 2).unwrap();
        let ok = decode_inputs(
            &io,
            &[input(
                "UINT8",
                &[1, 2],
                InputData::Numbers(vec![Number::Int(0), Number::Int(255)]),
            )],
            4,
        )
        .unwrap();
        assert_eq!(ok.values, [0.0, 255.0]);
        for bad in [Number::Int(256), Number::Int(-1), Number::Float(1.5)] {
            let e = decode_inputs(
                &io,
                &[input(
                    "UINT8",
                    &[1, 2],
                    InputData::Numbers(vec![Number::Int(1), bad]),
                )],
                4,
            )
            .unwrap_err();
            assert!(e.message.contains("element 1"), "{e}");
        }
    }

    #[test]
    fn token_ids_are_checked_against_the_context_and_the_vocabulary() {
        let sig = kiln_checkpoint::registry::Signature::language_model(10);
        let io = IoSpec::language_model(&sig, 4, 10).unwrap();
        let ids = |shape: &[i64], data: InputData| InputTensor {
            name: "input_ids".into(),
            datatype: "INT64".into(),
            shape: shape.to_vec(),
            data,
        };
        let raw: Vec<u8> = [1i64, 2, 3, 9, 0, 5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = decode_token_ids(&io, &[ids(&[2, 3], InputData::Raw(raw.into()))], 8).unwrap();
        assert_eq!((a.rows, a.len), (2, 3));
        assert_eq!(a.ids, [1, 2, 3, 9, 0, 5]);
        let json = json_data("input_ids", &serde_json::json!([[1, 2, 3], [9, 0, 5]])).unwrap();
        assert_eq!(decode_token_ids(&io, &[ids(&[2, 3], json)], 8).unwrap(), a);
        let err = |t: InputTensor| decode_token_ids(&io, &[t], 8).unwrap_err();
        let nums = |v: &[i64]| InputData::Numbers(v.iter().map(|&x| Number::Int(x)).collect());
        let e = err(ids(&[1, 5], nums(&[1; 5])));
        assert!(
            e.message.contains("longer than the model's context of 4"),
            "{e}"
        );
        let e = err(ids(&[1, 2], nums(&[1, 10])));
        assert!(
            e.message.contains("token 10, outside the vocabulary"),
            "{e}"
        );
        let e = err(ids(&[1, 2], nums(&[-1, 1])));
        assert!(e.message.contains("token -1"), "{e}");
        let e = err(ids(&[1, 0], nums(&[])));
        assert!(e.message.contains("0 tokens"), "{e}");
        let e = err(ids(&[2], nums(&[1, 2])));
        assert!(e.message.contains("[batch, tokens]"), "{e}");
        let e = err(ids(
            &[1, 2],
            InputData::Numbers(vec![Number::Float(1.5), Number::Int(1)]),
        ));
        assert!(e.message.contains("not a token id"), "{e}");
        let mut t = ids(&[1, 2], nums(&[1, 2]));
        t.datatype = "FP32".into();
        assert!(err(t).message.contains("datatype"));
        let e = decode_token_ids(&io, &[ids(&[9, 1], nums(&[1; 9]))], 8).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
    }

    #[test]
    fn streaming_json_data_is_flat_checked_and_bounded() {
        let parse = |t: &str| parse_json_data("x", t.as_bytes(), 8);
        assert_eq!(
            parse("[[1, -2.5e0], [18446744073709551615, 3 ] , [1e400]]").unwrap(),
            InputData::Numbers(vec![
                Number::Int(1),
                Number::Float(-2.5),
                Number::Uint(u64::MAX),
                Number::Int(3),
                Number::Float(f64::INFINITY),
            ])
        );
        // Past u64: a float, as serde_json reads it.
        assert_eq!(
            parse("[18446744073709551616]").unwrap(),
            InputData::Numbers(vec![Number::Float(18446744073709551616.0)])
        );
        assert_eq!(
            parse("[true,[false]]").unwrap(),
            InputData::Bools(vec![true, false])
        );
        assert!(parse("[1, true]").unwrap_err().message.contains("mixes"));
        for (text, what) in [
            (r#"[1, "a"]"#, "a string"),
            ("[null]", "null"),
            (r#"[{"a": 1}]"#, "an object"),
            ("[1.2.3]", "1.2.3"),
        ] {
            let e = parse(text).unwrap_err().message;
            assert!(e.contains(what) && e.contains("numbers or booleans"), "{e}");
        }
        let deep = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        assert!(parse(&deep).unwrap_err().message.contains("nested"));
        let e = parse("[1,2,3,4,5,6,7,8,9,10]").unwrap_err().message;
        assert!(e.contains("more than 8 values"), "{e}");
        // Shortest decimal forms of f32 values come back exactly.
        let values = [0.1f32, -3.4028235e38, 1.0e-45, 0.33333334, 7.0];
        let text = serde_json::to_string(&values).unwrap();
        let InputData::Numbers(got) = parse(&text).unwrap() else {
            unreachable!()
        };
        for (n, want) in got.iter().zip(values) {
            let f = match *n {
                Number::Float(f) => f as f32,
                Number::Int(i) => i as f32,
                Number::Uint(u) => u as f32,
            };
            assert_eq!(f.to_bits(), want.to_bits());
        }
    }

    #[test]
    fn half_precision() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0200), 2f32.powi(-15));
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn outputs_round_trip_exactly_through_json() {
        let v = vec![0.1f32, 1.0 / 3.0, -7.25e-20, 16777217.0];
        let json = OutputData::F32(v.clone()).to_json();
        let back: Vec<f32> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(back, v);
        let text = serde_json::to_string(&json).unwrap();
        let back: Vec<f32> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
        assert_eq!(OutputData::I64(vec![1, -2]).to_le_bytes().len(), 16);
    }
}

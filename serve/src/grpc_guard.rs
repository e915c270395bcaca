//! What a gRPC request must pass before tonic decodes it.
//!
//! tonic authenticates nothing and decodes the whole message before a
//! service method (where the token used to be checked) runs, so an
//! unauthenticated client could make the server read, buffer and decode up
//! to `max_request_bytes` per request. This layer, in front of the gRPC
//! service, checks in order:
//!
//! 1. **The token**, from the HTTP/2 headers: every method but `ServerLive`
//!    and `ServerReady` needs the inference token when one is set. A request
//!    without it is answered `UNAUTHENTICATED` without reading its body.
//! 2. **The message size, before allocation**: the body is read frame by
//!    frame; the gRPC length prefix is checked against the limit as soon as
//!    its 5 bytes arrive (a prefix claiming 4 GiB is refused with
//!    `RESOURCE_EXHAUSTED` without reading further), and the buffer grows
//!    only with bytes actually received, never by the length the client
//!    claims. The limit is `limits.max_request_bytes` for `ModelInfer` and
//!    [`SMALL_MESSAGE_BYTES`] for every other method (their messages are a
//!    few names). The read is bounded by `limits.request_timeout_ms`.
//!    Compressed messages are refused (`INVALID_ARGUMENT`, as REST refuses a content encoding): decompression could
//!    expand past any limit checked on the wire.
//! 3. **The decoded size** of a `ModelInfer` message, computed on the wire
//!    bytes before prost decodes them ([`decoded_size`]): protobuf packs a
//!    small integer in one byte, which prost decodes to 4 or 8 bytes, and the
//!    server then holds each typed value as a 16-byte `Number` and a 4-byte
//!    `f32`; an empty repeated message costs 2 wire bytes and a whole struct
//!    in memory. A message whose decoded form would exceed
//!    `limits.max_request_bytes` is refused with `RESOURCE_EXHAUSTED`, so a
//!    64 MiB message of packed zeros cannot become gigabytes.
//!
//! The checked message then goes to tonic as one in-memory body.
//! Refusals are counted in `kiln_serve_errors_total` under
//! `model="_unknown"` (the model is not known before decoding).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use kiln_proto::inference::ModelInferRequest;
use kiln_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use kiln_proto::inference::{InferParameter, InferTensorContents};
use tower::ServiceExt;

use crate::auth;
use crate::error::{ErrorKind, RequestError};
use crate::protocol::Number;
use crate::server::{Protocol, ServerState};

/// Message limit of every method but `ModelInfer`.
pub const SMALL_MESSAGE_BYTES: usize = 64 << 10;

/// The gRPC frame header: a compression flag and a big-endian u32 length.
const FRAME_HEADER: usize = 5;

/// Methods that need no token (probes).
const OPEN_METHODS: &[&str] = &["ServerLive", "ServerReady"];

/// Checks `request` (see the module docs), then hands it to `grpc`.
pub async fn guard(state: Arc<ServerState>, grpc: Router, request: Request<Body>) -> Response {
    let received = Instant::now();
    match check(&state, request).await {
        Ok(request) => match grpc.oneshot(request).await {
            Ok(response) => response,
            Err(e) => match e {},
        },
        Err(e) => {
            let labels = state.request_labels("", false, Protocol::Grpc);
            state.record_error(&labels, &e, received);
            tonic::Status::from(e).into_http::<Body>()
        }
    }
}

async fn check(state: &ServerState, request: Request<Body>) -> Result<Request<Body>, RequestError> {
    let method = request
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    if !OPEN_METHODS.contains(&method.as_str()) {
        let authorization = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        auth::check_inference(&state.tokens, authorization)?;
    }
    let infer = method == "ModelInfer";
    let limit = if infer {
        state.config.limits.max_request_bytes
    } else {
        SMALL_MESSAGE_BYTES
    };
    let timeout = state.config.request_timeout();
    let (parts, body) = request.into_parts();
    let message = tokio::time::timeout(timeout, read_message(body, limit))
        .await
        .map_err(|_| {
            RequestError::new(
                ErrorKind::Timeout,
                format!(
                    "the request message did not arrive within {} ms",
                    timeout.as_millis()
                ),
            )
        })??;
    if infer && message.len() >= FRAME_HEADER {
        let size = decoded_size(&message[FRAME_HEADER..])?;
        if size > limit {
            return Err(RequestError::new(
                ErrorKind::TooLarge,
                format!(
                    "the request decodes to about {size} bytes in memory (typed contents take up to 28 bytes per value); this server's limit is {limit} bytes: send raw_input_contents"
                ),
            ));
        }
    }
    Ok(Request::from_parts(parts, Body::from(message.freeze())))
}

fn too_large(what: String, limit: usize) -> RequestError {
    RequestError::new(
        ErrorKind::TooLarge,
        format!("{what} is larger than this server's limit of {limit} bytes"),
    )
}

/// Reads a unary call's body: one frame of at most `limit` message bytes,
/// refused as soon as its length prefix says it is larger.
async fn read_message(mut body: Body, limit: usize) -> Result<BytesMut, RequestError> {
    let mut buf = BytesMut::new();
    let mut expected: Option<usize> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| RequestError::bad_request(format!("read the request message: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        buf.extend_from_slice(&data);
        if expected.is_none() && buf.len() >= FRAME_HEADER {
            let mut header = &buf[..FRAME_HEADER];
            let compressed = header.get_u8();
            let len = header.get_u32() as usize;
            if compressed != 0 {
                return Err(RequestError::new(
                    ErrorKind::UnsupportedMediaType,
                    "compressed messages are not accepted; send them uncompressed",
                ));
            }
            if len > limit {
                return Err(too_large(
                    format!("the request message ({len} bytes)"),
                    limit,
                ));
            }
            expected = Some(len);
        }
        // A unary call has one message; anything past it is refused as excess.
        if buf.len() > FRAME_HEADER + expected.unwrap_or(limit) {
            return Err(too_large("the request body".to_string(), limit));
        }
    }
    Ok(buf)
}

// ----- the decoded size of a ModelInferRequest, from its wire bytes -----

/// Bytes a map entry (`parameters`) takes beyond its strings: the key and
/// value structs and the hash table's share.
const MAP_ENTRY: usize =
    std::mem::size_of::<(String, InferParameter)>() + 2 * std::mem::size_of::<usize>();

/// Bytes one typed value takes at once while a request is decoded: its
/// width in prost's `Vec` (at most 8), the server's `Number`, and the `f32`
/// the network gets.
const fn value_cost(width: usize) -> usize {
    width + std::mem::size_of::<Number>() + 4
}

/// Why the wire bytes are not a protobuf message.
fn malformed(what: &str) -> RequestError {
    RequestError::bad_request(format!("malformed ModelInferRequest: {what}"))
}

/// One field of a protobuf message: its number and its value.
enum Value<'a> {
    /// A varint (wire type 0) or a fixed 32/64-bit value (wire types 5, 1).
    Scalar,
    /// A length-delimited value (wire type 2): a string, bytes, a message or
    /// a packed list.
    Bytes(&'a [u8]),
}

/// Walks the fields of one message.
struct Fields<'a> {
    rest: &'a [u8],
}

fn varint(rest: &mut &[u8]) -> Result<u64, RequestError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, tail) = rest
            .split_first()
            .ok_or_else(|| malformed("a varint is cut"))?;
        *rest = tail;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("a varint is longer than 10 bytes"))
}

/// The next `n` bytes.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], RequestError> {
    if rest.len() < n {
        return Err(malformed("a field is cut"));
    }
    let (value, tail) = rest.split_at(n);
    *rest = tail;
    Ok(value)
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), RequestError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.field())
    }
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields { rest: bytes }
    }

    fn field(&mut self) -> Result<(u64, Value<'a>), RequestError> {
        let key = varint(&mut self.rest)?;
        let (number, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => {
                varint(&mut self.rest)?;
                Value::Scalar
            }
            1 => {
                take(&mut self.rest, 8)?;
                Value::Scalar
            }
            5 => {
                take(&mut self.rest, 4)?;
                Value::Scalar
            }
            2 => {
                let len = varint(&mut self.rest)?;
                let len = usize::try_from(len).map_err(|_| malformed("a length overflows"))?;
                Value::Bytes(take(&mut self.rest, len)?)
            }
            _ => return Err(malformed("a group or an unknown wire type")),
        };
        Ok((number, value))
    }
}

/// An upper bound of the memory a `ModelInferRequest` takes once decoded and
/// turned into the server's request, computed from its wire bytes without
/// decoding them. Unknown fields cost nothing (prost drops them).
pub fn decoded_size(message: &[u8]) -> Result<usize, RequestError> {
    let mut size = std::mem::size_of::<ModelInferRequest>();
    for field in Fields::new(message) {
        size = size.saturating_add(match field? {
            // model_name, model_version, id
            (1..=3, Value::Bytes(s)) => s.len(),
            // parameters: key and value strings are at most the entry's bytes
            (4, Value::Bytes(entry)) => MAP_ENTRY + entry.len(),
            (5, Value::Bytes(input)) => input_size(input)?,
            (6, Value::Bytes(output)) => output_size(output)?,
            // raw_input_contents
            (7, Value::Bytes(raw)) => std::mem::size_of::<bytes::Bytes>() + raw.len(),
            _ => 0,
        });
    }
    Ok(size)
}

fn input_size(message: &[u8]) -> Result<usize, RequestError> {
    let mut size = std::mem::size_of::<InferInputTensor>();
    for field in Fields::new(message) {
        size = size.saturating_add(match field? {
            (1 | 2, Value::Bytes(s)) => s.len(),
            // shape: packed or one value per field; 8 bytes each in memory
            (3, Value::Bytes(packed)) => 8 * varint_count(packed),
            (3, Value::Scalar) => 8,
            (4, Value::Bytes(entry)) => MAP_ENTRY + entry.len(),
            (5, Value::Bytes(contents)) => contents_size(contents)?,
            _ => 0,
        });
    }
    Ok(size)
}

fn output_size(message: &[u8]) -> Result<usize, RequestError> {
    let mut size = std::mem::size_of::<InferRequestedOutputTensor>();
    for field in Fields::new(message) {
        size = size.saturating_add(match field? {
            (1, Value::Bytes(s)) => s.len(),
            (2, Value::Bytes(entry)) => MAP_ENTRY + entry.len(),
            _ => 0,
        });
    }
    Ok(size)
}

/// Typed tensor contents: every value at [`value_cost`] of its width.
fn contents_size(message: &[u8]) -> Result<usize, RequestError> {
    let mut size = std::mem::size_of::<InferTensorContents>();
    for field in Fields::new(message) {
        let (number, value) = field?;
        // (field, width in memory, width of a packed fixed-size value on the wire)
        let (width, fixed) = match number {
            1 => (1, None),     // bool
            2 | 4 => (4, None), // int32, uint32
            3 | 5 => (8, None), // int64, uint64
            6 => (4, Some(4)),  // float
            7 => (8, Some(8)),  // double
            8 => {
                // bytes_contents: a Vec<u8> per value
                if let Value::Bytes(b) = value {
                    size = size.saturating_add(std::mem::size_of::<Vec<u8>>() + b.len());
                }
                continue;
            }
            _ => continue,
        };
        let values = match (value, fixed) {
            (Value::Scalar, _) => 1,
            (Value::Bytes(packed), None) => varint_count(packed),
            (Value::Bytes(packed), Some(w)) => packed.len() / w,
        };
        size = size.saturating_add(values.saturating_mul(value_cost(width)));
    }
    Ok(size)
}

/// Values in a packed list of varints: each ends with a byte below 0x80.
fn varint_count(packed: &[u8]) -> usize {
    packed.iter().filter(|&&b| b & 0x80 == 0).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn request(contents: InferTensorContents, raw: Vec<bytes::Bytes>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: "INT64".into(),
                shape: vec![1_000, 8],
                parameters: Default::default(),
                contents: Some(contents),
            }],
            raw_input_contents: raw,
            ..Default::default()
        }
    }

    #[test]
    fn packed_small_integers_count_at_their_decoded_size() {
        let n = 100_000;
        let r = request(
            InferTensorContents {
                int64_contents: vec![0; n],
                ..Default::default()
            },
            vec![],
        );
        let wire = r.encode_to_vec();
        // One byte per value on the wire ...
        assert!(wire.len() < n + 100, "{}", wire.len());
        // ... and at least 28 in memory.
        let size = decoded_size(&wire).unwrap();
        assert!(size >= n * 28, "{size}");
        assert!(size < n * 28 + 1000, "{size}");
        // Unpacked (one field per value) counts the same.
        let mut unpacked = Vec::new();
        for _ in 0..1000 {
            unpacked.extend_from_slice(&[3 << 3, 0]);
        }
        let contents_len = unpacked.len();
        let mut input = vec![5 << 3 | 2];
        prost::encoding::encode_varint(contents_len as u64, &mut input);
        input.extend_from_slice(&unpacked);
        let mut message = vec![5 << 3 | 2];
        prost::encoding::encode_varint(input.len() as u64, &mut message);
        message.extend_from_slice(&input);
        assert!(ModelInferRequest::decode(&message[..]).is_ok());
        let size = decoded_size(&message).unwrap();
        assert!(size >= 1000 * 28, "{size}");
    }

    #[test]
    fn raw_contents_count_at_their_length_and_empty_entries_at_their_struct() {
        let raw = bytes::Bytes::from(vec![7u8; 1 << 20]);
        let r = request(InferTensorContents::default(), vec![raw]);
        let size = decoded_size(&r.encode_to_vec()).unwrap();
        assert!((1 << 20..(1 << 20) + 2048).contains(&size), "{size}");

        // 2 wire bytes per empty output, a whole struct each in memory.
        let r = ModelInferRequest {
            outputs: vec![Default::default(); 10_000],
            ..Default::default()
        };
        let wire = r.encode_to_vec();
        assert_eq!(wire.len(), 20_000);
        let size = decoded_size(&wire).unwrap();
        assert!(
            size >= 10_000 * std::mem::size_of::<InferRequestedOutputTensor>(),
            "{size}"
        );
    }

    #[test]
    fn malformed_wire_bytes_are_refused() {
        for bad in [
            &[0x2a, 0x05, 1][..],
            &[0x2a][..],
            &[0xff; 11][..],
            &[0x0b][..],
        ] {
            let e = decoded_size(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{bad:?}");
        }
    }
}

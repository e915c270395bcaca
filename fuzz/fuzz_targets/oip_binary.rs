//! kiln serve's binary tensor extension: a body whose first
//! `Inference-Header-Content-Length` bytes are the JSON request and the
//! rest the inputs' raw bytes (`binary_data_size` each), decoded against a
//! small classifier or language-model signature.
//!
//! Input: the header's value, a newline, then the body. The header is
//! checked and the body split as `http::read_request` does before it calls
//! `parse_request`.
#![no_main]

use bytes::Bytes;
use kiln_checkpoint::registry::Signature;
use kiln_serve::http::parse_request;
use kiln_serve::protocol::{decode_inputs, decode_token_ids};
use kiln_serve::signature::IoSpec;
use libfuzzer_sys::fuzz_target;

const DATATYPES: [&str; 6] = ["FP32", "FP16", "BF16", "FP64", "INT64", "UINT8"];

fuzz_target!(|data: &[u8]| {
    let Some(newline) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let (header, body) = (&data[..newline], &data[newline + 1..]);
    let Some(json_len) = std::str::from_utf8(header)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    else {
        return;
    };
    if json_len > body.len() {
        return;
    }
    let body = Bytes::copy_from_slice(body);
    let Ok(request) = parse_request(&body[..json_len], body.slice(json_len..)) else {
        return;
    };
    let pick = header.len() + json_len;
    let mut sig = Signature::classifier(4, 3);
    sig.inputs[0].datatype = DATATYPES[pick % DATATYPES.len()].into();
    if let Ok(io) = IoSpec::from_signature(&sig, 4, 3)
        && let Ok(decoded) = decode_inputs(&io, &request.inputs, 1 << 10)
    {
        assert_eq!(decoded.values.len(), decoded.rows * 4);
    }
    let io = IoSpec::language_model(&Signature::language_model(50), 8, 50)
        .expect("the language model signature is valid");
    if let Ok(tokens) = decode_token_ids(&io, &request.inputs, 1 << 10) {
        assert_eq!(tokens.ids.len(), tokens.rows * tokens.len);
    }
});

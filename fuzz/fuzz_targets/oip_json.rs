//! kiln serve's JSON infer request (`POST /v2/models/{name}/infer` without
//! the binary extension): the request parsed, then its input checked and
//! decoded against a small classifier or language-model signature, which
//! runs `parse_json_data` on the tensor's `data` text.
//!
//! Input: one selector byte (signature and row limit), then the JSON body.
#![no_main]

use bytes::Bytes;
use kiln_checkpoint::registry::{Signature, TensorSignature};
use kiln_serve::http::parse_request;
use kiln_serve::protocol::{decode_inputs, decode_token_ids, parse_json_data};
use kiln_serve::signature::IoSpec;
use libfuzzer_sys::fuzz_target;

const DATATYPES: [&str; 10] = [
    "FP32", "FP16", "BF16", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL",
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    let max_rows = [1, 4, 1 << 16][usize::from(which >> 4) % 3];
    // The fast path on its own, with a limit on the elements it may produce.
    let _ = parse_json_data("input", json, 64);
    let Ok(request) = parse_request(json, Bytes::new()) else {
        return;
    };
    if which & 1 == 0 {
        let mut sig = Signature::classifier(4, 3);
        sig.inputs[0].datatype = DATATYPES[usize::from(which >> 1) % DATATYPES.len()].into();
        let io = IoSpec::from_signature(&sig, 4, 3)
            .or_else(|_| IoSpec::from_signature(&Signature::classifier(4, 3), 4, 3))
            .expect("the classifier signature is valid");
        if let Ok(decoded) = decode_inputs(&io, &request.inputs, max_rows) {
            assert_eq!(decoded.values.len(), decoded.rows * 4);
        }
    } else {
        let mut sig = Signature::language_model(50);
        if which & 2 != 0 {
            sig.inputs[0] = TensorSignature {
                name: "input_ids".into(),
                datatype: "INT32".into(),
                shape: vec![-1, 8],
            };
        }
        let io = IoSpec::language_model(&sig, 8, 50)
            .or_else(|_| IoSpec::language_model(&Signature::language_model(50), 8, 50))
            .expect("the language model signature is valid");
        if let Ok(tokens) = decode_token_ids(&io, &request.inputs, max_rows) {
            assert_eq!(tokens.ids.len(), tokens.rows * tokens.len);
            assert!(tokens.ids.iter().all(|&id| (0..50).contains(&id)));
        }
    }
});

//! What parsing an inference request costs per tensor element, by path:
//! the JSON tree (`serde_json::Value`, then flattened: how kiln parsed
//! before), kiln's fast JSON path (`http::parse_request` keeps `data` as
//! text, `protocol::parse_json_data` converts it in one pass), and the binary
//! tensor data extension (little-endian bytes). Each ends with the f32 values
//! a forward pass takes. Run:
//! `cargo run --release -p kiln-serve --example json_parse [ROWS...]`.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use kiln_serve::http::parse_request;
use kiln_serve::protocol::{InputData, Number, json_data, parse_json_data};

const FEATURES: usize = 784;

/// ns per element of `f` over `reps` runs of `elements` elements (best of 5).
fn ns_per_element(elements: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / (reps * elements) as f64);
    }
    best
}

/// Numbers as the f32 values a forward pass takes.
fn to_f32(data: InputData) -> Vec<f32> {
    let InputData::Numbers(numbers) = data else {
        unreachable!()
    };
    numbers
        .into_iter()
        .map(|n| match n {
            Number::Int(i) => i as f32,
            Number::Uint(u) => u as f32,
            Number::Float(f) => f as f32,
        })
        .collect()
}

fn main() {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ROWS are whole numbers"))
        .collect();
    let rows = if rows.is_empty() { vec![1, 64] } else { rows };
    println!(
        "rows  elements  body_bytes  json_tree_ns/elt  streaming_ns/elt  speedup  binary_ns/elt"
    );
    for n in rows {
        let elements = n * FEATURES;
        // Values as a client's JSON encoder writes them (shortest round trip).
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let values: Vec<f32> = (0..elements)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 1_000_000) as f32 / 500_000.0 - 1.0
            })
            .collect();
        let body = serde_json::json!({
            "inputs": [{"name": "input", "shape": [n, FEATURES], "datatype": "FP32", "data": values}]
        })
        .to_string()
        .into_bytes();
        let reps = (2_000_000 / elements).max(3);
        let tree = ns_per_element(elements, reps, || {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            black_box(to_f32(json_data("input", &v["inputs"][0]["data"]).unwrap()));
        });
        let fast = || {
            let request = parse_request(&body, Bytes::new()).unwrap();
            let InputData::Json(text) = &request.inputs[0].data else {
                unreachable!()
            };
            to_f32(parse_json_data("input", text, elements).unwrap())
        };
        let streaming = ns_per_element(elements, reps, || {
            black_box(fast());
        });
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let binary = ns_per_element(elements, reps * 20, || {
            let out: Vec<f32> = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            black_box(out);
        });
        // The fast path gives back exactly the values sent.
        let got = fast();
        assert!(
            got.iter()
                .zip(&values)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        println!(
            "{n:>4}  {elements:>8}  {:>10}  {tree:>16.1}  {streaming:>16.1}  {:>6.2}x  {binary:>13.2}",
            body.len(),
            tree / streaming
        );
    }
}

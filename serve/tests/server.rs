//! The server end to end, in process: real checkpoints in a real registry
//! (local files), a real listener on loopback, real HTTP and gRPC clients.
//!
//! Versions are small MLPs with seeded random weights, saved with the
//! checkpoint engine and registered; expected outputs are computed here with
//! the same network code (`kiln_models`) at the server's fixed batch shape,
//! and compared bit for bit.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{bits, url};
use kiln_checkpoint::CheckpointRoot;
use kiln_checkpoint::registry::{AliasTarget, ModelDefinition, NewVersion, Registry, Signature};
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::inference::model_infer_request::InferInputTensor;
use kiln_proto::inference::{InferTensorContents, ModelInferRequest, ModelMetadataRequest};
use kiln_proto::spec::{ModelKind, ModelSpec};
use kiln_serve::{RunningServer, ServeConfig};
use serde_json::{Value, json};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const FEATURES: usize = 8;
const CLASSES: usize = 3;
const BATCH: usize = 8;

fn spec() -> ModelSpec {
    ModelSpec {
        hidden: vec![16],
        channels: vec![],
        ..ModelSpec::new(ModelKind::Mlp)
    }
}

/// One version's weights, as named parameters.
#[derive(Clone)]
struct Weights(common::Params);

fn random_weights(seed: i64) -> Weights {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = kiln_models::build(&spec(), FEATURES, CLASSES, &vs).unwrap();
    Weights(common::parameters(&vs))
}

impl Weights {
    /// Logits as the fixture's server computes them: passes of exactly BATCH rows.
    fn logits(&self, rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
        self.logits_at(rows, BATCH)
    }

    /// Logits of passes of `shape` rows (zero-padded).
    fn logits_at(&self, rows: &[Vec<f32>], shape: usize) -> Vec<Vec<f32>> {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = kiln_models::build(&spec(), FEATURES, CLASSES, &vs).unwrap();
        let params = kiln_models::named_parameters(&vs);
        for ((name, p), (wn, shape, v)) in params.iter().zip(&self.0) {
            assert_eq!(name, wn);
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            tch::no_grad(|| {
                p.detach()
                    .copy_(&Tensor::from_slice(v).view(shape.as_slice()))
            });
        }
        let kiln_models::Net::Builtin(seq) = net else {
            unreachable!()
        };
        let mut out = Vec::new();
        for chunk in rows.chunks(shape) {
            let mut flat: Vec<f32> = chunk.iter().flatten().copied().collect();
            flat.resize(shape * FEATURES, 0.0);
            let x = Tensor::from_slice(&flat).view([shape as i64, FEATURES as i64]);
            let y = tch::no_grad(|| seq.forward(&x));
            assert_eq!(y.kind(), Kind::Float);
            let y = Vec::<f32>::try_from(&y.contiguous().view([-1])).unwrap();
            for r in 0..chunk.len() {
                out.push(y[r * CLASSES..(r + 1) * CLASSES].to_vec());
            }
        }
        out
    }
}

/// A registry with versions 1 and 2 of model `m` (different weights) and
/// alias `prod` -> 1.
struct Fixture {
    _dir: tempfile::TempDir,
    registry_url: String,
    registry: Registry,
    weights: Vec<Weights>,
    rt: tokio::runtime::Runtime,
}

fn new_version(root: &str, step: u64, digest: String) -> NewVersion {
    common::new_version(
        root,
        step,
        digest,
        ModelDefinition::classifier(spec(), FEATURES, CLASSES),
        Signature::classifier(FEATURES, CLASSES),
        "serve-test",
    )
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = format!("file://{}", dir.path().join("ckpt").display());
        let registry_url = format!("file://{}", dir.path().join("registry").display());
        let root = CheckpointRoot::open(&ckpt).unwrap();
        let weights = vec![random_weights(1), random_weights(2)];
        let digests: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| common::save_checkpoint(&root, i as u64 + 1, &w.0, "serve-test"))
            .collect();
        let rt = common::runtime();
        let registry = rt.block_on(Registry::open(&registry_url)).unwrap();
        rt.block_on(async {
            for (i, d) in digests.into_iter().enumerate() {
                let v = registry
                    .register("m", new_version(&ckpt, i as u64 + 1, d), "test")
                    .await
                    .unwrap();
                assert_eq!(v.version, i as u64 + 1);
            }
            registry
                .promote("m", "prod", 1, None, "test")
                .await
                .unwrap();
        });
        Fixture {
            _dir: dir,
            registry_url,
            registry,
            weights,
            rt,
        }
    }

    fn config(&self) -> ServeConfig {
        let mut c = ServeConfig {
            registry: self.registry_url.clone(),
            models: vec!["m@prod".into()],
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        c.batching.max_batch_size = BATCH;
        // One shape: answers independent of batching, bit for bit, so that
        // every test can compare with passes of BATCH rows.
        c.batching.batch_shapes = vec![BATCH];
        c.batching.max_queue_delay_us = 1000;
        c.swap.poll_interval_ms = 50;
        c.swap.canary_seed = Some(42);
        c
    }

    fn start(&self, config: ServeConfig) -> RunningServer {
        common::start(&self.rt, config)
    }

    fn stop(&self, server: RunningServer) {
        self.rt.block_on(server.shutdown()).unwrap();
    }
}

fn rows(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            (0..FEATURES)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % 2000) as f32 / 1000.0 - 1.0
                })
                .collect()
        })
        .collect()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// A JSON inference request body for `rows`.
fn json_body(rows: &[Vec<f32>]) -> String {
    json!({
        "id": "r1",
        "inputs": [{
            "name": "input",
            "shape": [rows.len(), FEATURES],
            "datatype": "FP32",
            "data": rows,
        }]
    })
    .to_string()
}

async fn infer_json(
    c: &reqwest::Client,
    url: &str,
    rows: &[Vec<f32>],
) -> (String, Vec<Vec<f32>>, Vec<i64>) {
    let r = c.post(url).body(json_body(rows)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    parse_outputs(&v, rows.len())
}

/// Sends every request at once (each on its own task); returns their
/// logits in the order of `requests`.
async fn infer_all_at_once(
    c: &reqwest::Client,
    url: &str,
    requests: &[Vec<Vec<f32>>],
) -> Vec<Vec<Vec<f32>>> {
    let tasks: Vec<_> = requests
        .iter()
        .map(|r| {
            let (c, u, r) = (c.clone(), url.to_string(), r.clone());
            tokio::spawn(async move { infer_json(&c, &u, &r).await.1 })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn parse_outputs(v: &Value, n: usize) -> (String, Vec<Vec<f32>>, Vec<i64>) {
    let outputs = v["outputs"].as_array().unwrap();
    let logits = outputs.iter().find(|o| o["name"] == "logits").unwrap();
    assert_eq!(logits["datatype"], "FP32");
    assert_eq!(logits["shape"], json!([n, CLASSES]));
    let flat: Vec<f32> = logits["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let preds = outputs.iter().find(|o| o["name"] == "predictions").unwrap();
    assert_eq!(preds["datatype"], "INT64");
    let p: Vec<i64> = preds["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    (
        v["model_version"].as_str().unwrap().to_string(),
        flat.chunks(CLASSES).map(<[f32]>::to_vec).collect(),
        p,
    )
}

fn argmax(row: &[f32]) -> i64 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as i64
}

#[test]
fn http_json_binary_and_grpc_match_the_network_bit_for_bit() {
    let f = Fixture::new();
    let server = f.start(f.config());
    let input = rows(11, 7);
    let expected = f.weights[0].logits(&input);
    f.rt.block_on(async {
        let c = http();
        // JSON in, JSON out.
        let (version, logits, preds) =
            infer_json(&c, &url(&server, "/v2/models/m/infer"), &input).await;
        assert_eq!(version, "1");
        assert_eq!(bits(&logits), bits(&expected));
        let want: Vec<i64> = expected.iter().map(|r| argmax(r)).collect();
        assert_eq!(preds, want);

        // Binary in, binary out (Triton's extension).
        let head = json!({
            "inputs": [{"name": "input", "shape": [input.len(), FEATURES], "datatype": "FP32",
                        "parameters": {"binary_data_size": input.len() * FEATURES * 4}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": true}}],
        })
        .to_string();
        let mut body = head.clone().into_bytes();
        for x in input.iter().flatten() {
            body.extend_from_slice(&x.to_le_bytes());
        }
        let r = c
            .post(url(&server, "/v2/models/m/versions/1/infer"))
            .header("Inference-Header-Content-Length", head.len())
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let json_len: usize = r.headers()["inference-header-content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let bytes = r.bytes().await.unwrap();
        let v: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
        assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
        assert_eq!(
            v["outputs"][0]["parameters"]["binary_data_size"],
            input.len() * CLASSES * 4
        );
        let got: Vec<f32> = bytes[json_len..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got: Vec<Vec<f32>> = got.chunks(CLASSES).map(<[f32]>::to_vec).collect();
        assert_eq!(bits(&got), bits(&expected));

        // Metadata.
        let m: Value = c
            .get(url(&server, "/v2/models/m"))
            .send()
            .await
            .unwrap()
            .json_text()
            .await;
        assert_eq!(m["versions"], json!(["1"]));
        assert_eq!(
            m["inputs"][0],
            json!({"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]})
        );
        assert_eq!(m["outputs"][1]["name"], "predictions");
        for path in [
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/m/ready",
            "/v2/models/m/versions/1/ready",
        ] {
            assert_eq!(
                c.get(url(&server, path)).send().await.unwrap().status(),
                200,
                "{path}"
            );
        }
        assert_eq!(
            c.get(url(&server, "/v2/models/m/versions/2/ready"))
                .send()
                .await
                .unwrap()
                .status(),
            400
        );

        // gRPC on the same port: raw contents and typed contents.
        let mut g = GrpcInferenceServiceClient::connect(url(&server, ""))
            .await
            .unwrap();
        let raw: Vec<u8> = input
            .iter()
            .flatten()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let tensor = |contents| InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![input.len() as i64, FEATURES as i64],
            parameters: Default::default(),
            contents,
        };
        for typed in [false, true] {
            let req = ModelInferRequest {
                model_name: "m".into(),
                id: "g1".into(),
                inputs: vec![tensor(typed.then(|| InferTensorContents {
                    fp32_contents: input.iter().flatten().copied().collect(),
                    ..Default::default()
                }))],
                raw_input_contents: if typed {
                    vec![]
                } else {
                    vec![raw.clone().into()]
                },
                ..Default::default()
            };
            let resp = g.model_infer(req).await.unwrap().into_inner();
            assert_eq!(resp.model_version, "1");
            assert_eq!(resp.id, "g1");
            assert_eq!(resp.outputs[0].name, "logits");
            assert_eq!(
                resp.outputs[0].shape,
                vec![input.len() as i64, CLASSES as i64]
            );
            let got: Vec<f32> = resp.raw_output_contents[0]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let got: Vec<Vec<f32>> = got.chunks(CLASSES).map(<[f32]>::to_vec).collect();
            assert_eq!(bits(&got), bits(&expected));
            let preds: Vec<i64> = resp.raw_output_contents[1]
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(preds, want);
        }
        let meta = g
            .model_metadata(ModelMetadataRequest {
                name: "m".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(meta.inputs[0].shape, vec![-1, FEATURES as i64]);
        let e = g
            .model_infer(ModelInferRequest {
                model_name: "nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    });
    f.stop(server);
}

trait JsonText {
    async fn json_text(self) -> Value;
}

impl JsonText for reqwest::Response {
    async fn json_text(self) -> Value {
        let status = self.status();
        let text = self.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }
}

/// The server's `/metrics` text.
async fn metrics_text(c: &reqwest::Client, server: &RunningServer) -> String {
    c.get(url(server, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn batched_results_equal_unbatched_bit_for_bit() {
    let f = Fixture::new();
    // Requests sent together wait up to 200 ms for each other: they batch.
    let mut batched = f.config();
    batched.batching.max_queue_delay_us = 200_000;
    let mut alone = f.config();
    alone.batching.max_queue_delay_us = 0;
    let requests: Vec<Vec<Vec<f32>>> = (0..12).map(|i| rows(1 + i % 3, 100 + i as u64)).collect();

    let server = f.start(batched);
    let together: Vec<Vec<Vec<f32>>> = f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        infer_all_at_once(&c, &u, &requests).await
    });
    let text = f.rt.block_on(metrics_text(&http(), &server));
    let batches = metric(
        &text,
        "kiln_serve_batch_size_count{model=\"m\",version=\"1\"}",
    );
    let batch_rows = metric(
        &text,
        "kiln_serve_batch_size_sum{model=\"m\",version=\"1\"}",
    );
    assert_eq!(
        batch_rows as usize,
        requests.iter().map(Vec::len).sum::<usize>()
    );
    assert!(
        batches < requests.len() as f64,
        "{batches} batches: requests did not batch"
    );
    f.stop(server);

    let server = f.start(alone);
    let one_by_one: Vec<Vec<Vec<f32>>> = f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        let mut out = Vec::new();
        for r in &requests {
            out.push(infer_json(&c, &u, r).await.1);
        }
        out
    });
    f.stop(server);
    for (i, (a, b)) in together.iter().zip(&one_by_one).enumerate() {
        assert_eq!(bits(a), bits(b), "request {i}");
        assert_eq!(
            bits(a),
            bits(&f.weights[0].logits(&requests[i])),
            "request {i}"
        );
    }
}

/// Without a queue delay, a request that finds nothing queued and the
/// instance idle runs on the thread that parsed it (`inline_when_idle`):
/// counted as such, answering the same bits as through the compute thread;
/// concurrent requests still queue and batch behind it, each answered right.
#[test]
fn lone_requests_run_inline_with_the_bits_of_the_queue() {
    let f = Fixture::new();
    let mut config = f.config();
    config.batching.max_queue_delay_us = 0;
    let requests: Vec<Vec<Vec<f32>>> = (0..10).map(|i| rows(1 + i % 3, 500 + i as u64)).collect();
    let inline_count = "kiln_serve_inline_batches_total{model=\"m\",version=\"1\"}";
    let one_by_one = |config: ServeConfig| {
        let server = f.start(config);
        let (answers, text) = f.rt.block_on(async {
            let c = http();
            let u = url(&server, "/v2/models/m/infer");
            let mut out = Vec::new();
            for r in &requests {
                out.push(infer_json(&c, &u, r).await.1);
            }
            let text = metrics_text(&c, &server).await;
            (out, text)
        });
        f.stop(server);
        (answers, text)
    };
    let (inline, text) = one_by_one(config.clone());
    if config.inline_when_idle() {
        assert_eq!(metric(&text, inline_count), requests.len() as f64, "{text}");
    } else {
        // One core: never inline (see ServeConfig::inline_when_idle).
        eprintln!("one core: checking that nothing ran inline");
        assert!(!text.contains(inline_count), "{text}");
    }
    let mut queued = config.clone();
    queued.batching.inline_when_idle = false;
    let (through_queue, text) = one_by_one(queued);
    assert!(!text.contains(inline_count), "{text}");
    for (i, (a, b)) in inline.iter().zip(&through_queue).enumerate() {
        assert_eq!(bits(a), bits(b), "request {i}");
        assert_eq!(
            bits(a),
            bits(&f.weights[0].logits(&requests[i])),
            "request {i}"
        );
    }

    // Many at once: the first may run inline, the others wait for the
    // instance and batch; every answer is still its rows' logits.
    let server = f.start(config);
    f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        let many: Vec<Vec<Vec<f32>>> = (0..48).map(|i| rows(1 + i % 3, 700 + i as u64)).collect();
        for (got, r) in infer_all_at_once(&c, &u, &many).await.iter().zip(&many) {
            assert_eq!(bits(got), bits(&f.weights[0].logits(r)));
        }
        let text = metrics_text(&c, &server).await;
        let batches = metric(
            &text,
            "kiln_serve_batch_size_count{model=\"m\",version=\"1\"}",
        );
        assert!(batches <= 48.0, "{batches} batches for 48 requests");
    });
    f.stop(server);
}

#[test]
fn default_shapes_answer_bit_for_bit_at_their_shape_and_agree_across_shapes() {
    let f = Fixture::new();
    let mut config = f.config();
    config.batching.batch_shapes = Vec::new(); // the default: 1, 2, 4, 8
    config.instances = 2;
    let shapes = config.batch_shapes();
    assert_eq!(shapes, vec![1, 2, 4, 8]);
    let shape_for = |n: usize| shapes.iter().copied().find(|&s| s >= n).unwrap();
    let requests: Vec<Vec<Vec<f32>>> = (0..16).map(|i| rows(1 + i % 5, 300 + i as u64)).collect();

    // Alone (no queue delay, one at a time): each runs at the smallest shape
    // that holds it, and answers exactly what a pass at that shape computes.
    config.batching.max_queue_delay_us = 0;
    let server = f.start(config.clone());
    f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        for r in &requests {
            let (_, logits, _) = infer_json(&c, &u, r).await;
            assert_eq!(
                bits(&logits),
                bits(&f.weights[0].logits_at(r, shape_for(r.len()))),
                "{} rows alone",
                r.len()
            );
        }
    });
    f.stop(server);

    // Together, on two instances: each answer is what some shape's pass
    // computes, bit for bit, and every shape agrees with every other to float
    // rounding (the contract between shapes).
    config.batching.max_queue_delay_us = 100_000;
    let server = f.start(config);
    let together: Vec<Vec<Vec<f32>>> = f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        infer_all_at_once(&c, &u, &requests).await
    });
    f.stop(server);
    for (i, (got, r)) in together.iter().zip(&requests).enumerate() {
        let at: Vec<Vec<Vec<f32>>> = shapes
            .iter()
            .filter(|&&s| s >= r.len())
            .map(|&s| f.weights[0].logits_at(r, s))
            .collect();
        assert!(
            at.iter().any(|want| bits(want) == bits(got)),
            "request {i}: {got:?} is not the answer of any shape: {at:?}"
        );
        for want in &at {
            for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "request {i}: {a} vs {b} between shapes"
                );
            }
        }
    }
}

/// Sends requests from `workers` tasks until `stop`; checks every answer
/// against the expected logits of the version it names. Returns
/// (answers per version, failures).
async fn load(
    server_url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
    expected: Arc<Vec<Vec<Vec<f32>>>>,
    input: Arc<Vec<Vec<f32>>>,
    answered: Arc<[AtomicUsize; 3]>,
) -> usize {
    let c = http();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (c, u, stop, expected, input, answered) = (
            c.clone(),
            format!("{server_url}/v2/models/m/infer"),
            stop.clone(),
            expected.clone(),
            input.clone(),
            answered.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut failures = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = match c.post(&u).body(json_body(&input)).send().await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failures += 1;
                        continue;
                    }
                };
                if r.status() != 200 {
                    eprintln!(
                        "status {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    );
                    failures += 1;
                    continue;
                }
                let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
                let (version, logits, _) = parse_outputs(&v, input.len());
                let version: usize = version.parse().unwrap();
                assert_eq!(
                    bits(&logits),
                    bits(&expected[version - 1]),
                    "version {version} answered with another version's logits"
                );
                answered[version].fetch_add(1, Ordering::SeqCst);
            }
            failures
        }));
    }
    let mut failures = 0;
    for t in tasks {
        failures += t.await.unwrap();
    }
    failures
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn swap_and_rollback_under_load_fail_no_request() {
    let f = Fixture::new();
    let server = f.start(f.config());
    let input = Arc::new(rows(3, 9));
    let expected = Arc::new(vec![
        f.weights[0].logits(&input),
        f.weights[1].logits(&input),
    ]);
    assert_ne!(bits(&expected[0]), bits(&expected[1]));
    let answered: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let stop = Arc::new(AtomicBool::new(false));
    let base = url(&server, "");
    f.rt.block_on(async {
        let load = tokio::spawn(load(
            base,
            4,
            stop.clone(),
            expected,
            input,
            answered.clone(),
        ));
        wait_for("answers from version 1", || {
            answered[1].load(Ordering::SeqCst) > 20
        })
        .await;
        f.registry
            .promote("m", "prod", 2, None, "test")
            .await
            .unwrap();
        wait_for("answers from version 2", || {
            answered[2].load(Ordering::SeqCst) > 20
        })
        .await;
        let v1_before = answered[1].load(Ordering::SeqCst);
        f.registry.rollback("m", "prod", "test").await.unwrap();
        wait_for("answers from version 1 again", || {
            answered[1].load(Ordering::SeqCst) > v1_before + 20
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        let failures = load.await.unwrap();
        assert_eq!(failures, 0, "requests failed during swaps");
    });
    let text = f.rt.block_on(metrics_text(&http(), &server));
    assert_eq!(metric(&text, "kiln_serve_swaps_total{model=\"m\"}"), 2.0);
    assert_eq!(
        metric(
            &text,
            "kiln_serve_version_weight{model=\"m\",version=\"1\"}"
        ),
        100.0
    );
    assert_eq!(
        metric(
            &text,
            "kiln_serve_version_weight{model=\"m\",version=\"2\"}"
        ),
        0.0
    );
    f.stop(server);
}

#[test]
fn a_version_that_fails_to_load_leaves_the_old_one_serving() {
    let f = Fixture::new();
    let server = f.start(f.config());
    f.rt.block_on(async {
        // Version 3 claims version 2's checkpoint with version 1's digest.
        let v2 = f.registry.version("m", 2).await.unwrap();
        let v1 = f.registry.version("m", 1).await.unwrap();
        let mut bad = new_version(&v2.checkpoint.root, 2, v1.checkpoint.digest.clone());
        bad.lineage.job = "bad".into();
        let v3 = f.registry.register("m", bad, "test").await.unwrap();
        f.registry
            .promote("m", "prod", v3.version, None, "test")
            .await
            .unwrap();
        let c = http();
        wait_for("a failed load", || {
            let text = server.state().metrics.encode();
            text.contains("kiln_serve_load_failures_total{model=\"m\"} ")
        })
        .await;
        let (version, _, _) =
            infer_json(&c, &url(&server, "/v2/models/m/infer"), &rows(1, 1)).await;
        assert_eq!(version, "1");
    });
    f.stop(server);
}

#[test]
fn canary_split_follows_the_alias_weights() {
    let f = Fixture::new();
    f.rt.block_on(async {
        let a = f.registry.alias("m", "prod").await.unwrap().unwrap();
        f.registry
            .set_alias(
                "m",
                "prod",
                vec![
                    AliasTarget {
                        version: 1,
                        weight: 75,
                    },
                    AliasTarget {
                        version: 2,
                        weight: 25,
                    },
                ],
                Some(&a),
                "test",
            )
            .await
            .unwrap();
    });
    let server = f.start(f.config());
    let input = rows(2, 3);
    let counts = f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        let mut counts = [0usize; 3];
        for _ in 0..400 {
            let (v, logits, _) = infer_json(&c, &u, &input).await;
            let v: usize = v.parse().unwrap();
            assert_eq!(bits(&logits), bits(&f.weights[v - 1].logits(&input)));
            counts[v] += 1;
        }
        // A request naming a version always gets it.
        for _ in 0..5 {
            let (v, _, _) =
                infer_json(&c, &url(&server, "/v2/models/m/versions/2/infer"), &input).await;
            assert_eq!(v, "2");
        }
        let m: Value = c
            .get(url(&server, "/v2/models/m"))
            .send()
            .await
            .unwrap()
            .json_text()
            .await;
        assert_eq!(m["versions"], json!(["1", "2"]));
        counts
    });
    // 400 draws at 25%: mean 100, standard deviation ~8.7; 60..140 is > 4.5 sigma.
    eprintln!("canary split: {counts:?}");
    assert_eq!(counts[1] + counts[2], 400);
    assert!((60..=140).contains(&counts[2]), "{counts:?}");
    f.stop(server);
}

async fn expect_error(r: reqwest::RequestBuilder, status: u16, contains: &str) {
    let r = r.send().await.unwrap();
    let got = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    assert!(ct.starts_with("application/json"), "{ct}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {text}"));
    assert!(
        msg.contains(contains),
        "{msg:?} does not contain {contains:?}"
    );
}

#[test]
fn malformed_and_oversized_requests_get_4xx_json() {
    let f = Fixture::new();
    let mut config = f.config();
    config.limits.max_request_bytes = 4096;
    config.limits.max_request_rows = 20;
    let server = f.start(config);
    f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        expect_error(c.post(&u).body("{"), 400, "invalid request JSON").await;
        expect_error(c.post(&u).body("[]"), 400, "invalid request JSON").await;
        expect_error(c.post(&u).body(r#"{"inputs": [], "bogus": 1}"#), 400, "bogus").await;
        expect_error(c.post(&u).body(r#"{"inputs": []}"#), 400, "no inputs").await;
        let one = |shape: Value, datatype: &str, data: Value| {
            json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}).to_string()
        };
        expect_error(c.post(&u).body(one(json!([1, 7]), "FP32", json!(vec![0; 7]))), 400, "shape [1, 7]").await;
        expect_error(c.post(&u).body(one(json!([1, 8]), "FP64", json!(vec![0; 8]))), 400, "datatype").await;
        expect_error(c.post(&u).body(one(json!([2, 8]), "FP32", json!(vec![0; 8]))), 400, "8 values").await;
        expect_error(c.post(&u).body(one(json!([1, 8]), "FP32", json!(vec!["a"; 8]))), 400, "numbers").await;
        expect_error(c.post(&u).body(one(json!([21, 8]), "FP32", json!(vec![0; 168]))), 413, "20 rows").await;
        expect_error(c.post(&u).body(vec![b' '; 5000]), 413, "4096 bytes").await;
        expect_error(
            c.post(&u).header("Inference-Header-Content-Length", "99").body("{}"),
            400,
            "Inference-Header-Content-Length",
        )
        .await;
        expect_error(c.post(&u).header("Content-Encoding", "gzip").body("x"), 415, "gzip").await;
        let outputs = json!({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": vec![0; 8]}],
                             "outputs": [{"name": "embedding"}]});
        expect_error(c.post(&u).body(outputs.to_string()), 400, "unknown output").await;
        expect_error(c.post(url(&server, "/v2/models/nope/infer")).body(one(json!([1, 8]), "FP32", json!(vec![0; 8]))), 404, "nope").await;
        expect_error(c.post(url(&server, "/v2/models/m/versions/9/infer")).body(one(json!([1, 8]), "FP32", json!(vec![0; 8]))), 404, "version 9").await;
        expect_error(
            c.post(url(&server, "/v2/models/m/versions/x/infer"))
                .body(one(json!([1, 8]), "FP32", json!(vec![0; 8]))),
            400,
            "version \"x\"",
        )
        .await;
        expect_error(c.get(url(&server, "/v2/nothing")), 404, "no such endpoint").await;
        expect_error(c.get(&u), 405, "method").await;
        // Still serving afterwards.
        infer_json(&c, &u, &rows(20, 5)).await;
        let text = metrics_text(&c, &server).await;
        assert!(metric(&text, "kiln_serve_errors_total{model=\"m\",version=\"\",protocol=\"http\",kind=\"bad_request\"}") >= 5.0);
    });
    f.stop(server);
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn tokens_guard_inference_and_management() {
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = f.config();
    config.auth.token_file = Some(write(dir.path(), "t", "infer-secret\n"));
    config.auth.admin_token_file = Some(write(dir.path(), "a", "admin-secret"));
    let server = f.start(config);
    f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        let body = json_body(&rows(1, 2));
        expect_error(c.post(&u).body(body.clone()), 401, "bearer token").await;
        expect_error(
            c.post(&u).bearer_auth("wrong").body(body.clone()),
            401,
            "bearer token",
        )
        .await;
        expect_error(c.get(url(&server, "/v2/models/m")), 401, "bearer token").await;
        for token in ["infer-secret", "admin-secret"] {
            let r = c
                .post(&u)
                .bearer_auth(token)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        // Health and metrics stay open.
        assert_eq!(
            c.get(url(&server, "/v2/health/ready"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            c.get(url(&server, "/metrics"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        // Management needs the management token, even from loopback.
        let unload = url(&server, "/v2/repository/models/m/unload");
        expect_error(c.post(&unload), 401, "management").await;
        expect_error(
            c.post(&unload).bearer_auth("infer-secret"),
            401,
            "management",
        )
        .await;
        // gRPC: metadata `authorization`.
        let mut g = GrpcInferenceServiceClient::connect(url(&server, ""))
            .await
            .unwrap();
        let req = || ModelMetadataRequest {
            name: "m".into(),
            version: String::new(),
        };
        let e = g.model_metadata(req()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut r = tonic::Request::new(req());
        r.metadata_mut()
            .insert("authorization", "Bearer infer-secret".parse().unwrap());
        assert_eq!(g.model_metadata(r).await.unwrap().into_inner().name, "m");
        // Unload with the right token: gone.
        let r = c
            .post(&unload)
            .bearer_auth("admin-secret")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        expect_error(
            c.post(&u).bearer_auth("infer-secret").body(body.clone()),
            404,
            "not served",
        )
        .await;
    });
    f.stop(server);
}

#[test]
fn management_loads_versions_from_loopback_without_a_token() {
    let f = Fixture::new();
    let server = f.start(f.config());
    f.rt.block_on(async {
        let c = http();
        let load = url(&server, "/v2/repository/models/m/load");
        let json = |r: reqwest::RequestBuilder| r.header("content-type", "application/json");
        // No JSON content type: refused (a cross-site form could send it).
        expect_error(
            c.post(&load).body(r#"{"parameters": {"version": 2}}"#),
            415,
            "application/json",
        )
        .await;
        let r = json(c.post(&load))
            .body(r#"{"parameters": {"version": 2}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        let (v, _, _) = infer_json(&c, &url(&server, "/v2/models/m/infer"), &rows(1, 4)).await;
        assert_eq!(v, "2");
        let index: Value = json(c.post(url(&server, "/v2/repository/index")))
            .send()
            .await
            .unwrap()
            .json_text()
            .await;
        assert_eq!(index[0]["selector"], "m:2");
        expect_error(
            json(c.post(&load)).body(r#"{"parameters": {"alias": "nope"}}"#),
            404,
            "alias nope",
        )
        .await;
        expect_error(
            json(c.post(&load)).body(r#"{"parameters": {"version": "x"}}"#),
            400,
            "version",
        )
        .await;
        expect_error(
            json(c.post(url(&server, "/v2/repository/models/zzz/unload"))),
            404,
            "zzz",
        )
        .await;
    });
    f.stop(server);
}

#[test]
fn drift_gauges_and_hook_events_for_swaps_and_drift() {
    use kiln_checkpoint::profile::{ProfileOptions, ReferenceProfile, Task};
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    // Version 3: version 1's weights with a reference profile of 500 rows.
    let reference = rows(500, 77);
    let predictions: Vec<f64> = f.weights[0]
        .logits(&reference)
        .iter()
        .map(|r| argmax(r) as f64)
        .collect();
    let flat: Vec<f32> = reference.iter().flatten().copied().collect();
    let profile = ReferenceProfile::from_model_io(
        &flat,
        FEATURES,
        None,
        &predictions,
        Task::Classification,
        &ProfileOptions::default(),
    )
    .unwrap();
    f.rt.block_on(async {
        let v1 = f.registry.version("m", 1).await.unwrap();
        let mut new = new_version(&v1.checkpoint.root, 1, v1.checkpoint.digest.clone());
        new.reference_profile = Some(profile.to_json_bytes());
        let v3 = f.registry.register("m", new, "test").await.unwrap();
        assert!(v3.has_reference_profile);
    });
    let config = ServeConfig::from_toml(&format!(
        r#"
registry = "{}"
models = ["m@prod"]
listen = "127.0.0.1:0"
[batching]
max_batch_size = {BATCH}
batch_shapes = [{BATCH}]
[swap]
poll_interval_ms = 50
[drift]
window_rows = 200
min_interval_ms = 0
[[hooks]]
sink = "command"
command = ["sh", "-c", "cat >> '{}'; echo >> '{}'"]
"#,
        f.registry_url,
        events.display(),
        events.display()
    ))
    .unwrap();
    let server = f.start(config);
    let read_events = || -> Vec<Value> {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let gauge = |name: &str, column: &str| -> Option<f64> {
        let text = server.state().metrics.encode();
        let prefix = format!("{name}{{model=\"m\",version=\"3\",column=\"{column}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().unwrap())
    };
    f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        f.registry
            .promote("m", "prod", 3, None, "test")
            .await
            .unwrap();
        wait_for("version 3 served", || {
            server
                .state()
                .deployment("m")
                .unwrap()
                .routing()
                .get(3)
                .is_some()
        })
        .await;
        wait_for("a version.swapped event", || {
            read_events().iter().any(|e| e["kind"] == "version.swapped")
        })
        .await;
        let swapped = read_events()
            .into_iter()
            .find(|e| e["kind"] == "version.swapped")
            .unwrap();
        assert_eq!(swapped["payload"]["model"], "m");
        assert_eq!(swapped["payload"]["alias"], "prod");
        assert_eq!(swapped["payload"]["from_version"], 1);
        assert_eq!(swapped["payload"]["to_version"], 3);

        // A window like the reference: no drift.
        for chunk in rows(200, 555).chunks(20) {
            let (v, _, _) = infer_json(&c, &u, chunk).await;
            assert_eq!(v, "3");
        }
        wait_for("the first window's report", || {
            gauge("kiln_drift_detected", "_all").is_some()
        })
        .await;
        assert_eq!(gauge("kiln_drift_detected", "_all"), Some(0.0));
        assert!(gauge("kiln_drift_share", "x0").is_some());

        // A shifted window: drift, one event for the whole window.
        let shifted: Vec<Vec<f32>> = rows(200, 556)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x + 2.0).collect())
            .collect();
        for chunk in shifted.chunks(20) {
            infer_json(&c, &u, chunk).await;
        }
        wait_for("drift detected", || {
            gauge("kiln_drift_detected", "_all") == Some(1.0)
        })
        .await;
        assert!(gauge("kiln_drift_share", "_all").unwrap() >= 0.5);
        wait_for("a drift.detected event", || {
            read_events()
                .iter()
                .any(|e| e["kind"] == "drift.detected" && e["payload"]["feature"] == "_all")
        })
        .await;
        let all = read_events()
            .into_iter()
            .find(|e| e["kind"] == "drift.detected" && e["payload"]["feature"] == "_all")
            .unwrap();
        assert_eq!(all["payload"]["version"], 3);
        assert_eq!(all["payload"]["statistic"], "share_drifted");
        assert_eq!(all["payload"]["window_rows"], 200);
    });
    f.stop(server);
}

#[test]
fn requests_past_their_time_limit_get_504_and_the_server_goes_on() {
    let f = Fixture::new();
    let mut config = f.config();
    // A lone request waits 2 s for company; its limit is 100 ms.
    config.batching.max_queue_delay_us = 2_000_000;
    config.limits.request_timeout_ms = 100;
    let server = f.start(config);
    f.rt.block_on(async {
        let c = http();
        let u = url(&server, "/v2/models/m/infer");
        expect_error(c.post(&u).body(json_body(&rows(1, 1))), 504, "100 ms").await;
        // The client's own (shorter) limit: tritonclient's `timeout`, in us.
        let body = json!({
            "inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": rows(1, 2)}],
            "parameters": {"timeout": 20_000},
        });
        expect_error(c.post(&u).body(body.to_string()), 504, "20 ms").await;
        // A full batch does not wait: answered at once.
        let (v, logits, _) = infer_json(&c, &u, &rows(BATCH, 3)).await;
        assert_eq!(v, "1");
        assert_eq!(bits(&logits), bits(&f.weights[0].logits(&rows(BATCH, 3))));
    });
    f.stop(server);
}

/// `start` says what went wrong by what to fix: the configuration, the
/// registry, the model, the address.
#[test]
fn start_errors_say_what_to_fix() {
    let f = Fixture::new();
    let start = |config: ServeConfig| {
        f.rt.block_on(kiln_serve::start(
            config,
            tokio_util::sync::CancellationToken::new(),
        ))
        .unwrap_err()
    };
    let mut config = f.config();
    config.batching.max_batch_size = 0;
    let e = start(config);
    assert!(matches!(e, kiln_serve::Error::Config { .. }), "{e:?}");
    assert!(e.to_string().contains("batching.max_batch_size"), "{e}");

    let mut config = f.config();
    config.registry = "bogus://nowhere".into();
    let e = start(config);
    assert!(matches!(e, kiln_serve::Error::Registry { .. }), "{e:?}");

    let mut config = f.config();
    config.models = vec!["m:9".into()];
    let e = start(config);
    assert!(
        matches!(e, kiln_serve::Error::Model { ref model, .. } if model == "m:9"),
        "{e:?}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = f.config();
    config.listen = taken.local_addr().unwrap();
    let e = start(config);
    assert!(matches!(e, kiln_serve::Error::Listen { .. }), "{e:?}");
}

//! Language models served in process: a small gpt with seeded random
//! weights, saved with the checkpoint engine and registered with a byte-level
//! tokenizer; the server on loopback, driven over HTTP and gRPC.
//!
//! Expected answers come from the same network code (`kiln_models::gpt`) in
//! this process: next-token logits bit for bit, generated text exactly (the
//! server runs `Gpt::generate`, seeded), streamed pieces that add up to it.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{bits, url};
use kiln_checkpoint::CheckpointRoot;
use kiln_checkpoint::registry::{ModelDefinition, NewVersion, Registry, Signature};
use kiln_models::gpt::Gpt;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::inference::model_infer_request::InferInputTensor;
use kiln_proto::inference::{InferTensorContents, ModelInferRequest};
use kiln_proto::spec::{ModelKind, ModelSpec};
use kiln_serve::{RunningServer, ServeConfig};
use serde_json::{Value, json};
use tch::nn;
use tch::{Device, Kind, Tensor};

const VOCAB: usize = 256;
const CONTEXT: usize = 16;

fn spec() -> ModelSpec {
    ModelSpec {
        vocab: Some(VOCAB),
        n_layer: 1,
        n_head: 2,
        d_model: 16,
        ..ModelSpec::new(ModelKind::Gpt)
    }
}

/// A gpt with seeded random weights, and its parameters.
struct Model {
    gpt: Gpt,
    _vs: nn::VarStore,
    params: common::Params,
}

fn model(seed: i64) -> Model {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let io = kiln_models::ModelIo {
        context: Some(CONTEXT),
        ..Default::default()
    };
    let net = kiln_models::build_with(&spec(), io, kiln_proto::spec::Precision::Fp32, &vs).unwrap();
    let kiln_models::Net::Gpt(gpt) = net else {
        unreachable!()
    };
    let params = common::parameters(&vs);
    // As the server holds its weights: libtorch's matmul takes another path
    // (no folding of the batch into the rows) for inputs that need
    // gradients, which changes the last bits of some rows.
    let mut vs = vs;
    vs.freeze();
    Model {
        gpt,
        params,
        _vs: vs,
    }
}

impl Model {
    /// Next-token logits of `rows` (all of one length) in one pass, as a
    /// request of these rows alone runs on a server whose batch shapes
    /// include its row count.
    fn next_token_logits(&self, rows: &[Vec<i64>]) -> Vec<Vec<f32>> {
        self.logits_at(rows, rows.len())
    }

    /// Next-token logits of `rows` in a pass of `shape` sequences (padded
    /// with sequences of token 0, as the server pads).
    fn logits_at(&self, rows: &[Vec<i64>], shape: usize) -> Vec<Vec<f32>> {
        // One intra-op thread, as the server's compute threads run.
        tch::set_num_threads(1);
        let len = rows[0].len();
        let mut flat: Vec<i64> = rows.iter().flatten().copied().collect();
        flat.resize(shape * len, 0);
        let x = Tensor::from_slice(&flat).view([shape as i64, len as i64]);
        let y = tch::no_grad(|| self.gpt.next_token_logits(&x)).unwrap();
        assert_eq!(y.kind(), Kind::Float);
        let v = Vec::<f32>::try_from(&y.contiguous().view([-1])).unwrap();
        v.chunks(VOCAB)
            .take(rows.len())
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// The next-token logits of the full forward pass's last position (what
    /// training computes), for the contract between the two paths.
    fn full_forward_logits(&self, rows: &[Vec<i64>]) -> Vec<Vec<f32>> {
        let flat: Vec<i64> = rows.iter().flatten().copied().collect();
        let x = Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64]);
        let y = tch::no_grad(|| self.gpt.forward_t(&x, false)).unwrap();
        let last = y.select(1, -1).to_kind(Kind::Float).contiguous();
        let v = Vec::<f32>::try_from(&last.view([-1])).unwrap();
        v.chunks(VOCAB).map(<[f32]>::to_vec).collect()
    }

    fn generate(
        &self,
        prompt: &str,
        max_tokens: usize,
        t: f64,
        k: Option<usize>,
        seed: u64,
    ) -> String {
        let tokenizer = kiln_text::Tokenizer::byte_level();
        let ids: Vec<i64> = tokenizer
            .encode(prompt)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let out = self
            .gpt
            .generate(&ids, max_tokens, t, k, seed, |_| true)
            .unwrap();
        let out: Vec<u32> = out.iter().map(|&t| t as u32).collect();
        tokenizer.decode(&out).unwrap()
    }
}

fn new_version(root: &str, step: u64, digest: String, tokenizer: Option<Vec<u8>>) -> NewVersion {
    NewVersion {
        metrics: BTreeMap::from([("eval_loss".to_string(), 5.0)]),
        tokenizer,
        ..common::new_version(
            root,
            step,
            digest,
            ModelDefinition::language_model(spec(), CONTEXT, VOCAB),
            Signature::language_model(VOCAB),
            "serve-lm-test",
        )
    }
}

/// `lm` versions 1 and 2 (different weights, byte-level tokenizer) with
/// `lm@prod` -> 1, and `bare` version 1 (no tokenizer).
struct Fixture {
    dir: tempfile::TempDir,
    registry: Registry,
    models: Vec<Model>,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = format!("file://{}", dir.path().join("ckpt").display());
        let root = CheckpointRoot::open(&ckpt).unwrap();
        let models = vec![model(1), model(2)];
        let digests: Vec<String> = models
            .iter()
            .enumerate()
            .map(|(i, m)| common::save_checkpoint(&root, i as u64 + 1, &m.params, "serve-lm-test"))
            .collect();
        let tokenizer_path = dir.path().join("tokenizer.json");
        kiln_text::Tokenizer::byte_level()
            .save(&tokenizer_path)
            .unwrap();
        let tokenizer = std::fs::read(&tokenizer_path).unwrap();
        let rt = common::runtime();
        let url = format!("file://{}", dir.path().join("registry").display());
        let registry = rt.block_on(Registry::open(&url)).unwrap();
        rt.block_on(async {
            for (i, d) in digests.iter().enumerate() {
                let new = new_version(&ckpt, i as u64 + 1, d.clone(), Some(tokenizer.clone()));
                registry.register("lm", new, "test").await.unwrap();
            }
            let bare = new_version(&ckpt, 1, digests[0].clone(), None);
            registry.register("bare", bare, "test").await.unwrap();
            registry
                .promote("lm", "prod", 1, None, "test")
                .await
                .unwrap();
        });
        Fixture {
            dir,
            registry,
            models,
            rt,
        }
    }

    fn start(&self, models: &[&str]) -> RunningServer {
        self.start_with(models, |_| {})
    }

    fn start_with(&self, models: &[&str], change: impl FnOnce(&mut ServeConfig)) -> RunningServer {
        let mut c = ServeConfig {
            registry: format!("file://{}", self.dir.path().join("registry").display()),
            models: models.iter().map(|m| m.to_string()).collect(),
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        c.swap.poll_interval_ms = 50;
        change(&mut c);
        common::start(&self.rt, c)
    }
}

async fn post(url: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The `logits` output of an infer response, a row per sequence (its shape
/// checked).
fn logits_of(response: &str) -> Vec<Vec<f32>> {
    let v: Value = serde_json::from_str(response).unwrap();
    let logits = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "logits")
        .unwrap();
    let rows: Vec<Vec<f32>> = logits["data"]
        .as_array()
        .unwrap()
        .chunks(VOCAB)
        .map(|r| r.iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    assert_eq!(logits["shape"], json!([rows.len(), VOCAB]));
    rows
}

/// The `text_output` pieces of a `/generate_stream` body, and an error event if any.
fn sse_pieces(body: &str) -> (Vec<String>, Option<String>) {
    let mut pieces = Vec::new();
    let mut error = None;
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("{event:?}"));
        let v: Value = serde_json::from_str(data).unwrap();
        match v.get("text_output") {
            Some(t) => {
                assert_eq!(v["model_name"], "lm");
                pieces.push(t.as_str().unwrap().to_string());
            }
            None => error = Some(v["error"].as_str().unwrap().to_string()),
        }
    }
    (pieces, error)
}

#[test]
fn next_token_logits_over_http_and_grpc_equal_the_network_bit_for_bit() {
    let f = Fixture::new();
    let server = f.start(&["lm@prod"]);
    let rows: Vec<Vec<i64>> = vec![vec![84, 104, 101, 32, 107], vec![0, 255, 7, 7, 1]];
    let expected = f.models[0].next_token_logits(&rows);
    let full: Vec<Vec<i64>> = vec![(0..CONTEXT as i64).collect()];
    let expected_full = f.models[0].next_token_logits(&full);
    f.rt.block_on(async {
        let body = json!({"inputs": [{"name": "input_ids", "shape": [2, 5], "datatype": "INT64", "data": rows}]});
        let (status, text) = post(&url(&server, "/v2/models/lm/infer"), body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["model_version"], "1");
        let got = logits_of(&text);
        assert_eq!(got.len(), 2);
        assert_eq!(bits(&got), bits(&expected));

        // A full context; binary in.
        let raw: Vec<u8> = full[0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let head = json!({"inputs": [{"name": "input_ids", "shape": [1, CONTEXT], "datatype": "INT64",
            "parameters": {"binary_data_size": raw.len()}}]})
        .to_string();
        let mut body = head.clone().into_bytes();
        body.extend_from_slice(&raw);
        let r = reqwest::Client::new()
            .post(url(&server, "/v2/models/lm/infer"))
            .header("Inference-Header-Content-Length", head.len())
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        let got: Vec<f32> = v["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(bits(&[got]), bits(&expected_full));

        // gRPC: raw contents and typed contents.
        let mut g = GrpcInferenceServiceClient::connect(url(&server, ""))
            .await
            .unwrap();
        let flat: Vec<i64> = rows.iter().flatten().copied().collect();
        for typed in [false, true] {
            let req = ModelInferRequest {
                model_name: "lm".into(),
                inputs: vec![InferInputTensor {
                    name: "input_ids".into(),
                    datatype: "INT64".into(),
                    shape: vec![2, 5],
                    parameters: Default::default(),
                    contents: typed.then(|| InferTensorContents {
                        int64_contents: flat.clone(),
                        ..Default::default()
                    }),
                }],
                raw_input_contents: if typed {
                    vec![]
                } else {
                    vec![flat.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into()]
                },
                ..Default::default()
            };
            let r = g.model_infer(req).await.unwrap().into_inner();
            let i = r.outputs.iter().position(|o| o.name == "logits").unwrap();
            assert_eq!(r.outputs[i].shape, [2, VOCAB as i64]);
            let got: Vec<Vec<f32>> = r.raw_output_contents[i]
                .chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect::<Vec<f32>>()
                .chunks(VOCAB)
                .map(<[f32]>::to_vec)
                .collect();
            assert_eq!(bits(&got), bits(&expected));
            let p = r.outputs.iter().position(|o| o.name == "predictions").unwrap();
            let argmax: Vec<i64> = r.raw_output_contents[p]
                .chunks(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(argmax.len(), 2);
        }

        // Refused: too long, out of the vocabulary, features to a language model.
        let long = json!({"inputs": [{"name": "input_ids", "shape": [1, CONTEXT + 1], "datatype": "INT64",
            "data": vec![1; CONTEXT + 1]}]});
        let (status, text) = post(&url(&server, "/v2/models/lm/infer"), long).await;
        assert_eq!(status, 400);
        assert!(text.contains("context of 16"), "{text}");
        let oov = json!({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [256]}]});
        let (status, text) = post(&url(&server, "/v2/models/lm/infer"), oov).await;
        assert_eq!(status, 400);
        assert!(text.contains("outside the vocabulary"), "{text}");
        let meta: Value = serde_json::from_str(
            &reqwest::get(url(&server, "/v2/models/lm"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            meta["inputs"],
            json!([{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}])
        );
    });
    f.rt.block_on(server.shutdown()).unwrap();
}

#[test]
fn generate_equals_the_networks_seeded_generation_and_streams_the_same_text() {
    let f = Fixture::new();
    let server = f.start(&["lm@prod", "bare"]);
    f.rt.block_on(async {
        let generate = url(&server, "/v2/models/lm/generate");
        let ask = |seed: u64| {
            json!({"text_input": "The kiln", "parameters":
                {"max_tokens": 6, "temperature": 0.9, "top_k": 50, "seed": seed}})
        };
        let (status, text) = post(&generate, ask(5)).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["model_name"], "lm");
        assert_eq!(v["model_version"], "1");
        let want = f.models[0].generate("The kiln", 6, 0.9, Some(50), 5);
        assert_eq!(v["text_output"], want.as_str());
        assert_eq!(v.as_object().unwrap().len(), 3, "{v}");

        // The stream: one event per token, adding up to the same text.
        let r = reqwest::Client::new()
            .post(url(&server, "/v2/models/lm/generate_stream"))
            .body(ask(5).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        let (pieces, error) = sse_pieces(&r.text().await.unwrap());
        assert_eq!(error, None);
        // One event per token, and one more when the last token ended inside
        // a character (random weights emit any byte).
        assert!((6..=7).contains(&pieces.len()), "{pieces:?}");
        assert_eq!(pieces.concat(), want);

        // The context bounds the length: a 15-token prompt leaves room for 2.
        let (status, text) = post(
            &generate,
            json!({"text_input": "a".repeat(15), "parameters": {"max_tokens": 16, "temperature": 0}}),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["text_output"],
            f.models[0].generate(&"a".repeat(15), 16, 0.0, None, 0).as_str()
        );

        // Refusals, each a 400 naming the problem.
        for (body, says) in [
            (json!({"text_input": ""}), "text_input is empty"),
            (json!({"text_input": "a".repeat(17)}), "context is 16 tokens"),
            (json!({"text_input": "a", "parameters": {"max_tokens": 0}}), "1 to 16"),
            (json!({"text_input": "a", "parameters": {"temperature": -1}}), ">= 0"),
            (json!({"text_input": "a", "parameters": {"top_k": 0}}), "at least 1"),
            (json!({"text_input": "a", "parameters": {"beam_width": 2}}), "beam_width"),
            (json!({"prompt": "a"}), "prompt"),
        ] {
            let (status, text) = post(&generate, body.clone()).await;
            assert_eq!(status, 400, "{body}: {text}");
            assert!(text.contains(says), "{body}: {text} lacks {says}");
        }
        let (status, text) = post(
            &url(&server, "/v2/models/bare/generate"),
            json!({"text_input": "a"}),
        )
        .await;
        assert_eq!(status, 400);
        assert!(text.contains("without a tokenizer"), "{text}");
        let (status, _) = post(
            &url(&server, "/v2/models/nothing/generate"),
            json!({"text_input": "a"}),
        )
        .await;
        assert_eq!(status, 404);

        // Counted by model and version.
        let metrics = reqwest::get(url(&server, "/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |prefix: &str| -> f64 {
            metrics
                .lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next())
                .map_or(0.0, |v| v.parse().unwrap())
        };
        assert_eq!(
            value(r#"kiln_serve_requests_total{model="lm",version="1",protocol="http"}"#),
            3.0,
            "{metrics}"
        );
        // Prompts of 8, 8 and 15 tokens; generations of 6, 6 and 2.
        assert_eq!(
            value(r#"kiln_serve_prompt_tokens_sum{model="lm",version="1"}"#),
            31.0,
            "{metrics}"
        );
        assert_eq!(
            value(r#"kiln_serve_generated_tokens_sum{model="lm",version="1"}"#),
            14.0,
            "{metrics}"
        );
        assert_eq!(
            value(r#"kiln_serve_errors_total{model="lm",version="1",protocol="http",kind="bad_request"}"#),
            // Five refusals after the version was chosen; the two malformed
            // bodies were refused before (version "").
            5.0,
            "{metrics}"
        );
    });
    f.rt.block_on(server.shutdown()).unwrap();
}

/// Three instances serve concurrent generations and logits requests; each
/// answer is the one a single network gives (the instances hold the same
/// weights, and a job runs to its end on the instance that took it): a
/// generation exactly, logits bit for bit at the shape of the batch they
/// ran in.
#[test]
fn instances_answer_concurrent_requests_as_one_network_does() {
    let f = Fixture::new();
    let server = f.start_with(&["lm@prod"], |c| c.instances = 3);
    let rows: Vec<Vec<i64>> = vec![vec![84, 104, 101, 32, 107]];
    let shapes = [1, 2, 4, 8];
    let expected: Vec<_> = shapes
        .iter()
        .map(|&s| bits(&f.models[0].logits_at(&rows, s)))
        .collect();
    f.rt.block_on(async {
        let generate = url(&server, "/v2/models/lm/generate");
        let infer = url(&server, "/v2/models/lm/infer");
        let mut tasks = Vec::new();
        for seed in 0..6u64 {
            let body = json!({"text_input": "The kiln", "parameters":
                {"max_tokens": 8, "temperature": 0.9, "top_k": 50, "seed": seed}});
            let generate = generate.clone();
            tasks.push(tokio::spawn(async move { (seed, post(&generate, body).await) }));
        }
        let mut logits = Vec::new();
        for _ in 0..6 {
            let body = json!({"inputs": [{"name": "input_ids", "shape": [1, 5], "datatype": "INT64", "data": rows}]});
            let infer = infer.clone();
            logits.push(tokio::spawn(async move { post(&infer, body).await }));
        }
        for t in tasks {
            let (seed, (status, text)) = t.await.unwrap();
            assert_eq!(status, 200, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            let want = f.models[0].generate("The kiln", 8, 0.9, Some(50), seed);
            assert_eq!(v["text_output"], want.as_str(), "seed {seed}");
        }
        for t in logits {
            let (status, text) = t.await.unwrap();
            assert_eq!(status, 200, "{text}");
            let got = bits(&logits_of(&text));
            assert!(expected.contains(&got), "{got:?} is no shape's answer");
        }
    });
    f.rt.block_on(server.shutdown()).unwrap();
}

/// The numerical contract of docs/serving.md for language models: `infer`
/// requests of one length are batched; an answer is what a pass at its
/// batch's shape computes, bit for bit (alone on an idle server: the
/// smallest shape that holds it), and agrees with every other shape and
/// with the full forward pass to float rounding.
#[test]
fn batched_logits_answer_bit_for_bit_at_their_shape_and_agree_across_shapes() {
    let f = Fixture::new();
    let shapes = [1usize, 2, 4, 8];
    let shape_for = |n: usize| shapes.iter().copied().find(|&s| s >= n).unwrap();
    // 16 requests of 1 to 3 sequences of 5 or 9 ids.
    let requests: Vec<Vec<Vec<i64>>> = (0..16)
        .map(|i: usize| {
            let len = if i.is_multiple_of(2) { 5 } else { 9 };
            (0..1 + i % 3)
                .map(|r| {
                    (0..len)
                        .map(|j| ((i * 31 + r * 7 + j * 13) % VOCAB) as i64)
                        .collect()
                })
                .collect()
        })
        .collect();
    let infer = |server: &RunningServer, r: &Vec<Vec<i64>>| {
        let u = url(server, "/v2/models/lm/infer");
        let body = json!({"inputs": [{"name": "input_ids", "shape": [r.len(), r[0].len()],
            "datatype": "INT64", "data": r}]});
        async move {
            let (status, text) = post(&u, body).await;
            assert_eq!(status, 200, "{text}");
            logits_of(&text)
        }
    };
    let close = |got: &[Vec<f32>], want: &[Vec<f32>], what: &str| {
        for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}: {a} vs {b}"
            );
        }
    };

    // Alone: the smallest shape that holds the request, bit for bit; the
    // full forward pass's last position to float rounding.
    let server = f.start_with(&["lm@prod"], |c| {
        c.batching.max_batch_size = 8;
        c.batching.max_queue_delay_us = 0;
    });
    f.rt.block_on(async {
        for r in &requests {
            let got = infer(&server, r).await;
            let want = f.models[0].logits_at(r, shape_for(r.len()));
            assert_eq!(bits(&got), bits(&want), "{} rows alone", r.len());
            close(
                &got,
                &f.models[0].full_forward_logits(r),
                "infer vs forward_t",
            );
        }
    });
    f.rt.block_on(server.shutdown()).unwrap();

    // Together, on two instances that wait for company: batched (fewer
    // passes than requests), each answer some shape's bit for bit.
    let server = f.start_with(&["lm@prod"], |c| {
        c.batching.max_batch_size = 8;
        c.batching.max_queue_delay_us = 100_000;
        c.instances = 2;
    });
    let together: Vec<Vec<Vec<f32>>> = f.rt.block_on(async {
        let tasks: Vec<_> = requests
            .iter()
            .map(|r| tokio::spawn(infer(&server, r)))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let metrics = f.rt.block_on(async {
        reqwest::get(url(&server, "/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    f.rt.block_on(server.shutdown()).unwrap();
    let passes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_serve_batch_size_count{model=\"lm\",version=\"1\"} "))
        .unwrap_or_else(|| panic!("no batch count in {metrics}"))
        .parse()
        .unwrap();
    assert!(
        passes < requests.len() as f64,
        "{passes} batches for {} requests",
        requests.len()
    );
    for (i, (got, r)) in together.iter().zip(&requests).enumerate() {
        let at: Vec<Vec<Vec<f32>>> = shapes
            .iter()
            .filter(|&&s| s >= r.len())
            .map(|&s| f.models[0].logits_at(r, s))
            .collect();
        assert!(
            at.iter().any(|want| bits(want) == bits(got)),
            "request {i}: not the answer of any shape"
        );
        for want in &at {
            close(got, want, &format!("request {i} between shapes"));
        }
    }
}

#[test]
fn an_alias_move_swaps_the_language_model_without_failing_a_generation() {
    let f = Fixture::new();
    let server = f.start(&["lm@prod"]);
    let want = [
        f.models[0].generate("kiln", 8, 0.0, None, 0),
        f.models[1].generate("kiln", 8, 0.0, None, 0),
    ];
    assert_ne!(want[0], want[1], "two random models should not agree");
    f.rt.block_on(async {
        let generate = url(&server, "/v2/models/lm/generate");
        let body = json!({"text_input": "kiln", "parameters": {"max_tokens": 8, "temperature": 0}});
        let ask = || async {
            let (status, text) = post(&generate, body.clone()).await;
            assert_eq!(status, 200, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            let version: usize = v["model_version"].as_str().unwrap().parse().unwrap();
            // Every answer is the text of the version it names.
            assert_eq!(v["text_output"], want[version - 1].as_str());
            version
        };
        assert_eq!(ask().await, 1);
        f.registry
            .promote("lm", "prod", 2, None, "test")
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while ask().await != 2 {
            assert!(std::time::Instant::now() < deadline, "no swap to version 2");
        }
        f.registry.rollback("lm", "prod", "test").await.unwrap();
        while ask().await != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "no rollback to version 1"
            );
        }
    });
    f.rt.block_on(server.shutdown()).unwrap();
}

#[test]
fn prompt_tokens_feed_drift_monitoring_against_the_token_profile() {
    use kiln_checkpoint::profile::{
        ColumnKind, ColumnSpec, ProfileOptions, ReferenceProfile, Task,
    };
    let f = Fixture::new();
    // The reference: a 10-byte text, 100 times (what `[register]` makes from
    // held-out tokens: one categorical column, a token a row).
    let text = "the kiln. ";
    let tokens: Vec<f64> = text.repeat(100).bytes().map(f64::from).collect();
    let profile = ReferenceProfile::from_columns(
        vec![ColumnSpec::feature("token").with_kind(ColumnKind::Categorical)],
        vec![tokens],
        Task::Unspecified,
        &ProfileOptions::default(),
    )
    .unwrap();
    f.rt.block_on(async {
        let v = f.registry.version("lm", 1).await.unwrap();
        let tokenizer = f.registry.tokenizer("lm", 1).await.unwrap();
        let mut new = new_version(&v.checkpoint.root, 1, v.checkpoint.digest, tokenizer);
        new.reference_profile = Some(profile.to_json_bytes());
        f.registry.register("watched", new, "test").await.unwrap();
    });
    let server = f.start_with(&["watched"], |c| {
        c.drift.window_rows = 100;
        c.drift.min_interval_ms = 0;
    });
    f.rt.block_on(async {
        let generate = url(&server, "/v2/models/watched/generate");
        let gauge = |column: &'static str| {
            let server = &server;
            async move {
                let metrics = reqwest::get(url(server, "/metrics"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                let prefix = format!(
                    "kiln_drift_detected{{model=\"watched\",version=\"1\",column=\"{column}\"}}"
                );
                metrics
                    .lines()
                    .find(|l| l.starts_with(&prefix))
                    .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            }
        };
        let wait_for = |want: f64| async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while gauge("_all").await != Some(want) {
                assert!(std::time::Instant::now() < deadline, "drift gauge never {want}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        // Ten prompts of the reference's text fill a window of 100 tokens
        // with exactly its distribution: no drift.
        for _ in 0..10 {
            let (status, body) = post(
                &generate,
                json!({"text_input": text, "parameters": {"max_tokens": 1}}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
        wait_for(0.0).await;
        assert_eq!(gauge("token").await, Some(0.0));
        // Tokens the reference never saw, by infer on ids this time: drift.
        let ids = vec![vec![90i64; 10]; 10];
        let (status, body) = post(
            &url(&server, "/v2/models/watched/infer"),
            json!({"inputs": [{"name": "input_ids", "shape": [10, 10], "datatype": "INT64", "data": ids}]}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        wait_for(1.0).await;
        assert_eq!(gauge("token").await, Some(1.0));
    });
    f.rt.block_on(server.shutdown()).unwrap();
}

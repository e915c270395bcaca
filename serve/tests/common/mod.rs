//! Fixtures shared by kiln-serve's integration tests (each `tests/*.rs` is
//! its own crate and includes this module with `mod common;`, using what it
//! needs): a network's parameters saved as a real checkpoint, the registry
//! version that points at it, a runtime, and small client helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use kiln_checkpoint::registry::{CheckpointRef, Lineage, ModelDefinition, NewVersion, Signature};
use kiln_checkpoint::{
    CheckpointMeta, CheckpointRoot, Checkpointer, DType, SaveConfig, TensorView,
};
use kiln_serve::{RunningServer, ServeConfig};
use serde_json::json;
use tch::nn;
use tokio_util::sync::CancellationToken;

/// A network's parameters: name, shape and float32 values of each.
pub type Params = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The parameters of `vs`, by name.
pub fn parameters(vs: &nn::VarStore) -> Params {
    kiln_models::named_parameters(vs)
        .into_iter()
        .map(|(n, t)| {
            let shape = t.size().iter().map(|&d| d as usize).collect();
            let v = Vec::<f32>::try_from(&t.detach().contiguous().view([-1])).unwrap();
            (n, shape, v)
        })
        .collect()
}

/// Saves `params` as the `model/` tensors of checkpoint `step` under `root`
/// (as training does); returns the weights digest a registry version records.
pub fn save_checkpoint(root: &CheckpointRoot, step: u64, params: &Params, job: &str) -> String {
    let bytes: Vec<(String, Vec<u8>)> = params
        .iter()
        .map(|(n, _, v)| {
            (
                format!("model/{n}"),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<TensorView<'_>> = bytes
        .iter()
        .zip(params)
        .map(|((n, b), (_, s, _))| TensorView {
            name: n,
            dtype: DType::F32,
            shape: s,
            data: b,
        })
        .collect();
    let mut c = Checkpointer::new(root.clone(), SaveConfig::default(), 0, 1).unwrap();
    let meta = CheckpointMeta {
        training_state: json!({}),
        job_spec: json!({}),
        code_version: "test".into(),
        dataset_fingerprint: "none".into(),
        world_size: 1,
        metrics: BTreeMap::new(),
        job: job.into(),
    };
    c.save(step, "a", &views, &meta).unwrap();
    for r in c.flush() {
        r.unwrap();
    }
    let plain: Vec<TensorView<'_>> = views
        .iter()
        .map(|v| TensorView {
            name: &v.name["model/".len()..],
            ..*v
        })
        .collect();
    kiln_checkpoint::weights_digest(&plain)
}

/// A version of checkpoint `step` under `root` (weights `digest`) as
/// `model` with `signature`: no metrics, profile, module or tokenizer (set
/// them on the result).
pub fn new_version(
    root: &str,
    step: u64,
    digest: String,
    model: ModelDefinition,
    signature: Signature,
    job: &str,
) -> NewVersion {
    NewVersion {
        checkpoint: CheckpointRef {
            root: root.to_string(),
            step,
            digest,
        },
        model,
        signature,
        metrics: BTreeMap::new(),
        lineage: Lineage {
            job: job.into(),
            spec_hash: "0".repeat(64),
            dataset_fingerprint: "none".into(),
            code_version: "test".into(),
        },
        reference_profile: None,
        torchscript: None,
        tokenizer: None,
    }
}

/// The runtime the tests drive servers and clients from.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a server with `config` on `rt`.
pub fn start(rt: &tokio::runtime::Runtime, config: ServeConfig) -> RunningServer {
    rt.block_on(kiln_serve::start(config, CancellationToken::new()))
        .unwrap()
}

/// The address clients dial (loopback when the server listens on 0.0.0.0).
pub fn dial(server: &RunningServer) -> SocketAddr {
    let mut a = server.local_addr();
    if a.ip().is_unspecified() {
        a.set_ip([127, 0, 0, 1].into());
    }
    a
}

/// `http://{server}{path}`.
pub fn url(server: &RunningServer, path: &str) -> String {
    format!("http://{}{path}", dial(server))
}

/// The bits of each value, to compare results exactly.
pub fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|r| r.iter().map(|x| x.to_bits()).collect())
        .collect()
}

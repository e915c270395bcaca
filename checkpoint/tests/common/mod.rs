//! Shared test helpers: a real S3 server (moto), roots over every backend,
//! trained-like tensors, multi-rank saves on threads.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_checkpoint::{
    CheckpointMeta, CheckpointRoot, Checkpointer, DType, OwnedTensor, SaveConfig, SaveOutcome,
    TensorView,
};

pub const BUCKET: &str = "kiln-test";

/// A moto S3 server on loopback, started once per test binary; it exits
/// with the test process (a shell watchdog kills it when we are gone).
pub struct Moto {
    pub endpoint: String,
    /// The watchdog shell; never waited for: it outlives the tests by design
    /// and goes when this process goes.
    _watchdog: std::process::Child,
}

fn moto_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KILN_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("../.venv/bin/moto_server");
    p.exists().then_some(p)
}

fn start_moto() -> Option<Moto> {
    let Some(bin) = moto_binary() else {
        eprintln!(
            "\n*** SKIPPING S3 BACKEND: moto_server not found (set KILN_MOTO_SERVER or create .venv with moto[server]) ***\n"
        );
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let script = format!(
        "'{}' -H 127.0.0.1 -p {port} >/dev/null 2>&1 & m=$!; \
         while kill -0 {parent} 2>/dev/null; do sleep 0.3; done; kill $m",
        bin.display(),
        parent = std::process::id()
    );
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn moto_server");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let req = format!(
                "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            if s.write_all(req.as_bytes()).is_ok() {
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                if resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200") {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Moto {
        endpoint: format!("http://127.0.0.1:{port}"),
        _watchdog: watchdog,
    })
}

pub fn moto() -> Option<&'static Moto> {
    static MOTO: OnceLock<Option<Moto>> = OnceLock::new();
    MOTO.get_or_init(start_moto).as_ref()
}

impl Moto {
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The same settings as environment variables (for child processes).
    pub fn env(&self) -> Vec<(String, String)> {
        self.options()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v))
            .collect()
    }

    pub fn root(&self, prefix: &str) -> CheckpointRoot {
        CheckpointRoot::open_with(&format!("s3://{BUCKET}/{prefix}"), self.options())
            .expect("open s3 root")
    }
}

pub fn unique(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A root on one backend; keeps its temporary directory alive.
pub struct TestRoot {
    pub backend: &'static str,
    pub root: CheckpointRoot,
    _dir: Option<tempfile::TempDir>,
}

pub fn local_root() -> TestRoot {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = CheckpointRoot::open(&format!("file://{}", dir.path().display())).expect("open");
    TestRoot {
        backend: "local",
        root,
        _dir: Some(dir),
    }
}

pub fn memory_root() -> TestRoot {
    TestRoot {
        backend: "memory",
        root: CheckpointRoot::open(&format!("memory://{}/ckpt", unique("mem"))).expect("open"),
        _dir: None,
    }
}

pub fn s3_root() -> Option<TestRoot> {
    moto().map(|m| TestRoot {
        backend: "s3",
        root: m.root(&unique("s3")),
        _dir: None,
    })
}

/// Every backend this machine can host.
pub fn all_roots() -> Vec<TestRoot> {
    let mut v = vec![local_root(), memory_root()];
    v.extend(s3_root());
    v
}

/// Deterministic pseudo-random numbers (weights-like data).
pub use kiln_checkpoint::testdata::Rng;

/// A float32 tensor that looks like trained weights (small normal values).
pub fn weights_f32(name: &str, shape: &[usize], seed: u64) -> OwnedTensor {
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    let data = (0..n)
        .flat_map(|_| rng.normal(0.02).to_le_bytes())
        .collect();
    OwnedTensor {
        name: name.into(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        data,
    }
}

/// The same, rounded to bfloat16.
pub fn weights_bf16(name: &str, shape: &[usize], seed: u64) -> OwnedTensor {
    let f = weights_f32(name, shape, seed);
    let data = f
        .data
        .chunks_exact(4)
        .flat_map(|b| {
            let bits = u32::from_le_bytes(b.try_into().unwrap());
            let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
            (rounded as u16).to_le_bytes()
        })
        .collect();
    OwnedTensor {
        dtype: DType::BF16,
        data,
        ..f
    }
}

pub fn owned(name: &str, dtype: DType, shape: &[usize], data: Vec<u8>) -> OwnedTensor {
    OwnedTensor {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// A small model-and-optimizer-like state of mixed dtypes and sizes.
pub fn mixed_state(seed: u64) -> Vec<OwnedTensor> {
    vec![
        weights_f32("model.layer0.weight", &[256, 200], seed),
        weights_f32("model.layer0.bias", &[256], seed + 1),
        weights_bf16("model.layer1.weight", &[300, 170], seed + 2),
        weights_f32("optim.layer0.weight.exp_avg", &[256, 200], seed + 3),
        owned(
            "optim.step",
            DType::I64,
            &[],
            1234i64.to_le_bytes().to_vec(),
        ),
        owned("model.empty", DType::F32, &[0, 5], vec![]),
        owned(
            "model.mask",
            DType::U8,
            &[1000],
            (0..1000).map(|i| (i % 3) as u8).collect(),
        ),
        owned(
            "model.f64",
            DType::F64,
            &[100],
            (0..100)
                .flat_map(|i| (i as f64 * 0.5).to_le_bytes())
                .collect(),
        ),
    ]
}

pub fn views(state: &[OwnedTensor]) -> Vec<TensorView<'_>> {
    state.iter().map(|t| t.view()).collect()
}

pub fn meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        training_state: serde_json::json!({ "step": step, "cursor": step * 32, "rng": [1, 2, 3] }),
        job_spec: serde_json::json!({ "name": "test" }),
        code_version: "test".into(),
        dataset_fingerprint: "fp".into(),
        world_size: 1,
        metrics: [("loss".to_string(), 1.0 / (step as f64 + 1.0))].into(),
        job: "job".into(),
    }
}

pub fn small_chunks() -> SaveConfig {
    SaveConfig {
        chunk_bytes: 64 << 10,
        upload_concurrency: 4,
        commit_timeout: Duration::from_secs(20),
        ..SaveConfig::default()
    }
}

/// Saves `state` at `step` from `world` ranks on threads (each its own
/// checkpointer) and returns every rank's outcome, rank 0 first.
pub fn save_world(
    root: &CheckpointRoot,
    cfg: &SaveConfig,
    world: usize,
    step: u64,
    attempt: &str,
    state: &[OwnedTensor],
) -> Vec<SaveOutcome> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let root = root.clone();
                let cfg = cfg.clone();
                s.spawn(move || {
                    let mut c = Checkpointer::new(root, cfg, rank, world).expect("checkpointer");
                    c.save(step, attempt, &views(state), &meta(step))
                        .expect("save");
                    let mut out = c.flush();
                    assert_eq!(out.len(), 1);
                    out.pop().unwrap().expect("background save")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

pub fn assert_same_tensors(a: &[OwnedTensor], b: &[OwnedTensor]) {
    let mut a: Vec<&OwnedTensor> = a.iter().collect();
    let mut b: Vec<&OwnedTensor> = b.iter().collect();
    a.sort_by(|x, y| x.name.cmp(&y.name));
    b.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(a.len(), b.len(), "tensor count");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.dtype, y.dtype, "{}", x.name);
        assert_eq!(x.shape, y.shape, "{}", x.name);
        assert!(x.data == y.data, "bytes of {} differ", x.name);
    }
}

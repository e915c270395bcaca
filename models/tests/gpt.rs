//! kiln_models::gpt against its PyTorch twin (scripts/kiln_gpt.py), and the
//! TorchScript language-model fixture that returns its own loss.

use std::path::PathBuf;
use std::process::Command;

use kiln_models::gpt::{Gpt, GptConfig, Positions};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, IValue, Kind, Tensor};

/// The repository root, read at run time: a shared target folder reuses test
/// binaries across clones, so `env!` would point at another checkout.
fn repo() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..")
}

/// The venv's python. The test suite always bootstraps it, so its absence is a
/// failure, never a skip.
fn python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/bootstrap.sh (PyTorch equivalence needs the full torch install)",
        python.display()
    );
    python
}

/// A fresh scratch folder for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("kiln-gpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn small(positions: Positions) -> GptConfig {
    GptConfig {
        vocab: 64,
        seq_len: 16,
        n_layer: 2,
        n_head: 2,
        d_model: 32,
        dropout: 0.0,
        positions,
        bf16: false,
    }
}

fn build(cfg: GptConfig, seed: i64) -> (nn::VarStore, Gpt) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let gpt = Gpt::new(&vs.root(), cfg).expect("valid config");
    (vs, gpt)
}

/// GPT-2's initial weights keep every activation near zero, where a wrong GELU,
/// a mirrored rotation or a leaky mask barely shows; noise of order 0.2 on
/// every parameter (biases included) puts each layer in its non-linear range.
fn perturb(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for mut p in vs.trainable_variables() {
            let _ = p.g_add_(&(p.randn_like() * 0.2));
        }
    });
}

fn random_tokens(shape: [i64; 2], vocab: i64) -> Tensor {
    Tensor::randint(vocab, shape, (Kind::Int64, Device::Cpu))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn parameters_have_the_twins_names_and_shapes() {
    let (vs, gpt) = build(small(Positions::Learned), 0);
    let mut names: Vec<(String, Vec<i64>)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.size()))
        .collect();
    names.sort();
    let mut expected = vec![
        ("wte.weight".to_string(), vec![64, 32]),
        ("wpe.weight".to_string(), vec![16, 32]),
        ("ln_f.weight".to_string(), vec![32]),
        ("ln_f.bias".to_string(), vec![32]),
    ];
    for i in 0..2 {
        for (name, shape) in [
            ("ln_1.weight", vec![32]),
            ("ln_1.bias", vec![32]),
            ("attn.c_attn.weight", vec![96, 32]),
            ("attn.c_attn.bias", vec![96]),
            ("attn.c_proj.weight", vec![32, 32]),
            ("attn.c_proj.bias", vec![32]),
            ("ln_2.weight", vec![32]),
            ("ln_2.bias", vec![32]),
            ("mlp.c_fc.weight", vec![128, 32]),
            ("mlp.c_fc.bias", vec![128]),
            ("mlp.c_proj.weight", vec![32, 128]),
            ("mlp.c_proj.bias", vec![32]),
        ] {
            expected.push((format!("h.{i}.{name}"), shape));
        }
    }
    expected.sort();
    assert_eq!(names, expected);
    assert!(vs.variables().values().all(|t| t.requires_grad()));

    let logits = gpt.forward_t(&random_tokens([3, 16], 64), false).unwrap();
    assert_eq!(logits.size(), [3, 16, 64]);
    assert_eq!(logits.kind(), Kind::Float);
    let loss = gpt
        .loss(
            &random_tokens([3, 16], 64),
            &random_tokens([3, 16], 64),
            false,
        )
        .unwrap();
    assert_eq!(loss.size(), Vec::<i64>::new());

    // Rotary positions have no position embedding and nothing else extra.
    let (vs, _) = build(small(Positions::Rotary), 0);
    let rotary: Vec<String> = vs.variables().into_keys().collect();
    assert_eq!(rotary.len(), expected.len() - 1);
    assert!(!rotary.iter().any(|n| n.starts_with("wpe")), "{rotary:?}");
}

#[test]
fn output_projection_is_tied_to_the_token_embedding() {
    let (vs, gpt) = build(small(Positions::Learned), 1);
    assert!(!vs.variables().keys().any(|n| n.contains("lm_head")));
    // Changing a row of wte that no input token uses changes only that
    // vocabulary entry's logits: the output projection reads wte.
    let tokens = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
    let before = gpt.forward_t(&tokens, false).unwrap();
    let wte = vs.variables()["wte.weight"].shallow_clone();
    let _ = tch::no_grad(|| wte.get(40).fill_(0.5));
    let after = gpt.forward_t(&tokens, false).unwrap();
    let changed = (&before - &after).abs().amax([0, 1], false).gt(0.0);
    let changed: Vec<bool> = Vec::try_from(&changed).unwrap();
    let ids: Vec<usize> = (0..64).filter(|&i| changed[i]).collect();
    assert_eq!(ids, [40]);
}

#[test]
fn initialisation_follows_gpt2() {
    let cfg = GptConfig {
        d_model: 64,
        n_layer: 4,
        ..small(Positions::Learned)
    };
    let (vs, _) = build(cfg, 2);
    let vars = vs.variables();
    let std = |name: &str| vars[name].std(true).double_value(&[]);
    let near = |name: &str, want: f64| {
        let got = std(name);
        assert!(
            (got - want).abs() < 0.1 * want,
            "{name}: std {got}, want {want}"
        );
    };
    near("wte.weight", 0.02);
    near("wpe.weight", 0.02);
    near("h.0.attn.c_attn.weight", 0.02);
    near("h.3.mlp.c_fc.weight", 0.02);
    // Residual projections: 0.02 / sqrt(2 * n_layer).
    let proj = 0.02 / (8f64).sqrt();
    near("h.0.attn.c_proj.weight", proj);
    near("h.3.mlp.c_proj.weight", proj);
    for (name, t) in &vars {
        let (min, max) = (t.min().double_value(&[]), t.max().double_value(&[]));
        if name.ends_with(".bias") {
            assert_eq!((min, max), (0.0, 0.0), "{name}");
        } else if name.starts_with("ln_") || name.contains(".ln_") {
            assert_eq!((min, max), (1.0, 1.0), "{name}");
        }
    }
}

#[test]
fn later_tokens_do_not_change_earlier_logits() {
    for positions in [Positions::Learned, Positions::Rotary] {
        let (vs, gpt) = build(small(positions), 3);
        perturb(&vs);
        let tokens = random_tokens([2, 16], 64);
        let edited = tokens.copy();
        let _ = edited.narrow(1, 10, 1).fill_(63);
        let _ = tokens.narrow(1, 10, 1).fill_(0);
        let a = gpt.forward_t(&tokens, false).unwrap();
        let b = gpt.forward_t(&edited, false).unwrap();
        let earlier = max_abs_diff(&a.narrow(1, 0, 10), &b.narrow(1, 0, 10));
        assert!(
            earlier < 1e-6,
            "{positions:?}: earlier logits moved by {earlier}"
        );
        assert!(max_abs_diff(&a.narrow(1, 10, 6), &b.narrow(1, 10, 6)) > 1e-4);
    }
}

/// Runs the twin on the Rust model's parameters and batch; prints its logits'
/// and loss's distance to the Rust ones, and writes its gradients.
const TWIN_CHECK: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import load_file, save_file
from kiln_gpt import GPT

params, io = load_file(sys.argv[2]), load_file(sys.argv[3])
model = GPT(vocab=64, seq_len=16, n_layer=2, n_head=2, d_model=32, dropout=0.0,
            positions=sys.argv[4])
model.load_state_dict(params, strict=True)
model.eval()
logits = model(io["tokens"])
loss = model(io["tokens"], io["targets"])
loss.backward()
save_file({n: p.grad.contiguous() for n, p in model.named_parameters()}, sys.argv[5])
print((logits - io["logits"]).abs().max().item(), (loss - io["loss"]).abs().item())
"#;

fn matches_pytorch(positions: Positions, name: &str) {
    let python = python();
    let scratch = Scratch::new(name);
    let (vs, gpt) = build(small(positions), 4);
    perturb(&vs);
    let tokens = random_tokens([3, 16], 64);
    let targets = random_tokens([3, 16], 64);
    let logits = gpt.forward_t(&tokens, false).unwrap();
    let loss = gpt.loss(&tokens, &targets, false).unwrap();
    loss.backward();

    let params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    Tensor::write_safetensors(&params, scratch.path("params.safetensors")).unwrap();
    let io = [
        ("tokens", tokens),
        ("targets", targets),
        ("logits", logits.detach()),
        ("loss", loss.detach()),
    ];
    Tensor::write_safetensors(&io, scratch.path("io.safetensors")).unwrap();
    let twin_positions = match positions {
        Positions::Learned => "learned",
        Positions::Rotary => "rotary",
    };
    let out = Command::new(&python)
        .arg("-c")
        .arg(TWIN_CHECK)
        .arg(repo().join("scripts"))
        .arg(scratch.path("params.safetensors"))
        .arg(scratch.path("io.safetensors"))
        .arg(twin_positions)
        .arg(scratch.path("grads.safetensors"))
        .output()
        .expect("run the venv's python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "twin check failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let diffs: Vec<f64> = stdout
        .split_whitespace()
        .map(|x| x.parse().expect("twin prints two numbers"))
        .collect();
    let [logit_diff, loss_diff] = diffs[..] else {
        panic!("unexpected twin output: {stdout}")
    };
    eprintln!("{positions:?}: max |logit diff| {logit_diff:e}, |loss diff| {loss_diff:e}");
    assert!(
        logit_diff < 1e-4,
        "{positions:?}: max |logit diff| {logit_diff}"
    );
    assert!(loss_diff < 1e-5, "{positions:?}: |loss diff| {loss_diff}");

    // The backward passes agree too, parameter by parameter.
    let grads = Tensor::read_safetensors(scratch.path("grads.safetensors")).unwrap();
    assert_eq!(grads.len(), params.len());
    let vars = vs.variables();
    for (name, twin_grad) in grads {
        let grad = vars[&name].grad();
        let diff = max_abs_diff(&grad, &twin_grad);
        assert!(diff < 1e-5, "{positions:?}: {name}: max |grad diff| {diff}");
    }
}

#[test]
fn learned_positions_match_pytorch() {
    matches_pytorch(Positions::Learned, "learned");
}

#[test]
fn rotary_positions_match_pytorch() {
    matches_pytorch(Positions::Rotary, "rotary");
}

#[test]
fn bf16_stays_close_and_keeps_float32_parameters() {
    for positions in [Positions::Learned, Positions::Rotary] {
        let (vs, gpt) = build(small(positions), 5);
        perturb(&vs);
        let mut vs_bf16 = nn::VarStore::new(Device::Cpu);
        let gpt_bf16 = Gpt::new(
            &vs_bf16.root(),
            GptConfig {
                bf16: true,
                ..small(positions)
            },
        )
        .unwrap();
        vs_bf16.copy(&vs).unwrap();
        let tokens = random_tokens([2, 16], 64);
        let targets = random_tokens([2, 16], 64);
        let loss = scalar(&gpt.loss(&tokens, &targets, false).unwrap());
        let logits = gpt_bf16.forward_t(&tokens, false).unwrap();
        assert_eq!(logits.kind(), Kind::Float);
        let loss_bf16 = gpt_bf16.loss(&tokens, &targets, true).unwrap();
        assert_eq!(loss_bf16.kind(), Kind::Float);
        // Close, but not equal: the products really ran in bfloat16.
        assert_ne!(scalar(&loss_bf16), loss, "{positions:?}");
        assert!(
            (scalar(&loss_bf16) - loss).abs() < 2e-2,
            "{positions:?}: bf16 loss {} vs fp32 {loss}",
            scalar(&loss_bf16)
        );
        loss_bf16.backward();
        for (name, t) in vs_bf16.variables() {
            assert_eq!(t.kind(), Kind::Float, "{name}");
            let grad = t.grad();
            assert!(grad.defined(), "{name} has no gradient");
            assert_eq!(grad.kind(), Kind::Float, "{name}");
        }
        let wte_grad = vs_bf16.variables()["wte.weight"].grad();
        assert!(scalar(&wte_grad.abs().sum(Kind::Float)) > 0.0);
    }
}

#[test]
fn next_token_logits_match_the_full_forwards_last_position() {
    for positions in [Positions::Learned, Positions::Rotary] {
        let (vs, gpt) = build(small(positions), 8);
        perturb(&vs);
        for (b, t) in [(1, 1), (1, 16), (3, 7), (4, 16)] {
            let tokens = random_tokens([b, t], 64);
            let (full, next) = tch::no_grad(|| {
                let full = gpt.forward_t(&tokens, false).unwrap().select(1, -1);
                (full, gpt.next_token_logits(&tokens).unwrap())
            });
            assert_eq!(next.size(), [b, 64]);
            assert_eq!(next.kind(), Kind::Float);
            let diff = max_abs_diff(&full, &next);
            assert!(diff < 1e-5, "{positions:?} [{b}, {t}]: max |diff| {diff}");
        }
        // At a given batch shape a row's logits depend on its own tokens
        // only, bit for bit.
        let tokens = random_tokens([4, 9], 64);
        let other = Tensor::cat(&[tokens.narrow(0, 0, 2), random_tokens([2, 9], 64)], 0);
        let (a, b) = tch::no_grad(|| {
            (
                gpt.next_token_logits(&tokens).unwrap(),
                gpt.next_token_logits(&other).unwrap(),
            )
        });
        assert!(a.narrow(0, 0, 2).equal(&b.narrow(0, 0, 2)), "{positions:?}");
        assert!(gpt.next_token_logits(&random_tokens([1, 17], 64)).is_err());
        assert!(
            gpt.next_token_logits(&Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)))
                .is_err()
        );
    }
}

#[test]
fn cached_forward_matches_the_full_forward() {
    for positions in [Positions::Learned, Positions::Rotary] {
        let (vs, gpt) = build(small(positions), 6);
        perturb(&vs);
        let tokens = random_tokens([2, 14], 64);
        let full = tch::no_grad(|| gpt.forward_t(&tokens, false)).unwrap();
        let mut cache = gpt.new_cache();
        // A prompt, then one token at a time, then a chunk of three (a chunk
        // with a past needs an explicit mask), then one more.
        let mut pieces = Vec::new();
        for (start, len) in [(0, 5), (5, 1), (6, 1), (7, 1), (8, 3), (11, 1), (12, 2)] {
            let piece =
                tch::no_grad(|| gpt.forward_cached(&tokens.narrow(1, start, len), &mut cache));
            pieces.push(piece.unwrap());
        }
        assert_eq!(cache.len(), 14);
        let cached = Tensor::cat(&pieces, 1);
        let diff = max_abs_diff(&full, &cached);
        assert!(diff < 1e-4, "{positions:?}: max |logit diff| {diff}");
    }
}

#[test]
fn generation_is_reproducible_and_greedy_follows_the_argmax() {
    let (_vs, gpt) = build(small(Positions::Rotary), 7);
    let prompt = [3i64, 14, 15, 9];
    let sample = |seed| gpt.generate(&prompt, 8, 1.0, None, seed, |_| true).unwrap();
    let first = sample(1);
    assert_eq!(first.len(), 8);
    assert!(first.iter().all(|&t| (0..64).contains(&t)));
    assert_eq!(first, sample(1));
    assert_ne!(first, sample(2));

    let greedy = gpt.generate(&prompt, 8, 0.0, None, 1, |_| true).unwrap();
    assert_eq!(
        greedy,
        gpt.generate(&prompt, 8, 0.0, Some(5), 99, |_| true)
            .unwrap()
    );
    // Each greedy token is the argmax of the full forward over what came before.
    let sequence: Vec<i64> = prompt.iter().chain(&greedy[..7]).copied().collect();
    let tokens = Tensor::from_slice(&sequence).view([1, -1]);
    let logits = tch::no_grad(|| gpt.forward_t(&tokens, false)).unwrap();
    let argmax: Vec<i64> = Vec::try_from(&logits.argmax(-1, false).view([-1])).unwrap();
    assert_eq!(argmax[3..], greedy[..]);

    // top_k = 1 is greedy whatever the temperature.
    assert_eq!(
        gpt.generate(&prompt, 8, 5.0, Some(1), 4, |_| true).unwrap(),
        greedy
    );
    // The callback can stop early; the token it refused is still returned.
    let mut seen = Vec::new();
    let stopped = gpt
        .generate(&prompt, 8, 1.0, None, 1, |t| {
            seen.push(t);
            seen.len() < 3
        })
        .unwrap();
    assert_eq!(stopped, first[..3]);
    assert_eq!(seen, stopped);
    // A full context stops generation: 14 + 2 fed tokens fill 16 positions,
    // and the third token is predicted from the full window.
    let long: Vec<i64> = (0..14).collect();
    assert_eq!(
        gpt.generate(&long, 10, 1.0, None, 1, |_| true)
            .unwrap()
            .len(),
        3
    );
    assert!(
        gpt.generate(&prompt, 0, 1.0, None, 1, |_| true)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_gradient_step_lowers_the_loss() {
    let (vs, gpt) = build(small(Positions::Learned), 8);
    let sequence: Vec<i64> = [5i64, 6, 7, 8].repeat(5);
    let tokens = Tensor::from_slice(&sequence[..16]).view([1, 16]);
    let targets = Tensor::from_slice(&sequence[1..17]).view([1, 16]);
    let loss = gpt.loss(&tokens, &targets, true).unwrap();
    loss.backward();
    tch::no_grad(|| {
        for mut p in vs.trainable_variables() {
            let step = p.grad() * 0.5;
            let _ = p.f_sub_(&step).unwrap();
        }
    });
    let after = gpt.loss(&tokens, &targets, true).unwrap();
    assert!(
        scalar(&after) < scalar(&loss) - 0.05,
        "loss {} -> {}",
        scalar(&loss),
        scalar(&after)
    );
}

fn lm_batch(tokens: &Tensor, targets: &Tensor) -> IValue {
    IValue::GenericDict(vec![
        (
            IValue::String("tokens".into()),
            IValue::Tensor(tokens.shallow_clone()),
        ),
        (
            IValue::String("targets".into()),
            IValue::Tensor(targets.shallow_clone()),
        ),
    ])
}

fn lm_loss(module: &tch::TrainableCModule, batch: &IValue) -> Tensor {
    match module.forward_is(&[batch]) {
        Ok(IValue::Tensor(loss)) => loss,
        other => panic!("forward of a Dict[str, Tensor] batch: {other:?}"),
    }
}

fn lm_fixture() -> PathBuf {
    repo().join("examples/torchscript/lm_loss.pt")
}

#[test]
fn torchscript_lm_takes_a_dict_batch_and_trains() {
    tch::manual_seed(9);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut module = tch::TrainableCModule::load(lm_fixture(), vs.root()).unwrap();
    module.set_train();
    let tokens = random_tokens([4, 32], 256);
    let targets = tokens.roll([-1], [1]);
    let batch = lm_batch(&tokens, &targets);

    let loss = lm_loss(&module, &batch);
    assert_eq!(loss.size(), Vec::<i64>::new());
    assert_eq!(loss.kind(), Kind::Float);
    // Near ln(256) at GPT-2 initialisation.
    assert!(
        (scalar(&loss) - 256f64.ln()).abs() < 0.2,
        "{}",
        scalar(&loss)
    );
    // The same entry point by name, as a trainer might call it.
    match module.method_is("forward", &[&batch]) {
        Ok(IValue::Tensor(again)) => assert_eq!(scalar(&again), scalar(&loss)),
        other => panic!("method_is(\"forward\"): {other:?}"),
    }

    loss.backward();
    let params = vs.trainable_variables();
    assert!(params.len() >= 20, "{} parameters", params.len());
    for p in &params {
        assert!(p.grad().defined(), "a parameter got no gradient");
    }
    let wte_grad = vs.variables()["gpt_wte_weight"].grad();
    assert!(scalar(&wte_grad.abs().sum(Kind::Float)) > 0.0);

    let mut opt = nn::Sgd::default().build(&vs, 1.0).unwrap();
    opt.zero_grad();
    let first = scalar(&loss);
    let mut last = first;
    for _ in 0..5 {
        let loss = lm_loss(&module, &batch);
        opt.backward_step(&loss);
        last = scalar(&loss);
    }
    let last = last.min(scalar(&lm_loss(&module, &batch)));
    assert!(last < first - 0.05, "loss {first} -> {last}");
}

#[test]
fn torchscript_lm_computes_the_loss_of_the_rust_model() {
    // The fixture's weights in a Rust Gpt give the same loss: the committed
    // TorchScript twin and gpt.rs agree without running Python.
    let vs_script = nn::VarStore::new(Device::Cpu);
    let module = tch::TrainableCModule::load(lm_fixture(), vs_script.root()).unwrap();
    let cfg = GptConfig {
        vocab: 256,
        seq_len: 64,
        n_layer: 2,
        n_head: 2,
        d_model: 64,
        dropout: 0.0,
        positions: Positions::Learned,
        bf16: false,
    };
    let (vs, gpt) = build(cfg, 10);
    let script_vars = vs_script.variables();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let key = format!("gpt_{}", name.replace('.', "_"));
            var.copy_(&script_vars[&key]);
        }
    });
    let tokens = random_tokens([2, 64], 256);
    let targets = random_tokens([2, 64], 256);
    let script = scalar(&lm_loss(&module, &lm_batch(&tokens, &targets)));
    let rust = scalar(&gpt.loss(&tokens, &targets, false).unwrap());
    assert!(
        (script - rust).abs() < 1e-5,
        "torchscript {script} vs rust {rust}"
    );
}

//! What a language model's `infer` costs per sequence on one thread, by path
//! and batch: the full forward pass's last position (`Gpt::forward_t`, what
//! kiln served before) against `Gpt::next_token_logits` (the last block at
//! the last position only), at batches of 1 to 32 sequences, for the serving
//! benchmark's GPT (bench/lm.toml: 4 layers, 4 heads, d_model 256, context
//! 128, byte vocabulary) with random weights. Run:
//! `cargo run --release -p kiln-serve --example gpt_infer [LEN] [BATCH...]`
//! (default: 128 and 1 2 4 8 16 32).

use std::time::Instant;

use kiln_models::gpt::{Gpt, GptConfig, Positions};
use tch::{Device, Kind, Tensor, nn};

/// Best-of-`runs` ms of `f`, after two warm-up calls.
fn best_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("LEN and BATCH are whole numbers"))
        .collect();
    let len = args.first().copied().unwrap_or(128);
    let batches = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![1, 2, 4, 8, 16, 32]
    };
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = GptConfig {
        vocab: 256,
        seq_len: 128,
        n_layer: 4,
        n_head: 4,
        d_model: 256,
        dropout: 0.0,
        positions: Positions::Learned,
        bf16: false,
    };
    let gpt = Gpt::new(&vs.root(), cfg).expect("a valid config");
    // As the server holds its weights (no gradients).
    vs.freeze();
    println!("sequences of {len} ids, one thread; ms per sequence (best of 20 passes)");
    println!(
        "{:>5} {:>12} {:>12} {:>7}",
        "batch", "forward_t", "next_token", "ratio"
    );
    for &b in &batches {
        let x = Tensor::randint(256, [b as i64, len as i64], (Kind::Int64, Device::Cpu));
        let full = best_ms(20, || {
            let y = tch::no_grad(|| gpt.forward_t(&x, false)).expect("forward");
            let _ = y.select(1, -1).contiguous();
        }) / b as f64;
        let next = best_ms(20, || {
            let _ = tch::no_grad(|| gpt.next_token_logits(&x)).expect("forward");
        }) / b as f64;
        println!("{b:>5} {full:>12.3} {next:>12.3} {:>7.2}", full / next);
    }
}

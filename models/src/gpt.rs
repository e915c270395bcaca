//! Decoder-only GPT (the GPT-2 / nanoGPT architecture) in `tch::nn`.
//!
//! The model has a plain-PyTorch twin, `scripts/kiln_gpt.py`, with the same
//! parameter names, initialisation and forward pass; `models/tests/gpt.rs`
//! loads the parameters of a Rust model into the twin and compares logits and
//! loss, so that checkpoints move between the two and PyTorch baselines compare
//! like with like.
//!
//! # Layout
//!
//! - [`GptConfig`] and [`Positions`]: the architecture, checked by
//!   [`GptConfig::validate`].
//! - [`Gpt`]: the parameters in a `VarStore` path and the forward pass:
//!   [`Gpt::forward_t`] (training and evaluation over whole sequences),
//!   [`Gpt::loss`] / [`Gpt::loss_sum`], and for generation
//!   [`Gpt::forward_cached`] over a [`KvCache`] and [`Gpt::generate`].
//!
//! # Parameters
//!
//! `wte.weight` [vocab, d_model]; `wpe.weight` [seq_len, d_model] (learned
//! positions only); per block `i`: `h.{i}.ln_1.{weight,bias}`,
//! `h.{i}.attn.c_attn.{weight,bias}` ([3·d_model, d_model]),
//! `h.{i}.attn.c_proj.{weight,bias}`, `h.{i}.ln_2.{weight,bias}`,
//! `h.{i}.mlp.c_fc.{weight,bias}` ([4·d_model, d_model]),
//! `h.{i}.mlp.c_proj.{weight,bias}`; then `ln_f.{weight,bias}`. The output
//! projection is tied to `wte.weight`, so there is no `lm_head`.
//!
//! # Rotary positions
//!
//! The same convention in Rust and in the twin: base 10000, "rotate half" as in
//! GPT-NeoX and Hugging Face LLaMA. For a head of dimension `hd`,
//! `inv_freq[j] = 1 / 10000^(2j / hd)` for `j < hd/2`, the angle of position `p`
//! is `p · inv_freq`, repeated twice to `hd` values (`cat(angles, angles)`), and
//! `rope(x) = x · cos + rotate_half(x) · sin` where
//! `rotate_half(x) = cat(-x[hd/2..], x[..hd/2])`: the first half of the head
//! pairs with the second half, not neighbouring elements (GPT-J / Meta's
//! original interleave). Applied to queries and keys of every head, before
//! attention.
//!
//! # Mixed precision
//!
//! With [`GptConfig::bf16`] the matrix products (every linear layer, the
//! attention, the tied output projection) run in bfloat16 on bfloat16 copies of
//! the float32 master weights, made by explicit casts since tch's autocast is
//! CUDA-only. LayerNorm, the residual stream and the returned logits stay
//! float32 (the MLP's GELU and the rotary rotation work on the bfloat16
//! products, as they would under CUDA autocast); the casts' backward passes
//! bring the gradients home to the float32 parameters, so an optimizer never
//! sees anything but float32.

use tch::nn;
use tch::{Device, Kind, Reduction, Tensor};

use crate::error::{Error, Result};

/// Base of the rotary angles (RoFormer, GPT-NeoX, LLaMA).
const ROPE_BASE: f64 = 10_000.0;

/// Standard deviation of GPT-2's initial weights.
const INIT_STD: f64 = 0.02;

/// How the model learns where a token sits in the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// A learned embedding per position (`wpe.weight`), as in GPT-2.
    Learned,
    /// Rotary embeddings applied to queries and keys; no parameters.
    Rotary,
}

/// The architecture of a [`Gpt`].
#[derive(Debug, Clone, PartialEq)]
pub struct GptConfig {
    /// Number of token ids; every token must be below it.
    pub vocab: usize,
    /// The longest context the model accepts (size of `wpe` with learned
    /// positions, of the rotary tables otherwise).
    pub seq_len: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; `d_model` must be a multiple of it.
    pub n_head: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Dropout probability after the embeddings, inside attention and on both
    /// residual branches while training.
    pub dropout: f64,
    /// Learned or rotary positions.
    pub positions: Positions,
    /// Compute the matrix products in bfloat16 (see the module docs).
    pub bf16: bool,
}

impl GptConfig {
    /// Checks that the sizes make a model: all at least 1, heads divide the
    /// width, an even head dimension for rotary positions, dropout in [0, 1).
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("vocab", self.vocab),
            ("seq_len", self.seq_len),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("d_model", self.d_model),
        ] {
            if value < 1 {
                return Err(Error::config(format!(
                    "gpt.{name}: must be at least 1, not {value}"
                )));
            }
        }
        if !self.d_model.is_multiple_of(self.n_head) {
            return Err(Error::config(format!(
                "gpt.d_model {} is not divisible by gpt.n_head {}",
                self.d_model, self.n_head
            )));
        }
        if self.positions == Positions::Rotary && !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(format!(
                "gpt: rotary positions need an even head dimension, not {} (d_model {} / n_head {})",
                self.head_dim(),
                self.d_model,
                self.n_head
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(format!(
                "gpt.dropout: must be in [0, 1), not {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_head
    }
}

/// A LayerNorm over the last dimension with PyTorch's defaults (weight 1,
/// bias 0, eps 1e-5). Just its two tensors: `nn::LayerNorm` carries its whole
/// config, and a `Gpt` kept small sits beside small variants in
/// `kiln_models::Net` without boxing.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(path: nn::Path, width: i64) -> LayerNorm {
        LayerNorm {
            weight: path.var("weight", &[width], nn::Init::Const(1.0)),
            bias: path.var("bias", &[width], nn::Init::Const(0.0)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let width = self.weight.size();
        x.layer_norm(&width, Some(&self.weight), Some(&self.bias), 1e-5, true)
    }
}

/// One pre-LayerNorm transformer block.
#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: nn::Linear,
    attn_proj: nn::Linear,
    ln_2: LayerNorm,
    c_fc: nn::Linear,
    mlp_proj: nn::Linear,
}

/// The cos and sin of every position's rotary angles, [seq_len, head_dim] each.
#[derive(Debug)]
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

/// Keys and values of the tokens seen so far, so that generation feeds each new
/// token once instead of the whole sequence again.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: keys and values [batch, n_head, len, head_dim]; `None` before
    /// the first forward, when the batch size is not yet known.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Number of positions cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position, to start a new sequence.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.len = 0;
    }

    /// Batch size of the cached sequences, once known.
    fn batch(&self) -> Option<i64> {
        self.layers
            .first()
            .and_then(|layer| layer.as_ref())
            .map(|(k, _)| k.size()[0])
    }
}

/// A decoder-only transformer language model whose parameters live in a
/// `VarStore` (see the module docs for names and conventions).
#[derive(Debug)]
pub struct Gpt {
    cfg: GptConfig,
    wte: Tensor,
    wpe: Option<Tensor>,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    rope: Option<RopeTables>,
}

impl Gpt {
    /// Creates the parameters under `root` with GPT-2's initialisation: linear
    /// and embedding weights ~ N(0, 0.02), biases 0, LayerNorm 1 and 0, and the
    /// residual projections (`c_proj`) ~ N(0, 0.02 / sqrt(2 · n_layer)) so that
    /// the residual stream's variance does not grow with depth.
    pub fn new(root: &nn::Path, cfg: GptConfig) -> Result<Gpt> {
        cfg.validate()?;
        let (vocab, seq_len, d) = (cfg.vocab as i64, cfg.seq_len as i64, cfg.d_model as i64);
        let normal = |stdev| nn::Init::Randn { mean: 0.0, stdev };
        let linear = |path: nn::Path, input: i64, output: i64, stdev: f64| {
            nn::linear(
                path,
                input,
                output,
                nn::LinearConfig {
                    ws_init: normal(stdev),
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                },
            )
        };
        let layer_norm = |path: nn::Path| LayerNorm::new(path, d);
        let proj_std = INIT_STD / (2.0 * cfg.n_layer as f64).sqrt();

        let wte = (root / "wte").var("weight", &[vocab, d], normal(INIT_STD));
        let wpe = match cfg.positions {
            Positions::Learned => {
                Some((root / "wpe").var("weight", &[seq_len, d], normal(INIT_STD)))
            }
            Positions::Rotary => None,
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let h = root / "h" / i;
                Block {
                    ln_1: layer_norm(&h / "ln_1"),
                    c_attn: linear(&h / "attn" / "c_attn", d, 3 * d, INIT_STD),
                    attn_proj: linear(&h / "attn" / "c_proj", d, d, proj_std),
                    ln_2: layer_norm(&h / "ln_2"),
                    c_fc: linear(&h / "mlp" / "c_fc", d, 4 * d, INIT_STD),
                    mlp_proj: linear(&h / "mlp" / "c_proj", 4 * d, d, proj_std),
                }
            })
            .collect();
        let ln_f = layer_norm(root / "ln_f");
        let rope = match cfg.positions {
            Positions::Rotary => Some(rope_tables(seq_len, cfg.head_dim() as i64, root.device())),
            Positions::Learned => None,
        };
        Ok(Gpt {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            rope,
        })
    }

    /// The architecture this model was built with.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Logits [b, t, vocab] (float32) for tokens [b, t] (int64), t <= seq_len.
    /// `train` turns dropout on.
    ///
    /// Token ids are not range-checked here (that would cost a device sync per
    /// step); an id outside the vocabulary is an error on the CPU and a device
    /// assert on CUDA.
    pub fn forward_t(&self, tokens: &Tensor, train: bool) -> Result<Tensor> {
        self.run(tokens, train, None)
    }

    /// Mean cross-entropy over all b·t positions (float32 scalar) of the logits
    /// of `tokens` against `targets` (both int64 [b, t]). Targets equal to -100
    /// are ignored, as in PyTorch.
    pub fn loss(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        self.cross_entropy(tokens, targets, train, Reduction::Mean)
    }

    /// Summed cross-entropy over all positions, for callers that weight losses
    /// across micro-batches or ranks by hand.
    pub fn loss_sum(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        self.cross_entropy(tokens, targets, train, Reduction::Sum)
    }

    fn cross_entropy(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        train: bool,
        reduction: Reduction,
    ) -> Result<Tensor> {
        if targets.size() != tokens.size() {
            return Err(Error::input(format!(
                "gpt: targets of shape {:?} do not match tokens of shape {:?}",
                targets.size(),
                tokens.size()
            )));
        }
        let logits = self.forward_t(tokens, train)?;
        logits
            .view([-1, self.cfg.vocab as i64])
            .f_cross_entropy_loss(&targets.reshape([-1]), None::<Tensor>, reduction, -100, 0.0)
            .map_err(Error::torch(
                "compute cross-entropy (is every target below vocab?)",
            ))
    }

    /// Next-token logits [b, vocab] (float32) after each sequence of `tokens`
    /// [b, t] (int64), t <= seq_len: what [`Gpt::forward_t`] gives at the last
    /// position, in evaluation mode, with less work. The last block needs every
    /// position's keys and values but nothing else of the earlier positions:
    /// its query, attention output, MLP, the final LayerNorm and the output
    /// projection run at the last position only (for this benchmark's GPT,
    /// 4 layers, context 128, about a fifth of the forward pass's work).
    /// Agrees with `forward_t` to float rounding, not bit for bit (other
    /// matrix shapes sum in other orders); deterministic for a given `b` and
    /// `t`, each row depending only on its own tokens. Wrapping the call in
    /// `tch::no_grad` is the caller's business.
    pub fn next_token_logits(&self, tokens: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = batch_and_time(tokens)?;
        if t > cfg.seq_len as i64 {
            return Err(Error::input(format!(
                "gpt: {t} positions pass the context of {} tokens",
                cfg.seq_len
            )));
        }
        let Some((last, blocks)) = self.blocks.split_last() else {
            return Err(Error::config("gpt: a model without blocks"));
        };
        let mut x = Tensor::f_embedding(&self.wte, tokens, -1, false, false).map_err(
            Error::torch("look up token embeddings (is every token below vocab?)"),
        )?;
        if let Some(wpe) = &self.wpe {
            x = &x + wpe.narrow(0, 0, t);
        }
        for block in blocks {
            x = &x + self.attention(block, &block.ln_1.forward(&x), 0, None, 0.0);
            x = &x + self.mlp(block, &x);
        }
        // The last block: keys and values of every position, the rest at the
        // last position.
        let (n_head, head_dim) = (cfg.n_head as i64, cfg.head_dim() as i64);
        let d = cfg.d_model as i64;
        let h = last.ln_1.forward(&x);
        let (w, bias) = (&last.c_attn.ws, last.c_attn.bs.as_ref());
        let part = |from: i64, rows: i64, input: &Tensor| {
            let bias = bias.map(|bs| self.matmul_weight(&bs.narrow(0, from, rows)));
            self.matmul_input(input)
                .linear(&self.matmul_weight(&w.narrow(0, from, rows)), bias)
        };
        let kv = part(d, 2 * d, &h).split(d, 2);
        let q = part(0, d, &h.narrow(1, t - 1, 1));
        let heads = |z: &Tensor, len: i64| z.view([b, len, n_head, head_dim]).transpose(1, 2);
        let (q, k, v) = (
            self.rope(&heads(&q, 1), t - 1, 1),
            self.rope(&heads(&kv[0], t), 0, t),
            heads(&kv[1], t),
        );
        // The last query sees every key: no mask.
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let y = y.transpose(1, 2).contiguous().view([b, 1, d]);
        let x = x.narrow(1, t - 1, 1) + self.linear(&y, &last.attn_proj).to_kind(Kind::Float);
        let x = &x + self.mlp(last, &x);
        let x = self.ln_f.forward(&x.view([b, d]));
        Ok(self
            .matmul_input(&x)
            .linear(&self.matmul_weight(&self.wte), None::<Tensor>)
            .to_kind(Kind::Float))
    }

    /// An empty cache for [`Gpt::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.cfg.n_layer).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Logits [b, t_new, vocab] of `tokens` [b, t_new] that continue the
    /// sequences in `cache` (positions start at `cache.len()`), adding their
    /// keys and values to it. Always in evaluation mode (no dropout); wrapping
    /// the call in `tch::no_grad` is the caller's business. Fails if the cache
    /// would pass `seq_len` or the batch size differs from the cached one.
    pub fn forward_cached(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.cfg.n_layer {
            return Err(Error::input(format!(
                "gpt: the cache has {} layers, the model {}",
                cache.layers.len(),
                self.cfg.n_layer
            )));
        }
        if let (Some(cached), Some(&batch)) = (cache.batch(), tokens.size().first())
            && cached != batch
        {
            return Err(Error::input(format!(
                "gpt: a batch of {batch} sequences does not continue the cache's {cached}"
            )));
        }
        self.run(tokens, false, Some(cache))
    }

    /// Generates up to `max_tokens` tokens after `prompt` with the KV cache and
    /// returns them (without the prompt).
    ///
    /// `temperature` 0 picks the most likely token (greedy; the lowest id on a
    /// tie); otherwise tokens are drawn from softmax(logits / temperature),
    /// restricted to the `top_k` most likely when given. The draws come from a
    /// SplitMix64 generator seeded with `seed` and never from libtorch's global
    /// generator, so a seed reproduces a generation exactly and generating does
    /// not disturb training's random stream.
    ///
    /// `on_token` sees each token as it is produced (for streaming); returning
    /// false stops generation after that token, which is still returned.
    /// Generation also stops when the context is full: the model never sees more
    /// than `seq_len` tokens, so at most `seq_len - prompt.len() + 1` tokens come
    /// back (the last one predicted from a full window). No sliding window.
    pub fn generate(
        &self,
        prompt: &[i64],
        max_tokens: usize,
        temperature: f64,
        top_k: Option<usize>,
        seed: u64,
        mut on_token: impl FnMut(i64) -> bool,
    ) -> Result<Vec<i64>> {
        let cfg = &self.cfg;
        if prompt.is_empty() {
            return Err(Error::input("generate: the prompt is empty"));
        }
        if prompt.len() > cfg.seq_len {
            return Err(Error::input(format!(
                "generate: a prompt of {} tokens does not fit the context of {}",
                prompt.len(),
                cfg.seq_len
            )));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t < 0 || t >= cfg.vocab as i64) {
            return Err(Error::input(format!(
                "generate: token {bad} is outside the vocabulary of {}",
                cfg.vocab
            )));
        }
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::input(format!(
                "generate: temperature must be a finite number >= 0, not {temperature}"
            )));
        }
        if top_k == Some(0) {
            return Err(Error::input("generate: top_k must be at least 1"));
        }
        let mut generated = Vec::new();
        if max_tokens == 0 {
            return Ok(generated);
        }
        let device = self.wte.device();
        let mut rng = SplitMix64(seed);
        let mut cache = self.new_cache();
        tch::no_grad(|| {
            let mut input = Tensor::from_slice(prompt).view([1, -1]).to_device(device);
            loop {
                let logits = self.forward_cached(&input, &mut cache)?;
                let last = logits.select(1, -1).view([-1]).to_kind(Kind::Float);
                let last = Vec::<f32>::try_from(&last.to_device(Device::Cpu))
                    .map_err(Error::torch("copy logits to the host"))?;
                let token = sample(&last, temperature, top_k, &mut rng);
                generated.push(token);
                if !on_token(token) || generated.len() >= max_tokens || cache.len() >= cfg.seq_len {
                    return Ok(generated);
                }
                input = Tensor::from_slice(&[token]).view([1, 1]).to_device(device);
            }
        })
    }

    /// The forward pass shared by training and cached generation.
    fn run(&self, tokens: &Tensor, train: bool, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (_, t) = batch_and_time(tokens)?;
        let offset = cache.as_ref().map_or(0, |c| c.len) as i64;
        if offset + t > cfg.seq_len as i64 {
            return Err(Error::input(format!(
                "gpt: {} positions pass the context of {} tokens",
                offset + t,
                cfg.seq_len
            )));
        }
        let p = if train { cfg.dropout } else { 0.0 };

        let mut x = Tensor::f_embedding(&self.wte, tokens, -1, false, false).map_err(
            Error::torch("look up token embeddings (is every token below vocab?)"),
        )?;
        // Residual sums are written `x = &x + ...`, never `x += ...`: tch's
        // `AddAssign` adds in place, and autograd still needs the old `x`.
        if let Some(wpe) = &self.wpe {
            x = &x + wpe.narrow(0, offset, t);
        }
        let mut x = x.dropout(p, train);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer = cache.as_mut().map(|c| &mut c.layers[i]);
            let attn = self.attention(block, &block.ln_1.forward(&x), offset, layer, p);
            x = &x + attn.dropout(p, train);
            x = &x + self.mlp(block, &x).dropout(p, train);
        }
        if let Some(cache) = cache {
            cache.len += t as usize;
        }
        // The output projection shares the token embedding (weight tying).
        let x = self.ln_f.forward(&x);
        Ok(self
            .matmul_input(&x)
            .linear(&self.matmul_weight(&self.wte), None::<Tensor>)
            .to_kind(Kind::Float))
    }

    /// Causal self-attention of `x` [b, t, d] (LayerNorm output) at positions
    /// `offset..offset+t`, with the earlier positions' keys and values from
    /// `cache` when given. Returns the c_proj output in float32, before dropout.
    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        offset: i64,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        dropout: f64,
    ) -> Tensor {
        let (b, t, d) = match x.size().as_slice() {
            &[b, t, d] => (b, t, d),
            _ => unreachable!("the residual stream is [b, t, d]"),
        };
        let (n_head, head_dim) = (self.cfg.n_head as i64, self.cfg.head_dim() as i64);
        let heads = |z: &Tensor| z.view([b, t, n_head, head_dim]).transpose(1, 2);
        let qkv = self.linear(x, &block.c_attn).split(d, 2);
        let (q, k, v) = (
            self.rope(&heads(&qkv[0]), offset, t),
            self.rope(&heads(&qkv[1]), offset, t),
            heads(&qkv[2]),
        );
        let y = match cache {
            None => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                dropout,
                true,
                None,
                false,
            ),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((past_k, past_v)) => (
                        Tensor::cat(&[&past_k, &k], 2),
                        Tensor::cat(&[&past_v, &v], 2),
                    ),
                    None => (k, v),
                };
                // SDPA's `is_causal` aligns the mask to the top left, which is
                // right only when queries and keys start together. With a past,
                // query i (position offset+i) sees keys 0..=offset+i; a single
                // new query sees every key and needs no mask at all.
                let y = if offset == 0 {
                    Tensor::scaled_dot_product_attention(
                        &q,
                        &k,
                        &v,
                        None::<Tensor>,
                        0.0,
                        true,
                        None,
                        false,
                    )
                } else {
                    let mask = (t > 1).then(|| {
                        let opts = (Kind::Int64, q.device());
                        let key_pos = Tensor::arange(offset + t, opts).view([1, -1]);
                        let query_pos =
                            Tensor::arange_start(offset, offset + t, opts).view([-1, 1]);
                        key_pos.le_tensor(&query_pos)
                    });
                    Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false)
                };
                *slot = Some((k, v));
                y
            }
        };
        let y = y.transpose(1, 2).contiguous().view([b, t, d]);
        self.linear(&y, &block.attn_proj).to_kind(Kind::Float)
    }

    /// The MLP branch of `block` for the residual stream `x`: float32,
    /// before dropout.
    fn mlp(&self, block: &Block, x: &Tensor) -> Tensor {
        let h = self
            .linear(&block.ln_2.forward(x), &block.c_fc)
            .gelu("none");
        self.linear(&h, &block.mlp_proj).to_kind(Kind::Float)
    }

    /// `z` [b, n_head, t, head_dim] at positions `offset..offset+t` with its
    /// rotary rotation applied (unchanged with learned positions).
    fn rope(&self, z: &Tensor, offset: i64, t: i64) -> Tensor {
        let Some(rope) = &self.rope else {
            return z.shallow_clone();
        };
        let cos = rope.cos.narrow(0, offset, t).to_kind(z.kind());
        let sin = rope.sin.narrow(0, offset, t).to_kind(z.kind());
        z * &cos + rotate_half(z) * &sin
    }

    /// A linear layer in the compute precision (its output stays in it).
    fn linear(&self, x: &Tensor, layer: &nn::Linear) -> Tensor {
        let bias = layer.bs.as_ref().map(|bs| self.matmul_weight(bs));
        self.matmul_input(x)
            .linear(&self.matmul_weight(&layer.ws), bias)
    }

    /// An input to a matrix product, in the compute precision.
    fn matmul_input(&self, x: &Tensor) -> Tensor {
        if self.cfg.bf16 && x.kind() != Kind::BFloat16 {
            x.to_kind(Kind::BFloat16)
        } else {
            x.shallow_clone()
        }
    }

    /// A float32 master weight as the matrix product uses it: the cast is part
    /// of the autograd graph, so gradients arrive at the float32 parameter.
    fn matmul_weight(&self, w: &Tensor) -> Tensor {
        if self.cfg.bf16 {
            w.to_kind(Kind::BFloat16)
        } else {
            w.shallow_clone()
        }
    }
}

/// The batch size and length of `tokens`, checked: int64 [b, t], both at
/// least 1.
fn batch_and_time(tokens: &Tensor) -> Result<(i64, i64)> {
    let (b, t) = match tokens.size().as_slice() {
        &[b, t] => (b, t),
        shape => {
            return Err(Error::input(format!(
                "gpt: tokens must be [batch, time], not {shape:?}"
            )));
        }
    };
    if tokens.kind() != Kind::Int64 {
        return Err(Error::input(format!(
            "gpt: tokens must be int64, not {:?}",
            tokens.kind()
        )));
    }
    if b < 1 || t < 1 {
        return Err(Error::input(format!(
            "gpt: empty batch of tokens {:?}",
            tokens.size()
        )));
    }
    Ok((b, t))
}

/// Rotary tables for `seq_len` positions, computed on the CPU with exactly the
/// operations of the twin's `rope_tables` so that both agree to the last bit.
fn rope_tables(seq_len: i64, head_dim: i64, device: Device) -> RopeTables {
    let opts = (Kind::Float, Device::Cpu);
    let exponents = Tensor::arange_start_step(0, head_dim, 2, opts) / head_dim as f64;
    let inv_freq = Tensor::pow_scalar(ROPE_BASE, &exponents).reciprocal();
    let angles = Tensor::arange(seq_len, opts).outer(&inv_freq);
    let emb = Tensor::cat(&[&angles, &angles], -1);
    RopeTables {
        cos: emb.cos().to_device(device),
        sin: emb.sin().to_device(device),
    }
}

/// `cat(-x2, x1)` over the last dimension split into halves `x1, x2`.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    Tensor::cat(
        &[&x.narrow(-1, half, half).neg(), &x.narrow(-1, 0, half)],
        -1,
    )
}

/// Picks the next token from one position's logits (see [`Gpt::generate`]).
fn sample(logits: &[f32], temperature: f64, top_k: Option<usize>, rng: &mut SplitMix64) -> i64 {
    // Descending by logit, ties by lower id: a total order, so the selection
    // below is deterministic.
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut candidates: Vec<usize> = (0..logits.len()).collect();
    if temperature == 0.0 {
        return candidates.into_iter().min_by(order).unwrap_or(0) as i64;
    }
    if let Some(k) = top_k.filter(|&k| k < candidates.len()) {
        candidates.select_nth_unstable_by(k - 1, order);
        candidates.truncate(k);
        candidates.sort_unstable();
    }
    let max = candidates
        .iter()
        .map(|&i| f64::from(logits[i]))
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = candidates
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / temperature).exp())
        .collect();
    // Inverse CDF: the first candidate whose cumulative weight passes u.
    let mut u = rng.next_f64() * weights.iter().sum::<f64>();
    for (&i, &w) in candidates.iter().zip(&weights) {
        u -= w;
        if u < 0.0 {
            return i as i64;
        }
    }
    // Rounding left u a hair above zero: the last candidate with weight.
    candidates
        .iter()
        .zip(&weights)
        .rev()
        .find(|(_, w)| **w > 0.0)
        .map_or(candidates[0], |(&i, _)| i) as i64
}

/// SplitMix64 (Steele, Lea and Flood 2014): a tiny, well-mixed generator, kept
/// here so that sampling is reproducible and independent of libtorch's RNG.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GptConfig {
        GptConfig {
            vocab: 64,
            seq_len: 16,
            n_layer: 2,
            n_head: 2,
            d_model: 32,
            dropout: 0.0,
            positions: Positions::Learned,
            bf16: false,
        }
    }

    #[test]
    fn validate_rejects_bad_sizes() {
        assert!(config().validate().is_ok());
        type Edit = fn(&mut GptConfig);
        let cases: [(Edit, &str); 5] = [
            (|c| c.vocab = 0, "gpt.vocab"),
            (|c| c.n_head = 3, "not divisible"),
            (|c| c.dropout = 1.0, "gpt.dropout"),
            (|c| c.dropout = f64::NAN, "gpt.dropout"),
            (
                |c| {
                    c.positions = Positions::Rotary;
                    c.n_head = 32;
                },
                "even head dimension",
            ),
        ];
        for (edit, expected) in cases {
            let mut cfg = config();
            edit(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn splitmix64_matches_reference_values() {
        // First outputs for seed 0 from the reference implementation
        // (Vigna's splitmix64.c).
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let u = SplitMix64(7).next_f64();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn sampling_respects_temperature_and_top_k() {
        let logits = [1.0f32, 3.0, 3.0, 2.0, -5.0];
        let mut rng = SplitMix64(1);
        // Greedy takes the first of the tied maxima.
        assert_eq!(sample(&logits, 0.0, None, &mut rng), 1);
        // top_k = 2 keeps ids 1 and 2 only.
        for _ in 0..200 {
            let t = sample(&logits, 1.0, Some(2), &mut rng);
            assert!(t == 1 || t == 2, "{t}");
        }
        // A tiny temperature is greedy up to ties.
        for _ in 0..50 {
            let t = sample(&logits, 1e-6, None, &mut rng);
            assert!(t == 1 || t == 2, "{t}");
        }
        // At temperature 1 every finite logit gets drawn sometimes, in
        // proportion to its probability.
        let mut counts = [0usize; 5];
        for _ in 0..20_000 {
            counts[sample(&logits, 1.0, None, &mut rng) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = f64::from(logits[i]).exp() / z;
            let freq = c as f64 / 20_000.0;
            assert!((freq - p).abs() < 0.015, "token {i}: {freq} vs {p}");
        }
    }

    #[test]
    fn rotate_half_pairs_the_halves() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let r = Vec::<f32>::try_from(&rotate_half(&x)).unwrap();
        assert_eq!(r, [-3.0, -4.0, 1.0, 2.0]);
    }

    #[test]
    fn forward_rejects_bad_inputs() {
        let vs = nn::VarStore::new(Device::Cpu);
        let gpt = Gpt::new(&vs.root(), config()).unwrap();
        let long = Tensor::zeros([1, 17], (Kind::Int64, Device::Cpu));
        let err = gpt.forward_t(&long, false).unwrap_err().to_string();
        assert!(err.contains("context of 16"), "{err}");
        let float = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
        assert!(gpt.forward_t(&float, false).is_err());
        let out_of_vocab = Tensor::from_slice(&[1i64, 64]).view([1, 2]);
        assert!(gpt.forward_t(&out_of_vocab, false).is_err());
        let err = gpt
            .generate(&[1, 99], 3, 0.0, None, 0, |_| true)
            .unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        assert!(gpt.generate(&[], 3, 0.0, None, 0, |_| true).is_err());
        assert!(gpt.generate(&[1], 3, -1.0, None, 0, |_| true).is_err());
        let mut cache = gpt.new_cache();
        let prompt = Tensor::zeros([2, 10], (Kind::Int64, Device::Cpu));
        let _ = tch::no_grad(|| gpt.forward_cached(&prompt, &mut cache)).unwrap();
        let more = Tensor::zeros([2, 7], (Kind::Int64, Device::Cpu));
        let err = tch::no_grad(|| gpt.forward_cached(&more, &mut cache)).unwrap_err();
        assert!(err.to_string().contains("17 positions"), "{err}");
        let other_batch = Tensor::zeros([3, 1], (Kind::Int64, Device::Cpu));
        assert!(tch::no_grad(|| gpt.forward_cached(&other_batch, &mut cache)).is_err());
    }
}

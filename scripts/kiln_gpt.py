"""The PyTorch twin of kiln's built-in GPT (`models/src/gpt.rs`).

A decoder-only transformer in the GPT-2 / nanoGPT shape, written as plain,
idiomatic PyTorch so that it can serve three purposes with one definition:

- the reference the Rust model is checked against (`models/tests/gpt.rs` loads
  the Rust parameters into this module with `load_state_dict(strict=True)` and
  compares logits and loss);
- a TorchScript bring-your-own model (`scripts/make_torchscript.py --lm`); the
  module is `torch.jit.script`-able;
- the peer model of PyTorch DDP benchmarks.

Usage::

    sys.path.insert(0, "scripts")
    from kiln_gpt import GPT
    model = GPT(vocab=256, seq_len=64, n_layer=2, n_head=2, d_model=64)
    logits = model(tokens)            # [b, t] int64 -> [b, t, vocab] float32
    loss = model(tokens, targets)     # scalar mean cross-entropy

Parameter names (identical in Rust; the state_dict of `positions="rotary"` has
no `wpe.weight`):

    wte.weight [vocab, d_model]          wpe.weight [seq_len, d_model]
    h.{i}.ln_1.weight/bias               h.{i}.attn.c_attn.weight [3d, d] / bias
    h.{i}.attn.c_proj.weight [d, d]/bias h.{i}.ln_2.weight/bias
    h.{i}.mlp.c_fc.weight [4d, d] / bias h.{i}.mlp.c_proj.weight [d, 4d] / bias
    ln_f.weight/bias

The output projection is tied to `wte.weight` (no `lm_head` parameter).

Rotary positions (the same convention in Rust): base 10000, "rotate half" as in
GPT-NeoX and Hugging Face LLaMA. For a head of dimension `hd`,
`inv_freq[j] = 1 / 10000 ** (2j / hd)` for `j < hd/2`, the angle of position
`p` is `p * inv_freq`, repeated twice to `hd` values (`cat(angles, angles)`),
and `rope(x) = x * cos + rotate_half(x) * sin` where
`rotate_half(x) = cat(-x[hd/2:], x[:hd/2])`: the first half of the head pairs
with the second half, not neighbouring elements (GPT-J / Meta's original
interleave). Applied to queries and keys of every head, before attention.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ROPE_BASE = 10000.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`cat(-x2, x1)` over the last dimension split into halves `x1, x2`."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(seq_len: int, head_dim: int) -> torch.Tensor:
    """`[2, seq_len, head_dim]`: the cos and sin of every position's angles."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return torch.stack((emb.cos(), emb.sin()))


class CausalSelfAttention(nn.Module):
    def __init__(self, n_head: int, d_model: int, dropout: float, rotary: bool):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.rotary = rotary
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        # [b, t, d] -> [b, n_head, t, head_dim]
        q = q.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        if self.rotary:
            cos, sin = rope[0, :t], rope[1, :t]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.c_proj(y))


class Mlp(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.gelu = nn.GELU()  # exact (erf), as in Rust
        self.c_proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, n_head: int, d_model: int, dropout: float, rotary: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(n_head, d_model, dropout, rotary)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(
        self,
        vocab: int,
        seq_len: int,
        n_layer: int,
        n_head: int,
        d_model: int,
        dropout: float = 0.0,
        positions: str = "learned",
    ):
        super().__init__()
        if positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', not {positions!r}")
        if d_model % n_head != 0:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        head_dim = d_model // n_head
        rotary = positions == "rotary"
        if rotary and head_dim % 2 != 0:
            raise ValueError(f"rotary positions need an even head dimension, not {head_dim}")
        self.seq_len = seq_len
        self.rotary = rotary
        self.wte = nn.Embedding(vocab, d_model)
        # TorchScript compiles away the branches on a None submodule.
        self.wpe = None if rotary else nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block(n_head, d_model, dropout, rotary) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        # Not persistent: derived from the config, so not in the state_dict (the
        # Rust model has no such parameter), yet moved with the module by .to().
        table = rope_tables(seq_len, head_dim) if rotary else torch.zeros(2, 0, 0)
        self.register_buffer("rope", table, persistent=False)

        # GPT-2 initialisation; the residual projections are scaled down by
        # sqrt(2 * n_layer) so the residual stream's variance does not grow
        # with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits `[b, t, vocab]`, or the mean cross-entropy when `targets` is given."""
        b, t = tokens.shape
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than the context of {self.seq_len}")
        x = self.wte(tokens)
        wpe = self.wpe
        if wpe is not None:
            x = x + wpe(torch.arange(t, dtype=torch.long, device=tokens.device))
        x = self.drop(x)
        for block in self.h:
            x = block(x, self.rope)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t))

"""Export the TorchScript fixtures.

Usage:
    .venv/bin/python scripts/make_torchscript.py examples/torchscript/model.pt
    .venv/bin/python scripts/make_torchscript.py --lm examples/torchscript/lm_loss.pt

The first is trained by examples/torchscript/job.toml: a researcher's model as
it would come from PyTorch, a residual MLP with LayerNorm and GELU for 8x8
digits (64 features, 10 classes). `forward(x)` takes flat float32 features
[n, 64] and returns logits [n, 10].

The second (`--lm`) is a bring-your-own language model that computes its own
loss: `LmWithLoss` wraps the GPT twin of kiln's built-in model
(scripts/kiln_gpt.py; vocab 256, context 64, 2 layers, 2 heads, width 64) and
its `forward(batch)` takes a `Dict[str, Tensor]` with int64 [b, t] "tokens" and
"targets" and returns the scalar mean cross-entropy.

Weights come from a fixed seed so the files are reproducible.
"""

import os
import sys
from typing import Dict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kiln_gpt import GPT  # noqa: E402


class ResidualMlp(nn.Module):
    def __init__(self, features: int = 64, hidden: int = 96, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.block = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.inp(x))
        h = h + torch.nn.functional.gelu(self.block(self.norm(h)))
        return self.out(h)


class LmWithLoss(nn.Module):
    """A language model whose forward takes a whole batch and returns its loss."""

    def __init__(self):
        super().__init__()
        self.gpt = GPT(vocab=256, seq_len=64, n_layer=2, n_head=2, d_model=64)

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.gpt(batch["tokens"], batch["targets"])


def main() -> None:
    args = sys.argv[1:]
    lm = args[:1] == ["--lm"]
    if lm:
        args = args[1:]
    if len(args) != 1:
        sys.exit(__doc__)
    torch.manual_seed(0)
    module = torch.jit.script(LmWithLoss() if lm else ResidualMlp())
    module.save(args[0])
    print(f"wrote {args[0]}")


if __name__ == "__main__":
    main()

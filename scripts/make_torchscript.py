"""Export the TorchScript fixture trained by examples/torchscript/job.toml.

Usage: .venv/bin/python scripts/make_torchscript.py examples/torchscript/model.pt

A researcher's model as it would come from PyTorch: a residual MLP with
LayerNorm and GELU for 8x8 digits (64 features, 10 classes). `forward(x)` takes
flat float32 features [n, 64] and returns logits [n, 10]. Weights come from a
fixed seed so the file is reproducible.
"""

import sys

import torch
from torch import nn


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


def main() -> None:
    torch.manual_seed(0)
    module = torch.jit.script(ResidualMlp())
    module.save(sys.argv[1])
    print(f"wrote {sys.argv[1]}")


if __name__ == "__main__":
    main()

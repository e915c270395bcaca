"""Convert scikit-learn's 8x8 digits (1797 images, 10 classes) to safetensors shards.

Usage: python scripts/make_digits.py OUT_DIR

Writes train-00000.safetensors, train-00001.safetensors and eval-00000.safetensors,
each with `x` (float32, N x 64, pixel values scaled to [0, 1]) and `y` (int64, N).
The held-out split is 20% of the samples, chosen with a fixed seed, so the files
are the same on every machine.
"""

import os
import sys

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(20261128).permutation(len(y))
    n_eval = len(y) // 5
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    half = len(train_idx) // 2
    shards = {
        "train-00000": train_idx[:half],
        "train-00001": train_idx[half:],
        "eval-00000": eval_idx,
    }
    for name, idx in shards.items():
        idx = np.sort(idx)
        save_file({"x": np.ascontiguousarray(x[idx]), "y": np.ascontiguousarray(y[idx])},
                  os.path.join(out, f"{name}.safetensors"))
        print(f"{name}: {len(idx)} samples")


if __name__ == "__main__":
    main()

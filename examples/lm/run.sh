#!/usr/bin/env bash
# The language-model example, one command on a fresh machine (a few minutes
# on 2 cores): set up the machine, tokenize Debian's `fortunes` (byte level),
# train a small GPT on 2 local workers, print the held-out loss and
# perplexity beside the unigram baseline, and a text sample.
#
#   examples/lm/run.sh [--data-dir DIR]      (default ./kiln-data)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
data_dir=./kiln-data
[[ "${1:-}" == "--data-dir" ]] && data_dir=$2
# shellcheck source=scripts/env.sh
source scripts/env.sh
kiln_prepare
cargo build --release --bin kiln
KILN="$CARGO_TARGET_DIR/release/kiln"
export KILN

[[ -f examples/lm/data/meta.json ]] || examples/lm/prepare.sh examples/lm/data

summary=$("$KILN" run examples/lm/job.toml --data-dir "$data_dir" --json | tail -n 1)

# The unigram baseline: the held-out loss of predicting every byte from the
# training set's byte frequencies alone (add-one smoothing).
python3 - "$summary" <<'PY'
import array, json, math, sys
def tokens(path):
    a = array.array("H")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a
train, val = tokens("examples/lm/data/train.bin"), tokens("examples/lm/data/val.bin")
counts = [1] * 256
for t in train:
    counts[t] += 1
total = sum(counts)
unigram = -sum(math.log(counts[t] / total) for t in val) / len(val)
run = json.loads(sys.argv[1])
loss = run["eval"]["loss"]
print(f"held-out loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}")
print(f"unigram baseline {unigram:.4f} nats/token, perplexity {math.exp(unigram):.2f}")
print(f"model / baseline loss: {loss / unigram:.3f}")
print(f"weights: {run['weights']}")
PY
weights=$(printf '%s' "$summary" | python3 -c 'import json,sys; print(json.load(sys.stdin)["weights"])')
echo "--- sample (temperature 0.8, seed 1) ---"
"$KILN" generate examples/lm/job.toml --weights "$weights" \
  --prompt "A wise man once said" --max-tokens 120 --temperature 0.8 --seed 1

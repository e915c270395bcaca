#!/usr/bin/env bash
# The main job, on a fresh machine or a ready one: bootstrap (idempotent), build
# kiln, train the digits example on 2 local workers (checkpointing every 100
# steps), list its checkpoints, then resume from step 200 and show that the
# resumed run ends with exactly the same weights.
# Extra arguments go to the first `kiln run` (e.g. --set train.steps=600).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
kiln_prepare
cargo build --release -p kiln --quiet
kiln="$CARGO_TARGET_DIR/release/kiln"
data=kiln-data
# A clean start for the demo's own job (its earlier checkpoints would do, but
# a fresh list reads better).
rm -rf "$data/checkpoints/digits" "$data/jobs/digits"
mkdir -p "$data"

echo "== train: digits on 2 workers"
"$kiln" run examples/digits/job.toml --nproc 2 --data-dir "$data" "$@" | tee "$data/demo-run.txt"
digest=$(sed -n 's/.*(sha256 \([0-9a-f]*\)).*/\1/p' "$data/demo-run.txt")

echo
echo "== checkpoints"
"$kiln" ckpt ls "$data/checkpoints/digits"

echo
echo "== resume from step 200 (the second half again)"
resumed=$("$kiln" run examples/digits/job.toml --nproc 2 --data-dir "$data" --resume 200 --json "$@" 2>/dev/null | tail -n 1)
resumed_digest=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["weights_digest"])' "$resumed")
echo "uninterrupted run: sha256 $digest"
echo "resumed run:       sha256 $resumed_digest"
if [[ "$digest" == "$resumed_digest" ]]; then
  echo "resume is exact: the same weights, bit for bit"
else
  echo "resume differs from the uninterrupted run" >&2
  exit 1
fi

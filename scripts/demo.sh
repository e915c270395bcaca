#!/usr/bin/env bash
# The main job, on a fresh machine or a ready one: bootstrap (idempotent), build
# kiln, train the digits example on 2 local workers (checkpointing every 100
# steps) and register the model, list its checkpoints, resume from step 200 and
# show that the resumed run ends with exactly the same weights, then serve the
# registered model (`kiln serve`, Open Inference Protocol), send it real
# requests, print an answer and the accuracy, and stop the server.
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
rm -rf "$data/checkpoints/digits" "$data/jobs/digits" "$data/checkpoints/registry"
mkdir -p "$data"

echo "== train: digits on 2 workers"
"$kiln" run examples/digits/job.toml --nproc 2 --data-dir "$data" "$@" | tee "$data/demo-run.txt"
digest=$(sed -n 's/.*(sha256 \([0-9a-f]*\)).*/\1/p' "$data/demo-run.txt")

echo
echo "== checkpoints"
"$kiln" ckpt ls "$data/checkpoints/digits"

echo
echo "== resume from step 200 (the second half again)"
resumed=$("$kiln" run examples/digits/job.toml --nproc 2 --data-dir "$data" --resume 200 --json --set register.alias=resumed "$@" 2>/dev/null | tail -n 1)
resumed_digest=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["weights_digest"])' "$resumed")
echo "uninterrupted run: sha256 $digest"
echo "resumed run:       sha256 $resumed_digest"
if [[ "$digest" == "$resumed_digest" ]]; then
  echo "resume is exact: the same weights, bit for bit"
else
  echo "resume differs from the uninterrupted run" >&2
  exit 1
fi

echo
echo "== serve the registered model (digits@production) and ask it"
registry="file://$(cd "$data" && pwd)/checkpoints/registry"
"$kiln" registry --registry "$registry" ls digits
log="$data/demo-serve.log"
"$kiln" serve --registry "$registry" --model digits@production --listen 127.0.0.1:0 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 600); do
  url=$(sed -n 's/.*listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$log" | head -n 1)
  if [[ -n "$url" ]] && curl -sf "$url/v2/models/digits/ready" >/dev/null; then
    break
  fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "kiln serve exited:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
echo "kiln serve is ready at $url"
.venv/bin/python scripts/demo_infer.py "$url" digits examples/digits/data/eval-00000.safetensors
kill "$server"
wait "$server" 2>/dev/null || true
trap - EXIT
echo "server stopped"

#!/usr/bin/env bash
# The main job, on a fresh machine or a ready one: bootstrap (idempotent), build
# kiln, then train the digits example on 2 local workers and print the result.
# Extra arguments go to `kiln run` (e.g. --json, --set train.steps=100).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
kiln_prepare
cargo build --release -p kiln --quiet
exec "$CARGO_TARGET_DIR/release/kiln" run examples/digits/job.toml --nproc 2 --data-dir kiln-data "$@"

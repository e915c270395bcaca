#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a ready one: bootstrap (idempotent),
# then every test of the workspace. Extra arguments go to `cargo test`.
#
# Builds go to a per-user target folder shared by every clone (CI builds a fresh
# clone), so compiled dependencies (torch-sys's C++ glue, ...) are reused.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/bootstrap.sh
source scripts/env.sh
# An absolute LIBTORCH that is the same for every clone keeps torch-sys's build
# fingerprint stable across clones (`.libtorch` would differ by checkout path).
export LIBTORCH="$(readlink -f .libtorch)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KILN_CACHE/target}"
exec cargo test --workspace --all-targets "$@"

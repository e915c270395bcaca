#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a ready one: bootstrap (idempotent),
# then every test of the workspace. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
kiln_prepare
exec cargo test --workspace --all-targets "$@"

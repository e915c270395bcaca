#!/usr/bin/env bash
# Here, on the build machine: build what scripts/gpu-check.sh runs on a GPU
# machine (which has no Rust toolchain and no network) and copy it into
# target/gpu-check/:
#   nccl_gpu   the test binary of trainer/tests/nccl_gpu.rs
#   kiln       the CLI (a short CUDA job)
#   digits/    the digits example's job and data, for that job
# Binaries are copied without debug info (the test binary alone is ~90 MB with
# it); their symbols stay, so backtraces still name functions.
#
# Uses the environment as it is (LIBTORCH, CARGO_TARGET_DIR, ...): binary paths
# come from cargo's JSON messages, wherever the target folder is.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out="$repo/target/gpu-check"

# Prints the executable of the artifact named $1 (test binary when $2 = true)
# from cargo's JSON messages on stdin.
artifact() {
    python3 -c '
import json, sys
name, test = sys.argv[1], sys.argv[2] == "true"
found = [m["executable"] for m in map(json.loads, filter(str.strip, sys.stdin))
         if m.get("reason") == "compiler-artifact" and m["target"]["name"] == name
         and m["profile"]["test"] == test and m.get("executable")]
if not found:
    sys.exit(f"cargo built no executable named {name}")
print(found[-1])
' "$1" "$2"
}

echo "building the nccl_gpu test binary"
test_bin=$(cargo test -p kiln-trainer --test nccl_gpu --no-run --message-format=json | artifact nccl_gpu true)
echo "building kiln"
kiln_bin=$(cargo build -p kiln --bin kiln --message-format=json | artifact kiln false)

rm -rf "$out"
mkdir -p "$out/digits"
strip --strip-debug -o "$out/nccl_gpu" "$test_bin"
strip --strip-debug -o "$out/kiln" "$kiln_bin"
cp examples/digits/job.toml "$out/digits/"
cp -r examples/digits/data "$out/digits/"

echo "copied into $out:"
echo "  nccl_gpu  <- $test_bin"
echo "  kiln      <- $kiln_bin"
echo "  digits/   <- examples/digits (job.toml, data/)"
for bin in nccl_gpu kiln; do
    # DT_RUNPATH lets LD_LIBRARY_PATH win on the GPU machine; DT_RPATH would not.
    search=$(readelf -d "$out/$bin" | grep -Eo '\((RPATH|RUNPATH)\).*' || echo "(no rpath)")
    echo "  $bin: $search"
done
du -sh "$out"/* | sed 's/^/  /'
echo "total: $(du -sh "$out" | cut -f1) (the carry limit is 64 MiB)"

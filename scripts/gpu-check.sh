#!/usr/bin/env bash
# On a GPU machine (no Rust toolchain, no network): run the binaries that
# scripts/gpu-prepare.sh built elsewhere, against this machine's torch and NCCL.
#
#   scripts/gpu-check.sh [BIN_DIR]      BIN_DIR defaults to target/gpu-check
#
# Steps: nvidia-smi's summary; the NCCL GPU tests (KILN_GPU_TESTS=1: world size
# 1 on cuda:0, abort, 64 MiB all-reduce bandwidth); `kiln --version`; a short
# digits job on CUDA (1 worker: NCCL at world size 1 inside the real worker).
# Every step runs even when an earlier one fails; the exit status is non-zero
# when any failed. About 1-2 minutes.
#
# Where torch lives: KILN_GPU_SITE_PACKAGES (default: the venv of the GPU
# machines, /opt/torch/.venv/lib/python3.12/site-packages).
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin_dir=$(cd "${1:-$repo/target/gpu-check}" && pwd) || { echo "no folder ${1:-$repo/target/gpu-check}: run scripts/gpu-prepare.sh first" >&2; exit 2; }
site=${KILN_GPU_SITE_PACKAGES:-/opt/torch/.venv/lib/python3.12/site-packages}
torch_lib=$site/torch/lib
nccl_lib=$site/nvidia/nccl/lib

# The binaries carry a DT_RUNPATH to the build machine's libtorch, which
# LD_LIBRARY_PATH overrides (and which does not exist here anyway).
export LD_LIBRARY_PATH="$torch_lib:$nccl_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KILN_GPU_TESTS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

failed=()
step() { # step NAME COMMAND...: runs it, records a failure
    local name=$1; shift
    echo
    echo "== $name"
    "$@"
    local status=$?
    if [ "$status" -ne 0 ]; then
        echo "-- $name: FAILED (exit $status)"
        failed+=("$name")
    else
        echo "-- $name: ok"
    fi
}

echo "== GPU"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu --format=csv,noheader \
    || { echo "nvidia-smi failed"; failed+=("nvidia-smi"); }
echo "torch: $torch_lib"
echo "nccl:  $(ls "$nccl_lib"/libnccl.so* 2>/dev/null || echo "MISSING in $nccl_lib")"

libraries() {
    local status=0 bin missing
    for bin in "$bin_dir/nccl_gpu" "$bin_dir/kiln"; do
        [ -x "$bin" ] || { echo "$bin is missing"; status=1; continue; }
        missing=$(ldd "$bin" | grep "not found")
        if [ -n "$missing" ]; then echo "$bin: $missing"; status=1; fi
        echo "$bin: libtorch_cpu.so -> $(ldd "$bin" | awk '/libtorch_cpu.so/ {print $3}')"
    done
    return $status
}
step "shared libraries resolve" libraries

step "NCCL GPU tests" timeout 300 "$bin_dir/nccl_gpu" --include-ignored --test-threads=1 --nocapture

step "kiln --version" timeout 60 "$bin_dir/kiln" --version

digits_job() {
    local data
    data=$(mktemp -d)
    # `kiln run` resolves the data paths relative to the job file.
    KILN_LOG=${KILN_LOG:-info} timeout 240 "$bin_dir/kiln" run "$bin_dir/digits/job.toml" \
        --nproc 1 --set workers.device=cuda --set train.steps=100 --set train.eval_interval=50 \
        --data-dir "$data"
    local status=$?
    rm -rf "$data"
    return $status
}
if [ -f "$bin_dir/digits/job.toml" ]; then
    step "kiln run digits on cuda (1 worker)" digits_job
else
    echo; echo "== kiln run digits: skipped ($bin_dir/digits/job.toml missing)"
fi

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "GPU CHECK PASSED"
else
    echo "GPU CHECK FAILED: ${failed[*]}"
    exit 1
fi

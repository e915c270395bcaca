#!/usr/bin/env bash
# Runs kiln's side-by-side benchmarks against PyTorch (see bench/README.md):
#   1. all-reduce bandwidth, kiln's TCP ring vs gloo   (bench/allreduce.py)
#   2. data-parallel training throughput, kiln vs DDP  (bench/ddp.py)
#   3. checkpoint save/load, kiln vs torch.save and DCP (bench/ckpt.py; only
#      with `ckpt`, not part of `all`: it takes minutes and ~15 GB of disk)
#   4. recovery from node loss, kiln agents vs torchrun (bench/recovery.py; only
#      with `recovery`, not part of `all`: about 6 minutes, needs etcd)
#   5. rendezvous latency of 64/128/256 agents over etcd (src/bin/rendezvous.rs;
#      only with `rendezvous`: no PyTorch peer, needs etcd, ~10 s)
#   6. serving, `kiln serve` vs FastAPI + uvicorn + PyTorch on an MLP 784-1024-1024-10
#      and a GPT, load from `wrk` and tritonclient, server on 1 core then 2
#      (bench/serve.py; only with `serve`: ~12 minutes (estimated), ~7 with --quick; builds
#      `kiln`, or pass --kiln PATH to reuse a binary; needs Debian's `wrk`)
#   7. language-model training throughput, kiln vs DDP on the same GPT, plus both
#      at world size 1 with 2 threads (bench/lm.py; only with `lm`, not part of
#      `all`: about 10 minutes with the default 3 repetitions)
#   8. checkpoint cost through `kiln run` with training running, kiln vs
#      torch.save, DCP save and DCP async_save on the same state, and dd
#      (bench/ckpt_user.py; only with `ckpt-user`: ~13 minutes at 1.2 and 3.6 GB,
#      ~10 GB of memory and ~8 GB of disk; builds only `kiln`; no --peer-only)
#
# usage: bench/run.sh [all|allreduce|ddp] [--peer-only]
#        bench/run.sh ckpt [--peer-only] [bench/ckpt.py options, e.g. --size-gb 0.2]
#        bench/run.sh recovery [--peer-only] [bench/recovery.py options, e.g. --reps 1]
#        bench/run.sh rendezvous [rendezvous options, e.g. --agents 256 --runs 9]
#        bench/run.sh serve [--peer-only] [bench/serve.py options, e.g. --kiln target/release/kiln --quick]
#        bench/run.sh lm [--peer-only] [bench/lm.py options, e.g. --reps 5 --steps 40]
#        bench/run.sh ckpt-user [bench/ckpt_user.py options, e.g. --sizes 1.2 --steps 16]
#   --peer-only   skip the build and the kiln side; run only the PyTorch peers
#
# Builds `kiln` and `kiln-bench` (for ckpt: only `ckpt_bench`; for recovery and lm: only `kiln`) in release mode
# first; the binaries are taken from ${CARGO_TARGET_DIR:-target}/release. The Python side uses
# ${KILN_BENCH_PYTHON:-<repo>/.venv/bin/python} (scripts/bootstrap.sh makes it).
# Figures and ratios are printed, never judged: the exit status is non-zero only
# when something failed to build or run.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

which=all
peer_only=()
ckpt_args=()
for arg in "$@"; do
  case "$arg" in
    ckpt-user) which=$arg ;;
    all | allreduce | ddp | ckpt | recovery | rendezvous | serve | lm) which=$arg ;;
    --peer-only) peer_only=(--peer-only) ;;
    -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *)
      # Anything else after `ckpt`, `recovery`, `rendezvous`, `serve` or `lm` belongs to that benchmark.
      if [[ $which == ckpt || $which == ckpt-user || $which == recovery || $which == rendezvous || $which == serve || $which == lm ]]; then
        ckpt_args+=("$arg")
      else
        echo "run.sh: unknown argument '$arg' (see --help)" >&2
        exit 2
      fi
      ;;
  esac
done

python=${KILN_BENCH_PYTHON:-$repo/.venv/bin/python}
if [[ $which != rendezvous && ! -x "$python" ]]; then
  echo "run.sh: no Python at $python: run scripts/bootstrap.sh first" >&2
  exit 1
fi

release_dir=${CARGO_TARGET_DIR:-target}/release
# The serving benchmark needs `kiln` (to make, register and export the models) even with
# --peer-only; `--kiln PATH` skips building it. Its load generator is Debian's `wrk`.
serve_build=()
if [[ $which == serve ]]; then
  # A --kiln given after `serve` comes after run.sh's own and wins.
  [[ " ${ckpt_args[*]} " == *" --kiln "* || " ${ckpt_args[*]} " == *" --kiln="* ]] || serve_build+=(-p kiln --bin kiln)
  if ! command -v wrk >/dev/null 2>&1; then
    echo "run.sh: the serving benchmark needs wrk (Debian package \`wrk\`): run scripts/bootstrap.sh" >&2
    exit 1
  fi
fi
if [[ $which == serve ]] && ((${#serve_build[@]})); then
  echo "run.sh: cargo build --release ${serve_build[*]}" >&2
  cargo build --release "${serve_build[@]}"
elif [[ $which != serve ]] && ((${#peer_only[@]} == 0)); then
  # The checkpoint benchmark needs only its own binary (no `kiln` CLI).
  build=(-p kiln -p kiln-bench)
  [[ $which == ckpt ]] && build=(-p kiln-bench --bin ckpt_bench)
  [[ $which == ckpt-user ]] && build=(-p kiln --bin kiln)
  [[ $which == recovery || $which == lm ]] && build=(-p kiln --bin kiln)
  [[ $which == rendezvous ]] && build=(-p kiln-bench --bin rendezvous)
  echo "run.sh: cargo build --release ${build[*]}" >&2
  cargo build --release "${build[@]}"
fi

status=0
if [[ $which == all || $which == allreduce ]]; then
  "$python" bench/allreduce.py --kiln-bin "$release_dir/allreduce" --python "$python" "${peer_only[@]}" || status=1
fi
if [[ $which == all || $which == ddp ]]; then
  "$python" bench/ddp.py --kiln "$release_dir/kiln" --python "$python" "${peer_only[@]}" || status=1
fi
if [[ $which == ckpt ]]; then
  "$python" bench/ckpt.py --kiln-bin "$release_dir/ckpt_bench" --python "$python" "${peer_only[@]}" "${ckpt_args[@]}" || status=1
fi
if [[ $which == ckpt-user ]]; then
  "$python" bench/ckpt_user.py --kiln "$release_dir/kiln" --python "$python" "${ckpt_args[@]}" || status=1
fi
if [[ $which == recovery ]]; then
  "$python" bench/recovery.py --kiln "$release_dir/kiln" --python "$python" "${peer_only[@]}" "${ckpt_args[@]}" || status=1
fi
if [[ $which == lm ]]; then
  "$python" bench/lm.py --kiln "$release_dir/kiln" --python "$python" "${peer_only[@]}" "${ckpt_args[@]}" || status=1
fi
if [[ $which == serve ]]; then
  "$python" bench/serve.py --kiln "$release_dir/kiln" --python "$python" \
    "${peer_only[@]}" "${ckpt_args[@]}" || status=1
fi
if [[ $which == rendezvous ]]; then
  if ((${#peer_only[@]})); then
    echo "run.sh: the rendezvous benchmark has no PyTorch peer; nothing to run" >&2
  else
    "$release_dir/rendezvous" "${ckpt_args[@]}" || status=1
  fi
fi
exit "$status"

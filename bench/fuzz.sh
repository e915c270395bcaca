#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and reports, per
# target, the runs executed, the coverage reached and the crashes found.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET]        (default 60)
#
# Environment:
#   KILN_FUZZ_TARGETS   space-separated subset to run (default: all)
#   KILN_FUZZ_TORCH     0 to skip the targets that link libtorch (default 1)
#   CARGO_TARGET_DIR    build folder (default: $KILN_CACHE/fuzz-target; the
#                       sanitizer flags would rebuild the shared one); the
#                       libtorch targets build in its sibling `-torch`, as
#                       their flags differ
#
# Corpora grow under fuzz/corpus/TARGET and crashes land in
# fuzz/artifacts/TARGET (both gitignored). Exits 1 if any target crashed
# (or failed to build). The targets that link libtorch (oip_*, ring_header)
# are built without a sanitizer (-s none): ASan was not tried with libtorch
# (a large C++ library loaded into the process); the decoders they test are
# safe Rust, where a panic (debug assertions and overflow checks are on) is
# what the fuzzer looks for.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
source scripts/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$KILN_CACHE/fuzz-target}

plain_targets=(spec worker_frame manifest)
torch_targets=(oip_json oip_binary ring_header)

if ! cargo fuzz --version >/dev/null 2>&1; then
  nice -n 19 cargo install cargo-fuzz --locked || exit 1
fi

selected() {
  [[ -z ${KILN_FUZZ_TARGETS:-} ]] || [[ " $KILN_FUZZ_TARGETS " == *" $1 "* ]]
}

# Seeds, so that a first run starts from valid inputs rather than nothing.
seed() {
  local dir=fuzz/corpus/$1
  mkdir -p "$dir"
  [[ -z $(ls -A "$dir") ]] || return 0
  case $1 in
    spec)
      local f
      for f in examples/*/job.toml bench/*.toml; do cp "$f" "$dir/$(echo "$f" | tr / _)"; done ;;
    oip_json)
      printf '\000{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2.5,-3e2,4]}]}' >"$dir/classifier"
      printf '\001{"inputs":[{"name":"input_ids","datatype":"INT64","shape":[2,2],"data":[[1,2],[3,4]]}]}' >"$dir/lm" ;;
    oip_binary)
      printf '100\n{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"parameters":{"binary_data_size":16}}]}0123456789abcdef' >"$dir/classifier" ;;
    manifest)
      printf '\000{"format_version":2,"job":"j","step":1,"attempt":"a","created_at":"","parent":null,"world_size":1,"chunk_bytes":4,"tensors":[{"name":"w","dtype":"F32","shape":[1],"raw_len":4,"chunks":[{"key":"chunks/00/%064d.b3.bg4.zst","raw_len":4,"stored_len":4}]}],"training_state":null,"job_spec":null,"code_version":"","dataset_fingerprint":"","metrics":{},"totals":{"tensors":1,"chunks":1,"raw_bytes":4,"stored_bytes":4,"uploaded_bytes":0}}' 0 >"$dir/manifest" ;;
  esac
}

failed=0
summary=()
for target in "${plain_targets[@]}" "${torch_targets[@]}"; do
  selected "$target" || continue
  flags=()
  envs=()
  if [[ " ${torch_targets[*]} " == *" $target "* ]]; then
    [[ ${KILN_FUZZ_TORCH:-1} == 1 ]] || { summary+=("$target: skipped (KILN_FUZZ_TORCH=0)"); continue; }
    libtorch=$(readlink -f .libtorch)
    flags=(-s none --features torch)
    envs=(CARGO_TARGET_DIR="$CARGO_TARGET_DIR-torch" LIBTORCH="$libtorch" LD_LIBRARY_PATH="$libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  fi
  seed "$target"
  log=$(mktemp -t "fuzz-$target.XXXX.log")
  echo "== $target: building"
  if ! env "${envs[@]}" nice -n 19 cargo +nightly fuzz build "${flags[@]}" "$target" >"$log" 2>&1; then
    tail -20 "$log"
    summary+=("$target: BUILD FAILED (log: $log)")
    failed=1
    continue
  fi
  echo "== $target: fuzzing for ${seconds}s"
  mkdir -p "fuzz/artifacts/$target"
  marker=$(mktemp)
  env "${envs[@]}" nice -n 19 cargo +nightly fuzz run "${flags[@]}" "$target" \
    -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  execs=${execs:-$(echo "$last" | grep -o '^#[0-9]*' | tr -d '#')}
  cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*')
  ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*')
  corpus=$(ls "fuzz/corpus/$target" | wc -l)
  crashes=$(find "fuzz/artifacts/$target" -type f -newer "$marker" | sort)
  rm -f "$marker"
  line="$target: ${execs:-?} runs in ${seconds}s, cov ${cov:-?}, features ${ft:-?}, corpus $corpus"
  if [[ -n $crashes || $rc -ne 0 ]]; then
    failed=1
    grep -m1 -A12 -E "panicked|ERROR: (libFuzzer|AddressSanitizer)" "$log"
    line+=", CRASHED (rc $rc, log $log): $(echo "$crashes" | tr '\n' ' ')"
  else
    line+=", no crashes"
    rm -f "$log"
  fi
  summary+=("$line")
done

echo
echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit "$failed"

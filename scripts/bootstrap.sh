#!/usr/bin/env bash
# Make this machine ready to build, run and test kiln. Idempotent: a second run
# on a ready machine takes a second or two.
#
# Installs (nothing from outside the package registries):
#   - Debian packages: protoc (etcd-client and kiln-proto need it), etcd (server
#     and client, started only by the tests that use them), build tools, and
#     `fortunes` (a corpus for examples/lm).
#   - a Python venv with torch==2.11.0 (full install: Python `import torch`
#     works for fixtures, interop tests and benchmarks), scikit-learn (the
#     digits dataset), safetensors, numpy and moto[server] (the S3 test server).
#     The venv is heavy (~5 GB), so it lives in a per-user cache keyed by
#     version, shared by every clone of the repository: a fresh clone reuses it.
#   - `.libtorch`: a link to the venv's torch folder, which `.cargo/config.toml`
#     hands to tch through LIBTORCH, so plain `cargo build` needs no variables.
#   - `.venv`: a link to the cached venv, for scripts and tests.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/env.sh
source "$repo/scripts/env.sh"

log() { printf 'bootstrap: %s\n' "$*" >&2; }

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), imported by etcd-client's protos.
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || need_apt+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)  # throwaway certificates of the TLS tests
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)  # loopback TCP bandwidth beside bench/allreduce.py
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)  # HTTP load generator of bench/serve.py
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)  # promtool checks deploy/prometheus/kiln.yml (tests/deploy.rs)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)  # the dashboard's browser tests (tests/ui.rs)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
# English text for the language-model example (examples/lm/prepare.sh).
[[ -d /usr/share/games/fortunes ]] || need_apt+=(fortunes)
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

marker="$KILN_VENV/.kiln-ready-$KILN_VENV_KEY"
if [[ ! -f "$marker" ]]; then
  log "creating Python venv at $KILN_VENV (torch $KILN_TORCH_VERSION, ~2.7 GB download, once per machine)"
  mkdir -p "$(dirname "$KILN_VENV")"
  [[ -x "$KILN_VENV/bin/python" ]] || python3 -m venv "$KILN_VENV"
  "$KILN_VENV/bin/pip" install -q --disable-pip-version-check \
    "torch==$KILN_TORCH_VERSION" numpy "scikit-learn" "safetensors" "moto[server]==5.2.5"
  "$KILN_VENV/bin/python" -c 'import torch, sklearn, safetensors, moto' >/dev/null
  touch "$marker"
fi

# Packages the tests and benchmarks use beside torch. Add to this list (one
# package a line); the venv is topped up whenever the list changes.
extra_python=(
  "moto[server]==5.2.5"
  "tritonclient[http,grpc]"
  # bench/serve_peer.py: the FastAPI + uvicorn peer of `kiln serve` (uvloop, httptools).
  "fastapi==0.163.2"
  "uvicorn[standard]==0.54.0"
  # ... and its fast JSON, as a tuned FastAPI deployment uses.
  "orjson==3.13.0"
)
extra_key=$(printf '%s\n' "${extra_python[@]}" | sha256sum | cut -c1-16)
extra_marker="$KILN_VENV/.kiln-extra-$extra_key"
if [[ ! -f "$extra_marker" ]]; then
  log "installing Python packages: ${extra_python[*]}"
  "$KILN_VENV/bin/pip" install -q --disable-pip-version-check "${extra_python[@]}"
  touch "$extra_marker"
fi

torch_dir=$("$KILN_VENV/bin/python" - <<'PY'
import importlib.util, os
print(os.path.dirname(importlib.util.find_spec("torch").origin))
PY
)
ln -sfn "$torch_dir" "$repo/.libtorch"
ln -sfn "$KILN_VENV" "$repo/.venv"

# The digits dataset, converted from scikit-learn's copy; committed, but
# regenerated if missing.
if [[ ! -f "$repo/examples/digits/data/train-00000.safetensors" ]]; then
  log "converting scikit-learn digits to safetensors"
  "$KILN_VENV/bin/python" "$repo/scripts/make_digits.py" "$repo/examples/digits/data"
fi
log "ready (libtorch: $torch_dir)"

# Shared settings for kiln's scripts; source it, do not run it.
# The heavy, version-keyed caches live outside the checkout so that every clone
# (CI builds a fresh one) reuses them.
KILN_TORCH_VERSION=2.11.0
KILN_PY_TAG=$(python3 -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
KILN_VENV_KEY="torch-$KILN_TORCH_VERSION-$KILN_PY_TAG-v1"
KILN_CACHE=${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
KILN_VENV=${KILN_VENV:-$KILN_CACHE/venv-$KILN_VENV_KEY}
export KILN_TORCH_VERSION KILN_VENV_KEY KILN_CACHE KILN_VENV

# Bootstraps the machine (idempotent) and sets the build environment of the
# project's scripts: an absolute LIBTORCH that is the same for every clone keeps
# torch-sys's build fingerprint stable (`.libtorch` would differ by checkout
# path), and a per-user target folder shared by every clone (CI builds a fresh
# one) reuses compiled dependencies. Run from the repository root.
kiln_prepare() {
  bash scripts/bootstrap.sh
  LIBTORCH="$(readlink -f .libtorch)"
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KILN_CACHE/target}"
  export LIBTORCH CARGO_TARGET_DIR
}

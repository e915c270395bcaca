#!/usr/bin/env bash
# Tokenizes Debian's `fortunes` (~2.6 MB of English; scripts/bootstrap.sh
# installs it) into the data folder of examples/lm/job.toml: byte tokens, the
# last 5% held out.
#
#   examples/lm/prepare.sh [OUT]     OUT defaults to examples/lm/data (gitignored)
#   KILN=path/to/kiln examples/lm/prepare.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-$repo/examples/lm/data}
corpus=/usr/share/games/fortunes

if [[ -z "${KILN:-}" ]]; then
  # shellcheck source=scripts/env.sh
  source "$repo/scripts/env.sh"
  for candidate in "$KILN_CACHE/target/release/kiln" "$repo/target/release/kiln" \
    "$KILN_CACHE/target/debug/kiln" "$repo/target/debug/kiln" "$(command -v kiln || true)"; do
    [[ -n "$candidate" && -x "$candidate" ]] && KILN=$candidate && break
  done
fi
[[ -n "${KILN:-}" ]] || { echo "prepare.sh: no kiln binary found; build one or set KILN" >&2; exit 1; }
[[ -d "$corpus" ]] || { echo "prepare.sh: $corpus missing; run scripts/bootstrap.sh" >&2; exit 1; }

# The text files: `NAME.dat` are strfile indexes, `NAME.u8` links to NAME.
mapfile -t files < <(find "$corpus" -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' | LC_ALL=C sort)
bytes=$(cat "${files[@]}" | wc -c)
if ((bytes < 1000000)); then
  echo "prepare.sh: only $bytes bytes of text in $corpus; expected about 2.6 MB" >&2
  exit 1
fi

"$KILN" data prepare "${files[@]}" --tokenizer byte --val-fraction 0.05 --out "$out"

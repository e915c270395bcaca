"""Helpers shared by the benchmark drivers (bench/allreduce.py, bench/ddp.py)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def release_dir():
    """`${CARGO_TARGET_DIR:-target}/release`, a relative CARGO_TARGET_DIR taken from the repository root."""
    target = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
    return (target if target.is_absolute() else REPO / target) / "release"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_json_lines(cmd, what, timeout, env=None):
    """Runs `cmd` and returns the JSON objects it printed on stdout, one per line.

    stderr passes through (progress). Raises RuntimeError with the tail of the
    output when the command fails, times out or prints no JSON.
    """
    log(f"{what}: {' '.join(str(c) for c in cmd)}")
    try:
        proc = subprocess.run(
            [str(c) for c in cmd], stdout=subprocess.PIPE, text=True, timeout=timeout, env=env, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no result within {timeout} s") from None
    except OSError as err:
        raise RuntimeError(f"{what}: cannot start: {err}") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-5:])
        raise RuntimeError(f"{what}: exit status {proc.returncode}\n{tail}")
    rows = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if not rows:
        raise RuntimeError(f"{what}: printed no JSON line")
    return rows


def median(values):
    return statistics.median(values) if values else None


def fmt(value, spec=".2f", missing="n/a"):
    return missing if value is None else format(value, spec)

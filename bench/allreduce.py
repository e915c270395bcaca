#!/usr/bin/env python3
"""All-reduce bandwidth, kiln's TCP ring vs PyTorch gloo, world size 2 on loopback.

Runs `kiln-bench`'s `allreduce` binary and bench/gloo_allreduce.py with the same
sizes, warm-up and iterations (alternating when --reps > 1) and prints a table:
size, kiln GB/s, gloo GB/s, kiln/gloo. Both sides report algbw = bytes / median
time of one all-reduce (GB/s = 1e9 bytes/s). With --reps > 1 each cell is the
median over repetitions.

The stated target (kiln/gloo >= 1.0x at every size) is reported, never enforced:
the exit status says only whether both sides ran.
"""

import argparse
import json
import sys
from pathlib import Path

from common import BENCH_DIR, fmt, log, median, release_dir, run_json_lines

TARGET_RATIO = 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="1,16,64", help="comma-separated sizes in MiB (default: 1,16,64)")
    p.add_argument("--warmup", type=int, default=5, help="untimed all-reduces per size (default: 5)")
    p.add_argument("--iters", type=int, default=30, help="timed all-reduces per size (default: 30)")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each side (default: 3)")
    p.add_argument("--kiln-bin", type=Path, default=None, help="kiln's allreduce binary (default: <target>/release/allreduce)")
    p.add_argument("--python", default=sys.executable, help="Python with torch for the gloo side (default: this one)")
    p.add_argument("--peer-only", action="store_true", help="run only the gloo side (kiln not built yet)")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line at the end")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per side and repetition (default: 600)")
    return p.parse_args(argv)


def span(values):
    """`min-max` of the repetitions, to show how noisy the machine was."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


def main():
    args = parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",") if s]
    common = ["--sizes-mib", ",".join(map(str, sizes)), "--warmup", str(args.warmup), "--iters", str(args.iters)]
    kiln_bin = args.kiln_bin or release_dir() / "allreduce"
    sides = {"gloo": [args.python, BENCH_DIR / "gloo_allreduce.py", *common]}
    if not args.peer_only:
        if not kiln_bin.exists():
            log(f"allreduce: {kiln_bin} not found: build it with `cargo build --release -p kiln-bench`, or pass --peer-only")
            return 2
        sides = {"kiln": [kiln_bin, *common], **sides}

    # gbps[side][size_bytes] = [algbw of each repetition]
    gbps = {side: {} for side in sides}
    failures = []
    for rep in range(args.reps):
        for side, cmd in sides.items():
            try:
                rows = run_json_lines(cmd, f"allreduce {side} (rep {rep + 1}/{args.reps})", args.timeout)
            except RuntimeError as err:
                log(f"error: {err}")
                failures.append(side)
                continue
            for row in rows:
                gbps[side].setdefault(row["size_bytes"], []).append(row["algbw_gbps"])

    print()
    print("all-reduce bandwidth, world size 2, float32, loopback TCP, 1 intra-op thread (gloo)")
    print(f"algbw = bytes / median time over {args.iters} iterations after {args.warmup} warm-up; GB/s = 1e9 B/s; "
          f"{args.reps} repetition(s), median shown")
    spread = args.reps > 1
    print(f"{'size':>8}  {'kiln GB/s':>10}  {'gloo GB/s':>10}  {'kiln/gloo':>10}"
          + (f"  {'kiln range':>12}  {'gloo range':>12}" if spread else ""))
    summary, below = [], []
    for mib in sizes:
        size_bytes = mib << 20
        kiln_runs = gbps.get("kiln", {}).get(size_bytes, [])
        gloo_runs = gbps["gloo"].get(size_bytes, [])
        kiln, gloo = median(kiln_runs), median(gloo_runs)
        ratio = kiln / gloo if kiln and gloo else None
        if ratio is not None and ratio < TARGET_RATIO:
            below.append(f"{mib} MiB")
        line = f"{str(mib) + ' MiB':>8}  {fmt(kiln):>10}  {fmt(gloo):>10}  {fmt(ratio) + ('x' if ratio else ''):>10}"
        if spread:
            line += f"  {span(kiln_runs):>12}  {span(gloo_runs):>12}"
        print(line)
        summary.append({
            "size_bytes": size_bytes, "kiln_gbps": kiln, "gloo_gbps": gloo, "ratio": ratio,
            "kiln_runs_gbps": kiln_runs, "gloo_runs_gbps": gloo_runs,
        })
    have_ratios = all(row["ratio"] is not None for row in summary)
    if not have_ratios:
        verdict = "not measured (kiln side missing)"
    elif below:
        verdict = "not met at " + ", ".join(below)
    else:
        verdict = "met"
    print(f"target: kiln/gloo >= {TARGET_RATIO:.1f}x at every size -> {verdict}")
    if args.json:
        print(json.dumps({"bench": "allreduce", "target_ratio": TARGET_RATIO, "rows": summary}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

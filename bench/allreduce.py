#!/usr/bin/env python3
"""All-reduce bandwidth, kiln's ring vs PyTorch gloo, world size 2 on one host.

Runs `kiln-bench`'s `allreduce` binary twice, once as `kiln run` connects ranks
on one host (`kiln`: shared memory, `[comm] transport = "auto"`) and once over
loopback TCP (`kiln-tcp`: `transport = "tcp"`, what ranks on different hosts
use), and bench/gloo_allreduce.py (gloo over loopback TCP: gloo has no
shared-memory transport), with the same sizes, warm-up and iterations
(alternating when --reps > 1), and prints a table: size, each side's GB/s,
kiln/gloo and kiln-tcp/gloo. Both sides report algbw = bytes / median
time of one all-reduce (GB/s = 1e9 bytes/s). With --reps > 1 each cell is the
median over repetitions.

Beside them, once per repetition, the loopback TCP bandwidth of one iperf3
stream, measured as `iperf3 -c 127.0.0.1 -t 4 -l 512K` (Debian's `iperf3`;
scripts/bootstrap.sh installs it; skipped with a note when it is missing or
with --no-iperf3): the received bytes/s, in the same GB/s. The table adds each
side's algbw as a fraction of it.

A second iperf3 figure, one stream each way at once (`--bidir`, the mean of the
two directions), shows what loopback gives when both directions are busy, as
they are in a ring of two ranks.

The stated targets (kiln/gloo >= 1.0x at every size; kiln >= 80% of the iperf3
loopback figure at 16 and 64 MiB) are reported, never enforced: the exit status
says only whether both sides ran.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, fmt, free_port, log, median, release_dir, run_json_lines

TARGET_RATIO = 1.0
TARGET_OF_LOOPBACK = 0.8
LOOPBACK_TARGET_SIZES_MIB = (16, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="1,16,64", help="comma-separated sizes in MiB (default: 1,16,64)")
    p.add_argument("--warmup", type=int, default=5, help="untimed all-reduces per size (default: 5)")
    p.add_argument("--iters", type=int, default=30, help="timed all-reduces per size (default: 30)")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each side (default: 3)")
    p.add_argument("--kiln-bin", type=Path, default=None, help="kiln's allreduce binary (default: <target>/release/allreduce)")
    p.add_argument("--python", default=sys.executable, help="Python with torch for the gloo side (default: this one)")
    p.add_argument("--peer-only", action="store_true", help="run only the gloo side (kiln not built yet)")
    p.add_argument("--iperf3", default=shutil.which("iperf3"), help="iperf3 binary (default: the one on PATH)")
    p.add_argument("--no-iperf3", action="store_true", help="skip the iperf3 loopback reference")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line at the end")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per side and repetition (default: 600)")
    return p.parse_args(argv)


def iperf3_gbps(binary, bidir=False, timeout=30):
    """One iperf3 stream over loopback, `-t 4 -l 512K`: received bytes/s in GB/s (1e9 B/s).

    With `bidir`, one stream each way at once (`--bidir`), as a ring of two
    ranks sends and receives at once: the mean of the two directions."""
    port = str(free_port())
    server = subprocess.Popen([binary, "-s", "-1", "-B", "127.0.0.1", "-p", port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # the server needs a moment to listen
            client = subprocess.run([binary, "-c", "127.0.0.1", "-p", port, "-t", "4", "-l", "512K", "-J"]
                                    + (["--bidir"] if bidir else []), capture_output=True, text=True, timeout=timeout)
            try:
                result = json.loads(client.stdout)
            except ValueError:
                result = {}
            end = result.get("end", {})
            received = [end.get(k, {}).get("bits_per_second")
                        for k in (("sum_received", "sum_received_bidir_reverse") if bidir else ("sum_received",))]
            if client.returncode == 0 and all(received):
                return sum(received) / len(received) / 8e9
            if server.poll() is not None:  # the one-off server is gone: start another
                server = subprocess.Popen([binary, "-s", "-1", "-B", "127.0.0.1", "-p", port],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.2)
        raise RuntimeError(f"iperf3: exit status {client.returncode}: {result.get('error') or client.stderr[-300:]}")
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


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
        sides = {"kiln": [kiln_bin, *common], "kiln-tcp": [kiln_bin, *common, "--transport", "tcp"], **sides}

    # gbps[side][size_bytes] = [algbw of each repetition]
    gbps = {side: {} for side in sides}
    loopback_runs, bidir_runs = [], []
    use_iperf3 = bool(args.iperf3) and not args.no_iperf3
    if not use_iperf3 and not args.no_iperf3:
        log("allreduce: iperf3 not found (scripts/bootstrap.sh installs it): no loopback reference")
    failures = []
    for rep in range(args.reps):
        if use_iperf3:
            log(f"allreduce iperf3 (rep {rep + 1}/{args.reps}): {args.iperf3} -c 127.0.0.1 -t 4 -l 512K")
            try:
                loopback_runs.append(iperf3_gbps(args.iperf3))
                bidir_runs.append(iperf3_gbps(args.iperf3, bidir=True))
            except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError, KeyError) as err:
                log(f"error: iperf3: {err}")
                failures.append("iperf3")
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
    print("all-reduce bandwidth, world size 2, float32, one host: kiln = shared memory (its default between "
          "ranks on one host), kiln-tcp and gloo = loopback TCP; 1 intra-op thread (gloo)")
    print(f"algbw = bytes / median time over {args.iters} iterations after {args.warmup} warm-up; GB/s = 1e9 B/s; "
          f"{args.reps} repetition(s), median shown")
    spread = args.reps > 1
    loopback = median(loopback_runs)
    if loopback:
        print(f"loopback TCP, one iperf3 stream (-t 4 -l 512K): {loopback:.2f} GB/s"
              + (f" (range {span(loopback_runs)})" if spread else "") + " = 'lo' below")
    bidir = median(bidir_runs)
    if bidir:
        print(f"  the same with a stream each way at once (--bidir), as a 2-rank ring sends: {bidir:.2f} GB/s "
              "per direction" + (f" (range {span(bidir_runs)})" if spread else ""))
    names = [side for side in ("kiln", "kiln-tcp") if side in sides] + ["gloo"]
    lb = "".join(f"  {name + '/lo':>12}" for name in names) if loopback else ""
    print(f"{'size':>8}" + "".join(f"  {name + ' GB/s':>13}" for name in names)
          + "".join(f"  {name + '/gloo':>13}" for name in names if name != "gloo") + lb
          + ("".join(f"  {name + ' range':>14}" for name in names) if spread else ""))
    summary, below, below_lo = [], [], []
    for mib in sizes:
        size_bytes = mib << 20
        runs = {name: gbps.get(name, {}).get(size_bytes, []) for name in names}
        value = {name: median(runs[name]) for name in names}
        ratio = {name: value[name] / value["gloo"] if value[name] and value["gloo"] else None
                 for name in names if name != "gloo"}
        if ratio.get("kiln") is not None and ratio["kiln"] < TARGET_RATIO:
            below.append(f"{mib} MiB")
        line = f"{str(mib) + ' MiB':>8}" + "".join(f"  {fmt(value[name]):>13}" for name in names)
        line += "".join(f"  {fmt(r) + ('x' if r else ''):>13}" for r in ratio.values())
        of_lo = {name: (v / loopback if v and loopback else None) for name, v in value.items()}
        if loopback:
            line += "".join(f"  {fmt(of_lo[name] and 100 * of_lo[name], '.0f') + '%':>12}" for name in names)
        if mib in LOOPBACK_TARGET_SIZES_MIB and of_lo.get("kiln") is not None and of_lo["kiln"] < TARGET_OF_LOOPBACK:
            below_lo.append(f"{mib} MiB")
        if spread:
            line += "".join(f"  {span(runs[name]):>14}" for name in names)
        print(line)
        summary.append({
            "size_bytes": size_bytes, "kiln_gbps": value.get("kiln"), "kiln_tcp_gbps": value.get("kiln-tcp"),
            "gloo_gbps": value["gloo"], "ratio": ratio.get("kiln"), "tcp_ratio": ratio.get("kiln-tcp"),
            "kiln_runs_gbps": runs.get("kiln"), "kiln_tcp_runs_gbps": runs.get("kiln-tcp"),
            "gloo_runs_gbps": runs["gloo"], "kiln_of_loopback": of_lo.get("kiln"),
            "kiln_tcp_of_loopback": of_lo.get("kiln-tcp"), "gloo_of_loopback": of_lo["gloo"],
        })
    have_ratios = all(row["ratio"] is not None for row in summary)
    if not have_ratios:
        verdict = "not measured (kiln side missing)"
    elif below:
        verdict = "not met at " + ", ".join(below)
    else:
        verdict = "met"
    print(f"target: kiln/gloo >= {TARGET_RATIO:.1f}x at every size -> {verdict}")
    sizes_lo = " and ".join(f"{m} MiB" for m in LOOPBACK_TARGET_SIZES_MIB)
    if not loopback or "kiln" not in sides:
        verdict_lo = "not measured"
    elif below_lo:
        verdict_lo = "not met at " + ", ".join(below_lo)
    else:
        verdict_lo = "met"
    print(f"target: kiln >= {100 * TARGET_OF_LOOPBACK:.0f}% of loopback (iperf3) at {sizes_lo} -> {verdict_lo}"
          " (kiln's default path between ranks on one host; kiln-tcp shows the TCP path, bounded by --bidir)")
    if args.json:
        print(json.dumps({"bench": "allreduce", "target_ratio": TARGET_RATIO, "loopback_gbps": loopback,
                          "loopback_runs_gbps": loopback_runs, "loopback_bidir_gbps": bidir,
                          "loopback_bidir_runs_gbps": bidir_runs, "rows": summary}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Data-parallel training throughput, `kiln run` vs PyTorch DDP (gloo), world size 2 on CPU.

Both sides train the job in bench/mlp.toml (MLP 784-1024-1024-10 with ReLU,
synthetic data, global batch 256, SGD lr 0.01 momentum 0.9, 1 intra-op thread
per rank, 60 steps):

  kiln:  kiln run bench/mlp.toml --nproc 2 --json --data-dir <fresh temp dir>
  DDP:   bench/ddp_peer.py --spec bench/mlp.toml --nproc 2

Each reports global samples/s from the end of step 1 to the end of the last
step. The sides alternate (kiln, DDP, kiln, DDP, ...) for --reps repetitions and
the median of each is compared. The stated target (kiln/DDP >= 1.3x) is
reported, never enforced: the exit status says only whether both sides ran.

Unless --no-ceiling, each repetition also runs the ceiling of data parallelism
on these kernels, for each side: --nproc independent single-rank processes at
once (`kiln run --nproc 1` / `ddp_peer.py --nproc 1`), each with its share of
the global batch, so that nothing is exchanged and no rank waits. Their summed
samples/s is what the world would reach with a free, perfectly hidden
all-reduce: kiln/DDP cannot exceed kiln's ceiling / DDP, and each side's
measured / its ceiling is its data-parallel efficiency.

kiln pins each CPU rank to cores of its own by default ([workers]
cpu_affinity = "auto"); DDP users launch unpinned unless they bind ranks
themselves, so DDP runs both ways: as launched by default (the target's
peer) and pinned the same way (`ddp_peer.py --pin`), reported beside it.
"""

import argparse
import json
import sys
import tempfile
import tomllib
from pathlib import Path

from common import BENCH_DIR, fmt, log, median, release_dir, run_json_lines, run_together

TARGET_RATIO = 1.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=BENCH_DIR / "mlp.toml", help="job spec (default: bench/mlp.toml)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default: 2)")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each side (default: 3)")
    p.add_argument("--kiln", type=Path, default=None, help="kiln binary (default: <target>/release/kiln)")
    p.add_argument("--python", default=sys.executable, help="Python with torch for the DDP side (default: this one)")
    p.add_argument("--peer-only", action="store_true", help="run only the DDP side (kiln not built yet)")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line at the end")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per run (default: 900)")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the independent single-rank runs that measure the ceiling (see above)")
    return p.parse_args(argv)


def run_kiln(kiln, spec, nproc, what, timeout):
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as data_dir:
        rows = run_json_lines(
            [kiln, "run", spec, "--nproc", nproc, "--json", "--data-dir", data_dir], what, timeout
        )
    # The contract is the last stdout line; earlier JSON lines (if any) are not results.
    result = rows[-1]
    if "samples_per_sec" not in result:
        raise RuntimeError(f"{what}: last JSON line has no samples_per_sec: {result}")
    return result


def run_ceiling(cmd_for, copies, what, timeout):
    """Runs `copies` independent single-rank processes at once (`cmd_for(i)`);
    returns their summed samples/s as one result."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        rows = run_together([cmd_for(i, tmp) for i in range(copies)], what, timeout)
    for row in rows:
        if "samples_per_sec" not in row:
            raise RuntimeError(f"{what}: last JSON line has no samples_per_sec: {row}")
    return {"samples_per_sec": sum(r["samples_per_sec"] for r in rows), "copies": rows}


def main():
    args = parse_args()
    spec = args.spec.resolve()
    train = tomllib.loads(spec.read_text()).get("train", {})
    kiln = args.kiln or release_dir() / "kiln"
    if not args.peer_only and not kiln.exists():
        log(f"ddp: {kiln} not found: build it with `cargo build --release -p kiln`, or pass --peer-only")
        return 2
    peer_cmd = [args.python, BENCH_DIR / "ddp_peer.py", "--spec", spec, "--nproc", str(args.nproc)]

    share = train.get("global_batch", 64) // args.nproc

    def kiln_single(i, tmp):
        return [kiln, "run", spec, "--nproc", 1, "--json", "--data-dir", f"{tmp}/{i}",
                "--set", f"train.global_batch={share}"]

    def peer_single(i, tmp):
        return [args.python, BENCH_DIR / "ddp_peer.py", "--spec", spec, "--nproc", 1, "--global-batch", share]

    results = {"kiln": [], "ddp": [], "ddp-pinned": [], "kiln-ceiling": [], "ddp-ceiling": []}
    failures = []
    for rep in range(args.reps):
        tag = f"(rep {rep + 1}/{args.reps})"
        runs = [] if args.peer_only else [("kiln", lambda: run_kiln(kiln, spec, args.nproc, f"ddp kiln {tag}",
                                                                     args.timeout))]
        runs.append(("ddp", lambda: run_json_lines(peer_cmd, f"ddp torch {tag}", args.timeout)[-1]))
        runs.append(("ddp-pinned", lambda: run_json_lines(peer_cmd + ["--pin"], f"ddp torch pinned {tag}",
                                                          args.timeout)[-1]))
        if not args.no_ceiling and args.nproc > 1:
            if not args.peer_only:
                runs.append(("kiln-ceiling", lambda: run_ceiling(kiln_single, args.nproc,
                                                                 f"ddp kiln {args.nproc}x w1 {tag}", args.timeout)))
            runs.append(("ddp-ceiling", lambda: run_ceiling(peer_single, args.nproc,
                                                            f"ddp torch {args.nproc}x w1 {tag}", args.timeout)))
        for side, run in runs:
            try:
                results[side].append(run())
            except RuntimeError as err:
                log(f"error: {err}")
                failures.append(side)

    for side in ("kiln", "ddp"):
        for run in results[side]:
            if run.get("world_size") not in (None, args.nproc) or run.get("steps") not in (None, train.get("steps")):
                log(f"warning: {side} ran world size {run.get('world_size')}, {run.get('steps')} steps; "
                    f"expected {args.nproc}, {train.get('steps')}")

    kiln_sps = median([r["samples_per_sec"] for r in results["kiln"]])
    ddp_sps = median([r["samples_per_sec"] for r in results["ddp"]])
    ratio = kiln_sps / ddp_sps if kiln_sps and ddp_sps else None

    print()
    print(f"data-parallel training throughput, world size {args.nproc}, CPU, spec {spec.name}: "
          f"{train.get('steps')} steps, global batch {train.get('global_batch')}, "
          f"{train.get('threads_per_worker')} intra-op thread(s) per rank")
    print("global samples/s from the end of step 1 to the end of the last step; "
          f"{args.reps} alternating repetition(s), median shown")
    print(f"{'':6}  {'samples/s':>10}  {'final loss':>10}  runs (samples/s)")
    for side, label in (("kiln", "kiln"), ("ddp", "DDP"), ("ddp-pinned", "DDP pinned"),
                        ("kiln-ceiling", f"kiln {args.nproc}x w1"),
                        ("ddp-ceiling", f"torch {args.nproc}x w1")):
        runs = results[side]
        if not runs and side.endswith("ceiling"):
            continue
        per_run = ", ".join(fmt(r["samples_per_sec"], ".0f") for r in runs) or "n/a"
        loss = runs[-1].get("final_loss") if runs else None
        print(f"{label:12}  {fmt(median([r['samples_per_sec'] for r in runs]), '.0f'):>10}  "
              f"{fmt(loss, '.4f'):>10}  {per_run}")
    print(f"kiln/DDP: {fmt(ratio) + 'x' if ratio else 'n/a'}")
    if ratio is None:
        verdict = "not measured (kiln side missing)"
    else:
        verdict = "met" if ratio >= TARGET_RATIO else "not met"
    print(f"target: kiln/DDP >= {TARGET_RATIO:.1f}x -> {verdict}")
    pinned_sps = median([r["samples_per_sec"] for r in results["ddp-pinned"]])
    if kiln_sps and pinned_sps:
        print(f"kiln/DDP pinned like kiln: {fmt(kiln_sps / pinned_sps)}x")
    kiln_ceiling = median([r["samples_per_sec"] for r in results["kiln-ceiling"]])
    ddp_ceiling = median([r["samples_per_sec"] for r in results["ddp-ceiling"]])
    ceiling = kiln_ceiling / ddp_sps if kiln_ceiling and ddp_sps else None
    if ceiling:
        print(f"ceiling: {args.nproc} independent 1-rank kiln processes make {fmt(ceiling)}x DDP's samples/s; "
              f"kiln/DDP cannot exceed that on these kernels (the target is "
              + ("within" if ceiling >= TARGET_RATIO else "above") + " it)")
    for label, got, top in (("kiln", kiln_sps, kiln_ceiling), ("DDP", ddp_sps, ddp_ceiling)):
        if got and top:
            print(f"{label} data-parallel efficiency (measured / its ceiling): {got / top:.0%}")
    if args.json:
        print(json.dumps({
            "bench": "ddp", "target_ratio": TARGET_RATIO, "kiln_samples_per_sec": kiln_sps,
            "ddp_samples_per_sec": ddp_sps, "ratio": ratio, "kiln_ceiling_samples_per_sec": kiln_ceiling,
            "ddp_ceiling_samples_per_sec": ddp_ceiling, "ceiling_ratio": ceiling,
            "ddp_pinned_samples_per_sec": pinned_sps, "runs": results,
        }))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

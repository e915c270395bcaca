#!/usr/bin/env python3
"""Language-model training throughput on CPU: `kiln run` vs PyTorch DDP (gloo) on
the same GPT, side by side in one invocation.

Both sides train the job in bench/lm.toml (GPT: vocab 256, seq_len 128, 4
layers, 4 heads, d_model 256, ~3.26 M parameters; global batch 32; AdamW;
gradients clipped to a global norm of 1.0; fp32; 30 steps) on the same token
file: Debian's `fortunes` as byte tokens (ids 0-255, uint16), written once
into --work-dir. Eight configurations:

  kiln w2          kiln run bench/lm.toml --nproc 2      (1 thread per rank, comm.overlap = true)
  kiln w2 no-ovl   the same with --set comm.overlap=false
  DDP w2           bench/lm_peer.py --nproc 2 --threads 1 (DDP over gloo)
  DDP w2 pinned    the same with --pin: each rank on its own core, as kiln pins
                   CPU ranks by default ([workers] cpu_affinity = "auto")
  kiln w1 2t       kiln run ... --nproc 1 --set train.threads_per_worker=2
  torch w1 2t      bench/lm_peer.py --nproc 1 --threads 2 (one plain process)
  kiln 2x w1       two `kiln run ... --nproc 1` at once, each with half the global
                   batch and 1 thread: no all-reduce, no rank waits for another
  torch 2x w1      two bench/lm_peer.py --nproc 1 --threads 1 at once, likewise

The two "2x w1" rows are the ceiling of data parallelism on these kernels:
their summed tokens/s is what a world of 2 would reach if the all-reduce were
free and the ranks never waited for each other. kiln 2x w1 / DDP w2 bounds
what kiln w2 / DDP w2 can reach; kiln w2 / kiln 2x w1 and DDP w2 / torch 2x w1
are each runtime's data-parallel efficiency.

Each reports global samples/s from the end of step 1 to the end of the last
step (tokens/s = samples/s x seq_len). The order of the configurations rotates
from one repetition to the next (--reps, default 3) and each cell is the median
over repetitions. While a kiln run trains, its Prometheus endpoint is scraped
a few times a second: the mean step time (rank 0) and the seconds per step
each rank waited for the gradient all-reduce after backward
(kiln_allreduce_seconds), over the steps after the first, come from there.
With overlap off that wait is the whole all-reduce; with overlap on it is the
part backward did not hide, so hidden = 1 - wait(on) / wait(off). The peer
times its own phases (forward, backward incl. DDP's all-reduce wait, clipping,
optimizer). `cores` is the CPU time of the whole run (all its processes,
start-up included) over its wall time.

The machine is shared, so before each run the driver waits (--wait-idle, up
to 60 s) until the rest of the machine is idle, measures how many cores other
processes used during the run (`others`, from /proc/stat less this run's own
CPU time) and runs a noisy one (others >= 0.1 cores) again (--retry-noisy, up
to 2 times), keeping the quietest attempt. The figures are then printed once
over all kept runs and once over the quiet ones only.

Stated targets (reported, never enforced; the exit status says only whether
every run ran): kiln w2 >= 1.2x DDP w2, and kiln w2 >= 0.9x kiln w1 2t.
"""

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np

from common import BENCH_DIR, cpu_busy_seconds, fmt, free_port, log, median, release_dir, run_together

TARGET_VS_DDP = 1.2
TARGET_VS_SINGLE = 0.9
# A run counts as quiet when everything else on the machine used less than this many cores meanwhile.
QUIET_CORES = 0.1
FORTUNES = Path("/usr/share/games/fortunes")

# name -> (side, world size, threads per rank, extra kiln --set overrides)
CONFIGS = {
    "kiln-w2": ("kiln", 2, 1, ["comm.overlap=true"]),
    "kiln-w2-nooverlap": ("kiln", 2, 1, ["comm.overlap=false"]),
    "ddp-w2": ("torch", 2, 1, []),
    # DDP with each rank pinned to its own core, as kiln's default
    # [workers] cpu_affinity = "auto" does (DDP users launch unpinned).
    "ddp-w2-pinned": ("torch", 2, 1, ["--pin"]),
    "kiln-w1-2t": ("kiln", 1, 2, []),
    "torch-w1-2t": ("torch", 1, 2, []),
    # Diagnostic, not in the default set: 2 MiB buckets instead of the default
    # 25 MiB, which holds the whole 13 MB of gradients in one bucket (so the
    # overlap has nothing to overlap).
    "kiln-w2-b2": ("kiln", 2, 1, ["comm.overlap=true", "comm.bucket_mb=2"]),
    # The ceiling of data parallelism with these kernels: two independent
    # single-rank processes at once, each with half the global batch and one
    # thread, so no gradient is exchanged and no rank waits for another. Their
    # summed throughput is what a world of 2 would reach with a free, perfectly
    # hidden all-reduce; no runtime can beat it on the same kernels.
    "kiln-2x-w1": ("kiln", 1, 1, []),
    "torch-2x-w1": ("torch", 1, 1, []),
}
# Configurations run as two independent processes at once (see above).
PAIRS = {"kiln-2x-w1", "torch-2x-w1"}
DEFAULT_CONFIGS = ["kiln-w2", "kiln-w2-nooverlap", "ddp-w2", "ddp-w2-pinned", "kiln-w1-2t", "torch-w1-2t",
                   "kiln-2x-w1", "torch-2x-w1"]
LABELS = {
    "kiln-w2": "kiln w2",
    "kiln-w2-nooverlap": "kiln w2 no-ovl",
    "ddp-w2": "DDP w2",
    "ddp-w2-pinned": "DDP w2 pinned",
    "kiln-w1-2t": "kiln w1 2t",
    "torch-w1-2t": "torch w1 2t",
    "kiln-w2-b2": "kiln w2 b2MiB",
    "kiln-2x-w1": "kiln 2x w1",
    "torch-2x-w1": "torch 2x w1",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=BENCH_DIR / "lm.toml", help="job spec (default: bench/lm.toml)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, the order rotating (default: 3)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the spec's train.steps)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, from {','.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "kiln-bench-lm",
                   help="where the token file is written and reused (default: $TMPDIR/kiln-bench-lm)")
    p.add_argument("--kiln", type=Path, default=None, help="kiln binary (default: <target>/release/kiln)")
    p.add_argument("--python", default=sys.executable, help="Python with torch for the peer (default: this one)")
    p.add_argument("--peer-only", action="store_true", help="run only the PyTorch side (kiln not built yet)")
    p.add_argument("--wait-idle", type=float, default=60,
                   help="before each run, wait up to this many seconds for the rest of the machine to go idle "
                        f"(< {QUIET_CORES} cores busy over 3 s); 0: don't wait (default: 60)")
    p.add_argument("--retry-noisy", type=int, default=2,
                   help="repeat a run during which other processes used >= "
                        f"{QUIET_CORES} cores, up to this many times, keeping the quietest attempt (default: 2)")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line at the end")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per run (default: 900)")
    return p.parse_args(argv)


def token_file(work_dir):
    """The benchmark's token file: Debian's fortunes (the text files, in name
    order, as examples/lm/prepare.sh takes them) as byte tokens, uint16 LE.
    Written once, then reused."""
    path = work_dir / "train.bin"
    if path.exists() and path.stat().st_size > 0:
        return path
    work_dir.mkdir(parents=True, exist_ok=True)
    if FORTUNES.is_dir():
        files = sorted(p for p in FORTUNES.iterdir()
                       if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
        data = np.frombuffer(b"".join(p.read_bytes() for p in files), dtype=np.uint8)
        what = f"{len(files)} files of {FORTUNES}"
    else:  # the throughput does not depend on which tokens they are
        data = np.random.default_rng(0).integers(0, 256, size=2_500_000, dtype=np.uint8)
        what = f"seeded random bytes ({FORTUNES} missing: scripts/bootstrap.sh installs it)"
    tmp = path.with_suffix(".tmp")
    data.astype("<u2").tofile(tmp)
    tmp.rename(path)
    log(f"lm: wrote {path}: {len(data)} tokens from {what}")
    return path


class Scraper(threading.Thread):
    """Polls a Prometheus endpoint and keeps every snapshot of the kiln_ series."""

    LINE = re.compile(r"^(kiln_[a-z_]+)(?:\{[^}]*\})?\s+(\S+)$")

    def __init__(self, url, period=0.25):
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.snapshots = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.period):
            try:
                with urllib.request.urlopen(self.url, timeout=1) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            snap = {}
            for line in text.splitlines():
                m = self.LINE.match(line)
                if m:
                    name = m.group(1).removesuffix("_total")
                    try:
                        snap[name] = float(m.group(2))
                    except ValueError:
                        pass
            if "kiln_train_step" in snap:
                self.snapshots.append(snap)

    def per_step(self, per_rank):
        """Mean step seconds (rank 0) and all-reduce wait per rank and step, over
        the steps between the first snapshot after step 1 and the last one."""
        snaps = [s for s in self.snapshots if s.get("kiln_train_step", 0) >= 1]
        if len(snaps) < 2:
            return {}
        a, b = snaps[0], snaps[-1]
        d = {k: b.get(k, 0.0) - a.get(k, 0.0) for k in b}
        out = {"metric_steps": int(d.get("kiln_train_step", 0))}
        if d.get("kiln_train_step_seconds_count", 0) > 0:
            out["step_ms"] = 1e3 * d["kiln_train_step_seconds_sum"] / d["kiln_train_step_seconds_count"]
        rank_steps = d.get("kiln_train_samples", 0) / per_rank
        if rank_steps > 0:
            out["allreduce_wait_ms"] = 1e3 * d.get("kiln_allreduce_seconds", 0.0) / rank_steps
        return out


def rustc_running():
    """Whether a `rustc` (someone's build) is running now: noise on a small machine."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "rustc":
                        return True
            except OSError:
                pass
    return False


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def own_cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def others_busy(seconds=3.0):
    """Cores the rest of the machine kept busy over the next `seconds` (nothing of ours runs meanwhile)."""
    b0, m0, t0 = cpu_busy_seconds(), own_cpu() + children_cpu(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, cpu_busy_seconds() - b0 - (own_cpu() + children_cpu() - m0)) / (time.perf_counter() - t0)


def wait_idle(limit):
    """Waits until the rest of the machine is idle, or `limit` seconds."""
    deadline = time.monotonic() + limit
    while (busy := others_busy()) >= QUIET_CORES:
        if time.monotonic() >= deadline:
            log(f"lm: other processes still use {busy:.2f} cores after {limit:.0f} s; running anyway")
            return
    return


def run_one(name, args, spec, tokens, steps, seq_len, global_batch, tag):
    side, world, threads, sets = CONFIGS[name]
    copies = 2 if name in PAIRS else 1
    batch = global_batch // copies  # each copy's global batch
    what = f"lm {LABELS[name]} {tag}"
    scraper = None
    data_dirs = []
    cmds = []
    for _ in range(copies):
        if side == "kiln":
            overrides = [f"data.train=[{json.dumps(str(tokens))}]", f"train.threads_per_worker={threads}",
                         f"train.steps={steps}", f"train.global_batch={batch}", *sets]
            data_dir = tempfile.TemporaryDirectory(prefix="kiln-bench-lm-")
            data_dirs.append(data_dir)
            cmd = [args.kiln, "run", spec, "--nproc", world, "--json", "--data-dir", data_dir.name]
            if copies == 1:
                port = free_port()
                cmd += ["--metrics-addr", f"127.0.0.1:{port}"]
                scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
                scraper.start()
            for o in overrides:
                cmd += ["--set", o]
        else:
            cmd = [args.python, BENCH_DIR / "lm_peer.py", "--spec", spec, "--train", tokens, "--nproc", world,
                   "--threads", threads, "--steps", steps, "--global-batch", batch, *sets]
        cmds.append(cmd)
    load = os.getloadavg()[0]
    rustc = rustc_running()
    cpu0, self0, busy0, t0 = children_cpu(), own_cpu(), cpu_busy_seconds(), time.perf_counter()
    try:
        rows = run_together(cmds, what, args.timeout)
    finally:
        wall = time.perf_counter() - t0
        busy = cpu_busy_seconds() - busy0
        if scraper:
            scraper.stop.set()
            scraper.join()
        for data_dir in data_dirs:
            data_dir.cleanup()
    for row in rows:
        if "samples_per_sec" not in row:
            raise RuntimeError(f"{what}: last JSON line has no samples_per_sec: {row}")
        if row.get("world_size") not in (None, world) or row.get("steps") not in (None, steps):
            log(f"warning: {what} ran world size {row.get('world_size')}, {row.get('steps')} steps; "
                f"expected {world}, {steps}")
    # Two copies: each one's samples are half a global batch, so their rates add up.
    samples_per_sec = sum(row["samples_per_sec"] for row in rows)
    row = rows[0]
    result = {
        "config": name,
        "tokens_per_sec": samples_per_sec * seq_len,
        "samples_per_sec": samples_per_sec,
        "final_loss": row.get("final_loss") if copies == 1 else None,
        "cores": (children_cpu() - cpu0) / wall,
        # Everything else the machine ran meanwhile (other users' builds and tests), in cores.
        "other_cores": max(0.0, busy - (children_cpu() - cpu0) - (own_cpu() - self0)) / wall,
        "wall_s": wall,
        "load1_before": load,
        "rustc_seen": rustc or rustc_running(),
    }
    if scraper:
        result.update(scraper.per_step(global_batch // world))
    elif copies == 1 or side == "torch":
        result["step_ms"] = median([r.get("step_ms") for r in rows if r.get("step_ms") is not None])
        if all(r.get("phase_ms") for r in rows):
            result["phase_ms"] = {k: median([r["phase_ms"][k] for r in rows]) for k in rows[0]["phase_ms"]}
        if row.get("ddp_runtime_ms"):
            result["ddp_runtime_ms"] = row["ddp_runtime_ms"]
    return result


def report(runs, names):
    """Prints the table, the ratios and the all-reduce figures of `runs`; returns them."""
    def med(name, key):
        return median([r[key] for r in runs.get(name, []) if r.get(key) is not None])

    print(f"{'config':15} {'tokens/s':>9} {'range':>13} {'runs':>4} {'step ms':>8} {'ar wait ms':>10} "
          f"{'cores':>6} {'others':>6} {'loss':>7}  per-step phases (peer, ms)")
    for name in names:
        rs = runs[name]
        toks = [r["tokens_per_sec"] for r in rs]
        rng = f"{min(toks):.0f}-{max(toks):.0f}" if toks else "n/a"
        phases = ""
        if rs and rs[0].get("phase_ms"):
            keys = rs[0]["phase_ms"].keys()
            phases = " ".join(f"{k} {median([r['phase_ms'][k] for r in rs]):.0f}" for k in keys)
        print(f"{LABELS[name]:15} {fmt(med(name, 'tokens_per_sec'), '.0f'):>9} {rng:>13} {len(rs):>4} "
              f"{fmt(med(name, 'step_ms'), '.0f'):>8} {fmt(med(name, 'allreduce_wait_ms'), '.1f'):>10} "
              f"{fmt(med(name, 'cores'), '.2f'):>6} {fmt(med(name, 'other_cores'), '.2f'):>6} "
              f"{fmt(med(name, 'final_loss'), '.4f'):>7}  {phases}")

    def ratio(a, b):
        """Ratio of the medians, and the range of the ratios within a repetition."""
        ma, mb = med(a, "tokens_per_sec"), med(b, "tokens_per_sec")
        if not ma or not mb:
            return None, "n/a"
        by_rep = {r["rep"]: r["tokens_per_sec"] for r in runs[b]}
        per = [r["tokens_per_sec"] / by_rep[r["rep"]] for r in runs[a] if r["rep"] in by_rep]
        return ma / mb, (f"{min(per):.2f}-{max(per):.2f}" if per else "n/a")

    print()
    print(f"{'ratio of medians':36} {'median':>7} {'per-rep range':>14}  target")
    summary = {"tokens_per_sec": {n: med(n, "tokens_per_sec") for n in names}, "ratios": {}}
    for a, b, target in (("kiln-w2", "ddp-w2", TARGET_VS_DDP), ("kiln-w2", "kiln-w1-2t", TARGET_VS_SINGLE),
                         ("kiln-w2", "ddp-w2-pinned", None), ("kiln-w2-nooverlap", "ddp-w2", None),
                         ("kiln-w2", "kiln-w2-nooverlap", None),
                         ("kiln-w1-2t", "torch-w1-2t", None), ("ddp-w2", "torch-w1-2t", None),
                         ("kiln-w2-b2", "ddp-w2", None), ("kiln-w2-b2", "kiln-w2", None),
                         ("kiln-w2", "kiln-2x-w1", None), ("ddp-w2", "torch-2x-w1", None),
                         ("kiln-2x-w1", "torch-2x-w1", None), ("kiln-2x-w1", "ddp-w2", None)):
        if a not in names or b not in names:
            continue
        r, rng = ratio(a, b)
        summary["ratios"][f"{a}/{b}"] = r
        verdict = ""
        if target is not None:
            verdict = f">= {target:.1f}x -> " + ("not measured" if r is None else "met" if r >= target else "not met")
        print(f"{LABELS[a] + ' / ' + LABELS[b]:36} {fmt(r) + 'x' if r else 'n/a':>7} {rng:>14}  {verdict}")
    ceiling = summary["ratios"].get("kiln-2x-w1/ddp-w2")
    if ceiling:
        print(f"ceiling: two independent 1-rank kiln processes (no all-reduce, no waiting) make {fmt(ceiling)}x "
              f"DDP w2's tokens/s; kiln w2 / DDP w2 cannot exceed that on these kernels "
              f"(its {TARGET_VS_DDP:.1f}x target is " + ("within" if ceiling >= TARGET_VS_DDP else "above") + " it)")
    on, off = med("kiln-w2", "allreduce_wait_ms"), med("kiln-w2-nooverlap", "allreduce_wait_ms")
    hidden = 1 - on / off if on is not None and off else None
    if hidden is not None:
        print(f"kiln all-reduce wait per rank and step: {off:.1f} ms without overlap (all of it), "
              f"{on:.1f} ms with overlap -> {100 * hidden:.0f}% hidden")
    b2 = med("kiln-w2-b2", "allreduce_wait_ms")
    hidden_b2 = 1 - b2 / off if b2 is not None and off else None
    if hidden_b2 is not None:
        print(f"  with 2 MiB buckets and overlap: {b2:.1f} ms -> {100 * hidden_b2:.0f}% hidden")
    summary.update(allreduce_wait_ms={"overlap": on, "no_overlap": off, "overlap_b2": b2},
                   allreduce_hidden=hidden, allreduce_hidden_b2=hidden_b2)
    ddp_stats = [r["ddp_runtime_ms"] for r in runs.get("ddp-w2", []) if r.get("ddp_runtime_ms")]
    if ddp_stats:
        comm = median([d["backward_comm_time"] for d in ddp_stats if "backward_comm_time" in d])
        ovl = median([d["backward_compute_comm_overlap_time"] for d in ddp_stats
                      if "backward_compute_comm_overlap_time" in d])
        print(f"DDP (its sampled runtime stats): all-reduce {fmt(comm, '.1f')} ms per backward, "
              f"{fmt(ovl, '.1f')} ms of it overlapping backward's compute; buckets "
              f"{ddp_stats[0].get('bucket_sizes')} bytes")
        summary["ddp_runtime_ms"] = {"backward_comm": comm, "overlap": ovl}
    return summary


def main():
    args = parse_args()
    spec = args.spec.resolve()
    doc = tomllib.loads(spec.read_text())
    train, data = doc.get("train", {}), doc["data"]
    steps = args.steps or train.get("steps")
    seq_len, global_batch = data["seq_len"], train["global_batch"]
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        log(f"lm: unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
        return 2
    if args.peer_only:
        names = [n for n in names if CONFIGS[n][0] != "kiln"]
    args.kiln = args.kiln or release_dir() / "kiln"
    if any(CONFIGS[n][0] == "kiln" for n in names) and not args.kiln.exists():
        log(f"lm: {args.kiln} not found: build it with `cargo build --release -p kiln`, or pass --peer-only")
        return 2
    tokens = token_file(args.work_dir)

    runs = {n: [] for n in names}
    repeated = []  # noisy attempts that were run again
    failures = []
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            attempts = []
            for attempt in range(1 + max(0, args.retry_noisy)):
                if args.wait_idle > 0:
                    wait_idle(args.wait_idle)
                try:
                    r = run_one(name, args, spec, tokens, steps, seq_len, global_batch,
                                f"(rep {rep + 1}/{args.reps}" + (f", again {attempt})" if attempt else ")"))
                except RuntimeError as err:
                    log(f"error: {err}")
                    failures.append(name)
                    break
                r["rep"], r["attempt"] = rep, attempt
                attempts.append(r)
                if r["other_cores"] < QUIET_CORES:
                    break
                if attempt < args.retry_noisy:
                    log(f"lm: other processes used {r['other_cores']:.2f} cores during that run: running it again")
            if attempts:
                keep = min(attempts, key=lambda r: r["other_cores"])
                runs[name].append(keep)
                repeated += [r for r in attempts if r is not keep]

    print()
    print(f"language-model training throughput, CPU, fp32, spec {spec.name}: GPT vocab {doc['model']['vocab']}, "
          f"seq_len {seq_len}, {doc['model']['n_layer']} layers, {doc['model']['n_head']} heads, "
          f"d_model {doc['model']['d_model']}; global batch {global_batch}; AdamW; "
          f"clip {train.get('clip_grad_norm')}; {steps} steps")
    print(f"tokens/s from the end of step 1 to the end of the last step; {args.reps} repetition(s), "
          "order rotating, median shown (range: lowest-highest run)")
    if repeated:
        print(f"{len(repeated)} run(s) during which other processes used >= {QUIET_CORES} cores were run again "
              "(the quietest attempt is kept)")
    summary = report(runs, names)
    quiet = {n: [r for r in rs if r["other_cores"] < QUIET_CORES] for n, rs in runs.items()}
    summary_quiet = None
    if any(len(quiet[n]) < len(runs[n]) for n in names):
        counts = ", ".join(f"{LABELS[n]} {len(quiet[n])}/{len(runs[n])}" for n in names)
        print()
        print(f"quiet runs only (other processes used < {QUIET_CORES} cores meanwhile): {counts}")
        if any(quiet.values()):
            summary_quiet = report(quiet, names)
    loads = [r["load1_before"] for rs in runs.values() for r in rs]
    if loads:
        noisy = sorted({LABELS[n] for n, rs in runs.items() for r in rs if r["rustc_seen"]})
        print(f"1-minute load average before the runs: {min(loads):.2f}-{max(loads):.2f}"
              + (f"; a rustc was running during some runs of: {', '.join(noisy)}" if noisy else ""))
    if args.json:
        print(json.dumps({"bench": "lm", "targets": {"kiln-w2/ddp-w2": TARGET_VS_DDP,
                                                     "kiln-w2/kiln-w1-2t": TARGET_VS_SINGLE},
                          "summary": summary, "summary_quiet": summary_quiet, "runs": runs,
                          "repeated": repeated}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

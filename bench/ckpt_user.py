"""Checkpoint cost as users pay it (issue 14): `kiln run` training an MLP with
periodic checkpoints, against PyTorch training loops that save the same state
with torch.save, DCP save and DCP async_save, in one invocation.

    .venv/bin/python bench/ckpt_user.py [--sizes 1.2,3.6] [--steps 16] [--interval 5]

For each state size (GB of fp32 parameters + AdamW moments):

1. The model: an MLP 4096 -> 4096 x L -> 10 (ReLU), AdamW, L chosen so that
   parameters and both moments hold about the size (L = 6: 1.21 GB; L = 18:
   3.63 GB), synthetic data, one worker, `threads_per_worker` = every core,
   batch 64. kiln trains it twice through `kiln run --json`: without
   checkpoints (the step time without a save), then with `checkpoint.interval`
   (saves at every interval-th step, none at the end, so every save happens
   while training runs). Figures come from kiln's own output, timestamped as
   they arrive: the `checkpoint at step N committed: ... training blocked X
   ms, durable after Y ms` lines, the `step i/N` lines (a step's time is the
   gap between consecutive lines, minus the stall of a save made in it), and
   each checkpoint's manifest (`kiln ckpt show --json`: stored bytes, the
   codec each rank chose and why).
2. The same model and optimizer in PyTorch (this file's `peer` command, one
   process per system, `torch.set_num_threads` = every core), saving
   `{model, optim}` at the same steps:
   - torch.save to one file, then fsync of the file and folder;
   - DCP `save` with the process group initialised (gloo, world 1) and
     `FileSystemWriter(thread_count=cores)` (it fsyncs its files), then fsync
     of the folder;
   - DCP `async_save` with the same writer: stall = the call, durable = its
     future done + fsync of the folder; training goes on meanwhile;
   - none: the step time without saves.
   The state dicts come from `torch.distributed.checkpoint.state_dict.
   get_state_dict` for DCP, `state_dict()` for torch.save.
3. `dd` writes kiln's stored bytes (one checkpoint's) with `oflag=direct
   conv=fsync` from /dev/zero: the disk's limit for those bytes, measured in
   the same run.

Prints one table per size and the issue's targets with their ratios:
every save's stall <= 0.1 s per GB of state (the first included); durable <=
0.7x DCP save's and <= 1.3x the disk limit (dd) for the bytes stored; step
time during a save <= 1.2x the step time without one. A benchmark, not a
test: it reports what it measures; the exit status is non-zero only when
something failed to run. Other processes competing for the CPU or the disk
distort every figure; the report lists any that ran (cargo, rustc, bench/).
"""

import argparse
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from common import fmt, log, release_dir  # noqa: E402

GB = 1e9
WIDTH = 4096
CLASSES = 10
STEP_RE = re.compile(r"^step (\d+)/(\d+)")
CKPT_RE = re.compile(
    r"^checkpoint at step (\d+) committed: (\S+) \(([\d.]+) MB uploaded, ([\d.]+) MB reused, "
    r"training blocked ([\d.]+) ms, durable after ([\d.]+) ms\)"
)
PEERS = ["torch", "dcp", "dcp_async"]
LABELS = {"torch": "torch.save (+fsync)", "dcp": "DCP save", "dcp_async": "DCP async_save"}


def layers_for(size_gb):
    """Hidden layers whose parameters and AdamW moments hold about size_gb."""
    per_layer = 3 * 4 * (WIDTH * WIDTH + WIDTH)
    return max(1, round(size_gb * GB / per_layer))


def state_bytes(layers):
    params = layers * (WIDTH * WIDTH + WIDTH) + WIDTH * CLASSES + CLASSES
    return 3 * 4 * params


def competing_processes():
    """Other engineers' builds and benchmarks that would distort the figures."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        ours = "ckpt_user.py" in cmd or "ckpt-user" in cmd
        if re.search(r"(^|/)(cargo|rustc|clippy-driver|cc1|ld) |bench/", cmd) and not ours:
            found.append(cmd[:100])
    return found


def cpu_busy_seconds():
    """CPU seconds the whole machine spent busy (not idle or iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    """CPU seconds of this process and its finished children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------- kiln side


def job_spec(layers, steps, interval, threads, batch, compression):
    hidden = ", ".join([str(WIDTH)] * layers)
    return f"""
[job]
name = "ckpt-user"
seed = 1
[model]
kind = "mlp"
hidden = [{hidden}]
[data]
kind = "synthetic"
samples = 2048
eval_samples = 0
features = {WIDTH}
classes = {CLASSES}
[train]
steps = {steps}
global_batch = {batch}
log_interval = 1
threads_per_worker = {threads}
[optimizer]
kind = "adamw"
lr = 0.0001
[workers]
nproc = 1
device = "cpu"
[checkpoint]
interval = {interval}
final_checkpoint = false
keep_last = 100
compression = "{compression}"
"""


def run_kiln(kiln, spec, data, timeout):
    """Runs `kiln run --json`; returns (step arrival times, checkpoint lines, summary)."""
    env = dict(os.environ, KILN_LOG="warn")
    cmd = [str(kiln), "run", str(spec), "--json", "--data-dir", str(data)]
    log(f"ckpt-user: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    steps, saves, tail = {}, [], []

    def read_stderr():
        for raw in iter(proc.stderr.readline, b""):
            now = time.perf_counter()
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            del tail[:-20]
            m = STEP_RE.match(line)
            if m:
                steps[int(m.group(1))] = now
                continue
            m = CKPT_RE.match(line)
            if m:
                saves.append({
                    "step": int(m.group(1)),
                    "url": m.group(2),
                    "uploaded_mb": float(m.group(3)),
                    "stall_s": float(m.group(5)) / 1e3,
                    "durable_s": float(m.group(6)) / 1e3,
                })

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    # stdout is read here, stderr only by the reader (communicate() would
    # take stderr lines from it).
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    out = proc.stdout.read()
    proc.wait()
    killer.cancel()
    reader.join(timeout=10)
    if proc.returncode == -9:
        raise RuntimeError(f"kiln run: no result within {timeout} s")
    if proc.returncode != 0:
        raise RuntimeError(f"kiln run: exit status {proc.returncode}\n" + "\n".join(tail))
    summary = json.loads(out.decode().strip().splitlines()[-1])
    return steps, saves, summary


def during_saves(intervals, windows):
    """Steps (keys of `intervals`: step -> (start, end)) that overlap the
    background part of a save (`windows`: (start, end) from the end of its
    stall until durable)."""
    return {k for k, (a, b) in intervals.items() if any(min(b, we) - max(a, ws) > 0 for ws, we in windows)}


def step_times(steps, saves):
    """kiln: each step's seconds (from step 2), the gap between its line and
    the previous one minus the stall of a save made in that gap, and the
    steps that ran while a save was in flight. A save at step N starts right
    after step N's line."""
    windows, stalls = [], {}
    for s in saves:
        start = steps.get(s["step"])
        if start is not None:
            windows.append((start + s["stall_s"], start + s["durable_s"]))
            stalls[s["step"]] = s["stall_s"]
    intervals = {k: (steps[k - 1] + stalls.get(k - 1, 0.0), steps[k]) for k in steps if k - 1 in steps}
    times = {k: b - a for k, (a, b) in intervals.items()}
    return times, during_saves(intervals, windows)


def show_manifest(kiln, url):
    out = subprocess.run([str(kiln), "ckpt", "show", url, "--json"], capture_output=True, check=True, cwd=REPO)
    return json.loads(out.stdout)


def dd_direct(path, nbytes):
    """Seconds `dd` takes to write nbytes with O_DIRECT and fsync."""
    block = 8 << 20
    count = max(1, math.ceil(nbytes / block))
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "oflag=direct", "conv=fsync",
         "status=none"],
        check=True,
    )
    elapsed = time.perf_counter() - started
    os.unlink(path)
    return elapsed, count * block


# -------------------------------------------------------------- PyTorch side


def peer_main(args):
    """One PyTorch training loop saving at the given steps; prints one JSON line."""
    import warnings

    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    layers, width = [], WIDTH
    for _ in range(args.layers):
        layers += [nn.Linear(width, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, WIDTH, generator=g)
    y = (x @ torch.randn(WIDTH, CLASSES, generator=g)).argmax(dim=1)

    system = args.system
    if system in ("dcp", "dcp_async"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.state_dict import get_state_dict

        dist.init_process_group("gloo", init_method=f"file://{args.out}/pg", rank=0, world_size=1)

    def fsync_path(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def folder_bytes(folder):
        return sum(os.path.getsize(os.path.join(d, n)) for d, _s, files in os.walk(folder) for n in files)

    saves, pending = [], []
    step_s, intervals = [], []
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        ended = time.perf_counter()
        step_s.append(ended - started)
        intervals.append((started, ended))
        if system == "none" or args.interval == 0 or step % args.interval != 0:
            continue
        folder = os.path.join(args.out, f"step-{step}")
        os.makedirs(folder, exist_ok=True)
        t0 = time.perf_counter()
        record = {"step": step, "folder": folder, "start": t0}
        if system == "torch":
            path = os.path.join(folder, "state.pt")
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
            fsync_path(path)
            fsync_path(folder)
            record["stall_s"] = record["durable_s"] = time.perf_counter() - t0
        elif system == "dcp":
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, storage_writer=FileSystemWriter(folder, thread_count=args.cores))
            fsync_path(folder)
            record["stall_s"] = record["durable_s"] = time.perf_counter() - t0
        else:
            msd, osd = get_state_dict(model, opt)
            fut = dcp.async_save({"model": msd, "optim": osd},
                                 storage_writer=FileSystemWriter(folder, thread_count=args.cores))
            record["stall_s"] = time.perf_counter() - t0
            upload = getattr(fut, "upload_completion", fut)

            def done(_f, record=record, t0=t0, folder=folder):
                fsync_path(folder)
                record["durable_s"] = time.perf_counter() - t0

            upload.add_done_callback(done)
            pending.append(upload)
        saves.append(record)
    for f in pending:
        f.result()
    deadline = time.time() + 60
    while any("durable_s" not in s for s in saves) and time.time() < deadline:
        time.sleep(0.01)
    # Steps (1-based) that ran while a save's background part was in flight.
    windows = [(s["start"] + s["stall_s"], s["start"] + s["durable_s"]) for s in saves]
    during = sorted(during_saves({k + 1: iv for k, iv in enumerate(intervals)}, windows))
    for s in saves:
        s["bytes"] = folder_bytes(s.pop("folder"))
        s.pop("start")
    if system in ("dcp", "dcp_async"):
        dist.destroy_process_group()
    print(json.dumps({"system": system, "threads": args.threads, "torch": torch.__version__,
                      "state_bytes": sum(t.numel() * t.element_size() for t in model.parameters()) * 3,
                      "step_s": step_s, "steps_during_saves": during, "saves": saves}), flush=True)


def run_peer(python, system, layers, args, out, timeout):
    os.makedirs(out, exist_ok=True)
    cmd = [str(python), str(Path(__file__).resolve()), "peer", "--system", system, "--layers", str(layers),
           "--steps", str(args.steps), "--interval", str(args.interval), "--batch", str(args.batch),
           "--threads", str(args.threads), "--cores", str(os.cpu_count()), "--out", str(out)]
    log(f"ckpt-user: peer {system}")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"peer {system}: exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ driver


def mean(xs):
    return statistics.fmean(xs) if xs else None


def bench_size(size_gb, args, kiln, python, work):
    layers = layers_for(size_gb)
    nbytes = state_bytes(layers)
    gbs = nbytes / GB
    row = {"size_gb": gbs, "layers": layers, "state_bytes": nbytes}
    log(f"ckpt-user: {gbs:.2f} GB of state ({layers} hidden layers of {WIDTH})")
    busy0, own0, t0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()

    # kiln: once without checkpoints, once with.
    for label, interval in (("plain", 0), ("saving", args.interval)):
        data = work / f"kiln-{label}"
        shutil.rmtree(data, ignore_errors=True)
        spec = work / f"job-{label}.toml"
        spec.write_text(job_spec(layers, args.steps, interval, args.threads, args.batch, args.compression))
        steps, saves, summary = run_kiln(kiln, spec, data, args.timeout)
        times, during = step_times(steps, saves)
        if label == "plain":
            row["kiln_step_s"] = statistics.median([t for k, t in times.items() if k >= 3])
            shutil.rmtree(data, ignore_errors=True)
            continue
        for s in saves:
            m = show_manifest(kiln, s["url"])
            s["stored_bytes"] = m["totals"]["stored_bytes"]
            s["raw_bytes"] = m["totals"]["raw_bytes"]
            s["codec"] = [r["codec"] for r in m.get("compression", [])]
            s["codec_reason"] = [r["reason"] for r in m.get("compression", [])]
        row["kiln_saves"] = saves
        row["kiln_step_during_s"] = mean([times[k] for k in sorted(during)])
        row["kiln_step_during_worst_s"] = max([times[k] for k in during], default=None)
        row["kiln_steps_during"] = sorted(during)
        row["kiln_step_outside_s"] = statistics.median(
            [t for k, t in times.items() if k >= 3 and k not in during] or [float("nan")])
        stored = statistics.median([s["stored_bytes"] for s in saves]) if saves else nbytes
        shutil.rmtree(data, ignore_errors=True)
        dd_s, dd_bytes = dd_direct(work / "dd.bin", stored)
        row["dd_s"] = dd_s * stored / dd_bytes
        row["dd_gb_s"] = dd_bytes / dd_s / GB

    # PyTorch peers.
    row["peers"] = {}
    for system in ["none"] + [s for s in PEERS if s in args.systems]:
        out = work / f"peer-{system}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_peer(python, system, layers, args, out, args.timeout)
        shutil.rmtree(out, ignore_errors=True)
        row["peers"][system] = r
    # Cores other processes kept busy meanwhile: noise in every figure.
    wall = time.perf_counter() - t0
    row["others_cores"] = max(0.0, cpu_busy_seconds() - busy0 - (own_cpu_seconds() - own0)) / wall
    return row


def report(row, args):
    gbs = row["size_gb"]
    saves = row["kiln_saves"]
    peers = row["peers"]
    print(f"\n### {gbs:.2f} GB of state (MLP {WIDTH} x {row['layers']} + AdamW, fp32), "
          f"saves at every {args.interval}th of {args.steps} steps, {args.threads} threads\n")
    print(f"Other processes kept {row['others_cores']:.2f} cores busy on average meanwhile.\n")
    print("| | training blocked s | durable s | stored GB | codec |")
    print("|---|---|---|---|---|")
    for i, s in enumerate(saves):
        name = "first" if i == 0 else f"save {i + 1}"
        print(f"| kiln, {name} (step {s['step']}) | {s['stall_s']:.3f} | {s['durable_s']:.2f} | "
              f"{s['stored_bytes'] / GB:.3f} | {'/'.join(s['codec'])} |")
    for system in PEERS:
        if system not in peers:
            continue
        ps = peers[system]["saves"]
        stall = statistics.median([s["stall_s"] for s in ps])
        durable = statistics.median([s["durable_s"] for s in ps])
        stored = statistics.median([s["bytes"] for s in ps])
        print(f"| {LABELS[system]} (median of {len(ps)}) | {stall:.3f} | {durable:.2f} | {stored / GB:.3f} | - |")
    print(f"| dd oflag=direct of kiln's stored bytes ({row['dd_gb_s']:.2f} GB/s) | - | {row['dd_s']:.2f} | | |")
    base = peers.get("none", {}).get("step_s", [])[2:]
    print("\n| step time s | without saves (median) | during saves (mean; worst) | ratio (mean; worst) |")
    print("|---|---|---|---|")
    k0, kd, kw = row["kiln_step_s"], row["kiln_step_during_s"], row["kiln_step_during_worst_s"]
    print(f"| kiln (`kiln run`), steps {row['kiln_steps_during']} | {k0:.3f} | {fmt(kd, '.3f')}; {fmt(kw, '.3f')} | "
          f"{fmt(ratio(kd, k0), '.2f')}x; {fmt(ratio(kw, k0), '.2f')}x |")
    if "dcp_async" in peers and base:
        a = peers["dcp_async"]
        during = [a["step_s"][k - 1] for k in a["steps_during_saves"]]
        b0 = statistics.median(base)
        worst = max(during, default=None)
        print(f"| PyTorch with DCP async_save, steps {a['steps_during_saves']} | {b0:.3f} | {fmt(mean(during), '.3f')}; "
              f"{fmt(worst, '.3f')} | {fmt(ratio(mean(during), b0), '.2f')}x; {fmt(ratio(worst, b0), '.2f')}x |")

    dcp = statistics.median([s["durable_s"] for s in peers["dcp"]["saves"]]) if "dcp" in peers else None
    worst_stall = max(s["stall_s"] for s in saves)
    worst_durable = max(s["durable_s"] for s in saves)
    rows = [
        ("every save's stall per GB of state (s/GB; worst)", worst_stall / gbs, None, 0.1, "<= 0.1 s/GB"),
        ("first stall / later stalls' median", saves[0]["stall_s"],
         statistics.median([s["stall_s"] for s in saves[1:]]) if len(saves) > 1 else None, 1.2, "<= 1.2x"),
        ("durable vs DCP save (worst kiln save)", worst_durable, dcp, 0.7, "<= 0.7x"),
        ("durable vs dd of the stored bytes (worst)", worst_durable, row["dd_s"], 1.3, "<= 1.3x"),
        ("step time during a save vs without (mean)", row["kiln_step_during_s"], row["kiln_step_s"], 1.2, "<= 1.2x"),
        ("step time during a save vs without (worst step)", row["kiln_step_during_worst_s"], row["kiln_step_s"], 1.2,
         "<= 1.2x"),
    ]
    print("\n| target | kiln | reference | ratio | target | verdict |")
    print("|---|---|---|---|---|---|")
    for name, value, ref, limit, text in rows:
        r = value if ref is None else ratio(value, ref)
        verdict = "n/a" if r is None else ("met" if r <= limit else "not met")
        print(f"| {name} | {fmt(value, '.3f')} | {fmt(ref, '.3f')} | {fmt(r, '.3f')} | {text} | {verdict} |")
    for s in saves:
        for reason in s["codec_reason"]:
            print(f"- kiln step {s['step']}: {reason}")


def ratio(a, b):
    return None if a is None or b in (None, 0) or (isinstance(b, float) and math.isnan(b)) else a / b


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        p = argparse.ArgumentParser()
        p.add_argument("peer")
        p.add_argument("--system", choices=["none"] + PEERS, required=True)
        for name in ("layers", "steps", "interval", "batch", "threads", "cores"):
            p.add_argument(f"--{name}", type=int, required=True)
        p.add_argument("--out", required=True)
        return peer_main(p.parse_args())

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1.2,3.6", help="GB of state, comma-separated (default 1.2,3.6)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--interval", type=int, default=5, help="save every this many steps (default 5)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="training threads (default: every core)")
    p.add_argument("--compression", default="auto", choices=["auto", "zstd", "none"])
    p.add_argument("--systems", default=",".join(PEERS), help="PyTorch peers to run")
    p.add_argument("--kiln", default=None, help="kiln binary (default: the release build)")
    p.add_argument("--python", default=str(REPO / ".venv/bin/python"))
    p.add_argument("--work-dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--json", action="store_true", help="also print every measurement as one JSON line")
    args = p.parse_args()
    args.systems = args.systems.split(",")
    kiln = Path(args.kiln) if args.kiln else release_dir() / "kiln"
    if not kiln.exists():
        sys.exit(f"ckpt-user: no kiln binary at {kiln} (cargo build --release -p kiln --bin kiln)")
    before = competing_processes()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="kiln-ckpt-user-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    rows, status = [], 0
    try:
        for size in [float(s) for s in args.sizes.split(",")]:
            try:
                rows.append(bench_size(size, args, kiln, args.python, work))
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                log(f"ckpt-user: {size} GB failed: {e}")
                status = 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    after = competing_processes()
    print(f"\nckpt-user: {os.cpu_count()} cores, kiln {kiln}, work dir on {work.parent}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if before or after:
        print("WARNING: other processes competed for the machine: " + "; ".join(sorted(set(before + after))[:6]))
    for row in rows:
        report(row, args)
        if args.json:
            print(json.dumps(row))
    return status


if __name__ == "__main__":
    sys.exit(main())

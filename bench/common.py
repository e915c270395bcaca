"""Helpers shared by the benchmark drivers (bench/allreduce.py, bench/ddp.py, ...) and the PyTorch peers."""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
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


def run_together(cmds, what, timeout):
    """Runs the commands at once; returns each one's last JSON line, in order."""
    if len(cmds) == 1:
        return [run_json_lines(cmds[0], what, timeout)[-1]]
    results, errors = [None] * len(cmds), []

    def one(i):
        try:
            results[i] = run_json_lines(cmds[i], f"{what} [{i + 1}/{len(cmds)}]", timeout)[-1]
        except RuntimeError as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cmds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def cpu_busy_seconds():
    """CPU seconds the whole machine has been busy since boot (all cores; user,
    nice, system, irq, softirq and steal from /proc/stat; Linux)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def pin_rank(rank, world_size, threads):
    """Pins this process to the rank-th run of `threads` allowed cores when the ranks fill the
    allowed cores exactly, as kiln's `[workers] cpu_affinity = "auto"` does; else leaves it.
    Call before torch starts its threads: they inherit this thread's cores."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) == world_size * threads:
        os.sched_setaffinity(0, allowed[rank * threads:(rank + 1) * threads])


def median(values):
    return statistics.median(values) if values else None


def fmt(value, spec=".2f", missing="n/a"):
    return missing if value is None else format(value, spec)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root):
    """`root` and every process descending from it (Linux: read from /proc), parents first."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name before it may hold spaces and ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def kill_tree(root, also=()):
    """SIGKILLs `root`, all its descendants, the pids in `also` and (if it leads one)
    `root`'s process group, as a machine's loss would.

    Everything is stopped (SIGSTOP) first, so that no process of the tree sees
    another die and reacts before it dies itself. Returns the pids signalled.
    """
    try:
        own_group = os.getpgid(root) == root  # started with start_new_session=True
    except ProcessLookupError:
        own_group = False
    pids = process_tree(root)
    pids += [pid for pid in also if pid not in pids]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    if own_group:
        try:
            os.killpg(root, signal.SIGKILL)  # anything of its group that left the tree
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def pids_with_env(name, value):
    """Pids of this user's processes whose environment holds `name=value`.

    Finds a benchmark's processes however they were re-parented (a worker whose
    agent died, a process that started its own session).
    """
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or another user's
            continue
    return found

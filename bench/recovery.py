#!/usr/bin/env python3
"""Recovery from node loss, kiln agents vs torchrun (elastic, c10d rendezvous), 3 nodes -> 2.

Three "nodes" run on this machine, each one process tree with one CPU worker:

  kiln:      kiln agent --store etcd://127.0.0.1:P --job JOB --spec SPEC --node node-K
                 --nproc 1 --data-dir DIR --events-json          (a real etcd on loopback)
  torchrun:  python -m torch.distributed.run --nnodes=2:3 --nproc-per-node=1
                 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:P --rdzv-id=JOB --max-restarts=3
                 [--rdzv-conf ...] bench/recovery_peer.py --spec SPEC --ckpt-dir DIR

Both train the same job: bench/mlp.toml's MLP and synthetic data, with the
global batch set to 240 (it must split evenly over 3 and 2 ranks), 200 steps,
SGD. Once a step >= --kill-step has completed at world size 3, one whole node
(its agent and its worker, stopped then SIGKILLed together) is killed:

  main case:   a node that neither hosts torchrun's c10d store (node-0, started
               first) nor leads kiln's rendezvous (read from etcd);
  store case:  the node that hosts the c10d store (torchrun) / leads the
               rendezvous (kiln), with a bounded wait (--store-kill-wait).

recovery = time from the kill to the first step completed at world size 2
(each side's own timestamp, unix seconds on this machine's clock);
steps redone = (last step completed anywhere before the kill) - (first step
completed at the new world size) + 1, floored at 0.

torchrun restarts every worker on a membership change, so its peer checkpoints
(torch.save by global rank 0, every --ckpt-every steps, default every step) and
resumes from it. It runs twice: with the rendezvous defaults (a node is declared
dead after keep_alive_interval 5 s x keep_alive_max_attempt 3, then the round
waits last_call_timeout 30 s for a third node), and tuned (--tuned-conf); both
with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, without which torch 2.11's restarted
gloo workers read stale peer addresses and never reconnect (pytorch#135712).

Modes alternate (kiln, torchrun default, torchrun tuned, kiln, ...) for --reps
repetitions; the table shows medians and ranges. Targets (kiln within
lease_ttl_secs + 2 s, >= 5x faster than default torchrun, >= 2x faster than
tuned, at most 1 step redone) are reported, never enforced: the exit status says
only whether every run ran.
"""

import argparse
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

from common import (
    BENCH_DIR,
    REPO,
    fmt,
    free_port,
    kill_tree,
    log,
    median,
    pids_with_env,
    release_dir,
)

NODES = 3
NODE_NAMES = [f"node-{k}" for k in range(NODES)]
MODES = ("kiln", "torchrun-default", "torchrun-tuned")
LABELS = {"kiln": "kiln", "torchrun-default": "torchrun default", "torchrun-tuned": "torchrun tuned"}
# torch 2.11's dynamic rendezvous (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py,
# create_handler): keep_alive_interval 5 s, keep_alive_max_attempt 3, last_call_timeout 30 s,
# join_timeout 600 s, close_timeout 30 s, heartbeat_timeout 5 s; c10d_rendezvous_backend.py:
# read_timeout 60 s. ("timeout", which torchrun always sets to 900, is read by none of them.)
DEFAULT_CONF_TEXT = "keep_alive_interval=5,keep_alive_max_attempt=3,last_call_timeout=30 (defaults)"
TUNED_CONF = "keep_alive_interval=1,keep_alive_max_attempt=2,last_call_timeout=1"
TAG_ENV = "KILN_BENCH_TAG"
TARGET_KILN_SLACK_S = 2.0
TARGET_VS_DEFAULT = 5.0
TARGET_VS_TUNED = 2.0
TARGET_MAX_REDONE = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=BENCH_DIR / "mlp.toml", help="base job spec (default: bench/mlp.toml)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the main case per mode (default: 3)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    p.add_argument("--cases", default="main,store", help="comma-separated: main, store (default: both)")
    p.add_argument("--store-modes", default=",".join(MODES),
                   help="modes that run the store case (default: all)")
    p.add_argument("--steps", type=int, default=200, help="train.steps (default: 200)")
    p.add_argument("--global-batch", type=int, default=240, help="train.global_batch, divisible by 2 and 3 (default: 240)")
    p.add_argument("--kill-step", type=int, default=30, help="kill once this step is done at world size 3 (default: 30)")
    p.add_argument("--after-steps", type=int, default=10,
                   help="steps to watch at the new world size before stopping a run (default: 10)")
    p.add_argument("--kiln-ttl", type=int, default=3, help="elastic.lease_ttl_secs for kiln (default: 3)")
    p.add_argument("--ckpt-every", type=int, default=1, help="torchrun peer: checkpoint every N steps (default: 1)")
    p.add_argument("--max-restarts", type=int, default=3, help="torchrun --max-restarts (default: 3)")
    p.add_argument("--tuned-conf", default=TUNED_CONF, help=f"torchrun tuned --rdzv-conf (default: {TUNED_CONF})")
    p.add_argument("--kiln", type=Path, default=None, help="kiln binary (default: <target>/release/kiln)")
    p.add_argument("--etcd", default="etcd", help="etcd binary (default: etcd on PATH)")
    p.add_argument("--etcdctl", default="etcdctl", help="etcdctl binary (default: etcdctl on PATH)")
    p.add_argument("--python", default=sys.executable, help="Python with torch for torchrun (default: this one)")
    p.add_argument("--peer-only", action="store_true", help="run only the torchrun modes")
    p.add_argument("--start-timeout", type=float, default=240, help="seconds to reach the kill step (default: 240)")
    p.add_argument("--recover-timeout", type=float, default=240,
                   help="seconds to wait for recovery in the main case (default: 240)")
    p.add_argument("--store-kill-wait", type=float, default=60,
                   help="seconds to wait for recovery in the store case (default: 60)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep each run's logs and files under this folder")
    p.add_argument("--json", action="store_true", help="also print every run and the summary as JSON lines")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.cases = [c for c in args.cases.split(",") if c]
    args.store_modes = [m for m in args.store_modes.split(",") if m]
    for m in args.modes + args.store_modes:
        if m not in MODES:
            p.error(f"unknown mode '{m}' (allowed: {', '.join(MODES)})")
    for c in args.cases:
        if c not in ("main", "store"):
            p.error(f"unknown case '{c}' (allowed: main, store)")
    if args.peer_only:
        args.modes = [m for m in args.modes if m != "kiln"]
        args.store_modes = [m for m in args.store_modes if m != "kiln"]
    if args.global_batch % NODES or args.global_batch % (NODES - 1):
        p.error(f"--global-batch {args.global_batch} must divide by {NODES} and {NODES - 1}")
    if not 1 <= args.kill_step < args.steps - args.after_steps:
        p.error("--kill-step must be at least 1 and leave --after-steps steps after it")
    if args.kiln_ttl < 2:
        p.error("--kiln-ttl must be at least 2 (elastic.lease_ttl_secs)")
    return args


# ---------------------------------------------------------------------------- the job spec


def recovery_spec(base, args):
    """bench/mlp.toml with what node loss needs: 1 worker per node, 2..3 nodes, a batch for both."""
    spec = tomllib.loads(base.read_text())
    spec["job"]["name"] = "bench-recovery"
    spec.setdefault("train", {}).update(steps=args.steps, global_batch=args.global_batch)
    spec["workers"] = {**spec.get("workers", {}), "nproc": 1}
    # kiln's survivors keep their state in memory (DESIGN.md section 3); no checkpoint is
    # needed to recover, and none is timed inside the loop.
    spec["checkpoint"] = {"final_checkpoint": False}
    spec["elastic"] = {"min_nodes": NODES - 1, "max_nodes": NODES, "lease_ttl_secs": args.kiln_ttl}
    return spec


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as a TOML value")


def to_toml(spec):
    """Tables of scalars and lists only (what bench/mlp.toml holds)."""
    lines = ["# Written by bench/recovery.py from bench/mlp.toml."]
    for table, fields in spec.items():
        if not isinstance(fields, dict):
            raise ValueError(f"spec: top-level key '{table}' is not a table")
        lines += ["", f"[{table}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- processes


def malformed(obj):
    """Why an event lacks what the figures are computed from (None when it is usable)."""
    need = {"progress": ("step", "world_size", "time"), "round": ("world_size", "time"),
            "start": ("world_size", "time", "spawned", "resumed_from")}.get(obj["event"], ())
    for key in need:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"'{key}' is not a number"
    return None


class Node:
    """One simulated node: a process started in its own session, JSON events read from its stdout."""

    def __init__(self, name, cmd, env, log_path, events, tag):
        self.name = name
        self.tag = tag
        self.killed = False
        self.exit = None  # (return code, unix time) once its stdout closed
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=REPO,
            text=True, start_new_session=True,
        )
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events):
        for line in self.proc.stdout:
            start = line.find("{")
            if start < 0:
                continue
            try:
                obj = json.loads(line[start:])
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "event" in obj:
                problem = malformed(obj)
                if problem:
                    log(f"recovery: {self.name}: ignoring event ({problem}): {line.strip()}")
                else:
                    events.put((self.name, obj))
        rc = self.proc.wait()
        events.put((self.name, {"event": "exit", "rc": rc, "time": time.time()}))

    def pids(self):
        """Every live process of this node, including workers that left its tree."""
        return pids_with_env(TAG_ENV, self.tag)

    def kill(self, also=None):
        return kill_tree(self.proc.pid, also=self.pids() if also is None else also)

    def stop(self):
        if self.proc.poll() is None or self.pids():
            self.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"recovery: {self.name} (pid {self.proc.pid}) did not exit after SIGKILL")
        self._log.close()

    def exit_reason(self):
        """The last exception line of its log (`SomeError: message`), if any."""
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            if re.match(r"^[\w.]+(Error|Exception): ", line):
                return line if len(line) <= 200 else line[:197] + "..."
        return None

    def log_tail(self, lines=8):
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_port(port, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what}: nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


class Etcd:
    """A one-member etcd on loopback with its own data folder, for one kiln run."""

    def __init__(self, binary, run_dir):
        self.client, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self._log = open(run_dir / "etcd.log", "w")
        cmd = [binary, "--name", "bench", "--data-dir", str(run_dir / "etcd"),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
               "--initial-cluster", f"bench={peer_url}"]
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            raise RuntimeError(f"etcd: cannot start {binary}: {err}") from None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd: exited with status {self.proc.returncode} (see {run_dir / 'etcd.log'})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("etcd: not healthy after 20 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


def kiln_leader(etcdctl, etcd, job):
    """The node that leads the job's rendezvous, from `/kiln/jobs/JOB/leader`; None if unknown."""
    key = f"/kiln/jobs/{job}/leader"
    try:
        out = subprocess.run([etcdctl, f"--endpoints={etcd.url}", "get", "--prefix", key],
                             capture_output=True, text=True, timeout=10, env=dict(os.environ, ETCDCTL_API="3"))
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) < 2:
        return None, None
    value = lines[1].strip()
    for name in NODE_NAMES:
        if value == name:
            return name, value
    for name in NODE_NAMES:
        if re.search(rf"(^|[^\w-]){re.escape(name)}($|[^\w-])", value):
            return name, value
    return None, value


# ---------------------------------------------------------------------------- one run


def run_once(mode, case, args, spec_path, work_root, rep):
    """Starts 3 nodes, kills one at the kill step, watches the survivors; returns the run's record."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-{case}-{rep}-", dir=work_root))
    job = f"recovery-{mode}-{case}-{rep}-{int(time.time())}"
    events = queue.Queue()
    nodes, etcd, seen = {}, None, []
    record = {"mode": mode, "case": case, "rep": rep, "run_dir": str(run_dir)}

    def next_event(deadline):
        try:
            name, obj = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        seen.append((name, obj))
        return name, obj

    def env_for(name):
        env = dict(os.environ)
        env.update({"KILN_BENCH_NODE": name, TAG_ENV: f"{job}/{name}", "GLOO_SOCKET_IFNAME": "lo",
                    "PYTHONUNBUFFERED": "1", "LOGLEVEL": os.environ.get("LOGLEVEL", "INFO")})
        return env

    try:
        if mode == "kiln":
            etcd = Etcd(args.etcd, run_dir)
            for name in NODE_NAMES:
                data = run_dir / name
                data.mkdir()
                cmd = [args.kiln, "agent", "--store", f"etcd://127.0.0.1:{etcd.client}", "--job", job,
                       "--spec", spec_path, "--node", name, "--nproc", "1", "--data-dir", data, "--events-json"]
                nodes[name] = Node(name, cmd, env_for(name), run_dir / f"{name}.log", events, f"{job}/{name}")
        else:
            port = free_port()
            ckpt = run_dir / "ckpt"
            ckpt.mkdir()
            conf = ["--rdzv-conf", args.tuned_conf] if mode == "torchrun-tuned" else []
            for name in NODE_NAMES:
                cmd = [args.python, "-m", "torch.distributed.run", f"--nnodes={NODES - 1}:{NODES}",
                       "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                       f"--rdzv-id={job}", f"--max-restarts={args.max_restarts}", *conf,
                       BENCH_DIR / "recovery_peer.py", "--spec", spec_path, "--ckpt-dir", ckpt,
                       "--ckpt-every", str(args.ckpt_every)]
                env = env_for(name)
                # torch 2.11 shares the rendezvous' TCPStore with the workers and keeps it
                # across restarts, so restarted workers can read the previous round's gloo
                # addresses and fail to connect (pytorch/pytorch#135712; here it made every
                # restart fail). The workaround: rank 0's worker hosts a fresh store per round.
                env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
                nodes[name] = Node(name, cmd, env, run_dir / f"{name}.log", events, f"{job}/{name}")
                if name == NODE_NAMES[0]:
                    # node-0 binds the rendezvous endpoint: it hosts the c10d store. Being
                    # first, it also has the lowest pid and so is group rank 0 (the
                    # rendezvous sorts nodes by host, then pid), whose worker hosts the
                    # workers' store.
                    wait_port(port, 60, f"{mode}: {name}'s c10d store")

        # Phase 1: train at world size 3 up to the kill step, every node's latest step at world size 3.
        deadline = time.monotonic() + args.start_timeout
        latest_world = {}
        while True:
            item = next_event(deadline)
            if item is None:
                raise RuntimeError(f"no step {args.kill_step} at world size {NODES} within {args.start_timeout:.0f} s")
            name, obj = item
            if obj["event"] == "exit":
                raise RuntimeError(f"{name} exited with status {obj['rc']} before the kill:\n{nodes[name].log_tail()}")
            if obj["event"] == "progress":
                latest_world[name] = obj["world_size"]
                if (obj["world_size"] == NODES and obj["step"] >= args.kill_step
                        and all(latest_world.get(n) == NODES for n in NODE_NAMES)):
                    break

        # Choose and kill the victim.
        if mode == "kiln":
            leader, raw = kiln_leader(args.etcdctl, etcd, job)
            record["leader"] = leader
            record["leader_key_value"] = raw
            if case == "store":
                victim = leader or NODE_NAMES[0]
                record["victim_role"] = "rendezvous leader" if leader else "leader unknown (leader key unreadable)"
            else:
                others = [n for n in NODE_NAMES if n != leader]
                victim = others[-1]
                record["victim_role"] = "not the leader" if leader else "leader unknown (leader key unreadable)"
        else:
            victim = NODE_NAMES[0] if case == "store" else NODE_NAMES[-1]
            record["victim_role"] = "hosts the c10d store" if case == "store" else "does not host the c10d store"
        record["victim"] = victim
        tagged = nodes[victim].pids()  # read every process's environment before the clock starts
        t_kill = time.time()
        record["killed_pids"] = len(nodes[victim].kill(also=tagged))
        record["kill_ms"] = (time.time() - t_kill) * 1000
        nodes[victim].killed = True
        record["kill_time"] = t_kill
        survivors = [n for n in NODE_NAMES if n != victim]

        # Phase 2: wait for the survivors' first step at world size 2, then a few more.
        wait = args.store_kill_wait if case == "store" else args.recover_timeout
        deadline = time.monotonic() + wait
        first_new, first_from, after, exits = None, None, 0, {}
        while True:
            item = next_event(deadline)
            if item is None:
                break
            name, obj = item
            if obj["event"] == "exit" and name in survivors:
                exits[name] = {"rc": obj["rc"], "after_s": obj["time"] - t_kill,
                               "reason": nodes[name].exit_reason()}
                if len(exits) == len(survivors):
                    break
            if obj["event"] == "progress" and obj.get("world_size") == NODES - 1 and obj["time"] > t_kill:
                if first_new is None:
                    first_new, first_from = obj, name
                    deadline = time.monotonic() + args.recover_timeout
                if name == first_from:
                    after += 1
                    if after > args.after_steps:
                        break
        # Events already queued (sent before the kill, read late) still count.
        while next_event(time.monotonic()) is not None:
            pass
        record.update(measure(seen, t_kill, first_new))
        record["survivor_exits"] = exits
        if first_new is not None:
            record["outcome"] = "recovered"
        elif exits and len(exits) == len(survivors):
            record["outcome"] = "survivors exited"
        else:
            record["outcome"] = f"no step at world size {NODES - 1} within {wait:.0f} s"
        if first_new is None and case == "main":
            tails = "\n".join(f"--- {n}\n{nodes[n].log_tail()}" for n in survivors)
            log(f"recovery: {mode} did not recover ({record['outcome']}); survivors' logs end:\n{tails}")
        return record
    finally:
        for node in nodes.values():
            node.stop()
        if etcd is not None:
            etcd.stop()
        if args.work_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)


def step_ms(progress):
    """Median time between consecutive steps of one node, in ms."""
    by_node = {}
    for obj in progress:
        by_node.setdefault(obj.get("node"), []).append(obj)
    gaps = []
    for rows in by_node.values():
        rows.sort(key=lambda o: o["time"])
        gaps += [(b["time"] - a["time"]) * 1000 for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]
    return median(gaps)


def measure(seen, t_kill, first_new):
    """The figures of one run, from every event it printed."""
    progress = [obj for _, obj in seen if obj["event"] == "progress"]
    before = [o for o in progress if o["time"] <= t_kill]
    last_before = max((o["step"] for o in before), default=None)
    out = {
        "last_step_before_kill": last_before,
        "step_ms_before": step_ms([o for o in before if o.get("world_size") == NODES]),
    }
    if first_new is None:
        return out
    out["first_step_after"] = first_new["step"]
    out["recovery_s"] = first_new["time"] - t_kill
    out["steps_redone"] = max(0, last_before - first_new["step"] + 1) if last_before is not None else None
    out["step_ms_after"] = step_ms([o for o in progress if o["time"] > t_kill and o.get("world_size") == NODES - 1])
    # Phases: when the survivors learned the new membership, and (torchrun) when the
    # restarted workers were up again with the checkpoint loaded.
    rounds = [o["time"] for _, o in seen
              if o["event"] == "round" and o.get("world_size") == NODES - 1 and o["time"] > t_kill]
    starts = [o for _, o in seen if o["event"] == "start" and o.get("world_size") == NODES - 1 and o["time"] > t_kill]
    if rounds:
        out["new_round_s"] = min(rounds) - t_kill
    if starts:
        # torchrun spawns a node's workers as soon as its rendezvous round completes.
        out["new_round_s"] = min(o["spawned"] for o in starts) - t_kill
        out["workers_ready_s"] = max(o["time"] for o in starts) - t_kill
        out["resumed_from"] = min(o["resumed_from"] for o in starts)
    return out


# ---------------------------------------------------------------------------- report


def span(values, spec=".2f"):
    return f"{min(values):{spec}}-{max(values):{spec}}" if values else "n/a"


def summarize(runs, mode):
    ok = [r for r in runs if r["mode"] == mode and r["case"] == "main" and r.get("outcome") == "recovered"]
    rec = [r["recovery_s"] for r in ok]
    redone = [r["steps_redone"] for r in ok if r.get("steps_redone") is not None]
    return {
        "runs": len([r for r in runs if r["mode"] == mode and r["case"] == "main"]),
        "recovered": len(ok),
        "recovery_s": median(rec), "recovery_all": rec,
        "steps_redone": median(redone), "steps_redone_all": redone,
        "new_round_s": median([r["new_round_s"] for r in ok if "new_round_s" in r]),
        "workers_ready_s": median([r["workers_ready_s"] for r in ok if "workers_ready_s" in r]),
        "step_ms_before": median([r["step_ms_before"] for r in ok if r.get("step_ms_before")]),
        "step_ms_after": median([r["step_ms_after"] for r in ok if r.get("step_ms_after")]),
    }


def verdict(ok):
    return "met" if ok else "not met"


def report(args, runs, failures):
    train_spec = recovery_spec(args.spec, args)
    print()
    print(f"recovery from node loss: {NODES} nodes x 1 CPU worker -> {NODES - 1}, one whole node SIGKILLed "
          f"once step {args.kill_step} of {args.steps} is done at world size {NODES}")
    print(f"job: {args.spec.name}'s MLP {train_spec['data'].get('features')}-"
          f"{'-'.join(map(str, train_spec['model'].get('hidden', [])))}-{train_spec['data'].get('classes')}, "
          f"global batch {args.global_batch}, {train_spec['train'].get('threads_per_worker', 1)} thread(s) per worker, gloo/CPU")
    print(f"kiln: elastic.lease_ttl_secs = {args.kiln_ttl}, settle_secs default; in-memory state, no checkpoint")
    print(f"torchrun: --rdzv-backend c10d --max-restarts {args.max_restarts}; peer saves a checkpoint every "
          f"{args.ckpt_every} step(s) (torch.save by rank 0) and every restarted worker loads it")
    print(f"  default: {DEFAULT_CONF_TEXT}")
    print(f"  tuned:   --rdzv-conf {args.tuned_conf}")
    print("recovery = kill -> first step completed at the new world size; medians over the runs that recovered")
    print()
    head = (f"{'mode':17} {'recovery s':>10} {'range s':>12} {'redone':>6} {'new round s':>11} "
            f"{'ready s':>7} {'ms/step 3n':>10} {'ms/step 2n':>10}  runs (recovery s / steps redone)")
    print(head)
    sums = {}
    for mode in args.modes:
        s = sums[mode] = summarize(runs, mode)
        per_run = ", ".join(
            f"{fmt(r.get('recovery_s'))}/{r.get('steps_redone', '-')}" if r.get("outcome") == "recovered"
            else f"FAILED ({r.get('outcome', r.get('error', '?'))})"
            for r in runs if r["mode"] == mode and r["case"] == "main")
        print(f"{LABELS[mode]:17} {fmt(s['recovery_s']):>10} {span(s['recovery_all']):>12} "
              f"{fmt(s['steps_redone'], '.0f'):>6} {fmt(s['new_round_s']):>11} {fmt(s['workers_ready_s']):>7} "
              f"{fmt(s['step_ms_before'], '.0f'):>10} {fmt(s['step_ms_after'], '.0f'):>10}  {per_run or 'n/a'}")
    print("(new round s: kill -> kiln's new round event / torchrun's restarted worker spawned; "
          "ready s: kill -> torchrun's workers up with the checkpoint loaded)")
    print()
    kiln = sums.get("kiln", {}).get("recovery_s")
    ratios = {}
    for mode, target in (("torchrun-default", TARGET_VS_DEFAULT), ("torchrun-tuned", TARGET_VS_TUNED)):
        other = sums.get(mode, {}).get("recovery_s")
        ratio = other / kiln if kiln and other else None
        ratios[mode] = ratio
        shown = f"{ratio:.1f}x" if ratio else "n/a"
        judged = verdict(ratio >= target) if ratio else "not measured"
        print(f"{LABELS[mode]} / kiln recovery: {shown} (target >= {target:.0f}x) -> {judged}")
    if kiln is not None:
        limit = args.kiln_ttl + TARGET_KILN_SLACK_S
        print(f"kiln recovery <= lease_ttl_secs + {TARGET_KILN_SLACK_S:.0f} s = {limit:.0f} s: "
              f"{fmt(kiln)} s -> {verdict(kiln <= limit)}")
        redone = sums["kiln"]["steps_redone_all"]
        if redone:
            print(f"kiln steps redone <= {TARGET_MAX_REDONE}: max {max(redone)} -> "
                  f"{verdict(max(redone) <= TARGET_MAX_REDONE)}")
    else:
        print("kiln: not measured" + (" (--peer-only)" if args.peer_only else ""))

    store_runs = [r for r in runs if r["case"] == "store"]
    if store_runs:
        print()
        print("killing the node that hosts torchrun's c10d store / leads kiln's rendezvous "
              f"(bounded wait {args.store_kill_wait:.0f} s):")
        for r in store_runs:
            print(f"  {LABELS[r['mode']]:17} {describe_store_run(r)}")
    for f in failures:
        print(f"error: {f}")
    if args.json:
        for r in runs:
            print(json.dumps({"bench": "recovery", "run": r}))
        print(json.dumps({"bench": "recovery", "summary": sums, "ratios": ratios, "kiln_ttl": args.kiln_ttl,
                          "ckpt_every": args.ckpt_every, "tuned_conf": args.tuned_conf}))


def describe_store_run(r):
    if "error" in r:
        return f"error: {r['error']}"
    who = f"{r['victim']} ({r['victim_role']}) killed after step {r.get('last_step_before_kill')}"
    if r.get("outcome") == "recovered":
        return f"{who}: recovered in {r['recovery_s']:.2f} s, {r.get('steps_redone')} step(s) redone"
    exits = sorted(r.get("survivor_exits", {}).items())
    text = f"{who}: did not recover: {r['outcome']}"
    text += "; " + ", ".join(f"{n} exited with status {e['rc']} after {e['after_s']:.1f} s" for n, e in exits) \
        if exits else "; survivors still running, killed"
    reasons = sorted({e["reason"] for _, e in exits if e.get("reason")})
    return text + "".join(f"\n{'':19}{reason}" for reason in reasons)


def main():
    args = parse_args()
    args.spec = args.spec.resolve()
    args.kiln = (args.kiln or release_dir() / "kiln").resolve()
    uses_kiln = "kiln" in args.modes or ("store" in args.cases and "kiln" in args.store_modes)
    if uses_kiln:
        if not args.kiln.exists():
            log(f"recovery: {args.kiln} not found: build it with `cargo build --release -p kiln`, or pass --peer-only")
            return 2
        probe = subprocess.run([args.kiln, "agent", "--help"], capture_output=True, text=True)
        if probe.returncode != 0:
            log(f"recovery: `{args.kiln} agent --help` failed (no agent command yet?): pass --peer-only\n"
                f"{probe.stderr.strip()}")
            return 2
        if shutil.which(args.etcd) is None:
            log(f"recovery: no etcd binary '{args.etcd}' (apt-get install etcd-server etcd-client)")
            return 2

    work_root = args.work_dir
    if work_root is not None:
        work_root.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="kiln-recovery-")
    spec_path = Path(tmp.name) / "recovery.toml"
    spec_path.write_text(to_toml(recovery_spec(args.spec, args)))
    if work_root is not None:
        shutil.copy(spec_path, work_root / "recovery.toml")
    root = work_root or Path(tmp.name)

    plan = []
    if "main" in args.cases:
        plan += [(mode, "main", rep) for rep in range(1, args.reps + 1) for mode in args.modes]
    if "store" in args.cases:
        plan += [(mode, "store", 1) for mode in MODES if mode in args.store_modes]
    runs, failures = [], []
    for mode, case, rep in plan:
        what = f"recovery {LABELS[mode]}, {case} case" + (f" (rep {rep}/{args.reps})" if case == "main" else "")
        log(f"{what}: starting")
        try:
            record = run_once(mode, case, args, spec_path, root, rep)
        except (RuntimeError, OSError) as err:
            log(f"error: {what}: {err}")
            failures.append(f"{what}: {err}")
            runs.append({"mode": mode, "case": case, "rep": rep, "error": str(err), "outcome": "error"})
            continue
        runs.append(record)
        if record.get("outcome") == "recovered":
            log(f"{what}: killed {record['victim']} after step {record['last_step_before_kill']}, first step at "
                f"world size {NODES - 1}: {record['first_step_after']} after {record['recovery_s']:.2f} s")
        else:
            log(f"{what}: killed {record['victim']}: {record['outcome']}")
            if case == "main":
                failures.append(f"{what}: {record['outcome']}")
    report(args, runs, failures)
    tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Seeded chaos soak of an elastic kiln job: faults every --interval seconds for
--duration seconds, recovery timed per fault, goodput against a fault-free run,
and every committed checkpoint verified at the end.

Three "nodes" run on this machine, each a `kiln agent` in its own session with
one CPU worker and its own --data-dir, all on one single-member etcd on loopback
and one shared checkpoint location (`checkpoint.url = "file:///…"`):

  kiln agent --store etcd://127.0.0.1:P --job JOB --spec SPEC --node node-K
             --nproc 1 --data-dir DIR/node-K --events-json

The job: bench/mlp.toml's MLP on synthetic data, global batch 240 (it splits over
3 and 2 ranks), SGD, a save every --ckpt-interval steps (keep_last --keep-last),
[elastic] min_nodes 2, max_nodes 3, lease_ttl_secs --ttl, cooldown_secs 1 (a
replaced node is not held back) and max_failures 1000 (the soak measures
recovery, not the restart budget, which 20 faults in 10 minutes would spend).

1. Fault-free run: the job trains at world size 3 for --baseline seconds;
   steps/s is measured over that window (agents' event timestamps). A second
   fault-free window runs after the chaos run (unless --no-baseline-after):
   the cores are shared and their load drifts, so goodput is taken against the
   mean of the two.
2. Chaos run: the same job with train.steps sized from that rate (it must not
   end inside the window). Once all three nodes train at world size 3 the
   window opens; at every --interval a fault, of a kind taken in turn from a
   seeded shuffle of all kinds (each cycle covers every kind), on a victim the
   seeded RNG picks:

     node-kill    SIGSTOP then SIGKILL of a whole node (agent and worker); a new
                  node (new name, new data dir) starts --rejoin-delay s later
     worker-kill  SIGKILL of one worker process only (the agent's child, from
                  /proc); its agent replaces it
     leader-stop  SIGSTOP of the rendezvous leader's node (every process of it:
                  a silent machine, not a death) for lease_ttl_secs + 2 s, then
                  SIGCONT; it is expected to find its lease gone and leave, and a
                  new node replaces it (leader from etcd: /kiln/jobs/JOB/leader)
     etcd-kill    SIGKILL of the only etcd member, restarted on the same data
                  dir and ports --etcd-down s later (single member: a full
                  store outage; the agents are expected to ride it out)
     save-kill    kill a whole node within ~100 ms of a save point (the
                  progress event of a step that is a multiple of the checkpoint
                  interval, when that step's save is in flight), then replace it.
                  The `checkpoint` event is printed once a save has committed,
                  so killing right after it would hit the gap between saves.

   A fault waits (up to interval/2) for the world to be back at 3 first; a
   fault injected on a smaller world is marked degraded.

Per fault (times from the fault, i.e. the moment the script sent the signal):
  detection    first sign the others noticed: a survivor's agent log line
               (presence close -> "revoking its lease", "round interrupted"),
               a `worker_died` event, or a `round` event of a newer round
  rendezvous   first `round_started` of a newer round (any surviving node)
  transfer     that round_started -> first `progress` step of that round
  recovery     first progress step in a round newer than the one at the fault
  full world   first progress at world size 3 in a newer round (replacement in)
Times are the agents' own: every --events-json line carries "time" (unix
seconds, printed by the agent) and log lines their tracing timestamp; the fault
time is the script's clock; all on this machine's one clock.

Goodput = (last step reached at the end of the window - step at its start)
/ window, over the fault-free steps/s. Redone steps do not count. As a
cross-check that does not depend on the fault-free rate, the gaps over 0.2 s
between consecutive progress events (recoveries and scale-up rounds) are
summed: the share of the window the job spent training.

At the end every checkpoint `kiln ckpt ls` lists under the shared location is
verified (`kiln ckpt verify ROOT --step S`), and the newest checkpoint each
node announced (`checkpoint` event) must still be listed unless retention
(keep_last newest) removed it by design. Retention runs when a run finishes
(CheckpointManager::finish); the soak's job is killed at the end of its window,
so in practice every committed checkpoint is still there and verified (about
14 MB each for this model: --ckpt-interval sets how many pile up).

Targets are printed beside the figures, never enforced: recovery <= 1 s for
process death (node-kill, worker-kill, save-kill), <= lease_ttl_secs + 1 s for
silent loss (leader-stop), goodput >= 95 % at a fault every 30 s. Exit status:
nonzero only if a run failed to run or a checkpoint failed to verify.
"""

import argparse
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from datetime import datetime
from pathlib import Path

from common import BENCH_DIR, fmt, kill_tree, log, median, pids_with_env, process_tree
from recovery import Node, toml_value

KINDS = ("node-kill", "worker-kill", "leader-stop", "etcd-kill", "save-kill")
PROCESS_DEATH = ("node-kill", "worker-kill", "save-kill")
WORLD = 3
TAG_ENV = "KILN_BENCH_TAG"
TARGET_DEATH_S = 1.0
TARGET_SILENT_SLACK_S = 1.0
TARGET_GOODPUT = 0.95
DEFAULT_KILN = Path.home() / ".cache/kiln/target/debug/kiln"
# What a survivor's agent logs when it notices (coordinator/src/presence.rs, src/agent.rs).
LOG_MARKERS = ("revoking its lease", "round interrupted", "lease expired")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)\s+(\w+)\s+(.*)$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="chaos window, seconds (default: 600)")
    p.add_argument("--interval", type=float, default=30, help="seconds between faults (default: 30)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: from the clock; printed)")
    p.add_argument("--kiln", type=Path, default=Path(os.environ.get("KILN_BIN") or DEFAULT_KILN),
                   help=f"kiln binary (default: $KILN_BIN or {DEFAULT_KILN})")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, checkpoints, etcd)")
    p.add_argument("--baseline", type=float, default=75, help="fault-free measuring window, seconds (default: 75)")
    p.add_argument("--no-baseline-after", dest="baseline_after", action="store_false",
                   help="skip the second fault-free window after the chaos run")
    p.add_argument("--spec", type=Path, default=BENCH_DIR / "mlp.toml", help="base spec (default: bench/mlp.toml)")
    p.add_argument("--global-batch", type=int, default=240, help="train.global_batch, divisible by 2 and 3 (default: 240)")
    p.add_argument("--ttl", type=int, default=3, help="elastic.lease_ttl_secs (default: 3)")
    p.add_argument("--ckpt-interval", type=int, default=100,
                   help="checkpoint.interval in steps (default: 100, a save every few s here)")
    p.add_argument("--keep-last", type=int, default=5, help="checkpoint.keep_last (default: 5)")
    p.add_argument("--rejoin-delay", type=float, default=3, help="seconds before a killed node is replaced (default: 3)")
    p.add_argument("--etcd-down", type=float, default=5, help="seconds etcd stays down (default: 5)")
    p.add_argument("--start-timeout", type=float, default=240, help="seconds to reach world size 3 (default: 240)")
    p.add_argument("--etcd", default="etcd", help="etcd binary (default: etcd on PATH)")
    p.add_argument("--etcdctl", default="etcdctl", help="etcdctl binary (default: etcdctl on PATH)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time() * 1000) % 2**32
    if args.global_batch % 6:
        p.error("--global-batch must divide by 2 and 3")
    if args.interval <= 0 or args.duration <= args.interval:
        p.error("--duration must be longer than --interval > 0")
    return args


# ---------------------------------------------------------------------------- job spec


def chaos_spec(args, job, steps, ckpt_root):
    spec = tomllib.loads(args.spec.read_text())
    spec["job"]["name"] = job
    spec.setdefault("train", {}).update(steps=steps, global_batch=args.global_batch, log_interval=1000)
    spec["workers"] = {**spec.get("workers", {}), "nproc": 1}
    spec["checkpoint"] = {"url": f"file://{ckpt_root}", "interval": args.ckpt_interval,
                          "keep_last": args.keep_last, "final_checkpoint": False}
    spec["elastic"] = {"min_nodes": WORLD - 1, "max_nodes": WORLD, "lease_ttl_secs": args.ttl,
                       "cooldown_secs": 1, "max_failures": 1000}
    lines = ["# Written by bench/chaos.py from " + args.spec.name + "."]
    for table, fields in spec.items():
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- etcd


class Etcd:
    """A one-member etcd on loopback that can be killed and started again on the same ports and data."""

    def __init__(self, binary, run_dir):
        from common import free_port
        self.binary, self.run_dir = binary, run_dir
        self.client, self.peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client}"
        self.proc = None
        self._log = open(run_dir / "etcd.log", "a")
        self.start()

    def start(self):
        peer_url = f"http://127.0.0.1:{self.peer}"
        cmd = [self.binary, "--name", "chaos", "--data-dir", str(self.run_dir / "etcd"),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
               "--initial-cluster", f"chaos={peer_url}"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with status {self.proc.returncode} (see {self.run_dir}/etcd.log)")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"etcd not healthy after {timeout} s")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self):
        self.kill()
        self._log.close()


def leader_of(args, etcd, job):
    try:
        out = subprocess.run([args.etcdctl, f"--endpoints={etcd.url}", "get", "--print-value-only",
                              f"/kiln/jobs/{job}/leader"], capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, ETCDCTL_API="3"))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# ---------------------------------------------------------------------------- one run


class Run:
    """One job on a fresh etcd: its nodes, their events, and scheduled actions."""

    def __init__(self, args, label, root, steps):
        self.args, self.label = args, label
        self.dir = root / label
        self.dir.mkdir(parents=True)
        self.ckpt_root = self.dir / "ckpt"
        self.ckpt_root.mkdir()
        self.job = f"chaos-{label}-{int(time.time())}"
        self.spec = self.dir / "job.toml"
        self.spec.write_text(chaos_spec(args, self.job, steps, self.ckpt_root))
        self.events = queue.Queue()
        self.event_log = open(self.dir / "events.jsonl", "w")  # every event read, for a post-mortem
        self.seen = []  # (node, event) in the order read
        self.nodes = {}  # name -> Node, every node ever started
        self.live = []  # names of nodes expected to be in the job
        self.exited = {}  # name -> (rc, time)
        self.next_name = 0
        self.etcd = Etcd(args.etcd, self.dir)
        self.etcd.wait_healthy()
        self.round = 0
        self.last_progress = None  # the newest progress event (any node)
        self.progress_at = {}  # node -> its newest progress event

    def start_node(self):
        name = f"node-{self.next_name}"
        self.next_name += 1
        data = self.dir / name
        data.mkdir()
        env = dict(os.environ, KILN_LOG="warn", **{TAG_ENV: f"{self.job}/{name}"})
        cmd = [self.args.kiln, "agent", "--store", f"etcd://127.0.0.1:{self.etcd.client}", "--job", self.job,
               "--spec", self.spec, "--node", name, "--nproc", "1", "--data-dir", data, "--events-json"]
        self.nodes[name] = Node(name, cmd, env, self.dir / f"{name}.log", self.events, f"{self.job}/{name}")
        self.live.append(name)
        return name

    def pump(self, until):
        """Reads events until the monotonic deadline `until`; returns the next one or None."""
        try:
            name, obj = self.events.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            return None
        obj.setdefault("read_time", time.time())
        self.seen.append((name, obj))
        self.event_log.write(json.dumps({"node": name, **obj}) + "\n")
        kind = obj["event"]
        if kind in ("round", "round_started"):
            self.round = max(self.round, int(obj.get("round", 0)))
        elif kind == "progress":
            self.last_progress = obj
            self.progress_at[name] = obj
        elif kind == "exit":
            self.exited[name] = (obj["rc"], obj["time"])
        return name, obj

    def healthy(self):
        """Three live nodes, each of whose newest progress is at world size 3 in the newest round."""
        if len(self.live) != WORLD:
            return False
        for name in self.live:
            p = self.progress_at.get(name)
            if p is None or p.get("world_size") != WORLD or p.get("round") != self.round:
                return False
        return True

    def wait_world(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.pump(deadline) is None and time.monotonic() >= deadline:
                raise RuntimeError(f"{self.label}: not training at world size {WORLD} within {timeout:.0f} s")
            gone = [n for n in self.live if n in self.exited]
            if gone:
                raise RuntimeError(f"{self.label}: {gone[0]} exited with status {self.exited[gone[0]][0]}:\n"
                                   f"{self.nodes[gone[0]].log_tail()}")
        return self.last_progress

    def step_at(self, t):
        """The step of the newest progress event printed at or before unix time t."""
        best = None
        for _, o in self.seen:
            if o["event"] == "progress" and o["time"] <= t and (best is None or o["time"] > best["time"]):
                best = o
        return best

    def stop(self):
        for node in self.nodes.values():
            try:
                node.stop()
            except OSError:
                pass
        self.etcd.stop()
        self.event_log.close()


# ---------------------------------------------------------------------------- faults


def signal_pids(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def node_pids(run, name):
    node = run.nodes[name]
    return sorted(set(process_tree(node.proc.pid)) | set(pids_with_env(TAG_ENV, node.tag)))


def worker_of(run, name):
    agent = run.nodes[name].proc.pid
    # Each thread has its own list of children, and the agent starts workers
    # from more than one.
    kids = []
    try:
        threads = os.listdir(f"/proc/{agent}/task")
    except OSError:
        threads = []
    for tid in threads:
        try:
            with open(f"/proc/{agent}/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    kids.sort()
    for pid in kids:  # `kiln worker --agent-fd N --local-rank R` (trainer/src/agent.rs)
        try:
            # The agent's spare worker names itself `kiln-spare` until it takes a slot.
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "kiln-spare":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"worker" in f.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    return None


class Chaos:
    """Injects the faults on schedule and records each one."""

    def __init__(self, run, args, rng):
        self.run, self.args, self.rng = run, args, rng
        self.faults = []
        self.actions = []  # (monotonic time, description, callable)
        self.armed = None  # a pending save-kill: (fault record, deadline, target role)
        self.order = []

    def next_kind(self):
        if not self.order:
            self.order = list(KINDS)
            self.rng.shuffle(self.order)
        return self.order.pop(0)

    def later(self, delay, what, fn):
        self.actions.append((time.monotonic() + delay, what, fn))

    def due(self):
        now = time.monotonic()
        ready = [a for a in self.actions if a[0] <= now]
        self.actions = [a for a in self.actions if a[0] > now]
        for _, what, fn in ready:
            if what:
                log(f"chaos: {what}")
            fn()

    def next_deadline(self, default):
        return min([default] + [a[0] for a in self.actions] + ([self.armed[1]] if self.armed else []))

    def record(self, kind, victim, **extra):
        run = self.run
        last = run.last_progress or {}
        rec = {"index": len(self.faults) + 1, "kind": kind, "victim": victim, "round_before": run.round,
               "world_before": last.get("world_size"), "step_before": last.get("step"),
               "degraded": not run.healthy(), **extra}
        self.faults.append(rec)
        return rec

    def replace(self, victim):
        """After rejoin-delay, a new node takes the victim's place."""
        def go():
            name = self.run.start_node()
            log(f"chaos: started {name} in place of {victim}")
        self.later(self.args.rejoin_delay, f"replace {victim}", go)

    def kill_node(self, name):
        run = self.run
        pids = node_pids(run, name)
        t = time.time()
        kill_tree(run.nodes[name].proc.pid, also=pids)
        run.nodes[name].killed = True
        if name in run.live:
            run.live.remove(name)
        return t

    def inject(self, kind):
        run, rng = self.run, self.rng
        live = sorted(run.live)
        if kind == "node-kill":
            victim = rng.choice(live)
            leader = leader_of(self.args, run.etcd, run.job)
            rec = self.record(kind, victim, leader=victim == leader)
            rec["time"] = self.kill_node(victim)
            self.replace(victim)
        elif kind == "worker-kill":
            victim = rng.choice(live)
            worker = worker_of(run, victim)
            rec = self.record(kind, victim, worker_pid=worker)
            rec["time"] = time.time()
            if worker is None:
                rec["error"] = "no worker process found under the agent"
            else:
                signal_pids([worker], signal.SIGKILL)
        elif kind == "leader-stop":
            leader = leader_of(self.args, run.etcd, run.job)
            victim = leader if leader in live else rng.choice(live)
            rec = self.record(kind, victim, leader=leader == victim, leader_key=leader)
            pids = node_pids(run, victim)
            rec["time"] = time.time()
            signal_pids(pids, signal.SIGSTOP)
            run.live.remove(victim)
            pause = self.args.ttl + 2

            def resume():
                signal_pids(node_pids(run, victim), signal.SIGCONT)
                rec["resumed"] = time.time()
                self.actions.append((time.monotonic() + 0.5, None, check_left))

            def check_left():
                # Polled every 0.5 s: the replacement starts as soon as the paused node has left.
                if victim in run.exited:
                    rec["after_resume"] = f"left with status {run.exited[victim][0]} " \
                                          f"{run.exited[victim][1] - rec['resumed']:.1f} s after SIGCONT"
                elif time.time() - rec["resumed"] < 20:
                    self.actions.append((time.monotonic() + 0.5, None, check_left))
                    return
                else:
                    rec["after_resume"] = "still running 20 s after SIGCONT: killed"
                    self.kill_node(victim)
                log(f"chaos: {victim}: {rec['after_resume']}; starting its replacement")
                run.start_node()

            self.later(pause, f"SIGCONT {victim}", resume)
        elif kind == "etcd-kill":
            rec = self.record(kind, "etcd")
            rec["time"] = time.time()
            run.etcd.kill()

            def restart():
                run.etcd.start()
                rec["restarted"] = time.time()

            self.later(self.args.etcd_down, "restart etcd", restart)
        elif kind == "save-kill":
            target = rng.choice(("rank 0 (committer)", "another rank"))
            rec = self.record(kind, None, target=target)
            self.armed = (rec, time.monotonic() + 30, target)
            return rec
        log(f"chaos: fault {rec['index']}: {kind} {rec['victim']} at step {rec['step_before']}")
        return rec

    def on_event(self, name, obj):
        """A save-kill fires at a save point: the progress event of a step the checkpoint interval divides."""
        if self.armed is None:
            return
        rec, deadline, target = self.armed
        save_point = obj["event"] == "progress" and obj["step"] % self.args.ckpt_interval == 0
        if not save_point and time.monotonic() < deadline:
            return
        run = self.run
        ranks = {n: run.progress_at[n].get("rank") for n in run.live if n in run.progress_at}
        zero = [n for n, r in ranks.items() if r == 0]
        if target.startswith("rank 0") and zero:
            victim = zero[0]
        else:
            others = sorted(n for n in run.live if n not in zero) or sorted(run.live)
            victim = self.rng.choice(others)
        self.armed = None
        rec.update(victim=victim, round_before=run.round, step_before=obj.get("step"),
                   world_before=obj.get("world_size"), degraded=not run.healthy(),
                   save_step=obj["step"] if save_point else None)
        rec["time"] = self.kill_node(victim)
        rec["after_save_point_ms"] = (rec["time"] - obj["time"]) * 1000 if save_point else None
        if not save_point:
            rec["error"] = "no save point within 30 s: killed anyway"
        log(f"chaos: fault {rec['index']}: save-kill {victim} ({target}) "
            f"{fmt(rec['after_save_point_ms'], '.0f')} ms after the save point of step {obj.get('step')}")
        self.replace(victim)


# ---------------------------------------------------------------------------- analysis


def log_marks(run):
    """(node, unix time, text) of every agent log line that shows a fault was noticed."""
    marks = []
    for name, node in run.nodes.items():
        try:
            lines = Path(node.log_path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = LOG_TIME.match(line)
            if not m or not any(k in m.group(3) for k in LOG_MARKERS):
                continue
            t = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            marks.append((name, t, m.group(3)[:160]))
    return marks


def analyse(run, faults, window_end, ttl):
    marks = log_marks(run)
    events = [(n, o) for n, o in run.seen if "time" in o]
    times = [f["time"] for f in faults if "time" in f] + [window_end + 1e9]
    for f in faults:
        if "time" not in f:
            continue
        t0 = f["time"]
        t_next = min(t for t in times if t > t0)
        victim = f["victim"] if f["kind"] not in ("worker-kill", "etcd-kill") else None
        others = [(n, o) for n, o in events if n != victim and t0 <= o["time"] < t_next]
        r0 = f["round_before"]
        if f["kind"] == "etcd-kill":
            up = f.get("restarted", t0 + 5)
            prog = sorted(o["time"] for _, o in others if o["event"] == "progress")
            gaps = [b - a for a, b in zip([t0] + prog, prog + [min(t_next, up + 10)])]
            during = [o["step"] for _, o in others if o["event"] == "progress" and o["time"] <= up]
            f["outage_s"] = up - t0
            f["new_rounds"] = sorted({o["round"] for _, o in others if o["event"] == "round" and o["round"] > r0})
            f["steps_during_outage"] = (max(during) - f["step_before"]) if during and f["step_before"] is not None else 0
            f["max_progress_gap_s"] = max(gaps) if gaps else None
            f["exits"] = sorted(n for n, o in others if o["event"] == "exit")
            f["recovered"] = not f["new_rounds"] and not f["exits"] and bool(during or prog)
            continue
        det = []
        for n, o in others:
            if o["event"] == "round" and o.get("round", 0) > r0:
                det.append((o["time"], f"{n}: round {o['round']} planned"))
            elif o["event"] == "worker_died":
                det.append((o["time"], f"{n}: worker_died event"))
        for n, t, text in marks:
            if n != victim and t0 <= t < t_next:
                det.append((t, f"{n}: log: {text[:70]}"))
        if det:
            t, why = min(det)
            f["detection_s"], f["detected_by"] = t - t0, why
        started = [o for _, o in others if o["event"] == "round_started" and o.get("round", 0) > r0]
        if started:
            rs = min(started, key=lambda o: o["time"])
            f["rendezvous_s"] = rs["time"] - t0
            f["new_round"], f["new_world"] = rs["round"], rs["world_size"]
            f["state_source"], f["resumed_step"] = rs.get("state_source"), rs.get("step")
            f["setup_seconds"] = rs.get("setup_seconds")
            if f.get("step_before") is not None and rs.get("step") is not None:
                f["steps_redone"] = max(0, f["step_before"] - rs["step"])
            prog = [o for _, o in others if o["event"] == "progress" and o.get("round") == rs["round"]]
            if prog:
                first = min(prog, key=lambda o: o["time"])
                f["transfer_s"] = first["time"] - rs["time"]
        prog = [o for _, o in others if o["event"] == "progress" and o.get("round", 0) > r0]
        if prog:
            f["recovery_s"] = min(o["time"] for o in prog) - t0
        full = [o for _, o in others if o["event"] == "progress" and o.get("round", 0) > r0
                and o.get("world_size") == WORLD]
        if full:
            f["full_world_s"] = min(o["time"] for o in full) - t0
        f["recovered"] = "recovery_s" in f
        if not f["recovered"]:
            f["events_seen"] = [f"{o['time'] - t0:+.2f}s {n} {o['event']}"
                                + "".join(f" {k}={o[k]}" for k in ("round", "world_size", "step", "rc") if k in o)
                                for n, o in others if o["event"] != "progress"][:20]
        target = TARGET_DEATH_S if f["kind"] in PROCESS_DEATH else ttl + TARGET_SILENT_SLACK_S
        f["target_s"] = target
    return faults


def stalls(seen, t_start, t_end, threshold=0.2):
    """Gaps over `threshold` s between consecutive progress events (any node) in the
    window: time the job made no step, fault recoveries and scale-up rounds alike."""
    times = sorted(o["time"] for _, o in seen if o["event"] == "progress" and t_start <= o["time"] <= t_end)
    gaps = [b - a for a, b in zip(times, times[1:]) if b - a > threshold]
    window = t_end - t_start
    return {"stalls": len(gaps), "stalled_s": sum(gaps),
            "trained_fraction": 1 - sum(gaps) / window if window > 0 else None}


def summary_by_kind(faults):
    out = {}
    for kind in KINDS:
        rows = [f for f in faults if f["kind"] == kind]
        if not rows:
            continue
        s = {"faults": len(rows), "recovered": sum(1 for f in rows if f.get("recovered"))}
        for key in ("detection_s", "rendezvous_s", "transfer_s", "recovery_s", "full_world_s", "max_progress_gap_s"):
            vals = [f[key] for f in rows if f.get(key) is not None]
            if vals:
                s[key] = {"median": median(vals), "max": max(vals)}
        out[kind] = s
    return out


# ---------------------------------------------------------------------------- checkpoints


def verify_checkpoints(args, run):
    root = f"file://{run.ckpt_root}"
    ls = subprocess.run([args.kiln, "ckpt", "ls", "--json", root], capture_output=True, text=True, timeout=300)
    if ls.returncode != 0:
        return {"error": f"kiln ckpt ls failed: {ls.stderr.strip()[-300:]}", "failed": 1, "verified": 0}
    listed = json.loads(ls.stdout or "[]")
    res = {"root": root, "listed": [], "verified": 0, "failed": 0, "failures": []}
    for entry in listed:
        step = entry.get("step")
        if step is None or entry.get("error"):
            res["failed"] += 1
            res["failures"].append(f"{entry.get('key')}: unreadable: {entry.get('error')}")
            continue
        res["listed"].append(step)
        v = subprocess.run([args.kiln, "ckpt", "verify", "--json", root, "--step", str(step)],
                           capture_output=True, text=True, timeout=600)
        if v.returncode == 0:
            res["verified"] += 1
        else:
            res["failed"] += 1
            res["failures"].append(f"step {step}: exit {v.returncode}: {(v.stdout + v.stderr).strip()[-300:]}")
    announced = sorted({o["step"] for _, o in run.seen if o["event"] == "checkpoint"})
    kept_by_design = set(announced[-args.keep_last:])
    res["announced"] = len(announced)
    res["newest_announced"] = announced[-1] if announced else None
    res["missing_newest"] = sorted(s for s in kept_by_design if s not in res["listed"])
    per_node = {}
    for name in run.nodes:
        steps = [o["step"] for n, o in run.seen if n == name and o["event"] == "checkpoint"]
        if steps:
            last = steps[-1]
            per_node[name] = {"last": last, "present": last in res["listed"],
                              "retention": last not in res["listed"] and last not in kept_by_design}
    res["per_node_last"] = per_node
    res["lost"] = sorted({v["last"] for v in per_node.values() if not v["present"] and not v["retention"]}
                         | set(res["missing_newest"]))
    return res


# ---------------------------------------------------------------------------- main


def baseline(args, root, label="fault-free"):
    run = Run(args, label, root, steps=10**7)
    try:
        for _ in range(WORLD):
            run.start_node()
        first = run.wait_world(args.start_timeout)
        t_start = first["time"]
        end = time.monotonic() + args.baseline
        while time.monotonic() < end:
            run.pump(end)
        last = run.last_progress
        rounds = sorted({o["round"] for _, o in run.seen if o["event"] == "round_started"})
        rate = (last["step"] - first["step"]) / (last["time"] - t_start)
        return {"steps_per_s": rate, "window_s": last["time"] - t_start, "steps": last["step"] - first["step"],
                "first_step": first["step"], "rounds": rounds, "ms_per_step": 1000 / rate if rate else None}
    finally:
        run.stop()


def chaos(args, root, rate, rng):
    steps = int(rate * (args.duration + 300) * 2) + 1000
    run = Run(args, "chaos", root, steps=steps)
    engine = Chaos(run, args, rng)
    result = {"train_steps": steps}
    try:
        for _ in range(WORLD):
            run.start_node()
        first = run.wait_world(args.start_timeout)
        t_start, m_start = first["time"], time.monotonic() - (time.time() - first["time"])
        m_end = m_start + args.duration
        k = 1
        next_fault = m_start + args.interval
        postponed_since = None
        while time.monotonic() < m_end:
            item = run.pump(engine.next_deadline(min(next_fault, m_end)))
            if item is not None:
                engine.on_event(*item)
            engine.due()
            alive = [n for n in run.live if n not in run.exited]
            if not alive and not engine.actions:
                raise RuntimeError("chaos: every node exited")
            if time.monotonic() >= next_fault and next_fault < m_end:
                if not run.healthy() and engine.armed is None and (
                        postponed_since is None or time.monotonic() - postponed_since < args.interval / 2):
                    postponed_since = postponed_since or time.monotonic()
                    next_fault = time.monotonic() + 0.2
                    continue
                if engine.armed is not None:  # a save-kill still waiting: skip this slot
                    next_fault = m_start + (k + 1) * args.interval
                    k += 1
                    continue
                engine.inject(engine.next_kind())
                postponed_since = None
                k += 1
                next_fault = m_start + k * args.interval
        t_end = t_start + args.duration
        # Events printed before the window's end but still queued count (training goes on:
        # stop at the first one printed after it).
        while True:
            item = run.pump(time.monotonic() + 2)
            if item is None or item[1].get("time", 0) > t_end:
                break
        at_end = run.step_at(t_end)
        useful = at_end["step"] - first["step"]
        result.update(window_s=args.duration, first_step=first["step"], last_step=at_end["step"],
                      useful_steps=useful, steps_per_s=useful / args.duration,
                      goodput=(useful / args.duration) / rate if rate else None)
        result.update(stalls(run.seen, t_start, t_end))
        result["faults"] = analyse(run, engine.faults, t_end, args.ttl)
        result["unexpected_exits"] = {n: rc for n, (rc, _) in run.exited.items()
                                      if not run.nodes[n].killed and n not in
                                      [f["victim"] for f in engine.faults if f["kind"] == "leader-stop"]}
        result["nodes_started"] = len(run.nodes)
        result["rounds"] = run.round
    finally:
        run.stop()
    result["checkpoints"] = verify_checkpoints(args, run)
    return result


def ms(v):
    return fmt(v, ".2f", "-")


def report(args, res):
    base, ch = res["fault_free"], res.get("chaos", {})
    print()
    print(f"chaos soak: seed {args.seed}, {WORLD} nodes x 1 CPU worker, window {args.duration:.0f} s, "
          f"a fault every {args.interval:.0f} s; lease_ttl_secs {args.ttl}, checkpoint every "
          f"{args.ckpt_interval} steps (keep_last {args.keep_last}), binary {args.kiln}")
    print(f"fault-free: {base['steps_per_s']:.2f} steps/s ({base['steps']} steps in {base['window_s']:.1f} s, "
          f"rounds {base['rounds']})")
    faults = ch.get("faults", [])
    if faults:
        print()
        print(f"{'#':>2} {'kind':11} {'victim':8} {'step':>6} {'detect s':>8} {'rdv s':>6} {'xfer s':>6} "
              f"{'recov s':>7} {'target':>6} {'full s':>6} {'ws':>2} {'redone':>6}  notes")
        for f in faults:
            notes = []
            if f.get("degraded"):
                notes.append(f"degraded (world {f.get('world_before')})")
            if f["kind"] == "etcd-kill":
                notes.append(f"outage {ms(f.get('outage_s'))} s, {f.get('steps_during_outage')} steps during it, "
                             f"max progress gap {ms(f.get('max_progress_gap_s'))} s, new rounds {f.get('new_rounds')}")
            if f["kind"] == "save-kill":
                notes.append(f"{f.get('target')}, {ms(f.get('after_save_point_ms'))} ms after save point "
                             f"{f.get('save_step')}")
            if f["kind"] == "leader-stop":
                notes.append(f"leader={f.get('leader')}; {f.get('after_resume', '')}")
            if f.get("detected_by"):
                notes.append(f"by {f['detected_by'][:60]}")
            if f.get("state_source") is not None:
                notes.append(f"state from {'rank ' + str(f['state_source']) if f['state_source'] >= 0 else 'checkpoint'}")
            if f.get("error"):
                notes.append(f["error"])
            if not f.get("recovered"):
                notes.append("NOT RECOVERED")
            print(f"{f['index']:>2} {f['kind']:11} {str(f.get('victim')):8} {str(f.get('step_before')):>6} "
                  f"{ms(f.get('detection_s')):>8} {ms(f.get('rendezvous_s')):>6} {ms(f.get('transfer_s')):>6} "
                  f"{ms(f.get('recovery_s')):>7} {ms(f.get('target_s')):>6} {ms(f.get('full_world_s')):>6} "
                  f"{str(f.get('new_world', '-')):>2} {str(f.get('steps_redone', '-')):>6}  {'; '.join(notes)}")
        print("(times in s from the fault: detect = first survivor log line / worker_died / newer round planned; "
              "rdv = first round_started of a newer round; xfer = round_started -> its first step; "
              "recov = first step in a newer round; full = first step at world size 3 again; "
              "agents' own timestamps)")
        print()
        print(f"{'kind':11} {'n':>2} {'ok':>2}  {'detect med/max':>15} {'rdv med/max':>13} {'xfer med/max':>13} "
              f"{'recov med/max':>14} {'full med/max':>13}  target")
        for kind, s in res["summary"].items():
            def mm(key):
                v = s.get(key)
                return f"{ms(v['median'])}/{ms(v['max'])}" if v else "-"
            if kind == "etcd-kill":
                target = "no new round, training on (gap med/max " + mm("max_progress_gap_s") + ")"
            else:
                limit = TARGET_DEATH_S if kind in PROCESS_DEATH else args.ttl + TARGET_SILENT_SLACK_S
                rec = s.get("recovery_s")
                target = f"recovery <= {limit:.0f} s: " + (
                    ("met" if rec["max"] <= limit else ("median met, max not" if rec["median"] <= limit
                                                        else "not met")) if rec else "not measured")
            print(f"{kind:11} {s['faults']:>2} {s['recovered']:>2}  {mm('detection_s'):>15} {mm('rendezvous_s'):>13} "
                  f"{mm('transfer_s'):>13} {mm('recovery_s'):>14} {mm('full_world_s'):>13}  {target}")
    if "goodput" in ch and ch["goodput"] is not None:
        g = ch["goodput"]
        print()
        ref = ch.get("baseline_steps_per_s", base["steps_per_s"])
        if "fault_free_after" in res:
            print(f"fault-free after the chaos run: {res['fault_free_after']['steps_per_s']:.2f} steps/s; "
                  f"goodput against the mean of both ({ref:.2f}); against the first alone "
                  f"{100 * ch['goodput_before_only']:.1f} %")
        print(f"goodput: {ch['useful_steps']} useful steps in {ch['window_s']:.0f} s = {ch['steps_per_s']:.2f} steps/s "
              f"/ {ref:.2f} fault-free = {100 * g:.1f} % (target >= {100 * TARGET_GOODPUT:.0f} % "
              f"at a fault every 30 s) -> {'met' if g >= TARGET_GOODPUT else 'not met'}")
    if ch.get("trained_fraction") is not None:
        print(f"stalls: {ch['stalls']} gaps over 0.2 s without a step (recoveries and scale-up rounds), "
              f"{ch['stalled_s']:.1f} s in all: {100 * ch['trained_fraction']:.1f} % of the window trained")
    if ch.get("unexpected_exits"):
        print(f"nodes that exited without being killed: {ch['unexpected_exits']}")
    c = ch.get("checkpoints")
    if c:
        print(f"checkpoints: {c.get('verified')} of {len(c.get('listed', [])) + (c.get('failed') or 0)} listed verified "
              f"(steps {c.get('listed')}), {c.get('failed')} failed; {c.get('announced')} distinct steps announced "
              f"committed, newest {c.get('newest_announced')}; newest {args.keep_last} announced all present: "
              f"{'yes' if not c.get('missing_newest') else 'NO, missing ' + str(c['missing_newest'])}")
        for n, v in sorted(c.get("per_node_last", {}).items()):
            state = "present" if v["present"] else ("deleted by retention (keep_last)" if v["retention"] else "LOST")
            print(f"  {n}: last checkpoint event step {v['last']}: {state}")
        for f in c.get("failures", []):
            print(f"  verify failure: {f}")
        if c.get("error"):
            print(f"  {c['error']}")


def main():
    args = parse_args()
    args.kiln = args.kiln.resolve()
    args.spec = args.spec.resolve()
    if not args.kiln.exists():
        log(f"chaos: {args.kiln} not found (build it, or pass --kiln / KILN_BIN)")
        return 2
    if shutil.which(args.etcd) is None or shutil.which(args.etcdctl) is None:
        log("chaos: etcd and etcdctl must be on PATH (apt-get install etcd-server etcd-client)")
        return 2
    log(f"chaos: seed {args.seed} (replay with --seed {args.seed})")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kiln-chaos-"))
    res = {"seed": args.seed, "duration": args.duration, "interval": args.interval, "ttl": args.ttl,
           "ckpt_interval": args.ckpt_interval, "keep_last": args.keep_last, "kiln": str(args.kiln),
           "work_dir": str(root)}
    status = 0
    try:
        log(f"chaos: fault-free run, {args.baseline:.0f} s")
        res["fault_free"] = baseline(args, root)
        log(f"chaos: fault-free {res['fault_free']['steps_per_s']:.2f} steps/s")
        log(f"chaos: chaos run, {args.duration:.0f} s")
        res["chaos"] = chaos(args, root, res["fault_free"]["steps_per_s"], rng)
        res["summary"] = summary_by_kind(res["chaos"].get("faults", []))
        if args.baseline_after:
            # The machine's load drifts (shared cores): a second fault-free window after the
            # chaos run brackets it, and goodput is taken against the mean of both.
            log(f"chaos: fault-free run again, {args.baseline:.0f} s")
            after = baseline(args, root, "fault-free-after")
            res["fault_free_after"] = after
            ch = res["chaos"]
            mean = (res["fault_free"]["steps_per_s"] + after["steps_per_s"]) / 2
            ch["goodput_before_only"] = ch.get("goodput")
            ch["baseline_steps_per_s"] = mean
            ch["goodput"] = ch["steps_per_s"] / mean if "steps_per_s" in ch else None
        c = res["chaos"]["checkpoints"]
        if c.get("failed") or c.get("error"):
            status = 1
    except (RuntimeError, OSError, KeyError, TypeError, ValueError) as err:
        log(f"error: chaos: {err}")
        res["error"] = str(err)
        status = 1
    if "fault_free" in res:
        res.setdefault("summary", {})
        report(args, res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2, default=str))
    if args.keep:
        log(f"chaos: kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

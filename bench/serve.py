"""Serving benchmark: `kiln serve` against a FastAPI + uvicorn + PyTorch server of
the same MLP, on the same Open Inference Protocol v2 JSON endpoint, driven by the
same closed-loop load generator (src/bin/loadgen.rs) at several concurrencies.

One invocation:

1. trains the digits MLP briefly (`kiln run examples/digits/job.toml --set
   train.steps=100`), which registers it as `digits` (alias `production`);
2. exports the registered version's checkpoint to safetensors
   (`kiln ckpt export`) for the peer;
3. starts `kiln serve --model digits@production` twice, with its defaults and
   with drift monitoring off (the peer monitors nothing), and the FastAPI
   peers (bench/serve_peer.py: uvicorn with 1 worker, and with 2), and waits
   until each answers /v2/health/ready; all stay up for the whole run;
4. checks that every server returns the same predictions for the 359 held-out
   digits (and prints the largest logit difference);
5. runs the load generator against each server at each concurrency, one
   server at a time (their order rotates from one level and repetition to the
   next), one request = `--rows` rows (default 1), the same body for all;
6. prints a table (server, concurrency, req/s, p50 ms, p99 ms, errors, the
   server's CPU use; medians over `--reps`) and the kiln / FastAPI ratios
   against the targets (kiln >= 5x the requests/s of
   FastAPI at concurrency 32 and <= 1/3 of its p99), then stops the servers.

Figures are printed, never judged: the exit status is non-zero only when
something failed to start or answer wrongly.

usage: python bench/serve.py [--kiln target/release/kiln] [--loadgen target/release/loadgen]
                             [--concurrency 1,8,32] [--duration-s 5] [--warmup-s 1] [--reps 3]
                             [--peer-workers 1,2] [--rows 1] [--kiln-args FLAGS] [--kiln-env K=V] [--json]
"""

import argparse
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, fmt, free_port, kill_tree, log, median, process_tree, release_dir  # noqa: E402

JOB = REPO / "examples" / "digits" / "job.toml"
EVAL_DATA = REPO / "examples" / "digits" / "data" / "eval-00000.safetensors"
TARGET_RPS_RATIO = 5.0  # kiln / FastAPI requests/s at the highest concurrency, at least
TARGET_P99_RATIO = 1 / 3  # kiln / FastAPI p99 at the highest concurrency, at most
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kiln", default=str(release_dir() / "kiln"), help="the kiln binary (default: %(default)s)")
    p.add_argument("--loadgen", default=str(release_dir() / "loadgen"), help="the load generator (default: %(default)s)")
    p.add_argument("--python", default=sys.executable, help="Python that runs the peer (torch, fastapi, uvicorn)")
    p.add_argument("--concurrency", default="1,8,32", help="concurrency levels, comma-separated (default: %(default)s)")
    p.add_argument("--duration-s", type=float, default=5.0, help="measured window per run (default: %(default)s)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="warm-up before each window (default: %(default)s)")
    p.add_argument("--rows", type=int, default=1, help="rows per request (default: %(default)s)")
    p.add_argument(
        "--peer-workers", default="1,2", help="uvicorn worker counts, one peer server each (default: %(default)s)"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions of every run; medians are shown (default: %(default)s)")
    p.add_argument(
        "--kiln-args", default="", help="extra `kiln serve` flags for every kiln row, e.g. '--max-queue-delay-us 500'"
    )
    p.add_argument(
        "--kiln-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for every kiln server (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE",
    )
    p.add_argument(
        "--no-drift-off-row",
        action="store_true",
        help="skip the second kiln server with drift monitoring off (`[drift] enabled = false`)",
    )
    p.add_argument("--peer-only", action="store_true", help="skip `kiln serve` (kiln still trains and exports the model)")
    p.add_argument("--work-dir", help="keep the trained model, logs and bodies here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="also print every run and the summary as JSON lines")
    args = p.parse_args()
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
        args.workers = [int(w) for w in args.peer_workers.split(",")] if args.peer_workers else []
    except ValueError:
        p.error("--concurrency and --peer-workers take comma-separated integers")
    if not args.levels or min(args.levels) < 1:
        p.error("--concurrency: every level must be at least 1")
    if any(w < 1 for w in args.workers):
        p.error("--peer-workers: every worker count must be at least 1")
    if not args.workers and args.peer_only:
        p.error("--peer-only with no --peer-workers leaves nothing to measure")
    for pair in args.kiln_env:
        if "=" not in pair or not pair.split("=", 1)[0]:
            p.error(f"--kiln-env takes KEY=VALUE, got '{pair}'")
    if not 1 <= args.rows <= 359:
        p.error(f"--rows must be between 1 and 359 (the held-out digits), got {args.rows}")
    if args.reps < 1 or args.duration_s <= 0 or args.warmup_s < 0:
        p.error("--reps must be at least 1, --duration-s positive and --warmup-s not negative")
    for flag, path in (("--kiln", args.kiln), ("--loadgen", args.loadgen)):
        if not os.access(path, os.X_OK):
            p.error(f"{flag}: no executable at {path} (build it: bench/run.sh serve, or pass the path)")
    return args


# ---------------------------------------------------------------- the model


def run_kiln(kiln, *argv, timeout=300):
    """Runs a kiln command and returns its stdout; raises with its stderr's tail on failure."""
    cmd = [kiln, *map(str, argv)]
    log("serve.py: " + " ".join(shlex.quote(str(c)) for c in cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-8:])
        raise RuntimeError(f"{cmd[1]} {cmd[2] if len(cmd) > 2 else ''}: exit status {proc.returncode}\n{tail}")
    return proc.stdout


def last_json(stdout, what):
    for line in reversed(stdout.splitlines()):
        if line.strip().startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{what}: printed no JSON line")


def prepare_model(kiln, work):
    """Trains and registers the digits MLP; returns (registry URL, served selector, peer weights file)."""
    data_dir = work / "kiln-data"
    out = run_kiln(kiln, "run", JOB, "--set", "train.steps=100", "--data-dir", data_dir, "--json")
    summary = last_json(out, "kiln run")
    registry, model = summary.get("registry"), summary.get("model")
    if not registry or not model:
        raise RuntimeError(f"kiln run registered no model (summary: {summary})")
    name = model.split(":")[0].split("@")[0]
    # Served as a user would: through the alias the job moved. The alias moves
    # only when the held-out accuracy reaches the spec's threshold; if it did
    # not, serve the registered version itself.
    selector = f"{name}@production"
    try:
        shown = json.loads(run_kiln(kiln, "registry", "show", selector, "--registry", registry, "--json"))
    except RuntimeError as err:
        log(f"serve.py: {selector} not found ({err}); serving {model}")
        selector = model
        shown = json.loads(run_kiln(kiln, "registry", "show", selector, "--registry", registry, "--json"))
    checkpoint = shown["resolved"][0]["version"]["checkpoint"]
    weights = work / "peer.safetensors"
    run_kiln(kiln, "ckpt", "export", checkpoint["root"], weights, "--step", checkpoint["step"])
    return registry, selector, name, weights


def eval_set():
    from safetensors.numpy import load_file

    data = load_file(str(EVAL_DATA))
    return data["x"], data["y"]


def infer_body(rows):
    """An OIP v2 JSON request holding `rows` (a float32 array [n, 64])."""
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "data": [float(v) for v in rows.ravel()],
                }
            ]
        }
    ).encode()


# ---------------------------------------------------------------- servers


class Server:
    """One server process under test, started in its own session so the whole tree can be stopped."""

    def __init__(self, name, kind, cmd, log_path, env=None):
        self.name, self.kind, self.cmd, self.log_path = name, kind, [str(c) for c in cmd], log_path
        log(f"serve.py: start {name}: " + " ".join(shlex.quote(c) for c in self.cmd))
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        self.base = None

    def log_tail(self, lines=10):
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")

    def wait_ready(self, base, timeout=180):
        """Polls GET base/v2/health/ready until it answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        self.base = base
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: not ready within {timeout} s\n{self.log_tail()}")

    def cpu_seconds(self):
        """User + system CPU seconds of the server and all its descendants (uvicorn workers)."""
        total = 0
        for pid in process_tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                continue
        return total / CLK_TCK

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                log(f"serve.py: {self.name} did not stop on SIGTERM within 15 s; killing it")
                kill_tree(self.proc.pid)
                self.proc.wait()
        self.log_file.close()


def start_kiln(args, registry, selector, work, servers, drift_off):
    cmd = [args.kiln, "serve", "--registry", registry, "--model", selector, "--listen", "127.0.0.1:0"]
    name, log_name = "kiln", "kiln-serve.log"
    if drift_off:
        # The peer monitors nothing; this row compares like with like.
        config = work / "kiln-serve-drift-off.toml"
        config.write_text("[drift]\nenabled = false\n")
        cmd += ["--config", config]
        name, log_name = "kiln, drift off", "kiln-serve-drift-off.log"
    cmd += shlex.split(args.kiln_args)
    tweaks = " ".join(args.kiln_env + ([args.kiln_args] if args.kiln_args else []))
    if tweaks:
        name += f" ({tweaks})"
    env = dict(os.environ, **dict(pair.split("=", 1) for pair in args.kiln_env))
    server = Server(name, "kiln", cmd, work / log_name, env=env)
    servers.append(server)  # stopped by the caller, ready or not
    # `kiln serve: listening on http://ADDR` on stdout once every model is warmed up.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        server.check_alive()
        for line in Path(server.log_path).read_text(errors="replace").splitlines():
            if line.startswith("kiln serve: listening on "):
                server.wait_ready(line.split("listening on ", 1)[1].strip())
                return
        time.sleep(0.1)
    raise RuntimeError(f"kiln serve: no 'listening on' line within 180 s\n{server.log_tail()}")


def start_peer(args, weights, model, workers, work, servers):
    port = free_port()
    cmd = [args.python, REPO / "bench" / "serve_peer.py", "--weights", weights, "--model", model]
    cmd += ["--port", port, "--workers", workers]
    server = Server(f"FastAPI {workers}w", "peer", cmd, work / f"peer-{workers}w.log")
    servers.append(server)  # stopped by the caller, ready or not
    server.wait_ready(f"http://127.0.0.1:{port}")


# ---------------------------------------------------------------- correctness


def post_infer(base, model, body):
    request = urllib.request.Request(
        f"{base}/v2/models/{model}/infer", data=body, headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        answer = json.load(r)
    outputs = {o["name"]: o for o in answer["outputs"]}
    return outputs["logits"]["data"], outputs["predictions"]["data"]


def check_agreement(servers, model, x, y, load_body):
    """Every server must return the same predictions for the held-out digits
    (one request of all rows) and for the load generator's body. Returns a summary."""
    import numpy as np

    answers = {}
    for s in servers:
        logits, predictions = post_infer(s.base, model, infer_body(x))
        body_logits, body_predictions = post_infer(s.base, model, load_body)
        answers[s.name] = (
            np.array(logits + body_logits, dtype=np.float64),
            predictions,
            body_predictions,
        )
    reference = servers[0].name
    ref_logits, ref_pred, ref_body_pred = answers[reference]
    summary = {"rows": len(y), "servers": {}}
    ok = True
    for name, (logits, predictions, body_predictions) in answers.items():
        accuracy = float(np.mean(np.array(predictions) == y))
        same = predictions == ref_pred and body_predictions == ref_body_pred
        diff = float(np.max(np.abs(logits - ref_logits)))
        summary["servers"][name] = {
            "accuracy": accuracy,
            "same_predictions_as": reference if same else None,
            "max_abs_logit_diff": diff,
        }
        ok &= same
        mismatched = int(np.sum(np.array(predictions) != np.array(ref_pred)))
        print(
            f"  {name:<22} accuracy {accuracy:.4f}  predictions {'identical to' if same else 'DIFFER from'} "
            f"{reference}'s ({mismatched} of {len(y)} differ)  max |logit diff| {diff:.2e}"
        )
    summary["ok"] = ok
    return summary


# ---------------------------------------------------------------- load


def run_load(args, server, model, concurrency, body_file):
    url = f"{server.base}/v2/models/{model}/infer"
    cmd = [args.loadgen, "--url", url, "--body-file", body_file, "--concurrency", concurrency]
    cmd += ["--duration-s", args.duration_s, "--warmup-s", args.warmup_s, "--expect", '"predictions"']
    cmd += ["--label", server.name]
    server.check_alive()
    cpu_before, load_before = server.cpu_seconds(), os.getloadavg()[0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    gen_before = children.ru_utime + children.ru_stime
    started = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=args.duration_s + args.warmup_s + 120)
    elapsed = time.monotonic() - started
    cpu = server.cpu_seconds() - cpu_before
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    gen_cpu = children.ru_utime + children.ru_stime - gen_before
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen against {server.name}: exit status {proc.returncode}\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    # Cores the server kept busy over warm-up + window.
    row.update(server=server.name, server_cores=cpu / elapsed, loadgen_cores=gen_cpu / elapsed, load_avg_1m=load_before)
    log(
        f"  {server.name:<24} c={concurrency:<3} {row['rps']:8.0f} req/s  p50 {fmt(row['p50_ms'], '.3f')} ms  "
        f"p99 {fmt(row['p99_ms'], '.3f')} ms  errors {row['errors']}  server cores {row['server_cores']:.2f}  "
        f"loadgen cores {row['loadgen_cores']:.2f}  load avg {load_before:.1f}"
    )
    return row


def wait_idle(servers, limit_s=30.0, window_s=0.5, max_cores=0.05):
    """Waits until the servers together use less than `max_cores` (a server may
    still be busy after its run: kiln evaluates drift windows in the background),
    so that no run pays for the previous one. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        before = sum(s.cpu_seconds() for s in servers)
        time.sleep(window_s)
        if sum(s.cpu_seconds() for s in servers) - before < max_cores * window_s:
            break
    else:
        log(f"serve.py: servers still busy after {limit_s:.0f} s; running the next level anyway")
    waited = time.monotonic() - started
    if waited > 2 * window_s + 0.2:
        log(f"serve.py: waited {waited:.1f} s for the servers to go idle")
    return waited


def summarise(rows, names, levels):
    """Medians over repetitions per (server, concurrency)."""
    table = []
    for name in names:
        for c in levels:
            runs = [r for r in rows if r["server"] == name and r["concurrency"] == c]
            if not runs:
                continue
            table.append(
                {
                    "server": name,
                    "concurrency": c,
                    "rps": median([r["rps"] for r in runs]),
                    "p50_ms": median([r["p50_ms"] for r in runs if r["p50_ms"] is not None]),
                    "p99_ms": median([r["p99_ms"] for r in runs if r["p99_ms"] is not None]),
                    "errors": sum(r["errors"] for r in runs),
                    "server_cores": median([r["server_cores"] for r in runs]),
                    "loadgen_cores": median([r["loadgen_cores"] for r in runs]),
                    "rps_runs": [round(r["rps"]) for r in runs],
                    "p99_runs": [r["p99_ms"] for r in runs],
                }
            )
    return table


def print_table(table, reps, rows):
    print()
    print(
        f"Serving: {rows} row(s) per request; medians of {reps} run(s) each; req/s range over the runs; "
        "cores = CPU s / wall s of the server (all its processes) and of the load generator"
    )
    w = max([len("server")] + [len(t["server"]) for t in table])
    print(
        f"{'server':<{w}} {'conc':>4} {'req/s':>8} {'req/s range':>13} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
        f"{'srv cores':>9} {'gen cores':>9}"
    )
    for t in table:
        spread = f"{min(t['rps_runs'])}-{max(t['rps_runs'])}"
        print(
            f"{t['server']:<{w}} {t['concurrency']:>4} {t['rps']:>8.0f} {spread:>13} {fmt(t['p50_ms'], '.3f'):>8} "
            f"{fmt(t['p99_ms'], '.3f'):>8} {t['errors']:>6} {t['server_cores']:>9.2f} {t['loadgen_cores']:>9.2f}"
        )


def ratios(table, kiln_names, peer_names, levels):
    """kiln / peer for every kiln row, peer and level: req/s (higher favours kiln), p50 and p99 (lower favours kiln)."""
    cell = {(t["server"], t["concurrency"]): t for t in table}

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = []
    for kiln in kiln_names:
        for peer in peer_names:
            for c in levels:
                k, p = cell.get((kiln, c)), cell.get((peer, c))
                if k and p:
                    out.append(
                        {
                            "kiln": kiln,
                            "peer": peer,
                            "concurrency": c,
                            "rps_ratio": ratio(k["rps"], p["rps"]),
                            "p50_ratio": ratio(k["p50_ms"], p["p50_ms"]),
                            "p99_ratio": ratio(k["p99_ms"], p["p99_ms"]),
                        }
                    )
    return out


def print_ratios(rows, top):
    print()
    print("Ratios kiln / FastAPI (req/s: above 1 favours kiln; p50, p99: below 1 favours kiln)")
    w = max([len("kiln")] + [len(r["kiln"]) for r in rows])
    print(f"{'kiln':<{w}} {'peer':<12} {'conc':>4} {'req/s':>8} {'p50':>8} {'p99':>8}")
    for r in rows:
        print(
            f"{r['kiln']:<{w}} {r['peer']:<12} {r['concurrency']:>4} {fmt(r['rps_ratio'], '.2f'):>7}x "
            f"{fmt(r['p50_ratio'], '.2f'):>7}x {fmt(r['p99_ratio'], '.2f'):>7}x"
        )
    print()
    print(f"Targets at concurrency {top}: req/s >= {TARGET_RPS_RATIO:.0f}x and p99 <= {TARGET_P99_RATIO:.2f}x FastAPI's")
    for r in rows:
        if r["concurrency"] != top or r["rps_ratio"] is None or r["p99_ratio"] is None:
            continue
        rps_met = "met" if r["rps_ratio"] >= TARGET_RPS_RATIO else "not met"
        p99_met = "met" if r["p99_ratio"] <= TARGET_P99_RATIO else "not met"
        print(
            f"  {r['kiln']:<{w}} vs {r['peer']:<12} req/s {r['rps_ratio']:.2f}x ({rps_met}), "
            f"p99 {r['p99_ratio']:.2f}x ({p99_met})"
        )


# ---------------------------------------------------------------- main


def main():
    args = parse_args()
    temp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="kiln-serve-bench-")
    work = Path(args.work_dir or temp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    servers = []
    status = 0
    try:
        registry, selector, model, weights = prepare_model(args.kiln, work)
        x, y = eval_set()
        load_body = infer_body(x[: args.rows])
        body_file = work / "body.json"
        body_file.write_bytes(load_body)

        if not args.peer_only:
            start_kiln(args, registry, selector, work, servers, drift_off=False)
            if not args.no_drift_off_row:
                start_kiln(args, registry, selector, work, servers, drift_off=True)
        for workers in args.workers:
            start_peer(args, weights, model, workers, work, servers)
        log("serve.py: every server is ready")

        print(f"Correctness: {len(y)} held-out digits in one request, and the load body ({args.rows} row(s)), to every server")
        agreement = check_agreement(servers, model, x, y, load_body)
        if not agreement["ok"]:
            status = 1
            print("  predictions differ between servers: the figures below compare different answers")

        print(
            f"\nLoad: {args.warmup_s:g} s warm-up + {args.duration_s:g} s measured per run, {args.rows} row(s) per "
            f"request ({len(load_body)} bytes), closed loop, levels {args.levels}, {args.reps} repetition(s)"
        )
        rows = []
        for rep in range(args.reps):
            for c in args.levels:
                # Rotate the order of the servers from one level/repetition to the next.
                shift = (rep + args.levels.index(c)) % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    wait_idle(servers)
                    row = run_load(args, server, model, c, body_file)
                    row["rep"] = rep
                    rows.append(row)
                    if args.json:
                        print(json.dumps({"run": row}), flush=True)

        names = [s.name for s in servers]
        table = summarise(rows, names, args.levels)
        print_table(table, args.reps, args.rows)
        ratio_rows = []
        kiln_names = [s.name for s in servers if s.kind == "kiln"]
        peer_names = [s.name for s in servers if s.kind == "peer"]
        if kiln_names and peer_names:
            ratio_rows = ratios(table, kiln_names, peer_names, args.levels)
            print_ratios(ratio_rows, max(args.levels))
        if any(t["errors"] for t in table):
            print("\nSome requests failed; first errors:")
            for r in rows:
                if r["errors"]:
                    print(f"  {r['server']} c={r['concurrency']}: {r['errors']} errors, e.g. {r['first_error']}")
        print(f"\nmachine: {os.cpu_count()} cores; 1-minute load average now {os.getloadavg()[0]:.2f}")
        if args.json:
            print(
                json.dumps(
                    {
                        "summary": table,
                        "ratios": ratio_rows,
                        "agreement": agreement,
                        "rows_per_request": args.rows,
                        "duration_s": args.duration_s,
                        "warmup_s": args.warmup_s,
                        "reps": args.reps,
                        "kiln_args": args.kiln_args,
                        "kiln_env": args.kiln_env,
                    }
                )
            )
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as err:
        log(f"serve.py: error: {err}")
        status = 1
    finally:
        for server in servers:
            server.stop()
        if temp is not None:
            temp.cleanup()
        elif servers:
            log(f"serve.py: logs and model kept in {work}")
    return status


if __name__ == "__main__":
    sys.exit(main())

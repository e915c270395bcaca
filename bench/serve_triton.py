"""Closed-loop load through the real `tritonclient`, for the serving benchmark (bench/serve.py).

One process, N concurrent callers, each with its own connection and one
request in flight; the next request leaves as soon as the answer is decoded
(closed loop). Modes:

- `http-binary`: `tritonclient.http`, the input as binary tensor data
  (`set_data_from_numpy(x, binary_data=True)`) and the outputs returned as
  binary (no outputs listed: tritonclient then asks for `binary_data_output`);
  N greenlets (tritonclient.http runs on gevent) sharing one client with a
  pool of N connections.
- `http-json`: the same client, input and outputs as JSON
  (`binary_data=False` on the input and on both requested outputs); works
  against any OIP v2 JSON server, the FastAPI peer included.
- `grpc`: `tritonclient.grpc`, N threads, each with its own client (channel).

The first `--warmup-s` seconds are not counted; req/s = answers completed in
the `--duration-s` window that follows / the window; latencies are those of
requests sent in the window (send to decoded answer, as the client sees it).
Prints one JSON line. The client is Python: on one core it tops out at a few
thousand requests/s, so the `client_cores` it reports says whether the client,
not the server, set the pace.

usage: python bench/serve_triton.py --url 127.0.0.1:8000 --model mlp --input input --datatype FP32
                                    --body-npy x.npy --mode http-binary --concurrency 32 --duration-s 5
"""

import argparse
import json
import sys
import threading
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="host:port of the server")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="the input's name (input, input_ids)")
    p.add_argument("--datatype", required=True, help="FP32, INT64, ...")
    p.add_argument("--body-npy", required=True, help="the request's tensor, a .npy file")
    p.add_argument("--mode", choices=["http-binary", "http-json", "grpc"], required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    return p.parse_args()


class Recorder:
    def __init__(self, start, end):
        self.start, self.end = start, end
        self.latencies, self.completed, self.errors, self.first_error = [], 0, 0, None

    def record(self, t0, t1):
        if self.start <= t1 <= self.end:
            self.completed += 1
        if t0 >= self.start and t1 <= self.end:
            self.latencies.append(t1 - t0)

    def error(self, err):
        self.errors += 1
        if self.first_error is None:
            self.first_error = repr(err)[:300]


def check(result, rows):
    logits = result.as_numpy("logits")
    if logits is None or logits.shape[0] != rows:
        raise RuntimeError(f"bad answer: logits {None if logits is None else logits.shape}")


def run_http(args, x, rec):
    import gevent
    import tritonclient.http as httpclient

    binary = args.mode == "http-binary"
    client = httpclient.InferenceServerClient(
        args.url, concurrency=args.concurrency, connection_timeout=120.0, network_timeout=120.0
    )
    inp = httpclient.InferInput(args.input, list(x.shape), args.datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = None
    if not binary:
        outputs = [
            httpclient.InferRequestedOutput("logits", binary_data=False),
            httpclient.InferRequestedOutput("predictions", binary_data=False),
        ]
    check(client.infer(args.model, [inp], outputs=outputs), x.shape[0])

    def caller():
        while True:
            t0 = time.perf_counter()
            if t0 >= rec.end:
                return
            try:
                r = client.infer(args.model, [inp], outputs=outputs)
                check(r, x.shape[0])
            except Exception as err:  # noqa: BLE001 - counted, the loop goes on
                rec.error(err)
                gevent.sleep(0.01)
                continue
            rec.record(t0, time.perf_counter())

    gevent.joinall([gevent.spawn(caller) for _ in range(args.concurrency)])
    client.close()


def run_grpc(args, x, rec):
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(args.url) for _ in range(args.concurrency)]
    lock = threading.Lock()

    def make_input():
        inp = grpcclient.InferInput(args.input, list(x.shape), args.datatype)
        inp.set_data_from_numpy(x)
        return inp

    check(clients[0].infer(args.model, [make_input()]), x.shape[0])

    def caller(client):
        inp = make_input()
        while True:
            t0 = time.perf_counter()
            if t0 >= rec.end:
                return
            try:
                r = client.infer(args.model, [inp], client_timeout=120.0)
                check(r, x.shape[0])
            except Exception as err:  # noqa: BLE001 - counted, the loop goes on
                with lock:
                    rec.error(err)
                time.sleep(0.01)
                continue
            t1 = time.perf_counter()
            with lock:
                rec.record(t0, t1)

    threads = [threading.Thread(target=caller, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()


def percentile(sorted_values, q):
    """Nearest rank."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(np.ceil(q / 100 * len(sorted_values))) - 1))
    return sorted_values[k]


def main():
    args = parse_args()
    x = np.load(args.body_npy)
    if args.mode == "grpc":  # imports before the clock starts
        import tritonclient.grpc  # noqa: F401
    else:
        import gevent  # noqa: F401
        import tritonclient.http  # noqa: F401
    cpu0, begin = time.process_time(), time.perf_counter()
    # Warm-up covers the client's set-up and its first (checked) answer.
    rec = Recorder(begin + args.warmup_s, begin + args.warmup_s + args.duration_s)
    try:
        (run_grpc if args.mode == "grpc" else run_http)(args, x, rec)
    except Exception as err:  # noqa: BLE001 - reported as a failed run
        print(json.dumps({"mode": args.mode, "concurrency": args.concurrency, "fatal": repr(err)[:500]}))
        return 1
    wall, cpu = time.perf_counter() - begin, time.process_time() - cpu0
    lat = sorted(rec.latencies)
    row = {
        "tool": f"tritonclient {args.mode}",
        "mode": args.mode,
        "concurrency": args.concurrency,
        "duration_s": args.duration_s,
        "requests": rec.completed,
        "rps": rec.completed / args.duration_s,
        "p50_ms": None if not lat else percentile(lat, 50) * 1e3,
        "p99_ms": None if not lat else percentile(lat, 99) * 1e3,
        "mean_ms": None if not lat else sum(lat) / len(lat) * 1e3,
        "errors": rec.errors,
        "first_error": rec.first_error,
        "client_cores": cpu / max(wall, 1e-9),
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

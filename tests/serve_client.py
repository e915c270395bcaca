#!/usr/bin/env python3
"""Client side of tests/serve.rs: drives `kiln serve` with the unmodified
tritonclient package (HTTP and gRPC) and checks its answers against PyTorch
running the same weights.

Expected logits are computed the way the server computes them: passes of
exactly `--batch` rows, zero-padded (the server's fixed-shape batching), so
that a row's result is bit-identical whatever else shares its pass.

Modes (each prints one JSON object on its last stdout line):

  roundtrip  HTTP binary, HTTP JSON and gRPC requests, plus concurrent ones
  tls        HTTP binary, HTTP JSON and gRPC requests over HTTPS and gRPC
             over TLS, trusting --ca; then clients that do not trust it, or
             that connect by a name the certificate does not hold, must be
             refused (both protocols)
  load       requests from several threads until --stop-file exists; each
             answer is checked against the version it reports
"""

import argparse
import json
import os
import sys
import threading
import time

import gevent.ssl
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def load_net(path, layers):
    w = {k.removeprefix("model/"): torch.from_numpy(v.copy()) for k, v in load_file(path).items()}

    def forward(x):
        for i in range(layers):
            x = F.linear(x, w[f"fc{i}.weight"], w[f"fc{i}.bias"])
            if i < layers - 1:
                x = torch.relu(x)
        return x

    return forward


def expected_logits(forward, x, batch):
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch):
            chunk = torch.from_numpy(x[s : s + batch])
            pad = torch.zeros(batch, x.shape[1], dtype=torch.float32)
            pad[: len(chunk)] = chunk
            out.append(forward(pad)[: len(chunk)])
    return torch.cat(out).numpy()


def headers(token):
    return {"authorization": f"Bearer {token}"} if token else None


def http_infer(client, model, x, binary, token):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = None
    if not binary:
        outputs = [
            httpclient.InferRequestedOutput("logits", binary_data=False),
            httpclient.InferRequestedOutput("predictions", binary_data=False),
        ]
    r = client.infer(model, [inp], outputs=outputs, headers=headers(token))
    return r.get_response()["model_version"], r.as_numpy("logits"), r.as_numpy("predictions")


def grpc_infer(client, model, x, token):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = client.infer(model, [inp], headers=headers(token))
    return r.get_response().model_version, r.as_numpy("logits"), r.as_numpy("predictions")


def compare(got_logits, got_preds, want):
    return {
        "bitwise": bool(
            got_logits.shape == want.shape
            and np.array_equal(got_logits.view(np.uint32), want.view(np.uint32))
        ),
        "max_abs_diff": float(np.max(np.abs(got_logits - want))) if got_logits.shape == want.shape else None,
        "predictions": bool(np.array_equal(got_preds, want.argmax(axis=1))),
    }


def eval_rows(n):
    data = load_file(os.path.join(os.path.dirname(__file__), "..", "examples", "digits", "data", "eval-00000.safetensors"))
    return np.ascontiguousarray(data["x"][:n].astype(np.float32))


def inputs_of(metadata):
    """A model's inputs from HTTP (JSON) or gRPC (protobuf) metadata, as JSON."""
    if isinstance(metadata, dict):
        inputs = metadata["inputs"]
        return [{"name": i["name"], "datatype": i["datatype"], "shape": list(i["shape"])} for i in inputs]
    return [{"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in metadata.inputs]


def serve_checks(a, http, grpc, x, want):
    """Health, model metadata and one request per protocol and encoding,
    compared with PyTorch: the result's "http", "grpc" and "modes"."""
    h = headers(a.token)
    result = {"modes": {}}
    for name, client in [("http", http), ("grpc", grpc)]:
        result[name] = {
            "live": bool(client.is_server_live(headers=h)),
            "server_ready": bool(client.is_server_ready(headers=h)),
            "model_ready": bool(client.is_model_ready(a.model, headers=h)),
            "metadata_inputs": inputs_of(client.get_model_metadata(a.model, headers=h)),
        }
    for mode in ["http_binary", "http_json", "grpc"]:
        if mode == "grpc":
            version, logits, preds = grpc_infer(grpc, a.model, x, a.token)
        else:
            version, logits, preds = http_infer(http, a.model, x, mode == "http_binary", a.token)
        result["modes"][mode] = {"version": version, **compare(logits, preds, want)}
    return result


def roundtrip(a):
    forward = load_net(a.weights, a.layers)
    x = eval_rows(a.rows)
    want = expected_logits(forward, x, a.batch)
    http = httpclient.InferenceServerClient(a.url)
    grpc = grpcclient.InferenceServerClient(a.url)
    result = serve_checks(a, http, grpc, x, want)

    # Concurrent requests of different sizes batch together on the server;
    # each answer must still equal its rows computed alone.
    failures, mismatches, answered = [], [], [0]
    lock = threading.Lock()

    def worker(k):
        client = httpclient.InferenceServerClient(a.url) if k % 2 == 0 else grpcclient.InferenceServerClient(a.url)
        for j in range(10):
            start = (k * 10 + j) % (len(x) - 5)
            rows = x[start : start + 1 + (k + j) % 5]
            try:
                if k % 2 == 0:
                    _, logits, preds = http_infer(client, a.model, rows, True, a.token)
                else:
                    _, logits, preds = grpc_infer(client, a.model, rows, a.token)
            except Exception as e:  # noqa: BLE001 - reported, the test fails on it
                with lock:
                    failures.append(repr(e))
                continue
            c = compare(logits, preds, want[start : start + len(rows)])
            with lock:
                answered[0] += 1
                if not (c["bitwise"] and c["predictions"]):
                    mismatches.append({"worker": k, "request": j, **c})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result["concurrent"] = {"answered": answered[0], "failures": failures[:5], "mismatches": mismatches[:5]}
    print(json.dumps(result))


def https_client(url, ca):
    """tritonclient.http over HTTPS; `ca` None trusts only the default roots."""
    if ca is None:
        return httpclient.InferenceServerClient(url, ssl=True)
    return httpclient.InferenceServerClient(
        url, ssl=True, ssl_options={"ca_certs": ca}, ssl_context_factory=gevent.ssl.create_default_context
    )


def grpcs_client(url, ca):
    """tritonclient.grpc over TLS; `ca` None trusts only gRPC's default roots."""
    return grpcclient.InferenceServerClient(url, ssl=True, root_certificates=ca)


def refusal(call):
    """The error of a call that must fail, or None if it succeeded."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported, the test checks the message
        return f"{type(e).__name__}: {e}"
    return None


def refusals(url, ca):
    """How a server-liveness call over each protocol fails (None: it did not)."""
    return {
        "http": refusal(lambda: https_client(url, ca).is_server_live()),
        "grpc": refusal(lambda: grpcs_client(url, ca).is_server_live(client_timeout=30)),
    }


def tls(a):
    forward = load_net(a.weights, a.layers)
    x = eval_rows(a.rows)
    want = expected_logits(forward, x, a.batch)
    result = serve_checks(a, https_client(a.url, a.ca), grpcs_client(a.url, a.ca), x, want)

    # Verification is real: without the CA, and with the CA but by a name
    # the certificate does not hold (its address, not `localhost`), the
    # handshake fails before any request.
    port = a.url.rsplit(":", 1)[1]
    result["untrusted"] = refusals(a.url, None)
    result["wrong_name"] = refusals(f"127.0.0.1:{port}", a.ca)
    print(json.dumps(result))


def load(a):
    x = eval_rows(3)
    want = {}
    for item in a.versions.split(","):
        version, path = item.split("=", 1)
        want[version] = expected_logits(load_net(path, a.layers), x, a.batch)
    answers, failures, mismatches = {}, [], []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(k):
        use_grpc = k % 2 == 1
        client = grpcclient.InferenceServerClient(a.url) if use_grpc else httpclient.InferenceServerClient(a.url)
        while not stop.is_set():
            try:
                if use_grpc:
                    version, logits, preds = grpc_infer(client, a.model, x, a.token)
                else:
                    version, logits, preds = http_infer(client, a.model, x, True, a.token)
            except Exception as e:  # noqa: BLE001 - counted, the test fails on it
                with lock:
                    failures.append(repr(e))
                continue
            ok = version in want and compare(logits, preds, want[version])["bitwise"]
            with lock:
                answers[version] = answers.get(version, 0) + 1
                if not ok:
                    mismatches.append(version)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(a.threads)]
    for t in threads:
        t.start()
    print("started", flush=True)
    while not os.path.exists(a.stop_file):
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps({"answers": answers, "failures": len(failures), "first_failures": failures[:5],
                      "mismatches": len(mismatches)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["roundtrip", "tls", "load"])
    p.add_argument("--url", required=True, help="HOST:PORT (tls: the name the certificate holds)")
    p.add_argument("--model", default="digits")
    p.add_argument("--weights", help="safetensors of the served version (roundtrip, tls)")
    p.add_argument("--ca", help="PEM file of the CA that signed the server's certificate (tls)")
    p.add_argument("--versions", help="VERSION=WEIGHTS,... (load)")
    p.add_argument("--layers", type=int, default=3, help="linear layers of the MLP")
    p.add_argument("--batch", type=int, required=True, help="the server's --max-batch-size")
    p.add_argument("--rows", type=int, default=37)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--stop-file")
    p.add_argument("--token")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("KILN_TEST_TORCH_THREADS", torch.get_num_threads())))
    {"roundtrip": roundtrip, "tls": tls, "load": load}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())

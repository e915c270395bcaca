#!/usr/bin/env python3
"""Client side of tests/serve_lm.rs: drives `kiln serve` serving a language
model, as a Python user would, and checks its answers against PyTorch
running the same weights (scripts/kiln_gpt.py on `kiln ckpt export` output).

- OIP `infer` on INT64 `input_ids` with the unmodified tritonclient (HTTP
  binary, HTTP JSON, gRPC): the `logits` output is [batch, vocab] and equals
  PyTorch's logits of each sequence's last position within 1e-4;
  `predictions` is their argmax.
- Triton's generate extension with plain `urllib` (no client library has
  it): greedy generation equals PyTorch's greedy loop (the first token
  exactly; later tokens up to a near-tie in PyTorch's logits), and
  `/generate_stream`'s server-sent events add up to `/generate`'s text.

Prints one JSON object on its last stdout line.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

import numpy as np
import torch

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def load_model(args):
    sys.path.insert(0, args.repo + "/scripts")
    from kiln_gpt import GPT
    from safetensors.torch import load_file

    state = {k.removeprefix("model/"): v for k, v in load_file(args.weights).items()}
    model = GPT(
        vocab=args.vocab,
        seq_len=args.seq_len,
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
    )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def torch_next_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids))[:, -1, :].numpy()


def post(url, body, token):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("content-type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read().decode()


def headers(token):
    return {"authorization": f"Bearer {token}"} if token else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--n-layer", type=int, required=True)
    p.add_argument("--n-head", type=int, required=True)
    p.add_argument("--d-model", type=int, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--token", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args)
    report = {}

    # OIP infer on token ids: batches of several lengths, up to the context.
    rng = np.random.default_rng(7)
    http = httpclient.InferenceServerClient(args.url)
    grpc = grpcclient.InferenceServerClient(args.url)
    worst = 0.0
    checked = 0
    for batch, length in [(1, 1), (3, 5), (2, args.seq_len)]:
        ids = rng.integers(0, args.vocab, size=(batch, length), dtype=np.int64)
        want = torch_next_logits(model, ids)
        answers = []
        for binary in (True, False):
            i = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
            i.set_data_from_numpy(ids, binary_data=binary)
            outputs = [
                httpclient.InferRequestedOutput("logits", binary_data=binary),
                httpclient.InferRequestedOutput("predictions", binary_data=binary),
            ]
            r = http.infer(args.model, [i], outputs=outputs, headers=headers(args.token))
            answers.append((r.as_numpy("logits"), r.as_numpy("predictions")))
        i = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
        i.set_data_from_numpy(ids)
        r = grpc.infer(args.model, [i], headers=headers(args.token))
        answers.append((r.as_numpy("logits"), r.as_numpy("predictions")))
        for logits, predictions in answers:
            assert logits.shape == (batch, args.vocab), logits.shape
            assert logits.dtype == np.float32
            worst = max(worst, float(np.abs(logits - want).max()))
            assert (predictions == logits.argmax(axis=1)).all(), (predictions, logits.argmax(axis=1))
            checked += 1
    assert worst < 1e-4, f"logits differ from PyTorch by up to {worst}"
    report["infer_checked"] = checked
    report["infer_max_abs_diff"] = worst

    # Generate, greedy: PyTorch's greedy loop over the whole sequence (no
    # cache) must give the same tokens, unless two logits nearly tie.
    base = f"http://{args.url}/v2/models/{args.model}"
    body = {"text_input": args.prompt, "parameters": {"max_tokens": 12, "temperature": 0}}
    status, ctype, text = post(base + "/generate", body, args.token)
    assert status == 200, (status, text)
    assert ctype.startswith("application/json"), ctype
    greedy = json.loads(text)["text_output"]
    prompt = list(args.prompt.encode())  # byte-level tokenizer: ids are bytes
    seq = list(prompt)
    expected = []
    with torch.no_grad():
        while len(expected) < 12 and len(seq) <= args.seq_len:
            logits = model(torch.tensor([seq]))[0, -1]
            top = torch.topk(logits, 2)
            token = int(torch.argmax(logits))
            expected.append((token, float(top.values[0] - top.values[1])))
            seq.append(token)
            if len(seq) > args.seq_len:
                break
    got = list(greedy.encode("utf-8"))
    assert got[0] == expected[0][0], f"first greedy token {got[0]}, PyTorch's argmax {expected[0][0]}"
    for n, (token, gap) in enumerate(expected):
        if token >= 128:
            break  # not ASCII: the text holds a decoded character, not the byte
        if n >= len(got) or got[n] != token:
            assert gap < 1e-3, f"greedy token {n}: kiln {got[n:n+1]}, PyTorch {token} (margin {gap})"
            break
    report["greedy"] = greedy

    # The same request, streamed: the events add up to the same text.
    sampled = {"text_input": args.prompt, "parameters": {"max_tokens": 10, "temperature": 1.0, "seed": 11}}
    _, _, whole = post(base + "/generate", sampled, args.token)
    whole = json.loads(whole)["text_output"]
    status, ctype, events = post(base + "/generate_stream", sampled, args.token)
    assert status == 200 and ctype.startswith("text/event-stream"), (status, ctype)
    pieces = []
    for event in events.split("\n\n"):
        if not event:
            continue
        assert event.startswith("data: "), event
        data = json.loads(event[len("data: ") :])
        assert "error" not in data, data
        assert data["model_name"] == args.model
        pieces.append(data["text_output"])
    assert "".join(pieces) == whole, (pieces, whole)
    report["stream_events"] = len(pieces)

    # A bad request is a 400 with the protocol's error object.
    status, _, text = post(base + "/generate", {"text_input": args.prompt, "parameters": {"top_k": 0}}, args.token)
    assert status == 400 and "top_k" in json.loads(text)["error"], (status, text)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

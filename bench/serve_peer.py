"""The FastAPI + uvicorn + PyTorch peer of `kiln serve` for the serving benchmark (bench/serve.py).

Serves one model, loaded from the safetensors file `kiln ckpt export` wrote of
the checkpoint kiln serves, over the Open Inference Protocol v2 JSON endpoints
`kiln serve` answers:

    POST /v2/models/{name}/infer
      MLP: {"inputs":[{"name":"input","shape":[n,F],"datatype":"FP32","data":[...]}]}
      GPT: {"inputs":[{"name":"input_ids","shape":[n,t],"datatype":"INT64","data":[...]}]}
      -> outputs `logits` (FP32 [n, classes or vocab]; a GPT's are the next-token
         logits after each sequence's last token) and `predictions` (INT64 [n])
    GET  /v2/health/ready          200 once the model is loaded
    GET  /v2/health/live

Tuned the way a FastAPI user who cares about latency would write it:

- uvicorn with uvloop and httptools (asked for explicitly; both come with
  `uvicorn[standard]`), one worker process per core the server is given
  (`--workers`), access log off;
- `torch.set_num_threads(--threads)` in every worker (default 1: one worker
  per core, no intra-op threads fighting over the cores), the forward pass
  under `torch.inference_mode()`, three warm-up passes before the worker
  takes traffic;
- the handler reads the raw body and parses it with orjson when it is
  installed (else the standard json module), skipping pydantic validation
  and FastAPI's `jsonable_encoder`, and answers a pre-serialised `Response`
  (orjson with numpy serialisation, else `json.dumps` of `.tolist()`);
- an `async def` handler running the forward pass inline: with one intra-op
  thread per worker and one worker per core, a thread pool adds a hop and no
  compute;
- a GPT computes the final layer norm and the tied output projection only
  at the last position (what is answered), with the blocks of
  `scripts/kiln_gpt.py` (the PyTorch twin of kiln's GPT).

Refuses malformed input with the protocol's `{"error": ...}` (400/404). The
`outputs` field of a request selects outputs by name, as kiln does;
binary tensor data is not supported (FastAPI users rarely implement it).

usage:
    python bench/serve_peer.py --weights W.safetensors --kind mlp [--model mlp] [--port 8001] [--workers 1] [--threads 1]
    python bench/serve_peer.py --weights W.safetensors --kind gpt --gpt-config '{"vocab":256,...}'

The app is built at import from KILN_PEER_* environment variables, because
`uvicorn --workers N` imports it anew in every worker process; the command
line sets them. The harness polls /v2/health/ready to know when it is up, and
GET /peer/settings tells it what the peer runs with.
"""

import argparse
import json
import os
import sys

MODEL_PREFIX = "model/"  # `kiln ckpt export` names the weights model/fc0.weight, ...


def load_state(path):
    from safetensors.torch import load_file

    tensors = load_file(path)
    return {(k[len(MODEL_PREFIX) :] if k.startswith(MODEL_PREFIX) else k): v for k, v in tensors.items()}


def load_mlp(path):
    """The MLP whose weights `path` holds: layers fc0..fcK in order, sizes from the weights.
    Returns (forward(x [n, F] float32) -> logits, input name, dtype, features)."""
    import torch

    state = load_state(path)
    layers = 0
    while f"fc{layers}.weight" in state:
        layers += 1
    if layers == 0:
        raise SystemExit(f"serve_peer: {path} holds no fc0.weight (names: {sorted(state)[:8]})")
    sizes = [state["fc0.weight"].shape[1]] + [state[f"fc{i}.weight"].shape[0] for i in range(layers)]

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(layers):
                setattr(self, f"fc{i}", torch.nn.Linear(sizes[i], sizes[i + 1]))

        def forward(self, x):
            for i in range(layers):
                x = getattr(self, f"fc{i}")(x)
                if i + 1 < layers:
                    x = torch.relu(x)
            return x

    net = MLP()
    net.load_state_dict(state, strict=True)  # every parameter present, nothing extra
    net.eval()
    return net, "input", torch.float32, sizes[0]


def load_gpt(path, config):
    """scripts/kiln_gpt.py's GPT with the weights `path` holds. The forward pass
    returns the next-token logits [n, vocab] after each sequence's last token."""
    import torch
    import torch.nn.functional as F

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(repo, "scripts"))
    from kiln_gpt import GPT

    gpt = GPT(**config)
    gpt.load_state_dict(load_state(path), strict=True)
    gpt.eval()

    def next_logits(tokens):
        _, t = tokens.shape
        x = gpt.wte(tokens)
        if gpt.wpe is not None:
            x = x + gpt.wpe(torch.arange(t, dtype=torch.long))
        for block in gpt.h:
            x = block(x, gpt.rope)
        return F.linear(gpt.ln_f(x[:, -1, :]), gpt.wte.weight)

    return next_logits, "input_ids", torch.int64, config["seq_len"]


def create_app():
    """The FastAPI app, configured from KILN_PEER_* environment variables."""
    import numpy as np
    import torch
    from fastapi import FastAPI, Request, Response

    try:
        import orjson

        def loads(b):
            return orjson.loads(b)

        def dumps(obj):
            return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

        json_lib = f"orjson {orjson.__version__}"
    except ImportError:
        orjson = None

        def loads(b):
            return json.loads(b)

        def dumps(obj):
            return json.dumps(obj, separators=(",", ":")).encode()

        json_lib = "json (stdlib; orjson not installed)"

    weights = os.environ.get("KILN_PEER_WEIGHTS")
    if not weights:
        raise SystemExit("serve_peer: KILN_PEER_WEIGHTS is not set (run bench/serve_peer.py --weights FILE)")
    model_name = os.environ.get("KILN_PEER_MODEL", "mlp")
    kind = os.environ.get("KILN_PEER_KIND", "mlp")
    threads = int(os.environ.get("KILN_PEER_THREADS", "1"))
    if threads > 0:
        torch.set_num_threads(threads)
    vocab = None
    if kind == "gpt":
        config = json.loads(os.environ["KILN_PEER_GPT_CONFIG"])
        net, input_name, dtype, width = load_gpt(weights, config)
        datatype, np_dtype, vocab = "INT64", np.int64, config["vocab"]
    else:
        net, input_name, dtype, width = load_mlp(weights)
        datatype, np_dtype = "FP32", np.float32
    warm = torch.zeros(1, width, dtype=dtype)
    with torch.inference_mode():  # warm up, as kiln does before taking traffic
        for _ in range(3):
            net(warm)
    settings = {
        "kind": kind,
        "model": model_name,
        "pid": os.getpid(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "json": json_lib,
        "inference_mode": True,
    }

    app = FastAPI(title="kiln benchmark peer", openapi_url=None, docs_url=None, redoc_url=None)

    def error(status, message):
        return Response(dumps({"error": message}), status_code=status, media_type="application/json")

    @app.get("/v2/health/live")
    async def live():
        return {}

    @app.get("/v2/health/ready")
    async def ready():
        return {}

    @app.get("/peer/settings")
    async def peer_settings():
        return settings

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        if name != model_name:
            return error(404, f"model '{name}' is not served (only '{model_name}')")
        try:
            body = loads(await request.body())
            inputs = body["inputs"]
        except (ValueError, KeyError, TypeError) as err:
            return error(400, f"malformed request: {err}")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            return error(400, f"inputs: expected 1 input '{input_name}'")
        given = inputs[0]
        if given.get("name") != input_name or given.get("datatype") != datatype:
            return error(400, f"inputs[0]: expected name '{input_name}' and datatype {datatype}")
        shape = given.get("shape")
        if kind == "gpt":
            shape_ok = isinstance(shape, list) and len(shape) == 2 and shape[0] >= 1 and 1 <= shape[1] <= width
        else:
            shape_ok = isinstance(shape, list) and len(shape) == 2 and shape[0] >= 1 and shape[1] == width
        if not shape_ok:
            return error(400, f"inputs[0].shape: {shape} does not fit the model")
        try:
            x = np.asarray(given["data"], dtype=np_dtype).reshape(shape)
        except (KeyError, ValueError, TypeError) as err:
            return error(400, f"inputs[0].data: {err}")
        if vocab is not None and (x.min() < 0 or x.max() >= vocab):
            return error(400, f"inputs[0].data: token ids must be in 0..{vocab - 1}")
        with torch.inference_mode():
            logits = net(torch.from_numpy(x))
            predictions = logits.argmax(dim=1)
        logits, predictions = logits.numpy(), predictions.numpy()
        if orjson is None:
            logits_data, predictions_data = logits.ravel().tolist(), predictions.tolist()
        else:
            logits_data, predictions_data = logits.ravel(), predictions
        outputs = [
            {"name": "logits", "datatype": "FP32", "shape": list(logits.shape), "data": logits_data},
            {"name": "predictions", "datatype": "INT64", "shape": list(predictions.shape), "data": predictions_data},
        ]
        wanted = body.get("outputs")
        if wanted:
            names = {o.get("name") for o in wanted if isinstance(o, dict)}
            unknown = names - {"logits", "predictions"}
            if unknown:
                return error(400, f"outputs: unknown {sorted(unknown)} (logits, predictions)")
            outputs = [o for o in outputs if o["name"] in names]
        response = {"model_name": model_name, "model_version": "1", "outputs": outputs}
        if "id" in body:
            response["id"] = body["id"]
        return Response(dumps(response), media_type="application/json")

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="safetensors file from `kiln ckpt export`")
    parser.add_argument("--kind", choices=["mlp", "gpt"], default="mlp")
    parser.add_argument("--gpt-config", help="JSON: GPT(**config) of scripts/kiln_gpt.py (with --kind gpt)")
    parser.add_argument("--model", default="mlp", help="the model name in the URL (default: mlp)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1); one per core")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (0: torch's default)")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be at least 1 (got {args.workers})")
    if not os.path.isfile(args.weights):
        parser.error(f"--weights: no such file: {args.weights}")
    if args.kind == "gpt" and not args.gpt_config:
        parser.error("--kind gpt needs --gpt-config")
    os.environ["KILN_PEER_WEIGHTS"] = os.path.abspath(args.weights)
    os.environ["KILN_PEER_MODEL"] = args.model
    os.environ["KILN_PEER_KIND"] = args.kind
    os.environ["KILN_PEER_THREADS"] = str(args.threads)
    if args.gpt_config:
        os.environ["KILN_PEER_GPT_CONFIG"] = args.gpt_config

    import uvicorn

    # An import string, so that `--workers N` can import the app in each worker.
    uvicorn.run(
        "serve_peer:app",
        app_dir=os.path.dirname(os.path.abspath(__file__)),
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
elif os.environ.get("KILN_PEER_WEIGHTS"):
    # Imported by uvicorn as `serve_peer:app`, in this process or in each worker.
    app = create_app()

"""The FastAPI + uvicorn peer of `kiln serve` for the serving benchmark (bench/serve.py).

Serves one MLP, loaded from a safetensors file that `kiln ckpt export` wrote,
over the same Open Inference Protocol v2 JSON endpoints `kiln serve` answers:

    POST /v2/models/{name}/infer   {"inputs":[{"name":"input","shape":[n,F],"datatype":"FP32","data":[...]}]}
                                   -> outputs `logits` (FP32 [n, classes]) and `predictions` (INT64 [n])
    GET  /v2/health/ready          200 once the model is loaded
    GET  /v2/health/live

Written the way a FastAPI user would write it: pydantic request models, a
`torch.nn.Module` with the same layer names as kiln's MLP (`fc0`, `fc1`, ...,
Linear + ReLU, no activation after the last layer), `torch.inference_mode()`
and an `async def` handler that runs the forward pass inline (a sub-millisecond
forward gains nothing from FastAPI's thread pool, which a plain `def` handler
would hop to on every request). Served by uvicorn with its defaults (uvloop and
httptools, installed by `uvicorn[standard]`), access log off (kiln logs no
line per request either).

usage:
    python bench/serve_peer.py --weights W.safetensors [--model digits] [--port 8001] [--workers 1]

The app is built at import from environment variables (`KILN_PEER_WEIGHTS`,
`KILN_PEER_MODEL`, `KILN_PEER_THREADS`), because `uvicorn --workers N` imports
it anew in every worker process; the command line sets them. The harness polls
/v2/health/ready to know when it is up.
"""

import argparse
import os

MODEL_PREFIX = "model/"  # `kiln ckpt export` names the weights model/fc0.weight, ...


def load_mlp(path):
    """The MLP whose weights `path` holds: layers fc0..fcK in order, sizes from the weights."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(path)
    state = {(k[len(MODEL_PREFIX) :] if k.startswith(MODEL_PREFIX) else k): v for k, v in tensors.items()}
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
    return net, sizes[0], sizes[-1]


def create_app():
    """The FastAPI app, configured from KILN_PEER_* environment variables."""
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel

    weights = os.environ.get("KILN_PEER_WEIGHTS")
    if not weights:
        raise SystemExit("serve_peer: KILN_PEER_WEIGHTS is not set (run bench/serve_peer.py --weights FILE)")
    model_name = os.environ.get("KILN_PEER_MODEL", "digits")
    threads = int(os.environ.get("KILN_PEER_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    net, features, classes = load_mlp(weights)
    with torch.inference_mode():  # warm up, as kiln does before taking traffic
        for _ in range(3):
            net(torch.zeros(1, features))

    class InferInput(BaseModel):
        name: str
        shape: list[int]
        datatype: str
        data: list[float]  # flat, row-major
        parameters: dict | None = None

    class InferRequest(BaseModel):
        id: str | None = None
        inputs: list[InferInput]
        outputs: list[dict] | None = None
        parameters: dict | None = None

    app = FastAPI(title="kiln benchmark peer")

    def error(status, message):
        return JSONResponse(status_code=status, content={"error": message})

    @app.get("/v2/health/live")
    async def live():
        return {}

    @app.get("/v2/health/ready")
    async def ready():
        return {}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: InferRequest):
        if name != model_name:
            return error(404, f"model '{name}' is not served (only '{model_name}')")
        if len(request.inputs) != 1:
            return error(400, f"inputs: expected 1 input 'input', got {len(request.inputs)}")
        given = request.inputs[0]
        if given.name != "input" or given.datatype != "FP32":
            return error(400, f"inputs[0]: expected name 'input' and datatype FP32, got '{given.name}' {given.datatype}")
        if len(given.shape) != 2 or given.shape[1] != features or given.shape[0] < 1:
            return error(400, f"inputs[0].shape: expected [n, {features}] with n >= 1, got {given.shape}")
        rows = given.shape[0]
        if len(given.data) != rows * features:
            return error(400, f"inputs[0].data: expected {rows * features} values for shape {given.shape}, got {len(given.data)}")
        x = torch.tensor(given.data, dtype=torch.float32).reshape(rows, features)
        with torch.inference_mode():
            logits = net(x)
            predictions = logits.argmax(dim=1)
        response = {
            "model_name": model_name,
            "model_version": "1",
            "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": [rows, classes], "data": logits.flatten().tolist()},
                {"name": "predictions", "datatype": "INT64", "shape": [rows], "data": predictions.tolist()},
            ],
        }
        if request.id is not None:
            response["id"] = request.id
        return response

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="safetensors file from `kiln ckpt export`")
    parser.add_argument("--model", default="digits", help="the model name in the URL (default: digits)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1, uvicorn's default)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads per worker (0: torch's default)")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be at least 1 (got {args.workers})")
    if not os.path.isfile(args.weights):
        parser.error(f"--weights: no such file: {args.weights}")
    os.environ["KILN_PEER_WEIGHTS"] = os.path.abspath(args.weights)
    os.environ["KILN_PEER_MODEL"] = args.model
    os.environ["KILN_PEER_THREADS"] = str(args.threads)

    import uvicorn

    # An import string, so that `--workers N` can import the app in each worker.
    uvicorn.run(
        "serve_peer:app",
        app_dir=os.path.dirname(os.path.abspath(__file__)),
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
elif os.environ.get("KILN_PEER_WEIGHTS"):
    # Imported by uvicorn as `serve_peer:app`, in this process or in each worker.
    app = create_app()

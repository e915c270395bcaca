"""Sends the digits held-out set to a running `kiln serve` over the Open
Inference Protocol (REST, JSON) and prints one answer and the accuracy.

usage: demo_infer.py URL MODEL EVAL_SAFETENSORS
"""

import json
import sys
import urllib.request

from safetensors.numpy import load_file


def infer(url: str, model: str, rows) -> list:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [len(rows), len(rows[0])],
                "datatype": "FP32",
                "data": [float(v) for row in rows for v in row],
            }
        ],
        "outputs": [{"name": "predictions"}],
    }
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    outputs = {o["name"]: o for o in answer["outputs"]}
    return answer.get("model_version", "?"), outputs["predictions"]["data"]


def main() -> None:
    url, model, path = sys.argv[1], sys.argv[2], sys.argv[3]
    data = load_file(path)
    x, y = data["x"], data["y"]
    version, first = infer(url, model, x[:1].tolist())
    print(f"request: one 8x8 digit (label {int(y[0])}) -> {model} version {version} answers {int(first[0])}")
    _, predictions = infer(url, model, x.tolist())
    correct = sum(int(p) == int(t) for p, t in zip(predictions, y))
    print(f"held-out accuracy through the server: {correct}/{len(y)} = {correct / len(y):.4f}")


if __name__ == "__main__":
    main()

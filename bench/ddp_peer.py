#!/usr/bin/env python3
"""Data-parallel training throughput of PyTorch DDP (gloo, CPU): the peer of
`kiln run bench/mlp.toml --nproc 2 --json`.

It reads the same spec (bench/mlp.toml by default) so that the two sides train
the same thing: an MLP features -> hidden... -> classes with ReLU, synthetic data
(Gaussian inputs labelled by a fixed random linear teacher), the same global
batch split evenly over the ranks, cross-entropy, SGD with the spec's lr and
momentum, `threads_per_worker` intra-op threads per rank, the same steps.
DDP runs with its defaults (25 MiB buckets, gradients averaged).

samples/s is measured like kiln: global_batch * (steps - 1) / time from the end
of step 1 to the end of the last step (the slowest rank's time). Rank 0 prints
one JSON line on stdout; progress goes to stderr.
"""

import argparse
import json
import os
import socket
import sys
import time
import tomllib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from common import pin_rank

DEFAULT_SPEC = Path(__file__).resolve().parent / "mlp.toml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="kiln job spec to mirror (default: bench/mlp.toml)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: the spec's workers.nproc)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the spec's train.steps)")
    p.add_argument("--pin", action="store_true",
                   help="pin rank r to its own run of --threads cores when the ranks fill the allowed cores "
                        "(as kiln's [workers] cpu_affinity = auto)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="samples per step over all ranks (default: the spec's train.global_batch)")
    return p.parse_args(argv)


def load_config(args):
    spec = tomllib.loads(args.spec.read_text())
    model, data, train = spec["model"], spec["data"], spec.get("train", {})
    opt, workers = spec.get("optimizer", {}), spec.get("workers", {})
    if model.get("kind") != "mlp" or data.get("kind") != "synthetic":
        raise SystemExit("ddp_peer.py mirrors only mlp models on synthetic data")
    if opt.get("kind") != "sgd" or opt.get("weight_decay", 0.0) != 0.0:
        raise SystemExit("ddp_peer.py mirrors only SGD without weight decay")
    if spec.get("schedule", {}).get("kind", "constant") != "constant" or spec.get("schedule", {}).get("warmup_steps", 0):
        raise SystemExit("ddp_peer.py mirrors only a constant learning rate")
    cfg = {
        "seed": spec["job"].get("seed", 0),
        "hidden": model.get("hidden", [128]),
        "samples": data.get("samples", 8192),
        "features": data.get("features", 784),
        "classes": data.get("classes") or 10,
        "steps": args.steps or train.get("steps", 100),
        "global_batch": args.global_batch or train.get("global_batch", 64),
        "log_interval": train.get("log_interval", 10),
        "threads": train.get("threads_per_worker") or 1,
        "lr": opt.get("lr", 1e-3),
        "momentum": opt.get("momentum", 0.9),
        "world_size": args.nproc or workers.get("nproc", 1),
        "pin": args.pin,
    }
    if cfg["global_batch"] % cfg["world_size"]:
        raise SystemExit("global_batch must divide evenly over the ranks")
    if cfg["steps"] < 2:
        raise SystemExit("steps must be at least 2 (the first step is not timed)")
    return cfg


def mlp(features, hidden, classes):
    layers, width = [], features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def synthetic(cfg):
    """Gaussian inputs, labels from a fixed random linear teacher (same on every rank)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(cfg["samples"], cfg["features"], generator=g)
    teacher = torch.randn(cfg["features"], cfg["classes"], generator=g)
    y = (x @ teacher).argmax(dim=1)
    return x, y


def worker(rank, port, cfg):
    if cfg["pin"]:
        pin_rank(rank, cfg["world_size"], cfg["threads"])
    torch.set_num_threads(cfg["threads"])
    world = cfg["world_size"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(cfg["seed"])
        net = mlp(cfg["features"], cfg["hidden"], cfg["classes"])
        # One rank (the ceiling runs of bench/ddp.py): a plain module, as its users would train.
        model = DDP(net) if world > 1 else net
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
        x, y = synthetic(cfg)
        per_rank = cfg["global_batch"] // world
        order_gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        order, cursor = torch.randperm(cfg["samples"], generator=order_gen), 0

        start = None
        for step in range(1, cfg["steps"] + 1):
            if cursor + cfg["global_batch"] > cfg["samples"]:  # next epoch, new order
                order, cursor = torch.randperm(cfg["samples"], generator=order_gen), 0
            idx = order[cursor + rank * per_rank : cursor + (rank + 1) * per_rank]
            cursor += cfg["global_batch"]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)

            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()

            if step == 1:
                start = time.perf_counter()
            if rank == 0 and cfg["log_interval"] and step % cfg["log_interval"] == 0:
                print(f"ddp: step {step}/{cfg['steps']} loss {loss.item():.4f}", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - start

        # After the clock stops: slowest rank's time, mean loss of the last step.
        stats = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        final_loss = loss.detach().clone()
        dist.all_reduce(final_loss)
        if rank == 0:
            elapsed = stats.item()
            print(
                json.dumps(
                    {
                        "bench": "ddp",
                        "impl": "ddp-gloo",
                        "samples_per_sec": cfg["global_batch"] * (cfg["steps"] - 1) / elapsed,
                        "steps": cfg["steps"],
                        "world_size": world,
                        "global_batch": cfg["global_batch"],
                        "threads_per_worker": cfg["threads"],
                        "timed_s": elapsed,
                        "final_loss": final_loss.item() / world,
                    }
                ),
                flush=True,
            )
        # Tearing gloo down while the peer may still be in its last collective
        # sometimes aborts a rank ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    cfg = load_config(parse_args())
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(free_port(), cfg), nprocs=cfg["world_size"], join=True)


if __name__ == "__main__":
    sys.exit(main())

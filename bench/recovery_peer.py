#!/usr/bin/env python3
"""torchrun's side of the node-loss recovery benchmark (bench/recovery.py).

Run by torchrun (elastic, c10d rendezvous), one worker per "node":

  torchrun --nnodes=2:3 --nproc-per-node=1 --rdzv-backend=c10d ... \\
      bench/recovery_peer.py --spec SPEC --ckpt-dir DIR --ckpt-every 1

It trains the MLP of the spec (bench/mlp.toml's model and data, built by
ddp_peer.py's `mlp` and `synthetic`) with DDP over gloo on CPU at whatever world
size the rendezvous gave it. torchrun restarts every worker on a membership
change, so the only state that survives is the checkpoint: global rank 0 saves
model, optimizer and step with `torch.save` every `--ckpt-every` steps (to a
temporary file, then `os.replace`, so a kill mid-save never leaves a torn file;
no fsync), and every worker starts by loading it when it exists.

The data order does not depend on the world size: the global batch of step s is
a fixed slice of a seeded per-epoch permutation, and rank r of W takes the r-th
of W equal parts. DDP averages gradients, so each step's update is that of the
global batch whatever the world size.

stdout carries one JSON object per line (the format of `kiln agent
--events-json`, plus a "start" event):

  {"event": "start", "node": ..., "rank": ..., "world_size": ..., "restart": ...,
   "resumed_from": STEP, "spawned": T0, "time": T1}
  {"event": "progress", "node": ..., "rank": ..., "world_size": ..., "step": ...,
   "loss": ..., "time": T}

`spawned` is the unix time at which this worker process began (before `import
torch`); "start" is printed once the process group is up and the checkpoint is
loaded; "progress" after each completed step (after its checkpoint, if the step
saves one). The node name comes from KILN_BENCH_NODE.
"""

import time

SPAWNED = time.time()  # before the imports: they cost seconds and belong to recovery

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_peer import load_config, mlp, synthetic  # noqa: E402

CKPT_NAME = "state.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, required=True, help="kiln job spec to mirror (mlp on synthetic data, SGD)")
    p.add_argument("--ckpt-dir", type=Path, required=True, help="folder shared by all nodes for the checkpoint")
    p.add_argument("--ckpt-every", type=int, default=1, help="save a checkpoint every this many steps (default: 1)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the spec's train.steps)")
    args = p.parse_args(argv)
    if args.ckpt_every < 1:
        p.error("--ckpt-every must be at least 1")
    return args


def emit(obj):
    print(json.dumps(obj), flush=True)


def global_batch_indices(step, order_seed, samples, global_batch):
    """Sample indices of step `step` (1-based): a slice of epoch e's permutation.

    Stateless, so a worker resuming at any step draws what an uninterrupted run
    would have drawn, at any world size.
    """
    per_epoch = samples // global_batch
    epoch, offset = divmod(step - 1, per_epoch)
    g = torch.Generator().manual_seed(order_seed + epoch)
    order = torch.randperm(samples, generator=g)
    return order[offset * global_batch : (offset + 1) * global_batch]


def save_checkpoint(path, model, opt, step):
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def main():
    args = parse_args()
    # load_config's divisibility check is made below against the real world size.
    cfg = load_config(argparse.Namespace(spec=args.spec, nproc=1, steps=args.steps))
    torch.set_num_threads(cfg["threads"])
    node = os.environ.get("KILN_BENCH_NODE", "?")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg["global_batch"] % world:
            raise SystemExit(f"train.global_batch {cfg['global_batch']} does not divide over world size {world}")
        per_rank = cfg["global_batch"] // world
        if cfg["samples"] < cfg["global_batch"]:
            raise SystemExit("data.samples must be at least train.global_batch")

        torch.manual_seed(cfg["seed"])
        model = mlp(cfg["features"], cfg["hidden"], cfg["classes"])
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
        ckpt = args.ckpt_dir / CKPT_NAME
        done = 0
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            done = int(state["step"])
        ddp = DDP(model)
        x, y = synthetic(cfg)
        emit({"event": "start", "node": node, "rank": rank, "world_size": world, "restart": restart,
              "resumed_from": done, "spawned": SPAWNED, "time": time.time()})

        for step in range(done + 1, cfg["steps"] + 1):
            idx = global_batch_indices(step, cfg["seed"] + 1, cfg["samples"], cfg["global_batch"])
            idx = idx[rank * per_rank : (rank + 1) * per_rank]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)

            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()
            opt.step()
            if rank == 0 and step % args.ckpt_every == 0:
                save_checkpoint(ckpt, model, opt, step)
            emit({"event": "progress", "node": node, "rank": rank, "world_size": world, "step": step,
                  "loss": loss.item(), "time": time.time()})
        emit({"event": "finished", "node": node, "rank": rank, "world_size": world, "step": cfg["steps"],
              "time": time.time()})
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

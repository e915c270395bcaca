#!/usr/bin/env python3
"""Language-model training throughput of PyTorch (DDP over gloo at world size > 1,
one plain process at world size 1) on CPU: the peer of
`kiln run bench/lm.toml --json`.

It reads the same spec (bench/lm.toml by default) so that the two sides train
the same thing: the GPT of scripts/kiln_gpt.py (kiln's PyTorch twin: same
architecture, parameter names and GPT-2 initialisation) at the spec's vocab,
seq_len, n_layer, n_head and d_model, no dropout; windows of `seq_len` tokens
(targets shifted by one) from the same flat uint16 token file, visited in a
seeded order, a new one each epoch; the same global batch split evenly over
the ranks; AdamW with the spec's lr, betas, eps and weight decay;
`clip_grad_norm_(..., clip_grad_norm)` after backward (so after DDP's
all-reduce, as kiln clips after its own); `threads_per_worker` intra-op
threads per rank (`--threads` overrides it); the same number of steps.

Tuned as its users would run it: gloo process group, `torch.set_num_threads`
per rank, DDP with its default buckets (25 MiB, the first 1 MiB) and
`gradient_as_bucket_view=True`, `zero_grad(set_to_none=True)`, PyTorch's
default AdamW implementation. At world size 1 there is no process group and no
DDP wrapper, as a single-process user would write it.

Throughput is measured like kiln's: global_batch * (steps - 1) / time from the
end of step 1 to the end of the last step (the slowest rank's time); tokens/s
is that times seq_len. Each rank also times the phases of every step after the
first (forward, backward -- which includes DDP's all-reduce wait --, clipping,
optimizer) and rank 0 reports the means. Rank 0 prints one JSON line on
stdout; progress goes to stderr.
"""

import argparse
import json
import os
import socket
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from common import pin_rank

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "scripts"))
from kiln_gpt import GPT  # noqa: E402  (the PyTorch twin of kiln's GPT)

DEFAULT_SPEC = BENCH_DIR / "lm.toml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="kiln job spec to mirror (default: bench/lm.toml)")
    p.add_argument("--train", type=Path, default=None,
                   help="token file (default: the spec's data.train, relative to the spec's folder)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: the spec's workers.nproc)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per rank (default: the spec's)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the spec's train.steps)")
    p.add_argument("--pin", action="store_true",
                   help="pin rank r to its own run of --threads cores when the ranks fill the allowed cores "
                        "(as kiln's [workers] cpu_affinity = auto)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step over all ranks (default: the spec's train.global_batch)")
    return p.parse_args(argv)


def load_config(args):
    spec = tomllib.loads(args.spec.read_text())
    model, data, train = spec["model"], spec["data"], spec.get("train", {})
    opt, workers = spec.get("optimizer", {}), spec.get("workers", {})
    schedule = spec.get("schedule", {})
    if model.get("kind") != "gpt" or data.get("kind") != "tokens":
        raise SystemExit("lm_peer.py mirrors only gpt models on token data")
    if opt.get("kind", "adamw") != "adamw":
        raise SystemExit("lm_peer.py mirrors only AdamW")
    if schedule.get("kind", "constant") != "constant" or schedule.get("warmup_steps", 0):
        raise SystemExit("lm_peer.py mirrors only a constant learning rate")
    if model.get("dropout", 0.0) != 0.0 or train.get("precision", "fp32") != "fp32":
        raise SystemExit("lm_peer.py mirrors only fp32 without dropout")
    if train.get("micro_batch"):
        raise SystemExit("lm_peer.py does not mirror micro-batches")
    token_file = args.train
    if token_file is None:
        files = data.get("train", [])
        if len(files) != 1:
            raise SystemExit("lm_peer.py reads one token file: pass --train")
        token_file = args.spec.resolve().parent / files[0]
    if data.get("token_dtype", "uint16") != "uint16":
        raise SystemExit("lm_peer.py reads uint16 token files")
    cfg = {
        "seed": spec["job"].get("seed", 0),
        "token_file": str(token_file),
        "vocab": model["vocab"],
        "seq_len": data["seq_len"],
        "n_layer": model["n_layer"],
        "n_head": model["n_head"],
        "d_model": model["d_model"],
        "positions": model.get("positions", "learned"),
        "steps": args.steps or train.get("steps", 100),
        "global_batch": args.global_batch or train.get("global_batch", 64),
        "log_interval": train.get("log_interval", 10),
        "threads": args.threads or train.get("threads_per_worker") or 1,
        "clip": train.get("clip_grad_norm"),
        "lr": opt.get("lr", 1e-3),
        "betas": (opt.get("beta1", 0.9), opt.get("beta2", 0.999)),
        "eps": opt.get("eps", 1e-8),
        "weight_decay": opt.get("weight_decay", 0.0),
        "world_size": args.nproc or workers.get("nproc", 1),
        "pin": args.pin,
    }
    if cfg["global_batch"] % cfg["world_size"]:
        raise SystemExit("global_batch must divide evenly over the ranks")
    if cfg["steps"] < 2:
        raise SystemExit("steps must be at least 2 (the first step is not timed)")
    return cfg


class Windows:
    """Non-overlapping windows of `seq_len` tokens from one flat token file, in a
    seeded order that changes every epoch, each epoch cut at a seeded offset
    within the tokens the windows leave over (as kiln's token data)."""

    def __init__(self, path, seq_len, seed):
        raw = np.fromfile(path, dtype="<u2")
        self.tokens = torch.from_numpy(raw.astype(np.int64))
        self.seq_len = seq_len
        self.count = (len(raw) - 1) // seq_len
        if self.count < 1:
            raise SystemExit(f"{path}: {len(raw)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.slack = (len(raw) - 1) - self.count * seq_len
        self.seed = seed
        self.epoch = None
        self.arange = torch.arange(seq_len)

    def _order(self, epoch):
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.order = torch.randperm(self.count, generator=g)
            self.shift = int(torch.randint(0, self.slack + 1, (1,), generator=g))
            self.epoch = epoch

    def batch(self, first, n):
        """Samples first .. first + n of the global order: (tokens, targets), [n, seq_len] int64."""
        starts = []
        for pos in range(first, first + n):
            epoch, index = divmod(pos, self.count)
            self._order(epoch)
            starts.append(int(self.order[index]) * self.seq_len + self.shift)
        idx = torch.tensor(starts).unsqueeze(1) + self.arange
        return self.tokens[idx], self.tokens[idx + 1]


def worker(rank, port, cfg):
    if cfg["pin"]:
        pin_rank(rank, cfg["world_size"], cfg["threads"])
    torch.set_num_threads(cfg["threads"])
    world = cfg["world_size"]
    distributed = world > 1
    if distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(cfg["seed"])
        net = GPT(cfg["vocab"], cfg["seq_len"], cfg["n_layer"], cfg["n_head"], cfg["d_model"],
                  dropout=0.0, positions=cfg["positions"])
        net.train()
        model = DDP(net, gradient_as_bucket_view=True) if distributed else net
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"],
                                weight_decay=cfg["weight_decay"])
        data = Windows(cfg["token_file"], cfg["seq_len"], cfg["seed"])
        per_rank = cfg["global_batch"] // world

        phases = {"fwd": 0.0, "bwd": 0.0, "clip": 0.0, "opt": 0.0, "data": 0.0}
        start = None
        for step in range(1, cfg["steps"] + 1):
            t0 = time.perf_counter()
            x, y = data.batch((step - 1) * cfg["global_batch"] + rank * per_rank, per_rank)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = model(x, y)
            t2 = time.perf_counter()
            loss.backward()  # DDP: returns once every bucket's all-reduce is done
            t3 = time.perf_counter()
            if cfg["clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
            t4 = time.perf_counter()
            opt.step()
            t5 = time.perf_counter()

            if step == 1:
                start = t5
            else:
                for name, dt in (("data", t1 - t0), ("fwd", t2 - t1), ("bwd", t3 - t2),
                                 ("clip", t4 - t3), ("opt", t5 - t4)):
                    phases[name] += dt
            if rank == 0 and cfg["log_interval"] and step % cfg["log_interval"] == 0:
                print(f"lm_peer: step {step}/{cfg['steps']} loss {loss.item():.4f}", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - start

        # DDP's own runtime statistics (a private API: sampled at iterations 10,
        # 20, ..., then every 100): mean all-reduce time per backward and how
        # much of it overlapped backward's compute; nanoseconds.
        ddp_ms = None
        if distributed:
            try:
                logged = model._get_ddp_logging_data()
                ddp_ms = {k.removeprefix("avg_"): logged[k] / 1e6 for k in (
                    "avg_forward_compute_time", "avg_backward_compute_time", "avg_backward_comm_time",
                    "avg_backward_compute_comm_overlap_time") if k in logged}
                ddp_ms["bucket_sizes"] = logged.get("rebuilt_bucket_sizes") or logged.get("bucket_sizes")
            except (AttributeError, RuntimeError, KeyError, TypeError):
                ddp_ms = None

        # After the clock stops: slowest rank's time, mean loss of the last step.
        stats = torch.tensor([elapsed], dtype=torch.float64)
        final_loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            dist.all_reduce(final_loss)
        if rank == 0:
            elapsed = stats.item()
            timed = cfg["steps"] - 1
            sps = cfg["global_batch"] * timed / elapsed
            print(json.dumps({
                "bench": "lm",
                "impl": "ddp-gloo" if distributed else "torch",
                "samples_per_sec": sps,
                "tokens_per_sec": sps * cfg["seq_len"],
                "steps": cfg["steps"],
                "world_size": world,
                "threads_per_worker": cfg["threads"],
                "global_batch": cfg["global_batch"],
                "seq_len": cfg["seq_len"],
                "parameters": sum(p.numel() for p in net.parameters()),
                "timed_s": elapsed,
                "step_ms": 1e3 * elapsed / timed,
                "phase_ms": {k: 1e3 * v / timed for k, v in phases.items()},
                "ddp_runtime_ms": ddp_ms,
                "final_loss": final_loss.item() / world,
                "torch": torch.__version__,
            }), flush=True)
        if distributed:
            # Tearing gloo down while the peer may still be in its last collective
            # sometimes aborts a rank ("terminate called without an active exception").
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    cfg = load_config(parse_args())
    if cfg["world_size"] == 1:
        worker(0, None, cfg)
        return 0
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(free_port(), cfg), nprocs=cfg["world_size"], join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""All-reduce bandwidth of PyTorch's gloo backend: the peer of `kiln-bench allreduce`.

Two processes on loopback (world size 2) sum float32 tensors with
`torch.distributed.all_reduce`, following the same protocol as the kiln side
(bench/src/bin/allreduce.rs):

  for each size:
    one checked all-reduce (rank r holds r + 1 everywhere; the sum must be
    world_size * (world_size + 1) / 2), then the buffer is zeroed;
    `warmup` untimed all-reduces;
    `iters` timed all-reduces, each preceded by a 1-element all-reduce so that
    both ranks start together; rank 0 times the big one.
  algbw = size_bytes / median time (GB/s = 1e9 bytes/s, nccl-tests' "algbw").

Rank 0 prints one JSON line per size on stdout; everything else goes to stderr.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="1,16,64", help="comma-separated tensor sizes in MiB (default: 1,16,64)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per size (default: 5)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per size (default: 30)")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes_mib.split(",") if s]
    if not args.sizes or min(args.sizes) <= 0 or args.iters <= 0 or args.warmup < 0:
        p.error("sizes and iters must be positive, warmup non-negative")
    return args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        sync = torch.zeros(1, dtype=torch.float32)
        for mib in args.sizes:
            numel = mib * (1 << 20) // 4
            buf = torch.full((numel,), float(rank + 1), dtype=torch.float32)
            dist.all_reduce(buf)
            expected = WORLD_SIZE * (WORLD_SIZE + 1) / 2
            if not bool((buf == expected).all()):
                raise RuntimeError(f"all-reduce of {mib} MiB: wrong sum (expected {expected})")
            buf.zero_()
            for _ in range(args.warmup):
                dist.all_reduce(buf)
            times = []
            for _ in range(args.iters):
                dist.all_reduce(sync)
                start = time.perf_counter()
                dist.all_reduce(buf)
                times.append(time.perf_counter() - start)
            if rank == 0:
                median = statistics.median(times)
                size_bytes = numel * 4
                print(
                    json.dumps(
                        {
                            "bench": "allreduce",
                            "impl": "gloo",
                            "world_size": WORLD_SIZE,
                            "size_bytes": size_bytes,
                            "warmup": args.warmup,
                            "iters": args.iters,
                            "median_s": median,
                            "min_s": min(times),
                            "max_s": max(times),
                            "algbw_gbps": size_bytes / median / 1e9,
                        }
                    ),
                    flush=True,
                )
    finally:
        dist.destroy_process_group()


def main():
    args = parse_args()
    # Keep gloo on loopback, like the kiln side (otherwise it picks the interface
    # the host name resolves to).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(free_port(), args), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    sys.exit(main())

"""The PyTorch half of the checkpoint side-by-side (bench/ckpt.py runs it).

    ckpt_peer.py save --system torch|dcp|dcp_async --state S.safetensors --out DIR
    ckpt_peer.py load --system torch|dcp|dcp_async --state S.safetensors --out DIR [--verify]

`save` reads the state (a flat dict of named tensors, the same bytes the kiln
side reads) into memory, each tensor in its own storage as a model's and an
optimizer's tensors are, then saves it twice to fresh folders: an untimed
warm-up into DIR.warmup (removed afterwards) and the measured save into DIR.
kiln's side also makes a warm-up save first, so both report a trainer's
steady state rather than its first save.

- torch:     `torch.save(state, DIR/state.pt)`, then fsync of the file and of DIR.
- dcp:       `torch.distributed.checkpoint.save(state, checkpoint_id=DIR)` (single
             process, no process group), then fsync of every file under DIR and of DIR.
- dcp_async: `torch.distributed.checkpoint.async_save(...)`, then the future's
             result, then the same fsyncs.

stall_s is how long the call blocks the caller; durable_s runs from the call
until the fsyncs return. peak_extra_bytes is VmHWM (reset through
/proc/self/clear_refs) over both saves minus VmRSS before them.

For dcp_async, an untimed probe checks whether the checkpoint is a snapshot:
it saves a small tensor asynchronously, overwrites the tensor as soon as the
call returns, and reads back which values were stored (`snapshot_safe`).

`load` times torch.load (weights_only, no mmap) or, for DCP, torch.distributed.
checkpoint.load into a preallocated state of zero-filled tensors (resident, like
a constructed model), and with --verify compares the result with the state
(untimed). Each prints one JSON line on stdout.
"""

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file

# Single-process DCP warns on every call that no process group exists: that is the intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss():
    """Resets VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_state(path):
    """The state in memory: one private, contiguous storage per tensor, sorted by name."""
    raw = load_file(path)
    state = {name: raw[name].clone() for name in sorted(raw)}
    del raw
    gc.collect()
    return state


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """fsyncs every file and directory under `folder` (and `folder`); returns how many."""
    count = 0
    for dirpath, _dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
            count += 1
        fsync_path(dirpath)
        count += 1
    return count


def folder_bytes(folder):
    return sum(
        os.path.getsize(os.path.join(dirpath, name))
        for dirpath, _dirnames, filenames in os.walk(folder)
        for name in filenames
    )


def save_torch(state, folder):
    path = os.path.join(folder, "state.pt")
    started = time.perf_counter()
    torch.save(state, path)
    stall = time.perf_counter() - started
    fsync_path(path)
    fsync_path(folder)
    return stall, time.perf_counter() - started


def save_dcp(state, folder):
    started = time.perf_counter()
    dcp.save(state, checkpoint_id=folder)
    stall = time.perf_counter() - started
    fsync_tree(folder)
    return stall, time.perf_counter() - started


def wait_async(result):
    """The upload future of what async_save returned (a Future, or a response holding one)."""
    upload = getattr(result, "upload_completion", result)
    return upload.result()


def save_dcp_async(state, folder):
    started = time.perf_counter()
    result = dcp.async_save(state, checkpoint_id=folder)
    stall = time.perf_counter() - started
    wait_async(result)
    fsync_tree(folder)
    return stall, time.perf_counter() - started


SAVERS = {"torch": save_torch, "dcp": save_dcp, "dcp_async": save_dcp_async}


def async_snapshot_probe():
    """Whether async_save stores the values a tensor had when the call returned."""
    with tempfile.TemporaryDirectory(prefix="kiln-dcp-probe-") as d:
        x = torch.zeros(1 << 20)
        result = dcp.async_save({"x": x}, checkpoint_id=os.path.join(d, "ckpt"))
        x.fill_(1.0)  # what the next optimizer step would do
        wait_async(result)
        back = {"x": torch.full((1 << 20,), -1.0)}
        dcp.load(back, checkpoint_id=os.path.join(d, "ckpt"))
        return bool((back["x"] == 0).all())


def fresh_folder(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def run_save(args):
    probe = async_snapshot_probe() if args.system == "dcp_async" else None
    state = read_state(args.state)
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    save = SAVERS[args.system]
    gc.collect()
    rss_before = proc_status_bytes("VmRSS")
    peak_reset = reset_peak_rss()
    first = None
    if not args.no_warmup:
        warm = fresh_folder(args.out.rstrip("/") + ".warmup")
        stall, durable = save(state, warm)
        first = {"stall_s": stall, "durable_s": durable}
    out = fresh_folder(args.out)
    stall, durable = save(state, out)
    peak_rss = proc_status_bytes("VmHWM")
    if first is not None:
        shutil.rmtree(args.out.rstrip("/") + ".warmup", ignore_errors=True)
    row = {
        "system": args.system,
        "torch": torch.__version__,
        "state_bytes": state_bytes,
        "tensors": len(state),
        "stall_s": stall,
        "durable_s": durable,
        "first_save": first,
        "bytes_stored": folder_bytes(out),
        "files": sum(len(f) for _d, _s, f in os.walk(out)),
        "rss_before": rss_before,
        "peak_rss": peak_rss,
        "peak_extra_bytes": peak_rss - rss_before if peak_reset else None,
        "threads": torch.get_num_threads(),
    }
    if probe is not None:
        row["snapshot_safe"] = probe
    print(json.dumps(row), flush=True)


def preallocated_like(path):
    """Zero-filled tensors with the state's names, shapes and dtypes (header only)."""
    out = {}
    with safe_open(path, framework="pt") as f:
        for name in sorted(f.keys()):
            s = f.get_slice(name)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                     "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}[s.get_dtype()]
            out[name] = torch.zeros(s.get_shape(), dtype=dtype)
    return out


def run_load(args):
    if args.system == "torch":
        gc.collect()
        rss_before = proc_status_bytes("VmRSS")
        peak_reset = reset_peak_rss()
        started = time.perf_counter()
        loaded = torch.load(os.path.join(args.out, "state.pt"), map_location="cpu", weights_only=True, mmap=False)
        load_s = time.perf_counter() - started
    else:
        loaded = preallocated_like(args.state)
        gc.collect()
        rss_before = proc_status_bytes("VmRSS")
        peak_reset = reset_peak_rss()
        started = time.perf_counter()
        dcp.load(loaded, checkpoint_id=args.out)
        load_s = time.perf_counter() - started
    peak_rss = proc_status_bytes("VmHWM")
    verified = None
    if args.verify:
        state = read_state(args.state)
        if sorted(state) != sorted(loaded):
            raise RuntimeError(f"{args.system}: loaded names differ from the state's")
        for name, want in state.items():
            got = loaded[name]
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                raise RuntimeError(f"{args.system}: loaded tensor {name} differs from the state's")
        verified = True
    print(json.dumps({
        "system": args.system,
        "load_s": load_s,
        "loaded_bytes": sum(t.numel() * t.element_size() for t in loaded.values()),
        "tensors": len(loaded),
        "load_peak_extra_bytes": peak_rss - rss_before if peak_reset else None,
        "verified": verified,
    }), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["save", "load"])
    p.add_argument("--system", choices=sorted(SAVERS), required=True)
    p.add_argument("--state", required=True, help="the state, a safetensors file")
    p.add_argument("--out", required=True, help="checkpoint folder (save: created fresh)")
    p.add_argument("--no-warmup", action="store_true", help="save: skip the warm-up save")
    p.add_argument("--verify", action="store_true", help="load: compare with the state (untimed)")
    args = p.parse_args()
    if args.phase == "save":
        run_save(args)
    else:
        run_load(args)


if __name__ == "__main__":
    main()

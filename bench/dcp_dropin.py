"""shardckpt.integrations.dcp.Writer/Reader against DCP's FileSystemWriter/Reader on the same state, in one run.

    python -m bench.dcp_dropin [--mb 256] [--reps 3] [--dir /tmp] [--threads N]

The state is a training state as dcp.save sees it from a single process: bf16 model weights, fp32 master
weights and AdamW moments (normal * 0.02, moments smaller), plus a few scalars. Each variant saves with
dcp.save(state, storage_writer=...) into a fresh directory (fsync on, as both default to) and loads with
dcp.load into preallocated tensors; after one uncounted warm-up run, the median of --reps runs is reported,
with bytes on disk. Loads are cold (page cache dropped where the machine allows, as in bench.compare):
shardckpt writes its data files with O_DIRECT, so a load right after a save would read DCP's files from the
page cache and shardckpt's from disk.
Prints a table and writes bench/results/dcp_dropin.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import shardckpt
from shardckpt.integrations import dcp as sdcp
from bench.compare import drop_caches


def make_state(mb: int) -> dict:
    """About `mb` MiB: per layer a bf16 weight, its fp32 master copy and two fp32 AdamW moments."""
    g = torch.Generator().manual_seed(0)
    per_layer = 2 + 4 * 3  # bytes per parameter across the four tensors
    params = mb * 2**20 // per_layer
    layers = 8
    rows = max(1, params // layers // 1024)
    model, master, optim = {}, {}, {}
    for i in range(layers):
        w = torch.randn(rows, 1024, generator=g) * 0.02
        model[f"layers.{i}.weight"] = w.to(torch.bfloat16)
        master[f"layers.{i}.weight"] = w
        optim[f"layers.{i}.weight"] = {"exp_avg": torch.randn(rows, 1024, generator=g) * 1e-3,
                                       "exp_avg_sq": (torch.randn(rows, 1024, generator=g) * 1e-4) ** 2,
                                       "step": torch.tensor(1000.0)}
    return {"model": model, "master": master, "optim": {"state": optim, "lr": 3e-4}, "step": 1000}


def empty_like_state(state):
    if isinstance(state, dict):
        return {k: empty_like_state(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    return state


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def check_equal(a, b) -> None:
    if isinstance(a, dict):
        for k in a:
            check_equal(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)


def run_variant(name, writer_fn, reader_fn, state, base: str, reps: int) -> dict:
    saves, loads, size = [], [], 0
    for r in range(reps + 1):  # run 0 warms up (imports, allocator, page cache) and is not counted
        path = os.path.join(base, f"{name}-{r}")
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=writer_fn(path))
        saves.append(time.perf_counter() - t0)
        size = dir_bytes(path)
        target = empty_like_state(state)
        drop_caches()
        t0 = time.perf_counter()
        dcp.load(target, storage_reader=reader_fn(path))
        loads.append(time.perf_counter() - t0)
        check_equal(state, target)
        shutil.rmtree(path)
        if r == 0:
            saves.clear()
            loads.clear()
    return {"variant": name, "save_s": statistics.median(saves), "load_s": statistics.median(loads),
            "bytes_on_disk": size, "save_runs": saves, "load_runs": loads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="DCP FileSystemWriter thread_count (default: CPUs)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    ncpu = len(os.sched_getaffinity(0))
    threads = args.threads or ncpu
    state = make_state(args.mb)
    raw = sum(t.numel() * t.element_size() for t in _tensors(state))
    base = tempfile.mkdtemp(prefix="dcp-bench-", dir=args.dir)
    try:
        variants = [
            ("dcp FileSystemWriter (thread_count=1)", lambda p: dcp.FileSystemWriter(p), dcp.FileSystemReader),
            (f"dcp FileSystemWriter (thread_count={threads})", lambda p: dcp.FileSystemWriter(p, thread_count=threads),
             dcp.FileSystemReader),
            ("shardckpt.dcp Writer (auto codec)", lambda p: sdcp.Writer(p), sdcp.Reader),
            ("shardckpt.dcp Writer (raw codec)", lambda p: sdcp.Writer(p, codec="raw"), sdcp.Reader),
        ]
        results = [run_variant(f"v{i}", w, r, state, base, args.reps) | {"variant": n}
                   for i, (n, w, r) in enumerate(variants)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ref = results[0]
    print(f"state: {raw / 2**20:.0f} MiB raw, {len(list(_tensors(state)))} tensors; {ncpu} CPUs; "
          f"shardckpt backend {shardckpt.backend}; median of {args.reps}")
    print(f"{'variant':44} {'save s':>8} {'load s':>8} {'disk MiB':>9} {'save x':>7} {'load x':>7} {'disk x':>7}")
    for r in results:
        r["save_speedup_vs_dcp"] = ref["save_s"] / r["save_s"]
        r["load_speedup_vs_dcp"] = ref["load_s"] / r["load_s"]
        r["disk_ratio_vs_dcp"] = ref["bytes_on_disk"] / r["bytes_on_disk"]
        print(f"{r['variant']:44} {r['save_s']:8.3f} {r['load_s']:8.3f} {r['bytes_on_disk'] / 2**20:9.1f} "
              f"{r['save_speedup_vs_dcp']:7.2f} {r['load_speedup_vs_dcp']:7.2f} {r['disk_ratio_vs_dcp']:7.2f}")
    out = {"bench": "dcp_dropin", "raw_bytes": raw, "mb": args.mb, "reps": args.reps, "cpus": ncpu,
           "torch": torch.__version__, "backend": shardckpt.backend, "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    dest = Path(__file__).parent / "results" / "dcp_dropin.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps({r["variant"]: {k: round(r[k], 3) for k in ("save_s", "load_s", "save_speedup_vs_dcp",
                                                                  "load_speedup_vs_dcp", "disk_ratio_vs_dcp")}
                      for r in results}, indent=1))


def _tensors(state):
    if isinstance(state, dict):
        for v in state.values():
            yield from _tensors(v)
    elif isinstance(state, torch.Tensor):
        yield state


if __name__ == "__main__":
    main()

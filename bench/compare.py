"""shardckpt vs torch.distributed.checkpoint vs torch.save on one state, side by side in one run.

    python -m bench.compare                       # ~350M-param GPT bf16 + AdamW (about 2.1 GB), 2 ranks -> 3
    python -m bench.compare --params 50M --repeat 5 --only shardckpt,dcp

State: a GPT-style model's parameters and AdamW moments (exp_avg, exp_avg_sq), sharded Shard(0) over the
saving ranks like FSDP2. Each phase runs --repeat times in one set of processes, methods in alternating order,
as a training job saves again and again (warm buffers, clients); reported: per run the slowest rank, then the
best run. Measured per method (barriers around each phase):
  save        sync save until durable (fsync; DCP's FileSystemWriter syncs files too)
  load        cold (page cache dropped when possible), same world size and layout
  reshard     cold, loaded by --load-ws ranks (Shard(0) over the new world)
  full        cold, one process, full tensors
then, per method in a fresh set of processes (what a job meets: its restore is the first load of its
process, its first save the first snapshot): first sync save, first cold load, stall of the first and of
the second async save (a raw shardckpt.async_save, no warm_up, against dcp.async_save) beside a plain copy of
the rank's bytes into a fresh and into a warm buffer. Plus bytes on disk, and the machine's memcpy and disk
write+fsync bandwidth as the physical reference.
Prints a table and writes bench/results/compare.json with the ratios (DCP time / shardckpt time)."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import torch  # noqa: E402

from bench.shapes import gpt_shapes  # noqa: E402,F401 (bench.exchange, s3, tiers, incremental import it from here)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def local_state(shapes, dtype, rank, ws, seed=0):
    """This rank's Shard(0) DTensors of params + AdamW moments, generated shard-locally (no full copies)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    mesh = init_device_mesh("cpu", (ws,))
    state = {"model": {}, "optim": {"state": {}}, "step": 1000}
    for name, shape in shapes.items():
        lshape, off = compute_local_shape_and_global_offset(shape, mesh, [Shard(0)])

        def make(scale, square=False, kind=0):
            x = _rows(name, kind, seed, shape, off[0] if shape else 0, lshape[0] if shape else 1)
            x = x * x * scale if square else x * scale
            return DTensor.from_local(x.to(dtype), mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                      stride=torch.empty(shape, device="meta").stride())
        state["model"][name] = make(0.02)
        state["optim"]["state"][name] = {"exp_avg": make(1e-3, kind=1), "exp_avg_sq": make(1e-6, True, kind=2)}
    return state


ROW_BLOCK = 256


def _rows(name, kind, seed, shape, lo, n):
    """Rows [lo, lo+n) of a deterministic pseudo-random tensor, the same whatever the sharding (generated
    in blocks of ROW_BLOCK rows seeded by (name, kind, block))."""
    if not shape:
        return torch.randn((), generator=torch.Generator().manual_seed(seed))
    inner = tuple(shape[1:])
    parts = []
    for b in range(lo // ROW_BLOCK, -(-(lo + n) // ROW_BLOCK)):
        g = torch.Generator().manual_seed((zlib.crc32(f"{name}/{kind}/{seed}".encode()) + b * 7919) & 0x7FFFFFFF)
        rows = min(ROW_BLOCK, shape[0] - b * ROW_BLOCK)
        parts.append(torch.randn((rows,) + inner, generator=g))
    x = torch.cat(parts) if parts else torch.empty((0,) + inner)
    start = lo - (lo // ROW_BLOCK) * ROW_BLOCK
    return x[start:start + n]


def _zero(state):
    for t in _tensors(state):
        t._local_tensor.zero_()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _timed(fn):
    import torch.distributed as dist
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _fsync_tree(path):
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


# ------------------------------------------------------------------------------------------- per-rank jobs

def _order(methods, r):
    """Methods in alternating order per repeat, so none always pays for going first."""
    return methods if r % 2 == 0 else methods[::-1]


def _save_job(rank, ws, args, root):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import shardckpt
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    state = local_state(shapes, dtype, rank, ws)
    out = {m: [] for m in args["only"]}
    for r in range(args["repeat"]):
        for method in _order(args["only"], r):
            path = os.path.join(root, method)
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
                os.sync()
            dist.barrier()
            if method == "shardckpt":
                out[method].append(_timed(lambda: shardckpt.save(state, path, codec=args["codec"])))
            elif method == "dcp":
                out[method].append(_timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(
                    path, sync_files=True))))
            elif method == "torch":
                def ts():
                    os.makedirs(path, exist_ok=True)
                    f = os.path.join(path, f"rank{rank}.pt")
                    local = {k: (v._local_tensor if hasattr(v, "_local_tensor") else v)
                             for k, v in _flat(state).items()}
                    with open(f, "wb") as fh:
                        torch.save(local, fh)
                        fh.flush()
                        os.fsync(fh.fileno())
                out[method].append(_timed(ts))
    return out


def _flat(state, prefix=""):
    out = {}
    for k, v in state.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _load_job(rank, ws, args, root, same_layout):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import shardckpt
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    state = local_state(shapes, dtype, rank, ws, seed=1)
    ref = local_state(shapes, dtype, rank, ws) if args["check"] else None
    methods = [m for m in args["only"] if same_layout or m != "torch"]
    out = {m: [] for m in methods}
    for r in range(args["repeat"]):
        for method in _order(methods, r):
            path = os.path.join(root, method)
            _zero(state)
            if rank == 0:
                drop_caches()
            dist.barrier()
            if method == "shardckpt":
                out[method].append(_timed(lambda: shardckpt.load(state, path)))
            elif method == "dcp":
                out[method].append(_timed(lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(path))))
            elif method == "torch":
                def tl():
                    local = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=True)
                    for k, v in _flat(state).items():
                        if isinstance(v, torch.Tensor):
                            v._local_tensor.copy_(local[k])
                out[method].append(_timed(tl))
            if ref is not None:
                for a, b in zip(_tensors(state), _tensors(ref)):
                    assert torch.equal(a._local_tensor, b._local_tensor), method
    return out


def _first_job(rank, ws, args, root, method):
    """One method in a fresh set of processes, as a job meets it: its first sync save, first (cold) load,
    and the stalls of its first and second async saves (each waited for before the next)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import shardckpt
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    state = local_state(shapes, dtype, rank, ws)
    path = os.path.join(root, f"first-{method}")
    out = {}
    if method == "shardckpt":
        out["save"] = _timed(lambda: shardckpt.save(state, path, codec=args["codec"]))
    else:
        out["save"] = _timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=True)))
    if rank == 0:
        drop_caches()
    if method == "shardckpt":
        out["load"] = _timed(lambda: shardckpt.load(state, path))  # no warm_up: a raw async_save's first stall
    else:
        out["load"] = _timed(lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(path)))
    for i, name in enumerate(("stall_first", "stall_second")):
        apath = f"{path}-async{i}"
        dist.barrier()
        t0 = time.perf_counter()
        if method == "shardckpt":
            h = shardckpt.async_save(state, apath, codec=args["codec"])
        else:
            h = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(apath, sync_files=True))
        out[name] = time.perf_counter() - t0
        h.wait() if method == "shardckpt" else h.result()
    dist.barrier()
    if method == "shardckpt":
        shardckpt.shutdown()
        out.update(_memcpy_of(state))
    return out


def _memcpy_of(state) -> dict:
    """The floor of a snapshot of this rank's tensors: copied into a fresh buffer (page faults and all, as a
    job's first snapshot meets it) and again into the same, warm one."""
    srcs = [t._local_tensor.reshape(-1).view(torch.uint8) for t in _tensors(state)]
    t0 = time.perf_counter()
    buf = torch.empty(sum(s.numel() for s in srcs), dtype=torch.uint8)
    times = []
    for _ in range(2):
        pos = 0
        for s in srcs:
            buf[pos:pos + s.numel()].copy_(s)
            pos += s.numel()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    return {"memcpy_fresh": times[0], "memcpy_warm": times[1]}


def _full_load(args, root):
    import torch.distributed.checkpoint as dcp
    import shardckpt
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    out = {m: [] for m in args["only"]}
    for r in range(args["repeat"]):
        for method in _order(args["only"], r):
            path = os.path.join(root, method)
            drop_caches()
            t0 = time.perf_counter()
            if method == "shardckpt":
                shardckpt.load_full(path)
            elif method == "dcp":
                state = {"model": {k: torch.empty(s, dtype=dtype) for k, s in shapes.items()},
                         "optim": {"state": {k: {"exp_avg": torch.empty(s, dtype=dtype),
                                                 "exp_avg_sq": torch.empty(s, dtype=dtype)}
                                             for k, s in shapes.items()}},
                         "step": 0}
                dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
            elif method == "torch":
                parts = [torch.load(os.path.join(path, f), weights_only=True) for f in sorted(os.listdir(path))]
                {k: torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor) else parts[0][k]
                 for k in parts[0]}
            out[method].append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------- references

def memcpy_gbps(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)  # fault in: a reused buffer
    t0 = time.perf_counter()
    dst.copy_(src)
    return nbytes / (time.perf_counter() - t0) / 1e9


def disk_gbps(root: str, nbytes: int) -> float:
    path = os.path.join(root, "ddtest")
    buf = os.urandom(1 << 20) * 16
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(buf)):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    os.unlink(path)
    return nbytes / dt / 1e9


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _count(text: str) -> float:
    """350e6, 350M, 1.3B."""
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:].upper())
    return float(text[:-1]) * mult if mult else float(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=_count, default=350e6, help="model parameters (e.g. 350e6, or 350M)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ws", type=int, default=2, help="saving world size")
    ap.add_argument("--load-ws", type=int, default=3, help="resharding load world size")
    ap.add_argument("--only", default="shardckpt,dcp,torch")
    ap.add_argument("--codec", default="auto")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each phase in one set of processes (alternating method order); best reported")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/tmp/shardckpt-bench"))
    ap.add_argument("--check", action="store_true", help="verify loaded tensors (slower)")
    ap.add_argument("--no-first", dest="first", action="store_false",
                    help="skip the first-call figures (fresh processes per method: first save, load, stalls)")
    a = ap.parse_args(argv)
    params = a.params
    from harness import run_ranks
    args = {"params": params, "dtype": a.dtype, "only": a.only.split(","), "codec": a.codec, "check": a.check}
    shapes = gpt_shapes(params)
    nparams = sum(math.prod(s) for s in shapes.values())
    state_bytes = 3 * nparams * getattr(torch, a.dtype).itemsize
    print(f"state: {nparams / 1e6:.1f}M params x (param, exp_avg, exp_avg_sq) in {a.dtype} = "
          f"{state_bytes / 1e9:.2f} GB; save on {a.ws} ranks, reshard to {a.load_ws}; "
          f"backend {__import__('shardckpt').backend}; cold loads: {drop_caches()}")
    os.makedirs(a.dir, exist_ok=True)
    ref = {"memcpy_GBps": memcpy_gbps(min(state_bytes, 1 << 30)), "disk_write_fsync_GBps": disk_gbps(a.dir, 1 << 30)}
    args["repeat"] = a.repeat
    ranks = lambda res: {m: [max(r[m][i] for r in res) for i in range(a.repeat)] for m in res[0]}  # noqa: E731
    times = {"save": ranks(run_ranks(a.ws, _save_job, args, a.dir, timeout=3600))}
    sizes = {m: du(os.path.join(a.dir, m)) for m in args["only"]}
    times["load"] = ranks(run_ranks(a.ws, _load_job, args, a.dir, True, timeout=3600))
    times["reshard"] = ranks(run_ranks(a.load_ws, _load_job, args, a.dir, False, timeout=3600))
    times["full"] = _full_load(args, a.dir)
    first = {}
    for method in [m for m in args["only"] if m in ("shardckpt", "dcp")] if a.first else []:
        res = run_ranks(a.ws, _first_job, args, a.dir, method, timeout=3600)
        first[method] = {k: max(r[k] for r in res) for k in res[0]}
        shutil.rmtree(os.path.join(a.dir, f"first-{method}"), ignore_errors=True)
    runs = [{ph: {m: v[i] for m, v in times[ph].items()} for ph in times} | {"bytes": sizes}
            for i in range(a.repeat)]
    for i, run in enumerate(runs):
        print(f"run {i + 1}/{a.repeat}: " + json.dumps(run))
    best = {ph: {m: min(run[ph][m] for run in runs if m in run[ph]) for m in runs[0][ph]}
            for ph in ("save", "load", "reshard", "full")}
    best["bytes"] = runs[-1]["bytes"]
    median = {ph: {m: statistics.median(run[ph][m] for run in runs) for m in runs[0][ph]}
              for ph in ("save", "load", "reshard", "full")}
    rows, med_rows = [], {}
    print(f"\n{'phase':<10}" + "".join(f"{m:>14}" for m in args["only"]) + f"{'dcp/shardckpt':>16}"
          f"{'(median)':>10}")
    for ph in ("save", "load", "reshard", "full", "bytes"):
        vals = best[ph]
        cells = "".join(f"{vals[m] / 1e9:>12.3f}GB" if ph == "bytes" else f"{vals[m]:>13.2f}s"
                        if m in vals else f"{'n/a':>14}" for m in args["only"])
        ratio = vals["dcp"] / vals["shardckpt"] if "dcp" in vals and "shardckpt" in vals else float("nan")
        rows.append((ph, ratio))
        med = median.get(ph, vals)
        med_rows[ph] = med["dcp"] / med["shardckpt"] if "dcp" in med and "shardckpt" in med else float("nan")
        print(f"{ph:<10}{cells}{ratio:>15.2f}x{med_rows[ph]:>9.2f}x")
    if first:
        print(f"\nfirst calls, fresh processes per method ({a.ws} ranks, slowest rank):")
        print(f"{'':<14}" + "".join(f"{m:>12}" for m in first) + f"{'dcp/shardckpt':>16}")
        for k in ("save", "load", "stall_first", "stall_second"):
            ratio = first["dcp"][k] / first["shardckpt"][k] if len(first) == 2 else float("nan")
            print(f"{k:<14}" + "".join(f"{first[m][k]:>11.3f}s" for m in first) + f"{ratio:>15.2f}x")
        if "shardckpt" in first:
            f = first["shardckpt"]
            print(f"memcpy of a rank's bytes (torch copy_): into a fresh buffer {f['memcpy_fresh']:.3f}s, into "
                  f"a warm one {f['memcpy_warm']:.3f}s; shardckpt's first stall = "
                  f"{f['stall_first'] / f['memcpy_fresh']:.2f}x the fresh copy, its second "
                  f"{f['stall_second'] / f['memcpy_warm']:.2f}x the warm one")
    print(f"\nreference: memcpy {ref['memcpy_GBps']:.1f} GB/s, disk write+fsync {ref['disk_write_fsync_GBps']:.2f} GB/s;"
          f" state {state_bytes / 1e9:.2f} GB raw; shardckpt bytes on disk / raw = "
          f"{best['bytes'].get('shardckpt', float('nan')) / state_bytes:.3f}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "compare.json"), "w") as f:
        json.dump({"args": vars(a), "state_bytes": state_bytes, "reference": ref, "runs": runs, "best": best,
                   "dcp_over_shardckpt": dict(rows),
                   "median": median, "dcp_over_shardckpt_median": med_rows, "first_calls": first}, f, indent=1)
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

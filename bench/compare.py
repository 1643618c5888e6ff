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
the rank's bytes into a fresh and into a warm buffer (--first-repeat runs, alternating; medians). Then every
op again as the first call of a fresh set of processes, per method, --fresh-repeat times in alternating order (medians reported): save, cold load, cold reshard, full load;
each cold load also reports the extra peak RSS per rank (VmHWM during the load over the RSS before it) and,
for shardckpt, where the slowest rank's time went (shardckpt.loading.profile: group set-up, metadata,
planning, collectives, waits on reads, decode, copies). Plus bytes on disk, and the machine's limits
measured in the same run (bench.limits: memcpy, encode/decode per core through the engine's codec path,
the disk's O_DIRECT sequential write and read), each op's limit composed from them (bench.limits'
docstring) and each op's time as a multiple of its limit.
    python -m bench.compare --params 50M --profile-load    # only the fresh cold loads, profiled (no JSON)
    python -m bench.compare --only shardckpt,dcp --first-only --first-repeat 3   # only the first calls
Prints tables and writes bench/results/compare.json with the ratios (DCP time / shardckpt time)."""
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


def _first_calls(args, a) -> tuple[dict, list]:
    """The first-call jobs, --first-repeat times in alternating method order: per method the median over
    runs of each figure (slowest rank), and every run's figures."""
    from harness import run_ranks
    runs = []
    for r in range(a.first_repeat):
        run = {}
        for method in _order([m for m in args["only"] if m in ("shardckpt", "dcp")], r):
            res = run_ranks(a.ws, _first_job, args, a.dir, method, timeout=3600)
            run[method] = {k: max(x[k] for x in res) for k in res[0]}
            for d in (f"first-{method}", f"first-{method}-async0", f"first-{method}-async1"):
                shutil.rmtree(os.path.join(a.dir, d), ignore_errors=True)
        runs.append(run)
    first = {m: {k: statistics.median(run[m][k] for run in runs) for k in runs[0][m]} for m in runs[0]}
    return first, runs


def _print_first(first: dict, runs: list, a) -> None:
    print(f"\nfirst calls, fresh processes per method ({a.ws} ranks, slowest rank; median of {len(runs)} "
          f"alternating runs):")
    print(f"{'':<14}" + "".join(f"{m:>12}" for m in first) + f"{'dcp/shardckpt':>16}" + f"{'per run':>10}")
    for k in ("save", "load", "stall_first", "stall_second"):
        both = len(first) == 2
        ratio = first["dcp"][k] / first["shardckpt"][k] if both else float("nan")
        each = ", ".join(f"{r['dcp'][k] / r['shardckpt'][k]:.2f}" for r in runs) if both else ""
        print(f"{k:<14}" + "".join(f"{first[m][k]:>11.3f}s" for m in first) + f"{ratio:>15.2f}x  {each}")
    if "shardckpt" in first:
        f = first["shardckpt"]
        print(f"memcpy of a rank's bytes (torch copy_): into a fresh buffer {f['memcpy_fresh']:.3f}s, into "
              f"a warm one {f['memcpy_warm']:.3f}s; shardckpt's first stall = "
              f"{f['stall_first'] / f['memcpy_fresh']:.2f}x the fresh copy, its second "
              f"{f['stall_second'] / f['memcpy_warm']:.2f}x the warm one")


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


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: clear_refs 5); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _empty_state(shapes, dtype, rank, ws):
    """local_state's layout filled with zeros (pages touched): a load's destination, made fast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    mesh = init_device_mesh("cpu", (ws,))

    def make(shape):
        lshape, _ = compute_local_shape_and_global_offset(shape, mesh, [Shard(0)])
        return DTensor.from_local(torch.zeros(lshape, dtype=dtype), mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())
    return {"model": {k: make(s) for k, s in shapes.items()},
            "optim": {"state": {k: {"exp_avg": make(s), "exp_avg_sq": make(s)} for k, s in shapes.items()}},
            "step": 0}


def _fresh_job(rank, ws, args, root, method, op):
    """One op of one method as the first call of a fresh set of processes: "save" (to fresh-<method>),
    "load" (cold, from <method>, any world size: the same layout, or a reshard). A load also reports this
    rank's extra peak RSS (VmHWM during the load over the RSS before it, the destination state already
    allocated) and, for shardckpt, where its time went (shardckpt.loading.profile)."""
    import torch.distributed.checkpoint as dcp
    import shardckpt
    from shardckpt.loading import profile
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    if op == "save":
        state = local_state(shapes, dtype, rank, ws)
        path = os.path.join(root, f"fresh-{method}")
        if method == "shardckpt":
            return {"time": _timed(lambda: shardckpt.save(state, path, codec=args["codec"]))}
        return {"time": _timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=True)))}
    state = _empty_state(shapes, dtype, rank, ws)
    path = os.path.join(root, method)
    if rank == 0:
        drop_caches()
    base = _rss_now()
    peak_ok = _reset_peak()
    if method == "shardckpt":
        profile.start()
        t = _timed(lambda: shardckpt.load(state, path))
        prof = profile.stop()
    else:
        t = _timed(lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(path)))
        prof = None
    out = {"time": t, "rss_extra": _peak() - base if peak_ok else None, "profile": prof}
    if args["check"]:
        ref = local_state(shapes, dtype, rank, ws)
        for a, b in zip(_tensors(state), _tensors(ref)):
            assert torch.equal(a._local_tensor, b._local_tensor), method
    return out


def _fresh_full(rank, ws, args, root, method):
    """A one-process full load as the first call of a fresh process (cold)."""
    return _full_load(dict(args, repeat=1, only=[method]), root)[method][0]


def _fresh(args, a, order):
    """Every op of every method in fresh processes, --fresh-repeat times in alternating method order:
    per run the slowest rank's time (and, for loads, the largest extra peak RSS, the profile of the
    slowest rank)."""
    from harness import run_ranks
    methods = [m for m in args["only"] if m in ("shardckpt", "dcp")]
    runs = []
    for r in range(a.fresh_repeat):
        run = {"save": {}, "load": {}, "reshard": {}, "full": {}, "rss_extra": {}, "rss_extra_reshard": {},
               "profile": {}, "profile_reshard": {}}
        for method in order(methods, r):
            if "save" in a.fresh_ops:
                res = run_ranks(a.ws, _fresh_job, args, a.dir, method, "save", timeout=3600)
                run["save"][method] = max(x["time"] for x in res)
                shutil.rmtree(os.path.join(a.dir, f"fresh-{method}"), ignore_errors=True)
            for ph, ws in (("load", a.ws), ("reshard", a.load_ws)):
                if ph not in a.fresh_ops:
                    continue
                res = run_ranks(ws, _fresh_job, args, a.dir, method, "load", timeout=3600)
                slow = max(res, key=lambda x: x["time"])
                run[ph][method] = slow["time"]
                sfx = "" if ph == "load" else "_reshard"
                run["rss_extra" + sfx][method] = max((x["rss_extra"] or 0) for x in res)
                if slow["profile"] is not None:
                    run["profile" + sfx] = slow["profile"] | {"wall": slow["time"]}
            if "full" in a.fresh_ops:
                run["full"][method] = run_ranks(1, _fresh_full, args, a.dir, method, timeout=3600)[0]
        runs.append(run)
    return runs


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

def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _count(text: str) -> float:
    """350e6, 350M, 1.3B."""
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:].upper())
    return float(text[:-1]) * mult if mult else float(text)


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=_count, default=350e6, help="model parameters (e.g. 350e6, or 350M)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ws", type=int, default=2, help="saving world size")
    ap.add_argument("--load-ws", type=int, default=3, help="resharding load world size")
    ap.add_argument("--only", default="shardckpt,dcp,torch")
    ap.add_argument("--codec", default="auto")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each phase in one set of processes (alternating method order); best reported")
    ap.add_argument("--fresh-repeat", type=int, default=3,
                    help="runs of each op in fresh processes (alternating method order); median reported")
    ap.add_argument("--fresh-ops", default="save,load,reshard,full", help="the ops run in fresh processes")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/tmp/shardckpt-bench"))
    ap.add_argument("--check", action="store_true", help="verify loaded tensors (slower)")
    ap.add_argument("--no-first", dest="first", action="store_false",
                    help="skip the first-call figures (fresh processes per method: first save, load, stalls)")
    ap.add_argument("--profile-load", action="store_true",
                    help="only: save once, then --fresh-repeat cold loads (and reshards) in fresh processes, "
                         "with where shardckpt's time goes and the extra peak RSS per rank; no JSON written")
    ap.add_argument("--first-repeat", type=int, default=1,
                    help="runs of the first-call jobs (fresh processes, alternating methods); medians reported")
    ap.add_argument("--first-only", action="store_true",
                    help="only the first-call jobs (first save, load, async-save stalls); no JSON written")
    a = ap.parse_args(argv)
    a.fresh_ops = a.fresh_ops.split(",")
    if a.profile_load:
        a.repeat, a.first, a.fresh_ops = 1, False, [op for op in a.fresh_ops if op in ("load", "reshard")]
    return a


def main(argv=None):
    from bench import limits
    from harness import run_ranks
    a = _args(argv)
    args = {"params": a.params, "dtype": a.dtype, "only": a.only.split(","), "codec": a.codec, "check": a.check}
    if a.profile_load:
        args["only"] = [m for m in args["only"] if m in ("shardckpt", "dcp")]
    shapes = gpt_shapes(a.params)
    nparams = sum(math.prod(s) for s in shapes.values())
    state_bytes = 3 * nparams * getattr(torch, a.dtype).itemsize
    print(f"state: {nparams / 1e6:.1f}M params x (param, exp_avg, exp_avg_sq) in {a.dtype} = "
          f"{state_bytes / 1e9:.2f} GB; save on {a.ws} ranks, reshard to {a.load_ws}; "
          f"backend {__import__('shardckpt').backend}; cold loads: {drop_caches()}")
    os.makedirs(a.dir, exist_ok=True)
    lim = limits.measure(a.dir, state_bytes, getattr(torch, a.dtype), a.codec, drop_caches)
    args["repeat"] = a.repeat
    ranks = lambda res: {m: [max(r[m][i] for r in res) for i in range(a.repeat)] for m in res[0]}  # noqa: E731
    times = {"save": ranks(run_ranks(a.ws, _save_job, args, a.dir, timeout=3600))}
    sizes = {m: du(os.path.join(a.dir, m)) for m in args["only"]}
    if a.profile_load:
        fresh = _fresh(args, a, _order)
        limits.remeasure_disk(lim, a.dir, state_bytes, drop_caches)
        _print_fresh(fresh, limits.op_limits(lim, state_bytes, sizes), a)
        shutil.rmtree(a.dir, ignore_errors=True)
        return
    if a.first_only:
        _print_first(*_first_calls(args, a), a)
        shutil.rmtree(a.dir, ignore_errors=True)
        return
    times["load"] = ranks(run_ranks(a.ws, _load_job, args, a.dir, True, timeout=3600))
    times["reshard"] = ranks(run_ranks(a.load_ws, _load_job, args, a.dir, False, timeout=3600))
    times["full"] = _full_load(args, a.dir)
    first, first_runs = _first_calls(args, a) if a.first else ({}, [])
    fresh = _fresh(args, a, _order) if a.fresh_repeat > 0 else []
    limits.remeasure_disk(lim, a.dir, state_bytes, drop_caches)
    runs = [{ph: {m: v[i] for m, v in times[ph].items()} for ph in times} | {"bytes": sizes}
            for i in range(a.repeat)]
    for i, run in enumerate(runs):
        print(f"run {i + 1}/{a.repeat}: " + json.dumps(run))
    best = {ph: {m: min(run[ph][m] for run in runs if m in run[ph]) for m in runs[0][ph]}
            for ph in ("save", "load", "reshard", "full")}
    best["bytes"] = runs[-1]["bytes"]
    median = {ph: {m: statistics.median(run[ph][m] for run in runs) for m in runs[0][ph]}
              for ph in ("save", "load", "reshard", "full")}
    op_lim = limits.op_limits(lim, state_bytes, sizes)
    rows, med_rows = _print_warm(best, median, op_lim, args["only"])
    if first:
        _print_first(first, first_runs, a)
    fresh_sum = _print_fresh(fresh, op_lim, a) if fresh else {}
    _print_limits(lim, op_lim, state_bytes, best["bytes"])
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "compare.json"), "w") as f:
        json.dump({"args": vars(a), "state_bytes": state_bytes, "limits": lim, "op_limits_s": op_lim,
                   "limit_formulas": LIMIT_FORMULAS, "runs": runs, "best": best, "dcp_over_shardckpt": dict(rows),
                   "multiple_of_limit": _multiples(best, op_lim),
                   "median": median, "dcp_over_shardckpt_median": med_rows, "first_calls": first, "first_call_runs": first_runs,
                   "fresh": fresh_sum, "fresh_runs": fresh}, f, indent=1)
    shutil.rmtree(a.dir, ignore_errors=True)


LIMIT_FORMULAS = {"shardckpt save": "max(R / (encode per core * cores), S / disk write)",
                  "shardckpt load, reshard, full": "max(S / disk read, R / (decode per core * cores))",
                  "dcp save": "max(R / memcpy, S / disk write)",
                  "dcp load, reshard, full": "max(S / disk read, R / memcpy)"}
PHASES = ("save", "load", "reshard", "full")


def _multiples(times, op_lim):
    return {ph: {m: times[ph][m] / op_lim[ph][m] for m in times[ph] if m in op_lim[ph]} for ph in PHASES
            if ph in times}


def _print_warm(best, median, op_lim, methods):
    """The warm table (best and median ratio, each method's multiple of its limit); returns the ratios."""
    rows, med_rows = [], {}
    mult = _multiples(median, op_lim)
    print(f"\nwarm (repeated in one set of processes)\n{'phase':<10}" + "".join(f"{m:>14}" for m in methods)
          + f"{'dcp/shardckpt':>16}{'(median)':>10}   median x limit")
    for ph in PHASES + ("bytes",):
        vals = best[ph]
        cells = "".join(f"{vals[m] / 1e9:>12.3f}GB" if ph == "bytes" else f"{vals[m]:>13.2f}s"
                        if m in vals else f"{'n/a':>14}" for m in methods)
        ratio = vals["dcp"] / vals["shardckpt"] if "dcp" in vals and "shardckpt" in vals else float("nan")
        rows.append((ph, ratio))
        med = median.get(ph, vals)
        med_rows[ph] = med["dcp"] / med["shardckpt"] if "dcp" in med and "shardckpt" in med else float("nan")
        lim = "   " + "  ".join(f"{m} {x:.2f}x" for m, x in mult.get(ph, {}).items())
        print(f"{ph:<10}{cells}{ratio:>15.2f}x{med_rows[ph]:>9.2f}x{lim if ph != 'bytes' else ''}")
    return rows, med_rows


def _print_fresh(fresh, op_lim, a):
    """Medians of the fresh-process runs: times, ratio, multiples of the limits, extra peak RSS and the
    cold load's profile (shardckpt). Returns them as a dict for the JSON."""
    out = {"median": {}, "dcp_over_shardckpt": {}, "rss_extra_MB": {}, "rss_extra_reshard_MB": {},
           "profile": {}, "profile_reshard": {}}
    print(f"\nfresh processes per op and method (the op is the process's first; median of {len(fresh)} "
          f"alternating runs, slowest rank)\n{'op':<10}{'shardckpt':>12}{'dcp':>12}{'dcp/shardckpt':>16}"
          f"{'shardckpt x limit':>20}{'dcp x limit':>14}")
    for ph in PHASES:
        if not any(r[ph] for r in fresh):
            continue
        med = {m: statistics.median(r[ph][m] for r in fresh) for m in fresh[0][ph]}
        out["median"][ph] = med
        ratio = med["dcp"] / med["shardckpt"] if len(med) == 2 else float("nan")
        out["dcp_over_shardckpt"][ph] = ratio
        cells = "".join(f"{med[m]:>11.3f}s" if m in med else f"{'n/a':>12}" for m in ("shardckpt", "dcp"))
        mult = {m: med[m] / op_lim[ph][m] for m in med}
        out.setdefault("multiple_of_limit", {})[ph] = mult
        print(f"{ph:<10}{cells}{ratio:>15.2f}x{mult.get('shardckpt', float('nan')):>19.2f}x"
              f"{mult.get('dcp', float('nan')):>13.2f}x")
    for key, ph in (("rss_extra", f"load ({a.ws} ranks)"), ("rss_extra_reshard", f"reshard ({a.load_ws} ranks)")):
        if any(r[key] for r in fresh):
            rss = {m: statistics.median(r[key][m] for r in fresh) / 1e6 for m in fresh[0][key]}
            out[key + "_MB"] = rss
            print(f"extra peak RSS per rank, cold {ph}: " + ", ".join(f"{m} +{v:.0f} MB" for m, v in rss.items()))
    for key, ph in (("profile", "load"), ("profile_reshard", "reshard")):
        profs = [r[key] for r in fresh if r[key]]
        if profs:
            prof = {k: statistics.median(p[k] for p in profs) for k in profs[0]}
            out[key] = prof
            wall = prof.pop("wall")
            io = prof.pop("read_io")
            rest = wall - sum(prof.values())
            print(f"shardckpt cold {ph}, where the slowest rank's time goes (median, {wall:.3f}s): "
                  + ", ".join(f"{k} {v:.3f}s ({v / wall:.0%})" for k, v in prof.items())
                  + f", other {rest:.3f}s ({rest / wall:.0%}); fetch threads' read time {io:.3f}s (overlapped)")
            prof.update(wall=wall, read_io=io)
    return out


def _print_limits(lim, op_lim, state_bytes, sizes):
    d = lim["disk"]
    print(f"\nlimits: {lim['cores']} cores; memcpy {lim['memcpy_GBps']:.1f} GB/s; {lim['codec']} per core: encode "
          f"{lim['encode_GBps_per_core']:.2f} GB/s, decode {lim['decode_GBps_per_core']:.2f} GB/s (ratio "
          f"{lim['ratio']:.3f}); disk sequential {'O_DIRECT' if d.get('write_direct') else 'page cache'} write+fsync "
          f"{d['write_GBps']:.2f} GB/s, read {d['read_GBps']:.2f} GB/s (best of the samples write/read "
          + ", ".join(f"{x['write_GBps']:.2f}/{x['read_GBps']:.2f}" for x in d.get("samples", [])) + ")"
          + (f" ({'; '.join(d['notes'])})" if d['notes'] else ""))
    print(f"op limits (R {state_bytes / 1e9:.2f} GB raw, S bytes on disk: "
          + ", ".join(f"{m} {v / 1e9:.2f} GB" for m, v in sizes.items()) + "): "
          + "; ".join(f"{k} = {v}" for k, v in LIMIT_FORMULAS.items()))
    print("  " + "; ".join(f"{ph}: " + ", ".join(f"{m} {t:.3f}s" for m, t in op_lim[ph].items()) for ph in PHASES))
    print(f"shardckpt bytes on disk / raw = {sizes.get('shardckpt', float('nan')) / state_bytes:.3f}")


if __name__ == "__main__":
    main()

"""Training stall of an asynchronous save: how long the caller is blocked, max over ranks.

    python -m bench.stall [--mb-per-rank 128] [--ranks 2] [--reps 3] [--dir /tmp]

One run, the same state (FSDP-like: float32 DTensors sharded by rows over all ranks, plus small tensors),
these methods, each warmed up once (buffers allocated) and then timed `reps` times:
  memcpy            copy every local shard into a preallocated, reused flat buffer (the floor: a snapshot
                    cannot be cheaper); the faster of torch.Tensor.copy_ and shardckpt's parallel copy_into
  shardckpt.async   shardckpt.async_save(...) until it returns (plan + agree + snapshot into the pool)
  dcp.async         torch.distributed.checkpoint.async_save with its default stager
  dcp.async+stager  the same with a DefaultStager kept across saves (CPU options; reuses its buffers)
Every save is waited for before the next one starts. Goal (issue 4): shardckpt <= 1.2x memcpy and
<= 0.5x the best DCP variant. Prints a table and writes bench/results/stall.json.

    python -m bench.stall --first [--mb-per-rank 960] [--reps 2]

A job's first save, each run in a fresh process (one rank, no process group), `reps` alternating pairs:
  raw       shardckpt.async_save of the state, no warm_up: the first and the second stall
  manager   CheckpointManager(async_save=True, save_every_steps=3), maybe_save every step with 0.5 s of
            "training" between steps and no restore: the stalls of its saves at steps 3, 6 and 9
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _state(mesh, ws, mb_per_rank):
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor
    n_big = 8
    rows = max(ws, int(mb_per_rank * (1 << 20) * ws / n_big / 4 / 1024))
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(n_big):
        full = torch.empty(rows, 1024).normal_(generator=g)
        state[f"layer{i}.weight"] = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
    for i in range(16):  # biases, norms: small, replicated
        state[f"layer{i}.bias"] = torch.randn(1024, generator=g)
    state["step"] = 10
    return state


def _max_over_ranks(x: float) -> float:
    import torch
    import torch.distributed as dist
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _rank(rank, ws, workdir, mb, reps):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    import shardckpt
    from shardckpt.native import kernels as _ext
    from shardckpt.format.codec import threads
    mesh = init_device_mesh("cpu", (ws,))
    state = _state(mesh, ws, mb)
    locals_ = [v._local_tensor if hasattr(v, "_local_tensor") else v for v in state.values()
               if isinstance(v, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in locals_)
    results = {"bytes_per_rank": nbytes}

    def timed(name, fn, finish=lambda r: None):
        fn_out = fn(-1)
        finish(fn_out)  # warm-up: allocations, groups, caches
        times = []
        for i in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            out = fn(i)
            dt = time.perf_counter() - t0
            finish(out)
            times.append(_max_over_ranks(dt))
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "all_s": times}

    buf = torch.empty(nbytes, dtype=torch.uint8)

    def memcpy_torch(_):
        pos = 0
        for t in locals_:
            n = t.numel() * t.element_size()
            buf[pos:pos + n].view(t.dtype).copy_(t.reshape(-1))
            pos += n

    def memcpy_native(_):
        pos = 0
        view = buf.numpy()
        for t in locals_:
            n = t.numel() * t.element_size()
            _ext.copy_into(view[pos:pos + n], t.reshape(-1).view(torch.uint8).numpy(), threads())
            pos += n

    timed("memcpy.torch", memcpy_torch)
    timed("memcpy.native", memcpy_native)
    results["memcpy"] = min((results["memcpy.torch"], results["memcpy.native"]), key=lambda r: r["median_s"])

    def run_dir(tag, i):
        d = os.path.join(workdir, f"{tag}-{i + 1}")
        if rank == 0:
            shutil.rmtree(d, ignore_errors=True)
        dist.barrier()
        return d

    def cleanup(d):
        dist.barrier()
        if rank == 0:
            shutil.rmtree(d, ignore_errors=True)

    def sc(i):
        d = run_dir("shardckpt", i)
        return d, shardckpt.async_save(state, d)

    def sc_finish(out):
        out[1].wait()
        cleanup(out[0])

    timed("shardckpt.async", sc, sc_finish)

    try:
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return results

    def dcp_fn(stager):
        def f(i):
            d = run_dir("dcp", i)
            kw = {"async_stager": stager} if stager is not None else {}
            return d, dcp.async_save(state, checkpoint_id=d, **kw)
        return f

    def dcp_finish(out):
        fut = out[1]
        (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
        cleanup(out[0])

    timed("dcp.async", dcp_fn(None), dcp_finish)
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                              use_async_staging=False, use_non_blocking_copy=False))
        timed("dcp.async+stager", dcp_fn(stager), dcp_finish)
    except ImportError:
        pass
    return results


def _first_job(kind: str, mb: int, workdir: str) -> dict:
    """One fresh process's saves (--first): see the module docstring."""
    import torch
    import shardckpt
    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.empty((mb << 20) // 16, dtype=torch.bfloat16).normal_(generator=g)
             for i in range(8)}
    if kind == "raw":
        stalls = []
        for i in range(2):
            t0 = time.perf_counter()
            h = shardckpt.async_save(state, os.path.join(workdir, f"raw-{i}"))
            stalls.append(time.perf_counter() - t0)
            h.wait()
    else:
        mgr = shardckpt.CheckpointManager(os.path.join(workdir, "mgr"), save_every_steps=3, async_save=True,
                                          preemption_signals=())
        stalls = []
        for step in range(1, 10):
            t0 = time.perf_counter()
            if mgr.maybe_save(step, state):
                stalls.append(time.perf_counter() - t0)
            time.sleep(0.5)  # training
        mgr.close()
    shardckpt.shutdown()
    return {"kind": kind, "stalls": stalls}


def _first(args) -> None:
    import subprocess
    runs = {"raw": [], "manager": []}
    for r in range(args.reps):
        for kind in (("raw", "manager") if r % 2 == 0 else ("manager", "raw")):
            workdir = tempfile.mkdtemp(prefix="stall-first-", dir=args.dir)
            try:
                out = subprocess.run([sys.executable, "-m", "bench.stall", "--first-job", kind, "--mb-per-rank",
                                      str(args.mb_per_rank), "--dir", workdir], check=True, capture_output=True,
                                     text=True, cwd=ROOT).stdout
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            runs[kind].append(json.loads(out.strip().splitlines()[-1])["stalls"])
    med = {k: [statistics.median(run[i] for run in v) for i in range(len(v[0]))] for k, v in runs.items()}
    print(f"first saves of a fresh process, {args.mb_per_rank} MiB, median of {args.reps} alternating runs")
    print(f"raw async_save (no warm_up): first {med['raw'][0]:.3f} s, second {med['raw'][1]:.3f} s; runs "
          + ", ".join(f"{x[0]:.3f}/{x[1]:.3f}" for x in runs["raw"]))
    print("CheckpointManager, no restore, saves at steps 3/6/9: " + "/".join(f"{x:.3f}" for x in med["manager"])
          + " s; runs " + ", ".join("/".join(f"{y:.3f}" for y in x) for x in runs["manager"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb-per-rank", type=int, default=128)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stall.json"))
    ap.add_argument("--first", action="store_true", help="a job's first saves, in fresh processes (docstring)")
    ap.add_argument("--first-job", choices=("raw", "manager"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.first_job:
        print(json.dumps(_first_job(args.first_job, args.mb_per_rank, args.dir)))
        return
    if args.first:
        _first(args)
        return
    from harness import run_ranks
    workdir = tempfile.mkdtemp(prefix="stall-", dir=args.dir)
    try:
        res = run_ranks(args.ranks, _rank, workdir, args.mb_per_rank, args.reps, timeout=900)[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    import torch
    base = res["memcpy"]["median_s"]
    dcp_names = [n for n in ("dcp.async", "dcp.async+stager") if n in res]
    dcp_best = min((res[n]["median_s"] for n in dcp_names), default=None)
    sc = res["shardckpt.async"]["median_s"]
    summary = {"stall_over_memcpy": sc / base, "stall_over_dcp_best": sc / dcp_best if dcp_best else None,
               "goal_memcpy": 1.2, "goal_dcp": 0.5}
    summary["meets_goals"] = summary["stall_over_memcpy"] <= 1.2 and (dcp_best is None or
                                                                      summary["stall_over_dcp_best"] <= 0.5)
    out = {"config": {**vars(args), "bytes_per_rank": res["bytes_per_rank"], "torch": torch.__version__,
                      "python": platform.python_version(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()},
           "results": {k: v for k, v in res.items() if k != "bytes_per_rank"}, "summary": summary}
    mb = res["bytes_per_rank"] / (1 << 20)
    print(f"stall per save, {args.ranks} ranks x {mb:.0f} MiB, median of {args.reps} (max over ranks)")
    print(f"{'method':<20}{'stall ms':>10}{'GB/s':>8}{'x memcpy':>10}")
    for name in ["memcpy.torch", "memcpy.native", "shardckpt.async"] + dcp_names:
        s = res[name]["median_s"]
        print(f"{name:<20}{s * 1e3:>10.1f}{res['bytes_per_rank'] / s / 1e9:>8.2f}{s / base:>10.2f}")
    print(f"shardckpt / memcpy = {summary['stall_over_memcpy']:.2f} (goal <= 1.2); shardckpt / best DCP = "
          f"{summary['stall_over_dcp_best']:.2f} (goal <= 0.5)" if dcp_best else "")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

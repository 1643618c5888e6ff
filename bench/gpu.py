"""The GPU save path on one device: stall of an async save (D2H into the reused pinned pool) against torch's
own pinned device-to-host copy, time until durable, and dcp.async_save on the same state, in one run.

    python -m bench.gpu                  # 10 GiB of bf16 tensors on cuda:0 (issue 3: a state >= 10 GB)
    python -m bench.gpu --gb 1 --device cpu --dir /tmp   # the same logic on CPU (a smoke run)

Measured, each after one uncounted warm-up (buffers allocated, pinned, streams created), median of --reps:
  d2h.pinned        copy every tensor into one preallocated pinned buffer (non_blocking) and synchronize:
                    the limit a snapshot cannot beat
  shardckpt.async   shardckpt.async_save(...) until it returns (plan + D2H into the pinned pool)
  shardckpt.durable the same until handle.wait() returns (encoded, written, committed)
  dcp.async+pinned  dcp.async_save with a DefaultStager that keeps pinned buffers across saves, until it
                    returns
Goals: shardckpt.async <= 1.2x d2h.pinned (issue 3) and <= 0.5x dcp's stall (issue 4). Prints a table and
writes bench/results/gpu.json. Runs in one process (no process group)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_state(gb: float, device: str) -> dict:
    """Transformer-like: 64 large bf16 matrices (weights and two Adam moments' worth) plus small vectors."""
    per = int(gb * (1 << 30) / 64 / 2 / 4096) * 4096  # elements per big tensor
    g = torch.Generator(device=device).manual_seed(0)
    state = {f"layer{i}.w": (torch.randn(per, generator=g, device=device) * 0.02).bfloat16().view(-1, 4096)
             for i in range(64)}
    state.update({f"layer{i}.b": torch.zeros(4096, device=device) for i in range(64)})
    return state


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, reps: int, finish=lambda out: None) -> list[float]:
    finish(fn(-1))  # warm-up
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        out = fn(i)
        times.append(time.perf_counter() - t0)
        finish(out)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=10.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--skip-dcp", action="store_true")
    a = ap.parse_args(argv)
    import shardckpt
    state = make_state(a.gb, a.device)
    tensors = list(state.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    _sync(a.device)
    work = tempfile.mkdtemp(prefix="gpu-bench-", dir=a.dir)
    res: dict = {}
    try:
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=a.device.startswith("cuda"))

        def d2h(_):
            pos = 0
            for t in tensors:
                n = t.numel() * t.element_size()
                pinned[pos:pos + n].view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
                pos += n
            _sync(a.device)
        res["d2h.pinned"] = timed(d2h, a.reps)

        handles = []

        def sc(i):
            path = os.path.join(work, f"sc-{i}")
            h = shardckpt.async_save(state, path)
            handles.append((time.perf_counter(), h))
            return path, h

        durable = []

        def sc_finish(out):
            t_ret, h = handles[-1]
            h.wait()
            durable.append(h.stall_s + time.perf_counter() - t_ret)
            shutil.rmtree(out[0], ignore_errors=True)
        res["shardckpt.async"] = timed(sc, a.reps, sc_finish)
        res["shardckpt.durable"] = durable[1:]

        if not a.skip_dcp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            stager = DefaultStager(StagingOptions(use_pinned_memory=a.device.startswith("cuda"),
                                                  use_shared_memory=False, use_async_staging=False,
                                                  use_non_blocking_copy=a.device.startswith("cuda")))

            def dc(i):
                path = os.path.join(work, f"dcp-{i}")
                return path, dcp.async_save(state, checkpoint_id=path, async_stager=stager)

            def dc_finish(out):
                fut = out[1]
                (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
                shutil.rmtree(out[0], ignore_errors=True)
            res["dcp.async+pinned"] = timed(dc, a.reps, dc_finish)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in res.items() if v}
    print(f"state {nbytes / 1e9:.2f} GB on {a.device}; median of {a.reps}")
    print(f"{'method':<20}{'seconds':>10}{'GB/s':>9}{'x d2h':>8}")
    for k, v in med.items():
        print(f"{k:<20}{v:>10.3f}{nbytes / v / 1e9:>9.2f}{v / med['d2h.pinned']:>8.2f}")
    summary = {"stall_over_d2h": med["shardckpt.async"] / med["d2h.pinned"]}
    if "dcp.async+pinned" in med:
        summary["stall_over_dcp"] = med["shardckpt.async"] / med["dcp.async+pinned"]
    print(" ".join(f"{k} = {v:.2f}" for k, v in summary.items()) + " (goals: <= 1.2, <= 0.5)")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "gpu.json"), "w") as f:
        json.dump({"args": vars(a), "bytes": nbytes, "runs": res, "median": med, "summary": summary,
                   "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                   "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()

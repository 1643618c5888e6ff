"""Incremental against full checkpoints of a LoRA-style job (issues 15, 24): a GPT state whose parameters
are 90% frozen (embeddings and the first blocks), with AdamW moments only for the trainable last blocks and
final norm. Each step changes the trainable parameters and their moments; the frozen ones never change.
--trainable 1 trains every parameter instead: every chunk changes at every step (what incremental=True
costs when it cannot save anything).

For each of --steps saves: bytes written (data + index files of that step) and save time, for a full save
(shardckpt.save, every chunk written) and an incremental one (save(..., base=previous step), as
CheckpointManager(incremental=True) does), against the bytes that changed (raw bytes of the trainable
parameters and moments); then the restore time (load_full) of the last full and the last incremental step.
First, the content hash's throughput on one core beside memcpy's (and format 2.0's blake2b-128). Last, in the
same run, a --all-params state whose every parameter trains (every chunk changes at every step), saved the
same way: what incremental=True costs when it can save nothing. It ends with both of issue 24's goal ratios
(incremental step <= 0.35x a full save; every chunk changing <= 1.05x a plain save).

    python -m bench.incremental [--params 93e6] [--trainable 0.1] [--steps 4] [--all-params 30e6]
                                [--dir /tmp/bench-incr] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import hashlib

import numpy as np
import torch

import shardckpt
from shardckpt.native import kernels as _ext

from .compare import _rows, gpt_shapes


def frozen_state(params: float, dtype: torch.dtype, trainable_frac: float = 0.1):
    """(state, trainable parameter names): the GPT state with the last blocks (and ln_f) trainable, at
    least `trainable_frac` of the parameters; AdamW moments for those only."""
    shapes = gpt_shapes(params)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    blocks = sorted({int(n.split(".")[1]) for n in shapes if n.startswith("blocks.")})
    trainable = {n for n in shapes if n.startswith("ln_f.")}
    if trainable_frac >= 1:
        trainable = set(shapes)
    for b in reversed(blocks):
        if sum(torch.Size(shapes[n]).numel() for n in trainable) >= trainable_frac * total:
            break
        trainable |= {n for n in shapes if n.startswith(f"blocks.{b}.")}
    state = {"model": {}, "optim": {"state": {}}, "step": 0}
    for name, shape in shapes.items():
        n = shape[0] if shape else 1
        state["model"][name] = (_rows(name, 0, 0, shape, 0, n) * 0.02).to(dtype)
        if name in trainable:
            state["optim"]["state"][name] = {"exp_avg": (_rows(name, 1, 0, shape, 0, n) * 1e-3).to(dtype),
                                             "exp_avg_sq": (_rows(name, 2, 0, shape, 0, n) ** 2 * 1e-6).to(dtype)}
    return state, sorted(trainable), total


def train_step(state: dict, trainable: list[str], step: int) -> int:
    """Change every trainable parameter and its moments (as an optimizer step does); returns the raw bytes
    that changed."""
    g = torch.Generator().manual_seed(step)
    changed = 0
    for name in trainable:
        p = state["model"][name]
        grad = torch.randn(p.shape, generator=g).to(p.dtype) * 1e-3
        m = state["optim"]["state"][name]
        m["exp_avg"].mul_(0.9).add_(grad, alpha=0.1)
        m["exp_avg_sq"].mul_(0.999).add_(grad * grad, alpha=0.001)
        p.sub_(m["exp_avg"] * 1e-2)
        changed += 3 * p.numel() * p.element_size()
    state["step"] = step
    return changed


def written(path) -> int:
    """Bytes this step's save wrote: its data and index files and its manifest."""
    m = shardckpt.read_manifest(path)
    return sum(f.data_size + f.index_size for f in m.files) + os.path.getsize(os.path.join(path, "manifest.json"))


def per_core_throughput(nbytes: int = 64 << 20) -> dict[str, float]:
    """GB/s on one thread over a warm `nbytes` buffer (best of 5): the content hash, format 2.0's
    blake2b-128 and memcpy (the native copy kernel, as staging copies)."""
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = 0
    runs = {"xxh3-128": lambda: _ext.xxh3_128(src),
            "blake2b-128": lambda: hashlib.blake2b(src, digest_size=16).digest(),
            "memcpy": lambda: _ext.copy_into(dst, src, 1)}
    out = {}
    for name, fn in runs.items():
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = nbytes / best / 1e9
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=93e6)
    ap.add_argument("--trainable", type=float, default=0.1,
                    help="fraction of the parameters trained (the last blocks); 1: all of them")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--all-params", type=float, default=30e6,
                    help="parameters of the state whose every chunk changes (0: skip that part)")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    speed = per_core_throughput()
    print(f"one core, 64 MiB warm: xxh3-128 {speed['xxh3-128']:.1f} GB/s ({_ext.XXHASH_SOURCE}), "
          f"blake2b-128 {speed['blake2b-128']:.2f} GB/s, memcpy {speed['memcpy']:.1f} GB/s "
          f"({_ext.BACKEND} kernels)")
    root = args.dir or tempfile.mkdtemp(prefix="bench-incr-")
    state, trainable, total = frozen_state(args.params, dtype, args.trainable)
    n_train = sum(state["model"][n].numel() for n in trainable)
    raw = sum(t.numel() * t.element_size() for t in _tensors(state))
    print(f"GPT {total / 1e6:.1f}M params ({args.dtype}), trainable {n_train / 1e6:.1f}M "
          f"({100 * n_train / total:.1f}%, {len(trainable)} tensors), state {raw / 2**20:.0f} MiB, root {root}")
    rows, prev = [], None
    print(f"{'step':>4} {'changed':>10} {'full: wrote':>12} {'s':>6} {'incr: wrote':>12} {'s':>6} "
          f"{'wrote/changed':>13} {'referred':>10}")
    for step in range(args.steps + 1):
        changed = train_step(state, trainable, step) if step else raw
        full = os.path.join(root, "full", f"step-{step:010d}")
        incr = os.path.join(root, "incr", f"step-{step:010d}")
        t0 = time.perf_counter()
        shardckpt.save(state, full)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = shardckpt.save(state, incr, base=prev) if prev else shardckpt.save(state, incr, content_hash=True)
        t_incr = time.perf_counter() - t0
        prev = incr
        w_full, w_incr = written(full), written(incr)
        rows.append((step, changed, w_full, t_full, w_incr, t_incr))
        print(f"{step:>4} {changed / 2**20:>8.1f}Mi {w_full / 2**20:>10.1f}Mi {t_full:>6.2f} "
              f"{w_incr / 2**20:>10.1f}Mi {t_incr:>6.2f} {w_incr / changed:>13.3f} "
              f"{m.ref_stored_bytes / 2**20:>8.1f}Mi")
        if step:  # keep the disk bounded: older full steps are not needed
            shutil.rmtree(os.path.join(root, "full", f"step-{step - 1:010d}"))
    last = args.steps
    times = {"full": [], "incr": []}
    for _ in range(3):
        for kind in ("full", "incr"):
            t0 = time.perf_counter()
            out = shardckpt.load_full(os.path.join(root, kind, f"step-{last:010d}"))
            times[kind].append(time.perf_counter() - t0)
            assert all(torch.equal(a, b) for a, b in zip(_tensors(out), _tensors(state)))
    inc = rows[1:]
    t_inc, t_full = statistics.median(r[5] for r in inc), statistics.median(r[3] for r in inc)
    print(f"steps 1-{last}: incremental wrote {statistics.mean(r[4] / r[1] for r in inc):.3f}x the changed bytes "
          f"(full: {statistics.mean(r[2] / r[1] for r in inc):.2f}x); save {t_inc:.3f} s against {t_full:.3f} s "
          f"full (median): {t_inc / t_full:.3f}x")
    print(f"restore (load_full, warm cache, median of 3): full {statistics.median(times['full']):.2f} s, "
          f"incremental {statistics.median(times['incr']):.2f} s")
    stall = {"full": [], "incr": []}  # async_save until it returns: what training waits for
    shardckpt.async_save(state, os.path.join(root, "full", "warm")).wait()  # the staging pool, allocated once
    shutil.rmtree(os.path.join(root, "full", "warm"))
    for rep in range(3):
        for kind in ("full", "incr"):
            path = os.path.join(root, kind, f"stall-{rep}")
            t0 = time.perf_counter()
            h = shardckpt.async_save(state, path, base=prev if kind == "incr" else None)
            stall[kind].append(time.perf_counter() - t0)
            h.wait()
            shutil.rmtree(path)
    print(f"stall (async_save until it returns, median of 3): full {statistics.median(stall['full']):.3f} s, "
          f"incremental {statistics.median(stall['incr']):.3f} s")
    goals = [f"incremental step {t_inc / t_full:.3f}x a full save (goal <= 0.35x)"]
    if args.all_params:
        r = all_changing(args.all_params, dtype, args.steps, os.path.join(root, "all"))
        goals.append(f"every chunk changing {r:.3f}x a plain save (goal <= 1.05x)")
    print("goals: " + "; ".join(goals))
    if not args.dir:
        shutil.rmtree(root)


def all_changing(params: float, dtype: torch.dtype, steps: int, root: str) -> float:
    """The ratio of save(..., base=previous step) to a plain save of a `params` state whose every parameter
    and moment changes at every step (median over `steps` steps after a first hashed save; the two saves of a
    step in alternating order, so neither always follows the other)."""
    state, trainable, total = frozen_state(params, dtype, 1)
    shardckpt.save(state, os.path.join(root, "incr-0"), content_hash=True)
    prev, plain, incr = os.path.join(root, "incr-0"), [], []
    for step in range(1, steps + 1):
        train_step(state, trainable, step)
        for kind in (("plain", "incr") if step % 2 else ("incr", "plain")):
            path = os.path.join(root, f"{kind}-{step}")
            t0 = time.perf_counter()
            shardckpt.save(state, path, base=prev if kind == "incr" else None)
            (incr if kind == "incr" else plain).append(time.perf_counter() - t0)
        shutil.rmtree(os.path.join(root, f"plain-{step}"))
        prev = os.path.join(root, f"incr-{step}")
    ratio = statistics.median(incr) / statistics.median(plain)
    print(f"every chunk changing ({total / 1e6:.1f}M params, all trained, {steps} steps): save with a base "
          f"{statistics.median(incr):.3f} s against {statistics.median(plain):.3f} s plain (median): {ratio:.3f}x")
    return ratio


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k])


if __name__ == "__main__":
    main()

"""Incremental against full checkpoints of a LoRA-style job (issue 15): a GPT state whose parameters are
90% frozen (embeddings and the first blocks), with AdamW moments only for the trainable last blocks and
final norm. Each step changes the trainable parameters and their moments; the frozen ones never change.

For each of --steps saves: bytes written (data + index files of that step) and save time, for a full save
(shardckpt.save, every chunk written) and an incremental one (save(..., base=previous step), as
CheckpointManager(incremental=True) does), against the bytes that changed (raw bytes of the trainable
parameters and moments); then the restore time (load_full) of the last full and the last incremental step.

    python -m bench.incremental [--params 50e6] [--steps 4] [--dir /tmp/bench-incr] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

import shardckpt

from .compare import _rows, gpt_shapes


def frozen_state(params: float, dtype: torch.dtype, trainable_frac: float = 0.1):
    """(state, trainable parameter names): the GPT state with the last blocks (and ln_f) trainable, at
    least `trainable_frac` of the parameters; AdamW moments for those only."""
    shapes = gpt_shapes(params)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    blocks = sorted({int(n.split(".")[1]) for n in shapes if n.startswith("blocks.")})
    trainable = {n for n in shapes if n.startswith("ln_f.")}
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    root = args.dir or tempfile.mkdtemp(prefix="bench-incr-")
    state, trainable, total = frozen_state(args.params, dtype)
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
    print(f"steps 1-{last}: incremental wrote {statistics.mean(r[4] / r[1] for r in inc):.3f}x the changed bytes "
          f"(full: {statistics.mean(r[2] / r[1] for r in inc):.2f}x); save {statistics.median(r[5] for r in inc):.2f} s "
          f"against {statistics.median(r[3] for r in inc):.2f} s full")
    print(f"restore (load_full, warm cache, median of 3): full {statistics.median(times['full']):.2f} s, "
          f"incremental {statistics.median(times['incr']):.2f} s")
    if not args.dir:
        shutil.rmtree(root)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k])


if __name__ == "__main__":
    main()

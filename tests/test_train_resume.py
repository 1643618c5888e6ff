"""launch/train.py end to end: a run resumed at the same world size reproduces the uninterrupted run's losses
exactly; a resized resume restores model and optimizer tensors identical to the checkpoint."""
from __future__ import annotations

import os
import sys

import numpy as np

import shardckpt
from harness import run_ranks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))

SMALL = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq", "16", "--steps", "12", "--save-every", "4",
         "--keep-last", "5"]


def _train(rank, ws, ckpt, extra):
    import train
    return train.main(["--ckpt", ckpt] + SMALL + list(extra))


def _restored(rank, ws, ckpt):
    """Restore the latest step at this world size and return the full model and optimizer tensors."""
    import torch.distributed as dist
    import train
    from shardckpt.loading.state import ModelOptimizerState, ResumableSampler, RNGState, SchedulerState
    args = train.parse(["--ckpt", ckpt] + SMALL)
    data = train.CharData(train.make_corpus(args.seed), args.seq)
    model, opt, sched, dp_rank, dp_size = train.build(args, len(data.vocab), ws)
    sampler = ResumableSampler(data.n, args.global_batch, rank=dp_rank, world_size=dp_size, seed=args.seed)
    state = {"train": ModelOptimizerState(model, opt), "sched": SchedulerState(sched), "rng": RNGState(args.seed),
             "data": sampler}
    manager = shardckpt.CheckpointManager(ckpt, preemption_signals=())
    step = manager.restore(state)
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).numpy()  # noqa: E731
    out = {"step": step, "model": {k: full(v) for k, v in msd.items()},
           "optim": {k: {n: full(t) for n, t in st.items()} for k, st in osd["state"].items()},
           "lr": sched.get_last_lr(), "pos": (sampler.position.epoch, sampler.position.index)}
    dist.barrier()
    return out


def test_same_size_resume_is_exact_and_resized_restore_is_identical(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full_run = run_ranks(2, _train, a, [], timeout=120)[0]
    first = run_ranks(2, _train, b, ["--stop-at", "6"], timeout=120)[0]  # stops after step 6 (saved 4)
    second = run_ranks(2, _train, b, [], timeout=120)[0]  # resumes from step 4
    assert [s for s, _ in first] == list(range(1, 7)) and [s for s, _ in second] == list(range(5, 13))
    assert first == full_run[:6]
    assert second == full_run[4:]  # bit-identical losses after the resume
    ckpt = shardckpt.load_full(os.path.join(b, "step-0000000012"))
    for ws in (3, 1):
        outs = run_ranks(ws, _restored, b, timeout=120)
        for o in outs:
            assert o["step"] == 12 and o["pos"] == (0, 12 * 12)
            for k, v in o["model"].items():
                assert np.array_equal(v, ckpt["train"]["model"][k].numpy()), k
            for k, st in o["optim"].items():
                for n, t in st.items():
                    assert np.array_equal(t, ckpt["train"]["optim"]["state"][k][n].numpy()), (k, n)
            assert o["lr"] == ckpt["sched"]["_last_lr"]

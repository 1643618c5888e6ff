"""Training-state adapters: model + optimizer (plain and FSDP2), scheduler, GradScaler, RNG per rank (same
and different world size), and the resumable sampler's global position."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

import shardckpt
from shardckpt.loading.state import (DataPosition, GradScalerState, ModelOptimizerState, ResumableSampler, RNGState,
    SchedulerState, Stateful, load_training_state)
from harness import run_ranks


def _draw():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_rng_roundtrip_single_process(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draw()
    rng = RNGState(seed=7)
    assert isinstance(rng, Stateful)
    shardckpt.save({"rng": rng}, tmp_path / "c")
    want = _draw()
    _draw()
    load_training_state({"rng": rng}, tmp_path / "c")
    assert _draw() == want


def _model_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, scaler, steps):
    for i in range(steps):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        loss = scaler.scale(model(x).pow(2).mean())
        loss.backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()


def test_model_optimizer_scheduler_scaler_plain(tmp_path):
    model, opt, sched = _model_opt(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    _train(model, opt, sched, scaler, 3)
    state = {"train": ModelOptimizerState(model, opt), "sched": SchedulerState(sched),
             "scaler": GradScalerState(scaler), "data": DataPosition(2, 48)}
    shardckpt.save(state, tmp_path / "c")
    model2, opt2, sched2 = _model_opt(1)  # another init; its optimizer has never stepped
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
    pos = DataPosition()
    load_training_state({"train": ModelOptimizerState(model2, opt2), "sched": SchedulerState(sched2),
                         "scaler": GradScalerState(scaler2), "data": pos}, tmp_path / "c")
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model2.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k]), k
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    assert scaler2.get_scale() == scaler.get_scale() and (pos.epoch, pos.index) == (2, 48)
    _train(model, opt, sched, scaler, 2)
    _train(model2, opt2, sched2, scaler2, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)  # training continues bit-identically


def test_sampler_resumes_on_any_world_size():
    n, B = 100, 12
    seen = []
    samplers = [ResumableSampler(n, B, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(5):
        for s in samplers:
            seen += s.next_batch()
    sd = samplers[0].state_dict()
    assert sd["position"] == {"epoch": 0, "index": 60}
    resumed = [ResumableSampler(n, B, rank=r, world_size=3, seed=5) for r in range(3)]
    for s in resumed:
        s.load_state_dict(sd)
    for _ in range(3):  # the rest of epoch 0 (96 samples: drop_last), then epoch 1 starts
        for s in resumed:
            seen += s.next_batch()
    order0 = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 1_000_003)).tolist()
    assert seen == [i for k in range(0, 96, 12) for i in order0[k:k + 12]]  # no sample skipped or repeated
    assert resumed[0].position.epoch == 0 and resumed[0].position.index == 96
    nxt = [i for s in resumed for i in s.next_batch()]
    assert resumed[0].position.epoch == 1 and len(nxt) == 12 and nxt != order0[:12]
    one = ResumableSampler(10, 4, rank=0, world_size=1, shuffle=False)
    assert list(one) == list(range(8)) and one.position.epoch == 1


def _ranks(rank, ws, root, phase):
    import torch.distributed as dist
    out = {}
    rng = RNGState(seed=11)
    if phase == "save":
        random.seed(100 + rank), np.random.seed(200 + rank), torch.manual_seed(300 + rank)
        shardckpt.save({"rng": rng}, os.path.join(root, "rng"))
        out["after"] = _draw()
        # FSDP2 model + optimizer through ModelOptimizerState
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (ws,))
        model, opt, _ = _model_opt(0)
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        for i in range(2):
            model(torch.randn(4, 6, generator=torch.Generator().manual_seed(i + rank))).sum().backward()
            opt.step()
            opt.zero_grad()
        shardckpt.save({"train": ModelOptimizerState(model, opt)}, os.path.join(root, "fsdp"))
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(model, opt)
        out["model"] = {k: v.full_tensor().numpy() for k, v in msd.items()}
        return out
    # load phase, maybe at another world size
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_training_state({"rng": rng}, os.path.join(root, "rng"))
    out["after"] = _draw()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (ws,))
    model, _, _ = _model_opt(3)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    load_training_state({"train": ModelOptimizerState(model, opt)}, os.path.join(root, "fsdp"))
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    out["model"] = {k: v.full_tensor().numpy() for k, v in msd.items()}
    out["optim"] = {k: {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).numpy() for n, t in v.items()}
                    for k, v in osd["state"].items()}
    dist.barrier()
    return out


def test_rng_per_rank_and_fsdp_resize(tmp_path):
    saved = run_ranks(2, _ranks, str(tmp_path), "save")
    assert saved[0]["after"] != saved[1]["after"]
    same = run_ranks(2, _ranks, str(tmp_path), "load")
    assert [o["after"] for o in same] == [o["after"] for o in saved]  # each rank got its own streams back
    resized = run_ranks(3, _ranks, str(tmp_path), "load")
    afters = [o["after"] for o in resized]
    assert len({str(a) for a in afters}) == 3 and not any(a in [o["after"] for o in saved] for a in afters)
    full = shardckpt.load_full(tmp_path / "fsdp")
    for outs in (same, resized):
        for o in outs:
            for k, v in o["model"].items():
                assert np.array_equal(v, saved[0]["model"][k]) and np.array_equal(v, full["train"]["model"][k].numpy())
            for k, st in o["optim"].items():
                for n, t in st.items():
                    assert np.array_equal(t, full["train"]["optim"]["state"][k][n].numpy()), (k, n)

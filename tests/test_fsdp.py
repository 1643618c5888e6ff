"""FSDP2 (fully_shard) model + AdamW state through DCP's get_state_dict/set_state_dict: saved at one world
size, restored at another (including an uneven split), compared bit-exactly; and FSDP2 + TP on a 2-D mesh."""
from __future__ import annotations


import pytest
import torch

import shardckpt
from harness import run_ranks


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(67, 24), torch.nn.Linear(24, 40), torch.nn.GELU(),
                               torch.nn.Linear(40, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 67, bias=False))


def _train_state(ws, mesh_shape=None):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = _model()
    if mesh_shape is None:
        mesh = init_device_mesh("cpu", (ws,))
        for layer in model:
            if any(p.requires_grad for p in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"1": ColwiseParallel(), "3": RowwiseParallel()})
        for i in (1, 3):
            fully_shard(model[i], mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, get_state_dict


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 67, (8, 5), generator=g)
    loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _save(rank, ws, path, mesh_shape):
    model, opt, get_state_dict = _train_state(ws, mesh_shape)
    for s in range(2):
        _step(model, opt, s)
    msd, osd = get_state_dict(model, opt)
    shardckpt.save({"model": msd, "optim": osd, "step": 2}, path)
    return True


def _restore(rank, ws, path, mesh_shape):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.tensor import DTensor
    model, opt, get_state_dict = _train_state(ws, mesh_shape)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": 0}
    shardckpt.load(state, path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ref = shardckpt.load_full(path)
    msd2, osd2 = get_state_dict(model, opt)
    n = 0
    for prefix, sd in (("model", msd2), ("optim", osd2)):
        flat = shardckpt.format.tree.flatten(sd).leaves
        for k, leaf in flat.items():
            v = leaf.value
            if isinstance(v, torch.Tensor):
                full = v.full_tensor() if isinstance(v, DTensor) else v
                key = f"{prefix}.{k}"
                assert torch.equal(full, _get(ref, key)), key
                n += 1
    assert state["step"] == 2
    _step(model, opt, 5)  # training goes on from the restored state
    return n


def _get(tree, dotted):
    node = tree
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        if isinstance(node, dict):
            for j in range(len(parts), i, -1):  # keys may contain dots (fqns)
                cand = ".".join(parts[i:j])
                key = int(cand) if cand.isdigit() and int(cand) in node else cand
                if key in node:
                    node, i = node[key], j
                    break
            else:
                raise KeyError(dotted)
        else:
            node, i = node[int(parts[i])], i + 1
    return node


@pytest.mark.parametrize("save_ws,load_ws", [(2, 3), (4, 1)])
def test_fsdp2_adamw_resharded(tmp_path, save_ws, load_ws):
    path = str(tmp_path / "ckpt")
    run_ranks(save_ws, _save, path, None)
    counts = run_ranks(load_ws, _restore, path, None)
    assert counts[0] > 10


def test_fsdp2_tp_2d_mesh_to_fsdp_only(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(4, _save, path, (2, 2))
    m = shardckpt.read_manifest(path)
    placements = {p for t in m.tensors.values() if t.layout for p in t.layout["placements"]}
    assert any(p.startswith("_S(") for p in placements), placements  # FSDP2 + TP: _StridedShard
    assert any(t.layout and len(t.layout["mesh"]) == 1 for t in m.tensors.values())  # dp sub-mesh copies
    counts = run_ranks(2, _restore, path, None)
    assert counts[0] > 10

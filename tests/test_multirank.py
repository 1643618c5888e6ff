"""Save at world sizes {1, 2, 4} with many layouts, load at {1, 2, 3, 4} with others, bit-exact."""
from __future__ import annotations

import os

import pytest
import torch

import shardckpt
from harness import run_ranks
from scenarios import distributed_state, full_of, full_state, make_mesh, zeros_like_state

SAVE_LAYOUTS = {1: [(1, 0)], 2: [(1, 0), (1, 1)], 4: [(1, 0), (2, 0), (2, 1)]}  # (mesh ndim, variant)
LOAD_LAYOUTS = {1: [(1, 2)], 2: [(1, 2), (1, 1)], 3: [(1, 0), (1, 1)], 4: [(2, 2), (1, 1), (2, 3)]}


def _save_all(rank, ws, root):
    import torch.distributed as dist
    full = full_state()
    names = []
    for mesh_ndim, variant in SAVE_LAYOUTS[ws]:
        mesh = make_mesh(ws, mesh_ndim)
        state = distributed_state(full, mesh, variant, plain=("vec", "f32_big"))
        state["step"] = 7
        state["nested"] = {"lr": 0.5, "betas": (0.9, 0.99), "name": "adamw", "list": [torch.arange(5), 3]}
        path = os.path.join(root, f"ws{ws}-m{mesh_ndim}-v{variant}")
        m = shardckpt.save(state, path, metadata={"ws": ws})
        assert m.world_size == ws and m.user_metadata == {"ws": ws}
        names.append(path)
    dist.barrier()
    return names


def _load_all(rank, ws, paths):
    full = full_state()
    checked = 0
    for path in paths:
        for mesh_ndim, variant in LOAD_LAYOUTS[ws]:
            if mesh_ndim == 2 and ws % 2:
                continue
            mesh = make_mesh(ws, mesh_ndim)
            state = zeros_like_state(distributed_state(full, mesh, variant, plain=("vec", "cube")))
            state["step"] = 0
            state["nested"] = {"lr": 0.0, "betas": (0.0, 0.0), "name": "", "list": [torch.zeros(5, dtype=torch.long), 0]}
            shardckpt.load(state, path)
            for k, ref in full.items():
                got = full_of(state[k])
                assert got.dtype == ref.dtype and torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1
                                                              and got.dtype.is_floating_point else got,
                                                              ref.view(torch.uint8) if ref.dtype.itemsize == 1
                                                              and ref.dtype.is_floating_point else ref), (path, k)
            assert state["step"] == 7 and state["nested"]["lr"] == 0.5 and state["nested"]["name"] == "adamw"
            assert torch.equal(state["nested"]["list"][0], torch.arange(5)) and state["nested"]["list"][1] == 3
            checked += 1
    return checked


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multirank"))
    paths = []
    for ws in (1, 2, 4):
        paths += run_ranks(ws, _save_all, root)[0]
    return paths


@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_reshard_load_bit_exact(saved, ws):
    counts = run_ranks(ws, _load_all, saved)
    assert all(c == counts[0] and c > 0 for c in counts)


def test_load_full_matches_every_saved_layout(saved):
    full = full_state()
    for path in saved:
        out = shardckpt.load_full(path)
        for k, ref in full.items():
            assert torch.equal(out[k].view(torch.uint8) if ref.dtype == torch.float8_e4m3fn else out[k],
                               ref.view(torch.uint8) if ref.dtype == torch.float8_e4m3fn else ref), (path, k)
        assert out["nested"]["betas"] == (0.9, 0.99) and out["step"] == 7


def test_replicated_data_written_once_and_split(saved):
    """Plain tensors and Replicate dims are written exactly once in total, spread over the replicas."""
    from shardckpt.loading.load import read_chunks
    from shardckpt.storage import storage_for
    path = [p for p in saved if "ws4-m1" in p][0]
    m = shardckpt.read_manifest(path)
    chunks = read_chunks(storage_for(path), m)
    for key, meta in m.tensors.items():
        assert sum(c.numel for c in chunks[key]) == meta.numel, key
    big = chunks["f32_big"]  # plain (replicated) in some layouts: split across ranks when large
    ranks_writing = {c.rank for c in big}
    assert len(ranks_writing) > 1
    assert len({f.rank for f in m.files}) == 4

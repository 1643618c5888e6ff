"""Staging: host buffers are reused across saves, and a state larger than a bounded pool streams through
it (sync and async) with the snapshot semantics intact."""
from __future__ import annotations

import pytest
import torch

import shardckpt
from shardckpt.saving import staging
from shardckpt.loading.load import read_chunks
from shardckpt.storage import storage_for

BOUND = 256 << 10


def _state():
    g = torch.Generator().manual_seed(5)
    return {"big": torch.randn(1000, 300, generator=g), "mid": torch.randn(200, 100, generator=g).bfloat16(),
            "small": torch.arange(10), "strided": torch.randn(300, 400, generator=g).t(), "step": 3}


@pytest.fixture
def bounded_pool(monkeypatch):
    monkeypatch.setenv("SHARDCKPT_POOL_BYTES", str(BOUND))
    pool = staging.HostBufferPool()
    monkeypatch.setattr(staging, "_default_pool", pool)
    import importlib
    am = importlib.import_module("shardckpt.saving.async_save")
    am.reset()
    yield pool
    am.reset()


def _check(path, ref):
    out = shardckpt.load_full(path)
    for k, v in ref.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k


def test_sync_save_streams_through_a_bounded_pool(tmp_path, bounded_pool):
    st = _state()
    shardckpt.save(st, tmp_path / "a")  # "strided" is not contiguous: it goes through the pool
    _check(tmp_path / "a", st)
    assert bounded_pool.capacity <= BOUND


def test_async_save_streams_and_keeps_snapshot_semantics(tmp_path, bounded_pool):
    st = _state()
    ref = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
    h = shardckpt.async_save(st, tmp_path / "b")
    for v in st.values():
        if isinstance(v, torch.Tensor):
            v.zero_() if v.dtype != torch.bool else None  # training goes on and overwrites everything
    h.wait()
    _check(tmp_path / "b", ref)
    m = shardckpt.read_manifest(tmp_path / "b")
    chunks = read_chunks(storage_for(tmp_path / "b"), m)
    assert len(chunks["big"]) > 1  # 1.2 MB > the 256 KiB bound: written as slabs of rows
    pools = [p for s in __import__("importlib").import_module("shardckpt.saving.async_save")._savers.values()
             for p in s.pools]
    assert pools and all(p.capacity <= BOUND for p in pools)


def test_pool_is_reused_across_saves(tmp_path):
    pool = staging.HostBufferPool(max_bytes=None)
    st = {"w": torch.randn(500, 500)}
    from shardckpt.plan.save_plan import plan_tensor
    _, item = plan_tensor("w", st["w"], "auto", 0, 1)
    for _ in range(3):
        (v,) = staging.stage([item], pool)
        assert torch.equal(v, st["w"])
    assert pool.allocations == 1


def test_a_row_larger_than_the_pool_is_a_clear_error(tmp_path, bounded_pool):
    with pytest.raises(shardckpt.SaveError, match="SHARDCKPT_POOL_BYTES"):  # on every rank, at the commit
        shardckpt.async_save({"w": torch.randn(2, 100_000)}, tmp_path / "c").wait()
    assert not (tmp_path / "c" / "manifest.json").exists()


def _bounded_multirank(rank, ws, path):
    from scenarios import distributed_state, full_state, make_mesh
    st = distributed_state(full_state(), make_mesh(ws, 1), 0, plain=("vec", "f32_big"))
    shardckpt.async_save(st, path).wait()
    return True


def test_bounded_pool_multirank_async(tmp_path):
    from harness import run_ranks
    from scenarios import full_state
    path = str(tmp_path / "m")
    run_ranks(2, _bounded_multirank, path, env={"SHARDCKPT_POOL_BYTES": str(BOUND)})
    out = shardckpt.load_full(path)
    for k, v in full_state().items():
        assert torch.equal(out[k].view(torch.uint8), v.view(torch.uint8)) if v.dtype.itemsize == 1 and \
            v.dtype.is_floating_point else torch.equal(out[k], v), k

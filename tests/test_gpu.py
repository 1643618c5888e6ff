"""CUDA path: D2H snapshot into the pinned pool on a side stream. Runs only where a GPU is present (the
`gpu` marker skips it elsewhere, including CI)."""
from __future__ import annotations

import pytest
import torch

import shardckpt

pytestmark = pytest.mark.gpu


def test_cuda_tensors_save_and_load_bit_exact(tmp_path):
    st = {"w": torch.randn(1000, 1000, device="cuda").bfloat16(), "b": torch.arange(7, device="cuda")}
    shardckpt.save(st, tmp_path / "a")
    out = {k: torch.zeros_like(v) for k, v in st.items()}
    shardckpt.load(out, tmp_path / "a")
    assert all(torch.equal(out[k], st[k]) for k in st)


def test_async_snapshot_of_cuda_tensors_ignores_later_updates(tmp_path):
    w = torch.randn(4096, 4096, device="cuda")
    ref = w.cpu()
    h = shardckpt.async_save({"w": w}, tmp_path / "b")
    w.add_(1.0)  # queued after the snapshot returned: must not leak into the checkpoint
    h.wait()
    assert torch.equal(shardckpt.load_full(tmp_path / "b")["w"], ref)
    from shardckpt.saving.staging import HostBufferPool
    assert HostBufferPool().pin  # with CUDA the staging pool is pinned host memory


def _exchange_into_cuda(rank, ws, path):
    """Two ranks on one GPU: a read-once restore (gloo exchange) decoding into CUDA tensors."""
    want = shardckpt.load_full(path)
    out = {k: torch.zeros_like(v, device="cuda") for k, v in want.items() if isinstance(v, torch.Tensor)}
    shardckpt.load(out, path)
    shardckpt.shutdown()
    return all(torch.equal(out[k].cpu(), want[k]) for k in out)


def test_exchange_restore_into_cuda_tensors(tmp_path):
    from harness import run_ranks
    st = {"w": torch.randn(2048, 1024).bfloat16(), "b": torch.arange(7)}
    shardckpt.save(st, tmp_path / "x")
    assert run_ranks(2, _exchange_into_cuda, str(tmp_path / "x"), timeout=120) == [True, True]

"""A load's fetch batches (reader._batches: small first batches, then at most BATCH_BYTES of whole tasks, in
file order) and its phase timers (shardckpt.loading.profile): a load through small batches stays bit-exact,
and the timers count only while switched on."""
from __future__ import annotations

import pytest
import torch

import shardckpt
from shardckpt.format.metadata import read_manifest
from shardckpt.loading import profile, reader
from shardckpt.loading.load import read_chunks
from shardckpt.storage import storage_for


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(reader, "TASK_BYTES", 256 << 10)
    monkeypatch.setattr(reader, "FIRST_BATCH_BYTES", 128 << 10)
    monkeypatch.setattr(reader, "BATCH_BYTES", 512 << 10)


def _ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"w": (torch.randn(1024, 1024, generator=g) * 0.02).to(torch.bfloat16),
             "b": torch.randn(4096, 64, generator=g), "step": 3}
    path = str(tmp_path / "ck")
    shardckpt.save(state, path, frame_size=64 << 10)
    return state, path


def _tasks(path, dests):
    storage = storage_for(path)
    manifest = read_manifest(storage)
    chunks = read_chunks(storage, manifest)
    targets = [reader.Target(k, (0,) * t.dim(), tuple(t.shape), t) for k, t in dests.items()]
    return reader.plan_reads(targets, manifest, chunks)


def test_batches_start_small_then_cap_whole_tasks_in_order(tmp_path, small_batches):
    state, path = _ckpt(tmp_path)
    tasks = _tasks(path, {k: torch.empty_like(v) for k, v in state.items() if isinstance(v, torch.Tensor)})
    batches = reader._batches(tasks)
    sizes = [sum(f.stored for f in b) for b in batches]
    assert len(batches) >= 4
    assert sizes[0] <= reader.FIRST_BATCH_BYTES or len(batches[0]) == 1
    limit = reader.FIRST_BATCH_BYTES
    for b, size in zip(batches, sizes):  # each within its limit, unless it is one task alone
        assert size <= limit or len(b) == 1
        assert len({(f.task.chunk.base, f.task.chunk.file) for f in b}) == 1
        limit = min(2 * limit, reader.BATCH_BYTES)
    assert max(sizes) > reader.FIRST_BATCH_BYTES  # the limit grew
    assert [f.task for b in batches for f in b] == [t for t in tasks if reader.frame_span(
        t.chunk.sizes, t.meta.itemsize, t.chunk.frame_size, t.row_lo, t.row_hi).nbytes]


@pytest.mark.parametrize("backend", ["native", "python"])
def test_load_through_small_batches_is_bit_exact(tmp_path, small_batches, monkeypatch, backend):
    from shardckpt.native import kernels
    monkeypatch.setattr(reader, "_ext", kernels.backend(backend))
    state, path = _ckpt(tmp_path)
    into = {"w": torch.zeros(1024, 1024, dtype=torch.bfloat16), "b": torch.zeros(4096, 64), "step": 0}
    shardckpt.load(into, path)
    assert torch.equal(into["w"], state["w"]) and torch.equal(into["b"], state["b"]) and into["step"] == 3
    part = {"w": torch.zeros(300, 1024, dtype=torch.bfloat16)}  # rows cut mid-frame: scratch + copy path
    storage = storage_for(path)
    manifest = read_manifest(storage)
    tasks = reader.plan_reads([reader.Target("w", (101, 0), (300, 1024), part["w"])], manifest,
                              read_chunks(storage, manifest, ["w"]))
    reader.run_reads(storage, manifest, tasks)
    assert torch.equal(part["w"], state["w"][101:401])


def test_profile_counts_phases_only_while_on(tmp_path):
    state, path = _ckpt(tmp_path)
    into = {"w": torch.zeros(1024, 1024, dtype=torch.bfloat16), "b": torch.zeros(4096, 64), "step": 0}
    shardckpt.load(into, path)  # off: nothing is recorded anywhere
    assert profile.stop() == dict.fromkeys(profile.PHASES, 0.0)
    profile.start()
    shardckpt.load(into, path)
    got = profile.stop()
    assert set(got) == set(profile.PHASES)
    for name in ("metadata", "planning", "read_wait", "decode", "read_io"):
        assert got[name] > 0, name
    assert got["collectives"] == 0  # no process group: no collectives
    shardckpt.load(into, path)
    assert profile.stop() == dict.fromkeys(profile.PHASES, 0.0)  # off again after stop()

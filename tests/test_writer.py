"""The per-rank write path: the chunks of small tensors are gathered into few storage writes, frame offsets
stay right across gathered and ungathered chunks, and manifest/index parsing pauses the garbage collector
without ever leaving it off."""
from __future__ import annotations

import gc
import threading

import pytest
import torch

import shardckpt
from shardckpt.format import records as fmt
from shardckpt.saving import writer
from shardckpt.storage import local


def _state():
    g = torch.Generator().manual_seed(11)
    st = {f"layer{i}.bias": torch.randn(64 + i, generator=g) for i in range(300)}  # many small chunks
    st["big"] = torch.randn(3000, 1000, generator=g).bfloat16()                    # several batches
    st["ints"] = torch.randint(0, 5, (5000,), generator=g)
    for i in range(50):                                                            # small after big
        st[f"tail{i}"] = torch.randn(10, generator=g).double()
    return st


@pytest.mark.parametrize("codec", ["auto", "raw"])
def test_small_chunks_are_gathered_and_read_back(tmp_path, monkeypatch, codec):
    writes = []
    real = local._LocalWriter.write
    monkeypatch.setattr(local._LocalWriter, "write", lambda self, data: (writes.append(len(data)), real(self, data)))
    st = _state()
    shardckpt.save(st, tmp_path / "c", codec=codec)
    data_writes = [n for n in writes if n]  # the index and manifest are one write each
    if codec == "auto":
        # 352 chunks gathered into buffers of >= FLUSH_BYTES: a handful of writes, not one per tensor
        assert len(data_writes) < 20, data_writes
    out = shardckpt.load_full(tmp_path / "c")
    assert out.keys() == st.keys()
    for k, v in st.items():
        assert torch.equal(out[k], v), k


def test_gathering_respects_buffer_capacity(tmp_path, monkeypatch):
    # a tiny gather threshold and frame size: buffers flush often, and a batch that does not fit behind what is
    # gathered goes first to a fresh buffer
    monkeypatch.setattr(writer, "FLUSH_BYTES", 3000)
    st = _state()
    shardckpt.save(st, tmp_path / "c", frame_size=4096)
    out = shardckpt.load_full(tmp_path / "c")
    for k, v in st.items():
        assert torch.equal(out[k], v), k


def test_without_gc_pauses_and_restores_the_collector():
    seen = []
    probe = fmt.without_gc(lambda: seen.append(gc.isenabled()))
    assert gc.isenabled()
    probe()
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        probe()
        assert not gc.isenabled()  # a caller who turned it off keeps it off
    finally:
        gc.enable()

    # overlapping calls from several threads: off while any runs, back on after the last
    barrier = threading.Barrier(4)
    slow = fmt.without_gc(lambda: (barrier.wait(), seen.append(gc.isenabled())))
    threads = [threading.Thread(target=slow) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[-4:] == [False] * 4 and gc.isenabled()


def test_without_gc_restores_on_error():
    def boom():
        raise ValueError("bad manifest")
    with pytest.raises(ValueError):
        fmt.without_gc(boom)()
    assert gc.isenabled()


def test_repeat_saves_reuse_the_plan_but_write_the_new_tensors(tmp_path, monkeypatch):
    from shardckpt.plan import save_plan as plan
    g = torch.Generator().manual_seed(3)
    st = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).bfloat16()}
    shardckpt.save(st, tmp_path / "a")
    slow = []
    real = plan._plan_tensor
    monkeypatch.setattr(plan, "_plan_tensor", lambda *a: (slow.append(a[0]), real(*a))[1])
    new = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).bfloat16()}
    shardckpt.save(new, tmp_path / "b")
    assert slow == []  # same structure: remembered
    out = shardckpt.load_full(tmp_path / "b")
    assert torch.equal(out["w"], new["w"]) and torch.equal(out["b"], new["b"])
    # a changed shape or dtype under the same key is planned afresh
    changed = {"w": torch.randn(8, 32, generator=g), "b": torch.randn(32, generator=g)}
    shardckpt.save(changed, tmp_path / "c")
    assert sorted(slow) == ["b", "w"]
    out = shardckpt.load_full(tmp_path / "c")
    assert torch.equal(out["w"], changed["w"]) and torch.equal(out["b"], changed["b"])


def _save_and_report(rank, ws, path):
    from shardckpt.saving import pipeline
    reads = []
    real = pipeline.read_manifest
    pipeline.read_manifest = lambda *a, **k: (reads.append(1), real(*a, **k))[1]
    m = shardckpt.save({"w": torch.arange(10.0) + rank * 0, "step": 3}, path)
    during = len(reads)
    return type(m).__name__, during, m.save_id, m.keys(), len(reads), m == real(path)


def test_save_returns_the_manifest_without_every_rank_fetching_it(tmp_path):
    from harness import run_ranks
    (kind0, during0, id0, keys0, _, eq0), (kind1, during1, id1, keys1, after1, eq1) = \
        run_ranks(2, _save_and_report, str(tmp_path / "c"))
    assert kind0 == "Manifest" and during0 == 0       # the coordinator parses what it committed
    assert during1 == 0 and after1 == 1               # the others fetch it on first use, once
    assert id0 == id1 and keys0 == keys1 == ["step", "w"] and eq0 and eq1

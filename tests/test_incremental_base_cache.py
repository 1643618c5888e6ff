"""The base index a process just wrote is kept in memory for the next incremental save on it
(saving.incremental.remember_index / remember_manifest): used only when the committed base on storage is the
one kept (same save_id, index size and crc32c), never when the base was replaced under the process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import shardckpt
from shardckpt import CheckpointManager
from shardckpt.format.parse import parse_index
from shardckpt.saving import incremental
from shardckpt.storage import storage_for

from test_incremental import _refs, _same, _state, _train


@pytest.fixture(autouse=True)
def _fresh():
    incremental.forget_all()
    yield
    incremental.forget_all()


def _from_storage(path) -> dict:
    """Every rank's chunks of the checkpoint at `path` as parse_index reads them from storage."""
    st = storage_for(str(path))
    m = shardckpt.read_manifest(path)
    return {f.rank: {(c.key, c.offsets, c.sizes): c for c in parse_index(st.read_file(f.index), f, m)}
            for f in m.files}


def _remembered(path) -> dict:
    m = shardckpt.read_manifest(path)
    return {f.rank: incremental._remembered_chunks(storage_for(str(path)).url, m, f) for f in m.files}


@pytest.mark.parametrize("async_save", [False, True])
def test_remembered_chunks_equal_the_index_read_back(tmp_path, async_save):
    """What load_base takes from memory is exactly what parse_index makes of the files: written chunks and
    references (a chain a -> b -> c: c refers to a's and b's frames), bf16 and int64 tensors."""
    save = shardckpt.async_save if async_save else shardckpt.save
    st = _state()
    for name, base in (("a", None), ("b", "a"), ("c", "b")):
        _train(st, ord(name))
        h = save(st, tmp_path / name, **({"base": tmp_path / base} if base else {"content_hash": True}))
        if async_save:
            h.wait()
    assert _refs(tmp_path / "c")["frozen.w"] and not _refs(tmp_path / "c")["head"]
    for name in "abc":
        kept = _remembered(tmp_path / name)
        assert all(v is not None for v in kept.values())
        assert kept == _from_storage(tmp_path / name)


def test_a_valid_remembered_base_is_not_read_again(tmp_path, monkeypatch):
    """The index and the manifest's parse come from memory: a save whose base this process wrote succeeds
    with both readers broken, refers to the base and loads bit-exact."""
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    _train(st, 1)

    def refuse(*a, **k):
        raise AssertionError("read again")
    monkeypatch.setattr(incremental, "parse_index", refuse)
    monkeypatch.setattr(incremental, "parse_manifest", refuse)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    assert _refs(tmp_path / "b") == {"frozen.w": True, "frozen.emb": True, "head": False, "ids": True}
    monkeypatch.undo()
    assert _same(shardckpt.load_full(tmp_path / "b"), st)


def _swap_in(tmp_path, name: str, other: str) -> None:
    """Replace checkpoint `name` by `other` (renamed over it), as another process or a person would."""
    shutil.move(tmp_path / name, tmp_path / f"{name}-old")
    shutil.move(tmp_path / other, tmp_path / name)


def test_a_base_replaced_under_the_process_is_read_from_storage(tmp_path, monkeypatch):
    """The base's directory is replaced by another committed checkpoint after this process wrote (and kept)
    its index: the kept one names another save_id, so the save reads the new base's index and refers only
    to its frames (had it used the kept records it would refer to data no longer there)."""
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    other = _state(seed=1)
    other["frozen"]["emb"] = st["frozen"]["emb"].clone()  # emb equal in both bases, w only in the new one
    shardckpt.save(other, tmp_path / "x", content_hash=True)
    _swap_in(tmp_path, "a", "x")
    new_sid = shardckpt.read_manifest(tmp_path / "a").save_id
    calls = []
    real = incremental.parse_index
    monkeypatch.setattr(incremental, "parse_index", lambda *a: calls.append(1) or real(*a))
    _train(other, 1)
    m = shardckpt.save(other, tmp_path / "b", base=tmp_path / "a")
    assert calls, "the replaced base's index was not read from storage"
    assert [(b.dir, b.save_id) for b in m.bases] == [("a", new_sid)]
    assert _refs(tmp_path / "b") == {"frozen.w": True, "frozen.emb": True, "head": False, "ids": True}
    shutil.rmtree(tmp_path / "a-old")  # the first base's data is not needed by anything
    assert _same(shardckpt.load_full(tmp_path / "b"), other)


def test_a_kept_index_with_another_checksum_is_not_used(tmp_path, monkeypatch):
    """Same save_id, but the committed index is not the one kept (size or crc32c differ): read from storage."""
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    key = next(iter(incremental._indexes))
    kept = incremental._indexes[key]
    bogus = [dict(r, hash="0" * 32) for r in kept.records]  # would match nothing, writing everything
    incremental._indexes[key] = incremental._Written(kept.save_id, kept.index_size, kept.index_crc32c ^ 1, bogus)
    _train(st, 1)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    assert _refs(tmp_path / "b") == {"frozen.w": True, "frozen.emb": True, "head": False, "ids": True}
    assert _same(shardckpt.load_full(tmp_path / "b"), st)


_OVERWRITE = """
import sys, torch, shardckpt
sys.path.insert(0, sys.argv[2])
from test_incremental import _state
st = _state(seed=5)
st["head"] = torch.full((64, 8), 3.0)
shardckpt.save(st, sys.argv[1], overwrite=True, content_hash=True)
"""


def test_a_base_overwritten_by_another_process_under_the_manager(tmp_path):
    """A manager saves step 1; another process overwrites step 1 (overwrite=True, a new save_id); the
    manager's next incremental save must compare against what is on storage now: it refers to the new
    step 1's frames where they equal, writes the rest, and loads bit-exact."""
    st = _state()
    with CheckpointManager(tmp_path, incremental=True, preemption_signals=()) as mgr:
        mgr.save(1, st)
        step1 = tmp_path / "step-0000000001"
        res = subprocess.run([sys.executable, "-c", _OVERWRITE, str(step1), os.path.dirname(__file__)],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert res.returncode == 0, res.stderr
        new = shardckpt.read_manifest(step1)
        st2 = _state(seed=5)  # frozen.w and emb as the new step 1 holds them; head as neither holds it
        st2["head"] = torch.full((64, 8), 7.0)
        mgr.save(2, st2)
    m2 = shardckpt.read_manifest(tmp_path / "step-0000000002")
    assert [(b.dir, b.save_id) for b in m2.bases] == [("step-0000000001", new.save_id)]
    assert _refs(tmp_path / "step-0000000002") == {"frozen.w": True, "frozen.emb": True, "head": False,
                                                    "ids": True}
    assert _same(shardckpt.load_full(tmp_path / "step-0000000002"), st2)


def _order(path) -> list[str]:
    import json
    m = shardckpt.read_manifest(path)
    return [c["key"] for c in json.load(open(os.path.join(path, m.files[0].index)))["chunks"]]


@pytest.mark.parametrize("backend", ["native", "python"])
def test_chunks_the_base_wrote_itself_are_hashed_and_written_first(tmp_path, monkeypatch, backend):
    """BaseChunks.changed_first: a save on a base puts first the chunks the base wrote (not referred to),
    then the rest in plan order; both backends; the result loads bit-exact."""
    from shardckpt.native import kernels
    for name in ("xxh3_128", "xxh3_128_many", "encode_frames", "crc32c_frames"):
        monkeypatch.setattr(kernels, name, getattr(kernels.backend(backend), name))
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    for name, base in (("b", "a"), ("c", "b")):
        _train(st, ord(name))
        shardckpt.save(st, tmp_path / name, base=tmp_path / base)
    plan = _order(tmp_path / "a")
    assert plan.index("head") > 0  # not first in plan order
    assert _order(tmp_path / "c") == ["head"] + [k for k in plan if k != "head"]
    assert _same(shardckpt.load_full(tmp_path / "c"), st)

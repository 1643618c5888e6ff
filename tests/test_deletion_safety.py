"""The one deleter (shardckpt.lifecycle.deleter, FORMAT.md §9): nothing is deleted on a guess. One process each; the
multi-rank cases (direct-read agreement, prompt errors, local-tier timelines) are in test_safety_ranks.py and
the model-checked sequences in test_safety_model.py."""
from __future__ import annotations

import logging
import os

import pytest
import torch

import shardckpt
from shardckpt import CheckpointManager
from shardckpt.lifecycle import deleter
from shardckpt.errors import SaveError, StorageError
from shardckpt.storage.local import LocalStorage

from test_incremental import _same, _state, _train


def _loads(path, want) -> bool:
    return _same(shardckpt.load_full(path), want)


def _a_then_b(tmp_path):
    """A saved with content hashes, B with base=A, then the state trained on: (a, b, state, B's state)."""
    a, b = tmp_path / "a", tmp_path / "b"
    st = _state()
    shardckpt.save(st, a, content_hash=True)
    _train(st, 1)
    shardckpt.save(st, b, base=a)
    b_state = _snapshot(st)
    _train(st, 2)
    return a, b, st, b_state


def test_overwrite_keeps_data_a_committed_sibling_refers_to(tmp_path):
    """Defect 1: save A (hashed), B with base=A, A again with overwrite=True: B still loads."""
    a, b, st, b_state = _a_then_b(tmp_path)
    shardckpt.save(st, a, overwrite=True)
    assert _loads(b, b_state)
    assert _loads(a, _snapshot(st))
    assert len(os.listdir(a / "data")) == 2  # the replaced data stays: b refers to it
    deleter.retire(LocalStorage(str(tmp_path)), "b")  # its last referrer goes: so does it
    assert len(os.listdir(a / "data")) == 1 and _loads(a, _snapshot(st))


def test_overwrite_with_a_base_that_refers_into_the_replaced_data(tmp_path):
    """Defect 1, variant: save(A, base=B, overwrite=True) where B refers into A's old data: the new A's
    references resolve to A/data/<old>, which the replace must not delete; both load."""
    a, b, st, b_state = _a_then_b(tmp_path)
    shardckpt.save(st, a, base=b, overwrite=True)
    assert _loads(a, _snapshot(st)) and _loads(b, b_state)
    # once b is retired, nothing but the new a needs the old data, which a itself refers to: still kept
    deleter.retire(LocalStorage(str(tmp_path)), "b")
    assert _loads(a, _snapshot(st))


def test_retention_and_gc_count_references_from_any_sibling_name(tmp_path):
    """Defect 2: a manager with keep_last=1, incremental, plus save(root/"final", base=step-1): after
    step 2 (which retires step 1) `final` still loads, and gc with grace 0 frees none of its data."""
    st = _state()
    with CheckpointManager(tmp_path, keep_last=1, incremental=True, full_every=1, async_save=False,
                           preemption_signals=()) as mgr:  # full_every=1: step 2 refers to nothing
        _train(st, 1)
        mgr.save(1, st)
        _train(st, 5)
        shardckpt.save(st, tmp_path / "final", base=tmp_path / "step-0000000001")
        final = _snapshot(st)
        _train(st, 2)
        mgr.save(2, st)
        assert mgr.steps() == [2]
    assert _loads(tmp_path / "final", final)
    assert shardckpt.manager.gc_uncommitted(tmp_path, dry_run=False, grace_s=0) == []
    assert _loads(tmp_path / "final", final)


def test_a_transient_read_error_never_deletes_the_best_step(tmp_path, monkeypatch, caplog):
    """Defect 4: one failed manifest read of the best step during retention: it is kept, with a warning."""
    st = _state()
    mgr = CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="loss", async_save=False,
                            preemption_signals=())
    for step, loss in ((1, 0.1), (2, 0.5)):
        _train(st, step)
        mgr.save(step, st, metrics={"loss": loss})
    assert mgr.steps() == [1, 2]
    best = str(tmp_path / "step-0000000001" / "manifest.json")
    real = LocalStorage.read_file
    fail = {"left": 1}

    def flaky(self, rel):
        if os.path.join(self.root, rel) == best and fail["left"]:
            fail["left"] -= 1
            raise StorageError("transient: connection reset", file=best)
        return real(self, rel)
    monkeypatch.setattr(LocalStorage, "read_file", flaky)
    _train(st, 3)
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        mgr.save(3, st, metrics={"loss": 0.9})
    assert fail["left"] == 0  # the error was met
    assert 1 in mgr.steps()  # kept: its rank could not be read
    assert "retention keeps it" in caplog.text
    monkeypatch.setattr(LocalStorage, "read_file", real)
    assert mgr.best_step() == 1
    mgr.close()


def test_retention_of_the_base_while_an_incremental_save_is_in_flight(tmp_path):
    """Defect 5: an async save with base=X is in flight while another manager's retention retires X: the
    pin keeps X's data, so the save commits and loads; after it, the data goes with X's last referrer."""
    st = _state()
    other = CheckpointManager(tmp_path, keep_last=1, async_save=False, preemption_signals=())
    _train(st, 1)
    shardckpt.save(st, tmp_path / "step-0000000001", content_hash=True)
    _train(st, 2)
    handle = shardckpt.async_save(st, tmp_path / "final", base=tmp_path / "step-0000000001")
    final = _snapshot(st)
    pins = os.listdir(tmp_path / deleter.PINS_DIR)
    assert len(pins) == 1  # the in-flight save's base is pinned
    _train(st, 3)
    other.save(3, st)  # retires step 1 (keep_last=1) while the async save may still run
    handle.wait()
    assert other.steps() == [3]
    assert _loads(tmp_path / "final", final)
    assert os.listdir(tmp_path / deleter.PINS_DIR) == []  # unpinned after the commit
    other.close()


def test_a_base_retired_before_the_pin_fails_the_save_instead_of_dangling(tmp_path, monkeypatch):
    """Defect 5, the other order: the base's manifest goes between reading it and pinning it: the save
    refuses (nothing written) rather than commit references to data that may be freed."""
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    real = deleter.pin

    def pin_after_retire(parent, save_id, needs):
        deleter.retire(parent, "a")  # another job's retention, just before our pin lands
        real(parent, save_id, needs)
    monkeypatch.setattr(deleter, "pin", pin_after_retire)
    with pytest.raises(SaveError, match="deleted or replaced"):
        shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_a_data_dir_removed_during_the_save_fails_its_commit(tmp_path, monkeypatch):
    """Defect 5, a deleter that honours no pin (a person, another tool): checked again before the commit."""
    from shardckpt.saving import pipeline
    from shardckpt import api
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    real = pipeline._build_manifest

    def remove_base_then_build(p, files):
        import shutil
        shutil.rmtree(tmp_path / "a" / "data")
        return real(p, files)
    monkeypatch.setattr(pipeline, "_build_manifest", remove_base_then_build)
    with pytest.raises(SaveError, match="is gone"):
        shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_an_unknown_commit_outcome_on_an_object_store_keeps_every_file(tmp_path, monkeypatch):
    """Defect 7: a create-only PUT that times out and whose read-back answers 404 may still land: files are
    kept and the error says the outcome is unknown (on a local disk the same 404 is certain)."""
    from shardckpt.storage.fsspec import FsspecStorage
    url = "memory://unknown-outcome/ckpt"
    monkeypatch.setattr(FsspecStorage, "settles_on_error", property(lambda self: False), raising=False)

    def timeout(self, relpath, data):
        raise StorageError("PUT timed out after 3 retries", file=self._url(relpath))
    monkeypatch.setattr(FsspecStorage, "commit", timeout)
    with pytest.raises(SaveError) as e:
        shardckpt.save(_state(), url)
    assert e.value.outcome_unknown and "unknown" in str(e.value)
    st = shardckpt.storage.storage_for(url)
    assert st.list_files("data")  # kept: a late PUT would find its data
    monkeypatch.undo()
    with pytest.raises(SaveError) as e:  # local files settle: the same failure is certain, files removed
        monkeypatch.setattr(LocalStorage, "commit", lambda self, rel, data: (_ for _ in ()).throw(
            StorageError("disk full", file=rel)))
        shardckpt.save(_state(), tmp_path / "c")
    assert not e.value.outcome_unknown and "nothing was committed" in str(e.value)
    assert not any(f for _, _, f in os.walk(tmp_path / "c" / "data"))


def test_retire_makes_the_manifest_removal_durable_before_touching_data(tmp_path, monkeypatch):
    """Defect 8: the manifest's delete is fsynced (its directory) before any data is deleted."""
    shardckpt.save(_state(), tmp_path / "a")
    ops = []
    for name in ("delete", "delete_tree", "sync_dir"):
        real = getattr(LocalStorage, name)

        def spy(self, rel="", _real=real, _name=name):
            ops.append((_name, os.path.relpath(os.path.join(self.root, rel), tmp_path)))
            return _real(self, rel)
        monkeypatch.setattr(LocalStorage, name, spy)
    deleter.retire(LocalStorage(str(tmp_path)), "a")
    first_data = next(i for i, (op, _) in enumerate(ops) if op == "delete_tree")
    assert ("delete", "a/manifest.json") in ops[:first_data]
    assert ("sync_dir", "a") in ops[ops.index(("delete", "a/manifest.json")):first_data]
    assert not (tmp_path / "a").exists()


def test_retire_keeps_all_data_when_a_manifest_cannot_be_read(tmp_path, monkeypatch):
    """Positive evidence only: a sibling whose manifest cannot be read might refer to anything."""
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    real = LocalStorage.read_file

    def broken(self, rel):
        if self.root.endswith("/b") and rel == "manifest.json":
            raise StorageError("transient", file=rel)
        return real(self, rel)
    monkeypatch.setattr(LocalStorage, "read_file", broken)
    assert deleter.retire(LocalStorage(str(tmp_path)), "a") == []
    assert deleter.gc_uncommitted(tmp_path, dry_run=False, grace_s=0) == []
    monkeypatch.undo()
    assert _loads(tmp_path / "b", st)


def test_export_overwrite_never_deletes_checkpoint_files(tmp_path):
    with pytest.raises(StorageError, match="refusing"):
        deleter.remove_export_files(LocalStorage(str(tmp_path)), ["model.safetensors", "manifest.json"])


def _snapshot(st: dict) -> dict:
    return {k: (_snapshot(v) if isinstance(v, dict) else v.clone() if isinstance(v, torch.Tensor) else v)
            for k, v in st.items()}

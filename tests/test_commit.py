"""The commit protocol (shardckpt/commit.py): a late commit error never deletes a committed checkpoint's data,
files go only when nothing certainly committed, and every failure of any type reaches every rank at once."""
from __future__ import annotations

import errno
import os
import time

import pytest
import torch

import shardckpt
from shardckpt import errors
from shardckpt.lifecycle import commit
from shardckpt.errors import CheckpointExistsError, KeyMismatchError, SaveError, StorageError
from shardckpt.storage import local as local_storage
from shardckpt.storage.fsspec import FsspecStorage
from harness import run_ranks


def _state():
    return {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "b": torch.ones(64), "step": 3}


def _fsync_dir_fails_after_link(monkeypatch):
    """The directory fsync that follows link() in LocalStorage.commit raises EIO (the manifest is in place)."""
    real = local_storage.fsync_dir

    def flaky(path):
        if os.path.exists(os.path.join(path, "manifest.json")):
            raise OSError(errno.EIO, "Input/output error")
        real(path)
    monkeypatch.setattr(local_storage, "fsync_dir", flaky)


def test_late_local_commit_error_keeps_the_committed_checkpoint(tmp_path, monkeypatch):
    _fsync_dir_fails_after_link(monkeypatch)
    path = str(tmp_path / "c")
    m = shardckpt.save(_state(), path)  # the manifest read back is this save's: committed
    monkeypatch.undo()
    assert m.save_id == shardckpt.read_manifest(path).save_id
    out = shardckpt.load_full(path)
    assert torch.equal(out["w"], _state()["w"]) and out["step"] == 3


def test_late_412_on_a_retried_put_keeps_the_committed_checkpoint(monkeypatch):
    """An object store's retried create-only PUT whose first attempt landed answers 412."""
    real = FsspecStorage.commit

    def retried(self, relpath, data):
        real(self, relpath, data)
        raise CheckpointExistsError("a committed manifest already exists", file=relpath)
    monkeypatch.setattr(FsspecStorage, "commit", retried)
    url = f"memory://late412-{time.time_ns()}/c"
    shardckpt.save(_state(), url)
    monkeypatch.undo()
    assert torch.equal(shardckpt.load_full(url)["b"], torch.ones(64))


def test_commit_failing_before_the_manifest_removes_the_files(tmp_path, monkeypatch):
    def refuse(self, relpath, data):
        raise StorageError("disk full", file=relpath)
    monkeypatch.setattr(local_storage.LocalStorage, "commit", refuse)
    path = tmp_path / "c"
    with pytest.raises(SaveError, match="nothing was committed"):
        shardckpt.save(_state(), str(path))
    assert [f for f in (path / "data").rglob("*") if f.is_file()] == []


def test_unknown_commit_state_keeps_every_file(tmp_path, monkeypatch):
    """The commit fails and the manifest cannot be read back: no one knows whether it committed."""
    def fails(self, relpath, data):
        raise StorageError("connection reset", file=relpath)

    def unreadable(self, relpath):
        raise StorageError("connection reset", file=relpath)
    monkeypatch.setattr(local_storage.LocalStorage, "commit", fails)
    monkeypatch.setattr(local_storage.LocalStorage, "read_file", unreadable)
    path = tmp_path / "c"
    with pytest.raises(SaveError, match="unknown; its files were kept"):
        shardckpt.save(_state(), str(path))
    assert len([f for f in (path / "data").rglob("*") if f.is_file()]) == 2  # data + index


def test_another_jobs_manifest_is_not_ours(tmp_path):
    path = str(tmp_path / "c")
    shardckpt.save(_state(), path)
    other = commit.read_back(shardckpt.storage.storage_for(path), "0" * 32)
    assert not other.committed and other.certain and other.exists


def test_error_text_fits_a_coordination_record():
    import json
    from shardckpt.dist import RECORD_BYTES
    for msg in ("x" * 20000, "\u00e9" * 20000, '"' * 20000):
        text = errors.error_text(RuntimeError(msg))
        assert len(json.dumps({"rank": 1, "ok": False, "error": text})) < RECORD_BYTES // 2
        assert text.startswith("RuntimeError: ") and text.endswith("(truncated)")
        # a typed error's record (the exchange and the restore agreement send these) fits too
        from shardckpt.errors import SaveError, error_record
        assert len(json.dumps(error_record(SaveError(msg, key="k"), 1))) < RECORD_BYTES // 2


# --------------------------------------------------------------- strict loads with keys= and key_map= (defect 3)

def test_strict_load_with_keys_and_key_map_considers_only_the_selection(tmp_path):
    path = str(tmp_path / "c")
    shardckpt.save({"model": {"w": torch.ones(3), "b": torch.zeros(2)}, "optim": {"m": torch.ones(3)}}, path)
    target = {"w": torch.zeros(3)}
    res = shardckpt.load(target, path, keys=["w"], key_map={"": "model."}, strict=True)
    assert torch.equal(target["w"], torch.ones(3)) and res.missing_keys == []
    with pytest.raises(KeyMismatchError) as e:  # a selected key the checkpoint lacks still fails
        shardckpt.load({"w": torch.zeros(3), "x": torch.zeros(1)}, path, keys=["w", "x"],
                       key_map={"": "model."}, strict=True)
    assert e.value.missing == ["x"] and e.value.unexpected == []
    with pytest.raises(KeyMismatchError):  # without keys=, the unselected saved keys are unexpected
        shardckpt.load({"w": torch.zeros(3)}, path, key_map={"": "model."}, strict=True)


def test_keys_name_the_callers_keys_when_filling_and_when_finding_unexpected_ones(tmp_path):
    """Issue 22 item 11: keys= is read in the caller's name space everywhere (before key_map)."""
    path = str(tmp_path / "c")
    shardckpt.save({"x": {"a": torch.ones(3)}, "a": torch.full((2,), 7.0), "x2": torch.zeros(1)}, path)
    target = {"a": torch.zeros(3)}
    # saved "a" has the same text as the caller's "a" but is not what the caller's "a" reads (x.a): it is
    # outside the selection, not unexpected (before: strict failed with "unexpected ['a']")
    shardckpt.load(target, path, keys=["a"], key_map={"": "x."}, strict=True)
    assert torch.equal(target["a"], torch.ones(3))
    shardckpt.save({"module": {"a": torch.ones(3), "a2": torch.ones(1)}}, str(tmp_path / "d"))
    with pytest.raises(KeyMismatchError) as e:  # saved module.a2 is the caller's "a2", which "a*" selects
        shardckpt.load({"a": torch.zeros(3)}, str(tmp_path / "d"), keys=["a*"], key_map={"": "module."})
    assert e.value.unexpected == ["module.a2"]  # before: silently left out


def test_a_key_selection_that_selects_nothing_is_an_error(tmp_path):
    """Issue 22 item 10: keys= that matches nothing read 0 bytes (strict) or returned {}."""
    path = str(tmp_path / "c")
    shardckpt.save({"model": {"w": torch.ones(3), "b": torch.zeros(2)}, "step": 4}, path)
    with pytest.raises(KeyMismatchError, match=r"keys=\['zzz'\] selects none.*'model.b', 'model.w', 'step'"):
        shardckpt.load_full(path, keys=["zzz"])
    for strict in (True, False):
        with pytest.raises(KeyMismatchError, match=r"keys=\['nomatch'\].*'model.w'") as e:
            shardckpt.load({"model": {"w": torch.zeros(3)}}, path, keys=["nomatch"], strict=strict)
        assert "strict=False" not in str(e.value)  # not the advice for a selection that selects nothing
    with pytest.raises(KeyMismatchError, match="selects none of the state's"):  # the checkpoint's names
        shardckpt.load({"w": torch.zeros(3)}, path, keys=["model.w"], key_map={"": "model."})
    assert torch.equal(shardckpt.load_full(path, keys=["model.w"])["model"]["w"], torch.ones(3))


# ------------------------------------------------ any error while planning reaches every rank at once (defect 4)

class _Exploding:
    """A Stateful whose state_dict raises a plain exception (not a CheckpointError) with a long message."""

    def __init__(self, explode: bool):
        self.explode = explode

    def state_dict(self):
        if self.explode:
            raise RuntimeError("boom " * 3000)
        return {"x": torch.ones(2)}

    def load_state_dict(self, sd):
        pass


def _planning_failure(rank, ws, root):
    out = []
    for case in ("plain", "storage"):
        path = os.path.join(root, case)
        state = {"w": torch.ones(8), "s": _Exploding(rank == 1 and case == "plain")}
        if case == "storage" and rank == 0:
            # the coordinator's existence check itself fails with a non-storage error
            from shardckpt.storage.local import LocalStorage
            orig = LocalStorage.exists
            LocalStorage.exists = lambda self, rel: (_ for _ in ()).throw(PermissionError("no " * 2000))
        t0 = time.monotonic()
        try:
            shardckpt.save(state, path, timeout_s=30)
            out.append((case, None, 0.0))
        except SaveError as e:
            out.append((case, (e.rank, str(e)[:200]), time.monotonic() - t0))
        finally:
            if case == "storage" and rank == 0:
                LocalStorage.exists = orig
    shardckpt.shutdown()
    return out


def test_a_plain_exception_while_planning_fails_every_rank_at_once(tmp_path):
    results = run_ranks(2, _planning_failure, str(tmp_path), timeout=120)
    for per_rank in results:
        (c1, e1, t1), (c2, e2, t2) = per_rank
        assert e1 is not None and e1[0] == 1 and "RuntimeError: boom" in e1[1] and t1 < 20
        assert e2 is not None and e2[0] == 0 and "PermissionError" in e2[1] and t2 < 20
    assert not os.path.exists(tmp_path / "plain" / "manifest.json")


def test_key_mismatch_messages_say_what_is_cut_and_name_a_kind_mismatch_once(tmp_path):
    """Issue 22 (small): lists were cut at 10 silently; a tensor given for a saved plain value was both
    missing and unexpected."""
    path = str(tmp_path / "c")
    shardckpt.save({"step": 3, **{f"k{i:02d}": torch.ones(1) for i in range(15)}}, path)
    with pytest.raises(KeyMismatchError, match=r"'k09', \.\.\. 5 more\]") as e:
        shardckpt.load({"step": 3}, path)
    assert len(e.value.unexpected) == 15
    with pytest.raises(KeyMismatchError, match=r"plain value \(int\) under 'step', the state a tensor") as e:
        shardckpt.load({"step": torch.zeros(1)}, path, keys=["step"])
    assert e.value.key == "step" and "strict=False" not in str(e.value)
    res = shardckpt.load({"step": torch.zeros(1)}, path, keys=["step"], strict=False)
    assert res.missing_keys == ["step"] and res.unexpected_keys == []  # once, not also unexpected


def test_restore_does_not_advise_strict_false_which_it_does_not_take(tmp_path):
    from shardckpt import CheckpointManager
    m = CheckpointManager(tmp_path, async_save=False, preemption_signals=())
    m.save(1, {"w": torch.ones(2)})
    with pytest.raises(KeyMismatchError, match="restore failed") as e:
        m.restore({"x": torch.ones(2)})
    assert "pass strict=False" not in str(e.value) and "shardckpt.load(state, path, strict=False)" in str(e.value)
    m.close()

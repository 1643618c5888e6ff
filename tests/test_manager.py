"""CheckpointManager: retention from manifests (and across restarts), restore with verification and
fallback, gc of uncommitted leftovers, fsspec roots, preemption agreement on 2 ranks (default signals), an
unwritable root refused at creation on every rank."""
from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch

import shardckpt
from shardckpt.manager.checkpoint_manager import CheckpointManager, gc_uncommitted, step_dir, verify_checkpoint
from harness import run_ranks


def _state(v: float = 0.0):
    return {"w": torch.full((64, 33), v), "n": torch.arange(50) + int(v), "step": int(v)}


def test_retention_survives_restart_and_never_drops_latest_or_best(tmp_path):
    losses = {10: 5.0, 20: 1.0, 30: 4.0, 40: 3.0, 50: 6.0, 60: 7.0}
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss", keep_every_steps=30,
                          async_save=True, preemption_signals=())
    for s in (10, 20, 30):
        m.save(s, _state(s), metrics={"loss": torch.tensor(losses[s])})
    m.wait()
    assert m.steps() == [20, 30]  # 10: not in the last 2, not best, not a multiple of 30
    m.close()
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss", keep_every_steps=30,
                          preemption_signals=())  # a restarted job: rules recomputed from the manifests
    assert m.best_step() == 20 and m.latest_step() == 30
    for s in (40, 50, 60):
        m.save(s, _state(s), metrics={"loss": losses[s]})
        m.wait()
    assert m.steps() == [20, 30, 50, 60]  # best (20), multiple of 30, last two
    assert m.metadata(50) == {"step": 50, "metrics": {"loss": 6.0}, "monitor": {"metric": "loss", "mode": "min"}}
    into = _state(-1)
    assert m.restore(into, "best") == 20 and torch.equal(into["w"], _state(20)["w"]) and into["step"] == 20
    assert m.restore(into) == 60 and into["step"] == 60
    m.close()


def test_never_deletes_before_the_new_checkpoint_commits(tmp_path):
    from shardckpt.saving import pipeline
    from shardckpt import api
    m = CheckpointManager(tmp_path, keep_last=1, preemption_signals=())
    m.save(1, _state(1))
    m.wait()
    orig = pipeline.write_rank

    def slow(*a, **kw):
        time.sleep(0.5)
        return orig(*a, **kw)
    pipeline.write_rank = slow
    try:
        m.save(2, _state(2))
        assert not m.maybe_save(3, _state(3))  # not due; the pending save is still running
        assert m.steps() == [1]  # step 2 has not committed: step 1 stays
    finally:
        m.wait()
        pipeline.write_rank = orig
    assert m.steps() == [2]
    m.close()


def test_restore_falls_back_past_corrupt_latest(tmp_path, caplog):
    m = CheckpointManager(tmp_path, async_save=False, preemption_signals=())
    for s in (1, 2, 3):
        m.save(s, _state(s))
    man = shardckpt.read_manifest(tmp_path / step_dir(3))
    idx = tmp_path / step_dir(3) / man.files[0].index
    idx.write_bytes(idx.read_bytes()[:-3] + b"xyz")  # index crc no longer matches
    man2 = shardckpt.read_manifest(tmp_path / step_dir(2))
    data = tmp_path / step_dir(2) / man2.files[0].data
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte inside a frame: only the full check (or the load) sees it
    data.write_bytes(bytes(raw))
    assert verify_checkpoint(tmp_path / step_dir(2)) == []
    assert verify_checkpoint(tmp_path / step_dir(2), full=True)
    into = _state(-1)
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        assert m.restore(into) == 1
    assert into["step"] == 1 and torch.equal(into["w"], _state(1)["w"])
    text = caplog.text
    assert "step 3" in text and "step 2" in text and "falling back" in text
    with pytest.raises(shardckpt.CheckpointError):
        m.restore(into, 3)  # an explicit step does not fall back
    with pytest.raises(shardckpt.CheckpointError, match="restore failed"):
        m.restore({"other": torch.zeros(2)})  # the caller's state does not fit: raise, never fall back
    m.save(3, _state(3))  # the step found corrupt is replaced
    assert m.restore(into) == 3 and into["step"] == 3
    mf = CheckpointManager(tmp_path, async_save=False, verify="full", preemption_signals=())
    os.remove(tmp_path / step_dir(3) / "manifest.json")
    assert mf.restore(into) == 1
    empty = CheckpointManager(tmp_path / "none", preemption_signals=())
    assert empty.restore(into) is None and empty.latest_step() is None


def test_gc_uncommitted(tmp_path):
    m = CheckpointManager(tmp_path, async_save=False, preemption_signals=())
    m.save(1, _state(1))
    crashed = tmp_path / step_dir(2) / "data" / "abcdef0123456789"
    crashed.mkdir(parents=True)
    (crashed / "r00000.bin").write_bytes(b"partial")
    orphan = tmp_path / step_dir(1) / "data" / "0123456789abcdef"
    orphan.mkdir(parents=True)
    (orphan / "r00000.bin").write_bytes(b"partial")
    assert gc_uncommitted(tmp_path) == []  # fresh: maybe still being written
    old = time.time() - 7200
    for f in (crashed / "r00000.bin", orphan / "r00000.bin"):
        os.utime(f, (old, old))
    found = gc_uncommitted(tmp_path)
    assert found == [f"{step_dir(1)}/data/0123456789abcdef", step_dir(2)] and crashed.exists()
    assert gc_uncommitted(tmp_path, exclude=[2], grace_s=0) == [f"{step_dir(1)}/data/0123456789abcdef"]
    assert gc_uncommitted(tmp_path, dry_run=False) == found
    assert not (tmp_path / step_dir(2)).exists() and not orphan.exists()
    assert m.steps() == [1] and m.restore(_state(0)) == 1


def test_gc_asks_the_backend_for_ages(tmp_path):
    """gc reads ages through Storage.mtime(), so any backend (here a LocalStorage subclass, which the old
    class-name check took for one that cannot tell ages, keeping everything) gets its leftovers collected."""
    from shardckpt.storage.local import LocalStorage

    class TaggedStorage(LocalStorage):
        pass
    crashed = tmp_path / step_dir(5) / "data" / "abcdef0123456789" / "r00000.bin"
    crashed.parent.mkdir(parents=True)
    crashed.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(crashed, (old, old))
    assert gc_uncommitted(TaggedStorage(str(tmp_path))) == [step_dir(5)]

    class Ageless(LocalStorage):
        def mtime(self, relpath):
            return None
    assert gc_uncommitted(Ageless(str(tmp_path))) == []  # age unknown: kept
    assert gc_uncommitted(Ageless(str(tmp_path)), grace_s=0) == [step_dir(5)]


def test_fsspec_memory_root():
    root = "memory://mgr-test"
    m = CheckpointManager(root, keep_last=2, preemption_signals=(), save_every_steps=2)
    for s in range(1, 8):
        m.maybe_save(s, _state(s), metrics={"loss": 1.0 / s})
    m.wait()
    assert m.steps() == [4, 6]
    st = m.storage
    st.write_file(f"{step_dir(9)}/data/00112233445566778899/r00000.bin", b"x")
    assert gc_uncommitted(root, grace_s=0) == [step_dir(9)]
    assert gc_uncommitted(root, grace_s=3600) == []
    into = _state(0)
    assert m.restore(into) == 6 and into["step"] == 6
    m.close()


def test_preemption_single_process_default_signals(tmp_path):
    # defect 5: README and launch/README.md say SIGTERM / SIGUSR1 save and stop (SLURM --signal=USR1@120);
    # the default used to be SIGTERM only, so this SIGUSR1 killed the process
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    m = CheckpointManager(tmp_path, save_every_steps=100)
    try:
        assert all(signal.getsignal(s) == m._on_signal for s in before)
        assert not m.maybe_save(1, _state(1))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert m.signalled and m.maybe_save(2, _state(2)) and m.preempted
        assert m.steps() == [2]
    finally:
        m.close()
    assert {s: signal.getsignal(s) for s in before} == before


def test_unwritable_root_fails_when_the_manager_is_created(tmp_path):
    # defect 6: found only at the first save before. A path below a regular file cannot be created even by
    # root (ENOTDIR), unlike a chmod-ed directory
    (tmp_path / "afile").write_bytes(b"not a directory")
    root = tmp_path / "afile" / "ckpt"
    with pytest.raises(shardckpt.StorageError, match="cannot be written") as e:
        CheckpointManager(root, preemption_signals=())
    assert str(root) in str(e.value)
    ok = CheckpointManager(tmp_path / "fine", preemption_signals=())  # created, probed, probe removed
    assert os.listdir(tmp_path / "fine") == [] and ok.steps() == []


def _preempt(rank, ws, root, unwritable):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    try:  # every rank raises (the coordinator's probe failed), none waits at a collective
        CheckpointManager(unwritable)
        refused = None
    except shardckpt.StorageError as e:
        refused = str(e)
    mesh = init_device_mesh("cpu", (ws,))
    state = {"w": distribute_tensor(torch.arange(40.0).view(8, 5), mesh, [Shard(0)], src_data_rank=None),
             "step": 0}
    m = CheckpointManager(root, save_every_steps=4, keep_last=1)  # default signals: SIGTERM and SIGUSR1
    saved, stop = [], None
    for step in range(1, 20):
        state["w"]._local_tensor.add_(1)
        state["step"] = step
        dist.all_reduce(torch.ones(1))  # the training job's own collective between saves
        if rank == 1 and step == 6:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
        if m.maybe_save(step, state, metrics={"loss": float(step)}):
            saved.append(step)
        if m.preempted:
            stop = step
            break
    m.close()
    # a restarted job on the same ranks restores the preemption checkpoint
    m2 = CheckpointManager(root, preemption_signals=())
    into = {"w": distribute_tensor(torch.zeros(8, 5), mesh, [Shard(0)], src_data_rank=None), "step": -1}
    got = m2.restore(into)
    ok = torch.equal(into["w"].full_tensor(), torch.arange(40.0).view(8, 5) + got)
    return saved, stop, got, into["step"], ok, m2.steps(), refused


def test_preemption_multirank(tmp_path):
    (tmp_path / "afile").write_bytes(b"")
    unwritable = str(tmp_path / "afile" / "ckpt")
    outs = run_ranks(2, _preempt, str(tmp_path / "root"), unwritable, timeout=120)
    for saved, stop, got, step, ok, steps, refused in outs:
        assert saved == [4, 6] and stop == 6 and got == 6 and step == 6 and ok and steps == [6]
        assert refused and "cannot be written" in refused and unwritable in refused


def test_ls_marks_the_managers_best_step_without_being_told_the_metric(tmp_path):
    import torch
    from shardckpt import CheckpointManager
    from shardckpt.tools.cli import list_steps
    mgr = CheckpointManager(tmp_path, keep_best=1, keep_last=1, monitor="acc", mode="max", async_save=False)
    for step, acc in ((1, 0.5), (2, 0.9), (3, 0.7)):
        mgr.save(step, {"w": torch.full((4,), float(step))}, metrics={"acc": acc})
    mgr.close()
    steps = {s.step: s for s in list_steps(str(tmp_path))}
    assert steps[2].best and steps[3].latest and not steps[3].best
    assert sorted(steps) == [2, 3]  # retention kept the best and the latest


# ------------------------------------------------------------------ policies and events (issue 16)

class _Recorder:
    def __init__(self):
        import threading
        self.events, self.threads = [], set()
        self._threading = threading

    def on_event(self, e):
        self.events.append(e)
        self.threads.add(self._threading.current_thread().name)


class _Broken:
    def on_event(self, e):
        raise RuntimeError("tracker down")


def test_save_best_only_min_delta_and_early_stopping_with_best_restorable(tmp_path, caplog):
    rec = _Recorder()
    losses = {1: 5.0, 2: 4.95, 3: 4.0, 4: 3.95, 5: 3.95, 6: 1.0}
    m = CheckpointManager(tmp_path, save_every_steps=1, monitor="loss", save_best_only=True, min_delta=0.1,
                          early_stopping_patience=2, callbacks=[_Broken(), rec], preemption_signals=())
    saved, stop_at = [], None
    for step in range(1, 7):
        if m.maybe_save(step, _state(step), metrics={"loss": losses[step]}):
            saved.append(step)
        if m.should_stop:
            stop_at = step
            break
    m.close()
    assert saved == [1, 3]  # the first always; 2 and 4 improve by less than min_delta: nothing written
    assert m.steps() == [1, 3] and stop_at == 5  # 4 and 5 did not improve: patience 2 reached
    assert m.metadata(3)["policy"] == {"best": 4.0, "wait": 0}
    into = _state(-1)
    assert m.restore(into, "best") == 3 and torch.equal(into["w"], _state(3)["w"])
    kinds = [(e.kind, e.step) for e in rec.events]
    assert kinds[:3] == [("save_started", 1), ("snapshot_done", 1), ("committed", 1)]
    assert ("skipped", 2) in kinds and ("skipped", 4) in kinds and ("skipped", 5) in kinds
    committed = [e for e in rec.events if e.kind == "committed"]
    assert [e.step for e in committed] == [1, 3] and all(e.durable_s >= e.stall_s > 0 for e in committed)
    assert [(e.raw_bytes, e.stored_bytes > 0) for e in committed] == [(sum(t.numel() * t.element_size() for t in (_state(1)["w"], _state(1)["n"])), True)] * 2
    assert committed[1].metrics == {"loss": 4.0} and committed[1].path.endswith(step_dir(3))
    assert rec.threads == {"shardckpt-events"}  # never the training thread
    assert "tracker down" in caplog.text  # the failing callback was logged and did not fail a save
    # a restarted job resumes the count from the restored step's metadata: the next save must beat 4.0
    m2 = CheckpointManager(tmp_path, save_every_steps=1, monitor="loss", save_best_only=True, min_delta=0.1,
                           early_stopping_patience=2, preemption_signals=())
    assert m2.restore(_state(-1)) == 3 and not m2.should_stop
    assert not m2.maybe_save(4, _state(4), metrics={"loss": 3.95})
    assert m2.maybe_save(6, _state(6), metrics={"loss": 1.0})
    m2.close()
    assert m2.steps() == [1, 3, 6]


def test_async_commit_event_comes_from_the_background_save_and_retention_reports_deletes(tmp_path):
    rec = _Recorder()
    m = CheckpointManager(tmp_path, keep_last=1, async_save=True, callbacks=[rec], preemption_signals=())
    for s in (1, 2):
        m.save(s, _state(s), metrics={"loss": float(s)})
    r = m.restore(_state(-1))
    m.close()
    kinds = [(e.kind, e.step) for e in rec.events]
    assert kinds.index(("committed", 1)) < kinds.index(("save_started", 2))
    assert ("deleted", 1) in kinds and kinds.index(("committed", 2)) < kinds.index(("deleted", 1))
    restored = [e for e in rec.events if e.kind == "restored"]
    assert r == 2 and restored[0].step == 2 and restored[0].tier == "durable" and restored[0].seconds > 0


def test_policy_options_are_checked():
    for kw in ({"save_best_only": True}, {"early_stopping_patience": 2}):
        with pytest.raises(ValueError, match="needs monitor"):
            CheckpointManager("memory://pol", **kw)
    with pytest.raises(ValueError, match="early_stopping_patience"):
        CheckpointManager("memory://pol", monitor="l", early_stopping_patience=0)
    with pytest.raises(TypeError):
        CheckpointManager("memory://pol", callbacks=[object()])


def _best_only_ranks(rank, ws, root):
    m = CheckpointManager(root, save_every_steps=1, monitor="loss", save_best_only=True,
                          early_stopping_patience=1, preemption_signals=())
    # each rank sees its own loss; the coordinator's decides for all (rank 1's would save step 2)
    losses = {1: 3.0, 2: 4.0 if rank == 0 else 1.0}
    saved = [s for s in (1, 2) if m.maybe_save(s, {"w": torch.full((8,), float(s))}, metrics={"loss": losses[s]})]
    stop = m.should_stop
    m.close()
    return saved, stop, m.steps()


def test_save_best_only_and_early_stopping_agree_on_every_rank(tmp_path):
    for saved, stop, steps in run_ranks(2, _best_only_ranks, str(tmp_path), timeout=120):
        assert saved == [1] and stop and steps == [1]


def _count_restore_reads(rank, world, root):
    """2 ranks: save step 5, then count what restore reads (file name -> times), on this rank."""
    from shardckpt.storage.local import LocalStorage
    state = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "step": 5}
    with CheckpointManager(root, async_save=False, preemption_signals=()) as mgr:
        mgr.save(5, state)
    reads: dict = {}
    real = LocalStorage.read_file

    def counting(self, relpath):
        name = os.path.basename(relpath)
        reads[name] = reads.get(name, 0) + 1
        return real(self, relpath)
    with CheckpointManager(root, async_save=False, preemption_signals=()) as mgr:
        back = {"w": torch.zeros(64, 64), "step": 0}
        LocalStorage.read_file = counting
        try:
            assert mgr.restore(back) == 5 and torch.equal(back["w"], state["w"])
        finally:
            LocalStorage.read_file = real
    return reads


def test_restore_reads_the_manifest_and_each_index_once_for_the_group(tmp_path):
    """verify and load share the metadata the coordinator read: the manifest and every index file are read
    once in all, not once per rank (each read is a GET per rank on an object store)."""
    per_rank = run_ranks(2, _count_restore_reads, str(tmp_path / "root"), timeout=120)
    total: dict = {}
    for r in per_rank:
        for name, n in r.items():
            total[name] = total.get(name, 0) + n
    indexes = [f for _, _, fs in os.walk(tmp_path / "root") for f in fs if f.endswith(".index.json")]
    assert indexes and total == {"manifest.json": 1, **{f: 1 for f in indexes}}, per_rank


def test_save_best_only_with_the_monitored_metric_missing_raises_instead_of_never_saving(tmp_path):
    """A typo'd metric name used to make every maybe_save return False and leave the root empty."""
    m = CheckpointManager(tmp_path, save_every_steps=1, save_best_only=True, monitor="loss", async_save=False,
                          preemption_signals=())
    with pytest.raises(shardckpt.MetricError, match=r"'loss'.*\['val_loss'\]") as e:
        m.maybe_save(1, _state(1), metrics={"val_loss": 0.5})
    assert isinstance(e.value, shardckpt.ConfigError) and e.value.name == "monitor"
    with pytest.raises(shardckpt.MetricError, match=r"'loss'.*\[\]"):
        m.maybe_save(2, _state(2))  # metrics=None at the first save
    assert m.steps() == []
    assert m.maybe_save(3, _state(3), force=True)  # a forced (or preemption) save still saves
    assert m.maybe_save(4, _state(4), metrics={"loss": float("nan")}) is False  # nan: present, never better
    assert m.maybe_save(5, _state(5), metrics={"loss": 1.0})
    m.close()
    assert m.steps() == [3, 5]


def _missing_metric_ranks(rank, ws, root):
    m = CheckpointManager(root, save_every_steps=1, monitor="loss", save_best_only=True, preemption_signals=())
    try:
        m.maybe_save(1, {"w": torch.zeros(8)}, metrics={"val_loss": 1.0} if rank == 0 else {"loss": 1.0})
    except shardckpt.MetricError as e:
        got = str(e)
    else:
        got = None
    m.close()
    return got, m.steps()


def test_missing_monitored_metric_raises_on_every_rank_alike(tmp_path):
    """The coordinator decides (its metrics lack the metric) and every rank raises the same error, none
    waits at a collective."""
    (e0, steps0), (e1, steps1) = run_ranks(2, _missing_metric_ranks, str(tmp_path), timeout=120)
    assert e0 is not None and "'loss'" in e0 and "val_loss" in e0
    assert e1 == f"on rank 0: {e0} (rank=0)"  # the same MetricError, naming the rank that decided
    assert steps0 == steps1 == []


def test_restore_best_without_monitor_uses_the_recorded_monitor_or_raises(tmp_path):
    m = CheckpointManager(tmp_path / "run", monitor="acc", mode="max", async_save=False, preemption_signals=())
    for s, acc in ((1, 0.5), (2, 0.9), (3, 0.7)):
        m.save(s, _state(s), metrics={"acc": acc})
    m.close()
    into = _state(-1)
    plain = CheckpointManager(tmp_path / "run", preemption_signals=())  # no monitor=: the recorded one (max acc)
    assert plain.restore(into, "best") == 2 and into["step"] == 2 and torch.equal(into["w"], _state(2)["w"])
    none = CheckpointManager(tmp_path / "plain", async_save=False, preemption_signals=())
    none.save(1, _state(1), metrics={"acc": 0.5})  # no monitor recorded anywhere
    with pytest.raises(shardckpt.ConfigError, match="needs monitor="):
        none.restore(into, "best")
    assert CheckpointManager(tmp_path / "empty", preemption_signals=()).restore(into, "best") is None


def _best_no_monitor_ranks(rank, ws, root):
    m = CheckpointManager(root, async_save=False, preemption_signals=())
    m.save(1, {"w": torch.zeros(8)}, metrics={"loss": 1.0})
    try:
        m.restore({"w": torch.ones(8)}, "best")
    except shardckpt.ConfigError as e:
        return str(e)
    finally:
        m.close()


def test_restore_best_without_any_monitor_raises_on_every_rank(tmp_path):
    e0, e1 = run_ranks(2, _best_no_monitor_ranks, str(tmp_path), timeout=120)
    assert e0 and "monitor=" in e0
    assert e1 == f"on rank 0: {e0} (rank=0)"  # the same ConfigError, naming the rank that decided


def test_an_explicit_step_never_falls_back_and_raises_its_own_typed_error(tmp_path, caplog):
    m = CheckpointManager(tmp_path, async_save=False, preemption_signals=())
    for s in (1, 2):
        m.save(s, _state(s))
    man = shardckpt.read_manifest(tmp_path / step_dir(2))
    data = tmp_path / step_dir(2) / man.files[0].data
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # only the load (verify="index") finds it
    data.write_bytes(bytes(raw))
    into = _state(-1)
    with caplog.at_level(logging.INFO, logger="shardckpt"):
        with pytest.raises(shardckpt.IncompleteCheckpointError, match="step 3 .*does not exist") as e:
            m.restore(into, 3)  # never saved
        assert step_dir(3) in e.value.file
        with pytest.raises(shardckpt.ChecksumError, match="step 2 ") as e:
            m.restore(into, 2)
        assert e.value.file == str(tmp_path / step_dir(2) / man.files[0].data)
    assert "falling back" not in caplog.text and "fell back" not in caplog.text
    assert m.restore(into, 1) == 1 and into["step"] == 1
    mf = CheckpointManager(tmp_path, verify="full", preemption_signals=())  # found by the check, not the load
    with pytest.raises(shardckpt.ChecksumError, match="step 2 "):
        mf.restore(into, 2)


def test_a_second_forced_save_of_a_step_is_refused_and_says_so(tmp_path, caplog):
    """maybe_save(8, force=True) twice returned True the second time but kept the first metrics."""
    m = CheckpointManager(tmp_path, async_save=False, preemption_signals=())
    assert m.maybe_save(8, _state(8), metrics={"loss": 2.0}, force=True)
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        assert m.maybe_save(8, _state(8), metrics={"loss": 1.0}, force=True) is False
    assert "step 8 is already saved" in caplog.text
    assert m.metadata(8)["metrics"] == {"loss": 2.0}
    m.close()


def test_full_every_without_incremental_is_refused():
    with pytest.raises(shardckpt.ConfigError, match="incremental=True") as e:
        CheckpointManager("memory://fe", full_every=4, preemption_signals=())
    assert e.value.name == "full_every"
    CheckpointManager("memory://fe2", incremental=True, full_every=4, preemption_signals=()).close()


def _explicit_step_ranks(rank, ws, root):
    m = CheckpointManager(root, async_save=False, preemption_signals=())
    m.save(1, {"w": torch.zeros(8)})
    try:
        m.restore({"w": torch.ones(8)}, 3)
    except shardckpt.CheckpointError as e:
        return type(e).__name__, e.file
    finally:
        m.close()


def test_an_explicit_missing_step_raises_the_same_typed_error_on_every_rank(tmp_path):
    (c0, f0), (c1, f1) = run_ranks(2, _explicit_step_ranks, str(tmp_path), timeout=120)
    assert c0 == c1 == "IncompleteCheckpointError" and f0 == f1 and step_dir(3) in f0


def test_grouped_options_mean_the_same_as_the_keywords(tmp_path):
    """CheckpointManager(retention=, policy=, local_tier=): frozen groups checked when made; the flat
    keywords build the same groups; one spelling per option."""
    from dataclasses import FrozenInstanceError

    from shardckpt.manager import LocalTierOptions, Retention, SavePolicy
    grouped = CheckpointManager(tmp_path / "a", retention=Retention(keep_last=2, keep_best=1, monitor="loss"),
                                policy=SavePolicy(save_best_only=True, min_delta=0.5), preemption_signals=())
    flat = CheckpointManager(tmp_path / "b", keep_last=2, keep_best=1, monitor="loss", save_best_only=True,
                             min_delta=0.5, preemption_signals=())
    assert grouped.retention == flat.retention and grouped.policy == flat.policy and flat.local_tier is None
    assert (grouped.keep_last, grouped.keep_best, grouped.monitor) == (2, 1, "loss")
    # min_delta=0.5 through the group: neither 0.9 nor 0.8 improves on 1.0 by more than that
    assert [grouped.save(s, _state(s), metrics={"loss": v}) for s, v in ((1, 1.0), (2, 0.9), (3, 0.8))] == \
        [True, False, False]
    grouped.close()
    with pytest.raises(FrozenInstanceError):
        grouped.retention.keep_last = 5
    with pytest.raises(ValueError, match="mode"):
        Retention(mode="best")
    with pytest.raises(ValueError, match="needs monitor"):
        Retention(keep_best=1)
    with pytest.raises(shardckpt.ConfigError, match="both given") as e:
        CheckpointManager(tmp_path / "c", keep_last=3, retention=Retention(keep_last=2), preemption_signals=())
    assert e.value.name == "keep_last"
    with pytest.raises(shardckpt.ConfigError, match="local_jump need local_root") as e:
        CheckpointManager(tmp_path / "c", local_jump=2, preemption_signals=())
    with pytest.raises(ValueError, match="save_best_only needs monitor"):
        CheckpointManager(tmp_path / "c", policy=SavePolicy(save_best_only=True), preemption_signals=())
    tiered = CheckpointManager(tmp_path / "d", local_tier=LocalTierOptions(tmp_path / "local", every_steps=2),
                               preemption_signals=())
    assert tiered.local_every_steps == 2 and tiered.tier is not None

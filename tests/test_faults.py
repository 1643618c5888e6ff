"""Faults injected into real multi-rank saves (CPU, gloo), each trial repeatable by its seed:

- SIGKILL of one rank (coordinator included) at every phase of a save: never a committed partial checkpoint,
  the previous checkpoint still loads bit-exactly, the next save at that path succeeds.
- a rank that stops responding: every survivor raises CoordinationError within the timeout, nothing committed.
- disk full during data writes and during the manifest write: a typed error, the previous checkpoint intact,
  no leftovers that block the next save.
- single-byte flips and truncations of data, index and manifest files: detected on load with a typed error
  naming the file (and the key for data); never a silently wrong tensor.
- two jobs saving to the same path at once: exactly one commits, the other gets CheckpointExistsError.
- the same kills during async saves, and under a CheckpointManager: a restarted job restores the previous
  step bit-exactly (or the new one, if its commit completed) and its next save succeeds.

bench/faults.py runs the same trials at full count (>= 20 per phase) and prints the figures.
SHARDCKPT_FAULT_TRIALS sets the trials per phase here (default 5)."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil

import pytest
import torch

import shardckpt
from faultkit import (FRAME, PHASES, corruption_state, corruption_sweep, launch, race_worker, run_kill_trial,
                      run_manager_trial, same_state, save_worker, small_tmpfs, trial_state)
from harness import run_ranks

TRIALS = int(os.environ.get("SHARDCKPT_FAULT_TRIALS", "5"))


@pytest.fixture(scope="module")
def prev(tmp_path_factory):
    """The previous, good checkpoint every fault must leave untouched."""
    path = str(tmp_path_factory.mktemp("faults") / "prev")
    shardckpt.save(trial_state(999), path, frame_size=FRAME)
    return path


# ------------------------------------------------------------------------------------------------ SIGKILL

@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_phase_never_commits_a_partial(tmp_path, prev, phase):
    outcomes = []
    for seed in range(TRIALS):
        r = run_kill_trial(str(tmp_path), phase, seed, prev, 999)
        v = r["verdict"]
        ctx = f"trial {r['plan']}: fates {r['fates']}, verdict {v}"
        assert r["victim_died"], ctx
        assert r["survivors_typed"], ctx
        assert not v["partial"], ctx
        assert v["prev_ok"], ctx
        assert v["resave_ok"], ctx
        assert r["invariant"] == [], ctx  # every committed checkpoint under the root loads bit-exact
        if phase in ("stage", "write", "before_commit"):
            assert not v["committed"], ctx  # the coordinator cannot commit without every summary
        outcomes.append(v["committed"])
    assert len(outcomes) == TRIALS


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_during_async_save_never_commits_a_partial(tmp_path, prev, phase):
    for seed in range(max(2, TRIALS // 2)):
        r = run_kill_trial(str(tmp_path), phase, 100 + seed, prev, 999, mode="async")
        v = r["verdict"]
        ctx = f"trial {r['plan']}: fates {r['fates']}, verdict {v}"
        assert r["victim_died"] and r["survivors_typed"], ctx
        assert not v["partial"] and v["prev_ok"] and v["resave_ok"], ctx
        assert r["invariant"] == [], ctx
        if phase in ("stage", "write", "before_commit"):
            assert not v["committed"], ctx


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("phase", PHASES)
def test_manager_restores_previous_step_after_sigkill(tmp_path, phase, mode):
    r = run_manager_trial(str(tmp_path), phase, 200 + PHASES.index(phase), mode=mode)
    ctx = f"trial {r}"
    assert r["victim_died"] and r["survivors_typed"], ctx
    assert r["restored"] in (1, 2) and r["restore_ok"] and r["resave_ok"], ctx
    assert r["invariant"] == [], ctx
    if phase in ("stage", "write", "before_commit"):
        assert r["restored"] == 1, ctx


def test_kill_points_cover_coordinator_and_workers():
    """The trial plans kill both ranks and, in the manifest phase, every sub-point of the commit."""
    from faultkit import plan_trial
    plans = [plan_trial(p, s) for p in PHASES for s in range(20)]
    assert {p["victim"] for p in plans} == {0, 1}
    assert {p["point"] for p in plans if p["phase"] == "manifest" and p["victim"] == 0} == \
        {"manifest", "manifest_tmp", "committed"}


# ------------------------------------------------------------------------------------------------ hang

HANGS = [("stage", 1, "arg"), ("write", 0, "env"), ("before_commit", 1, "arg")]


@pytest.mark.parametrize("phase,victim,how", HANGS)
def test_hung_rank_makes_survivors_raise_coordination_error_within_timeout(tmp_path, prev, phase, victim, how):
    timeout_s = 2.0
    path = str(tmp_path / "hung")
    plan = {"phase": phase, "seed": 0, "victim": victim, "point": phase, "hit": 1}
    env = {"SHARDCKPT_FAULT": f"{phase}:{victim}:hang:1"}
    if how == "env":  # the documented knob, set after shardckpt was imported (forkserver preload)
        env["SHARDCKPT_TIMEOUT"] = str(timeout_s)
    fates = launch(2, save_worker, path, 0, plan, timeout_s if how == "arg" else None, env=env, timeout=60,
                   grace=0.5)
    assert fates[victim][0] == "hung", fates
    survivor = fates[1 - victim]
    assert survivor[0] == "ok" and survivor[1][0] == "CoordinationError", fates
    assert survivor[1][2] < timeout_s * 2 + 1.0, f"survivor took {survivor[1][2]:.1f}s for a {timeout_s}s timeout"
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.read_manifest(path)
    assert same_state(shardckpt.load_full(prev), trial_state(999))
    shardckpt.save(trial_state(5), path, frame_size=FRAME)  # the next save at that path succeeds
    assert same_state(shardckpt.load_full(path), trial_state(5))


# ------------------------------------------------------------------------------------------------ disk full

@pytest.fixture
def tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "tmpfs", "2m") as mnt:
        yield mnt


def _fill(directory) -> str:
    """Fill the filesystem of `directory` to the last byte; returns the filler's path."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def _disk_full_worker(rank, ws, mnt, path, where):
    from shardckpt.storage import local
    if where == "manifest" and rank == 0:
        real = local.LocalStorage.commit

        def commit(self, relpath, data):
            _fill(mnt)  # every rank's data is durable; the disk fills before the manifest is written
            return real(self, relpath, data)

        local.LocalStorage.commit = commit
    state = {"x": torch.rand(800_000, generator=torch.Generator().manual_seed(rank * 0))} if where == "data" \
        else corruption_state(5)
    try:
        shardckpt.save(state, path, timeout_s=20)
        return "saved", ""
    except shardckpt.CheckpointError as e:
        return type(e).__name__, str(e)


def _used(mnt) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.parametrize("where", ["data", "manifest"])
def test_disk_full_is_typed_and_leaves_nothing_behind(tmpfs, where):
    prev_path = str(tmpfs / "prev")
    shardckpt.save(corruption_state(1), prev_path)
    path = str(tmpfs / "next")
    baseline = _used(tmpfs)
    results = run_ranks(2, _disk_full_worker, str(tmpfs), path, where)
    filler = tmpfs / "filler"
    if filler.exists():
        filler.unlink()
    for kind, msg in results:
        assert kind == "SaveError", results
    assert any("disk full" in msg for _, msg in results), results
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.read_manifest(path)
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    assert leftovers == [], leftovers  # data, index and temp manifest files all removed
    assert _used(tmpfs) <= baseline + 64 * 1024  # empty directories at most
    assert same_state(shardckpt.load_full(prev_path), corruption_state(1))
    shardckpt.save(corruption_state(2), path)  # the next save at that path succeeds
    assert same_state(shardckpt.load_full(path), corruption_state(2))


# ------------------------------------------------------------------------------------------------ bit rot

def _two_rank_save(rank, ws, path):
    shardckpt.save(corruption_state(), path, frame_size=512)
    return True


@pytest.fixture(scope="module")
def rot_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rot") / "ckpt")
    run_ranks(2, _two_rank_save, path)
    return path


def _verify_cli():
    """`shardckpt verify PATH` as a predicate (True = the checkpoint verifies)."""
    from shardckpt.tools import cli

    def verify(path) -> bool:
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                rc = cli.main(["verify", str(path)])
        except SystemExit as e:
            rc = e.code
        except shardckpt.CheckpointError:
            return False
        return rc in (0, None)
    return verify


@pytest.mark.parametrize("backend", ["native", "python"])
def test_flips_and_truncations_are_always_detected(rot_ckpt, backend, monkeypatch):
    from shardckpt.native import kernels as _ext
    try:
        kernels = _ext.backend(backend)
    except ImportError as e:
        pytest.skip(f"native backend unavailable: {e}")
    monkeypatch.setattr(_ext, "decode_frames", kernels.decode_frames)
    monkeypatch.setattr(_ext, "crc32c", kernels.crc32c)
    stats = corruption_sweep(rot_ckpt, corruption_state(), flips_per_file=120 if backend == "python" else 200,
                             truncs_per_file=6, seed=11, verify=_verify_cli() if backend == "native" else None)
    assert stats["failures"] == [], stats["failures"][:10]
    assert stats["flips"] >= 5 * 120 and stats["truncations"] >= 5 * 4
    assert not any(k.endswith(("silent", "untyped", "unnamed")) for k in stats["outcomes"]), stats["outcomes"]


def test_verify_cli_passes_an_intact_checkpoint_and_fails_a_flipped_byte(rot_ckpt, tmp_path):
    """The predicate the sweep above relies on says yes to the intact checkpoint and no to a copy with one
    flipped data byte (a predicate that always said no, or always yes, would make the sweep meaningless)."""
    verify = _verify_cli()
    assert verify(rot_ckpt)
    bad = tmp_path / "bad"
    shutil.copytree(rot_ckpt, bad)
    data = bad / shardckpt.read_manifest(str(bad)).files[0].data
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    assert not verify(bad)


# ------------------------------------------------------------------------------------------------ races

def test_two_jobs_saving_the_same_path_exactly_one_commits(tmp_path):
    trials = 8
    per_rank = run_ranks(4, race_worker, str(tmp_path), trials, 0)
    for t in range(trials):
        outcomes = {job: out for r in range(4) for job, out in [per_rank[r][t]]}
        ranks = [per_rank[r][t] for r in range(4)]
        # both ranks of a job agree; exactly one job saved; the other was refused with the clear error
        assert ranks[0] == ranks[1] and ranks[2] == ranks[3], (t, ranks)
        assert sorted(outcomes.values()) == ["CheckpointExistsError", "saved"], (t, ranks)
        winner = next(j for j, o in outcomes.items() if o == "saved")
        path = str(tmp_path / f"race-{t}")
        assert same_state(shardckpt.load_full(path), trial_state(1000 * winner + t)), t
        m = shardckpt.read_manifest(path)
        stray = [d for d in os.listdir(os.path.join(path, "data")) if d != m.save_id
                 and os.listdir(os.path.join(path, "data", d))]
        assert stray == [], f"the loser left files behind: {stray}"

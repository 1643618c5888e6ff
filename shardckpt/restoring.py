"""CheckpointManager.restore: choose a committed step, verify it, load it, fall back past corrupt ones.

Who calls it: CheckpointManager.restore on every rank, after the pending save was reaped. The coordinator
picks the order of steps to try and broadcasts each choice; the coordinator reads the step's manifest and
index files once for the group (loading._read_metadata) and the verify and the load both use those bytes,
verification work is shared across ranks (verify.list_problems) and every rank agrees on the outcome of
each try, so all ranks restore the same step or all raise. After a restore the manager's policy state (best value, patience count) resumes from that
step's manifest and the async-save pools are warmed up in the background.
"""
from __future__ import annotations

import logging
import time

from .async_save import warm_up
from .commit import bounded_text
from .errors import (CheckpointError, ChecksumError, CorruptDataError, FormatError, IncompleteCheckpointError,
                     StorageError)
from .layout import step_dir
from .loading import _read_metadata
from .state import load_training_state_from
from .verify import list_problems

log = logging.getLogger("shardckpt")

# errors that mean "this checkpoint is damaged" (fall back); any other is the caller's mistake (raise)
_CORRUPTION = (ChecksumError, CorruptDataError, FormatError, IncompleteCheckpointError, StorageError,
               FileNotFoundError)


def restore(mgr, state, step: str | int = "latest") -> int | None:
    """All ranks: the body of CheckpointManager.restore (see there). Returns the step restored or None."""
    if step not in ("latest", "best") and not isinstance(step, int):
        raise ValueError("step must be 'latest', 'best' or an int")
    t0 = time.monotonic()
    comm = mgr.comm
    order: list[int] = []

    def choose() -> None:  # coordinator: the steps to try, in order (a listing error raises on every rank)
        steps = mgr.steps()
        order[:] = steps[::-1] if step == "latest" else mgr._ranked_by_metric(steps) if step == "best" else [step]
    comm.from_coordinator(choose)
    tried = 0
    while True:
        nxt = order[tried] if comm.is_coordinator and tried < len(order) else None
        nxt = comm.broadcast_json(nxt)
        if nxt is None:
            if isinstance(step, int):
                mgr.events.emit("failed", step, path=mgr.root, error="no such committed step")
                raise CheckpointError(f"checkpoint step {step} cannot be restored", file=mgr.root)
            _warm_up(mgr, state)
            return None
        tried += 1
        problem = _check_and_load(mgr, nxt, state)
        if problem is None:
            if comm.is_coordinator and tried > 1:
                log.warning("restored step %d instead (fell back past %d bad step(s))", nxt, tried - 1)
            mgr._last_saved_step = nxt
            _resume_policy(mgr, nxt)
            mgr.events.emit("restored", nxt, path=mgr._path(nxt).url, tier="durable", seconds=time.monotonic() - t0)
            _warm_up(mgr, state)
            return nxt
        mgr._bad_steps.add(nxt)
        if comm.is_coordinator:
            log.warning("checkpoint step %d under %s is unreadable or corrupt (%s); falling back to the "
                        "previous valid one", nxt, mgr.root, problem)
        mgr.events.emit("failed", nxt, path=mgr._path(nxt).url, error=problem[:2000])
        if isinstance(step, int):
            raise CheckpointError(f"checkpoint step {nxt} is unreadable or corrupt: {problem}",
                                  file=f"{mgr.root}/{step_dir(nxt)}")


def _resume_policy(mgr, step: int) -> None:
    """All ranks: the policy state resumes from the restored step's metadata (the coordinator reads it)."""
    if mgr._monitor is None:
        return
    def read() -> dict:  # coordinator; an error raises on every rank at once
        saved = mgr.metadata(step).get("policy")
        best = mgr.best_step() if not isinstance(saved, dict) else None
        return {"state": saved, "fallback": None if best is None else mgr._metric(best)}
    saved = mgr.comm.from_coordinator(read)
    mgr._monitor.load(saved["state"], saved["fallback"])
    mgr.should_stop = mgr._monitor.stopped


def _warm_up(mgr, state) -> None:
    """After restore (every job's first call): create the async-save groups and pre-fault the staging
    pool in the background, so the first save stalls no longer than later ones."""
    if mgr.async_save:
        warm_up(state, process_group=mgr.process_group, codec=mgr._save_kw["codec"],
                timeout_s=mgr._save_kw["timeout_s"])


def _check_and_load(mgr, step: int, state) -> str | None:
    """Verify (work shared across ranks), then load; ranks agree on the outcome. None means restored."""
    path = mgr._path(step)
    try:  # the manifest and the index files, read once for the group, serve the verify and the load
        metadata = _read_metadata(path, mgr.comm)
    except CheckpointError as e:  # every rank raises it (the coordinator's read is broadcast)
        return f"manifest: {type(e).__name__}: {e}"
    mine = list_problems(path, full=mgr.verify == "full", rank=mgr.comm.rank, world_size=mgr.comm.world_size,
                         metadata=metadata)
    problem = _agree_problem(mgr, mine[0] if mine else None, fatal=False)
    if problem is not None:
        return problem
    err, fatal = None, False
    try:
        load_training_state_from(state, path, mgr.comm, metadata)
    except Exception as e:
        err = f"rank {mgr.comm.rank}: {type(e).__name__}: {e}"
        fatal = not isinstance(e, _CORRUPTION)  # the caller's state does not fit: never fall back
    return _agree_problem(mgr, err, fatal)


def _agree_problem(mgr, problem: str | None, fatal: bool) -> str | None:
    """The first rank's problem, on every rank; raises everywhere if it is the caller's mistake."""
    records = mgr.comm.gather_json({"p": bounded_text(problem) if problem else None, "fatal": fatal})
    verdict = None
    if mgr.comm.is_coordinator:
        verdict = next(({"p": r["p"], "fatal": r["fatal"]} for r in records if r["p"]), None)
    verdict = mgr.comm.broadcast_json(verdict)
    if verdict is None:
        return None
    if verdict["fatal"]:
        raise CheckpointError(f"restore failed: {verdict['p']}", file=mgr.root)
    return verdict["p"]

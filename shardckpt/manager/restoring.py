"""CheckpointManager.restore: choose a committed step, verify it, load it, fall back past corrupt ones.

Who calls it: CheckpointManager.restore on every rank, after the pending save was reaped. The coordinator
picks the order of steps to try and broadcasts each choice; the coordinator reads the step's manifest and
index files once for the group (loading.read_group_metadata) and the verify and the load both use those bytes,
verification work is shared across ranks (verify.verify_checkpoint) and every rank agrees on the outcome of
each try, so all ranks restore the same step or all raise. After a restore the manager's policy state (best value, patience count) resumes from that
step's manifest and the async-save pools are warmed up in the background.
"""
from __future__ import annotations

import logging
import time

from shardckpt import errors
from shardckpt.errors import bounded_text
from shardckpt.errors import (CheckpointError, ChecksumError, ConfigError, CorruptDataError, FormatError,
    IncompleteCheckpointError, KeyMismatchError, StorageError)
from shardckpt.lifecycle.layout import step_dir
from shardckpt.loading.load import read_group_metadata
from shardckpt.manager.policy import metric_value, rank_steps, recorded_monitor
from shardckpt.loading.state import load_training_state_from
from shardckpt.loading.verify import verify_checkpoint

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

    def choose() -> None:  # coordinator: the steps to try, in order (an error raises on every rank at once:
        steps = mgr.steps()  # a listing that fails, or "best" with no monitor recorded, ConfigError)
        order[:] = steps[::-1] if step == "latest" else _best_order(mgr, steps) if step == "best" else [step]
    comm.from_coordinator(choose)
    tried = 0
    while True:
        nxt = order[tried] if comm.is_coordinator and tried < len(order) else None
        nxt = comm.broadcast_json(nxt)
        if nxt is None:
            if isinstance(step, int):
                mgr.events.emit("failed", step, path=mgr.root, error="no such committed step")
                raise CheckpointError(f"checkpoint step {step} cannot be restored", file=mgr.root)
            mgr.warm_up(state)
            return None
        tried += 1
        bad = _check_and_load(mgr, nxt, state)
        if bad is None:
            if comm.is_coordinator and tried > 1:
                log.warning("restored step %d instead (fell back past %d bad step(s))", nxt, tried - 1)
            mgr.resume_from(nxt)
            mgr.events.emit("restored", nxt, path=mgr.step_path(nxt).url, tier="durable", seconds=time.monotonic() - t0)
            mgr.warm_up(state)
            return nxt
        problem = bad["p"]
        mgr.events.emit("failed", nxt, path=mgr.step_path(nxt).url, error=problem[:2000])
        if bad.get("cls") != "IncompleteCheckpointError":  # a committed step found corrupt: a save replaces it
            mgr.mark_unreadable(nxt)
        if isinstance(step, int):  # an explicit step never falls back: its own typed error, on every rank
            raise _step_error(mgr, nxt, bad)
        if comm.is_coordinator:
            log.warning("checkpoint step %d under %s is unreadable or corrupt (%s); falling back to the "
                        "previous valid one", nxt, mgr.root, problem)


def _best_order(mgr, steps: list[int]) -> list[int]:
    """Coordinator: the committed `steps` best first, by the manager's monitor, or else by the monitor
    (metric, mode) a CheckpointManager recorded in the newest manifest that has one (user_metadata["monitor"],
    what `shardckpt ls` marks the best step by).

    Raises:
        ConfigError: the manager has no monitor= and no committed step recorded one.
    """
    if mgr.monitor or not steps:
        return mgr.ranked_steps(steps)
    for s in reversed(steps):
        try:
            rec = recorded_monitor(mgr.metadata(s).get("monitor"))
        except CheckpointError:
            continue
        if rec is not None:
            break
    else:
        raise ConfigError(f"restore(state, 'best') needs monitor= (the metric to rank steps by): no committed "
                          f"step under {mgr.root} recorded one", name="monitor")
    scored = []
    for s in steps:
        try:
            v = metric_value(mgr.metadata(s).get("metrics"), rec[0])
        except CheckpointError:
            v = None
        if v is not None:
            scored.append((v, s))
    return rank_steps(scored, rec[1])




def _step_error(mgr, step: int, bad: dict) -> CheckpointError:
    """The typed error for an explicit step that cannot be restored: the class the check or the load found
    (IncompleteCheckpointError for a step that was never committed, ChecksumError for a corrupt frame, ...),
    naming the step and the file."""
    what = "does not exist (no committed manifest)" if bad.get("cls") == "IncompleteCheckpointError" \
        else "is unreadable or corrupt"
    return _typed(bad.get("cls"), f"checkpoint step {step} under {mgr.root} {what}: {bad['p']}",
                  bad.get("file") or f"{mgr.root}/{step_dir(step)}")


def _typed(cls_name: str | None, message: str, file: str | None) -> CheckpointError:
    """An error of the shardckpt class named `cls_name` (CheckpointError for any other name), built
    alike on every rank from the agreed record."""
    cls = getattr(errors, cls_name or "", None)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        cls = CheckpointError
    err = cls.__new__(cls)  # the class only: KeyMismatchError's or ConfigError's own arguments do not apply
    CheckpointError.__init__(err, message, file=file)
    if isinstance(err, KeyMismatchError):
        err.missing, err.unexpected, err.without_hint = [], [], message
    if isinstance(err, ConfigError):
        err.name = None
    return err


def _check_and_load(mgr, step: int, state) -> dict | None:
    """Verify (work shared across ranks), then load; ranks agree on the outcome. None means restored, else
    the first problem as {"p": text, "cls": the typed error's class name, "file": the file it names}."""
    path = mgr.step_path(step)
    try:  # the manifest and the index files, read once for the group, serve the verify and the load
        metadata = read_group_metadata(path, mgr.comm)
    except CheckpointError as e:  # every rank raises it (the coordinator's read is broadcast)
        return {"p": f"manifest: {type(e).__name__}: {e}", "cls": type(e).__name__, "file": e.file}
    mine = None
    try:
        report = verify_checkpoint(path, full=mgr.verify == "full", progress=False, rank=mgr.comm.rank,
                                   world_size=mgr.comm.world_size, metadata=metadata)
        if report.problems:
            first = report.problems[0]
            mine = {"p": first.line(), "cls": first.error,
                    "file": None if first.file is None else f"{path.url}/{first.file}"}
    except Exception as e:  # a step that vanished or cannot be read is one the manager falls back past
        mine = {"p": f"manifest: {type(e).__name__}: {e}", "cls": type(e).__name__,
                "file": getattr(e, "file", None)}
    problem = _agree_problem(mgr, mine, fatal=False)
    if problem is not None:
        return problem
    err, fatal = None, False
    try:
        load_training_state_from(state, path, mgr.comm, metadata)
    except Exception as e:
        text = str(e)
        if isinstance(e, KeyMismatchError):  # restore takes no strict=: advise what restore's caller can do
            text = (f"{e.without_hint}; restore fills every key of the state: give it the keys that were saved, "
                    f"or load a subset with shardckpt.load(state, path, strict=False)")
        err = {"p": f"rank {mgr.comm.rank}: {type(e).__name__}: {text}", "cls": type(e).__name__,
               "file": getattr(e, "file", None)}
        fatal = not isinstance(e, _CORRUPTION)  # the caller's state does not fit: never fall back
    return _agree_problem(mgr, err, fatal)


def _agree_problem(mgr, problem: dict | None, fatal: bool) -> dict | None:
    """The first rank's problem ({"p", "cls", "file"}), on every rank; raises everywhere if it is the
    caller's mistake."""
    mine = None if problem is None else {"p": bounded_text(problem["p"]), "cls": problem.get("cls"),
                                         "file": bounded_text(problem["file"]) if problem.get("file") else None}
    records = mgr.comm.gather_json({"problem": mine, "fatal": fatal})
    verdict = None
    if mgr.comm.is_coordinator:
        verdict = next(({**r["problem"], "fatal": r["fatal"]} for r in records if r["problem"]), None)
    verdict = mgr.comm.broadcast_json(verdict)
    if verdict is None:
        return None
    if verdict["fatal"]:  # typed as the load raised it (KeyMismatchError, ShapeMismatchError, ...)
        raise _typed(verdict.get("cls"), f"restore failed: {verdict['p']}", mgr.root)
    return verdict

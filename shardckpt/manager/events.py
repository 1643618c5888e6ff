"""CheckpointManager's events for experiment trackers (shardckpt.integrations.tensorboard / .mlflow, or yours).

    class Printer(shardckpt.manager.events.CheckpointCallback):
        def on_committed(self, e):
            print(e.step, e.durable_s, e.stored_bytes)
    mgr = CheckpointManager(root, ..., callbacks=[Printer()])

Who calls what, and when: the manager, on the coordinator only, hands each event to an EventBus, which
queues it and returns at once; one daemon thread per manager ("shardckpt-events") calls the callbacks in
the order the events happened. So a callback never runs on the training thread, never delays a save, and
one that raises is logged and skipped: a save never fails because of a callback. An async save's
"committed" event is queued by the background thread that committed it, at commit time.

Events (CheckpointEvent.kind); save events carry `tier`: "durable" (under the manager's root) or "local"
(its node-local tier, shardckpt.tiers). A step saved locally and promoted has save_started, snapshot_done
and committed with tier "local", then committed with tier "durable" (durable_s: to the promotion's commit).
  save_started   a save of `step` began (metrics are the ones passed to the save)
  snapshot_done  the state is snapshotted; stall_s is how long the training thread was blocked
  committed      committed: durable_s from save start to commit, raw_bytes and stored_bytes, path
  skipped        save_best_only found no improvement (nothing written); value is the monitored metric
  deleted        retention deleted `step` (tier "local": from the coordinator's node-local dir)
  restored       restore loaded `step` from `tier` ("durable" or "local") in `seconds`
  failed         a save or restore raised; error says what
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("shardckpt")

EVENT_KINDS = ("save_started", "snapshot_done", "committed", "skipped", "deleted", "restored", "failed")


@dataclass(frozen=True)
class CheckpointEvent:
    """One thing that happened to a checkpoint. Fields that do not apply to a kind are None."""
    kind: str
    step: int | None
    path: str | None = None
    metrics: dict = field(default_factory=dict)
    stall_s: float | None = None       # snapshot_done, committed: seconds the caller was blocked
    durable_s: float | None = None     # committed: seconds from the save's start to its commit
    raw_bytes: int | None = None       # committed: tensor bytes of the state
    stored_bytes: int | None = None    # committed: bytes this save wrote (compressed; references excluded)
    seconds: float | None = None       # restored: seconds the restore took
    tier: str | None = None            # "durable" (the manager's root) or "local" (its node-local tier):
    #                                    where a save went or a restore came from
    value: float | None = None         # skipped: the monitored metric that did not improve
    error: str | None = None           # failed: the error's type and message

    @property
    def compression_ratio(self) -> float | None:
        """raw_bytes / stored_bytes of a committed save (None when nothing was stored)."""
        if not self.raw_bytes or not self.stored_bytes:
            return None
        return self.raw_bytes / self.stored_bytes

    def save_scalars(self) -> dict[str, float]:
        """What trackers log per committed save (stall_s, durable_s, stored_gb, compression_ratio), the
        ones that are known; a local-tier commit's names start with "local/" (local/stall_s, ...), so its
        values and the durable promotion's, at the same step, stay two series."""
        scalars = {"stall_s": self.stall_s, "durable_s": self.durable_s,
                   "stored_gb": None if self.stored_bytes is None else self.stored_bytes / 1e9,
                   "compression_ratio": self.compression_ratio}
        pre = "local/" if self.tier == "local" else ""
        return {pre + k: float(v) for k, v in scalars.items() if v is not None}


class CheckpointCallback:
    """Base class for callbacks: override on_<kind> for the events you want (or on_event for all).
    Called on the manager's event thread of the coordinator, one event at a time, in order."""

    def on_event(self, event: CheckpointEvent) -> None:
        handler = getattr(self, f"on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def close(self) -> None:
        """Called once by CheckpointManager.close, after the last event (flush files, end runs)."""


class EventBus:
    """The queue between a manager and its callbacks (one per CheckpointManager). emit() never blocks and
    never raises; events are delivered on a daemon thread started at the first emit.

    Args:
        callbacks: CheckpointCallback objects, objects with on_event(event), or plain callables.
        enabled: False on every rank but the coordinator: emit() is then a no-op.
    """

    def __init__(self, callbacks=(), enabled: bool = True):
        self.callbacks = list(callbacks or ())
        for cb in self.callbacks:
            if not (callable(getattr(cb, "on_event", None)) or callable(cb)):
                raise TypeError(f"callback {cb!r} has no on_event(event) and is not callable")
        self.enabled = enabled and bool(self.callbacks)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def emit(self, kind: str, step: int | None, **fields) -> None:
        """Queue an event (any thread). Never blocks the caller on a callback, never raises."""
        if not self.enabled:
            return
        try:
            event = CheckpointEvent(kind, None if step is None else int(step), **fields)
        except Exception as e:  # a bad field is our bug; it must not fail the save that reports it
            log.warning("shardckpt: could not build the %s event: %s", kind, e)
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shardckpt-events", daemon=True)
                self._thread.start()
        self._queue.put(event)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                for cb in self.callbacks:
                    try:
                        (cb.on_event if callable(getattr(cb, "on_event", None)) else cb)(event)
                    except Exception as e:
                        log.warning("shardckpt: checkpoint callback %s failed on %s of step %s: %s: %s",
                                    type(cb).__name__, event.kind, event.step, type(e).__name__, e)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Block until every queued event was delivered (CheckpointManager.wait and close; tests)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Deliver what is queued, stop the thread, then call each callback's close() (errors logged)."""
        if not self.enabled:
            return
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        for cb in self.callbacks:
            close = getattr(cb, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as e:
                    log.warning("shardckpt: closing checkpoint callback %s failed: %s", type(cb).__name__, e)


def report_commit(bus: EventBus, step: int, url: str, metrics: dict, t0: float, stall_s: float, manifest,
                  err: BaseException | None, tier: str = "durable") -> None:
    """Coordinator: queue the committed (or failed) event of a save begun at time.monotonic() t0; for
    async saves called on the background thread that committed it (AsyncSaveHandle.add_done_callback).
    Only queues: never blocks, never raises."""
    if err is not None:
        bus.emit("failed", step, path=url, error=f"{type(err).__name__}: {err}"[:2000], tier=tier)
        return
    try:
        raw, stored = manifest.raw_bytes, manifest.stored_bytes
    except Exception:
        raw = stored = None
    bus.emit("committed", step, path=url, metrics=metrics, stall_s=stall_s, durable_s=time.monotonic() - t0,
             raw_bytes=raw, stored_bytes=stored, tier=tier)

"""CheckpointManager: when to save, what to keep, what to restore, and what to do on preemption.

    manager = shardckpt.CheckpointManager("ckpt/", save_every_steps=500, keep_last=3, keep_best=1,
                                          monitor="val_loss")  # SIGTERM / SIGUSR1: save and stop
    start = manager.restore(state) or 0
    for step in range(start + 1, total + 1):
        ...
        if manager.maybe_save(step, state, metrics={"val_loss": v}) and manager.preempted:
            break                                  # every rank saved and the checkpoint committed
    manager.close()

Policies (shardckpt.manager.policy, decided on the coordinator and broadcast): save_best_only skips a save whose
monitored metric does not improve on the best committed one by more than min_delta; early_stopping_patience
sets `should_stop` on every rank once that many monitored saves in a row did not improve. Events
(shardckpt.manager.events: save started, snapshot done, committed, skipped, deleted, restored, failed) go to
`callbacks` on the coordinator's event thread, never on the training thread.

Layout: `root/step-<10-digit step>/` per checkpoint (a normal shardckpt checkpoint); the manifest's
user_metadata holds {"step": N, "metrics": {...}} (and {"monitor": {"metric", "mode"}} when one is set,
{"policy": {"best", "wait"}} with save_best_only or early stopping). A step
exists once its manifest.json is committed (shardckpt.lifecycle.layout); shardckpt.lifecycle.deleter's gc collects what crashed saves left.

Who does what:
  all ranks     maybe_save / save / restore / wait / close, in the same order (they run collectives on
                shardckpt's gloo companion group, never on the training job's groups).
  coordinator   retention and garbage collection (deletes), and the choice of the step to restore (the
                other ranks follow its broadcast decision).
Retention is recomputed from the committed manifests on disk after every commit, so a restarted job keeps
applying the same rules; it never runs before the new checkpoint committed, and never deletes the latest
step, the best `keep_best` steps or the multiples of `keep_every_steps`. Deleting a step removes its
manifest first, so an interrupted delete leaves an uncommitted directory (which gc collects), never a
half-deleted checkpoint that looks committed.

Why one module of ~600 lines: it is one class whose methods share the manager's state (pending saves,
the policy, the tier); its pure rules live in policy.py and options.py, restore orchestration in
restoring.py, deletion in lifecycle/deleter.py.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from typing import Any, Iterable

import torch
import torch.distributed as dist

from shardckpt import api
from shardckpt import dist as sdist
from shardckpt.manager import restoring
from shardckpt.tiers import local_tier as tiers
from shardckpt.saving.async_save import AsyncSaveHandle, async_save, warm_up
from shardckpt.errors import error_text
from shardckpt.errors import CheckpointExistsError, ConfigError, CoordinationError, MetricError, StorageError
from shardckpt.manager import options
from shardckpt.manager.events import EventBus, report_commit
from shardckpt.manager.options import LocalTierOptions, Retention, SavePolicy
from shardckpt.format.records import DEFAULT_FRAME_SIZE, MANIFEST_NAME
from shardckpt.lifecycle.deleter import (  # noqa: F401 (README and the CLI name manager.gc_uncommitted)
    DEFAULT_GC_GRACE_S, gc_uncommitted, retire)
from shardckpt.lifecycle.layout import STEP_DIGITS, STEP_DIR, committed_steps, step_dir  # noqa: F401 (re-exported)
from shardckpt.manager.policy import (Decision, Monitor, json_metrics, metric_missing, metric_value, rank_steps,
    steps_to_delete)
from shardckpt.storage import Storage, storage_for
from shardckpt.loading.verify import list_problems

log = logging.getLogger("shardckpt")


# verify_checkpoint(path, *, full=False, storage_options=None, rank=0, world_size=1) -> list[str]: restore's
# check, shardckpt.loading.verify's one verifier (the same rules and error classes as `shardckpt verify` and load)
verify_checkpoint = list_problems


# --------------------------------------------------------------------------------------------- manager

def _signum(s) -> int:
    if isinstance(s, str):
        return int(getattr(signal, s if s.startswith("SIG") else "SIG" + s))
    return int(s)


class CheckpointManager:
    """Periodic, retained, verifiable, preemption-safe checkpoints of a training state under one root.

    Args:
        root: a directory or fsspec URL holding step-<N> checkpoints.
        save_every_steps: maybe_save saves when step % save_every_steps == 0.
        save_every_seconds: maybe_save saves when this long has passed since the last save (ranks agree
            through a one-element all-reduce on every call).
        keep_last: keep the newest K committed steps. keep_last and keep_best both None: keep everything.
        keep_best: keep the K best steps by metrics[monitor] (steps without that metric do not compete).
        monitor, mode: the metric and whether lower ("min") or higher ("max") is better.
        keep_every_steps: also keep every step that is a multiple of this forever.
        async_save: save in the background (shardckpt.saving.async_save); else save() blocks until committed.
        process_group: the group that saves together (default: the whole job).
        preemption_signals: signals (names or numbers) whose handler only sets a flag; at the next maybe_save
            all ranks agree, save, wait for the commit and return True with `preempted` set. Default SIGTERM
            (what schedulers send before a kill) and SIGUSR1 (SLURM's `--signal=USR1@120`); pass
            ("SIGTERM",) if a profiler or launcher uses SIGUSR1 itself, () to disable. Handlers are
            installed only when the manager is created on the main thread.

    Raises:
        StorageError: on every rank, when the coordinator cannot write under `root` (checked here, once, so
            the job fails at start-up and not at its first save).
        preemption_check_every: run the agreement every N maybe_save calls (one 2-integer all-reduce on
            shardckpt's gloo group); a signal is acted on within N steps.
        gc_grace_s: how old uncommitted leftovers must be before gc removes them.
        verify: "index" (manifest + every index crc) or "full" (also every frame) before restoring.
        codec, frame_size, storage_options, timeout_s: as for shardckpt.save.
        incremental: each save refers to the previous committed step's frames for every chunk whose bytes
            did not change instead of writing it again (shardckpt.save's base=; FORMAT.md §7).
        full_every: with incremental, every full_every-th save of this manager (and its first) writes
            everything, so references never reach further back than full_every saves and retention can
            free old steps' data (default 8; without incremental=True it is a ConfigError).
        callbacks: shardckpt.manager.events callbacks (TensorBoardCallback, MLflowCallback, yours), called on the
            coordinator's event thread; one that raises is logged and never fails a save.
        save_best_only: skip a save (nothing written, maybe_save returns False) unless metrics[monitor]
            improves on the best committed value by more than min_delta; the first save always happens, and
            so do preemption saves and force=True (Keras' ModelCheckpoint(save_best_only=True)). A due save
            whose metrics lack `monitor` raises MetricError on every rank (never a silent skip).
        min_delta: the smallest change that counts as an improvement (save_best_only, early stopping).
        early_stopping_patience: `should_stop` turns True on every rank once this many monitored saves in a
            row did not improve (Keras' / Lightning's EarlyStopping(patience)); restore(state, "best") then
            gives back the best step.
        local_root: a node-local directory (the same string on every node, never shared) for a frequent
            tier of checkpoints with peer replicas (shardckpt.tiers; FORMAT.md "Local tier"): a local save
            every local_every_steps (each node keeps local_keep_last), each rank's files also held by
            local_replicas peers on the nodes local_jump, 2*local_jump, ... further on; a durable save due
            on a local step uploads that step's files instead of saving again; restore("latest") takes the
            newest step the surviving nodes hold when it is not older than the durable latest
            (restored_tier says which).
        retention, policy, local_tier: the same options grouped (shardckpt.manager.options: Retention,
            SavePolicy, LocalTierOptions; frozen, checked when made), instead of their flat keywords.
    """

    def __init__(self, root, *, save_every_steps: int | None = None, save_every_seconds: float | None = None,
                 keep_last: int | None = None, keep_best: int | None = None, monitor: str | None = None,
                 mode: str = "min", keep_every_steps: int | None = None, async_save: bool = True,
                 process_group=None, preemption_signals: Iterable = ("SIGTERM", "SIGUSR1"),
                 preemption_check_every: int = 1,
                 gc_grace_s: float = DEFAULT_GC_GRACE_S, verify: str = "index", codec: str = "auto",
                 frame_size: int = DEFAULT_FRAME_SIZE, storage_options: dict | None = None,
                 timeout_s: float | None = None, incremental: bool = False, full_every: int | None = None,
                 callbacks: Iterable = (), save_best_only: bool = False, min_delta: float = 0.0,
                 early_stopping_patience: int | None = None, local_root=None, local_every_steps: int = 1,
                 local_keep_last: int | None = 2, local_replicas: int = 1, local_jump: int = 1,
                 retention: Retention | None = None, policy: SavePolicy | None = None,
                 local_tier: LocalTierOptions | None = None):
        if full_every is not None and not incremental:  # it would be silently ignored
            raise ConfigError("full_every applies to incremental saves only: pass incremental=True too",
                              name="full_every")
        full_every = 8 if full_every is None else full_every
        if full_every < 1:
            raise ValueError("full_every must be >= 1")
        self.incremental, self.full_every, self._since_full = incremental, full_every, None
        if verify not in ("index", "full"):
            raise ValueError("verify must be 'index' or 'full'")
        for name, v in (("save_every_steps", save_every_steps), ("preemption_check_every", preemption_check_every)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1")
        self.retention, self.policy, self.local_tier = options.from_keywords(
            {"retention": retention, "policy": policy, "local_tier": local_tier},
            {"keep_last": keep_last, "keep_best": keep_best, "monitor": monitor, "mode": mode,
             "keep_every_steps": keep_every_steps, "save_best_only": save_best_only, "min_delta": min_delta,
             "early_stopping_patience": early_stopping_patience, "local_root": local_root,
             "local_every_steps": local_every_steps, "local_keep_last": local_keep_last,
             "local_replicas": local_replicas, "local_jump": local_jump})
        r, pol, loc = self.retention, self.policy, self.local_tier
        self.storage = storage_for(root, storage_options)
        self.root = self.storage.url
        self.save_every_steps, self.save_every_seconds = save_every_steps, save_every_seconds
        self.keep_last, self.keep_best, self.monitor, self.mode = r.keep_last, r.keep_best, r.monitor, r.mode
        self.keep_every_steps = r.keep_every_steps
        self.async_save = async_save
        self.process_group = process_group
        self.preemption_check_every = preemption_check_every
        self.gc_grace_s, self.verify = gc_grace_s, verify
        self._save_kw = {"codec": codec, "frame_size": frame_size, "timeout_s": timeout_s}
        self.comm = sdist.comm_for(process_group, timeout_s)
        self.events = EventBus(callbacks, enabled=self.comm.is_coordinator)
        self._monitor = Monitor(r.mode, pol.min_delta, pol.save_best_only, pol.early_stopping_patience) \
            if pol.active else None
        self.should_stop = False  # early stopping: set on every rank together
        self._check_writable()
        self.tier = None if loc is None else tiers.LocalTier(  # the node-local tier (shardckpt.tiers)
            loc.root, keep_last=loc.keep_last, replicas=loc.replicas, jump=loc.jump,
            process_group=process_group, timeout_s=timeout_s, codec=codec, gc_grace_s=gc_grace_s)
        if self.tier is not None and self.events.enabled:  # the coordinator's node: its local deletions
            self.tier.on_retired = lambda step, url: self.events.emit("deleted", step, path=url, tier="local")
        self.local_every_steps = loc.every_steps if loc is not None else local_every_steps
        self.restored_tier: tuple[str, int] | None = None  # ("local" | "durable", step) of the last restore
        self.preempted = False
        self._signalled: int | None = None
        self._calls = 0
        self._warmed = False  # warm_up ran (restore, or the first maybe_save)
        self._pending: list[tuple[int, AsyncSaveHandle, str]] = []  # (step, handle, "durable" | "local")
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._bad_steps: set[int] = set()
        self._old_handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in preemption_signals:
                num = _signum(s)
                self._old_handlers[num] = signal.signal(num, self._on_signal)
        if self.comm.is_coordinator:
            self._gc()

    def _check_writable(self) -> None:
        """All ranks, from __init__: the coordinator creates the root and writes and deletes an empty probe
        file (one PUT and one DELETE on object stores); every rank raises StorageError naming the root if
        that failed, so none waits at a collective for a rank that gave up."""
        problem = None
        if self.comm.is_coordinator:
            probe = f".shardckpt-probe-{uuid.uuid4().hex}"  # not a step-<N> name: ls, gc and restore skip it
            try:
                self.storage.write_file(probe, b"")
            except Exception as e:
                problem = error_text(e)
            else:
                try:
                    self.storage.delete(probe)
                except Exception as e:  # retention deletes will fail too, and log; saving still works
                    log.warning("checkpoint root %s: cannot delete %s (%s); retention and gc will fail",
                                self.root, probe, e)
        problem = self.comm.broadcast_json(problem)
        if problem is not None:
            raise StorageError(f"checkpoint root cannot be written (checked when the manager was created): "
                               f"{problem}", file=self.root)

    # ---------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum, frame) -> None:
        self._signalled = signum  # only a flag: the next maybe_save acts on it, collectively

    @property
    def signalled(self) -> bool:
        """Whether this rank received a preemption signal (the job acts on it at the next maybe_save)."""
        return self._signalled is not None

    # ------------------------------------------------------------------------------------------- steps
    def steps(self) -> list[int]:
        """Committed steps, ascending (read from storage; any rank)."""
        return committed_steps(self.storage)

    def latest_step(self) -> int | None:
        s = self.steps()
        return s[-1] if s else None

    def best_step(self) -> int | None:
        """The best committed step by the monitored metric (None without monitor= or metrics). Raises
        StorageError (or the manifest's error) when a step's metric cannot be read: a best step is never
        chosen from part of the evidence."""
        ranked, unknown = self._ranking(self.steps())
        if unknown:
            raise StorageError(f"the metrics of steps {unknown[:5]} cannot be read; the best step is unknown",
                               file=self.root)
        return ranked[0] if ranked else None

    def metadata(self, step: int) -> dict:
        """The user_metadata of a committed step ({"step": N, "metrics": {...}})."""
        return api.read_manifest(self.step_path(step)).user_metadata

    def step_metric(self, step: int) -> float | None:
        """The monitored metric of a committed step; None when it has none. Raises when its manifest
        cannot be read (a missing metric and an unreadable one are different evidence)."""
        return metric_value(self.metadata(step).get("metrics", {}), self.monitor)

    def _ranking(self, steps: list[int]) -> tuple[list[int], list[int]]:
        """(steps with the monitored metric, best first (ties: the newer step first); steps whose manifest
        could not be read, so whose rank is unknown)."""
        if not self.monitor:
            return [], []
        scored, unknown = [], []
        for s in steps:
            try:
                m = self.step_metric(s)
            except Exception as e:
                log.warning("checkpoint step %d under %s: its metric %r cannot be read (%s); retention keeps it",
                            s, self.root, self.monitor, error_text(e, 300))
                unknown.append(s)
                continue
            if m is not None:
                scored.append((m, s))
        return rank_steps(scored, self.mode), unknown

    def ranked_steps(self, steps: list[int]) -> list[int]:
        """Steps with a readable monitored metric, best first (restore("best") tries them in this order)."""
        return self._ranking(steps)[0]

    def step_path(self, step: int) -> Storage:
        return self.storage.child(step_dir(step))

    # -------------------------------------------------------------------------------------------- save
    def maybe_save(self, step: int, state, metrics: dict | None = None, force: bool = False) -> bool:
        """Save if a rule says so (every N steps, every T seconds, force) or a preemption signal reached any
        rank. Call on every rank at every step, with the same step. On preemption, blocks until the save
        committed, sets `preempted` and returns True: the loop should then exit. Returns whether it saved: a
        step this manager already saved is not saved again (False; with force=True a warning says so)."""
        self._reap(block=False)
        self._calls += 1
        if not self._warmed:  # a job that never restored: its pool faults in while it trains up to the save
            self.warm_up(state)
        local = [1 if self._signalled is not None else 0,
                 1 if self.save_every_seconds and time.monotonic() - self._last_save_time >= self.save_every_seconds
                 else 0]
        if self.save_every_seconds or self._calls % self.preemption_check_every == 0:
            local = self._agree(local)
        preempt, time_due = bool(local[0]), bool(local[1])
        due = force or preempt or time_due or bool(self.save_every_steps and step % self.save_every_steps == 0)
        if self.tier is not None and not preempt and step % self.local_every_steps == 0 \
                and step != self._last_saved_step:
            return self._save_local(step, state, metrics, durable=due)
        if not due:
            return False
        if step == self._last_saved_step and not preempt:  # nothing is written: say so, never True
            if force:
                log.warning("step %d is already saved by this manager; not saving it again (its checkpoint keeps "
                            "the metrics it was saved with): maybe_save returns False", step)
            return False
        if step != self._last_saved_step:
            try:
                if not self.save(step, state, metrics, _always=force or preempt):
                    return False
            except CheckpointExistsError:
                log.warning("step %d is already committed under %s (a resumed or rolled-back run?); not "
                            "saving it again", step, self.root)
                if not preempt:
                    return False
        if preempt:
            self.wait()
            self.preempted = True
            if self.comm.is_coordinator:
                log.warning("preemption signal received: step %d is committed; stopping", step)
        return True

    def _agree(self, flags: list[int]) -> list[int]:
        """Element-wise max of small integer flags over the ranks (shardckpt's gloo group)."""
        if self.comm.group is None:
            return flags
        t = torch.tensor(flags, dtype=torch.int32)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.comm.group)
        except Exception as e:
            raise CoordinationError(f"preemption/time agreement failed: a rank died or timed out ({e})",
                                    rank=self.comm.global_rank) from e
        return t.tolist()

    def save(self, step: int, state, metrics: dict | None = None, *, _always: bool = False) -> bool:
        """Save `state` as step `step` (all ranks). Waits for the previous save to commit first (its
        errors raise here). Asynchronous managers return once the state is snapshotted. Returns False
        when save_best_only skipped it (nothing written; every rank returns False)."""
        self._reap(block=True)
        policy = self._decide(step, metrics, _always) if self._monitor else None
        if policy is not None and not policy[0].save:
            return False
        replace = step in self._bad_steps  # found unreadable at restore: the new save replaces it atomically
        if replace and self.comm.is_coordinator:
            log.warning("replacing step %d, found unreadable or corrupt at restore", step)
        self._bad_steps.discard(step)
        meta = {"step": int(step), "metrics": json_metrics(metrics)}
        if self.monitor:  # so `shardckpt ls` marks the same best step without being told the metric
            meta["monitor"] = {"metric": self.monitor, "mode": self.mode}
        if policy is not None:  # what a job resumed from this step counts on from (policy.Monitor.load)
            self._monitor.apply(policy[1], policy[0])
            meta["policy"] = self._monitor.state()
        path = self.step_path(step)
        kw = dict(process_group=self.process_group, metadata=meta, overwrite=replace, **self._save_kw)
        if self.incremental:
            kw.update(self._incremental_kw(step))
            meta["incremental"] = {"since_full": self._since_full}  # read back after a restart
        self._save_through(step, path.url, "durable", meta["metrics"], time.monotonic(),
                           lambda: (async_save if self.async_save else api.save)(state, path, **kw))
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        return True

    def _save_local(self, step: int, state, metrics: dict | None, durable: bool) -> bool:
        """maybe_save, every rank, on a step of its local tier (local_every_steps): a local save (in the
        background when async_save), then, when the durable tier is due too, its promotion (the same encoded
        files and manifest, no second snapshot), queued behind it. Events: save_started, snapshot_done and
        committed with tier "local", then committed (durable_s: from the snapshot's start to durable) with
        tier "durable". Returns True (saved)."""
        self._reap(block=False)
        meta = {"step": int(step), "metrics": json_metrics(metrics)}
        tier, t0 = self.tier, time.monotonic()
        upload_to = self.storage if durable else None
        local, stall = self._save_through(
            step, tier.storage.child(step_dir(step)).url, "local", meta["metrics"], t0,
            lambda: (tier.save_async if self.async_save else tier.save)(step, state, meta, upload_to=upload_to))
        if durable:  # a promotion behind a failed local save commits nothing and reports nothing
            self._save_through(
                step, self.step_path(step).url, "durable", meta["metrics"], t0,
                lambda: tier.promote_async(step, self.storage, exist_ok=True, after=local) if self.async_save
                else tier.promote(step, self.storage, exist_ok=True), stall=stall)
        self._last_saved_step, self._last_save_time = step, time.monotonic()
        return True

    def _save_through(self, step: int, url: str, tier: str, metrics: dict, t0: float, start, *,
                      stall: float | None = None):
        """The one save -> events -> retention path of every save the manager makes (durable saves, local
        saves, promotions), every rank. `start()` begins the save: an AsyncSaveHandle when async_save (queued
        for _reap, which applies durable retention once it committed), else the committed Manifest (None:
        nothing committed). Events: save_started and snapshot_done, unless `stall` is given (a promotion,
        whose snapshot was its local save's); committed or failed when the commit reports, on the thread
        that committed it; failed when start() raises. Returns (handle or manifest, the stall)."""
        if stall is None:
            self.events.emit("save_started", step, path=url, metrics=metrics, tier=tier)
        snapshot = stall is None
        try:
            out = start()
            if snapshot:
                stall = out.stall_s if self.async_save else time.monotonic() - t0
                self.events.emit("snapshot_done", step, path=url, stall_s=stall, tier=tier)
        except Exception as e:
            self.events.emit("failed", step, path=url, error=f"{type(e).__name__}: {e}"[:2000], tier=tier)
            raise

        def report(manifest, err):
            if self.events.enabled and (manifest is not None or err is not None):  # None, None: not committed
                report_commit(self.events, step, url, metrics, t0, stall, manifest, err, tier=tier)
        if self.async_save:
            self._pending.append((step, out, tier))
            out.add_done_callback(report)
        else:
            report(out, None)
            if tier == "durable":
                self._after_commit(step)
        return out, stall

    def _decide(self, step: int, metrics: dict | None, always: bool) -> tuple[Decision, float | None]:
        """All ranks: the coordinator's policy decision for this save and its metric value, broadcast (one
        small record); sets should_stop. Preemption and forced saves are always written."""
        def decide() -> dict:
            mon = self._monitor
            if not mon.known:  # a fresh manager on an existing root: the best committed value counts
                best = self.best_step()
                mon.load(None, None if best is None else self.step_metric(best))
            value = metric_value(metrics, self.monitor)
            d = mon.decide(value)
            if mon.save_best_only and not always and metric_missing(metrics, self.monitor):
                # skipping would write nothing, ever (a typo'd metric name): every rank raises this instead
                raise MetricError(
                    f"save_best_only cannot decide step {step}: the monitored metric {self.monitor!r} is not "
                    f"among the metrics given ({sorted(map(str, metrics or {}))}); pass it in maybe_save's "
                    f"metrics= or change monitor=", name="monitor")
            return {"save": d.save or always, "improved": d.improved, "stop": d.stop, "value": value}
        record = self.comm.from_coordinator(decide)  # an error (unreadable root, no metric) raises on every rank
        d = Decision(record["save"], record["improved"], record["stop"])
        if d.stop and not self.should_stop and self.comm.is_coordinator:
            log.warning("early stopping: %d monitored saves without improving %s by more than %g (best %s); "
                        "restore(state, 'best') gives the best step", self._monitor.patience, self.monitor,
                        self._monitor.min_delta, self._monitor.best)
        self.should_stop = self.should_stop or d.stop
        if not d.save:
            self._monitor.apply(record["value"], d)
            self.events.emit("skipped", step, metrics=json_metrics(metrics), value=record["value"])
        return d, record["value"]

    def _incremental_kw(self, step: int) -> dict:
        """All ranks: the base of an incremental save (the previous save of this manager or the step it
        restored, committed: the previous save was reaped), or a full write with content hashes every
        full_every saves (counted in the manifests' user_metadata["incremental"], so restarts keep it)."""
        prev = self._last_saved_step

        def base_state() -> list:  # coordinator: [prev committed?, since_full recorded in it]
            if prev is None or prev == step or prev in self._bad_steps or not self.step_path(prev).exists(MANIFEST_NAME):
                return [False, None]
            since = self.metadata(prev).get("incremental", {}) if self._since_full is None else {}
            return [True, since.get("since_full") if isinstance(since, dict) else None]
        committed, since = self.comm.from_coordinator(base_state)  # an error raises on every rank at once
        if committed and self._since_full is None:  # after restore(): continue the restored step's count
            self._since_full = since if type(since) is int else None
        if not committed or self._since_full is None or self._since_full + 1 >= self.full_every:
            self._since_full = 0
            return {"content_hash": True}
        self._since_full += 1
        return {"base": self.step_path(prev)}

    def _reap(self, block: bool) -> None:
        """Finish the pending async saves (durable saves, local saves and promotions, in order): raise the
        first one's error, or run durable retention after a durable commit. Not blocking, a failed save is
        left pending: a save that failed here may still be running on another rank, so its error is raised
        where every rank waits for it (the next save, wait, close or restore, or async_save's own settle,
        after which it is not raised again)."""
        while self._pending:
            step, handle, tier = self._pending[0]
            if not block and (not handle.done() or handle.exception() is not None):
                return
            self._pending.pop(0)
            if handle._observed and handle.exception() is not None:
                continue  # raised already, by the async_save that waited for it
            handle.wait()  # its committed / failed event was queued by the thread that committed it
            if tier == "durable":
                self._after_commit(step)

    def wait(self) -> None:
        """Block until the pending save committed (all ranks); raise its error if it failed."""
        self._reap(block=True)

    def close(self) -> None:
        """Wait for the pending save, deliver the queued events (then close the callbacks) and restore the
        previous signal handlers."""
        try:
            self.wait()
        finally:
            self.events.close()
            for num, old in self._old_handlers.items():
                try:
                    signal.signal(num, old)
                except (ValueError, TypeError):
                    pass
            self._old_handlers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------------------------------- retention
    def _after_commit(self, step: int) -> None:
        """Coordinator: retention and gc, now that `step` is committed. Failures are logged, not raised:
        a failed delete must not stop training."""
        if not self.comm.is_coordinator:
            return
        try:
            for s in self.to_delete():
                self._delete_step(s)
                self.events.emit("deleted", s, path=self.step_path(s).url, tier="durable")
            self._gc()
        except Exception as e:
            log.warning("checkpoint retention under %s failed: %s: %s", self.root, type(e).__name__, e)

    def to_delete(self) -> list[int]:
        """The committed steps retention would delete now, recomputed from the manifests on storage."""
        if self.keep_last is None and not self.keep_best:
            return []
        steps = self.steps()
        ranked, unknown = self._ranking(steps) if self.keep_best else ([], [])
        # a step whose metric cannot be read might be among the best: keep it (nothing goes on a guess)
        return [s for s in steps_to_delete(steps, ranked, keep_last=self.keep_last, keep_best=self.keep_best,
                                           keep_every_steps=self.keep_every_steps) if s not in unknown]

    def _delete_step(self, step: int) -> None:
        # manifest first, then the data nothing needs any more (shardckpt.lifecycle.deleter, the one deleter)
        retire(self.storage, step_dir(step), self.gc_grace_s)
        log.info("deleted checkpoint step %d", step)

    def _gc(self) -> None:
        exclude = [s for s, _, tier in self._pending if tier == "durable"]
        try:
            removed = gc_uncommitted(self.storage, dry_run=False, grace_s=self.gc_grace_s, exclude=exclude)
        except Exception as e:
            log.warning("gc of uncommitted checkpoints under %s failed: %s", self.root, e)
            return
        for rel in removed:
            log.warning("removed uncommitted leftover %s/%s", self.root, rel)

    # ---------------------------------------------------------------------------------------- restore
    def resume_from(self, step: int) -> None:
        """All ranks, once `step` is restored (shardckpt.manager.restoring): the next incremental save refers
        to it, and the save policy's state (best value, patience count) resumes from its manifest (the
        coordinator reads it; an error raises on every rank at once)."""
        self._last_saved_step = step
        if self._monitor is None:
            return

        def read() -> dict:
            saved = self.metadata(step).get("policy")
            best = self.best_step() if not isinstance(saved, dict) else None
            return {"state": saved, "fallback": None if best is None else self.step_metric(best)}
        saved = self.comm.from_coordinator(read)
        self._monitor.load(saved["state"], saved["fallback"])
        self.should_stop = self._monitor.stopped

    def mark_unreadable(self, step: int) -> None:
        """All ranks, when a restore found committed `step` corrupt: a later save of that step replaces it
        (overwrite) instead of being refused."""
        self._bad_steps.add(step)

    def warm_up(self, state) -> None:
        """All ranks, after a restore (every job's first call) or at the first maybe_save of a job that did
        not restore: create the async-save groups and pre-fault the staging pool in the background, so the
        first save stalls no longer than later ones."""
        self._warmed = True
        if self.async_save:
            warm_up(state, process_group=self.process_group, codec=self._save_kw["codec"],
                    timeout_s=self._save_kw["timeout_s"])

    def restore(self, state, step: str | int = "latest") -> int | None:
        """Load `state` in place from a committed step (all ranks): "latest", "best" or a step number.
        The checkpoint is verified first (`verify`); for "latest" and "best", an unreadable or corrupt one
        is skipped with a warning naming it, and the next one (older, or next best) is tried. "best" without
        monitor= ranks by the monitor the newest manifest recorded (ConfigError, on every rank, if none did).
        Returns the step restored, or None if there is no (valid) checkpoint. A step number never falls
        back: it raises IncompleteCheckpointError when that step was never committed, and the check's or
        the load's typed error (ChecksumError, CorruptDataError, ...) naming the step and file otherwise.
        (shardckpt.manager.restoring does the work.)"""
        self._reap(block=True)
        if self.tier is not None and step == "latest":  # the local tier when it holds a step >= the durable latest
            t0 = time.monotonic()
            got = self.tier.restore(state, self.storage, load_durable=False)
            if got is not None:
                self.restored_tier, self._last_saved_step = ("local", got), got
                self.events.emit("restored", got, path=self.tier.storage.child(step_dir(got)).url, tier="local",
                                 seconds=time.monotonic() - t0)
                return got
        got = restoring.restore(self, state, step)
        self.restored_tier = None if got is None else ("durable", got)
        if self.tier is not None and got is not None:
            self.tier.set_aside_newer(got)
        return got

"""Asynchronous save: the training thread only plans and snapshots; encoding, writing and the commit run in
the background.

    handle = shardckpt.async_save(state_dict, "ckpt/step-100")   # returns after the snapshot
    ...                                                          # train on; tensors may change freely
    handle.wait()                                                # the committed Manifest (or the error)

async_save, in order (all ranks of the group, in the same order):
  1. caller thread: re-raise the error of a finished save nobody has waited for; wait until fewer than
     `max_in_flight` saves are running (their host buffers are about to be reused)
  2. caller thread: pipeline.prepare(stage=True): flatten, plan, agree (two small collectives on the
     foreground companion gloo group, dist.comm_for), snapshot every chunk into a reused HostBufferPool
     (memcpy on CPU, D2H into pinned memory on GPU). This is the whole stall.
  3. background thread (one per group, FIFO): pipeline.write_and_commit on a second gloo group used by nothing
     else: encode + write in the native kernels (GIL released), gather summaries, commit the manifest.

Why a second group: the background collectives (gather write summaries, broadcast the commit result) run
while the caller thread may enter shardckpt's own foreground collectives (the next save's agreement, the
CheckpointManager's preemption vote). Two threads issuing collectives on one group would interleave them in
different orders on different ranks. The training job's own groups (NCCL or gloo) are never used at all.
Every rank runs its background saves on one thread in call order, so the background group sees the same
sequence of collectives on every rank.

Memory: one HostBufferPool per in-flight slot, each sized to this rank's share of the state and reused for
every later save; nothing proportional to the model is allocated per save once the pools are warm.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import torch.distributed as dist


from shardckpt.saving import pipeline
from shardckpt import dist as sdist
from shardckpt.errors import CoordinationError
from shardckpt.format.records import DEFAULT_FRAME_SIZE, Manifest
from shardckpt.saving.staging import HostBufferPool


class AsyncSaveHandle:
    """One asynchronous save. Returned by async_save once the state is snapshotted."""

    def __init__(self, path: str, future: Future, stall_s: float):
        self.path = path
        self.stall_s = stall_s  # seconds async_save blocked the caller (planning + agreement + snapshot)
        self._future = future
        self._observed = False
        self._pool: HostBufferPool | None = None  # the staging pool this save reads from until it is done

    def done(self) -> bool:
        """Whether the save has finished (committed or failed). Never blocks."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Manifest:
        """Block until the save committed and return its Manifest; re-raise its error if it failed (every
        rank raises: the commit result is agreed). Raises TimeoutError if `timeout` passes first."""
        try:
            return self._future.result(timeout)
        except BaseException as e:
            if not isinstance(e, TimeoutError) or self._future.done():
                self._observed = True
            raise
        finally:
            if self._future.done():
                self._observed = True

    def add_done_callback(self, fn) -> None:
        """Call fn(manifest, error) once the save finished (one of them None), on the background thread that
        committed it, or at once if it has finished. Does not count as observing an error. Called by
        CheckpointManager (its "committed" event); fn must be quick and must not block on a collective."""
        def done(f: Future) -> None:
            err = f.exception()
            fn(None if err is not None else f.result(), err)
        self._future.add_done_callback(done)

    def exception(self) -> BaseException | None:
        """The save's error once it finished (None while running or if it committed). Does not count as
        observing it: the error is still raised by wait() or the next async_save."""
        return self._future.exception() if self._future.done() else None


class _AsyncSaver:
    """Per group: the background thread, the dedicated gloo group, the pools and the saves in flight."""

    def __init__(self, comm: sdist.Comm, background: sdist.Comm):
        self.comm = comm
        self.background = background
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-async")
        self.pools: list[HostBufferPool] = []
        self.in_flight: deque[AsyncSaveHandle] = deque()

    def settle(self, limit: int, jobs: bool = False) -> None:
        """Wait until at most `limit` saves are running (and, with `jobs`, no after_saves job either: a
        job holds no staging pool, so a new snapshot need not wait for it); re-raise the first unobserved
        failure."""
        def running() -> int:
            return len(self.in_flight) if jobs else sum(1 for h in self.in_flight if h._pool is not None)
        while self.in_flight:
            h = self.in_flight[0]
            # a job is waited for (and its failure raised) only where every rank waits for it alike: when a
            # save queued behind it must finish, or with `jobs`; a finished one may look running elsewhere
            if running() <= limit and (h._pool is None or not h.done()):
                break
            self.in_flight.popleft()
            err = None
            try:
                h._future.result()
            except BaseException as e:
                err = e
            if err is not None and not h._observed:
                h._observed = True
                raise err


_savers: dict = {}
_savers_lock = threading.Lock()


def _background_group(comm: sdist.Comm, timeout_s: float | None):
    """A gloo group over the same ranks as `comm`, used only by the background thread. Created collectively
    (on the caller thread of every rank) at the first async_save of the group."""
    if comm.group is None:
        return None
    ranks = dist.get_process_group_ranks(comm.group)
    timeout = timedelta(seconds=timeout_s or sdist.default_timeout_s())
    try:
        return dist.new_group(ranks=ranks, backend="gloo", timeout=timeout, use_local_synchronization=True)
    except Exception as e:
        raise CoordinationError(f"could not create shardckpt's async gloo group: {e}", rank=comm.global_rank) from e


def _saver_for(process_group, timeout_s: float | None) -> _AsyncSaver:
    comm = sdist.comm_for(process_group, timeout_s)
    key = (id(comm.group), comm.world_size, timeout_s)
    with _savers_lock:
        saver = _savers.get(key)
    if saver is None:
        group = _background_group(comm, timeout_s)
        background = replace(comm, group=group, rank=dist.get_rank(group) if group is not None else comm.rank)
        saver = _AsyncSaver(comm, background)
        with _savers_lock:
            _savers[key] = saver
    return saver


def async_save(state_dict, path, *, process_group=None, codec: str = "auto", metadata: dict | None = None,
               frame_size: int = DEFAULT_FRAME_SIZE, storage_options: dict | None = None,
               timeout_s: float | None = None, max_in_flight: int = 1, base=None,
               content_hash: bool = False, overwrite: bool = False) -> AsyncSaveHandle:
    """Save like shardckpt.save, returning as soon as the state is snapshotted into reused host buffers.

    Call on every rank of the group, in the same order as the group's other saves. After it returns the
    caller may modify or free its tensors: the checkpoint holds the values at the call. The files and the
    commit are produced in the background; `handle.wait()` returns the committed Manifest.

    Errors: planning errors (plan mismatch, unsupported values, an existing checkpoint) raise here, on every
    rank. A failure of the background part raises from handle.wait(), or, if nobody waited for that
    handle, from the next async_save of the group.

    Args:
        max_in_flight: saves allowed to run at once; the next call waits for the oldest one first. Each slot
            holds one staging pool of this rank's share of the state (memory is bounded by the pools).
        Other arguments: as for shardckpt.save.

    Returns:
        An AsyncSaveHandle (done(), wait(), exception(), stall_s).
    """
    if frame_size <= 0 or frame_size % 8:
        raise ValueError("frame_size must be a positive multiple of 8")
    return start(state_dict, path, pipeline.write_and_commit, process_group=process_group, codec=codec,
                 metadata=metadata, frame_size=frame_size, storage_options=storage_options, timeout_s=timeout_s,
                 max_in_flight=max_in_flight, base=base, content_hash=content_hash, overwrite=overwrite)


def start(state_dict, path, job, *, process_group=None, timeout_s: float | None = None, max_in_flight: int = 1,
          **prepare) -> AsyncSaveHandle:
    """async_save's body, with the background part given: plan and snapshot here (pipeline.prepare with
    stage=True and `prepare`'s arguments: codec, frame_size, metadata, storage_options, ...), then
    job(prepared) on the group's background thread, with prepared.comm the background group; its return
    value (a Manifest) is what handle.wait() returns.
    Called by async_save (job = pipeline.write_and_commit) and shardckpt.tiers (a local save, replicated)."""
    t0 = time.perf_counter()
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")
    saver = _saver_for(process_group, timeout_s)
    saver.settle(max_in_flight - 1)  # frees the slot this save reuses; raises an unobserved failure
    while len(saver.pools) < max_in_flight:
        saver.pools.append(HostBufferPool())
    pool = _free_pool(saver)
    prepared = pipeline.prepare(state_dict, path, process_group=process_group, timeout_s=timeout_s, stage=True,
                            pool=pool, **prepare)
    prepared = replace(prepared, comm=saver.background)
    future = saver.executor.submit(job, prepared)
    handle = AsyncSaveHandle(prepared.storage.url, future, time.perf_counter() - t0)
    handle._pool = pool
    saver.in_flight.append(handle)
    return handle


def after_saves(url: str, job, *, process_group=None, timeout_s: float | None = None) -> AsyncSaveHandle:
    """Queue job(background comm) on the group's background thread, behind the async saves already queued
    (so it sees them committed, and every rank runs it at the same place in the same sequence of background
    collectives). Call on every rank, in the same order as the group's async saves. The next async save does
    not wait for it (it holds no staging pool: the save's snapshot proceeds and its background part queues
    behind the job), but raises its unobserved failure once it is done; wait_all waits for it. stall_s is 0.
    Called by shardckpt.tiers for the promotion of a local step to the durable tier."""
    saver = _saver_for(process_group, timeout_s)
    handle = AsyncSaveHandle(url, saver.executor.submit(job, saver.background), 0.0)
    saver.in_flight.append(handle)
    return handle


def warm_up(state_dict, *, process_group=None, codec: str = "auto", timeout_s: float | None = None,
            max_in_flight: int = 1) -> int:
    """Prepare the first async_save of `state_dict` so that it stalls no longer than later ones: create
    shardckpt's gloo groups now and map this rank's host staging pool, faulted in on a background thread
    (a fresh pool is paid in page faults, about 0.3 s per GB here; without warm_up the first snapshot copies
    behind that thread). Call on every rank of the group, with the same process_group and timeout_s as the
    async saves (CheckpointManager does it for its own saves, at its restore or first maybe_save). Returns
    the bytes being reserved on this rank.
    """
    from shardckpt.plan.save_plan import plan_tensor
    from shardckpt.saving.staging import aligned
    from shardckpt.format.tree import flatten
    saver = _saver_for(process_group, timeout_s)  # collective on first use: all ranks call warm_up
    while len(saver.pools) < max_in_flight:
        saver.pools.append(HostBufferPool())
    nbytes = 0
    for key, t in flatten(state_dict).tensors.items():
        _, item = plan_tensor(key, t, codec, saver.comm.rank, saver.comm.world_size)
        nbytes += aligned(item.nbytes) if item is not None else 0
    for pool in saver.pools:
        pool.reserve(nbytes)
    return nbytes


def _free_pool(saver: _AsyncSaver) -> HostBufferPool:
    """A pool no running save is reading from (settle() left at most max_in_flight - 1 running)."""
    busy = {id(h._pool) for h in saver.in_flight if not h.done()}
    return next(p for p in saver.pools if id(p) not in busy)


def wait_all() -> None:
    """Wait for every in-flight async save (of every group); re-raise the first unobserved failure."""
    with _savers_lock:
        savers = list(_savers.values())
    for s in savers:
        s.settle(0, jobs=True)


def shutdown() -> None:
    """Wait for in-flight saves, then release shardckpt's gloo groups (background and companion) and host
    buffers. Call before dist.destroy_process_group(): gloo groups still referenced at interpreter exit can
    abort the process while it tears down."""
    try:
        reset()
    finally:
        sdist.reset()


def reset() -> None:
    """Forget the background groups and pools. Waits for in-flight saves."""
    with _savers_lock:
        savers = list(_savers.values())
        _savers.clear()
    for s in savers:
        try:
            s.settle(0)
        finally:
            s.executor.shutdown(wait=True)

"""Host staging buffers: allocated once, reused across saves. A save copies (snapshots) its chunks into the
pool; from then on training may change its tensors. On CPU the pool is anonymous page-aligned memory,
pre-faulted at allocation (a fresh allocation runs at page-fault speed, a reused one at memcpy speed); with
CUDA it is pinned by torch so device-to-host copies run asynchronously on a side stream."""
from __future__ import annotations

import contextlib
import mmap
import threading

import torch

from shardckpt.native import kernels as _ext
from shardckpt import config
from shardckpt.format.codec import threads

ALIGN = 4096


def aligned(n: int) -> int:
    """Bytes a staging view of n bytes takes in the pool."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pool_bytes_from_env() -> int | None:
    """SHARDCKPT_POOL_BYTES ("8G" = 8 GiB, "512MiB", or bytes; see shardckpt.config): the default bound of
    staging pools; unset: unbounded. Raises ConfigError naming the variable for a value that is not a size."""
    return config.pool_bytes()


class HostBufferPool:
    """One growable, reusable staging region. `take(sizes)` hands out aligned uint8 views of it for one save.
    Only one save uses a pool at a time (async saves give each in-flight save its own pool).

    max_bytes bounds it (default SHARDCKPT_POOL_BYTES, else unbounded: it grows to this rank's share of the
    state once and is reused). A save whose state is larger streams through a bounded pool: the part that
    does not fit is snapshotted, encoded and written one pool-load at a time before the save returns (so
    an async save stalls longer), the rest is staged and written as usual."""

    def __init__(self, pin: bool | None = None, max_bytes: int | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.max_bytes = max_bytes if max_bytes is not None else pool_bytes_from_env()
        self._buf: torch.Tensor | None = None
        self._mmap: mmap.mmap | None = None
        self._lock = threading.Lock()
        self.allocations = 0  # how many times memory was (re)allocated: tests check reuse

    @property
    def capacity(self) -> int:
        return 0 if self._buf is None else self._buf.numel()

    def _allocate(self, nbytes: int) -> None:
        self._buf = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes away with it
            self._mmap = None
        if self.pin:
            self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            self._mmap = mmap.mmap(-1, nbytes, flags=flags)
            self._buf = torch.frombuffer(self._mmap, dtype=torch.uint8)
            self._buf[::ALIGN].zero_()  # fault every page in now, not during the snapshot
        self.allocations += 1

    def reserve(self, nbytes: int) -> threading.Thread | None:
        """Grow the pool to at least `nbytes` (within max_bytes) on a background thread, pre-faulting every
        page there rather than during the first snapshot on the training thread. take() waits for a
        reservation still running. Called by shardckpt.warm_up (and CheckpointManager.restore). Returns the
        thread, or None if the pool is large enough already."""
        nbytes = min(nbytes, self.max_bytes) if self.max_bytes else nbytes
        if nbytes <= self.capacity:
            return None

        holding = threading.Event()

        def grow():
            with self._lock:
                holding.set()
                if nbytes > self.capacity:
                    self._allocate(nbytes)
        thread = threading.Thread(target=grow, name="shardckpt-prefault", daemon=True)
        thread.start()
        holding.wait()  # from here on a take() waits for the reservation instead of allocating its own
        return thread

    def take(self, sizes: list[int]) -> list[torch.Tensor]:
        """Aligned uint8 views, one per requested size, of a region reused across saves."""
        need = sum(aligned(s) for s in sizes)
        with self._lock:
            if need > self.capacity:
                grown = max(need, int(self.capacity * 1.25))
                self._allocate(min(grown, self.max_bytes) if self.max_bytes and need <= self.max_bytes else grown)
            views, pos = [], 0
            for s in sizes:
                views.append(self._buf[pos:pos + s])
                pos += aligned(s)
            return views


def snapshot_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a tensor's bytes into a uint8 staging view. CPU: parallel native memcpy when src is contiguous,
    torch's strided copy otherwise. CUDA: non_blocking copy (the caller synchronizes once for all chunks)."""
    if src.is_cuda:
        dst.view(src.dtype).view(src.shape).copy_(src, non_blocking=True)
        return
    if src.is_contiguous():
        _ext.copy_into(dst.numpy(), src.reshape(-1).view(torch.uint8).numpy() if src.numel() else b"",
                       threads())
    else:
        dst.view(src.dtype).view(src.shape).copy_(src)


_default_pool: HostBufferPool | None = None


def default_pool() -> HostBufferPool:
    global _default_pool
    if _default_pool is None:
        _default_pool = HostBufferPool()
    return _default_pool


def stage(items: list, pool: HostBufferPool) -> list[torch.Tensor]:
    """Snapshot write items (plan.WriteItem) into the pool and return the staged tensors, one per item.
    Called on the saving thread (the whole stall of an async save). Device tensors are copied (non_blocking,
    into pinned memory) on a side stream that first waits for the work already queued on the current
    stream, so the snapshot sees every pending update and training kernels queued later never wait behind
    it; one event ends it."""
    views = pool.take([i.nbytes for i in items])
    cuda = any(i.source.is_cuda for i in items)
    stream = None
    if cuda:
        stream = _side_stream()
        stream.wait_stream(torch.cuda.current_stream())
    # contiguous CPU sources: one native call copies them all, its threads sharing 1 MiB pieces (a call per
    # tensor would start threads per tensor, or copy a small tensor on one core)
    flat = [(v, i.source) for v, i in zip(views, items)
            if not i.source.is_cuda and i.source.is_contiguous() and i.source.numel()]
    if flat:
        _ext.copy_many([v.numpy() for v, _ in flat],
                       [src.reshape(-1).view(torch.uint8).numpy() for _, src in flat], threads())
    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        for v, i in zip(views, items):
            if i.source.is_cuda or not i.source.is_contiguous():
                snapshot_into(v, i.source)
    if cuda:
        done = torch.cuda.Event()
        done.record(stream)
        done.synchronize()
        for i in items:  # the caller's tensors were read on our stream: keep their memory alive for it
            if i.source.is_cuda:
                i.source.record_stream(stream)
    return [v.view(i.source.dtype).view(i.sizes) if i.nbytes else i.source.detach().cpu()
            for v, i in zip(views, items)]


_side_streams: dict = {}


def _side_stream():
    dev = torch.cuda.current_device()
    if dev not in _side_streams:
        _side_streams[dev] = torch.cuda.Stream(dev)
    return _side_streams[dev]

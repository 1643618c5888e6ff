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
    an async save stalls longer), the rest is staged and written as usual.

    A fresh CPU region costs page faults (about 0.3 s per GB on the machine we measure on, four times the
    copy). They are taken on a background thread, a piece at a time from the start of the region
    (MADV_POPULATE_WRITE), and the first snapshot copies each piece as soon as it is ready: the faults
    overlap the copy instead of preceding it. `ready(end)` waits for the first `end` bytes. Pre-faulting is
    only a speed-up: the thread never writes to the region, a copy into a page not yet faulted is correct,
    and the thread marks everything ready when it stops, whatever happened to it (a kernel before Linux
    5.14, without MADV_POPULATE_WRITE, leaves the faults to the copy)."""

    PIECE = 32 << 20  # bytes pre-faulted per step of the background thread

    def __init__(self, pin: bool | None = None, max_bytes: int | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.max_bytes = max_bytes if max_bytes is not None else pool_bytes_from_env()
        self._buf: torch.Tensor | None = None
        self._mmap: mmap.mmap | None = None
        self._lock = threading.Lock()
        self._faulted = threading.Condition()
        self._ready = 0  # bytes from the start of the region already faulted in
        self._prefault: threading.Thread | None = None
        self._stop = False
        self.allocations = 0  # how many times memory was (re)allocated: tests check reuse

    @property
    def capacity(self) -> int:
        return 0 if self._buf is None else self._buf.numel()

    def _allocate(self, nbytes: int) -> None:
        self._stop_prefault()
        self._buf = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes away with it
            self._mmap = None
        if self.pin:
            self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self._ready = nbytes
        else:
            self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._buf = torch.frombuffer(self._mmap, dtype=torch.uint8)
            self._ready, self._stop = 0, False
            self._prefault = threading.Thread(target=self._fault_in, args=(self._mmap, nbytes),
                                              name="shardckpt-prefault", daemon=True)
            self._prefault.start()
        self.allocations += 1

    def _fault_in(self, region: mmap.mmap, n: int) -> None:
        """Background thread: fault the region in, PIECE bytes at a time, publishing progress."""
        populate = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
        try:
            for lo in range(0, n, self.PIECE):
                if self._stop:
                    return
                hi = min(n, lo + self.PIECE)
                region.madvise(populate, lo, hi - lo)  # an older kernel refuses: the copies fault pages in
                with self._faulted:
                    self._ready = hi
                    self._faulted.notify_all()
        except Exception:  # only a speed-up failed (or the region was closed): copies fault pages themselves
            pass
        finally:
            with self._faulted:
                self._ready = n
                self._faulted.notify_all()

    def _stop_prefault(self) -> None:
        if self._prefault is not None:
            self._stop = True
            self._prefault.join()
            self._prefault = None

    def ready(self, end: int) -> int:
        """Block until the first `end` bytes of the region (at most its capacity) are faulted in; return how
        many are. Called by stage() on the snapshotting thread."""
        with self._faulted:
            while self._ready < min(end, self.capacity):
                self._faulted.wait()
            return self._ready

    def offset(self, view: torch.Tensor) -> int:
        """Where a view from take() starts in the region."""
        return view.data_ptr() - self._buf.data_ptr()

    def reserve(self, nbytes: int) -> threading.Thread | None:
        """Grow the pool to at least `nbytes` (within max_bytes) now, its pages faulted in on a background
        thread rather than during the first snapshot on the training thread. Called by shardckpt.warm_up
        (and CheckpointManager). Returns the faulting thread, or None if the pool is large enough already."""
        nbytes = min(nbytes, self.max_bytes) if self.max_bytes else nbytes
        with self._lock:
            if nbytes <= self.capacity:
                return None
            self._allocate(nbytes)
            return self._prefault

    def take(self, sizes: list[int]) -> list[torch.Tensor]:
        """Aligned uint8 views, one per requested size, of a region reused across saves. A region grown here
        is still being faulted in: copy into the views through stage(), which waits for ready()."""
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
        _copy_behind_faults(pool, [v for v, _ in flat], [src.reshape(-1).view(torch.uint8) for _, src in flat])
    pool.ready(max((pool.offset(v) + v.numel() for v in views if v.numel()), default=0))
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


def _copy_behind_faults(pool: HostBufferPool, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """Copy srcs into their pool views as fast as the pool's pages are faulted in: wait until the next
    view's first bytes are ready, then one native call copies every byte already faulted (a view that
    straddles the edge is split there), and so on. Once the pool is warm this is one call."""
    todo = sorted(((pool.offset(d), d, s) for d, s in zip(dsts, srcs)), key=lambda x: x[0])
    while todo:
        edge = pool.ready(todo[0][0] + 1)
        batch_d, batch_s, rest = [], [], []
        for off, d, s in todo:
            n = max(0, min(d.numel(), edge - off))
            if n:
                batch_d.append(d[:n].numpy())
                batch_s.append(s[:n].numpy())
            if n < d.numel():
                rest.append((off + n, d[n:], s[n:]))
        _ext.copy_many(batch_d, batch_s, threads())
        todo = rest


_side_streams: dict = {}


def _side_stream():
    dev = torch.cuda.current_device()
    if dev not in _side_streams:
        _side_streams[dev] = torch.cuda.Stream(dev)
    return _side_streams[dev]

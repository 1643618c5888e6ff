"""Host staging buffers: allocated once, reused across saves. A save copies (snapshots) its chunks into the
pool; from then on training may change its tensors. On CPU the pool is anonymous page-aligned memory,
pre-faulted at allocation (a fresh allocation runs at page-fault speed, a reused one at memcpy speed); with
CUDA it is pinned by torch so device-to-host copies run asynchronously on a side stream."""
from __future__ import annotations

import mmap
import threading

import torch

from . import _ext
from .codec import threads

ALIGN = 4096


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class HostBufferPool:
    """One growable, reusable staging region. `take(sizes)` hands out aligned uint8 views of it for one save;
    the caller `release()`s them when the save's writes are done. Only one save uses the pool at a time
    (async saves wait for the previous one before staging)."""

    def __init__(self, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
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

    def take(self, sizes: list[int]) -> list[torch.Tensor]:
        """Aligned uint8 views, one per requested size, of a region reused across saves."""
        need = sum(_align(s) for s in sizes)
        with self._lock:
            if need > self.capacity:
                self._allocate(max(need, int(self.capacity * 1.25)))
            views, pos = [], 0
            for s in sizes:
                views.append(self._buf[pos:pos + s])
                pos += _align(s)
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

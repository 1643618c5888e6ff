"""The load path: for each box the caller needs, the saved chunks that overlap it, the frames that hold
those rows, one ranged read per (chunk, row batch), decode + verify, copy into the caller's tensor."""
from __future__ import annotations

import bisect
import math
import mmap
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from shardckpt.native import kernels as _ext
from shardckpt.format.codec import CODEC_IDS, plane_size, threads
from shardckpt.errors import CorruptDataError, StorageError
from shardckpt.format.records import Chunk, Manifest, TensorMeta
from shardckpt.plan.geometry import frame_span, intersect, row_batches
from shardckpt.format.refs import chunk_storage, reference_error
from shardckpt.storage.base import ReadRange, Storage
from shardckpt.storage.local import LocalStorage
from shardckpt.loading.profile import phase
from shardckpt.loading.verify import frame_error

TASK_BYTES = 16 << 20  # raw bytes of one read task at most: a batch holds whole tasks, so this bounds its overshoot


@dataclass(frozen=True)
class Target:
    """A box of saved tensor `key` to fill: `dest` is the caller's tensor (or view) holding global box
    (offsets, sizes)."""
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dest: torch.Tensor


@dataclass(frozen=True)
class ReadTask:
    chunk: Chunk
    meta: TensorMeta
    row_lo: int
    row_hi: int
    inter: tuple  # (offsets, sizes) of the overlap in global coordinates
    target: Target


@dataclass
class ReadStats:
    bytes_read: int = 0
    frames_decoded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def plan_reads(targets: list[Target], manifest: Manifest, chunks_by_key: dict[str, list[Chunk]]) -> list[ReadTask]:
    """The read tasks that fill the targets, each at most ~TASK_BYTES of rows of one chunk."""
    tasks = []
    for tgt in targets:
        meta = manifest.tensors[tgt.key]
        for ch in chunks_by_key.get(tgt.key, ()):
            inter = intersect(ch.offsets, ch.sizes, tgt.offsets, tgt.sizes)
            if inter is None or (meta.shape and math.prod(inter[1]) == 0):
                continue
            if not meta.shape:
                tasks.append(ReadTask(ch, meta, 0, 1, inter, tgt))
                continue
            row_lo = inter[0][0] - ch.offsets[0]
            row_bytes = math.prod(ch.sizes[1:]) * meta.itemsize
            align = ch.frame_size // row_bytes if row_bytes and ch.frame_size % row_bytes == 0 else 1
            for lo, hi in row_batches(row_lo, row_lo + inter[1][0], row_bytes, TASK_BYTES, align):
                tasks.append(ReadTask(ch, meta, lo, hi, inter, tgt))
    # file order, then offset: sequential reads keep the OS read-ahead useful
    tasks.sort(key=lambda t: (t.chunk.base, t.chunk.file, t.chunk.frames[0].offset if t.chunk.frames else 0,
                              t.row_lo))
    return tasks


BATCH_BYTES = 32 << 20  # stored bytes per fetch (read_ranges reads its 8 MB pieces in parallel); the fetch
#                        buffers (AHEAD_LOCAL + 1 of them) are a load's extra memory, ~100 MB per rank at this size
FIRST_BATCH_BYTES = 8 << 20  # the first batches are smaller (8, 16, then 32 MB): decoding starts sooner
AHEAD_LOCAL = 2   # batches fetched ahead of the one being decoded, local files
AHEAD_REMOTE = 4  # object stores: more requests in flight to hide their latency


@dataclass(frozen=True)
class _Fetch:
    task: ReadTask
    span: object      # geometry.FrameSpan
    start: int        # file offset of the task's first frame
    stored: int       # stored bytes of its frames


def _batches(tasks: list[ReadTask]) -> list[list[_Fetch]]:
    """Consecutive tasks of one file grouped into batches of at most BATCH_BYTES stored bytes (or one task,
    if larger), the first ones smaller (FIRST_BATCH_BYTES, doubling): a cold load waits for its first batch
    before it can decode anything."""
    batches: list[list[_Fetch]] = []
    size, limit = 0, FIRST_BATCH_BYTES
    for t in tasks:
        span = frame_span(t.chunk.sizes, t.meta.itemsize, t.chunk.frame_size, t.row_lo, t.row_hi)
        if span.nbytes == 0:
            continue
        frames = t.chunk.frames[span.first:span.last]
        start = frames[0].offset
        f = _Fetch(t, span, start, frames[-1].offset + frames[-1].stored_len - start)
        last = batches[-1][0].task.chunk if batches else None
        if last is None or (last.base, last.file) != (t.chunk.base, t.chunk.file) or size + f.stored > limit:
            if batches:
                limit = min(2 * limit, BATCH_BYTES)
            batches.append([])
            size = 0
        batches[-1].append(f)
        size += f.stored
    return batches


def run_reads(storage: Storage, manifest: Manifest, tasks: list[ReadTask], stats: ReadStats | None = None) -> None:
    """Fetch and decode the tasks as a pipeline: batches (consecutive tasks of one file, about BATCH_BYTES)
    are fetched ahead on I/O threads, one read_ranges call each (overlapping or adjacent frame ranges merged,
    so a frame two tasks share is fetched once), while this thread decodes the oldest fetched batch with
    every native thread the rank has. Reading from disk or network and decoding overlap instead of taking
    turns; memory stays bounded by (ahead + 1) fetch buffers."""
    batches = _batches(tasks)
    if not batches:
        return
    ahead = min(len(batches), AHEAD_LOCAL if isinstance(storage, LocalStorage) else AHEAD_REMOTE)
    nthreads = threads()
    pending: deque = deque()
    todo = iter(batches)
    pool = ThreadPoolExecutor(ahead, thread_name_prefix="shardckpt-fetch")
    try:
        def submit():
            b = next(todo, None)
            if b is not None:
                pending.append((b, pool.submit(_fetch, storage, b, stats)))
        for _ in range(ahead):
            submit()
        while pending:
            batch, fut = pending.popleft()
            with phase("read_wait"):
                buf, merged = fut.result()
            submit()
            try:
                _decode_batch(batch, buf, merged, nthreads, stats, storage.url)
            finally:
                _FetchBuffers.give(buf)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for _, fut in pending:  # fetched but never decoded (an error stopped the loop): recycle buffers
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                _FetchBuffers.give(fut.result()[0])


class _FetchBuffers:
    """Fetch buffers reused across batches and loads (a fresh one per batch would spend its time in page
    faults). As many are kept as a local load keeps in flight (AHEAD_LOCAL + 1, ~100 MB), the rest are
    dropped."""
    _lock = threading.Lock()
    _free: list[np.ndarray] = []

    @classmethod
    def take(cls, nbytes: int) -> np.ndarray:
        with cls._lock:
            for i, b in enumerate(cls._free):
                if b.nbytes >= nbytes:
                    return cls._free.pop(i)[:nbytes]
        # one size for all batches (the small first ones too), so every later batch finds a buffer to reuse;
        # pages are faulted in only where a read lands
        size = -(-max(nbytes, BATCH_BYTES + (1 << 20)) // mmap.PAGESIZE) * mmap.PAGESIZE
        return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                             dtype=np.uint8)[:nbytes]  # page-aligned, as O_DIRECT reads need

    @classmethod
    def give(cls, buf: np.ndarray) -> None:
        while isinstance(buf.base, np.ndarray):  # the whole buffer, not the slice handed out
            buf = buf.base
        with cls._lock:
            if len(cls._free) < AHEAD_LOCAL + 1:
                cls._free.append(buf)


def _fetch(storage: Storage, batch: list[_Fetch], stats: ReadStats | None):
    """Read one batch's stored bytes (merged ranges) into a fetch buffer. Returns (buffer, merged ranges as
    [file_start, file_end, buffer_offset])."""
    align = storage.read_align  # ranges start on its boundaries, in the buffer too (O_DIRECT on local files)
    merged: list[list[int]] = []
    total = 0
    for f in sorted(batch, key=lambda f: f.start):
        start, end = f.start - f.start % align, f.start + f.stored
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                total += end - merged[-1][1]
                merged[-1][1] = end
        else:
            total = -(-total // align) * align
            merged.append([start, end, total])
            total += end - start
    buf = _FetchBuffers.take(total)
    try:  # a reference's frames are in its base checkpoint (FORMAT.md §7)
        with phase("read_io"):
            chunk_storage(storage, batch[0].task.chunk).read_ranges(
                batch[0].task.chunk.file, [ReadRange(a, b - a, d) for a, b, d in merged], buf)
    except StorageError as e:
        _FetchBuffers.give(buf)
        short = _short_file_error(storage, batch)
        if short is None:
            raise  # an I/O error, not a damaged checkpoint
        raise short from e
    except BaseException:
        _FetchBuffers.give(buf)
        raise
    if stats is not None:
        with stats.lock:
            stats.bytes_read += total
    return buf, merged


def _decode_batch(batch: list[_Fetch], buf: np.ndarray, merged: list[list[int]], nthreads: int,
                  stats: ReadStats | None, where: str) -> None:
    starts = [m[0] for m in merged]
    for f in batch:
        m = merged[bisect.bisect_right(starts, f.start) - 1]
        pos = m[2] + f.start - m[0]
        decode_task(f.task, f.span, buf[pos:pos + f.stored], nthreads, stats, where)


def _short_file_error(storage: Storage, batch: list[_Fetch]) -> CorruptDataError | None:
    """A data file that is missing or shorter than its frames is a damaged checkpoint: name the first key
    whose frames it cuts off. None if the file is long enough (the read failed for another reason)."""
    ch = batch[0].task.chunk
    try:
        size = chunk_storage(storage, ch).size(ch.file)
    except Exception:
        size = None
    cut = [f for f in batch if size is None or f.start + f.stored > size]
    if not cut:
        return None
    f = min(cut, key=lambda f: f.start)
    what = "missing" if size is None else f"{size} bytes, shorter than its frames (to byte {f.start + f.stored})"
    if ch.base:
        return reference_error(storage, f.task.chunk, f"referenced data file is {what}")
    return CorruptDataError(f"data file is {what}", key=f.task.chunk.key, file=ch.file, rank=ch.rank)


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """A per-thread buffer for decoded bytes that cannot go straight into the caller's tensor, reused
    across tasks (a fresh allocation per task would spend its time in page faults)."""
    buf = getattr(_local, "decode", None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        _local.decode = buf
    return buf[:nbytes]


def _dest_view(task: ReadTask, rows: int):
    """(source narrowing needed?, the caller's region for rows [row_lo, row_hi) of the overlap)."""
    ch, meta = task.chunk, task.meta
    inter_off, inter_size = task.inter
    narrow_src = any(inter_off[d] != ch.offsets[d] or inter_size[d] != ch.sizes[d] for d in range(1, len(meta.shape)))
    dst = task.target.dest
    g_lo = ch.offsets[0] + task.row_lo
    for d in range(len(meta.shape)):
        lo = (g_lo if d == 0 else inter_off[d]) - task.target.offsets[d]
        n = rows if d == 0 else inter_size[d]
        if lo != 0 or n != dst.shape[d]:
            dst = dst.narrow(d, lo, n)
    return narrow_src, dst


def _decode(task: ReadTask, first: int, frames, src: np.ndarray, start: int, dst: np.ndarray,
            nthreads: int, where: str) -> None:
    """Decode consecutive frames (index `first` of the chunk onwards; their stored bytes are in `src`, which
    begins at file offset `start`) into `dst`; kernel errors become verify.frame_error's typed ones, naming
    key and the data file under checkpoint `where`."""
    ch = task.chunk
    table = [(f.offset - start, f.stored_len, f.raw_len, f.crc32c, f.encoded) for f in frames]
    try:
        with phase("decode"):
            _ext.decode_frames(src, table, dst, plane_size(task.meta.dtype), CODEC_IDS[ch.codec], nthreads)
    except (_ext.FrameError, ValueError) as e:
        raise frame_error(e, ch, frames, first, where) from None


def decode_task(task: ReadTask, span, src: np.ndarray, nthreads: int, stats: ReadStats | None, where: str) -> None:
    ch, meta = task.chunk, task.meta
    frames = ch.frames[span.first:span.last]
    start = frames[0].offset
    raw_total = sum(f.raw_len for f in frames)
    rows = task.row_hi - task.row_lo
    narrow_src, dst = _dest_view(task, rows) if meta.shape else (False, task.target.dest)
    if stats is not None:
        with stats.lock:
            stats.frames_decoded += len(frames)
    if not narrow_src and dst.dtype == meta.dtype and dst.device.type == "cpu" and dst.is_contiguous():
        # The caller's region is these rows' bytes, in order: frames wholly inside it decode straight into
        # place (one kernel call per run of them); only the partial frames at either end go through scratch.
        out = dst.reshape(-1).view(torch.uint8).numpy()
        lo_b = span.first * ch.frame_size + span.skip  # chunk byte offset of out[0]
        hi_b = lo_b + span.nbytes
        run: list[int] = []

        def flush():
            if run:
                a = (span.first + run[0]) * ch.frame_size - lo_b
                b = a + sum(frames[j].raw_len for j in run)
                _decode(task, span.first + run[0], [frames[j] for j in run],
                        src[frames[run[0]].offset - start:], frames[run[0]].offset, out[a:b], nthreads, where)
                run.clear()
        for j, f in enumerate(frames):
            a = (span.first + j) * ch.frame_size
            if lo_b <= a and a + f.raw_len <= hi_b:
                run.append(j)
                continue
            flush()
            tmp = _scratch(f.raw_len)
            _decode(task, span.first + j, [f], src[f.offset - start:], f.offset, tmp, nthreads, where)
            x, y = max(a, lo_b), min(a + f.raw_len, hi_b)
            with phase("copy"):
                out[x - lo_b:y - lo_b] = tmp[x - a:y - a]
        flush()
        return
    raw = _scratch(raw_total)
    _decode(task, span.first, frames, src, start, raw, nthreads, where)
    piece = torch.from_numpy(raw[span.skip:span.skip + span.nbytes]).view(meta.dtype)
    if not meta.shape:
        dst.copy_(piece.view(()))
        return
    src_view = piece.view((rows,) + tuple(ch.sizes[1:]))
    inter_off, inter_size = task.inter
    for d in range(1, len(meta.shape)):
        lo = inter_off[d] - ch.offsets[d]
        if lo != 0 or inter_size[d] != ch.sizes[d]:
            src_view = src_view.narrow(d, lo, inter_size[d])
    with phase("copy"):
        dst.copy_(src_view)

"""The load path: for each box the caller needs, the saved chunks that overlap it, the frames that hold
those rows, one ranged read per (chunk, row batch), decode + verify, copy into the caller's tensor."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import _ext
from .codec import CODEC_IDS, plane_size, threads
from .errors import ChecksumError, CorruptDataError
from .format import Chunk, Manifest, TensorMeta
from .geometry import frame_span, intersect, row_batches
from .storage.base import ReadRange, Storage

TASK_BYTES = 64 << 20
READ_WORKERS = 4


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
            for lo, hi in row_batches(row_lo, row_lo + inter[1][0], row_bytes, TASK_BYTES):
                tasks.append(ReadTask(ch, meta, lo, hi, inter, tgt))
    # file order, then offset: sequential reads keep the OS read-ahead useful
    tasks.sort(key=lambda t: (t.chunk.file, t.chunk.frames[0].offset if t.chunk.frames else 0, t.row_lo))
    return tasks


def run_reads(storage: Storage, manifest: Manifest, tasks: list[ReadTask], stats: ReadStats | None = None) -> None:
    workers = min(READ_WORKERS, max(1, len(tasks)))
    nthreads = max(1, threads() // workers) if workers > 1 else threads()
    if workers == 1:
        for t in tasks:
            _run_one(storage, manifest, t, nthreads, stats)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="shardckpt-read") as pool:
        for f in [pool.submit(_run_one, storage, manifest, t, nthreads, stats) for t in tasks]:
            f.result()


def _run_one(storage: Storage, manifest: Manifest, task: ReadTask, nthreads: int, stats: ReadStats | None) -> None:
    ch, meta = task.chunk, task.meta
    F = manifest.frame_size
    span = frame_span(ch.sizes, meta.itemsize, F, task.row_lo, task.row_hi)
    if span.nbytes == 0:
        return
    frames = ch.frames[span.first:span.last]
    start = frames[0].offset
    stored = frames[-1].offset + frames[-1].stored_len - start
    raw_total = sum(f.raw_len for f in frames)
    src = np.empty(stored, dtype=np.uint8)
    storage.read_ranges(ch.file, [ReadRange(start, stored, 0)], src)
    raw = np.empty(raw_total, dtype=np.uint8)
    table = [(f.offset - start, f.stored_len, f.raw_len, f.crc32c, f.encoded) for f in frames]
    try:
        _ext.decode_frames(src, table, raw, plane_size(meta.dtype), CODEC_IDS[ch.codec], nthreads)
    except _ext.FrameError as e:
        bad = frames[e.index]
        cls = ChecksumError if e.reason == "checksum" else CorruptDataError
        raise cls(f"frame {span.first + e.index} at byte offset {bad.offset} failed its {e.reason} check",
                  key=ch.key, file=ch.file, rank=ch.rank) from None
    except ValueError as e:
        raise CorruptDataError(f"frame table is inconsistent: {e}", key=ch.key, file=ch.file) from None
    if stats is not None:
        stats.bytes_read += stored
        stats.frames_decoded += len(frames)
    rows = task.row_hi - task.row_lo
    piece = torch.from_numpy(raw[span.skip:span.skip + span.nbytes]).view(meta.dtype)
    piece = piece.view((rows,) + tuple(ch.sizes[1:])) if meta.shape else piece.view(())
    # the part of these rows inside the overlap, in chunk coordinates
    inter_off, inter_size = task.inter
    if meta.shape:
        g_lo = ch.offsets[0] + task.row_lo
        src_view = piece
        for d in range(1, len(meta.shape)):
            lo = inter_off[d] - ch.offsets[d]
            if lo != 0 or inter_size[d] != ch.sizes[d]:
                src_view = src_view.narrow(d, lo, inter_size[d])
        dst = task.target.dest
        for d in range(len(meta.shape)):
            lo = (g_lo if d == 0 else inter_off[d]) - task.target.offsets[d]
            n = rows if d == 0 else inter_size[d]
            if lo != 0 or n != dst.shape[d]:
                dst = dst.narrow(d, lo, n)
        dst.copy_(src_view)
    else:
        task.target.dest.copy_(piece)

"""The per-rank write path: stage (optional snapshot), encode frames, write one data file, write its index.
Encoding runs in the native kernels (threads, GIL released) while the previous batch is being written."""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import _ext
from ._faults import fault_point
from .codec import CODEC_IDS, RAW, ZSTD_LEVEL, plane_size, threads
from .format import build_index, chunk_frame_size, data_file_name, index_file_name
from .plan import WriteItem
from .storage.base import Storage

BATCH_FRAMES = 16  # frames encoded per native call; two batches in flight (encode one, write the other)


@dataclass
class RankFiles:
    """What one rank wrote, reported to the coordinator."""
    data_size: int
    index_size: int
    index_crc32c: int
    chunks: int
    raw_bytes: int
    elements: int


class _EncodeBuffers:
    """Two reusable output buffers for encoded batches (kept per process: no per-save allocation)."""
    _lock = threading.Lock()
    _bufs: list[np.ndarray] = []

    @classmethod
    def get(cls, nbytes: int) -> list[np.ndarray]:
        with cls._lock:
            if not cls._bufs or cls._bufs[0].nbytes < nbytes:
                cls._bufs = [np.empty(nbytes, dtype=np.uint8) for _ in range(2)]
            return cls._bufs


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 numpy view (no copy)."""
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def write_rank(storage: Storage, save_id: str, rank: int, items: list[WriteItem],
               sources: list[torch.Tensor], frame_size: int) -> RankFiles | None:
    """Write this rank's chunks (item i's bytes are `sources[i]`, contiguous CPU) to its data file and its
    index. Returns None if this rank has nothing to write. Called on every rank during a save."""
    if not items:
        return None
    data_name = data_file_name(save_id, rank)
    writer = storage.open_write(data_name)
    nthreads = threads()
    bufs = _EncodeBuffers.get(_ext.encode_bound(BATCH_FRAMES * frame_size, frame_size, CODEC_IDS["zstd/1"]))
    io = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-write")
    pending: list[Future | None] = [None, None]
    pos = 0
    chunks = []
    raw_bytes = elements = 0
    turn = 0
    try:
        for item, src in zip(items, sources):
            data = as_bytes(src)
            fs = chunk_frame_size(len(data), frame_size)
            batch_bytes = BATCH_FRAMES * fs
            itemsize = plane_size(item.source.dtype)
            cid = CODEC_IDS[item.codec]
            frames = []
            for start in range(0, len(data), batch_bytes):
                part = data[start:start + batch_bytes]
                if cid == CODEC_IDS[RAW]:
                    crcs = _ext.crc32c_frames(part, fs, nthreads)
                    out, table = part, [(i * fs, min(fs, len(part) - i * fs), c, False)
                                        for i, c in enumerate(crcs)]
                    if pending[turn] is not None:
                        pending[turn].result()
                else:
                    if pending[turn] is not None:
                        pending[turn].result()  # this buffer's previous batch is on disk
                    out = bufs[turn]
                    table = _ext.encode_frames(part, out, fs, itemsize, cid, ZSTD_LEVEL, nthreads)
                n = sum(f[1] for f in table)
                for off, stored, crc, enc in table:
                    frames.append([pos + off, stored, crc, bool(enc)])
                pending[turn] = io.submit(writer.write, out[:n])
                fault_point("write", rank)
                pos += n
                turn ^= 1
            chunks.append({"key": item.key, "offsets": list(item.offsets), "sizes": list(item.sizes),
                           "codec": item.codec, "frame_size": fs, "frames": frames})
            raw_bytes += len(data)
            elements += math.prod(item.sizes)
        for p in pending:
            if p is not None:
                p.result()
        size = writer.close()
    except BaseException:
        for p in pending:
            if p is not None:
                p.exception()
        writer.abort()
        raise
    finally:
        io.shutdown(wait=True)
    index = build_index(save_id=save_id, rank=rank, chunks=chunks)
    storage.write_file(index_file_name(save_id, rank), index)
    return RankFiles(size, len(index), _ext.crc32c(index), len(chunks), raw_bytes, elements)

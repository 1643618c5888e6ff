"""The per-rank write path: stage (optional snapshot), encode frames, write one data file, write its index.
Encoding runs in the native kernels (threads, GIL released) while the previous batch is being written."""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from shardckpt.native import kernels as _ext
from shardckpt._faults import fault_point
from shardckpt.format.codec import CODEC_IDS, RAW, plane_size, threads, zstd_level
from shardckpt.format.records import build_index, chunk_frame_size, data_file_name, index_file_name
from shardckpt.plan.save_plan import WriteItem
from shardckpt.saving.incremental import BaseChunks, remember_index
from shardckpt.format.refs import chunk_hash, chunk_hashes
from shardckpt.storage.base import Storage

BATCH_FRAMES = 16  # most frames encoded per native call; two batches in flight (encode one, write the other)
BATCH_BYTES = 16 << 20  # smaller batches fill and drain that pipeline sooner, while still giving every
                        # native thread two frames
FLUSH_BYTES = 4 << 20   # encoded bytes gathered in a buffer (the chunks of many small tensors) before it goes
                        # to storage: one hand-off per few MB instead of one per tensor
HASH_BATCH_BYTES = 32 << 20  # chunk bytes hashed per native call (ChunkHasher): the first digests come after
                             # ~2 ms, and a call amortises its thread start-up


@dataclass
class RankFiles:
    """What one rank wrote, reported to the coordinator."""
    data_size: int
    index_size: int
    index_crc32c: int
    chunks: int
    raw_bytes: int
    elements: int
    ref_chunks: int = 0        # chunks recorded as references to a base's frames (FORMAT.md §7)
    ref_raw_bytes: int = 0
    ref_stored_bytes: int = 0
    bases: list | None = None  # hashed saves: the [dir, save_id] pairs this rank's references name


class _EncodeBuffers:
    """Pairs of reusable output buffers for encoded batches. A RankWriter takes a pair for its lifetime and
    gives it back, so concurrent saves in one process (an async save in flight and a sync save) never share
    one, and no save allocates them anew once the process has warmed up."""
    _lock = threading.Lock()
    _free: list[list[np.ndarray]] = []

    @classmethod
    def take(cls, nbytes: int) -> list[np.ndarray]:
        with cls._lock:
            for i, pair in enumerate(cls._free):
                if pair[0].nbytes >= nbytes:
                    return cls._free.pop(i)
        return [np.empty(nbytes, dtype=np.uint8) for _ in range(2)]

    @classmethod
    def give(cls, pair: list[np.ndarray]) -> None:
        with cls._lock:
            if len(cls._free) < 4:
                cls._free.append(pair)


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 numpy view (no copy)."""
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


class RankWriter:
    """Writes one rank's data file chunk by chunk, then its index. Encoding (native threads, GIL released)
    overlaps with the write of the previous buffer; the chunks of small tensors are gathered into one buffer
    first. Used by one thread at a time: a bounded-pool async save adds its first chunks on the caller's
    thread and hands the writer to the background thread.

    A hashed writer (format 2.x, `hashed` or a `base`) records each chunk's content hash, and a chunk whose
    box, dtype and hash equal the base's is recorded as a reference to the frames holding those bytes
    instead of being written (FORMAT.md §7).

    Call sequence (every rank that has chunks): add(item, src)* -> close() -> RankFiles; abort() on error."""

    def __init__(self, storage: Storage, save_id: str, rank: int, frame_size: int, *, hashed: bool = False,
                 base: BaseChunks | None = None):
        self.storage, self.save_id, self.rank, self.frame_size = storage, save_id, rank, frame_size
        self.hashed, self.base = hashed or base is not None, base
        self._refs = [0, 0, 0]  # chunks, raw bytes, stored bytes referred to
        self._bases: set[tuple[str, str]] = set()
        self._file = storage.open_write(data_file_name(save_id, rank))
        self._bufs = _EncodeBuffers.take(_ext.encode_bound(BATCH_FRAMES * frame_size, frame_size,
                                                           CODEC_IDS["zstd/1"]))
        self._io = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-write")
        self._pending: list[Future | None] = [None, None]
        self._turn = 0
        self._fill = 0  # encoded bytes gathered in the current buffer, not yet handed to storage
        self._pos = 0
        self._chunks: list[dict] = []
        self._raw_bytes = self._elements = 0
        self._nthreads = threads()
        self._level = zstd_level()

    def add(self, item: WriteItem, src: torch.Tensor, digest: str | None = None) -> None:
        """Encode and write one chunk whose bytes are `src` (contiguous CPU), or record it as a reference
        when a base holds the same bytes. `src` may be reused once drain() returns (raw frames are written
        from it directly). `digest`: its content hash if the caller computed it already."""
        data = as_bytes(src)
        if self.hashed:
            digest = digest or chunk_hash(data)
            if self._add_reference(item, digest, len(data)):
                return
        fs = chunk_frame_size(len(data), self.frame_size)
        batch_bytes = min(BATCH_FRAMES, max(2 * self._nthreads, -(-BATCH_BYTES // fs))) * fs
        itemsize = plane_size(item.source.dtype)
        cid = CODEC_IDS[item.codec]
        frames = []
        for start in range(0, len(data), batch_bytes):
            part = data[start:start + batch_bytes]
            if cid == CODEC_IDS[RAW]:
                self._flush()  # what is gathered goes first
                self._wait(self._turn)
                crcs = _ext.crc32c_frames(part, fs, self._nthreads)
                table = [(i * fs, min(fs, len(part) - i * fs), c, False) for i, c in enumerate(crcs)]
                self._submit(part)  # raw frames go to storage from the source itself
            else:
                if self._fill + _ext.encode_bound(len(part), fs, cid) > len(self._bufs[self._turn]):
                    self._flush()
                if self._fill == 0:
                    self._wait(self._turn)  # this buffer's previous contents are on storage
                table = _ext.encode_frames(part, self._bufs[self._turn][self._fill:], fs, itemsize, cid,
                                           self._level, self._nthreads)
            n = sum(f[1] for f in table)
            for off, stored, crc, enc in table:
                frames.append([self._pos + off, stored, crc, bool(enc)])
            self._pos += n
            if cid != CODEC_IDS[RAW]:
                self._fill += n
                if self._fill >= FLUSH_BYTES:
                    self._flush()
        record = {"key": item.key, "offsets": list(item.offsets), "sizes": list(item.sizes),
                  "codec": item.codec, "frame_size": fs, "frames": frames}
        if self.hashed:
            record["hash"] = digest
        self._chunks.append(record)
        self._raw_bytes += len(data)
        self._elements += math.prod(item.sizes)

    def _add_reference(self, item: WriteItem, digest: str, nbytes: int) -> bool:
        """Record the chunk as a reference if the base holds the same bytes; False if it must be written."""
        c = self.base.match(item.key, item.offsets, item.sizes, item.source.dtype, digest) \
            if self.base is not None else None
        if c is None:
            return False
        ref_dir, ref_sid = BaseChunks.ref_of(c, self.base.dir, self.base.manifest.save_id)
        self._bases.add((ref_dir, ref_sid))
        self._chunks.append({"key": item.key, "offsets": list(item.offsets), "sizes": list(item.sizes),
                             "codec": c.codec, "frame_size": c.frame_size, "hash": digest,
                             "ref": {"dir": ref_dir, "save_id": ref_sid, "rank": c.rank},
                             "frames": [[f.offset, f.stored_len, f.crc32c, f.encoded] for f in c.frames]})
        stored = sum(f.stored_len for f in c.frames)
        self._refs = [self._refs[0] + 1, self._refs[1] + nbytes, self._refs[2] + stored]
        self._raw_bytes += nbytes
        self._elements += math.prod(item.sizes)
        return True

    def _flush(self) -> None:
        """Hand the bytes gathered in the current buffer to storage and switch buffers."""
        if self._fill:
            self._submit(self._bufs[self._turn][:self._fill])
            self._fill = 0

    def _submit(self, data) -> None:
        self._pending[self._turn] = self._io.submit(self._file.write, data)
        fault_point("write", self.rank)
        self._turn ^= 1

    def _wait(self, turn: int) -> None:
        p = self._pending[turn]
        if p is not None:
            self._pending[turn] = None
            p.result()

    def drain(self) -> None:
        """Write what is gathered and wait until every batch handed to storage has been written."""
        self._flush()
        self._wait(0)
        self._wait(1)

    def close(self) -> RankFiles:
        """Finish the data file (durable), write the index (durable)."""
        try:
            self.drain()
            size = self._file.close()
        except BaseException:
            self.abort()
            raise
        self._release()
        index = build_index(save_id=self.save_id, rank=self.rank, chunks=self._chunks, hashed=self.hashed)
        self.storage.write_file(index_file_name(self.save_id, self.rank), index)
        crc = _ext.crc32c(index)
        if self.hashed:  # the next save on this one as its base need not read the index back
            remember_index(self.storage.url, self.rank, self.save_id, len(index), crc, self._chunks)
        return RankFiles(size, len(index), crc, len(self._chunks), self._raw_bytes,
                         self._elements, *self._refs,
                         bases=sorted(map(list, self._bases)) if self.hashed else None)

    def abort(self) -> None:
        """Drop the partial data file; never raises."""
        for p in self._pending:
            if p is not None:
                p.exception()
        self._file.abort()
        self._release()

    def _release(self) -> None:
        self._io.shutdown(wait=True)
        if self._bufs is not None:
            _EncodeBuffers.give(self._bufs)
            self._bufs = None


class ChunkHasher:
    """The content hashes (XXH3-128, FORMAT.md §7) of a hashed save's chunks, computed on one background
    thread in native calls of HASH_BATCH_BYTES (each chunk read once, at memory speed) while the save goes on.

    Call sequence, one save on one rank: a sync save's pipeline.prepare starts it and `add`s the caller's
    contiguous chunks as soon as they are planned (hashing overlaps loading the base, pinning it and the plan
    round, while the caller waits anyway); write_rank `add`s the rest (the staged chunks: an async save's
    are hashed on its background thread, never during the stall), consumes `digests()` in the same order,
    one batch behind the hashing, and `close()`s it (pipeline closes it too on every error path)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-hash")
        self._pending: list[Future] = []
        self._nthreads = threads()
        self.added = 0  # chunks queued so far

    def add(self, sources: list[torch.Tensor]) -> None:
        """Queue these chunks (contiguous CPU tensors, unchanged until close) for hashing."""
        self.added += len(sources)
        cur, size = [], 0
        for s in sources:
            cur.append(as_bytes(s))
            size += cur[-1].nbytes
            if size >= HASH_BATCH_BYTES:
                self._pending.append(self._pool.submit(chunk_hashes, cur, self._nthreads))
                cur, size = [], 0
        if cur:
            self._pending.append(self._pool.submit(chunk_hashes, cur, self._nthreads))

    def digests(self):
        """Yields every queued chunk's hash, in the order added (waiting for the batch that holds it)."""
        for f in self._pending:
            yield from f.result()

    def close(self) -> None:
        """Stop hashing (queued batches are dropped) and end the thread; never raises."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_rank(storage: Storage, save_id: str, rank: int, items: list[WriteItem],
               sources: list[torch.Tensor], frame_size: int, writer: RankWriter | None = None, *,
               hashed: bool = False, base: BaseChunks | None = None,
               hasher: ChunkHasher | None = None) -> RankFiles | None:
    """Write this rank's chunks (item i's bytes are `sources[i]`, contiguous CPU) to its data file and its
    index, continuing `writer` if a bounded-pool save already started it. Returns None if this rank has
    nothing to write. Called on every rank during a save. `hashed` / `base`: as for RankWriter. `hasher`:
    a ChunkHasher already given the first `hasher.added` of `sources`, else a hashed writer starts one here;
    either way an unchanged chunk costs one read of its bytes, and a changed one is encoded while later
    ones are hashed. Closes `hasher`."""
    try:
        if writer is None:
            if not items:
                return None
            writer = RankWriter(storage, save_id, rank, frame_size, hashed=hashed, base=base)
        if writer.hashed:
            hasher = hasher or ChunkHasher()
            hasher.add(sources[hasher.added:])
        try:
            digests = hasher.digests() if writer.hashed else [None] * len(items)
            for item, src, d in zip(items, sources, digests):
                writer.add(item, src, d)
        except BaseException:
            writer.abort()
            raise
    finally:
        if hasher is not None:
            hasher.close()
    return writer.close()

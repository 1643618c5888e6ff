"""The base of an incremental save (docs/FORMAT.md §7): load_base(), called by saving.pipeline.prepare on
every rank of a save given `base=` (CheckpointManager(incremental=True) passes the previous committed step),
and BaseChunks.match, which saving.writer asks for each chunk it hashes.

The index a rank of this process just wrote is kept in memory (remember_index, called by writer.RankWriter
when it closes a hashed save's index; remember_manifest, by the coordinator once it committed), so that the
next save on that base (the manager's next step) neither reads nor parses it again: load_base still reads
the base's manifest from storage every time, and uses what it remembers only when that committed manifest
names the same save_id and pins this rank's index with the same size and crc32c (the index bytes are a
function of the records kept); a base replaced, overwritten or written by another process is read from
storage as before."""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from shardckpt.errors import IncompleteCheckpointError, SaveError
from shardckpt.format.parse import BASE_DIR, index_chunk, parse_index, parse_manifest
from shardckpt.format.records import CHUNK_HASH, Chunk, Frame, Manifest
from shardckpt.format.refs import parent_and_name
from shardckpt.storage import Storage, storage_for

log = logging.getLogger("shardckpt")


@dataclass
class BaseChunks:
    """What a save compares its chunks against: the base checkpoint's manifest and this rank's chunks of
    it, by (key, offsets, sizes); none when the base hashed its chunks with another algorithm than
    CHUNK_HASH (a 2.0 base: blake2b-128), whose digests cannot be compared with ours. Built by load_base
    on every rank of a save with `base=`."""
    dir: str
    manifest: Manifest
    chunks: dict[tuple, Chunk]
    manifest_bytes: bytes = b""  # as read: the pin's check that the base is unchanged compares bytes

    def match(self, key: str, offsets: tuple, sizes: tuple, dtype, digest: str) -> Chunk | None:
        """The base chunk whose bytes equal this chunk's (same key, box, dtype, content hash), or None."""
        c = self.chunks.get((key, tuple(offsets), tuple(sizes)))
        meta = self.manifest.tensors.get(key)
        if c is None or not c.hash or c.hash != digest or meta is None or meta.dtype != dtype:
            return None
        return c

    def changed_first(self, items: list) -> list:
        """The WriteItems of a save on this base, those whose box the base wrote itself first (changed at
        the base's step, so likely changed again: a fine-tuned head, its optimizer moments), then those the
        base refers to (unchanged then), each group in plan order. Hashing in this order finds the chunks to
        encode first, so encoding and writing start while the frozen rest is still being hashed. The order
        is the index's and data file's chunk order (FORMAT.md §4, §6 fix none), the same on both backends."""
        def referred(i) -> bool:
            c = self.chunks.get((i.key, tuple(i.offsets), tuple(i.sizes)))
            return c is not None and bool(c.base)
        return sorted(items, key=referred)

    @staticmethod
    def ref_of(c: Chunk, base_dir: str, base_save_id: str) -> tuple[str, str]:
        """(dir, save_id) of the checkpoint that holds base chunk c's bytes: references always point at the
        holder, never through a chain."""
        if c.base:
            return c.base, c.file.split("/")[1]
        return base_dir, base_save_id


def load_base(storage: Storage, base, rank: int, storage_options: dict | None = None) -> BaseChunks:
    """Every rank of a save with `base=`: the base's manifest and this rank's index of it. The base MUST be
    a committed checkpoint in the same parent directory as the save (references are sibling names).
    Raises SaveError naming both paths otherwise."""
    from shardckpt.format.metadata import manifest_bytes
    from shardckpt.format.records import MANIFEST_NAME
    bst = storage_for(base, storage_options)
    parent, name = parent_and_name(bst)
    if parent != parent_and_name(storage)[0] or not BASE_DIR.fullmatch(name) or name == parent_and_name(storage)[1]:
        raise SaveError(f"base {bst.url} must be another checkpoint directory beside {storage.url} "
                        f"(same parent directory)", file=storage.url)
    try:
        raw = manifest_bytes(bst)
        m = _parse_remembered(bst.url, raw, f"{bst.url}/{MANIFEST_NAME}")
    except IncompleteCheckpointError as e:
        raise SaveError(f"base {bst.url} is not a committed checkpoint", file=storage.url) from e
    if m.format_version.split(".")[0] == "1" and rank == 0:  # said once per save, by the coordinator
        log.warning("base %s has no content hashes (it was saved without content_hash=True): this save "
                    "writes everything and refers to nothing", bst.url)
    elif m.chunk_hash != CHUNK_HASH and rank == 0:
        log.warning("base %s hashed its chunks with %s, this save hashes with %s: it matches nothing there, "
                    "writes everything and refers to nothing (the next save can refer to it)", bst.url,
                    m.chunk_hash, CHUNK_HASH)
    chunks: dict[tuple, Chunk] = {}
    entry = next((f for f in m.files if f.rank == rank), None)
    if entry is not None and m.chunk_hash == CHUNK_HASH:  # 1.x chunks carry no hashes, 2.0's other ones
        chunks = _remembered_chunks(bst.url, m, entry)
        if chunks is None:
            chunks = {(c.key, c.offsets, c.sizes): c for c in parse_index(bst.read_file(entry.index), entry, m)}
    return BaseChunks(name, m, chunks, raw)


# ------------------------------------------------------------------ what this process wrote, kept for the next save

REMEMBERED = 4  # (checkpoint, rank) indexes and manifests kept: a manager's next base is the step it saved last


@dataclass(frozen=True)
class _Written:
    """One rank's index as this process wrote it: the save, the index's size and crc32c, its chunk records."""
    save_id: str
    index_size: int
    index_crc32c: int
    records: list


_lock = threading.Lock()  # an async save's background thread remembers while the caller's thread may read
_indexes: OrderedDict[tuple[str, int], _Written] = OrderedDict()
_manifests: OrderedDict[str, tuple[bytes, Manifest]] = OrderedDict()


def _keep(table: OrderedDict, key, value) -> None:
    with _lock:
        table.pop(key, None)
        table[key] = value
        while len(table) > REMEMBERED:
            table.popitem(last=False)


def remember_index(url: str, rank: int, save_id: str, index_size: int, index_crc32c: int, records: list) -> None:
    """Every rank of a hashed save, once its index is written (writer.RankWriter.close): keep its records
    (the dicts the index was built from; not modified afterwards) for load_base. Whether the save commits
    is not known yet; load_base checks that against the committed manifest."""
    _keep(_indexes, (url, rank), _Written(save_id, index_size, index_crc32c, records))


def remember_manifest(url: str, raw: bytes, manifest: Manifest) -> None:
    """Coordinator of a hashed save, once it committed `raw` (parsed as `manifest`): load_base reuses the
    parse when the manifest it reads back has the same bytes."""
    _keep(_manifests, url, (raw, manifest))


def forget_all() -> None:
    """Drop what is remembered (tests: a process that wrote nothing yet)."""
    with _lock:
        _indexes.clear()
        _manifests.clear()


def _parse_remembered(url: str, raw: bytes, file: str) -> Manifest:
    """The manifest `raw` read at `url`: the parse kept by remember_manifest when the bytes are the same."""
    with _lock:
        kept = _manifests.get(url)
    if kept is not None and kept[0] == raw:
        return kept[1]
    return parse_manifest(raw, file=file)


def _remembered_chunks(url: str, m: Manifest, entry) -> dict[tuple, Chunk] | None:
    """This rank's chunks of the committed base `m` at `url`, from the records this process wrote there,
    or None when it wrote none there or the committed index is not the one it wrote (other save_id, size or
    crc32c): then the caller reads the index from storage."""
    with _lock:
        w = _indexes.get((url, entry.rank))
    if w is None or w.save_id != m.save_id or (w.index_size, w.index_crc32c) != (entry.index_size,
                                                                                  entry.index_crc32c):
        return None
    out = {}
    for r in w.records:  # what parse_index makes of the same records (it checked them when it wrote them)
        key, offsets, sizes, fs = r["key"], tuple(r["offsets"]), tuple(r["sizes"]), r["frame_size"]
        nbytes = math.prod(sizes) * m.tensors[key].itemsize
        frames = tuple(Frame(off, stored, min(fs, nbytes - i * fs), crc, enc)
                       for i, (off, stored, crc, enc) in enumerate(r["frames"]))
        ref = r.get("ref")
        out[(key, offsets, sizes)] = index_chunk(entry, key, offsets, sizes, r["codec"], fs, frames, r["hash"],
                                                 (ref["dir"], ref["save_id"], ref["rank"]) if ref else None)
    return out

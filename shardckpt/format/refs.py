"""References: chunks of an incremental checkpoint whose bytes live in an earlier checkpoint (FORMAT.md §7).

One home for three jobs:
  - content hashes: chunk_hash(), called by writer.RankWriter on every chunk of a hashed (format 2.x) save;
  - resolution: chunk_storage() / chunk_url(), the one way any reader (reader.run_reads, verify, the
    exchange, export and the DCP reader through run_reads) finds the file a chunk's frames are in;
  - the base a save compares against: load_base(), called by api._prepare on every rank of a save given
    `base=` (CheckpointManager(incremental=True) passes the previous committed step).

A reference names its base as a sibling directory (same parent as the referring checkpoint) plus a save_id;
the directory name is checked against BASE_DIR (no '/', no '..', no leading dot) when the manifest is
parsed, so a reference can never leave the parent directory.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from shardckpt.errors import CorruptDataError, IncompleteCheckpointError, SaveError
from shardckpt.format.records import Chunk, Manifest
from shardckpt.format.parse import BASE_DIR
from shardckpt.storage import Storage, storage_for

log = logging.getLogger("shardckpt")

HASH_BYTES = 16  # blake2b-128: exact change detection (a collision needs ~2^64 work)


def chunk_hash(data) -> str:
    """The content hash of a chunk's raw C-order bytes (FORMAT.md §7), as 32 hex digits. hashlib's blake2b
    runs in C with the GIL released on large buffers, so the writer's threads hash chunks in parallel."""
    return hashlib.blake2b(data, digest_size=HASH_BYTES).hexdigest()


def _parent_and_name(storage: Storage) -> tuple[str, str]:
    url = storage.url.rstrip("/")
    parent, _, name = url.rpartition("/")
    return parent, name


def parent_storage(storage: Storage) -> Storage:
    """The Storage of the directory holding the checkpoint `storage` (where its siblings, their references
    and the pins of in-flight saves are: shardckpt.deleter), built without I/O, same filesystem and options."""
    from shardckpt.storage.local import LocalStorage
    if isinstance(storage, LocalStorage):
        return LocalStorage(os.path.dirname(storage.root), storage.direct_io)
    from shardckpt.storage.fsspec import FsspecStorage
    if isinstance(storage, FsspecStorage):
        return FsspecStorage(_parent_and_name(storage)[0], storage.storage_options, part_size=storage.part_size,
                             upload_concurrency=storage.upload_concurrency, _fs=storage.fs,
                             _root=storage.root.rstrip("/").rpartition("/")[0] or "/")
    return storage_for(_parent_and_name(storage)[0])


def base_storage(storage: Storage, dir_name: str) -> Storage:
    """The Storage of the sibling checkpoint directory `dir_name` (already checked against BASE_DIR), built
    from `storage` without I/O and with the same filesystem and options."""
    return parent_storage(storage).child(dir_name)


def chunk_storage(storage: Storage, chunk: Chunk) -> Storage:
    """The Storage holding `chunk.file`: the checkpoint's own for a chunk it wrote, the base's for a
    reference. Every reader resolves a chunk's file through this function."""
    return base_storage(storage, chunk.base) if chunk.base else storage


def chunk_url(storage: Storage, chunk: Chunk) -> str:
    """Where a chunk's frames are, for error messages (a reference names the base checkpoint's file)."""
    return f"{chunk_storage(storage, chunk).url}/{chunk.file}"


def reference_error(storage: Storage, chunk: Chunk, what: str) -> CorruptDataError:
    """The typed error for referenced data that is missing or damaged: names the key, the referring
    checkpoint and the file in the base checkpoint."""
    return CorruptDataError(f"{what}; checkpoint {storage.url} refers to these frames of earlier checkpoint "
                            f"{chunk_storage(storage, chunk).url}", key=chunk.key, file=chunk_url(storage, chunk),
                            rank=chunk.rank)


@dataclass
class BaseChunks:
    """What a save compares its chunks against: the base checkpoint's manifest and this rank's chunks of
    it, by (key, offsets, sizes). Built by load_base on every rank of a save with `base=`."""
    dir: str
    manifest: Manifest
    chunks: dict[tuple, Chunk]

    def match(self, key: str, offsets: tuple, sizes: tuple, dtype, digest: str) -> Chunk | None:
        """The base chunk whose bytes equal this chunk's (same key, box, dtype, content hash), or None."""
        c = self.chunks.get((key, tuple(offsets), tuple(sizes)))
        meta = self.manifest.tensors.get(key)
        if c is None or not c.hash or c.hash != digest or meta is None or meta.dtype != dtype:
            return None
        return c

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
    from shardckpt import api
    from shardckpt.format.records import parse_index
    bst = storage_for(base, storage_options)
    parent, name = _parent_and_name(bst)
    if parent != _parent_and_name(storage)[0] or not BASE_DIR.fullmatch(name) or name == _parent_and_name(storage)[1]:
        raise SaveError(f"base {bst.url} must be another checkpoint directory beside {storage.url} "
                        f"(same parent directory)", file=storage.url)
    try:
        m = api.read_manifest(bst)
    except IncompleteCheckpointError as e:
        raise SaveError(f"base {bst.url} is not a committed checkpoint", file=storage.url) from e
    if m.format_version.split(".")[0] == "1" and rank == 0:  # said once per save, by the coordinator
        log.warning("base %s has no content hashes (it was saved without content_hash=True): this save "
                    "writes everything and refers to nothing", bst.url)
    chunks: dict[tuple, Chunk] = {}
    entry = next((f for f in m.files if f.rank == rank), None)
    if entry is not None and m.format_version.split(".")[0] != "1":  # 1.x chunks carry no hashes
        for c in parse_index(bst.read_file(entry.index), entry, m):
            chunks[(c.key, c.offsets, c.sizes)] = c
    return BaseChunks(name, m, chunks)

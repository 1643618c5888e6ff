"""References: chunks of an incremental checkpoint whose bytes live in an earlier checkpoint (FORMAT.md §7).

One home for two jobs:
  - content hashes: chunk_hashes() / chunk_hash(), called by saving.writer on every chunk of a hashed
    (format 2.x) save;
  - resolution: chunk_storage() / chunk_url(), the one way any reader (reader.run_reads, verify, the
    exchange, export and the DCP reader through run_reads) finds the file a chunk's frames are in.
(The base a save compares against is loaded by saving.incremental.load_base, called by
saving.pipeline.prepare on every rank of a save given `base=`.)

A reference names its base as a sibling directory (same parent as the referring checkpoint) plus a save_id;
the directory name is checked against BASE_DIR (no '/', no '..', no leading dot) when the manifest is
parsed, so a reference can never leave the parent directory.
"""
from __future__ import annotations

import hashlib
import os

from shardckpt.errors import CorruptDataError
from shardckpt.format.records import CHUNK_HASH, CHUNK_HASH_2_0, Chunk
from shardckpt.native import kernels as _ext
from shardckpt.storage import Storage, storage_for


def chunk_hashes(bufs: list, nthreads: int = 0) -> list[str]:
    """The content hash (FORMAT.md §7, CHUNK_HASH: XXH3-128) of each chunk's raw C-order bytes, as 32 hex
    digits: one native call, GIL released, the buffers shared among `nthreads` threads, each read once at
    memory speed."""
    return _ext.xxh3_128_many(bufs, nthreads)


def chunk_hash(data, algorithm: str = CHUNK_HASH) -> str:
    """The content hash of one chunk's raw bytes under `algorithm`: CHUNK_HASH, or format 2.0's blake2b-128
    (hashlib, about 0.6 GB/s per core; kept so tests and tools can check 2.0 checkpoints' hashes)."""
    if algorithm == CHUNK_HASH:
        return _ext.xxh3_128(data)
    if algorithm == CHUNK_HASH_2_0:
        return hashlib.blake2b(data, digest_size=16).hexdigest()
    raise ValueError(f"unknown chunk hash algorithm {algorithm!r}")


def parent_and_name(storage: Storage) -> tuple[str, str]:
    url = storage.url.rstrip("/")
    parent, _, name = url.rpartition("/")
    return parent, name


def parent_storage(storage: Storage) -> Storage:
    """The Storage of the directory holding the checkpoint `storage` (where its siblings, their references
    and the pins of in-flight saves are: shardckpt.lifecycle.deleter), built without I/O, same filesystem and options."""
    from shardckpt.storage.local import LocalStorage
    if isinstance(storage, LocalStorage):
        return LocalStorage(os.path.dirname(storage.root), storage.direct_io)
    from shardckpt.storage.fsspec import FsspecStorage
    if isinstance(storage, FsspecStorage):
        return FsspecStorage(parent_and_name(storage)[0], storage.storage_options, part_size=storage.part_size,
                             upload_concurrency=storage.upload_concurrency, _fs=storage.fs,
                             _root=storage.root.rstrip("/").rpartition("/")[0] or "/")
    return storage_for(parent_and_name(storage)[0])


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

"""The base of an incremental save (docs/FORMAT.md §7): load_base(), called by saving.pipeline.prepare on
every rank of a save given `base=` (CheckpointManager(incremental=True) passes the previous committed step),
and BaseChunks.match, which saving.writer asks for each chunk it hashes."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from shardckpt.errors import IncompleteCheckpointError, SaveError
from shardckpt.format.parse import BASE_DIR
from shardckpt.format.records import CHUNK_HASH, Chunk, Manifest
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
    from shardckpt.format.parse import parse_index, parse_manifest
    bst = storage_for(base, storage_options)
    parent, name = parent_and_name(bst)
    if parent != parent_and_name(storage)[0] or not BASE_DIR.fullmatch(name) or name == parent_and_name(storage)[1]:
        raise SaveError(f"base {bst.url} must be another checkpoint directory beside {storage.url} "
                        f"(same parent directory)", file=storage.url)
    try:
        raw = manifest_bytes(bst)
        m = parse_manifest(raw, file=f"{bst.url}/{MANIFEST_NAME}")
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
        for c in parse_index(bst.read_file(entry.index), entry, m):
            chunks[(c.key, c.offsets, c.sizes)] = c
    return BaseChunks(name, m, chunks, raw)

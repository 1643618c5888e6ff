"""Public entry points: save, load, load_full, read_manifest. Orchestration only: saving.pipeline runs a save
(plan, snapshot, write, commit), loading.load runs a load (metadata, plan, read or exchange, copy), and
format.metadata reads a manifest. Read this first, then those three.
"""
from __future__ import annotations

from shardckpt.format.metadata import read_manifest  # noqa: F401 (an entry point)
from shardckpt.format.records import DEFAULT_FRAME_SIZE, Manifest
from shardckpt.loading.load import KeyMap, LoadResult, load, load_full  # noqa: F401 (entry points; their home)
from shardckpt.saving.pipeline import prepare, write_and_commit


def save(state_dict, path, *, process_group=None, codec: str = "auto", metadata: dict | None = None,
         frame_size: int = DEFAULT_FRAME_SIZE, storage_options: dict | None = None,
         timeout_s: float | None = None, base=None, content_hash: bool = False,
         overwrite: bool = False) -> Manifest:
    """Save a (distributed) state_dict to `path`. Call on every rank of the group with the same keys.

    Each rank writes the chunks it owns (DTensor shards; replicated data split across its replicas) to its
    own file, in parallel; the coordinator (group rank 0) commits manifest.json once every rank's data is
    durable. The checkpoint exists once save returns; if any rank fails, every rank raises and nothing is
    committed. A path that already holds a committed checkpoint is never overwritten (CheckpointExistsError).

    Args:
        state_dict: nested dicts/lists of tensors, DTensors, Stateful objects and plain values.
        path: a directory path or fsspec URL (s3://bucket/run/step-100).
        process_group: the group saving together (default: the whole job, or one process).
        codec: "auto" (byte-plane zstd for floats, zstd otherwise), "zstd-byteplane", "zstd" or "raw".
        metadata: JSON-like user metadata stored in the manifest (metrics, step, config).
        frame_size: raw bytes per independently decodable frame.
        storage_options: passed to fsspec for URLs.
        timeout_s: how long a collective may wait for a slow or dead rank (default 600 s).
        base: an earlier committed checkpoint in the same parent directory (a sibling, as the manager's
            step-<N> directories are): each chunk whose key, box, dtype and content hash equal the base's
            is recorded as a reference to the frames holding those bytes instead of being written again
            (an incremental checkpoint, format 2.1; FORMAT.md §7). A base saved without content hashes
            (format 1.x) or hashed with another algorithm (format 2.0's blake2b-128) matches nothing:
            everything is written, and the coordinator logs a warning.
        content_hash: record every chunk's content hash (XXH3-128, format 2.1) without a base, so that a
            later save can refer to this one (implied by `base`).
        overwrite: replace a committed checkpoint at `path` instead of refusing: the new data goes beside
            the old, manifest.json is replaced atomically (Storage.replace; commit.commit_manifest) and the
            old data is deleted only once the new manifest is durable (the Lightning plugin's last.ckpt).

    Returns:
        The committed Manifest (on ranks other than the coordinator it is read from storage on first use).
    """
    if frame_size <= 0 or frame_size % 8:
        raise ValueError("frame_size must be a positive multiple of 8")
    p = prepare(state_dict, path, process_group=process_group, codec=codec, frame_size=frame_size,
                 metadata=metadata, storage_options=storage_options, timeout_s=timeout_s, stage=False, pool=None,
                 base=base, content_hash=content_hash, overwrite=overwrite)
    return write_and_commit(p)

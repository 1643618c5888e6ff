"""The one metadata reader: a checkpoint's committed manifest, read and validated (docs/FORMAT.md §3).

Who calls it: every load (shardckpt.read_manifest, load, load_full, the exchange's coordinator read), the
verifier, the manager (step metadata), the deleter (what committed manifests refer to), the base of an
incremental save, the CLI. Any process, any rank.
"""
from __future__ import annotations

from shardckpt.errors import IncompleteCheckpointError
from shardckpt.format.parse import parse_manifest
from shardckpt.format.records import MANIFEST_NAME, Manifest
from shardckpt.storage import Storage, storage_for


def read_manifest(path, *, storage_options: dict | None = None) -> Manifest:
    """The committed manifest at `path`, validated. Raises IncompleteCheckpointError if there is none."""
    storage = storage_for(path, storage_options)
    return parse_manifest(manifest_bytes(storage), file=f"{storage.url}/{MANIFEST_NAME}")


def manifest_bytes(storage: Storage) -> bytes:
    """The committed manifest's bytes (one read), unparsed: read_manifest's, and what exchange.read_metadata
    broadcasts. Raises IncompleteCheckpointError if there is none."""
    try:
        return storage.read_file(MANIFEST_NAME)
    except FileNotFoundError:
        partial = bool(storage.list_dir("data"))
        raise IncompleteCheckpointError(
            "no committed checkpoint here" + (" (data files but no manifest: a save that never committed, or a "
                                              "step retention retired whose data a later incremental step "
                                              "still refers to; `shardckpt ls` on the root tells which)"
                                              if partial else ""),
            file=f"{storage.url}/{MANIFEST_NAME}") from None

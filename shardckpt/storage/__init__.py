"""Storage backends: a path without a scheme is local POSIX; any other URL goes through fsspec."""
from __future__ import annotations

import os

from shardckpt.storage.base import FileWriter, ReadRange, Storage
from shardckpt.storage.local import LocalStorage

__all__ = ["FileWriter", "ReadRange", "Storage", "LocalStorage", "storage_for"]


def storage_for(path, storage_options: dict | None = None) -> Storage:
    """The Storage rooted at `path`: a Storage is passed through, a plain path (or file:// URL) is local
    POSIX, any other URL (s3://, gs://, az://, memory://, ...) goes through fsspec with `storage_options`."""
    if isinstance(path, Storage):
        return path
    path = os.fspath(path)
    if path.startswith("file://"):
        return LocalStorage(path[len("file://"):])
    if "://" in path:
        from shardckpt.storage.fsspec import FsspecStorage
        return FsspecStorage(path, storage_options=storage_options)
    return LocalStorage(path)

"""A manager root's layout: one `step-<10-digit step>/` directory per checkpoint, which exists (is
committed) once its manifest.json is. Who calls it: CheckpointManager (save paths, retention, restore),
shardckpt.deleter (what is a step directory) and the CLI (`ls`, `gc`); any process may."""
from __future__ import annotations

import os
import re

from shardckpt.errors import IncompleteCheckpointError
from shardckpt.format.records import MANIFEST_NAME
from shardckpt.storage import Storage, storage_for

STEP_DIR = re.compile(r"^step-(\d+)$")
STEP_DIGITS = 10


def step_dir(step: int) -> str:
    """The directory name of a step under a manager root ("step-0000000500")."""
    return f"step-{step:0{STEP_DIGITS}d}"


def committed_steps(root, *, storage_options: dict | None = None) -> list[int]:
    """Steps under a manager root whose manifest.json is committed, ascending.

    Args:
        root: a directory, fsspec URL or Storage.
        storage_options: fsspec options for a URL root.
    """
    storage = storage_for(root, storage_options)
    out = []
    for name in storage.list_dir(""):
        m = STEP_DIR.match(name)
        if m and storage.exists(f"{name}/{MANIFEST_NAME}"):
            out.append(int(m.group(1)))
    return sorted(out)


def existing_root(root, *, storage_options: dict | None = None) -> tuple[Storage, list[str]]:
    """A manager root that must exist, and the names directly below it. Called by `shardckpt ls` (through
    inspection.list_steps) and `shardckpt gc`, so a mistyped root is an error and not "nothing here".

    Returns:
        (its Storage, the names below it, sorted).

    Raises:
        IncompleteCheckpointError: root does not exist (on object stores: an empty prefix) or is a file.
    """
    storage = storage_for(root, storage_options)
    names = storage.list_dir("")
    if not names:
        if not storage.exists(""):
            raise IncompleteCheckpointError("no such directory: there are no checkpoints here", file=storage.url)
        if is_file(storage):
            raise IncompleteCheckpointError("not a directory: a checkpoint root is a directory", file=storage.url)
    return storage, names


def is_file(storage: Storage) -> bool:
    """Whether `storage`'s own path is a file (not a directory or prefix); False where the backend cannot
    tell. For `ls`/`gc` roots and export destinations."""
    fs, path = getattr(storage, "fs", None), getattr(storage, "root", None)
    try:
        return bool(fs.isfile(path)) if fs is not None else bool(path) and os.path.isfile(path)
    except Exception:  # a backend that cannot tell: not known to be a file
        return False

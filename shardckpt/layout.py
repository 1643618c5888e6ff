"""A manager root's layout: one `step-<10-digit step>/` directory per checkpoint, which exists (is
committed) once its manifest.json is. Who calls it: CheckpointManager (save paths, retention, restore),
shardckpt.gc (what is a step directory) and the CLI (`ls`, `gc`); any process may."""
from __future__ import annotations

import re

from .format import MANIFEST_NAME
from .storage import storage_for

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

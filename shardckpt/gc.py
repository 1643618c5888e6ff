"""Garbage collection under a manager root: the leftovers of saves that crashed before they committed.

Who calls it: CheckpointManager on the coordinator (when created, and after every commit, excluding the step
it has in flight), and `shardckpt gc` in a single CLI process. Only the grace period tells a crashed save
from one still being written (by this job or another on the same root), so it must exceed the longest save.
Ages come from Storage.mtime(); where a backend cannot tell, the entry is kept.
"""
from __future__ import annotations

import time
from typing import Iterable

from . import api
from .format import MANIFEST_NAME
from .layout import STEP_DIR, step_dir
from .storage import Storage, storage_for

DEFAULT_GC_GRACE_S = 3600.0


def _newest(storage: Storage, relpath: str) -> float | None:
    """The newest mtime of the files below relpath (of relpath itself when it holds none); None when any of
    them has no known age, so an entry is only taken when every part of it is known to be old."""
    times = [storage.mtime(f) for f in storage.list_files(relpath)] or [storage.mtime(relpath)]
    if any(t is None for t in times):
        return None
    return max(times)


def gc_uncommitted(root, *, dry_run: bool = True, grace_s: float = DEFAULT_GC_GRACE_S,
                   exclude: Iterable[int] = (), storage_options: dict | None = None) -> list[str]:
    """Leftovers of crashed saves under a manager root: step directories without a committed manifest, and
    data/<save_id> directories inside committed steps that the manifest does not reference. Only those
    whose newest file is older than `grace_s` seconds are taken (a save still being written keeps touching
    its files), and never the steps in `exclude` (the save this process has in flight). Entries whose age
    the backend cannot tell are kept unless grace_s <= 0. Never touches data a committed manifest refers to.

    Args:
        root: a manager root (directory, fsspec URL or Storage).
        dry_run: only report; else delete what is found.
        grace_s: minimum age in seconds; <= 0 takes every leftover whatever its age.
        exclude: steps to leave alone.
        storage_options: fsspec options for a URL root.

    Returns:
        The paths found (relative to root), deleted unless dry_run.
    """
    storage = storage_for(root, storage_options)
    skip = {step_dir(s) for s in exclude}
    now = time.time()

    def old(rel: str) -> bool:
        if grace_s <= 0:
            return True
        t = _newest(storage, rel)
        return t is not None and now - t > grace_s

    found = []
    for name in storage.list_dir(""):
        if not STEP_DIR.match(name) or name in skip:
            continue
        if not storage.exists(f"{name}/{MANIFEST_NAME}"):
            if old(name):
                found.append(name)
            continue
        try:
            save_id = api.read_manifest(storage.child(name)).save_id
        except Exception:
            continue  # a corrupt committed step is retention's and restore's business, not gc's
        for sid in storage.list_dir(f"{name}/data"):
            if sid != save_id and old(f"{name}/data/{sid}"):
                found.append(f"{name}/data/{sid}")
    if not dry_run:
        for rel in found:
            storage.delete_tree(rel)
    return found

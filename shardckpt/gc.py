"""Garbage collection under a manager root: the leftovers of saves that crashed before they committed, and
the data of retired steps once no committed manifest refers to it (incremental checkpoints, FORMAT.md §7).

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


class _Unknown(Exception):
    """A committed manifest could not be read: what it refers to is unknown, so nothing may be freed."""


def referenced_data(storage: Storage) -> set[tuple[str, str]]:
    """(step directory, save_id) of every data/<save_id>/ directory that a committed manifest under the root
    needs: each step's own and the bases it refers to (FORMAT.md §7). Raises _Unknown if a manifest that
    exists cannot be read (then no data may be freed). Called by retire_step and gc_uncommitted."""
    live = set()
    for name in storage.list_dir(""):
        if not STEP_DIR.match(name) or not storage.exists(f"{name}/{MANIFEST_NAME}"):
            continue
        try:
            m = api.read_manifest(storage.child(name))
        except Exception as e:
            raise _Unknown(f"{name}: {type(e).__name__}: {e}") from e
        live.add((name, m.save_id))
        live.update((b.dir, b.save_id) for b in m.bases)
    return live


def retire_step(storage: Storage, name: str) -> list[str]:
    """Retention's delete of one committed step (CheckpointManager, coordinator): its manifest first (from
    then on the step does not exist for any reader), then the data that committed manifests needed before
    and no longer need: this step's own data unless a kept step's references still need it, and the data
    of earlier retired steps that only this one referred to. Data that a kept step needs stays until no
    committed manifest refers to it. A crash at any point leaves every kept step loadable: only data that no
    committed manifest needs is ever deleted (what a crash leaves behind, gc_uncommitted frees later).

    Returns:
        The paths deleted (relative to root).
    """
    try:
        before = referenced_data(storage)
    except _Unknown:
        before = None
    if storage.exists(f"{name}/{MANIFEST_NAME}"):
        storage.delete(f"{name}/{MANIFEST_NAME}")
    if before is None:
        return []  # a manifest that cannot be read may refer to anything: keep the data, gc frees it later
    try:
        after = referenced_data(storage)
    except _Unknown:
        return []
    gone = []
    for d, sid in sorted(before - after):  # data of committed checkpoints only, never of a save in flight
        storage.delete_tree(f"{d}/data/{sid}")
        gone.append(f"{d}/data/{sid}")
        if not storage.exists(f"{d}/{MANIFEST_NAME}") and not storage.list_dir(f"{d}/data"):
            storage.delete_tree(d)
            gone.append(d)
    return gone


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

    try:
        live = referenced_data(storage)  # data that committed manifests refer to is never a leftover
    except _Unknown:
        return []  # a corrupt committed step is retention's and restore's business; until then keep all
    found = []
    for name in storage.list_dir(""):
        if not STEP_DIR.match(name) or name in skip:
            continue
        committed = storage.exists(f"{name}/{MANIFEST_NAME}")
        if not committed and not any(d == name for d, _ in live):
            if old(name):
                found.append(name)
            continue
        for sid in storage.list_dir(f"{name}/data"):
            if (name, sid) not in live and old(f"{name}/data/{sid}"):
                found.append(f"{name}/data/{sid}")
    if not dry_run:
        for rel in found:
            storage.delete_tree(rel)
    return found

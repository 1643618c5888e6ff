"""The one deleter: every removal of checkpoint data goes through this module (docs/FORMAT.md §9).

The rule: data leaves storage only on positive evidence that nothing can need it. A `data/<save_id>/`
directory is freed only when no committed manifest under its parent directory (any name: `step-<N>`,
`final`, `last.ckpt`, ...) names it, as its own save_id or in its `bases`, and no live pin of an in-flight
save names it. A listing that fails, a manifest that cannot be read or parsed, a pin that cannot be read,
an age that cannot be told: all mean keep. What is kept by mistake, gc frees later; what is deleted by
mistake is gone.

Who calls what, and when (each caller is the only process deleting under that root at the time: the
coordinator, a node's local rank 0, or one CLI process):
  retire(parent, name)            retention (CheckpointManager._after_commit), local-tier retention and
                                  abandoned local timelines (tiers.LocalTier), the Lightning plugin's
                                  remove_checkpoint: the manifest first, made durable, then the data that
                                  no committed manifest and no pin needs any more
  free_replaced(storage, old_id)  commit.commit_manifest, after an overwrite's new manifest committed: the
                                  replaced checkpoint's data, unless a committed sibling (or the new manifest
                                  itself) refers to it
  drop_uncommitted(storage, sid)  a save that certainly did not commit (commit.finish on every rank for its
                                  own files, commit_manifest(cleanup=True), the DCP writer, tiers' early
                                  uploads): its fresh save_id is named by no manifest
  gc_uncommitted(root, ...)       CheckpointManager (coordinator) and `shardckpt gc`: leftovers of crashed
                                  saves older than a grace period, and pins that expired
  pin(...) / unpin(...)           api._prepare / pipeline.write_and_commit (coordinator) around a save with
                                  base=: the base's data stays while the save is in flight
  remove_export_files(dst, names) export --overwrite: a previous export's files, never checkpoint data
"""
from __future__ import annotations

import json
import logging
import time
from typing import Iterable

from shardckpt.errors import StorageError
from shardckpt.format.records import MANIFEST_NAME, data_file_name, index_file_name
from shardckpt.lifecycle.layout import STEP_DIR, step_dir
from shardckpt.storage import Storage, storage_for

log = logging.getLogger("shardckpt")

DEFAULT_GC_GRACE_S = 3600.0
PINS_DIR = ".shardckpt-pins"  # under a checkpoint's parent: one record per in-flight save with a base


class Unknown(Exception):
    """What committed manifests or pins refer to could not be established: nothing may be freed."""


# ------------------------------------------------------------------------------------------ references

def references(parent: Storage, grace_s: float | None = DEFAULT_GC_GRACE_S) -> set[tuple[str, str]]:
    """(directory name, save_id) of every data/<save_id>/ that a committed manifest under `parent` needs
    (its own, and every base it refers to: FORMAT.md §7), or that a live pin names. Every directory name
    counts, not only step-<N>. Pins older than `grace_s` (known to be older) have expired; None: none has.
    Raises Unknown when anything needed to tell could not be read."""
    from shardckpt.format.metadata import read_manifest
    try:
        names = parent.list_dir("")
    except Exception as e:
        raise Unknown(f"listing {parent.url}: {type(e).__name__}: {e}") from e
    live: set[tuple[str, str]] = set()
    for name in names:
        if name.startswith("."):
            continue
        try:
            if not parent.exists(f"{name}/{MANIFEST_NAME}"):
                continue
            m = read_manifest(parent.child(name))
        except FileNotFoundError:
            continue  # deleted between the two calls: a retired checkpoint refers to nothing
        except Exception as e:
            raise Unknown(f"{name}: {type(e).__name__}: {e}") from e
        live.add((name, m.save_id))
        live.update((b.dir, b.save_id) for b in m.bases)
    live.update(_pinned(parent, grace_s))
    return live


def _pinned(parent: Storage, grace_s: float | None) -> set[tuple[str, str]]:
    try:
        pins = parent.list_dir(PINS_DIR)
    except Exception as e:
        raise Unknown(f"listing {parent.url}/{PINS_DIR}: {type(e).__name__}: {e}") from e
    now, out = time.time(), set()
    for p in pins:
        rel = f"{PINS_DIR}/{p}"
        try:
            if grace_s is not None and _expired(parent, rel, now, grace_s):
                continue
            record = json.loads(parent.read_file(rel))
            out.update((str(d), str(s)) for d, s in record["needs"])
        except FileNotFoundError:
            continue  # unpinned meanwhile: that save committed (its manifest counts) or failed
        except Exception as e:
            raise Unknown(f"pin {rel}: {type(e).__name__}: {e}") from e
    return out


def _expired(storage: Storage, rel: str, now: float, grace_s: float) -> bool:
    if grace_s <= 0:
        return True
    t = _newest(storage, rel)
    return t is not None and now - t > grace_s


def _newest(storage: Storage, relpath: str) -> float | None:
    """The newest mtime of the files below relpath (of relpath itself when it holds none); None when any of
    them has no known age, so an entry is only taken when every part of it is known to be old."""
    times = [storage.mtime(f) for f in storage.list_files(relpath)] or [storage.mtime(relpath)]
    if any(t is None for t in times):
        return None
    return max(times)


def parent_of(storage: Storage) -> tuple[Storage, str]:
    """(the parent directory's Storage, this checkpoint's name in it); no I/O."""
    from shardckpt.format.refs import parent_storage
    return parent_storage(storage), storage.url.rstrip("/").rpartition("/")[2]


# ------------------------------------------------------------------------------------------------ pins

def pin(parent: Storage, save_id: str, needs: Iterable[tuple[str, str]]) -> None:
    """Coordinator of a save with base=, before it trusts the base: record that the in-flight save
    `save_id` may refer to `needs` ((dir, save_id) pairs beside it), so retention and gc keep them until
    unpin (or, after a crash, until the pin is older than the gc grace period). Raises StorageError."""
    record = {"save_id": save_id, "needs": sorted([d, s] for d, s in needs), "created": time.time()}
    parent.write_file(f"{PINS_DIR}/{save_id}.json", json.dumps(record).encode())


def unpin(parent: Storage, save_id: str) -> None:
    """Coordinator, once the save committed (its manifest now names what it needs) or certainly failed.
    A pin left behind only keeps data longer (gc drops it after the grace period)."""
    try:
        parent.delete(f"{PINS_DIR}/{save_id}.json")
    except Exception as e:
        log.warning("shardckpt: could not remove the pin %s/%s/%s.json (%s); gc drops it after the grace "
                    "period", parent.url, PINS_DIR, save_id, e)


# ---------------------------------------------------------------------------------------------- retire

def retire(parent: Storage, name: str, grace_s: float | None = DEFAULT_GC_GRACE_S) -> list[str]:
    """Delete the checkpoint `parent/name`: its manifest first, durably (from then on the checkpoint does
    not exist for any reader), then every data directory that committed manifests and pins needed before
    and no longer need: this checkpoint's own data unless a kept checkpoint refers to it, and the data of
    earlier retired checkpoints that only this one referred to. When what is referenced cannot be read,
    the manifest still goes but no data does (gc frees it later). A crash at any point leaves every other
    committed checkpoint loadable. Raises StorageError if the manifest could not be deleted (then nothing
    was). Returns the paths deleted, relative to `parent`."""
    try:
        before = references(parent, grace_s)
    except Unknown as e:
        before = None
        log.warning("shardckpt: retiring %s/%s: %s; its data is kept (gc frees it later)", parent.url, name, e)
    parent.delete(f"{name}/{MANIFEST_NAME}")
    parent.sync_dir(name)  # the manifest's removal is durable before any data is touched (§9)
    if before is None:
        return []
    try:
        after = references(parent, grace_s)
    except Unknown as e:
        log.warning("shardckpt: retired %s/%s but kept its data: %s", parent.url, name, e)
        return []
    gone = []
    for d, sid in sorted(before - after):
        parent.delete_tree(f"{d}/data/{sid}")
        gone.append(f"{d}/data/{sid}")
        if not parent.exists(f"{d}/{MANIFEST_NAME}") and not parent.list_dir(f"{d}/data"):
            parent.delete_tree(d)
            gone.append(d)
    return gone


def free_replaced(storage: Storage, old_save_id: str) -> list[str]:
    """Coordinator, after an overwrite of the checkpoint at `storage` committed: delete the replaced
    checkpoint's data/<old_save_id>/ unless a committed manifest beside it (a sibling saved with base= on
    it, or the new manifest itself, whose references resolve into it) or a pin still needs it. Kept data
    is freed by a later retire of its last referrer (or gc). Returns the paths deleted."""
    parent, name = parent_of(storage)
    try:
        live = references(parent)
    except Unknown as e:
        log.warning("shardckpt: kept the replaced checkpoint's data %s/data/%s: %s", storage.url, old_save_id, e)
        return []
    if (name, old_save_id) in live:
        log.info("shardckpt: kept the replaced checkpoint's data %s/data/%s: a committed checkpoint refers to it",
                 storage.url, old_save_id)
        return []
    storage.delete_tree(f"data/{old_save_id}")
    return [f"data/{old_save_id}"]


def drop_uncommitted(storage: Storage, save_id: str, rank: int | None = None) -> None:
    """A save that certainly did not commit (its caller knows no manifest names `save_id`, a fresh id):
    remove `rank`'s data and index files, or with rank None the whole data/<save_id>/. Best effort: what
    stays is a leftover for gc."""
    try:
        if rank is None:
            storage.delete_tree(f"data/{save_id}")
        else:
            for name in (data_file_name(save_id, rank), index_file_name(save_id, rank)):
                storage.delete(name)
    except Exception:
        pass


def remove_export_files(dst: Storage, names: Iterable[str]) -> None:
    """export --overwrite: a previous export's own files (model*.safetensors, its index), never a
    checkpoint's manifest or data: a name that is one is refused (StorageError), before anything goes."""
    names = list(names)
    bad = [n for n in names if n == MANIFEST_NAME or n.startswith("data/")]
    if bad:
        raise StorageError(f"refusing to delete checkpoint files {bad[:4]} as export output", file=dst.url)
    for n in names:
        dst.delete(n)


# -------------------------------------------------------------------------------------------------- gc

def gc_uncommitted(root, *, dry_run: bool = True, grace_s: float = DEFAULT_GC_GRACE_S,
                   exclude: Iterable[int] = (), storage_options: dict | None = None) -> list[str]:
    """Leftovers of crashed saves under a manager root: step directories without a committed manifest that
    no committed manifest refers to, data/<save_id> directories inside step directories that no committed
    manifest (of any name under the root) and no live pin needs, and pins of crashed saves. Only entries
    whose newest file is known to be older than `grace_s` seconds are taken (a save still being written
    keeps touching its files), and never the steps in `exclude` (the save this process has in flight).
    With grace_s <= 0 every leftover is taken whatever its age (no save may be running then). If any
    manifest or pin cannot be read, nothing is taken.

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
    try:
        live = references(storage, grace_s)  # what committed manifests and live pins need is never a leftover
        found = [f"{PINS_DIR}/{p}" for p in storage.list_dir(PINS_DIR)
                 if _expired(storage, f"{PINS_DIR}/{p}", now, grace_s)]
        for name in storage.list_dir(""):
            if not STEP_DIR.match(name) or name in skip:
                continue
            committed = storage.exists(f"{name}/{MANIFEST_NAME}")
            if not committed and not any(d == name for d, _ in live):
                if _expired(storage, name, now, grace_s):
                    found.append(name)
                continue
            for sid in storage.list_dir(f"{name}/data"):
                if (name, sid) not in live and _expired(storage, f"{name}/data/{sid}", now, grace_s):
                    found.append(f"{name}/data/{sid}")
    except Unknown as e:
        log.warning("shardckpt: gc under %s kept everything: %s", storage.url, e)
        return []
    if not dry_run:
        for rel in found:
            if rel.startswith(PINS_DIR + "/"):
                storage.delete(rel)
            else:
                storage.delete_tree(rel)
    return found

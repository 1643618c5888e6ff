"""The save pipeline, in order (all ranks unless noted); shardckpt.save, async_save and the node-local tier
run it:
  prepare(...)          1. flatten the state, plan this rank's chunks, digest the plan; a save with a base
                           loads it and puts first the chunks the base wrote itself; a hashed save starts
                           hashing the caller's contiguous chunks (writer.ChunkHasher)
                        2. coordinator: refuse if a manifest exists (unless overwrite); pin an incremental
                           save's base (deleter.pin); gather digests, broadcast go + save_id (or the error)
                        3. stage what must be snapshotted (async saves, strided views, GPU tensors)
  write_and_commit(p)   4. encode and write this rank's files (saving.writer), fsync
                        5. lifecycle.commit.finish: gather summaries, the coordinator commits manifest.json,
                           every rank agrees on the outcome and raises the same error on failure
Any error on any rank, of any type, reaches the next collective as a record, so every rank raises at once.
"""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from shardckpt import config, dist as sdist
from shardckpt._faults import fault_point
from shardckpt.errors import CheckpointError, CheckpointExistsError, PlanMismatchError, SaveError, error_text
from shardckpt.format.metadata import manifest_bytes, read_manifest
from shardckpt.format.parse import parse_manifest
from shardckpt.format.records import MANIFEST_NAME, Manifest, build_manifest, dtype_name
from shardckpt.format.tree import encode_value, flatten
from shardckpt.lifecycle import commit, deleter
from shardckpt.native import kernels as _ext
from shardckpt.plan.save_plan import TensorInfo, WriteItem, plan_digest, plan_tensor, split_rows
from shardckpt.saving.staging import HostBufferPool, aligned, default_pool, stage as stage_items
from shardckpt.saving.writer import ChunkHasher, RankWriter, write_rank
from shardckpt.storage import Storage, storage_for


@dataclass
class Prepared:
    """A save after planning: what this rank writes and what the coordinator will put in the manifest."""
    storage: Storage
    comm: sdist.Comm
    save_id: str
    items: list[WriteItem]
    sources: list[torch.Tensor]
    infos: list[TensorInfo]
    tree: dict
    values: dict[str, Any]
    total_elements: int
    frame_size: int
    user_metadata: dict
    writer: RankWriter | None = None  # started on the caller's thread when the state overflows the pool
    hashed: bool = False              # content hashes in the index (format 2.1, FORMAT.md §7)
    base: Any = None                  # refs.BaseChunks: the earlier checkpoint unchanged chunks refer to
    error: str | None = None          # a failure of that early part, reported at the commit round
    committed: bytes | None = None    # coordinator: the manifest it committed
    replace: bool = False             # coordinator: overwrite=True and a committed checkpoint is at the path
    pinned: Storage | None = None     # coordinator: the parent dir where this save pinned its base (deleter.pin)
    hasher: ChunkHasher | None = None  # a hashed sync save: the hashes of its direct `sources`, computed ahead


def prepare(state_dict, path, *, process_group, codec, frame_size, metadata, storage_options, timeout_s,
             stage: bool, pool: HostBufferPool | None, base=None, content_hash: bool = False,
             overwrite: bool = False) -> Prepared:
    """Every rank, steps 1-3 of a save (module docstring): plan, agree on the go verdict and the save_id,
    snapshot what must be staged. Returns the Prepared save for write_and_commit. Raises the same typed
    error on every rank when any rank failed before the go verdict. (Long because every failure before the
    verdict must reach its one gather, and every one after it the commit round: one function keeps both
    paths visible.)"""
    config.check_save_variables()
    storage = storage_for(path, storage_options)
    comm = sdist.comm_for(process_group, timeout_s)
    error, base_chunks, pinned, hasher = None, None, None, None
    save_id = uuid.uuid4().hex if comm.is_coordinator else None
    hashed = content_hash or base is not None
    try:
        flat = flatten(state_dict)
        infos, items = [], []
        for key, t in flat.tensors.items():
            info, item = plan_tensor(key, t, codec, comm.rank, comm.world_size)
            infos.append(info)
            if item is not None:
                items.append(item)
        # Sync saves encode straight from the caller's memory when it is contiguous on the CPU; async saves
        # (and strided views, GPU tensors) snapshot through the staging pool.
        if base is not None:  # first: what the base wrote itself is hashed (and, changed, encoded) first
            from shardckpt.saving.incremental import load_base
            base_chunks = load_base(storage, base, comm.rank, storage_options)
            items = base_chunks.changed_first(items)
        direct = [i for i in items if not stage and not i.source.is_cuda and i.source.is_contiguous()]
        staged = [i for i in items if stage or i.source.is_cuda or not i.source.is_contiguous()]
        if hashed and direct:  # the caller waits in save(): hash its chunks while the base is pinned
            hasher = ChunkHasher()
            hasher.add([i.source for i in direct])
        if base_chunks is not None and comm.is_coordinator:
            pinned = _pin_base(storage, base_chunks, save_id)
        values = {k: encode_value(v, k) for k, v in flat.values.items()}
        digest = plan_digest(infos, list(values))
        meta = dict(metadata or {})
        encode_value(meta, "metadata")  # user metadata must be plain JSON-like data
    except Exception as e:  # any failure must reach the gather below, or the other ranks wait for the timeout
        error, digest = e, None
    record = {"rank": comm.rank, "digest": digest, "error": None if error is None else error_text(error)}
    if comm.is_coordinator and error is None:
        try:
            if storage.exists(MANIFEST_NAME):
                record["exists"] = True
        except Exception as e:
            record["error"] = error_text(e)
    records = comm.gather_json(record)
    verdict = None
    if comm.is_coordinator:
        verdict = {"ok": True, "save_id": save_id}
        bad = next((r for r in records if r["error"]), None)
        if bad:
            verdict = {"ok": False, "kind": "error", "rank": bad["rank"], "message": bad["error"]}
        elif records[0].get("exists") and not overwrite:
            verdict = {"ok": False, "kind": "exists", "rank": 0,
                       "message": "a committed checkpoint already exists here; save to a new path "
                                  "(CheckpointManager uses one directory per step)"}
        else:
            odd = next((r for r in records if r["digest"] != records[0]["digest"]), None)
            if odd:
                verdict = {"ok": False, "kind": "plan", "rank": odd["rank"],
                           "message": f"rank {odd['rank']} saves different keys, shapes, dtypes or layouts "
                                      f"than rank 0"}
    verdict = comm.broadcast_json(verdict)
    if not verdict["ok"]:
        if hasher is not None:
            hasher.close()
        if pinned is not None:
            deleter.unpin(pinned, save_id)
        if isinstance(error, CheckpointError) and verdict["rank"] == comm.rank:
            raise error
        cls = {"exists": CheckpointExistsError, "plan": PlanMismatchError}.get(verdict["kind"], SaveError)
        raise cls(verdict["message"], file=storage.url, rank=verdict["rank"]) from error
    fault_point("stage", comm.rank)
    pool = pool or default_pool()
    total = sum(math.prod(i.shape) for i in infos)
    p = Prepared(storage, comm, verdict["save_id"], [], [], infos, flat.tree, values, total, frame_size, meta,
                  hashed=hashed, base=base_chunks,
                  replace=bool(comm.is_coordinator and records[0].get("exists")), pinned=pinned, hasher=hasher)
    try:  # after the go-ahead every rank must reach the commit round: failures are reported there
        staged = _stream_overflow(p, staged, pool) if pool.max_bytes else staged
        p.sources = [i.source for i in direct] + stage_items(staged, pool)
        p.items = direct + staged
    except Exception as e:
        if p.writer is not None:
            p.writer.abort()
            p.writer = None
        p.error, p.items, p.sources = error_text(e), [], []
    return p


def _pin_base(storage: Storage, base, save_id: str) -> Storage:
    """Coordinator of a save with base=, before anything relies on the base: pin what this save may refer
    to (the base's data and the data the base refers to: references resolve to the holder) so that no
    retention or gc frees it while the save is in flight, then check that the base is still the committed
    checkpoint that was read. A retention that deleted the base's manifest before the pin was visible makes
    this check fail (deleting the manifest is its first step), so the save never relies on freed data.
    Raises SaveError. Returns the parent directory's Storage (where the pin is)."""
    from shardckpt.format.refs import base_storage, parent_storage
    parent = parent_storage(storage)
    needs = {(base.dir, base.manifest.save_id)} | {(b.dir, b.save_id) for b in base.manifest.bases}
    deleter.pin(parent, save_id, needs)
    try:  # the same bytes are the same committed manifest: parsed again only when they differ
        raw = manifest_bytes(base_storage(storage, base.dir))
        again = base.manifest.save_id if raw == base.manifest_bytes else \
            parse_manifest(raw, file=f"{base.dir}/{MANIFEST_NAME}").save_id
    except Exception as e:
        again = f"unreadable ({error_text(e, 300)})"
    if again != base.manifest.save_id:
        deleter.unpin(parent, save_id)
        raise SaveError(f"base {base.dir} was deleted or replaced while this save started (its manifest is now "
                        f"{again}); nothing was written", file=storage.url)
    return parent


def _stream_overflow(p: Prepared, items: list[WriteItem], pool: HostBufferPool) -> list[WriteItem]:
    """A bounded pool: write the chunks that do not fit in it now, on the caller's thread (one pool-load at
    a time: snapshot, encode, write), and return the rest, which fit, to be staged and written as usual.
    Chunks larger than the pool are split into slabs of rows first. Raises; _prepare reports the error at
    the commit round."""
    items = [piece for i in items for piece in split_rows(i, pool.max_bytes)]
    tail, room = len(items), pool.max_bytes
    while tail > 0 and aligned(items[tail - 1].nbytes) <= room:
        tail -= 1
        room -= aligned(items[tail].nbytes)
    if tail == 0:
        return items
    p.writer = RankWriter(p.storage, p.save_id, p.comm.rank, p.frame_size, hashed=p.hashed, base=p.base)
    for item in items[:tail]:
        p.writer.add(item, stage_items([item], pool)[0])
        p.writer.drain()  # raw frames are written from the pool: finish before it is reused
    return items[tail:]


def write_and_commit(p: Prepared, after_write=None) -> Manifest:
    """Every rank: encode and write this rank's files, then run the commit protocol (commit.finish).
    `after_write(summary) -> summary` runs on every rank between the two, failed write or not (it may be
    collective): shardckpt.tiers replicates a local save's files to peers there, before the commit."""
    comm, storage = p.comm, p.storage
    summary: dict = {"rank": comm.rank, "ok": True}
    try:
        if p.error:
            raise SaveError(p.error, rank=comm.rank)
        files = write_rank(storage, p.save_id, comm.rank, p.items, p.sources, p.frame_size, p.writer,
                           hashed=p.hashed, base=p.base, hasher=p.hasher)
        if files is not None:
            summary.update(vars(files))
        fault_point("before_commit", comm.rank)
    except Exception as e:
        summary = {"rank": comm.rank, "ok": False, "error": error_text(e)}
    finally:
        if p.hasher is not None:  # write_rank closes it; a save that failed before it did not
            p.hasher.close()
    if after_write is not None:
        summary = after_write(summary)
    try:
        committed = commit.finish(comm, storage, p.save_id, summary, total_elements=p.total_elements,
                                  build=lambda files: _build_manifest(p, files), replace=p.replace)
    except SaveError as e:  # an unknown outcome keeps the pin: a manifest that lands later needs the base
        if p.pinned is not None and not e.outcome_unknown:
            deleter.unpin(p.pinned, p.save_id)
        raise
    except BaseException:
        if p.pinned is not None:
            deleter.unpin(p.pinned, p.save_id)
        raise
    if p.pinned is not None:  # committed: the manifest itself now names what it refers to
        deleter.unpin(p.pinned, p.save_id)
    if committed is not None:
        m = parse_manifest(committed, file=f"{storage.url}/{MANIFEST_NAME}")
        if p.hashed:  # the next save with this one as its base need not parse it again
            from shardckpt.saving.incremental import remember_manifest
            remember_manifest(storage.url, committed, m)
        return m
    return CommittedManifest(storage)


def _build_manifest(p: Prepared, files: list[dict]) -> bytes:
    """Coordinator only: the manifest of this save, given every rank's file entry."""
    tensors = {i.key: {"dtype": dtype_name(i.dtype), "shape": list(i.shape), "layout": i.layout}
               for i in p.infos}
    bases = None
    if p.hashed:  # the manifest's table of the checkpoints this save refers to (FORMAT.md §7)
        used = {tuple(b) for f in files for b in f.pop("bases", None) or ()}
        bases = [{"dir": d, "save_id": s} for d, s in sorted(used)]
        _check_bases_present(p.storage, used)
    return build_manifest(save_id=p.save_id, created=time.time(), world_size=p.comm.world_size,
                          frame_size=p.frame_size, tree=p.tree, tensors=tensors, values=p.values, files=files,
                          user_metadata=p.user_metadata, backend=_ext.BACKEND, bases=bases)


def _check_bases_present(storage: Storage, used: set) -> None:
    """Coordinator, just before the commit of a save that refers to other checkpoints: each referenced data
    directory must still hold files (a deleter that honours no pin, another tool, a person, may have removed
    it while the save ran); else the save fails and nothing refers to the missing data. Raises SaveError."""
    from shardckpt.format.refs import base_storage
    for d, sid in sorted(used):
        if not base_storage(storage, d).list_dir(f"data/{sid}"):
            raise SaveError(f"the data this save refers to in {d}/data/{sid} is gone (deleted while the save ran)",
                            file=storage.url)


class CommittedManifest(Manifest):
    """What a save returns on the ranks other than the coordinator: the committed Manifest, read from storage
    on first use. Most callers never look at it, and reading it on every rank at the end of every save
    would cost each rank a manifest fetch and parse (on an object store, one GET per rank per save)."""

    def __init__(self, storage: Storage):  # the dataclass fields arrive on first use
        object.__setattr__(self, "_storage", storage)

    def __eq__(self, other):
        if not isinstance(other, Manifest):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(Manifest))

    __hash__ = Manifest.__hash__

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_storage":
            raise AttributeError(name)
        loaded = read_manifest(self._storage)
        for f in dataclasses.fields(Manifest):
            object.__setattr__(self, f.name, getattr(loaded, f.name))
        return object.__getattribute__(self, name)

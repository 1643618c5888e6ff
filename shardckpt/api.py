"""Public entry points: save, load, load_full, read_manifest. Orchestration only; the work happens in
plan.py (what to write), writer.py (how), dist.py (agreeing), reader.py (reading back).

save, in order (all ranks unless noted):
  1. flatten the state, plan this rank's chunks, digest the plan
  2. coordinator: refuse if a manifest exists; gather digests, broadcast go + save_id (or the error)
  3. stage (async saves only, or tensors that are not contiguous CPU memory), encode, write, fsync
  4-5. commit.finish: gather per-rank summaries; the coordinator checks them and commits manifest.json
     (create-only, atomic); broadcast the outcome; on failure every rank raises, and removes its own files
     only if the coordinator is certain nothing was committed (it reads the manifest back after any error)
Any error on any rank, of any type, reaches the next collective as a record, so every rank raises at once.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from . import _ext, commit, dist as sdist
from ._faults import fault_point
from .commit import error_text
from .errors import (CheckpointError, CheckpointExistsError, DtypeMismatchError, IncompleteCheckpointError, KeyMismatchError, PlanMismatchError, SaveError,
                     ShapeMismatchError, StorageError)
from .format import (DEFAULT_FRAME_SIZE, MANIFEST_NAME, Chunk, Manifest, build_manifest, check_coverage,
                     dtype_name, parse_index, parse_manifest)
from .plan import TensorInfo, WriteItem, plan_digest, plan_tensor, split_rows
from .reader import ReadStats, Target, plan_reads, run_reads
from .staging import HostBufferPool, aligned, default_pool, stage as stage_items
from .storage import Storage, storage_for
from .tree import decode_value, encode_value, flatten, rebuild
from .writer import RankWriter, write_rank


# ------------------------------------------------------------------------------------------------ save

@dataclass
class _Prepared:
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
    hashed: bool = False              # content hashes in the index (format 2.0, FORMAT.md §7)
    base: Any = None                  # refs.BaseChunks: the earlier checkpoint unchanged chunks refer to
    error: str | None = None          # a failure of that early part, reported at the commit round
    committed: bytes | None = None    # coordinator: the manifest it committed


def _prepare(state_dict, path, *, process_group, codec, frame_size, metadata, storage_options, timeout_s,
             stage: bool, pool: HostBufferPool | None, base=None, content_hash: bool = False) -> _Prepared:
    storage = storage_for(path, storage_options)
    comm = sdist.comm_for(process_group, timeout_s)
    error, base_chunks = None, None
    try:
        if base is not None:
            from .refs import load_base
            base_chunks = load_base(storage, base, comm.rank, storage_options)
        flat = flatten(state_dict)
        infos, items = [], []
        for key, t in flat.tensors.items():
            info, item = plan_tensor(key, t, codec, comm.rank, comm.world_size)
            infos.append(info)
            if item is not None:
                items.append(item)
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
        verdict = {"ok": True, "save_id": uuid.uuid4().hex}
        bad = next((r for r in records if r["error"]), None)
        if bad:
            verdict = {"ok": False, "kind": "error", "rank": bad["rank"], "message": bad["error"]}
        elif records[0].get("exists"):
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
        if isinstance(error, CheckpointError) and verdict["rank"] == comm.rank:
            raise error
        cls = {"exists": CheckpointExistsError, "plan": PlanMismatchError}.get(verdict["kind"], SaveError)
        raise cls(verdict["message"], file=storage.url, rank=verdict["rank"]) from error
    fault_point("stage", comm.rank)
    pool = pool or default_pool()
    total = sum(math.prod(i.shape) for i in infos)
    p = _Prepared(storage, comm, verdict["save_id"], [], [], infos, flat.tree, values, total, frame_size, meta,
                  hashed=content_hash or base is not None, base=base_chunks)
    # Sync saves encode straight from the caller's memory when it is contiguous on the CPU; async saves
    # (and strided views, GPU tensors) snapshot through the staging pool.
    direct = [i for i in items if not stage and not i.source.is_cuda and i.source.is_contiguous()]
    staged = [i for i in items if stage or i.source.is_cuda or not i.source.is_contiguous()]
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


def _stream_overflow(p: _Prepared, items: list[WriteItem], pool: HostBufferPool) -> list[WriteItem]:
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


def _write_and_commit(p: _Prepared) -> Manifest:
    """Every rank: encode and write this rank's files, then run the commit protocol (commit.finish)."""
    comm, storage = p.comm, p.storage
    summary: dict = {"rank": comm.rank, "ok": True}
    try:
        if p.error:
            raise SaveError(p.error, rank=comm.rank)
        files = write_rank(storage, p.save_id, comm.rank, p.items, p.sources, p.frame_size, p.writer,
                           hashed=p.hashed, base=p.base)
        if files is not None:
            summary.update(vars(files))
        fault_point("before_commit", comm.rank)
    except Exception as e:
        summary = {"rank": comm.rank, "ok": False, "error": error_text(e)}
    committed = commit.finish(comm, storage, p.save_id, summary, total_elements=p.total_elements,
                              build=lambda files: _build_manifest(p, files))
    if committed is not None:
        return parse_manifest(committed, file=f"{storage.url}/{MANIFEST_NAME}")
    return _CommittedManifest(storage)


def _build_manifest(p: _Prepared, files: list[dict]) -> bytes:
    """Coordinator only: the manifest of this save, given every rank's file entry."""
    tensors = {i.key: {"dtype": dtype_name(i.dtype), "shape": list(i.shape), "layout": i.layout}
               for i in p.infos}
    bases = None
    if p.hashed:  # the manifest's table of the checkpoints this save refers to (FORMAT.md §7)
        used = {tuple(b) for f in files for b in f.pop("bases", None) or ()}
        bases = [{"dir": d, "save_id": s} for d, s in sorted(used)]
    return build_manifest(save_id=p.save_id, created=time.time(), world_size=p.comm.world_size,
                          frame_size=p.frame_size, tree=p.tree, tensors=tensors, values=p.values, files=files,
                          user_metadata=p.user_metadata, backend=_ext.BACKEND, bases=bases)


class _CommittedManifest(Manifest):
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


def save(state_dict, path, *, process_group=None, codec: str = "auto", metadata: dict | None = None,
         frame_size: int = DEFAULT_FRAME_SIZE, storage_options: dict | None = None,
         timeout_s: float | None = None, base=None, content_hash: bool = False) -> Manifest:
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
            (an incremental checkpoint, format 2.0; FORMAT.md §7).
        content_hash: record every chunk's content hash (format 2.0) without a base, so that a later save
            can refer to this one (implied by `base`).

    Returns:
        The committed Manifest (on ranks other than the coordinator it is read from storage on first use).
    """
    if frame_size <= 0 or frame_size % 8:
        raise ValueError("frame_size must be a positive multiple of 8")
    p = _prepare(state_dict, path, process_group=process_group, codec=codec, frame_size=frame_size,
                 metadata=metadata, storage_options=storage_options, timeout_s=timeout_s, stage=False, pool=None,
                 base=base, content_hash=content_hash)
    return _write_and_commit(p)


# ------------------------------------------------------------------------------------------------ load

def read_manifest(path, *, storage_options: dict | None = None) -> Manifest:
    """The committed manifest at `path`, validated. Raises IncompleteCheckpointError if there is none."""
    storage = storage_for(path, storage_options)
    try:
        data = storage.read_file(MANIFEST_NAME)
    except FileNotFoundError:
        partial = bool(storage.list_dir("data"))
        raise IncompleteCheckpointError(
            "no committed checkpoint here" + (" (a save started but never committed)" if partial else ""),
            file=f"{storage.url}/{MANIFEST_NAME}") from None
    return parse_manifest(data, file=f"{storage.url}/{MANIFEST_NAME}")


def read_chunks(storage: Storage, manifest: Manifest, keys: Iterable[str] | None = None,
                index_data: list[bytes] | None = None) -> dict[str, list[Chunk]]:
    """Every rank's chunk index (read in parallel, or given as `index_data` in manifest order when the
    group's coordinator read them; each verified against the crc32c the manifest pins), grouped by key and
    checked for exact coverage of the keys asked for."""
    def one(i_entry):
        i, entry = i_entry
        if index_data is not None:
            return parse_index(index_data[i], entry, manifest)
        try:
            data = storage.read_file(entry.index)
        except FileNotFoundError:
            raise IncompleteCheckpointError("index file listed in the manifest is missing",
                                            file=entry.index, rank=entry.rank) from None
        return parse_index(data, entry, manifest)

    with ThreadPoolExecutor(min(16, max(1, len(manifest.files)))) as pool:
        per_rank = list(pool.map(one, enumerate(manifest.files)))
    by_key: dict[str, list[Chunk]] = {k: [] for k in manifest.tensors}
    for chunks in per_rank:
        for c in chunks:
            by_key[c.key].append(c)
    for key in (manifest.tensors if keys is None else keys):
        check_coverage(manifest.tensors[key], by_key[key])
    return by_key


KeyMap = Callable[[str], str | None] | dict[str, str] | None


def _map_key(key: str, key_map: KeyMap) -> str | None:
    """The saved key a caller's key reads from. A dict maps prefixes ({"model.": ""}) or, for keys starting
    with "re:", regular expressions ({"re:^layers\\.(\\d+)": "blocks.\\1"}); a callable maps each key (None
    skips it)."""
    if key_map is None:
        return key
    if callable(key_map):
        return key_map(key)
    for src, dst in (key_map.items() if isinstance(key_map, dict) else key_map):
        if src.startswith("re:"):
            new, n = re.subn(src[3:], dst, key)
            if n:
                return new
        elif key.startswith(src):
            return dst + key[len(src):]
    return key


def _key_filter(keys) -> Callable[[str], bool]:
    if keys is None:
        return lambda k: True
    if callable(keys):
        return keys
    if isinstance(keys, str):
        keys = [keys]
    pats = list(keys)
    return lambda k: any(k == p or fnmatch.fnmatchcase(k, p) or k.startswith(p.rstrip(".") + ".") for p in pats)


@dataclass
class LoadResult:
    """What a load did: keys the caller had that the checkpoint lacks, and keys the checkpoint has that the
    caller did not ask for (both empty for a strict load, which raises instead)."""
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    bytes_read: int = 0


def _target_box(t: torch.Tensor):
    """(offsets, sizes, local tensor) of what this rank holds of a caller's tensor."""
    from .plan import _is_dtensor
    if _is_dtensor(t):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(offset), tuple(shape), t._local_tensor
    return (0,) * t.dim(), tuple(t.shape), t


def load(state_dict, path, *, process_group=None, strict: bool = True, keys=None, key_map: KeyMap = None,
         prefix: str = "", convert_dtype: bool = False, storage_options: dict | None = None,
         exchange: str = "auto") -> LoadResult:
    """Fill `state_dict`'s tensors in place from the checkpoint at `path`, whatever their layout now
    (another world size, other placements or mesh, or full tensors). Plain values are replaced in their
    containers; Stateful objects get load_state_dict().

    Under torch.distributed the load is collective over `process_group` (default: the whole job): the
    coordinator reads the manifest and index files once for the group, and every stored byte that some
    rank needs is fetched from storage by one rank only and sent to the others that need it
    (shardckpt.exchange), so data-parallel replicas do not each read the checkpoint. Without an
    initialised process group, each rank reads the frames it needs on its own.

    Args:
        strict: raise KeyMismatchError if the caller's keys and the checkpoint's differ (after key_map and
            keys). Non-strict loads skip them and report them in the result.
        keys: load only these keys (exact names, glob patterns, prefixes, or a predicate).
        key_map: maps each caller key to the saved key (see _map_key): for loading into a renamed model.
        prefix: load from the part of the checkpoint under this prefix only: caller key k reads saved key
            prefix + k, and saved keys outside the prefix are not "unexpected". For weights only out of a
            full training-state checkpoint: load(model.state_dict(), path, prefix="model.").
        convert_dtype: cast saved tensors to the caller's dtype instead of raising DtypeMismatchError.
        exchange: "auto" (exchange when reading directly would fetch 1/8 more than the bytes needed, as
            replicas do; else each rank reads its own), "always",
            or "never": no collectives at all, each rank reads on its own (a load that only some ranks
            of the job make must say "never").
    """
    from . import exchange as xchg
    if exchange not in xchg.MODES:
        raise ValueError(f"exchange must be one of {xchg.MODES}")
    storage = storage_for(path, storage_options)
    comm = sdist.comm_for(process_group) if exchange != "never" else sdist.Comm(None, 0, 1, 0)
    metadata = _read_metadata(storage, comm)
    return _load(state_dict, storage, comm, metadata, strict=strict, keys=keys, key_map=key_map, prefix=prefix,
                 convert_dtype=convert_dtype, exchange=exchange)


def _load(state_dict, storage: Storage, comm: sdist.Comm, metadata, *, strict, keys, key_map, prefix,
          convert_dtype, exchange) -> LoadResult:
    """load, once the group has the checkpoint's metadata (state.load_training_state reads it first)."""
    from . import exchange as xchg
    manifest, index_data = metadata
    error, chunks, tasks, value_slots, flat = None, {}, [], [], None
    try:  # in a group, any failure here must reach the exchange's first collective (every rank raises)
        flat = flatten(state_dict)
        targets, value_slots, missing, unexpected = _resolve(flat, manifest, storage, keys=keys, key_map=key_map,
                                                             prefix=prefix, convert_dtype=convert_dtype)
        if strict and (missing or unexpected):
            raise KeyMismatchError(f"keys differ: missing from the checkpoint {missing[:10]}, unexpected in it "
                                   f"{unexpected[:10]}", missing=missing, unexpected=unexpected, file=storage.url)
        chunks = read_chunks(storage, manifest, {t.key for t in targets}, index_data)
        tasks = plan_reads(targets, manifest, chunks)
    except Exception as e:
        if comm.group is None:
            raise
        error = e
    stats = ReadStats()
    if comm.group is None:
        run_reads(storage, manifest, tasks, stats)
    else:
        xchg.run(storage, manifest, chunks, tasks, comm, mode=exchange, error=error, stats=stats)
    for leaf, saved in value_slots:
        if leaf.container is not None:
            leaf.container[leaf.slot] = decode_value(manifest.values[saved])
    for obj, sd in flat.statefuls:
        obj.load_state_dict(sd)
    return LoadResult(missing, unexpected if not strict else [], stats.bytes_read)


def _read_metadata(storage: Storage, comm: sdist.Comm) -> tuple[Manifest, list[bytes] | None]:
    """The manifest, and in a group the index files' bytes too, read once by the coordinator for all.
    Every rank of comm's group calls it."""
    if comm.group is None:
        return read_manifest(storage), None
    from .exchange import read_metadata
    data, index_data = read_metadata(storage, comm)
    return parse_manifest(data, file=f"{storage.url}/{MANIFEST_NAME}"), index_data


def _resolve(flat, manifest: Manifest, storage: Storage, *, keys, key_map, prefix: str, convert_dtype: bool):
    """What a load fills: (targets, value slots, missing keys, unexpected keys), shapes and dtypes checked."""
    wanted = _key_filter(keys)
    targets, value_slots, missing, used = [], [], [], set()
    for key, leaf in flat.leaves.items():
        if not wanted(key):
            continue
        saved = _map_key(key, key_map)
        if saved is None:
            continue
        saved = prefix + saved
        if isinstance(leaf.value, torch.Tensor):
            meta = manifest.tensors.get(saved)
            if meta is None:
                missing.append(key)
                continue
            used.add(saved)
            t = leaf.value
            if tuple(t.shape) != meta.shape:
                raise ShapeMismatchError(f"checkpoint has shape {list(meta.shape)}, the state has "
                                         f"{list(t.shape)}", key=key, file=storage.url)
            if t.dtype != meta.dtype and not convert_dtype:
                raise DtypeMismatchError(f"checkpoint has {meta.dtype}, the state has {t.dtype} "
                                         f"(pass convert_dtype=True to cast)", key=key, file=storage.url)
            off, size, local = _target_box(t)
            if math.prod(size) or not size:
                targets.append(Target(saved, off, size, local))
        else:
            if saved not in manifest.values:
                missing.append(key)
                continue
            used.add(saved)
            value_slots.append((leaf, saved))
    in_scope = [k for k in manifest.keys() if k.startswith(prefix)]
    # with keys=, only the selected keys count: a saved key is unexpected if the selection names it
    unexpected = sorted(k for k in in_scope if k not in used and (keys is None or wanted(k[len(prefix):])))
    return targets, value_slots, missing, unexpected


def load_full(path, *, keys=None, storage_options: dict | None = None, device: str | torch.device = "cpu",
              process_group=None, exchange: str = "auto"):
    """Load a checkpoint as full tensors, with the saved nesting (dicts, lists, tuples) and plain values.
    `keys` selects a subset (names, globs, prefixes, predicate). One process by default; with a
    process_group, every rank of that group calls it and each stored byte is fetched from storage once for
    the group and shared (as load does; `exchange` as for load)."""
    from . import exchange as xchg
    storage = storage_for(path, storage_options)
    comm = sdist.comm_for(process_group) if process_group is not None and exchange != "never" \
        else sdist.Comm(None, 0, 1, 0)
    manifest, index_data = _read_metadata(storage, comm)
    wanted = _key_filter(keys)
    # indexes validated (coverage included) before any tensor is allocated from the manifest's shapes
    chunks = read_chunks(storage, manifest, [k for k in manifest.tensors if wanted(k)], index_data)
    tensors = {k: torch.empty(m.shape, dtype=m.dtype) for k, m in manifest.tensors.items() if wanted(k)}
    targets = [Target(k, (0,) * t.dim(), tuple(t.shape), t) for k, t in tensors.items() if t.numel() or not t.dim()]
    tasks = plan_reads(targets, manifest, chunks)
    if comm.group is None:
        run_reads(storage, manifest, tasks)
    else:
        xchg.run(storage, manifest, chunks, tasks, comm, mode=exchange)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    out = rebuild(manifest.tree, lambda kind, k: tensors[k] if kind == "tensor" else
                  decode_value(manifest.values[k]), wanted)
    from .tree import _SKIP
    return {} if out is _SKIP else out

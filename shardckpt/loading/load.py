"""The load path: read_manifest, read_chunks, load and load_full (re-exported by shardckpt.api and the
package). Orchestration only: reader.py decodes, exchange.py shares reads over a group.

load, in order (all ranks of the group; without one, the same with no collectives):
  1. the manifest and index files: read by the coordinator and broadcast (read_group_metadata)
  2. this rank's targets: the caller's keys mapped to saved keys, shapes and dtypes checked (resolve_targets)
  3. reads planned (reader.plan_reads) and run: directly, or through exchange.run, which fetches each
     needed stored byte once for the group; any rank's failure raises the same typed error on every rank
  4. plain values replaced in their containers, Stateful objects given load_state_dict
"""
from __future__ import annotations

import fnmatch
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from shardckpt import dist as sdist
from shardckpt.errors import DtypeMismatchError, IncompleteCheckpointError, KeyMismatchError, ShapeMismatchError
from shardckpt.format.records import MANIFEST_NAME, Chunk, Manifest
from shardckpt.plan.geometry import check_coverage
from shardckpt.format.parse import parse_index, parse_manifest
from shardckpt.loading.profile import phase
from shardckpt.loading.reader import ReadStats, Target, plan_reads, run_reads
from shardckpt.format.metadata import manifest_bytes, read_manifest  # noqa: F401 (shardckpt.read_manifest)
from shardckpt.storage import Storage, storage_for
from shardckpt.format.tree import decode_value, flatten, rebuild


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


def map_key(key: str, key_map: KeyMap) -> str | None:
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


def key_filter(keys) -> Callable[[str], bool]:
    if keys is None:
        return lambda k: True
    if callable(keys):
        return keys
    if isinstance(keys, str):
        keys = [keys]
    pats = list(keys)
    return lambda k: any(k == p or fnmatch.fnmatchcase(k, p) or k.startswith(p.rstrip(".") + ".") for p in pats)


def _few(names, n: int = 5) -> str:
    """Up to n names, and how many more there are (error messages)."""
    names = sorted(names)
    return repr(names[:n])[:-1] + (f", ... {len(names) - n} more]" if len(names) > n else "]")


def check_selection(keys, names, *, whose: str, saved=None, file: str | None = None) -> None:
    """A key selection (keys= patterns of load and load_full, export's keys / --keys) that selects none of
    `names` is a mistake, never an empty success: raise KeyMismatchError naming the patterns and a few of
    the keys there are (a predicate, or no names at all, is not checked). Called by resolve_targets (names: the
    caller's keys), load_full and export (the saved keys).

    Args:
        keys: the selection as given (None: everything; names, globs, prefixes, or a predicate).
        names: the keys the selection applies to.
        whose: how the message names them ("the state's", "the checkpoint's").
        saved: also name a few of these (the checkpoint's keys, when `names` are the caller's).
    """
    if keys is None or callable(keys):  # a predicate is code (shardckpt's own callers pass some): its business
        return
    names = list(names)
    wanted = key_filter(keys)
    if not names or any(wanted(k) for k in names):  # an empty state selects nothing and needs nothing
        return
    pats = repr([keys] if isinstance(keys, str) else list(keys))
    extra = "" if saved is None else f"; the checkpoint's keys are {_few(saved)}"
    raise KeyMismatchError(f"keys={pats} selects none of {whose} {len(names)} keys {_few(names)}{extra} "
                           f"(names, globs or prefixes)", file=file, hint=False)


def _caller_names(saved: str, key_map: KeyMap) -> list[str]:
    """The caller keys that key_map maps to saved key `saved`, where they can be told: the key itself and,
    for each plain prefix pair (src, dst) of a dict key_map, src + the rest; each kept only if map_key
    maps it back to `saved`. A regex or callable key_map is not inverted (only the key itself is tried)."""
    cands = [saved]
    if key_map is not None and not callable(key_map):
        for src, dst in (key_map.items() if isinstance(key_map, dict) else key_map):
            if not src.startswith("re:") and saved.startswith(dst):
                cands.append(src + saved[len(dst):])
    return [c for c in cands if map_key(c, key_map) == saved]


@dataclass
class LoadResult:
    """What a load did: keys the caller had that the checkpoint lacks, and keys the checkpoint has that the
    caller did not ask for (both empty for a strict load, which raises instead)."""
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    bytes_read: int = 0


def target_box(t: torch.Tensor):
    """(offsets, sizes, local tensor) of what this rank holds of a caller's tensor."""
    from shardckpt.plan.save_plan import is_dtensor
    if is_dtensor(t):
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
    (shardckpt.loading.exchange), so data-parallel replicas do not each read the checkpoint. Without an
    initialised process group, each rank reads the frames it needs on its own.

    Args:
        strict: raise KeyMismatchError if the caller's keys and the checkpoint's differ (after key_map and
            keys). Non-strict loads skip them and report them in the result.
        keys: load only these keys (exact names, glob patterns, prefixes, or a predicate), named as the
            caller names them (before key_map and prefix), also when deciding which saved keys are
            unexpected; a selection that selects none of the caller's keys raises KeyMismatchError.
        key_map: maps each caller key to the saved key (see map_key): for loading into a renamed model.
        prefix: load from the part of the checkpoint under this prefix only: caller key k reads saved key
            prefix + k, and saved keys outside the prefix are not "unexpected". For weights only out of a
            full training-state checkpoint: load(model.state_dict(), path, prefix="model.").
        convert_dtype: cast saved tensors to the caller's dtype instead of raising DtypeMismatchError.
        exchange: "auto" (exchange when reading directly would fetch 1/8 more than the bytes needed, as
            replicas do; else each rank reads its own), "always",
            or "never": no collectives at all, each rank reads on its own (a load that only some ranks
            of the job make must say "never").
    """
    from shardckpt.loading import exchange as xchg
    if exchange not in xchg.MODES:
        raise ValueError(f"exchange must be one of {xchg.MODES}")
    storage = storage_for(path, storage_options)
    with phase("group"):  # a process's first load creates shardckpt's gloo companion group here
        comm = sdist.comm_for(process_group) if exchange != "never" else sdist.Comm(None, 0, 1, 0)
    with phase("metadata"):
        metadata = read_group_metadata(storage, comm)
    return load_with_metadata(state_dict, storage, comm, metadata, strict=strict, keys=keys, key_map=key_map, prefix=prefix,
                 convert_dtype=convert_dtype, exchange=exchange)


def load_with_metadata(state_dict, storage: Storage, comm: sdist.Comm, metadata, *, strict, keys, key_map, prefix,
          convert_dtype, exchange, holders=None) -> LoadResult:
    """load, once the group has the checkpoint's metadata (state.load_training_state reads it first).
    `holders`: see exchange.run (a node-local tier's restore; `storage` is then this rank's own copy)."""
    from shardckpt.loading import exchange as xchg
    manifest, index_data = metadata
    error, chunks, tasks, value_slots, flat = None, {}, [], [], None
    try:  # in a group, any failure here must reach the exchange's first collective (every rank raises)
        with phase("planning"):
            flat = flatten(state_dict)
            targets, value_slots, missing, unexpected = resolve_targets(
                flat, manifest, storage, keys=keys, key_map=key_map, prefix=prefix, convert_dtype=convert_dtype,
                strict=strict)
            if strict and (missing or unexpected):
                raise KeyMismatchError(f"keys differ: missing from the checkpoint {_few(missing, 10)}, unexpected "
                                       f"in it {_few(unexpected, 10)}", missing=missing, unexpected=unexpected,
                                       file=storage.url)
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
        xchg.run(storage, manifest, chunks, tasks, comm, mode=exchange, error=error, stats=stats, holders=holders)
    for leaf, saved in value_slots:
        if leaf.container is not None:
            leaf.container[leaf.slot] = decode_value(manifest.values[saved])
    for obj, sd in flat.statefuls:
        obj.load_state_dict(sd)
    return LoadResult(missing, unexpected if not strict else [], stats.bytes_read)


def read_group_metadata(storage: Storage, comm: sdist.Comm) -> tuple[Manifest, list[bytes] | None]:
    """The manifest, and in a group the index files' bytes too, read once by the coordinator for all.
    Every rank of comm's group calls it."""
    if comm.group is None:
        return read_manifest(storage), None
    from shardckpt.loading.exchange import read_metadata
    data, index_data = read_metadata(storage, comm)
    return parse_manifest(data, file=f"{storage.url}/{MANIFEST_NAME}"), index_data


def resolve_targets(flat, manifest: Manifest, storage: Storage, *, keys, key_map, prefix: str, convert_dtype: bool,
             strict: bool = False):
    """What a load fills: (targets, value slots, missing keys, unexpected keys), shapes and dtypes checked.
    A key saved as a tensor and given as a plain value (or the other way) raises under `strict`, else it
    is missing (only)."""
    wanted = key_filter(keys)  # keys= names the caller's keys (before key_map and prefix), everywhere
    check_selection(keys, flat.leaves, whose="the state's", saved=manifest.keys(), file=storage.url)
    targets, value_slots, missing, used = [], [], [], set()
    for key, leaf in flat.leaves.items():
        if not wanted(key):
            continue
        saved = map_key(key, key_map)
        if saved is None:
            continue
        saved = prefix + saved
        is_tensor = isinstance(leaf.value, torch.Tensor)
        if saved in (manifest.values if is_tensor else manifest.tensors):  # one key, two kinds: say so once
            if strict:
                have = f"a plain value ({type(decode_value(manifest.values[saved])).__name__})" if is_tensor \
                    else "a tensor"
                give = "a tensor" if is_tensor else f"a plain value ({type(leaf.value).__name__})"
                raise KeyMismatchError(f"the checkpoint holds {have} under {saved!r}, the state {give}", key=key,
                                       file=storage.url, hint=False)
            missing.append(key)  # not loaded: reported once, as missing, and the saved one not as unexpected
            used.add(saved)
            continue
        if is_tensor:
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
            off, size, local = target_box(t)
            if math.prod(size) or not size:
                targets.append(Target(saved, off, size, local))
        else:
            if saved not in manifest.values:
                missing.append(key)
                continue
            used.add(saved)
            value_slots.append((leaf, saved))
    in_scope = [k for k in manifest.keys() if k.startswith(prefix)]
    # with keys=, only the selected keys count: a saved key is unexpected if the selection names it by the
    # caller's name for it (key_map inverted where it can be), never by the saved name
    unexpected = sorted(k for k in in_scope if k not in used and
                        (keys is None or any(wanted(c) for c in _caller_names(k[len(prefix):], key_map))))
    return targets, value_slots, missing, unexpected


def load_full(path, *, keys=None, storage_options: dict | None = None, device: str | torch.device = "cpu",
              process_group=None, exchange: str = "auto"):
    """Load a checkpoint as full tensors, with the saved nesting (dicts, lists, tuples) and plain values.
    `keys` selects a subset (names, globs, prefixes, predicate). One process by default; with a
    process_group, every rank of that group calls it and each stored byte is fetched from storage once for
    the group and shared (as load does; `exchange` as for load)."""
    from shardckpt.loading import exchange as xchg
    storage = storage_for(path, storage_options)
    comm = sdist.comm_for(process_group) if process_group is not None and exchange != "never" \
        else sdist.Comm(None, 0, 1, 0)
    with phase("metadata"):
        manifest, index_data = read_group_metadata(storage, comm)
    with phase("planning"):
        wanted = key_filter(keys)
        check_selection(keys, manifest.keys(), whose="the checkpoint's", file=storage.url)
        # indexes validated (coverage included) before any tensor is allocated from the manifest's shapes
        chunks = read_chunks(storage, manifest, [k for k in manifest.tensors if wanted(k)], index_data)
        tensors = {k: torch.empty(m.shape, dtype=m.dtype) for k, m in manifest.tensors.items() if wanted(k)}
        targets = [Target(k, (0,) * t.dim(), tuple(t.shape), t) for k, t in tensors.items()
                   if t.numel() or not t.dim()]
        tasks = plan_reads(targets, manifest, chunks)
    if comm.group is None:
        run_reads(storage, manifest, tasks)
    else:
        xchg.run(storage, manifest, chunks, tasks, comm, mode=exchange)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    out = rebuild(manifest.tree, lambda kind, k: tensors[k] if kind == "tensor" else
                  decode_value(manifest.values[k]), wanted)
    from shardckpt.format.tree import SKIP
    return {} if out is SKIP else out

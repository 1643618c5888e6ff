"""Moving tensors out of shardckpt: Hugging Face-style (sharded) safetensors and torch.save files. The CLI's
`export` command calls these; imports live in shardckpt.tools.importers (re-exported here).

Who calls what:
  export_safetensors / export_torch   one process, reading a committed checkpoint (any storage URL)
  CheckpointReader                    one process: box-by-box reads (export and `diff` use it)

Memory: safetensors export streams tensor by tensor and, for big tensors, row batch by row batch (about
PIECE_BYTES at a time), so a checkpoint larger than RAM exports fine. torch.save export materialises the
selected tensors (torch.save needs them whole).

An export never mixes with an earlier one: into a destination that holds files it refuses
(CheckpointExistsError) unless overwrite=True, and then removes the files of the previous export's naming
scheme it will not rewrite (stale shards, a stale index) and nothing else.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from shardckpt import config
from shardckpt.loading.load import key_filter, map_key, read_chunks
from shardckpt.format.metadata import read_manifest
from shardckpt.lifecycle.deleter import remove_export_files
from shardckpt.errors import CheckpointError, CheckpointExistsError, ConfigError, UnsupportedValueError
from shardckpt.format.records import Manifest
from shardckpt.plan.geometry import row_batches
from shardckpt.tools.importers import (DCP_ALLOWED, RestrictedUnpickler, safetensors_files,  # noqa: F401
    detect_source, import_checkpoint, load_dcp, read_dcp_metadata)
from shardckpt.lifecycle.layout import is_file
from shardckpt.loading.load import check_selection
from shardckpt.loading.reader import ReadStats, Target, plan_reads, run_reads
from shardckpt.tools.safetensors_layout import (MAX_SAFETENSORS_HEADER, SAFETENSORS_CODES,  # noqa: F401
    SAFETENSORS_DTYPES, read_safetensors, safetensors_header)
from shardckpt.storage import Storage, storage_for
from shardckpt.format.tree import decode_value

PIECE_BYTES = 32 << 20

# ------------------------------------------------------------------------------------------ reading boxes


class CheckpointReader:
    """Reads boxes of a committed checkpoint's tensors in one process, never more than asked for.
    The chunk indexes are read (and verified) once, on first use."""

    def __init__(self, path, *, storage_options: dict | None = None):
        self.storage: Storage = storage_for(path, storage_options)
        self.manifest: Manifest = read_manifest(self.storage)
        self._chunks = None
        self.stats = ReadStats()

    @property
    def chunks(self):
        if self._chunks is None:
            self._chunks = read_chunks(self.storage, self.manifest)
        return self._chunks

    def read(self, key: str, offsets=None, sizes=None) -> torch.Tensor:
        """The box (offsets, sizes) of saved tensor `key` (default: all of it) as a new CPU tensor."""
        meta = self.manifest.tensors[key]
        offsets = tuple(offsets) if offsets is not None else (0,) * len(meta.shape)
        sizes = tuple(sizes) if sizes is not None else meta.shape
        out = torch.empty(sizes, dtype=meta.dtype)
        if out.numel() or not sizes:
            run_reads(self.storage, self.manifest,
                      plan_reads([Target(key, offsets, sizes, out)], self.manifest, self.chunks), self.stats)
        return out

    def pieces(self, key: str, budget: int = PIECE_BYTES) -> Iterator[tuple[tuple, torch.Tensor]]:
        """(offsets, tensor) for consecutive row batches of `key`, each about `budget` bytes (at least one
        row along dim 0), in C order: concatenating their bytes gives the tensor's bytes."""
        for off, size in piece_boxes(self.manifest.tensors[key].shape, self.manifest.tensors[key].itemsize,
                                     budget):
            yield off, self.read(key, off, size)


def piece_boxes(shape, itemsize: int, budget: int = PIECE_BYTES) -> list[tuple[tuple, tuple]]:
    """Row-batch boxes covering a tensor in C order (one box for 0-d tensors, none for empty ones)."""
    shape = tuple(shape)
    if not shape:
        return [((), ())]
    if 0 in shape:
        return []
    row = math.prod(shape[1:]) * itemsize
    rest = (0,) * (len(shape) - 1)
    return [((lo,) + rest, (hi - lo,) + shape[1:]) for lo, hi in row_batches(0, shape[0], row, budget)]


# ------------------------------------------------------------------------------------------ key selection

def rename_keys(rename: dict[str, str] | Iterable[tuple[str, str]] | Callable | None) -> Callable[[str], str]:
    """A key renamer: prefix pairs {"model.": ""} (first match wins; "re:" prefixes a regex) or a callable."""
    if rename is None or callable(rename):
        return rename or (lambda k: k)
    pairs = list(rename.items()) if isinstance(rename, dict) else list(rename)
    return lambda key: map_key(key, pairs)


def selected_keys(manifest: Manifest, keys, rename) -> list[tuple[str, str]]:
    """(saved key, exported name) of the selected tensors, in saved order; refuses name collisions."""
    check_selection(keys, manifest.keys(), whose="the checkpoint's")  # an empty export is a mistake
    wanted, ren = key_filter(keys), rename_keys(rename)
    out, seen = [], {}
    for k in manifest.tensors:
        if wanted(k):
            name = ren(k)
            if name in seen:
                raise CheckpointError(f"keys {seen[name]!r} and {k!r} both export as {name!r}", key=k)
            seen[name] = k
            out.append((k, name))
    return out


def _out_dtype(saved: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """--dtype converts floating tensors only (integer and bool tensors keep their type)."""
    return dtype if dtype is not None and saved.is_floating_point else saved


DTYPE_ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "f16": torch.float16,
                 "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "f32": torch.float32,
                 "float32": torch.float32, "float": torch.float32, "fp64": torch.float64, "float64": torch.float64}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPE_ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPE_ALIASES)}") from None


def parse_size(text: str | int | None, name: str = "max_shard_size") -> int | None:
    """A --max-shard-size value in bytes (None: no limit), parsed by the one size parser, shardckpt.config:
    every unit is binary, so '5GB' and '5GiB' are 5 * 2**30 (like SHARDCKPT_POOL_BYTES)."""
    return None if text is None else config.parse_size(text, name=name)


# ------------------------------------------------------------------------------------------ safetensors

def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def plan_shards(sizes: list[int], max_shard_size: int | None) -> list[list[int]]:
    """Greedy split of tensors (in order) into shards of at most max_shard_size bytes (a tensor bigger than
    that gets a shard of its own), like transformers' save_pretrained."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if max_shard_size and shards[-1] and used + n > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards


@dataclass
class ExportResult:
    files: list[str]               # written, in order (relative to the destination for safetensors)
    tensors: int
    bytes: int
    skipped: list[str] = field(default_factory=list)   # selected plain values the format cannot hold
    removed: list[str] = field(default_factory=list)   # stale files of an earlier export (overwrite=True)


INDEX_NAME = "model.safetensors.index.json"
_SCHEME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # the files export_safetensors writes


def _clear_destination(dst: Storage, overwrite: bool) -> list[str]:
    """Make directory `dst` ready for a safetensors export, before any byte is written. Files of the
    export naming scheme (model.safetensors, model-0000i-of-0000N.safetensors, the index) from an earlier
    export would be overwritten or left stale beside the new ones: without `overwrite` their presence is
    refused; with it they are removed (the index first, so it never points at a mix), and every other file
    (config.json, tokenizer files, ...) is left alone. Returns the removed names."""
    ours = [f for f in dst.list_files("") if f == INDEX_NAME or _SCHEME.fullmatch(f)]
    if not ours:
        return []
    if not overwrite:
        raise CheckpointExistsError(f"the destination holds an earlier export ({', '.join(ours[:4])}"
                                    f"{', ...' if len(ours) > 4 else ''}); pass overwrite=True (--overwrite) to "
                                    f"replace it", file=dst.url)
    remove_export_files(dst, sorted(ours, key=lambda f: f != INDEX_NAME))
    return ours


def export_safetensors(ckpt, out, *, keys=None, dtype=None, rename=None, max_shard_size=None,
                       metadata: dict | None = None, storage_options: dict | None = None,
                       out_storage_options: dict | None = None, progress=None,
                       overwrite: bool = False) -> ExportResult:
    """Write the selected tensors of checkpoint `ckpt` as Hugging Face-style safetensors in directory `out`:
    model.safetensors when everything fits one shard, else model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map": {name: file}}).

    Args:
        keys: names, globs, prefixes or a predicate selecting saved tensors (default: all tensors).
        dtype: convert floating tensors to this dtype ("bf16", torch.float16, ...).
        rename: {saved prefix: exported prefix} (e.g. {"model.": ""}), "re:" regexes, or a callable.
        max_shard_size: bytes or a string like "5GB" (default: one file).
        progress: a callable(nbytes) told how many bytes were written (the CLI's progress bar).
        overwrite: replace an earlier export in `out` (see _clear_destination); without it one is refused
            with CheckpointExistsError. Files of other names in `out` are never touched.

    Returns:
        The files written, and in `skipped` the selected plain values (non-tensors) that safetensors cannot
        hold and so are not in the files.
    """
    dtype, limit = parse_dtype(dtype), parse_size(max_shard_size)
    src = CheckpointReader(ckpt, storage_options=storage_options)
    dst = storage_for(out, out_storage_options)
    sel = selected_keys(src.manifest, keys, rename)
    metas = [src.manifest.tensors[k] for k, _ in sel]
    out_types = [_out_dtype(m.dtype, dtype) for m in metas]
    for (k, _), t in zip(sel, out_types):
        if t not in SAFETENSORS_DTYPES:
            raise UnsupportedValueError(f"safetensors has no type for {t}", key=k)
    sizes = [m.numel * t.itemsize for m, t in zip(metas, out_types)]
    shards = plan_shards(sizes, limit)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    wanted = key_filter(keys)
    skipped = [k for k in src.manifest.values if wanted(k)]
    stale = _clear_destination(dst, overwrite)
    created = not dst.exists("")  # a directory this export makes is removed again if the export fails
    meta = {"format": "pt", **(metadata or {})}
    weight_map, written = {}, []
    try:
        for fname, idx in zip(names, shards):
            entries = [(sel[i][1], out_types[i], metas[i].shape) for i in idx]
            w = dst.open_write(fname)
            try:
                w.write(safetensors_header(entries, meta))
                for i in idx:
                    key = sel[i][0]
                    for _, piece in src.pieces(key):
                        if piece.dtype != out_types[i]:
                            piece = piece.to(out_types[i])
                        data = _tensor_bytes(piece)
                        w.write(data)
                        if progress:
                            progress(data.nbytes)
                    weight_map[sel[i][1]] = fname
                w.close()
                written.append(fname)
            except BaseException:
                w.abort()
                raise
        if n > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
            dst.write_file(INDEX_NAME, json.dumps(index, indent=2).encode())
            names.append(INDEX_NAME)
    except BaseException:
        _undo_export(dst, written, created)
        raise
    return ExportResult(names, len(sel), sum(sizes), skipped, [f for f in stale if f not in names])


def _undo_export(dst: Storage, written: list[str], created: bool) -> None:
    """After a failed export (corrupt source data, a full disk): remove the shards it finished, never a file
    it did not write, then the directory itself if this export created it and it is now empty, so a failed
    export leaves neither half an export nor an empty folder behind. Best effort: the original error is
    what the caller sees."""
    try:
        for f in written:
            dst.delete(f)
        if created and not dst.list_dir(""):
            dst.delete_tree("")
    except Exception:
        pass


class _WriterFile(io.RawIOBase):
    """A write-only file object over a storage FileWriter (torch.save writes through it)."""

    def __init__(self, writer):
        self._w, self._pos = writer, 0

    def writable(self):
        return True

    def write(self, b):
        data = bytes(b)
        self._w.write(data)
        self._pos += len(data)
        return len(data)

    def tell(self):
        return self._pos


def export_torch(ckpt, out, *, keys=None, dtype=None, rename=None, include_values: bool = True,
                 storage_options: dict | None = None, out_storage_options: dict | None = None,
                 progress=None, overwrite: bool = False) -> ExportResult:
    """Write the selected keys of `ckpt` as one torch.save file `out` holding a flat {name: tensor or plain
    value} dict (a module's state_dict shape), loadable with torch.load(out, weights_only=True).
    The selected tensors are held in memory at once. An existing `out` is refused with
    CheckpointExistsError unless `overwrite`."""
    dtype = parse_dtype(dtype)
    src = CheckpointReader(ckpt, storage_options=storage_options)
    sel = selected_keys(src.manifest, keys, rename)
    path = os.fspath(out)
    parent, base = (path.rsplit("/", 1) if "/" in path.rstrip("/") else ("", path))
    dst = storage_for(parent or ".", out_storage_options)
    if dst.exists(base) and not is_file(dst.child(base)):  # a directory: --overwrite would not help
        raise ConfigError("--format torch writes one file and this is a directory; give a file path such as "
                          f"{path.rstrip('/')}/model.pt", name="out", file=path)
    if not overwrite and dst.exists(base):
        raise CheckpointExistsError("the export file exists; pass overwrite=True (--overwrite) to replace it",
                                    file=path)
    state: dict = {}
    total = 0
    for key, name in sel:
        t = src.read(key)
        t = t.to(_out_dtype(t.dtype, dtype))
        state[name] = t
        total += t.numel() * t.element_size()
        if progress:
            progress(t.numel() * t.element_size())
    if include_values:
        wanted, ren = key_filter(keys), rename_keys(rename)
        for key, v in src.manifest.values.items():
            if wanted(key):
                state[ren(key)] = decode_value(v)
    w = dst.open_write(base)
    try:
        torch.save(state, _WriterFile(w))
        w.close()
    except BaseException:
        w.abort()
        raise
    return ExportResult([path], len(sel), total)

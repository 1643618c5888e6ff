"""Moving tensors out of and into shardckpt: Hugging Face-style (sharded) safetensors, torch.save files, and
torch.distributed.checkpoint (DCP) directories. The CLI's `export` and `import` commands call these.

Who calls what:
  export_safetensors / export_torch   one process, reading a committed checkpoint (any storage URL)
  import_checkpoint                   one process, writing a new checkpoint with shardckpt.save
  CheckpointReader                    one process: box-by-box reads (export, `diff`, `verify` use it)

Memory: safetensors export streams tensor by tensor and, for big tensors, row batch by row batch (about
PIECE_BYTES at a time), so a checkpoint larger than RAM exports fine. torch.save export materialises the
selected tensors (torch.save needs them whole). Imports memory-map safetensors and torch.save files.

Nothing here unpickles untrusted data: safetensors headers are JSON validated before use; torch.save files
are read with weights_only=True; a DCP checkpoint's `.metadata` pickle goes through _RestrictedUnpickler, which
only builds DCP's own metadata dataclasses, torch.Size, dtypes and paths (see _DCP_ALLOWED), and its data
through DCP's FileSystemReader with a planner that unpickles BYTE_IO entries with weights_only=True.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .api import _key_filter, _map_key, read_chunks, read_manifest, save
from .errors import CheckpointError, FormatError, UnsupportedValueError
from .format import MANIFEST_NAME, Manifest
from .geometry import row_batches
from .reader import ReadStats, Target, plan_reads, run_reads
from .storage import Storage, storage_for
from .tree import decode_value

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
    return lambda key: _map_key(key, pairs)


def _selected(manifest: Manifest, keys, rename) -> list[tuple[str, str]]:
    """(saved key, exported name) of the selected tensors, in saved order; refuses name collisions."""
    wanted, ren = _key_filter(keys), rename_keys(rename)
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


def parse_size(text: str | int | None) -> int | None:
    """'5GB' -> 5*10**9, '500MiB' -> 500*2**20, '1000' -> 1000 (Hugging Face's units)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot parse size {text!r} (e.g. 5GB, 500MiB, 1000000)")
    unit = (m.group(2) or "").rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = " kmgt".index(unit[0]) if unit else 0
    return int(float(m.group(1)) * base ** power)


# ------------------------------------------------------------------------------------------ safetensors

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_SAFETENSORS_HEADER = 100 << 20


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple]], metadata: dict[str, str] | None) -> bytes:
    """The header of a safetensors file (its documented layout: u64 little-endian header length N, N bytes of
    JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}} padded with spaces
    to a multiple of 8, then the tensors' bytes back to back in C order, little-endian)."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in entries:
        if dtype not in SAFETENSORS_DTYPES:
            raise UnsupportedValueError(f"safetensors has no type for {dtype}", key=name)
        n = math.prod(shape) * dtype.itemsize
        obj[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    head = json.dumps(obj, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


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
    files: list[str]
    tensors: int
    bytes: int


def export_safetensors(ckpt, out, *, keys=None, dtype=None, rename=None, max_shard_size=None,
                       metadata: dict | None = None, storage_options: dict | None = None,
                       out_storage_options: dict | None = None, progress=None) -> ExportResult:
    """Write the selected tensors of checkpoint `ckpt` as Hugging Face-style safetensors in directory `out`:
    model.safetensors when everything fits one shard, else model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map": {name: file}}).

    Args:
        keys: names, globs, prefixes or a predicate selecting saved tensors (default: all tensors).
        dtype: convert floating tensors to this dtype ("bf16", torch.float16, ...).
        rename: {saved prefix: exported prefix} (e.g. {"model.": ""}), "re:" regexes, or a callable.
        max_shard_size: bytes or a string like "5GB" (default: one file).
        progress: a callable(nbytes) told how many bytes were written (the CLI's progress bar).
    """
    dtype, limit = parse_dtype(dtype), parse_size(max_shard_size)
    src = CheckpointReader(ckpt, storage_options=storage_options)
    dst = storage_for(out, out_storage_options)
    sel = _selected(src.manifest, keys, rename)
    metas = [src.manifest.tensors[k] for k, _ in sel]
    out_types = [_out_dtype(m.dtype, dtype) for m in metas]
    for (k, _), t in zip(sel, out_types):
        if t not in SAFETENSORS_DTYPES:
            raise UnsupportedValueError(f"safetensors has no type for {t}", key=k)
    sizes = [m.numel * t.itemsize for m, t in zip(metas, out_types)]
    shards = plan_shards(sizes, limit)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": "pt", **(metadata or {})}
    weight_map = {}
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
        except BaseException:
            w.abort()
            raise
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        dst.write_file("model.safetensors.index.json", json.dumps(index, indent=2).encode())
        names.append("model.safetensors.index.json")
    return ExportResult(names, len(sel), sum(sizes))


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
                 progress=None) -> ExportResult:
    """Write the selected keys of `ckpt` as one torch.save file `out` holding a flat {name: tensor or plain
    value} dict (a module's state_dict shape), loadable with torch.load(out, weights_only=True).
    The selected tensors are held in memory at once."""
    dtype = parse_dtype(dtype)
    src = CheckpointReader(ckpt, storage_options=storage_options)
    sel = _selected(src.manifest, keys, rename)
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
        wanted, ren = _key_filter(keys), rename_keys(rename)
        for key, v in src.manifest.values.items():
            if wanted(key):
                state[ren(key)] = decode_value(v)
    path = os.fspath(out)
    parent, base = (path.rsplit("/", 1) if "/" in path.rstrip("/") else ("", path))
    dst = storage_for(parent or ".", out_storage_options)
    w = dst.open_write(base)
    try:
        torch.save(state, _WriterFile(w))
        w.close()
    except BaseException:
        w.abort()
        raise
    return ExportResult([path], len(sel), total)


# ------------------------------------------------------------------------------------------ safetensors in

def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a local safetensors file, memory-mapped (copy-on-write), after validating the header:
    known dtypes, shapes matching byte lengths, offsets inside the file, no two tensors sharing bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError("file too short for a safetensors header", file=path)
        n = int.from_bytes(head, "little")
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise FormatError(f"header length {n} is invalid for a {size}-byte file", file=path)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"header is not valid JSON: {e}", file=path) from None
    if type(header) is not dict:
        raise FormatError("header must be a JSON object", file=path)
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    mm = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n, shape=(data_len,)) if data_len else \
        np.empty(0, np.uint8)
    spans, out = [], {}
    for name, e in header.items():
        if type(e) is not dict or e.get("dtype") not in SAFETENSORS_CODES:
            raise FormatError(f"unknown or missing dtype {e.get('dtype') if type(e) is dict else e!r:.40}",
                              key=name, file=path)
        dt = SAFETENSORS_CODES[e["dtype"]]
        shape, offs = e.get("shape"), e.get("data_offsets")
        if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape) or \
                type(offs) is not list or len(offs) != 2 or any(type(o) is not int for o in offs):
            raise FormatError("bad shape or data_offsets", key=name, file=path)
        b, e_ = offs
        if not 0 <= b <= e_ <= data_len or e_ - b != math.prod(shape) * dt.itemsize:
            raise FormatError(f"data_offsets {offs} do not fit shape {shape} of {dt} in {data_len} bytes",
                              key=name, file=path)
        spans.append((b, e_, name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(mm[b:e_]) if e_ > b else torch.empty(0, dtype=torch.uint8)
        out[name] = raw.view(dt).reshape(shape)
    spans.sort()
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if a_end > b_start:
            raise FormatError(f"tensors {a!r} and {b!r} share bytes", file=path)
    return out, meta


def _safetensors_files(src: str) -> list[str]:
    if os.path.isfile(src):
        return [src]
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            obj = json.load(f)
        files = sorted(set(obj.get("weight_map", {}).values()))
        for name in files:
            if type(name) is not str or "/" in name or name.startswith("."):
                raise FormatError(f"weight_map names an odd file {name!r:.80}", file=index)
        return [os.path.join(src, n) for n in files]
    return sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".safetensors"))


# ------------------------------------------------------------------------------------------ DCP in

class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file and nothing else: find_class resolves only the names in _DCP_ALLOWED
    (DCP's metadata dataclasses and enums, torch.Size, torch dtypes, the layout helper torch.serialization
    uses, path classes, OrderedDict). Any other global raises, so a crafted file cannot call os.system &c."""

    def find_class(self, module, name):
        if (module, name) in _DCP_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise FormatError(f"DCP metadata refers to {module}.{name}, which is not a DCP metadata type "
                          f"(refusing to unpickle it)")


_DCP_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in
    ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
     "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch", "strided"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


def read_dcp_metadata(path: str):
    """DCP's Metadata of checkpoint directory `path`, through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata
    with open(os.path.join(path, ".metadata"), "rb") as f:
        try:
            md = _RestrictedUnpickler(f).load()
        except FormatError as e:
            raise FormatError(str(e), file=os.path.join(path, ".metadata")) from None
    if not isinstance(md, Metadata):
        raise FormatError("not a DCP Metadata object", file=os.path.join(path, ".metadata"))
    return md


def load_dcp(path: str) -> dict:
    """A DCP checkpoint's state as a flat {fqn: tensor or object} dict (then nested back with DCP's own
    mapping when it saved one). Tensors are read by DCP's FileSystemReader (torch.load weights_only=True);
    BYTE_IO objects are unpickled with weights_only=True too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    md = read_dcp_metadata(path)

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md.storage_meta = md.storage_meta or StorageMeta()
            return md

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            self.original_state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    state: dict = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            state[fqn] = None
        else:
            state[fqn] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
             no_dist=True)
    mapping = md.planner_data
    if isinstance(mapping, dict) and mapping and set(mapping) == set(state) and \
            all(isinstance(p, tuple) for p in mapping.values()):
        from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
        try:
            return unflatten_state_dict(state, mapping)
        except Exception:
            pass
    return state


# ------------------------------------------------------------------------------------------ import

def detect_source(src: str) -> str:
    """'dcp', 'safetensors', 'torch' or 'shardckpt' for a local path."""
    if os.path.isdir(src):
        if os.path.exists(os.path.join(src, ".metadata")):
            return "dcp"
        if os.path.exists(os.path.join(src, MANIFEST_NAME)):
            return "shardckpt"
        if _safetensors_files(src):
            return "safetensors"
        raise FormatError("directory holds neither a DCP checkpoint (.metadata) nor safetensors files", file=src)
    if not os.path.exists(src):
        raise FileNotFoundError(src)
    if src.endswith(".safetensors"):
        return "safetensors"
    return "torch"


def import_checkpoint(src, dst, *, kind: str | None = None, codec: str = "auto", metadata: dict | None = None,
                      storage_options: dict | None = None) -> Manifest:
    """Convert a DCP directory, a torch.save file or safetensors file(s) (a file, or a folder with or without
    model.safetensors.index.json) at local path `src` into a new shardckpt checkpoint at `dst` (any URL).
    Plain values come along when they are JSON-like; others raise UnsupportedValueError."""
    src = os.fspath(src)
    kind = kind or detect_source(src)
    if kind == "dcp":
        state = load_dcp(src)
    elif kind == "safetensors":
        state, meta = {}, {}
        for f in _safetensors_files(src):
            tensors, m = read_safetensors(f)
            dup = set(tensors) & set(state)
            if dup:
                raise FormatError(f"tensor {sorted(dup)[0]!r} appears in two safetensors files", file=f)
            state.update(tensors)
            meta.update(m)
    elif kind == "torch":
        state = torch.load(src, map_location="cpu", weights_only=True, mmap=_is_zip(src))
        if isinstance(state, torch.Tensor):
            state = {"tensor": state}
    elif kind == "shardckpt":
        raise CheckpointError("the source is already a shardckpt checkpoint", file=src)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    info = {"imported_from": {"kind": kind, "source": os.path.abspath(src)}}
    return save(state, dst, codec=codec, metadata={**info, **(metadata or {})}, storage_options=storage_options)


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"

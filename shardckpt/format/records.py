"""The on-disk format, version 1 (docs/FORMAT.md is the normative spec; this module is its reader/writer).

A checkpoint directory holds:
  manifest.json                         the commit: written last, once, atomically, by the coordinator
  data/<save_id>/r<rank:05d>.bin        frames written by one rank
  data/<save_id>/r<rank:05d>.index.json that rank's chunk index (which boxes, which frames, crc32c)

This module holds the format's constants, the frozen records the phases hand each other (Frame, Chunk,
TensorMeta, FileEntry, Manifest) and the builders a save calls (build_index on every rank, build_manifest on
the coordinator). Everything read from storage goes through a parse_* function of shardckpt.format.parse, which
validates it completely (checksum first, then version, types, names, ranges, overflow) before any file is
opened or any buffer is allocated; they are re-exported here so `shardckpt.format` stays the one import.
"""
from __future__ import annotations

import functools
import gc
import json
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from shardckpt.native import kernels as _ext
from shardckpt.errors import FormatError

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = "1.0"          # what a save without content hashes writes (every 1.x reader reads it)
FORMAT_VERSION_INCREMENTAL = "2.1"  # content hashes, and chunks that refer to an earlier checkpoint (§7);
                                    # 2.1 names the hash algorithm (`chunk_hash`), 2.0 used blake2b-128
CHUNK_HASH = "xxh3-128"             # the content hash this writer records (§7)
CHUNK_HASH_2_0 = "blake2b-128"      # the hash of a 2.x manifest that names none (what 2.0 writers used)
SUPPORTED_MAJORS = (1, 2)
SUPPORTED_MAJOR = 1  # the oldest MAJOR this reader accepts (kept for callers that print it)
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
DEFAULT_FRAME_SIZE = 4 << 20
MIN_CHUNK_FRAME = 64 << 10
FRAMES_PER_CHUNK = 16
MAX_FRAME_SIZE = 256 << 20
MAX_MANIFEST_BYTES = 1 << 30
MAX_NUMEL = 1 << 50
MAX_NDIM = 32

CODECS = {"raw/1": _ext.CODEC_RAW, "zstd/1": _ext.CODEC_ZSTD, "zstd-byteplane/1": _ext.CODEC_ZSTD_BYTEPLANE}

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                 "float8_e4m3fnuz", "float8_e5m2fnuz", "complex64", "complex128", "int8", "int16", "int32",
                 "int64", "uint8", "uint16", "uint32", "uint64", "bool"]
    if hasattr(torch, name)
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


def without_gc(fn):
    """Run fn with the cyclic garbage collector paused. Parsing or building a manifest or index allocates
    tens of thousands of small containers, none of them garbage; in a training process whose heap holds a
    large object graph, the collections they trigger cost 10-30x the parse itself (measured: 57 ms against
    2 ms per 356 KB manifest on the coordinator after a save). Safe across threads: the collector is
    paused by the first caller and resumed by the last, and left alone if it was off."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _gc_depth, _gc_was_enabled
        with _gc_lock:
            if _gc_depth == 0:
                _gc_was_enabled = gc.isenabled()
                gc.disable()
            _gc_depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _gc_lock:
                _gc_depth -= 1
                if _gc_depth == 0 and _gc_was_enabled:
                    gc.enable()
    return wrapper


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} is not supported by format {FORMAT_VERSION}") from None


def data_file_name(save_id: str, rank: int) -> str:
    return f"{DATA_DIR}/{save_id}/r{rank:05d}.bin"


def index_file_name(save_id: str, rank: int) -> str:
    return f"{DATA_DIR}/{save_id}/r{rank:05d}.index.json"


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------------------------------------- dataclasses

@dataclass(frozen=True)
class Frame:
    """One independently decodable frame: `stored_len` bytes at `offset` of the data file, decoding to
    `raw_len` bytes; `encoded` False means the stored bytes are the raw bytes."""
    offset: int
    stored_len: int
    raw_len: int
    crc32c: int
    encoded: bool


@dataclass(frozen=True)
class Chunk:
    """A box of one tensor (`offsets`, `sizes` in global coordinates) stored by one rank, C-order bytes split
    into frames of `frame_size` bytes (the last one shorter)."""
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    codec: str
    frames: tuple[Frame, ...]
    file: str
    rank: int
    frame_size: int
    base: str = ""   # a reference (FORMAT.md §7): the sibling checkpoint directory holding `file`, else ""
    hash: str = ""   # content hash of the chunk's raw bytes, hex (format 2.x; Manifest.chunk_hash says which), else ""

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def chunk_frame_size(nbytes: int, max_frame_size: int) -> int:
    """The frame size a writer uses for a chunk: about FRAMES_PER_CHUNK frames (so a resharding load that
    needs part of the chunk fetches little more than that part), a power of two between MIN_CHUNK_FRAME
    and max_frame_size."""
    target = max(1, nbytes // FRAMES_PER_CHUNK)
    size = MIN_CHUNK_FRAME
    while size < target and size < max_frame_size:
        size *= 2
    return min(size, max_frame_size)


@dataclass(frozen=True)
class TensorMeta:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: dict | None = None  # how it was laid out at save time (mesh shape, placements); informative

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


@dataclass(frozen=True)
class FileEntry:
    """The files one rank wrote: its data file and its index (whose crc32c the manifest pins)."""
    rank: int
    data: str
    data_size: int
    index: str
    index_size: int
    index_crc32c: int
    chunks: int
    raw_bytes: int
    ref_chunks: int = 0        # of `chunks`, those that refer to an earlier checkpoint's frames (§7)
    ref_raw_bytes: int = 0     # their raw bytes (part of raw_bytes)
    ref_stored_bytes: int = 0  # their stored bytes, in the earlier checkpoints' data files


@dataclass(frozen=True)
class Base:
    """An earlier checkpoint that chunks of this one refer to (FORMAT.md §7): the sibling directory `dir`
    (same parent as this checkpoint) and the save_id whose data/<save_id>/ files hold the frames."""
    dir: str
    save_id: str


@dataclass(frozen=True)
class Manifest:
    format_version: str
    save_id: str
    created: float
    world_size: int
    frame_size: int
    tree: dict
    tensors: dict[str, TensorMeta]
    values: dict[str, Any]
    files: tuple[FileEntry, ...]
    user_metadata: dict
    backend: str = ""
    bases: tuple[Base, ...] = ()
    chunk_hash: str = ""  # 2.x: the algorithm of its chunks' content hashes (§7: "xxh3-128", "blake2b-128"); 1.x: ""

    @property
    def stored_bytes(self) -> int:
        """Bytes this checkpoint's own data files hold (what its save wrote)."""
        return sum(f.data_size for f in self.files)

    @property
    def ref_stored_bytes(self) -> int:
        """Stored bytes of earlier checkpoints that this one refers to instead of writing them again."""
        return sum(f.ref_stored_bytes for f in self.files)

    @property
    def raw_bytes(self) -> int:
        return sum(t.numel * t.itemsize for t in self.tensors.values())

    def keys(self) -> list[str]:
        return sorted(list(self.tensors) + list(self.values))


@without_gc
def build_manifest(*, save_id: str, created: float, world_size: int, frame_size: int, tree: dict,
                   tensors: dict[str, dict], values: dict[str, Any], files: list[dict],
                   user_metadata: dict, backend: str, bases: list[dict] | None = None) -> bytes:
    """The manifest's bytes (FORMAT.md §3), its checksum computed over the canonical JSON. Called by the
    coordinator only, once per save, after every rank's summary is gathered (api and dcp commit paths).
    `bases` None writes format 1.0; a list (empty when nothing was referred to) writes 2.1 (§7), for a save
    whose indexes carry CHUNK_HASH content hashes."""
    obj = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION if bases is None else FORMAT_VERSION_INCREMENTAL,
        "save_id": save_id, "created": created,
        "world_size": world_size, "frame_size": frame_size, "backend": backend, "tree": tree,
        "tensors": tensors, "values": values, "files": files, "user_metadata": user_metadata,
    }
    if bases is not None:
        obj["bases"] = bases
        obj["chunk_hash"] = CHUNK_HASH
    obj["manifest_crc32c"] = _ext.crc32c(canonical_json(obj))
    return json.dumps(obj, sort_keys=True, indent=1, allow_nan=False).encode()


@without_gc
def build_index(*, save_id: str, rank: int, chunks: list[dict], hashed: bool = False) -> bytes:
    """One rank's index bytes (FORMAT.md §4, canonical JSON). Called by every rank that wrote data, once its
    frames are written (writer.RankWriter), before the rank's summary goes to the coordinator. `hashed`:
    every chunk carries its content hash (and may be a reference): format 2.1 (§7)."""
    obj = {"format": "shardckpt-index", "format_version": FORMAT_VERSION_INCREMENTAL if hashed else FORMAT_VERSION,
           "save_id": save_id, "rank": rank, "chunks": chunks}
    return canonical_json(obj)


# The validators live in parse.py (which imports the records above); re-exported so callers keep one import.

"""Validators of everything a reader takes from storage (docs/FORMAT.md is the normative spec).

parse_manifest and parse_index are called by every load, the CLI, the manager and the commit read-back,
on bytes just read and before anything they name is opened or allocated: the checksum first (a manifest's
manifest_crc32c, an index's size and crc32c pinned by the manifest), then the format and version, then
every field's type, range and name. Anything else raises a typed FormatError / ChecksumError /
UnsupportedVersionError naming the file (and the key where there is one). check_coverage is called once a
tensor's chunks from every rank are known. shardckpt.format re-exports these names.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from shardckpt.native import kernels as _ext
from shardckpt.errors import ChecksumError, FormatError, UnsupportedVersionError
from shardckpt.format.records import (CHUNK_HASH_2_0, CODECS, DTYPES, FORMAT_NAME, MANIFEST_NAME, MAX_FRAME_SIZE, MAX_MANIFEST_BYTES,
    MAX_NDIM, MAX_NUMEL, SUPPORTED_MAJORS, Base, Chunk, FileEntry, Frame, Manifest, TensorMeta, without_gc,
    canonical_json, data_file_name, index_file_name)

def _fail(msg: str, file: str | None = None, key: str | None = None):
    raise FormatError(msg, file=file, key=key)


def _int(v, what, file, lo=0, hi=1 << 62, key=None) -> int:
    if type(v) is not int or not (lo <= v <= hi):
        _fail(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.80}", file, key)
    return v


def _str(v, what, file, key=None) -> str:
    if type(v) is not str:
        _fail(f"{what} must be a string, got {type(v).__name__}", file, key)
    return v


def _dict(v, what, file) -> dict:
    if type(v) is not dict:
        _fail(f"{what} must be an object", file)
    return v


def _list(v, what, file, key=None) -> list:
    if type(v) is not list:
        _fail(f"{what} must be a list", file, key)
    return v


# fullmatch below: `$` alone would also accept a trailing newline
_SAVE_ID = re.compile(r"[0-9a-f]{8,64}")
_REL_NAME = re.compile(r"data/[0-9a-f]{8,64}/r[0-9]{5,9}\.(bin|index\.json)")
_VERSION = re.compile(r"[0-9]{1,4}\.[0-9]{1,4}")
BASE_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a base checkpoint: a plain sibling name (§7)
CONTENT_HASH = re.compile(r"[0-9a-f]{32}")
HASH_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,31}")  # a manifest's chunk_hash (§7): "xxh3-128", "blake2b-128"


def check_relative_name(name, what: str, file: str) -> str:
    """File names in a manifest MUST be of the form data/<save_id>/r<rank>.(bin|index.json): no absolute
    paths, no '..', no other directories."""
    if type(name) is not str or not _REL_NAME.fullmatch(name):
        _fail(f"{what} {name!r:.120} is not an allowed file name", file)
    return name


def _shape(v, what, file, key) -> tuple[int, ...]:
    v = _list(v, what, file, key)
    if len(v) > MAX_NDIM:
        _fail(f"{what} has {len(v)} dims (max {MAX_NDIM})", file, key)
    dims = tuple(_int(d, what, file, 0, MAX_NUMEL, key) for d in v)
    numel = 1
    for d in dims:
        numel *= d
        if numel > MAX_NUMEL:
            _fail(f"{what} {list(dims)} overflows the element limit", file, key)
    return dims


def _finite(text: str) -> float:
    """json's float hook: a number that overflows (1e999) would become inf, which the canonical JSON the
    checksum covers cannot express, so it is refused like the NaN/Infinity constants."""
    x = float(text)
    if not math.isfinite(x):
        raise FormatError(f"number {text:.40} is out of range")
    return x


def _load_json(data: bytes, file: str, limit: int = MAX_MANIFEST_BYTES) -> Any:
    """Manifests and indexes are UTF-8 JSON (FORMAT.md §3): json.loads would also take UTF-16/32 bytes, so
    the text is decoded strictly first."""
    if len(data) > limit:
        _fail(f"file is {len(data)} bytes, over the {limit} limit", file)
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, parse_float=_finite,
                          parse_constant=lambda c: _fail(f"constant {c} not allowed", file))
    except FormatError as e:
        if e.file is None:
            _fail(e.message, file)
        raise
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        _fail(f"not valid JSON: {e}", file)


def _check_version(obj: dict, expected_format: str, file: str) -> str:
    if obj.get("format") != expected_format:
        _fail(f"not a {expected_format} file (format={obj.get('format')!r:.40})", file)
    ver = obj.get("format_version")
    if type(ver) is not str or not _VERSION.fullmatch(ver):
        _fail(f"format_version must be 'MAJOR.MINOR', got {ver!r:.40}", file)
    if int(ver.split(".")[0]) not in SUPPORTED_MAJORS:
        raise UnsupportedVersionError(
            f"format_version {ver} is not supported (this shardckpt reads "
            f"{' and '.join(f'{m}.x' for m in SUPPORTED_MAJORS)})", file=file)
    return ver


def _major(ver: str) -> int:
    return int(ver.split(".")[0])


def _bases(obj: dict, ver: str, save_id: str, file: str) -> tuple[Base, ...]:
    """Format 2.x's table of earlier checkpoints that chunks refer to (§7); 1.x has none."""
    if _major(ver) < 2:
        return ()
    out = []
    for b in _list(obj.get("bases", []), "bases", file):
        b = _dict(b, "base entry", file)
        name, sid = b.get("dir"), b.get("save_id")
        if type(name) is not str or not BASE_DIR.fullmatch(name):
            _fail(f"base dir {name!r:.80} is not a plain sibling directory name", file)
        if type(sid) is not str or not _SAVE_ID.fullmatch(sid) or sid == save_id:
            _fail(f"base save_id {sid!r:.80} must be another save's 8-64 lowercase hex digits", file)
        if Base(name, sid) in out:
            _fail(f"base {name}/{sid} listed twice", file)
        out.append(Base(name, sid))
    return tuple(out)


_TREE_MAX_DEPTH = 64


def _check_tree(node, file: str, tensors: dict, values: dict, depth: int = 0) -> None:
    if depth > _TREE_MAX_DEPTH:
        _fail("tree is nested too deeply", file)
    node = _dict(node, "tree node", file)
    kind = node.get("t")
    if kind == "tensor" or kind == "value":
        key = _str(node.get("key"), "tree leaf key", file)
        if (kind == "tensor") != (key in tensors) or (kind == "value") != (key in values):
            _fail(f"tree leaf {kind} does not match the tensors/values tables", file, key)
    elif kind in ("dict", "list", "tuple"):
        items = _list(node.get("items"), "tree items", file)
        for item in items:
            if kind == "dict":
                item = _list(item, "dict item", file)
                if len(item) != 2 or type(item[0]) not in (str, int):
                    _fail("dict items must be [str|int key, node]", file)
                _check_tree(item[1], file, tensors, values, depth + 1)
            else:
                _check_tree(item, file, tensors, values, depth + 1)
    else:
        _fail(f"unknown tree node type {kind!r:.40}", file)


def _check_value(v, file: str, key: str, depth: int = 0) -> None:
    if depth > _TREE_MAX_DEPTH:
        _fail("value nested too deeply", file, key)
    if type(v) is not dict or "t" not in v:
        _fail("value must be a typed object", file, key)
    t = v["t"]
    if t == "none":
        return
    if t in ("bool", "int", "float", "str", "bytes"):
        expected = {"bool": bool, "int": int, "float": str, "str": str, "bytes": str}[t]
        if type(v.get("v")) is not expected:
            _fail(f"value of type {t} has a bad payload", file, key)
        # FORMAT.md §3.3: a float is float.hex(), bytes are base64; checked here so decoding cannot fail
        try:
            if t == "float":
                float.fromhex(v["v"])
            elif t == "bytes":
                base64.b64decode(v["v"], validate=True)
        except (ValueError, OverflowError, binascii.Error):
            _fail(f"value of type {t} has a payload that is not {'float.hex()' if t == 'float' else 'base64'}",
                  file, key)
        return
    if t in ("list", "tuple"):
        for x in _list(v.get("v"), "value items", file, key):
            _check_value(x, file, key, depth + 1)
        return
    if t == "dict":
        for item in _list(v.get("v"), "value items", file, key):
            if type(item) is not list or len(item) != 2 or type(item[0]) not in (str, int):
                _fail("dict value items must be [key, value]", file, key)
            _check_value(item[1], file, key, depth + 1)
        return
    if t == "dtype":
        if type(v.get("v")) is not str or v["v"] not in DTYPES:
            _fail("unknown dtype value", file, key)
        return
    _fail(f"unknown value type {t!r:.40}", file, key)


@without_gc
def parse_manifest(data: bytes, file: str = MANIFEST_NAME) -> Manifest:
    """Validate and parse manifest bytes. The checksum is verified before any other field is trusted
    (FORMAT.md §3), so a flipped byte anywhere, the version included, is a ChecksumError; then the format
    and version, then every field.

    Args:
        data: the bytes of manifest.json, as read.
        file: what error messages name as the file (callers pass the checkpoint's URL and manifest name).

    Returns:
        The Manifest. Raises ChecksumError, UnsupportedVersionError (another MAJOR) or FormatError.
    """
    obj = _dict(_load_json(data, file), "manifest", file)
    crc = obj.pop("manifest_crc32c", None)
    if type(crc) is not int:
        if obj.get("format") != FORMAT_NAME:  # only to say what the file is instead; nothing is trusted
            _fail(f"not a {FORMAT_NAME} manifest (format={obj.get('format')!r:.40})", file)
        _fail("manifest_crc32c is missing", file)
    if _ext.crc32c(canonical_json(obj)) != crc:
        raise ChecksumError("manifest checksum mismatch: the manifest is corrupt", file=file)
    ver = _check_version(obj, FORMAT_NAME, file)
    save_id = _str(obj.get("save_id"), "save_id", file)
    if not _SAVE_ID.fullmatch(save_id):
        _fail("save_id must be 8-64 lowercase hex digits", file)
    created = obj.get("created")
    if type(created) not in (int, float):
        _fail("created must be a number", file)
    world_size = _int(obj.get("world_size"), "world_size", file, 1, 1 << 24)
    frame_size = _int(obj.get("frame_size"), "frame_size", file, 1, MAX_FRAME_SIZE)
    if frame_size % 8:
        _fail("frame_size must be a multiple of 8", file)

    tensors: dict[str, TensorMeta] = {}
    for key, t in _dict(obj.get("tensors"), "tensors", file).items():
        t = _dict(t, "tensor entry", file)
        dname = t.get("dtype")
        if type(dname) is not str or dname not in DTYPES:
            _fail(f"unknown dtype {dname!r:.40}", file, key)
        layout = t.get("layout")
        if layout is not None and type(layout) is not dict:
            _fail("layout must be an object or null", file, key)
        tensors[key] = TensorMeta(key, DTYPES[dname], _shape(t.get("shape"), "shape", file, key), layout)
    values = _dict(obj.get("values"), "values", file)
    for key, v in values.items():
        if key in tensors:
            _fail("key is both a tensor and a value", file, key)
        _check_value(v, file, key)
    tree = _dict(obj.get("tree"), "tree", file)
    _check_tree(tree, file, tensors, values)

    files = []
    seen_ranks = set()
    for f in _list(obj.get("files"), "files", file):
        f = _dict(f, "file entry", file)
        rank = _int(f.get("rank"), "file rank", file, 0, world_size - 1)
        if rank in seen_ranks:
            _fail(f"rank {rank} listed twice", file)
        seen_ranks.add(rank)
        data_name = check_relative_name(f.get("data"), "data file", file)
        index_name = check_relative_name(f.get("index"), "index file", file)
        if data_name != data_file_name(save_id, rank) or index_name != index_file_name(save_id, rank):
            _fail(f"file names of rank {rank} do not match save_id {save_id}", file)
        refs = [_int(f.get(k, 0), k, file) for k in ("ref_chunks", "ref_raw_bytes", "ref_stored_bytes")] \
            if _major(ver) >= 2 else [0, 0, 0]
        files.append(FileEntry(rank, data_name, _int(f.get("data_size"), "data_size", file),
                               index_name, _int(f.get("index_size"), "index_size", file, 0, MAX_MANIFEST_BYTES),
                               _int(f.get("index_crc32c"), "index_crc32c", file, 0, 0xFFFFFFFF),
                               _int(f.get("chunks"), "chunks", file), _int(f.get("raw_bytes"), "raw_bytes", file),
                               *refs))
    user = obj.get("user_metadata", {})
    if type(user) is not dict:
        _fail("user_metadata must be an object", file)
    backend = _str(obj.get("backend", ""), "backend", file)
    return Manifest(ver, save_id, float(created), world_size, frame_size, tree, tensors, values,
                    tuple(files), user, backend, _bases(obj, ver, save_id, file), _chunk_hash(obj, ver, file))


def _chunk_hash(obj: dict, ver: str, file: str) -> str:
    """Format 2.x: the algorithm of the chunks' content hashes (§7); a 2.0 manifest names none (blake2b-128).
    An algorithm this reader does not know is accepted (loading never needs it); a save given such a base
    matches nothing in it."""
    if _major(ver) < 2:
        return ""
    name = obj.get("chunk_hash", CHUNK_HASH_2_0)
    if type(name) is not str or not HASH_NAME.fullmatch(name):
        _fail(f"chunk_hash {name!r:.40} is not a hash algorithm name", file)
    return name


@without_gc
def parse_index(data: bytes, entry: FileEntry, manifest: Manifest) -> list[Chunk]:
    """Validate one rank's index against the manifest that pins it (size and crc32c first, then version)
    and against the tensors table: boxes inside the tensor, frames back to back inside the data file.
    (Long because it checks FORMAT.md §4's record field by field, in the spec's order: one place to read
    against the spec.)

    Args:
        data: the bytes of the index file, as read.
        entry: the manifest's entry for the rank that wrote it.
        manifest: the parsed manifest (for save_id, tensors and the default frame_size).

    Returns:
        The rank's chunks in index order. Raises ChecksumError or FormatError naming the index file.
    """
    file = entry.index
    if len(data) != entry.index_size:
        _fail(f"index is {len(data)} bytes, the manifest says {entry.index_size}", file)
    if _ext.crc32c(data) != entry.index_crc32c:
        raise ChecksumError("index checksum mismatch: the index file is corrupt", file=file, rank=entry.rank)
    obj = _dict(_load_json(data, file), "index", file)
    ver = _check_version(obj, "shardckpt-index", file)
    if _major(ver) != _major(manifest.format_version):
        _fail(f"index format_version {ver} differs from the manifest's {manifest.format_version}", file)
    hashed = _major(ver) >= 2
    if obj.get("save_id") != manifest.save_id or type(obj.get("rank")) is not int or obj["rank"] != entry.rank:
        _fail("index belongs to another save or rank", file)
    raw_chunks = _list(obj.get("chunks"), "chunks", file)
    if len(raw_chunks) != entry.chunks:
        _fail(f"index has {len(raw_chunks)} chunks, the manifest says {entry.chunks}", file)
    out = []
    spans = []
    pos = 0  # the data file is its frames back to back, in index order (FORMAT.md §6)
    for c in raw_chunks:
        c = _dict(c, "chunk", file)
        key = _str(c.get("key"), "chunk key", file)
        meta = manifest.tensors.get(key)
        if meta is None:
            _fail("chunk of a key that is not in the manifest's tensors", file, key)
        offsets = _shape(c.get("offsets"), "chunk offsets", file, key)
        sizes = _shape(c.get("sizes"), "chunk sizes", file, key)
        if len(offsets) != len(meta.shape) or len(sizes) != len(meta.shape):
            _fail("chunk rank differs from the tensor's", file, key)
        if any(o + s > d for o, s, d in zip(offsets, sizes, meta.shape)):
            _fail(f"chunk {list(offsets)}+{list(sizes)} lies outside shape {list(meta.shape)}", file, key)
        codec = c.get("codec")
        if type(codec) is not str or codec not in CODECS:
            _fail(f"unknown codec {codec!r:.40}", file, key)
        nbytes = math.prod(sizes) * meta.itemsize
        F = c.get("frame_size", manifest.frame_size)
        F = _int(F, "chunk frame_size", file, 8, MAX_FRAME_SIZE, key)
        if F % 8:
            _fail("chunk frame_size must be a multiple of 8", file, key)
        frames_raw = _list(c.get("frames"), "frames", file, key)
        if len(frames_raw) != -(-nbytes // F):
            _fail(f"chunk of {nbytes} bytes needs {-(-nbytes // F)} frames, index lists {len(frames_raw)}",
                  file, key)
        digest, ref = "", None
        if hashed:
            digest = c.get("hash")
            if type(digest) is not str or not CONTENT_HASH.fullmatch(digest):
                _fail("chunk hash must be 32 lowercase hex digits (format 2.x)", file, key)
            if c.get("ref") is not None:
                ref = _reference(c["ref"], manifest, file, key)
        frames = []
        for i, fr in enumerate(frames_raw):
            if type(fr) is not list or len(fr) != 4:
                _fail("frame must be [offset, stored_len, crc32c, encoded]", file, key)
            off = _int(fr[0], "frame offset", file, key=key)
            stored = _int(fr[1], "frame length", file, 0, MAX_FRAME_SIZE * 2, key)
            crc = _int(fr[2], "frame crc32c", file, 0, 0xFFFFFFFF, key)
            if type(fr[3]) is not bool:
                _fail("frame encoded flag must be a boolean", file, key)
            raw_len = min(F, nbytes - i * F)
            if not fr[3] and stored != raw_len:
                _fail("a raw frame's stored length must equal its raw length", file, key)
            frames.append(Frame(off, stored, raw_len, crc, fr[3]))
            if ref is not None:  # in the base's data file: its own index placed it; a short file is found on read
                continue
            if off + stored > entry.data_size:
                _fail(f"frame at {off}+{stored} lies beyond the data file's {entry.data_size} bytes", file, key)
            if off != pos:
                _fail(f"frame at byte {off} of the data file, expected {pos} (frames are back to back)", file, key)
            pos += stored
            spans.append((off, stored))
        out.append(index_chunk(entry, key, offsets, sizes, codec, F, frames, digest,
                               None if ref is None else (ref[0].dir, ref[0].save_id, ref[1])))
    if pos != entry.data_size:
        _fail(f"frames end at byte {pos}, the data file has {entry.data_size}", file)
    spans.sort()
    for (a_off, a_len), (b_off, _) in zip(spans, spans[1:]):
        if a_off + a_len > b_off:
            _fail(f"frames overlap at byte {b_off} of the data file", file)
    return out


def index_chunk(entry: FileEntry, key: str, offsets: tuple, sizes: tuple, codec: str, frame_size: int, frames,
                digest: str, ref: tuple[str, str, int] | None) -> Chunk:
    """One index record as a Chunk, its fields already checked (§4): its frames are in the data file of the
    rank that wrote the index, or, for a reference (§7: the base's dir, save_id and rank), in that rank's data
    file of the base. Called by parse_index, and by saving.incremental for the records this process wrote."""
    if ref is None:
        return Chunk(key, offsets, sizes, codec, tuple(frames), entry.data, entry.rank, frame_size, "", digest)
    base_dir, save_id, rank = ref
    return Chunk(key, offsets, sizes, codec, tuple(frames), data_file_name(save_id, rank), rank, frame_size,
                 base_dir, digest)


def _reference(ref, manifest: Manifest, file: str, key: str) -> tuple[Base, int]:
    """A chunk's `ref` (§7): {"dir", "save_id", "rank"}, naming an entry of the manifest's bases table."""
    ref = _dict(ref, "chunk ref", file)
    base = Base(_str(ref.get("dir"), "ref dir", file, key), _str(ref.get("save_id"), "ref save_id", file, key))
    if base not in manifest.bases:
        _fail(f"chunk refers to {base.dir}/{base.save_id:.64}, which the manifest's bases table does not list",
              file, key)
    return base, _int(ref.get("rank"), "ref rank", file, 0, (1 << 24) - 1, key)

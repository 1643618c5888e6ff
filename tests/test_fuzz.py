"""Fuzzing (hypothesis) of everything that reads untrusted bytes: parse_manifest, parse_index (+ check_coverage)
and _ext.decode_frames on both backends. The only acceptable outcomes are a parsed result or a typed error
(CheckpointError for the parsers; ValueError for a frame table that does not fit, FrameError for bad frames
from the decoder): no other exception, no crash, no hang (a per-case deadline).

The default run uses SHARDCKPT_FUZZ_EXAMPLES (default 150) cases per target so this file stays well under a
minute; the `slow` test and `python -m bench.faults --fuzz-cases 10000` run >= 10,000 per target."""
from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt.native import kernels as _ext
from shardckpt.errors import CheckpointError
from shardckpt.format.records import canonical_json
from shardckpt.plan.geometry import check_coverage
from shardckpt.format.parse import parse_index, parse_manifest
from shardckpt.format.tree import decode_value

EXAMPLES = int(os.environ.get("SHARDCKPT_FUZZ_EXAMPLES", "150"))
FRAME = 256


# ------------------------------------------------------------------------------------------------ seeds

def _seed_checkpoint():
    """An honest checkpoint in memory: manifest bytes, index bytes per rank, and a data file, made once."""
    import tempfile
    d = tempfile.mkdtemp(prefix="shardckpt-fuzz-")
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(20, 9, generator=g), "i": torch.arange(77, dtype=torch.int32),
             "h": torch.randn(3, 4, 5, generator=g).half(), "s": torch.tensor(1.5), "e": torch.zeros(0, 4),
             "step": 4, "opt": {"betas": (0.9, 0.99), "name": "adamw", "blob": b"\x00\xff"}}
    shardckpt.save(state, d, frame_size=FRAME)
    manifest = open(os.path.join(d, "manifest.json"), "rb").read()
    m = parse_manifest(manifest)
    index = {f.rank: open(os.path.join(d, f.index), "rb").read() for f in m.files}
    return manifest, index


_SEED = None


def seed():
    global _SEED
    if _SEED is None:
        _SEED = _seed_checkpoint()
    return _SEED


def _with_crc(obj: dict) -> bytes:
    obj = dict(obj)
    obj.pop("manifest_crc32c", None)
    obj["manifest_crc32c"] = _ext.crc32c(canonical_json(obj))
    return json.dumps(obj).encode()


# ------------------------------------------------------------------------------------------------ strategies

HUGE = [-(1 << 70), -(1 << 63), -(1 << 31), -1, 0, 1, 7, 8, 255, 256, (1 << 31) - 1, 1 << 32, (1 << 62) + 1,
        1 << 63, 1 << 64, 1 << 100]
json_scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(HUGE), st.integers(-1000, 1000),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                         st.sampled_from(["../../etc/passwd", "/etc/passwd", "data/../x", "zstd/2", "lz4/1",
                                          "2.0", "1.9", "float128", "tensor", "value", "dict", "list", "tuple",
                                          "raw/1", "zstd/1", "zstd-byteplane/1", "shardckpt", "shardckpt-index"]))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), kids,
                                                                                max_size=4)), max_leaves=12)


def _paths(obj, prefix=()):
    """Every (container path) in a JSON tree, for picking a mutation site."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(obj, draw_choice, draw_value, n: int):
    """Apply n random edits (replace, delete, insert, duplicate) at random places of a JSON tree."""
    obj = copy.deepcopy(obj)
    for _ in range(n):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        path = draw_choice(paths)
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        op = draw_choice(["replace", "replace", "replace", "delete", "dup", "insert"])
        if op == "replace":
            parent[last] = draw_value()
        elif op == "delete":
            del parent[last]
        elif op == "dup" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        elif op == "insert":
            if isinstance(parent, dict):
                parent[f"x{len(parent)}"] = draw_value()
            else:
                parent.insert(last, draw_value())
    return obj


# ------------------------------------------------------------------------------------------------ targets

def fuzz_manifest_bytes(data: bytes) -> None:
    try:
        parse_manifest(data)
    except CheckpointError:
        pass


def fuzz_manifest_structured(data) -> None:
    manifest, index = seed()
    obj = json.loads(manifest)
    n = data.draw(st.integers(1, 4))
    bad = _mutate(obj, lambda xs: data.draw(st.sampled_from(xs)), lambda: data.draw(json_values), n)
    raw = _with_crc(bad)  # the attacker recomputes the checksum, so validation goes past it
    try:
        m = parse_manifest(raw)
    except CheckpointError:
        return
    except (TypeError, KeyError, AttributeError, ValueError, RecursionError) as e:
        raise AssertionError(f"untyped {type(e).__name__} from parse_manifest: {e}") from e
    # values that pass validation must decode (load does not validate them again)
    try:
        for v in m.values.values():
            decode_value(v)
    except Exception as e:
        raise AssertionError(f"a value that parse_manifest accepted does not decode: {e!r}") from e
    # a manifest that parses must also be safe to plan a load from
    for f in m.files:
        if f.rank in index:
            _parse_index_safely(index[f.rank], f, m)


def _parse_index_safely(data: bytes, entry, manifest) -> None:
    try:
        chunks = parse_index(data, entry, manifest)
        by_key = {}
        for c in chunks:
            by_key.setdefault(c.key, []).append(c)
        for key, meta in manifest.tensors.items():
            check_coverage(meta, by_key.get(key, []))
    except CheckpointError:
        pass


def fuzz_index_structured(data) -> None:
    manifest, index = seed()
    m = parse_manifest(manifest)
    entry = m.files[0]
    obj = json.loads(index[entry.rank])
    n = data.draw(st.integers(1, 4))
    bad = _mutate(obj, lambda xs: data.draw(st.sampled_from(xs)), lambda: data.draw(json_values), n)
    raw = canonical_json(bad)
    # the attacker also rewrites the manifest's pins (size, crc, chunk count) so validation goes past them
    entry = replace(entry, index_size=len(raw), index_crc32c=_ext.crc32c(raw),
                    chunks=len(bad.get("chunks", [])) if isinstance(bad.get("chunks"), list) else entry.chunks)
    if data.draw(st.booleans()):
        entry = replace(entry, data_size=data.draw(st.sampled_from([0, 1, entry.data_size, 1 << 40, 1 << 62])))
    try:
        _parse_index_safely(raw, entry, m)
    except (TypeError, KeyError, AttributeError, ValueError, IndexError, RecursionError, OverflowError) as e:
        raise AssertionError(f"untyped {type(e).__name__} from parse_index: {e}") from e


def _encoded_case(rng: random.Random, codec: int, itemsize: int):
    n = rng.randrange(0, 6 * FRAME // itemsize) * itemsize
    kind = rng.randrange(3)
    raw = (np.zeros(n, np.uint8) if kind == 0 else np.frombuffer(rng.randbytes(n), np.uint8).copy()
           if kind == 1 else (np.arange(n) % 7).astype(np.uint8))
    k = _ext.backend("python")
    out = np.empty(k.encode_bound(max(n, 1), FRAME, codec), np.uint8)
    table = k.encode_frames(raw, out, FRAME, itemsize, codec, 1, 1)
    stored = sum(t[1] for t in table)
    frames = [[off, ln, min(FRAME, n - i * FRAME), crc, enc] for i, (off, ln, crc, enc) in enumerate(table)]
    return out[:stored].copy(), frames, n


def fuzz_decode(backend: str, data) -> None:
    """Mutated tables and bytes of a real encoding, or random ones, against one backend's decode_frames."""
    k = _ext.backend(backend)
    codec = data.draw(st.sampled_from([_ext.CODEC_RAW, _ext.CODEC_ZSTD, _ext.CODEC_ZSTD_BYTEPLANE]))
    itemsize = data.draw(st.sampled_from([1, 2, 4, 8]))
    if data.draw(st.integers(0, 3)):
        src, frames, n = _encoded_case(random.Random(data.draw(st.integers(0, 1 << 30))), codec, itemsize)
        for _ in range(data.draw(st.integers(0, 3))):
            what = data.draw(st.sampled_from(["byte", "field", "drop", "dup", "cut"]))
            if what == "byte" and len(src):
                i = data.draw(st.integers(0, len(src) - 1))
                src[i] ^= data.draw(st.integers(1, 255))
            elif what == "field" and frames:
                f = frames[data.draw(st.integers(0, len(frames) - 1))]
                j = data.draw(st.integers(0, 4))
                f[j] = data.draw(st.booleans()) if j == 4 else data.draw(st.sampled_from(HUGE) | st.integers(-9, 2 * FRAME))
            elif what == "drop" and frames:
                frames.pop(data.draw(st.integers(0, len(frames) - 1)))
            elif what == "dup" and frames:
                frames.append(list(frames[data.draw(st.integers(0, len(frames) - 1))]))
            elif what == "cut" and len(src):
                src = src[:data.draw(st.integers(0, len(src)))]
        dst_n = data.draw(st.sampled_from([n, n, max(0, n - 1), n + 8, 0]))
    else:
        src = np.frombuffer(data.draw(st.binary(max_size=600)), np.uint8).copy()
        frames = data.draw(st.lists(st.tuples(st.sampled_from(HUGE) | st.integers(0, 700),
                                              st.sampled_from(HUGE) | st.integers(0, 700),
                                              st.sampled_from(HUGE) | st.integers(0, 1200),
                                              st.sampled_from(HUGE) | st.integers(0, 0xFFFFFFFF), st.booleans()),
                                    max_size=5))
        dst_n = data.draw(st.integers(0, 1500))
    dst = np.zeros(dst_n, np.uint8)
    try:
        k.decode_frames(src, [tuple(f) for f in frames], dst, itemsize, codec, data.draw(st.sampled_from([1, 2])))
    except (ValueError, _ext.FrameError):
        pass


# ------------------------------------------------------------------------------------------------ runners

def _settings(n: int):
    return settings(max_examples=n, deadline=2000, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def run_target(name: str, n: int) -> int:
    """Run one fuzz target for n cases; returns the number of cases run. Used by tests and bench/faults."""
    count = [0]

    def counted(fn):
        def inner(x):
            count[0] += 1
            fn(x)
        return inner

    if name == "manifest_bytes":
        m = seed()[0]
        flipped = st.builds(_flip, st.just(m), st.lists(st.tuples(st.integers(0, len(m) - 1), st.integers(1, 255)),
                                                        min_size=1, max_size=3))
        cut = st.integers(0, len(m)).map(lambda n: m[:n])
        test = given(st.one_of(st.binary(max_size=400), flipped, cut))(counted(fuzz_manifest_bytes))
    elif name == "manifest_structured":
        test = given(st.data())(counted(fuzz_manifest_structured))
    elif name == "index_structured":
        test = given(st.data())(counted(fuzz_index_structured))
    elif name.startswith("decode_"):
        backend = name.split("_", 1)[1]
        test = given(st.data())(counted(lambda d: fuzz_decode(backend, d)))
    else:
        raise ValueError(name)
    _settings(n)(test)()
    return count[0]


def _flip(b: bytes, edits) -> bytes:
    out = bytearray(b)
    for pos, mask in edits:
        out[pos] ^= mask
    return bytes(out)


TARGETS = ["manifest_bytes", "manifest_structured", "index_structured", "decode_python", "decode_native"]


def _need(name):
    if name == "decode_native":
        try:
            _ext.backend("native")
        except ImportError as e:
            pytest.skip(f"native backend unavailable: {e}")


@pytest.mark.parametrize("name", TARGETS)
def test_fuzz(name):
    _need(name)
    assert run_target(name, EXAMPLES) >= min(EXAMPLES, 50)


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_10k(name):
    if not os.environ.get("SHARDCKPT_SLOW"):
        pytest.skip("set SHARDCKPT_SLOW=1 (or run python -m bench.faults) for 10,000 cases per target")
    _need(name)
    assert run_target(name, 10_000) >= 10_000

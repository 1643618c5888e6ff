"""Hostile checkpoints: manifests and indexes crafted to escape the directory, overflow sizes, overlap or name
unknown codecs/versions, each with a valid checksum (an attacker recomputes it). Every one MUST raise a
typed CheckpointError before any file outside the checkpoint directory is opened and before any buffer larger
than the honest checkpoint needs is allocated. Also: no pickle or eval on the load path."""
from __future__ import annotations

import ast
import builtins
import contextlib
import copy
import importlib.util
import json
import os
import pathlib
import pickle
import pkgutil
import shutil

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt.native import kernels as _ext
from shardckpt.errors import (ChecksumError, CheckpointError, CorruptDataError, FormatError, ShapeMismatchError,
    UnsupportedVersionError)
from shardckpt.format.records import canonical_json

PKG = pathlib.Path(shardckpt.__file__).parent
ALLOC_LIMIT = 1 << 20  # the honest checkpoint below needs a few KiB


def _state():
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(16, 8, generator=g), "v": torch.arange(10, dtype=torch.int64) * 977,
            "h": torch.randn(12, 4, generator=g).half(), "step": 3, "name": "adam", "s": torch.tensor(2.5)}


class Ckpt:
    """A checkpoint on disk whose manifest and indexes can be rewritten with valid checksums."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.manifest = json.loads((path / "manifest.json").read_bytes())
        self.manifest.pop("manifest_crc32c")
        self.index = {f["rank"]: json.loads((path / f["index"]).read_bytes()) for f in self.manifest["files"]}
        self._orig = {r: canonical_json(i) for r, i in self.index.items()}

    def write(self, *, raw_manifest: bytes | None = None):
        m = copy.deepcopy(self.manifest)
        for f in m["files"]:
            if f.get("rank") in self.index and canonical_json(self.index[f["rank"]]) != self._orig[f["rank"]]:
                data = canonical_json(self.index[f["rank"]])
                target = self.path / f["index"]
                if target.resolve().is_relative_to(self.path.resolve()) and target.parent.exists():
                    target.write_bytes(data)
                f["index_size"], f["index_crc32c"] = len(data), _ext.crc32c(data)
        m["manifest_crc32c"] = _ext.crc32c(canonical_json(m))
        (self.path / "manifest.json").write_bytes(raw_manifest if raw_manifest is not None else
                                                  json.dumps(m).encode())

    @property
    def chunks(self):
        return self.index[0]["chunks"]

    def chunk(self, key):
        return next(c for c in self.chunks if c["key"] == key)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    p = tmp_path_factory.mktemp("honest") / "ckpt"
    shardckpt.save(_state(), p, frame_size=64)
    return p


@pytest.fixture
def ck(honest, tmp_path):
    p = tmp_path / "ckpt"
    shutil.copytree(honest, p)
    return Ckpt(p)


@contextlib.contextmanager
def guarded(root: pathlib.Path):
    """Fail on any open() outside `root` or any numpy/torch allocation over ALLOC_LIMIT while loading."""
    root = os.path.realpath(root)
    seen = {"opened": [], "alloc": 0}
    real_open, real_os_open = builtins.open, os.open
    real_np_empty, real_torch_empty = np.empty, torch.empty

    def check_path(p):
        if isinstance(p, int):
            return
        rp = os.path.realpath(os.fspath(p))
        seen["opened"].append(rp)
        assert rp == root or rp.startswith(root + os.sep), f"opened {rp} outside the checkpoint"

    def nbytes(shape, dtype):
        n = 1
        for d in (shape if isinstance(shape, (tuple, list)) else (shape,)):
            n *= int(d)
        return n * (dtype.itemsize if isinstance(dtype, torch.dtype) else np.dtype(dtype or float).itemsize)

    def g_open(p, *a, **k):
        check_path(p)
        return real_open(p, *a, **k)

    def g_os_open(p, *a, **k):
        check_path(p)
        return real_os_open(p, *a, **k)

    def g_np_empty(shape, dtype=float, *a, **k):
        n = nbytes(shape, dtype)
        seen["alloc"] = max(seen["alloc"], n)
        assert n <= ALLOC_LIMIT, f"allocation of {n} bytes from a hostile checkpoint"
        return real_np_empty(shape, dtype, *a, **k)

    def g_torch_empty(*shape, dtype=None, **k):
        shp = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        n = nbytes(tuple(shp), dtype or torch.float32)
        seen["alloc"] = max(seen["alloc"], n)
        assert n <= ALLOC_LIMIT, f"allocation of {n} bytes from a hostile checkpoint"
        return real_torch_empty(*shape, dtype=dtype, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(builtins, "open", g_open)
    mp.setattr(os, "open", g_os_open)
    mp.setattr("shardckpt.loading.reader.np.empty", g_np_empty)
    mp.setattr("shardckpt.saving.pipeline.torch.empty", g_torch_empty)
    try:
        yield seen
    finally:
        mp.undo()


def _load_both(path):
    """load_full, then an in-place load into a fresh state of the honest shapes."""
    errors = []
    for fn in (lambda: shardckpt.load_full(path), lambda: shardckpt.load(_state(), path)):
        try:
            fn()
            errors.append(None)
        except CheckpointError as e:
            errors.append(e)
    return errors


SID = "0" * 32


def _set_file(name, value):
    def f(ck):
        ck.manifest["files"][0][name] = value
    return f


def _tensor(key, field, value):
    def f(ck):
        ck.manifest["tensors"][key][field] = value
    return f


def _chunk(key, field, value):
    def f(ck):
        ck.chunk(key)[field] = value
    return f


def _frame(key, i, j, value):
    def f(ck):
        ck.chunk(key)["frames"][i][j] = value
    return f


def _top(field, value):
    def f(ck):
        ck.manifest[field] = value
    return f


def _swap_frames(ck):
    fr = ck.chunk("w")["frames"]
    fr[0], fr[1] = fr[1], fr[0]


def _gap_frames(ck):
    """Frames of a chunk spread over a (claimed) huge file: a reader would fetch the gap."""
    fr = ck.chunk("w")["frames"]
    fr[-1][0] += 1 << 40
    ck.manifest["files"][0]["data_size"] += 1 << 40


def _overlap_chunks(ck):
    """Two chunks of "v" that overlap but sum to its numel: [0:6] and [4:8] plus [8:10] -> 6+4 = 10."""
    c = ck.chunk("v")
    whole = c["frames"]
    a = dict(c, offsets=[0], sizes=[6], frames=[[whole[0][0], 48, 0, False]])
    b = dict(c, offsets=[4], sizes=[4], frames=[[whole[0][0] + 48, 32, 0, False]])
    ck.index[0]["chunks"] = [x for x in ck.chunks if x["key"] != "v"] + [a, b]
    _repack(ck)


def _duplicate_chunk(ck):
    c = ck.chunk("s")
    ck.index[0]["chunks"].append(copy.deepcopy(c))
    _repack(ck)


def _repack(ck):
    """Make frame offsets back to back again after chunks were edited, and fix chunk count and data_size."""
    pos = 0
    for c in ck.chunks:
        for fr in c["frames"]:
            fr[0] = pos
            pos += fr[1]
    ck.manifest["files"][0]["chunks"] = len(ck.chunks)
    ck.manifest["files"][0]["data_size"] = pos


def _deep_tree(ck):
    node = {"t": "tensor", "key": "w"}
    for _ in range(200):
        node = {"t": "list", "items": [node]}
    ck.manifest["tree"] = node


def _deep_value(ck):
    v = {"t": "none"}
    for _ in range(200):
        v = {"t": "list", "v": [v]}
    ck.manifest["values"]["step"] = v


def _pickle_value(ck):
    ck.manifest["values"]["step"] = {"t": "pickle", "v": pickle.dumps(object).hex()}


def _index_rank_bool(ck):
    """rank true == 1 in Python: an index of rank 0 claiming `true` must not pass for rank 1's (or 0's)."""
    ck.index[0]["rank"] = False


def _rank_twice(ck):
    ck.manifest["files"].append(copy.deepcopy(ck.manifest["files"][0]))


HOSTILE = {
    # file names: traversal, absolute, other directories, other save ids
    "data_traversal": (_set_file("data", "../../../../etc/passwd"), FormatError),
    "data_absolute": (_set_file("data", "/etc/passwd"), FormatError),
    "index_traversal": (_set_file("index", "data/../../../../etc/hostname"), FormatError),
    "index_absolute": (_set_file("index", "/etc/hostname"), FormatError),
    "index_dotdot_id": (_set_file("index", "data/../r00000.index.json"), FormatError),
    "data_other_save": (_set_file("data", f"data/{SID}/r00000.bin"), FormatError),
    "data_nul": (_set_file("data", "data/x\x00/r00000.bin"), FormatError),
    "data_not_str": (_set_file("data", ["data"]), FormatError),
    # sizes and offsets
    "data_size_negative": (_set_file("data_size", -1), FormatError),
    "data_size_huge": (_set_file("data_size", 1 << 80), FormatError),
    "data_size_float": (_set_file("data_size", 1.5), FormatError),
    "index_size_negative": (_set_file("index_size", -5), FormatError),
    "index_size_huge": (_set_file("index_size", 1 << 40), FormatError),
    "rank_negative": (_set_file("rank", -1), FormatError),
    "rank_beyond_world": (_set_file("rank", 5), FormatError),
    "rank_twice": (_rank_twice, FormatError),
    "frame_offset_negative": (_frame("w", 0, 0, -64), FormatError),
    "frame_offset_huge": (_frame("w", 0, 0, 1 << 70), FormatError),
    "frame_len_negative": (_frame("w", 0, 1, -1), FormatError),
    "frame_len_huge": (_frame("w", 0, 1, 1 << 40), FormatError),
    "frame_crc_huge": (_frame("w", 0, 2, 1 << 33), FormatError),
    "frame_flag_not_bool": (_frame("w", 0, 3, 1), FormatError),
    "frames_swapped": (_swap_frames, FormatError),
    "frames_gap": (_gap_frames, FormatError),
    "frames_missing": (lambda ck: ck.chunk("w")["frames"].pop(), FormatError),
    "world_size_zero": (_top("world_size", 0), FormatError),
    "frame_size_zero": (_top("frame_size", 0), FormatError),
    "frame_size_odd": (_top("frame_size", 60), FormatError),
    "frame_size_huge": (_top("frame_size", 1 << 40), FormatError),
    # shapes and boxes
    "shape_negative": (_tensor("w", "shape", [-16, 8]), FormatError),
    "shape_overflow": (_tensor("w", "shape", [1 << 25, 1 << 25, 1 << 25]), FormatError),
    "shape_huge_dim": (_tensor("w", "shape", [1 << 62]), FormatError),
    "shape_many_dims": (_tensor("w", "shape", [1] * 100), FormatError),
    "shape_not_int": (_tensor("w", "shape", ["16", 8]), FormatError),
    "shape_bool": (_tensor("w", "shape", [True, 8]), FormatError),
    "shape_large_uncovered": (_tensor("w", "shape", [1 << 20, 1 << 20]), (FormatError, ShapeMismatchError)),
    "chunk_outside": (_chunk("w", "offsets", [8, 0]), FormatError),
    "chunk_offset_negative": (_chunk("w", "offsets", [-1, 0]), FormatError),
    "chunk_wrong_ndim": (_chunk("w", "sizes", [16, 8, 1]), FormatError),
    "chunks_overlap": (_overlap_chunks, FormatError),
    "chunk_duplicate_0d": (_duplicate_chunk, FormatError),
    "chunk_unknown_key": (_chunk("w", "key", "nope"), FormatError),
    # codecs, dtypes, versions
    "codec_unknown": (_chunk("w", "codec", "lz4/1"), FormatError),
    "codec_future_version": (_chunk("w", "codec", "zstd/2"), FormatError),
    "dtype_unknown": (_tensor("w", "dtype", "float128"), FormatError),
    "dtype_object": (_tensor("w", "dtype", "object"), FormatError),
    "version_major": (_top("format_version", "3.0"), UnsupportedVersionError),
    "version_garbage": (_top("format_version", "1.0; rm -rf /"), FormatError),
    "version_missing": (lambda ck: ck.manifest.pop("format_version"), FormatError),
    "format_other": (_top("format", "safetensors"), FormatError),
    "index_version_major": (lambda ck: ck.index[0].update(format_version="9.0"), UnsupportedVersionError),
    "index_other_save": (lambda ck: ck.index[0].update(save_id=SID), FormatError),
    # tree and values: closed set of types, bounded depth
    "tree_deep": (_deep_tree, FormatError),
    "value_deep": (_deep_value, FormatError),
    "value_pickle": (_pickle_value, FormatError),
    "value_float_not_hex": (lambda ck: ck.manifest["values"].update(step={"t": "float", "v": "0x1.zz"}),
                            FormatError),
    "value_bytes_not_base64": (lambda ck: ck.manifest["values"].update(step={"t": "bytes", "v": "a!b"}),
                               FormatError),
    "backend_not_str": (_top("backend", ["native"]), FormatError),
    "version_trailing_newline": (_top("format_version", "1.0\n"), FormatError),
    "save_id_trailing_newline": (_top("save_id", "e" * 32 + "\n"), FormatError),
    "index_rank_bool": (_index_rank_bool, FormatError),
    "tree_unknown_node": (_top("tree", {"t": "eval", "src": "__import__('os')"}), FormatError),
    "save_id_traversal": (_top("save_id", "../../etc"), FormatError),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_manifest_rejected_before_io_or_alloc(ck, name):
    mutate, expected = HOSTILE[name]
    mutate(ck)
    ck.write()
    with guarded(ck.path) as seen:
        errors = _load_both(ck.path)
    for e in errors:
        assert isinstance(e, expected), f"{name}: expected {expected}, got {e!r}"
        assert e.file, f"{name}: error names no file"
    assert seen["alloc"] <= ALLOC_LIMIT


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"format": NaN}', b"[" * 100000,
                                 b'{"a":' * 50000, b"1e999999", json.dumps({"format": "shardckpt"}).encode()])
def test_garbage_manifest_bytes(ck, raw):
    (ck.path / "manifest.json").write_bytes(raw)
    with guarded(ck.path):
        errors = _load_both(ck.path)
    assert all(isinstance(e, FormatError) for e in errors), errors


def test_any_flipped_byte_before_the_checksum_is_checked_is_checksum_error(ck):
    """FORMAT.md §3: the checksum is verified before any other field is trusted, so a flipped version digit
    or format name is reported as corruption, not as a newer version or another format."""
    honest = (ck.path / "manifest.json").read_bytes()
    for old, new in [(b'"1.0"', b'"3.0"'), (b'"1.0"', b'"9.0"'), (b'"shardckpt"', b'"shardckpx"')]:
        assert honest.count(old) == 1
        (ck.path / "manifest.json").write_bytes(honest.replace(old, new))
        with guarded(ck.path):
            errors = _load_both(ck.path)
        assert all(type(e) is ChecksumError and e.file for e in errors), (new, errors)


def test_manifest_must_be_utf8(ck):
    """json.loads takes UTF-16/32 bytes too; FORMAT.md §3 says UTF-8, whatever the checksum says."""
    m = copy.deepcopy(ck.manifest)
    m["manifest_crc32c"] = _ext.crc32c(canonical_json(m))
    for encoding in ("utf-16", "utf-32"):
        (ck.path / "manifest.json").write_bytes(json.dumps(m).encode(encoding))
        with guarded(ck.path):
            errors = _load_both(ck.path)
        assert all(isinstance(e, FormatError) and e.file for e in errors), (encoding, errors)


def test_number_that_overflows_to_infinity_is_format_error(ck):
    """1e999 parses as inf, which canonical JSON cannot express: a typed error, not a ValueError."""
    raw = json.dumps(dict(ck.manifest, manifest_crc32c=1)).replace('"created": ', '"created": 1e999, "x": ')
    (ck.path / "manifest.json").write_bytes(raw.encode())
    with guarded(ck.path):
        errors = _load_both(ck.path)
    assert all(isinstance(e, FormatError) and e.file for e in errors), errors


def test_wrong_checksum_is_checksum_error(ck):
    ck.manifest["user_metadata"] = {"evil": True}
    m = copy.deepcopy(ck.manifest)
    m["manifest_crc32c"] = 12345
    (ck.path / "manifest.json").write_bytes(json.dumps(m).encode())
    with guarded(ck.path):
        errors = _load_both(ck.path)
    assert all(isinstance(e, ChecksumError) for e in errors)


def test_data_file_shorter_than_manifest_says_names_key_and_file(ck):
    data = ck.path / ck.manifest["files"][0]["data"]
    data.write_bytes(data.read_bytes()[:-3])
    errors = _load_both(ck.path)
    for e in errors:
        assert isinstance(e, CorruptDataError) and e.key and e.file == ck.manifest["files"][0]["data"], e
    data.unlink()
    for e in _load_both(ck.path):
        assert isinstance(e, CorruptDataError) and "missing" in str(e) and e.key and e.file, e


def test_data_file_replaced_by_symlink_outside_is_not_followed_silently(ck, tmp_path):
    """A data file swapped for a symlink to another file fails its frame checksums (it is read, never trusted)."""
    data = ck.path / ck.manifest["files"][0]["data"]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(os.urandom(data.stat().st_size))
    data.unlink()
    data.symlink_to(outside)
    errors = _load_both(ck.path)
    assert all(isinstance(e, (ChecksumError, CorruptDataError)) and e.key for e in errors), errors


def test_honest_checkpoint_passes_the_guard(honest):
    with guarded(honest) as seen:
        out = shardckpt.load_full(honest)
    ref = _state()
    assert torch.equal(out["w"], ref["w"]) and out["name"] == "adam" and seen["opened"]


# ------------------------------------------------------------------------------------- no pickle, no eval

def _package_modules() -> list[str]:
    """Every Python module of the package, found by pkgutil: a module added tomorrow is checked too."""
    names = [m.name for m in pkgutil.walk_packages(shardckpt.__path__, "shardckpt.")]
    return sorted(n for n in names if importlib.util.find_spec(n).origin.endswith(".py"))


MODULES = _package_modules()
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def _restricted_unpickler_only(tree: ast.Module) -> bool:
    """The one allowed use of pickle (importers, for a DCP `.metadata` file): the module touches nothing of
    pickle but Unpickler/UnpicklingError, and every Unpickler subclass overrides find_class (an allow-list)."""
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "pickle"}
    subclasses = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                  and any(isinstance(b, ast.Attribute) and b.attr == "Unpickler" for b in n.bases)]
    return (used <= {"Unpickler", "UnpicklingError"} and bool(subclasses)
            and all(any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in c.body)
                    for c in subclasses))


def test_every_module_is_checked():
    assert {"shardckpt.api", "shardckpt.format.records", "shardckpt.loading.state", "shardckpt.integrations.dcp",
            "shardckpt.storage.local"} <= set(MODULES), MODULES


@pytest.mark.parametrize("module", MODULES)
def test_no_pickle_or_eval_in_package_source(module):
    """No pickle (but a restricted unpickler), no eval/exec, and torch.load only with weights_only=True."""
    tree = ast.parse(pathlib.Path(importlib.util.find_spec(module).origin).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = {a.name.split(".")[0] for a in node.names} & FORBIDDEN_IMPORTS
            assert bad <= {"pickle"} and (not bad or _restricted_unpickler_only(tree)), \
                f"{module}:{node.lineno} imports {bad}"
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in FORBIDDEN_IMPORTS, f"{module}:{node.lineno}"
            assert not (node.module == "torch" and any(a.name == "load" for a in node.names)), \
                f"{module}:{node.lineno} imports torch.load"
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):  # the builtins; re.compile and friends are attribute calls
                assert f.id not in FORBIDDEN_CALLS, f"{module}:{node.lineno} calls {f.id}"
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                    and f.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                assert safe, f"{module}:{node.lineno} calls torch.load without weights_only=True (pickle)"


def test_no_unpickling_at_runtime_during_load(honest, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used on the load path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(builtins, "eval", refuse)
    out = shardckpt.load_full(honest)
    st = _state()
    shardckpt.load(st, honest)
    assert out["step"] == 3 and st["name"] == "adam"


def test_unsupported_value_types_are_refused_not_pickled(tmp_path):
    class Opaque:
        pass

    for bad in (Opaque(), {1, 2}, lambda: 0, object()):
        with pytest.raises(shardckpt.UnsupportedValueError):
            shardckpt.save({"x": bad, "t": torch.zeros(2)}, tmp_path / f"c{id(bad)}")

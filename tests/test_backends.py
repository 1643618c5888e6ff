"""The native kernels and the pure-Python twin write the same files and read each other's."""
from __future__ import annotations

import pytest
import torch

import shardckpt
from shardckpt.native import kernels as _ext

try:
    _ext.backend("native")
    HAVE_NATIVE = True
except ImportError:
    HAVE_NATIVE = False

pytestmark = pytest.mark.skipif(not HAVE_NATIVE, reason="native module not built")


def _use(monkeypatch, name):
    impl = _ext.backend(name)
    for fn in _ext._API:
        monkeypatch.setattr(_ext, fn, getattr(impl, fn))


def _state():
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(700, 300, generator=g).bfloat16(), "f": torch.randn(5000, generator=g),
            "i": torch.randint(0, 9, (999,), generator=g), "d": torch.randn(33, 7, generator=g).double()}


@pytest.mark.parametrize("codec", ["raw", "zstd-byteplane", "zstd"])
def test_native_and_twin_write_identical_files_and_read_each_other(tmp_path, monkeypatch, codec):
    files = {}
    for name in ("native", "python"):
        _use(monkeypatch, name)
        path = tmp_path / name
        shardckpt.save(_state(), path, codec=codec, frame_size=64 << 10)
        files[name] = [p.read_bytes() for p in sorted((path / "data").rglob("*.bin"))]
    same_zstd = _ext.backend("native").ZSTD_SOURCE.split()[1:2] == _ext.backend("python").ZSTD_SOURCE.split()[1:2]
    if codec == "raw" or same_zstd:
        assert files["native"] == files["python"]
    for reader in ("native", "python"):
        _use(monkeypatch, reader)
        for writer in ("native", "python"):
            out = shardckpt.load_full(tmp_path / writer)
            for k, v in _state().items():
                assert torch.equal(out[k], v), (reader, writer, k)


def test_native_and_twin_write_identical_incremental_checkpoints(tmp_path, monkeypatch):
    """Content hashes (XXH3-128: libxxhash natively, the xxhash package in the twin) and the references they
    decide are the same on both backends: same data files, same index entries (save ids aside)."""
    import json

    def chunks(path):
        m = shardckpt.read_manifest(path)
        out = json.loads((path / m.files[0].index).read_text())["chunks"]
        for c in out:
            if "ref" in c:
                c["ref"].pop("save_id")
        return m, out

    seen = {}
    for name in ("native", "python"):
        _use(monkeypatch, name)
        st = _state()
        shardckpt.save(st, tmp_path / name / "a", codec="raw", frame_size=64 << 10, content_hash=True)
        st["f"][17] += 1
        shardckpt.save(st, tmp_path / name / "b", codec="raw", frame_size=64 << 10, base=tmp_path / name / "a")
        data = [p.read_bytes() for step in "ab" for p in sorted((tmp_path / name / step / "data").rglob("*.bin"))]
        (ma, ca), (mb, cb) = chunks(tmp_path / name / "a"), chunks(tmp_path / name / "b")
        assert ma.chunk_hash == mb.chunk_hash == "xxh3-128"
        assert {c["key"] for c in cb if "ref" in c} == {"w", "i", "d"}
        seen[name] = (data, ca, cb)
        out = shardckpt.load_full(tmp_path / name / "b")
        assert all(torch.equal(out[k], v) for k, v in st.items())
    assert seen["native"] == seen["python"]

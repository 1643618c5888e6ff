"""Golden checkpoints: every format version ever written keeps loading, bit-exactly, and every golden's
manifest and index files conform to docs/manifest.schema.json (as does what the code writes today)."""
from __future__ import annotations

import copy
import glob
import json
import math
import os
import re

import pytest
import torch

import shardckpt
from golden.json_schema import validate
from golden.make_golden import (TWO_RANK_TENSORS, TWO_RANK_VALUES, formula_tensor, golden_2ranks_state,
                                golden_state)

HERE = os.path.join(os.path.dirname(__file__), "golden")
SCHEMA = json.load(open(os.path.join(os.path.dirname(__file__), "..", "docs", "manifest.schema.json")))
GOLDENS = sorted(d for d in os.listdir(HERE) if re.fullmatch(r"v[0-9]+\.[0-9]+(-2ranks)?", d))
VERSIONS = [d for d in GOLDENS if "-" not in d]
TWO_RANKS = [d for d in GOLDENS if d.endswith("-2ranks")]


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_loads_bit_exact(version):
    path = os.path.join(HERE, version)
    assert _equal(shardckpt.load_full(path), golden_state())
    m = shardckpt.read_manifest(path)
    assert m.format_version == version[1:] and m.user_metadata == {"golden": True}
    st = golden_state()
    for t in [st["model"]["embed.weight"], st["tokens"]]:
        t.zero_()
    st["step"] = 0
    shardckpt.load(st, path)
    assert _equal(st, golden_state())


def test_golden_exists_for_current_version():
    assert f"v{shardckpt.FORMAT_VERSION}" in VERSIONS
    assert f"v{shardckpt.FORMAT_VERSION}-2ranks" in TWO_RANKS


def test_incremental_golden_exists_for_current_version():
    from shardckpt.format.records import FORMAT_VERSION_INCREMENTAL
    assert os.path.isdir(os.path.join(HERE, f"v{FORMAT_VERSION_INCREMENTAL}-incremental"))  # tests/test_incremental.py


def test_formula_is_what_it_says():
    """The expected values come from the formula, so pin the formula itself to a few hand-computed elements
    (k = (5 i + 3 seed) mod 17 - 8, value k / 4): a change to it cannot silently move both sides at once."""
    w = formula_tensor((32, 16), torch.float32, 1).flatten()
    assert [w[i].item() for i in (0, 1, 3)] == [(3 % 17 - 8) / 4, (8 % 17 - 8) / 4, (18 % 17 - 8) / 4]
    b = formula_tensor((600,), torch.uint8, 4)
    assert b[0].item() == (12 % 17 - 8) % 256 and b[1].item() == (17 % 17 - 8) % 256


@pytest.mark.parametrize("golden", TWO_RANKS)
def test_two_rank_golden_loads_bit_exact(golden):
    """Two ranks' files, DTensor shards along dim 0 and dim 1, raw/1 chunks beside zstd ones: load_full
    and an in-place load into full-size tensors both give the formula's bytes."""
    path = os.path.join(HERE, golden)
    m = shardckpt.read_manifest(path)
    assert m.world_size == 2 and sorted(f.rank for f in m.files) == [0, 1]
    assert m.user_metadata == {"golden": True, "ranks": 2}
    codecs = {c["codec"] for f in m.files for c in json.load(open(os.path.join(path, f.index)))["chunks"]}
    assert codecs == {"raw/1", "zstd/1", "zstd-byteplane/1"}, codecs
    expected = golden_2ranks_state()
    assert _equal(shardckpt.load_full(path), expected)
    for key, (shape, dtype, _, placement) in TWO_RANK_TENSORS.items():
        assert m.tensors[key].dtype == dtype and m.tensors[key].shape == shape
        assert (m.tensors[key].layout is None) == (placement is None), key
    st = golden_2ranks_state()
    for group in ("model", "raw"):
        for t in st[group].values():
            t.zero_()
    st.update(epoch=0, lr=0.0, name="", blob=b"", dtype=torch.float32, betas=(0.0, 0.0))
    st["nested"]["a"][0] = 99
    shardckpt.load(st, path)
    assert _equal(st, expected)
    assert isinstance(st["betas"], tuple) and st["dtype"] is torch.bfloat16 and st["nested"][7] == "int key"


# ------------------------------------------------------------------------------------------------ schema

def _checkpoint_files(path):
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    indexes = [json.load(open(os.path.join(path, f["index"]))) for f in manifest["files"]]
    return manifest, indexes


@pytest.mark.parametrize("golden", GOLDENS)
def test_golden_conforms_to_schema(golden):
    manifest, indexes = _checkpoint_files(os.path.join(HERE, golden))
    assert validate(manifest, SCHEMA) == []
    assert indexes and all(validate(i, {"$ref": "#/$defs/index"}, SCHEMA) == [] for i in indexes)
    on_disk = {os.path.relpath(p, os.path.join(HERE, golden))
               for p in glob.glob(os.path.join(HERE, golden, "data", "*", "*"))}
    assert on_disk == {f[k] for f in manifest["files"] for k in ("data", "index")}  # no stray files


def test_what_the_code_writes_today_conforms_to_schema(tmp_path):
    """Every value type and a few edge floats, saved now: the schema must describe the current writer."""
    state = {"t": torch.zeros(3, 2, dtype=torch.complex64), "e": torch.zeros(0, 5), "s": torch.tensor(True),
             "v": [None, True, -(1 << 62), 0.0, -0.0, math.nan, -math.inf, 5e-324, "x", b"", b"\x00" * 5,
                   torch.float8_e4m3fn, (1, (2,)), {"k": {3: []}}]}
    shardckpt.save(state, tmp_path / "c", metadata={"loss": 1.5, "cfg": {"a": [1]}})
    manifest, indexes = _checkpoint_files(tmp_path / "c")
    assert validate(manifest, SCHEMA) == []
    assert all(validate(i, {"$ref": "#/$defs/index"}, SCHEMA) == [] for i in indexes)


@pytest.mark.parametrize("mutate, where", [
    (lambda m, i: m["tensors"]["model.w"].update(dtype="float128"), "$.tensors.model.w.dtype"),
    (lambda m, i: m["files"][0].update(rank=True), "$.files[0].rank"),
    (lambda m, i: m["values"].update(lr={"t": "float", "v": 0.25}), "$.values.lr"),
    (lambda m, i: m["values"].update(blob={"t": "bytes", "v": "not base64!"}), "$.values.blob"),
    (lambda m, i: m.update(format_version="3.0"), "$.format_version"),
    (lambda m, i: m.pop("manifest_crc32c"), "$"),
    (lambda m, i: m["tree"].update(t="eval"), "$.tree"),
    (lambda m, i: i["chunks"][0].update(codec="lz4/1"), "index $.chunks[0].codec"),
    (lambda m, i: i["chunks"][0]["frames"][0].append(1), "index $.chunks[0].frames[0]"),
    (lambda m, i: i["chunks"][0]["frames"][0].__setitem__(3, 0), "index $.chunks[0].frames[0][3]"),
])
def test_schema_check_rejects_what_the_format_forbids(mutate, where):
    """The schema test above could pass with a validator that checks nothing: each edit here must fail it."""
    manifest, indexes = _checkpoint_files(os.path.join(HERE, TWO_RANKS[-1]))
    manifest, index = copy.deepcopy(manifest), copy.deepcopy(indexes[0])
    mutate(manifest, index)
    errors = validate(manifest, SCHEMA) + ["index " + e for e in validate(index, {"$ref": "#/$defs/index"}, SCHEMA)]
    assert any(e.startswith(where + ":") for e in errors), errors

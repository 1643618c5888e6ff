"""Golden checkpoints: every format version ever written keeps loading, bit-exactly."""
from __future__ import annotations

import os

import pytest
import torch

import shardckpt
from golden.make_golden import golden_state

HERE = os.path.join(os.path.dirname(__file__), "golden")
VERSIONS = sorted(d for d in os.listdir(HERE) if d.startswith("v"))


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


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

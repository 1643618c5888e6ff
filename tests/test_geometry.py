"""Geometry on its own: no processes, no I/O. Checked against brute force with hypothesis."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shardckpt.plan.geometry import (MIN_SPLIT_BYTES, dtensor_box, frame_span, intersect, replica_coordinates,
    replica_piece, row_batches)

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


def _mask(shape, off, size):
    m = np.zeros(shape, dtype=np.int32)
    m[tuple(slice(o, o + s) for o, s in zip(off, size))] = 1
    return m


@given(shapes, st.data())
def test_intersect_matches_brute_force(shape, data):
    def box():
        off = tuple(data.draw(st.integers(0, d)) for d in shape)
        size = tuple(data.draw(st.integers(0, d - o)) for d, o in zip(shape, off))
        return off, size
    a, b = box(), box()
    got = intersect(*a, *b)
    want = _mask(shape, *a) & _mask(shape, *b)
    if got is None:
        assert want.sum() == 0 or not shape
    else:
        assert np.array_equal(_mask(shape, *got), want)


@given(st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple), st.integers(1, 9),
       st.sampled_from([1, 2, 4, 8]), st.booleans(), st.text(max_size=5))
def test_replica_pieces_cover_the_box_exactly_once(sizes, replicas, itemsize, big, key):
    offsets = tuple(range(len(sizes)))
    shape = tuple(o + s for o, s in zip(offsets, sizes))
    scale = MIN_SPLIT_BYTES if big else 1  # big boxes split, small ones go whole to one replica
    count = np.zeros(shape, dtype=np.int32)
    pieces = [replica_piece(key, offsets, sizes, itemsize * scale, replicas, i) for i in range(replicas)]
    for p in pieces:
        if p is not None:
            count += _mask(shape, *p)
    assert np.array_equal(count, _mask(shape, offsets, sizes)) if shape else \
        sum(p is not None for p in pieces) == 1
    if big and sizes and max(sizes) >= replicas:
        assert all(p is not None for p in pieces)  # every replica carries part of a large box


def _placements():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    return st.sampled_from([Replicate(), Shard(0), Shard(1), _StridedShard(0, split_factor=2)])


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.integers(0, 13), st.integers(1, 7)), st.sampled_from([(2,), (3,), (4,), (2, 2), (2, 3)]),
       st.data())
def test_dtensor_boxes_plus_replica_split_cover_tensor_once(shape, mesh_shape, data):
    """Every mesh coordinate's box, replicas split as the save does: every element written exactly once."""
    import itertools
    from torch.distributed.tensor.placement_types import _StridedShard
    placements = [data.draw(_placements()) for _ in mesh_shape]
    # _StridedShard only appears in FSDP2 + TP layouts: a strided outer dim over a plain inner shard
    if any(isinstance(p, _StridedShard) for p in placements) and (
            len(mesh_shape) != 2 or not isinstance(placements[0], _StridedShard)
            or placements[1].__class__.__name__ != "Shard" or placements[1].dim != 0
            or placements[0].split_factor != mesh_shape[1]):
        return
    count = np.zeros(shape, dtype=np.int32)
    for coord in itertools.product(*[range(n) for n in mesh_shape]):
        off, size = dtensor_box(shape, mesh_shape, coord, placements)
        reps = replica_coordinates(mesh_shape, coord, placements)
        piece = replica_piece("k", off, size, MIN_SPLIT_BYTES, len(reps), reps.index(tuple(coord)))
        if piece is not None:
            count += _mask(shape, *piece)
    assert np.array_equal(count, np.ones(shape, dtype=np.int32))


@given(st.lists(st.integers(1, 12), min_size=1, max_size=3), st.sampled_from([1, 2, 4, 8]),
       st.integers(1, 64), st.data())
def test_frame_span_selects_exactly_the_frames_holding_the_rows(sizes, itemsize, frame_units, data):
    frame_size = frame_units * 8
    rows = sizes[0]
    lo = data.draw(st.integers(0, rows))
    hi = data.draw(st.integers(lo, rows))
    span = frame_span(sizes, itemsize, frame_size, lo, hi)
    row_bytes = math.prod(sizes[1:]) * itemsize
    start, end = lo * row_bytes, hi * row_bytes
    assert span.nbytes == end - start
    if end > start:
        assert span.first * frame_size <= start < (span.first + 1) * frame_size
        assert (span.last - 1) * frame_size < end <= span.last * frame_size
        assert span.first * frame_size + span.skip == start


@given(st.integers(0, 50), st.integers(0, 50), st.integers(1, 100), st.integers(1, 1000), st.integers(1, 8))
def test_row_batches_cover_range_and_cut_at_aligned_rows(lo, n, row_bytes, target, align):
    batches = row_batches(lo, lo + n, row_bytes, target, align)
    rows = [r for a, b in batches for r in range(a, b)]
    assert rows == list(range(lo, lo + n))
    assert all(b > a for a, b in batches)
    assert all(b % align == 0 for a, b in batches[:-1])


def test_check_coverage_rejects_gaps_and_overlaps():
    import torch
    from shardckpt.errors import FormatError
    from shardckpt.format.records import Chunk, TensorMeta
    from shardckpt.plan.geometry import check_coverage
    meta = TensorMeta("w", torch.float32, (4, 4))
    c = lambda off, size, r=0: Chunk("w", off, size, "raw/1", (), "f", r, 8)
    check_coverage(meta, [c((0, 0), (2, 4)), c((2, 0), (2, 4), 1)])
    with pytest.raises(FormatError, match="cover"):
        check_coverage(meta, [c((0, 0), (2, 4))])
    with pytest.raises(FormatError, match="overlap"):  # volumes add up, but row 2 twice and row 3 never
        check_coverage(meta, [c((0, 0), (3, 4)), c((2, 0), (1, 4), 1)])

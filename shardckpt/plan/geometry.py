"""Pure geometry: boxes, DTensor placements -> boxes, replica splitting, overlaps, frame selection.
No I/O and no process group here; everything is a function of its arguments (tests/test_geometry.py)."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

from shardckpt.errors import FormatError

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) in global coordinates

# Replicated boxes smaller than this are written whole by one replica instead of being split.
MIN_SPLIT_BYTES = 1 << 20


def boxes_overlap(a_off, a_size, b_off, b_size) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a_off, a_size, b_off, b_size)) \
        and all(s > 0 for s in a_size) and all(s > 0 for s in b_size)


def intersect(a_off, a_size, b_off, b_size) -> Box | None:
    """The intersection of two boxes, or None if empty. 0-d boxes always intersect (as themselves)."""
    offs, sizes = [], []
    for ao, as_, bo, bs in zip(a_off, a_size, b_off, b_size):
        lo, hi = max(ao, bo), min(ao + as_, bo + bs)
        if hi <= lo:
            return None
        offs.append(lo)
        sizes.append(hi - lo)
    return tuple(offs), tuple(sizes)


def split_dim(sizes: Sequence[int], parts: int) -> int | None:
    """The dim along which a box is split across `parts` replicas: the first dim with at least `parts`
    elements, else the largest; None for 0-d boxes."""
    if not sizes:
        return None
    for d, s in enumerate(sizes):
        if s >= parts:
            return d
    return max(range(len(sizes)), key=lambda d: sizes[d])


def replica_piece(key: str, offsets: Sequence[int], sizes: Sequence[int], itemsize: int, replicas: int,
                  index: int) -> Box | None:
    """The part of a replicated box that replica number `index` (0 <= index < replicas) writes, so that the
    replicas together write the box exactly once. Large boxes are split into near-equal slabs along
    split_dim (rotated by a hash of the key, so no replica always gets the largest slab); small boxes are
    written whole by one replica chosen by the hash. Returns None if this replica writes nothing."""
    offsets, sizes = tuple(offsets), tuple(sizes)
    if replicas <= 1:
        return offsets, sizes
    h = zlib.crc32(key.encode())
    nbytes = math.prod(sizes) * itemsize
    d = split_dim(sizes, replicas)
    if d is None or nbytes < MIN_SPLIT_BYTES:
        return (offsets, sizes) if index == h % replicas else None
    slot = (index + h) % replicas
    n = sizes[d]
    lo = n * slot // replicas
    hi = n * (slot + 1) // replicas
    if hi <= lo:
        return None
    return (offsets[:d] + (offsets[d] + lo,) + offsets[d + 1:],
            sizes[:d] + (hi - lo,) + sizes[d + 1:])


def dtensor_box(global_shape, mesh_shape, coordinate, placements) -> Box:
    """The box of the global tensor held at a mesh coordinate under the given placements (Shard, Replicate,
    _StridedShard), by DTensor's own rules."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    shape, offset = _compute_local_shape_and_global_offset(list(global_shape), list(mesh_shape),
                                                           list(coordinate), list(placements))
    return tuple(int(o) for o in offset), tuple(int(s) for s in shape)


def replica_coordinates(mesh_shape, coordinate, placements) -> list[tuple[int, ...]]:
    """All mesh coordinates that hold the same box as `coordinate`: those differing only along mesh dims
    whose placement is Replicate (or Partial, which shardckpt refuses earlier). Sorted."""
    rep_dims = [i for i, p in enumerate(placements) if p.is_replicate()]
    coords = [tuple(coordinate)]
    for d in rep_dims:
        coords = [c[:d] + (k,) + c[d + 1:] for c in coords for k in range(mesh_shape[d])]
    return sorted(set(coords))


@dataclass(frozen=True)
class FrameSpan:
    """Which frames of a chunk hold rows [row_lo, row_hi) of it, and where those rows start inside the
    decoded bytes of those frames."""
    first: int           # first frame index
    last: int            # one past the last frame index
    skip: int            # bytes to skip in the decoded frames before row_lo starts
    nbytes: int          # bytes of the rows


def frame_span(chunk_sizes: Sequence[int], itemsize: int, frame_size: int, row_lo: int, row_hi: int) -> FrameSpan:
    """Frames of a chunk (C-order bytes split every frame_size bytes) that hold rows [row_lo, row_hi) along
    dim 0. A 0-d chunk is one row."""
    row_bytes = math.prod(chunk_sizes[1:]) * itemsize if chunk_sizes else itemsize
    start, end = row_lo * row_bytes, row_hi * row_bytes
    if end <= start:
        return FrameSpan(0, 0, 0, 0)
    first = start // frame_size
    last = -(-end // frame_size)
    return FrameSpan(first, last, start - first * frame_size, end - start)


def row_batches(row_lo: int, row_hi: int, row_bytes: int, target_bytes: int, align: int = 1) -> list[tuple[int, int]]:
    """Split rows [row_lo, row_hi) into consecutive batches of about target_bytes (at least one row each),
    cutting only at absolute rows that are multiples of `align` (frame boundaries), so each batch decodes
    whole frames straight into place."""
    per = max(1, target_bytes // max(1, row_bytes))
    per = max(align, per // align * align)
    out, r = [], row_lo
    while r < row_hi:
        nxt = min(row_hi, (r // per + 1) * per)
        out.append((r, nxt))
        r = nxt
    return out


def check_coverage(meta, chunks, file: str = "manifest.json") -> None:
    """Chunks MUST cover the tensor exactly once: no overlap and total volume equal to numel."""
    total = sum(c.numel for c in chunks)
    if total != meta.numel:
        raise FormatError(f"chunks cover {total} of {meta.numel} elements", file=file, key=meta.key)
    if len(chunks) < 2 or not meta.shape:
        if len(chunks) > 1:
            raise FormatError("a 0-d tensor has more than one chunk", file=file, key=meta.key)
        return
    ordered = sorted((c for c in chunks if c.numel), key=lambda c: c.offsets[0])
    active: list = []
    for c in ordered:
        active = [a for a in active if a.offsets[0] + a.sizes[0] > c.offsets[0]]
        for a in active:
            if boxes_overlap(a.offsets, a.sizes, c.offsets, c.sizes):
                raise FormatError(f"chunks of ranks {a.rank} and {c.rank} overlap", file=file, key=meta.key)
        active.append(c)

"""Comparing two checkpoints key by key, streamed (`shardckpt diff`; any single process may call it).

Tensors of equal shape are read in matching row-batch boxes of about DIFF_PIECE_BYTES from both sides, so
memory stays bounded whatever their size; the sums behind max |b-a|, ||b-a||/||a|| and cos(a, b) are
accumulated in float64. Plain values compare by equality. Tensors of two incremental (format 2.x)
checkpoints whose chunks carry equal content hashes are identical without being decoded and compared, but
every frame of both sides is still checked against its crc32c (verify.check_frames; frames both sides share
through references are checked once), so a corrupt side raises its ChecksumError / CorruptDataError just
as when the tensors are streamed.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from shardckpt.loading.load import key_filter
from shardckpt.tools.export import CheckpointReader, piece_boxes
from shardckpt.progress import Progress
from shardckpt.loading.verify import check_frames

DIFF_PIECE_BYTES = 8 << 20


@dataclass
class TensorDiff:
    key: str
    status: str                 # same | changed | added | removed | shape | dtype
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: list | None = None
    shape_b: list | None = None
    max_abs: float | None = None
    rel_l2: float | None = None     # ||b - a|| / ||a||
    cosine: float | None = None
    identical: bool = False         # bit-identical bytes


def _same_hashes(ra, rb, key: str) -> bool:
    """Both checkpoints hold `key` in the same boxes with equal content hashes (FORMAT.md §7): bit-identical
    without reading a byte. False when either side has no hashes (format 1.x), the two hash with different
    algorithms (2.0's blake2b-128 against 2.1's xxh3-128) or the boxes differ."""
    if not (ra.manifest.format_version.startswith("2.") and rb.manifest.format_version.startswith("2.")):
        return False
    if ra.manifest.chunk_hash != rb.manifest.chunk_hash:
        return False
    ha = {(c.offsets, c.sizes): c.hash for c in ra.chunks.get(key, ())}
    hb = {(c.offsets, c.sizes): c.hash for c in rb.chunks.get(key, ())}
    return bool(ha) and all(ha.values()) and ha == hb


def _diff_tensor(ra, rb, key: str, budget: int, checked: set) -> TensorDiff:
    ma, mb = ra.manifest.tensors[key], rb.manifest.tensors[key]
    d = TensorDiff(key, "same", str(ma.dtype).replace("torch.", ""), str(mb.dtype).replace("torch.", ""),
                   list(ma.shape), list(mb.shape))
    if ma.shape != mb.shape:
        d.status = "shape"
        return d
    if ma.dtype == mb.dtype and _same_hashes(ra, rb, key):  # format 2.x: equal content hashes, not decoded
        for r in (ra, rb):  # ... but never trusted without checking the bytes that back them
            checked |= check_frames(r.storage, r.manifest, r.chunks[key], skip=checked)
        d.identical, d.max_abs, d.rel_l2, d.cosine = True, 0.0, 0.0, 1.0
        return d
    max_abs, ss_d, ss_a, ss_b, dot, identical = 0.0, 0.0, 0.0, 0.0, 0.0, ma.dtype == mb.dtype
    with ThreadPoolExecutor(2) as pool:
        for off, size in piece_boxes(ma.shape, max(ma.itemsize, mb.itemsize), budget):
            fa, fb = pool.submit(ra.read, key, off, size), pool.submit(rb.read, key, off, size)
            a, b = fa.result(), fb.result()
            if identical and not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
                identical = False
            a64, b64 = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
            if a64.numel():
                diff = b64 - a64
                max_abs = max(max_abs, float(diff.abs().max()))
                ss_d += float(diff.dot(diff))
                ss_a += float(a64.dot(a64))
                ss_b += float(b64.dot(b64))
                dot += float(a64.dot(b64))
    if identical:
        d.identical, d.max_abs, d.rel_l2, d.cosine = True, 0.0, 0.0, 1.0
    else:
        d.max_abs = max_abs
        d.rel_l2 = math.sqrt(ss_d) / math.sqrt(ss_a) if ss_a > 0 else (0.0 if ss_d == 0 else math.inf)
        na, nb = math.sqrt(ss_a), math.sqrt(ss_b)
        d.cosine = dot / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        changed = not (max_abs == 0 and ss_d == 0) or math.isnan(max_abs)
        d.status = "dtype" if ma.dtype != mb.dtype else ("changed" if changed else "same")
    return d


def diff_checkpoints(a, b, *, key=None, storage_options=None, budget: int = DIFF_PIECE_BYTES,
                     progress: bool | None = None) -> dict:
    """Compare two checkpoints key by key. Tensors of equal shape are streamed in matching row-batch boxes of
    about `budget` bytes from both sides (memory stays bounded whatever their size); each yields max |b-a|,
    ||b-a||/||a|| and cos(a, b) accumulated in float64. Plain values compare by equality."""
    ra = CheckpointReader(a, storage_options=storage_options)
    rb = CheckpointReader(b, storage_options=storage_options)
    wanted = key_filter(key)
    ka = {k for k in ra.manifest.keys() if wanted(k)}
    kb = {k for k in rb.manifest.keys() if wanted(k)}
    out: list[TensorDiff] = []
    common_tensors = sorted(k for k in ka & kb if k in ra.manifest.tensors and k in rb.manifest.tensors)
    total = sum(ra.manifest.tensors[k].numel * ra.manifest.tensors[k].itemsize for k in common_tensors)
    bar = Progress(total, "diff", enabled=progress)
    for k in sorted(ka - kb):
        out.append(TensorDiff(k, "removed"))
    for k in sorted(kb - ka):
        out.append(TensorDiff(k, "added"))
    checked: set = set()  # frames checked by crc32c (verify.check_frames), each once
    for k in common_tensors:
        out.append(_diff_tensor(ra, rb, k, budget, checked))
        bar(ra.manifest.tensors[k].numel * ra.manifest.tensors[k].itemsize)
    bar.close()
    for k in sorted((ka & kb) - set(common_tensors)):
        if (k in ra.manifest.tensors) != (k in rb.manifest.tensors):
            out.append(TensorDiff(k, "changed"))
        else:
            same = ra.manifest.values[k] == rb.manifest.values[k]
            out.append(TensorDiff(k, "same" if same else "changed", identical=same))
    summary = {s: sum(1 for d in out if d.status == s) for s in ("same", "changed", "added", "removed", "shape",
                                                                 "dtype")}
    return {"a": ra.storage.url, "b": rb.storage.url, "summary": summary, "entries": out}

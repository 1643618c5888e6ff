"""Who needs each frame, learnt from sums instead of from every rank's needs (pure: no I/O, no process
group). Gathering every rank's needs costs each rank O(ranks x tensors) bytes when they are all distinct
(FSDP: 8.3x the manifest at 16,384 ranks); these vectors cost 24 bytes a frame (about half of what the
index files the metadata broadcast already gave it cost), whatever the world size:
  - each rank adds its needer_sums (three int64 entries a frame, file order, the numbering of
    plan_exchange's runs); one all-reduce sums them: each frame's needer count, and the sum of its
    needers' ranks and of their squares
  - exchange="auto" decides from the counts alone (worth_exchanging_counts: plan.worth_exchanging's rule
    on the same bytes): a restore whose needs barely overlap (FSDP on few ranks, a reshard sharing only
    the frames at shard boundaries) reads directly, and no rank learns another's needs
  - else, where every frame's needers are contiguous ranks (FSDP's Shard(0) on many ranks), every rank
    reads the plan's segments (runs of frames with their needing ranks) off the sums (segments_from_sums)
    and plans from them (exchange_plan.plan_segments) the plan the gathered needs would give.

Who calls it: shardckpt.loading.exchange.run, on every rank (step 2a of its docstring); bench.scale and
tests/test_scale.py on simulated sums.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from shardckpt.plan.exchange_plan import Run, Segment, merge_runs, worth_exchanging


def frame_bases(frame_offsets: dict[int, Sequence[int]]) -> dict[int, int]:
    """Per file id (ascending), the position of its first frame in the counts vector."""
    out, pos = {}, 0
    for f in sorted(frame_offsets):
        out[f] = pos
        pos += len(frame_offsets[f]) - 1
    return out


def frame_bytes(frame_offsets: dict[int, Sequence[int]]) -> np.ndarray:
    """Each frame's stored bytes, in the counts vector's order (int64)."""
    parts = [np.diff(np.asarray(frame_offsets[f], dtype=np.int64)) for f in sorted(frame_offsets)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def runs_bytes(runs: Sequence[Run], frame_offsets: dict[int, Sequence[int]]) -> int:
    """The stored bytes of runs (merged first: a frame counts once)."""
    return sum(frame_offsets[f][b] - frame_offsets[f][a] for f, a, b in merge_runs(runs))


def count_needs(runs: Sequence[Run], frame_offsets: dict[int, Sequence[int]]) -> np.ndarray:
    """This rank's vector: 1 for each frame its runs cover (merged first, so a frame counts once), else 0;
    int32, one entry per frame of every file in frame_offsets."""
    bases = frame_bases(frame_offsets)
    total = sum(len(o) - 1 for o in frame_offsets.values())
    diff = np.zeros(total + 1, dtype=np.int32)
    for f, a, b in merge_runs(runs):
        diff[bases[f] + a] += 1
        diff[bases[f] + b] -= 1
    return np.cumsum(diff[:-1], dtype=np.int32)


def needed_and_repeated(counts: np.ndarray, nbytes: np.ndarray) -> tuple[int, int]:
    """From the summed counts: (bytes some rank needs, bytes direct reads would fetch more than once), the
    same figures as ExchangePlan's pieces give (pieces are whole frames, each fetched once and received by
    every rank that needs it)."""
    c = counts.astype(np.int64)
    needed = int(nbytes[c > 0].sum())
    return needed, int((nbytes * np.maximum(c - 1, 0)).sum())


def worth_exchanging_counts(counts: np.ndarray, nbytes: np.ndarray) -> bool:
    """exchange="auto"'s rule (exchange_plan.worth_exchanging) on the summed counts (needer_sums' first
    part): what plan_exchange(needs, ...).worth_exchanging would say, without the needs."""
    counts = counts[:len(nbytes)]
    needed, repeated = needed_and_repeated(counts, nbytes)
    return worth_exchanging(needed, repeated, bool((counts > 1).any()))


def needer_sums(runs: Sequence[Run], frame_offsets: dict[int, Sequence[int]], rank: int) -> np.ndarray:
    """This rank's part of step 2a's sum all-reduce, three int64 entries a frame: [1 where it needs the
    frame] + [rank there] + [rank^2 there] (each part one entry per frame). Summed over the group: each
    frame's needer count c, the sum s1 of its needers and of their squares s2, from which every rank
    knows the needers wherever they are contiguous ranks (segments_from_sums)."""
    mine = count_needs(runs, frame_offsets).astype(np.int64)
    return np.concatenate((mine, mine * rank, mine * rank * rank))


def _squares(x: np.ndarray) -> np.ndarray:
    """0^2 + 1^2 + ... + x^2 (0 for x < 0)."""
    return np.where(x < 0, 0, x * (x + 1) * (2 * x + 1) // 6)


def segments_from_sums(sums: np.ndarray, frame_offsets: dict[int, Sequence[int]],
                       world: int) -> list[Segment] | None:
    """The segments plan_exchange would cut every rank's needs into (exchange_plan.plan_segments' input:
    runs of frames with one set of needing ranks, in file order), from the summed needer_sums alone, when
    each needed frame's needers are the contiguous ranks lo .. lo + c - 1 (FSDP's Shard(0): a frame's rows
    belong to neighbouring ranks): then s1 = c lo + c (c - 1) / 2 and s2 is the sum of their squares, and
    c distinct ranks with those two sums are that run and no other (consecutive integers are the only c
    distinct ones with so small a variance). None when some frame's needers are not contiguous (then the
    needs must be gathered). O(frames + the segments' ranks): no rank's runs are expanded."""
    n = len(sums) // 3
    c, s1, s2 = sums[:n].astype(np.int64), sums[n:2 * n].astype(np.int64), sums[2 * n:].astype(np.int64)
    needed = c > 0
    lo = np.where(needed, (s1 - c * (c - 1) // 2) // np.maximum(c, 1), 0)
    hi = lo + c - 1
    fits = (c * lo + c * (c - 1) // 2 == s1) & (_squares(hi) - _squares(lo - 1) == s2) & (lo >= 0) & (hi < world)
    if bool((needed & ~fits).any()):
        return None
    out: list[Segment] = []
    ranks: dict[tuple[int, int], tuple[int, ...]] = {}
    for f, base in frame_bases(frame_offsets).items():
        m = len(frame_offsets[f]) - 1
        idx = np.flatnonzero(needed[base:base + m])
        if not len(idx):
            continue
        flo, fhi = lo[base + idx], hi[base + idx]
        cut = np.flatnonzero((np.diff(idx) != 1) | (np.diff(flo) != 0) | (np.diff(fhi) != 0))
        starts = np.concatenate(([0], cut + 1)).tolist()
        ends = np.concatenate((cut, [len(idx) - 1])).tolist()
        a_s, b_s = idx[starts].tolist(), (idx[ends] + 1).tolist()
        for a, b, r0, r1 in zip(a_s, b_s, flo[starts].tolist(), fhi[starts].tolist()):
            key = (r0, r1)
            if key not in ranks:
                ranks[key] = tuple(range(r0, r1 + 1))
            out.append((f, a, b, ranks[key]))
    return out

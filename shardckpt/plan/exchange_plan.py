"""Pure planning of a read-once restore (no I/O, no process group): which rank fetches which frames from
storage, and which ranks each fetched piece is sent to. Every rank of the load's group runs plan_exchange
on the same inputs (the gathered needs) and gets the same plan, so no coordinator hands it out.

Frames are numbered per data file in file order (a data file is the concatenation of its frames,
docs/FORMAT.md section 6), so what a rank needs is a list of runs (file, first frame, end frame) and a run's
bytes are a difference of frame offsets.

  1. ranks with identical needs (data-parallel replicas) are grouped: planning costs what the distinct
     layouts cost, not what the number of ranks costs
  2. a sweep per file cuts the needed frames into segments with one set of needing ranks each
  3. segments are cut into pieces at frame boundaries (up to one per needing rank, at least MIN_PIECE bytes
     each, at most MAX_PIECE) and each piece goes to the least-loaded rank that needs it: every needed frame
     is fetched exactly once, by a rank that needs it, and replicas share the fetching evenly by bytes.
     With `holders` (a node-local tier's restore, shardckpt.tiers: only the ranks whose node's disk holds a
     file can read it) the fetcher is the least-loaded rank that both needs and holds the piece, else the
     least-loaded holder, which then only sends it
  4. pieces, in file order, are grouped into rounds in which no rank fetches more than ROUND_BYTES, so the
     exchange streams with bounded memory
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Sequence

MIN_PIECE = 1 << 20
MAX_PIECE = 16 << 20
AUTO_MIN_REPEATED = 0.125
ROUND_BYTES = 16 << 20  # small enough that fetching round k+1 overlaps exchanging and decoding round k

Run = tuple[int, int, int]  # (file id, first frame, end frame)


@dataclass(frozen=True)
class Piece:
    """Frames [first, end) of data file `file`: `nbytes` stored bytes fetched by rank `fetcher` and sent to
    every rank in `receivers` (the ranks that need them; the fetcher is one of them unless `holders`
    excluded every needer from reading the file)."""
    file: int
    first: int
    end: int
    nbytes: int
    fetcher: int
    receivers: tuple[int, ...]


@dataclass(frozen=True)
class ExchangePlan:
    """The whole restore's fetching and sending. `rounds[k]` lists indices into `pieces` (in file order);
    `shared` is False when no frame is needed by two ranks (then every rank may simply read its own)."""
    pieces: tuple[Piece, ...]
    rounds: tuple[tuple[int, ...], ...]
    shared: bool
    world_size: int

    @property
    def repeated_bytes(self) -> int:
        """Bytes that reading directly would fetch more than once (each piece once per extra needer)."""
        return sum(p.nbytes * (len(p.receivers) - 1) for p in self.pieces)

    @property
    def worth_exchanging(self) -> bool:
        """exchange="auto"'s rule: exchange when direct reads would fetch at least AUTO_MIN_REPEATED more
        than the bytes needed (DDP, HSDP, fine-tuning loads); a reshard whose only shared frames are those
        straddling shard boundaries reads directly (an exchange round costs more than those few frames)."""
        return self.repeated_bytes >= AUTO_MIN_REPEATED * sum(p.nbytes for p in self.pieces) and self.shared

    def fetched_bytes(self, rank: int) -> int:
        return sum(p.nbytes for p in self.pieces if p.fetcher == rank)

    def received_bytes(self, rank: int) -> int:
        """Bytes this rank gets from other ranks (not from storage)."""
        return sum(p.nbytes for p in self.pieces if p.fetcher != rank and rank in p.receivers)

    def round_peaks(self) -> tuple[int, int]:
        """(send, receive): the most bytes any rank puts in, and gets out of, one round's all_to_all: the
        exchange's memory per rank (bench.scale pins it). Costs O(rounds x ranks)."""
        top_send = top_recv = 0
        for idx in self.rounds:
            send: dict[int, int] = {}
            total: dict[tuple[int, ...], int] = {}   # per receiver set: the round's bytes
            own: dict[int, int] = {}                 # what a rank fetched of pieces it receives
            for i in idx:
                p = self.pieces[i]
                inside = p.fetcher in p.receivers
                send[p.fetcher] = send.get(p.fetcher, 0) + p.nbytes * (len(p.receivers) - inside)
                total[p.receivers] = total.get(p.receivers, 0) + p.nbytes
                if inside:
                    own[p.fetcher] = own.get(p.fetcher, 0) + p.nbytes
            recv: dict[int, int] = {}
            for ranks, n in total.items():
                for r in ranks:
                    recv[r] = recv.get(r, 0) + n
            top_send = max(top_send, max(send.values(), default=0))
            top_recv = max(top_recv, max((n - own.get(r, 0) for r, n in recv.items()), default=0))
        return top_send, top_recv


def merge_runs(runs: Sequence[Run]) -> list[Run]:
    """Sorted runs with overlapping or adjacent ones of a file merged."""
    out: list[list[int]] = []
    for f, a, b in sorted(r for r in runs if r[2] > r[1]):
        if out and out[-1][0] == f and a <= out[-1][2]:
            out[-1][2] = max(out[-1][2], b)
        else:
            out.append([f, a, b])
    return [tuple(r) for r in out]


def plan_exchange(needs: Sequence[Sequence[Run]], frame_offsets: dict[int, Sequence[int]], *,
                  min_piece: int = MIN_PIECE, max_piece: int = MAX_PIECE,
                  round_bytes: int = ROUND_BYTES, holders: dict[int, Sequence[int]] | None = None
                  ) -> ExchangePlan:
    """Plan a read-once restore.

    Args:
        needs: per rank of the group, the frame runs it needs (any order; merged here).
        frame_offsets: per file id, the byte offset of each frame and, last, the file's size (len frames + 1).
        min_piece, max_piece: bounds of a piece's stored bytes (a piece is never cut inside a frame).
        round_bytes: the most a rank fetches in one round.
        holders: per file id, the ranks able to fetch it (a file not named: every rank). None: every rank
            may fetch every file (a shared store).

    Returns:
        The ExchangePlan, the same on every rank for the same inputs.
    """
    world = len(needs)
    groups: dict[tuple, list[int]] = {}
    for rank, runs in enumerate(needs):
        groups.setdefault(tuple(merge_runs(runs)), []).append(rank)
    segments = _segments(list(groups.items()))
    load = [0] * world
    heaps: dict[tuple[int, ...], list] = {}
    pieces: list[Piece] = []
    shared = False
    for f, a, b, needers in segments:
        shared = shared or len(needers) > 1
        offs = frame_offsets[f]
        fetchers = needers if holders is None or f not in holders else _fetchers(needers, holders[f], f)
        heap = heaps.get(fetchers)
        if heap is None:  # a new candidate set starts from the loads other sets already gave its ranks
            heap = heaps[fetchers] = sorted((load[r], r) for r in fetchers)
        for lo, hi in _cut(offs, a, b, len(needers), min_piece, max_piece):
            nbytes = offs[hi] - offs[lo]
            while True:  # least-loaded needer; heap entries go stale when another segment loads a rank
                got, r = heapq.heappop(heap)
                if got == load[r]:
                    break
                heapq.heappush(heap, (load[r], r))
            load[r] += nbytes
            heapq.heappush(heap, (load[r], r))
            pieces.append(Piece(f, lo, hi, nbytes, r, needers))
    return ExchangePlan(tuple(pieces), _rounds(pieces, world, round_bytes), shared, world)


def _fetchers(needers: tuple[int, ...], holders: Sequence[int], f: int) -> tuple[int, ...]:
    """Who may fetch a piece of file f: the needers that hold it, else every holder."""
    held = set(holders)
    if not held:
        raise ValueError(f"file {f} is needed but no rank holds it")
    return tuple(r for r in needers if r in held) or tuple(sorted(held))


def _segments(groups: list[tuple[tuple, list[int]]]) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """(file, first, end, needing ranks) with one needer set each, in file order (a sweep over the runs'
    boundaries with the set of covering groups)."""
    events: dict[int, list] = {}
    for g, (runs, _) in enumerate(groups):
        for f, a, b in runs:
            events.setdefault(f, []).extend(((a, 1, g), (b, -1, g)))
    out: list[tuple[int, int, int, tuple[int, ...]]] = []
    for f in sorted(events):
        evs = sorted(events[f])
        active: dict[int, int] = {}
        cache: dict[frozenset, tuple[int, ...]] = {}
        prev = None
        i = 0
        while i < len(evs):
            pos = evs[i][0]
            if prev is not None and active and pos > prev:
                key = frozenset(active)
                ranks = cache.get(key)
                if ranks is None:
                    ranks = cache[key] = tuple(sorted(r for g in key for r in groups[g][1]))
                if out and out[-1][0] == f and out[-1][2] == prev and out[-1][3] == ranks:
                    out[-1] = (f, out[-1][1], pos, ranks)
                else:
                    out.append((f, prev, pos, ranks))
            while i < len(evs) and evs[i][0] == pos:
                _, kind, g = evs[i]
                active[g] = active.get(g, 0) + kind
                if active[g] == 0:
                    del active[g]
                i += 1
            prev = pos
    return out


def _cut(offs: Sequence[int], a: int, b: int, needers: int, min_piece: int, max_piece: int) -> list[tuple[int, int]]:
    """Frames [a, b) cut at frame boundaries into pieces of near-equal bytes: one per needing rank (fewer if
    that would make them smaller than min_piece), times what keeps them under max_piece (fewer pieces
    when frames are coarse)."""
    total = offs[b] - offs[a]
    n = max(1, min(needers, total // max(1, min_piece)))
    n *= -(-total // (n * max_piece))  # a multiple of the sharing ranks, so that they get equal shares
    cuts = [a]
    for k in range(1, min(n, b - a)):
        i = bisect.bisect_left(offs, offs[a] + total * k // n, cuts[-1] + 1, b)
        if cuts[-1] < i < b:
            cuts.append(i)
    cuts.append(b)
    return list(zip(cuts, cuts[1:]))


def _rounds(pieces: list[Piece], world: int, round_bytes: int) -> tuple[tuple[int, ...], ...]:
    rounds: list[list[int]] = []
    fetched = [0] * world
    for i, p in enumerate(pieces):
        if not rounds or (fetched[p.fetcher] and fetched[p.fetcher] + p.nbytes > round_bytes):
            rounds.append([])
            fetched = [0] * world
        rounds[-1].append(i)
        fetched[p.fetcher] += p.nbytes
    return tuple(tuple(r) for r in rounds)

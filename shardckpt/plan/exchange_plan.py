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
  4. delivery, with every rank's memory bounded whatever the world size: the pieces one set of ranks needs
     (a Delivery: all the ranks for DDP or a fine-tuning load, one replica group for HSDP, a few
     neighbours for a frame of an FSDP restore) are packed into generations in file order, one entering
     per round. At most STAR_RANKS ranks (and pieces small enough): a star, each fetcher sends its pieces
     straight to the others in the generation's round. More: a binary tree over those ranks (heap order:
     position i's parent is (i - 1) // 2): in round `start` the fetchers fetch the generation's pieces and
     send them to the root; in round start + depth(i) position i gets them from its parent (less the
     pieces it fetched itself). A tree position receives at most one generation a round and sends at
     most two (its children) plus its own fetched share of the next one, so what one round's all_to_all
     holds per rank is bounded by ROUND_BYTES on each side however many ranks need the bytes
     (ExchangePlan.round_peaks). Deliveries to at most PACK_RANKS ranks share rounds wherever every rank's
     sums stay within the budget (an FSDP restore's thousands of small deliveries take a few rounds, not
     one each); larger trees have their ranks to themselves. The cost of a tree is log2(ranks) more rounds
     of latency, not bytes: each rank still receives each piece it needs once.

Every rank computes the whole plan (the same decisions everywhere: the pieces' fetchers and each
delivery's start round, so every rank enters the same number of rounds), then its own schedule. At
16,384 FSDP ranks that is about 96,000 pieces in 2,100 deliveries: the fetcher choice is a loop per piece
(a heap per candidate set), the packed deliveries' demands are computed at once with numpy and placed
with a dense per-(rank, round) ledger, and the cyclic garbage collector is paused while planning
(_gc_paused): together about 0.6 s of CPU, was 1.1-1.2 s (bench.scale).

Why one module of ~660 lines: the plan's records (Piece, Delivery, ExchangePlan, with each rank's
schedule and the bound) and the planner that builds them are one contract: schedule and round_peaks read
the shapes that _deliveries and _demand build, and a change to one is a change to the other.
"""
from __future__ import annotations

import bisect
import functools
import gc
import heapq
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MIN_PIECE = 1 << 20
MAX_PIECE = 16 << 20
AUTO_MIN_REPEATED = 0.125
ROUND_BYTES = 16 << 20  # small enough that fetching round k+1 overlaps exchanging and decoding round k
STAR_RANKS = 8  # up to this many ranks need a piece: its fetcher sends it to each, in one round
PACK_RANKS = 256  # deliveries to at most this many ranks share rounds where each rank's budget allows

Run = tuple[int, int, int]  # (file id, first frame, end frame)
Segment = tuple[int, int, int, tuple[int, ...]]  # a run and the ranks that need it


def _gc_paused(fn):
    """Run fn with the cyclic garbage collector paused (restored after, however fn ends). Planning makes
    no reference cycles but allocates a piece, a tuple or a list per frame (about 100,000 at 16,384 FSDP
    ranks), and each collection the allocations trigger walks every live object: at 16,384 ranks that
    cost about a third of the planning's CPU time."""
    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()
    return paused


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
class Delivery:
    """How the pieces needed by exactly the ranks `ranks` (sorted; a binary tree in heap order, root
    ranks[0]) reach them: `gens` lists (start round, piece indices) in file order, one start per round.
    The pieces of a generation are fetched in its start round and sent by their fetchers to the root that
    same round; position i gets them from position (i - 1) // 2 in round start + depth(i), less the pieces
    it fetched itself. `star` (at most STAR_RANKS ranks, each piece small enough to send to all of them
    within the budget): no tree; each fetcher sends its pieces straight to the others in the start round."""
    ranks: tuple[int, ...]
    gens: tuple[tuple[int, tuple[int, ...]], ...]
    star: bool = False

    @property
    def depth(self) -> int:
        return 0 if self.star else depth(len(self.ranks) - 1)


def depth(position: int) -> int:
    """A tree position's depth in heap order (the root, 0, has depth 0)."""
    return (position + 1).bit_length() - 1


@dataclass(frozen=True)
class RankSchedule:
    """One rank's part of a plan (ExchangePlan.schedule): per round, the (rank, piece) pairs it sends and
    receives, each list sorted by (rank, piece) (sender and receiver agree on the order of the bytes);
    `has` is the round after which it holds each piece it fetches or receives, `last_send` the last round
    it sends each piece in."""
    sends: dict[int, list[tuple[int, int]]]
    recvs: dict[int, list[tuple[int, int]]]
    has: dict[int, int]
    last_send: dict[int, int]


@dataclass(frozen=True)
class ExchangePlan:
    """The whole restore's fetching and sending. `rounds[k]` lists indices into `pieces` (in file order)
    fetched in round k (the last rounds may only deliver); `deliveries` say how they travel (one per set
    of receiving ranks); `shared` is False when no frame is needed by two ranks (then every rank may
    simply read its own)."""
    pieces: tuple[Piece, ...]
    rounds: tuple[tuple[int, ...], ...]
    shared: bool
    world_size: int
    deliveries: tuple[Delivery, ...] = ()

    @property
    def repeated_bytes(self) -> int:
        """Bytes that reading directly would fetch more than once (each piece once per extra needer)."""
        return sum(p.nbytes * (len(p.receivers) - 1) for p in self.pieces)

    @property
    def worth_exchanging(self) -> bool:
        """exchange="auto"'s rule: exchange when direct reads would fetch at least AUTO_MIN_REPEATED more
        than the bytes needed (DDP, HSDP, fine-tuning loads); a reshard whose only shared frames are those
        straddling shard boundaries reads directly (an exchange round costs more than those few frames)."""
        return worth_exchanging(sum(p.nbytes for p in self.pieces), self.repeated_bytes, self.shared)

    def fetched_bytes(self, rank: int) -> int:
        return sum(p.nbytes for p in self.pieces if p.fetcher == rank)

    def received_bytes(self, rank: int) -> int:
        """Bytes this rank gets from other ranks (not from storage)."""
        return sum(p.nbytes for p in self.pieces if p.fetcher != rank and rank in p.receivers)

    @_gc_paused
    def schedule(self, rank: int) -> RankSchedule:
        """This rank's sends and receives, round by round. Every rank calls it on the plan it computed;
        O(pieces of the deliveries it is part of)."""
        sends: dict[int, list[tuple[int, int]]] = {}
        recvs: dict[int, list[tuple[int, int]]] = {}
        has: dict[int, int] = {}
        last_send: dict[int, int] = {}
        pieces = self.pieces

        def put(book, k, peer, i):
            book.setdefault(k, []).append((peer, i))
            if book is sends:
                last_send[i] = max(last_send.get(i, k), k)
            else:
                has[i] = k
        for d in self.deliveries:
            n = len(d.ranks)
            pos = bisect.bisect_left(d.ranks, rank)
            pos = pos if pos < n and d.ranks[pos] == rank else -1
            root = d.ranks[0]
            kids = [d.ranks[c] for c in (2 * pos + 1, 2 * pos + 2) if pos >= 0 and c < n]
            for start, idx in d.gens:
                for i in idx:
                    p = pieces[i]
                    if d.star:
                        if p.fetcher == rank:
                            has[i] = start
                            for r in d.ranks:
                                if r != rank:
                                    put(sends, start, r, i)
                        elif pos >= 0:
                            put(recvs, start, p.fetcher, i)
                        continue
                    if p.fetcher == rank:
                        has[i] = start
                        if rank != root:
                            put(sends, start, root, i)
                    elif pos == 0:
                        put(recvs, start, p.fetcher, i)
                    elif pos > 0:
                        put(recvs, start + depth(pos), d.ranks[(pos - 1) // 2], i)
                    for kid in kids:
                        if p.fetcher != kid:
                            put(sends, start + depth(pos) + 1, kid, i)
        for book in (sends, recvs):
            for v in book.values():
                v.sort()
        return RankSchedule(sends, recvs, has, last_send)

    def round_peaks(self) -> tuple[int, int]:
        """(send, receive): at most this many bytes any rank puts in, and gets out of, one round's
        all_to_all: the exchange's memory per rank (bench.scale and tests/test_scale.py pin it). Deliveries
        of at most PACK_RANKS ranks: their exact sums per rank and round (_demand). Larger trees (their
        ranks in no other delivery while they run): an upper bound from their shape: a position at
        depth d receives the generation that started d rounds before (the root: the one starting now,
        from its fetchers); it sends its children the one that started d + 1 rounds before and, unless it
        is the root, its own fetched share of the one starting now. O(rounds x tree depth) for those,
        whatever the world size; O(ranks x generations) for packed ones."""
        top_send = top_recv = 0
        packed: dict[tuple[int, int], list[int]] = {}
        small = [d for d in self.deliveries if len(d.ranks) <= PACK_RANKS]
        ps = [self.pieces[i] for d in small for _, ix in d.gens for i in ix]
        offs, *entries = _demand([d.ranks for d in small], [d.star for d in small],
                                 [[len(ix) for _, ix in d.gens] for d in small],
                                 np.array([p.fetcher for p in ps], dtype=np.int64),
                                 np.array([p.nbytes for p in ps], dtype=np.int64), self.world_size)
        rr, kk, ss, vv = (a.tolist() for a in entries)
        for j, d in enumerate(small):  # packed deliveries share rounds: what each rank sends and receives, summed
            first = d.gens[0][0] if d.gens else 0
            for e in range(offs[j], offs[j + 1]):
                u = packed.setdefault((rr[e], first + kk[e]), [0, 0])
                u[0], u[1] = u[0] + ss[e], u[1] + vv[e]
        for d in self.deliveries:
            n = len(d.ranks)
            if n <= PACK_RANKS:
                continue
            size = {start: sum(self.pieces[i].nbytes for i in idx) for start, idx in d.gens}
            share, to_root = {}, {}
            for start, idx in d.gens:
                per: dict[int, int] = {}
                for i in idx:
                    p = self.pieces[i]
                    if p.fetcher != d.ranks[0]:
                        per[p.fetcher] = per.get(p.fetcher, 0) + p.nbytes
                share[start], to_root[start] = max(per.values(), default=0), sum(per.values())
            last = max(size) + d.depth + 1 if size else 0
            for t in range(min(size, default=0), last):
                recv = max([to_root.get(t, 0)] + [size.get(t - k, 0) for k in range(1, d.depth + 1)])
                send = share.get(t, 0)
                for k in range(d.depth + 1):
                    first = (1 << k) - 1  # the level's first position; its children exist if 2i + 1 < n
                    kids = min(2, max(0, n - (2 * first + 1)))
                    if kids:
                        send = max(send, kids * size.get(t - k - 1, 0) + (share.get(t, 0) if k else 0))
                top_send, top_recv = max(top_send, send), max(top_recv, recv)
        for snd, rcv in packed.values():
            top_send, top_recv = max(top_send, snd), max(top_recv, rcv)
        return top_send, top_recv


def worth_exchanging(needed: int, repeated: int, shared: bool) -> bool:
    """exchange="auto"'s rule, from the bytes some rank needs and those direct reads would fetch more than
    once (ExchangePlan.worth_exchanging; plan.needers decides it from per-frame counts alone)."""
    return shared and repeated >= AUTO_MIN_REPEATED * needed


def merge_runs(runs: Sequence[Run]) -> list[Run]:
    """Sorted runs with overlapping or adjacent ones of a file merged."""
    out: list[list[int]] = []
    for f, a, b in sorted(r for r in runs if r[2] > r[1]):
        if out and out[-1][0] == f and a <= out[-1][2]:
            out[-1][2] = max(out[-1][2], b)
        else:
            out.append([f, a, b])
    return [tuple(r) for r in out]


@_gc_paused
def plan_exchange(needs: Sequence[Sequence[Run]], frame_offsets: dict[int, Sequence[int]], *,
                  min_piece: int = MIN_PIECE, max_piece: int = MAX_PIECE,
                  round_bytes: int = ROUND_BYTES, holders: dict[int, Sequence[int]] | None = None
                  ) -> ExchangePlan:
    """Plan a read-once restore.

    Args:
        needs: per rank of the group, the frame runs it needs (any order; merged here).
        frame_offsets: per file id, the byte offset of each frame and, last, the file's size (len frames + 1).
        min_piece, max_piece: bounds of a piece's stored bytes (a piece is never cut inside a frame).
        round_bytes: the budget of one round: the most a rank fetches, sends or receives in one round
            (pieces sent through a tree are cut to at most an eighth of it, in a star of n ranks to
            1/n; a single frame larger than a third of it is the one thing that can exceed it).
        holders: per file id, the ranks able to fetch it (a file not named: every rank). None: every rank
            may fetch every file (a shared store).

    Returns:
        The ExchangePlan, the same on every rank for the same inputs.
    """
    world = len(needs)
    groups: dict[tuple, list[int]] = {}
    merged: dict[int, tuple] = {}  # replicas' needs are usually one object (exchange.run): merged once
    for rank, runs in enumerate(needs):
        key = merged.get(id(runs))
        if key is None:
            key = merged[id(runs)] = tuple(merge_runs(runs))
        groups.setdefault(key, []).append(rank)
    return plan_segments(_segments(list(groups.items())), world, frame_offsets, min_piece=min_piece,
                         max_piece=max_piece, round_bytes=round_bytes, holders=holders)


@_gc_paused
def plan_segments(segments: Sequence[Segment], world: int, frame_offsets: dict[int, Sequence[int]], *,
                  min_piece: int = MIN_PIECE, max_piece: int = MAX_PIECE, round_bytes: int = ROUND_BYTES,
                  holders: dict[int, Sequence[int]] | None = None) -> ExchangePlan:
    """plan_exchange from step 2's segments: (file, first frame, end frame, the sorted ranks needing them),
    in file order, adjacent ones with the same ranks merged; what plan.needers.segments_from_sums gives
    without any rank's needs. The other arguments as for plan_exchange."""
    load = [0] * world
    heaps: dict[tuple[int, ...], list] = {}
    pieces: list[Piece] = []
    add, replace = pieces.append, heapq.heapreplace
    shared = False
    for f, a, b, needers in segments:
        n = len(needers)
        shared = shared or n > 1
        offs = frame_offsets[f]
        fetchers = needers if holders is None or f not in holders else _fetchers(needers, holders[f], f)
        heap = heaps.get(fetchers)
        if heap is None:  # a new candidate set starts from the loads other sets already gave its ranks
            heap = heaps[fetchers] = sorted((load[r], r) for r in fetchers)
        if b - a > 1:
            # a star: each fetcher's share goes to up to n ranks; a tree: small pieces, so that generations
            # pack close to their (budget - share) / 2
            top = max(1, min(max_piece, round_bytes // n if n <= STAR_RANKS else round_bytes // 8))
            cuts = _cut(offs, a, b, n, min(min_piece, top), top)
        else:
            cuts = ((a, b),)
        for lo, hi in cuts:
            nbytes = offs[hi] - offs[lo]
            # the least-loaded fetcher (one entry per rank, so ties cannot reorder); entries go stale when
            # another segment loads a rank
            got, r = heap[0]
            while got != load[r]:
                replace(heap, (load[r], r))
                got, r = heap[0]
            load[r] = got = got + nbytes
            replace(heap, (got, r))
            add(Piece(f, lo, hi, nbytes, r, needers))
    deliveries, rounds = _deliveries(pieces, world, round_bytes)
    return ExchangePlan(tuple(pieces), rounds, shared, world, deliveries)


def _fetchers(needers: tuple[int, ...], holders: Sequence[int], f: int) -> tuple[int, ...]:
    """Who may fetch a piece of file f: the needers that hold it, else every holder."""
    held = set(holders)
    if not held:
        raise ValueError(f"file {f} is needed but no rank holds it")
    return tuple(r for r in needers if r in held) or tuple(sorted(held))


def _segments(groups: list[tuple[tuple, list[int]]]) -> list[Segment]:
    """(file, first, end, needing ranks) with one needer set each, in file order (a sweep over the runs'
    boundaries with the set of covering groups)."""
    events: dict[int, list] = {}
    for g, (runs, _) in enumerate(groups):
        for f, a, b in runs:
            events.setdefault(f, []).extend(((a, 1, g), (b, -1, g)))
    out: list[Segment] = []
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


def _deliveries(pieces: list[Piece], world: int, round_bytes: int
                ) -> tuple[tuple[Delivery, ...], tuple[tuple[int, ...], ...]]:
    """One Delivery per set of receiving ranks, in the order their first piece comes in the files: its
    pieces packed into generations (step 4 of the module docstring). A delivery to at most PACK_RANKS
    ranks starts in the first round from which what each of its ranks sends and receives (_demand),
    added to what earlier packed deliveries put in the same rounds, stays within round_bytes, and after
    any large tree of its ranks; a larger tree starts in the first round in which none of its ranks
    (receivers and fetchers) is busy with an earlier delivery. Returns the deliveries and, per round, the
    pieces fetched in it. The packed deliveries' demands are computed at once (numpy, independent of their
    start rounds); only the placement is a loop over deliveries (an FSDP restore at 16,384 ranks has
    thousands of deliveries to about 20 ranks)."""
    by_set: dict[tuple[int, ...], list[int]] = {}
    same: dict[int, list[int]] = {}  # by the receivers tuple's identity: hashing 16,384 ranks per piece is slow
    for i, p in enumerate(pieces):
        lst = same.get(id(p.receivers))
        if lst is None:
            lst = same[id(p.receivers)] = by_set.setdefault(p.receivers, [])
        lst.append(i)
    sets = list(by_set.items())
    stars, all_gens = [], []
    for ranks, idx in sets:
        # a star unless a piece sent to every other rank of the set alone would exceed the budget
        n = len(ranks)
        members = set(ranks) if n <= STAR_RANKS else ()
        star = n <= STAR_RANKS and all(pieces[i].nbytes * (n - (pieces[i].fetcher in members)) <= round_bytes
                                       for i in idx)
        stars.append(star)
        all_gens.append(_generations([pieces[i] for i in idx], idx, n, round_bytes, star, ranks))
    packed = [d for d, (ranks, _) in enumerate(sets) if len(ranks) <= PACK_RANKS]
    order = [i for d in packed for i in sets[d][1]]
    fetcher = np.fromiter((p.fetcher for p in pieces), np.int64, len(pieces))
    offs, rr, kk, snd, rcv = _demand([sets[d][0] for d in packed], [stars[d] for d in packed],
                                     [[len(g) for g in all_gens[d]] for d in packed], fetcher[order],
                                     np.fromiter((pieces[i].nbytes for i in order), np.int64, len(order)), world)
    slot, offs = {d: j for j, d in enumerate(packed)}, offs.tolist()
    busy = np.zeros(world, dtype=np.int64)  # the first round each rank is free of large trees
    used = _Used(world)  # per rank and round, bytes sent and received by packed deliveries
    any_tree = False
    out: list[Delivery] = []
    fetch: dict[int, list[int]] = {}
    total = 0
    for d, (ranks, idx) in enumerate(sets):
        gens, star = all_gens[d], stars[d]
        if d in slot:
            a, b = offs[slot[d]], offs[slot[d] + 1]
            start = 0 if not any_tree else int(max(busy[np.asarray(ranks)].max(), busy[fetcher[idx]].max()))
            start = used.place(rr[a:b], kk[a:b], snd[a:b], rcv[a:b], start, round_bytes)
        else:
            involved = np.union1d(np.asarray(ranks, dtype=np.int64), fetcher[idx])
            start = int(max(busy[involved].max(), used.last[involved].max() + 1))
        out.append(Delivery(ranks, tuple((start + g, tuple(ix)) for g, ix in enumerate(gens)), star))
        for g, ix in enumerate(gens):
            fetch.setdefault(start + g, []).extend(ix)
        end = start + len(gens) + out[-1].depth
        total = max(total, end)
        if d not in slot:
            busy[involved], any_tree = end, True
    return tuple(out), tuple(tuple(sorted(fetch.get(k, ()))) for k in range(total))


class _Used:
    """What packed deliveries put in each (rank, round): bytes sent and received (_deliveries' ledger), a
    dense (2, ranks, rounds) array grown by rounds as deliveries start later (16 bytes a rank and round:
    4 MiB for 16,384 ranks and 16 rounds), and the last round each rank is used in. A delivery of a few entries (a local tier's: one rank and its fetchers) is placed
    by a Python loop over them, a larger one with numpy over a window of start rounds."""
    SMALL = 12

    def __init__(self, world: int):
        self.a = np.zeros((2, world, 16), dtype=np.int64)
        self.last = np.full(world, -1, dtype=np.int64)

    def _grow(self, rounds: int) -> None:
        if rounds > self.a.shape[2]:
            a = np.zeros((2, self.a.shape[1], max(rounds, 2 * self.a.shape[2])), dtype=np.int64)
            a[:, :, :self.a.shape[2]] = self.a
            self.a = a

    def place(self, rr, kk, snd, rcv, start: int, round_bytes: int) -> int:
        """Book a delivery's entries (distinct (rank rr, round kk) pairs, sorted by rank then round) from the
        first round from `start` from which each fits: a (rank, round) nothing uses yet takes any demand,
        else both sums stay within round_bytes. Returns that round."""
        if not len(rr):
            return start
        if len(rr) <= self.SMALL:
            return self._place_few(rr.tolist(), kk.tolist(), snd.tolist(), rcv.tolist(), start, round_bytes)
        start = self._first_fit(rr, kk, snd, rcv, start, round_bytes)
        cols = start + kk
        self._grow(int(cols.max()) + 1)
        self.a[0][rr, cols] += snd
        self.a[1][rr, cols] += rcv
        last = np.flatnonzero(np.concatenate((rr[1:] != rr[:-1], [True])))  # each rank's latest round
        self.last[rr[last]] = np.maximum(self.last[rr[last]], cols[last])
        return start

    def _place_few(self, rr, kk, snd, rcv, start: int, round_bytes: int) -> int:
        self._grow(start + max(kk) + 1)
        sent, got = self.a[0], self.a[1]
        while True:
            for r, k, s, v in zip(rr, kk, snd, rcv):
                us, ur = int(sent[r, start + k]), int(got[r, start + k])
                if (us or ur) and (us + s > round_bytes or ur + v > round_bytes):
                    break
            else:
                break
            start += 1
            self._grow(start + max(kk) + 1)
            sent, got = self.a[0], self.a[1]
        for r, k, s, v in zip(rr, kk, snd, rcv):
            sent[r, start + k] += s
            got[r, start + k] += v
            if start + k > self.last[r]:
                self.last[r] = start + k
        return start

    def _first_fit(self, rr, kk, snd, rcv, start: int, round_bytes: int, window: int = 8) -> int:
        span = np.arange(window)
        while True:
            cols = start + kk[:, None] + span[None, :]
            self._grow(start + int(kk.max()) + window)
            us, ur = self.a[0][rr[:, None], cols], self.a[1][rr[:, None], cols]
            ok = (((us == 0) & (ur == 0)) | ((us + snd[:, None] <= round_bytes) & (ur + rcv[:, None] <= round_bytes)))
            fits = ok.all(axis=0)
            if fits.any():
                return start + int(np.argmax(fits))
            start += window


def _demand(ranks: Sequence[tuple[int, ...]], stars: Sequence[bool], gen_sizes: Sequence[Sequence[int]],
            fetcher: np.ndarray, nbytes: np.ndarray, world: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What deliveries of at most PACK_RANKS ranks each make each rank send and receive, per round after
    the delivery's start: generation g starts in round g. A star: a fetcher sends its share to every rank
    of the set but itself, a rank of the set receives the generation less its own share. A tree:
    fetchers other than the root send their shares to the root in round g; position i receives the
    generation less its own share from its parent in round g + depth(i). Exact (round_peaks sums it).

    Args:
        ranks, stars: per delivery, its sorted ranks and whether it is a star.
        gen_sizes: per delivery, the number of pieces of each generation.
        fetcher, nbytes: every piece's, the deliveries' pieces one after the other, in generation order.
        world: more than any rank.

    Returns:
        (offsets, rank, round, bytes sent, bytes received): delivery j's entries are [offsets[j],
        offsets[j + 1]), one per (rank, round) it touches, sorted by rank then round.
    """
    i64, nd = np.int64, len(ranks)
    n_of = np.fromiter(map(len, ranks), i64, nd)
    members = np.fromiter(itertools.chain.from_iterable(ranks), i64, int(n_of.sum()))
    rank_off = _starts(n_of)
    g_of = np.fromiter(map(len, gen_sizes), i64, nd)
    gen_d = np.repeat(np.arange(nd, dtype=i64), g_of)  # each generation's delivery and number in it
    ngen = len(gen_d)
    if not ngen:
        return np.zeros(nd + 1, dtype=i64), *(np.zeros(0, dtype=i64),) * 4
    gen_local = np.arange(ngen, dtype=i64) - _starts(g_of)[gen_d]
    gsz = np.fromiter(itertools.chain.from_iterable(gen_sizes), i64, ngen)
    size = np.add.reduceat(nbytes, _starts(gsz)[:-1])
    star = np.asarray(stars, dtype=bool)
    # each fetcher's share of each generation, and its position in the delivery's ranks (if one)
    key, (share,) = _group_sums(np.repeat(np.arange(ngen, dtype=i64), gsz) * world + fetcher, nbytes)
    s_gen, s_fetcher = key // world, key % world
    s_d = gen_d[s_gen]
    where = np.repeat(np.arange(nd, dtype=i64), n_of) * world + members  # sorted: each delivery's ranks are
    j = np.minimum(np.searchsorted(where, s_d * world + s_fetcher), len(where) - 1)
    inside = where[j] == s_d * world + s_fetcher
    # per (generation, position): what the position receives, the generation less its own share
    e_off = _starts(n_of[gen_d])
    e_gen = np.repeat(np.arange(ngen, dtype=i64), n_of[gen_d])
    e_pos = np.arange(len(e_gen), dtype=i64) - e_off[e_gen]
    e_d = gen_d[e_gen]
    e_rank = members[rank_off[e_d] + e_pos]
    got = size[e_gen]
    got[e_off[s_gen[inside]] + (j - rank_off[s_d])[inside]] -= share[inside]
    ss, es, roots = star[s_d], star[e_d], members[rank_off[s_d]]
    up = ~ss & (s_fetcher != roots)  # a tree's fetchers send their shares to its root
    down = ~es & (e_pos > 0) & (got != 0)  # a tree position gets the generation from its parent
    k_down = gen_local[e_gen[down]] + _depths(int(n_of.max()))[e_pos[down]]
    parents = members[rank_off[e_d[down]] + (e_pos[down] - 1) // 2]
    nil = lambda mask: np.zeros(int(mask.sum()), dtype=i64)  # noqa: E731
    parts = [  # (delivery, rank, round, sent, received)
        (s_d[ss], s_fetcher[ss], gen_local[s_gen[ss]], share[ss] * (n_of[s_d[ss]] - inside[ss]), nil(ss)),
        (e_d[es], e_rank[es], gen_local[e_gen[es]], nil(es), got[es]),
        (s_d[up], s_fetcher[up], gen_local[s_gen[up]], share[up], nil(up)),
        (s_d[up], roots[up], gen_local[s_gen[up]], nil(up), share[up]),
        (e_d[down], e_rank[down], k_down, nil(down), got[down]),
        (e_d[down], parents, k_down, got[down], nil(down))]
    d_, r_, k_, snd, rcv = (np.concatenate([q[c] for q in parts]) for c in range(5))
    span = int(k_.max()) + 1 if len(k_) else 1
    key, (snd, rcv) = _group_sums((d_ * world + r_) * span + k_, snd, rcv)
    offsets = np.searchsorted(key // (world * span), np.arange(nd + 1, dtype=i64))
    return offsets, (key // span) % world, key % span, snd, rcv


def _starts(counts: np.ndarray) -> np.ndarray:
    """Where each of consecutive groups of these sizes starts, and (last) their total."""
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def _group_sums(key: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct keys, ascending, and each value array summed over the entries of each key."""
    order = np.argsort(key, kind="stable")
    ks = key[order]
    cut = np.flatnonzero(np.concatenate(([True], ks[1:] != ks[:-1]))) if len(ks) else np.zeros(0, dtype=np.int64)
    return ks[cut], [np.add.reduceat(v[order], cut) if len(cut) else v[:0] for v in values]


@functools.lru_cache(maxsize=None)
def _depths(n: int) -> np.ndarray:
    """depth(position) for positions 0 .. n - 1 (read-only: cached)."""
    out = np.array([depth(pos) for pos in range(n)], dtype=np.int64)
    out.flags.writeable = False
    return out


def _generations(ps: list[Piece], idx: list[int], n: int, round_bytes: int, star: bool,
                 ranks: tuple[int, ...] = ()) -> list[list[int]]:
    """A delivery's pieces (file order) packed into generations. A star: a fetcher of the set sends its
    share to the n - 1 others (one outside it, a holder, to all n) and a rank receives the generation
    less its own share, each within round_bytes. A tree: a position sends its two children a generation
    and, unless it is the root, its fetched share of the next one; so 2 x generation + the largest share
    stays within round_bytes (the largest share being at least the largest piece)."""
    if star:
        def fits(p: Piece, size: int, share: dict) -> bool:
            mine = share.get(p.fetcher, 0) + p.nbytes
            return (mine * (n - 1 if p.fetcher in ranks else n) <= round_bytes
                    and size + p.nbytes - min(share.get(r, 0) + (p.nbytes if r == p.fetcher else 0)
                                              for r in ranks) <= round_bytes)
    else:
        share_cap = max(p.nbytes for p in ps)
        cap = max(share_cap, (round_bytes - share_cap) // 2)

        def fits(p: Piece, size: int, share: dict) -> bool:
            return size + p.nbytes <= cap and share.get(p.fetcher, 0) + p.nbytes <= share_cap
    gens: list[list[int]] = []
    size, share = 0, {}
    for p, i in zip(ps, idx):
        if gens and fits(p, size, share):
            gens[-1].append(i)
        else:
            gens.append([i])
            size, share = 0, {}
        size += p.nbytes
        share[p.fetcher] = share.get(p.fetcher, 0) + p.nbytes
    return gens

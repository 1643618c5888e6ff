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

Why one module of ~480 lines: the plan's records (Piece, Delivery, ExchangePlan, with each rank's
schedule and the bound) and the planner that builds them are one contract: schedule and round_peaks read
the shapes that _deliveries and _demand build, and a change to one is a change to the other.
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
STAR_RANKS = 8  # up to this many ranks need a piece: its fetcher sends it to each, in one round
PACK_RANKS = 256  # deliveries to at most this many ranks share rounds where each rank's budget allows

Run = tuple[int, int, int]  # (file id, first frame, end frame)
Segment = tuple[int, int, int, tuple[int, ...]]  # a run and the ranks that need it


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
        for d in self.deliveries:
            n = len(d.ranks)
            size = {start: sum(self.pieces[i].nbytes for i in idx) for start, idx in d.gens}
            if n <= PACK_RANKS:  # packed deliveries share rounds: what each rank sends and receives, summed
                first = d.gens[0][0] if d.gens else 0
                for (r, k), (snd, rcv) in _demand(self.pieces, d.ranks, d.star, [ix for _, ix in d.gens]).items():
                    u = packed.setdefault((r, first + k), [0, 0])
                    u[0], u[1] = u[0] + snd, u[1] + rcv
                continue
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


def plan_segments(segments: Sequence[Segment], world: int, frame_offsets: dict[int, Sequence[int]], *,
                  min_piece: int = MIN_PIECE, max_piece: int = MAX_PIECE, round_bytes: int = ROUND_BYTES,
                  holders: dict[int, Sequence[int]] | None = None) -> ExchangePlan:
    """plan_exchange from step 2's segments: (file, first frame, end frame, the sorted ranks needing them),
    in file order, adjacent ones with the same ranks merged; what plan.needers.segments_from_sums gives
    without any rank's needs. The other arguments as for plan_exchange."""
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
        # a star: each fetcher's share goes to up to n ranks; a tree: small pieces, so that generations pack
        # close to their (budget - share) / 2
        n = len(needers)
        top = max(1, min(max_piece, round_bytes // n if n <= STAR_RANKS else round_bytes // 8))
        for lo, hi in _cut(offs, a, b, len(needers), min(min_piece, top), top) if b - a > 1 else ((a, b),):
            nbytes = offs[hi] - offs[lo]
            while True:  # least-loaded needer; heap entries go stale when another segment loads a rank
                got, r = heapq.heappop(heap)
                if got == load[r]:
                    break
                heapq.heappush(heap, (load[r], r))
            load[r] += nbytes
            heapq.heappush(heap, (load[r], r))
            pieces.append(Piece(f, lo, hi, nbytes, r, needers))
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
    pieces fetched in it."""
    by_set: dict[tuple[int, ...], list[int]] = {}
    same: dict[int, list[int]] = {}  # by the receivers tuple's identity: hashing 16,384 ranks per piece is slow
    for i, p in enumerate(pieces):
        lst = same.get(id(p.receivers))
        if lst is None:
            lst = same[id(p.receivers)] = by_set.setdefault(p.receivers, [])
        lst.append(i)
    busy = [0] * world  # the first round each rank is free of large trees
    last_packed = [-1] * world  # the last round a packed delivery uses each rank
    used: dict[tuple[int, int], list[int]] = {}  # (rank, round) -> [bytes sent, received] by packed deliveries
    out: list[Delivery] = []
    fetch: dict[int, list[int]] = {}
    total = 0
    for ranks, idx in by_set.items():
        # a star unless a piece sent to every other rank of the set alone would exceed the budget
        n, members = len(ranks), set(ranks)
        star = n <= STAR_RANKS and all(pieces[i].nbytes * (n - (pieces[i].fetcher in members)) <= round_bytes
                                       for i in idx)
        gens = _generations([pieces[i] for i in idx], idx, len(ranks), round_bytes, star, ranks)
        involved = members | {pieces[i].fetcher for i in idx}
        if n <= PACK_RANKS:
            demand = _demand(pieces, ranks, star, gens)
            start = max(busy[r] for r in involved)
            while not all(_fits(used.get((r, start + k), (0, 0)), d, round_bytes) for (r, k), d in demand.items()):
                start += 1
            for (r, k), (snd, rcv) in demand.items():
                u = used.setdefault((r, start + k), [0, 0])
                u[0], u[1] = u[0] + snd, u[1] + rcv
                last_packed[r] = max(last_packed[r], start + k)
        else:
            start = max(max(busy[r], last_packed[r] + 1) for r in involved)
        out.append(Delivery(ranks, tuple((start + g, tuple(ix)) for g, ix in enumerate(gens)), star))
        for g, ix in enumerate(gens):
            fetch.setdefault(start + g, []).extend(ix)
        end = start + len(gens) + out[-1].depth
        total = max(total, end)
        if n > PACK_RANKS:
            for r in involved:
                busy[r] = end
    return tuple(out), tuple(tuple(sorted(fetch.get(k, ()))) for k in range(total))


def _demand(pieces, ranks: tuple[int, ...], star: bool, gens) -> dict[tuple[int, int], list[int]]:
    """What a delivery of at most PACK_RANKS ranks makes each rank send and receive, per (rank, round
    after its start): generation g starts in round g. A star: a fetcher sends its share to every rank of
    the set but itself, a rank of the set receives the generation less its own share. A tree: fetchers
    other than the root send their shares to the root in round g; position i receives the generation
    less its own share from its parent in round g + depth(i). Exact (round_peaks sums it)."""
    out: dict[tuple[int, int], list[int]] = {}
    n = len(ranks)
    depths = [depth(pos) for pos in range(n)]
    parents = [ranks[(pos - 1) // 2] for pos in range(n)]
    get = out.get
    for g, idx in enumerate(gens):
        share: dict[int, int] = {}
        for i in idx:
            share[pieces[i].fetcher] = share.get(pieces[i].fetcher, 0) + pieces[i].nbytes
        size = sum(share.values())
        moves: list[tuple[int, int, int, int]] = []  # (rank, round, 0 sent / 1 received, bytes)
        if star:
            moves += [(f, g, 0, b * (n - (f in ranks))) for f, b in share.items()]
            moves += [(r, g, 1, size - share.get(r, 0)) for r in ranks]
        else:
            for f, b in share.items():
                if f != ranks[0]:
                    moves += [(f, g, 0, b), (ranks[0], g, 1, b)]
            for pos in range(1, n):
                got = size - share.get(ranks[pos], 0)
                if got:
                    k = g + depths[pos]
                    moves += [(ranks[pos], k, 1, got), (parents[pos], k, 0, got)]
        for r, k, side, b in moves:
            u = get((r, k))
            if u is None:
                u = out[(r, k)] = [0, 0]
            u[side] += b
    return out


def _fits(used, demand: tuple[int, int], round_bytes: int) -> bool:
    """Whether a rank's round takes this demand too (a round nothing else uses takes any)."""
    return not (used[0] or used[1]) or (used[0] + demand[0] <= round_bytes and used[1] + demand[1] <= round_bytes)


def _generations(ps: list[Piece], idx: list[int], n: int, round_bytes: int, star: bool,
                 ranks: tuple[int, ...] = ()) -> list[list[int]]:
    """A delivery's pieces (file order) packed into generations. A star: a fetcher of the set sends its
    share to the n - 1 others (one outside it, a holder, to all n) and a rank receives the generation
    less its own share, each within round_bytes. A tree: a position sends its two children a generation
    and, unless it is the root, its fetched share of the next one; so 2 x generation + the largest share
    stays within round_bytes (the largest share being at least the largest piece)."""
    if star:
        return _star_generations(ps, idx, n, round_bytes, ranks)
    share_cap = max(p.nbytes for p in ps)
    cap = max(share_cap, (round_bytes - share_cap) // 2)
    gens: list[list[int]] = []
    size, share = 0, {}
    for p, i in zip(ps, idx):
        if gens and size + p.nbytes <= cap and share.get(p.fetcher, 0) + p.nbytes <= share_cap:
            gens[-1].append(i)
        else:
            gens.append([i])
            size, share = 0, {}
        size += p.nbytes
        share[p.fetcher] = share.get(p.fetcher, 0) + p.nbytes
    return gens


def _star_generations(ps: list[Piece], idx: list[int], n: int, round_bytes: int,
                      ranks: tuple[int, ...]) -> list[list[int]]:
    gens: list[list[int]] = []
    size, share = 0, {}
    for p, i in zip(ps, idx):
        mine = share.get(p.fetcher, 0) + p.nbytes
        fits = (mine * (n - 1 if p.fetcher in ranks else n) <= round_bytes
                and size + p.nbytes - min(share.get(r, 0) + (p.nbytes if r == p.fetcher else 0)
                                          for r in ranks) <= round_bytes)
        if gens and fits:
            gens[-1].append(i)
        else:
            gens.append([i])
            size, share = 0, {}
        size += p.nbytes
        share[p.fetcher] = share.get(p.fetcher, 0) + p.nbytes
    return gens

"""Read-once restore: the group fetches every needed stored byte from storage once and shares it.

Who calls it: shardckpt.api.load (and load_full with a process_group), on every rank of the load's group,
in this order (each step a collective on shardckpt's gloo companion group, with its timeout):
  1. read_metadata: the coordinator reads manifest.json and every index file and broadcasts them (or the
     typed error); every rank validates them itself (checksums included)
  2. run, all ranks:
     a. one all-reduce of five integers (every rank needs every frame? then the needs are known: DDP,
        fine-tuning), else one of three int64 a frame (plan.needers: each frame's needer count, the sum
        of their ranks and of their squares), whatever the world size. Under "auto", when direct reads
        would fetch less than 1/8 more than needed (FSDP on few ranks; a reshard sharing only the frames
        at shard boundaries) each rank reads its own frames (reader.run_reads) and goes to d; else where
        each frame's needers are contiguous ranks (FSDP on many ranks) every rank reads the plan's
        segments off the sums (exchange_plan.plan_segments): no rank learns another's needs
     b. otherwise gather every rank's needs (runs of frames of each data file) and any error a rank met
        while planning (then every rank raises it), digests first: replicas' identical needs are sent
        once and planned once; then exchange_plan.plan_exchange, the same on every rank
     c. if a's rule (which plan.worth_exchanging repeats) still says so, direct reads; else (or with
        "always", or a local tier's holders) rounds of:
          fetch this rank's pieces of the round (crc32c of every frame checked by the fetcher, so a corrupt
          frame is reported by the rank that fetched it) -> one all-reduce: did any rank fail? ->
          all_to_all of the stored (still compressed) bytes: the fetched pieces straight to the few
          ranks of a star, or to a tree's root and each tree position's pieces to its children
          (ExchangePlan.schedule: no rank sends or receives more than the round budget, whatever the
          world size) -> decode the read tasks whose
          frames are all in -> drop the pieces no pending task needs and no later round forwards
     d. one gather + broadcast of the outcome: every rank returns, or every rank raises the same typed error
Compressed bytes are sent, not decoded ones: they are fewer (about 0.67x for bf16 weights), and each rank
decodes only what it needs, with all its threads, as a direct read would.
CUDA: the bytes travel through host memory on the gloo group; the tensors they decode into may be on any
device (decode lands in host scratch, then copies). An NCCL transport for GPU-resident targets would
replace the all_to_all call only.
Why one module of ~440 lines: steps 1 and 2 are one protocol whose collectives must stay in step on every
rank (the same branches, in the same order); its pure parts live in plan/ (exchange_plan, needers).
"""
from __future__ import annotations

import bisect
import json
import struct
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from shardckpt.native import kernels as _ext
from shardckpt.format.codec import threads
from shardckpt.errors import CheckpointError, ChecksumError, IncompleteCheckpointError, error_from, error_record
from shardckpt.plan.exchange_plan import ExchangePlan, plan_exchange, plan_segments, worth_exchanging
from shardckpt.plan.needers import frame_bytes, needer_sums, runs_bytes, segments_from_sums, worth_exchanging_counts
from shardckpt.format.records import MANIFEST_NAME, Chunk, Manifest
from shardckpt.format.parse import parse_manifest
from shardckpt.plan.geometry import frame_span
from shardckpt.loading.profile import phase
from shardckpt.loading.reader import ReadStats, ReadTask, decode_task, run_reads
from shardckpt.format.refs import base_storage
from shardckpt.storage.base import ReadRange, Storage

MODES = ("auto", "always", "never")


# ------------------------------------------------------------------------------------------ metadata

def read_metadata(storage: Storage, comm) -> tuple[bytes, list[bytes]]:
    """All ranks: the manifest's bytes and every index file's bytes (manifest order), read by the
    coordinator only and broadcast. A failure to read them raises the same typed error on every rank."""
    from shardckpt.format.metadata import manifest_bytes
    blob, head = None, None
    if comm.is_coordinator:
        try:
            data = manifest_bytes(storage)  # one read: parsed here, the same bytes broadcast
            manifest = parse_manifest(data, file=f"{storage.url}/{MANIFEST_NAME}")

            def one(entry):
                try:
                    return storage.read_file(entry.index)
                except FileNotFoundError:
                    raise IncompleteCheckpointError("index file listed in the manifest is missing",
                                                    file=f"{storage.url}/{entry.index}", rank=entry.rank) from None
            with ThreadPoolExecutor(min(16, max(1, len(manifest.files)))) as pool:
                parts = [data] + list(pool.map(one, manifest.files))
            blob = struct.pack(f"<I{len(parts)}Q", len(parts), *map(len, parts)) + b"".join(parts)
            head = {"ok": True, "nbytes": len(blob)}
        except Exception as e:
            head = {"ok": False, "error": error_record(e, comm.rank)}
    head = comm.broadcast_json(head)
    if not head["ok"]:
        raise error_from(head["error"])
    blob = comm.broadcast_bytes(blob, head["nbytes"])
    (n,) = struct.unpack_from("<I", blob)
    lens = struct.unpack_from(f"<{n}Q", blob, 4)
    pos, parts = 4 + 8 * n, []
    for k in lens:
        parts.append(blob[pos:pos + k])
        pos += k
    return parts[0], parts[1:]


# ------------------------------------------------------------------------------------------ frames

@dataclass
class _Files:
    """Every data file's frames numbered in file order: offsets (plus the file size last), crc32c, and the
    chunk each frame belongs to (for naming a corrupt one). The files of references (FORMAT.md §7) are in
    their base checkpoints and numbered too; the stretches between the referenced frames there (other
    chunks of the base) are numbered as frames no task needs, with crc32c None."""
    names: list[str]
    ids: dict[tuple[str, str], int]  # (base dir or "", file name) -> file id
    offsets: dict[int, list[int]]
    crcs: dict[int, list[int | None]]
    owners: dict[int, list[tuple[int, Chunk]]]  # per file: (first frame, chunk), sorted
    bases: list[str] = field(default_factory=list)  # per file id: "" or the base directory holding it

    @classmethod
    def build(cls, manifest: Manifest, chunks_by_key: dict[str, list[Chunk]]) -> "_Files":
        keys = [("", f.data) for f in manifest.files]
        ids = {k: i for i, k in enumerate(keys)}
        per: dict[int, list[Chunk]] = defaultdict(list)
        for chunks in chunks_by_key.values():
            for c in chunks:
                if c.frames:
                    if (c.base, c.file) not in ids:
                        ids[(c.base, c.file)] = len(keys)
                        keys.append((c.base, c.file))
                    per[ids[(c.base, c.file)]].append(c)
        offsets, crcs, owners = {}, {}, {}
        for f, (base_dir, _) in enumerate(keys):
            cs = sorted(per.get(f, ()), key=lambda c: c.frames[0].offset)
            offs, crc, owned, pos = [], [], [], 0
            for c in cs:
                if base_dir and c.frames[0].offset > pos:  # a stretch of the base file nobody refers to
                    offs.append(pos)
                    crc.append(None)
                owned.append((len(offs), c))
                offs += [fr.offset for fr in c.frames]
                crc += [fr.crc32c for fr in c.frames]
                pos = c.frames[-1].offset + c.frames[-1].stored_len
            offsets[f] = offs + [manifest.files[f].data_size if f < len(manifest.files) else pos]
            crcs[f], owners[f] = crc, owned
        return cls([k[1] for k in keys], ids, offsets, crcs, owners, [k[0] for k in keys])

    def storage(self, storage: Storage, f: int) -> Storage:
        """The Storage holding file f: the checkpoint's own, or a reference's base (refs.base_storage)."""
        return base_storage(storage, self.bases[f]) if f < len(self.bases) and self.bases[f] else storage

    def url(self, storage: Storage, f: int) -> str:
        return f"{self.storage(storage, f).url}/{self.names[f]}"

    def first_frame(self, chunk: Chunk) -> int:
        f = self.ids[(chunk.base, chunk.file)]
        return bisect.bisect_left(self.offsets[f], chunk.frames[0].offset, 0, len(self.offsets[f]) - 1)

    def owner(self, f: int, frame: int) -> tuple[int, Chunk]:
        owned = self.owners[f]
        return owned[bisect.bisect_right(owned, frame, key=lambda o: o[0]) - 1]


@dataclass
class _Task:
    task: ReadTask
    span: object
    file: int
    first: int   # file-level frame range [first, end)
    end: int
    ready: int = 0   # the round after which all its frames are in


def _my_tasks(tasks: list[ReadTask], files: _Files) -> list[_Task]:
    out = []
    for t in tasks:
        span = frame_span(t.chunk.sizes, t.meta.itemsize, t.chunk.frame_size, t.row_lo, t.row_hi)
        if span.nbytes == 0:
            continue
        base = files.first_frame(t.chunk)
        out.append(_Task(t, span, files.ids[(t.chunk.base, t.chunk.file)], base + span.first, base + span.last))
    return out


# ------------------------------------------------------------------------------------------ the exchange

@dataclass
class ExchangeStats:
    """What a read-once restore did on this rank."""
    exchanged: bool = False
    rounds: int = 0
    bytes_fetched: int = 0    # from storage
    bytes_received: int = 0   # from other ranks
    bytes_sent: int = 0


def run(storage: Storage, manifest: Manifest, chunks_by_key: dict[str, list[Chunk]], tasks: list[ReadTask],
        comm, *, mode: str = "auto", error: BaseException | None = None, stats: ReadStats | None = None,
        holders: dict[int, list[int]] | None = None) -> ExchangeStats:
    """All ranks of the group: fill every rank's read tasks, fetching each needed frame once (module
    docstring, step 2). `error` is a failure this rank met while planning: every rank raises it.
    `holders` (a node-local tier's restore, shardckpt.tiers): per manifest file index, the ranks whose
    `storage` holds that file; only they fetch it, and the exchange always runs (no direct reads)."""
    with phase("planning"):
        files = _Files.build(manifest, chunks_by_key) if error is None else None
        mine = [] if error is not None else _my_tasks(tasks, files)
        runs = sorted({(t.file, t.first, t.end) for t in mine})
    with phase("collectives"):  # who needs what: all-reduced sums (and the needs gathered where they fall short)
        how = _counted(files, runs, error, comm, mode) if holders is None else None
    if how == "direct":
        out = ExchangeStats(bytes_fetched=runs_bytes(runs, files.offsets))
        _agree(comm, _read_directly(storage, manifest, tasks, stats))
        return out
    if isinstance(how, tuple):  # segments read off the sums
        with phase("planning"):
            plan = plan_segments(how, comm.world_size, files.offsets)
    else:
        if how is None:
            with phase("collectives"):
                how = _gathered(runs, error, comm)
        with phase("planning"):
            plan = plan_exchange(how, files.offsets, holders=holders)
    out = ExchangeStats()
    local_error = None
    if mode != "always" and holders is None and not plan.worth_exchanging:
        local_error = _read_directly(storage, manifest, tasks, stats)
        out.bytes_fetched = plan.fetched_bytes(comm.rank)
    else:
        out.exchanged = True
        try:  # returns or raises on every rank after the same round: its collectives stay in step
            _rounds(storage, plan, files, mine, comm, out, stats)
        except _Aborted as e:
            local_error = e.cause
        except _PeerFailed as e:
            local_error = e
    _agree(comm, local_error)
    return out


def _counted(files: "_Files | None", runs: list[tuple[int, int, int]], error: BaseException | None, comm,
             mode: str):
    """Step 2a: "direct" (every rank reads its own frames), every rank's needs (all need every frame), a
    tuple of the plan's segments read off the sums (plan.needers), or None: step b gathers the needs (a
    rank met an error, ranks count frames differently, or some frame's needers are not contiguous ranks:
    HSDP's replicas). Decided from all-reduced sums only, so every rank takes the same branch."""
    n, mine, total, nbytes = 0, 0, 0, None
    if error is None:
        nbytes = frame_bytes(files.offsets)
        n, mine, total = len(nbytes), runs_bytes(runs, files.offsets), int(nbytes.sum())
    head = comm.all_reduce(np.array([error is not None, n, n * n, mine, total], dtype=np.int64))
    w = comm.world_size
    if head[0] or head[1] != w * n or head[2] != w * n * n:
        return None  # n and n^2 sum to w n and w n^2 only if every rank counted n frames
    if head[3] == head[4]:  # no rank needs more than every frame: each needs them all (DDP, fine-tuning)
        every = [(f, 0, len(o) - 1) for f, o in sorted(files.offsets.items())]
        return "direct" if mode == "auto" and not worth_exchanging(total, (w - 1) * total, w > 1) else [every] * w
    sums = comm.all_reduce(needer_sums(runs, files.offsets, comm.rank))
    if mode == "auto" and not worth_exchanging_counts(sums, nbytes):
        return "direct"
    segments = segments_from_sums(sums, files.offsets, w)
    return tuple(segments) if segments is not None else None


def _gathered(runs, error: BaseException | None, comm) -> list[list[tuple[int, int, int]]]:
    """Step 2b: every rank's needs (or any rank's error, raised on every rank), digests first: replicas'
    identical needs travel once (Comm.all_gather_distinct) and come back as one object (planned once)."""
    record = {"error": error_record(error, comm.rank)} if error is not None else {"runs": runs}
    blobs = comm.all_gather_distinct(json.dumps(record, separators=(",", ":")).encode())
    parsed: dict[bytes, dict] = {}
    for b in blobs:  # replicas send identical needs: parse each distinct one once
        if b not in parsed:
            parsed[b] = json.loads(b)
    failed = next((parsed[b]["error"] for b in blobs if "error" in parsed[b]), None)
    if failed is not None:
        if error is not None and failed["by"] == comm.rank:
            raise error
        raise error_from(failed)
    runs_of = {b: [tuple(r) for r in rec["runs"]] for b, rec in parsed.items()}
    return [runs_of[b] for b in blobs]


def _read_directly(storage, manifest, tasks, stats) -> BaseException | None:
    """(Almost) nothing is needed twice: this rank reads its own frames; its failure, for _agree."""
    try:
        run_reads(storage, manifest, tasks, stats)
    except Exception as e:  # noqa: BLE001 - every rank learns it at the agreement
        return e
    return None


def _agree(comm, local_error: BaseException | None) -> None:
    """Every rank, after its reads (direct or exchanged): the first failure, on every rank (one gather and
    one broadcast): the failing rank raises its own error, the others the same typed error naming it."""
    with phase("collectives"):
        records = comm.gather_json(None if local_error is None or isinstance(local_error, _PeerFailed)
                                   else error_record(local_error, comm.rank))
        verdict = next((r for r in records if r), None) if comm.is_coordinator else None
        verdict = comm.broadcast_json(verdict)
    if verdict is not None:
        if local_error is not None and verdict["by"] == comm.rank and not isinstance(local_error, _PeerFailed):
            raise local_error
        raise error_from(verdict)


class _PeerFailed(Exception):
    """Another rank reported a failure at a round's check: stop exchanging, learn it at the agreement."""


class _Aborted(Exception):
    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


def _rounds(storage, plan: ExchangePlan, files: _Files, mine: list[_Task], comm, out: ExchangeStats,
            stats: ReadStats | None) -> None:
    """Every rank: this rank's part of the plan (what it sends and receives each round, down the
    deliveries' trees), when each of its tasks can be decoded and how long each piece must be held (to be
    decoded or forwarded), then the rounds themselves (_run_rounds), with the next round's fetch on an I/O
    thread."""
    sched = plan.schedule(comm.rank)
    by_file: dict[int, list[int]] = defaultdict(list)  # piece indices per file, in frame order
    for i, p in enumerate(plan.pieces):
        by_file[p.file].append(i)
    firsts = {f: [plan.pieces[i].first for i in idx] for f, idx in by_file.items()}

    def piece_at(f: int, frame: int) -> int:
        return by_file[f][bisect.bisect_right(firsts[f], frame) - 1]

    def task_pieces(t: _Task):
        i = piece_at(t.file, t.first)
        while i < len(plan.pieces) and plan.pieces[i].file == t.file and plan.pieces[i].first < t.end:
            yield i
            i += 1

    keep = dict(sched.last_send)  # piece -> the last round it is decoded in or forwarded in
    for t in mine:
        t.ready = max(sched.has[i] for i in task_pieces(t))
        for i in task_pieces(t):
            keep[i] = max(keep.get(i, 0), t.ready)
    pending = sorted(mine, key=lambda t: t.ready)
    # the next round's fetch runs on an I/O thread while this one is exchanged and decoded
    io = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-exchange")
    try:
        _run_rounds(storage, plan, sched, files, comm, out, stats, io, keep, pending, piece_at)
    finally:
        io.shutdown(wait=True, cancel_futures=True)


def _run_rounds(storage, plan, sched, files, comm, out, stats, io, keep, pending, piece_at) -> None:
    me, world = comm.rank, comm.world_size
    held: dict[int, np.ndarray] = {}
    nthreads = threads()
    failure = None

    def fetch(k):
        return io.submit(_fetch_round, storage, plan, files, [i for i in plan.rounds[k] if plan.pieces[i].fetcher == me])
    ahead = fetch(0) if plan.rounds else None
    for k in range(len(plan.rounds)):
        fetched: dict[int, np.ndarray] = {}
        if failure is None:
            try:
                with phase("read_wait"):
                    fetched = ahead.result()
            except Exception as e:  # noqa: BLE001 - reported at the round's check, then at the agreement
                failure = e
        ahead = fetch(k + 1) if failure is None and k + 1 < len(plan.rounds) else None
        with phase("collectives"):
            flag = comm.any_flag(failure is not None)
        if flag:
            raise _Aborted(failure) if failure is not None else _PeerFailed()
        out.rounds += 1
        out.bytes_fetched += sum(a.nbytes for a in fetched.values())
        if stats is not None:
            stats.bytes_read += sum(a.nbytes for a in fetched.values())
        held.update(fetched)
        sends, recvs = sched.sends.get(k, ()), sched.recvs.get(k, ())  # sorted by (rank, piece) on both sides
        send_sizes, recv_sizes = [0] * world, [0] * world
        for r, i in sends:
            send_sizes[r] += plan.pieces[i].nbytes
        for r, i in recvs:
            recv_sizes[r] += plan.pieces[i].nbytes
        send = torch.from_numpy(np.concatenate([held[i] for _, i in sends])) if sends \
            else torch.empty(0, dtype=torch.uint8)
        with phase("collectives"):
            got = comm.all_to_all(send, send_sizes, recv_sizes).numpy()
        out.bytes_sent += int(send.numel())
        out.bytes_received += int(got.nbytes)
        pos = 0
        for _, i in recvs:
            held[i] = got[pos:pos + plan.pieces[i].nbytes]
            pos += plan.pieces[i].nbytes
        while failure is None and pending and pending[0].ready <= k:
            t = pending.pop(0)
            try:
                decode_task(t.task, t.span, _assemble(t, plan, files, held, piece_at), nthreads, stats,
                             storage.url)
            except Exception as e:  # noqa: BLE001 - reported at the next round's check or the agreement
                failure = e
        for i in [i for i in held if keep.get(i, -1) <= k]:
            del held[i]
    if failure is not None:
        raise _Aborted(failure)


def _fetch_round(storage, plan: ExchangePlan, files: _Files, idx: list[int]) -> dict[int, np.ndarray]:
    """This rank's pieces of one round, one read_ranges call per file, each frame's crc32c checked."""
    out: dict[int, np.ndarray] = {}
    per_file: dict[int, list[int]] = defaultdict(list)
    for i in idx:
        per_file[plan.pieces[i].file].append(i)
    for f, pieces in per_file.items():
        offs = files.offsets[f]
        total = sum(plan.pieces[i].nbytes for i in pieces)
        buf = np.empty(total, dtype=np.uint8)
        ranges, pos = [], 0
        for i in pieces:
            p = plan.pieces[i]
            ranges.append(ReadRange(offs[p.first], p.nbytes, pos))
            out[i] = buf[pos:pos + p.nbytes]
            pos += p.nbytes
        try:
            files.storage(storage, f).read_ranges(files.names[f], ranges, buf)
        except CheckpointError as e:
            base, chunk = files.owner(f, plan.pieces[pieces[0]].first)
            note = f"; checkpoint {storage.url} refers to it" if files.bases[f] else ""
            raise type(e)(e.message + note, key=chunk.key, file=files.url(storage, f), rank=chunk.rank) from e
        for i in pieces:
            p = plan.pieces[i]
            a = out[i]
            for j in range(p.first, p.end):
                lo, hi = offs[j] - offs[p.first], offs[j + 1] - offs[p.first]
                if files.crcs[f][j] is not None and _ext.crc32c(a[lo:hi]) != files.crcs[f][j]:
                    base, chunk = files.owner(f, j)
                    raise ChecksumError(f"frame {j - base} failed its crc32c check (fetched for the group)"
                                        + (f"; checkpoint {storage.url} refers to it" if files.bases[f] else ""),
                                        key=chunk.key, file=files.url(storage, f), rank=chunk.rank)
    return out


def _assemble(t: _Task, plan: ExchangePlan, files: _Files, held: dict[int, np.ndarray], piece_at) -> np.ndarray:
    """The stored bytes of a task's frames, from the pieces held (a view when one piece holds them all)."""
    offs = files.offsets[t.file]
    i = piece_at(t.file, t.first)
    p = plan.pieces[i]
    if t.end <= p.end:
        lo = offs[t.first] - offs[p.first]
        return held[i][lo:lo + offs[t.end] - offs[t.first]]
    parts = []
    while i < len(plan.pieces) and plan.pieces[i].file == t.file and plan.pieces[i].first < t.end:
        p = plan.pieces[i]
        a, b = max(p.first, t.first), min(p.end, t.end)
        parts.append(held[i][offs[a] - offs[p.first]:offs[b] - offs[p.first]])
        i += 1
    return np.concatenate(parts)

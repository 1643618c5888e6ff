"""What a restore costs each rank at 16, 1,024 and 16,384 ranks: a simulation that runs on one machine (pure
functions and the real planning code, no processes, no I/O).

    python -m bench.scale                      # the table, written to bench/results/scale.json
    python -m bench.scale --worlds 16,1024     # fewer world sizes

The checkpoint simulated is bench.compare's GPT-style state (--params parameters, bf16, with AdamW's two
moments), saved by 64 ranks Shard(0) with shardckpt's frame sizes (about 16 frames per chunk; stored bytes
0.68x raw, as measured for bf16); the fine-tuning load reads a 1-process save of the same state. Layouts:
  ddp       every rank needs every frame (plain tensors on every rank)
  hsdp      (replicate x shard) with 8 shards (one 8-GPU node): rank r needs the 1/8 of rows of shard r % 8
  fsdp      Shard(0) over all ranks: rank r needs rows [r c, (r + 1) c) of every tensor, c = ceil(rows / W)
  finetune  the 1-process save into plain tensors on every rank
  local     node-local tier (8 ranks a node, 2 local steps kept, replicas on the next node), node 0 lost and
            replaced: rank r needs the file rank r saved, held by its node and the next one
Per row: the most bytes one rank sends and receives in one exchange round (its exchange memory: the
all_to_all's buffers; plan.round_peaks), the bytes each rank receives for metadata and planning (the
manifest + index broadcast; exchange.run's step 2a: an all-reduce of five integers and, unless every rank
needs every frame, one of 24 bytes a frame (plan.needers; an all-reduce counted as twice its bytes);
where needers are not contiguous ranks the needs or listings all-gathered digests first as
Comm.all_gather_distinct does: 24 bytes a rank, then each distinct record once; the local tier's metadata
all-gather too), the planning time of rank 0, wall and CPU (every rank plans, the coordinator included:
the plan and its own schedule, with the local tier's choose_local; the sums an all-reduce would deliver
are computed outside it) and the
collectives of the load. Goals at 16,384 ranks (issue 26): exchange memory per rank <= 2x the round
budget; metadata + planning bytes per rank <= 2x the manifest; planning < 1 s; local-tier listing O(W)
bytes per rank."""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from shardckpt.format.records import DEFAULT_FRAME_SIZE, chunk_frame_size
from shardckpt.dist import DIGEST_BYTES

from bench.shapes import gpt_shapes
from shardckpt.plan.exchange_plan import ROUND_BYTES, plan_exchange, plan_segments
from shardckpt.plan.needers import count_needs, frame_bytes, needer_sums, segments_from_sums, worth_exchanging_counts
from shardckpt.tiers.local_restore import choose_local, listing_parts, merge_listings

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STORED_OVER_RAW = 0.68       # zstd-byteplane on bf16 weights (bench.codecs)
INDEX_BYTES_PER_FRAME = 40   # a frame's record in an index file (offset, lengths, crc32c) as JSON
INDEX_BYTES_PER_CHUNK = 150  # a chunk's record (key, box, codec, frame size)
MANIFEST_BYTES_PER_TENSOR = 200
MANIFEST_BYTES_PER_FILE = 120
SAVED_WS = 64
NODE = 8
LAYOUTS = ("ddp", "hsdp", "fsdp", "finetune", "local")


@dataclass
class Checkpoint:
    """A simulated checkpoint: per data file, its frames' offsets (and the size last) and its chunks as
    (tensor, first row, end row, row bytes, frame bytes, first frame)."""
    offsets: dict[int, list[int]]
    chunks: dict[int, list[tuple[int, int, int, int, int, int]]]
    rows: list[int]   # per tensor

    @property
    def stored(self) -> int:
        return sum(o[-1] for o in self.offsets.values())

    @property
    def metadata_bytes(self) -> int:
        """manifest.json + every index file (what read_metadata broadcasts), estimated per record."""
        frames = sum(len(o) - 1 for o in self.offsets.values())
        chunks = sum(len(c) for c in self.chunks.values())
        return (INDEX_BYTES_PER_FRAME * frames + INDEX_BYTES_PER_CHUNK * chunks
                + MANIFEST_BYTES_PER_TENSOR * len(self.rows) + MANIFEST_BYTES_PER_FILE * len(self.offsets))


def checkpoint(params: float, saved_ws: int) -> Checkpoint:
    shapes = list(gpt_shapes(params).values())
    items = [s for s in shapes for _ in range(3)]  # param, exp_avg, exp_avg_sq
    rows = [s[0] for s in items]
    offsets = {f: [0] for f in range(saved_ws)}
    chunks: dict[int, list] = {f: [] for f in range(saved_ws)}
    for t, shape in enumerate(items):
        row_bytes = math.prod(shape[1:]) * 2
        for f in range(saved_ws):
            lo, hi = shape[0] * f // saved_ws, shape[0] * (f + 1) // saved_ws
            nbytes = (hi - lo) * row_bytes
            if not nbytes:
                continue
            fs = chunk_frame_size(nbytes, DEFAULT_FRAME_SIZE)
            chunks[f].append((t, lo, hi, row_bytes, fs, len(offsets[f]) - 1))
            for a in range(0, nbytes, fs):
                offsets[f].append(offsets[f][-1] + int(min(fs, nbytes - a) * STORED_OVER_RAW))
    return Checkpoint(offsets, chunks, rows)


def needs(ck: Checkpoint, layout: str, world: int, ranks=None) -> list[list[tuple[int, int, int]]]:
    """Per rank (of `ranks`, default all), the frame runs a restore in `layout` gathers."""
    every = [(f, 0, len(o) - 1) for f, o in ck.offsets.items()]
    ranks = range(world) if ranks is None else ranks
    if layout in ("ddp", "finetune"):
        return [every for _ in ranks]
    if layout == "hsdp":  # replicas' needs are one object, as exchange.run hands them to the planner
        per = len(ck.offsets) // NODE
        shard = [[r_ for r_ in every if r_[0] // per == s] for s in range(NODE)]
        return [shard[r % NODE] for r in ranks]
    out = []
    for r in ranks:  # fsdp: DTensor's Shard(0), ceil(R / W) rows of every tensor a rank
        runs = []
        for f, cs in ck.chunks.items():
            for t, lo, hi, rb, fs, first in cs:
                c = -(-ck.rows[t] // world)
                a, b = max(lo, c * r), min(hi, c * (r + 1))
                if a < b:
                    runs.append((f, first + (a - lo) * rb // fs, first + -(-(b - lo) * rb // fs)))
        out.append(runs)
    return out


def gathered_distinct(records: list, world: int) -> int:
    """Bytes one rank receives from Comm.all_gather_distinct: a 24-byte digest per rank, then each distinct
    record once (`records`: per rank, a record or a (key, length) standing for one)."""
    sizes = {}
    for r in records:
        key = r if isinstance(r, bytes) else r[0]
        sizes[key] = len(r) if isinstance(r, bytes) else r[1]
    return DIGEST_BYTES * world + sum(sizes.values())


def _record(runs) -> int:
    return len(json.dumps({"runs": sorted(runs)}, separators=(",", ":")))


def fsdp_sums(ck: Checkpoint, world: int) -> np.ndarray:
    """What a pure FSDP restore on `world` ranks all-reduces in exchange.run's step 2a (the sum of every
    rank's needers.needer_sums: per frame the needer count, the sum of their ranks and of its squares),
    computed per frame instead of per rank: frame j of a chunk holds rows [a, b) of its tensor and rank r
    rows [r c, (r + 1) c) with c = ceil(R / W) (DTensor's Shard(0)), so ranks a // c to (b - 1) // c need
    it. tests/test_scale.py checks it against every rank's vectors."""
    los, his = [], []
    for f in sorted(ck.offsets):
        m = len(ck.offsets[f]) - 1
        lo_r, hi_r = np.zeros(m, dtype=np.int64), np.full(m, -1, dtype=np.int64)
        for t, lo, hi, rb, fs, first in ck.chunks[f]:
            nbytes, c = (hi - lo) * rb, -(-ck.rows[t] // world)
            start = np.arange(0, nbytes, fs, dtype=np.int64)
            lo_r[first:first + len(start)] = (lo + start // rb) // c
            hi_r[first:first + len(start)] = (lo + -(-np.minimum(start + fs, nbytes) // rb) - 1) // c
        los.append(lo_r)
        his.append(hi_r)
    lo, hi = np.concatenate(los), np.concatenate(his)
    sq = lambda x: np.where(x < 0, 0, x * (x + 1) * (2 * x + 1) // 6)  # noqa: E731
    count = hi - lo + 1
    return np.concatenate((count, count * lo + count * (count - 1) // 2, sq(hi) - sq(lo - 1)))


def _summed(ns: list, world: int, offsets) -> np.ndarray:
    """The all-reduced needer_sums of these ranks' needs (replicas' equal needs counted once per group)."""
    groups: dict[int, list[int]] = {}
    for r, n in enumerate(ns):
        groups.setdefault(id(n), []).append(r)
    out = 0
    for ranks in groups.values():
        c = count_needs(ns[ranks[0]], offsets).astype(np.int64)
        r = np.array(ranks, dtype=np.int64)
        out = out + np.concatenate((c * len(r), c * int(r.sum()), c * int((r * r).sum())))
    return out


def restore_row(ck: Checkpoint, layout: str, world: int, round_bytes: int) -> dict:
    """One restore as exchange.run does it: step 2a's all-reduce of five integers; when every rank needs
    every frame (DDP, fine-tuning) the needs are known; else the all-reduce of needer sums (24 bytes a
    frame), then direct reads (needs barely overlap), the plan's segments read off the sums (FSDP:
    contiguous needers), or (HSDP) the needs gathered digests first; then the plan. Planning time: what
    rank 0 computes from the sums (its own vectors, the rule, the segments, the plan, its schedule)."""
    row = {"layout": layout, "ranks": world, "stored": ck.stored, "manifest": ck.metadata_bytes}
    nbytes = frame_bytes(ck.offsets)
    every = [(f, 0, len(o) - 1) for f, o in sorted(ck.offsets.items())]
    row["needs_bytes"], colls = 2 * 5 * 8, 1  # an all-reduce sends and receives about twice its bytes
    if layout in ("ddp", "finetune"):
        t0, c0 = time.perf_counter(), time.process_time()
        ns, how = [every] * world, "every rank needs every frame"
    else:
        ns = None if layout == "fsdp" else needs(ck, layout, world)
        sums = fsdp_sums(ck, world) if layout == "fsdp" else _summed(ns, world, ck.offsets)
        mine = needs(ck, layout, world, [0])[0]
        row["needs_bytes"] += 2 * sums.nbytes
        colls += 1
        t0, c0 = time.perf_counter(), time.process_time()
        needer_sums(mine, ck.offsets, 0)
        if not worth_exchanging_counts(sums, nbytes):
            ns, how = None, "direct reads, decided from the counts"
        else:
            segments = segments_from_sums(sums, ck.offsets, world)
            if segments is not None:
                ns, how = segments, "segments read off the sums"
            else:
                distinct = {}
                for n in ns:
                    distinct.setdefault(id(n), _record(n))
                row["needs_bytes"] += gathered_distinct([(id(n), distinct[id(n)]) for n in ns], world)
                row["distinct_needs"] = len(distinct)
                colls += 2
                how = f"{len(distinct)} distinct needs gathered"
    if ns is None:
        row.update(send=0, recv=0, rounds=0, exchanged=False)
    else:
        plan = (plan_segments(ns, world, ck.offsets, round_bytes=round_bytes) if how.startswith("segments")
                else plan_exchange(ns, ck.offsets, round_bytes=round_bytes))
        plan.schedule(0)
    row["plan_s"], row["plan_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    if ns is not None:
        row["send"], row["recv"] = plan.round_peaks()
        row.update(rounds=len(plan.rounds), exchanged=plan.worth_exchanging)
    row["note"] = how
    # metadata 2, step 2a, rounds 2 each, agreement 2
    row["collectives"] = 2 + colls + 2 * row["rounds"] + 2
    row["meta_plan_bytes"] = row["manifest"] + row["needs_bytes"]
    return row


def local_row(ck_stored: int, world: int, round_bytes: int, keep: int = 2) -> dict:
    """A node-local tier's restore on `world` ranks (NODE a node) after node 0 was lost and replaced."""
    nodes = world // NODE
    node = [r // NODE for r in range(world)]
    size = ck_stored // world
    fs = min(DEFAULT_FRAME_SIZE, max(1, size))
    offsets = {f: list(range(0, size, fs)) + [size] for f in range(world)}
    held_by_node = {n: sorted(r for r in range(world) if node[r] in (n, (n - 1) % nodes)) for n in range(nodes)}
    held_by_node[0] = []
    files = list(range(world))
    # the listing each rank sends (tiers.local_restore.held), in the two records gather_listings sends
    listing = {n: {str(1000 + 10 * s): {"id": "0" * 32, "files": files, "held": held_by_node[n]}
                   for s in range(keep)} for n in range(nodes)}
    interned: dict[bytes, bytes] = {}  # all_gather_distinct returns equal records as one object
    parts = {n: tuple(interned.setdefault(b, b) for b in listing_parts(listing[n])) for n in range(nodes)}
    row = {"layout": "local", "ranks": world, "stored": ck_stored}
    row["listing_bytes"] = (gathered_distinct([parts[node[r]][0] for r in range(world)], world)
                            + gathered_distinct([parts[node[r]][1] for r in range(world)], world))
    # load_local's metadata all-gather: the first holder sends the manifest and an index, the others an index
    manifest = MANIFEST_BYTES_PER_FILE * world + MANIFEST_BYTES_PER_TENSOR * 900
    index = INDEX_BYTES_PER_FRAME * (len(offsets[0]) - 1) + INDEX_BYTES_PER_CHUNK * 900
    row["manifest"] = manifest + world * index
    row["meta_bytes"] = gathered_distinct([("m", manifest + index)] + [(r, index) for r in range(1, world)], world)
    t0, c0 = time.perf_counter(), time.process_time()
    recs = merge_listings([parts[node[r]][0] for r in range(world)], [parts[node[r]][1] for r in range(world)])
    choose_local(recs, None)
    row["choose_s"], choose_cpu = time.perf_counter() - t0, time.process_time() - c0
    holders = {f: [r for n in sorted({node[f], (node[f] + 1) % nodes} - {0})
                   for r in range(n * NODE, (n + 1) * NODE)] for f in range(world)}
    t0, c0 = time.perf_counter(), time.process_time()
    plan = plan_exchange([[(r, 0, len(offsets[r]) - 1)] for r in range(world)], offsets, round_bytes=round_bytes,
                         holders=holders)
    plan.schedule(0)
    row["plan_s"] = time.perf_counter() - t0 + row["choose_s"]
    row["plan_cpu_s"] = time.process_time() - c0 + choose_cpu
    row["send"], row["recv"] = plan.round_peaks()
    row["rounds"] = len(plan.rounds)
    row["exchanged"] = True
    row["collectives"] = 2 + 2 + 2 + 2 * row["rounds"] + 2   # listing, metadata, needs, rounds, agreement
    row["meta_plan_bytes"] = row["listing_bytes"] + row["meta_bytes"] + gathered_distinct(
        [(r, _record([(r, 0, len(offsets[r]) - 1)])) for r in range(world)], world)
    return row


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:9.1f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9, help="parameters of the simulated state")
    ap.add_argument("--worlds", default="16,1024,16384")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--round-mib", type=float, default=ROUND_BYTES / 2**20, help="the exchange's round budget")
    a = ap.parse_args(argv)
    budget = int(a.round_mib * 2**20)
    sharded, single = checkpoint(a.params, SAVED_WS), checkpoint(a.params, 1)
    rows = []
    print(f"state: {a.params / 1e9:.2f}B params bf16 + AdamW, stored {sharded.stored / 2**30:.2f} GiB; "
          f"round budget {budget / 2**20:.0f} MiB")
    print(f"{'layout':<9}{'ranks':>7} {'send MiB':>9} {'recv MiB':>9} {'meta+plan MiB':>14} {'manifest MiB':>13}"
          f" {'plan s wall/cpu':>15} {'rounds':>7} {'colls':>6}  notes")
    for world in [int(w) for w in a.worlds.split(",")]:
        for layout in a.layouts.split(","):
            if layout == "local":
                row = local_row(sharded.stored, world, budget)
                note = f"listing {row['listing_bytes'] / 2**20:.2f} MiB/rank, choose_local {row['choose_s']:.2f}s"
            else:
                row = restore_row(single if layout == "finetune" else sharded, layout, world, budget)
                note = row["note"]
            rows.append(row)
            plan_s = f"{row['plan_s']:.2f}/{row['plan_cpu_s']:.2f}"
            print(f"{layout:<9}{world:>7} {_mb(row['send'])} {_mb(row['recv'])} {_mb(row['meta_plan_bytes']):>14}"
                  f" {_mb(row['manifest']):>13} {plan_s:>15} {row['rounds'] if row['rounds'] is not None else '-':>7}"
                  f" {row['collectives'] if row['rounds'] is not None else '-':>6}  {note.strip()}")
    goals = check_goals(rows, budget)
    for g in goals:
        print(("MET     " if g["met"] else "NOT MET ") + g["goal"] + ": " + g["detail"])
    os.makedirs(RESULTS, exist_ok=True)
    out = {"args": vars(a), "budget": budget, "rows": rows, "goals": goals}
    with open(os.path.join(RESULTS, "scale.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return out


def check_goals(rows: list[dict], budget: int) -> list[dict]:
    top = max(r["ranks"] for r in rows)
    big = [r for r in rows if r["ranks"] == top]
    out = []
    mem = [(r["layout"], (r["send"] or 0) + (r["recv"] or 0)) for r in big if r["send"] is not None]
    out.append({"goal": f"exchange memory per rank <= 2 x budget at {top} ranks",
                "met": all(m <= 2 * budget for _, m in mem),
                "detail": ", ".join(f"{k} {m / 2**20:.0f} MiB" for k, m in mem)})
    mp = [(r["layout"], r["meta_plan_bytes"] / r["manifest"]) for r in big]
    out.append({"goal": "metadata + planning bytes per rank <= 2 x manifest", "met": all(x <= 2 for _, x in mp),
                "detail": ", ".join(f"{k} {x:.2f}x" for k, x in mp)})
    ts = [(r["layout"], r["plan_s"], r["plan_cpu_s"]) for r in big]
    out.append({"goal": "planning < 1 s (CPU time of the planning rank: wall time on a shared machine counts "
                        "the other jobs too)", "met": all(c < 1 for _, _, c in ts),
                "detail": ", ".join(f"{k} {c:.2f}s cpu ({t:.2f}s wall)" for k, t, c in ts)})
    loc = sorted((r["ranks"], r["listing_bytes"]) for r in rows if r["layout"] == "local")
    if len(loc) >= 2:
        (w0, b0), (w1, b1) = loc[0], loc[-1]
        growth = math.log(b1 / b0) / math.log(w1 / w0)
        out.append({"goal": "local-tier listing O(W) bytes per rank", "met": growth < 1.5,
                    "detail": f"grows as W^{growth:.2f} ({b0 / 2**10:.0f} KiB at {w0}, {b1 / 2**20:.1f} MiB at {w1})"})
    return out


if __name__ == "__main__":
    main()

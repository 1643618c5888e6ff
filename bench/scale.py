"""What a restore costs each rank at 16, 1,024 and 16,384 ranks: a simulation that runs on one machine (pure
functions and the real planning code, no processes, no I/O).

    python -m bench.scale                      # the table, written to bench/results/scale.json
    python -m bench.scale --worlds 16,1024     # fewer world sizes

The checkpoint simulated is bench.compare's GPT-style state (--params parameters, bf16, with AdamW's two
moments), saved by 64 ranks Shard(0) with shardckpt's frame sizes (about 16 frames per chunk; stored bytes
0.68x raw, as measured for bf16); the fine-tuning load reads a 1-process save of the same state. Layouts:
  ddp       every rank needs every frame (plain tensors on every rank)
  hsdp      (replicate x shard) with 8 shards (one 8-GPU node): rank r needs the 1/8 of rows of shard r % 8
  fsdp      Shard(0) over all ranks: rank r needs its 1/W of every tensor's rows
  finetune  the 1-process save into plain tensors on every rank
  local     node-local tier (8 ranks a node, 2 local steps kept, replicas on the next node), node 0 lost and
            replaced: rank r needs the file rank r saved, held by its node and the next one
Per row: the most bytes one rank sends and receives in one exchange round (its exchange memory: the
all_to_all's buffers; plan.round_peaks), the bytes each rank receives for metadata and planning (the
manifest + index broadcast, the needs or listings all-gathered digests first as Comm.all_gather_distinct
does: 24 bytes a rank, then each distinct record once; the local tier's metadata all-gather too), the
planning time (every rank plans, the coordinator included; with the local tier's choose_local) and the
collectives of the load. A figure that is O(W^2) to simulate is
extrapolated from the smaller worlds (marked ~) instead of run. Goals at 16,384 ranks (issue 26): exchange
memory per rank <= 2x the round budget; metadata + planning bytes per rank <= 2x the manifest; planning < 1 s;
local-tier listing O(W) bytes per rank."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

from shardckpt.format.records import DEFAULT_FRAME_SIZE, chunk_frame_size
from shardckpt.dist import DIGEST_BYTES

from bench.shapes import gpt_shapes
from shardckpt.plan.exchange_plan import ROUND_BYTES, plan_exchange
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
    for r in ranks:  # fsdp: 1/W of every tensor's rows
        runs = []
        for f, cs in ck.chunks.items():
            for t, lo, hi, rb, fs, first in cs:
                a, b = max(lo, ck.rows[t] * r // world), min(hi, ck.rows[t] * (r + 1) // world)
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


def restore_row(ck: Checkpoint, layout: str, world: int, round_bytes: int, plan_limit: int) -> dict:
    row = {"layout": layout, "ranks": world, "stored": ck.stored, "manifest": ck.metadata_bytes}
    if layout == "fsdp" and world > plan_limit:  # O(W x tensors) runs: sampled, not planned
        sample = sorted({0, world // 3, world // 2, world - 1})
        row["needs_bytes"] = DIGEST_BYTES * world + world * statistics.mean(
            _record(n) for n in needs(ck, layout, world, sample))  # every rank's needs are distinct
        most = max(len(n) for n in needs(ck, layout, world, sample))
        row.update(plan_s=None, note=f"~ needs sampled on {len(sample)} ranks; {world} x up to {most} runs "
                   "not planned here")
        row.update(send=None, recv=None, rounds=None, exchanged=False)
    else:
        ns = needs(ck, layout, world)
        distinct = {}
        for n in ns:
            distinct.setdefault(id(n), _record(n))
        row["needs_bytes"] = gathered_distinct([(id(n), distinct[id(n)]) for n in ns], world)
        row["distinct_needs"] = len(distinct)
        t0 = time.perf_counter()
        plan = plan_exchange(ns, ck.offsets, round_bytes=round_bytes)
        row["plan_s"] = time.perf_counter() - t0
        row["send"], row["recv"] = plan.round_peaks()
        row["rounds"] = len(plan.rounds)
        row["exchanged"] = plan.worth_exchanging
    # metadata 2, needs 2 (+ a send to the coordinator per distinct record), rounds 2 each, agreement 2
    row["collectives"] = 2 + 2 + (2 * row["rounds"] if row["exchanged"] else 0) + 2
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
    t0 = time.perf_counter()
    recs = merge_listings([parts[node[r]][0] for r in range(world)], [parts[node[r]][1] for r in range(world)])
    choose_local(recs, None)
    row["choose_s"] = time.perf_counter() - t0
    holders = {f: [r for n in sorted({node[f], (node[f] + 1) % nodes} - {0})
                   for r in range(n * NODE, (n + 1) * NODE)] for f in range(world)}
    t0 = time.perf_counter()
    plan = plan_exchange([[(r, 0, len(offsets[r]) - 1)] for r in range(world)], offsets, round_bytes=round_bytes,
                         holders=holders)
    row["plan_s"] = time.perf_counter() - t0 + row["choose_s"]
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
    ap.add_argument("--fsdp-plan-limit", type=int, default=1024, help="largest world whose FSDP needs are planned")
    a = ap.parse_args(argv)
    budget = int(a.round_mib * 2**20)
    sharded, single = checkpoint(a.params, SAVED_WS), checkpoint(a.params, 1)
    rows = []
    print(f"state: {a.params / 1e9:.2f}B params bf16 + AdamW, stored {sharded.stored / 2**30:.2f} GiB; "
          f"round budget {budget / 2**20:.0f} MiB")
    print(f"{'layout':<9}{'ranks':>7} {'send MiB':>9} {'recv MiB':>9} {'meta+plan MiB':>14} {'manifest MiB':>13}"
          f" {'plan s':>7} {'rounds':>7} {'colls':>6}  notes")
    for world in [int(w) for w in a.worlds.split(",")]:
        for layout in a.layouts.split(","):
            if layout == "local":
                row = local_row(sharded.stored, world, budget)
                note = f"listing {row['listing_bytes'] / 2**20:.2f} MiB/rank, choose_local {row['choose_s']:.2f}s"
            else:
                row = restore_row(single if layout == "finetune" else sharded, layout, world, budget,
                                  a.fsdp_plan_limit)
                note = row.get("note", "") + ("" if row["exchanged"] else " direct reads under auto")
            rows.append(row)
            plan_s = "-" if row["plan_s"] is None else f"{row['plan_s']:.2f}"
            print(f"{layout:<9}{world:>7} {_mb(row['send'])} {_mb(row['recv'])} {_mb(row['meta_plan_bytes']):>14}"
                  f" {_mb(row['manifest']):>13} {plan_s:>7} {row['rounds'] if row['rounds'] is not None else '-':>7}"
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
    ts = [(r["layout"], r["plan_s"]) for r in big]
    out.append({"goal": "planning < 1 s", "met": all(t is not None and t < 1 for _, t in ts),
                "detail": ", ".join(f"{k} " + ("not run" if t is None else f"{t:.2f}s") for k, t in ts)})
    loc = sorted((r["ranks"], r["listing_bytes"]) for r in rows if r["layout"] == "local")
    if len(loc) >= 2:
        (w0, b0), (w1, b1) = loc[0], loc[-1]
        growth = math.log(b1 / b0) / math.log(w1 / w0)
        out.append({"goal": "local-tier listing O(W) bytes per rank", "met": growth < 1.5,
                    "detail": f"grows as W^{growth:.2f} ({b0 / 2**10:.0f} KiB at {w0}, {b1 / 2**20:.1f} MiB at {w1})"})
    return out


if __name__ == "__main__":
    main()

"""Read-once restores: storage traffic and time of shardckpt.load with the exchange (default) against direct
per-rank reads (exchange="never") and DCP's FsspecReader, on bench.compare's GPT-style state, in one run.

    python -m bench.exchange                        # real S3 (Ceph radosgw on loopback, started here)
    python -m bench.exchange --store local          # a local directory (no DCP column)
    python -m bench.exchange --plan-only            # only the planning simulation

Scenarios, each restored on --ranks ranks (default 4):
  ddp       saved by 4 ranks with plain (replicated) tensors, loaded into plain tensors on every rank
  hsdp      saved by 4 ranks FSDP (Shard(0)), loaded on a (ranks/2)x2 (Replicate, Shard(0)) mesh (4 ranks or more)
  finetune  saved by 1 process, loaded into plain tensors on every rank
Traffic is counted at the storage layer in every rank (S3: every GetObject the client makes and the bytes
it returned, for shardckpt and DCP alike; local: what LocalStorage is asked to read), summed over ranks, and reported
against the bytes the checkpoint stores. Times: per repeat the slowest rank, best and median of --repeat,
methods in alternating order.
Planning: plan_exchange simulated for 16, 1,024 and 16,384 ranks (DDP and HSDP needs of a 350M state), its
time and the bytes each rank receives before any tensor (manifest + index broadcast, gathered needs).
Writes bench/results/exchange.json."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import torch  # noqa: E402

from bench.compare import RESULTS, _rows, gpt_shapes, local_state  # noqa: E402

SCENARIOS = ("ddp", "hsdp", "finetune")


def open_store(store: str, prefix: str, local_dir: str) -> tuple[object, dict]:
    """The store a bench's ranks use: ("s3") a Ceph radosgw started here (stop it with s3_server.stop) and
    a fresh bucket named after `prefix`, or ("local") the directory local_dir. Returns (server or None, the
    ranks' args: url, opts, region)."""
    if store != "s3":
        return None, {"url": local_dir, "opts": {}}
    import s3_server
    server = s3_server.start()
    os.environ["AWS_DEFAULT_REGION"] = server.region
    return server, {"url": server.url(f"{prefix}-{int(time.time())}"), "opts": server.storage_options,
                    "region": server.region}


def _plain_state(shapes, dtype, seed=0):
    """bench.compare's state as full plain tensors (the same values as its sharded form)."""
    def make(name, shape, scale, square=False, kind=0):
        x = _rows(name, kind, seed, shape, 0, shape[0] if shape else 1)
        return (x * x * scale if square else x * scale).to(dtype)
    return {"model": {n: make(n, s, 0.02) for n, s in shapes.items()},
            "optim": {"state": {n: {"exp_avg": make(n, s, 1e-3, kind=1), "exp_avg_sq": make(n, s, 1e-6, True, kind=2)}
                                for n, s in shapes.items()}}, "step": 1000}


class _Counter:
    """Requests and bytes storage serves in this process (_count patches the calls that fetch)."""

    def __init__(self):
        self.requests = 0
        self.bytes = 0
        self._undo = []

    def reset(self):
        self.requests = self.bytes = 0

    def undo(self):
        for u in self._undo:
            u()


def _count(counter: "_Counter", store: str) -> None:
    if store == "s3":  # every GetObject the S3 client makes (s3fs's paths nest: count at the client)
        from aiobotocore.client import AioBaseClient
        real_call = AioBaseClient._make_api_call

        async def call(self, operation_name, api_params):
            out = await real_call(self, operation_name, api_params)
            if operation_name == "GetObject":
                counter.requests += 1
                counter.bytes += int(out.get("ContentLength", 0))
            return out
        AioBaseClient._make_api_call = call
        counter._undo.append(lambda: setattr(AioBaseClient, "_make_api_call", real_call))
        return
    from shardckpt.storage.local import LocalStorage  # local paths: count what LocalStorage is asked for
    real_file, real_ranges = LocalStorage.read_file, LocalStorage.read_ranges

    def read_file(self, relpath):
        out = real_file(self, relpath)
        counter.requests += 1
        counter.bytes += len(out)
        return out

    def read_ranges(self, relpath, ranges, dest):
        real_ranges(self, relpath, ranges, dest)
        counter.requests += len(ranges)
        counter.bytes += sum(r.length for r in ranges)
    LocalStorage.read_file, LocalStorage.read_ranges = read_file, read_ranges
    counter._undo.append(lambda: (setattr(LocalStorage, "read_file", real_file),
                                  setattr(LocalStorage, "read_ranges", real_ranges)))


def _target(scenario, shapes, dtype, rank, ws):
    if scenario in ("ddp", "finetune"):
        return _plain_state(shapes, dtype, seed=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    mesh = init_device_mesh("cpu", (ws // 2, 2), mesh_dim_names=("rep", "shard"))
    pl = [Replicate(), Shard(0)]

    def make(name, shape, scale, square=False, kind=0):
        lshape, off = compute_local_shape_and_global_offset(shape, mesh, pl)
        x = _rows(name, kind, 1, shape, off[0] if shape else 0, lshape[0] if shape else 1)
        x = (x * x * scale if square else x * scale).to(dtype)
        return DTensor.from_local(x, mesh, pl, run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())
    return {"model": {n: make(n, sh, 0.02) for n, sh in shapes.items()},
            "optim": {"state": {n: {"exp_avg": make(n, sh, 1e-3, kind=1),
                                    "exp_avg_sq": make(n, sh, 1e-6, True, kind=2)} for n, sh in shapes.items()}},
            "step": 1000}


def _save_job(rank, ws, args, scenario):
    import shardckpt
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    state = _plain_state(shapes, dtype) if scenario == "ddp" else local_state(shapes, dtype, rank, ws)
    shardckpt.save(state, f"{args['url']}/{scenario}", storage_options=args["opts"])
    shardckpt.shutdown()
    return True


def _load_job(rank, ws, args, scenario):
    import torch.distributed as dist
    import shardckpt
    os.environ["AWS_DEFAULT_REGION"] = args.get("region", "")
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    state = _target(scenario, shapes, dtype, rank, ws)
    counter = _Counter()
    _count(counter, args["store"])
    url, opts = f"{args['url']}/{scenario}", args["opts"]
    methods = ["exchange", "direct"] + (["dcp"] if args["store"] == "s3" else [])
    out = {m: [] for m in methods}
    for r in range(args["repeat"]):
        for m in methods if r % 2 == 0 else methods[::-1]:
            _zero_any(state)
            counter.reset()
            dist.barrier()
            t0 = time.perf_counter()
            if m == "dcp":
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
                dcp.load(state, storage_reader=FsspecReader(url + "-dcp", **opts))
            else:
                shardckpt.load(state, url, storage_options=opts, exchange="auto" if m == "exchange" else "never")
            dist.barrier()
            out[m].append((time.perf_counter() - t0, counter.requests, counter.bytes))
    counter.undo()
    shardckpt.shutdown()
    return out


def _zero_any(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            _zero_any(v)
    elif isinstance(obj, torch.Tensor):
        (obj._local_tensor if hasattr(obj, "_local_tensor") else obj).zero_()


def _dcp_save_job(rank, ws, args, scenario):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    state = _plain_state(shapes, dtype) if scenario == "ddp" else local_state(shapes, dtype, rank, ws)
    dcp.save(state, storage_writer=FsspecWriter(f"{args['url']}/{scenario}-dcp", **args["opts"]))
    return True


def _stored(url, opts):
    from shardckpt.format.metadata import read_manifest
    return read_manifest(url, storage_options=opts).stored_bytes


def plan_simulation(params: float, dtype=torch.bfloat16, saved_ws: int = 64) -> list[dict]:
    """plan_exchange for 16, 1,024 and 16,384 ranks on the needs a restore of this state would gather:
    DDP (every rank needs every frame) and HSDP (replicas of the saving world's shards), from a checkpoint
    saved by `saved_ws` ranks FSDP with shardckpt's frame sizes (about 16 frames per chunk)."""
    import math
    from shardckpt.plan.exchange_plan import plan_exchange
    from shardckpt.format.records import DEFAULT_FRAME_SIZE, chunk_frame_size
    shapes = gpt_shapes(params)
    items = [(k, s) for k, s in shapes.items() for _ in range(3)]  # param, exp_avg, exp_avg_sq
    offsets: dict[int, list[int]] = {f: [0] for f in range(saved_ws)}
    for k, shape in items:
        rows = shape[0] if shape else 1
        row_bytes = (math.prod(shape[1:]) if shape else 1) * dtype.itemsize
        for f in range(saved_ws):
            lo, hi = rows * f // saved_ws, rows * (f + 1) // saved_ws
            nbytes = (hi - lo) * row_bytes
            if not nbytes:
                continue
            fs = chunk_frame_size(nbytes, DEFAULT_FRAME_SIZE)
            for a in range(0, nbytes, fs):
                offsets[f].append(offsets[f][-1] + int(min(fs, nbytes - a) * 0.68))  # ~stored/raw of bf16
    out = []
    for world in (16, 1024, 16384):
        every = [(f, 0, len(o) - 1) for f, o in offsets.items()]
        for layout in ("ddp", "hsdp"):
            if layout == "ddp":
                needs = [every] * world
            else:  # (replicate, shard) mesh whose shard dim is the saving world: rank r needs file r % saved_ws
                shards = min(world, saved_ws)
                needs = [[every[f] for f in range(saved_ws) if f % shards == r % shards] for r in range(world)]
            t0 = time.perf_counter()
            plan = plan_exchange(needs, offsets)
            dt = time.perf_counter() - t0
            # digests first (Comm.all_gather_distinct): 24 bytes a rank, then each distinct need once
            gathered = 24 * world + sum(len(json.dumps({"runs": n}, separators=(",", ":")))
                                        for n in {tuple(n): n for n in needs}.values())
            index_bytes = sum(len(o) * 40 for o in offsets.values())  # ~40 B per frame record in the index
            fetched = [0] * world
            for p in plan.pieces:
                fetched[p.fetcher] += p.nbytes
            out.append({"ranks": world, "layout": layout, "plan_s": round(dt, 4), "pieces": len(plan.pieces),
                        "needs_bytes_per_rank": gathered, "metadata_bytes_per_rank": index_bytes,
                        "max_fetched_per_rank": max(fetched), "stored_bytes": sum(o[-1] for o in offsets.values())})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=16e6)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--store", choices=("s3", "local"), default="s3")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=4, help="ranks of the load (hsdp: 4 or more, even)")
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--plan-params", type=float, default=350e6, help="state simulated by the planning part")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/tmp/shardckpt-bench-exchange"))
    a = ap.parse_args(argv)
    res: dict = {"args": vars(a)}
    if not a.plan_only:
        from harness import run_ranks
        import shutil
        shutil.rmtree(a.dir, ignore_errors=True)
        os.makedirs(a.dir)
        server, args = open_store(a.store, "xbench", a.dir)
        args.update(params=a.params, dtype=a.dtype, store=a.store, repeat=a.repeat)
        try:
            for sc in a.only.split(","):
                save_ws = 1 if sc == "finetune" else 4
                run_ranks(save_ws, _save_job, args, sc, timeout=1800)
                if a.store == "s3":
                    run_ranks(save_ws, _dcp_save_job, args, sc, timeout=1800)
                stored = _stored(f"{args['url']}/{sc}", args["opts"])
                per_rank = run_ranks(a.ranks, _load_job, args, sc, timeout=1800)
                row = {"stored_bytes": stored}
                for m in per_rank[0]:
                    times = [max(r[m][i][0] for r in per_rank) for i in range(a.repeat)]
                    req = sum(r[m][0][1] for r in per_rank)
                    got = sum(r[m][0][2] for r in per_rank)
                    row[m] = {"best_s": min(times), "median_s": statistics.median(times), "requests": req,
                              "bytes": got, "bytes_over_stored": got / stored, "first_s": times[0]}
                res[sc] = row
                print(f"{sc}: stored {stored / 1e6:.1f} MB")
                for m, v in row.items():
                    if m != "stored_bytes":
                        print(f"  {m:<9} best {v['best_s']:.3f}s median {v['median_s']:.3f}s  fetched "
                              f"{v['bytes'] / 1e6:8.1f} MB = {v['bytes_over_stored']:.2f}x stored in "
                              f"{v['requests']} requests")
                if "dcp" in row:
                    print(f"  time ratios: direct/exchange {row['direct']['median_s'] / row['exchange']['median_s']:.2f}x, "
                          f"dcp/exchange {row['dcp']['median_s'] / row['exchange']['median_s']:.2f}x (medians)")
        finally:
            if server is not None:
                import s3_server
                s3_server.stop(server)
    res["plan"] = plan_simulation(a.plan_params)
    for p in res["plan"]:
        print(f"plan {p['layout']:<5} {p['ranks']:>6} ranks: {p['plan_s']:.3f}s, {p['pieces']} pieces, most fetched "
              f"by a rank {p['max_fetched_per_rank'] / 1e6:.1f} of {p['stored_bytes'] / 1e6:.0f} MB; each rank receives {p['needs_bytes_per_rank'] / 1e6:.2f} MB of needs + "
              f"{p['metadata_bytes_per_rank'] / 1e6:.2f} MB of metadata")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "exchange.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()

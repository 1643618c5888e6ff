"""shardckpt vs torch.distributed.checkpoint's FsspecWriter/FsspecReader on a real S3 server (Ceph radosgw
on loopback, started here), on bench.compare's GPT-style state, in one run.

    python -m bench.s3 --params 50e6            # save on 2 ranks, load on 2, reshard to 3; best of 3

Reports save and load times, and for the 2 -> 3 resharding load the bytes each method fetched against the
bytes the new layout needs (the stored bytes of the rows each new rank holds)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import torch  # noqa: E402

from bench.compare import RESULTS, _zero, gpt_shapes, local_state  # noqa: E402


def _timed(fn):
    import torch.distributed as dist
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - t0, out


def _job(rank, ws, args, mode):
    """Each method `repeat` times, in alternating order (the first request of a process pays the S3
    client's session setup, whichever method makes it); saves go to fresh prefixes, loads read the first.
    Later saves are deleted once timed (after a barrier), so the RAM-backed server never holds more than the
    two first saves and one more: its cost per byte rises once it holds ~2 GB (tests/s3_server.py)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    import shardckpt
    from shardckpt.storage import storage_for
    os.environ["AWS_DEFAULT_REGION"] = args["region"]
    opts = args["opts"]
    shapes, dtype = gpt_shapes(args["params"]), getattr(torch, args["dtype"])
    state = local_state(shapes, dtype, rank, ws, seed=0 if mode == "save" else 1)
    out: dict = {"shardckpt": [], "dcp": []}
    for r in range(args["repeat"]):
        for method in ("shardckpt", "dcp") if r % 2 == 0 else ("dcp", "shardckpt"):
            url = f"{args['url']}/{method}-{r if mode == 'save' else 0}"
            if mode == "save":
                if method == "shardckpt":
                    out[method].append(_timed(lambda: shardckpt.save(state, url, storage_options=opts))[0])
                else:
                    out[method].append(_timed(lambda: dcp.save(state, storage_writer=FsspecWriter(url, **opts)))[0])
                if r > 0 and rank == 0:  # the loads read repeat 0; the server frees what is deleted
                    storage_for(url, opts).delete_tree()
                    time.sleep(2.5)  # ... within ~1 s, not during the next timed save
            else:
                _zero(state)
                if method == "shardckpt":
                    t, res = _timed(lambda: shardckpt.load(state, url, storage_options=opts))
                    out[method].append((t, res.bytes_read, _needed_bytes(url, opts, state)))
                else:
                    fetched = _count_dcp_reads(lambda: dcp.load(state, storage_reader=FsspecReader(url, **opts)))
                    out[method].append((fetched[0], fetched[1], None))
    return out


def _needed_bytes(url, opts, state):
    """Stored bytes of exactly the rows this rank holds: for each overlap of a saved chunk with a local box,
    the chunk's stored bytes times the fraction of its rows needed."""
    from shardckpt.loading.load import target_box, read_chunks
    from shardckpt.format.metadata import read_manifest
    from shardckpt.plan.geometry import intersect
    from shardckpt.storage import storage_for
    from shardckpt.format.tree import flatten
    st = storage_for(url, opts)
    m = read_manifest(st)
    chunks = read_chunks(st, m)
    need = 0.0
    for key, leaf in flatten(state).leaves.items():
        if not isinstance(leaf.value, torch.Tensor):
            continue
        off, size, _ = target_box(leaf.value)
        for c in chunks[key]:
            inter = intersect(c.offsets, c.sizes, off, size)
            if inter and c.sizes:
                need += sum(f.stored_len for f in c.frames) * inter[1][0] / c.sizes[0]
    return need


def _count_dcp_reads(fn):
    """Time a DCP load and count the bytes it pulled through fsspec file objects."""
    import fsspec.spec
    counted = [0]
    orig = fsspec.spec.AbstractBufferedFile.read

    def read(self, length=-1):
        data = orig(self, length)
        counted[0] += len(data)
        return data
    fsspec.spec.AbstractBufferedFile.read = read
    try:
        t, _ = _timed(fn)
    finally:
        fsspec.spec.AbstractBufferedFile.read = orig
    return t, counted[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ws", type=int, default=2)
    ap.add_argument("--load-ws", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="runs per method (alternating order); best reported")
    a = ap.parse_args(argv)
    import s3_server
    from harness import run_ranks
    server = s3_server.start()
    try:
        os.environ["AWS_DEFAULT_REGION"] = server.region
        args = {"params": a.params, "dtype": a.dtype, "url": server.url(f"bench-{int(time.time())}"),
                "opts": server.storage_options, "region": server.region, "repeat": a.repeat}
        save = run_ranks(a.ws, _job, args, "save", timeout=3600)
        load = run_ranks(a.ws, _job, args, "load", timeout=3600)
        reshard = run_ranks(a.load_ws, _job, args, "load", timeout=3600)
    finally:
        s3_server.stop(server)
    # per repeat the slowest rank, then the best repeat
    def best(runs, pick=lambda x: x):
        return {m: min(max(pick(r[m][i]) for r in runs) for i in range(a.repeat)) for m in ("shardckpt", "dcp")}
    res = {"save": best(save), "load": best(load, lambda x: x[0]), "reshard": best(reshard, lambda x: x[0]),
           "reshard_fetched": {m: sum(r[m][0][1] for r in reshard) for m in ("shardckpt", "dcp")},
           "reshard_needed": sum(r["shardckpt"][0][2] for r in reshard)}
    print(f"{'phase':<10}{'shardckpt':>12}{'dcp':>12}{'dcp/shardckpt':>16}")
    for ph in ("save", "load", "reshard"):
        v = res[ph]
        print(f"{ph:<10}{v['shardckpt']:>11.2f}s{v['dcp']:>11.2f}s{v['dcp'] / v['shardckpt']:>15.2f}x")
    f = res["reshard_fetched"]
    print(f"reshard {a.ws}->{a.load_ws}: fetched shardckpt {f['shardckpt'] / 1e6:.1f} MB, dcp {f['dcp'] / 1e6:.1f} MB;"
          f" needed {res['reshard_needed'] / 1e6:.1f} MB -> shardckpt fetched/needed = "
          f"{f['shardckpt'] / res['reshard_needed']:.3f}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "s3.json"), "w") as fh:
        json.dump({"args": vars(a), **res}, fh, indent=1)


if __name__ == "__main__":
    main()

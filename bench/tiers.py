"""The node-local tier against the durable store alone: training stall per save, time to durable, and time
to recover after losing a node, on 4 ranks simulated as 2 nodes x 2, in one run.

    python -m bench.tiers                    # durable tier on real S3 (Ceph radosgw on loopback, started here)
    python -m bench.tiers --store local      # durable tier in a local directory

The state is bench.compare's GPT-style one (params + AdamW moments as Shard(0) DTensors over the 4 ranks).
Every method is a CheckpointManager(async_save=True) saving every step; between saves the job waits for the
previous save (untimed, as training would compute), then the maybe_save call is timed (the stall, slowest
rank):
  durable   today's async saves to the durable root, every step (its stall is the baseline; durable_s from
            the committed events)
  tiered    local_root per node, local every step, replicas on the other node, durable every 3rd step by
            promotion: stall of local-only steps and of promotion steps, local durable_s and time to durable
Recovery, each in fresh processes (a job's restore is its process's first load): node 1's local dir wiped,
restore("latest") with the local tier (node 0's files and replicas, exchanged) against a manager without a
local tier restoring the durable root's latest; the restore() call and, separately, creating the manager
before it (both pay it: the store's client imported and started, the root probed, gc listed). Bytes fetched from the durable store are counted at its
client (S3 GetObject) and summed over ranks. Goals (issue 14): recovery >= 3x faster from the local tier;
stall of a local save <= 1.2x the async durable stall. Writes bench/results/tiers.json."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import torch  # noqa: E402

from bench.compare import RESULTS, gpt_shapes, local_state  # noqa: E402
from bench.exchange import _count, _Counter, _zero_any, open_store  # noqa: E402

EVERY_DURABLE = 3


def _node_dir(base: str) -> str:
    return os.path.join(base, f"node{os.environ['GROUP_RANK']}")


def _committed(events: list) -> None:
    from shardckpt.manager.events import CheckpointCallback

    class Record(CheckpointCallback):
        def on_committed(self, e):
            events.append((e.step, e.tier, e.durable_s))
    return Record()


def _save_job(rank, ws, args, method):
    import torch.distributed as dist
    import shardckpt
    os.environ["AWS_DEFAULT_REGION"] = args.get("region", "")
    state = local_state(gpt_shapes(args["params"]), getattr(torch, args["dtype"]), rank, ws)
    events: list = []
    kw = dict(save_every_steps=1, keep_last=2, storage_options=args["opts"], callbacks=[_committed(events)])
    if method == "tiered":
        kw.update(save_every_steps=EVERY_DURABLE, local_root=_node_dir(args["local"]), local_every_steps=1,
                  local_keep_last=2)
    stalls = []
    with shardckpt.CheckpointManager(f"{args['url']}/{method}", **kw) as mgr:
        for step in range(1, args["steps"] + 1):
            mgr.wait()  # the previous save is done: what training's compute between saves would hide
            state["step"] = step
            dist.barrier()
            t0 = time.perf_counter()
            mgr.maybe_save(step, state)
            stalls.append((step, time.perf_counter() - t0))
    shardckpt.shutdown()
    return stalls, events


def _recover_job(rank, ws, args, method):
    import torch.distributed as dist
    import shardckpt
    os.environ["AWS_DEFAULT_REGION"] = args.get("region", "")
    state = local_state(gpt_shapes(args["params"]), getattr(torch, args["dtype"]), rank, ws, seed=1)
    _zero_any(state)
    counter = _Counter()
    _count(counter, args["store"])
    kw = {"local_root": _node_dir(args["local"])} if method == "local" else {}
    dist.barrier()
    t0 = time.perf_counter()
    with shardckpt.CheckpointManager(f"{args['url']}/tiered", storage_options=args["opts"], **kw) as mgr:
        dist.barrier()
        t1 = time.perf_counter()
        step = mgr.restore(state)
        dist.barrier()
    t2 = time.perf_counter()
    counter.undo()
    shardckpt.shutdown()
    return (t1 - t0, t2 - t1), step, mgr.restored_tier, counter.bytes if args["store"] == "s3" else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=16e6)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--store", choices=("s3", "local"), default="s3")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/tmp/shardckpt-bench-tiers"))
    a = ap.parse_args(argv)
    from harness import run_ranks
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    server, args = open_store(a.store, "tbench", os.path.join(a.dir, "durable"))
    args.update(params=a.params, dtype=a.dtype, store=a.store, steps=a.steps, local=os.path.join(a.dir, "local"))
    res: dict = {"args": vars(a)}
    try:
        for method in ("durable", "tiered"):
            per_rank = run_ranks(4, _save_job, args, method, timeout=1800, nodes=2)
            stalls = {step: max(r[0][i][1] for r in per_rank) for i, (step, _) in enumerate(per_rank[0][0])}
            events = per_rank[0][1]
            res[method] = {"stall_s": stalls, "committed": events}
        shutil.rmtree(os.path.join(a.dir, "local", "node1"))  # node 1 lost
        for method in ("local", "durable"):
            per_rank = run_ranks(4, _recover_job, args, method, timeout=1800, nodes=2)
            res[f"recover_{method}"] = {"create_s": max(r[0][0] for r in per_rank),
                                        "restore_s": max(r[0][1] for r in per_rank), "step": per_rank[0][1],
                                        "tier": per_rank[0][2],
                                        "store_bytes": None if a.store != "s3" else sum(r[3] for r in per_rank)}
    finally:
        if server is not None:
            import s3_server
            s3_server.stop(server)
    _report(res, a.steps)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "tiers.json"), "w") as fh:
        json.dump(res, fh, indent=1)


def _report(res: dict, steps: int) -> None:
    """Print the table: first-save and median stalls, time to durable, recovery; and the two goal ratios."""
    base = res["durable"]["stall_s"]
    tier = res["tiered"]["stall_s"]
    promo = [s for s in range(1, steps + 1) if s % EVERY_DURABLE == 0]
    local_only = [s for s in range(2, steps + 1) if s % EVERY_DURABLE]
    med = statistics.median
    rows = [("durable async save (baseline)", base[1], med(base[s] for s in range(2, steps + 1))),
            ("local save", tier[1], med(tier[s] for s in local_only)),
            ("local save + promotion", None, med(tier[s] for s in promo))]
    print(f"{'stall per save (slowest rank)':<34}{'first':>9}{'median':>9}")
    for name, first, m in rows:
        print(f"{name:<34}{'' if first is None else f'{first:.3f}s':>9}{m:>8.3f}s")
    ev = res["tiered"]["committed"]
    dur = [d for s, t, d in ev if t == "durable"]
    loc = [d for s, t, d in ev if t == "local"]
    base_dur = [d for s, t, d in res["durable"]["committed"]]
    print(f"time to durable: durable tier {med(base_dur):.3f}s; tiered: local commit {med(loc):.3f}s, promoted "
          f"to durable {med(dur):.3f}s (medians)")
    rl, rd = res["recover_local"], res["recover_durable"]
    print(f"recovery after losing node 1 (fresh processes): restore() local tier {rl['restore_s']:.2f}s (step "
          f"{rl['step']}, {rl['tier']}), durable tier {rd['restore_s']:.2f}s (step {rd['step']}, {rd['tier']}); "
          f"with creating the manager first (the store's client started, root probed): {rl['create_s'] + rl['restore_s']:.2f}s "
          f"vs {rd['create_s'] + rd['restore_s']:.2f}s" + (
              f"; fetched from the durable store {rl['store_bytes'] / 1e6:.1f} MB vs {rd['store_bytes'] / 1e6:.1f} MB"
              if rl["store_bytes"] is not None else ""))
    res["ratios"] = {"restore_durable_over_local": rd["restore_s"] / rl["restore_s"],
                     "recovery_with_manager_durable_over_local": (rd["create_s"] + rd["restore_s"]) /
                     (rl["create_s"] + rl["restore_s"]),
                     "local_stall_over_async_stall": rows[1][2] / rows[0][2],
                     "promotion_stall_over_async_stall": rows[2][2] / rows[0][2]}
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["ratios"].items()))


if __name__ == "__main__":
    main()

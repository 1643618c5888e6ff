"""Multi-rank test harness: runs a function on N CPU processes joined by gloo over a FileStore (no ports),
always with a timeout. Processes come from a forkserver that has imported torch once, so a launch costs
well under the 2-3 s of a fresh `import torch`. Run many scenarios per launch."""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

TIMEOUT_S = 60


def _entry(rank, world_size, store_path, fn, args, env, result_q, nodes=1):
    # what torchrun sets (shardckpt splits a node's cores among its ranks); `nodes` simulates that many
    # nodes of world_size // nodes ranks each (GROUP_RANK = node, as torchrun's --nnodes sets it)
    per = world_size // nodes
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank % per), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(per), "GROUP_RANK": str(rank // per)})
    os.environ.update(env)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=TIMEOUT_S))
        out = fn(rank, world_size, *args)
        result_q.put((rank, "ok", out))
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    except BaseException:
        result_q.put((rank, "error", traceback.format_exc()))
    finally:
        result_q.close()
        result_q.join_thread()  # the queue's feeder thread must flush before os._exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # gloo's teardown at interpreter exit can abort a finished process


def run_ranks(world_size: int, fn, *args, env: dict | None = None, timeout: float = 240.0, nodes: int = 1) -> list:
    """Run fn(rank, world_size, *args) on world_size processes; return the per-rank results (picklable),
    re-raising the first rank's traceback as AssertionError if any rank failed. `nodes` > 1 sets each
    rank's GROUP_RANK/LOCAL_RANK/LOCAL_WORLD_SIZE as on that many nodes of equal size."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "shardckpt"])
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_entry, args=(r, world_size, os.path.join(d, "store"), fn, args,
                                                  dict(env or {}), q, nodes), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, []
        import queue
        import time
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            try:
                rank, status, payload = q.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    break
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                if dead and q.empty():
                    time.sleep(0.5)
                    if q.empty():
                        raise AssertionError(f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) "
                                             f"without reporting a result")
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append((rank, payload))
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if errors:
            rank, tb = sorted(errors)[0]
            raise AssertionError(f"rank {rank} failed:\n{tb}")
        if len(results) < world_size:
            raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(results))} did not finish "
                                 f"within {timeout}s")
        return [results[r] for r in range(world_size)]

"""async_save: snapshot semantics, pool reuse, error reporting, and background collectives that never
interleave with the foreground's (training collectives, sync saves) on 2 ranks."""
from __future__ import annotations

import importlib
import os
import time

import pytest
import torch

import shardckpt
from harness import run_ranks


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 257, generator=g), "b": torch.arange(1000, dtype=torch.int64),
            "h": torch.randn(64, 33, generator=g).to(torch.bfloat16), "step": 3, "cfg": {"lr": 0.1}}


def _clone(state):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) if isinstance(b[k], torch.Tensor) else a[k] == b[k] for k in b)


def test_snapshot_at_call_and_pool_reuse(tmp_path):
    mod = importlib.import_module("shardckpt.saving.async_save")  # the package exports the function by that name
    state = _state()
    want = _clone(state)
    h = shardckpt.async_save(state, tmp_path / "a")
    for v in state.values():
        if isinstance(v, torch.Tensor):
            v.add_(1) if v.dtype != torch.bool else None  # the caller changes its tensors right away
    m = h.wait()
    assert h.done() and m.user_metadata == {} and h.stall_s > 0
    assert _equal(shardckpt.load_full(tmp_path / "a"), want)
    saver = next(iter(mod._savers.values()))
    before = [p.allocations for p in saver.pools]
    want2 = _clone(state)
    h2 = shardckpt.async_save(state, tmp_path / "b", metadata={"n": 2})
    assert h2.wait().user_metadata == {"n": 2}
    assert [p.allocations for p in saver.pools] == before  # the host buffers were reused
    assert _equal(shardckpt.load_full(tmp_path / "b"), want2)
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.async_save(state, tmp_path / "b")  # planning errors raise at the call


def test_errors_raise_on_wait_and_on_next_save(tmp_path):
    state = _state()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data").write_text("a file where the data directory goes")  # the background write fails
    h = shardckpt.async_save(state, bad)
    with pytest.raises(shardckpt.SaveError):
        h.wait()
    assert isinstance(h.exception(), shardckpt.SaveError)
    shardckpt.async_save(state, tmp_path / "ok").wait()  # an observed error is not raised again
    h = shardckpt.async_save(state, bad)
    while not h.done():
        time.sleep(0.01)
    with pytest.raises(shardckpt.SaveError):  # nobody waited: the next save raises it
        shardckpt.async_save(state, tmp_path / "ok2")
    assert not (tmp_path / "ok2" / "manifest.json").exists()
    h3 = shardckpt.async_save(state, tmp_path / "ok3", max_in_flight=2)
    h4 = shardckpt.async_save(state, tmp_path / "ok4", max_in_flight=2)
    h3.wait(), h4.wait()
    assert _equal(shardckpt.load_full(tmp_path / "ok4"), state)


def _slow_writes(delay):
    """Make every background write wait `delay` seconds first, so it overlaps what the caller does next."""
    from shardckpt.saving import pipeline
    from shardckpt import api
    orig = pipeline.write_rank

    def slow(*a, **kw):
        time.sleep(delay)
        return orig(*a, **kw)
    pipeline.write_rank = slow
    return orig


def _multirank(rank, ws, root):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from shardckpt.saving import pipeline
    from shardckpt import api
    mesh = init_device_mesh("cpu", (ws,))
    full = _state()
    state = {"w": distribute_tensor(full["w"].clone(), mesh, [Shard(0)], src_data_rank=None),
             "b": full["b"].clone(), "h": distribute_tensor(full["h"].clone(), mesh, [Shard(1)], src_data_rank=None),
             "step": 3, "cfg": {"lr": 0.1}}
    out = {}
    orig = _slow_writes(0.4)
    try:
        t0 = time.perf_counter()
        h = shardckpt.async_save(state, os.path.join(root, "a"), metadata={"r": 1})
        out["stall"] = time.perf_counter() - t0
        out["done_early"] = h.done()
        # while the background writes and commits: training collectives on the job's group, a sync save
        # (foreground collectives on shardckpt's companion group), and changes to the saved tensors
        for i in range(20):
            x = torch.full((4,), float(rank + i))
            dist.all_reduce(x)
            assert x[0].item() == sum(r + i for r in range(ws))
        state["w"]._local_tensor.mul_(-1)
        state["b"].add_(5)
        pipeline.write_rank = orig
        shardckpt.save({"x": torch.arange(10) + rank * 0}, os.path.join(root, "sync"))
        pipeline.write_rank = _slow_writes(0.2)
        # two saves in flight at once, then a bounded third
        hs = [shardckpt.async_save({"v": torch.full((100,), float(i))}, os.path.join(root, f"m{i}"),
                                   max_in_flight=2) for i in range(3)]
        for i, hh in enumerate(hs):
            assert hh.wait().save_id
        m = h.wait()
        out["meta"] = m.user_metadata
    finally:
        pipeline.write_rank = orig
    # a failure in the background raises on every rank, at wait()
    bad = os.path.join(root, "bad")
    if rank == 0:
        os.makedirs(bad)
        open(os.path.join(bad, "data"), "w").close()
    dist.barrier()
    try:
        shardckpt.async_save({"w": state["w"]}, bad).wait()
        out["bad"] = None
    except shardckpt.SaveError as e:
        out["bad"] = type(e).__name__
    dist.barrier()
    return out


def test_a_queued_job_does_not_stall_the_next_snapshot(tmp_path):
    """after_saves (a local tier's promotion): the next async_save snapshots while the job runs, its own
    write queues behind the job, and a failed job is raised where every rank waits (wait_all)."""
    import threading
    mod = importlib.import_module("shardckpt.saving.async_save")
    shardckpt.async_save(_state(), tmp_path / "a").wait()
    release, order = threading.Event(), []

    def job(comm):
        release.wait(10)
        order.append("job")
        raise RuntimeError("upload refused")
    mod.after_saves(str(tmp_path / "job"), job)
    t0 = time.monotonic()
    h = shardckpt.async_save(_state(1), tmp_path / "b")
    assert time.monotonic() - t0 < 5 and not h.done()  # snapshotted; the write waits behind the job
    h.add_done_callback(lambda m, err: order.append("save"))
    release.set()
    assert h.wait().world_size == 1 and order == ["job", "save"]
    with pytest.raises(RuntimeError, match="upload refused"):
        mod.wait_all()
    assert _equal(shardckpt.load_full(tmp_path / "b"), _state(1))


def test_multirank_background_never_interleaves(tmp_path):
    outs = run_ranks(2, _multirank, str(tmp_path), timeout=120)
    for o in outs:
        assert o["done_early"] is False and o["meta"] == {"r": 1} and o["bad"] == "SaveError"
    full = _state()
    got = shardckpt.load_full(tmp_path / "a")
    assert _equal(got, full)  # the values at the call, although the ranks changed them right after
    assert torch.equal(shardckpt.load_full(tmp_path / "m2")["v"], torch.full((100,), 2.0))


def test_warm_up_allocates_the_pool_off_the_training_thread(tmp_path):
    """The first async save of a process reuses the pool warm_up reserved: no allocation on its stall."""
    mod = importlib.import_module("shardckpt.saving.async_save")
    mod.reset()
    state = _state()
    nbytes = shardckpt.warm_up(state)
    saver = next(iter(mod._savers.values()))
    pool = saver.pools[0]
    assert pool.allocations == 1 and pool.capacity >= nbytes >= 300 * 257 * 4  # mapped at once, faulted behind
    h = shardckpt.async_save(state, tmp_path / "a")
    h.wait()
    assert pool.allocations == 1  # the snapshot reused it
    assert _equal(shardckpt.load_full(tmp_path / "a"), state)
    mod.reset()


def test_manager_restore_warms_up_the_first_save(tmp_path):
    mod = importlib.import_module("shardckpt.saving.async_save")
    mod.reset()
    state = _state()
    mgr = shardckpt.CheckpointManager(tmp_path / "run", save_every_steps=1, preemption_signals=())
    assert mgr.restore(state) is None  # nothing to restore yet: the pool is reserved all the same
    pools = [p for s in mod._savers.values() for p in s.pools]
    assert pools[0].allocations == 1 and pools[0].capacity > 0
    mgr.maybe_save(1, state)
    mgr.close()
    assert pools[0].allocations == 1 and mgr.steps() == [1]
    mod.reset()


def test_manager_warms_up_at_its_first_maybe_save_without_a_restore(tmp_path):
    """A job that never calls restore: the first maybe_save (not due) reserves the pool, so the save at the
    due step snapshots into it instead of allocating on its stall."""
    mod = importlib.import_module("shardckpt.saving.async_save")
    mod.reset()
    state = _state()
    mgr = shardckpt.CheckpointManager(tmp_path / "run", save_every_steps=3, preemption_signals=())
    assert mgr.maybe_save(1, state) is False
    pools = [p for s in mod._savers.values() for p in s.pools]
    assert len(pools) == 1 and pools[0].allocations == 1 and pools[0].capacity >= 300 * 257 * 4
    assert mgr.maybe_save(2, state) is False and mgr.maybe_save(3, state) is True
    mgr.close()
    assert pools[0].allocations == 1 and mgr.steps() == [3]
    assert _equal(shardckpt.load_full(mgr.step_path(3).url), state)
    mod.reset()


def test_first_snapshot_copies_behind_the_faulting_thread():
    """A fresh pool is faulted in a piece at a time on a background thread while stage() copies what is
    ready: with small pieces and a slow faulting thread, the snapshot is still exact, and take() returned
    before the pages were in."""
    from shardckpt.plan.save_plan import plan_tensor
    from shardckpt.saving import staging

    class SlowPool(staging.HostBufferPool):
        PIECE = 1 << 16

        def _fault_in(self, region, n):
            import time
            self.seen = []
            orig = region.madvise
            class Slow:  # noqa: E306 (a region whose madvise takes its time)
                def madvise(_, *a):
                    time.sleep(0.002)
                    self.seen.append(self._ready)
                    return orig(*a)
            super()._fault_in(Slow(), n)

    g = torch.Generator().manual_seed(3)
    src = {"a": torch.randn(300, 257, generator=g), "b": torch.randn(77, generator=g).bfloat16(),
           "s": torch.randn(40, 30, generator=g).t()}
    items = [plan_tensor(k, v, "auto", 0, 1)[1] for k, v in src.items()]
    pool = SlowPool(pin=False)
    views = pool.take([i.nbytes for i in items])
    assert pool._ready < pool.capacity  # handed out before the region was faulted in
    del views
    out = staging.stage(items, pool)
    for (k, v), o in zip(src.items(), out):
        assert torch.equal(o, v), k
    pool._prefault.join()
    assert pool._ready == pool.capacity and len(pool.seen) >= pool.capacity // SlowPool.PIECE

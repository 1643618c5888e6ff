"""Read-once restores (shardckpt/exchange.py): every needed frame is fetched from storage by exactly one rank
of the group and shared; results are bit-exact against direct reads; failures raise typed on every rank."""
from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import shardckpt
from harness import run_ranks
from scenarios import distributed_state, full_of, full_state, make_mesh, zeros_like_state
from shardckpt.plan.exchange_plan import merge_runs, plan_exchange


# ---------------------------------------------------------------------------------------------- planning

@st.composite
def _layouts(draw):
    files = draw(st.integers(1, 3))
    sizes = {f: draw(st.lists(st.integers(1, 5 << 20), min_size=1, max_size=12)) for f in range(files)}
    offsets = {f: [sum(s[:i]) for i in range(len(s) + 1)] for f, s in sizes.items()}
    world = draw(st.integers(1, 9))
    needs = []
    for _ in range(world):
        runs = []
        for f, s in sizes.items():
            for _ in range(draw(st.integers(0, 2))):
                a = draw(st.integers(0, len(s) - 1))
                runs.append((f, a, draw(st.integers(a + 1, len(s)))))
        needs.append(runs)
    return needs, offsets


@settings(max_examples=300, deadline=None)
@given(_layouts(), st.sampled_from([1 << 20, 4 << 20]), st.sampled_from([2 << 20, 8 << 20]))
def test_plan_fetches_every_needed_frame_exactly_once_by_a_rank_that_needs_it(layout, min_piece, round_bytes):
    needs, offsets = layout
    plan = plan_exchange(needs, offsets, min_piece=min_piece, max_piece=4 * min_piece, round_bytes=round_bytes)
    fetched: dict[tuple[int, int], int] = {}
    for p in plan.pieces:
        assert p.fetcher in p.receivers and p.nbytes == offsets[p.file][p.end] - offsets[p.file][p.first]
        for j in range(p.first, p.end):
            assert (p.file, j) not in fetched  # exactly once
            fetched[(p.file, j)] = p.fetcher
            need = {r for r, runs in enumerate(needs) for f, a, b in runs if f == p.file and a <= j < b}
            assert set(p.receivers) == need  # sent to exactly the ranks that need it
    wanted = {(f, j) for runs in needs for f, a, b in runs for j in range(a, b)}
    assert set(fetched) == wanted
    assert sorted(i for r in plan.rounds for i in r) == list(range(len(plan.pieces)))
    assert plan.shared == any(len(p.receivers) > 1 for p in plan.pieces)


def test_plan_balances_replicas_and_skips_disjoint_needs():
    offs = {0: [i << 20 for i in range(101)]}
    ddp = plan_exchange([[(0, 0, 100)]] * 4, offs)
    loads = [ddp.fetched_bytes(r) for r in range(4)]
    assert sum(loads) == 100 << 20 and max(loads) - min(loads) <= 2 << 20
    fsdp = plan_exchange([[(0, 25 * r, 25 * r + 25)] for r in range(4)], offs)
    assert not fsdp.shared and [fsdp.fetched_bytes(r) for r in range(4)] == [25 << 20] * 4
    assert ddp.worth_exchanging and not fsdp.worth_exchanging
    # a reshard sharing one frame at each of 3 boundaries: auto reads directly
    reshard = plan_exchange([[(0, 0, 34)], [(0, 33, 67)], [(0, 66, 100)]], offs)
    assert reshard.shared and not reshard.worth_exchanging
    assert merge_runs([(0, 5, 9), (0, 0, 5), (1, 2, 3), (0, 8, 12)]) == [(0, 0, 12), (1, 2, 3)]


def test_plan_for_16k_replicas_is_fast():
    files = {f: [i * (4 << 20) for i in range(17)] for f in range(64)}
    t0 = time.perf_counter()
    plan = plan_exchange([[(f, 0, 16) for f in range(64)]] * 16384, files)
    assert time.perf_counter() - t0 < 10  # ~0.5 s here; bench.exchange reports it
    assert sum(p.nbytes for p in plan.pieces) == 64 * 64 << 20


# ---------------------------------------------------------------------------------------------- multi-rank

def _count_reads(counts: list):
    """Record every (file, offset, length) a storage backend is asked for, on this rank."""
    from shardckpt.storage.local import LocalStorage
    real = LocalStorage.read_ranges

    def counting(self, relpath, ranges, dest):
        counts.extend((relpath, r.offset, r.length) for r in ranges)
        return real(self, relpath, ranges, dest)
    LocalStorage.read_ranges = counting
    return lambda: setattr(LocalStorage, "read_ranges", real)


def _stored_frames(path):
    """(file, offset, stored_len) of every frame of a checkpoint."""
    from shardckpt.loading.load import read_chunks
    from shardckpt.format.metadata import read_manifest
    from shardckpt.storage import storage_for
    st_ = storage_for(path)
    m = read_manifest(st_)
    return {(c.file, f.offset, f.stored_len) for cs in read_chunks(st_, m).values() for c in cs for f in c.frames}


def _frames_covered(reads, frames):
    """How many times each frame is covered by the reads (ranges may span several frames)."""
    hits = dict.fromkeys(frames, 0)
    by_file: dict[str, list] = {}
    for fr in frames:
        by_file.setdefault(fr[0], []).append(fr)
    for file, off, n in reads:
        for fr in by_file.get(file, ()):
            if off <= fr[1] and fr[1] + fr[2] <= off + n:
                hits[fr] += 1
    return hits


def _save_layouts(rank, ws, root):
    """4 ranks: a plain (DDP-style) checkpoint, an FSDP (Shard(0)) one and a 2-D (dp x tp) one."""
    full = full_state()
    shardckpt.save(dict(full), os.path.join(root, "plain"))
    shardckpt.save(distributed_state(full, make_mesh(ws, 1), 0), os.path.join(root, "fsdp"))
    shardckpt.save(distributed_state(full, make_mesh(ws, 2), 1), os.path.join(root, "tp"))
    shardckpt.shutdown()
    return True


def _restore_layouts(rank, ws, root):
    """Loads of every kind, each exchanged and compared bit-exactly with a direct read of the same layout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    full = full_state()
    out = {}

    def check(name, path, make):
        counts: list = []
        undo = _count_reads(counts)
        try:
            got = make()
            shardckpt.load(got, path)
        finally:
            undo()
        ref = make()
        shardckpt.load(ref, path, exchange="never")
        for k in full:
            a, b = full_of(got[k]), full_of(ref[k])
            assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 and a.dtype.is_floating_point else a,
                               b.view(torch.uint8) if b.dtype.itemsize == 1 and b.dtype.is_floating_point else b), \
                (name, k)
            assert torch.equal(full_of(got[k]).float() if got[k].dtype != torch.bool else full_of(got[k]),
                               full[k].float() if full[k].dtype != torch.bool else full[k]), (name, k)
        out[name] = counts

    zeros = lambda st_: zeros_like_state(st_)  # noqa: E731
    # DDP: every rank loads plain full tensors
    check("ddp", os.path.join(root, "plain"), lambda: zeros({k: v.clone() for k, v in full.items()}))
    # HSDP 2x2 (Replicate, Shard(0)) from the 4-rank FSDP save
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
    check("hsdp", os.path.join(root, "fsdp"), lambda: zeros(
        {k: distribute_tensor(v.clone(), hsdp, [Replicate(), Shard(0)] if v.dim() else [Replicate()] * 2,
                              src_data_rank=None) for k, v in full.items()}))
    # TP + DP 2x2 (dp replicated, tp sharded on dim 1 where it can be) from the 2-D save
    check("tp_dp", os.path.join(root, "tp"), lambda: zeros(
        {k: distribute_tensor(v.clone(), hsdp, [Replicate(), Shard(v.dim() - 1)] if v.dim() else [Replicate()] * 2,
                              src_data_rank=None) for k, v in full.items()}))
    # fine-tuning: one rank's checkpoint into every rank
    check("finetune", os.path.join(root, "single"), lambda: zeros({k: v.clone() for k, v in full.items()}))
    shardckpt.shutdown()
    return out


def _restore_3(rank, ws, root):
    """4 -> 3 reshard with replicated pieces: 1-D Shard(0) for big tensors, replicated small ones."""
    full = full_state()
    mesh = make_mesh(ws, 1)
    counts: list = []
    undo = _count_reads(counts)
    state = zeros_like_state(distributed_state(full, mesh, 1, plain=("vec", "cube", "tiny")))
    shardckpt.load(state, os.path.join(root, "fsdp"), exchange="always")  # auto reads directly: little is shared
    undo()
    for k in full:
        assert torch.equal(full_of(state[k]).view(torch.uint8), full[k].view(torch.uint8)), k
    shardckpt.shutdown()
    return counts


def test_exchange_layouts_fetch_each_frame_once(tmp_path):
    root = str(tmp_path)
    run_ranks(4, _save_layouts, root, timeout=180)
    shardckpt.save(full_state(), os.path.join(root, "single"))
    results = run_ranks(4, _restore_layouts, root, timeout=240)
    for name, ckpt in (("ddp", "plain"), ("hsdp", "fsdp"), ("tp_dp", "tp"), ("finetune", "single")):
        frames = _stored_frames(os.path.join(root, ckpt))
        reads = [r for per_rank in results for r in per_rank[name]]
        hits = _frames_covered(reads, frames)
        needed = {f for f, n in hits.items() if n}
        assert all(n == 1 for n in hits.values() if n), (name, sorted(hits.values()))
        if name in ("ddp", "finetune"):  # every rank needs everything: all of it is fetched, once
            assert needed == frames, name
        fetched = sum(r[2] for r in reads)
        assert fetched <= 1.1 * sum(f[2] for f in needed), name
    per_rank = run_ranks(3, _restore_3, root, timeout=180)
    frames = _stored_frames(os.path.join(root, "fsdp"))
    hits = _frames_covered([r for c in per_rank for r in c], frames)
    assert all(n <= 1 for n in hits.values())


def _fail_during_exchange(rank, ws, path, what):
    import torch.distributed as dist
    full = full_state()
    state = {k: torch.zeros_like(v) for k, v in full.items()}
    if what == "kill" and rank == 2:
        from shardckpt import dist as sdist
        real = sdist.Comm.all_to_all

        def die(self, *a, **k):
            os._exit(1)  # dies mid-exchange, after the plan, without a word
        sdist.Comm.all_to_all = die
    t0 = time.monotonic()
    try:
        shardckpt.load(state, path)
    except shardckpt.CheckpointError as e:
        return type(e).__name__, e.key, e.rank, time.monotonic() - t0
    return None


def _corrupt_one_frame(path):
    from shardckpt.loading.load import read_chunks
    from shardckpt.format.metadata import read_manifest
    from shardckpt.storage import storage_for
    st_ = storage_for(path)
    chunk = read_chunks(st_, read_manifest(st_))["big"][0]
    with open(os.path.join(path, chunk.file), "r+b") as f:
        f.seek(chunk.frames[0].offset + 5)
        b = f.read(1)
        f.seek(chunk.frames[0].offset + 5)
        f.write(bytes([b[0] ^ 0x40]))


def test_corrupt_frame_under_exchange_raises_typed_on_every_rank(tmp_path):
    path = str(tmp_path / "c")
    shardckpt.save(full_state(), path)
    _corrupt_one_frame(path)
    results = run_ranks(4, _fail_during_exchange, path, "corrupt", timeout=120)
    for r in results:
        assert r is not None and r[0] == "ChecksumError" and r[1] == "big" and r[2] == 0, results


def _survivors(rank, ws, path):
    out = _fail_during_exchange(rank, ws, path, "kill")
    return out


def test_survivors_of_a_dead_rank_raise_coordination_error(tmp_path):
    """The survivors' own outcome: CoordinationError within the configured timeout (10 s)."""
    import queue
    import torch.multiprocessing as mp
    from harness import _entry
    path = str(tmp_path / "c")
    shardckpt.save(full_state(), path)
    ctx = mp.get_context("forkserver")
    q = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_entry, args=(r, 4, store, _survivors, (path,), {"SHARDCKPT_TIMEOUT": "10"}, q),
                         daemon=True) for r in range(4)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 120
    while len(got) < 3 and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=1)
        except queue.Empty:
            continue
        got[rank] = (status, payload)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    assert sorted(got) == [0, 1, 3], got
    for rank, (status, payload) in got.items():
        assert status == "ok" and payload is not None and payload[0] == "CoordinationError", (rank, payload)
        assert payload[3] < 60, payload


def test_assemble_takes_a_tasks_frames_from_its_own_file_only():
    """A task whose frames span two pieces, with the next file's pieces right after them."""
    import numpy as np
    from shardckpt.loading import exchange as x
    from shardckpt.plan.exchange_plan import ExchangePlan, Piece
    offs = {0: [0, 10, 20, 30, 40], 1: [0, 5, 10, 15]}
    pieces = (Piece(0, 0, 2, 20, 0, (0, 1)), Piece(0, 2, 4, 20, 1, (0, 1)), Piece(1, 0, 3, 15, 0, (0,)))
    plan = ExchangePlan(pieces, ((0, 1, 2),), True, 2)
    files = x._Files([], {}, offs, {}, {})
    held = {0: np.arange(0, 20, dtype=np.uint8), 1: np.arange(20, 40, dtype=np.uint8)}  # piece 2 not held
    firsts = {0: [0, 2], 1: [0]}
    by_file = {0: [0, 1], 1: [2]}
    piece_at = lambda f, j: by_file[f][__import__("bisect").bisect_right(firsts[f], j) - 1]  # noqa: E731
    task = x._Task(None, None, 0, 1, 4)
    assert x._assemble(task, plan, files, held, piece_at).tolist() == list(range(10, 40))
    assert x._assemble(x._Task(None, None, 0, 2, 3), plan, files, held, piece_at).tolist() == list(range(20, 30))


@settings(max_examples=200, deadline=None)
@given(_layouts(), st.data())
def test_plan_with_holders_fetches_only_from_holders_preferring_needers(layout, data):
    """A node-local tier's restore (shardckpt.tiers): a file can be fetched only by the ranks whose node
    holds it; a holder that needs the piece fetches it, else the least-loaded holder fetches and sends it."""
    needs, offsets = layout
    world = len(needs)
    holders = {f: data.draw(st.lists(st.integers(0, world - 1), min_size=1, max_size=world, unique=True))
               for f in offsets}
    plan = plan_exchange(needs, offsets, min_piece=1 << 20, max_piece=4 << 20, holders=holders)
    fetched = set()
    for p in plan.pieces:
        assert p.fetcher in holders[p.file]
        if set(p.receivers) & set(holders[p.file]):
            assert p.fetcher in p.receivers
        for j in range(p.first, p.end):
            assert (p.file, j) not in fetched
            fetched.add((p.file, j))
            assert set(p.receivers) == {r for r, runs in enumerate(needs)
                                        for f, a, b in runs if f == p.file and a <= j < b}
    assert fetched == {(f, j) for runs in needs for f, a, b in runs for j in range(a, b)}


def test_plan_holders_spread_a_lost_nodes_file_over_its_holders():
    offs = {0: [i << 20 for i in range(65)], 1: [i << 20 for i in range(65)]}
    needs = [[(0, 0, 64)], [(1, 0, 64)], [(0, 0, 64), (1, 0, 64)]]
    plan = plan_exchange(needs, offs, holders={0: [1], 1: [1, 2]})
    assert {p.fetcher for p in plan.pieces if p.file == 0} == {1}  # rank 1 fetches and sends what 0 needs
    assert {p.fetcher for p in plan.pieces if p.file == 1} <= {1, 2}
    assert plan_exchange(needs, offs).pieces == plan_exchange(needs, offs, holders=None).pieces

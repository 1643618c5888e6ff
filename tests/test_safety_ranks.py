"""Data safety on several ranks: a corrupt frame found by one rank's direct read raises on every rank; I/O
that fails on one rank outside a collective's error path (the coordinator's listings, a rank's read of an
incremental base) raises on every rank at once, not at the collective timeout, and deletes nothing; a
transient read error in a local-tier restore, or a fallback past a corrupt durable latest, never deletes
intact local steps newer than the step restored (set aside until the new timeline commits a newer one)."""
from __future__ import annotations

import contextlib
import os
import re
import time

import torch

from harness import run_ranks
from scenarios import distributed_state, full_of, make_mesh, zeros_like_state
from test_tiers import _node_dir, _state

ENV = {"SHARDCKPT_TIMEOUT": "30"}  # the default (600 s) would turn a regression into a hung CI job
TIMEOUT_S = 20  # each prompt-error case's collective timeout (a distinct value: a group of its own)
PROMPT_S = 10   # every rank must raise well before that


# ------------------------------------------------------------------------------------------ helpers

def _flip(path: str) -> None:
    """Flip the middle byte of a data file: a data file is its frames back to back, so it lies in a frame."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _outcome(fn) -> dict:
    """fn() on this rank, started together with the other ranks: what it raised (None if it returned) and
    how long it took. The world barrier after it lines the ranks up again even when one of them was left
    waiting for a collective's timeout (the defect), so the next scenario starts in step."""
    from shardckpt.errors import CheckpointError, StorageError
    torch.distributed.barrier()
    t0 = time.monotonic()
    try:
        ret, err = fn(), None
    except Exception as e:
        ret, err = None, {"cls": type(e).__name__, "msg": str(e), "typed": isinstance(e, CheckpointError),
                          "storage": isinstance(e, StorageError)}
    out = {"ret": ret, "err": err, "s": time.monotonic() - t0}
    torch.distributed.barrier()
    return out


@contextlib.contextmanager
def _failing(method: str, when, fired: list):
    """This rank's LocalStorage.<method> raises StorageError for the paths `when(full path)` accepts (each
    raise recorded in `fired`); `when` may also decide to raise only once."""
    from shardckpt.errors import StorageError
    from shardckpt.storage.local import LocalStorage
    real = getattr(LocalStorage, method)

    def fake(self, relpath="", *a, **kw):
        path = self._path(relpath)
        if when(path):
            fired.append(path)
            raise StorageError(f"injected {method} failure", file=path)
        return real(self, relpath, *a, **kw)
    setattr(LocalStorage, method, fake)
    try:
        yield fired
    finally:
        setattr(LocalStorage, method, real)


def _names_rank(msg: str, rank: int) -> bool:
    return re.search(rf"\brank[ =]{rank}\b", msg) is not None


def _small(mesh, v: float) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor
    return {"w": distribute_tensor(torch.full((8, 4), float(v)), mesh, [Shard(0)], src_data_rank=None),
            "step": int(v)}


def _step_files(local_base: str, steps) -> dict:
    """{(node, step): sorted files under that node's step dir} (what a node-local dir holds of each step)."""
    out = {}
    for node in sorted(os.listdir(local_base)):
        for step in steps:
            d = os.path.join(local_base, node, f"step-{step:010d}")
            out[(node, step)] = sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
    return out


def _missing(before: dict, after: dict) -> dict:
    """How many of the files `before` lists (manifest.json, data and index files of each (node, step))
    `after` lacks, where it lacks any."""
    return {f"{node}/step {step}": f"{len(set(v) - set(after.get((node, step), ())))} of {len(v)} files"
            for (node, step), v in before.items() if set(v) - set(after.get((node, step), ()))}


# ---------------------------------------------------------------------- A: corrupt frame, direct read

def _direct_read(rank, world, root):
    import shardckpt
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = make_mesh(world, 1)
    full = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    shardckpt.save({"w": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)}, root, frame_size=16 << 10)
    torch.distributed.barrier()
    if rank == 0:
        man = shardckpt.read_manifest(root)
        _flip(os.path.join(root, next(f.data for f in man.files if f.rank == 1)))
    into = {"w": distribute_tensor(torch.zeros(64, 256), mesh, [Shard(0)], src_data_rank=None)}

    def load():
        shardckpt.load(into, root, exchange="auto")
    return _outcome(load)


def test_corrupt_frame_on_a_direct_read_raises_on_every_rank(tmp_path):
    """Defect 6: a same-layout load reads directly (nothing is needed twice); rank 1's file has a flipped
    byte. Rank 1 raised ChecksumError and rank 0 returned as if the load had succeeded."""
    got = run_ranks(2, _direct_read, str(tmp_path / "ck"), env=ENV, timeout=120)
    assert all(o["err"] is not None for o in got), f"a rank returned from a load that failed on another: {got}"
    assert all(o["err"]["cls"] == "ChecksumError" for o in got), got
    assert _names_rank(got[0]["err"]["msg"], 1), got[0]["err"]  # rank 0's error says where it was found
    assert all(o["s"] < PROMPT_S for o in got), got


# ------------------------------------------------------------- B: one rank's I/O fails, all raise now

def _prompt_errors(rank, world, base):
    """Four cases, each on managers with a timeout of their own (so a case that left a rank waiting at a
    collective cannot disturb the next): the failing I/O is injected on one rank only."""
    from shardckpt import CheckpointManager
    from shardckpt.lifecycle.layout import committed_steps
    mesh = make_mesh(world, 1)
    out = {}

    def root_listing(root):  # listing a manager root's steps (layout.committed_steps lists "")
        root = os.path.abspath(root)
        return lambda path: os.path.abspath(path) == root

    def committed(roots):
        torch.distributed.barrier()
        return [committed_steps(r) for r in roots]

    # (i) restore: the coordinator's listing of committed steps fails
    root = os.path.join(base, "restore")
    mgr = CheckpointManager(root, async_save=False, preemption_signals=(), timeout_s=TIMEOUT_S)
    for s in (1, 2):
        mgr.save(s, _small(mesh, s))
    before = committed([root])
    with _failing("list_dir", root_listing(root) if rank == 0 else (lambda p: False), []) as fired:
        o = _outcome(lambda: mgr.restore(_small(mesh, 0)))
    out["restore"] = dict(o, failing=0, fired=len(fired), before=before, after=committed([root]))

    # (ii) save_best_only: the coordinator's best_step() (a fresh manager on a root with a best step) fails
    root = os.path.join(base, "best")
    kw = dict(monitor="loss", save_best_only=True, save_every_steps=1, async_save=False, preemption_signals=(),
              timeout_s=TIMEOUT_S + 1)
    CheckpointManager(root, **kw).save(1, _small(mesh, 1), metrics={"loss": 1.0})
    before = committed([root])
    mgr = CheckpointManager(root, **kw)
    with _failing("list_dir", root_listing(root) if rank == 0 else (lambda p: False), []) as fired:
        o = _outcome(lambda: mgr.maybe_save(2, _small(mesh, 2), metrics={"loss": 0.5}))
    out["save_best_only"] = dict(o, failing=0, fired=len(fired), before=before, after=committed([root]))

    # (iii) incremental: rank 1's read of the base (the previous step's manifest, or anything of that step) fails
    root = os.path.join(base, "incremental")
    mgr = CheckpointManager(root, incremental=True, async_save=False, preemption_signals=(),
                            timeout_s=TIMEOUT_S + 2)
    mgr.save(1, _small(mesh, 1))
    before = committed([root])
    prev = os.path.join(os.path.abspath(root), "step-0000000001")
    in_prev = (lambda p: os.path.abspath(p).startswith(prev + os.sep)) if rank == 1 else (lambda p: False)
    with _failing("exists", lambda p: in_prev(p) and p.endswith("manifest.json"), []) as fired, \
            _failing("read_file", in_prev, fired):
        o = _outcome(lambda: mgr.save(2, _small(mesh, 2)))
    out["incremental"] = dict(o, failing=1, fired=len(fired), before=before, after=committed([root]))

    # (iv) local tier restore: the coordinator's listing of the durable root's steps fails
    root, local = os.path.join(base, "tier-durable"), os.path.join(base, "tier-local")
    kw = dict(save_every_steps=2, local_root=_node_dir(local), local_every_steps=1, async_save=False,
              preemption_signals=(), timeout_s=TIMEOUT_S + 3)
    with CheckpointManager(root, **kw) as mgr:
        for s in (1, 2):
            mgr.maybe_save(s, _small(mesh, s))
    roots = [root, _node_dir(local)]
    before = committed(roots)
    mgr = CheckpointManager(root, **kw)
    with _failing("list_dir", root_listing(root) if rank == 0 else (lambda p: False), []) as fired:
        o = _outcome(lambda: mgr.restore(_small(mesh, 0)))
    out["local_tier_restore"] = dict(o, failing=0, fired=len(fired), before=before, after=committed(roots),
                                     root=os.path.abspath(root))
    return out


def test_io_failing_on_one_rank_raises_on_every_rank_promptly(tmp_path):
    """Defect 9: I/O run by the coordinator only (or per rank) outside the error-forwarding path. The rank
    whose I/O failed raised at once; the others waited at the next collective for its timeout (then
    raised CoordinationError). Every rank must raise a typed error naming where it failed, well before the
    timeout, and nothing committed may be deleted."""
    got = run_ranks(2, _prompt_errors, str(tmp_path), env=ENV, nodes=2, timeout=240)
    problems = []
    for case in got[0]:
        per = [r[case] for r in got]
        f = per[0]["failing"]
        errs = [o["err"] for o in per]
        if not per[f]["fired"]:
            problems.append(f"{case}: the injected failure was never reached on rank {f} (update the test)")
            continue
        if any(e is None for e in errs):
            problems.append(f"{case}: ranks {[r for r, e in enumerate(errs) if e is None]} returned normally")
            continue
        if not all(e["typed"] for e in errs):
            problems.append(f"{case}: untyped errors {[e['cls'] for e in errs]}")
        if not errs[f]["storage"]:
            problems.append(f"{case}: rank {f} (where the I/O failed) raised {errs[f]['cls']}, not StorageError")
        for r, e in enumerate(errs):
            named = _names_rank(e["msg"], f) or per[0].get("root", "\0") in e["msg"]
            if r != f and not named:
                problems.append(f"{case}: rank {r}'s {e['cls']} does not name rank {f}: {e['msg'][:300]}")
        slow = [(r, e["cls"], round(o["s"], 1)) for r, (o, e) in enumerate(zip(per, errs)) if o["s"] >= PROMPT_S]
        if slow:
            problems.append(f"{case}: not prompt (rank, error, seconds; timeouts {TIMEOUT_S}-{TIMEOUT_S + 3} s): "
                            f"{slow}")
        for r, o in enumerate(per):
            lost = [sorted(set(b) - set(a)) for b, a in zip(o["before"], o["after"]) if set(b) - set(a)]
            if lost:
                problems.append(f"{case}: committed steps deleted, seen from rank {r}: {lost}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------ C: a transient read error keeps newer local steps

def _exact(state, step: int) -> bool:
    want = _state(step)
    return all(torch.equal(full_of(state[k]), want[k]) for k in want)


def _transient(rank, world, local_base, durable):
    import shardckpt
    mesh = make_mesh(world, 1)
    kw = dict(save_every_steps=10, local_root=_node_dir(local_base), local_every_steps=1, local_keep_last=2,
              async_save=False, preemption_signals=())
    with shardckpt.CheckpointManager(durable, **kw) as mgr:
        for step in range(1, 13):
            mgr.maybe_save(step, distributed_state(_state(step), mesh, 0))
    torch.distributed.barrier()
    out = {"committed": _step_files(local_base, (11, 12)) if rank == 0 else None}

    def restore(mgr):
        state = zeros_like_state(distributed_state(_state(0), mesh, 1))
        step = mgr.restore(state)
        return step, mgr.restored_tier, step is not None and _exact(state, step)

    # one read of a local data file fails, once in the whole group (whichever rank reads one first)
    token = local_base + ".fired"

    def once(path):
        if not (path.startswith(os.path.abspath(local_base) + os.sep) and path.endswith(".bin")):
            return False
        try:
            os.close(os.open(token, os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False
    with shardckpt.CheckpointManager(durable, **kw) as mgr, _failing("read_ranges", once, []) as fired:
        out["first"] = restore(mgr)
    out["fired"] = len(fired)
    torch.distributed.barrier()
    out["after_first"] = _step_files(local_base, (11, 12)) if rank == 0 else None
    with shardckpt.CheckpointManager(durable, **kw) as mgr:  # no error now: the set-aside steps stay aside
        out["second"] = restore(mgr)
        torch.distributed.barrier()
        out["after_second"] = _step_files(local_base, (11, 12)) if rank == 0 else None
        torch.distributed.barrier()
        mgr.maybe_save(11, distributed_state(_state(1011), mesh, 0))  # the new timeline's step 11 (local)
    torch.distributed.barrier()
    out["after_new_11"] = _step_files(local_base, (11, 12)) if rank == 0 else None
    with shardckpt.CheckpointManager(durable, **kw) as mgr:
        state = zeros_like_state(distributed_state(_state(0), mesh, 1))
        step = mgr.restore(state)
        want = _state(1011)
        out["third"] = (step, mgr.restored_tier, all(torch.equal(full_of(state[k]), want[k]) for k in want))
    return out


def test_transient_local_read_error_keeps_newer_local_steps_set_aside(tmp_path):
    """Defect 3: 2 nodes x 1 rank, local steps 11 and 12 committed, durable 10. One read of a local data
    file fails once: the restore falls back to durable 10, and retire_newer deleted the intact local 11
    and 12 on every node. They must stay on disk, set aside (a later restore does not pick them), until
    the new timeline commits a newer local step: then old 12 goes and the new 11 restores bit-exact."""
    local, durable = str(tmp_path / "local"), str(tmp_path / "durable")
    got = run_ranks(2, _transient, local, durable, env=ENV, nodes=2, timeout=180)
    assert sum(r["fired"] for r in got) == 1, [r["fired"] for r in got]  # the injection ran, once
    assert all(r["first"] == (10, ("durable", 10), True) for r in got), [r["first"] for r in got]
    r0 = got[0]
    assert all(r0["committed"][(n, s)] and "manifest.json" in r0["committed"][(n, s)]
               for n in ("node0", "node1") for s in (11, 12)), r0["committed"]
    assert not _missing(r0["committed"], r0["after_first"]), \
        f"intact local steps deleted by the fallback restore: {_missing(r0['committed'], r0['after_first'])}"
    assert all(r["second"] == (10, ("durable", 10), True) for r in got), [r["second"] for r in got]
    assert not _missing(r0["committed"], r0["after_second"]), _missing(r0["committed"], r0["after_second"])
    # the new timeline committed local step 11: the set-aside old 12 is deleted now (manifest and data)
    assert not any(set(r0["committed"][(n, 12)]) & set(r0["after_new_11"][(n, 12)]) for n in ("node0", "node1")), \
        r0["after_new_11"]
    assert all(r["third"] == (11, ("local", 11), True) for r in got), [r["third"] for r in got]


# ------------------------------------------- D: a durable fallback keeps local steps it never tried

def _durable_fallback(rank, world, local_base, durable):
    import shardckpt
    mesh = make_mesh(world, 1)
    # local every 3 steps (15, 18 kept), durable every 10 (not local steps: saved durable only): 10, 20
    kw = dict(save_every_steps=10, local_root=_node_dir(local_base), local_every_steps=3, local_keep_last=2,
              async_save=False, preemption_signals=())
    with shardckpt.CheckpointManager(durable, **kw) as mgr:
        for step in range(1, 21):
            mgr.maybe_save(step, distributed_state(_state(step), mesh, 0))
    torch.distributed.barrier()
    from shardckpt.lifecycle.layout import committed_steps
    out = {"durable": committed_steps(durable)}
    if rank == 0:
        latest = os.path.join(durable, "step-0000000020")
        for f in shardckpt.read_manifest(latest).files:
            _flip(os.path.join(latest, f.data))  # the durable latest only; local 15 and 18 are intact
        out["committed"] = _step_files(local_base, (15, 18))
    torch.distributed.barrier()
    with shardckpt.CheckpointManager(durable, **kw) as mgr:
        state = zeros_like_state(distributed_state(_state(0), mesh, 1))
        step = mgr.restore(state)
        out["restored"] = (step, mgr.restored_tier, step is not None and _exact(state, step))
    torch.distributed.barrier()
    out["after"] = _step_files(local_base, (15, 18)) if rank == 0 else None
    return out


def test_durable_fallback_keeps_local_steps_it_never_tried(tmp_path):
    """Defect 10: durable 10 and 20 (20 corrupt), local 15 and 18 (older than the durable latest, so the
    local tier is not chosen). The restore falls back to durable 10 and then retire_newer(10) deleted local
    15 and 18, complete steps it never tried. They must stay (set aside at most)."""
    local, durable = str(tmp_path / "local"), str(tmp_path / "durable")
    got = run_ranks(2, _durable_fallback, local, durable, env=ENV, nodes=2, timeout=180)
    r0 = got[0]
    assert r0["durable"] == [10, 20], r0["durable"]
    assert all(r0["committed"][(n, s)] and "manifest.json" in r0["committed"][(n, s)]
               for n in ("node0", "node1") for s in (15, 18)), r0["committed"]
    # durable 10 (what today's code restores), or local 18 if the fallback looks at the local tier again
    assert all(r["restored"] == got[0]["restored"] and r["restored"][2] and r["restored"][0] in (10, 18)
               for r in got), [r["restored"] for r in got]
    assert not _missing(r0["committed"], r0["after"]), \
        f"local steps deleted although never tried: {_missing(r0['committed'], r0['after'])}"

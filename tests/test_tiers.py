"""The node-local tier (shardckpt.tiers): 4 ranks as 2 nodes x 2, each node its own local dir; local saves
every step with peer replicas, durable promotions every 10; then restores in fresh processes after losing a
node, onto a smaller world, with no local dir left, and with a corrupt replica."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from harness import run_ranks
from shardckpt.errors import CheckpointExistsError
from shardckpt.format.records import data_file_name, index_file_name
from scenarios import distributed_state, full_of, full_state, make_mesh, zeros_like_state

STEPS = 12


def _state(step: int) -> dict:
    full = full_state(seed=step)
    full.pop("big")  # keep the test small: f32_big still spans several frames per shard
    return full


def _node_dir(base: str) -> str:
    return os.path.join(base, f"node{os.environ['GROUP_RANK']}")


def _train(rank, world, local_base, durable):
    from shardckpt.lifecycle.layout import committed_steps
    from shardckpt.tiers.local_tier import LocalTier
    mesh = make_mesh(world, 1)
    tier = LocalTier(_node_dir(local_base), keep_last=2)
    for step in range(1, STEPS + 1):
        tier.save(step, distributed_state(_state(step), mesh, 0), metadata={"step": step})
        if step % 10 == 0:
            tier.promote(step, durable)
            try:  # a second promotion of a committed step is refused before it uploads anything
                tier.promote(step, durable)
                raise AssertionError("promoted twice")
            except CheckpointExistsError:
                pass
    kept = committed_steps(tier.root) if os.environ["LOCAL_RANK"] == "0" else None  # after its retention
    return kept, _manager(world, mesh, local_base + "-mgr", durable + "-mgr")


def _manager(world, mesh, local_base, durable):
    """CheckpointManager with both tiers: local every step, durable every 3 (promoted), retention in each."""
    import shardckpt
    from shardckpt.lifecycle.layout import committed_steps
    kw = dict(save_every_steps=3, keep_last=1, local_root=_node_dir(local_base), local_every_steps=1,
              local_keep_last=2)
    with shardckpt.CheckpointManager(durable, **kw) as mgr:
        for step in range(1, 8):
            mgr.maybe_save(step, distributed_state(_state(step), mesh, 0))
    torch.distributed.barrier()
    durable_steps = committed_steps(durable)
    local_steps = committed_steps(_node_dir(local_base))
    with shardckpt.CheckpointManager(durable, **kw) as mgr:
        state = zeros_like_state(distributed_state(_state(0), mesh, 1))
        step = mgr.restore(state)
        exact = all(torch.equal(full_of(state[k]), v) for k, v in _state(7).items())
    return durable_steps, local_steps, step, mgr.restored_tier, exact


def _restore(rank, world, cases, durable):
    """Each case: a local base dir (its node dirs as the case left them); returns (tier, step, exact)."""
    from shardckpt.tiers.local_tier import LocalTier
    mesh = make_mesh(world, 1)
    out = []
    for base in cases:
        tier = LocalTier(_node_dir(base))
        state = zeros_like_state(distributed_state(_state(0), mesh, 1))
        step = tier.restore(state, durable)
        want = _state(step)
        exact = all(torch.equal(full_of(state[k]), want[k]) for k in want)
        out.append((tier.restored, exact) + ((tier.corrupt_copies,) if tier.corrupt_copies else ()))
    return out


def _promote(rank, world, base, durable):
    """Promote local step 12 from a tier whose node 1 was lost: ranks 2 and 3 have no files to upload."""
    from shardckpt.lifecycle.layout import committed_steps
    from shardckpt.tiers.local_tier import LocalTier
    make_mesh(world, 1)
    try:
        LocalTier(_node_dir(base)).promote(12, durable)
        return None, "", committed_steps(durable)
    except Exception as e:
        return type(e).__name__, str(e), committed_steps(durable)


def test_local_tier_saves_replicates_and_restores_from_survivors(tmp_path, capsys):
    local, durable = str(tmp_path / "local"), str(tmp_path / "durable")
    got = run_ranks(4, _train, local, durable, nodes=2)
    assert [k for k, _ in got] == [[11, 12], None, [11, 12], None]  # local_keep_last per node's dir
    # the manager: durable keep_last=1 and local_keep_last=2 together; restore prefers the newer local step
    assert all(m == ([6], [6, 7], 7, ("local", 7), True) for _, m in got), [m for _, m in got]
    assert sorted(os.listdir(durable)) == ["step-0000000010"]
    # node 0's dir holds its own ranks' files and node 1's replicas
    step12 = os.path.join(local, "node0", "step-0000000012")
    sid = os.listdir(os.path.join(step12, "data"))[0]
    assert sorted(os.path.relpath(os.path.join(d, f), step12) for d, _, fs in os.walk(os.path.join(step12, "data"))
                  for f in fs) == \
        sorted(name for r in range(4) for name in (data_file_name(sid, r), index_file_name(sid, r)))

    def case(name, keep_nodes, corrupt=()):
        base = str(tmp_path / name)
        os.makedirs(base)
        for n in keep_nodes:
            shutil.copytree(os.path.join(local, f"node{n}"), os.path.join(base, f"node{n}"))
        for name in corrupt:  # node 0's copy of these files
            path = os.path.join(base, "node0", "step-0000000012", name)
            with open(path, "r+b") as f:
                f.seek(100)
                b = f.read(1)
                f.seek(100)
                f.write(bytes([b[0] ^ 0xFF]))
        return base

    lost1, none = case("lost1", [0]), case("none", [])
    bad = case("bad", [0], corrupt=[data_file_name(sid, 2)])
    other = case("other", [0, 1], corrupt=[data_file_name(sid, r) for r in range(4)])
    got = run_ranks(4, _restore, [lost1, none, bad, other, bad], durable, nodes=2)
    for per_rank in got:
        assert per_rank[0] == (("local", 12), True)    # node 1 lost: its files come from node 0's replicas
        assert per_rank[1] == (("durable", 10), True)  # no local dir left (and promoting twice kept step 10)
        assert per_rank[2] == (("durable", 10), True)  # the only copy of rank 2's file is corrupt
        # node 0's copy of every file is corrupt: node 1 holds each one too (its own or a replica)
        assert per_rank[3] == (("local", 12), True, [f"rank {r}'s files on node 0" for r in range(4)]), per_rank[3]
        assert per_rank[4] == (("durable", 10), True)  # the set-aside step 12 is not tried again
    # the abandoned step is set aside, not deleted (its error might have been transient): still on disk,
    # ignored by later restores, deleted once the new timeline commits a local step
    assert os.path.exists(os.path.join(bad, "node0", "step-0000000012", "manifest.json"))
    assert sorted(n.partition(".")[0] for n in os.listdir(os.path.join(bad, "node0", ".set-aside"))) == \
        ["step-0000000011", "step-0000000012"]
    assert os.path.exists(os.path.join(bad, "node0", ".set-aside", f"step-0000000012.{sid}"))
    got = run_ranks(2, _restore, [case("two", [0])], durable, nodes=1)
    assert all(r == [(("local", 12), True)] for r in got)  # resharded onto the surviving node

    got = run_ranks(4, _promote, lost1, str(tmp_path / "durable-promoted"), nodes=2)
    assert all(r[0] == "SaveError" and "local file of the step is missing" in r[1] and not r[2] for r in got), got

    from shardckpt.tools import cli  # `shardckpt ls` shows both tiers
    assert cli.main(["ls", durable, "--local", os.path.join(local, "node0"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in listed["durable"]] == [10]
    assert [s["step"] for s in listed["local"][os.path.join(local, "node0")]] == [11, 12]


def _save_steps(rank, world, local_base, steps):
    os.environ["GROUP_RANK"] = str(rank // 2)  # faultkit.launch starts one node: simulate two here
    from shardckpt.tiers.local_tier import LocalTier
    mesh = make_mesh(world, 1)
    tier = LocalTier(_node_dir(local_base), keep_last=2)
    for step in steps:
        tier.save(step, distributed_state(_state(step), mesh, 0))
    return True


@pytest.mark.parametrize("fault,dead", [("before_commit:1:kill:3", 1), ("replicate:3:kill:3", 3)],
                         ids=["killed-writing", "killed-replicating"])
def test_rank_killed_during_a_local_save_leaves_the_previous_local_step(tmp_path, fault, dead):
    from faultkit import launch
    local = str(tmp_path / "local")
    fates = launch(4, _save_steps, local, [1, 2, 3], env={"SHARDCKPT_FAULT": fault, "SHARDCKPT_TIMEOUT": "5"},
                   timeout=60)
    assert fates[dead][0] == "dead" and all(fates[r][0] == "error" for r in range(4) if r != dead), fates
    assert not os.path.exists(os.path.join(local, "node0", "step-0000000003", "manifest.json"))
    got = run_ranks(4, _restore, [local], None, nodes=2)
    assert all(r == [(("local", 2), True)] for r in got)


def _manager_steps(rank, world, local_base, steps, background):
    os.environ["GROUP_RANK"] = str(rank // 2)
    import shardckpt
    mesh = make_mesh(world, 1)
    with shardckpt.CheckpointManager(local_base + "-durable", save_every_steps=3, local_root=_node_dir(local_base),
                                     local_every_steps=1, async_save=background, preemption_signals=()) as mgr:
        for step in steps:
            mgr.maybe_save(step, distributed_state(_state(step), mesh, 0))
    return True


@pytest.mark.parametrize("background", [True, False], ids=["async", "sync"])
def test_rank_killed_while_replicating_a_durable_step_leaves_the_previous_local_step(tmp_path, background):
    """The local save of step 3 (durable too) replicates, on the background thread (the manager's default)
    or the caller's, when rank 3 dies; the others raise the local save's error alone (in the background
    case at their next call, here close; the promotion queued behind it is dropped with it), nothing of
    step 3 commits in either tier, the survivors' files uploaded early for the promotion are removed, and
    step 2 restores."""
    from faultkit import launch
    local = str(tmp_path / "local")
    fates = launch(4, _manager_steps, local, [1, 2, 3], background, env={"SHARDCKPT_FAULT": "replicate:3:kill:3",
                                                              "SHARDCKPT_TIMEOUT": "5"}, timeout=60)
    assert fates[3][0] == "dead" and all(fates[r][0] == "error" for r in range(3)), fates
    assert all("CoordinationError" in fates[r][1] and "not promoted" not in fates[r][1] for r in range(3)), fates
    assert not os.path.exists(os.path.join(local, "node0", "step-0000000003", "manifest.json"))
    durable3 = os.path.join(local + "-durable", "step-0000000003")
    assert not os.path.exists(os.path.join(durable3, "manifest.json"))
    left = [f for _, _, fs in os.walk(durable3) for f in fs]
    assert not [f for f in left if f.startswith(("r00000.", "r00001.", "r00002."))], left
    got = run_ranks(4, _restore, [local], None, nodes=2)
    assert all(r == [(("local", 2), True)] for r in got)


def _torchrun_two_nodes(tmp_path, run_id: str, steps: int) -> list[str]:
    """launch/train.py on 2 nodes x 1 rank (torchrun --nnodes 2, c10d rendezvous on loopback), each node its
    own --local-root. Returns both nodes' output."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train = os.path.join(os.path.dirname(__file__), "..", "launch", "train.py")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--node-rank", str(n), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", run_id, train, "--ckpt", str(tmp_path / "durable"),
                               "--local-root", str(tmp_path / f"local{n}"), "--steps", str(steps), "--save-every",
                               "4", "--d-model", "32", "--layers", "1", "--sync"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def test_torchrun_two_nodes_resume_from_local_tier_after_losing_a_node(tmp_path):
    _torchrun_two_nodes(tmp_path, "first", 6)
    assert sorted(os.listdir(tmp_path / "durable")) == ["step-0000000004"]
    assert sorted(os.listdir(tmp_path / "local1")) == ["step-0000000005", "step-0000000006"]
    shutil.rmtree(tmp_path / "local1")  # node 1 lost; its rank's files survive as replicas on node 0
    outs = _torchrun_two_nodes(tmp_path, "second", 8)
    assert any("resumed from step 6 (local tier" in o for o in outs), outs


def _background(rank, world, local_base, durable):
    """An async manager, local every step and durable every 3, replicating in 4 KiB rounds: the events it
    reports, then (node 1's dir wiped) a restore from node 0's files and replicas."""
    import threading
    import shardckpt
    from shardckpt.tiers import replicas
    from shardckpt.tiers import local_tier as tiers
    from shardckpt.manager.events import CheckpointCallback
    replicas.ROUND_BYTES = 4096  # every rank's files take many rounds
    uploads, copy_file = [], tiers.copy_file

    def counted(src, dst, name):  # where promotions upload from: the uploader thread, during replication
        uploads.append((threading.current_thread().name.split("_")[0], name))
        return copy_file(src, dst, name)
    tiers.copy_file = counted

    class Record(CheckpointCallback):
        def __init__(self):
            self.events = []

        def on_event(self, e):
            self.events.append((e.kind, e.step, e.tier, e.durable_s))

    mesh, rec = make_mesh(world, 1), Record()
    kw = dict(save_every_steps=3, keep_last=2, local_root=_node_dir(local_base), local_every_steps=1,
              local_keep_last=2, async_save=True)
    with shardckpt.CheckpointManager(durable, callbacks=[rec], **kw) as mgr:
        for step in range(1, 5):
            mgr.maybe_save(step, distributed_state(_state(step), mesh, 0))
    torch.distributed.barrier()
    if os.environ["GROUP_RANK"] == "1" and os.environ["LOCAL_RANK"] == "0":
        shutil.rmtree(_node_dir(local_base))  # node 1 lost
    torch.distributed.barrier()
    with shardckpt.CheckpointManager(durable, callbacks=[rec], **kw) as mgr:
        state = zeros_like_state(distributed_state(_state(0), mesh, 1))
        step = mgr.restore(state)
        exact = all(torch.equal(full_of(state[k]), v) for k, v in _state(4).items())
    return rec.events, step, mgr.restored_tier, exact, uploads


def test_async_local_saves_replicate_in_rounds_and_report_both_tiers(tmp_path):
    local, durable = str(tmp_path / "local"), str(tmp_path / "durable")
    got = run_ranks(4, _background, local, durable, nodes=2)
    assert all(r[1:4] == (4, ("local", 4), True) for r in got), [r[1:4] for r in got]
    for rank, r in enumerate(got):  # step 3's promotion: each file uploaded once, begun while replicating
        sid = r[4][0][1].split("/")[1]
        assert sorted(r[4]) == [("shardckpt-upload", data_file_name(sid, rank)),
                                ("shardckpt-upload", index_file_name(sid, rank))], r[4]
    events = got[0][0]  # the coordinator's; the other ranks deliver none
    assert all(not r[0] for r in got[1:])
    step3 = [e[:3] for e in events if e[1] == 3]
    assert step3 == [("save_started", 3, "local"), ("snapshot_done", 3, "local"), ("committed", 3, "local"),
                     ("committed", 3, "durable")], step3
    local3, durable3 = [e[3] for e in events if e[:3] in (("committed", 3, "local"), ("committed", 3, "durable"))]
    assert 0 < local3 <= durable3  # time to durable counts from the same snapshot
    assert [e[:3] for e in events if e[0] == "committed" and e[2] == "durable"] == [("committed", 3, "durable")]
    assert ("restored", 4, "local", None) in events
    deleted = [e[:3] for e in events if e[0] == "deleted"]  # local_keep_last=2 on node 0; durable keep_last=2
    assert deleted == [("deleted", 1, "local"), ("deleted", 2, "local")], deleted
    from shardckpt.lifecycle.layout import committed_steps
    assert committed_steps(durable) == [3]

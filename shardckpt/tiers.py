"""The node-local tier: frequent checkpoints on each node's own disk, each rank's files also held by peers on
other nodes, restored (onto any world size and layout) from whichever nodes survive (docs/FORMAT.md,
"Local tier").

Who calls what, and when (every rank of the group, collectively):
  LocalTier.save(step, state)  a local save: an ordinary save into local_root/step-<N>/ on this node's disk
      (api._prepare / _write_and_commit), with replication between the write and the commit round: every
      rank sends its data and index files to its peers (the same local rank on the nodes `jump`, 2*jump, ...
      further on; one all_to_all of the stored bytes) and writes the files it receives under the same
      names in its own node's dir. Only then does commit.finish run (a rank dying while replicating fails
      the save on every rank, nothing is committed). The coordinator commits manifest.json in its node's
      dir; its bytes are broadcast and local rank 0 of every other node commits the same bytes in its own
      (commit.commit_manifest). Then each node's local rank 0 applies retention and gc to its own dir.
  LocalTier.promote(step, durable_root)  the durable save of a step the local tier already holds: every rank
      uploads its own local files unchanged (no second snapshot, no second encode) and the coordinator
      commits the same manifest bytes there (commit.finish).
  LocalTier.restore(state, durable_root)  every rank lists the committed steps its node's dir holds and which
      rank files of each; the newest step that the surviving dirs hold completely, and not older than the
      durable tier's latest, is restored through the exchange (exchange.run with `holders`: each file is
      fetched from its holders' own disks and sent to the ranks that need it); else the durable tier's latest.

Nothing records which node holds which file: a restore learns it from the listings, so a lost node's dir
simply does not answer.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass

import torch

from . import api, commit, dist as sdist
from ._faults import fault_point
from .commit import error_text
from .errors import CheckpointError, error_from, error_record
from .format import MANIFEST_NAME, data_file_name, index_file_name, parse_manifest
from .gc import DEFAULT_GC_GRACE_S, gc_uncommitted, retire_step
from .layout import STEP_DIR, committed_steps, step_dir
from .storage import Storage, storage_for

log = logging.getLogger("shardckpt")


@dataclass(frozen=True)
class Nodes:
    """Which node each rank of the group runs on (dense node numbers, from the launcher's GROUP_RANK)."""
    node_of: tuple[int, ...]

    @property
    def count(self) -> int:
        return max(self.node_of) + 1

    def members(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of) if n == node]

    def local_rank(self, rank: int) -> int:
        return self.members(self.node_of[rank]).index(rank)

    def peers(self, rank: int, replicas: int, jump: int) -> list[int]:
        """The ranks holding copies of `rank`'s files: the same local rank on the nodes jump, 2*jump, ...
        further on (fewer when there are fewer other nodes; a node with fewer ranks wraps around)."""
        n, node = self.count, self.node_of[rank]
        out = []
        for i in range(1, replicas + 1):
            other = (node + i * jump) % n
            if other == node or any(self.node_of[p] == other for p in out):
                break
            members = self.members(other)
            out.append(members[self.local_rank(rank) % len(members)])
        return out


def node_map(comm) -> Nodes:
    """Every rank's node, gathered (GROUP_RANK as torchrun sets it; else rank // LOCAL_WORLD_SIZE; else one
    node). All ranks of comm call it."""
    env = os.environ
    if "GROUP_RANK" in env:
        node = int(env["GROUP_RANK"])
    else:
        node = int(env.get("RANK", comm.rank)) // max(1, int(env.get("LOCAL_WORLD_SIZE", comm.world_size) or 1))
    ids = [int(b) for b in comm.all_gather_bytes(str(node).encode())]
    dense = {n: i for i, n in enumerate(sorted(set(ids)))}
    return Nodes(tuple(dense[n] for n in ids))


class LocalTier:
    """One run's node-local tier. `local_root` is the same string on every node and names each node's own
    (never shared) directory. Created by CheckpointManager (local_root=...) or directly; every method is
    collective over `process_group`."""

    def __init__(self, local_root, *, keep_last: int | None = 2, replicas: int = 1, jump: int = 1,
                 process_group=None, timeout_s: float | None = None, codec: str = "auto",
                 gc_grace_s: float = DEFAULT_GC_GRACE_S):
        if replicas < 0 or jump < 1:
            raise ValueError("local_replicas must be >= 0 and the peer jump >= 1")
        self.root = local_root
        self.storage = storage_for(local_root)
        self.keep_last, self.replicas, self.jump = keep_last, replicas, jump
        self.process_group, self.timeout_s, self.codec = process_group, timeout_s, codec
        self.gc_grace_s = gc_grace_s
        self.restored: tuple[str, int] | None = None  # ("local" | "durable", step) of the last restore

    def _comm(self):
        return sdist.comm_for(self.process_group, self.timeout_s)

    # -------------------------------------------------------------------------------------- save

    def save(self, step: int, state, metadata: dict | None = None):
        """Save `state` as local step `step` (every rank; replaces a local step of that number left by an
        earlier attempt). Returns the committed Manifest. Raises SaveError on every rank if any failed."""
        comm = self._comm()
        nodes = node_map(comm)
        path = self.storage.child(step_dir(step))
        p = api._prepare(state, path, process_group=self.process_group, codec=self.codec,
                         frame_size=api.DEFAULT_FRAME_SIZE, metadata=metadata, storage_options=None,
                         timeout_s=self.timeout_s, stage=False, pool=None, overwrite=True)
        manifest = api._write_and_commit(p, after_write=lambda s: self._replicate(p, nodes, s))
        self._mirror(comm, nodes, path, p.save_id)
        if nodes.local_rank(comm.rank) == 0:
            self._retain(step)
        return manifest

    def _replicate(self, p, nodes: Nodes, summary: dict) -> dict:
        """Every rank, between write and commit: send this rank's files to its peers, write the peers' files
        received. Returns the summary for the commit round (failed if this rank's part failed)."""
        comm, storage, sid = p.comm, p.storage, p.save_id
        if comm.group is None or nodes.count == 1 or self.replicas == 0:
            return summary
        payload, sizes = b"", None
        if summary["ok"] and "data_size" in summary:
            try:
                data, index = storage.read_file(data_file_name(sid, comm.rank)), \
                    storage.read_file(index_file_name(sid, comm.rank))
                payload, sizes = data + index, [len(data), len(index)]
            except Exception as e:  # reported at the commit round, every rank still takes part below
                summary = {"rank": comm.rank, "ok": False, "error": f"reading back for replication: {error_text(e)}"}
        rec = {"ok": summary["ok"], "sizes": sizes}
        recs = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(rec).encode())]
        if not all(r["ok"] for r in recs):
            return summary  # the failed rank's summary fails the commit round; nothing to replicate
        fault_point("replicate", comm.rank)
        world = comm.world_size
        peers = [nodes.peers(r, self.replicas, self.jump) for r in range(world)]
        send_sizes = [len(payload) if r in peers[comm.rank] else 0 for r in range(world)]
        recv_sizes = [sum(recs[r]["sizes"]) if comm.rank in peers[r] and recs[r]["sizes"] else 0
                      for r in range(world)]
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        send = torch.cat([buf] * sum(1 for s in send_sizes if s)) if any(send_sizes) else torch.empty(0, dtype=torch.uint8)
        got = comm.all_to_all(send, send_sizes, recv_sizes).numpy()
        try:
            pos = 0
            for src in range(world):
                if not recv_sizes[src]:
                    continue
                d, i = recs[src]["sizes"]
                storage.write_file(data_file_name(sid, src), got[pos:pos + d])
                storage.write_file(index_file_name(sid, src), got[pos + d:pos + d + i])
                pos += d + i
            if pos:
                storage.sync_dir(f"data/{sid}")
        except Exception as e:
            summary = {"rank": comm.rank, "ok": False, "error": f"writing a peer's replica: {error_text(e)}"}
        return summary

    def _mirror(self, comm, nodes: Nodes, path: Storage, save_id: str) -> None:
        """After the commit: the coordinator's manifest bytes committed by local rank 0 of every other node."""
        if comm.group is None or nodes.count == 1:
            return
        data = None
        if comm.is_coordinator:
            try:
                data = path.read_file(MANIFEST_NAME)
            except Exception as e:  # the step is committed on the coordinator's node; the others go without
                log.warning("shardckpt: could not read back %s/%s to mirror it: %s", path.url, MANIFEST_NAME,
                            error_text(e))
        n = comm.broadcast_json(len(data) if data is not None else None)
        if n is None:
            return
        data = comm.broadcast_bytes(data, n)
        if nodes.local_rank(comm.rank) == 0 and nodes.node_of[comm.rank] != nodes.node_of[0]:
            outcome = commit.commit_manifest(path, data, save_id, replace=True)
            if not outcome.committed:  # this node's copy does not count at restore; the others still do
                log.warning("shardckpt: node %d could not commit local step %s: %s", nodes.node_of[comm.rank],
                            path.url, outcome.message)

    def _retain(self, step: int) -> None:
        """Local rank 0 of each node, after a local commit: keep_last per node's dir, then gc leftovers."""
        try:
            steps = committed_steps(self.storage)
            if self.keep_last:
                for old in steps[:-self.keep_last]:
                    retire_step(self.storage, step_dir(old))
            gc_uncommitted(self.storage, dry_run=False, grace_s=self.gc_grace_s, exclude=[step])
        except Exception as e:  # retention never fails a save that committed
            log.warning("shardckpt: local retention under %s failed: %s", self.storage.url, error_text(e))

    # -------------------------------------------------------------------------------------- promote

    def promote(self, step: int, durable_root, storage_options: dict | None = None) -> None:
        """Every rank: make local step `step` a durable checkpoint at durable_root/step-<N> by uploading this
        rank's own local files unchanged and committing the same manifest bytes (same save_id, same names).
        Raises SaveError on every rank if any upload failed (the uploaded files are then removed)."""
        comm = self._comm()
        src = self.storage.child(step_dir(step))
        dst = storage_for(durable_root, storage_options).child(step_dir(step))
        data, summary, sid = None, {"rank": comm.rank, "ok": True, "elements": 0}, None
        if comm.is_coordinator:  # the coordinator's node committed first; other nodes' copies may still be landing
            try:
                data = src.read_file(MANIFEST_NAME)
                sid = parse_manifest(data, file=f"{src.url}/{MANIFEST_NAME}").save_id
            except Exception as e:
                summary = {"rank": 0, "ok": False, "error": f"local step {src.url}: {error_text(e)}"}
        sid = comm.broadcast_json(sid) or ""
        try:
            if sid and src.exists(data_file_name(sid, comm.rank)):  # a rank that owned no data has no files
                for name in (data_file_name(sid, comm.rank), index_file_name(sid, comm.rank)):
                    dst.write_file(name, src.read_file(name))
                dst.sync_dir(f"data/{sid}")
        except Exception as e:
            summary = {"rank": comm.rank, "ok": False, "error": error_text(e)}
        commit.finish(comm, dst, sid, summary, total_elements=0, build=lambda files: data)

    # -------------------------------------------------------------------------------------- restore

    def _held(self) -> dict:
        """This node's committed local steps: {step: {"id": save_id, "files": [rank of each manifest file
        entry], "held": [those whose data (of the manifest's size) and index files this dir holds]}}."""
        out = {}
        for name in self.storage.list_dir(""):
            m = STEP_DIR.match(name)
            if not m or not self.storage.exists(f"{name}/{MANIFEST_NAME}"):
                continue
            try:
                man = parse_manifest(self.storage.read_file(f"{name}/{MANIFEST_NAME}"), file=name)
                held = []
                for f in man.files:
                    d = f"{name}/{f.data}"
                    if self.storage.exists(d) and self.storage.size(d) == f.data_size \
                            and self.storage.exists(f"{name}/{f.index}"):
                        held.append(f.rank)
                out[str(int(m.group(1)))] = {"id": man.save_id, "files": [f.rank for f in man.files], "held": held}
            except Exception as e:  # an unreadable step on this node counts as not held here
                log.warning("shardckpt: local step %s/%s is unreadable (%s); not restoring from it",
                            self.storage.url, name, error_text(e, 300))
        return out

    def restore(self, state, durable_root=None, *, storage_options: dict | None = None,
                load_durable: bool = True) -> int | None:
        """Every rank: restore the newest step that can be assembled, from the local tier (own files plus
        peer replicas of the surviving nodes) when it is at least as new as the durable tier's latest, else
        from the durable tier (unless not `load_durable`: then None, and the caller restores it, as
        CheckpointManager.restore does with its verification and fallbacks). Sets self.restored to
        (tier, step) and logs it. Returns the step, or None."""
        from .state import load_training_state
        comm = self._comm()
        durable = None
        if comm.is_coordinator and durable_root is not None:
            steps = committed_steps(durable_root, storage_options=storage_options)
            durable = steps[-1] if steps else None
        recs = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(
            {"steps": self._held(), "durable": durable}).encode())]
        durable = recs[0]["durable"]
        pick = choose_local(recs, durable)
        if pick is not None:
            step, holders = pick
            try:
                self._load_local(state, comm, step, holders)
                return self._done("local", step, comm)
            except CheckpointError as e:
                if durable is None:
                    raise
                log.warning("shardckpt: restoring local step %d failed (%s); restoring durable step %d instead",
                            step, error_text(e, 300), durable)
        if durable is None or not load_durable:
            self.restored = None
            return None
        load_training_state(state, storage_for(durable_root, storage_options).child(step_dir(durable)),
                            process_group=self.process_group)
        return self._done("durable", durable, comm)

    def _done(self, tier: str, step: int, comm) -> int:
        self.restored = (tier, step)
        log.info("shardckpt: restored step %d from the %s tier", step, tier)
        self.retire_newer(step, comm)
        return step

    def retire_newer(self, step: int, comm=None) -> None:
        """Every rank, after a restore of `step` (restore; CheckpointManager.restore after a durable one):
        local steps newer than it belong to an abandoned run (incomplete, or not chosen); each node's local
        rank 0 retires them, so a later restore never prefers them to what this run saves next."""
        comm = comm or self._comm()
        if node_map(comm).local_rank(comm.rank) == 0:
            try:
                for newer in [s for s in committed_steps(self.storage) if s > step]:
                    retire_step(self.storage, step_dir(newer))
            except Exception as e:
                log.warning("shardckpt: could not retire local steps newer than %d under %s: %s", step,
                            self.storage.url, error_text(e))

    def _load_local(self, state, comm, step: int, holders: dict[int, list[int]]) -> None:
        """All ranks: the metadata read by holders (manifest by the first, each index by one of its file's
        holders), all-gathered, then the exchange restricted to holders."""
        from .state import load_training_state_from
        path = self.storage.child(step_dir(step))
        have = [r for rs in holders.values() for r in rs]
        first = min(have)
        parts: list[tuple[int, bytes]] = []  # (-1 for the manifest | file index, bytes)
        record = None
        try:
            if comm.rank == first:
                parts.append((-1, path.read_file(MANIFEST_NAME)))
            man = parse_manifest(path.read_file(MANIFEST_NAME), file=path.url) if any(
                comm.rank == hs[i % len(hs)] for i, hs in holders.items()) else None
            for i, hs in holders.items():
                if hs[i % len(hs)] == comm.rank:
                    parts.append((i, path.read_file(man.files[i].index)))
        except Exception as e:
            record = error_record(e, comm.rank)
        head = json.dumps({"error": record} if record else {"parts": [[i, len(b)] for i, b in parts]}).encode()
        blobs = comm.all_gather_bytes(struct.pack("<I", len(head)) + head + b"".join(b for _, b in parts))
        got: dict[int, bytes] = {}
        for b in blobs:
            (n,) = struct.unpack_from("<I", b)
            h = json.loads(b[4:4 + n])
            if "error" in h:
                raise error_from(h["error"])
            pos = 4 + n
            for i, k in h["parts"]:
                got[i] = b[pos:pos + k]
                pos += k
        manifest = parse_manifest(got[-1], file=f"{path.url}/{MANIFEST_NAME}")
        index_data = [got[i] for i in range(len(manifest.files))]
        load_training_state_from(state, path, comm, (manifest, index_data), holders=holders)


def save_step(mgr, step: int, state, metrics: dict | None, durable: bool) -> bool:
    """CheckpointManager.maybe_save, every rank, on a step of its local tier (local_every_steps): a local
    save, then, when the durable tier is due too, its promotion (the same encoded files and manifest, no
    second snapshot) and the durable retention. Returns True (saved)."""
    from .errors import CheckpointExistsError
    from .policy import json_metrics
    mgr._reap(block=True)  # a pending async durable save runs collectives on the same group
    mgr.tier.save(step, state, metadata={"step": int(step), "metrics": json_metrics(metrics)})
    if durable:
        try:
            mgr.tier.promote(step, mgr.storage)
        except CheckpointExistsError:
            log.warning("step %d is already committed under %s; not promoting it again", step, mgr.root)
            return True
        mgr._after_commit(step)
        mgr._last_saved_step = step
    return True


def choose_local(recs: list[dict], durable: int | None) -> tuple[int, dict[int, list[int]]] | None:
    """The local step to restore, from every rank's listing (LocalTier._held): the newest one whose manifest
    every listing that has it agrees on (one save_id), whose every file some rank holds, and that is not
    older than the durable tier's latest. Returns (step, {manifest file index: holding ranks}) or None.
    Pure: every rank computes the same answer from the same all-gathered listings."""
    steps = sorted({int(s) for r in recs for s in r["steps"]}, reverse=True)
    for step in steps:
        if durable is not None and step < durable:
            return None
        have = [(rank, r["steps"][str(step)]) for rank, r in enumerate(recs) if str(step) in r["steps"]]
        if len({h["id"] for _, h in have}) != 1:
            continue  # nodes disagree about what step N is (a replaced attempt): not assembled from here
        files = have[0][1]["files"]
        holders = {i: sorted(rank for rank, h in have if fr in h["held"]) for i, fr in enumerate(files)}
        if files and all(holders.values()):
            return step, holders
    return None

"""Peer replicas of the node-local tier (shardckpt.tiers): which node each rank runs on, which peers hold
copies of its files, and the copying, in memory bounded by a round size rather than by the files.

Who calls what, and when (every rank of the group, collectively, on the thread that runs the local save:
the caller's thread for LocalTier.save, the group's background thread for LocalTier.save_async):
  node_map(comm)      once per LocalTier (it caches the answer): every rank's node, from the launcher's
                      environment.
  replicate(...)      between a local save's write and its commit round (pipeline.write_and_commit's
                      after_write): this rank's data and index files streamed to its peers in rounds of at
                      most ROUND_BYTES per sender over all_to_all, the files received written under the same
                      names. A failure anywhere is carried into the commit round, which then fails on every
                      rank; every rank still takes part in every round, so none waits for the timeout.
  copy_file(...)      LocalTier.promote: a rank's local files uploaded to the durable tier, piece by piece.
  mirror(...)         after the commit: the coordinator's manifest bytes committed by local rank 0 of every
                      other node, so each node's dir holds a committed copy of the step.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from shardckpt.lifecycle import commit
from shardckpt._faults import fault_point
from shardckpt.errors import error_text
from shardckpt.format.records import MANIFEST_NAME, data_file_name, index_file_name
from shardckpt.storage import Storage
from shardckpt.storage.base import ReadRange

log = logging.getLogger("shardckpt")

# bytes a rank sends to each of its peers per round: what replication holds in memory beyond the files is
# one round's send buffer (ROUND_BYTES x replicas) and its receive buffer (ROUND_BYTES x ranks it holds for)
ROUND_BYTES = 64 << 20


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


def _window(sizes: list[int], lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """The parts of bytes [lo, hi) of the files of `sizes` read one after another: (file, offset, length,
    position in the window). The sender reads them; the receiver writes them to the same files."""
    out, start = [], 0
    for f, size in enumerate(sizes):
        a, b = max(lo, start), min(hi, start + size)
        if a < b:
            out.append((f, a - start, b - a, a - lo))
        start += size
    return out


def replicate(comm, storage: Storage, save_id: str, nodes: Nodes, replicas: int, jump: int,
              summary: dict) -> dict:
    """Every rank, between a local save's write and its commit round: send this rank's files to its peers
    and write the files received from the ranks this one holds copies for. Returns the summary for the
    commit round (failed, naming what, if this rank's part failed)."""
    if comm.group is None or nodes.count == 1 or replicas == 0:
        return summary
    names = [data_file_name(save_id, comm.rank), index_file_name(save_id, comm.rank)]
    sizes = None
    if summary["ok"] and "data_size" in summary:  # a rank that owned no data has no files
        try:
            sizes = [storage.size(n) for n in names]
        except Exception as e:  # reported at the commit round; every rank still takes part below
            summary = _failed(comm, f"reading back for replication: {error_text(e)}")
    recs = [json.loads(b) for b in comm.all_gather_bytes(json.dumps({"ok": summary["ok"], "sizes": sizes}).encode())]
    if not all(r["ok"] for r in recs):
        return summary  # the failed rank's summary fails the commit round; nothing to replicate
    fault_point("replicate", comm.rank)
    world = comm.world_size
    peers = [nodes.peers(r, replicas, jump) for r in range(world)]
    totals = [sum(r["sizes"]) if r["sizes"] else 0 for r in recs]
    sources = [s for s in range(world) if totals[s] and comm.rank in peers[s]]
    rounds = max(-(-t // ROUND_BYTES) for t in totals)  # the same on every rank: from the gathered sizes
    mine = np.empty(min(ROUND_BYTES, totals[comm.rank]), dtype=np.uint8)
    writers: dict[int, list] = {s: [] for s in sources}  # source rank -> [data writer, index writer]
    error, finished = None, False
    try:
        try:
            for s in sources:
                for name in (data_file_name(save_id, s), index_file_name(save_id, s)):
                    writers[s].append(storage.open_write(name))
        except Exception as e:
            error = f"creating a peer's replica: {error_text(e)}"
        for k in range(rounds):
            lo = k * ROUND_BYTES
            n = max(0, min(ROUND_BYTES, totals[comm.rank] - lo))
            if n and error is None:
                try:
                    for f, off, length, pos in _window(sizes, lo, lo + n):
                        storage.read_ranges(names[f], [ReadRange(off, length, pos)], mine)
                except Exception as e:  # the declared bytes are still sent; the commit round fails
                    error = f"reading back for replication: {error_text(e)}"
            part = torch.from_numpy(mine[:n]) if n else torch.empty(0, dtype=torch.uint8)
            send_sizes = [n if r in peers[comm.rank] else 0 for r in range(world)]
            recv_sizes = [max(0, min(ROUND_BYTES, totals[s] - lo)) if s in sources else 0 for s in range(world)]
            send = torch.cat([part] * sum(1 for x in send_sizes if x)) if n else part
            got = comm.all_to_all(send, send_sizes, recv_sizes).numpy()  # a dead peer raises: aborted below
            pos = 0
            for s in range(world):
                if not recv_sizes[s]:
                    continue
                if error is None:
                    try:
                        for f, _, length, at in _window(recs[s]["sizes"], lo, lo + recv_sizes[s]):
                            writers[s][f].write(got[pos + at:pos + at + length].copy())
                    except Exception as e:
                        error = f"writing the replica of rank {s}'s files: {error_text(e)}"
                pos += recv_sizes[s]
        if error is None:
            try:
                for w in (w for pair in writers.values() for w in pair):
                    w.close()
                if writers:
                    storage.sync_dir(f"data/{save_id}")
            except Exception as e:
                error = f"finishing a peer's replica: {error_text(e)}"
        finished = error is None
    finally:
        if not finished:  # the save does not commit: no replica of it is left behind (abort never raises)
            for w in (w for pair in writers.values() for w in pair):
                w.abort()
    if error is not None:
        return _failed(comm, error)
    return summary


def _failed(comm, message: str) -> dict:
    return {"rank": comm.rank, "ok": False, "error": message}


def mirror(comm, nodes: Nodes, path: Storage, save_id: str) -> None:
    """Every rank, after a local commit: the coordinator's manifest bytes committed by local rank 0 of every
    other node (a node that cannot commit its copy logs it; its copy then does not count at restore)."""
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
        if not outcome.committed:
            log.warning("shardckpt: node %d could not commit local step %s: %s", nodes.node_of[comm.rank],
                        path.url, outcome.message)



def copy_file(src: Storage, dst: Storage, name: str) -> int:
    """Copy one file between stores in pieces of ROUND_BYTES, durable at dst when this returns
    (FileWriter.close). Memory: the pieces the writer still holds (FileWriter.write may keep a buffer until
    close; each piece is a new one). Called by LocalTier.promote for a rank's local files. Returns the size."""
    size = src.size(name)
    w = dst.open_write(name)
    try:
        for lo in range(0, size, ROUND_BYTES):
            piece = np.empty(min(ROUND_BYTES, size - lo), dtype=np.uint8)
            src.read_ranges(name, [ReadRange(lo, len(piece), 0)], piece)
            w.write(piece)
    except BaseException:
        w.abort()
        raise
    return w.close()

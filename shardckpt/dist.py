"""The coordinator protocol's transport: small JSON records over a gloo process group (never pickle).

A save makes four collectives, each O(ranks) small records, however many tensors or chunks it holds:
  1. gather(plan record) at the coordinator   2. broadcast(verdict: go + save_id, or an error)
  3. gather(write summary) at the coordinator  4. broadcast(commit result)
Every collective runs on a gloo group with a timeout, so a dead or hung rank raises CoordinationError on
every survivor instead of hanging. Without torch.distributed (one process) these are identities."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from shardckpt import config
from shardckpt.errors import CoordinationError

RECORD_BYTES = 4096
DEFAULT_TIMEOUT_S = config.DEFAULT_TIMEOUT_S

_companion_groups: dict = {}


def default_timeout_s() -> float:
    """SHARDCKPT_TIMEOUT, read at each call: a launcher that imported shardckpt before setting it still counts."""
    return config.timeout_s()


@dataclass
class Comm:
    """The group a save or load runs on. rank/world_size are within the group; coordinator is group rank 0."""
    group: object | None
    rank: int
    world_size: int
    global_rank: int

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def gather_json(self, obj) -> list | None:
        """Gather one small JSON record per rank at the coordinator (None on other ranks)."""
        if self.group is None:
            return [obj]
        buf = _encode(obj)
        out = [torch.empty(RECORD_BYTES, dtype=torch.uint8) for _ in range(self.world_size)] \
            if self.is_coordinator else None
        try:
            dist.gather(buf, out, group_dst=0, group=self.group)
        except Exception as e:  # gloo raises RuntimeError on timeout or a dead peer
            raise CoordinationError(f"gather failed: a rank died or timed out ({_short(e)})",
                                    rank=self.global_rank) from e
        return [_decode(t) for t in out] if out is not None else None

    def broadcast_json(self, obj) -> object:
        """Broadcast a small JSON record from the coordinator to every rank."""
        if self.group is None:
            return obj
        buf = _encode(obj) if self.is_coordinator else torch.empty(RECORD_BYTES, dtype=torch.uint8)
        try:
            dist.broadcast(buf, group_src=0, group=self.group)
        except Exception as e:
            raise CoordinationError(f"broadcast failed: a rank died or timed out ({_short(e)})",
                                    rank=self.global_rank) from e
        return _decode(buf)

    def from_coordinator(self, fn):
        """All ranks: the coordinator runs fn() (I/O only it does: listing steps, reading a manifest) and
        its small JSON result reaches every rank; if fn raises, every rank raises at once (the coordinator
        its own error, the others the typed error rebuilt from its record) instead of the others waiting
        at the next collective until the timeout. One broadcast."""
        from shardckpt.errors import error_from, error_record
        record, error = None, None
        if self.is_coordinator:
            try:
                record = {"ok": fn()}
            except Exception as e:
                error, record = e, {"error": error_record(e, self.rank)}
        record = self.broadcast_json(record)
        if "error" in record:
            if error is not None:
                raise error
            raise error_from(record["error"])
        return record["ok"]

    # ---- bulk collectives of a read-once restore (shardckpt.loading.exchange); the group's timeout applies to each

    def broadcast_bytes(self, data: bytes | None, nbytes: int) -> bytes:
        """Broadcast `nbytes` bytes (agreed beforehand, e.g. through broadcast_json) from the coordinator."""
        if self.group is None:
            return data
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_coordinator and nbytes \
            else torch.empty(nbytes, dtype=torch.uint8)
        self._run(lambda: dist.broadcast(buf, group_src=0, group=self.group), "broadcast")
        return data if self.is_coordinator else bytes(buf.numpy())

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, on every rank (two collectives: the lengths, then the padded bytes)."""
        if self.group is None:
            return [data]
        n = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.empty(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._run(lambda: dist.all_gather(sizes, n, group=self.group), "all_gather")
        lens = [int(t.item()) for t in sizes]
        top = max(lens)
        mine = torch.zeros(top, dtype=torch.uint8)
        if data:
            mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [torch.empty(top, dtype=torch.uint8) for _ in range(self.world_size)]
        self._run(lambda: dist.all_gather(outs, mine, group=self.group), "all_gather")
        return [bytes(o[:k].numpy()) for o, k in zip(outs, lens)]

    def all_gather_distinct(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, on every rank, each distinct value sent once: what replicas' identical
        records cost is their digests, not ranks x the longest record (all_gather_bytes pads to it). Each
        rank's 24-byte digest (blake2b-128 + length) is all-gathered; the lowest rank with each distinct
        digest sends its bytes to the coordinator (checked against the digest there), which broadcasts
        their concatenation. A rank receives 24 x ranks + the distinct records' bytes. Identical records
        come back as one bytes object. Two collectives, plus one send per distinct record."""
        if self.group is None:
            return [data]
        mine = torch.frombuffer(bytearray(_digest(data)), dtype=torch.uint8)
        outs = [torch.empty(DIGEST_BYTES, dtype=torch.uint8) for _ in range(self.world_size)]
        self._run(lambda: dist.all_gather(outs, mine, group=self.group), "all_gather")
        keys = [bytes(o.numpy()) for o in outs]
        owner: dict[bytes, int] = {}
        for r, k in enumerate(keys):
            owner.setdefault(k, r)
        size = {k: int.from_bytes(k[16:], "little") for k in owner}
        blob = None
        if self.is_coordinator:
            parts = []
            for k, r in owner.items():
                if r == 0 or not size[k]:
                    parts.append(data if r == 0 else b"")
                    continue
                buf = torch.empty(size[k], dtype=torch.uint8)
                self._run(lambda: dist.recv(buf, group_src=r, group=self.group), "recv")
                got = bytes(buf.numpy())
                if _digest(got) != k:
                    raise CoordinationError(f"rank {r}'s record does not match its digest", rank=self.global_rank)
                parts.append(got)
            blob = b"".join(parts)
        elif owner[keys[self.rank]] == self.rank and data:
            self._run(lambda: dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), group_dst=0,
                                        group=self.group), "send")
        blob = self.broadcast_bytes(blob, sum(size.values()))
        out, pos = {}, 0
        for k in owner:
            out[k] = blob[pos:pos + size[k]]
            pos += size[k]
        return [out[k] for k in keys]

    def any_flag(self, flag: bool) -> bool:
        """Whether any rank passed True (one 1-element all-reduce)."""
        if self.group is None:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._run(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group), "all_reduce")
        return bool(t.item())

    def all_reduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """The element-wise "sum" or "max" over the group of an int32 or int64 vector (one all-reduce; a
        rank sends and receives about twice its bytes whatever the world size)."""
        if self.group is None:
            return values
        t = torch.from_numpy(np.ascontiguousarray(values).copy())
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        self._run(lambda: dist.all_reduce(t, op=red, group=self.group), "all_reduce")
        return t.numpy()

    def all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        """Send send[...] in consecutive parts of send_sizes[r] bytes to each rank r; receive recv_sizes[r]
        from each (uint8 tensors, one all_to_all_single)."""
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8)
        if self.group is None:
            out.copy_(send)
            return out
        self._run(lambda: dist.all_to_all_single(out, send, recv_sizes, send_sizes, group=self.group),
                  "all_to_all")
        return out

    def _run(self, op, what: str) -> None:
        try:
            op()
        except Exception as e:  # gloo raises RuntimeError on timeout or a dead peer
            raise CoordinationError(f"{what} failed: a rank died or timed out ({_short(e)})",
                                    rank=self.global_rank) from e


DIGEST_BYTES = 24


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest() + len(data).to_bytes(8, "little")


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _encode(obj) -> torch.Tensor:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) + 4 > RECORD_BYTES:
        raise ValueError(f"coordination record of {len(data)} bytes exceeds {RECORD_BYTES}")
    buf = torch.zeros(RECORD_BYTES, dtype=torch.uint8)
    buf[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    buf[4:4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf


def _decode(buf: torch.Tensor):
    raw = bytes(buf.numpy())
    n = int.from_bytes(raw[:4], "little")
    if n > RECORD_BYTES - 4:
        raise CoordinationError("corrupt coordination record")
    return json.loads(raw[4:4 + n])


def comm_for(process_group=None, timeout_s: float | None = None) -> Comm:
    """The Comm for a save: one process without torch.distributed; else a gloo companion of the given group
    (created once per group, collectively, with its own timeout) so shardckpt's collectives never interleave
    with the training job's and always time out."""
    if not (dist.is_available() and dist.is_initialized()):
        return Comm(None, 0, 1, 0)
    group = process_group if process_group is not None else dist.group.WORLD
    ranks = dist.get_process_group_ranks(group)
    world = dist.get_world_size(group)
    if world == 1:
        return Comm(None, 0, 1, dist.get_rank())
    timeout = timedelta(seconds=timeout_s or default_timeout_s())
    cache_key = (tuple(ranks), timeout)
    companion = _companion_groups.get(cache_key)
    if companion is None:
        if group is dist.group.WORLD or len(ranks) == dist.get_world_size():
            try:
                companion = dist.new_group(ranks=None if group is dist.group.WORLD else ranks, backend="gloo",
                                           timeout=timeout, use_local_synchronization=True)
            except Exception as e:
                raise CoordinationError(f"could not create shardckpt's gloo group: {_short(e)}",
                                        rank=dist.get_rank()) from e
        elif dist.get_backend(group) == "gloo":
            companion = group  # a gloo subgroup of the caller's: its own timeout applies
        else:
            companion = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout,
                                       use_local_synchronization=True)
        _companion_groups[cache_key] = companion
    return Comm(companion, dist.get_rank(companion), world, dist.get_rank())


def reset() -> None:
    """Forget cached companion groups (after destroy_process_group)."""
    _companion_groups.clear()

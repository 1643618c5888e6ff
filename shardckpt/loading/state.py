"""Training-state adapters: everything a job needs to resume, as Stateful objects.

A Stateful (the protocol of torch.distributed.checkpoint) has state_dict() and load_state_dict(sd). Put
them in the state you save; shardckpt expands them on save and, on load, fills the tensors of a fresh
state_dict() in place and hands it back to load_state_dict():

    state = {"train": ModelOptimizerState(model, optim), "sched": SchedulerState(sched),
             "scaler": GradScalerState(scaler), "rng": RNGState(seed=1234), "data": sampler}
    manager.save(step, state)          # or shardckpt.save(state, path)
    manager.restore(state)             # or load_training_state(state, path)

What "resume on a different world size" (or another parallel layout) means for each adapter:
  ModelOptimizerState  exact. Parameters and optimizer moments are DTensors (FSDP2, TP) or plain tensors and
                       are resharded to the new layout; every value is bit-identical after the restore.
  SchedulerState,      exact: they are plain numbers (last_epoch, base_lrs, scale, growth tracker), the same
  GradScalerState      on every rank.
  DataPosition /       exact in global terms: the position is the number of samples of the epoch's global
  ResumableSampler     order already consumed, so the new ranks continue at the next unconsumed sample; no
                       sample is skipped or repeated. Which rank sees which sample changes with the world size.
  RNGState             per rank, so it cannot carry over: at the same world size every rank gets its own RNG
                       streams back exactly; at another world size every rank re-derives its generators from
                       (seed, rank, the checkpoint's save_id) and a warning says so. Runs that need bitwise
                       reproducibility across a resize must not depend on RNG state (dropout etc.).
The RNG re-derivation needs load_training_state (which CheckpointManager.restore uses): a plain
shardckpt.load of a state holding an RNGState saved at another world size raises ShapeMismatchError.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import struct
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("shardckpt")


@runtime_checkable
class Stateful(Protocol):
    """Anything with state_dict() / load_state_dict() (torch.distributed.checkpoint.stateful.Stateful).

    Call sequence, on every rank: save calls state_dict() once and saves what it returns. Load calls
    state_dict() once to get templates (tensors with the current shapes and layouts), fills those tensors in
    place from the checkpoint, replaces plain values, then calls load_state_dict() with the filled dict."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------- model + optimizer

class ModelOptimizerState:
    """A model and its optimizer(s), through torch.distributed.checkpoint.state_dict's get_state_dict /
    set_state_dict: plain modules, DDP, FSDP2 (fully_shard) and tensor-parallel modules, with optimizer
    state keyed by parameter name (so it survives resharding). An optimizer that has not stepped yet gets
    its state initialized by get_state_dict, so a fresh job can restore into it."""

    def __init__(self, model: torch.nn.Module, optimizers=(), *, options=None):
        self.model = model
        self.optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        if not self.optimizers:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict
            return {"model": get_model_state_dict(self.model, options=self.options)}
        msd, osd = get_state_dict(self.model, self.optimizers, options=self.options)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
        if not self.optimizers:
            set_model_state_dict(self.model, state_dict["model"], options=self.options)
            return
        set_state_dict(self.model, self.optimizers, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"], options=self.options)


# ------------------------------------------------------------------------------- scheduler, grad scaler

def _plain(sd: dict) -> dict:
    """Drop callables (a LambdaLR holds its lambdas only when they are callable objects)."""
    return {k: v for k, v in sd.items() if not callable(v)}


class SchedulerState:
    """An LR scheduler (torch.optim.lr_scheduler.*): its own state_dict, plain numbers."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return _plain(self.scheduler.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        current = self.scheduler.state_dict()
        current.update(state_dict)
        self.scheduler.load_state_dict(current)


class GradScalerState:
    """A torch.amp.GradScaler: scale, growth tracker and factors (empty when the scaler is disabled)."""

    def __init__(self, scaler):
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": bool(self.scaler.is_enabled()), "state": dict(self.scaler.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("state") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state_dict["state"])


# ---------------------------------------------------------------------------------------------- RNG

def _world() -> tuple[int, int, list[int] | None]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), None
    return 0, 1, None


def _pack_python(state) -> bytes:
    version, internal, gauss = state
    return struct.pack(f"<q{len(internal)}Qqd", version, *internal, gauss is not None, gauss or 0.0)


def _unpack_python(b: bytes):
    n = (len(b) - 24) // 8
    vals = struct.unpack(f"<q{n}Qqd", b)
    return (vals[0], tuple(vals[1:1 + n]), vals[-1] if vals[-2] else None)


def _pack_numpy(state) -> bytes:
    name, keys, pos, has_gauss, cached = state
    assert name == "MT19937"
    return np.asarray(keys, dtype=np.uint32).tobytes() + struct.pack("<qqd", pos, has_gauss, cached)


def _unpack_numpy(b: bytes):
    keys = np.frombuffer(b[:-24], dtype=np.uint32).copy()
    pos, has_gauss, cached = struct.unpack("<qqd", b[-24:])
    return ("MT19937", keys, pos, has_gauss, cached)


class RNGState:
    """This rank's random number generators: Python `random`, NumPy's global generator, torch's CPU
    generator and (if CUDA is available) the current CUDA device's generator.

    Saved as one uint8 row per rank in a [world_size, n] tensor, sharded by rows over a 1-D mesh of the
    group's ranks (a DTensor with Shard(0); a plain [1, n] tensor in a single process). So every rank saves
    the same keys and each writes only its own row. Restored exactly at the same world size; at another
    world size see `on_restore`.

    Args:
        seed: the base seed used to re-derive generators when the world size changed.
        process_group: the group that saves together (default: the whole job).
    """

    def __init__(self, seed: int = 0, process_group=None):
        self.seed = int(seed)
        self.process_group = process_group
        self._mesh = None

    # layout: [python][numpy][torch cpu][cuda], lengths recorded in the state
    def _rows(self) -> list[bytes]:
        parts = [_pack_python(random.getstate()), _pack_numpy(np.random.get_state()),
                 torch.get_rng_state().numpy().tobytes()]
        parts.append(torch.cuda.get_rng_state().numpy().tobytes() if torch.cuda.is_available() else b"")
        return parts

    def _group(self) -> tuple[int, int, list[int]]:
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1, [0]
        g = self.process_group or dist.group.WORLD
        return dist.get_rank(g), dist.get_world_size(g), dist.get_process_group_ranks(g)

    def state_dict(self) -> dict[str, Any]:
        parts = self._rows()
        row = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).view(1, -1)
        rank, ws, ranks = self._group()
        if ws > 1:
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.tensor import DTensor, Shard
            if self._mesh is None:  # no collectives: the mesh only describes which rank holds which row
                self._mesh = DeviceMesh("cpu", torch.tensor(ranks), _init_backend=False)
            n = row.shape[1]
            row = DTensor.from_local(row, self._mesh, [Shard(0)], run_check=False, shape=torch.Size((ws, n)),
                                     stride=(n, 1))
        return {"world_size": ws, "seed": self.seed, "layout": [len(p) for p in parts], "states": row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["states"]
        local = states._local_tensor if hasattr(states, "_local_tensor") else states
        blob = local.reshape(-1).numpy().tobytes()
        parts, pos = [], 0
        for n in state_dict["layout"]:
            parts.append(blob[pos:pos + n])
            pos += n
        random.setstate(_unpack_python(parts[0]))
        np.random.set_state(_unpack_numpy(parts[1]))
        torch.set_rng_state(torch.frombuffer(bytearray(parts[2]), dtype=torch.uint8))
        if torch.cuda.is_available() and parts[3]:
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(parts[3]), dtype=torch.uint8))

    def on_restore(self, manifest, prefix: str) -> bool:
        """Called by load_training_state before loading. Returns True to be loaded normally (same world
        size); otherwise re-derives every generator from (seed, rank, save_id), warns and returns False."""
        meta = manifest.tensors.get(f"{prefix}.states" if prefix else "states")
        rank, ws, _ = self._group()
        if meta is not None and meta.shape[0] == ws and meta.shape[1] == sum(len(p) for p in self._rows()):
            return True
        saved_ws = meta.shape[0] if meta is not None else None
        self.reseed(manifest.save_id, rank)
        if rank == 0:
            log.warning("RNG state was saved by %s ranks and is restored on %d: every rank re-derives its "
                        "generators from (seed=%d, rank, save_id)", saved_ws, ws, self.seed)
        return False

    def reseed(self, salt: str, rank: int) -> None:
        h = hashlib.sha256(f"{self.seed}/{rank}/{salt}".encode()).digest()
        s = int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        torch.manual_seed(s)  # also seeds every CUDA device


# -------------------------------------------------------------------------------------- data position

class DataPosition:
    """Where the data stream stands, in global terms: the epoch and how many samples of that epoch's global
    order have been consumed by all ranks together. Independent of the world size."""

    def __init__(self, epoch: int = 0, index: int = 0):
        self.epoch = epoch
        self.index = index

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.index = int(state_dict["epoch"]), int(state_dict["index"])


class ResumableSampler(torch.utils.data.Sampler):
    """A DistributedSampler that can resume at a global position on any world size.

    Every epoch has one global order of the dataset (a permutation seeded by (seed, epoch), or 0..n-1).
    A global batch of `global_batch` samples is the next slice of that order; rank r takes rows
    [r * B // W, (r + 1) * B // W) of it. The position advances by the global batch, so after a resume on
    another world size the new ranks carry on with exactly the samples not yet consumed.

    Use next_batch() from the training loop (the position then counts consumed batches exactly), or iterate
    the sampler for one epoch (the position advances as indices are handed out: with DataLoader workers
    prefetching, that is ahead of what the loop consumed).

    Args:
        num_samples: dataset length.
        global_batch: samples per step over all ranks (keep it fixed across resizes).
        rank, world_size: default: this process in the default group.
        shuffle, seed: the per-epoch permutation.
        drop_last: drop the epoch's tail that does not fill a global batch (default True).
    """

    def __init__(self, num_samples: int, global_batch: int, *, rank: int | None = None,
                 world_size: int | None = None, shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        r, w, _ = _world()
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if global_batch < self.world_size:
            raise ValueError(f"global_batch {global_batch} is smaller than the world size {self.world_size}")
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.position = DataPosition()
        self._order: tuple[int, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position.state_dict(), "num_samples": self.num_samples, "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["num_samples"] != self.num_samples or state_dict["seed"] != self.seed:
            log.warning("sampler state was saved for %s samples / seed %s; this sampler has %s / %s: the "
                        "global order differs", state_dict["num_samples"], state_dict["seed"], self.num_samples,
                        self.seed)
        self.position.load_state_dict(state_dict["position"])

    def _epoch_order(self) -> torch.Tensor:
        e = self.position.epoch
        if self._order is None or self._order[0] != e:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                order = torch.randperm(self.num_samples, generator=g)
            else:
                order = torch.arange(self.num_samples)
            self._order = (e, order)
        return self._order[1]

    def _epoch_len(self) -> int:
        B = self.global_batch
        return self.num_samples // B * B if self.drop_last else self.num_samples

    def next_batch(self) -> list[int]:
        """This rank's sample indices of the next global batch; advances the position (rolls over epochs)."""
        if self.position.index >= self._epoch_len():
            self.position.epoch += 1
            self.position.index = 0
        order = self._epoch_order()
        start = self.position.index
        batch = order[start:min(start + self.global_batch, self._epoch_len())]
        self.position.index = start + self.global_batch
        B, W, r = len(batch), self.world_size, self.rank
        return batch[r * B // W:(r + 1) * B // W].tolist()

    def __iter__(self) -> Iterator[int]:
        while self.position.index < self._epoch_len():
            yield from self.next_batch()
        self.position.epoch += 1
        self.position.index = 0

    def __len__(self) -> int:
        rest = max(0, self._epoch_len() - self.position.index)
        return math.ceil(rest / self.world_size)


# ------------------------------------------------------------------------------------------- restore

def load_training_state(state: dict, path, *, process_group=None, storage_options: dict | None = None,
                        strict: bool = True):
    """shardckpt.load for training states: top-level entries with an `on_restore(manifest, prefix) -> bool`
    method (RNGState) may opt out of the load when they cannot be restored as saved (another world size)
    and restore themselves instead. Everything else loads as shardckpt.load does. Call on every rank."""
    from shardckpt import dist as sdist
    from shardckpt.loading.load import read_group_metadata
    from shardckpt.storage import storage_for
    storage = storage_for(path, storage_options)
    comm = sdist.comm_for(process_group)
    metadata = read_group_metadata(storage, comm)  # once for the group, and once for the hooks and the load
    return load_training_state_from(state, storage, comm, metadata, strict=strict)


def load_training_state_from(state: dict, storage, comm, metadata, *, strict: bool = True, holders=None):
    """load_training_state once the group has the metadata; shardckpt.tiers calls it for a local-tier restore
    (`storage` this rank's own copy, `holders` which ranks hold each file: exchange.run)."""
    from shardckpt.loading.load import load_with_metadata
    manifest = metadata[0]
    skip = []
    for k, v in state.items():
        hook = getattr(v, "on_restore", None)
        if callable(hook) and not hook(manifest, str(k)):
            skip.append(str(k))
    kw = dict(strict=strict, key_map=None, prefix="", convert_dtype=False,
              exchange="auto" if holders is None else "always", holders=holders)
    if not skip:
        return load_with_metadata(state, storage, comm, metadata, keys=None, **kw)
    rest = {k: v for k, v in state.items() if str(k) not in skip}
    keep = lambda key: not any(key == p or key.startswith(p + ".") for p in skip)  # noqa: E731
    return load_with_metadata(rest, storage, comm, metadata, keys=keep, **kw)

"""PyTorch Lightning 2.x: checkpoints through shardckpt instead of torch.save / pickle.

    from shardckpt.integrations.lightning import ShardckptCheckpointIO, last_checkpoint  # or AsyncShardckptCheckpointIO()
    trainer = Trainer(plugins=[ShardckptCheckpointIO()],
                      callbacks=[ModelCheckpoint(dirpath="s3://bucket/run", monitor="val_loss", save_top_k=2,
                                                 save_last=True)])
    trainer.fit(model, ckpt_path=last_checkpoint("s3://bucket/run"))    # resume (None: a fresh run)

Who calls what, and when (Lightning's Strategy drives it):
  save_checkpoint    global rank 0 only (single device, DDP, FSDP with state_dict_type="full"), with
                     Lightning's whole checkpoint dict; the path Lightning names (epoch=3-step=40.ckpt,
                     last.ckpt) becomes a shardckpt checkpoint directory, committed atomically. A path that
                     holds one already (last.ckpt, every epoch) is replaced atomically: the old checkpoint
                     stays loadable until the new manifest is in place.
  load_checkpoint    every rank, at resume (ckpt_path=); each reads the full checkpoint.
  remove_checkpoint  global rank 0 (ModelCheckpoint's top-k and save_last): the manifest first, so an
                     interrupted removal never leaves something that looks committed.
Sharded strategies (ModelParallelStrategy, FSDP with state_dict_type="sharded") do not call a CheckpointIO
for their checkpoints: they call torch.distributed.checkpoint on every rank themselves. For
ModelParallelStrategy (FSDP2 / tensor parallel) use integrations.lightning_sharded's
ShardckptModelParallelStrategy, which saves each rank's shards through shardckpt with the helpers here
(prepare, load_rest, remove_checkpoint). Lightning's FSDPStrategy (FSDP1) has no such subclass (torch's
FSDP1 refuses CPU-only machines, so it could not be tested here); use state_dict_type="full" with this plugin.

Values: tensors are stored as tensors; Lightning's containers (AttributeDict, OrderedDict, torch.Size) are
stored as the closed JSON value types (FORMAT.md 3.3) with their type recorded in the manifest's
user_metadata["lightning"]["containers"], and rebuilt on load. Anything else that is not a tensor or plain
value (a Namespace, an Enum, a custom object in hyper_parameters) is refused with UnsupportedValueError
naming its key: nothing is pickled, on save or on load.
"""
from __future__ import annotations

import os
import posixpath
from collections import OrderedDict
from typing import Any

import torch

try:  # the framework is imported here, never by the core
    from pytorch_lightning.plugins.io import CheckpointIO
    from pytorch_lightning.utilities.parsing import AttributeDict
except ImportError:  # the unified `lightning` package
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities.parsing import AttributeDict

from lightning_fabric.utilities.data import AttributeDict as FabricAttributeDict

from shardckpt import api
from shardckpt.saving.async_save import AsyncSaveHandle, async_save
from shardckpt.lifecycle.deleter import retire
from shardckpt.errors import UnsupportedValueError
from shardckpt.format.records import MANIFEST_NAME
from shardckpt.storage import storage_for
from shardckpt.format.tree import is_stateful

# container type <-> name recorded in user_metadata; the exact types only (a subclass is refused)
_CONTAINERS = {AttributeDict: "AttributeDict", FabricAttributeDict: "FabricAttributeDict",
               OrderedDict: "OrderedDict", torch.Size: "torch.Size"}
_REBUILD = {"AttributeDict": AttributeDict, "FabricAttributeDict": FabricAttributeDict, "OrderedDict": OrderedDict,
            "torch.Size": torch.Size}


def _key(path: list) -> str:
    return ".".join(str(p) for p in path)


def to_plain(checkpoint: dict) -> tuple[dict, list]:
    """Lightning's checkpoint dict as dicts, lists, tuples, tensors and plain values, and the list of
    [path, type name] of the containers converted. Raises UnsupportedValueError naming the key of any
    object shardckpt cannot store without pickle. Called by save_checkpoint on rank 0's training thread."""
    containers: list = []

    def walk(obj, path: list):
        t = type(obj)
        if isinstance(obj, torch.Tensor):
            return obj.detach()
        if is_stateful(obj):
            raise UnsupportedValueError(f"{t.__name__} object in the checkpoint: store its state_dict() "
                                        f"(shardckpt never pickles objects)", key=_key(path))
        if t in _CONTAINERS:
            containers.append([list(path), _CONTAINERS[t]])
            obj = dict(obj) if isinstance(obj, dict) else tuple(obj)
            t = type(obj)
        if t is dict:
            return {k: walk(v, path + [k]) for k, v in obj.items()}
        if t in (list, tuple):
            return t(walk(v, path + [i]) for i, v in enumerate(obj))
        if isinstance(obj, (dict, list, tuple)):  # a namedtuple, defaultdict, ...: would not come back as itself
            raise UnsupportedValueError(f"values of type {t.__name__} are not saved (only dict, list, tuple and "
                                        f"Lightning's AttributeDict / OrderedDict); convert it to a dict",
                                        key=_key(path))
        return obj  # a leaf: shardckpt's flatten accepts it or raises UnsupportedValueError with this key

    return walk(checkpoint, []), containers


def from_plain(tree: dict, containers) -> dict:
    """Inverse of to_plain on a loaded tree; `containers` comes from the manifest and is validated here."""
    if not isinstance(containers, list):
        return tree
    for entry in sorted(containers, key=lambda e: -len(e[0]) if isinstance(e, list) and e else 0):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and entry[1] in _REBUILD):
            raise UnsupportedValueError(f"unknown Lightning container record {entry!r}", key="lightning")
        path, name = entry
        parent, obj = None, tree
        try:
            for p in path:
                parent, obj = obj, obj[p]
        except (KeyError, IndexError, TypeError):
            raise UnsupportedValueError("Lightning container record names a missing key", key=_key(path)) from None
        rebuilt = _REBUILD[name](obj)
        if parent is None:
            tree = rebuilt
        elif isinstance(parent, tuple):
            raise UnsupportedValueError("Lightning container inside a tuple", key=_key(path))
        else:
            parent[path[-1]] = rebuilt
    return tree


def last_checkpoint(dirpath, storage_options: dict | None = None) -> str | None:
    """`dirpath`/last.ckpt when it holds a committed shardckpt checkpoint, else None: what to pass as
    fit(ckpt_path=...) to resume from ModelCheckpoint(save_last=True) under an fsspec URL dirpath, where
    Lightning's ckpt_path="last" looks the URL up on the local disk, finds nothing and starts from scratch
    with a warning (Lightning issue #18261). Local dirpaths work either way; None starts a fresh run."""
    path = os.fspath(dirpath).rstrip("/") + "/last.ckpt"
    return path if storage_for(path, storage_options).exists(MANIFEST_NAME) else None


def _solo_group():
    """A process group of this rank alone: rank 0 saves by itself under DDP while the other ranks wait at
    Lightning's barrier, so shardckpt's save must not run collectives over the whole job. Created by this
    rank only (use_local_synchronization). None without torch.distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    key = (dist.get_rank(), dist.get_world_size())
    if _solo.get("key") != key:
        _solo.update(key=key, group=dist.new_group([dist.get_rank()], backend="gloo",
                                                   use_local_synchronization=True))
    return _solo["group"]


_solo: dict = {}


class ShardckptCheckpointIO(CheckpointIO):
    """Lightning's CheckpointIO backed by shardckpt (see the module docstring for who calls what).

    Args:
        codec, frame_size, timeout_s: as for shardckpt.save.
        storage_options: fsspec options for URL paths (Trainer.save_checkpoint(storage_options=) overrides).
    """

    def __init__(self, *, codec: str = "auto", frame_size: int | None = None, storage_options: dict | None = None,
                 timeout_s: float | None = None):
        super().__init__()
        self.storage_options = storage_options
        self._kw: dict[str, Any] = {"codec": codec, "timeout_s": timeout_s}
        if frame_size is not None:
            self._kw["frame_size"] = frame_size

    def prepare(self, checkpoint: dict, storage_options, *, process_group) -> tuple[dict, dict]:
        """Lightning's checkpoint dict as a shardckpt state (to_plain) and the keyword arguments of
        shardckpt.save / async_save for it (codec, the manifest's metadata, overwrite=True). Called by
        save_checkpoint here on rank 0 (process_group: rank 0 alone) and by the sharded strategies
        (integrations.lightning_sharded) on every rank (process_group None: the whole job)."""
        plain, containers = to_plain(checkpoint)
        meta = {"lightning": {"containers": containers}}
        for k in ("epoch", "global_step"):
            if isinstance(checkpoint.get(k), int):
                meta[k if k == "epoch" else "step"] = checkpoint[k]
        kw = dict(self._kw, metadata=meta, overwrite=True, process_group=process_group,
                  storage_options=storage_options if storage_options is not None else self.storage_options)
        return plain, kw

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Global rank 0: save and commit `checkpoint` at `path` (replacing a checkpoint there atomically)."""
        plain, kw = self.prepare(checkpoint, storage_options, process_group=_solo_group())
        api.save(plain, os.fspath(path), **kw)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        """Every rank: the whole checkpoint, Lightning's containers rebuilt. `map_location`: None (CPU), a
        device or a device string; weights_only is accepted and moot (nothing is ever unpickled)."""
        device = "cpu" if map_location is None else map_location
        if not isinstance(device, (str, torch.device)):
            raise TypeError("map_location must be None, a torch.device or a device string")
        return self.load_rest(path, device=device)

    def load_rest(self, path, *, without: tuple[str, ...] = (), device="cpu") -> dict:
        """The checkpoint at `path` as full tensors and plain values, Lightning's containers rebuilt, less
        the top-level keys in `without` (a sharded strategy loads those into the live model and optimizers
        itself). Called by load_checkpoint on every rank, and by the sharded strategies' load_checkpoint."""
        path = os.fspath(path)
        manifest = api.read_manifest(path, storage_options=self.storage_options)
        keep = (lambda k: k.split(".", 1)[0] not in without) if without else None
        tree = api.load_full(path, keys=keep, storage_options=self.storage_options, device=device)
        containers = manifest.user_metadata.get("lightning", {}).get("containers")
        if isinstance(containers, list) and without:
            containers = [c for c in containers if not (isinstance(c, list) and c and isinstance(c[0], list)
                                                        and c[0] and c[0][0] in without)]
        return from_plain(tree, containers)

    def is_checkpoint(self, path) -> bool:
        """Whether `path` holds a committed shardckpt checkpoint (not a torch.save file or a DCP directory).
        Called by the sharded strategies' load_checkpoint to choose their route."""
        return storage_for(os.fspath(path), self.storage_options).exists(MANIFEST_NAME)

    def remove_checkpoint(self, path) -> None:
        """Global rank 0: delete a checkpoint through shardckpt.lifecycle.deleter.retire: its manifest first, then the
        data no committed sibling refers to (ModelCheckpoint's top-k, save_last). A
        plain file there (a torch.save checkpoint) is deleted as a file. The sharded strategies use this
        one too (Strategy.remove_checkpoint calls its checkpoint_io on global rank 0)."""
        path = os.fspath(path).rstrip("/")
        parent = storage_for(posixpath.dirname(path) or ".", self.storage_options)
        name = posixpath.basename(path)
        if parent.exists(f"{name}/{MANIFEST_NAME}") or parent.list_dir(name):
            retire(parent, name)  # the one deleter: data a committed sibling refers to (base=) stays
        else:
            parent.delete(name)


class AsyncShardckptCheckpointIO(ShardckptCheckpointIO):
    """ShardckptCheckpointIO with the write in the background (Lightning's AsyncCheckpointIO pattern):
    save_checkpoint returns once the state is snapshotted into shardckpt's reused host buffers; encoding,
    writing and the atomic commit run on shardckpt's background thread. Same guarantees: a save first waits
    for the previous one to commit (its error raises there), and remove_checkpoint never deletes a
    checkpoint while a newer save is still uncommitted: the removal runs once that save committed (at the
    next save, load or teardown). Args as for ShardckptCheckpointIO."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._pending: AsyncSaveHandle | None = None
        self._deferred: list[str] = []

    def _settle(self) -> None:
        """Wait for the pending save (raising its error), then run the removals it held back."""
        handle, self._pending = self._pending, None
        if handle is not None:
            handle.wait()
        deferred, self._deferred = self._deferred, []
        for p in deferred:
            super().remove_checkpoint(p)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self._settle()
        plain, kw = self.prepare(checkpoint, storage_options, process_group=_solo_group())
        path = os.fspath(path)
        self._deferred = [p for p in self._deferred if p != path]
        self._pending = async_save(plain, path, **kw)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        self._settle()
        return super().load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path) -> None:
        if self._pending is not None and not self._pending.done():
            self._deferred.append(os.fspath(path))
            return
        self._settle()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        """End of fit/validate/test (Lightning calls it on every rank): the last save commits here."""
        self._settle()

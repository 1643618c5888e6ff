"""PyTorch Lightning 2.x sharded training (FSDP2 / tensor parallel): every rank saves its own shards through
shardckpt, and a resume reshards onto any number of processes.

    from shardckpt.integrations.lightning import last_checkpoint    # ckpt_path="last" misses URL dirpaths
    from shardckpt.integrations.lightning_sharded import ShardckptModelParallelStrategy
    trainer = Trainer(strategy=ShardckptModelParallelStrategy(), devices=8,
                      callbacks=[ModelCheckpoint(dirpath="s3://bucket/run", monitor="val_loss", save_top_k=2,
                                                 save_last=True)])
    trainer.fit(model, ckpt_path=last_checkpoint("s3://bucket/run"))  # on 8 processes, or 4, 16, ...

Lightning's ModelParallelStrategy never calls a CheckpointIO for its distributed checkpoints: its
save_checkpoint / load_checkpoint call torch.distributed.checkpoint on every rank, and pickle the rest of the
dict (meta.pt). This subclass replaces those two methods; everything else (device mesh, configure_model,
fully_shard / parallelize_module, the launcher) is Lightning's.

Who calls what, and when (Lightning's Trainer drives it):
  save_checkpoint    every rank (Trainer.save_checkpoint, ModelCheckpoint), with Lightning's checkpoint dict:
                     the model's and optimizers' sharded state dicts (DTensors, optimizer state keyed by
                     parameter name) and the rest (loops, callbacks, lr_schedulers, hyper_parameters, epoch,
                     global_step). One shardckpt.save over the whole job: each rank writes its own shards to
                     its own file, the coordinator commits one manifest; the path Lightning names becomes
                     that checkpoint's directory, replaced atomically where one is already (last.ckpt).
                     Values are mapped as ShardckptCheckpointIO maps them (integrations.lightning.to_plain).
  load_checkpoint    every rank, after setup (restore_checkpoint_after_setup): shardckpt.load fills the live
                     model's and optimizers' sharded state dicts in place, whatever layout and world size
                     saved them, and set_model_state_dict / set_optimizer_state_dict apply them; the rest of
                     the dict is returned to Lightning (loops, callbacks, schedulers), as the stock strategy
                     does. A path without a committed shardckpt manifest (a stock DCP directory with its
                     pickled meta.pt, a torch.save file) raises IncompleteCheckpointError naming it: nothing
                     is unpickled.
  remove_checkpoint  global rank 0 (ModelCheckpoint's top-k and save_last), through the strategy's
                     checkpoint_io, a ShardckptCheckpointIO: the manifest first.

Not covered: save_distributed_checkpoint=False (the full state gathered on rank 0; use the stock strategy
with plugins=[ShardckptCheckpointIO()] and save_last=False, see README) and Lightning's FSDPStrategy
(FSDP1): torch's FullyShardedDataParallel refuses CPU-only machines ("FSDP needs a non-CPU accelerator
device"), so no subclass for it is offered untested.
"""
from __future__ import annotations

import os
from typing import Any

try:  # the framework is imported here, never by the core
    from pytorch_lightning.strategies import ModelParallelStrategy
except ImportError:  # the unified `lightning` package
    from lightning.pytorch.strategies import ModelParallelStrategy

from shardckpt import api
from shardckpt.errors import IncompleteCheckpointError
from shardckpt.integrations.lightning import ShardckptCheckpointIO

# Lightning's keys whose values the strategy loads into the live objects instead of returning them
_LIVE = ("state_dict", "optimizer_states")


class ShardckptModelParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy whose distributed checkpoints are shardckpt checkpoints (see the module
    docstring for who calls what).

    Args:
        data_parallel_size, tensor_parallel_size, process_group_backend, timeout: as for
            ModelParallelStrategy (save_distributed_checkpoint is always True here).
        codec, frame_size, storage_options, timeout_s: as for ShardckptCheckpointIO (storage_options: fsspec
            options for URL paths).
    """

    def __init__(self, data_parallel_size: Any = "auto", tensor_parallel_size: Any = "auto", *,
                 codec: str = "auto", frame_size: int | None = None, storage_options: dict | None = None,
                 timeout_s: float | None = None, **kw):
        if not kw.pop("save_distributed_checkpoint", True):
            raise ValueError("ShardckptModelParallelStrategy saves distributed (sharded) checkpoints only; for "
                             "a full checkpoint on rank 0 use ModelParallelStrategy(save_distributed_checkpoint="
                             "False) with plugins=[ShardckptCheckpointIO()]")
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint=True, **kw)
        self.checkpoint_io = ShardckptCheckpointIO(codec=codec, frame_size=frame_size,
                                                   storage_options=storage_options, timeout_s=timeout_s)

    def _io(self) -> ShardckptCheckpointIO:
        io = self.checkpoint_io
        if not isinstance(io, ShardckptCheckpointIO):  # Trainer(plugins=[another CheckpointIO]) replaced it
            raise TypeError(f"{type(self).__name__} needs a ShardckptCheckpointIO as its checkpoint_io, "
                            f"not {type(io).__name__}")
        return io

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Every rank: save and commit `checkpoint` at rank 0's `filepath`, each rank its own shards."""
        path = os.fspath(self.broadcast(os.fspath(filepath)))  # rank 0 names the path, as Lightning does
        plain, kw = self._io().prepare(checkpoint, storage_options, process_group=None)
        api.save(plain, path, **kw)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Every rank, once the model and optimizers are set up: load the model's and optimizers' state into
        them (resharded to this job's layout) and return the rest of the checkpoint to Lightning."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)
        path = os.fspath(self.broadcast(os.fspath(checkpoint_path)))
        io = self._io()
        if not io.is_checkpoint(path):  # Lightning's own loader would unpickle its meta.pt: never here
            raise IncompleteCheckpointError(
                "no committed shardckpt checkpoint here (a stock DCP directory or torch.save file? load it with "
                "Lightning's own ModelParallelStrategy, or convert it: `shardckpt import SRC DST`)", file=path)
        assert self.model is not None and self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        # the live state dicts are the targets: shardckpt.load reshards into their DTensors in place (an
        # optimizer that has not stepped yet gets its state allocated by get_optimizer_state_dict)
        live = {"state_dict": get_model_state_dict(self.model),
                "optimizer_states": [get_optimizer_state_dict(self.model, opt) for opt in self.optimizers]}
        # Trainer.validate / test set up no optimizers: the saved optimizer states are then left unread
        keys = ["state_dict"] + [f"optimizer_states.{i}" for i in range(len(self.optimizers))]
        api.load(live, path, keys=keys, strict=strict, storage_options=io.storage_options)
        set_model_state_dict(self.model, live["state_dict"], options=StateDictOptions(strict=strict))
        for opt, state in zip(self.optimizers, live["optimizer_states"]):
            set_optimizer_state_dict(self.model, opt, state)
        return io.load_rest(path, without=_LIVE)

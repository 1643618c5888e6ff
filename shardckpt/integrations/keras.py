"""Keras 3 (PyTorch backend): ModelCheckpoint and BackupAndRestore that save through shardckpt.

    os.environ["KERAS_BACKEND"] = "torch"          # before importing keras
    from shardckpt.integrations.keras import BackupAndRestore, ModelCheckpoint, load_checkpoint
    model.fit(x, y, validation_data=..., epochs=10, callbacks=[
        ModelCheckpoint("ckpt/epoch-{epoch:02d}", monitor="val_loss", mode="min", save_best_only=True),
        BackupAndRestore("ckpt/backup")])          # a restarted fit() resumes at the next epoch
    info = load_checkpoint(model, "ckpt/epoch-07")  # load_weights-style; info["epoch"] = epochs done

Both are subclasses of Keras' own callbacks with Keras' names, defaults and decisions (when to save, what
counts as an improvement, mode="auto", save_freq="epoch" or every N batches, initial_value_threshold,
the {epoch}/{batch}/{metric} fields of filepath); only the writing and reading differ. A path names a
shardckpt checkpoint directory (or fsspec URL): no .keras/.weights.h5 suffix is required. Saved per
checkpoint: the model's variables (model.weights, in order) and, unless save_weights_only, the optimizer's
variables (iterations, slots); the manifest's user_metadata["keras"] records the epochs done, the batch,
the logs, and each variable's path. A path saved again (a constant filepath with save_best_only, or
BackupAndRestore's) is replaced atomically: the previous checkpoint stays loadable until the new manifest
is committed (so BackupAndRestore's double_checkpoint has nothing left to do and is accepted for
compatibility). Keras' ModelCheckpoint never deletes; BackupAndRestore(delete_checkpoint=True) retires its
checkpoint at the end of a successful fit through shardckpt.lifecycle.deleter. Variables are matched by position
(Keras' own weights files match by structure too), so any model built the same way loads a checkpoint; a
different architecture raises KeyMismatchError / ShapeMismatchError.

Who calls what: Keras calls the callbacks on the training thread, at the points Keras' own callbacks save.
Tested with the torch backend on CPU. Needs keras>=3 (pip install "shardckpt[keras]"); imported only here.
"""
from __future__ import annotations

import os

import keras
import numpy as np
import torch

from shardckpt.api import save
from shardckpt.lifecycle.deleter import parent_of, retire
from shardckpt.errors import KeyMismatchError
from shardckpt.format.records import MANIFEST_NAME
from shardckpt.format.metadata import read_manifest
from shardckpt.loading.load import load
from shardckpt.storage import storage_for

META_KEY = "keras"


def _tensor(v) -> torch.Tensor:
    """A Keras variable's value as a CPU torch tensor (no copy on the torch backend's CPU)."""
    if keras.backend.backend() == "torch":
        return v.value.detach().cpu()
    return torch.from_numpy(np.array(keras.ops.convert_to_numpy(v)))


def _optimizer(model, build: bool):
    opt = getattr(model, "optimizer", None)
    if opt is not None and build and not opt.built:
        opt.build(model.trainable_variables)
    return opt


def save_checkpoint(model, path, *, include_optimizer: bool = True, epoch: int | None = None,
                    batch: int | None = None, logs: dict | None = None, storage_options: dict | None = None):
    """Save `model`'s variables (and its optimizer's) to the shardckpt checkpoint `path`, replacing one
    that is there atomically. `epoch`: epochs completed (what fit(initial_epoch=) resumes from). Returns
    the Manifest."""
    state = {"model": {str(i): _tensor(v) for i, v in enumerate(model.weights)}}
    meta = {"epoch": epoch, "batch": batch, "weights": [v.path for v in model.weights], "optimizer": None,
            "logs": {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}}
    opt = _optimizer(model, build=False) if include_optimizer else None
    if opt is not None and opt.built:
        state["optimizer"] = {str(i): _tensor(v) for i, v in enumerate(opt.variables)}
        meta["optimizer"] = [v.path for v in opt.variables]
    storage = storage_for(path, storage_options)
    return save(state, storage, metadata={META_KEY: meta}, overwrite=storage.exists(MANIFEST_NAME))


def load_checkpoint(model, path, *, skip_optimizer: bool = False, storage_options: dict | None = None) -> dict:
    """Load a checkpoint saved by save_checkpoint / ModelCheckpoint / BackupAndRestore into `model`
    (load_weights-style; the optimizer is built first if it has not been and the checkpoint holds its
    variables). Returns user_metadata["keras"]: "epoch" (epochs completed: fit(initial_epoch=)), "batch",
    "logs". Raises KeyMismatchError when the variable counts differ, ShapeMismatchError when shapes do."""
    storage = storage_for(path, storage_options)
    meta = read_manifest(storage).user_metadata.get(META_KEY) or {}
    targets = {"model": model.weights}
    opt = None if skip_optimizer or not meta.get("optimizer") else _optimizer(model, build=True)
    if opt is not None:
        targets["optimizer"] = opt.variables
    for name, variables in targets.items():
        saved = meta.get("weights" if name == "model" else "optimizer") or []
        if len(saved) != len(variables):
            raise KeyMismatchError(f"the checkpoint holds {len(saved)} {name} variables, the model has "
                                   f"{len(variables)} (a different architecture or optimizer?)", key=name)
    state = {name: {str(i): torch.empty(tuple(v.shape), dtype=_tensor(v).dtype) for i, v in enumerate(vs)}
             for name, vs in targets.items()}
    load(state, storage, keys=list(state))
    for name, variables in targets.items():
        for i, v in enumerate(variables):
            v.assign(state[name][str(i)].numpy())
    return meta


def _is_number(v) -> bool:
    try:
        float(v)
        return np.ndim(v) == 0
    except (TypeError, ValueError):
        return False


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """keras.callbacks.ModelCheckpoint, saving shardckpt checkpoints: the same arguments and defaults
    (filepath, monitor="val_loss", verbose=0, save_best_only=False, save_weights_only=False, mode="auto",
    save_freq="epoch", initial_value_threshold=None), `filepath` a directory path or URL that may hold
    {epoch}, {batch} and log fields. save_weights_only=False saves the model's and the optimizer's
    variables (not the architecture: rebuild the model in code, then load_checkpoint)."""

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False, save_weights_only=False,
                 mode="auto", save_freq="epoch", initial_value_threshold=None, *,
                 storage_options: dict | None = None):
        # Keras checks its own file suffixes; hand it one and keep the caller's path
        super().__init__("x.weights.h5" if save_weights_only else "x.keras", monitor=monitor, verbose=verbose,
                         save_best_only=save_best_only, save_weights_only=save_weights_only, mode=mode,
                         save_freq=save_freq, initial_value_threshold=initial_value_threshold)
        self.filepath = os.fspath(filepath)
        self.storage_options = storage_options

    def _save_model(self, epoch, batch, logs):
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):  # Keras' decision (save_best_only, mode)
            save_checkpoint(self.model, filepath, include_optimizer=not self.save_weights_only,
                            epoch=epoch + 1 if batch is None else epoch, batch=batch, logs=logs,
                            storage_options=self.storage_options)
            if self.verbose > 0:
                print(f"\nEpoch {epoch + 1}: finished saving model to {filepath}")

    def _checkpoint_exists(self, filepath):
        return storage_for(filepath, self.storage_options).exists(MANIFEST_NAME)


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """keras.callbacks.BackupAndRestore through shardckpt: the same arguments and defaults (backup_dir,
    save_freq="epoch", double_checkpoint=False, delete_checkpoint=True). The backup is one checkpoint,
    backup_dir/latest, replaced atomically at every save (model and optimizer variables, epochs done); a
    fit() that finds it committed resumes at the next epoch, as Keras' does. At the end of a fit that
    completed, delete_checkpoint retires it (shardckpt.lifecycle.deleter) and removes backup_dir if it is then empty."""

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=False, delete_checkpoint=True, *,
                 storage_options: dict | None = None):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=double_checkpoint,
                         delete_checkpoint=delete_checkpoint)
        self.backup_dir = os.fspath(backup_dir)
        self.storage_options = storage_options
        self._latest = storage_for(self.backup_dir, storage_options).child("latest")

    def on_train_begin(self, logs=None):
        self._load_model()

    def _load_model(self):
        if not self.model.built:
            raise ValueError("To use the BackupAndRestore callback, your model must be built before you call "
                             "fit(): call it on a batch of data first")
        if self._latest.exists(MANIFEST_NAME):
            meta = load_checkpoint(self.model, self._latest)
            self.model._initial_epoch = int(meta.get("epoch") or 0)  # what Keras' own callback sets

    def _save_model(self):
        save_checkpoint(self.model, self._latest, include_optimizer=True, epoch=self._current_epoch,
                        batch=self._last_batch_seen)

    def on_train_end(self, logs=None):
        if not self.delete_checkpoint or not self._latest.exists(MANIFEST_NAME):
            return
        parent, name = parent_of(self._latest)
        retire(parent, name)
        if os.path.isdir(self.backup_dir) and not os.listdir(self.backup_dir):
            os.rmdir(self.backup_dir)  # Keras removes backup_dir; only when nothing is left in it

"""shardckpt: distributed sharded checkpointing for PyTorch.

    import shardckpt
    shardckpt.save(state_dict, "ckpt/step-100")          # every rank, in parallel; atomic commit
    shardckpt.load(state_dict, "ckpt/step-100")          # any world size / layout, in place
    full = shardckpt.load_full("ckpt/step-100")          # one process, full tensors
"""
from . import _ext
from .api import LoadResult, load, load_full, read_manifest, save
from .errors import (CheckpointError, CheckpointExistsError, ChecksumError, CoordinationError, CorruptDataError,
                     DtypeMismatchError, FormatError, IncompleteCheckpointError, KeyMismatchError,
                     PlanMismatchError, SaveError, ShapeMismatchError, StorageError, UnsupportedValueError,
                     UnsupportedVersionError)
from .format import FORMAT_VERSION, Manifest

backend: str = _ext.BACKEND
__version__ = "0.1.0"

__all__ = [
    "save", "load", "load_full", "read_manifest", "LoadResult", "Manifest", "FORMAT_VERSION", "backend",
    "CheckpointError", "CheckpointExistsError", "ChecksumError", "CoordinationError", "CorruptDataError",
    "DtypeMismatchError", "FormatError", "IncompleteCheckpointError", "KeyMismatchError", "PlanMismatchError",
    "SaveError", "ShapeMismatchError", "StorageError", "UnsupportedValueError", "UnsupportedVersionError",
]

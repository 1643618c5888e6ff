"""shardckpt: distributed sharded checkpointing for PyTorch.

    import shardckpt
    shardckpt.save(state_dict, "ckpt/step-100")          # every rank, in parallel; atomic commit
    shardckpt.load(state_dict, "ckpt/step-100")          # any world size / layout, in place
    full = shardckpt.load_full("ckpt/step-100")          # one process, full tensors
"""
from . import _ext
from .api import LoadResult, load, load_full, read_manifest, save
from .errors import (CheckpointError, CheckpointExistsError, ChecksumError, ConfigError, CoordinationError,
                     CorruptDataError, DtypeMismatchError, FormatError, IncompleteCheckpointError, KeyMismatchError,
                     MetricError, PlanMismatchError, SaveError, ShapeMismatchError, StorageError,
                     UnsupportedValueError, UnsupportedVersionError)
from .format import FORMAT_VERSION, Manifest

backend: str = _ext.BACKEND
__version__ = "0.1.0"

__all__ = [
    "save", "load", "load_full", "read_manifest", "LoadResult", "Manifest", "FORMAT_VERSION", "backend",
    "CheckpointError", "CheckpointExistsError", "ChecksumError", "ConfigError", "CoordinationError",
    "CorruptDataError", "DtypeMismatchError", "FormatError", "IncompleteCheckpointError", "KeyMismatchError",
    "MetricError", "PlanMismatchError",
    "SaveError", "ShapeMismatchError", "StorageError", "UnsupportedValueError", "UnsupportedVersionError",
]
from .async_save import AsyncSaveHandle, async_save, shutdown, warm_up  # noqa: E402
from .manager import CheckpointManager  # noqa: E402
from .state import (DataPosition, GradScalerState, ModelOptimizerState, ResumableSampler, RNGState,  # noqa: E402
                    SchedulerState, Stateful, load_training_state)

__all__ += ["async_save", "AsyncSaveHandle", "shutdown", "warm_up", "CheckpointManager", "Stateful", "ModelOptimizerState",
            "SchedulerState", "GradScalerState", "RNGState", "DataPosition", "ResumableSampler",
            "load_training_state"]
from .export import export_safetensors, export_torch, import_checkpoint  # noqa: E402

__all__ += ["export_safetensors", "export_torch", "import_checkpoint"]  # shardckpt.dcp: import it explicitly

"""shardckpt: distributed sharded checkpointing for PyTorch.

    import shardckpt
    shardckpt.save(state_dict, "ckpt/step-100")          # every rank, in parallel; atomic commit
    shardckpt.load(state_dict, "ckpt/step-100")          # any world size / layout, in place
    full = shardckpt.load_full("ckpt/step-100")          # one process, full tensors
"""
from shardckpt.native import kernels as _ext
from shardckpt.api import LoadResult, load, load_full, save
from shardckpt.format.metadata import read_manifest
from shardckpt.errors import (CheckpointError, CheckpointExistsError, ChecksumError, ConfigError, CoordinationError,
    CorruptDataError, DtypeMismatchError, FormatError, IncompleteCheckpointError, KeyMismatchError, MetricError,
    PlanMismatchError, SaveError, ShapeMismatchError, StorageError, UnsupportedValueError, UnsupportedVersionError)
from shardckpt.format.records import FORMAT_VERSION, Manifest

backend: str = _ext.BACKEND
__version__ = "0.1.0"

__all__ = [
    "save", "load", "load_full", "read_manifest", "LoadResult", "Manifest", "FORMAT_VERSION", "backend",
    "CheckpointError", "CheckpointExistsError", "ChecksumError", "ConfigError", "CoordinationError",
    "CorruptDataError", "DtypeMismatchError", "FormatError", "IncompleteCheckpointError", "KeyMismatchError",
    "MetricError", "PlanMismatchError",
    "SaveError", "ShapeMismatchError", "StorageError", "UnsupportedValueError", "UnsupportedVersionError",
]
from shardckpt.saving.async_save import AsyncSaveHandle, async_save, shutdown, warm_up  # noqa: E402
from shardckpt.manager.checkpoint_manager import CheckpointManager  # noqa: E402
from shardckpt.loading.state import (DataPosition, GradScalerState, ModelOptimizerState,  # noqa: E402
    ResumableSampler, RNGState, SchedulerState, Stateful, load_training_state)

__all__ += ["async_save", "AsyncSaveHandle", "shutdown", "warm_up", "CheckpointManager", "Stateful", "ModelOptimizerState",
            "SchedulerState", "GradScalerState", "RNGState", "DataPosition", "ResumableSampler",
            "load_training_state"]
from shardckpt.tools.export import export_safetensors, export_torch, import_checkpoint  # noqa: E402

__all__ += ["export_safetensors", "export_torch", "import_checkpoint"]  # shardckpt.dcp: import it explicitly

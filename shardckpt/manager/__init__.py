"""CheckpointManager (checkpoint_manager): when to save, what to keep (policy), what to tell callbacks
(events), what to restore (restoring). May import tiers and below.
`shardckpt.manager.CheckpointManager` and `shardckpt.manager.gc_uncommitted` are public paths."""
from shardckpt.manager.checkpoint_manager import (CheckpointManager, gc_uncommitted,  # noqa: F401
                                                  verify_checkpoint)
from shardckpt.manager.options import LocalTierOptions, Retention, SavePolicy  # noqa: F401
from shardckpt.lifecycle.deleter import DEFAULT_GC_GRACE_S  # noqa: F401
from shardckpt.lifecycle.layout import STEP_DIGITS, STEP_DIR, committed_steps, step_dir  # noqa: F401

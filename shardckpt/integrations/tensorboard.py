"""TensorBoard: one scalar per checkpoint measure, at the training step of each save.

    from shardckpt.integrations.tensorboard import TensorBoardCallback
    mgr = CheckpointManager(root, ..., callbacks=[TensorBoardCallback("runs/exp1")])

Scalars (under `prefix`, default "checkpoint/"): stall_s (training blocked), durable_s (save start to
commit), stored_gb (bytes this save wrote / 1e9), compression_ratio (raw / stored), the same under
local/ for saves of the node-local tier, and restore_s at a restore. Called on the CheckpointManager's event thread of the coordinator (shardckpt.manager.events); the event
file is flushed after each save and closed by CheckpointManager.close. Needs the `tensorboard` package
(pip install "shardckpt[tensorboard]"); imported only here.
"""
from __future__ import annotations

from torch.utils.tensorboard import SummaryWriter

from shardckpt.manager.events import CheckpointCallback, CheckpointEvent


class TensorBoardCallback(CheckpointCallback):
    """Writes checkpoint scalars to a TensorBoard log directory.

    Args:
        log_dir: the run's log directory (the one TensorBoard is pointed at); or pass `writer`.
        writer: an existing torch.utils.tensorboard.SummaryWriter to share with training's own scalars
            (then close() leaves it open).
        prefix: tag prefix.
    """

    def __init__(self, log_dir: str | None = None, *, writer: SummaryWriter | None = None,
                 prefix: str = "checkpoint/"):
        if (log_dir is None) == (writer is None):
            raise ValueError("pass exactly one of log_dir and writer")
        self._own = writer is None
        self.writer = writer or SummaryWriter(log_dir=log_dir)
        self.prefix = prefix

    def on_committed(self, e: CheckpointEvent) -> None:
        for name, v in e.save_scalars().items():
            self.writer.add_scalar(self.prefix + name, v, global_step=e.step)
        self.writer.flush()

    def on_restored(self, e: CheckpointEvent) -> None:
        self.writer.add_scalar(self.prefix + "restore_s", e.seconds, global_step=e.step)
        self.writer.flush()

    def close(self) -> None:
        if self._own:
            self.writer.close()
        else:
            self.writer.flush()

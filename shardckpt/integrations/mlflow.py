"""MLflow: checkpoint measures as metrics of the run, and each checkpoint's URI and step as tags, so the run
in the MLflow UI links to its checkpoints.

    import mlflow
    from shardckpt.integrations.mlflow import MLflowCallback
    with mlflow.start_run():
        mgr = CheckpointManager(root, ..., callbacks=[MLflowCallback()])

Per committed save, at its step: metrics checkpoint/stall_s, checkpoint/durable_s, checkpoint/stored_gb,
checkpoint/compression_ratio (checkpoint/local/... for saves of the node-local tier, which get no tags);
tags shardckpt.checkpoint_uri and shardckpt.checkpoint_step (the latest),
and shardckpt.checkpoint.<step> = URI for every save (a tag per checkpoint, removed again when retention
deletes that step). A restore logs checkpoint/restore_s and tags shardckpt.restored_from.

The run is fixed when the callback is made (the active run on the calling thread, or run_id=): events are
delivered on the manager's event thread, where MLflow's thread-local active run is not visible. Needs
mlflow (mlflow-skinny is enough; pip install "shardckpt[mlflow]"); imported only here.
"""
from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

from shardckpt.manager.events import CheckpointCallback, CheckpointEvent


class MLflowCallback(CheckpointCallback):
    """Logs checkpoint metrics and tags to one MLflow run.

    Args:
        run_id: the run to log to; default the active run (mlflow.start_run()) of the creating thread.
        tracking_uri: default mlflow.get_tracking_uri().
        prefix: metric name prefix.
    """

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None, prefix: str = "checkpoint/"):
        if run_id is None:
            run = mlflow.active_run()
            if run is None:
                raise ValueError("no active MLflow run: call mlflow.start_run() first or pass run_id=")
            run_id = run.info.run_id
        self.run_id, self.prefix = run_id, prefix
        self.client = MlflowClient(tracking_uri or mlflow.get_tracking_uri())

    def on_committed(self, e: CheckpointEvent) -> None:
        for name, v in e.save_scalars().items():
            self.client.log_metric(self.run_id, self.prefix + name, v, step=e.step)
        if e.tier == "local":  # a node-local path is no link to a checkpoint: tags name durable ones only
            return
        for key, value in (("shardckpt.checkpoint_uri", e.path), ("shardckpt.checkpoint_step", str(e.step)),
                           (f"shardckpt.checkpoint.{e.step}", e.path)):
            self.client.set_tag(self.run_id, key, value)

    def on_deleted(self, e: CheckpointEvent) -> None:
        if e.tier == "local":  # the durable checkpoint of that step, if any, is still there
            return
        try:
            self.client.delete_tag(self.run_id, f"shardckpt.checkpoint.{e.step}")
        except Exception:  # the tag may be gone already (a restarted job's older steps)
            pass

    def on_restored(self, e: CheckpointEvent) -> None:
        self.client.log_metric(self.run_id, self.prefix + "restore_s", float(e.seconds), step=e.step)
        self.client.set_tag(self.run_id, "shardckpt.restored_from", e.path)

"""Weights & Biases: checkpoint measures as W&B metrics, and each kept checkpoint as a reference artifact.

    import wandb
    from shardckpt.integrations.wandb import WandbCallback
    run = wandb.init(project="exp")
    mgr = CheckpointManager(root, ..., keep_last=3, keep_best=1, monitor="val_loss",
                            callbacks=[WandbCallback()])

Per committed save: the scalars of TensorBoardCallback and MLflowCallback (checkpoint/stall_s, durable_s,
stored_gb, compression_ratio; checkpoint/local/... for the node-local tier) against their own x-axis
checkpoint/step (wandb.define_metric), so they never fight training's own wandb.log steps; a restore logs
checkpoint/restore_s. Each durable checkpoint becomes one version of the artifact `artifact_name` (default
"<run id>-checkpoints", type "shardckpt-checkpoint") that only *references* the checkpoint's URI
(Artifact.add_reference with checksum=False: file:// for local paths, the URL itself for s3://, gs://, ...;
no byte is uploaded or read), with aliases "latest", "step-<N>", and "best" when it is the best kept
checkpoint by the monitored metric (the manager's monitor= and mode=, read from the checkpoint's manifest,
or monitor=/mode= here). Its metadata holds step, uri and metrics.

When retention deletes a checkpoint (a "deleted" event), an online run deletes that artifact version with its
aliases (Artifact.delete(delete_aliases=True)); an offline run cannot reach the server, so the deletion is
logged as checkpoint/deleted_step (at checkpoint/step = that step) and the version stays until someone
deletes it after `wandb sync`. Retention never deletes the latest checkpoint, nor the best with keep_best,
so "latest" and "best" never name a deleted checkpoint when the manager keeps the best.

Who calls what: the CheckpointManager's event thread on the coordinator (shardckpt.manager.events), one event at a
time. The run is fixed when the callback is made (wandb.run then, or run=). close() (CheckpointManager.close)
leaves the run open: finish it yourself. Needs wandb (pip install "shardckpt[wandb]"); imported only here.
"""
from __future__ import annotations

import logging
import os

import wandb

from shardckpt.format.metadata import read_manifest
from shardckpt.errors import IncompleteCheckpointError
from shardckpt.manager.events import CheckpointCallback, CheckpointEvent
from shardckpt.lifecycle.layout import committed_steps, step_dir
from shardckpt.manager.policy import metric_value, rank_steps
from shardckpt.storage import storage_for

log = logging.getLogger("shardckpt")


def reference_uri(path: str) -> str:
    """The URI a W&B reference artifact stores for a checkpoint path: URLs as they are, local paths as
    file:// URIs (absolute)."""
    if "://" in path:
        return path
    return "file://" + os.path.abspath(path)


class WandbCallback(CheckpointCallback):
    """Logs checkpoint measures to a W&B run and keeps one reference-artifact version per kept checkpoint.

    Args:
        run: the wandb Run to log to; default wandb.run (the run wandb.init started) when this is made.
        artifact_name: the artifact whose versions are the checkpoints; default "<run id>-checkpoints".
        artifact_type: the artifact's type.
        monitor, mode: the metric that decides the "best" alias; default the manager's (its manifests
            record monitor= and mode=). No monitor: no "best" alias.
        prefix: metric name prefix.
        storage_options: fsspec options to read the checkpoints' manifests (object stores).

    Raises:
        ValueError: no run given and none active.
    """

    def __init__(self, run=None, *, artifact_name: str | None = None, artifact_type: str = "shardckpt-checkpoint",
                 monitor: str | None = None, mode: str | None = None, prefix: str = "checkpoint/",
                 storage_options: dict | None = None):
        run = run if run is not None else wandb.run
        if run is None:
            raise ValueError("no active W&B run: call wandb.init() first or pass run=")
        if mode not in (None, "min", "max"):
            raise ValueError("mode must be 'min' or 'max'")
        self.run, self.prefix = run, prefix
        self.artifact_name = artifact_name or f"{run.id}-checkpoints"
        self.artifact_type = artifact_type
        self.monitor, self.mode = monitor, mode
        self.storage_options = storage_options
        self.versions: dict[int, object] = {}  # step -> the logged wandb Artifact (to delete it later)
        self._kept: dict[int, float | None] | None = None  # step -> monitored value, of the kept checkpoints
        run.define_metric(prefix + "step")
        run.define_metric(prefix + "*", step_metric=prefix + "step")

    # ------------------------------------------------------------------------------------------ events
    def on_committed(self, e: CheckpointEvent) -> None:
        self._log({**e.save_scalars()}, e.step)
        if e.tier == "local":  # a node-local path is no link to a checkpoint: artifacts name durable ones only
            return
        try:
            meta = read_manifest(e.path, storage_options=self.storage_options).user_metadata
        except (IncompleteCheckpointError, FileNotFoundError):
            # events arrive after the fact: retention may have deleted it already; only kept ones get a version
            log.info("W&B callback: step %s was deleted before its commit was reported; no artifact", e.step)
            return
        best = self._is_best(e, meta.get("monitor"))
        art = wandb.Artifact(self.artifact_name, type=self.artifact_type,
                             metadata={"step": e.step, "uri": e.path, "metrics": dict(e.metrics or {})})
        art.add_reference(reference_uri(e.path), name=os.path.basename(e.path.rstrip("/")), checksum=False)
        aliases = ["latest", f"step-{e.step}"] + (["best"] if best else [])
        self.versions[e.step] = self.run.log_artifact(art, aliases=aliases)

    def on_deleted(self, e: CheckpointEvent) -> None:
        if e.tier == "local":  # the durable checkpoint of that step, if any, is still there
            return
        if self._kept is not None:
            self._kept.pop(e.step, None)
        art = self.versions.pop(e.step, None)
        if art is None:  # logged by an earlier job (or never: deleted before its commit was reported)
            self._log({"deleted_step": float(e.step)}, e.step)
            return
        if self.run.offline:  # no server to delete the version on
            self._log({"deleted_step": float(e.step)}, e.step)
            return
        art.wait()
        art.delete(delete_aliases=True)

    def on_restored(self, e: CheckpointEvent) -> None:
        self._log({"restore_s": float(e.seconds)}, e.step)
        self.run.summary[self.prefix + "restored_from"] = e.path

    # -------------------------------------------------------------------------------------------- best
    def _is_best(self, e: CheckpointEvent, monitor) -> bool:
        """Whether the checkpoint just committed ranks first among the kept ones by the monitored metric
        (ties: the newer step, as retention ranks them). The first time, the checkpoints already under the
        root (a restarted job's) are read, so "best" does not move to a worse one after a restart."""
        try:
            if self.monitor is None and isinstance(monitor, dict):  # the manager's monitor= and mode=
                self.monitor, self.mode = monitor.get("metric"), self.mode or monitor.get("mode")
            if not self.monitor:
                return False
            if self._kept is None:
                self._kept = self._read_kept(e.path)
            self._kept[e.step] = metric_value(e.metrics, self.monitor)
        except Exception as err:  # unknown evidence: leave "best" where it is
            log.warning("W&B callback: the monitored metric of the checkpoints under %s cannot be read (%s); "
                        "no 'best' alias for step %s", e.path, err, e.step)
            return False
        ranked = rank_steps([(v, s) for s, v in self._kept.items() if v is not None], self.mode or "min")
        return bool(ranked) and ranked[0] == e.step

    def _read_kept(self, path: str) -> dict[int, float | None]:
        parent = storage_for(path.rstrip("/").rsplit("/", 1)[0], self.storage_options)  # the manager's root
        return {s: metric_value(read_manifest(parent.child(step_dir(s))).user_metadata.get("metrics"), self.monitor)
                for s in committed_steps(parent)}

    def _log(self, scalars: dict, step: int | None) -> None:
        if step is None:
            return
        self.run.log({self.prefix + "step": step, **{self.prefix + k: v for k, v in scalars.items()}})

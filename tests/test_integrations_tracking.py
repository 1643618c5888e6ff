"""TensorBoardCallback and MLflowCallback with the real libraries: the scalars a CheckpointManager's saves
produce are read back with TensorBoard's EventAccumulator and MLflow's client on a local file store."""
from __future__ import annotations

import os

import torch

from shardckpt import CheckpointManager


def _train(root, callbacks, steps=(10, 20, 30)):
    m = CheckpointManager(root, save_every_steps=10, keep_last=2, callbacks=callbacks, preemption_signals=())
    state = {"w": torch.zeros(256, 64)}
    for s in steps:
        state["w"].fill_(s)
        assert m.maybe_save(s, state, metrics={"loss": 1.0 / s})
    restored = m.restore({"w": torch.empty(256, 64)})
    m.close()
    return restored, m


def test_tensorboard_scalars_per_save(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from shardckpt.integrations.tensorboard import TensorBoardCallback
    restored, _ = _train(tmp_path / "ckpt", [TensorBoardCallback(str(tmp_path / "tb"))])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"checkpoint/stall_s", "checkpoint/durable_s", "checkpoint/stored_gb", "checkpoint/compression_ratio",
            "checkpoint/restore_s"} <= tags
    for tag in ("checkpoint/stall_s", "checkpoint/durable_s", "checkpoint/stored_gb"):
        ev = acc.Scalars(tag)
        assert [e.step for e in ev] == [10, 20, 30] and all(e.value > 0 for e in ev)
    ratio = acc.Scalars("checkpoint/compression_ratio")
    assert all(e.value > 10 for e in ratio)  # a constant-filled tensor compresses far below its 64 KiB
    durable = [e.value for e in acc.Scalars("checkpoint/durable_s")]
    stall = [e.value for e in acc.Scalars("checkpoint/stall_s")]
    assert all(d >= s for d, s in zip(durable, stall))
    assert [e.step for e in acc.Scalars("checkpoint/restore_s")] == [restored] == [30]


def test_tensorboard_keeps_local_tier_saves_apart(tmp_path):
    """With a node-local tier (every 5 steps, durable every 10 by promotion), local commits are their own
    series (checkpoint/local/...) and the promotion is the durable one; the restore comes from the local
    tier."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from shardckpt.integrations.tensorboard import TensorBoardCallback
    m = CheckpointManager(tmp_path / "ckpt", save_every_steps=10, local_root=str(tmp_path / "local"),
                          local_every_steps=5, callbacks=[TensorBoardCallback(str(tmp_path / "tb"))],
                          preemption_signals=())
    state = {"w": torch.zeros(256, 64)}
    for s in (5, 10, 15):
        state["w"].fill_(s)
        assert m.maybe_save(s, state)
    restored = {"w": torch.empty(256, 64)}
    assert m.restore(restored) == 15 and m.restored_tier == ("local", 15) and torch.equal(restored["w"], state["w"])
    m.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("checkpoint/local/stall_s")] == [5, 10, 15]
    assert [e.step for e in acc.Scalars("checkpoint/durable_s")] == [10]  # the promotion of local step 10
    local10 = next(e.value for e in acc.Scalars("checkpoint/local/durable_s") if e.step == 10)
    assert acc.Scalars("checkpoint/durable_s")[0].value >= local10  # to durable: after the local commit
    assert [e.step for e in acc.Scalars("checkpoint/restore_s")] == [15]


def test_mlflow_metrics_and_checkpoint_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store needs the opt-in
    import mlflow
    from mlflow.tracking import MlflowClient
    from shardckpt.integrations.mlflow import MLflowCallback
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            _, m = _train(tmp_path / "ckpt", [MLflowCallback()])
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    hist = client.get_metric_history(run.info.run_id, "checkpoint/durable_s")
    assert sorted(h.step for h in hist) == [10, 20, 30] and all(h.value > 0 for h in hist)
    assert [h.step for h in client.get_metric_history(run.info.run_id, "checkpoint/stored_gb")] == [10, 20, 30]
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["shardckpt.checkpoint_step"] == "30"
    assert tags["shardckpt.checkpoint_uri"].endswith("step-0000000030")
    # one tag per kept checkpoint: retention (keep_last=2) deleted step 10 and its tag
    assert "shardckpt.checkpoint.10" not in tags
    assert tags["shardckpt.checkpoint.20"].endswith("step-0000000020") and m.steps() == [20, 30]
    assert tags["shardckpt.restored_from"].endswith("step-0000000030")


def test_mlflow_tags_name_durable_checkpoints_only(tmp_path, monkeypatch):
    """Local-tier saves log checkpoint/local/... metrics and no tags; local retention deleting step 10's
    local copy leaves the tag of the durable step 10."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    from mlflow.tracking import MlflowClient
    from shardckpt.integrations.mlflow import MLflowCallback
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            m = CheckpointManager(tmp_path / "ckpt", save_every_steps=10, local_root=str(tmp_path / "local"),
                                  local_every_steps=5, local_keep_last=1, callbacks=[MLflowCallback()],
                                  preemption_signals=())
            state = {"w": torch.zeros(64, 64)}
            for s in (5, 10, 15):
                state["w"].fill_(s)
                m.maybe_save(s, state)
            m.close()
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    assert [h.step for h in client.get_metric_history(run.info.run_id, "checkpoint/local/stall_s")] == [5, 10, 15]
    assert [h.step for h in client.get_metric_history(run.info.run_id, "checkpoint/durable_s")] == [10]
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["shardckpt.checkpoint.10"].endswith("step-0000000010") and tags["shardckpt.checkpoint_step"] == "10"
    assert "shardckpt.checkpoint.5" not in tags and "shardckpt.checkpoint.15" not in tags
    assert sorted(os.listdir(tmp_path / "local")) == ["step-0000000015"]  # local step 10 was deleted

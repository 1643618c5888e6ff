"""WandbCallback with the real wandb, in offline mode: the run's records are read back from its .wandb file
with wandb's own reader (`wandb leet inspect --json`, wandb-core's record reader)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from shardckpt import CheckpointManager

wandb = pytest.importorskip("wandb")


def _records(run_dir) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _save(root, callback, steps_losses, **kw):
    m = CheckpointManager(root, save_every_steps=10, keep_last=1, keep_best=1, monitor="loss",
                          callbacks=[callback], preemption_signals=(), **kw)
    state = {"w": torch.zeros(256, 64)}
    for s, loss in steps_losses:
        state["w"].fill_(s)
        assert m.maybe_save(s, state, metrics={"loss": loss})
        m.wait()          # commit and retention of this step, then its events, before the next save:
        m.events.flush()  # the order a job that saves every few minutes sees
    restored = m.restore({"w": torch.empty(256, 64)})
    m.close()
    return m, restored


def test_wandb_scalars_and_reference_artifacts(tmp_path, monkeypatch):
    from shardckpt.integrations.wandb import WandbCallback
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tmp_path / "ckpt"
    run = wandb.init(project="shardckpt-test", mode="offline", dir=str(tmp_path))
    try:
        m, restored = _save(root, WandbCallback(), [(10, 0.5), (20, 0.1), (30, 0.3)])
        # a restarted job (a new manager and callback on the same root): step 20 is still the best
        m2, _ = _save(root, WandbCallback(run, artifact_name=f"{run.id}-checkpoints"), [(40, 0.2)])
    finally:
        run.finish()
    assert restored == 30 and m2.steps() == [20, 40]
    recs = _records(os.path.dirname(run.dir))  # run.dir is the run directory's files/

    hist = [r["history"]["item"] for r in recs if r["type"] == "history"]
    saves = [h for h in hist if "checkpoint/durable_s" in h]
    assert [h["checkpoint/step"] for h in saves] == [10, 20, 30, 40]
    for h in saves:
        assert h["checkpoint/stall_s"] > 0 and h["checkpoint/durable_s"] >= h["checkpoint/stall_s"]
        assert h["checkpoint/stored_gb"] > 0 and h["checkpoint/compression_ratio"] > 10
    assert [h["checkpoint/step"] for h in hist if "checkpoint/restore_s" in h] == [30, 40]
    # retention: keep_last=1 + keep_best=1 deleted 10 (at 20's commit) and 30 (at 40's); offline, so logged
    assert [h["checkpoint/deleted_step"] for h in hist if "checkpoint/deleted_step" in h] == [10, 30]
    metrics = [r["metric"] for r in recs if r["type"] == "metric"]
    assert {"glob_name": "checkpoint/*", "step_metric": "checkpoint/step"}.items() <= \
        {k: v for mm in metrics if mm.get("glob_name") for k, v in mm.items()}.items()

    arts = [r["artifact"] for r in recs if r["type"] == "artifact"]
    assert [json.loads(a["metadata"])["step"] for a in arts] == [10, 20, 30, 40]
    assert {a["name"] for a in arts} == {f"{run.id}-checkpoints"}
    assert all(a["type"] == "shardckpt-checkpoint" for a in arts)
    aliases = {json.loads(a["metadata"])["step"]: set(a["aliases"]) for a in arts}
    assert aliases == {10: {"latest", "step-10", "best"}, 20: {"latest", "step-20", "best"},
                       30: {"latest", "step-30"}, 40: {"latest", "step-40"}}
    for a in arts:  # references to the checkpoint's files, no bytes uploaded (and none read: path digests)
        step = json.loads(a["metadata"])["step"]
        uri = (root / f"step-{step:010d}").as_uri()
        entries = a["manifest"]["contents"]
        assert entries and all(e["ref"].startswith(uri + "/") for e in entries)
        assert any(e["ref"] == uri + "/manifest.json" for e in entries)
        assert not any(e.get("local_path") for e in entries)
    assert os.listdir(root) and sorted(p for p in os.listdir(root) if p.startswith("step-")) == \
        ["step-0000000020", "step-0000000040"]


def test_wandb_callback_needs_a_run(monkeypatch):
    from shardckpt.integrations.wandb import WandbCallback
    assert wandb.run is None
    with pytest.raises(ValueError, match="wandb.init"):
        WandbCallback()


def test_wandb_checkpoint_deleted_before_its_event_gets_no_version(tmp_path, monkeypatch):
    """Events are delivered after the fact: a checkpoint retention deleted before its committed event was
    delivered gets no artifact version, and its deletion is logged."""
    from shardckpt.manager.events import CheckpointEvent
    from shardckpt.integrations.wandb import WandbCallback
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="shardckpt-test", mode="offline", dir=str(tmp_path))
    try:
        cb = WandbCallback()
        gone = str(tmp_path / "ckpt" / "step-0000000010")  # never committed here: no manifest
        cb.on_event(CheckpointEvent("committed", 10, path=gone, stall_s=0.1, durable_s=0.2, tier="durable"))
        cb.on_event(CheckpointEvent("deleted", 10, path=gone, tier="durable"))
    finally:
        run.finish()
    recs = _records(os.path.dirname(run.dir))  # run.dir is the run directory's files/
    assert not [r for r in recs if r["type"] == "artifact"] and cb.versions == {}
    hist = [r["history"]["item"] for r in recs if r["type"] == "history"]
    assert [h["checkpoint/durable_s"] for h in hist if "checkpoint/durable_s" in h] == [0.2]
    assert [h["checkpoint/deleted_step"] for h in hist if "checkpoint/deleted_step" in h] == [10]

"""CheckpointManager's policies as pure functions and one small state object: which steps retention keeps,
whether a monitored metric improved (save_best_only, early stopping). No I/O and no process group here:
the manager reads the metrics from committed manifests, calls these on the coordinator and broadcasts the
decision, so every rank acts alike.

Equivalents elsewhere: keep_last ~ Lightning's ModelCheckpoint(save_top_k) by time; keep_best ~
ModelCheckpoint(monitor=, mode=, save_top_k=K); save_best_only ~ Keras' ModelCheckpoint(save_best_only=True)
(and Lightning's save_top_k=1); early_stopping_patience + min_delta ~ Keras' / Lightning's EarlyStopping
(patience=, min_delta=), counted in monitored saves rather than epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def json_metrics(metrics: dict | None) -> dict:
    """Metrics as JSON values for the manifest (tensors to Python numbers, ints to floats)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        out[str(k)] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return out


def metric_value(metrics: dict | None, name: str | None) -> float | None:
    """metrics[name] as a float, or None when absent, not a number, or nan (nan never competes)."""
    if not name or not metrics:
        return None
    v = metrics.get(name)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return None
    return float(v)


def metric_missing(metrics: dict | None, name: str) -> bool:
    """Whether metrics has no value for `name` that could be a number (absent, None, a string, a tensor of
    several elements). A nan is present: it is a value that never improves."""
    v = (metrics or {}).get(name)
    if isinstance(v, torch.Tensor):
        return v.numel() != 1
    return not isinstance(v, (int, float)) or isinstance(v, bool)


def recorded_monitor(record) -> tuple[str, str] | None:
    """(metric, mode) of a manifest's user_metadata["monitor"] as CheckpointManager records it, or None when
    it is absent or malformed. Who reads it: `shardckpt ls` (the best step) and restore(state, "best") of a
    manager created without monitor=, both from the newest committed step that has one."""
    if not isinstance(record, dict) or not isinstance(record.get("metric"), str):
        return None
    mode = record.get("mode", "min")
    return (record["metric"], mode) if mode in ("min", "max") else None


def rank_steps(scored: list[tuple[float, int]], mode: str) -> list[int]:
    """Steps of (metric, step) pairs, best first; ties: the newer step first."""
    sign = 1.0 if mode == "min" else -1.0
    return [s for _, s in sorted(scored, key=lambda ms: (sign * ms[0], -ms[1]))]


def steps_to_delete(steps: list[int], ranked: list[int], *, keep_last: int | None, keep_best: int | None,
                    keep_every_steps: int | None) -> list[int]:
    """Retention: the committed `steps` (ascending) not kept by any rule. Always kept: the latest step,
    the last keep_last, the best keep_best of `ranked`, and multiples of keep_every_steps. keep_last and
    keep_best both unset: keep everything."""
    if (keep_last is None and not keep_best) or not steps:
        return []
    keep = {steps[-1]}
    keep.update(steps[-keep_last:] if keep_last else [])
    if keep_best:
        keep.update(ranked[:keep_best])
    if keep_every_steps:
        keep.update(s for s in steps if s % keep_every_steps == 0)
    return [s for s in steps if s not in keep]


def improves(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether `value` beats `best` by more than min_delta (Keras' and Lightning's rule); any value beats
    no best."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass(frozen=True)
class Decision:
    """What the coordinator decided for one monitored save, broadcast to every rank."""
    save: bool      # write it (False: save_best_only and no improvement)
    improved: bool
    stop: bool      # early stopping: patience monitored saves in a row did not improve


@dataclass
class Monitor:
    """The best monitored value and the count of saves since it improved. The manager keeps one on every
    rank but only the coordinator's decides; its state() goes in each saved step's user_metadata
    ("policy"), so a job resumed from that step counts on from there."""
    mode: str
    min_delta: float = 0.0
    save_best_only: bool = False
    patience: int | None = None
    best: float | None = None
    wait: int = 0
    known: bool = False  # best/wait were read from storage or a restored step

    def decide(self, value: float | None) -> Decision:
        """Called by the coordinator before a save that has the metric's value (None: absent or nan). A
        save without the metric is written unless save_best_only, and does not count for patience."""
        if value is None:
            return Decision(save=not self.save_best_only, improved=False, stop=self.stopped)
        better = improves(value, self.best, self.mode, self.min_delta)
        wait = 0 if better else self.wait + 1
        return Decision(save=better or not self.save_best_only, improved=better,
                        stop=self.patience is not None and wait >= self.patience)

    def apply(self, value: float | None, d: Decision) -> None:
        """Every rank, after the decision's broadcast, with the coordinator's value (so all ranks agree)."""
        if value is None:
            return
        if d.improved:
            self.best, self.wait = value, 0
        else:
            self.wait += 1

    @property
    def stopped(self) -> bool:
        return self.patience is not None and self.wait >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load(self, state: dict | None, fallback_best: float | None = None) -> None:
        """A resumed job: the state saved with the restored step, else the best committed metric."""
        best, wait = fallback_best, 0
        if isinstance(state, dict):
            b, w = state.get("best"), state.get("wait")
            if b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)):
                best = None if b is None else float(b)
            if isinstance(w, int) and not isinstance(w, bool) and w >= 0:
                wait = w
        self.best, self.wait, self.known = best, wait, True

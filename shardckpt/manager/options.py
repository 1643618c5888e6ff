"""CheckpointManager's options in three frozen groups, each checked when it is made, so a mistake fails
where it is written:

    CheckpointManager("ckpt/", save_every_steps=500,
                      retention=Retention(keep_last=3, keep_best=1, monitor="val_loss"),
                      policy=SavePolicy(save_best_only=True, min_delta=1e-3),
                      local_tier=LocalTierOptions("/local_nvme/run1", every_steps=100))

The flat keywords (keep_last=, monitor=, save_best_only=, local_root=, ...) build the same objects
(from_keywords), so both spellings mean one thing; a group and its own keywords together are refused.
Who calls it: CheckpointManager.__init__ (every rank). No I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from shardckpt.errors import ConfigError


def _at_least_one(name: str, v: int | None) -> None:
    if v is not None and v < 1:
        raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True)
class Retention:
    """What retention keeps after each commit (shardckpt.manager.policy.steps_to_delete): the newest
    keep_last steps, the best keep_best by `monitor` ("min" or "max" is better), every multiple of
    keep_every_steps, and always the latest. keep_last and keep_best both None: everything is kept.
    `monitor` also ranks restore(state, "best") and drives SavePolicy."""
    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: str = "min"
    keep_every_steps: int | None = None

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'")
        if self.keep_best and not self.monitor:
            raise ValueError("keep_best needs monitor= (the metric to rank steps by)")
        _at_least_one("keep_last", self.keep_last)
        _at_least_one("keep_every_steps", self.keep_every_steps)
        if self.keep_best is not None and self.keep_best < 0:
            raise ValueError("keep_best must be >= 0")


@dataclass(frozen=True)
class SavePolicy:
    """Save decisions by the monitored metric (Retention.monitor): save_best_only skips a save that does
    not improve on the best committed value by more than min_delta (Keras' ModelCheckpoint); `should_stop`
    turns True once early_stopping_patience monitored saves in a row did not improve (EarlyStopping)."""
    save_best_only: bool = False
    min_delta: float = 0.0
    early_stopping_patience: int | None = None

    def __post_init__(self):
        if self.min_delta < 0:
            raise ValueError("min_delta must be >= 0")
        _at_least_one("early_stopping_patience", self.early_stopping_patience)

    @property
    def active(self) -> bool:
        return bool(self.save_best_only or self.early_stopping_patience)


@dataclass(frozen=True)
class LocalTierOptions:
    """The node-local tier (shardckpt.tiers; FORMAT.md §8): `root` is the same path on every node and
    names each node's own disk; a local save every `every_steps` steps, `keep_last` kept per node, each
    rank's files also held by `replicas` peers on the nodes `jump`, 2*jump, ... further on."""
    root: Any
    every_steps: int = 1
    keep_last: int | None = 2
    replicas: int = 1
    jump: int = 1

    def __post_init__(self):
        _at_least_one("local_every_steps", self.every_steps)
        _at_least_one("local_keep_last", self.keep_last)
        _at_least_one("local_jump", self.jump)
        if self.replicas < 0:
            raise ValueError("local_replicas must be >= 0")


# flat keyword -> (group, field): CheckpointManager's keywords that build each group
KEYWORDS = {
    "keep_last": ("retention", "keep_last"), "keep_best": ("retention", "keep_best"),
    "monitor": ("retention", "monitor"), "mode": ("retention", "mode"),
    "keep_every_steps": ("retention", "keep_every_steps"),
    "save_best_only": ("policy", "save_best_only"), "min_delta": ("policy", "min_delta"),
    "early_stopping_patience": ("policy", "early_stopping_patience"),
    "local_root": ("local_tier", "root"), "local_every_steps": ("local_tier", "every_steps"),
    "local_keep_last": ("local_tier", "keep_last"), "local_replicas": ("local_tier", "replicas"),
    "local_jump": ("local_tier", "jump"),
}
GROUPS = {"retention": Retention, "policy": SavePolicy, "local_tier": LocalTierOptions}
_DEFAULTS = {"local_root": None} | {k: next(f.default for f in fields(GROUPS[g]) if f.name == name)
                                    for k, (g, name) in KEYWORDS.items() if k != "local_root"}


def from_keywords(groups: dict[str, Any], keywords: dict[str, Any]) -> tuple[Retention, SavePolicy,
                                                                              LocalTierOptions | None]:
    """The three groups, from the ones given (None: not given) and the flat keywords. A keyword set to
    something other than its default beside its own group is refused (ConfigError naming it): one
    spelling per option."""
    built: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    given: dict[str, list[str]] = {g: [] for g in GROUPS}  # the keywords behind each group's fields
    for key, value in keywords.items():
        group, name = KEYWORDS[key]
        if value == _DEFAULTS[key]:
            continue
        if groups.get(group) is not None:
            raise ConfigError(f"{key}= and {group}= both given: pass {name} in the {GROUPS[group].__name__} "
                              f"only", name=key)
        built[group][name] = value
        given[group].append(key)
    retention = groups.get("retention") or Retention(**built["retention"])
    policy = groups.get("policy") or SavePolicy(**built["policy"])
    local = groups.get("local_tier")
    if local is None and "root" in built["local_tier"]:
        local = LocalTierOptions(**built["local_tier"])
    elif local is None and built["local_tier"]:
        raise ConfigError(f"{', '.join(given['local_tier'])} need local_root= (the node-local tier's directory)",
                          name=given["local_tier"][0])
    if policy.active and not retention.monitor:
        name = "save_best_only" if policy.save_best_only else "early_stopping_patience"
        raise ValueError(f"{name} needs monitor= (the metric to rank steps by)")
    return retention, policy, local

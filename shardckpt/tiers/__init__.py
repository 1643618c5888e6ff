"""The node-local tier: local saves with peer replicas and promotion (local_tier), streaming replicas
(replicas), restoring from surviving nodes (local_restore). May import loading and below."""
from shardckpt.tiers.local_tier import LocalTier  # noqa: F401

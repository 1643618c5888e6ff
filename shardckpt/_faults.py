"""Fault injection for tests: SHARDCKPT_FAULT="phase:rank[:action[:hit]]" makes the named rank die (action
"kill", the default: SIGKILL, no cleanup, no atexit) or stop responding ("hang": sleep for an hour) the
`hit`-th time (default 1) it reaches `phase` during a save. Never set in production; when the variable is
unset a fault point costs one environment lookup.

Phases, in save order (api.py and writer.py call fault_point at each):
  stage          after the go verdict, before this rank snapshots / picks its sources
  write          inside write_rank, after a batch of frames was handed to the writer (data file partial)
  before_commit  after this rank's data and index are durable, before the summary gather
  replicate      a node-local save (shardckpt.tiers): sizes exchanged, replicas about to be sent
  manifest       coordinator: every summary checked, manifest about to be committed;
                 other ranks: summary sent, waiting for the commit result
  committed      coordinator: manifest committed, result not yet broadcast
"""
from __future__ import annotations

import os
import signal
import time

PHASES = ("stage", "write", "before_commit", "manifest", "committed")
_hits: dict[str, int] = {}


def fault_point(phase: str, rank: int) -> None:
    """Called by every rank at each phase of a save. A no-op unless SHARDCKPT_FAULT names this phase+rank."""
    spec = os.environ.get("SHARDCKPT_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != phase or int(parts[1]) != rank:
        return
    action = parts[2] if len(parts) > 2 and parts[2] else "kill"
    hit = int(parts[3]) if len(parts) > 3 else 1
    _hits[phase] = _hits.get(phase, 0) + 1
    if _hits[phase] != hit:
        return
    if action == "hang":
        time.sleep(3600)
    else:
        os.kill(os.getpid(), signal.SIGKILL)

"""What is in a manager root and in one checkpoint, as plain data: list_steps (`shardckpt ls`) and
inspect_checkpoint (`shardckpt inspect`). Any single process may call them; they only read."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from shardckpt.loading.load import key_filter, read_chunks
from shardckpt.format.metadata import read_manifest
from shardckpt.errors import CheckpointError, IncompleteCheckpointError
from shardckpt.format.records import MANIFEST_NAME
from shardckpt.lifecycle.layout import STEP_DIR, existing_root
from shardckpt.manager.policy import recorded_monitor
from shardckpt.storage import Storage, storage_for
from shardckpt.format.tree import decode_value


@dataclass
class StepInfo:
    name: str
    state: str                     # "committed", "partial" (data files but no manifest), "retired" (no
                                   # manifest; data a committed step refers to, FORMAT.md §7) or "corrupt"
    step: int | None = None
    stored_bytes: int = 0          # bytes this step's save wrote (its own data and index files)
    ref_bytes: int = 0             # stored bytes of earlier steps it refers to instead of writing them
    raw_bytes: int = 0
    ratio: float | None = None
    created: float | None = None
    age_s: float | None = None
    metrics: dict = field(default_factory=dict)
    latest: bool = False
    best: bool = False
    monitor: dict | None = None    # {"metric", "mode"} a CheckpointManager recorded
    bases: list = field(default_factory=list)  # the directories its references point into


def _metrics_of(user: dict) -> dict:
    """Numbers a run recorded with a checkpoint: user_metadata["metrics"] when present, else its top-level
    numeric entries (except step)."""
    src = user.get("metrics") if isinstance(user.get("metrics"), dict) else user
    return {k: v for k, v in src.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def compression_ratio(raw: int, stored: int, ref_stored: int = 0) -> float | None:
    """raw / stored bytes, the bytes an incremental step refers to counted as stored (they hold its data as
    much as its own files do); None when nothing is stored. The one ratio `ls` and `inspect` show."""
    return raw / (stored + ref_stored) if stored + ref_stored else None


def _step_from_name(name: str) -> int | None:
    """The step of a manager's `step-<N>` directory name; None for any other name ("p2" is no step 2)."""
    m = STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def _step_info(storage: Storage, name: str, now: float) -> StepInfo | None:
    """One checkpoint directory's line; None when it holds neither a manifest nor data files (a file, or
    an unrelated directory)."""
    if not storage.exists(MANIFEST_NAME):
        if not storage.list_dir("data"):
            return None
        return StepInfo(name, "partial", _step_from_name(name),
                        stored_bytes=sum(storage.size(f) for f in storage.list_files("data")))
    try:
        m = read_manifest(storage)
    except IncompleteCheckpointError:
        return None  # deleted between the two calls (retention running beside us)
    except CheckpointError:
        return StepInfo(name, "corrupt", _step_from_name(name))
    stored = sum(f.data_size + f.index_size for f in m.files)
    step = m.user_metadata.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else _step_from_name(name)
    return StepInfo(name, "committed", step, stored, m.ref_stored_bytes, m.raw_bytes,
                    compression_ratio(m.raw_bytes, m.stored_bytes, m.ref_stored_bytes),
                    m.created, now - m.created, _metrics_of(m.user_metadata), monitor=m.user_metadata.get("monitor"),
                    bases=[b.dir for b in m.bases])


def list_steps(root, *, metric: str | None = None, mode: str | None = None, storage_options=None) -> list[StepInfo]:
    """Every checkpoint directly below `root` (committed, partial: data files but no manifest, or corrupt:
    a manifest that fails its checks), or `root` itself when it is one checkpoint. The best step is picked
    by `metric` (lowest unless mode="max"), or else by the monitor a CheckpointManager recorded in the
    newest manifest.

    Raises:
        IncompleteCheckpointError: `root` does not exist or is a file.
    """
    storage = storage_for(root, storage_options)
    now = time.time()
    if storage.exists(MANIFEST_NAME):  # a checkpoint, not a root of them: its own line
        out = [_step_info(storage, storage.url.rstrip("/").rsplit("/", 1)[-1], now)]
    else:
        storage, names = existing_root(storage)
        out = [s for s in (_step_info(storage.child(n), n, now) for n in names) if s is not None]
    committed = [s for s in out if s.state == "committed"]
    referred = {b for s in committed for b in s.bases}
    for s in out:
        if s.state == "partial" and s.name in referred:
            s.state = "retired"
    if committed:
        newest_first = sorted(committed, key=lambda s: (s.step if s.step is not None else -1, s.created or 0),
                              reverse=True)
        newest_first[0].latest = True
        # no --metric: the monitor of the newest step that recorded one (as restore(state, "best") does)
        rec = next((r for s in newest_first if (r := recorded_monitor(s.monitor)) is not None), None)
        if metric is None and rec is not None:
            metric, mode = rec[0], mode or rec[1]
        mode = mode or "min"
        scored = [s for s in committed if metric in s.metrics]
        if metric and scored:
            pick = min if mode == "min" else max
            pick(scored, key=lambda s: s.metrics[metric]).best = True
    out.sort(key=lambda s: (s.step is None, s.step if s.step is not None else 0, s.name))
    return out


def inspect_checkpoint(path, *, key=None, storage_options=None) -> dict:
    """Everything `shardckpt inspect` shows, as plain data: the manifest's facts, user metadata, and per
    selected key (names, globs or prefixes) its dtype, shape, chunks, raw and stored bytes, codecs,
    layout and ranks (tensors) or its value."""
    storage = storage_for(path, storage_options)
    m = read_manifest(storage)
    wanted = key_filter(key)
    chunks = read_chunks(storage, m, [])
    tensors = {}
    for k, t in m.tensors.items():
        if not wanted(k):
            continue
        cs = chunks[k]
        tensors[k] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "chunks": len(cs),
                      "raw_bytes": t.numel * t.itemsize,
                      "stored_bytes": sum(f.stored_len for c in cs for f in c.frames),
                      "ref_chunks": sum(1 for c in cs if c.base),
                      "codecs": sorted({c.codec for c in cs}), "layout": t.layout,
                      "ranks": sorted({c.rank for c in cs})}
    values = {k: decode_value(v) for k, v in m.values.items() if wanted(k)}
    user = dict(m.user_metadata)
    if isinstance(user.get("dcp"), dict):  # written by shardckpt.dcp.Writer: summarise DCP's record
        user["dcp"] = {"format": user["dcp"].get("format"), "dcp_version": user["dcp"].get("dcp_version")}
    return {"path": storage.url, "format_version": m.format_version, "save_id": m.save_id, "created": m.created,
            "world_size": m.world_size, "frame_size": m.frame_size, "backend": m.backend,
            "files": len(m.files), "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes,
            "ref_stored_bytes": m.ref_stored_bytes,
            "ratio": compression_ratio(m.raw_bytes, m.stored_bytes, m.ref_stored_bytes),
            "bases": [f"{b.dir}/data/{b.save_id}" for b in m.bases],
            "user_metadata": user, "tensors": tensors, "values": values}

"""The `shardckpt` command (also `python -m shardckpt`): ls, inspect, verify, diff, export, import, gc.

Every command takes local paths or fsspec URLs (s3://, gs://, memory://; --storage-options passes JSON
options to fsspec) and prints a human table, or one JSON document with --json. Exit codes: 0 ok, 1 a
finding (verify found a problem, diff found a difference), 2 an error (missing or unreadable checkpoint,
bad arguments). docs/CLI.md has examples.

Progress: anything that can run for more than a second (verify, diff, export) draws a one-line progress
bar on stderr once it has run for a second, and only when stderr is a terminal. It is a small built-in
printer (Progress below), not tqdm, so shardckpt needs no extra dependency.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import _ext
from .api import _key_filter, read_manifest
from .codec import CODEC_IDS, plane_size, threads
from .errors import CheckpointError, IncompleteCheckpointError
from .format import check_coverage, parse_index
from .storage import ReadRange, storage_for

# ------------------------------------------------------------------------------------------ helpers


class Progress:
    """A tiny progress bar: call it with the units just done. Draws on `stream` (stderr) only when that is a
    terminal and only once the task has run for `delay` seconds, at most 10 times a second."""

    def __init__(self, total: int, desc: str, *, unit: str = "B", stream=None, enabled: bool | None = None,
                 delay: float = 1.0):
        self.stream = stream or sys.stderr
        self.enabled = (self.stream.isatty() if enabled is None else enabled) and total > 0
        self.total, self.desc, self.unit, self.delay = total, desc, unit, delay
        self.done, self.start, self._last, self._drawn = 0, time.monotonic(), 0.0, False

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start >= self.delay and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / self.total)
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0
        bar = "#" * int(frac * 24)
        fmt = human_bytes if self.unit == "B" else str
        self.stream.write(f"\r{self.desc} [{bar:<24}] {frac * 100:5.1f}% {fmt(self.done)}/{fmt(self.total)} "
                          f"{fmt(int(rate))}/s eta {eta:4.0f}s ")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_age(seconds: float) -> str:
    for unit, s in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= s:
            return f"{seconds / s:.1f}{unit}"
    return f"{seconds:.0f}s"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.4g}"
    return str(x)


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, bytes):
        return f"<{len(o)} bytes>"
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=_json_default, allow_nan=True))


# ------------------------------------------------------------------------------------------ ls


@dataclass
class StepInfo:
    name: str
    state: str                     # "committed" or "partial"
    step: int | None = None
    stored_bytes: int = 0
    raw_bytes: int = 0
    ratio: float | None = None
    created: float | None = None
    age_s: float | None = None
    metrics: dict = field(default_factory=dict)
    latest: bool = False
    best: bool = False
    monitor: dict | None = None    # {"metric", "mode"} a CheckpointManager recorded


def _metrics_of(user: dict) -> dict:
    """Numbers a run recorded with a checkpoint: user_metadata["metrics"] when present, else its top-level
    numeric entries (except step)."""
    src = user.get("metrics") if isinstance(user.get("metrics"), dict) else user
    return {k: v for k, v in src.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def list_steps(root, *, metric: str | None = None, mode: str | None = None, storage_options=None) -> list[StepInfo]:
    """Every checkpoint directly below `root` (committed, or partial: data files but no manifest). The best
    step is picked by `metric` (lowest unless mode="max"), or else by the monitor a CheckpointManager
    recorded in the newest manifest."""
    storage = storage_for(root, storage_options)
    now = time.time()
    out = []
    for name in storage.list_dir(""):
        child = storage.child(name)
        try:
            m = read_manifest(child)
        except IncompleteCheckpointError:
            if not child.list_dir("data"):
                continue
            size = sum(child.size(f) for f in child.list_files("data"))
            out.append(StepInfo(name, "partial", _step_from_name(name), stored_bytes=size))
            continue
        except CheckpointError:
            out.append(StepInfo(name, "corrupt", _step_from_name(name)))
            continue
        stored = sum(f.data_size + f.index_size for f in m.files)
        step = m.user_metadata.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else _step_from_name(name)
        out.append(StepInfo(name, "committed", step, stored, m.raw_bytes,
                            (m.raw_bytes / stored) if stored else None, m.created, now - m.created,
                            _metrics_of(m.user_metadata), monitor=m.user_metadata.get("monitor")))
    committed = [s for s in out if s.state == "committed"]
    if committed:
        newest = max(committed, key=lambda s: (s.step if s.step is not None else -1, s.created or 0))
        newest.latest = True
        if metric is None and isinstance(newest.monitor, dict) and isinstance(newest.monitor.get("metric"), str):
            metric, mode = newest.monitor["metric"], mode or newest.monitor.get("mode")
        mode = mode or "min"
        scored = [s for s in committed if metric in s.metrics]
        if metric and scored:
            pick = min if mode == "min" else max
            pick(scored, key=lambda s: s.metrics[metric]).best = True
    out.sort(key=lambda s: (s.step is None, s.step if s.step is not None else 0, s.name))
    return out


def _step_from_name(name: str) -> int | None:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def cmd_ls(args) -> int:
    steps = list_steps(args.root, metric=args.metric, mode=args.mode, storage_options=args.storage_options)
    if args.json:
        _print_json([asdict(s) for s in steps])
        return 0
    if not steps:
        print(f"no checkpoints under {args.root}")
        return 0
    names = sorted({k for s in steps for k in s.metrics})[:6]
    rows = []
    for s in steps:
        tags = ",".join(t for t, on in (("latest", s.latest), ("best", s.best)) if on)
        rows.append([s.name, _fmt(s.step), s.state, human_bytes(s.stored_bytes),
                     f"{s.ratio:.2f}x" if s.ratio else "-", human_age(s.age_s) if s.age_s is not None else "-"]
                    + [_fmt(s.metrics.get(k)) for k in names] + [tags])
    print(_table(rows, ["NAME", "STEP", "STATE", "SIZE", "RATIO", "AGE"] + [n.upper() for n in names] + [""]))
    return 0


# ------------------------------------------------------------------------------------------ inspect


def inspect_checkpoint(path, *, key=None, storage_options=None) -> dict:
    """Everything `inspect` shows, as plain data."""
    from .api import read_chunks
    storage = storage_for(path, storage_options)
    m = read_manifest(storage)
    wanted = _key_filter(key)
    chunks = read_chunks(storage, m, [])
    tensors = {}
    for k, t in m.tensors.items():
        if not wanted(k):
            continue
        cs = chunks[k]
        tensors[k] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "chunks": len(cs),
                      "raw_bytes": t.numel * t.itemsize,
                      "stored_bytes": sum(f.stored_len for c in cs for f in c.frames),
                      "codecs": sorted({c.codec for c in cs}), "layout": t.layout,
                      "ranks": sorted({c.rank for c in cs})}
    from .tree import decode_value
    values = {k: decode_value(v) for k, v in m.values.items() if wanted(k)}
    user = dict(m.user_metadata)
    if isinstance(user.get("dcp"), dict):  # written by shardckpt.dcp.Writer: summarise DCP's record
        user["dcp"] = {"format": user["dcp"].get("format"), "dcp_version": user["dcp"].get("dcp_version")}
    return {"path": storage.url, "format_version": m.format_version, "save_id": m.save_id, "created": m.created,
            "world_size": m.world_size, "frame_size": m.frame_size, "backend": m.backend,
            "files": len(m.files), "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes,
            "user_metadata": user, "tensors": tensors, "values": values}


def _tree_lines(keys: list[str], leaf) -> list[str]:
    """An indented tree of dotted keys: shared prefixes printed once."""
    lines, prev = [], []
    for k in keys:
        parts = k.split(".")
        common = 0
        while common < min(len(prev), len(parts) - 1) and prev[common] == parts[common]:
            common += 1
        for depth in range(common, len(parts) - 1):
            lines.append("  " * depth + parts[depth] + "/")
        lines.append(("  " * (len(parts) - 1), parts[-1], leaf(k)))
        prev = parts[:-1]
    width = max((len(p) + len(n) for p, n, _ in (x for x in lines if isinstance(x, tuple))), default=0)
    return [x if isinstance(x, str) else (x[0] + x[1]).ljust(width + 2) + x[2] for x in lines]


def cmd_inspect(args) -> int:
    info = inspect_checkpoint(args.ckpt, key=args.key, storage_options=args.storage_options)
    if args.json:
        _print_json(info)
        return 0
    ratio = info["raw_bytes"] / info["stored_bytes"] if info["stored_bytes"] else 0
    print(f"checkpoint  {info['path']}\nformat      {info['format_version']}  save_id {info['save_id']}  "
          f"backend {info['backend']}\nsaved       {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['created']))}"
          f"  world_size {info['world_size']}  files {info['files']}  frame_size {human_bytes(info['frame_size'])}\n"
          f"size        {human_bytes(info['raw_bytes'])} raw -> {human_bytes(info['stored_bytes'])} stored "
          f"({ratio:.2f}x)")
    if info["user_metadata"]:
        print("metadata    " + json.dumps(info["user_metadata"], default=_json_default)[:2000])
    tensors, values = info["tensors"], info["values"]

    def leaf(k):
        if k in values:
            return f"= {values[k]!r:.80}"
        t = tensors[k]
        layout = "" if not t["layout"] else f"  mesh {t['layout'].get('mesh')} {','.join(t['layout'].get('placements', []))}"
        r = t["raw_bytes"] / t["stored_bytes"] if t["stored_bytes"] else 1.0
        return (f"{t['dtype']:<9} {str(t['shape']):<16} chunks {t['chunks']:<3} {human_bytes(t['raw_bytes']):>10} -> "
                f"{human_bytes(t['stored_bytes']):>10} ({r:.2f}x)  {'/'.join(c.split('/')[0] for c in t['codecs'])}"
                f"{layout}")
    keys = sorted(list(tensors) + list(values))
    print(f"keys        {len(tensors)} tensors, {len(values)} values")
    for line in _tree_lines(keys, leaf):
        print("  " + line)
    return 0


# ------------------------------------------------------------------------------------------ verify

VERIFY_BATCH = 64 << 20


@dataclass
class Problem:
    kind: str                  # manifest | index | missing_file | size | coverage | checksum | corrupt | io
    message: str
    key: str | None = None
    file: str | None = None
    rank: int | None = None
    offset: int | None = None  # byte offset in `file`
    frame: int | None = None   # frame number within the chunk


@dataclass
class VerifyReport:
    path: str
    ok: bool
    tensors: int = 0
    chunks: int = 0
    frames: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)


def verify_checkpoint(path, *, storage_options=None, workers: int | None = None, progress: bool | None = None
                      ) -> VerifyReport:
    """Check a checkpoint completely: the manifest, every index (crc32c, structure), data file sizes, that
    each tensor's chunks cover it exactly once, and every frame's crc32c and decodability (frames are read
    in batches of about VERIFY_BATCH bytes, in parallel). Collects every problem rather than stopping."""
    t0 = time.monotonic()
    storage = storage_for(path, storage_options)
    report = VerifyReport(storage.url, True)
    try:
        m = read_manifest(storage)
    except CheckpointError as e:
        report.problems.append(Problem("manifest", str(e), file=getattr(e, "file", None)))
        report.ok = False
        return report
    by_key: dict[str, list] = {k: [] for k in m.tensors}
    for entry in m.files:
        try:
            data = storage.read_file(entry.index)
            chunks = parse_index(data, entry, m)
        except FileNotFoundError:
            report.problems.append(Problem("missing_file", "index file is missing", file=entry.index,
                                           rank=entry.rank))
            continue
        except CheckpointError as e:
            report.problems.append(Problem("index", str(e), key=e.key, file=entry.index, rank=entry.rank))
            continue
        for c in chunks:
            by_key[c.key].append(c)
        try:
            size = storage.size(entry.data)
        except (FileNotFoundError, OSError, CheckpointError):
            report.problems.append(Problem("missing_file", "data file is missing", file=entry.data,
                                           rank=entry.rank))
            continue
        if size != entry.data_size:
            report.problems.append(Problem("size", f"data file is {size} bytes, the manifest says "
                                                   f"{entry.data_size}", file=entry.data, rank=entry.rank))
    for k, meta in m.tensors.items():
        try:
            check_coverage(meta, by_key[k])
        except CheckpointError as e:
            report.problems.append(Problem("coverage", str(e), key=k))
    bad_files = {p.file for p in report.problems if p.kind in ("missing_file", "size")}
    jobs = []  # (chunk, first frame, last frame): contiguous frames of one chunk, ~VERIFY_BATCH stored bytes
    for cs in by_key.values():
        for c in cs:
            report.chunks += 1
            if c.file in bad_files:
                continue
            start, acc = 0, 0
            for i, f in enumerate(c.frames):
                acc += f.stored_len
                if acc >= VERIFY_BATCH:
                    jobs.append((c, start, i + 1))
                    start, acc = i + 1, 0
            if start < len(c.frames):
                jobs.append((c, start, len(c.frames)))
    report.tensors = len(m.tensors)
    total = sum(f.stored_len for c, a, b in jobs for f in c.frames[a:b])
    bar = Progress(total, "verify", enabled=progress)
    workers = workers or min(8, max(2, threads()))
    per_job_threads = max(1, threads() // workers)

    def run(job):
        c, a, b = job
        frames = c.frames[a:b]
        start = frames[0].offset
        stored = frames[-1].offset + frames[-1].stored_len - start
        found = []
        src = np.empty(stored, dtype=np.uint8)
        try:
            storage.read_ranges(c.file, [ReadRange(start, stored, 0)], src)
        except (CheckpointError, OSError) as e:
            return [Problem("io", str(e), key=c.key, file=c.file, rank=c.rank, offset=start, frame=a)], stored, 0
        itemsize = plane_size(m.tensors[c.key].dtype)
        i = 0
        while i < len(frames):
            rest = frames[i:]
            table = [(f.offset - start, f.stored_len, f.raw_len, f.crc32c, f.encoded) for f in rest]
            raw = np.empty(sum(f.raw_len for f in rest), dtype=np.uint8)
            try:
                _ext.decode_frames(src, table, raw, itemsize, CODEC_IDS[c.codec], per_job_threads)
                break
            except _ext.FrameError as e:
                bad = rest[e.index]
                kind = "checksum" if e.reason == "checksum" else "corrupt"
                found.append(Problem(kind, f"frame {a + i + e.index} failed its {e.reason} check", key=c.key,
                                     file=c.file, rank=c.rank, offset=bad.offset, frame=a + i + e.index))
                i += e.index + 1
        return found, stored, len(frames)

    with ThreadPoolExecutor(workers, thread_name_prefix="shardckpt-verify") as pool:
        for found, nbytes, nframes in pool.map(run, jobs):
            report.problems += found
            report.bytes_checked += nbytes
            report.frames += nframes
            bar(nbytes)
    bar.close()
    report.ok = not report.problems
    report.seconds = time.monotonic() - t0
    return report


def cmd_verify(args) -> int:
    r = verify_checkpoint(args.ckpt, storage_options=args.storage_options, workers=args.workers)
    if args.json:
        _print_json(asdict(r))
    else:
        for p in r.problems:
            where = ", ".join(f"{k}={v}" for k, v in (("key", p.key), ("file", p.file), ("rank", p.rank),
                                                      ("offset", p.offset), ("frame", p.frame)) if v is not None)
            print(f"PROBLEM {p.kind}: {p.message}" + (f" [{where}]" if where else ""))
        status = "OK" if r.ok else f"FAILED ({len(r.problems)} problem{'s' if len(r.problems) != 1 else ''})"
        rate = r.bytes_checked / r.seconds / 2**20 if r.seconds else 0
        print(f"{status}: {r.tensors} tensors, {r.chunks} chunks, {r.frames} frames, "
              f"{human_bytes(r.bytes_checked)} checked in {r.seconds:.2f}s ({rate:.0f} MiB/s)")
    return 0 if r.ok else 1


# ------------------------------------------------------------------------------------------ diff

DIFF_PIECE_BYTES = 8 << 20


@dataclass
class TensorDiff:
    key: str
    status: str                 # same | changed | added | removed | shape | dtype
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: list | None = None
    shape_b: list | None = None
    max_abs: float | None = None
    rel_l2: float | None = None     # ||b - a|| / ||a||
    cosine: float | None = None
    identical: bool = False         # bit-identical bytes


def _diff_tensor(ra, rb, key: str, budget: int) -> TensorDiff:
    from .export import piece_boxes
    ma, mb = ra.manifest.tensors[key], rb.manifest.tensors[key]
    d = TensorDiff(key, "same", str(ma.dtype).replace("torch.", ""), str(mb.dtype).replace("torch.", ""),
                   list(ma.shape), list(mb.shape))
    if ma.shape != mb.shape:
        d.status = "shape"
        return d
    max_abs, ss_d, ss_a, ss_b, dot, identical = 0.0, 0.0, 0.0, 0.0, 0.0, ma.dtype == mb.dtype
    with ThreadPoolExecutor(2) as pool:
        for off, size in piece_boxes(ma.shape, max(ma.itemsize, mb.itemsize), budget):
            fa, fb = pool.submit(ra.read, key, off, size), pool.submit(rb.read, key, off, size)
            a, b = fa.result(), fb.result()
            if identical and not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
                identical = False
            a64, b64 = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
            if a64.numel():
                diff = b64 - a64
                max_abs = max(max_abs, float(diff.abs().max()))
                ss_d += float(diff.dot(diff))
                ss_a += float(a64.dot(a64))
                ss_b += float(b64.dot(b64))
                dot += float(a64.dot(b64))
    if identical:
        d.identical, d.max_abs, d.rel_l2, d.cosine = True, 0.0, 0.0, 1.0
    else:
        d.max_abs = max_abs
        d.rel_l2 = math.sqrt(ss_d) / math.sqrt(ss_a) if ss_a > 0 else (0.0 if ss_d == 0 else math.inf)
        na, nb = math.sqrt(ss_a), math.sqrt(ss_b)
        d.cosine = dot / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        changed = not (max_abs == 0 and ss_d == 0) or math.isnan(max_abs)
        d.status = "dtype" if ma.dtype != mb.dtype else ("changed" if changed else "same")
    return d


def diff_checkpoints(a, b, *, key=None, storage_options=None, budget: int = DIFF_PIECE_BYTES,
                     progress: bool | None = None) -> dict:
    """Compare two checkpoints key by key. Tensors of equal shape are streamed in matching row-batch boxes of
    about `budget` bytes from both sides (memory stays bounded whatever their size); each yields max |b-a|,
    ||b-a||/||a|| and cos(a, b) accumulated in float64. Plain values compare by equality."""
    from .export import CheckpointReader
    ra = CheckpointReader(a, storage_options=storage_options)
    rb = CheckpointReader(b, storage_options=storage_options)
    wanted = _key_filter(key)
    ka = {k for k in ra.manifest.keys() if wanted(k)}
    kb = {k for k in rb.manifest.keys() if wanted(k)}
    out: list[TensorDiff] = []
    common_tensors = sorted(k for k in ka & kb if k in ra.manifest.tensors and k in rb.manifest.tensors)
    total = sum(ra.manifest.tensors[k].numel * ra.manifest.tensors[k].itemsize for k in common_tensors)
    bar = Progress(total, "diff", enabled=progress)
    for k in sorted(ka - kb):
        out.append(TensorDiff(k, "removed"))
    for k in sorted(kb - ka):
        out.append(TensorDiff(k, "added"))
    for k in common_tensors:
        out.append(_diff_tensor(ra, rb, k, budget))
        bar(ra.manifest.tensors[k].numel * ra.manifest.tensors[k].itemsize)
    bar.close()
    for k in sorted((ka & kb) - set(common_tensors)):
        if (k in ra.manifest.tensors) != (k in rb.manifest.tensors):
            out.append(TensorDiff(k, "changed"))
        else:
            same = ra.manifest.values[k] == rb.manifest.values[k]
            out.append(TensorDiff(k, "same" if same else "changed", identical=same))
    summary = {s: sum(1 for d in out if d.status == s) for s in ("same", "changed", "added", "removed", "shape",
                                                                 "dtype")}
    return {"a": ra.storage.url, "b": rb.storage.url, "summary": summary, "entries": out}


_SORTS = {"key": (lambda d: d.key, False), "max_abs": (lambda d: -1 if d.max_abs is None else d.max_abs, True),
          "rel_l2": (lambda d: -1 if d.rel_l2 is None else d.rel_l2, True),
          "cosine": (lambda d: 2 if d.cosine is None else d.cosine, False), "status": (lambda d: d.status, False)}


def cmd_diff(args) -> int:
    res = diff_checkpoints(args.a, args.b, key=args.key, storage_options=args.storage_options)
    entries = res["entries"]
    if args.changed:
        entries = [d for d in entries if d.status != "same"]
    if args.min_rel_l2 is not None:
        entries = [d for d in entries if d.rel_l2 is None or d.rel_l2 >= args.min_rel_l2]
    sort_key, rev = _SORTS[args.sort]
    entries = sorted(entries, key=lambda d: (_nan_last(sort_key(d)), d.key), reverse=rev)
    if args.top:
        entries = entries[:args.top]
    differs = any(v for s, v in res["summary"].items() if s != "same")
    if args.json:
        _print_json({**res, "entries": [asdict(d) for d in entries], "identical": not differs})
        return 1 if differs else 0
    rows = [[d.key, d.status, _fmt(d.max_abs), _fmt(d.rel_l2), _fmt(d.cosine),
             "-" if d.dtype_a is None else f"{d.dtype_a}{'' if d.dtype_a == d.dtype_b else ' -> ' + str(d.dtype_b)}",
             "-" if d.shape_a is None else str(d.shape_a) + ("" if d.shape_a == d.shape_b else f" -> {d.shape_b}")]
            for d in entries]
    if rows:
        print(_table(rows, ["KEY", "STATUS", "MAX_ABS", "REL_L2", "COSINE", "DTYPE", "SHAPE"]))
    print(", ".join(f"{v} {k}" for k, v in res["summary"].items() if v) or "no keys")
    return 1 if differs else 0


def _nan_last(v):
    if isinstance(v, float) and math.isnan(v):
        return math.inf
    return v


# ------------------------------------------------------------------------------------------ export / import / gc


def cmd_export(args) -> int:
    from .export import CheckpointReader, _selected, export_safetensors, export_torch, parse_dtype
    rename = dict(r.split("=", 1) for r in args.rename) if args.rename else None
    src = CheckpointReader(args.ckpt, storage_options=args.storage_options)
    dtype = parse_dtype(args.dtype)
    total = sum(src.manifest.tensors[k].numel * (dtype.itemsize if dtype is not None and
                                                  src.manifest.tensors[k].dtype.is_floating_point
                                                  else src.manifest.tensors[k].itemsize)
                for k, _ in _selected(src.manifest, args.keys, rename))
    bar = Progress(total, "export")
    if args.format == "safetensors":
        res = export_safetensors(args.ckpt, args.out, keys=args.keys, dtype=dtype, rename=rename,
                                 max_shard_size=args.max_shard_size, storage_options=args.storage_options,
                                 out_storage_options=args.storage_options, progress=bar)
    else:
        res = export_torch(args.ckpt, args.out, keys=args.keys, dtype=dtype, rename=rename,
                           storage_options=args.storage_options, out_storage_options=args.storage_options,
                           progress=bar)
    bar.close()
    if args.json:
        _print_json(asdict(res))
    else:
        print(f"exported {res.tensors} tensors ({human_bytes(res.bytes)}) to {args.out}: {', '.join(res.files)}")
    return 0


def cmd_import(args) -> int:
    from .export import detect_source, import_checkpoint
    kind = args.kind or detect_source(args.src)
    t0 = time.monotonic()
    m = import_checkpoint(args.src, args.dst, kind=kind, codec=args.codec, storage_options=args.storage_options)
    secs = time.monotonic() - t0
    if args.json:
        _print_json({"src": args.src, "dst": args.dst, "kind": kind, "tensors": len(m.tensors),
                     "values": len(m.values), "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes,
                     "seconds": secs})
    else:
        print(f"imported {kind} checkpoint {args.src} -> {args.dst}: {len(m.tensors)} tensors, "
              f"{len(m.values)} values, {human_bytes(m.raw_bytes)} raw -> {human_bytes(m.stored_bytes)} stored "
              f"in {secs:.1f}s")
    return 0


def cmd_gc(args) -> int:
    try:
        from .manager import gc_uncommitted
    except ImportError as e:
        print(f"error: shardckpt.manager.gc_uncommitted is not available ({e})", file=sys.stderr)
        return 2
    res = gc_uncommitted(args.root, dry_run=not args.delete, grace_s=args.grace_s)
    if args.json:
        _print_json(res if not hasattr(res, "__dataclass_fields__") else asdict(res))
        return 0
    items = res if isinstance(res, (list, tuple)) else getattr(res, "removed", None) or \
        (res.get("removed") if isinstance(res, dict) else None) or []
    verb = "would remove" if not args.delete else "removed"
    for it in items:
        print(f"{verb} {it}")
    print(f"{verb} {len(items)} uncommitted leftover(s)" +
          ("" if args.delete else " (dry run: pass --delete to remove them)"))
    return 0


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardckpt", description="Inspect, verify, compare and convert shardckpt checkpoints. Paths may be "
        "local or fsspec URLs. Long operations draw a built-in progress bar on stderr when it is a terminal "
        "(no tqdm needed).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    common.add_argument("--storage-options", type=json.loads, default=None, metavar="JSON",
                        help='fsspec options for URLs, e.g. \'{"anon": true}\'')
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ls", parents=[common], help="steps under a root: committed/partial, size, ratio, metrics")
    s.add_argument("root")
    s.add_argument("--metric", help="metric that picks the best step (default: the monitor a "
                                    "CheckpointManager recorded)")
    s.add_argument("--mode", choices=["min", "max"], default=None,
                   help="best = lowest (min, the default) or highest (max)")
    s.set_defaults(fn=cmd_ls)

    s = sub.add_parser("inspect", parents=[common], help="tree of keys with dtype, shape, chunks, bytes, codec")
    s.add_argument("ckpt")
    s.add_argument("--key", action="append", help="only keys matching (name, glob or prefix; repeatable)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("verify", parents=[common], help="check every frame's crc32c and exact chunk coverage")
    s.add_argument("ckpt")
    s.add_argument("--workers", type=int, default=None, help="parallel readers (default: min(8, CPUs))")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("diff", parents=[common], help="compare two checkpoints tensor by tensor (streamed)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--key", action="append", help="only keys matching (name, glob or prefix; repeatable)")
    s.add_argument("--sort", choices=sorted(_SORTS), default="key")
    s.add_argument("--changed", action="store_true", help="hide keys that are the same")
    s.add_argument("--min-rel-l2", type=float, default=None, help="hide tensors whose rel_l2 is below this")
    s.add_argument("--top", type=int, default=None, help="show only the first N rows after sorting")
    s.set_defaults(fn=cmd_diff)

    s = sub.add_parser("export", parents=[common], help="write safetensors (HF sharded) or a torch.save file")
    s.add_argument("ckpt")
    s.add_argument("out", help="directory (safetensors) or file (torch)")
    s.add_argument("--format", choices=["safetensors", "torch"], default="safetensors")
    s.add_argument("--dtype", default=None, help="convert floating tensors: bf16, fp16, fp32, fp64")
    s.add_argument("--keys", action="append", help="only keys matching (name, glob or prefix; repeatable)")
    s.add_argument("--rename", action="append", metavar="OLD=NEW",
                   help="rename a key prefix, e.g. model.= (strip 'model.'); repeatable")
    s.add_argument("--max-shard-size", default=None, help="e.g. 5GB (safetensors; default one file)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("import", parents=[common], help="from a DCP directory, torch.save file or safetensors")
    s.add_argument("src", help="local DCP directory, torch.save file, .safetensors file or HF folder")
    s.add_argument("dst", help="new shardckpt checkpoint (path or URL)")
    s.add_argument("--kind", choices=["dcp", "torch", "safetensors"], default=None, help="default: detected")
    s.add_argument("--codec", default="auto", help="auto, zstd, zstd-byteplane or raw")
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("gc", parents=[common], help="remove uncommitted leftovers (dry run by default)")
    s.add_argument("root")
    s.add_argument("--delete", action="store_true", help="really delete (default: only list)")
    s.add_argument("--grace-s", type=float, default=3600.0,
                   help="leave leftovers younger than this alone (a save may still be running)")
    s.set_defaults(fn=cmd_gc)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `shardckpt` command (also `python -m shardckpt`): ls, inspect, verify, diff, export, import, gc.

Every command takes local paths or fsspec URLs (s3://, gs://, memory://; --storage-options passes JSON
options to fsspec) and prints a human table, or one JSON document with --json. Exit codes: 0 ok, 1 a
finding (verify found a problem, diff found a difference), 2 an error (missing or unreadable checkpoint
or root, a destination that holds an earlier export, bad arguments). docs/CLI.md has examples.

This module only parses arguments and prints; the work is library code any process may call:
shardckpt.tools.inspection (ls, inspect), shardckpt.loading.verify, shardckpt.tools.diff, shardckpt.tools.export and
shardckpt.tools.importers, shardckpt.manager (gc). The names tests and docs import from here are re-exported.

Progress: anything that can run for more than a second (verify, diff, export) draws a one-line progress
bar on stderr once it has run for a second, and only when stderr is a terminal (shardckpt.progress: a small
built-in printer, not tqdm, so shardckpt needs no extra dependency).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict

import torch

from shardckpt.tools.diff import DIFF_PIECE_BYTES, TensorDiff, diff_checkpoints  # noqa: F401  (re-exported)
from shardckpt.errors import CheckpointError, ConfigError
from shardckpt.tools.export import (export_safetensors,  # noqa: F401  (re-exported: docs/CLI.md names them here)
    export_torch)
from shardckpt.lifecycle.deleter import gc_uncommitted  # noqa: F401  (re-exported)
from shardckpt.tools.importers import import_checkpoint  # noqa: F401  (re-exported)
from shardckpt.tools.inspection import StepInfo, inspect_checkpoint, list_steps  # noqa: F401  (re-exported)
from shardckpt.progress import Progress, human_bytes
from shardckpt.loading.verify import VERIFY_BATCH, Problem, VerifyReport, verify_checkpoint  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------ helpers


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


def cmd_ls(args) -> int:
    tiers = [(args.root, args.storage_options)] + [(d, None) for d in args.local or ()]
    listed = [list_steps(root, metric=args.metric, mode=args.mode, storage_options=opts) for root, opts in tiers]
    if args.json:  # with --local: {"durable": [...], "local": {dir: [...]}} (a node-local tier, shardckpt.tiers)
        out = [asdict(s) for s in listed[0]]
        if args.local:
            out = {"durable": out, "local": {d: [asdict(s) for s in st] for (d, _), st in zip(tiers[1:], listed[1:])}}
        _print_json(out)
        return 0
    for i, ((root, _), steps) in enumerate(zip(tiers, listed)):
        if args.local:
            print(("durable tier " if i == 0 else "\nlocal tier ") + str(root))
        _ls_table(root, steps, args.metric)
    return 0


def _ls_table(root, steps, metric: str | None = None) -> None:
    if not steps:
        print(f"no checkpoints under {root}")
        return
    # --metric NAME: that column only (it picks `best`); else the recorded metrics, up to six
    names = [metric] if metric else sorted({k for s in steps for k in s.metrics})[:6]
    rows = []
    for s in steps:
        tags = ",".join(t for t, on in (("latest", s.latest), ("best", s.best)) if on)
        rows.append([s.name, _fmt(s.step), s.state, human_bytes(s.stored_bytes),
                     human_bytes(s.ref_bytes) if s.ref_bytes else "-", f"{s.ratio:.2f}x" if s.ratio else "-", human_age(s.age_s) if s.age_s is not None else "-"]
                    + [_fmt(s.metrics.get(k)) for k in names] + [tags])
    print(_table(rows, ["NAME", "STEP", "STATE", "SIZE", "REFERS", "RATIO", "AGE"] + [n.upper() for n in names] + [""]))


# ------------------------------------------------------------------------------------------ inspect


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
    ratio = info["ratio"] or 0  # referred bytes count as stored, as in `ls`
    print(f"checkpoint  {info['path']}\nformat      {info['format_version']}  save_id {info['save_id']}  "
          f"backend {info['backend']}\nsaved       {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['created']))}"
          f"  world_size {info['world_size']}  files {info['files']}  frame_size {human_bytes(info['frame_size'])}\n"
          f"size        {human_bytes(info['raw_bytes'])} raw -> {human_bytes(info['stored_bytes'])} stored"
          + (f" + {human_bytes(info['ref_stored_bytes'])} referred" if info["ref_stored_bytes"] else "")
          + f" ({ratio:.2f}x)")
    if info["bases"]:  # an incremental checkpoint (FORMAT.md §7)
        print(f"refers to   {human_bytes(info['ref_stored_bytes'])} stored in {', '.join(info['bases'])}")
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

def cmd_verify(args) -> int:
    # no committed checkpoint at the path raises (exit 2): there is nothing to verify, which is not a finding
    r = verify_checkpoint(args.ckpt, storage_options=args.storage_options, workers=args.workers)
    if args.json:
        _print_json(asdict(r))
    else:
        for p in r.problems:
            where = p.where()
            print(f"PROBLEM {p.kind}: {p.message}" + (f" [{where}]" if where else ""))
        status = "OK" if r.ok else f"FAILED ({len(r.problems)} problem{'s' if len(r.problems) != 1 else ''})"
        rate = f" ({human_bytes(r.bytes_checked / r.seconds)}/s)" if r.seconds > 0 and r.bytes_checked else ""
        print(f"{status}: {r.tensors} tensors, {r.chunks} chunks, {r.frames} frames, "
              f"{human_bytes(r.bytes_checked)} checked in {r.seconds:.2f}s{rate}")
    return 0 if r.ok else 1


# ------------------------------------------------------------------------------------------ diff

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
    from shardckpt.tools.export import CheckpointReader, selected_keys, export_safetensors, export_torch, parse_dtype
    # --overwrite replaces an earlier export; without it one is refused (CheckpointExistsError, exit 2)
    bad = [r for r in args.rename or () if "=" not in r]
    if bad:
        raise ConfigError(f"--rename {bad[0]!r} is not OLD=NEW (e.g. --rename model.= strips 'model.')",
                          name="--rename")
    rename = dict(r.split("=", 1) for r in args.rename) if args.rename else None
    src = CheckpointReader(args.ckpt, storage_options=args.storage_options)
    dtype = parse_dtype(args.dtype)
    total = sum(src.manifest.tensors[k].numel * (dtype.itemsize if dtype is not None and
                                                  src.manifest.tensors[k].dtype.is_floating_point
                                                  else src.manifest.tensors[k].itemsize)
                for k, _ in selected_keys(src.manifest, args.keys, rename))
    bar = Progress(total, "export")
    if args.format == "safetensors":
        res = export_safetensors(args.ckpt, args.out, keys=args.keys, dtype=dtype, rename=rename,
                                 max_shard_size=args.max_shard_size, storage_options=args.storage_options,
                                 out_storage_options=args.storage_options, progress=bar,
                                 overwrite=args.overwrite)
    else:
        res = export_torch(args.ckpt, args.out, keys=args.keys, dtype=dtype, rename=rename,
                           storage_options=args.storage_options, out_storage_options=args.storage_options,
                           progress=bar, overwrite=args.overwrite)
    bar.close()
    if args.json:
        _print_json(asdict(res))
    else:
        print(f"exported {res.tensors} tensors ({human_bytes(res.bytes)}) to {args.out}: {', '.join(res.files)}")
        if res.removed:
            print(f"removed {len(res.removed)} file(s) of the earlier export: {', '.join(res.removed)}")
        if res.skipped:
            shown = ", ".join(res.skipped[:20]) + (", ..." if len(res.skipped) > 20 else "")
            print(f"left out {len(res.skipped)} non-tensor value(s) (safetensors holds tensors only; "
                  f"--format torch keeps them): {shown}")
    return 0


def cmd_import(args) -> int:
    from shardckpt.tools.export import detect_source, import_checkpoint
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
    from shardckpt.lifecycle.layout import existing_root
    storage, _ = existing_root(args.root, storage_options=args.storage_options)  # a mistyped root: exit 2
    res = gc_uncommitted(storage, dry_run=not args.delete, grace_s=args.grace_s)
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
    s.add_argument("--local", action="append", metavar="LOCAL_ROOT",
                   help="also list a node-local tier's directory on this node (repeatable; shardckpt.tiers)")
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
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (only its model*.safetensors files and index)")
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
    except BrokenPipeError:  # `shardckpt ls | head`: an OSError, but not an error
        return 0
    except (CheckpointError, OSError, ValueError) as e:  # the input is wrong: one line, never a traceback
        text = " ".join(str(e).split("\n"))
        print(f"error: {type(e).__name__}: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The docs cannot rot: every ```python block in README.md and docs/**/*.md runs here, on CPU, in one process.

How blocks run:
- Each block runs on its own, with a fresh namespace, in a fresh temporary working directory (so relative
  paths such as "ckpt/step-100" land there), with no process group. A block must therefore define what it
  uses (a tiny model, optimizer and state) and run in a few seconds.
- A block right after the marker `<!-- docs-test: continue -->` (the marker on the line before the fence,
  blank lines allowed between) runs after the previous python block of the same file, in the same
  namespace and directory: one test runs the chain, and a failure names the block that raised.
- A block right after `<!-- docs-test: skip (WHY; tests/test_x.py runs it) -->` is not run: it needs more
  than one process can give (torchrun with several ranks, a real S3 endpoint, 8 devices). The reason must
  name an existing test file that covers the behaviour instead; that is checked.
- Shell blocks (```bash, ```console, plain ```) are not run; every `shardckpt SUBCOMMAND` they show must be
  a subcommand of `shardckpt.cli.build_parser()`, and every `python -m bench.X` / `python scripts/X.py` /
  `tests/X.py` they or the prose name must exist.
- Module paths named in the prose (`shardckpt/loading/verify.py`, `shardckpt.manager.events.X`) must exist,
  so a move of a module fails here until the docs follow it.
A failure names the file and the line its block starts at.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import sys
import time

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # the Keras integration runs on the torch backend only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                 recursive=True))
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(skip|continue)\b\s*(.*?)\s*-->\s*$")


class Block:
    def __init__(self, path, line, lang, code, marker, reason):
        self.path, self.line, self.lang, self.code = path, line, lang, code
        self.marker, self.reason = marker, reason

    @property
    def where(self) -> str:
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


def _blocks(path: str) -> list[Block]:
    lines = open(path, encoding="utf-8").read().split("\n")
    out, i, marker, reason = [], 0, None, ""
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m:
            marker, reason = m.group(1), m.group(2)
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f:
            start, lang, body = i + 1, f.group(1), []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(Block(path, start, lang, "\n".join(body) + "\n", marker, reason))
            marker, reason = None, ""
        elif lines[i].strip():
            marker, reason = None, ""    # a marker applies only to the fence right after it
        i += 1
    return out


ALL = [b for p in DOC_FILES for b in _blocks(p)]
PY = [b for b in ALL if b.lang == "python"]


def _chains() -> list[list[Block]]:
    chains: list[list[Block]] = []
    for b in PY:
        if b.marker == "skip":
            continue
        if b.marker == "continue":
            assert chains and chains[-1][0].path == b.path, f"{b.where}: 'continue' with no python block before it"
            chains[-1].append(b)
        else:
            chains.append([b])
    return chains


CHAINS = _chains()


def test_docs_have_python_blocks():
    assert len(PY) >= 10, [b.where for b in PY]


@pytest.mark.parametrize("chain", CHAINS, ids=[c[0].where for c in CHAINS])
def test_python_block_runs(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith("SHARDCKPT_") and var != "SHARDCKPT_BACKEND":
            monkeypatch.delenv(var)
    ns = {"__name__": "__docs__"}
    environ = dict(os.environ)          # a block may set variables (SHARDCKPT_*, MLFLOW_*): undone after it
    try:
        _run(chain, ns)
    finally:
        import shardckpt
        shardckpt.shutdown()            # no background save of one test outlives it
        os.environ.clear()
        os.environ.update(environ)


def _run(chain, ns):
    for b in chain:
        t0 = time.monotonic()
        try:
            exec(compile(b.code, b.where, "exec"), ns)
        except BaseException as e:  # noqa: BLE001 - a SystemExit in a block is a failure too
            pytest.fail(f"the python block at {b.where} raised {type(e).__name__}: {e}", pytrace=True)
        assert time.monotonic() - t0 < 30, f"the python block at {b.where} took {time.monotonic() - t0:.1f} s"


def test_skipped_blocks_name_the_test_that_covers_them():
    for b in PY:
        if b.marker == "skip":
            named = re.findall(r"tests/test_\w+\.py", b.reason)
            assert named, f"{b.where}: a skipped block must name the test that covers it: {b.reason!r}"
            for t in named:
                assert os.path.exists(os.path.join(ROOT, t)), f"{b.where}: {t} does not exist"


def test_shell_blocks_name_real_subcommands():
    from shardckpt.cli import build_parser
    import argparse
    parser = build_parser()
    subs = set()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            subs |= set(a.choices)
    assert subs, "build_parser() has no subcommands"
    checked = 0
    for b in ALL:
        if b.lang == "python":
            continue
        for line in b.code.split("\n"):
            m = re.match(r"^\s*(?:\$\s*)?shardckpt\s+([a-z][\w-]*)", line)
            if m:
                checked += 1
                assert m.group(1) in subs, f"{b.where}: `shardckpt {m.group(1)}` is not a subcommand ({sorted(subs)})"
    assert checked, "no `shardckpt SUBCOMMAND` line found in any shell block (docs/CLI.md has them)"


def _text(path: str) -> str:
    return open(path, encoding="utf-8").read()


def test_named_files_and_commands_exist():
    for path in DOC_FILES:
        text, rel = _text(path), os.path.relpath(path, ROOT)
        for mod in set(re.findall(r"python3? -m (bench\.\w+)", text)):
            assert os.path.exists(os.path.join(ROOT, *mod.split(".")) + ".py"), f"{rel}: no module {mod}"
        for f in set(re.findall(r"\b((?:tests|scripts|bench|launch|csrc|docs)/[\w./-]*\w)(?!<)", text)):
            if f.startswith("bench/results"):       # written by the benchmarks
                continue
            assert os.path.exists(os.path.join(ROOT, f)), f"{rel}: names {f}, which does not exist"
        for link in set(re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)):
            target = os.path.normpath(os.path.join(os.path.dirname(path), link))
            assert os.path.exists(target), f"{rel}: links to {link}, which does not exist"


NOT_MODULES = {"shardckpt.checkpoint_uri", "shardckpt.checkpoint_step", "shardckpt.checkpoint"}  # MLflow tags


def test_named_modules_exist():
    for path in DOC_FILES:
        text, rel = _text(path), os.path.relpath(path, ROOT)
        for f in set(re.findall(r"\bshardckpt/[\w./]*\w", text)):
            assert os.path.exists(os.path.join(ROOT, f)), f"{rel}: names {f}, which does not exist"
        for dotted in set(re.findall(r"\bshardckpt(?:\.[A-Za-z_]\w*)+", text)) - NOT_MODULES:
            parts = dotted.split(".")
            for n in range(len(parts), 0, -1):      # the longest prefix that imports, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:n]))
                except ImportError:
                    continue
                for attr in parts[n:]:
                    assert hasattr(obj, attr), f"{rel}: names {dotted}, which does not exist"
                    obj = getattr(obj, attr)
                break

"""Run PyTorch's own DCP test files with FileSystemWriter / FileSystemReader replaced by shardckpt.dcp.Writer /
Reader, beside a stock run of the same files, and print which tests pass in each and both pass counts.

    python scripts/dcp_torch_tests.py [--tests DIR | --fetch-to DIR] [--files a.py,e2e/b.py] [--json OUT]

Where the test files come from: without --tests, the files of the installed torch's release are fetched from
GitHub (raw.githubusercontent.com/pytorch/pytorch/v<torch version>/test/distributed/checkpoint/<file>) into
--fetch-to (default: a temporary directory), once; a file already there is not fetched again. --ref names
another tag or commit (for a nightly or a source build). With --tests DIR, DIR holds them already (a checkout
of the pytorch/pytorch repository at the tag of the installed torch, or single files downloaded from it),
and nothing is fetched. The repository never holds these files.

The default files are the DCP tests of the issue that asked for this script; files whose tests need a GPU
skip them on a CPU-only machine (those count as skipped in both runs, not as passes). PyTorch's test
utilities import `expecttest` (not a shardckpt dependency): `pip install expecttest`, or put a
`pip install --target` copy of it on PYTHONPATH, before running. --shardckpt-root runs the shardckpt run
against another copy of the package (e.g. an older commit exported with `git archive`), to measure
before/after.

How the swap works: a sitecustomize.py written to a temporary directory on PYTHONPATH (so it also runs in the
processes MultiProcessTestCase spawns) rebinds the names FileSystemWriter / FileSystemReader in every
torch.distributed.checkpoint module that imported them, dcp.save(checkpoint_id=...)'s default detection
included, to thin subclasses of shardckpt's Writer / Reader that accept FileSystemWriter's constructor
arguments (thread_count, sync_files, ... have no meaning for shardckpt and are ignored; `overwrite` is
passed on). Each run is one pytest process per file with a junit report; the table lists every test case,
and the last line says how many tests pass with stock DCP and how many of those pass with shardckpt's
(every one of them must; the exit status is 1 when one does not).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

DEFAULT_FILES = ("test_file_system_checkpoint_cpu.py", "test_file_system_checkpoint.py", "test_dtensor_resharding.py",
                 "test_dtensor_checkpoint.py", "test_list_stored_state_dict.py", "e2e/test_e2e_save_and_load.py",
                 "test_format_utils.py", "test_dcp_to_torch_save.py", "test_compatibility.py",
                 "test_tp_checkpoint.py", "test_fsdp_optim_state.py")
RAW_URL = "https://raw.githubusercontent.com/pytorch/pytorch/{ref}/test/distributed/checkpoint/{name}"


def torch_ref() -> str:
    """The pytorch/pytorch tag of the installed torch ("v2.13.0" for 2.13.0+cpu)."""
    import torch
    return "v" + torch.__version__.split("+")[0]


def fetch(names, dest: str, ref: str, timeout: float = 60.0) -> list[str]:
    """Download each test file of `ref` into dest (keeping e2e/ subpaths); files already there are kept.
    Returns the names that could not be fetched (each with its reason printed)."""
    import urllib.error
    import urllib.request
    missing = []
    for name in names:
        path = os.path.join(dest, name)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        url = RAW_URL.format(ref=ref, name=name)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data = r.read()
        except (urllib.error.URLError, OSError) as e:
            print(f"could not fetch {url}: {e}", file=sys.stderr)
            missing.append(name)
            continue
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
    return missing

SHIM = r'''
import os, sys
if os.environ.get("SHARDCKPT_DCP_SHIM") == "1":
    root = os.environ.get("SHARDCKPT_SHIM_ROOT")
    if root:  # a copy of the package wins over the editable install's finder
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                            and "editable" not in repr(f).lower()]
        sys.path.insert(0, root)
    import inspect
    import torch.distributed.checkpoint as _dcp
    import shardckpt.dcp as _sdcp
    _takes_overwrite = "overwrite" in inspect.signature(_sdcp.Writer.__init__).parameters

    class FileSystemWriter(_sdcp.Writer):
        def __init__(self, path, *args, overwrite=True, **kwargs):
            if _takes_overwrite:
                super().__init__(path, overwrite=overwrite)
            else:
                super().__init__(path)

    class FileSystemReader(_sdcp.Reader):
        def __init__(self, path, *args, **kwargs):
            super().__init__(path)

    import importlib
    for _name in ("torch.distributed.checkpoint", "torch.distributed.checkpoint.filesystem",
                  "torch.distributed.checkpoint._storage_utils", "torch.distributed.checkpoint.format_utils"):
        try:
            _m = importlib.import_module(_name)
        except Exception:
            continue
        if hasattr(_m, "FileSystemWriter"):
            _m.FileSystemWriter = FileSystemWriter
        if hasattr(_m, "FileSystemReader"):
            _m.FileSystemReader = FileSystemReader
    os.environ["SHARDCKPT_SHIM_ACTIVE"] = _sdcp.__file__
'''


def _env(shim_dir: str, shardckpt: bool, root: str | None) -> dict[str, str]:
    """The environment of a test process: the shim on PYTHONPATH, switched on or off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = shim_dir + os.pathsep + env.get("PYTHONPATH", "")
    env["SHARDCKPT_DCP_SHIM"] = "1" if shardckpt else "0"
    if root:
        env["SHARDCKPT_SHIM_ROOT"] = root
    return env


def check_shim(shim_dir: str, root: str | None) -> None:
    """Before any shardckpt run: one process with the shardckpt runs' environment must have shardckpt's
    classes in place of DCP's. Otherwise (shardckpt fails to import there) the sitecustomize error is only
    printed and every "shardckpt" run would silently be a second stock run: exit with the reason instead."""
    code = ("import os, torch.distributed.checkpoint as d; "
            "assert os.environ.get('SHARDCKPT_SHIM_ACTIVE'), 'the shim did not load'; "
            "assert d.FileSystemWriter.__module__ == 'sitecustomize', d.FileSystemWriter")
    done = subprocess.run([sys.executable, "-c", code], env=_env(shim_dir, True, root), capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit("the shardckpt shim is not active in the test processes, so their results would be stock "
                 "DCP's:\n" + (done.stderr or done.stdout)[-2000:])


def run_file(path: str, shim_dir: str, shardckpt: bool, root: str | None, timeout: int) -> dict[str, str]:
    """One pytest process over one test file; returns {test id: "passed" | "failed" | "skipped"}."""
    env = _env(shim_dir, shardckpt, root)
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, f"--junitxml={report}"]
        try:
            subprocess.run(cmd, env=env, cwd=os.path.dirname(path), timeout=timeout,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {f"{os.path.basename(path)}::TIMEOUT": "failed"}
        if not os.path.exists(report):
            return {f"{os.path.basename(path)}::NO-REPORT": "failed"}
        out = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{os.path.basename(path)}::{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            tags = {child.tag for child in case}
            out[name] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", default=None, help="directory holding PyTorch's DCP test files (nothing fetched)")
    ap.add_argument("--fetch-to", default=None, help="where fetched files go (default: a temporary directory)")
    ap.add_argument("--ref", default=None, help="pytorch/pytorch tag or commit to fetch (default: v<torch version>)")
    ap.add_argument("--files", default=",".join(DEFAULT_FILES))
    ap.add_argument("--shardckpt-root", default=None, help="directory holding another copy of shardckpt/")
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    files = [f for f in args.files.split(",") if f]
    tests = args.tests
    if tests is None:
        tests = args.fetch_to or tempfile.mkdtemp(prefix="dcp-tests-")
        missing = fetch(files, tests, args.ref or torch_ref())
        if missing:
            sys.exit(f"could not fetch {missing}; pass --tests DIR with the files (or --ref for another tag)")
    shim_dir = tempfile.mkdtemp(prefix="dcp-shim-")
    with open(os.path.join(shim_dir, "sitecustomize.py"), "w") as f:
        f.write(SHIM)
    check_shim(shim_dir, args.shardckpt_root)
    results: dict[str, dict[str, str]] = {"stock": {}, "shardckpt": {}}
    for name in files:
        path = os.path.abspath(os.path.join(tests, name))
        if not args.skip_stock:
            results["stock"].update(run_file(path, shim_dir, False, None, args.timeout))
        results["shardckpt"].update(run_file(path, shim_dir, True, args.shardckpt_root, args.timeout))
    names = sorted(set(results["stock"]) | set(results["shardckpt"]))
    for n in names:
        print(f"{results['stock'].get(n, '-'):8} {results['shardckpt'].get(n, '-'):8} {n}")
    stock_pass = {n for n, r in results["stock"].items() if r == "passed"}
    ours = {n for n, r in results["shardckpt"].items() if r == "passed"}
    counts = {run: {k: sum(1 for r in results[run].values() if r == k) for k in ("passed", "failed", "skipped")}
              for run in results}
    print(f"stock DCP: {counts['stock']['passed']} passed, {counts['stock']['failed']} failed, "
          f"{counts['stock']['skipped']} skipped; shardckpt.dcp: {counts['shardckpt']['passed']} passed, "
          f"{counts['shardckpt']['failed']} failed, {counts['shardckpt']['skipped']} skipped; of the "
          f"{len(stock_pass)} that pass with stock DCP, {len(ours & stock_pass)} pass with shardckpt's "
          f"(failing: {sorted(stock_pass - ours) or 'none'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    if stock_pass - ours:
        sys.exit(1)


if __name__ == "__main__":
    main()

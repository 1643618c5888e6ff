"""The `shardckpt` command: ls, inspect, verify (catches a flipped byte, names key/file/offset), diff
(zero against itself, reports a perturbation, bounded memory), gc, --json, fsspec URLs, progress printer."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

import shardckpt
from shardckpt.tools import cli


def _state(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"layers": {"0": {"w": torch.randn(300, 700, generator=g) * scale,
                                       "b": torch.randn(700, generator=g)}},
                      "emb": torch.randn(64, 16, generator=g).to(torch.bfloat16),
                      "ids": torch.arange(37)},
            "scalar": torch.tensor(1.5), "step": 7}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("cli")
    for step, loss in ((100, 2.5), (200, 1.9), (300, 2.1)):
        shardckpt.save(_state(step), str(r / f"step-{step:010d}"), frame_size=64 << 10,
                       metadata={"step": step, "metrics": {"loss": loss}})
    partial = r / "step-0000000400" / "data" / "0123456789abcdef"
    partial.mkdir(parents=True)
    (partial / "r00000.bin").write_bytes(b"x" * 100)
    return r


def run(capsys, *argv):
    code = cli.main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls_marks_latest_best_and_partial(root, capsys):
    code, out, _ = run(capsys, "ls", root, "--metric", "loss", "--json")
    assert code == 0
    steps = {s["name"]: s for s in json.loads(out)}
    assert steps["step-0000000300"]["latest"] and steps["step-0000000200"]["best"]
    assert steps["step-0000000400"]["state"] == "partial" and steps["step-0000000400"]["stored_bytes"] == 100
    assert steps["step-0000000100"]["metrics"] == {"loss": 2.5} and steps["step-0000000100"]["ratio"] > 1
    code, out, _ = run(capsys, "ls", root, "--metric", "loss")
    assert "latest" in out and "best" in out and "partial" in out and "LOSS" in out


def test_inspect_tree_and_json(root, capsys):
    code, out, _ = run(capsys, "inspect", root / "step-0000000200", "--json")
    info = json.loads(out)
    w = info["tensors"]["model.layers.0.w"]
    assert w["dtype"] == "float32" and w["shape"] == [300, 700] and w["chunks"] == 1
    assert w["raw_bytes"] == 300 * 700 * 4 and 0 < w["stored_bytes"] < w["raw_bytes"]
    assert w["codecs"] == ["zstd-byteplane/1"] and info["values"] == {"step": 7}
    assert info["world_size"] == 1 and info["user_metadata"]["metrics"] == {"loss": 1.9}
    code, out, _ = run(capsys, "inspect", root / "step-0000000200", "--key", "model.layers")
    assert code == 0 and "layers/" in out and "emb" not in out and "[300, 700]" in out


def test_verify_ok_then_flipped_byte_is_reported_precisely(root, tmp_path, capsys):
    import shutil
    path = tmp_path / "c"
    shutil.copytree(root / "step-0000000100", path)
    code, out, _ = run(capsys, "verify", path)
    assert code == 0 and out.startswith("OK")
    from shardckpt.loading.load import read_chunks
    from shardckpt.storage import storage_for
    m = shardckpt.read_manifest(str(path))
    chunks = read_chunks(storage_for(str(path)), m)
    frame = chunks["model.layers.0.w"][0].frames[2]
    with open(path / m.files[0].data, "r+b") as f:
        f.seek(frame.offset + 5)
        b = f.read(1)
        f.seek(frame.offset + 5)
        f.write(bytes([b[0] ^ 1]))
    code, out, _ = run(capsys, "verify", path, "--json")
    rep = json.loads(out)
    assert code == 1 and not rep["ok"] and len(rep["problems"]) == 1
    p = rep["problems"][0]
    assert p["kind"] == "checksum" and p["key"] == "model.layers.0.w" and p["offset"] == frame.offset
    assert p["frame"] == 2 and p["file"] == m.files[0].data
    code, out, _ = run(capsys, "verify", path)
    assert code == 1 and "PROBLEM checksum" in out and "model.layers.0.w" in out


def test_verify_reports_truncation_missing_index_and_bad_manifest(root, tmp_path, capsys):
    import shutil
    path = tmp_path / "c"
    shutil.copytree(root / "step-0000000100", path)
    m = shardckpt.read_manifest(str(path))
    with open(path / m.files[0].data, "r+b") as f:
        f.truncate(m.files[0].data_size - 10)
    rep = cli.verify_checkpoint(str(path))
    assert [p.kind for p in rep.problems] == ["size"]
    os.remove(path / m.files[0].index)
    rep = cli.verify_checkpoint(str(path))
    assert "missing_file" in {p.kind for p in rep.problems} and "coverage" in {p.kind for p in rep.problems}
    (path / "manifest.json").write_text("{}")
    code, out, _ = run(capsys, "verify", path)
    assert code == 1 and "PROBLEM manifest" in out


def test_diff_self_is_zero(root, capsys):
    p = root / "step-0000000200"
    code, out, _ = run(capsys, "diff", p, p, "--json")
    res = json.loads(out)
    assert code == 0 and res["identical"]
    for e in res["entries"]:
        assert e["status"] == "same"
        if e["max_abs"] is not None:
            assert e["max_abs"] == 0 and e["rel_l2"] == 0 and e["cosine"] == 1


def test_diff_reports_perturbation_added_removed_shape(tmp_path, capsys):
    a, b = _state(1), _state(1)
    b["model"]["layers"]["0"]["w"][17, 3] += 0.25
    b["model"]["layers"]["0"]["b"] *= 1.001
    del b["model"]["ids"]
    b["new"] = torch.zeros(3)
    b["scalar"] = torch.zeros(2)
    b["step"] = 8
    shardckpt.save(a, str(tmp_path / "a"), frame_size=64 << 10)
    shardckpt.save(b, str(tmp_path / "b"), frame_size=64 << 10)
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b", "--json")
    res = json.loads(out)
    e = {x["key"]: x for x in res["entries"]}
    assert code == 1
    w = e["model.layers.0.w"]
    assert w["status"] == "changed" and w["max_abs"] == pytest.approx(0.25, rel=1e-6)
    ref = a["model"]["layers"]["0"]["w"].double()
    assert w["rel_l2"] == pytest.approx(0.25 / ref.norm().item(), rel=1e-4) and 0.999 < w["cosine"] < 1
    assert e["model.layers.0.b"]["rel_l2"] == pytest.approx(0.001, rel=1e-3)
    assert e["model.ids"]["status"] == "removed" and e["new"]["status"] == "added"
    assert e["scalar"]["status"] == "shape" and e["step"]["status"] == "changed"
    assert e["model.emb"]["status"] == "same"
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b", "--sort", "max_abs", "--changed",
                       "--top", "2")
    lines = out.splitlines()
    assert lines[1].startswith("model.layers.0.w") and len(lines) == 4 and "model.emb" not in out


def test_diff_streams_in_bounded_boxes(tmp_path, monkeypatch):
    """No read is larger than the budget (rows of ~budget bytes), and the numbers match a one-shot diff."""
    a, b = _state(2), _state(2, scale=1.01)
    shardckpt.save(a, str(tmp_path / "a"), frame_size=8 << 10)
    shardckpt.save(b, str(tmp_path / "b"), frame_size=8 << 10)
    from shardckpt.tools import export
    sizes = []
    orig = export.CheckpointReader.read

    def spy(self, key, offsets=None, sizes_=None):
        t = orig(self, key, offsets, sizes_)
        sizes.append(t.numel() * t.element_size())
        return t
    monkeypatch.setattr(export.CheckpointReader, "read", spy)
    small = cli.diff_checkpoints(str(tmp_path / "a"), str(tmp_path / "b"), budget=16 << 10)
    assert max(sizes) <= 16 << 10 and len(sizes) > 100
    big = cli.diff_checkpoints(str(tmp_path / "a"), str(tmp_path / "b"), budget=64 << 20)
    for x, y in zip(small["entries"], big["entries"]):
        assert x.key == y.key and x.max_abs == y.max_abs
        if x.rel_l2 is not None:
            assert x.rel_l2 == pytest.approx(y.rel_l2, rel=1e-9) and x.cosine == pytest.approx(y.cosine, rel=1e-9)


def test_gc_dry_run_then_delete(tmp_path, capsys):
    shardckpt.save(_state(), str(tmp_path / "step-0000000001"))
    leftover = tmp_path / "step-0000000002" / "data" / "0123456789abcdef"
    leftover.mkdir(parents=True)
    (leftover / "r00000.bin").write_bytes(b"x")
    code, out, _ = run(capsys, "gc", tmp_path, "--grace-s", "0")
    assert code == 0 and "would remove step-0000000002" in out and leftover.exists()
    code, out, _ = run(capsys, "gc", tmp_path, "--grace-s", "0", "--delete")
    assert code == 0 and not (tmp_path / "step-0000000002").exists() and (tmp_path / "step-0000000001").exists()


def test_fsspec_url_and_errors(capsys):
    url = "memory://cli-test/ckpt"
    shardckpt.save(_state(3), url)
    code, out, _ = run(capsys, "inspect", url, "--json")
    assert code == 0 and "model.layers.0.w" in json.loads(out)["tensors"]
    code, out, _ = run(capsys, "verify", url)
    assert code == 0
    code, out, err = run(capsys, "inspect", "memory://cli-test/nothing")
    assert code == 2 and "IncompleteCheckpointError" in err


def test_progress_printer_only_draws_when_asked():
    buf = io.StringIO()
    p = cli.Progress(100, "x", stream=buf, delay=0)
    p(50)
    p.close()
    assert buf.getvalue() == ""  # a StringIO is not a terminal
    p = cli.Progress(100, "x", stream=buf, enabled=True, delay=0)
    p(50)
    p(50)
    p.close()
    assert "100.0%" in buf.getvalue() and buf.getvalue().endswith("\n")


def test_python_dash_m_entry_point(root):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "shardckpt", "ls", str(root), "--json"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 4


def test_ls_of_one_checkpoint_shows_it(root, capsys):
    code, out, _ = run(capsys, "ls", root / "step-0000000200", "--json")
    steps = json.loads(out)
    assert code == 0 and len(steps) == 1
    s = steps[0]
    assert s["name"] == "step-0000000200" and s["state"] == "committed" and s["step"] == 200 and s["latest"]
    code, out, _ = run(capsys, "ls", root / "step-0000000200")
    assert code == 0 and "committed" in out and "corrupt" not in out


def test_ls_skips_stray_files_and_a_missing_root_is_an_error(root, tmp_path, capsys):
    shutil_root = tmp_path / "r"
    shardckpt.save(_state(), str(shutil_root / "step-0000000001"))
    (shutil_root / "notes.txt").write_text("not a checkpoint")
    code, out, _ = run(capsys, "ls", shutil_root, "--json")
    assert code == 0 and [s["name"] for s in json.loads(out)] == ["step-0000000001"]
    code, out, err = run(capsys, "ls", tmp_path / "nothing")
    assert code == 2 and out == "" and "no such directory" in err and str(tmp_path / "nothing") in err


def test_verify_of_a_missing_path_is_an_error_named_once(tmp_path, capsys):
    missing = tmp_path / "nothing"
    code, out, err = run(capsys, "verify", missing)
    assert code == 2 and out == ""
    assert "IncompleteCheckpointError" in err and err.count(str(missing)) == 1 and "MiB/s" not in err


def test_verify_problem_lines_name_the_file_once_and_the_error_class(root, tmp_path, capsys):
    import shutil
    path = tmp_path / "c"
    shutil.copytree(root / "step-0000000100", path)
    m = shardckpt.read_manifest(str(path))
    idx = path / m.files[0].index
    idx.write_bytes(idx.read_bytes()[:-3] + b"xyz")
    code, out, _ = run(capsys, "verify", path)
    line = next(x for x in out.splitlines() if x.startswith("PROBLEM index"))
    assert code == 1 and line.count(m.files[0].index) == 1
    code, out, _ = run(capsys, "verify", path, "--json")
    assert json.loads(out)["problems"][0]["error"] == "ChecksumError"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "junk").write_bytes(bytes(range(256)) * 12)
    (d / "empty").mkdir()
    import fractions
    torch.save({"w": torch.ones(3), "f": fractions.Fraction(1, 3)}, d / "object.pt")  # weights_only refuses it
    shardckpt.save({"w": torch.ones(4)}, str(d / "good"))
    return d


def _commands(p, d):
    good, out = d / "good", d / "out"
    return [("ls", p), ("inspect", p), ("verify", p), ("diff", p, good), ("diff", good, p), ("export", p, out),
            ("export", p, d / "out.pt", "--format", "torch"), ("import", p, d / "dst"),
            ("import", p, d / "dst", "--kind", "dcp"), ("import", p, d / "dst", "--kind", "torch"),
            ("import", p, d / "dst", "--kind", "safetensors"), ("gc", p)]


@pytest.mark.parametrize("what", ["missing", "junk", "empty"])
def test_every_subcommand_fails_on_bad_input_with_one_error_line(bad_inputs, capsys, what):
    """docs/CLI.md: errors exit 2 with one `error:` line on stderr, never a traceback or exit 1 (a
    finding). An empty directory is a valid (empty) root for ls and gc: exit 0."""
    p = bad_inputs / what
    for argv in _commands(p, bad_inputs):
        code, out, err = run(capsys, *argv)
        if what == "empty" and argv[0] in ("ls", "gc"):
            assert code == 0, (argv, err)
            continue
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, code, err)
        assert str(p) in lines[0] or argv[0] == "diff" and "good" in lines[0], (argv, err)
    assert not (bad_inputs / "dst").exists() and not (bad_inputs / "out").exists()


def test_import_refuses_objects_and_directories_in_one_line(bad_inputs, capsys):
    code, _, err = run(capsys, "import", bad_inputs / "object.pt", bad_inputs / "dst2")
    assert code == 2 and err.count("\n") == 1 and "FormatError" in err and "fractions.Fraction" in err
    code, _, err = run(capsys, "import", bad_inputs / "good", bad_inputs / "dst2", "--kind", "torch")
    assert code == 2 and err.count("\n") == 1 and "FormatError" in err and "directory" in err
    code, _, err = run(capsys, "gc", bad_inputs / "nothing-here")
    assert code == 2 and "IncompleteCheckpointError" in err  # was "would remove 0", exit 0


def test_every_library_equivalent_docs_name_is_importable_from_cli():
    """docs/CLI.md: "Library equivalents (each also importable from `shardckpt.cli`)": four were not."""
    import importlib
    import re
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "CLI.md"), encoding="utf-8").read()
    para = doc.split("Library equivalents", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"`([\w.]+)`", para)
    checked = []
    def is_module(n):
        try:
            importlib.import_module(n)
            return True
        except ImportError:
            return False
    for n in names:
        if is_module(n):
            continue  # a module named for where the functions live
        last = n.rsplit(".", 1)[-1]
        assert hasattr(cli, last), f"docs/CLI.md says {last} is importable from shardckpt.cli"
        if "." in n:  # the same function as the home the docs name
            mod, _, attr = n.rpartition(".")
            assert getattr(importlib.import_module(mod), attr) is getattr(cli, last)
        checked.append(last)
    assert {"export_safetensors", "export_torch", "import_checkpoint", "gc_uncommitted", "list_steps",
            "verify_checkpoint", "diff_checkpoints"} <= set(checked)


def test_ls_metric_column_and_step_names(tmp_path, capsys):
    """`ls --metric acc` showed a LOSS column (and no ACC); a directory named p2 was step 2."""
    for step, m in ((1, {"loss": 2.0, "acc": 0.5}), (2, {"loss": 1.0, "acc": 0.4})):
        shardckpt.save({"w": torch.ones(2)}, str(tmp_path / f"step-{step:010d}"), metadata={"metrics": m})
    shardckpt.save({"w": torch.ones(2)}, str(tmp_path / "p2"))
    code, out, _ = run(capsys, "ls", tmp_path, "--metric", "acc", "--mode", "max")
    header, *rows = out.splitlines()
    assert code == 0 and "ACC" in header and "LOSS" not in header
    best = [r for r in rows if r.rstrip().endswith("best")]
    assert len(best) == 1 and best[0].startswith("step-0000000001")
    code, out, _ = run(capsys, "ls", tmp_path, "--json")
    assert {s["name"]: s["step"] for s in json.loads(out)}["p2"] is None


def test_a_closed_pipe_is_not_an_error(root, monkeypatch):
    def closed(args):
        raise BrokenPipeError
    monkeypatch.setattr(cli, "cmd_ls", closed)
    assert cli.main(["ls", str(root)]) == 0  # `shardckpt ls | head`; OSError is otherwise exit 2


def test_ls_and_restore_best_take_the_monitor_from_the_newest_step_that_recorded_one(tmp_path, capsys):
    from shardckpt import CheckpointManager
    m = CheckpointManager(tmp_path, monitor="acc", mode="max", async_save=False, preemption_signals=())
    for s, acc in ((1, 0.9), (2, 0.5)):
        m.save(s, {"w": torch.full((2,), float(s))}, metrics={"acc": acc})
    m.close()
    plain = CheckpointManager(tmp_path, async_save=False, preemption_signals=())  # records no monitor
    plain.save(3, {"w": torch.full((2,), 3.0)}, metrics={"acc": 0.1})
    code, out, _ = run(capsys, "ls", tmp_path, "--json")
    assert [s["step"] for s in json.loads(out) if s["best"]] == [1]  # acc, max: from step 2's record
    back = {"w": torch.zeros(2)}
    assert plain.restore(back, "best") == 1 and back["w"][0] == 1.0
    plain.close()

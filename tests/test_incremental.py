"""Incremental checkpoints (FORMAT.md §7): chunks equal to the previous step's are references to its frames;
every reader follows them, retention never frees data a kept step refers to."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import shardckpt
from shardckpt import CheckpointManager
from shardckpt.lifecycle import deleter as sgc
from shardckpt.errors import ChecksumError, CorruptDataError, FormatError, SaveError, UnsupportedVersionError
from shardckpt.loading.verify import verify_checkpoint

from faultkit import launch
from harness import run_ranks

HERE = os.path.join(os.path.dirname(__file__), "golden")


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"frozen": {"w": torch.randn(256, 64, generator=g), "emb": torch.randn(128, 32, generator=g).bfloat16()},
            "head": torch.randn(64, 8, generator=g), "ids": torch.arange(100), "step": 0}


def _train(st: dict, step: int) -> None:
    st["head"].add_(0.01 * step)
    st["step"] = step


def _same(a: dict, b: dict) -> bool:
    flat_a, flat_b = _flat(a), _flat(b)
    return flat_a.keys() == flat_b.keys() and all(
        torch.equal(x, flat_b[k]) if isinstance(x, torch.Tensor) else x == flat_b[k] for k, x in flat_a.items())


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _refs(path) -> dict[str, bool]:
    """key -> whether its (single-rank) chunk is a reference, from the index files."""
    m = shardckpt.read_manifest(path)
    out = {}
    for f in m.files:
        for c in json.load(open(os.path.join(path, f.index)))["chunks"]:
            out[c["key"]] = "ref" in c
    return out


@pytest.mark.parametrize("async_save", [False, True])
def test_unchanged_chunks_are_references_and_load_bit_exact(tmp_path, async_save):
    st = _state()
    with CheckpointManager(tmp_path, incremental=True, async_save=async_save, preemption_signals=()) as mgr:
        for step in (1, 2, 3):
            _train(st, step)
            mgr.save(step, st)
            mgr.wait()
    full, m3 = shardckpt.read_manifest(tmp_path / "step-0000000001"), shardckpt.read_manifest(tmp_path / "step-0000000003")
    assert m3.format_version == "2.1" and m3.chunk_hash == "xxh3-128" and full.bases == ()
    assert _refs(tmp_path / "step-0000000003") == {"frozen.w": True, "frozen.emb": True, "head": False, "ids": True}
    # references point at the holder of the bytes (step 1), never through step 2
    assert [b.dir for b in m3.bases] == ["step-0000000001"]
    head = st["head"].numel() * 4
    assert m3.stored_bytes <= 1.1 * head + 4096 and m3.ref_stored_bytes > 0
    assert _same(shardckpt.load_full(tmp_path / "step-0000000003"), st)
    back = _state(seed=9)
    shardckpt.load(back, tmp_path / "step-0000000003")
    assert _same(back, st)
    assert verify_checkpoint(tmp_path / "step-0000000003").ok


def test_one_ulp_change_in_a_frozen_tensor_is_written(tmp_path):
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    w = st["frozen"]["w"]
    w.view(torch.int32)[17, 3] += 1  # the next float up: one ULP
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    assert _refs(tmp_path / "b")["frozen.w"] is False and _refs(tmp_path / "b")["frozen.emb"] is True
    got = shardckpt.load_full(tmp_path / "b")
    assert torch.equal(got["frozen"]["w"].view(torch.int32), w.view(torch.int32))


def test_bounded_pool_incremental_save_pairs_every_chunk_with_its_hash(tmp_path):
    """An async-style save (stage=True) through a pool too small for the state: frozen.w streams through it
    in slabs (hashed inline, written: their boxes are new), the rest is staged and hashed ahead; each chunk
    must get its own hash, whichever path it took."""
    from shardckpt.saving import pipeline
    from shardckpt.saving.staging import HostBufferPool
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    _train(st, 1)

    def save(name, base):
        p = pipeline.prepare(st, str(tmp_path / name), process_group=None, codec="auto", frame_size=4 << 20,
                             metadata=None, storage_options=None, timeout_s=None, stage=True,
                             pool=HostBufferPool(max_bytes=40 << 10), base=str(tmp_path / base))
        pipeline.write_and_commit(p)
    save("b", "a")
    assert _refs(tmp_path / "b") == {"frozen.w": False, "frozen.emb": True, "head": False, "ids": True}
    assert _same(shardckpt.load_full(tmp_path / "b"), st)
    save("c", "b")  # the same slabs again: their hashes in b were right, so everything refers
    assert all(_refs(tmp_path / "c").values())
    assert _same(shardckpt.load_full(tmp_path / "c"), st)


def test_base_must_be_a_committed_sibling(tmp_path):
    st = _state()
    shardckpt.save(st, tmp_path / "run" / "a", content_hash=True)
    with pytest.raises(SaveError, match="same parent"):
        shardckpt.save(st, tmp_path / "other" / "b", base=tmp_path / "run" / "a")
    with pytest.raises(SaveError, match="not a committed"):
        shardckpt.save(st, tmp_path / "run" / "c", base=tmp_path / "run" / "nothing")


def test_reader_without_major_2_refuses(tmp_path, monkeypatch):
    """What a 1.x reader does with an incremental checkpoint: refuses it (another MAJOR), never misreads."""
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    from shardckpt.format import parse as parse
    monkeypatch.setattr(parse, "SUPPORTED_MAJORS", (1,))
    with pytest.raises(UnsupportedVersionError):
        shardckpt.load_full(tmp_path / "b")


def _rewrite(path, edit):
    """Edit a manifest's JSON and re-seal its checksum (a hostile but well-formed manifest)."""
    from shardckpt.native import kernels as _ext
    from shardckpt.format.records import canonical_json
    p = os.path.join(path, "manifest.json")
    obj = json.load(open(p))
    obj.pop("manifest_crc32c")
    edit(obj)
    obj["manifest_crc32c"] = _ext.crc32c(canonical_json(obj))
    open(p, "w").write(json.dumps(obj))


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".hidden", "/abs", ""])
def test_hostile_base_name_is_rejected_before_any_read(tmp_path, name):
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    _rewrite(tmp_path / "b", lambda o: o["bases"][0].update(dir=name))
    with pytest.raises(FormatError, match="sibling"):
        shardckpt.read_manifest(tmp_path / "b")


def test_missing_or_corrupt_referenced_data_is_a_typed_error(tmp_path):
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    _train(st, 1)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    m = shardckpt.read_manifest(tmp_path / "a")
    data = tmp_path / "a" / m.files[0].data
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises((ChecksumError, CorruptDataError)) as e:
        shardckpt.load_full(tmp_path / "b")
    assert e.value.key and "a" in e.value.file and str(tmp_path / "b") in str(e.value)
    report = verify_checkpoint(tmp_path / "b")
    assert not report.ok and any("refers to" in p.message for p in report.problems)
    os.remove(data)
    with pytest.raises(CorruptDataError) as e:
        shardckpt.load_full(tmp_path / "b")
    assert e.value.key and str(tmp_path / "a") in e.value.file and str(tmp_path / "b") in str(e.value)
    report = verify_checkpoint(tmp_path / "b", full=False)  # index level finds it too
    assert [p.kind for p in report.problems] and all(p.kind == "reference" for p in report.problems)


def _entries(root) -> list[str]:
    """A root's checkpoint directories (the deleter's .shardckpt-pins directory of in-flight saves aside)."""
    return sorted(n for n in os.listdir(root) if not n.startswith("."))


def test_keep_last_1_retires_old_steps_and_frees_data_once_unreferenced(tmp_path):
    st = _state()
    with CheckpointManager(tmp_path, incremental=True, full_every=3, keep_last=1, async_save=False,
                           preemption_signals=()) as mgr:
        for step in range(1, 8):
            _train(st, step)
            mgr.save(step, st)
            assert mgr.steps() == [step]
            assert _same(shardckpt.load_full(tmp_path / f"step-{step:010d}"), st)
            assert verify_checkpoint(tmp_path / f"step-{step:010d}").ok
    # full writes at steps 1, 4, 7: step 7 refers to nothing, so every older directory is gone
    assert _entries(tmp_path) == ["step-0000000007"]


def test_retention_keeps_data_a_kept_step_refers_to(tmp_path):
    st = _state()
    with CheckpointManager(tmp_path, incremental=True, keep_last=1, async_save=False,
                           preemption_signals=()) as mgr:
        for step in (1, 2, 3):
            _train(st, step)
            mgr.save(step, st)
    names = _entries(tmp_path)
    assert names == ["step-0000000001", "step-0000000003"]  # step 1: data only, no manifest
    assert not (tmp_path / "step-0000000001" / "manifest.json").exists()
    assert sgc.gc_uncommitted(tmp_path, dry_run=False, grace_s=0) == []  # referenced: not a leftover
    assert _same(shardckpt.load_full(tmp_path / "step-0000000003"), st)


def _retire_and_die(rank, ws, root, die_at):
    """Saves three incremental steps (keeping all), then retires with keep_last=1 and SIGKILLs itself at
    the die_at-th delete of retention."""
    st = _state()
    with CheckpointManager(root, incremental=True, async_save=False, preemption_signals=()) as mgr:
        for step in (1, 2, 3):
            _train(st, step)
            mgr.save(step, st)
    from shardckpt.storage.local import LocalStorage
    calls = {"n": 0}
    real_delete, real_tree = LocalStorage.delete, LocalStorage.delete_tree

    def counted(fn):
        def wrapper(self, *a):
            calls["n"] += 1
            if calls["n"] == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(self, *a)
        return wrapper
    LocalStorage.delete, LocalStorage.delete_tree = counted(real_delete), counted(real_tree)
    mgr = CheckpointManager(root, incremental=True, keep_last=1, async_save=False, preemption_signals=())
    mgr._after_commit(3)
    return calls["n"]


@pytest.mark.parametrize("die_at", [1, 2, 3, 5])
def test_kill_during_retention_leaves_kept_step_loadable(tmp_path, die_at):
    fates = launch(1, _retire_and_die, str(tmp_path), die_at, timeout=120)
    assert fates[0] == ("dead", -signal.SIGKILL)  # killed inside retention (its 5 deletes: manifests, data)
    st = _state()
    for step in (1, 2, 3):
        _train(st, step)
    assert _same(shardckpt.load_full(tmp_path / "step-0000000003"), st)
    assert verify_checkpoint(tmp_path / "step-0000000003").ok
    # a later retention and gc finish the job without touching what step 3 needs
    mgr = CheckpointManager(tmp_path, incremental=True, keep_last=1, async_save=False, preemption_signals=(),
                            gc_grace_s=0)
    mgr._after_commit(3)
    assert mgr.steps() == [3]
    assert _same(shardckpt.load_full(tmp_path / "step-0000000003"), st)
    assert not (tmp_path / "step-0000000002").exists()


# ------------------------------------------------------------------------------------------- multi-rank

def _dstate(mesh, seed):
    from torch.distributed.tensor import Shard, distribute_tensor
    st = _state(seed)
    st["frozen"]["w"] = distribute_tensor(st["frozen"]["w"], mesh, [Shard(0)], src_data_rank=None)
    st["head"] = distribute_tensor(st["head"], mesh, [Shard(1)], src_data_rank=None)
    return st


def _save_2(rank, ws, root, mode):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (ws,))
    st = _dstate(mesh, 0)
    with CheckpointManager(root, incremental=True, async_save=(mode == "async"), preemption_signals=()) as mgr:
        for step in (1, 2):
            st["head"].to_local().add_(0.5 * step)  # a DTensor's local shard, changed on every rank
            st["step"] = step
            mgr.save(step, st)
    return _plain(st)


def _plain(st: dict) -> dict:
    """Full tensors as (dtype, nested lists): tensors do not cross the harness's queue once a rank exits."""
    return {k: ((str(v.dtype), (v.full_tensor() if hasattr(v, "full_tensor") else v).float().tolist())
                if isinstance(v, torch.Tensor) else v) for k, v in _flat(st).items()}


def _load_3(rank, ws, path):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (ws,))
    st = _dstate(mesh, 7)
    shardckpt.load(st, path)
    full = shardckpt.load_full(path, process_group=None)
    from torch.distributed import group
    shared = shardckpt.load_full(path, process_group=group.WORLD, exchange="always")  # read-once, references too
    return _plain(st), _plain(full), _plain(shared)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_ranks_incremental_then_reshard_onto_three(tmp_path, mode):
    want = run_ranks(2, _save_2, str(tmp_path), mode)[0]
    path = tmp_path / "step-0000000002"
    m = shardckpt.read_manifest(path)
    assert m.bases and sum(f.ref_chunks for f in m.files) >= 3  # frozen.w (2 shards), emb, ids
    assert not any(_refs_rank(path, r)["head"] for r in range(2))
    for got, full, shared in run_ranks(3, _load_3, str(path)):
        assert got == want and full == want and shared == want
    assert verify_checkpoint(path).ok


def _refs_rank(path, rank) -> dict[str, bool]:
    m = shardckpt.read_manifest(path)
    f = next(f for f in m.files if f.rank == rank)
    return {c["key"]: "ref" in c for c in json.load(open(os.path.join(path, f.index)))["chunks"]}


# ---------------------------------------------------------------------------------------------- golden

@pytest.mark.parametrize("version, algorithm", [("2.0", "blake2b-128"), ("2.1", "xxh3-128")])
def test_golden_incremental_loads_bit_exact_and_conforms_to_schema(version, algorithm):
    """Each incremental golden loads bit-exactly, conforms to the schema, and its chunk hashes are what its
    manifest says they are: 2.0 names no algorithm (blake2b-128), 2.1 names xxh3-128."""
    from golden.json_schema import validate
    from golden.make_golden import incremental_states
    from shardckpt.format.refs import chunk_hash
    schema = json.load(open(os.path.join(os.path.dirname(__file__), "..", "docs", "manifest.schema.json")))
    root = os.path.join(HERE, f"v{version}-incremental")
    for name, want in zip(("step-0000000001", "step-0000000002"), incremental_states()):
        path = os.path.join(root, name)
        got = shardckpt.load_full(path)
        assert _same(got, want)
        m = json.load(open(os.path.join(path, "manifest.json")))
        assert m["format_version"] == version and validate(m, schema) == []
        assert m.get("chunk_hash", "blake2b-128") == algorithm == shardckpt.read_manifest(path).chunk_hash
        flat = _flat(got)
        for f in m["files"]:
            index = json.load(open(os.path.join(path, f["index"])))
            assert validate(index, {"$ref": "#/$defs/index"}, schema) == []
            for c in index["chunks"]:  # one rank, whole tensors: the chunk is the tensor
                raw = flat[c["key"]].contiguous().reshape(-1).view(torch.uint8).numpy()
                assert c["hash"] == chunk_hash(raw, algorithm), c["key"]
    assert any(_refs(os.path.join(root, "step-0000000002")).values())


def test_a_base_hashed_with_blake2b_serves_as_a_base_and_matches_nothing(tmp_path, caplog):
    """A 2.0 checkpoint (blake2b-128 hashes) as the base of a save: nothing is compared against it, the save
    writes everything and loads; the save after it refers to it again."""
    import shutil
    from golden.make_golden import incremental_states
    shutil.copytree(os.path.join(HERE, "v2.0-incremental", "step-0000000001"), tmp_path / "old")
    st = incremental_states()[0]
    with caplog.at_level("WARNING", logger="shardckpt"):
        m = shardckpt.save(st, tmp_path / "new", base=tmp_path / "old")
    assert "blake2b-128" in caplog.text and "matches nothing" in caplog.text
    assert m.format_version == "2.1" and m.bases == () and m.ref_stored_bytes == 0
    assert not any(_refs(tmp_path / "new").values())
    assert _same(shardckpt.load_full(tmp_path / "new"), st)
    m2 = shardckpt.save(st, tmp_path / "next", base=tmp_path / "new")
    assert all(_refs(tmp_path / "next").values()) and [b.dir for b in m2.bases] == ["new"]
    assert _same(shardckpt.load_full(tmp_path / "next"), st)


def test_diff_compares_hashes_only_under_one_algorithm(tmp_path):
    """The same bytes hashed with blake2b-128 (2.0) and xxh3-128 (2.1): diff cannot trust unequal digests
    of different algorithms, so it streams both sides and still finds them identical."""
    import shutil
    from golden.make_golden import incremental_states
    from shardckpt.tools.diff import diff_checkpoints
    shutil.copytree(os.path.join(HERE, "v2.0-incremental", "step-0000000001"), tmp_path / "old")
    shardckpt.save(incremental_states()[0], tmp_path / "new", content_hash=True)
    rows = diff_checkpoints(tmp_path / "old", tmp_path / "new")["entries"]
    tensors = [r for r in rows if r.max_abs is not None]
    assert tensors and all(r.status == "same" and r.identical for r in tensors)


def test_ls_and_inspect_show_written_against_referred_bytes(tmp_path, capsys):
    from shardckpt.tools.cli import main
    from shardckpt.tools.inspection import inspect_checkpoint, list_steps
    st = _state()
    with CheckpointManager(tmp_path, incremental=True, keep_last=1, async_save=False, preemption_signals=()) as mgr:
        for step in (1, 2):
            _train(st, step)
            mgr.save(step, st)
    rows = {s.name: s for s in list_steps(tmp_path)}
    assert rows["step-0000000001"].state == "retired" and rows["step-0000000002"].state == "committed"
    m2 = shardckpt.read_manifest(tmp_path / "step-0000000002")
    assert rows["step-0000000002"].ref_bytes == m2.ref_stored_bytes > 10 * m2.stored_bytes
    info = inspect_checkpoint(tmp_path / "step-0000000002")
    assert info["ref_stored_bytes"] == m2.ref_stored_bytes and info["tensors"]["frozen.w"]["ref_chunks"] == 1
    assert info["tensors"]["head"]["ref_chunks"] == 0
    main(["ls", str(tmp_path)])
    out = capsys.readouterr().out
    assert "REFERS" in out and "retired" in out
    main(["inspect", str(tmp_path / "step-0000000002")])
    assert "refers to" in capsys.readouterr().out


def test_diff_export_and_dcp_reader_follow_references(tmp_path):
    from shardckpt.tools.diff import diff_checkpoints
    from shardckpt.tools.export import export_safetensors
    import torch.distributed.checkpoint as dcp
    from shardckpt.integrations.dcp import Reader
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    _train(st, 1)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    res = {d.key: d for d in diff_checkpoints(tmp_path / "a", tmp_path / "b")["entries"]}
    assert res["frozen.w"].identical and res["head"].status == "changed"
    export_safetensors(tmp_path / "b", tmp_path / "st", keys=["frozen"])
    from safetensors.torch import load_file
    files = [f for f in os.listdir(tmp_path / "st") if f.endswith(".safetensors")]
    got = {k: v for f in files for k, v in load_file(str(tmp_path / "st" / f)).items()}
    assert torch.equal(got["frozen.w"], st["frozen"]["w"]) and torch.equal(got["frozen.emb"], st["frozen"]["emb"])
    out = {"frozen": {"w": torch.zeros(256, 64), "emb": torch.zeros(128, 32).bfloat16()},
           "head": torch.zeros(64, 8), "ids": torch.zeros(100, dtype=torch.int64)}
    dcp.load(out, storage_reader=Reader(str(tmp_path / "b")))
    assert torch.equal(out["frozen"]["w"], st["frozen"]["w"]) and torch.equal(out["head"], st["head"])


_TWIN_SCRIPT = """
import json, os, sys, torch, shardckpt
from test_incremental import _state, _train, _refs
root = sys.argv[1]
st = _state()
shardckpt.save(st, os.path.join(root, "a"), content_hash=True)
_train(st, 1)
shardckpt.save(st, os.path.join(root, "b"), base=os.path.join(root, "a"))
m = shardckpt.read_manifest(os.path.join(root, "b"))
idx = json.load(open(os.path.join(root, "b", m.files[0].index)))
print(json.dumps({"backend": shardckpt.backend, "refs": _refs(os.path.join(root, "b")),
                  "hashes": {c["key"]: c["hash"] for c in idx["chunks"]}}))
"""


def test_python_twin_writes_the_same_hashes_and_references(tmp_path):
    import subprocess
    import sys
    out = {}
    for name in ("native", "python"):
        env = dict(os.environ, SHARDCKPT_BACKEND=name, PYTHONPATH=os.path.dirname(__file__) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        os.makedirs(tmp_path / name)
        res = subprocess.run([sys.executable, "-c", _TWIN_SCRIPT, str(tmp_path / name)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["python"]["backend"] == "python" and out["native"]["backend"] == "native"
    assert out["python"]["refs"] == out["native"]["refs"] and out["python"]["hashes"] == out["native"]["hashes"]
    assert out["native"]["refs"]["frozen.w"] and not out["native"]["refs"]["head"]


def test_incremental_on_an_fsspec_store():
    """References resolve through FsspecStorage too (sibling prefixes on the same filesystem)."""
    import uuid
    root = f"memory://incr-{uuid.uuid4().hex[:8]}"
    st = _state()
    with CheckpointManager(root, incremental=True, keep_last=1, async_save=False, preemption_signals=()) as mgr:
        for step in (1, 2, 3):
            _train(st, step)
            mgr.save(step, st)
        assert mgr.steps() == [3]
    path = f"{root}/step-0000000003"
    assert [b.dir for b in shardckpt.read_manifest(path).bases] == ["step-0000000001"]
    assert _same(shardckpt.load_full(path), st) and verify_checkpoint(path).ok


@pytest.mark.parametrize("edit", [
    lambda c: c["ref"].update(dir="step-9"),             # a base the manifest's table does not list
    lambda c: c["ref"].update(save_id="0" * 32),
    lambda c: c["ref"].update(rank=-1),
    lambda c: c.update(hash="XYZ"),
    lambda c: c.pop("hash"),
])
def test_hostile_reference_in_an_index_is_rejected(tmp_path, edit):
    from shardckpt.native import kernels as _ext
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    m = shardckpt.read_manifest(tmp_path / "b")
    ipath = tmp_path / "b" / m.files[0].index
    idx = json.load(open(ipath))
    edit(next(c for c in idx["chunks"] if "ref" in c))
    from shardckpt.format.records import canonical_json
    data = canonical_json(idx)
    ipath.write_bytes(data)
    _rewrite(tmp_path / "b", lambda o: o["files"][0].update(index_size=len(data), index_crc32c=_ext.crc32c(data)))
    with pytest.raises(FormatError):
        shardckpt.load_full(tmp_path / "b")


def test_after_restore_the_manager_continues_incrementally_and_keeps_the_full_write_count(tmp_path):
    st = _state()
    with CheckpointManager(tmp_path, incremental=True, full_every=3, async_save=False, preemption_signals=()) as mgr:
        for step in (1, 2):
            _train(st, step)
            mgr.save(step, st)
    back = _state(seed=5)
    with CheckpointManager(tmp_path, incremental=True, full_every=3, async_save=False, preemption_signals=()) as mgr:
        assert mgr.restore(back) == 2 and _same(back, st)
        for step in (3, 4):
            _train(back, step)
            mgr.save(step, back)
    bases = {s: [b.dir for b in shardckpt.read_manifest(tmp_path / f"step-{s:010d}").bases] for s in (1, 2, 3, 4)}
    # step 1 full, 2 and 3 refer to 1 (the count survived the restart), 4 full again (full_every=3)
    assert bases == {1: [], 2: ["step-0000000001"], 3: ["step-0000000001"], 4: []}
    assert _same(shardckpt.load_full(tmp_path / "step-0000000004"), back)


def _count_reads(rank, ws, path, mode):
    from torch.distributed import group
    from shardckpt.storage.local import LocalStorage
    seen = {"n": 0}
    real = LocalStorage.read_ranges

    def counted(self, relpath, ranges, dest):
        seen["n"] += sum(r.length for r in ranges)
        return real(self, relpath, ranges, dest)
    LocalStorage.read_ranges = counted
    shardckpt.load_full(path, process_group=group.WORLD, exchange=mode)
    return seen["n"]


def test_group_restore_fetches_referenced_bytes_once(tmp_path):
    """Every rank needs every byte (load_full on 3 ranks): with the exchange, referenced frames in the base
    checkpoint are fetched once for the group, as the checkpoint's own frames are."""
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    _train(st, 1)
    m = shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    total = m.stored_bytes + m.ref_stored_bytes
    once = sum(run_ranks(3, _count_reads, str(tmp_path / "b"), "always"))
    each = sum(run_ranks(3, _count_reads, str(tmp_path / "b"), "never"))
    assert once <= 1.1 * total + 65536 and each >= 2.9 * total


def _group_load_error(rank, ws, path):
    from torch.distributed import group
    try:
        shardckpt.load_full(path, process_group=group.WORLD, exchange="always")
    except (ChecksumError, CorruptDataError) as e:
        return type(e).__name__, e.key, e.file, str(e)
    return None


def test_group_restore_with_corrupt_referenced_data_fails_on_every_rank(tmp_path):
    st = _state()
    shardckpt.save(st, tmp_path / "a", content_hash=True)
    _train(st, 1)
    shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    data = tmp_path / "a" / shardckpt.read_manifest(tmp_path / "a").files[0].data
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    for res in run_ranks(2, _group_load_error, str(tmp_path / "b")):
        assert res is not None and res[1] and str(tmp_path / "a") in res[2] and str(tmp_path / "b") in res[3]


def test_diff_checks_the_frames_it_trusts_by_content_hash(tmp_path, capsys):
    """A copy of a hashed step with one data byte flipped: equal hashes on both sides, but diff must not
    call it "same" (exit 0) without checking the bytes; it fails like a streamed read would (exit 2)."""
    import shutil
    from shardckpt.tools import cli
    from shardckpt.tools.diff import diff_checkpoints
    shardckpt.save(_state(), tmp_path / "a", content_hash=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert diff_checkpoints(tmp_path / "a", tmp_path / "b")["summary"]["same"] == 5  # both sound: all same
    data = tmp_path / "b" / shardckpt.read_manifest(tmp_path / "b").files[0].data
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError) as e:
        diff_checkpoints(tmp_path / "a", tmp_path / "b")
    assert e.value.file.startswith(str(tmp_path / "b")) and e.value.file.endswith(".bin") and e.value.key
    capsys.readouterr()
    assert cli.main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ChecksumError") and "/b/" in err[0]


def test_base_without_content_hashes_is_said_once(tmp_path, caplog):
    import logging
    st = _state()
    shardckpt.save(st, tmp_path / "a")  # no content_hash=True: format 1.x, nothing to compare against
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        m = shardckpt.save(st, tmp_path / "b", base=tmp_path / "a")
    said = [r for r in caplog.records if "no content hashes" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "a") in said[0].getMessage() and not m.bases
    caplog.clear()
    shardckpt.save(st, tmp_path / "c", content_hash=True)
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        assert shardckpt.save(st, tmp_path / "d", base=tmp_path / "c").bases  # hashed base: no warning
    assert "no content hashes" not in caplog.text


def test_reports_agree_on_an_incremental_step(tmp_path, capsys):
    """Issue 22 item 12: inspect and ls gave one step two ratios (18.57x against 1.08x); verify reported one
    of several keys that refer to the same missing file, under a kind docs/CLI.md did not list."""
    import re
    from shardckpt.tools import cli
    from shardckpt.tools.inspection import inspect_checkpoint, list_steps
    st = _state()
    shardckpt.save(st, tmp_path / "step-0000000001", content_hash=True)
    _train(st, 1)
    shardckpt.save(st, tmp_path / "step-0000000002", base=tmp_path / "step-0000000001")
    line = {s.step: s for s in list_steps(tmp_path)}[2]
    info = inspect_checkpoint(tmp_path / "step-0000000002")
    assert line.ref_bytes > 0 and info["ratio"] == pytest.approx(line.ratio)
    cli.main(["inspect", str(tmp_path / "step-0000000002")])
    out = capsys.readouterr().out
    assert f"({line.ratio:.2f}x)" in out.splitlines()[3] and "referred" in out.splitlines()[3]
    refs = sorted(k for k, is_ref in _refs(tmp_path / "step-0000000002").items() if is_ref)
    assert len(refs) >= 2  # several keys refer to the one data file of step 1
    os.remove(tmp_path / "step-0000000001" / shardckpt.read_manifest(tmp_path / "step-0000000001").files[0].data)
    report = verify_checkpoint(tmp_path / "step-0000000002", full=False)
    assert sorted(p.key for p in report.problems if p.kind == "reference") == refs
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "CLI.md"), encoding="utf-8").read()
    src = open(os.path.join(os.path.dirname(shardckpt.__file__), "loading", "verify.py"), encoding="utf-8").read()
    kinds = set(re.findall(r'(?:Problem|_problem)\(\s*"(\w+)"', src)) | {"checksum", "corrupt"}
    listed = doc.split("each with its kind", 1)[1].split("key, file", 1)[0]
    assert kinds - {k for k in kinds if f"`{k}`" in listed} == set(), "kinds verify reports but docs/CLI.md omits"


def test_verifying_a_retired_step_does_not_call_it_a_save_that_never_committed(tmp_path, capsys):
    from shardckpt.tools import cli
    st = _state()
    with CheckpointManager(tmp_path, incremental=True, keep_last=1, async_save=False,
                           preemption_signals=()) as mgr:
        for step in (1, 2):
            _train(st, step)
            mgr.save(step, st)
    assert not (tmp_path / "step-0000000001" / "manifest.json").exists()  # retired; step 2 refers to its data
    assert cli.main(["verify", str(tmp_path / "step-0000000001")]) == 2
    err = capsys.readouterr().err
    assert "IncompleteCheckpointError" in err and "retired" in err and "shardckpt ls" in err

"""shardckpt.integrations.dcp.Writer / Reader under torch.distributed.checkpoint's own usage patterns: FSDP2 model +
optimizer through get_state_dict / set_state_dict, save at 2 ranks, load at 2 and (resharded) 3 ranks,
bit-exact; a failing rank commits nothing; the result is an ordinary shardckpt checkpoint. Drop-in details
FileSystemWriter/Reader callers rely on: overwrite (default True, crash-safe here), overwrite=False refusal,
StorageMeta save_id/load_id, torch.Size and bytearray values keeping their types."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

import shardckpt
from shardckpt.integrations import dcp as sdcp
from harness import run_ranks


def _model_and_opt(ws: int, seed: int, train: bool = True):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (ws,))
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7, bias=False),
                            torch.nn.LayerNorm(7))
    for layer in m:
        if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2 * (seed + 1))
    if train:
        g = torch.Generator().manual_seed(1234)
        for _ in range(2):
            m(torch.randn(4, 16, generator=g)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    return m, opt


def _full(state):
    """Full (gathered) copies of every tensor of a nested state, plain values as they are."""
    from torch.distributed.tensor import DTensor
    if isinstance(state, dict):
        return {k: _full(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_full(v) for v in state]
    if isinstance(state, DTensor):
        return state.full_tensor().clone()
    if isinstance(state, torch.Tensor):
        return state.clone()
    return state


def _pack(state):
    """Tensors as (dtype, shape, bytes): results cross the process boundary by value, not by shared fd."""
    if isinstance(state, dict):
        return {k: _pack(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_pack(v) for v in state]
    if isinstance(state, torch.Tensor):
        t = state.contiguous()
        return ("tensor", str(t.dtype).split(".")[1], list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return state


def _unpack(state):
    if isinstance(state, dict):
        return {k: _unpack(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_unpack(v) for v in state]
    if isinstance(state, tuple) and len(state) == 4 and state[0] == "tensor":
        raw = torch.frombuffer(bytearray(state[3]), dtype=torch.uint8) if state[3] else torch.empty(0, dtype=torch.uint8)
        return raw.view(getattr(torch, state[1])).reshape(state[2])
    return state


def _state(m, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(m, opt)
    return {"model": msd, "optim": osd, "extra": {"epoch": 3, "tag": "run-a", "betas": (0.9, 0.95)}}


def _save_then_load(rank, ws, root):
    """Save through Writer (and FileSystemWriter for reference), check a failing save commits nothing, then
    load into a differently initialised model at the same world size."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import set_state_dict
    m, opt = _model_and_opt(ws, seed=0)
    state = _state(m, opt)
    ref = _full(state)
    dcp.save(state, storage_writer=sdcp.Writer(os.path.join(root, "sc")))
    dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(root, "fs")))

    class Failing(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if dist.get_rank() == 1 and write_item.type.name != "BYTE_IO":
                raise OSError("disk on fire")
            return super().resolve_data(write_item)

    failed = None
    try:
        dcp.save(state, storage_writer=sdcp.Writer(os.path.join(root, "failed")), planner=Failing())
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        failed = type(e).__name__
    exists_refused = None
    try:
        dcp.save(state, storage_writer=sdcp.Writer(os.path.join(root, "sc"), overwrite=False))
    except BaseException as e:
        exists_refused = "CheckpointExistsError" in str(e)
    old_save_id = shardckpt.read_manifest(os.path.join(root, "sc")).save_id
    dist.barrier()
    dcp.save(state, storage_writer=sdcp.Writer(os.path.join(root, "sc")))  # overwrite=True, FileSystemWriter's default

    m2, opt2 = _model_and_opt(ws, seed=5)
    state2 = _state(m2, opt2)
    state2["extra"] = {"epoch": 0, "tag": "", "betas": (0.0, 0.0)}
    reader = sdcp.Reader(os.path.join(root, "sc"))
    dcp.load(state2, storage_reader=reader)
    set_state_dict(m2, opt2, model_state_dict=state2["model"], optim_state_dict=state2["optim"])
    got = _full(_state(m2, opt2))
    got["extra"] = state2["extra"]
    dist.barrier()
    return {"ref": _pack(ref), "got": _pack(got), "failed": failed, "exists_refused": exists_refused,
            "bytes_read": reader.stats.bytes_read, "old_save_id": old_save_id}


def _load_only(rank, ws, path, use_shardckpt_reader):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    m, opt = _model_and_opt(ws, seed=7)
    state = _state(m, opt)
    reader = sdcp.Reader(path) if use_shardckpt_reader else dcp.FileSystemReader(path)
    dcp.load(state, storage_reader=reader)
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out = _full(_state(m, opt))
    out["extra"] = state["extra"]
    return _pack(out)


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dcp"))
    results = run_ranks(2, _save_then_load, root)
    for r in results:
        r["ref"], r["got"] = _unpack(r["ref"]), _unpack(r["got"])
    return root, results


def test_fsdp2_save_load_same_world_size_bit_exact(saved):
    _, results = saved
    r = results[0]
    _assert_same(r["ref"]["model"], r["got"]["model"], "model")
    _assert_same(r["ref"]["optim"], r["got"]["optim"], "optim")
    assert r["got"]["extra"] == {"epoch": 3, "tag": "run-a", "betas": (0.9, 0.95)}
    assert all(x["bytes_read"] > 0 for x in results)


def test_failing_rank_commits_nothing_and_existing_is_refused(saved):
    root, results = saved
    assert all(r["failed"] is not None for r in results)
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.read_manifest(os.path.join(root, "failed"))
    assert all(r["exists_refused"] for r in results)


def test_two_rank_overwrite_replaces_and_frees_the_old_data(saved):
    """The default Writer saved again over "sc" at 2 ranks: a new save_id, both ranks' files beside nothing
    else (the replaced checkpoint's data is gone), and the load above read the new one bit-exact."""
    root, results = saved
    m = shardckpt.read_manifest(os.path.join(root, "sc"))
    assert m.save_id != results[0]["old_save_id"]
    assert os.listdir(os.path.join(root, "sc", "data")) == [m.save_id]
    assert len({f.rank for f in m.files}) == 2


def test_reshard_load_at_three_ranks(saved):
    root, results = saved
    ref = results[0]["ref"]
    got = _unpack(run_ranks(3, _load_only, os.path.join(root, "sc"), True)[0])
    _assert_same(ref["model"], got["model"], "model")
    _assert_same(ref["optim"], got["optim"], "optim")
    assert got["extra"]["tag"] == "run-a"


def test_written_checkpoint_is_a_shardckpt_checkpoint(saved):
    """load_full, verify and the DCP reference checkpoint agree with what was saved."""
    from shardckpt.tools.cli import verify_checkpoint
    root, results = saved
    ref = results[0]["ref"]
    full = shardckpt.load_full(os.path.join(root, "sc"))
    for k, v in ref["model"].items():
        assert torch.equal(full[f"model.{k}"], v), k
    assert full["extra.tag"] == "run-a" and full["extra.betas"] == (0.9, 0.95)
    m = shardckpt.read_manifest(os.path.join(root, "sc"))
    assert m.world_size == 2 and m.user_metadata["dcp"]["format"] == "shardckpt-dcp"
    assert len({f.rank for f in m.files}) == 2  # both ranks wrote their shards
    rep = verify_checkpoint(os.path.join(root, "sc"))
    assert rep.ok, rep.problems
    # DCP's own FileSystemWriter checkpoint of the same state imports to identical tensors
    from shardckpt.tools.export import load_dcp
    fs = load_dcp(os.path.join(root, "fs"))
    for k, v in ref["model"].items():
        assert torch.equal(fs["model"][k], v), k


def test_single_process_roundtrip_and_corruption(tmp_path):
    """no process group: plain tensors, nested values, odd dtypes; a flipped byte raises ChecksumError."""
    state = {"w": torch.randn(257, 129), "h": torch.randn(31).to(torch.bfloat16), "i": torch.arange(11),
             "s": torch.tensor(3.5), "b": torch.rand(5) > 0.5, "cfg": {"name": "x", "obj": {1, 2}}}
    path = str(tmp_path / "c")
    dcp.save(state, storage_writer=sdcp.Writer(path, frame_size=4096))
    out = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None) for k, v in state.items()
           if k != "cfg"}
    out["cfg"] = {"name": "", "obj": None}
    dcp.load(out, storage_reader=sdcp.Reader(path))
    for k in ("w", "h", "i", "s", "b"):
        assert torch.equal(out[k], state[k]), k
    assert out["cfg"] == {"name": "x", "obj": {1, 2}}  # a non-JSON object travels as DCP's torch.save bytes
    assert sdcp.Reader.validate_checkpoint_id(path) and not sdcp.Reader.validate_checkpoint_id(str(tmp_path))
    m = shardckpt.read_manifest(path)
    data = os.path.join(path, m.files[0].data)
    with open(data, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(BaseException, match="ChecksumError|checksum"):
        dcp.load(out, storage_reader=sdcp.Reader(path))


def _small_state(scale: float) -> dict:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale, "step": int(scale)}


def _load_small(path: str) -> dict:
    out = {"w": torch.zeros(3, 4), "step": -1}
    dcp.load(out, storage_reader=sdcp.Reader(path))
    return out


def test_overwrite_is_the_default_and_frees_the_old_data(tmp_path):
    """As FileSystemWriter: a second save into the same path replaces the checkpoint, also when one Writer
    instance is reused without reset (it must not reuse the old save's data directory)."""
    path = str(tmp_path / "c")
    writer = sdcp.Writer(path)
    dcp.save(_small_state(1.0), storage_writer=writer)
    first = shardckpt.read_manifest(path).save_id
    dcp.save(_small_state(2.0), storage_writer=writer)
    second = shardckpt.read_manifest(path).save_id
    assert second != first and writer.save_id == second
    got = _load_small(path)
    assert torch.equal(got["w"], _small_state(2.0)["w"]) and got["step"] == 2
    assert os.listdir(os.path.join(path, "data")) == [second]
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]


def test_overwrite_false_refuses_and_keeps_the_checkpoint(tmp_path):
    path = str(tmp_path / "c")
    dcp.save(_small_state(1.0), storage_writer=sdcp.Writer(path))
    before = shardckpt.read_manifest(path).save_id
    with pytest.raises(BaseException, match="CheckpointExistsError"):  # DCP wraps it in CheckpointException
        dcp.save(_small_state(2.0), storage_writer=sdcp.Writer(path, overwrite=False))
    assert shardckpt.read_manifest(path).save_id == before
    assert os.listdir(os.path.join(path, "data")) == [before]
    assert _load_small(path)["step"] == 1


_CRASH_SCRIPT = """
import sys, torch, torch.distributed.checkpoint as dcp, shardckpt.dcp as sdcp
from shardckpt.storage.local import LocalStorage
path, where = sys.argv[1], sys.argv[2]
dcp.save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 1}, storage_writer=sdcp.Writer(path))
if where == "after_replace":  # die when the replaced checkpoint's data is about to be deleted
    import os, signal
    LocalStorage.delete_tree = lambda self, rel="": os.kill(os.getpid(), signal.SIGKILL)
dcp.save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * 2, "step": 2}, storage_writer=sdcp.Writer(path))
"""


@pytest.mark.parametrize("where", ["before_replace", "after_replace"])
def test_overwrite_crash_leaves_one_checkpoint_loadable(tmp_path, where):
    """SIGKILL of the coordinator while overwriting. Before the manifest is replaced (new data durable
    beside the old: fault point "manifest" of the second save) the old checkpoint loads; once it is
    replaced (killed as the old data is about to go) the new one loads. Never neither."""
    path = str(tmp_path / "c")
    env = dict(os.environ, SHARDCKPT_FAULT="manifest:0:kill:2" if where == "before_replace" else "")
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, path, where], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(os.listdir(os.path.join(path, "data"))) == 2  # the two saves' data side by side
    got = _load_small(path)
    want = 1 if where == "before_replace" else 2
    assert got["step"] == want and torch.equal(got["w"], _small_state(float(want))["w"])
    from shardckpt.tools.cli import verify_checkpoint
    assert verify_checkpoint(path).ok


def test_storage_meta_save_id_and_load_id(tmp_path):
    """As FileSystemReader: StorageMeta names the checkpoint, the save (Writer.save_id) and this load
    (Reader.load_id, fresh per reset)."""
    path = str(tmp_path / "c")
    writer = sdcp.Writer(path)
    dcp.save(_small_state(1.0), storage_writer=writer)
    reader = sdcp.Reader(path)
    sm = reader.read_metadata().storage_meta
    assert str(sm.checkpoint_id) == path and sm.save_id == writer.save_id
    assert sm.load_id is not None and sm.load_id == reader.load_id
    first = reader.load_id
    reader.reset(path)
    assert reader.load_id != first and reader.read_metadata().storage_meta.load_id == reader.load_id


def test_torch_size_and_bytearray_keep_their_types(tmp_path):
    path = str(tmp_path / "c")
    state = {"w": torch.ones(2), "shape": torch.Size([3, 4]), "blob": bytearray(b"\x00ab"),
             "mixed": (torch.Size([1]), b"raw", bytearray(b"z"), [torch.Size([])])}
    dcp.save(state, storage_writer=sdcp.Writer(path))
    out = {"w": torch.zeros(2), "shape": None, "blob": None, "mixed": None}
    dcp.load(out, storage_reader=sdcp.Reader(path))
    assert type(out["shape"]) is torch.Size and out["shape"] == torch.Size([3, 4])
    assert type(out["blob"]) is bytearray and out["blob"] == bytearray(b"\x00ab")
    m = out["mixed"]
    assert type(m) is tuple and type(m[0]) is torch.Size and type(m[1]) is bytes and type(m[2]) is bytearray
    assert type(m[3]) is list and type(m[3][0]) is torch.Size and m == state["mixed"]
    # the manifest values stay plain typed JSON (tuple / bytes) for every other reader
    full = shardckpt.load_full(path)
    assert full["shape"] == (3, 4) and full["blob"] == b"\x00ab"


def test_bad_py_types_record_is_a_format_error(tmp_path):
    """A py_types mark that does not fit its value is refused with FormatError (never a silent retype)."""
    from shardckpt.integrations.dcp import _restore_types
    assert _restore_types((2, 3), [["torch.Size"]], "k") == torch.Size([2, 3])
    for value, marks in [("ab", [["bytearray"]]), ((1, -2), [["torch.Size"]]), ([1], [[5, "torch.Size"]]),
                         ((1,), [["pickle"]]), ((1,), ["torch.Size"])]:
        with pytest.raises(shardckpt.FormatError):
            _restore_types(value, marks, "k")


@pytest.mark.parametrize("url", ["local", "memory"])
def test_storage_replace(tmp_path, url):
    """Storage.replace creates or atomically replaces a file and leaves no temp file behind."""
    from shardckpt.storage import storage_for
    st = storage_for(str(tmp_path / "s") if url == "local" else f"memory://replace-{os.getpid()}/s")
    st.replace("manifest.json", b"one")
    assert st.read_file("manifest.json") == b"one"
    st.replace("manifest.json", b"two")
    assert st.read_file("manifest.json") == b"two"
    assert st.list_files() == ["manifest.json"]
    st.delete_tree()


def test_failed_replace_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """The store refuses the manifest replace: SaveError, the old checkpoint still loads, the new save's
    data (certainly uncommitted: the manifest read back is the old one) is removed."""
    from shardckpt.errors import StorageError
    from shardckpt.storage.local import LocalStorage
    path = str(tmp_path / "c")
    dcp.save(_small_state(1.0), storage_writer=sdcp.Writer(path))
    old = shardckpt.read_manifest(path).save_id

    def refuse(self, relpath, data):
        raise StorageError("replace failed: disk full", file=relpath)
    monkeypatch.setattr(LocalStorage, "replace", refuse)
    with pytest.raises(BaseException, match="SaveError"):
        dcp.save(_small_state(2.0), storage_writer=sdcp.Writer(path))
    assert shardckpt.read_manifest(path).save_id == old
    assert os.listdir(os.path.join(path, "data")) == [old]
    assert _load_small(path)["step"] == 1

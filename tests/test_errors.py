"""Typed errors naming key, file and rank; nothing committed when a save fails; committed data never harmed."""
from __future__ import annotations

import json
import os

import pytest
import torch

import shardckpt
from harness import run_ranks
from shardckpt.native import kernels as _ext
from shardckpt.format.records import canonical_json


def _state():
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g).bfloat16(), "step": 3}


def test_load_of_uncommitted_checkpoint_raises(tmp_path):
    p = tmp_path / "c"
    shardckpt.save(_state(), p)
    os.unlink(p / "manifest.json")
    with pytest.raises(shardckpt.IncompleteCheckpointError, match="never committed"):
        shardckpt.load(_state(), p)
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.read_manifest(tmp_path / "nothing-here")


def test_strict_and_non_strict_keys(tmp_path):
    p = tmp_path / "c"
    shardckpt.save(_state(), p)
    st = _state()
    st["extra"] = torch.zeros(2)
    del st["b"]
    with pytest.raises(shardckpt.KeyMismatchError) as e:
        shardckpt.load(st, p)
    assert e.value.missing == ["extra"] and e.value.unexpected == ["b"]
    st["w"].zero_()
    r = shardckpt.load(st, p, strict=False)
    assert r.missing_keys == ["extra"] and r.unexpected_keys == ["b"]
    assert torch.equal(st["w"], _state()["w"])


def test_shape_and_dtype_mismatch_name_the_key(tmp_path):
    p = tmp_path / "c"
    shardckpt.save(_state(), p)
    st = _state()
    st["w"] = torch.zeros(64, 34)
    with pytest.raises(shardckpt.ShapeMismatchError, match="'w'"):
        shardckpt.load(st, p)
    st = _state()
    st["b"] = torch.zeros(33)
    with pytest.raises(shardckpt.DtypeMismatchError, match="'b'"):
        shardckpt.load(st, p)
    shardckpt.load(st, p, convert_dtype=True)
    assert torch.equal(st["b"], _state()["b"].float())


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    p = tmp_path / "c"
    shardckpt.save(_state(), p)
    before = (p / "manifest.json").read_bytes()
    other = _state()
    other["w"] += 1
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.save(other, p)
    assert (p / "manifest.json").read_bytes() == before
    assert torch.equal(shardckpt.load_full(p)["w"], _state()["w"])


def test_unsupported_values_are_refused_not_pickled(tmp_path):
    with pytest.raises(shardckpt.UnsupportedValueError, match="'obj'"):
        shardckpt.save({"obj": object()}, tmp_path / "c")
    assert not (tmp_path / "c" / "manifest.json").exists()


def _rewrite_manifest(path, mutate):
    m = json.loads((path / "manifest.json").read_bytes())
    m.pop("manifest_crc32c")
    mutate(m)
    m["manifest_crc32c"] = _ext.crc32c(canonical_json(m))
    (path / "manifest.json").write_bytes(json.dumps(m).encode())


def test_unknown_major_version_is_rejected(tmp_path):
    p = tmp_path / "c"
    shardckpt.save(_state(), p)
    _rewrite_manifest(p, lambda m: m.update(format_version="3.0"))
    with pytest.raises(shardckpt.UnsupportedVersionError, match="3.0"):
        shardckpt.read_manifest(p)


def test_manifest_bit_flip_is_detected(tmp_path):
    p = tmp_path / "c"
    shardckpt.save(_state(), p)
    data = bytearray((p / "manifest.json").read_bytes())
    i = data.index(b'"shape"') + 12
    data[i] = ord("7") if data[i] != ord("7") else ord("8")
    (p / "manifest.json").write_bytes(bytes(data))
    with pytest.raises((shardckpt.ChecksumError, shardckpt.FormatError)):
        shardckpt.read_manifest(p)


def test_corrupt_frame_names_key_and_file(tmp_path):
    p = tmp_path / "c"
    shardckpt.save({"w": torch.randn(300, 300)}, p)
    data_file = next((p / "data").rglob("*.bin"))
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data_file.write_bytes(bytes(raw))
    with pytest.raises(shardckpt.ChecksumError) as e:
        shardckpt.load_full(p)
    assert e.value.key == "w" and e.value.file.endswith(".bin")


def _rank_fails_mid_write(rank, ws, path):
    from shardckpt.saving import pipeline
    if rank == 1:
        def boom(*a, **k):
            raise OSError(28, "No space left on device")
        pipeline.write_rank = boom
    with pytest.raises(shardckpt.SaveError) as e:
        shardckpt.save(_state(), path)
    assert e.value.rank == 1 and "No space" in str(e.value)
    return os.path.exists(os.path.join(path, "manifest.json"))


def _plan_mismatch(rank, ws, path):
    st = _state()
    if rank == 1:
        st["w"] = torch.zeros(65, 33)
    with pytest.raises(shardckpt.PlanMismatchError) as e:
        shardckpt.save(st, path)
    assert e.value.rank == 1
    return True


def _dead_rank_times_out(rank, ws, path):
    import time
    if rank == 1:
        time.sleep(8)  # stops responding: never joins the commit
        return None
    t0 = time.monotonic()
    with pytest.raises(shardckpt.CoordinationError):
        shardckpt.save(_state(), path, timeout_s=3)
    return time.monotonic() - t0


def test_failed_saves_commit_nothing_on_any_rank(tmp_path):
    committed = run_ranks(2, _rank_fails_mid_write, str(tmp_path / "a"))
    assert committed == [False, False]
    assert run_ranks(2, _plan_mismatch, str(tmp_path / "b")) == [True, True]
    assert not (tmp_path / "b" / "manifest.json").exists()
    waited = run_ranks(2, _dead_rank_times_out, str(tmp_path / "c"))
    assert waited[0] < 8 and not (tmp_path / "c" / "manifest.json").exists()
    # the failed save left nothing that blocks the next one
    shardckpt.save(_state(), tmp_path / "a")
    assert torch.equal(shardckpt.load_full(tmp_path / "a")["w"], _state()["w"])


def test_weights_only_from_a_training_state_checkpoint(tmp_path):
    p = tmp_path / "c"
    shardckpt.save({"model": {"w": torch.arange(6.0)}, "optim": {"state": {"m": torch.ones(6)}}, "step": 4}, p)
    weights = {"w": torch.zeros(6)}
    r = shardckpt.load(weights, p, prefix="model.")  # strict: optimizer keys are out of scope, not unexpected
    assert torch.equal(weights["w"], torch.arange(6.0)) and r.unexpected_keys == []
    with pytest.raises(shardckpt.KeyMismatchError):
        shardckpt.load({"w": torch.zeros(6), "v": torch.zeros(1)}, p, prefix="model.")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("make, what", [(lambda: torch.eye(3).to_sparse(), "sparse"),
                                        (lambda: torch.eye(3).to_sparse_csr(), "sparse"),
                                        (lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
                                         "quantized")])
def test_unsupported_tensor_kinds_name_the_key_and_what_is_supported(tmp_path, make, what):
    """Before: SaveError around a RuntimeError (sparse), FormatError without a key (quantized)."""
    with pytest.raises(shardckpt.UnsupportedValueError, match=f"{what}.*dense \\(strided\\) tensors") as e:
        shardckpt.save({"m": {"w": make()}, "ok": torch.ones(2)}, tmp_path / "c")
    assert e.value.key == "m.w"
    assert not (tmp_path / "c" / "manifest.json").exists()

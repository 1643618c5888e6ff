"""One verifier: a bad frame is the same typed error whether load, `shardckpt verify` or
CheckpointManager.restore finds it (ChecksumError for bytes that fail their crc32c, CorruptDataError for
bytes that pass it but do not decode), and the error names the data file in full; KeyMismatchError says
what to do."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import shardckpt
from shardckpt.native import kernels as _ext
from shardckpt.tools import cli
from shardckpt.loading.load import read_chunks
from shardckpt.manager.checkpoint_manager import CheckpointManager, step_dir, verify_checkpoint
from shardckpt.storage import storage_for


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 256, generator=g), "step": seed}


@pytest.fixture
def bad_root(tmp_path):
    """A manager root with step 1 good and step 2 holding one flipped byte in frame 1 of "w"."""
    m = CheckpointManager(tmp_path, async_save=False, preemption_signals=(), frame_size=64 << 10)
    for s in (1, 2):
        m.save(s, _state(s))
    m.close()
    path = tmp_path / step_dir(2)
    man = shardckpt.read_manifest(path)
    frame = read_chunks(storage_for(str(path)), man)["w"][0].frames[1]
    data = path / man.files[0].data
    raw = bytearray(data.read_bytes())
    raw[frame.offset + 7] ^= 0x10
    data.write_bytes(bytes(raw))
    return tmp_path, path, man.files[0].data


def _errors_from_every_path(root, path, capsys, caplog):
    """The error class each path reports for checkpoint `path` under manager root `root`."""
    found = {}
    with pytest.raises(shardckpt.CheckpointError) as e:
        shardckpt.load_full(path)
    found["load"] = type(e.value).__name__
    found["load_file"] = e.value.file
    capsys.readouterr()
    assert cli.main(["verify", str(path), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert len(problems) == 1
    found["cli"] = problems[0]["error"]
    found["cli_kind"] = problems[0]["kind"]
    found["manager_verify"] = verify_checkpoint(path, full=True)[0].split(":")[0]
    for verify in ("full", "index"):  # full: the verifier finds it; index: the restore's load does
        m = CheckpointManager(root, async_save=False, preemption_signals=(), verify=verify)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shardckpt"):
            assert m.restore(_state(-1)) == 1
        m.close()
        text = caplog.text
        found[f"restore_{verify}"] = next(c for c in ("ChecksumError", "CorruptDataError") if c in text)
    return found


def test_flipped_byte_is_checksum_error_everywhere(bad_root, capsys, caplog):
    root, path, data = bad_root
    found = _errors_from_every_path(root, path, capsys, caplog)
    assert found["load"] == found["cli"] == found["manager_verify"] == "ChecksumError"
    assert found["restore_full"] == found["restore_index"] == "ChecksumError" and found["cli_kind"] == "checksum"
    assert found["load_file"] == f"{path}/{data}"  # names the checkpoint, not only the file inside it


def test_frame_that_does_not_decode_is_corrupt_data_error_everywhere(bad_root, capsys, caplog, monkeypatch):
    """Bytes that pass their crc32c but do not decode (a codec bug, or a crafted frame): the kernel reports
    reason "corrupt", and every path calls it CorruptDataError (the manager used to say ChecksumError)."""
    root, path, _ = bad_root
    real = _ext.decode_frames

    def decode(*args):  # the flipped frame, as if its crc32c had matched and zstd then refused it
        try:
            return real(*args)
        except _ext.FrameError as e:
            raise _ext.FrameError(e.index, "corrupt", "injected") from None
    monkeypatch.setattr(_ext, "decode_frames", decode)
    found = _errors_from_every_path(root, path, capsys, caplog)
    assert found["load"] == found["cli"] == found["manager_verify"] == "CorruptDataError"
    assert found["restore_full"] == found["restore_index"] == "CorruptDataError" and found["cli_kind"] == "corrupt"


def test_key_mismatch_error_says_what_to_do(tmp_path):
    shardckpt.save({"w": torch.zeros(2)}, tmp_path / "c")
    with pytest.raises(shardckpt.KeyMismatchError) as e:
        shardckpt.load({"v": torch.zeros(2)}, tmp_path / "c")
    assert "strict=False" in str(e.value) and "key_map" in str(e.value)
    assert e.value.missing == ["v"] and e.value.unexpected == ["w"]

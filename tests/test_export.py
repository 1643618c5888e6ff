"""Export to (sharded) safetensors and torch.save; import from DCP, torch.save and safetensors; the
restricted DCP metadata unpickler; a tiny Hugging Face Llama loads an exported checkpoint."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import shardckpt
from shardckpt.tools import cli
from shardckpt.tools import export


def _state():
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(300, 70, generator=g), "h": torch.randn(70, generator=g).to(torch.bfloat16),
                      "ids": torch.arange(10), "mask": torch.rand(6, generator=g) > 0.5,
                      "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
                      "empty": torch.zeros(0, 3), "s": torch.tensor(2.5)},
            "optim": {"m": torch.randn(300, 70, generator=g)}, "step": 3}


def _eq(a, b):
    if a.dtype.itemsize == 1 and a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("exp") / "ck")
    shardckpt.save(_state(), p, frame_size=16 << 10)
    return p


def test_sharded_safetensors_load_with_the_safetensors_library(ckpt, tmp_path):
    import safetensors.torch as st
    out = tmp_path / "hf"
    code = cli.main(["export", ckpt, str(out), "--format", "safetensors", "--max-shard-size", "50KB"])
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).exists() for f in files)
    ref = shardckpt.load_full(ckpt)
    flat = {f"{a}.{b}": v for a, d in ref.items() if isinstance(d, dict) for b, v in d.items()}
    got = {}
    for f in files:
        got.update(st.load_file(str(out / f)))
    assert set(got) == set(flat) == set(index["weight_map"])
    for k, v in flat.items():
        assert _eq(got[k], v), k
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in flat.values())


def test_safetensors_single_file_keys_rename_dtype(ckpt, tmp_path):
    import safetensors.torch as st
    res = export.export_safetensors(ckpt, str(tmp_path), keys="model.", rename={"model.": ""}, dtype="bf16")
    assert res.files == ["model.safetensors"]
    got = st.load_file(str(tmp_path / "model.safetensors"))
    ref = shardckpt.load_full(ckpt)["model"]
    assert set(got) == set(ref)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], ref["w"].to(torch.bfloat16))
    assert got["ids"].dtype == torch.int64 and got["mask"].dtype == torch.bool  # only floats convert
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_torch_export_and_reimport_roundtrip(ckpt, tmp_path):
    out = str(tmp_path / "o.pt")
    assert cli.main(["export", ckpt, out, "--format", "torch"]) == 0
    sd = torch.load(out, weights_only=True)
    assert sd["step"] == 3 and _eq(sd["model.w"], shardckpt.load_full(ckpt)["model"]["w"])
    assert cli.main(["import", out, str(tmp_path / "back")]) == 0
    back = shardckpt.load_full(str(tmp_path / "back"))
    for k, v in sd.items():
        assert (v == back[k]) if not isinstance(v, torch.Tensor) else _eq(back[k], v), k


def test_import_sharded_safetensors_folder(ckpt, tmp_path):
    export.export_safetensors(ckpt, str(tmp_path / "hf"), max_shard_size=30_000)
    m = export.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "imp"))
    assert m.user_metadata["imported_from"]["kind"] == "safetensors"
    ref = shardckpt.load_full(ckpt)
    got = shardckpt.load_full(str(tmp_path / "imp"))
    for k, v in ref["model"].items():
        assert _eq(got[f"model.{k}"], v), k


def test_import_dcp_checkpoint_bit_exact(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp
    m = torch.nn.Linear(40, 30)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 40)).sum().backward()
    opt.step()
    state = {"model": m.state_dict(), "optim": opt.state_dict(), "step": 5, "bf": torch.randn(9).to(torch.bfloat16),
             "extra": {"name": "x", "t": (1, 2.0)}}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert cli.main(["import", str(tmp_path / "dcp"), str(tmp_path / "imp")]) == 0
    assert "imported dcp checkpoint" in capsys.readouterr().out
    got = shardckpt.load_full(str(tmp_path / "imp"))
    for k, v in m.state_dict().items():
        assert _eq(got["model"][k], v), k
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert _eq(got["optim"]["state"][str(pid)][k], v), (pid, k)
    assert got["optim"]["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]
    assert got["step"] == 5 and _eq(got["bf"], state["bf"]) and got["extra"] == {"name": "x", "t": (1, 2.0)}


def test_dcp_metadata_unpickler_refuses_foreign_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    d = tmp_path / "evil"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(shardckpt.FormatError, match="posix.system|os.system|refusing"):
        export.read_dcp_metadata(str(d))
    assert not marker.exists()


def test_safetensors_reader_rejects_bad_headers(tmp_path):
    bad = tmp_path / "bad.safetensors"
    head = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    bad.write_bytes(len(head).to_bytes(8, "little") + head + b"\0" * 16)
    with pytest.raises(shardckpt.FormatError, match="data_offsets"):
        export.read_safetensors(str(bad))
    head = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}).encode()
    bad.write_bytes(len(head).to_bytes(8, "little") + head + b"\0" * 16)
    with pytest.raises(shardckpt.FormatError, match="share bytes"):
        export.read_safetensors(str(bad))


def test_parse_size():
    # the one size parser (shardckpt.config, tests/test_config.py): binary units, as SHARDCKPT_POOL_BYTES reads
    assert export.parse_size("5GB") == 5 * 2**30 and export.parse_size("500MiB") == 500 * 2**20
    assert export.parse_size("1000") == 1000 and export.parse_size("1.5kb") == 1536
    with pytest.raises(shardckpt.errors.ConfigError, match="max_shard_size"):
        export.parse_size("5 gigs")


def test_exported_weights_load_into_a_transformers_llama(tmp_path):
    """A training-state checkpoint of a tiny Llama (model + optimizer) exports its model weights, renamed
    to HF names, into a folder that LlamaForCausalLM.from_pretrained loads to identical parameters."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 128, (2, 8))).logits.sum().backward()
    opt.step()
    shardckpt.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 1}, str(tmp_path / "ck"))
    out = tmp_path / "hf"
    assert cli.main(["export", str(tmp_path / "ck"), str(out), "--keys", "model.", "--rename", "model.=",
                     "--max-shard-size", "40KB"]) == 0
    cfg.save_pretrained(str(out))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out))
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_export_refuses_an_earlier_export_and_overwrite_leaves_no_stale_shards(ckpt, tmp_path, capsys):
    """A second export into a folder holding one is refused (nothing touched); --overwrite leaves exactly
    the new export beside the user's other files: no stale shards, no stale index pointing at them."""
    import safetensors.torch as st
    out = tmp_path / "hf"
    assert cli.main(["export", ckpt, str(out), "--max-shard-size", "50KB"]) == 0
    (out / "config.json").write_text("{}")
    first = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in first and len(first) > 3
    capsys.readouterr()
    assert cli.main(["export", ckpt, str(out), "--keys", "model.w"]) == 2
    err = capsys.readouterr().err
    assert "CheckpointExistsError" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == first
    with pytest.raises(shardckpt.CheckpointExistsError):
        export.export_safetensors(ckpt, str(out), keys="model.w")
    assert cli.main(["export", ckpt, str(out), "--keys", "model.w", "--overwrite"]) == 0
    assert "removed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert set(st.load_file(str(out / "model.safetensors"))) == {"model.w"}
    # and the other way: a sharded export over a single-file one must not leave model.safetensors behind
    res = export.export_safetensors(ckpt, str(out), max_shard_size=50_000, overwrite=True)
    assert "model.safetensors" in res.removed
    assert sorted(p.name for p in out.iterdir()) == sorted(first)


def test_torch_export_refuses_an_existing_file(ckpt, tmp_path):
    out = tmp_path / "o.pt"
    out.write_bytes(b"mine")
    assert cli.main(["export", ckpt, str(out), "--format", "torch"]) == 2
    assert out.read_bytes() == b"mine"
    assert cli.main(["export", ckpt, str(out), "--format", "torch", "--overwrite"]) == 0
    assert torch.load(out, weights_only=True)["step"] == 3


def test_safetensors_export_says_which_values_it_left_out(ckpt, tmp_path, capsys):
    res = export.export_safetensors(ckpt, str(tmp_path / "a"))
    assert res.skipped == ["step"]
    assert export.export_safetensors(ckpt, str(tmp_path / "b"), keys="model.").skipped == []
    assert cli.main(["export", ckpt, str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "left out 1 non-tensor value(s)" in out and "step" in out
    assert cli.main(["export", ckpt, str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == ["step"]


def test_export_keys_that_select_nothing_is_an_error_and_writes_nothing(ckpt, tmp_path, capsys):
    """Issue 22 item 10: `export --keys nomatch` wrote an empty model.safetensors and exited 0."""
    for fmt, out in (("safetensors", tmp_path / "st"), ("torch", tmp_path / "o.pt")):
        code = cli.main(["export", ckpt, str(out), "--keys", "nomatch", "--format", fmt])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: KeyMismatchError") and "'nomatch'" in err and "model." in err
        assert not out.exists()
    with pytest.raises(shardckpt.KeyMismatchError, match="nomatch"):
        export.export_torch(ckpt, str(tmp_path / "x.pt"), keys=["nomatch"])


def test_export_argument_mistakes_are_one_line_errors(ckpt, tmp_path, capsys):
    """`--rename bad` said "dictionary update sequence element #0"; a directory as a torch export's OUT was
    told to pass --overwrite, which then failed with "Is a directory"."""
    assert cli.main(["export", ckpt, str(tmp_path / "a"), "--rename", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ConfigError" in err and "'bad' is not OLD=NEW" in err
    (tmp_path / "d").mkdir()
    for extra in ([], ["--overwrite"]):
        assert cli.main(["export", ckpt, str(tmp_path / "d"), "--format", "torch"] + extra) == 2
        err = capsys.readouterr().err
        assert "ConfigError" in err and "is a directory" in err and "--overwrite" not in err
    assert list((tmp_path / "d").iterdir()) == []


def test_a_failed_export_leaves_no_empty_directory_and_no_half_export(tmp_path):
    p = tmp_path / "ck"
    shardckpt.save(_state(), str(p), frame_size=16 << 10)
    m = shardckpt.read_manifest(str(p))
    data = p / m.files[0].data
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF  # a frame near the end: the export fails after writing some shards
    data.write_bytes(bytes(raw))
    with pytest.raises((shardckpt.ChecksumError, shardckpt.CorruptDataError)):
        export.export_safetensors(str(p), str(tmp_path / "new"), max_shard_size=20_000)
    assert not (tmp_path / "new").exists()  # it created the directory: gone again
    keep = tmp_path / "hf"
    keep.mkdir()
    (keep / "config.json").write_text("{}")
    with pytest.raises((shardckpt.ChecksumError, shardckpt.CorruptDataError)):
        export.export_safetensors(str(p), str(keep), max_shard_size=20_000)
    assert sorted(f.name for f in keep.iterdir()) == ["config.json"]  # the user's file stays, no shard does

"""Transfer learning with shardckpt.load: non-strict loads report missing/unexpected keys, key maps (prefix,
regex, callable), key filters, dtype conversion, and loading only the weights of a training-state checkpoint."""
from __future__ import annotations

import pytest
import torch

import shardckpt


def _net(seed=0, out=5):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, out))


@pytest.fixture
def training_ckpt(tmp_path):
    net = _net()
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(3, 8)).sum().backward()
    opt.step()
    path = str(tmp_path / "train")
    shardckpt.save({"model": net.state_dict(), "optim": opt.state_dict(), "step": 11}, path)
    return path, net


def test_weights_only_from_training_state(training_ckpt):
    path, net = training_ckpt
    fresh = _net(seed=1)
    sd = fresh.state_dict()
    with pytest.raises(shardckpt.KeyMismatchError) as e:
        shardckpt.load(sd, path, key_map={"": "model."})  # strict: the optimizer's keys are unexpected
    assert any(k.startswith("optim.") for k in e.value.unexpected) and not e.value.missing
    res = shardckpt.load(sd, path, key_map={"": "model."}, strict=False)
    assert res.missing_keys == [] and "step" in res.unexpected_keys
    assert any(k.startswith("optim.state") for k in res.unexpected_keys)
    for k, v in net.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_non_strict_reports_missing_and_unexpected(training_ckpt):
    path, net = training_ckpt
    bigger = _net(seed=2, out=5)
    state = {"model": bigger.state_dict(), "new_head": torch.zeros(4)}
    res = shardckpt.load(state, path, strict=False)
    assert res.missing_keys == ["new_head"]
    assert "step" in res.unexpected_keys and any(k.startswith("optim.") for k in res.unexpected_keys)
    assert torch.equal(state["model"]["0.weight"], net.state_dict()["0.weight"])
    assert torch.equal(state["new_head"], torch.zeros(4))


def test_key_filter_loads_a_subset(training_ckpt):
    path, net = training_ckpt
    fresh = _net(seed=3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    state = {"model": fresh.state_dict()}
    shardckpt.load(state, path, keys="model.0.*", strict=False)
    assert torch.equal(state["model"]["0.weight"], net.state_dict()["0.weight"])
    assert torch.equal(state["model"]["2.weight"], before["2.weight"])  # filtered out: untouched


def test_regex_and_callable_key_maps(training_ckpt):
    path, net = training_ckpt
    renamed = {"encoder.layer0.weight": torch.zeros(16, 8), "encoder.layer2.bias": torch.zeros(5)}
    res = shardckpt.load(renamed, path, key_map={r"re:^encoder\.layer(\d+)\.": r"model.\1."}, strict=False)
    assert not res.missing_keys
    assert torch.equal(renamed["encoder.layer0.weight"], net.state_dict()["0.weight"])
    assert torch.equal(renamed["encoder.layer2.bias"], net.state_dict()["2.bias"])
    mapped = {"w0": torch.zeros(16, 8), "skip": torch.ones(2)}
    res = shardckpt.load(mapped, path, key_map=lambda k: {"w0": "model.0.weight"}.get(k), strict=False)
    assert torch.equal(mapped["w0"], net.state_dict()["0.weight"]) and torch.equal(mapped["skip"], torch.ones(2))


def test_dtype_conversion_on_load(training_ckpt):
    path, net = training_ckpt
    half = {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in net.state_dict().items()}
    with pytest.raises(shardckpt.DtypeMismatchError):
        shardckpt.load(half, path, key_map={"": "model."}, strict=False)
    shardckpt.load(half, path, key_map={"": "model."}, strict=False, convert_dtype=True)
    for k, v in net.state_dict().items():
        assert half[k].dtype == torch.bfloat16 and torch.equal(half[k], v.to(torch.bfloat16)), k


def test_shape_mismatch_is_an_error_even_when_not_strict(training_ckpt):
    path, _ = training_ckpt
    other = _net(seed=0, out=7).state_dict()  # the head has another shape
    with pytest.raises(shardckpt.ShapeMismatchError, match="2.weight"):
        shardckpt.load(other, path, key_map={"": "model."}, strict=False)

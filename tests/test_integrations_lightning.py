"""shardckpt.integrations.lightning with the real pytorch-lightning: ModelCheckpoint(monitor="val_loss",
save_top_k=2, save_last=True) keeps shardckpt checkpoints with top-k retention, and fit(ckpt_path=) resumes
bit-exactly (weights and optimizer state equal to an uninterrupted run); sync and async plugins, an fsspec
dirpath, DDP on 2 CPU processes (Lightning's own launcher, gloo), Lightning's containers rebuilt, and values
that would need pickle refused naming their key.

Run as a script (`python tests/test_integrations_lightning.py ddp DIR`), it is the DDP scenario Lightning
relaunches itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import shardckpt
from shardckpt.integrations.lightning import AsyncShardckptCheckpointIO, ShardckptCheckpointIO, last_checkpoint

EPOCHS = 4


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)]


def _data():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4), torch.utils.data.DataLoader(ds, batch_size=8)


def _fit(dirpath, epochs, plugin, ckpt_path=None, **trainer_kw):
    pl.seed_everything(0, verbose=False)
    model = Regressor()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         plugins=[plugin], callbacks=[ckpt], accelerator="cpu", **trainer_kw)
    train, val = _data()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model, trainer, ckpt


def _opt_state(trainer) -> dict:
    return trainer.optimizers[0].state_dict()["state"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_resumed_exactly(ref_model, ref_trainer, model, trainer):
    assert trainer.current_epoch == ref_trainer.current_epoch == EPOCHS
    assert trainer.global_step == ref_trainer.global_step
    assert _same(model.state_dict(), ref_model.state_dict())
    ref_opt, opt = _opt_state(ref_trainer), _opt_state(trainer)
    assert ref_opt.keys() == opt.keys() and all(_same(opt[k], ref_opt[k]) for k in opt)


@pytest.mark.parametrize("plugin_cls", [ShardckptCheckpointIO, AsyncShardckptCheckpointIO])
def test_model_checkpoint_top_k_last_and_bit_exact_resume(tmp_path, plugin_cls):
    ref_model, ref_trainer, _ = _fit(tmp_path / "ref", EPOCHS, plugin_cls())
    d = tmp_path / "run"
    _, _, ckpt = _fit(d, 2, plugin_cls())
    model, trainer, ckpt = _fit(d, EPOCHS, plugin_cls(), ckpt_path=str(d / "last.ckpt"))
    _assert_resumed_exactly(ref_model, ref_trainer, model, trainer)
    # top-k retention happened through remove_checkpoint: the 2 best and last.ckpt, each a shardckpt checkpoint
    names = sorted(os.listdir(d))
    assert len(names) == 3 and "last.ckpt" in names, names
    assert sorted(os.path.basename(p) for p in ckpt.best_k_models) == sorted(n for n in names if n != "last.ckpt")
    for n in names:
        assert (d / n).is_dir() and (d / n / "manifest.json").is_file()
        assert shardckpt.read_manifest(d / n).user_metadata["lightning"]["containers"]
    last = plugin_cls().load_checkpoint(d / "last.ckpt")
    assert last["epoch"] == EPOCHS - 1 and last["global_step"] == trainer.global_step
    assert type(last["state_dict"]) is OrderedDict  # Lightning's containers come back as themselves
    assert _same(last["state_dict"], model.state_dict())
    assert last["hyper_parameters"] == {"lr": 0.05, "width": 8}


def test_fsspec_dirpath(tmp_path):
    import fsspec
    url = "memory://shardckpt-lightning/run"
    try:
        _, trainer, ckpt = _fit(url, 2, ShardckptCheckpointIO())
        fs = fsspec.filesystem("memory")
        assert fs.exists(f"{url}/last.ckpt/manifest.json")
        back = ShardckptCheckpointIO().load_checkpoint(ckpt.best_model_path)
        assert back["global_step"] in (trainer.global_step, trainer.global_step // 2)
        # resume through last_checkpoint (ckpt_path="last" would miss the URL and start over)
        assert last_checkpoint(url) == f"{url}/last.ckpt" and last_checkpoint(url + "-none") is None

        class Epochs(pl.Callback):
            started: list = []

            def on_train_epoch_start(self, trainer, module):
                self.started.append(trainer.current_epoch)
        resumed = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             plugins=[ShardckptCheckpointIO()], accelerator="cpu", callbacks=[
                                 Epochs(), pl.callbacks.ModelCheckpoint(dirpath=url, save_last=True)])
        train, val = _data()
        resumed.fit(Regressor(), train, val, ckpt_path=last_checkpoint(url))
        assert Epochs.started == [2] and resumed.global_step == trainer.global_step * 3 // 2
    finally:
        fsspec.filesystem("memory").rm("/shardckpt-lightning", recursive=True)


def test_values_that_need_pickle_are_refused_naming_the_key(tmp_path):
    import argparse
    io = ShardckptCheckpointIO()
    ok = {"state_dict": OrderedDict(w=torch.ones(2)), "epoch": 0, "global_step": 3}
    for bad, key in [({"hyper_parameters": {"cfg": argparse.Namespace(a=1)}}, "hyper_parameters.cfg"),
                     ({"hyper_parameters": {"opt": torch.optim.SGD([torch.zeros(1, requires_grad=True)], 0.1)}},
                      "hyper_parameters.opt")]:
        with pytest.raises(shardckpt.UnsupportedValueError) as e:
            io.save_checkpoint({**ok, **bad}, tmp_path / "x.ckpt")
        assert e.value.key == key
        assert not (tmp_path / "x.ckpt" / "manifest.json").exists()
    io.save_checkpoint(ok, tmp_path / "x.ckpt")
    io.save_checkpoint({**ok, "global_step": 4}, tmp_path / "x.ckpt")  # replaced atomically, old data gone
    assert io.load_checkpoint(tmp_path / "x.ckpt")["global_step"] == 4
    assert len(os.listdir(tmp_path / "x.ckpt" / "data")) == 1
    io.remove_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_ddp_two_cpu_processes(tmp_path):
    """Lightning's ddp strategy relaunches this file as a script on 2 CPU processes (gloo); rank 0 saves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, "ddp", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["resumed_exactly"], out
    assert out["names"] == sorted(out["names"]) and len(out["names"]) == 3 and "last.ckpt" in out["names"]
    assert out["committed"] == 3


def _ddp_main(root: str) -> None:
    kw = dict(strategy="ddp", devices=2)
    ref_model, ref_trainer, _ = _fit(os.path.join(root, "ref"), EPOCHS, ShardckptCheckpointIO(), **kw)
    d = os.path.join(root, "run")
    _fit(d, 2, ShardckptCheckpointIO(), **kw)
    model, trainer, _ = _fit(d, EPOCHS, AsyncShardckptCheckpointIO(), ckpt_path=os.path.join(d, "last.ckpt"), **kw)
    try:
        _assert_resumed_exactly(ref_model, ref_trainer, model, trainer)
        ok = True
    except AssertionError:
        ok = False
    if trainer.is_global_zero:
        names = sorted(os.listdir(d))
        committed = sum(os.path.isfile(os.path.join(d, n, "manifest.json")) for n in names)
        with open(os.path.join(root, "result.json"), "w") as f:
            json.dump({"resumed_exactly": ok, "names": names, "committed": committed}, f)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ddp":
    torch.set_num_threads(1)
    _ddp_main(sys.argv[2])

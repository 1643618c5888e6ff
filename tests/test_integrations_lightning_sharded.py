"""shardckpt.integrations.lightning_sharded with the real pytorch-lightning: ShardckptModelParallelStrategy
training an FSDP2 (fully_shard over the "data_parallel" mesh) or tensor-parallel LightningModule on CPU with
gloo, under ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True).

Four launches, each running several scenarios (a process start costs seconds of `import torch`):
  two          2 processes: an uninterrupted 4-epoch run; a 2-epoch run resumed to 4 epochs with ckpt_path=
               (its gathered weights and optimizer state equal the uninterrupted run's, bit for bit); the
               kept checkpoints are shardckpt checkpoints with one data file per rank and each parameter's
               shards written by the rank that holds them; top-k retention deleted the others. Then a
               tensor-parallel run (a 1 x 2 mesh, parallelize_module).
  one          1 process: resumes from the 2-process FSDP run's last.ckpt and from the tensor-parallel one
               (resharded 2 -> 1, and TP -> FSDP): weights and optimizer state equal what the 2 processes
               held; Trainer.validate(ckpt_path=) (no optimizer) loads the weights; a short run with a
               memory:// dirpath; a 2-epoch run whose checkpoint reshard_two resumes.
  four         4 processes on a 2 x 2 (data x tensor) mesh, FSDP2 on top of TP: the same uninterrupted /
               resumed comparison and checkpoint facts as `two` (4 data files; _StridedShard rows).
  reshard_two  2 processes (FSDP2): resume the 1-process checkpoint (1 -> 2) and the 2 x 2 one (4 -> 2).
Run as a script (`python tests/test_integrations_lightning_sharded.py two DIR`), it is the scenario
Lightning's launcher relaunches on every local rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

import shardckpt
from shardckpt.loading.load import read_chunks
from shardckpt.storage import storage_for
from shardckpt.integrations.lightning_sharded import ShardckptModelParallelStrategy
from test_integrations_lightning import Regressor, _data

EPOCHS = 4


class ShardedRegressor(Regressor):
    """test_integrations_lightning's model, parallelized by Lightning's configure_model hook."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):  # net[2].weight is [1, 8]: rank 1's shard of it is empty
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class TensorParallelRegressor(Regressor):
    """The same model split by tensor parallelism over the "tensor_parallel" mesh: net[0] by output
    features (weight Shard(0)), net[2] by input features (weight Shard(1), bias replicated)."""

    def configure_model(self):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        parallelize_module(self.net, self.device_mesh["tensor_parallel"],
                           {"0": ColwiseParallel(), "2": RowwiseParallel()})


class TwoDimRegressor(TensorParallelRegressor):
    """FSDP2 + TP (the 2-D recipe): tensor parallel over "tensor_parallel", then fully_shard over
    "data_parallel" on top, so net.0.weight's dim 0 is split by both mesh dims (a _StridedShard)."""

    def configure_model(self):
        super().configure_model()
        ShardedRegressor.configure_model(self)


def _fit(dirpath, epochs, processes, ckpt_path=None, module=ShardedRegressor, tensor_parallel=1):
    pl.seed_everything(0, verbose=False)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True)
    strategy = ShardckptModelParallelStrategy(data_parallel_size=processes // tensor_parallel,
                                              tensor_parallel_size=tensor_parallel)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         strategy=strategy, devices=processes, callbacks=[ckpt], accelerator="cpu")
    train, val = _data()
    trainer.fit(module(), train, val, ckpt_path=ckpt_path)
    return trainer, ckpt


def _gathered_model(trainer) -> dict:
    """The full (unsharded) weights, the same on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True)
    return {f"model.{k}": v for k, v in get_model_state_dict(trainer.strategy.model, options=opts).items()}


def _gathered(trainer) -> dict:
    """The full weights and optimizer state, the same on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    out = _gathered_model(trainer)
    osd = get_optimizer_state_dict(trainer.strategy.model, trainer.optimizers[0],
                                   options=StateDictOptions(full_state_dict=True))
    for fqn, state in osd["state"].items():
        out.update({f"optim.{fqn}.{k}": torch.as_tensor(v) for k, v in state.items()})
    return out


def _differences(a: dict, b: dict) -> list:
    if a.keys() != b.keys():
        return [f"keys {sorted(a.keys() ^ b.keys())}"]
    return [k for k in a if not torch.equal(a[k], b[k])]


def _checkpoint_facts(path, key="state_dict.net.0.weight") -> dict:
    manifest = shardckpt.read_manifest(path)
    chunks = read_chunks(storage_for(str(path)), manifest, [key])
    data = os.path.join(path, "data")
    saves = os.listdir(data)  # one directory of data files per save; replaced saves' are deleted
    return {"world_size": manifest.world_size, "saves": len(saves),
            "data_files": sorted(f for s in saves for f in os.listdir(os.path.join(data, s))
                                 if f.endswith(".bin")),
            "weight_chunks": sorted([c.rank, list(c.offsets), list(c.sizes)]
                                    for c in chunks[key])}


def _resume_pair(root: str, processes: int, **kw) -> tuple:
    """An uninterrupted EPOCHS-epoch run in root/ref and a 2-epoch run in root/run resumed to EPOCHS with
    ckpt_path=, on `processes` processes (kw: _fit's module, tensor_parallel). Every rank calls it (the
    gathers are collectives). Returns the uninterrupted run's gathered state, the resumed trainer, and on
    global rank 0 what the tests check of the pair (None on the other ranks)."""
    ref, _ = _fit(os.path.join(root, "ref"), EPOCHS, processes, **kw)
    ref_state = _gathered(ref)
    d = os.path.join(root, "run")
    _fit(d, 2, processes, **kw)
    trainer, ckpt = _fit(d, EPOCHS, processes, ckpt_path=os.path.join(d, "last.ckpt"), **kw)
    diffs = _differences(_gathered(trainer), ref_state)
    if not trainer.is_global_zero:
        return ref_state, trainer, None
    names = sorted(os.listdir(d))
    return ref_state, trainer, {
        "diffs": diffs, "epoch": [trainer.current_epoch, ref.current_epoch],
        "global_step": [trainer.global_step, ref.global_step], "names": names,
        "best_k": sorted(os.path.basename(p) for p in ckpt.best_k_models),
        "facts": {n: _checkpoint_facts(os.path.join(d, n)) for n in names},
        "head_facts": _checkpoint_facts(os.path.join(d, "last.ckpt"), "state_dict.net.2.weight")}


def _two(root: str) -> None:
    ref_state, trainer, out = _resume_pair(root, 2)
    # tensor parallel (a 1 x 2 mesh): saved for the one-process job to load into its FSDP layout
    tp, _ = _fit(os.path.join(root, "tp"), 2, 2, module=TensorParallelRegressor, tensor_parallel=2)
    tp_state = _gathered(tp)
    if trainer.is_global_zero:
        torch.save(ref_state, os.path.join(root, "ref_state.pt"))
        torch.save(tp_state, os.path.join(root, "tp_state.pt"))
        out["tp_facts"] = _checkpoint_facts(os.path.join(root, "tp", "last.ckpt"), "state_dict.net.2.weight")
        with open(os.path.join(root, "two.json"), "w") as f:
            json.dump(out, f)


def _four(root: str) -> None:
    """4 processes on a 2 x 2 (data x tensor) mesh: uninterrupted vs resumed, and the kept checkpoints."""
    ref_state, trainer, out = _resume_pair(os.path.join(root, "four"), 4, module=TwoDimRegressor,
                                           tensor_parallel=2)
    if trainer.is_global_zero:
        torch.save(ref_state, os.path.join(root, "four_state.pt"))
        with open(os.path.join(root, "four.json"), "w") as f:
            json.dump(out, f)


def _reshard_two(root: str) -> None:
    """2 processes (FSDP2) load the 1-process run's checkpoint (1 -> 2) and the 2 x 2 one (4 -> 2)."""
    out = {}
    for name, src, epochs, state in (("one", os.path.join(root, "solo", "last.ckpt"), 2, "solo_state.pt"),
                                     ("four", os.path.join(root, "four", "ref", "last.ckpt"), EPOCHS,
                                      "four_state.pt")):
        trainer, _ = _fit(os.path.join(root, f"two-from-{name}"), epochs, 2, ckpt_path=src)
        out[name] = {"diffs": _differences(_gathered(trainer),
                                           torch.load(os.path.join(root, state), weights_only=True)),
                     "epoch": trainer.current_epoch, "global_step": trainer.global_step}
    if trainer.is_global_zero:
        with open(os.path.join(root, "reshard_two.json"), "w") as f:
            json.dump(out, f)


def _one(root: str) -> None:
    import fsspec
    # 2 -> 1: the 2-process run's last checkpoint, loaded into a job of one process (no epoch left to train)
    trainer, _ = _fit(os.path.join(root, "one"), EPOCHS, 1, ckpt_path=os.path.join(root, "ref", "last.ckpt"))
    ref_state = torch.load(os.path.join(root, "ref_state.pt"), weights_only=True)
    out = {"diffs": _differences(_gathered(trainer), ref_state), "epoch": trainer.current_epoch,
           "global_step": trainer.global_step}
    # tensor parallel on 2 processes -> FSDP on 1: another layout and world size
    trainer, _ = _fit(os.path.join(root, "one-tp"), 2, 1, ckpt_path=os.path.join(root, "tp", "last.ckpt"))
    out["tp_diffs"] = _differences(_gathered(trainer), torch.load(os.path.join(root, "tp_state.pt"),
                                                                  weights_only=True))
    # Trainer.validate(ckpt_path=) sets up no optimizer: the weights alone are loaded
    pl.seed_everything(1, verbose=False)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         strategy=ShardckptModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                         devices=1)
    trainer.validate(ShardedRegressor(), _data()[1], ckpt_path=os.path.join(root, "ref", "last.ckpt"))
    model = _gathered_model(trainer)
    out["validate_diffs"] = _differences(model, {k: v for k, v in ref_state.items() if k.startswith("model.")})
    os.makedirs(os.path.join(root, "not-ours.ckpt"))  # no manifest (a stock DCP directory would pickle meta.pt)
    try:
        trainer.validate(ShardedRegressor(), _data()[1], ckpt_path=os.path.join(root, "not-ours.ckpt"))
    except shardckpt.IncompleteCheckpointError as e:
        out["not_ours"] = str(e)
    # a 1-process run's checkpoint, for the 2-process job to resume (1 -> 2)
    trainer, _ = _fit(os.path.join(root, "solo"), 2, 1)
    torch.save(_gathered(trainer), os.path.join(root, "solo_state.pt"))
    out["solo_global_step"] = trainer.global_step
    url = "memory://shardckpt-lightning-sharded/run"
    trainer, ckpt = _fit(url, 3, 1)
    fs = fsspec.filesystem("memory")
    out["url_names"] = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False))
    out["url_last_committed"] = fs.exists(f"{url}/last.ckpt/manifest.json")
    out["url_best_k"] = sorted(p.rsplit("/", 1)[-1] for p in ckpt.best_k_models)
    with open(os.path.join(root, "one.json"), "w") as f:
        json.dump(out, f)


def _launch(mode: str, root) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, mode, str(root)], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads((root / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def two_process_run(root):
    return root, _launch("two", root)


@pytest.fixture(scope="module")
def one_process_run(two_process_run):
    root, _ = two_process_run
    return _launch("one", root)


@pytest.fixture(scope="module")
def four_process_run(root):
    return _launch("four", root)


def test_resume_on_two_processes_is_bit_exact(two_process_run):
    _, out = two_process_run
    assert out["diffs"] == [], out["diffs"]
    assert out["epoch"] == [EPOCHS, EPOCHS] and out["global_step"][0] == out["global_step"][1] > 0


def test_kept_checkpoints_are_sharded_shardckpt_checkpoints_with_top_k(two_process_run):
    _, out = two_process_run
    names = out["names"]
    assert len(names) == 3 and "last.ckpt" in names, names  # 2 best + last: the other two were removed
    assert out["best_k"] == sorted(n for n in names if n != "last.ckpt")
    for n, facts in out["facts"].items():
        assert facts["world_size"] == 2, (n, facts)
        assert facts["saves"] == 1, (n, facts)  # last.ckpt, saved over 4 times: the old saves' data is gone
        assert facts["data_files"] == ["r00000.bin", "r00001.bin"], (n, facts)  # one per rank
        # net.0.weight is [8, 4], sharded on dim 0: each rank wrote its own half
        assert facts["weight_chunks"] == [[0, [0, 0], [4, 4]], [1, [4, 0], [4, 4]]], (n, facts)
    # tensor parallel: net.2.weight [1, 8] split by columns, each rank its half
    assert out["tp_facts"]["weight_chunks"] == [[0, [0, 0], [1, 4]], [1, [0, 4], [1, 4]]], out["tp_facts"]
    assert out["tp_facts"]["data_files"] == ["r00000.bin", "r00001.bin"], out["tp_facts"]


def test_resume_on_one_process_reshards_bit_exact_and_fsspec_dirpath(two_process_run, one_process_run):
    _, two = two_process_run
    out = one_process_run
    assert out["diffs"] == [], out["diffs"]
    assert out["epoch"] == EPOCHS and out["global_step"] == two["global_step"][1]  # the loops' state came back
    assert out["validate_diffs"] == [], out["validate_diffs"]
    assert out["tp_diffs"] == [], out["tp_diffs"]
    assert "not-ours.ckpt" in out.get("not_ours", ""), out.get("not_ours")  # refused typed, nothing unpickled
    assert out["url_last_committed"]
    assert len(out["url_names"]) == 3 and "last.ckpt" in out["url_names"], out["url_names"]
    assert out["url_best_k"] == sorted(n for n in out["url_names"] if n != "last.ckpt")


def test_two_by_two_mesh_resume_is_bit_exact_with_one_file_per_rank(four_process_run):
    out = four_process_run
    assert out["diffs"] == [], out["diffs"]
    assert out["epoch"] == [EPOCHS, EPOCHS] and out["global_step"][0] == out["global_step"][1] > 0
    names = out["names"]
    assert len(names) == 3 and "last.ckpt" in names, names
    assert out["best_k"] == sorted(n for n in names if n != "last.ckpt")
    for n, facts in out["facts"].items():
        assert facts["world_size"] == 4 and facts["saves"] == 1, (n, facts)
        assert facts["data_files"] == [f"r{r:05d}.bin" for r in range(4)], (n, facts)
        # net.0.weight [8, 4]: rows split by tensor rank t (4 each), then by data rank d within them (2 each);
        # rank 2 d + t holds rows 4 t + 2 d .. +2
        assert facts["weight_chunks"] == [[0, [0, 0], [2, 4]], [1, [4, 0], [2, 4]], [2, [2, 0], [2, 4]],
                                          [3, [6, 0], [2, 4]]], (n, facts)
    # net.2.weight [1, 8]: columns split by tensor rank; data rank 1's dim-0 shards of it (ranks 2, 3) are empty
    assert out["head_facts"]["weight_chunks"] == [[0, [0, 0], [1, 4]], [1, [0, 4], [1, 4]], [2, [1, 0], [0, 4]],
                                                  [3, [1, 4], [0, 4]]], out["head_facts"]


def test_one_and_four_process_checkpoints_resume_on_two_processes(root, one_process_run, four_process_run):
    out = _launch("reshard_two", root)
    assert out["one"]["diffs"] == [] and out["four"]["diffs"] == [], out
    assert out["one"]["global_step"] == one_process_run["solo_global_step"] > 0, out
    assert out["four"]["global_step"] == four_process_run["global_step"][1], out
    assert out["one"]["epoch"] == 2 and out["four"]["epoch"] == EPOCHS, out


def test_full_checkpoint_mode_is_refused():
    with pytest.raises(ValueError, match="distributed"):
        ShardckptModelParallelStrategy(save_distributed_checkpoint=False)


_SCENARIOS = {"two": _two, "one": _one, "four": _four, "reshard_two": _reshard_two}

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] in _SCENARIOS:
    torch.set_num_threads(1)
    _SCENARIOS[sys.argv[1]](sys.argv[2])

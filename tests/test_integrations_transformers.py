"""shardckpt.integrations.transformers with the real transformers Trainer (CPU, a tiny GPT-2 built from a
config, no download): checkpoint-N is one committed shardckpt checkpoint; train(resume_from_checkpoint=True)
resumes bit-exactly (weights and Adam state equal to an uninterrupted run) on 1 process and on 2 (DDP,
gloo), and resharded from 2 processes to 1 and from 1 to 2; retention keeps the newest and the best whatever the names or
mtimes, also when a restarted run counts steps again; save_model and export_pretrained give the same
model.safetensors."""
from __future__ import annotations

import json
import os
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402

import shardckpt  # noqa: E402
from shardckpt.integrations.transformers import ShardckptTrainer, export_pretrained, latest_checkpoint  # noqa: E402

MAX_STEPS = 8


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.x = torch.randint(0, 64, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model(seed: int = 0):
    torch.manual_seed(seed)  # a resumed run starts from other weights: only the checkpoint can make it equal
    cfg = GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=False,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)  # GPT-2's dropout is on: resuming must restore the RNG too


class StopAt(TrainerCallback):
    """Ends training after global step `at` (the same max_steps, so the LR schedule is the same)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if self.at is not None and state.global_step == self.at:
            control.should_training_stop = True


class Capture(TrainerCallback):
    """The weights and Adam state as training (re)starts, after the checkpoint was loaded."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.model = {k: v.clone() for k, v in model.state_dict().items()}
        opt = getattr(optimizer, "optimizer", optimizer)
        self.optim = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                      if p in opt.state}


def _adam(optimizer) -> dict:
    opt = getattr(optimizer, "optimizer", optimizer)
    return {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())}


def _trainer(out, *, stop=None, seed=0, scores=None, batch=4, **kw):
    args = dict(max_steps=MAX_STEPS, per_device_train_batch_size=batch, save_steps=2, eval_strategy="steps",
                eval_steps=2, save_total_limit=2, metric_for_best_model="loss", report_to=[], use_cpu=True,
                seed=0, logging_steps=1, disable_tqdm=True, learning_rate=1e-2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args["ddp_backend"] = "gloo"
    args.update(kw)
    box = {}
    if scores is not None:  # a metric the test controls: score by global step
        args.update(metric_for_best_model="score", greater_is_better=True)
        kw_cm = {"compute_metrics": lambda p: {"score": scores[box["t"].state.global_step]}}
    else:
        kw_cm = {}
    cap = Capture()
    t = ShardckptTrainer(model=_model(seed), args=TrainingArguments(str(out), **args), train_dataset=Tokens(64, 1),
                         eval_dataset=Tokens(8, 2), callbacks=[StopAt(stop), cap], **kw_cm)
    box["t"] = t
    t.capture = cap
    return t


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_adam(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def _full(path, keys=None) -> dict:
    """shardckpt.load_full, flattened to the saved dotted keys (train.model.transformer.wte.weight, ...)."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}{k}.", x)
        else:
            out[prefix[:-1]] = v
    walk("", shardckpt.load_full(path, keys=keys))
    return out


def _checkpoints(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def test_resume_bit_exact_and_no_pickle(tmp_path):
    ref = _trainer(tmp_path / "ref")
    ref.train()
    _trainer(tmp_path / "run", stop=4).train()
    assert _checkpoints(tmp_path / "run") == ["checkpoint-2", "checkpoint-4"]
    ck = tmp_path / "run" / "checkpoint-4"
    files = {os.path.relpath(os.path.join(d, f), ck) for d, _, fs in os.walk(ck) for f in fs}
    assert "manifest.json" in files and "trainer_state.json" in files
    # no torch.save files (optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin): shardckpt's data only
    assert {f for f in files if not f.startswith("data/")} == {"manifest.json", "trainer_state.json"}
    man = shardckpt.read_manifest(ck)
    assert {k.split(".")[0] for k in man.keys()} == {"train", "sched", "rng"}
    assert json.load(open(ck / "trainer_state.json"))["global_step"] == 4
    os.remove(ck / "trainer_state.json")  # a crash after the commit: rewritten from the manifest at resume

    res = _trainer(tmp_path / "run", seed=5)
    res.train(resume_from_checkpoint=True)
    assert res.state.global_step == ref.state.global_step == MAX_STEPS
    assert _same(res.model.state_dict(), ref.model.state_dict())
    assert _same_adam(_adam(res.optimizer), _adam(ref.optimizer))
    assert res.lr_scheduler.get_last_lr() == ref.lr_scheduler.get_last_lr()
    assert [e["loss"] for e in res.state.log_history if "loss" in e] == \
        [e["loss"] for e in ref.state.log_history if "loss" in e]  # the same batches, dropout masks, losses
    # explicit path, and the checkpoint-8 of the resumed run equals the uninterrupted run's
    a, b = _full(tmp_path / "ref" / "checkpoint-8", "train"), _full(tmp_path / "run" / "checkpoint-8", "train")
    assert len(a) > 10 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_retention_restart_counting_again_keeps_newest_and_best(tmp_path):
    out = tmp_path / "out"
    _trainer(out, scores={2: 0.1, 4: 0.9, 6: 0.2, 8: 0.3}).train()
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-8"]  # best (4) + newest
    # names and mtimes that mislead: the best looks newest, the newest oldest
    os.utime(out / "checkpoint-8", (1, 1))
    os.utime(out / "checkpoint-4", (4e9, 4e9))
    # a new run in the same output_dir counting steps from 0 again (not resumed), saving every 3 steps
    t = _trainer(out, scores={3: 0.5, 6: 0.4}, save_steps=3, eval_steps=3, max_steps=6, load_best_model_at_end=True)
    t.train()
    # the newest save (checkpoint-6) and the best (checkpoint-4, 0.9) are kept; checkpoint-8 (step number
    # highest) and checkpoint-3 went
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"]
    assert t.state.best_model_checkpoint == str(out / "checkpoint-4")
    assert latest_checkpoint(out) == str(out / "checkpoint-6")  # what resume_from_checkpoint=True takes
    best = _full(out / "checkpoint-4", "train.model.")
    now = t.model.state_dict()  # load_best_model_at_end loaded checkpoint-4 through shardckpt
    assert all(torch.equal(now[k], best["train.model." + k]) for k in now)


def test_save_total_limit_one_keeps_newest_and_best_at_the_end(tmp_path):
    """Trainer itself would shutil.rmtree the newest checkpoint at the end (save_total_limit=1, the best
    older); here the newest and the best stay, and only the deleter removed the others."""
    out = tmp_path / "out"
    _trainer(out, scores={2: 0.9, 4: 0.1, 6: 0.2, 8: 0.3}, save_total_limit=1, load_best_model_at_end=True).train()
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-8"]
    assert latest_checkpoint(out) == str(out / "checkpoint-8")


def test_save_model_and_export_give_the_same_files(tmp_path):
    from safetensors.torch import load_file
    t = _trainer(tmp_path / "out", save_total_limit=None)
    t.train()
    t.save_model(str(tmp_path / "hf"))  # Hugging Face's own output, untouched
    ck = str(tmp_path / "out" / f"checkpoint-{MAX_STEPS}")
    files = export_pretrained(ck, tmp_path / "exported")
    assert sorted(files) == ["config.json", "model.safetensors"]
    hf, ex = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert hf.keys() == ex.keys() and all(torch.equal(hf[k], ex[k]) for k in hf)
    from shardckpt.tools.cli import main  # `shardckpt export`, in this process
    assert main(["export", ck, str(tmp_path / "cli"), "--format", "safetensors", "--keys", "train.model.",
                 "--rename", "train.model.="]) == 0
    cli = load_file(tmp_path / "cli" / "model.safetensors")
    assert cli.keys() == hf.keys() and all(torch.equal(hf[k], cli[k]) for k in hf)
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "exported")  # from_pretrained keeps working
    x = torch.randint(0, 64, (2, 8))
    again.eval(), t.model.eval()
    assert torch.equal(again(x).logits, t.model(x).logits)


# -------------------------------------------------------------------------------------- 2 processes (DDP)
# (FSDP2 through Trainer is not tested here: accelerate turns FSDP on for accelerator devices only; on a
# CPU-only machine its MULTI_CPU state falls back to DDP.)

def _run2(out, stop, resume):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    t = _trainer(out, stop=stop, seed=5 if resume else 0, batch=2, save_total_limit=None)
    t.train(resume_from_checkpoint=resume)
    opt = getattr(t.optimizer, "optimizer", t.optimizer)
    msd, osd = get_state_dict(t.model, [opt], options=StateDictOptions(full_state_dict=True))  # gathered
    np_ = lambda d: {k: v.detach().numpy().copy() for k, v in d.items() if isinstance(v, torch.Tensor)}  # noqa: E731
    return {"model": np_(msd), "adam": {k: np_(v) for k, v in osd["state"].items()},
            "steps": t.state.global_step, "losses": [e["loss"] for e in t.state.log_history if "loss" in e],
            "world": t.args.world_size}


def _torch(d: dict) -> dict:
    return {k: _torch(v) if isinstance(v, dict) else torch.from_numpy(v) if hasattr(v, "dtype") else v
            for k, v in d.items()}


def _scenarios(rank, world_size, root):
    ref = _run2(os.path.join(root, "ref"), None, None)
    _run2(os.path.join(root, "run"), 4, None)
    res = _run2(os.path.join(root, "run"), None, True)
    # resharded the other way: a 1-process checkpoint-4 resumed on these 2 (weights, Adam state at the start)
    two = _trainer(os.path.join(root, "two"), seed=9, batch=2, save_total_limit=None)
    two.train(resume_from_checkpoint=os.path.join(root, "solo", "checkpoint-4"))
    np_ = lambda d: {k: v.numpy().copy() for k, v in d.items()}  # noqa: E731
    return ref, res, {"model": np_(two.capture.model), "adam": {n: np_(st) for n, st in two.capture.optim.items()},
                      "steps": two.state.global_step}


def _assert_resharded_onto_one_process(tmp_path, ck):
    """The 2-process checkpoint-4 resumed on 1 process (the same global batch of 4): weights and Adam state
    by parameter name equal to the saved ones, and training goes on to MAX_STEPS."""
    saved = _full(ck)
    one = _trainer(tmp_path / "one", seed=7, batch=4)
    one.train(resume_from_checkpoint=str(ck))
    assert all(torch.equal(one.capture.model[k], saved["train.model." + k]) for k in one.capture.model)
    assert len(one.capture.optim) == len(one.capture.model)
    for name, st in one.capture.optim.items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[k], saved[f"train.optim.state.{name}.{k}"]), (name, k)
    assert one.state.global_step == MAX_STEPS


@pytest.mark.slow
def test_two_processes_ddp_resume_bit_exact_and_reshard_both_ways(tmp_path):
    from harness import run_ranks
    _trainer(tmp_path / "solo", stop=4, save_total_limit=None).train()  # 1 process, global batch 4
    results = run_ranks(2, _scenarios, str(tmp_path), env={"ACCELERATE_USE_CPU": "true"}, timeout=240)
    solo = _full(tmp_path / "solo" / "checkpoint-4")
    for r in results:
        ref, res, two = ({**x, "model": _torch(x["model"]), "adam": _torch(x["adam"])} for x in r)
        assert all(torch.equal(two["model"][k], solo["train.model." + k]) for k in two["model"])
        assert len(two["adam"]) == len(two["model"]) and two["steps"] == MAX_STEPS
        assert all(torch.equal(st[k], solo[f"train.optim.state.{n}.{k}"]) for n, st in two["adam"].items()
                   for k in ("exp_avg", "exp_avg_sq", "step"))
        assert ref["world"] == res["world"] == 2 and ref["steps"] == res["steps"] == MAX_STEPS
        assert _same(ref["model"], res["model"]) and _same_adam(ref["adam"], res["adam"])
        assert ref["losses"] == res["losses"]
    ck = tmp_path / "run" / "checkpoint-4"
    man = shardckpt.read_manifest(ck)
    # one copy in total: the replicated tensors are split across the 2 ranks' files, not written twice
    assert man.raw_bytes == sum(t.numel * t.dtype.itemsize for t in man.tensors.values())
    data = ck / "data" / man.save_id
    assert sorted(f for f in os.listdir(data) if f.endswith(".bin")) == ["r00000.bin", "r00001.bin"]
    assert all(os.path.getsize(data / f) > 0 for f in ("r00000.bin", "r00001.bin"))
    _assert_resharded_onto_one_process(tmp_path, ck)

"""Hugging Face Trainer: checkpoint-N saved and resumed through shardckpt, with one change to the script.

    from shardckpt.integrations.transformers import ShardckptTrainer     # instead of transformers.Trainer
    trainer = ShardckptTrainer(model=model, args=TrainingArguments("out", save_steps=500, save_total_limit=2,
                               load_best_model_at_end=True, metric_for_best_model="loss", ...), ...)
    trainer.train(resume_from_checkpoint=True)    # or a checkpoint-N path; False/None: from scratch

    class MyTrainer(ShardckptTrainerMixin, SFTTrainer): ...   # any other Trainer subclass (TRL, ...)

Why a mixin over Trainer's checkpoint methods and not a TrainerCallback: a callback's on_save runs after
Trainer has already written checkpoint-N (torch.save of the optimizer, non-atomically, on rank 0) and it
cannot change how train() loads one; the methods overridden here are exactly Trainer's own checkpoint
hooks (_save_checkpoint, _load_from_checkpoint, _load_optimizer_and_scheduler, _load_scaler,
_load_rng_state, _load_best_model) plus train() to resolve resume_from_checkpoint=True and
_finalize_training to stop its own save_total_limit=1 clean-up (shutil.rmtree of every checkpoint but the
best, the newest included). Everything else
(loop, data skipping, logging, save_model) stays Trainer's. Written against transformers 5.x; the hooks
are private API, so a transformers release may need this module updated.

What checkpoint-N holds (one shardckpt.save, every rank, committed atomically by one manifest: a preempted
save leaves no checkpoint-N that any reader takes for one):
  train.model.*, train.optim.*   model and optimizer through torch.distributed.checkpoint.state_dict
                                 (plain / DDP: each replicated tensor written once in total, split across
                                 the replicas; FSDP2: each rank its own shards), optimizer state keyed by
                                 parameter name, so a resume on another number of processes reshards
  sched.*, scaler.*              the LR scheduler's and the grad scaler's state_dict (plain values)
  rng.*                          every rank's Python / NumPy / torch generators (shardckpt.RNGState: the
                                 same world size restores them exactly, another re-derives them)
  manifest user_metadata["transformers"]: the TrainerState (trainer_state.json's fields), the model's
                                 config, the save sequence number and the checkpoint's metric.
After the commit the coordinator also writes trainer_state.json beside it (Trainer's own resume code
reads that file; it is derived from the manifest and rewritten from it at resume if missing).

Retention (save_total_limit, metric_for_best_model, greater_is_better, load_best_model_at_end): after each
commit the coordinator orders the committed checkpoint-N directories by the save sequence recorded in
their manifests (never by name or mtime, so a restarted job that counts steps again rotates the oldest
saves, not the newest), ranks them by the metric recorded in each manifest, and deletes what
shardckpt.manager.policy.steps_to_delete (the CheckpointManager's rule) leaves, through shardckpt.lifecycle.deleter.retire
(manifest first). As documented for Trainer, the best is kept in addition to the newest
save_total_limit - 1 (the newest save_total_limit when the best is among them); the newest is never
deleted, nor a checkpoint whose manifest cannot be read. trainer.state.best_model_checkpoint is the best
kept checkpoint by the same ranking; load_best_model_at_end loads it through shardckpt.

save_model() / save_pretrained are untouched (safetensors + config.json, as Hugging Face writes them).
export_pretrained(checkpoint-N, out) writes the same model.safetensors (model weights under Hugging
Face's names) plus config.json; `shardckpt export CKPT OUT --keys train.model. --rename train.model.=`
writes the model.safetensors alone.

Tested on CPU with 1 and 2 processes (DDP, gloo); FSDP2 is not (accelerate enables FSDP on accelerator
devices only). Not supported (refused or warned): push_to_hub from checkpoints (the checkpoint is not in Hugging Face's
layout: push save_model()'s output), DeepSpeed, SageMaker MP and XLA (their own checkpoint engines).
Needs transformers and accelerate (pip install "shardckpt[transformers]"); imported only here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from shardckpt import dist as sdist
from shardckpt.api import save
from shardckpt.lifecycle.deleter import retire
from shardckpt.errors import ConfigError
from shardckpt.tools.export import export_safetensors
from shardckpt.format.records import MANIFEST_NAME
from shardckpt.format.metadata import read_manifest
from shardckpt.loading.load import load
from shardckpt.manager.policy import metric_value, rank_steps, steps_to_delete
from shardckpt.loading.state import GradScalerState, RNGState, SchedulerState
from shardckpt.storage import storage_for

log = logging.getLogger("shardckpt")

META_KEY = "transformers"          # the manifest's user_metadata entry this integration writes
TRAINER_STATE_NAME = "trainer_state.json"
MODEL_PREFIX, OPTIM_PREFIX = "train.model.", "train.optim."
_CHECKPOINT_DIR = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")


# ---------------------------------------------------------------------------------- reading checkpoints

def is_shardckpt_checkpoint(path) -> bool:
    """Whether `path` holds a committed shardckpt checkpoint (a manifest; any rank, one stat)."""
    return os.path.isfile(os.path.join(str(path), MANIFEST_NAME))


def list_checkpoints(output_dir) -> tuple[dict[str, dict], list[str]]:
    """The committed shardckpt checkpoint-N directories under `output_dir`: ({name: {"seq", "step",
    "metric"}}, names whose manifest could not be read). Directories without a manifest (a save that did not
    commit, or Trainer's own format) are not listed."""
    found, unknown = {}, []
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return {}, []
    for name in names:
        m = _CHECKPOINT_DIR.match(name)
        if not m or not is_shardckpt_checkpoint(os.path.join(output_dir, name)):
            continue
        try:
            meta = read_manifest(os.path.join(output_dir, name)).user_metadata.get(META_KEY)
            found[name] = {"seq": int(meta["seq"]), "step": int(m.group(1)), "metric": meta.get("metric")}
        except Exception as e:  # unreadable or not ours: it neither counts nor goes
            log.warning("checkpoint %s/%s: cannot read its shardckpt metadata (%s); retention keeps it",
                        output_dir, name, e)
            unknown.append(name)
    return found, unknown


def latest_checkpoint(output_dir) -> str | None:
    """The checkpoint-N under `output_dir` saved last (highest save sequence, whatever its step number),
    or None. What train(resume_from_checkpoint=True) resumes from."""
    found, _ = list_checkpoints(output_dir)
    if not found:
        return None
    return os.path.join(str(output_dir), max(found, key=lambda n: found[n]["seq"]))


def export_pretrained(checkpoint, out_dir, *, overwrite: bool = False) -> list[str]:
    """Write a checkpoint-N's model as save_pretrained does: model.safetensors (Hugging Face's tensor
    names) and config.json. One process. Returns the files written."""
    res = export_safetensors(checkpoint, out_dir, keys=MODEL_PREFIX, rename={MODEL_PREFIX: ""},
                             overwrite=overwrite)
    config = read_manifest(checkpoint).user_metadata.get(META_KEY, {}).get("config")
    files = list(res.files)
    if config is not None:
        _write_json(os.path.join(str(out_dir), "config.json"), config)
        files.append("config.json")
    return files


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ mixin

class ShardckptTrainerMixin:
    """Trainer's checkpoint hooks through shardckpt. Put it before the Trainer class in the bases:
    class MyTrainer(ShardckptTrainerMixin, transformers.Trainer). All methods are called by Trainer on
    every rank, at the points Trainer calls its own."""

    # ---- save ------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """Trainer, every rank, when a save is due: one atomic shardckpt checkpoint-N, then retention on
        the coordinator."""
        self._shardckpt_refuse_unsupported()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        path = os.path.join(run_dir, name)
        comm = sdist.comm_for(None)
        metric = self._shardckpt_metric()

        def plan() -> dict:  # coordinator: the save's sequence number, replace or not, the best after it
            found, _ = list_checkpoints(run_dir)
            seq = 1 + max([e["seq"] for e in found.values()], default=0)
            if name in found:
                log.warning("%s is already committed (a restarted run counting steps again?): replacing it "
                            "atomically", path)
            scored = {n: e["metric"] for n, e in sorted(found.items(), key=lambda ne: ne[1]["seq"]) if n != name}
            scored[name] = metric  # the newest last: ties go to the newer save
            best = self._shardckpt_ranked(scored)
            return {"seq": seq, "overwrite": name in found, "best": best[0] if best else None}
        decision = comm.from_coordinator(plan)
        os.makedirs(run_dir, exist_ok=True)
        if decision["best"] is not None:
            self.state.best_model_checkpoint = os.path.join(run_dir, decision["best"])
        for cb in self._shardckpt_exportable():  # as Trainer does before writing trainer_state.json
            name_cb, cb_state = cb.__class__.__name__, cb.state()
            if isinstance(self.state.stateful_callbacks.get(name_cb), list):
                self.state.stateful_callbacks[name_cb].append(cb_state)
            else:
                self.state.stateful_callbacks[name_cb] = cb_state
        trainer_state = json.loads(json.dumps(dataclasses.asdict(self.state)))
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        meta = {META_KEY: {"seq": decision["seq"], "step": self.state.global_step, "metric": metric,
                           "metric_name": self._shardckpt_metric_name(), "trainer_state": trainer_state,
                           "config": json.loads(config.to_json_string()) if config is not None else None}}
        save(self._shardckpt_state(with_optimizer=not self.args.save_only_model), path, metadata=meta,
             overwrite=decision["overwrite"])
        if comm.is_coordinator:
            _write_json(os.path.join(path, TRAINER_STATE_NAME), trainer_state)
            self._shardckpt_rotate(run_dir)
        if self.args.push_to_hub:
            log.warning("push_to_hub: checkpoint %s is a shardckpt checkpoint and is not pushed; push the output "
                        "of save_model() instead", path)

    def _shardckpt_refuse_unsupported(self) -> None:
        if self.is_deepspeed_enabled or getattr(self, "is_fsdp_xla_enabled", False):
            raise ConfigError("ShardckptTrainer does not save DeepSpeed or XLA FSDP checkpoints (they have "
                              "their own checkpoint engines); use transformers.Trainer for those")
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ConfigError("ShardckptTrainer supports FSDP2 (fsdp_version=2) only")

    def _shardckpt_exportable(self) -> list:
        from transformers.trainer_callback import ExportableState
        return [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]

    def _shardckpt_optimizer(self):
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one

    def _shardckpt_scheduler(self):
        return getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)

    def _shardckpt_state(self, with_optimizer: bool = True, with_rng: bool = True) -> dict:
        """The state this rank saves: model (and optimizer) as torch.distributed.checkpoint.state_dict
        gives them, scheduler, scaler, RNG."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
        if with_optimizer and self.optimizer is not None:
            msd, osd = get_state_dict(self.model, [self._shardckpt_optimizer()])
            state = {"train": {"model": msd, "optim": osd}}
        else:
            state = {"train": {"model": get_model_state_dict(self.model)}}
        if with_optimizer and self.lr_scheduler is not None:
            state["sched"] = SchedulerState(self._shardckpt_scheduler())
        scaler = getattr(self.accelerator, "scaler", None)
        if with_optimizer and scaler is not None:
            state["scaler"] = GradScalerState(scaler)
        if with_rng:
            state["rng"] = RNGState(seed=self.args.seed)
        return state

    # ---- best and retention ------------------------------------------------------------------------
    def _shardckpt_metric_name(self) -> str | None:
        name = self.args.metric_for_best_model
        if name is None:
            return None
        return name if name.startswith("eval_") else f"eval_{name}"

    def _shardckpt_metric(self) -> float | None:
        """The monitored evaluation metric logged at this global step (None when none was: such a
        checkpoint does not compete for best)."""
        key = self._shardckpt_metric_name()
        if key is None:
            return None
        for entry in reversed(self.state.log_history):
            if entry.get("step") == self.state.global_step and key in entry:
                return metric_value(entry, key)
            if entry.get("step", self.state.global_step) < self.state.global_step:
                break
        return None

    def _shardckpt_ranked(self, scored: dict[str, float | None]) -> list[str]:
        """Names best first by the metric (greater_is_better picks the mode); `scored` is ordered oldest save
        first, and ties go to the newer save, as retention ranks them."""
        if self._shardckpt_metric_name() is None:
            return []
        mode = "max" if self.args.greater_is_better else "min"
        names = list(scored)
        ranked = rank_steps([(v, i) for i, (n, v) in enumerate(scored.items()) if v is not None], mode)
        return [names[i] for i in ranked]

    def _shardckpt_rotate(self, run_dir: str) -> None:
        """Coordinator, after a commit: save_total_limit by save sequence, the best kept (see the module
        docstring). A delete that fails is logged; training goes on."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        try:
            found, unknown = list_checkpoints(run_dir)
            by_seq = {e["seq"]: n for n, e in found.items()}
            seqs = sorted(by_seq)
            ranked_names = self._shardckpt_ranked({by_seq[s]: found[by_seq[s]]["metric"] for s in seqs})
            ranked = [found[n]["seq"] for n in ranked_names]
            if not ranked or ranked[0] in seqs[-limit:]:
                doomed = steps_to_delete(seqs, ranked, keep_last=limit, keep_best=0, keep_every_steps=None)
            else:
                doomed = steps_to_delete(seqs, ranked, keep_last=max(limit - 1, 1), keep_best=1,
                                         keep_every_steps=None)
            parent = storage_for(run_dir)
            for s in doomed:
                if by_seq[s] not in unknown:
                    retire(parent, by_seq[s])
                    log.info("deleted %s/%s (save_total_limit=%d)", run_dir, by_seq[s], limit)
        except Exception as e:
            log.warning("checkpoint retention under %s failed: %s: %s", run_dir, type(e).__name__, e)

    # ---- resume ------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Trainer.train, with resume_from_checkpoint=True meaning the shardckpt checkpoint saved last (by
        save sequence) under output_dir (when there is none, Trainer's own resolution: a checkpoint-N it
        wrote itself is loaded its own way); a shardckpt checkpoint's trainer_state.json is rewritten from
        its manifest first when missing (a crash between the commit and that file)."""
        comm = sdist.comm_for(None)
        if resume_from_checkpoint is True:
            out = self.args.output_dir
            # no shardckpt checkpoint there: True goes on to Trainer (its own checkpoint-N, loaded its way)
            resume_from_checkpoint = comm.from_coordinator(lambda: latest_checkpoint(out)) or True
        if isinstance(resume_from_checkpoint, (str, os.PathLike)) and is_shardckpt_checkpoint(resume_from_checkpoint):
            path = str(resume_from_checkpoint)

            def restore_state_file() -> None:
                if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
                    meta = read_manifest(path).user_metadata.get(META_KEY) or {}
                    _write_json(os.path.join(path, TRAINER_STATE_NAME), meta["trainer_state"])
            comm.from_coordinator(restore_state_file)  # every rank waits until the file is there
            resume_from_checkpoint = path
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _finalize_training(self, trial, num_train_samples, start_time):
        """Trainer's end of training, without its save_total_limit=1 clean-up: that one shutil.rmtree's
        every checkpoint-N but the best (the newest too), outside shardckpt.lifecycle.deleter. Retention after each
        commit already kept only the newest and the best."""
        limit = self.args.save_total_limit
        if limit == 1:
            self.args.save_total_limit = None  # the only use of it in Trainer._finalize_training
        try:
            return super()._finalize_training(trial, num_train_samples, start_time)
        finally:
            self.args.save_total_limit = limit

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Trainer, every rank: the model weights of checkpoint-N (before accelerate wraps the model, or
        after it for FSDP), resharded to this job's layout."""
        if not is_shardckpt_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._shardckpt_load_model(resume_from_checkpoint, self.model if model is None else model)

    def _shardckpt_load_model(self, path, model) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        model = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        msd = get_model_state_dict(model)
        load(msd, path, prefix=MODEL_PREFIX)
        set_model_state_dict(model, msd)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """Trainer, every rank, once the optimizer and scheduler exist: their state (and the scaler's)."""
        if checkpoint is None or not is_shardckpt_checkpoint(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        manifest = read_manifest(checkpoint)
        if not any(k.startswith(OPTIM_PREFIX) for k in manifest.keys()):
            log.warning("%s was saved with save_only_model: no optimizer or scheduler state to resume", checkpoint)
            return
        opt = self._shardckpt_optimizer()
        osd = get_optimizer_state_dict(self.model, opt)
        load(osd, checkpoint, prefix=OPTIM_PREFIX)
        set_optimizer_state_dict(self.model, opt, osd)
        rest = {k: v for k, v in self._shardckpt_state(with_rng=False).items() if k != "train"}
        if rest:
            load(rest, checkpoint, keys=list(rest))

    def _load_scaler(self, checkpoint) -> None:
        if checkpoint is None or not is_shardckpt_checkpoint(checkpoint):
            return super()._load_scaler(checkpoint)
        # loaded with the optimizer and scheduler (one collective load)

    def _load_rng_state(self, checkpoint) -> None:
        """Trainer, every rank, where the resumed epoch continues: every rank's generators (exact on the same
        world size; re-derived from (seed, rank, save) on another, with a warning)."""
        if checkpoint is None or not is_shardckpt_checkpoint(checkpoint):
            return super()._load_rng_state(checkpoint)
        rng = RNGState(seed=self.args.seed)
        if rng.on_restore(read_manifest(checkpoint), "rng"):
            load({"rng": rng}, checkpoint, keys="rng")

    def _load_best_model(self) -> None:
        """Trainer at the end of training (load_best_model_at_end): the best kept checkpoint's weights."""
        best = self.state.best_model_checkpoint
        if best is None or not is_shardckpt_checkpoint(best):
            return super()._load_best_model()
        log.info("loading the best model from %s (score %s)", best, self.state.best_metric)
        self._shardckpt_load_model(best, self.model_wrapped if self.is_fsdp_enabled else self.model)


class ShardckptTrainer(ShardckptTrainerMixin, Trainer):
    """transformers.Trainer whose checkpoints go through shardckpt (see the module docstring)."""

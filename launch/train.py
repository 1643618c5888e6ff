"""A small GPT-style language model trained under torchrun with FSDP2 (optionally TP on a 2-D mesh), saving
its whole training state with shardckpt's CheckpointManager and resuming from the latest checkpoint.

    torchrun --standalone --nproc_per_node=2 launch/train.py --ckpt /tmp/ckpt --steps 200 --save-every 10
    torchrun --standalone --nproc_per_node=4 launch/train.py --ckpt /tmp/ckpt --tp 2     # (dp=2, tp=2)

The corpus is generated deterministically from --seed (a toy grammar, character level), so every run sees
the same data. The global batch is fixed (--global-batch) whatever the world size, so a resized run keeps
optimizing the same objective; at the same world size a resumed run reproduces the losses of an
uninterrupted one exactly. See launch/README.md for multi-node use and what a resize means for each part of
the state.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shardckpt  # noqa: E402
from shardckpt.saving.async_save import shutdown  # noqa: E402
from shardckpt.loading.state import ModelOptimizerState, ResumableSampler, RNGState, SchedulerState  # noqa: E402

# ------------------------------------------------------------------------------------------------ data

_SUBJECTS = ["the cat", "a dog", "the old sailor", "my neighbour", "the robot", "a small bird", "the queen",
             "our teacher", "the river", "a tired student"]
_VERBS = ["sees", "likes", "follows", "builds", "paints", "forgets", "carries", "answers", "finds", "opens"]
_OBJECTS = ["the red door", "a long letter", "the bright moon", "seven apples", "the quiet garden",
            "a wooden boat", "the last train", "an empty box", "the green hill", "a strange song"]
_ENDINGS = [".", " today.", " again.", " at night.", " slowly.", " with care.", "!", " in the rain."]


def make_corpus(seed: int, n_chars: int = 200_000) -> str:
    """Deterministic toy text: sentences from a small grammar (learnable structure, no download)."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)} "
        out.append(s)
        size += len(s)
    return "".join(out)[:n_chars]


class CharData:
    """Non-overlapping windows of seq+1 characters of the corpus."""

    def __init__(self, text: str, seq: int):
        self.vocab = sorted(set(text))
        ids = torch.tensor([self.vocab.index(c) for c in text], dtype=torch.long)
        self.seq = seq
        self.n = (len(ids) - 1) // seq
        self.ids = ids

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.stack([self.ids[i * self.seq:i * self.seq + self.seq + 1] for i in indices])
        return rows[:, :-1], rows[:, 1:]


# ----------------------------------------------------------------------------------------------- model

class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.head_dim = d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, _ = x.shape
        # -1 heads: under TP each rank holds heads / tp of them (column-parallel q/k/v)
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int = 128, layers: int = 4, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def build(args, vocab: int, world: int):
    """The model (identical init on every rank, then sharded), its optimizer and LR schedule, and the
    data-parallel coordinates (rank, size) the sampler uses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(args.seed)
    model = GPT(vocab, args.seq, args.d_model, args.layers, args.heads)
    dp_rank, dp_size = 0, 1
    if world > 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.tp > 1:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
            mesh = init_device_mesh(device, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
            plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
                    "attn.o": RowwiseParallel(), "fc": ColwiseParallel(), "proj": RowwiseParallel()}
            for b in model.blocks:
                parallelize_module(b, mesh["tp"], plan)
            dp_mesh = mesh["dp"]
        else:
            dp_mesh = init_device_mesh(device, (world,), mesh_dim_names=("dp",))
        for b in model.blocks:
            fully_shard(b, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        dp_rank, dp_size = dp_mesh.get_local_rank(), dp_mesh.size()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    return model, opt, sched, dp_rank, dp_size


# ------------------------------------------------------------------------------------------------ main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint root: a directory or fsspec URL (s3://...)")
    p.add_argument("--steps", type=int, default=200, help="length of the run (the LR schedule's horizon)")
    p.add_argument("--stop-at", type=int, default=None, help="exit cleanly after this step (tests)")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--sync", action="store_true", help="blocking saves instead of async ones")
    p.add_argument("--local-root", default=None, help="node-local tier: a directory on each node's own disk "
                                                     "(the same path on every node; peers hold replicas)")
    p.add_argument("--local-every", type=int, default=1, help="steps between local-tier saves")
    p.add_argument("--local-keep-last", type=int, default=2)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (2-D mesh: dp x tp)")
    p.add_argument("--global-batch", type=int, default=12, help="sequences per step over all ranks")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step (demo pacing)")
    p.add_argument("--pid-dir", default=None, help="write rank<N>.pid files here (the demo kills one)")
    return p.parse_args(argv)


def main(argv=None) -> list[tuple[int, float]]:
    """Train (resuming from the latest checkpoint under --ckpt). Returns [(step, loss)] of this run.
    Works under torchrun (initializes the process group) or inside an existing one (tests)."""
    args = parse(argv)
    own_group = False
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        own_group = True
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    logging.basicConfig(level=logging.WARNING if rank == 0 else logging.ERROR,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    if args.pid_dir:
        os.makedirs(args.pid_dir, exist_ok=True)
        with open(os.path.join(args.pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    if world % args.tp or args.global_batch % (world // args.tp):
        raise SystemExit(f"world size {world} must be a multiple of --tp {args.tp}, and --global-batch "
                         f"{args.global_batch} a multiple of the data-parallel size")
    data = CharData(make_corpus(args.seed), args.seq)
    model, opt, sched, dp_rank, dp_size = build(args, len(data.vocab), world)
    device = next(model.parameters()).device
    sampler = ResumableSampler(data.n, args.global_batch, rank=dp_rank, world_size=dp_size, seed=args.seed)
    state = {"train": ModelOptimizerState(model, opt), "sched": SchedulerState(sched),
             "rng": RNGState(seed=args.seed), "data": sampler}
    manager = shardckpt.CheckpointManager(args.ckpt, save_every_steps=args.save_every, keep_last=args.keep_last,
                                          keep_best=1, monitor="loss", async_save=not args.sync,
                                          preemption_signals=("SIGTERM", "SIGUSR1"), local_root=args.local_root,
                                          local_every_steps=args.local_every, local_keep_last=args.local_keep_last)
    start = manager.restore(state) or 0
    if rank == 0:
        if start and manager.restored_tier and manager.restored_tier[0] == "local":
            print(f"resumed from step {start} (local tier, now {world} ranks)", flush=True)
        elif start:
            saved_ws = shardckpt.read_manifest(manager.storage.child(f"step-{start:010d}")).world_size
            print(f"resumed from step {start} (saved by {saved_ws} ranks, now {world}; data position "
                  f"epoch {sampler.position.epoch} sample {sampler.position.index})", flush=True)
        else:
            print(f"starting from scratch on {world} ranks", flush=True)
    losses = []
    for step in range(start + 1, args.steps + 1):
        x, y = data.batch(sampler.next_batch())
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world  # every rank's local batch has the same size
        value = mean.item()
        losses.append((step, value))
        if rank == 0:
            print(f"step {step} loss {value:.6f}", flush=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)
        manager.maybe_save(step, state, metrics={"loss": value})
        if manager.preempted or step == args.stop_at:
            break
    manager.close()
    if rank == 0:
        print(f"done at step {losses[-1][0] if losses else start}; committed steps {manager.steps()}",
              flush=True)
    if own_group:
        shutdown()  # drop shardckpt's gloo groups before the process group goes away
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()

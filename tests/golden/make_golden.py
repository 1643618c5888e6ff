"""Writes the golden checkpoints of the current format_version that do not exist yet (run once per new
version; never rewrite an existing one: old checkpoints must keep loading). python tests/golden/make_golden.py

- v<version>/: one rank, every dtype family and value type (golden_state).
- v<incremental version>-incremental/: two sibling steps, the second with references to the first (FORMAT.md
  §7): v2.0-incremental (blake2b-128 chunk hashes), v2.1-incremental (xxh3-128, named in the manifest).
- v<version>-2ranks/: two ranks (gloo, CPU) saving DTensor shards along dim 0 and dim 1, a replicated tensor,
  and a uint8 tensor in `raw/1` chunks beside `zstd/1` and `zstd-byteplane/1` ones (golden_2ranks_state).
  Its tensors come from a closed integer formula (formula_tensor), so tests/test_golden.py derives the
  expected bytes without torch's random generator and without stored blobs.
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def golden_state() -> dict:
    g = torch.Generator().manual_seed(1234)
    return {
        "model": {"embed.weight": torch.randn(40, 16, generator=g).bfloat16(),
                  "proj.weight": torch.randn(16, 16, generator=g),
                  "proj.bias": torch.randn(16, generator=g).half(),
                  "mask": torch.arange(24).reshape(4, 6) % 3 == 0},
        "optim": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(16, 16, generator=g)}},
                  "param_groups": [{"lr": 0.001, "betas": (0.9, 0.95), "params": [0], "name": None}]},
        "tokens": torch.randint(0, 50000, (7, 9), generator=g),
        "step": 1000,
        "blob": b"\x00\x01binary",
        "scale": float("inf"),
    }


def formula_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Element i (C order) is k / 4 with k = (5 i + 3 seed) mod 17 - 8, cast to dtype (uint8: k mod 256).
    Exact in every float dtype used, so the bytes are the same wherever this runs; few distinct values, so
    zstd frames really are encoded."""
    n = 1
    for d in shape:
        n *= d
    k = (torch.arange(n, dtype=torch.int64) * 5 + 3 * seed) % 17 - 8
    if dtype == torch.uint8:
        return (k % 256).to(torch.uint8).reshape(shape)
    return (k.to(torch.float64) / 4).to(dtype).reshape(shape)


TWO_RANK_TENSORS = {  # key: (global shape, dtype, seed, placement on the 2-rank mesh or None = replicated)
    "model.w": ((32, 16), torch.float32, 1, "Shard(0)"),
    "model.emb": ((16, 12), torch.bfloat16, 2, "Shard(1)"),
    "model.b": ((48,), torch.float16, 3, None),
    "model.ids": ((20, 4), torch.int32, 5, "Shard(0)"),
    "raw.bytes": ((600,), torch.uint8, 4, None),
}
TWO_RANK_VALUES = {"epoch": 3, "lr": 0.25, "name": "golden-2r", "betas": (0.9, 0.95), "blob": b"\xff\x00ok",
                   "dtype": torch.bfloat16, "nested": {"a": [1, None, True], 7: "int key"}}


def golden_2ranks_state() -> dict:
    """The full (global) state the 2-rank golden holds, as one process loads it."""
    state: dict = {"model": {}, "raw": {}}
    for key, (shape, dtype, seed, _) in TWO_RANK_TENSORS.items():
        group, name = key.split(".")
        state[group][name] = formula_tensor(shape, dtype, seed)
    state.update({k: v for k, v in TWO_RANK_VALUES.items()})
    return state


def _save_2ranks(rank: int, world_size: int, out: str) -> bool:
    """Runs on both ranks: shards the formula tensors over a 1-d CPU mesh and saves them. The save API picks
    one codec per save, the format one per chunk; uint8 tensors are routed to raw/1 here so the golden holds
    both (a reader must handle any mix)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import shardckpt
    from shardckpt.format import codec
    mesh = init_device_mesh("cpu", (world_size,))
    state = golden_2ranks_state()
    for key, (_, _, _, placement) in TWO_RANK_TENSORS.items():
        if placement is not None:
            group, name = key.split(".")
            dim = int(placement[len("Shard("):-1])
            state[group][name] = distribute_tensor(state[group][name], mesh, [Shard(dim)], src_data_rank=None)
    auto = codec.choose
    codec.choose = lambda c, dtype: codec.RAW if dtype == torch.uint8 else auto(c, dtype)
    try:
        shardckpt.save(state, out, frame_size=512, metadata={"golden": True, "ranks": 2})
    finally:
        codec.choose = auto
    return True


def incremental_states() -> list[dict]:
    """The two steps of each incremental golden: step 2 changes `tokens` and `step` and one ULP of
    proj.weight; its other tensors are references to step 1's frames."""
    one = golden_state()
    two = golden_state()
    two["tokens"] = two["tokens"] + 1
    two["model"]["proj.weight"].view(torch.int32)[3, 5] += 1
    two["step"] = 2000
    return [one, two]


def make_incremental(root: str) -> None:
    """v<incremental version>-incremental/: step-0000000001 (every chunk hashed) and step-0000000002 (saved with base= step 1)."""
    import shardckpt
    one, two = incremental_states()
    shardckpt.save(one, os.path.join(root, "step-0000000001"), frame_size=256, content_hash=True,
                   metadata={"golden": True})
    shardckpt.save(two, os.path.join(root, "step-0000000002"), frame_size=256,
                   base=os.path.join(root, "step-0000000001"), metadata={"golden": True})


def main() -> None:
    from shardckpt.format.records import FORMAT_VERSION_INCREMENTAL
    incremental = os.path.join(HERE, f"v{FORMAT_VERSION_INCREMENTAL}-incremental")
    if not os.path.exists(incremental):
        make_incremental(incremental)
        print("wrote", incremental)
    import shardckpt
    from shardckpt.format.records import FORMAT_VERSION
    single = os.path.join(HERE, f"v{FORMAT_VERSION}")
    two = os.path.join(HERE, f"v{FORMAT_VERSION}-2ranks")
    if os.path.exists(single) and os.path.exists(two):
        sys.exit(f"{single} and {two} exist: golden checkpoints are never rewritten")
    if not os.path.exists(single):
        shardckpt.save(golden_state(), single, frame_size=256, metadata={"golden": True})
        print("wrote", single)
    if not os.path.exists(two):
        sys.path.insert(0, os.path.dirname(HERE))
        from harness import run_ranks
        from golden.make_golden import _save_2ranks  # by module name, so the spawned ranks can import it
        run_ranks(2, _save_2ranks, two)
        print("wrote", two)


if __name__ == "__main__":
    main()

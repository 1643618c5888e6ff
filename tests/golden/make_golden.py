"""Writes the golden checkpoint for the current format_version (run once per new version; never rewrite an
existing one: old checkpoints must keep loading). python tests/golden/make_golden.py"""
from __future__ import annotations

import os
import sys

import torch


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


if __name__ == "__main__":
    import shardckpt
    from shardckpt.format import FORMAT_VERSION
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"v{FORMAT_VERSION}")
    if os.path.exists(out):
        sys.exit(f"{out} exists: golden checkpoints are never rewritten")
    shardckpt.save(golden_state(), out, frame_size=256, metadata={"golden": True})
    print("wrote", out)

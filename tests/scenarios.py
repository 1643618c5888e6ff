"""Reference states and layouts shared by the multi-rank tests (importable by spawned ranks)."""
from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.uint8, torch.bool,
          torch.float8_e4m3fn, torch.float64, torch.int32]


def full_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic full tensors: the same on every rank. Odd sizes make uneven shards."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    shapes = {"even": (8, 6), "uneven": (7, 5), "wide": (3, 11), "big": (300, 1000), "vec": (13,), "tiny": (1, 2),
              "cube": (5, 4, 3), "scalar": ()}
    for i, (name, shape) in enumerate(shapes.items()):
        dt = DTYPES[i % len(DTYPES)] if name not in ("big",) else torch.bfloat16
        x = torch.randn(shape, generator=g) * 3
        if dt == torch.bool:
            x = x > 0
        elif not dt.is_floating_point:
            x = x.to(torch.int64).clamp(-100, 100).to(dt) if dt != torch.uint8 else x.abs().to(torch.uint8)
        else:
            x = x.to(dt)
        out[name] = x
    out["f32_big"] = torch.randn(601, 513, generator=g)  # > 1 MiB: replicas split it
    return out


def placements_for(name: str, ndim: int, mesh_ndim: int, variant: int):
    """A layout per (tensor, variant): cycles through Shard(d), Replicate and 2-D mixes."""
    from torch.distributed.tensor import Replicate, Shard
    opts1 = [Shard(0), Replicate()] + ([Shard(1)] if ndim > 1 else [])
    if mesh_ndim == 1:
        if ndim == 0:
            return [Replicate()]
        return [opts1[(variant + len(name)) % len(opts1)]]
    if ndim == 0:
        return [Replicate(), Replicate()]
    opts2 = [[Shard(0), Shard(1) if ndim > 1 else Replicate()], [Replicate(), Shard(0)], [Shard(0), Shard(0)],
             [Shard(0), Replicate()]]
    return opts2[(variant + len(name)) % len(opts2)]


def make_mesh(world_size: int, mesh_ndim: int):
    from torch.distributed.device_mesh import init_device_mesh
    if mesh_ndim == 2:
        return init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    return init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))


def distributed_state(full: dict, mesh, variant: int, plain: tuple = ("vec",)):
    """DTensors of the full tensors over `mesh` (plain tensors for names in `plain`)."""
    from torch.distributed.tensor import distribute_tensor
    out = {}
    for name, t in full.items():
        if name in plain:
            out[name] = t.clone()
            continue
        pl = placements_for(name, t.dim(), mesh.ndim, variant)
        out[name] = distribute_tensor(t.clone(), mesh, pl, src_data_rank=None)
    return out


def zeros_like_state(state: dict):
    from torch.distributed.tensor import DTensor
    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            v._local_tensor.zero_() if v.dtype != torch.bool else v._local_tensor.fill_(False)
            out[k] = v
        else:
            out[k] = torch.zeros_like(v)
    return out


def full_of(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t

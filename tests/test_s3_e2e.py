"""End to end on a real S3 server (Ceph radosgw on loopback): a 2-rank save, a 3-rank resharding load,
a one-process full load, create-only commit, and reads that fetch only the needed frames."""
from __future__ import annotations

import pytest
import torch

import shardckpt
from harness import run_ranks
from scenarios import distributed_state, full_of, full_state, make_mesh, zeros_like_state

pytestmark = pytest.mark.s3


def _save(rank, ws, url, opts):
    state = distributed_state(full_state(), make_mesh(ws, 1), 0, plain=("vec", "f32_big"))
    state["step"] = 11
    shardckpt.save(state, url, storage_options=opts, frame_size=16 << 10)
    return True


def _load(rank, ws, url, opts):
    full = full_state()
    state = zeros_like_state(distributed_state(full, make_mesh(ws, 1), 1))
    state["step"] = 0
    r = shardckpt.load(state, url, storage_options=opts)
    for k, ref in full.items():
        got = full_of(state[k])
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)) if ref.dtype.itemsize == 1 and \
            ref.dtype.is_floating_point else torch.equal(got, ref), k
    assert state["step"] == 11
    # a Shard(0) load of one tensor fetches about its third of that tensor's frames, not the checkpoint
    from torch.distributed.tensor import Shard, distribute_tensor
    big = distribute_tensor(torch.zeros_like(full["big"]), make_mesh(ws, 1), [Shard(0)], src_data_rank=None)
    r = shardckpt.load({"big": big}, url, storage_options=opts, strict=False)
    assert torch.equal(big.full_tensor(), full["big"]) and "f32_big" in r.unexpected_keys
    return r.bytes_read


def test_save_reshard_load_on_real_s3(s3_server):
    url = s3_server.url("e2e/step-1")
    opts = s3_server.storage_options
    env = {"AWS_DEFAULT_REGION": s3_server.region}
    run_ranks(2, _save, url, opts, env=env)
    m = shardckpt.read_manifest(url, storage_options=opts)
    assert m.world_size == 2
    read = run_ranks(3, _load, url, opts, env=env)
    from shardckpt.loading.load import read_chunks
    from shardckpt.storage import storage_for
    chunks = read_chunks(storage_for(url, opts), m)["big"]
    big_stored = sum(f.stored_len for c in chunks for f in c.frames)
    assert 0 < max(read) < 0.6 * big_stored, (read, big_stored)
    out = shardckpt.load_full(url, storage_options=opts)
    assert torch.equal(out["big"], full_state()["big"])
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.save({"x": torch.zeros(3)}, url, storage_options=opts)
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.read_manifest(s3_server.url("e2e/missing"), storage_options=opts)

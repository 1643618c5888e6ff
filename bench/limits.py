"""The machine's limits for each checkpoint op, measured in the run that times the ops (bench.compare).

    python -m bench.limits [--dir /tmp/shardckpt-bench] [--mb 1024]

Measured:
  memcpy       a large copy between two faulted-in buffers (torch's copy_, its threads), best of 3
  encode/decode per core: the engine's own codec path (shardckpt.native.kernels.encode_frames /
               decode_frames with the codec "auto" picks for the dtype, the default frame size and zstd
               level) on one thread, over data drawn like bench.compare's state (weights, exp_avg, exp_avg_sq)
  disk write / read: large sequential I/O with O_DIRECT (64 MiB blocks from a page-aligned mmap buffer,
               one stream and four in parallel, the better one), the write fsynced; where the filesystem
               refuses O_DIRECT, through the page cache (write + fsync; read after dropping the cache, or
               warm where it cannot be dropped), said in "notes"; bench.compare measures it before and
               after its ops and keeps the better of each (remeasure_disk)

Each op's limit (the time it could not beat on this machine), from raw bytes R, stored bytes S, cores C:
  shardckpt save                    max(R / (encode per core * C), S / disk write)
  shardckpt load, reshard, full     max(S / disk read, R / (decode per core * C))
  dcp save                          max(R / memcpy, S / disk write)      (no codec: S = R)
  dcp load, reshard, full           max(S / disk read, R / memcpy)
An op's "multiple" is its time over its limit: 1.0 would be the machine's limit.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from bench.codecs import best  # the one timing helper of the benches

BLOCK = 64 << 20


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def memcpy_gbps(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)  # fault in: a reused buffer
    return nbytes / best(lambda: dst.copy_(src), 3) / 1e9


def codec_per_core(dtype: torch.dtype, codec: str = "auto", nbytes: int = 96 << 20, reps: int = 2) -> dict:
    """Encode and decode throughput (raw GB/s) on one thread, through the engine's kernels, of data like
    bench.compare's state: a third each of weights (*0.02), exp_avg (*1e-3) and exp_avg_sq (x^2 * 1e-6)."""
    from bench.compare import _rows
    from shardckpt.format.codec import CODEC_IDS, choose, plane_size, zstd_level
    from shardckpt.format.records import DEFAULT_FRAME_SIZE
    from shardckpt.native import kernels as _ext
    cols = 4096
    rows = max(1, nbytes // 3 // (cols * dtype.itemsize))
    parts = []
    for kind, (scale, square) in enumerate(((0.02, False), (1e-3, False), (1e-6, True))):
        x = _rows("limits", kind, 0, (rows, cols), 0, rows)
        parts.append((x * x * scale if square else x * scale).to(dtype).reshape(-1))
    src = torch.cat(parts).view(torch.uint8).numpy()
    name = choose(codec, dtype)
    cid, item, frame = CODEC_IDS[name], plane_size(dtype), DEFAULT_FRAME_SIZE
    out = np.zeros(_ext.encode_bound(src.size, frame, cid), np.uint8)
    frames: list = []

    def enc():
        frames[:] = _ext.encode_frames(src, out, frame, item, cid, zstd_level(), 1)

    t_enc = best(enc, reps)
    lens = [min(frame, src.size - i) for i in range(0, src.size, frame)]
    table = [(o, s, r, c, e) for (o, s, c, e), r in zip(frames, lens)]
    dst = np.zeros_like(src)
    t_dec = best(lambda: _ext.decode_frames(out, table, dst, item, cid, 1), reps)
    if not np.array_equal(dst, src):
        raise AssertionError("codec round trip failed")
    stored = sum(f[1] for f in frames)
    return {"codec": name, "encode_GBps_per_core": src.size / t_enc / 1e9,
            "decode_GBps_per_core": src.size / t_dec / 1e9, "ratio": stored / src.size}


def _aligned(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned


def _open(path: str, flags: int, notes: list[str], what: str) -> tuple[int, bool]:
    """(fd, direct): O_DIRECT where the filesystem takes it, else the page cache (noted)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            notes.append(f"{what}: O_DIRECT refused ({e.strerror}); page cache")
    return os.open(path, flags, 0o644), False


def _io(fd: int, bufs: list, nblocks: int, streams: int, write: bool) -> None:
    def one(s):
        for i in range(s, nblocks, streams):
            if write:
                n = os.pwrite(fd, bufs[s], i * BLOCK)
            else:
                n = os.preadv(fd, [bufs[s]], i * BLOCK)
            if n != BLOCK:
                raise OSError(f"short {'write' if write else 'read'}: {n} of {BLOCK} bytes")
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, range(streams)))


def disk_gbps(root: str, nbytes: int, drop_caches) -> dict:
    """Sequential write (fsynced) and read bandwidth of the filesystem under `root`, large O_DIRECT I/O,
    the better of one stream and four. `drop_caches()` -> bool empties the page cache before each read."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "limits-disk")
    nblocks = max(1, nbytes // BLOCK)
    notes: list[str] = []
    bufs = [_aligned(BLOCK) for _ in range(4)]
    for b in bufs:
        b.write(os.urandom(1 << 20) * (BLOCK >> 20))
    out = {"write_GBps": 0.0, "read_GBps": 0.0}
    try:
        for streams in (1, 4):
            fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, notes, "write")
            try:
                t0 = time.perf_counter()
                try:
                    _io(fd, bufs, nblocks, streams, True)
                except OSError as e:
                    if not direct:
                        raise
                    notes.append(f"write: O_DIRECT failed at write time ({e}); page cache")
                    os.close(fd)
                    fd, direct = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), False
                    t0 = time.perf_counter()
                    _io(fd, bufs, nblocks, streams, True)
                os.fsync(fd)
                out["write_GBps"] = max(out["write_GBps"], nblocks * BLOCK / (time.perf_counter() - t0) / 1e9)
                out["write_direct"] = direct
            finally:
                os.close(fd)
            cold = drop_caches()
            fd, direct = _open(path, os.O_RDONLY, notes, "read")
            if not direct and not cold:
                notes.append("read: page cache could not be dropped; warm read")
            try:
                t0 = time.perf_counter()
                _io(fd, bufs, nblocks, streams, False)
                out["read_GBps"] = max(out["read_GBps"], nblocks * BLOCK / (time.perf_counter() - t0) / 1e9)
                out["read_direct"] = direct
            finally:
                os.close(fd)
    finally:
        os.unlink(path)
        for b in bufs:
            b.close()
    out["bytes"] = nblocks * BLOCK
    out["notes"] = sorted(set(notes))
    return out


def remeasure_disk(lim: dict, root: str, nbytes: int, drop_caches) -> dict:
    """The disk measured again (bench.compare: after its ops) and the better of each bandwidth kept: a
    shared or virtual disk varies from minute to minute, and an op that beat a slow sample would otherwise
    look faster than the machine's limit. Every sample stays in disk["samples"]."""
    again = disk_gbps(root, min(max(nbytes, 256 << 20), 1 << 30), drop_caches)
    d = lim["disk"]
    samples = d.get("samples", [{k: d[k] for k in ("write_GBps", "read_GBps")}])
    samples.append({k: again[k] for k in ("write_GBps", "read_GBps")})
    d.update(write_GBps=max(d["write_GBps"], again["write_GBps"]), read_GBps=max(d["read_GBps"], again["read_GBps"]),
             samples=samples, notes=sorted(set(d["notes"]) | set(again["notes"])))
    return lim


def measure(root: str, nbytes: int, dtype: torch.dtype, codec: str, drop_caches) -> dict:
    """Every limit above, measured now: what bench.compare prints beside its ops."""
    return {"cores": cores(), "memcpy_GBps": memcpy_gbps(min(nbytes, 1 << 30)),
            **codec_per_core(dtype, codec), "disk": disk_gbps(root, min(max(nbytes, 256 << 20), 1 << 30), drop_caches)}


def op_limits(lim: dict, raw: int, stored: dict[str, int]) -> dict:
    """Per op and method, the limit in seconds (module docstring) for `raw` bytes of state and each
    method's bytes on disk."""
    c, disk = lim["cores"], lim["disk"]
    out: dict[str, dict[str, float]] = {"save": {}, "load": {}}
    for m, s in stored.items():
        copy = raw / (lim["memcpy_GBps"] * 1e9)
        cpu_save = raw / (lim["encode_GBps_per_core"] * 1e9 * c) if m == "shardckpt" else copy
        cpu_load = raw / (lim["decode_GBps_per_core"] * 1e9 * c) if m == "shardckpt" else copy
        out["save"][m] = max(cpu_save, s / (disk["write_GBps"] * 1e9))
        out["load"][m] = max(cpu_load, s / (disk["read_GBps"] * 1e9))
    return {"save": out["save"], "load": out["load"], "reshard": dict(out["load"]), "full": dict(out["load"])}


def main(argv=None) -> None:
    from bench.compare import drop_caches
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/tmp/shardckpt-bench"))
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.dir, a.mb << 20, getattr(torch, a.dtype), "auto", drop_caches), indent=1))


if __name__ == "__main__":
    main()

"""Codecs: how a chunk's bytes become frames and back. Plug-ins keyed by the "name/version" descriptor saved
per chunk, so a load never guesses. The kernels live in csrc/ (native) or shardckpt/_twin.py (pure Python);
shardckpt.native.kernels picks one."""
from __future__ import annotations

import os

import torch

from shardckpt.native import kernels as _ext
from shardckpt import config
from shardckpt.errors import FormatError

RAW, ZSTD, ZSTD_BYTEPLANE = "raw/1", "zstd/1", "zstd-byteplane/1"
CODEC_IDS = {RAW: _ext.CODEC_RAW, ZSTD: _ext.CODEC_ZSTD, ZSTD_BYTEPLANE: _ext.CODEC_ZSTD_BYTEPLANE}
USER_NAMES = {"raw": RAW, "zstd": ZSTD, "zstd-byteplane": ZSTD_BYTEPLANE, "byteplane": ZSTD_BYTEPLANE}


def zstd_level() -> int:
    """The zstd level of zstd/1 frames: SHARDCKPT_ZSTD_LEVEL (default 1), read when a rank writer starts,
    so one file is written at one level. Called by writer.RankWriter."""
    return config.zstd_level()


def threads() -> int:
    """Worker threads for the native kernels: SHARDCKPT_THREADS, else this process's share of the CPUs it
    may use, split among the ranks torchrun started on this node (LOCAL_WORLD_SIZE), so 8 ranks on a
    96-core node each use 12 threads instead of all 96 fighting over the cores. Called at each save, load
    and snapshot (staging, writer, reader, CLI verify)."""
    env = config.threads()
    if env is not None:
        return env
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cpus // local)


def choose(codec: str, dtype: torch.dtype) -> str:
    """The codec descriptor for a tensor. "auto": byte-plane zstd for 2/4/8-byte floating types (exponent
    bytes compress, mantissa bytes don't: splitting them is where the ratio comes from), plain zstd for
    everything else. Frames that do not shrink are stored raw whatever the codec."""
    if codec in CODEC_IDS:
        return codec
    if codec == "auto":
        if (dtype.is_floating_point or dtype.is_complex) and dtype.itemsize in (2, 4, 8):
            return ZSTD_BYTEPLANE
        return ZSTD
    try:
        return USER_NAMES[codec]
    except KeyError:
        raise FormatError(f"unknown codec {codec!r}; choose auto, raw, zstd or zstd-byteplane") from None


def plane_size(dtype: torch.dtype) -> int:
    """Byte-plane element width: complex types split per real component."""
    return dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize

"""Configuration from the environment: every SHARDCKPT_* variable is parsed here, and only here.

Each reader below is called at the moment its value is needed (a save, a pool, a native call), so a launcher
that sets a variable after importing shardckpt still counts; an unset or empty variable means the default.
A value that cannot be used raises ConfigError naming the variable, never falls back silently.

  SHARDCKPT_POOL_BYTES      size     bound of each host staging pool        staging.pool_bytes_from_env, per pool
  SHARDCKPT_TIMEOUT         seconds  collective timeout (default 600)       dist.default_timeout_s, per save/load
  SHARDCKPT_THREADS         int >= 1 native kernel threads per rank          codec.threads, per native call batch
  SHARDCKPT_ZSTD_LEVEL      int      zstd level of zstd/1 frames (1)        codec.zstd_level, per rank writer
  SHARDCKPT_DIRECT_IO       bool     O_DIRECT local data files (1)          storage.local, per LocalStorage
  SHARDCKPT_BACKEND         name     native (default) or python kernels     _ext, once at import (by design:
  SHARDCKPT_REQUIRE_NATIVE  bool     fail instead of falling back (0)         the kernels cannot change later)

Not parsed here: SHARDCKPT_LIBZSTD and SHARDCKPT_LIBXXHASH (library paths, read by csrc/zstd_dl.cpp and
csrc/xxhash_dl.cpp when they dlopen libzstd and libxxhash) and the test-only switches (SHARDCKPT_FAULT in _faults.py, SHARDCKPT_REQUIRE_S3 / _SLOW / _FUZZ_EXAMPLES in tests/).

Sizes (parse_size, also used for option values such as `shardckpt export --max-shard-size`): a number of
bytes with an optional unit, case-insensitive, spaces allowed between them. Every unit is binary, whether or
not it is spelled with an "i": K, KB, KiB = 2^10; M, MB, MiB = 2^20; G, GB, GiB = 2^30; T, TB, TiB = 2^40;
B = 1. So "8G", "8GB" and "8GiB" are all 8 * 2^30 bytes. A fraction is allowed with a unit ("1.5G") and
rounded down to a whole byte; a plain number must be whole.
"""
from __future__ import annotations

import math
import os
import re
from decimal import Decimal, InvalidOperation

from shardckpt.errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_ZSTD_LEVEL = 1
ZSTD_LEVELS = (-131072, 22)  # zstd's own range (ZSTD_minCLevel .. ZSTD_maxCLevel); 0 means zstd's default
BACKENDS = ("native", "python")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env(name: str) -> str | None:
    """The stripped value of a variable, or None when it is unset or empty (both mean: the default)."""
    v = os.environ.get(name, "").strip()
    return v or None


# ----------------------------------------------------------------------------------------------- parsers

def parse_size(text, *, name: str) -> int:
    """A size in bytes from "8G", "8GB", "8GiB", "512M", "1.5G", "4096" (or an int), units as the module
    docstring says (binary). Called for every size variable and option.

    Args:
        text: the value as the user wrote it, or an int (taken as bytes).
        name: the variable or option it came from, named in the error.

    Returns:
        The size in bytes (>= 0).

    Raises:
        ConfigError: the value is not a size (garbage, a negative number, a fraction of a byte, "iB" without
            a unit letter).
    """
    if isinstance(text, bool):
        raise ConfigError(f"{name}={text!r} is not a size", name=name)
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{name}={text!r} is negative", name=name)
        return text
    hint = 'e.g. "8G", "512MiB" or a number of bytes; K/M/G/T are powers of 1024'
    m = _SIZE.fullmatch(str(text).strip().lower())
    # "i" names a binary unit, so it needs a unit letter before it ("8iB" is nonsense)
    if not m or (m.group(3) and not m.group(2)):
        raise ConfigError(f"{name}={text!r} is not a size ({hint})", name=name)
    number, unit = m.group(1), m.group(2)
    try:
        value = Decimal(number) * _UNITS[unit]
    except InvalidOperation:
        raise ConfigError(f"{name}={text!r} is not a size ({hint})", name=name) from None
    if not unit and value != int(value):
        raise ConfigError(f"{name}={text!r} is a fraction of a byte ({hint})", name=name)
    return int(value)


def parse_bool(text: str, *, name: str) -> bool:
    """1/true/yes/on or 0/false/no/off (any case). Raises ConfigError naming `name` for anything else."""
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean (use 1 or 0)", name=name)


def _parse_int(text: str, *, name: str, lo: int, hi: int | None = None) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer", name=name) from None
    if v < lo or (hi is not None and v > hi):
        bounds = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name}={text!r} is out of range (must be {bounds})", name=name)
    return v


# ------------------------------------------------------------------------------------------- variables

def pool_bytes() -> int | None:
    """SHARDCKPT_POOL_BYTES: the default bound of each host staging pool (> 0), or None (unbounded)."""
    v = _env("SHARDCKPT_POOL_BYTES")
    if v is None:
        return None
    n = parse_size(v, name="SHARDCKPT_POOL_BYTES")
    if n <= 0:
        raise ConfigError(f"SHARDCKPT_POOL_BYTES={v!r} must be > 0 (unset it for an unbounded pool)",
                          name="SHARDCKPT_POOL_BYTES")
    return n


def timeout_s() -> float:
    """SHARDCKPT_TIMEOUT: seconds a collective waits for a slow or dead rank (finite, > 0; default 600)."""
    v = _env("SHARDCKPT_TIMEOUT")
    if v is None:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(v)
    except ValueError:
        raise ConfigError(f"SHARDCKPT_TIMEOUT={v!r} is not a number of seconds", name="SHARDCKPT_TIMEOUT") from None
    if not (t > 0 and math.isfinite(t)):
        raise ConfigError(f"SHARDCKPT_TIMEOUT={v!r} must be a finite number of seconds > 0",
                          name="SHARDCKPT_TIMEOUT")
    return t


def threads() -> int | None:
    """SHARDCKPT_THREADS: native kernel threads per rank (>= 1), or None for the automatic choice."""
    v = _env("SHARDCKPT_THREADS")
    return None if v is None else _parse_int(v, name="SHARDCKPT_THREADS", lo=1)


def zstd_level() -> int:
    """SHARDCKPT_ZSTD_LEVEL: the zstd level of zstd/1 frames (zstd's range, -131072..22; default 1)."""
    v = _env("SHARDCKPT_ZSTD_LEVEL")
    if v is None:
        return DEFAULT_ZSTD_LEVEL
    return _parse_int(v, name="SHARDCKPT_ZSTD_LEVEL", lo=ZSTD_LEVELS[0], hi=ZSTD_LEVELS[1])


def check_save_variables() -> None:
    """Every rank, at the start of each save (api._prepare, before its first collective): parse the
    variables the save reads later on its writer threads, so a bad value raises ConfigError to the caller
    (`except ConfigError` catches it) instead of becoming a SaveError of the failed save."""
    threads()
    zstd_level()


def direct_io() -> bool:
    """SHARDCKPT_DIRECT_IO: whether local data files use O_DIRECT where the filesystem takes it (default 1)."""
    v = _env("SHARDCKPT_DIRECT_IO")
    return True if v is None else parse_bool(v, name="SHARDCKPT_DIRECT_IO")


def backend() -> str:
    """SHARDCKPT_BACKEND: "native" (default: the compiled kernels, else the twin with a warning) or "python"."""
    v = _env("SHARDCKPT_BACKEND")
    if v is None:
        return "native"
    if v.lower() not in BACKENDS:
        raise ConfigError(f"SHARDCKPT_BACKEND={v!r} is not a backend (choose native or python)",
                          name="SHARDCKPT_BACKEND")
    return v.lower()


def require_native() -> bool:
    """SHARDCKPT_REQUIRE_NATIVE: fail at import instead of falling back to the twin (default 0)."""
    v = _env("SHARDCKPT_REQUIRE_NATIVE")
    return False if v is None else parse_bool(v, name="SHARDCKPT_REQUIRE_NATIVE")

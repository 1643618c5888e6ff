"""The kernel backend: the compiled module shardckpt._native (csrc/) or its pure-Python twin (_twin.py).

Who calls it: shardckpt.format.codec, staging and storage call the functions below; tests switch backends with
SHARDCKPT_BACKEND=python or compare both through `backend(name)`.

Selection, once at import: native unless SHARDCKPT_BACKEND=python or the compiled module fails to import
(NATIVE_ERROR says why). The native module dlopens libzstd.so.1 at runtime (no zstd headers or static copy
at build time); when that fails, its zstd frames go through the `zstandard` package while copy, crc32c and
byte planes stay native (ZSTD_SOURCE says which). It dlopens libxxhash.so.0 the same way for the chunk content
hash, XXH3-128; when that fails, xxh3_128 goes through the `xxhash` package (XXHASH_SOURCE says which).

Contract of the content-hash kernels (both backends, byte-identical results):
  xxh3_128(data) -> str             XXH3-128, seed 0, of a C-contiguous buffer: 32 lowercase hex digits of
                                    the canonical (big-endian, high half first) digest. GIL released.
  xxh3_128_many(bufs, nthreads=0)   [xxh3_128(b) for b in bufs], the buffers shared among up to nthreads
      -> list[str]                  threads (0: one per core; one buffer is hashed by one thread). Every
                                    buffer is checked (ValueError) before any is hashed. GIL released.
"""
from __future__ import annotations

import functools
import types

from shardckpt.native import twin as _twin
from shardckpt import config
from shardckpt.native.twin import CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_BYTEPLANE, FrameError

__all__ = [
    "BACKEND", "NATIVE_ERROR", "ZSTD_SOURCE", "XXHASH_SOURCE", "CODEC_RAW", "CODEC_ZSTD", "CODEC_ZSTD_BYTEPLANE", "FrameError",
    "crc32c", "crc32c_frames", "copy_into", "byteplane_split", "byteplane_merge", "encode_bound",
    "encode_frames", "decode_frames", "pread_into", "pwrite_from", "xxh3_128", "xxh3_128_many",
]

_API = ("crc32c", "crc32c_frames", "copy_into", "copy_many", "byteplane_split", "byteplane_merge", "encode_bound",
        "encode_frames", "decode_frames", "pread_into", "pwrite_from", "xxh3_128", "xxh3_128_many")


def _load_native():
    """Import the compiled module and wire it to the shared FrameError. Returns (namespace, error)."""
    try:
        from shardckpt import _native
    except ImportError as e:  # not built, or built for another Python
        return None, f"{type(e).__name__}: {e}"
    _native._set_frame_error(FrameError)
    ns = types.SimpleNamespace(**{name: getattr(_native, name) for name in _API})
    ns.NAME = "native"
    if _native.zstd_available():
        ns.ZSTD_SOURCE = _native.zstd_source()
    else:
        # libzstd.so.1 could not be dlopened: frames go through python-zstandard, the rest stays native.
        ns.ZSTD_SOURCE = _twin.ZSTD_SOURCE + f"; dlopen failed: {_native.zstd_source()}"

        def encode_frames(src, out, frame_size, itemsize, codec, level=1, nthreads=0):
            return _twin._encode_frames_impl(src, out, frame_size, itemsize, codec, level, nthreads,
                                             _native.crc32c_frames,
                                             lambda s, d, k: _native.byteplane_split(s, d, k))

        def decode_frames(src, frames, dst, itemsize, codec, nthreads=0):
            _twin._decode_frames_impl(src, frames, dst, itemsize, codec, nthreads, _native.crc32c,
                                      lambda s, d, k: _native.byteplane_merge(s, d, k))

        ns.encode_frames, ns.decode_frames = encode_frames, decode_frames
    if _native.xxhash_available():
        ns.XXHASH_SOURCE = _native.xxhash_source()
    else:  # libxxhash.so.0 could not be dlopened: the same digests from the xxhash package
        ns.XXHASH_SOURCE = _twin.XXHASH_SOURCE + f"; dlopen failed: {_native.xxhash_source()}"
        ns.xxh3_128, ns.xxh3_128_many = _twin.xxh3_128, _twin.xxh3_128_many
    ns.MODULE = _native
    return ns, None


def _twin_namespace():
    ns = types.SimpleNamespace(**{name: getattr(_twin, name) for name in _API})
    ns.NAME, ns.ZSTD_SOURCE, ns.XXHASH_SOURCE, ns.MODULE = "python", _twin.ZSTD_SOURCE, _twin.XXHASH_SOURCE, _twin
    return ns


@functools.lru_cache(maxsize=None)
def backend(name: str):
    """The kernels of one backend ("native" or "python") as a namespace, whatever BACKEND is; raises
    ImportError for "native" when the compiled module is unavailable. For tests and benchmarks."""
    if name == "python":
        return _twin_namespace()
    if name == "native":
        ns, err = _load_native()
        if ns is None:
            raise ImportError(err)
        return ns
    raise ValueError(f"unknown backend {name!r}")


def _select():
    """Pick the kernels from SHARDCKPT_BACKEND / SHARDCKPT_REQUIRE_NATIVE (parsed by shardckpt.config, which
    refuses a misspelt value with ConfigError rather than quietly picking native)."""
    require = config.require_native()  # parsed even when native loads: a misspelt value is never ignored
    if config.backend() == "python":
        return backend("python"), "SHARDCKPT_BACKEND=python"
    try:
        return backend("native"), None
    except ImportError as e:
        if require:
            raise ImportError(f"SHARDCKPT_REQUIRE_NATIVE=1 but the native module is unavailable: {e}") from e
        import warnings
        warnings.warn(f"shardckpt: native kernels unavailable ({e}); using the pure-Python twin, which is "
                      f"several times slower. Reinstall with a C++ compiler to build csrc/.", RuntimeWarning,
                      stacklevel=2)
        return backend("python"), str(e)


_impl, NATIVE_ERROR = _select()
BACKEND: str = _impl.NAME
ZSTD_SOURCE: str = _impl.ZSTD_SOURCE
XXHASH_SOURCE: str = _impl.XXHASH_SOURCE

crc32c = _impl.crc32c
crc32c_frames = _impl.crc32c_frames
copy_into = _impl.copy_into
copy_many = _impl.copy_many
byteplane_split = _impl.byteplane_split
byteplane_merge = _impl.byteplane_merge
encode_bound = _impl.encode_bound
encode_frames = _impl.encode_frames
decode_frames = _impl.decode_frames
pread_into = _impl.pread_into
pwrite_from = _impl.pwrite_from
xxh3_128 = _impl.xxh3_128
xxh3_128_many = _impl.xxh3_128_many

"""Pure-Python twin of the native kernels (csrc/): same functions, same signatures, same bytes.

Who calls it: shardckpt.native.kernels, when the compiled module is missing or SHARDCKPT_BACKEND=python, and the tests,
which run every kernel on both backends. Nothing here imports another shardckpt module.

Output is byte-identical to the native module for raw frames, crc32c, byte planes and XXH3-128 digests. zstd frames are
identical only when the `zstandard` package bundles the same libzstd version as the one the native module
dlopens (e.g. zstandard 0.25 bundles 1.5.7 while a distro may ship 1.5.4): both are valid zstd frames that
either backend decodes, which is all the format promises.

Why one module of ~500 lines: it is the twin of csrc/ kernel for kernel, in the same order, so the two are
read side by side; splitting it would break that correspondence.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash
import zstandard

CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_BYTEPLANE = 0, 1, 2
_CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_BYTEPLANE)
_ITEMSIZES = (1, 2, 4, 8)
XXHASH_SOURCE = f"xxhash package {xxhash.VERSION} (xxHash {xxhash.XXHASH_VERSION})"
ZSTD_SOURCE = f"zstandard package (libzstd {zstandard.ZSTD_VERSION[0]}.{zstandard.ZSTD_VERSION[1]}.{zstandard.ZSTD_VERSION[2]})"


class FrameError(Exception):
    """A stored frame failed verification on decode.

    Attributes:
        index: position of the frame in the list passed to decode_frames.
        reason: "checksum" (crc32c of the stored bytes differs) or "corrupt" (zstd rejected the payload or
            it did not decode to exactly raw_len bytes).
    """

    def __init__(self, index: int, reason: str, detail: str = ""):
        self.index = int(index)
        self.reason = str(reason)
        self.detail = detail
        msg = f"frame {self.index}: {self.reason}"
        super().__init__(msg + (f" ({detail})" if detail else ""))

    def __reduce__(self):
        return (type(self), (self.index, self.reason, self.detail))


# ----------------------------------------------------------------------------------------------- buffers
def _ro(buf) -> np.ndarray:
    """Flat uint8 view of any C-contiguous buffer (no copy)."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("buffer must be C-contiguous")
        return buf.reshape(-1).view(np.uint8)
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if mv.nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer(mv.cast("B"), np.uint8)


def _rw(buf) -> np.ndarray:
    a = _ro(buf)
    if a.size and not a.flags.writeable:
        raise ValueError("destination buffer must be writable")
    return a


def _threads(nthreads: int, work: int) -> int:
    n = int(nthreads) if nthreads and nthreads > 0 else (os.cpu_count() or 1)
    return max(1, min(n, work, 64))


# ----------------------------------------------------------------------------------------------- crc32c
# CRC-32C (Castagnoli), reflected polynomial. The "raw register" g(data) is the CRC register after feeding
# `data` into a zero register without the usual pre/post inversion. It is linear over GF(2):
#   reg(init, A||B) = Z^len(B) · reg(init, A)  xor  g(B)
# where Z^n is the (32x32 bit) operator "feed n zero bytes". That lets us compute many blocks as parallel
# numpy lanes (slicing-by-4 tables) and combine them with shift operators in a log-depth tree.
_POLY = 0x82F63B78


def _make_tables() -> np.ndarray:
    t0 = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t0 = np.where(t0 & 1, (t0 >> 1) ^ np.uint32(_POLY), t0 >> 1).astype(np.uint32)
    tabs = [t0]
    for _ in range(3):
        prev = tabs[-1]
        tabs.append(((prev >> 8) ^ t0[prev & 0xFF]).astype(np.uint32))
    return np.stack(tabs)


_T = _make_tables()
_T0, _T1, _T2, _T3 = (_T[i] for i in range(4))
_T0_LIST = _T0.tolist()
_BITS = ((np.arange(256, dtype=np.uint32)[:, None] >> np.arange(8, dtype=np.uint32)) & 1).astype(bool)


def _op_tables(cols: np.ndarray) -> np.ndarray:
    """(4, 256) byte lookup tables applying the linear operator whose column j is cols[j] (= op(1 << j))."""
    out = np.empty((4, 256), np.uint32)
    for k in range(4):
        out[k] = np.bitwise_xor.reduce(np.where(_BITS, cols[8 * k:8 * k + 8][None, :], np.uint32(0)), axis=1)
    return out


def _apply(tabs: np.ndarray, v: np.ndarray) -> np.ndarray:
    return tabs[0][v & 0xFF] ^ tabs[1][(v >> 8) & 0xFF] ^ tabs[2][(v >> 16) & 0xFF] ^ tabs[3][v >> 24]


def _zero_byte_cols() -> np.ndarray:
    e = np.uint32(1) << np.arange(32, dtype=np.uint32)
    return (_T0[e & 0xFF] ^ (e >> 8)).astype(np.uint32)


_POW2_TABS = [_op_tables(_zero_byte_cols())]  # _POW2_TABS[k] = Z^(2^k)
for _ in range(62):
    _prev = _POW2_TABS[-1]
    _cols = _apply(_prev, _apply(_prev, np.uint32(1) << np.arange(32, dtype=np.uint32)))
    _POW2_TABS.append(_op_tables(_cols))


@functools.lru_cache(maxsize=256)
def _shift_tabs(n: int) -> np.ndarray:
    """Tables for Z^n (feed n zero bytes)."""
    cols = np.uint32(1) << np.arange(32, dtype=np.uint32)
    k = 0
    while n:
        if n & 1:
            cols = _apply(_POW2_TABS[k], cols)
        n >>= 1
        k += 1
    return _op_tables(cols)


def _shift(reg: int, n: int) -> int:
    if n == 0 or reg == 0:
        return reg
    return int(_apply(_shift_tabs(n), np.array([reg], np.uint32))[0])


def _g_rows(rows: np.ndarray) -> np.ndarray:
    """Raw register of each row of a (R, b) uint8 array, b % 4 == 0, rows as parallel lanes."""
    r, b = rows.shape
    words = np.ascontiguousarray(rows).view("<u4").reshape(r, b // 4)
    cols = np.ascontiguousarray(words.T)
    c = np.zeros(r, np.uint32)
    t = np.empty(r, np.uint32)
    for j in range(b // 4):
        c ^= cols[j]
        np.take(_T3, c & 0xFF, out=t)
        t ^= np.take(_T2, (c >> 8) & 0xFF)
        t ^= np.take(_T1, (c >> 16) & 0xFF)
        t ^= np.take(_T0, c >> 24)
        c, t = t, c
    return c


def _tree(g: np.ndarray, b: int) -> np.ndarray:
    """Combine (R, k) lane registers (k a power of two, each lane b bytes) into one register per row."""
    while g.shape[1] > 1:
        g = _apply(_shift_tabs(b), g[:, 0::2]) ^ g[:, 1::2]
        b *= 2
    return g[:, 0]


def _g_bytes(a: np.ndarray) -> int:
    """Raw register (zero init, no inversion) of a 1-D uint8 array."""
    n = a.size
    if n < 256:
        c = 0
        t0 = _T0_LIST
        for byte in a.tobytes():
            c = t0[(c ^ byte) & 0xFF] ^ (c >> 8)
        return c
    lanes = 1 << min(16, (n // 64).bit_length() - 1)
    b = (n // lanes) & ~3
    head = lanes * b
    g = int(_tree(_g_rows(a[:head].reshape(1, lanes, b).reshape(lanes, b)).reshape(1, lanes), b)[0])
    tail = n - head
    if tail:
        g = _shift(g, tail) ^ _g_bytes(a[head:])
    return g


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of `data` (any C-contiguous buffer), continuing from the crc `value` of preceding bytes."""
    a = _ro(data)
    reg = (~int(value)) & 0xFFFFFFFF
    reg = _shift(reg, a.size) ^ _g_bytes(a)
    return (~reg) & 0xFFFFFFFF


def crc32c_frames(src, frame_size: int, nthreads: int = 0) -> list[int]:
    """crc32c of src[i*F:(i+1)*F] for every frame (the last may be short)."""
    a = _ro(src)
    f = int(frame_size)
    if f <= 0:
        raise ValueError("frame_size must be positive")
    n = a.size
    nfull = n // f
    out: list[int] = []
    if nfull:
        if f % 4 == 0 and f >= 64:
            k = 1
            while f % (8 * k) == 0 and f // (2 * k) >= 64 and 2 * k * nfull <= 65536:
                k *= 2
            b = f // k
            g = _g_rows(a[:nfull * f].reshape(nfull * k, b)).reshape(nfull, k)
            g = _tree(g, b)
            init = _shift(0xFFFFFFFF, f)
            out = [(~(init ^ int(x))) & 0xFFFFFFFF for x in g]
        else:
            out = [crc32c(a[i * f:(i + 1) * f]) for i in range(nfull)]
    if n > nfull * f:
        out.append(crc32c(a[nfull * f:]))
    return out


# ----------------------------------------------------------------------------------------------- xxh3-128
def xxh3_128(data) -> str:
    """XXH3-128 (seed 0) of `data` (any C-contiguous buffer) in canonical form: 32 lowercase hex digits,
    the high 64 bits first (big-endian), as XXH128_canonicalFromHash writes them."""
    return xxhash.xxh3_128_hexdigest(_ro(data))


def xxh3_128_many(bufs, nthreads: int = 0) -> list[str]:
    """xxh3_128 of each buffer, in order."""
    views = [_ro(b) for b in bufs]  # every argument checked before any work
    return [xxhash.xxh3_128_hexdigest(v) for v in views]


# ----------------------------------------------------------------------------------------------- copy, planes
def copy_into(dst, src, nthreads: int = 0) -> None:
    """Copy all of src into the start of dst."""
    s = _ro(src)
    d = _rw(dst)
    if s.size > d.size:
        raise ValueError(f"copy_into: dst has {d.size} bytes, src {s.size}")
    d[:s.size] = s


def copy_many(dsts, srcs, nthreads: int = 0) -> None:
    """copy_into for each (dst, src) pair, in one call."""
    if len(dsts) != len(srcs):
        raise ValueError("copy_many: dsts and srcs differ in length")
    pairs = [(_rw(d), _ro(s)) for d, s in zip(dsts, srcs)]
    for i, (d, s) in enumerate(pairs):
        if s.size > d.size:
            raise ValueError(f"copy_many: dst {i} has {d.size} bytes, src {s.size}")
    for d, s in pairs:
        d[:s.size] = s


def _check_planes(s: np.ndarray, d: np.ndarray, itemsize: int) -> None:
    if itemsize not in _ITEMSIZES:
        raise ValueError(f"itemsize must be one of {_ITEMSIZES}, got {itemsize}")
    if s.size != d.size:
        raise ValueError(f"src and dst lengths differ ({s.size} != {d.size})")
    if s.size % itemsize:
        raise ValueError(f"length {s.size} is not a multiple of itemsize {itemsize}")


def _split(s: np.ndarray, d: np.ndarray, itemsize: int) -> None:
    if itemsize == 1:
        d[:] = s
    else:
        d.reshape(itemsize, -1)[:] = s.reshape(-1, itemsize).T


def _merge(s: np.ndarray, d: np.ndarray, itemsize: int) -> None:
    if itemsize == 1:
        d[:] = s
    else:
        d.reshape(-1, itemsize)[:] = s.reshape(itemsize, -1).T


def byteplane_split(src, dst, itemsize: int) -> None:
    """dst = byte 0 of every element, then every byte 1, ... (element width `itemsize`)."""
    s, d = _ro(src), _rw(dst)
    _check_planes(s, d, itemsize)
    _split(s, d, itemsize)


def byteplane_merge(src, dst, itemsize: int) -> None:
    """Inverse of byteplane_split."""
    s, d = _ro(src), _rw(dst)
    _check_planes(s, d, itemsize)
    _merge(s, d, itemsize)


# ----------------------------------------------------------------------------------------------- frames
def encode_bound(nbytes: int, frame_size: int, codec: int) -> int:
    """Capacity `out` needs for encode_frames: a frame that does not shrink is stored raw, so never more
    than the input."""
    if nbytes < 0 or frame_size <= 0 or codec not in _CODECS:
        raise ValueError("encode_bound: bad arguments")
    return int(nbytes)


_local = threading.local()


def _compressor(level: int, planes: bool = False) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    c = cache.get((level, planes))
    if c is None:
        # Same parameters as the native side (csrc/frames.cpp configure): content size written, no checksum,
        # no dict id; the level for plain zstd, the fast strategy with a tiny hash table for byte planes.
        if planes:
            params = zstandard.ZstdCompressionParameters(
                window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7, target_length=0,
                strategy=zstandard.STRATEGY_FAST, write_content_size=True, write_checksum=False,
                write_dict_id=False)
            c = zstandard.ZstdCompressor(compression_params=params)
        else:
            c = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False,
                                         write_dict_id=False)
        cache[(level, planes)] = c
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def _check_frame_args(itemsize: int, codec: int) -> None:
    if codec not in _CODECS:
        raise ValueError(f"unknown codec {codec}")
    if itemsize not in _ITEMSIZES:
        raise ValueError(f"itemsize must be one of {_ITEMSIZES}, got {itemsize}")


def _encode_frames_impl(src, out, frame_size, itemsize, codec, level, nthreads, crc_frames, split):
    s, o = _ro(src), _rw(out)
    frame_size, itemsize, codec, level = int(frame_size), int(itemsize), int(codec), int(level)
    _check_frame_args(itemsize, codec)
    if frame_size <= 0 or frame_size % itemsize:
        raise ValueError(f"frame_size {frame_size} must be a positive multiple of itemsize {itemsize}")
    n = s.size
    if codec == CODEC_ZSTD_BYTEPLANE and n % itemsize:
        raise ValueError(f"length {n} is not a multiple of itemsize {itemsize}")
    if o.size < encode_bound(n, frame_size, codec):
        raise ValueError(f"out has {o.size} bytes, encode_bound is {n}")
    nframes = -(-n // frame_size)
    if codec == CODEC_RAW:
        o[:n] = s
        crcs = crc_frames(o[:n], frame_size, nthreads)
        return [(i * frame_size, min(frame_size, n - i * frame_size), crcs[i], False) for i in range(nframes)]

    def one(i: int):
        raw = s[i * frame_size:(i + 1) * frame_size]
        if codec == CODEC_ZSTD_BYTEPLANE and itemsize > 1:
            tmp = np.empty_like(raw)
            split(raw, tmp, itemsize)
            raw = tmp
        comp = _compressor(level, codec == CODEC_ZSTD_BYTEPLANE).compress(raw)
        return comp if len(comp) < raw.size else None

    nt = _threads(nthreads, nframes)
    if nt > 1:
        with ThreadPoolExecutor(nt) as ex:
            comps = list(ex.map(one, range(nframes)))
    else:
        comps = [one(i) for i in range(nframes)]
    result = []
    pos = 0
    for i, comp in enumerate(comps):
        if comp is None:
            raw = s[i * frame_size:(i + 1) * frame_size]
            o[pos:pos + raw.size] = raw
            length = raw.size
        else:
            length = len(comp)
            o[pos:pos + length] = np.frombuffer(comp, np.uint8)
        result.append((pos, length, crc32c(o[pos:pos + length]), comp is not None))
        pos += length
    return result


def encode_frames(src, out, frame_size: int, itemsize: int, codec: int, level: int = 1,
                  nthreads: int = 0) -> list[tuple[int, int, int, bool]]:
    """Encode src as independent frames of frame_size bytes, written back to back from out[0].

    Returns (offset_in_out, stored_len, crc32c_of_stored_bytes, encoded) per frame; encoded=False means the
    raw bytes are stored (codec raw, or compression did not shrink the frame)."""
    return _encode_frames_impl(src, out, frame_size, itemsize, codec, level, nthreads,
                               crc32c_frames, _split)


def _int(x, what: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"frame table: {what} must be an int, got {type(x).__name__}")
    return int(x)


def _validate_frames(frames, nsrc: int, ndst: int, itemsize: int, codec: int):
    """Check a hostile frame table against the buffers before any memory is touched."""
    table = []
    raw_off = 0
    for i, fr in enumerate(frames):
        try:
            off, stored, raw, crc, enc = fr
        except (TypeError, ValueError):
            raise ValueError(f"frame {i}: expected (offset, stored_len, raw_len, crc32c, encoded)") from None
        off, stored, raw, crc = _int(off, "offset"), _int(stored, "stored_len"), _int(raw, "raw_len"), _int(crc, "crc32c")
        enc = bool(enc)
        if off < 0 or stored < 0 or raw < 0 or off > nsrc or stored > nsrc - off:
            raise ValueError(f"frame {i}: stored range [{off}, {off}+{stored}) outside src of {nsrc} bytes")
        if raw > ndst - raw_off:
            raise ValueError(f"frame {i}: raw range [{raw_off}, {raw_off}+{raw}) outside dst of {ndst} bytes")
        if not 0 <= crc <= 0xFFFFFFFF:
            raise ValueError(f"frame {i}: crc32c {crc} out of range")
        if not enc and stored != raw:
            raise ValueError(f"frame {i}: raw frame with stored_len {stored} != raw_len {raw}")
        if enc and codec == CODEC_RAW:
            raise ValueError(f"frame {i}: encoded frame under codec raw")
        if enc and codec == CODEC_ZSTD_BYTEPLANE and raw % itemsize:
            raise ValueError(f"frame {i}: raw_len {raw} is not a multiple of itemsize {itemsize}")
        table.append((off, stored, raw, crc, enc, raw_off))
        raw_off += raw
    return table


def _zstd_decompress_into(payload: np.ndarray, raw: int) -> bytes | None:
    """Decompress exactly one zstd frame of exactly `raw` bytes; None when corrupt. Bounded by raw."""
    data = payload.tobytes()
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        return None
    if declared not in (-1, raw):
        return None
    try:
        out = _decompressor().decompress(data, max_output_size=raw, allow_extra_data=False)
    except zstandard.ZstdError:
        return None
    return out if len(out) == raw else None


def _decode_frames_impl(src, frames, dst, itemsize, codec, nthreads, crc, merge):
    s, d = _ro(src), _rw(dst)
    itemsize, codec = int(itemsize), int(codec)
    _check_frame_args(itemsize, codec)
    table = _validate_frames(frames, s.size, d.size, itemsize, codec)

    def one(i: int):
        off, stored, raw, want, enc, raw_off = table[i]
        payload = s[off:off + stored]
        if crc(payload) != want:
            return "checksum"
        target = d[raw_off:raw_off + raw]
        if not enc:
            target[:] = payload
            return None
        out = _zstd_decompress_into(payload, raw)
        if out is None:
            return "corrupt"
        plain = np.frombuffer(out, np.uint8)
        if codec == CODEC_ZSTD_BYTEPLANE and itemsize > 1:
            merge(plain, target, itemsize)
        else:
            target[:] = plain
        return None

    nt = _threads(nthreads, len(table))
    if nt > 1:
        with ThreadPoolExecutor(nt) as ex:
            errors = list(ex.map(one, range(len(table))))
    else:
        errors = [one(i) for i in range(len(table))]
    for i, err in enumerate(errors):
        if err is not None:
            raise FrameError(i, err)


def decode_frames(src, frames, dst, itemsize: int, codec: int, nthreads: int = 0) -> None:
    """Verify and decode frames (offset_in_src, stored_len, raw_len, crc32c, encoded) into consecutive
    ranges of dst. Raises ValueError for a frame table that does not fit the buffers, FrameError(index,
    "checksum"|"corrupt") for the lowest-index frame that fails."""
    _decode_frames_impl(src, frames, dst, itemsize, codec, nthreads, crc32c, _merge)


# ----------------------------------------------------------------------------------------------- file I/O
def pread_into(fd: int, offset: int, dst) -> int:
    """Read up to len(dst) bytes at offset into dst (loops over short reads, stops at EOF)."""
    mv = memoryview(dst).cast("B")
    if mv.readonly:
        raise ValueError("destination buffer must be writable")
    if offset < 0:
        raise ValueError("offset must be >= 0")
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def pwrite_from(fd: int, offset: int, src) -> int:
    """Write all of src at offset; returns the byte count."""
    mv = memoryview(src).cast("B")
    if offset < 0:
        raise ValueError("offset must be >= 0")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)
    return done

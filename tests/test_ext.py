"""Kernel contract tests (shardckpt.native.kernels): every function on both backends, native == twin, hostile input.

The native backend is skipped (with the import error as reason) when shardckpt._native is not built;
set SHARDCKPT_REQUIRE_NATIVE=1 (CI does) to make that a failure instead.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardckpt.native import kernels as _ext

RAW, ZSTD, PLANES = _ext.CODEC_RAW, _ext.CODEC_ZSTD, _ext.CODEC_ZSTD_BYTEPLANE
CODECS = (RAW, ZSTD, PLANES)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _native_or_reason():
    try:
        return _ext.backend("native"), None
    except ImportError as e:
        return None, str(e)


NATIVE, NATIVE_WHY = _native_or_reason()
TWIN = _ext.backend("python")


def _params():
    if NATIVE is not None:
        native = pytest.param("native", id="native")
    elif os.environ.get("SHARDCKPT_REQUIRE_NATIVE") == "1":
        native = pytest.param("native", id="native")  # the fixture fails loudly
    else:
        native = pytest.param("native", id="native", marks=pytest.mark.skip(reason=f"native not built: {NATIVE_WHY}"))
    return [native, pytest.param("python", id="python")]


@pytest.fixture(params=_params())
def be(request):
    if request.param == "native":
        if NATIVE is None:
            pytest.fail(f"SHARDCKPT_REQUIRE_NATIVE=1 but shardckpt._native is unavailable: {NATIVE_WHY}")
        return NATIVE
    return TWIN


needs_native = pytest.mark.skipif(NATIVE is None, reason=f"native not built: {NATIVE_WHY}")


def crc_ref(data: bytes, value: int = 0) -> int:
    c = ~value & 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return ~c & 0xFFFFFFFF


def rand(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def floats(n: int, seed: int = 0) -> np.ndarray:
    """n bytes of float32 weights: exponent bytes compress, mantissa bytes don't."""
    return (np.random.default_rng(seed).standard_normal(n // 4) * 0.02).astype(np.float32).view(np.uint8)


def table(frames, raw_lens):
    return [(off, stored, raw, crc, enc) for (off, stored, crc, enc), raw in zip(frames, raw_lens)]


def raw_lens(n: int, f: int) -> list[int]:
    return [min(f, n - i) for i in range(0, n, f)]


def encode(be, src, f, itemsize, codec, level=1, nthreads=0):
    out = np.empty(be.encode_bound(src.size, f, codec), np.uint8)
    frames = be.encode_frames(src, out, f, itemsize, codec, level, nthreads)
    total = sum(fr[1] for fr in frames)
    return out[:total].copy(), table(frames, raw_lens(src.size, f)), frames


# ----------------------------------------------------------------------------------------------- selection
def test_backend_selection():
    assert _ext.BACKEND in ("native", "python")
    assert isinstance(_ext.ZSTD_SOURCE, str) and _ext.ZSTD_SOURCE
    if _ext.BACKEND == "native":
        assert _ext.NATIVE_ERROR is None
    else:
        assert _ext.NATIVE_ERROR
    assert (_ext.CODEC_RAW, _ext.CODEC_ZSTD, _ext.CODEC_ZSTD_BYTEPLANE) == (0, 1, 2)
    assert issubclass(_ext.FrameError, Exception)


def _run_py(code: str, **env) -> str:
    full = dict(os.environ, **env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_env_forces_python_backend():
    out = _run_py("import shardckpt.native.kernels as e; print(e.BACKEND, e.NATIVE_ERROR)", SHARDCKPT_BACKEND="python")
    assert out.startswith("python SHARDCKPT_BACKEND=python")


@needs_native
def test_native_without_libzstd_falls_back_to_zstandard():
    code = (
        "import numpy as np, shardckpt.native.kernels as e\n"
        "assert e.BACKEND == 'native', e.NATIVE_ERROR\n"
        "assert 'zstandard' in e.ZSTD_SOURCE, e.ZSTD_SOURCE\n"
        "src = (np.arange(100000) % 7).astype(np.float32).view(np.uint8)\n"
        "out = np.empty(src.size, np.uint8)\n"
        "fr = e.encode_frames(src, out, 65536, 4, 2)\n"
        "assert all(f[3] for f in fr)\n"
        "dst = np.empty_like(src)\n"
        "lens = [min(65536, src.size - i) for i in range(0, src.size, 65536)]\n"
        "e.decode_frames(out, [(o, s, r, c, x) for (o, s, c, x), r in zip(fr, lens)], dst, 4, 2)\n"
        "assert (dst == src).all()\n"
        "print('ok')\n")
    assert _run_py(code, SHARDCKPT_LIBZSTD="/nonexistent/libzstd.so.1", SHARDCKPT_BACKEND="native").strip() == "ok"


# ----------------------------------------------------------------------------------------------- crc32c
def test_crc32c_known_values(be):
    assert be.crc32c(b"123456789") == 0xE3069283
    assert be.crc32c(b"") == 0
    assert be.crc32c(b"", 0x12345678) == 0x12345678
    assert be.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4 test vector


@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 63, 64, 255, 256, 257, 1000, 4096, 12287, 12288, 12289, 40000])
def test_crc32c_matches_reference_and_chains(be, n):
    d = rand(n, n).tobytes()
    c = be.crc32c(d)
    if n <= 4096:
        assert c == crc_ref(d)
    for k in {0, 1, n // 3, n}:
        assert be.crc32c(d[k:], be.crc32c(d[:k])) == c


def test_crc32c_buffer_types(be):
    a = np.arange(1000, dtype=np.float32)
    want = crc_ref(a.tobytes())
    assert be.crc32c(a) == want
    assert be.crc32c(memoryview(a.tobytes())) == want
    assert be.crc32c(bytearray(a.tobytes())) == want
    assert be.crc32c(a.reshape(10, 100)) == want


@FAST
@given(st.binary(max_size=2000), st.integers(0, 2**32 - 1))
def test_crc32c_property(data, value):
    want = crc_ref(data, value)
    assert TWIN.crc32c(data, value) == want
    if NATIVE is not None:
        assert NATIVE.crc32c(data, value) == want


@pytest.mark.parametrize("n,f", [(0, 16), (1, 16), (16, 16), (17, 16), (100000, 4096), (100003, 4096),
                                 (5000, 7), (3 << 20, 1 << 20), ((3 << 20) + 5, 1 << 20)])
def test_crc32c_frames(be, n, f):
    d = rand(n, 1)
    got = be.crc32c_frames(d, f)
    assert got == [be.crc32c(d[i:i + f]) for i in range(0, n, f)]
    assert be.crc32c_frames(d, f, nthreads=1) == got
    with pytest.raises(ValueError):
        be.crc32c_frames(d, 0)


# ----------------------------------------------------------------------------------------------- xxh3-128
def test_xxh3_128_known_values(be):
    """The chunk content hash (FORMAT.md §7): XXH3-128, seed 0, canonical big-endian hex (values of the
    reference implementation, xxHash 0.8.4 as python-xxhash 4.1 bundles it)."""
    assert be.xxh3_128(b"") == "99aa06d3014798d86001c324468d497f"
    assert be.xxh3_128(b"abc") == "06b05ab6733a618578af5f94892f3950"


# lengths around XXH3's internal boundaries (16, 128, 240 bytes; 1 KiB stripes; 64 KiB-ish blocks)
@pytest.mark.parametrize("n", [1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 1025, 65536, 100003, (3 << 20) + 5])
def test_xxh3_128_native_equals_twin(n):
    d = rand(n, n)
    want = TWIN.xxh3_128(d)
    assert want == xxh3_ref(d.tobytes())
    if NATIVE is not None:
        assert NATIVE.xxh3_128(d) == want


def xxh3_ref(data: bytes) -> str:
    import xxhash
    return xxhash.xxh3_128(data).hexdigest()


def test_xxh3_128_many_and_buffer_types(be):
    a = np.arange(100000, dtype=np.float32)
    bufs = [a, memoryview(a.tobytes()), bytearray(b"x" * 5000), b"", a.reshape(100, 1000), rand(9 << 20, 5)]
    want = [xxh3_ref(bytes(memoryview(b).cast("B"))) for b in bufs]
    assert [be.xxh3_128(b) for b in bufs] == want
    assert be.xxh3_128_many(bufs) == want
    assert be.xxh3_128_many(bufs, nthreads=1) == want
    assert be.xxh3_128_many([]) == []
    with pytest.raises((ValueError, TypeError)):
        be.xxh3_128_many([a, a[::2]])  # not contiguous: refused before anything is hashed


@needs_native
def test_native_without_libxxhash_falls_back_to_the_xxhash_package():
    code = ("import shardckpt.native.kernels as e\n"
            "assert e.BACKEND == 'native', e.NATIVE_ERROR\n"
            "assert 'xxhash package' in e.XXHASH_SOURCE and 'dlopen failed' in e.XXHASH_SOURCE, e.XXHASH_SOURCE\n"
            "assert e.xxh3_128(b'abc') == '06b05ab6733a618578af5f94892f3950'\n"
            "assert e.xxh3_128_many([b'', b'abc'])[1] == '06b05ab6733a618578af5f94892f3950'\n"
            "print('ok')\n")
    assert _run_py(code, SHARDCKPT_LIBXXHASH="/nonexistent/libxxhash.so.0", SHARDCKPT_BACKEND="native").strip() == "ok"
    assert "dlopen" in NATIVE.XXHASH_SOURCE or "xxhash package" in NATIVE.XXHASH_SOURCE


# ----------------------------------------------------------------------------------------------- copy
@pytest.mark.parametrize("n", [0, 1, 4095, 1 << 16, (24 << 20) + 3])
def test_copy_into(be, n):
    src = rand(n, 2)
    dst = np.full(n + 10, 7, np.uint8)
    be.copy_into(dst, src, nthreads=4)
    assert (dst[:n] == src).all() and (dst[n:] == 7).all()


def test_copy_into_rejects_short_or_readonly_dst(be):
    with pytest.raises(ValueError):
        be.copy_into(bytearray(3), b"abcd")
    with pytest.raises((ValueError, TypeError, BufferError)):
        be.copy_into(b"xxxx", b"abcd")


def test_copy_many(be):
    # sizes around the 1 MiB work piece and the 64-byte copy block, an empty source, odd lengths
    sizes = [0, 1, 63, 64, 65, (1 << 20) - 1, 1 << 20, (3 << 20) + 17]
    srcs = [rand(n, i) for i, n in enumerate(sizes)]
    dsts = [np.full(n + 5, 7, np.uint8) for n in sizes]
    be.copy_many(dsts, srcs, nthreads=3)
    for s, d in zip(srcs, dsts):
        assert (d[:s.size] == s).all() and (d[s.size:] == 7).all()


def test_copy_many_rejects_short_dst_and_mismatched_lists(be):
    with pytest.raises(ValueError, match="dst 1"):
        be.copy_many([bytearray(4), bytearray(3)], [b"ab", b"abcd"])
    with pytest.raises(ValueError):
        be.copy_many([bytearray(4)], [b"ab", b"cd"])


# ----------------------------------------------------------------------------------------------- byte planes
def test_byteplane_layout(be):
    src = np.arange(12, dtype=np.uint8)
    dst = np.empty_like(src)
    be.byteplane_split(src, dst, 4)
    assert dst.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    back = np.empty_like(src)
    be.byteplane_merge(dst, back, 4)
    assert (back == src).all()
    be.byteplane_split(src, dst, 1)
    assert (dst == src).all()


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("elems", [0, 1, 3, 15, 16, 17, 33, 63, 64, 65, 1000, 4097])
def test_byteplane_roundtrip_and_equivalence(be, itemsize, elems):
    src = rand(elems * itemsize, elems)
    split = np.empty_like(src)
    be.byteplane_split(src, split, itemsize)
    assert (split.reshape(itemsize, -1) == src.reshape(-1, itemsize).T).all()
    back = np.empty_like(src)
    be.byteplane_merge(split, back, itemsize)
    assert (back == src).all()


def test_byteplane_errors(be):
    a = np.zeros(16, np.uint8)
    for args in [(a, np.zeros(8, np.uint8), 2), (a, np.zeros(16, np.uint8), 3), (a[:6], np.zeros(6, np.uint8), 4)]:
        with pytest.raises(ValueError):
            be.byteplane_split(*args)
        with pytest.raises(ValueError):
            be.byteplane_merge(*args)


# ----------------------------------------------------------------------------------------------- frames
SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 8, 50000]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n", SIZES)
def test_encode_decode_roundtrip(be, codec, n):
    f, itemsize = 4096, 4 if n % 4 == 0 else 1
    src = floats(n - n % 4, n) if n % 4 == 0 else rand(n, n)
    stored, tab, frames = encode(be, src, f, itemsize, codec)
    pos = 0
    for (off, length, crc, enc), raw in zip(frames, raw_lens(n, f)):
        assert off == pos  # compacted, back to back from out[0]
        assert crc == be.crc32c(stored[off:off + length])
        assert (length < raw) if enc else (length == raw)
        pos += length
    if codec == RAW:
        assert not any(fr[3] for fr in frames) and (stored == src).all()
    dst = np.full(n, 0xAB, np.uint8)
    be.decode_frames(stored, tab, dst, itemsize, codec)
    assert (dst == src).all()
    be.decode_frames(stored, tab, dst, itemsize, codec, nthreads=1)
    assert (dst == src).all()


def test_incompressible_frames_are_stored_raw(be):
    src = rand(20000, 3)
    stored, tab, frames = encode(be, src, 4096, 1, ZSTD)
    assert not any(fr[3] for fr in frames)
    assert (stored == src).all()


def test_compressible_frames_shrink_and_levels(be):
    src = np.tile(np.arange(256, dtype=np.uint8), 400)
    for level in (-5, 1, 3):
        stored, tab, frames = encode(be, src, 16384, 4, PLANES, level=level)
        assert all(fr[3] for fr in frames) and stored.size < src.size // 10
        dst = np.empty_like(src)
        be.decode_frames(stored, tab, dst, 4, PLANES)
        assert (dst == src).all()


def test_encode_argument_errors(be):
    src = np.zeros(100, np.uint8)
    out = np.empty(100, np.uint8)
    for args in [(src, out, 0, 1, ZSTD), (src, out, 6, 4, ZSTD), (src, out, 64, 3, ZSTD), (src, out, 64, 1, 9),
                 (src, np.empty(99, np.uint8), 64, 1, ZSTD), (src[:98], out, 64, 4, PLANES)]:
        with pytest.raises(ValueError):
            be.encode_frames(*args)
    with pytest.raises(ValueError):
        be.encode_bound(-1, 64, ZSTD)


@needs_native
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n,f,itemsize", [(0, 4096, 4), (1, 4096, 1), (4096, 4096, 2), (4100, 4096, 4),
                                          (100008, 8192, 8), (99999, 1000, 1)])
def test_native_twin_equivalence(codec, n, f, itemsize):
    src = floats(n, 5) if n % 4 == 0 and itemsize > 1 else rand(n, 5)
    a, tab_a, fa = encode(NATIVE, src, f, itemsize, codec)
    b, tab_b, fb = encode(TWIN, src, f, itemsize, codec)
    same_zstd = NATIVE.ZSTD_SOURCE.split("(")[0].split()[-1] == TWIN.ZSTD_SOURCE.split(")")[0].split()[-1]
    if codec == RAW or same_zstd:  # different libzstd versions may emit different (equally valid) frames
        assert fa == fb and (a == b).all()
    for stored, tab in ((a, tab_a), (b, tab_b)):
        for dec in (NATIVE, TWIN):
            dst = np.empty_like(src)
            dec.decode_frames(stored, tab, dst, itemsize, codec)
            assert (dst == src).all()


@needs_native
@FAST
@given(st.binary(max_size=3000), st.sampled_from([1, 2, 4, 8]), st.integers(1, 8), st.sampled_from(CODECS))
def test_equivalence_property(data, itemsize, frame_items, codec):
    src = np.frombuffer(data[:len(data) - len(data) % itemsize], np.uint8)
    f = frame_items * itemsize * 37
    assert NATIVE.crc32c_frames(src, f) == TWIN.crc32c_frames(src, f)
    s1, s2 = np.empty_like(src), np.empty_like(src)
    NATIVE.byteplane_split(src, s1, itemsize)
    TWIN.byteplane_split(src, s2, itemsize)
    assert (s1 == s2).all()
    a, tab, _ = encode(NATIVE, src, f, itemsize, codec)
    b, tab_b, _ = encode(TWIN, src, f, itemsize, codec)
    for stored, t in ((a, tab), (b, tab_b)):
        for dec in (NATIVE, TWIN):
            dst = np.empty_like(src)
            dec.decode_frames(stored, t, dst, itemsize, codec)
            assert dst.tobytes() == src.tobytes()


# ----------------------------------------------------------------------------------------------- verification
@pytest.fixture(scope="module")
def encoded():
    src = floats(40000, 9)
    return src, *encode(TWIN, src, 8192, 4, PLANES)[:2]


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_checksum_flip_names_the_frame(be, encoded, victim):
    src, stored, tab = encoded
    bad = stored.copy()
    off, length = tab[victim][0], tab[victim][1]
    bad[off + length // 2] ^= 0x10
    with pytest.raises(_ext.FrameError) as ei:
        be.decode_frames(bad, tab, np.empty_like(src), 4, PLANES)
    assert (ei.value.index, ei.value.reason) == (victim, "checksum")
    tab2 = list(tab)
    o, s, r, c, e = tab2[victim]
    tab2[victim] = (o, s, r, c ^ 1, e)
    with pytest.raises(_ext.FrameError) as ei:
        be.decode_frames(stored, tab2, np.empty_like(src), 4, PLANES)
    assert (ei.value.index, ei.value.reason) == (victim, "checksum")


def test_lowest_failing_frame_is_reported(be, encoded):
    src, stored, tab = encoded
    tab2 = [(o, s, r, c ^ (1 if i in (1, 3) else 0), e) for i, (o, s, r, c, e) in enumerate(tab)]
    with pytest.raises(_ext.FrameError) as ei:
        be.decode_frames(stored, tab2, np.empty_like(src), 4, PLANES, nthreads=4)
    assert ei.value.index == 1


def _corruptions(stored, tab, victim):
    """Frame tables whose crc is valid but whose zstd payload is wrong."""
    o, s, r, c, e = tab[victim]
    payload = stored[o:o + s].tobytes()
    cases = []

    def with_payload(p, raw=r):
        buf = np.concatenate([stored, np.frombuffer(p, np.uint8)]) if p else stored
        t = list(tab)
        t[victim] = (stored.size, len(p), raw, TWIN.crc32c(p), True)
        cases.append((buf, t))

    with_payload(payload[: s // 2])                       # truncated
    mid = bytearray(payload)
    for k in range(8, len(mid), 97):
        mid[k] ^= 0x5A
    with_payload(bytes(mid))                              # scrambled body
    with_payload(payload + payload)                       # two frames / trailing data
    with_payload(payload, raw=r - 4)                      # content size != raw_len
    with_payload(b"\x00" * 16)                            # not zstd at all
    with_payload(b"")                                     # empty payload
    return cases


@pytest.mark.parametrize("victim", [0, 3])
def test_corrupt_payload_with_valid_crc(be, encoded, victim):
    src, stored, tab = encoded
    for buf, t in _corruptions(stored, tab, victim):
        with pytest.raises(_ext.FrameError) as ei:
            be.decode_frames(buf, t, np.empty(src.size, np.uint8), 4, PLANES)
        assert (ei.value.index, ei.value.reason) == (victim, "corrupt")


@pytest.mark.parametrize("content_size", [True, False])
def test_decompression_bomb_is_bounded(be, content_size):
    bomb = zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(bytes(64 << 20))
    tab = [(0, len(bomb), 4096, be.crc32c(bomb), True)]
    with pytest.raises(_ext.FrameError) as ei:
        be.decode_frames(bomb, tab, np.empty(4096, np.uint8), 1, ZSTD)
    assert ei.value.reason == "corrupt"


def test_unknown_content_size_frame_decodes(be):
    raw = bytes(range(256)) * 64
    payload = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(raw)
    dst = np.empty(len(raw), np.uint8)
    be.decode_frames(payload, [(0, len(payload), len(raw), be.crc32c(payload), True)], dst, 1, ZSTD)
    assert dst.tobytes() == raw


def test_frame_error_pickles():
    import pickle
    e = pickle.loads(pickle.dumps(_ext.FrameError(3, "corrupt")))
    assert (e.index, e.reason) == (3, "corrupt")


# ----------------------------------------------------------------------------------------------- hostile tables
BIG = [0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, 2**100, -1, -(2**63), -(2**64)]
ints = st.one_of(st.integers(0, 200), st.sampled_from(BIG), st.integers())
frame = st.one_of(
    st.tuples(ints, ints, ints, ints, st.booleans()),
    st.tuples(ints, ints, ints),
    st.tuples(ints, ints, ints, st.floats(), st.booleans()),
    st.just(None), st.just("abcde"),
)


@FAST
@given(st.lists(frame, max_size=6), st.sampled_from(CODECS), st.sampled_from([1, 4]))
def test_hostile_frame_tables_never_crash(frames, codec, itemsize):
    src = np.frombuffer(zlib.compress(bytes(300)) + bytes(100), np.uint8)
    for be in [TWIN] + ([NATIVE] if NATIVE is not None else []):
        dst = np.empty(256, np.uint8)
        try:
            be.decode_frames(src, frames, dst, itemsize, codec)
        except (ValueError, _ext.FrameError):
            pass


@pytest.mark.parametrize("bad", [
    [(0, 10, 10, 0, False), (5, 10**6, 10, 0, False)],  # stored range past src
    [(-1, 1, 1, 0, False)],
    [(0, 4, 4, 0, False)] * 100,                          # raw ranges past dst
    [(0, 4, 5, 0, False)],                                # raw frame, stored != raw
    [(0, 4, 4, 2**32, False)],                            # crc out of range
    [(0, 4, 4, 0)],                                       # wrong arity
    [(0, 4, 4, 0, True)],                                 # encoded frame under codec raw
])
def test_hostile_frame_tables_raise_value_error(be, bad):
    with pytest.raises(ValueError):
        be.decode_frames(bytes(64), bad, bytearray(64), 1, RAW)


def test_plane_frame_raw_len_must_fit_itemsize(be):
    with pytest.raises(ValueError):
        be.decode_frames(bytes(64), [(0, 10, 6, 0, True)], bytearray(64), 4, PLANES)


# ----------------------------------------------------------------------------------------------- file I/O
def test_pread_pwrite(be, tmp_path):
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        data = rand(100000, 4)
        assert be.pwrite_from(fd, 10, data) == data.size
        assert be.pwrite_from(fd, 0, b"") == 0
        buf = np.zeros(50000, np.uint8)
        assert be.pread_into(fd, 10, buf) == 50000 and (buf == data[:50000]).all()
        tail = bytearray(1000)
        assert be.pread_into(fd, 10 + data.size - 300, tail) == 300  # stops at EOF
        assert tail[:300] == data[-300:].tobytes()
        assert be.pread_into(fd, 10**9, bytearray(10)) == 0
    finally:
        os.close(fd)
    with pytest.raises(OSError) as ei:
        be.pread_into(fd, 0, bytearray(10))
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        be.pwrite_from(fd, 0, b"x")
    assert ei.value.errno == errno.EBADF


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_pwrite_enospc(be):
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            be.pwrite_from(fd, 0, b"x" * 4096)
        assert ei.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- native threads
def _round_trip(be, seed: int, nthreads: int) -> bool:
    src = floats(6 << 20, seed)  # 24 MB: enough work for every thread of the pool
    f = 1 << 20
    blob, tab, _ = encode(be, src, f, 4, PLANES, nthreads=nthreads)
    dst = np.empty_like(src)
    be.decode_frames(blob, tab, dst, 4, PLANES, nthreads)
    return bool((dst == src).all())


@needs_native
def test_native_thread_pool_is_rebuilt_after_fork():
    assert _round_trip(NATIVE, 1, 4)  # the pool exists now; fork() leaves the child without its threads
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = _round_trip(NATIVE, 2, 4) and _round_trip(NATIVE, 3, 3)
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in a native kernel (threads of the parent's pool awaited)")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert _round_trip(NATIVE, 4, 4)  # and the parent's pool still works


@needs_native
def test_native_kernels_called_from_many_threads_at_once():
    # one call gets the pool, the others start threads of their own; all results are right
    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(lambda s: _round_trip(NATIVE, s, 3), range(12)))

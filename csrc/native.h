// Kernels of shardckpt._native: plain functions on pointers and lengths, no Python, no libtorch.
// module.cpp is the only file that talks to Python; everything here may run with the GIL released.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace shardckpt {

// ---- crc32c.cpp: CRC-32C (Castagnoli). `crc` is a finished crc of preceding bytes (0 to start).
uint32_t crc32c(const uint8_t* data, size_t n, uint32_t crc);
const char* crc32c_impl();  // "sse4.2" or "table"

// ---- byteplane.cpp: itemsize in {1,2,4,8}, n % itemsize == 0 (checked by the caller).
void byteplane_split(const uint8_t* src, uint8_t* dst, size_t n, int itemsize);
void byteplane_merge(const uint8_t* src, uint8_t* dst, size_t n, int itemsize);
const char* byteplane_impl();  // "sse2" (x86-64) or "generic"

// ---- copy.cpp
void copy_parallel(uint8_t* dst, const uint8_t* src, size_t n, int nthreads);
struct CopyJob {
    uint8_t* dst;
    const uint8_t* src;
    size_t n;
};
// Many copies (non-overlapping) in one call: one set of threads shares them in 1 MiB pieces.
void copy_many(const std::vector<CopyJob>& jobs, int nthreads);

// ---- dl.cpp: the dlopen of a runtime-loaded library, shared by zstd_dl.cpp and xxhash_dl.cpp.
// The first of $env_var (when set: only it), soname, dev_name that opens (RTLD_NOW | RTLD_LOCAL); sets
// `name` to it, or returns nullptr with dlerror()'s text in `why`.
void* dlopen_first(const char* env_var, const char* soname, const char* dev_name, std::string& name,
                   std::string& why);
std::string version_text(unsigned v);  // MAJOR*10000 + MINOR*100 + RELEASE (zstd's and xxHash's) -> "1.5.4"

// ---- zstd_dl.cpp: libzstd.so.1 loaded with dlopen, no headers needed at build time.
bool zstd_load();                  // idempotent; false when the library or a symbol is missing
const std::string& zstd_source();  // "libzstd.so.1 1.5.4 (dlopen)" or why loading failed

// ---- xxhash_dl.cpp: XXH3-128 from libxxhash.so.0, loaded with dlopen (no headers at build time).
bool xxhash_load();                  // idempotent; false when the library or a symbol is missing
const std::string& xxhash_source();  // "libxxhash.so.0 0.8.1 XXH3_128bits_dispatch (dlopen)" or why not
struct Hash128 {
    uint64_t lo, hi;
};
// The chunk content hash (FORMAT.md §7); only after xxhash_load() returned true.
Hash128 xxh3_128(const uint8_t* data, size_t n);
struct HashJob {
    const uint8_t* data;
    size_t n;
};
// out[i] = xxh3_128 of jobs[i], the buffers shared among threads (one buffer is hashed by one thread).
void xxh3_128_many(const std::vector<HashJob>& jobs, Hash128* out, int nthreads);

// ---- frames.cpp
enum Codec : int { CODEC_RAW = 0, CODEC_ZSTD = 1, CODEC_ZSTD_BYTEPLANE = 2 };

struct EncodedFrame {
    size_t offset;
    size_t stored;
    uint32_t crc;
    bool encoded;
};
// Returns "" on success, else an error message (zstd failure other than "does not fit").
std::string encode_frames(const uint8_t* src, size_t n, uint8_t* out, size_t frame_size, int itemsize,
                          int codec, int level, int nthreads, std::vector<EncodedFrame>& frames);

struct DecodeFrame {
    size_t src_offset, stored, raw, dst_offset;
    uint32_t crc;
    bool encoded;
};
enum FrameStatus : int { FRAME_OK = 0, FRAME_CHECKSUM = 1, FRAME_CORRUPT = 2 };
// Frames must already be validated against the buffers. Returns the lowest failing index (or -1) and sets
// *status; *fatal gets a message for an environment failure (out of memory).
long decode_frames(const uint8_t* src, uint8_t* dst, const std::vector<DecodeFrame>& frames, int itemsize,
                   int codec, int nthreads, int* status, std::string* fatal);

std::vector<uint32_t> crc32c_frames(const uint8_t* src, size_t n, size_t frame_size, int nthreads);

// ---- fileio.cpp: return bytes done, or -errno.
long long pread_full(int fd, uint64_t offset, uint8_t* dst, size_t n);
long long pwrite_full(int fd, uint64_t offset, const uint8_t* src, size_t n);

// ---- threading
inline int plan_threads(int nthreads, size_t items) {
    long n = nthreads > 0 ? nthreads : static_cast<long>(std::thread::hardware_concurrency());
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    if (static_cast<size_t>(n) > items) n = static_cast<long>(items ? items : 1);
    return static_cast<int>(n);
}

// Threads worth starting for `bytes` of work split into `items`: a thread costs ~70 us to start and join
// on the machines measured (a 2-frame decode of 16 KB frames took 96 us on two threads, 42 us on one), so
// each gets at least kMinBytesPerThread.
constexpr size_t kMinBytesPerThread = 512u << 10;
inline int plan_threads_for(int nthreads, size_t items, size_t bytes) {
    size_t worth = bytes / kMinBytesPerThread;
    return plan_threads(nthreads, std::min(items, worth ? worth : 1));
}

// Runs job(worker) for worker in [0, workers): the caller is worker 0, the others are threads of a pool kept
// between calls (pool.cpp), or fresh threads when the pool is busy with another call.
void run_workers(int workers, const std::function<void(int)>& job);

// Runs fn(item, worker) for item in [0, items) on `workers` threads sharing a counter. If fewer threads can
// be had, the others take more items.
template <class F>
void parallel_for(size_t items, int workers, F&& fn) {
    if (workers <= 1 || items <= 1) {
        for (size_t i = 0; i < items; ++i) fn(i, 0);
        return;
    }
    std::atomic<size_t> next{0};
    run_workers(workers, [&](int w) {
        for (;;) {
            size_t i = next.fetch_add(1, std::memory_order_relaxed);
            if (i >= items) return;
            fn(i, w);
        }
    });
}

}  // namespace shardckpt

// libxxhash, loaded at runtime with dlopen like libzstd (zstd_dl.cpp; both open it through dl.cpp): building
// needs no xxhash headers and no copy of xxHash. The prototypes below are the documented, stable public API of xxhash.h; XXH3's output
// is frozen since 0.8.0, so any such library gives the same digests as the twin's `xxhash` package.
// SHARDCKPT_LIBXXHASH=<path> overrides the library (tests use a bogus path to force the fallback).
#include <mutex>

#include <dlfcn.h>

#include "native.h"

namespace shardckpt {

namespace {

struct XXH128Hash {  // XXH128_hash_t: returned by value (rax:rdx on x86-64 SysV, x0:x1 on AArch64)
    uint64_t low64;
    uint64_t high64;
};

using Hash128Fn = XXH128Hash (*)(const void*, size_t);

Hash128Fn g_hash = nullptr;
std::string g_source;
bool g_ok = false;
std::once_flag g_once;

void load() {
    std::string name;
    std::string why;
    void* h = dlopen_first("SHARDCKPT_LIBXXHASH", "libxxhash.so.0", "libxxhash.so", name, why);
    if (!h) {
        g_source = why;
        return;
    }
    auto version = reinterpret_cast<unsigned (*)()>(dlsym(h, "XXH_versionNumber"));
    // Debian builds libxxhash with xxh_x86dispatch.c: the _dispatch entry picks AVX2/AVX-512 at runtime
    // (same digests; 32 GB/s against 10 for the SSE2 baseline on a 256 KiB buffer in cache on the machine
    // measured); other builds export only XXH3_128bits.
    const char* entry = "XXH3_128bits_dispatch";
    auto fn = reinterpret_cast<Hash128Fn>(dlsym(h, entry));
    if (!fn) {
        entry = "XXH3_128bits";
        fn = reinterpret_cast<Hash128Fn>(dlsym(h, entry));
    }
    if (!version || !fn) {
        g_source = name + " lacks a required symbol (need xxHash >= 0.8.0)";
        dlclose(h);
        return;
    }
    unsigned v = version();
    if (v < 800) {  // XXH3 was experimental (its output not yet fixed) before 0.8.0
        g_source = name + " is too old (need xxHash >= 0.8.0)";
        dlclose(h);
        return;
    }
    g_hash = fn;
    g_source = name + " " + version_text(v) + " " + entry + " (dlopen)";
    g_ok = true;  // the handle stays open for the life of the process
}

}  // namespace

bool xxhash_load() {
    std::call_once(g_once, load);
    return g_ok;
}

const std::string& xxhash_source() {
    xxhash_load();
    return g_source;
}

Hash128 xxh3_128(const uint8_t* data, size_t n) {
    XXH128Hash h = g_hash(n ? data : reinterpret_cast<const uint8_t*>(""), n);
    return {h.low64, h.high64};
}

void xxh3_128_many(const std::vector<HashJob>& jobs, Hash128* out, int nthreads) {
    size_t total = 0;
    for (const HashJob& j : jobs) total += j.n;
    // hashing runs at memory speed, like copying: a thread is worth starting for 8x a codec's bytes
    parallel_for(jobs.size(), plan_threads_for(nthreads, jobs.size(), total / 8),
                 [&](size_t i, int) { out[i] = xxh3_128(jobs[i].data, jobs[i].n); });
}

}  // namespace shardckpt

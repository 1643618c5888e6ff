// Byte-plane split/merge: element width K bytes; split writes byte 0 of every element, then every byte 1,
// and so on. The loops transpose blocks of 64 elements through a small stack tile so the compiler can
// vectorise them (interleaved loads/stores become shuffles); they are compiled twice, for baseline x86-64
// (SSE2) and for AVX2, and the AVX2 copy is picked at runtime when the CPU has it.
#include <cstring>

#include "native.h"

namespace shardckpt {
namespace {

constexpr size_t kBlock = 64;

template <int K>
inline __attribute__((always_inline)) void split_k(const uint8_t* __restrict s, uint8_t* __restrict d,
                                                   size_t m) {
    size_t i = 0;
    for (; i + kBlock <= m; i += kBlock) {
        uint8_t tile[K][kBlock];
        const uint8_t* p = s + i * K;
        for (size_t j = 0; j < kBlock; ++j)
            for (int k = 0; k < K; ++k) tile[k][j] = p[j * K + k];
        for (int k = 0; k < K; ++k) std::memcpy(d + k * m + i, tile[k], kBlock);
    }
    for (; i < m; ++i)
        for (int k = 0; k < K; ++k) d[k * m + i] = s[i * K + k];
}

template <int K>
inline __attribute__((always_inline)) void merge_k(const uint8_t* __restrict s, uint8_t* __restrict d,
                                                   size_t m) {
    size_t i = 0;
    for (; i + kBlock <= m; i += kBlock) {
        uint8_t tile[K][kBlock];
        for (int k = 0; k < K; ++k) std::memcpy(tile[k], s + k * m + i, kBlock);
        uint8_t* p = d + i * K;
        for (size_t j = 0; j < kBlock; ++j)
            for (int k = 0; k < K; ++k) p[j * K + k] = tile[k][j];
    }
    for (; i < m; ++i)
        for (int k = 0; k < K; ++k) d[i * K + k] = s[k * m + i];
}

inline __attribute__((always_inline)) void split_any(const uint8_t* s, uint8_t* d, size_t n, int k) {
    switch (k) {
        case 2: split_k<2>(s, d, n / 2); break;
        case 4: split_k<4>(s, d, n / 4); break;
        case 8: split_k<8>(s, d, n / 8); break;
        default: std::memcpy(d, s, n);
    }
}

inline __attribute__((always_inline)) void merge_any(const uint8_t* s, uint8_t* d, size_t n, int k) {
    switch (k) {
        case 2: merge_k<2>(s, d, n / 2); break;
        case 4: merge_k<4>(s, d, n / 4); break;
        case 8: merge_k<8>(s, d, n / 8); break;
        default: std::memcpy(d, s, n);
    }
}

void split_base(const uint8_t* s, uint8_t* d, size_t n, int k) { split_any(s, d, n, k); }
void merge_base(const uint8_t* s, uint8_t* d, size_t n, int k) { merge_any(s, d, n, k); }

#if defined(__x86_64__)
__attribute__((target("avx2"))) void split_avx2(const uint8_t* s, uint8_t* d, size_t n, int k) {
    split_any(s, d, n, k);
}
__attribute__((target("avx2"))) void merge_avx2(const uint8_t* s, uint8_t* d, size_t n, int k) {
    merge_any(s, d, n, k);
}
bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
}
#else
bool has_avx2() { return false; }
#endif

}  // namespace

void byteplane_split(const uint8_t* src, uint8_t* dst, size_t n, int itemsize) {
    if (n == 0) return;
#if defined(__x86_64__)
    if (has_avx2()) return split_avx2(src, dst, n, itemsize);
#endif
    split_base(src, dst, n, itemsize);
}

void byteplane_merge(const uint8_t* src, uint8_t* dst, size_t n, int itemsize) {
    if (n == 0) return;
#if defined(__x86_64__)
    if (has_avx2()) return merge_avx2(src, dst, n, itemsize);
#endif
    merge_base(src, dst, n, itemsize);
}

const char* byteplane_impl() { return has_avx2() ? "avx2" : "sse2"; }

}  // namespace shardckpt

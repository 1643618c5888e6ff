// Byte-plane split/merge: element width K bytes; split writes byte 0 of every element, then every byte 1,
// and so on. On x86-64 the transposition runs on SSE2 registers (baseline on every x86-64 CPU): log2(K)
// rounds of a 2-way byte deinterleave (mask/shift + saturating pack) split 16 elements at a time, and the
// same rounds undone with unpacklo/unpackhi merge them. Elsewhere, plain loops over 64-element tiles that
// the compiler vectorises as it can.
#include <cstring>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

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

#if defined(__x86_64__)
// The even bytes of a then b, and the odd bytes of a then b.
inline void deinterleave(__m128i a, __m128i b, __m128i& even, __m128i& odd) {
    const __m128i lo = _mm_set1_epi16(0x00FF);
    even = _mm_packus_epi16(_mm_and_si128(a, lo), _mm_and_si128(b, lo));
    odd = _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8));
}

// One round maps v[2j], v[2j+1] to w[j] (even bytes) and w[K/2 + j] (odd bytes); after log2(K) rounds
// v[k] holds byte k of the 16 elements.
template <int K>
inline void split_sse2(const uint8_t* __restrict s, uint8_t* __restrict d, size_t m) {
    size_t i = 0;
    for (; i + 16 <= m; i += 16) {
        __m128i v[K], w[K];
        for (int k = 0; k < K; ++k) v[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * K + 16 * k));
        for (int round = 1; round < K; round *= 2) {
            for (int j = 0; j < K / 2; ++j) deinterleave(v[2 * j], v[2 * j + 1], w[j], w[K / 2 + j]);
            for (int k = 0; k < K; ++k) v[k] = w[k];
        }
        for (int k = 0; k < K; ++k) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k * m + i), v[k]);
    }
    for (; i < m; ++i)
        for (int k = 0; k < K; ++k) d[k * m + i] = s[i * K + k];
}

template <int K>
inline void merge_sse2(const uint8_t* __restrict s, uint8_t* __restrict d, size_t m) {
    size_t i = 0;
    for (; i + 16 <= m; i += 16) {
        __m128i v[K], w[K];
        for (int k = 0; k < K; ++k) w[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k * m + i));
        for (int round = 1; round < K; round *= 2) {
            for (int j = 0; j < K / 2; ++j) {
                v[2 * j] = _mm_unpacklo_epi8(w[j], w[K / 2 + j]);
                v[2 * j + 1] = _mm_unpackhi_epi8(w[j], w[K / 2 + j]);
            }
            for (int k = 0; k < K; ++k) w[k] = v[k];
        }
        for (int k = 0; k < K; ++k) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i * K + 16 * k), w[k]);
    }
    for (; i < m; ++i)
        for (int k = 0; k < K; ++k) d[i * K + k] = s[k * m + i];
}

void split_vec(const uint8_t* s, uint8_t* d, size_t n, int k) {
    switch (k) {
        case 2: split_sse2<2>(s, d, n / 2); break;
        case 4: split_sse2<4>(s, d, n / 4); break;
        case 8: split_sse2<8>(s, d, n / 8); break;
        default: std::memcpy(d, s, n);
    }
}

void merge_vec(const uint8_t* s, uint8_t* d, size_t n, int k) {
    switch (k) {
        case 2: merge_sse2<2>(s, d, n / 2); break;
        case 4: merge_sse2<4>(s, d, n / 4); break;
        case 8: merge_sse2<8>(s, d, n / 8); break;
        default: std::memcpy(d, s, n);
    }
}
#else
void split_vec(const uint8_t* s, uint8_t* d, size_t n, int k) { split_any(s, d, n, k); }
void merge_vec(const uint8_t* s, uint8_t* d, size_t n, int k) { merge_any(s, d, n, k); }
#endif

}  // namespace

void byteplane_split(const uint8_t* src, uint8_t* dst, size_t n, int itemsize) {
    if (n) split_vec(src, dst, n, itemsize);
}

void byteplane_merge(const uint8_t* src, uint8_t* dst, size_t n, int itemsize) {
    if (n) merge_vec(src, dst, n, itemsize);
}

#if defined(__x86_64__)
const char* byteplane_impl() { return "sse2"; }
#else
const char* byteplane_impl() { return "generic"; }
#endif

}  // namespace shardckpt

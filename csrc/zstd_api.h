// The slice of zstd's public C API that shardckpt calls, declared by hand (see zstd_dl.cpp).
#pragma once

#include <cstddef>

namespace shardckpt {

struct ZstdApi {
    unsigned (*versionNumber)();
    unsigned (*isError)(size_t);
    const char* (*getErrorName)(size_t);
    int (*getErrorCode)(size_t);  // enum ZSTD_ErrorCode
    void* (*createCCtx)();
    size_t (*freeCCtx)(void*);
    void* (*createDCtx)();
    size_t (*freeDCtx)(void*);
    size_t (*cctxSetParameter)(void*, int, int);  // (ZSTD_CCtx*, ZSTD_cParameter, int)
    size_t (*cctxReset)(void*, int);              // (ZSTD_CCtx*, ZSTD_ResetDirective)
    size_t (*compress2)(void*, void*, size_t, const void*, size_t);
    size_t (*decompressDCtx)(void*, void*, size_t, const void*, size_t);
    unsigned long long (*getFrameContentSize)(const void*, size_t);
    size_t (*findFrameCompressedSize)(const void*, size_t);
};

extern ZstdApi zstd;

// Values from zstd.h / zstd_errors.h (stable API).
constexpr int ZSTD_c_compressionLevel = 100;
constexpr int ZSTD_c_windowLog = 101;
constexpr int ZSTD_c_hashLog = 102;
constexpr int ZSTD_c_chainLog = 103;
constexpr int ZSTD_c_searchLog = 104;
constexpr int ZSTD_c_minMatch = 105;
constexpr int ZSTD_c_targetLength = 106;
constexpr int ZSTD_c_strategy = 107;
constexpr int ZSTD_fast = 1;
constexpr int ZSTD_c_contentSizeFlag = 200;
constexpr int ZSTD_c_checksumFlag = 201;
constexpr int ZSTD_c_dictIDFlag = 202;
constexpr int ZSTD_reset_session_and_parameters = 3;
constexpr int ZSTD_error_dstSize_tooSmall = 70;
constexpr unsigned long long ZSTD_CONTENTSIZE_UNKNOWN = 0ULL - 1;
constexpr unsigned long long ZSTD_CONTENTSIZE_ERROR = 0ULL - 2;

}  // namespace shardckpt

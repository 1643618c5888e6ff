// libzstd, loaded at runtime with dlopen so that building needs no zstd headers and no copy of zstd.
// The prototypes below are the documented, stable public API of zstd.h (>= 1.4.0); we declare only what
// we call. SHARDCKPT_LIBZSTD=<path> overrides the library (tests use a bogus path to force the fallback).
#include <mutex>

#include <dlfcn.h>

#include "native.h"
#include "zstd_api.h"

namespace shardckpt {

ZstdApi zstd;

namespace {

std::string g_source;
bool g_ok = false;
std::once_flag g_once;

template <class T>
bool sym(void* h, const char* name, T& out) {
    out = reinterpret_cast<T>(dlsym(h, name));
    return out != nullptr;
}

void load() {
    std::string name;
    std::string why;
    void* h = dlopen_first("SHARDCKPT_LIBZSTD", "libzstd.so.1", "libzstd.so", name, why);
    if (!h) {
        g_source = why;
        return;
    }
    ZstdApi a{};
    bool ok = sym(h, "ZSTD_versionNumber", a.versionNumber) && sym(h, "ZSTD_isError", a.isError) &&
              sym(h, "ZSTD_getErrorName", a.getErrorName) && sym(h, "ZSTD_getErrorCode", a.getErrorCode) &&
              sym(h, "ZSTD_createCCtx", a.createCCtx) && sym(h, "ZSTD_freeCCtx", a.freeCCtx) &&
              sym(h, "ZSTD_createDCtx", a.createDCtx) && sym(h, "ZSTD_freeDCtx", a.freeDCtx) &&
              sym(h, "ZSTD_CCtx_setParameter", a.cctxSetParameter) && sym(h, "ZSTD_CCtx_reset", a.cctxReset) &&
              sym(h, "ZSTD_compress2", a.compress2) && sym(h, "ZSTD_decompressDCtx", a.decompressDCtx) &&
              sym(h, "ZSTD_getFrameContentSize", a.getFrameContentSize) &&
              sym(h, "ZSTD_findFrameCompressedSize", a.findFrameCompressedSize);
    if (!ok) {
        g_source = name + " lacks a required symbol (need zstd >= 1.4.0)";
        dlclose(h);
        return;
    }
    unsigned v = a.versionNumber();
    if (v < 10400) {
        g_source = name + " is too old (need zstd >= 1.4.0)";
        dlclose(h);
        return;
    }
    zstd = a;
    g_source = name + " " + version_text(v) + " (dlopen)";
    g_ok = true;  // the handle stays open for the life of the process
}

}  // namespace

bool zstd_load() {
    std::call_once(g_once, load);
    return g_ok;
}

const std::string& zstd_source() {
    zstd_load();
    return g_source;
}

}  // namespace shardckpt

// The runtime-loaded libraries' one dlopen (zstd_dl.cpp: libzstd, xxhash_dl.cpp: libxxhash): which file to
// try, in what order, what to say when none opens, and how their version numbers read.
#include <cstdlib>

#include <dlfcn.h>

#include "native.h"

namespace shardckpt {

void* dlopen_first(const char* env_var, const char* soname, const char* dev_name, std::string& name,
                   std::string& why) {
    const char* env = std::getenv(env_var);
    const char* candidates[] = {env && *env ? env : soname, env && *env ? nullptr : dev_name};
    for (const char* c : candidates) {
        if (!c) continue;
        void* h = dlopen(c, RTLD_NOW | RTLD_LOCAL);
        if (h) {
            name = c;
            return h;
        }
        const char* e = dlerror();
        why = e ? e : "dlopen failed";
    }
    return nullptr;
}

std::string version_text(unsigned v) {
    return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

}  // namespace shardckpt

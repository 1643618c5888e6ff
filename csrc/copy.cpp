// Multi-threaded memcpy for staging snapshots: one thread cannot saturate memory bandwidth on a server.
#include <cstring>

#include "native.h"

namespace shardckpt {

void copy_parallel(uint8_t* dst, const uint8_t* src, size_t n, int nthreads) {
    constexpr size_t kMinPerThread = 8u << 20;  // below this, starting threads costs more than it saves
    if (n == 0 || dst == src) return;
    bool overlap = dst < src + n && src < dst + n;
    size_t pieces = n / kMinPerThread;
    int workers = plan_threads(nthreads, pieces ? pieces : 1);
    if (overlap || workers <= 1) {
        std::memmove(dst, src, n);
        return;
    }
    size_t chunk = ((n + workers - 1) / workers + 4095) & ~size_t(4095);
    size_t count = (n + chunk - 1) / chunk;
    parallel_for(count, workers, [&](size_t i, int) {
        size_t off = i * chunk;
        size_t len = n - off < chunk ? n - off : chunk;
        std::memcpy(dst + off, src + off, len);
    });
}

}  // namespace shardckpt

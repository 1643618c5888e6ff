// Positional file I/O that loops over short transfers and EINTR; errors come back as -errno.
#include <cerrno>
#include <climits>

#include <unistd.h>

#include "native.h"

namespace shardckpt {

namespace {
constexpr size_t kMaxIo = size_t(1) << 30;  // Linux transfers at most ~2 GiB per call anyway
}

long long pread_full(int fd, uint64_t offset, uint8_t* dst, size_t n) {
    size_t done = 0;
    while (done < n) {
        size_t want = n - done < kMaxIo ? n - done : kMaxIo;
        ssize_t r = ::pread(fd, dst + done, want, static_cast<off_t>(offset + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -static_cast<long long>(errno);
        }
        if (r == 0) break;  // EOF
        done += static_cast<size_t>(r);
    }
    return static_cast<long long>(done);
}

long long pwrite_full(int fd, uint64_t offset, const uint8_t* src, size_t n) {
    size_t done = 0;
    while (done < n) {
        size_t want = n - done < kMaxIo ? n - done : kMaxIo;
        ssize_t r = ::pwrite(fd, src + done, want, static_cast<off_t>(offset + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -static_cast<long long>(errno);
        }
        if (r == 0) return -static_cast<long long>(ENOSPC);  // no progress: treat as a full device
        done += static_cast<size_t>(r);
    }
    return static_cast<long long>(done);
}

}  // namespace shardckpt

// shardckpt._native: the Python face of the kernels. Buffers come in through the buffer protocol
// (C-contiguous, held for the whole call), every argument is checked here, then the GIL is released and
// the kernels run on pointers and lengths.
#include <cerrno>
#include <memory>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "native.h"

namespace py = pybind11;
using namespace shardckpt;

namespace {

class Buffer {
   public:
    Buffer(py::handle obj, bool writable, const char* what) {
        int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
            PyErr_Clear();
            throw py::value_error(std::string(what) + " must be a C-contiguous" +
                                  (writable ? " writable" : "") + " buffer");
        }
        held_ = true;
    }
    ~Buffer() {
        if (held_) PyBuffer_Release(&view_);
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
    size_t size() const { return static_cast<size_t>(view_.len); }

   private:
    Py_buffer view_{};
    bool held_ = false;
};

long long to_i64(py::handle h, const char* what) {
    if (!PyLong_Check(h.ptr()) || PyBool_Check(h.ptr()))
        throw py::value_error(std::string(what) + " must be an int");
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        throw py::value_error(std::string(what) + " out of range");
    }
    return v;
}

void check_itemsize(int itemsize) {
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8)
        throw py::value_error("itemsize must be one of 1, 2, 4, 8; got " + std::to_string(itemsize));
}

void check_codec(int codec) {
    if (codec < CODEC_RAW || codec > CODEC_ZSTD_BYTEPLANE)
        throw py::value_error("unknown codec " + std::to_string(codec));
}

// Set by shardckpt._ext; falls back to shardckpt._twin.FrameError. A strong reference, never released
// (a static py::object would be destroyed after the interpreter is gone).
PyObject* g_frame_error = nullptr;

void set_frame_error(py::object cls) {
    Py_XDECREF(g_frame_error);
    g_frame_error = cls.release().ptr();
}

[[noreturn]] void raise_frame_error(long index, int status) {
    if (!g_frame_error) set_frame_error(py::module_::import("shardckpt._twin").attr("FrameError"));
    py::object exc = py::reinterpret_borrow<py::object>(g_frame_error)(
        index, status == FRAME_CHECKSUM ? "checksum" : "corrupt");
    PyErr_SetObject(g_frame_error, exc.ptr());
    throw py::error_already_set();
}

[[noreturn]] void raise_errno(long long neg_errno) {
    errno = static_cast<int>(-neg_errno);
    PyErr_SetFromErrno(PyExc_OSError);
    throw py::error_already_set();
}

uint32_t py_crc32c(py::handle data, py::handle value) {
    Buffer b(data, false, "data");
    uint32_t v = static_cast<uint32_t>(PyLong_AsUnsignedLongLongMask(value.ptr()));
    if (PyErr_Occurred()) throw py::error_already_set();
    py::gil_scoped_release nogil;
    return crc32c(b.data(), b.size(), v);
}

std::vector<uint32_t> py_crc32c_frames(py::handle src, long long frame_size, int nthreads) {
    if (frame_size <= 0) throw py::value_error("frame_size must be positive");
    Buffer b(src, false, "src");
    py::gil_scoped_release nogil;
    return crc32c_frames(b.data(), b.size(), static_cast<size_t>(frame_size), nthreads);
}

void py_copy_into(py::handle dst, py::handle src, int nthreads) {
    Buffer d(dst, true, "dst");
    Buffer s(src, false, "src");
    if (s.size() > d.size())
        throw py::value_error("copy_into: dst has " + std::to_string(d.size()) + " bytes, src " +
                              std::to_string(s.size()));
    py::gil_scoped_release nogil;
    copy_parallel(d.data(), s.data(), s.size(), nthreads);
}

void py_copy_many(py::sequence dsts, py::sequence srcs, int nthreads) {
    if (py::len(dsts) != py::len(srcs)) throw py::value_error("copy_many: dsts and srcs differ in length");
    std::vector<std::unique_ptr<Buffer>> held;  // the buffers stay exported while the GIL is released
    std::vector<CopyJob> jobs;
    for (size_t i = 0; i < py::len(dsts); ++i) {
        held.push_back(std::make_unique<Buffer>(dsts[i], true, "dst"));
        Buffer& d = *held.back();
        held.push_back(std::make_unique<Buffer>(srcs[i], false, "src"));
        Buffer& s = *held.back();
        if (s.size() > d.size())
            throw py::value_error("copy_many: dst " + std::to_string(i) + " has " + std::to_string(d.size()) +
                                  " bytes, src " + std::to_string(s.size()));
        if (s.size()) jobs.push_back({d.data(), s.data(), s.size()});
    }
    py::gil_scoped_release nogil;
    copy_many(jobs, nthreads);
}

// Canonical form of a 128-bit XXH3 digest (XXH128_canonicalFromHash, python-xxhash's hexdigest): the high
// 64 bits then the low 64 bits, big-endian, as 32 lowercase hex digits.
std::string hex128(Hash128 h) {
    static const char digits[] = "0123456789abcdef";
    std::string out(32, '0');
    for (int i = 0; i < 16; ++i) {
        out[15 - i] = digits[(h.hi >> (4 * i)) & 15];
        out[31 - i] = digits[(h.lo >> (4 * i)) & 15];
    }
    return out;
}

void require_xxhash() {
    if (!xxhash_load()) throw std::runtime_error("libxxhash is unavailable: " + xxhash_source());
}

std::string py_xxh3_128(py::handle data) {
    require_xxhash();
    Buffer b(data, false, "data");
    Hash128 h;
    {
        py::gil_scoped_release nogil;
        h = xxh3_128(b.data(), b.size());
    }
    return hex128(h);
}

std::vector<std::string> py_xxh3_128_many(py::sequence bufs, int nthreads) {
    require_xxhash();
    std::vector<std::unique_ptr<Buffer>> held;  // exported while the GIL is released
    std::vector<HashJob> jobs;
    for (size_t i = 0; i < py::len(bufs); ++i) {
        held.push_back(std::make_unique<Buffer>(bufs[i], false, "buffer"));
        jobs.push_back({held.back()->data(), held.back()->size()});
    }
    std::vector<Hash128> out(jobs.size());
    {
        py::gil_scoped_release nogil;
        xxh3_128_many(jobs, out.data(), nthreads);
    }
    std::vector<std::string> hex;
    hex.reserve(out.size());
    for (const Hash128& h : out) hex.push_back(hex128(h));
    return hex;
}

void planes(py::handle src, py::handle dst, int itemsize, bool split) {
    check_itemsize(itemsize);
    Buffer s(src, false, "src");
    Buffer d(dst, true, "dst");
    if (s.size() != d.size()) throw py::value_error("src and dst lengths differ");
    if (s.size() % itemsize) throw py::value_error("length is not a multiple of itemsize");
    const uint8_t* sp = s.data();
    uint8_t* dp = d.data();
    if (s.size() && sp < dp + d.size() && dp < sp + s.size())
        throw py::value_error("src and dst must not overlap");
    py::gil_scoped_release nogil;
    if (split)
        byteplane_split(sp, dp, s.size(), itemsize);
    else
        byteplane_merge(sp, dp, s.size(), itemsize);
}

long long py_encode_bound(long long nbytes, long long frame_size, int codec) {
    if (nbytes < 0 || frame_size <= 0) throw py::value_error("encode_bound: bad arguments");
    check_codec(codec);
    return nbytes;  // frames that do not shrink are stored raw
}

py::list py_encode_frames(py::handle src, py::handle out, long long frame_size, int itemsize, int codec,
                          int level, int nthreads) {
    check_itemsize(itemsize);
    check_codec(codec);
    if (frame_size <= 0 || frame_size % itemsize)
        throw py::value_error("frame_size must be a positive multiple of itemsize");
    Buffer s(src, false, "src");
    Buffer o(out, true, "out");
    if (codec == CODEC_ZSTD_BYTEPLANE && s.size() % itemsize)
        throw py::value_error("length is not a multiple of itemsize");
    if (o.size() < s.size())
        throw py::value_error("out has " + std::to_string(o.size()) + " bytes, encode_bound is " +
                              std::to_string(s.size()));
    if (s.size() && s.data() < o.data() + o.size() && o.data() < s.data() + s.size())
        throw py::value_error("src and out must not overlap");
    std::vector<EncodedFrame> frames;
    std::string err;
    {
        py::gil_scoped_release nogil;
        err = encode_frames(s.data(), s.size(), o.data(), static_cast<size_t>(frame_size), itemsize, codec,
                            level, nthreads, frames);
    }
    if (!err.empty()) throw std::runtime_error(err);
    py::list result(frames.size());
    for (size_t i = 0; i < frames.size(); ++i)
        result[i] = py::make_tuple(frames[i].offset, frames[i].stored, frames[i].crc, frames[i].encoded);
    return result;
}

void py_decode_frames(py::handle src, py::handle frames, py::handle dst, int itemsize, int codec,
                      int nthreads) {
    check_itemsize(itemsize);
    check_codec(codec);
    Buffer s(src, false, "src");
    Buffer d(dst, true, "dst");
    std::vector<DecodeFrame> table;
    size_t raw_off = 0;
    if (!PySequence_Check(frames.ptr())) throw py::value_error("frames must be a sequence");
    py::sequence seq = py::reinterpret_borrow<py::sequence>(frames);
    size_t count = seq.size();
    table.reserve(count);
    for (size_t i = 0; i < count; ++i) {
        py::object item = seq[i];
        std::string at = "frame " + std::to_string(i) + ": ";
        if (!PySequence_Check(item.ptr()) || PySequence_Size(item.ptr()) != 5) {
            PyErr_Clear();
            throw py::value_error(at + "expected (offset, stored_len, raw_len, crc32c, encoded)");
        }
        py::sequence f = py::reinterpret_borrow<py::sequence>(item);
        long long off = to_i64(f[0], "offset"), stored = to_i64(f[1], "stored_len");
        long long raw = to_i64(f[2], "raw_len"), crc = to_i64(f[3], "crc32c");
        int truth = PyObject_IsTrue(py::object(f[4]).ptr());
        if (truth < 0) throw py::error_already_set();
        bool enc = truth != 0;
        if (off < 0 || stored < 0 || raw < 0 || static_cast<unsigned long long>(off) > s.size() ||
            static_cast<unsigned long long>(stored) > s.size() - static_cast<size_t>(off))
            throw py::value_error(at + "stored range outside src");
        if (static_cast<unsigned long long>(raw) > d.size() - raw_off)
            throw py::value_error(at + "raw range outside dst");
        if (crc < 0 || crc > 0xFFFFFFFFLL) throw py::value_error(at + "crc32c out of range");
        if (!enc && stored != raw) throw py::value_error(at + "raw frame with stored_len != raw_len");
        if (enc && codec == CODEC_RAW) throw py::value_error(at + "encoded frame under codec raw");
        if (enc && codec == CODEC_ZSTD_BYTEPLANE && raw % itemsize)
            throw py::value_error(at + "raw_len is not a multiple of itemsize");
        table.push_back({static_cast<size_t>(off), static_cast<size_t>(stored), static_cast<size_t>(raw),
                         raw_off, static_cast<uint32_t>(crc), enc});
        raw_off += static_cast<size_t>(raw);
    }
    if (s.size() && d.size() && s.data() < d.data() + d.size() && d.data() < s.data() + s.size())
        throw py::value_error("src and dst must not overlap");
    int status = FRAME_OK;
    std::string fatal;
    long bad;
    {
        py::gil_scoped_release nogil;
        bad = decode_frames(s.data(), d.data(), table, itemsize, codec, nthreads, &status, &fatal);
    }
    if (!fatal.empty()) throw std::runtime_error(fatal);
    if (bad >= 0) raise_frame_error(bad, status);
}

long long py_pread_into(int fd, long long offset, py::handle dst) {
    if (offset < 0) throw py::value_error("offset must be >= 0");
    Buffer d(dst, true, "dst");
    long long r;
    {
        py::gil_scoped_release nogil;
        r = pread_full(fd, static_cast<uint64_t>(offset), d.data(), d.size());
    }
    if (r < 0) raise_errno(r);
    return r;
}

long long py_pwrite_from(int fd, long long offset, py::handle src) {
    if (offset < 0) throw py::value_error("offset must be >= 0");
    Buffer s(src, false, "src");
    long long r;
    {
        py::gil_scoped_release nogil;
        r = pwrite_full(fd, static_cast<uint64_t>(offset), s.data(), s.size());
    }
    if (r < 0) raise_errno(r);
    return r;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "shardckpt native kernels (see shardckpt/native/kernels.py for the contract)";
    m.attr("CODEC_RAW") = int(CODEC_RAW);
    m.attr("CODEC_ZSTD") = int(CODEC_ZSTD);
    m.attr("CODEC_ZSTD_BYTEPLANE") = int(CODEC_ZSTD_BYTEPLANE);
    m.def("crc32c", &py_crc32c, py::arg("data"), py::arg("value") = 0);
    m.def("crc32c_frames", &py_crc32c_frames, py::arg("src"), py::arg("frame_size"), py::arg("nthreads") = 0);
    m.def("copy_into", &py_copy_into, py::arg("dst"), py::arg("src"), py::arg("nthreads") = 0);
    m.def("copy_many", &py_copy_many, py::arg("dsts"), py::arg("srcs"), py::arg("nthreads") = 0);
    m.def("byteplane_split", [](py::handle s, py::handle d, int k) { planes(s, d, k, true); }, py::arg("src"),
          py::arg("dst"), py::arg("itemsize"));
    m.def("byteplane_merge", [](py::handle s, py::handle d, int k) { planes(s, d, k, false); }, py::arg("src"),
          py::arg("dst"), py::arg("itemsize"));
    m.def("encode_bound", &py_encode_bound, py::arg("nbytes"), py::arg("frame_size"), py::arg("codec"));
    m.def("encode_frames", &py_encode_frames, py::arg("src"), py::arg("out"), py::arg("frame_size"),
          py::arg("itemsize"), py::arg("codec"), py::arg("level") = 1, py::arg("nthreads") = 0);
    m.def("decode_frames", &py_decode_frames, py::arg("src"), py::arg("frames"), py::arg("dst"),
          py::arg("itemsize"), py::arg("codec"), py::arg("nthreads") = 0);
    m.def("pread_into", &py_pread_into, py::arg("fd"), py::arg("offset"), py::arg("dst"));
    m.def("pwrite_from", &py_pwrite_from, py::arg("fd"), py::arg("offset"), py::arg("src"));
    m.def("xxh3_128", &py_xxh3_128, py::arg("data"));
    m.def("xxh3_128_many", &py_xxh3_128_many, py::arg("bufs"), py::arg("nthreads") = 0);
    m.def("xxhash_available", []() { return xxhash_load(); });
    m.def("xxhash_source", []() { return xxhash_source(); });
    m.def("zstd_available", []() { return zstd_load(); });
    m.def("zstd_source", []() { return zstd_source(); });
    m.def("impl_info", []() {
        py::dict d;
        d["crc32c"] = crc32c_impl();
        d["byteplane"] = byteplane_impl();
        d["zstd"] = zstd_source();
        d["xxhash"] = xxhash_source();
        return d;
    });
    m.def("_set_frame_error", &set_frame_error, py::arg("cls"));
}

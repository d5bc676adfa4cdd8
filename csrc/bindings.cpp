// fastclip._C: the pybind11 bindings of fastclip's C++ kernels (csrc/*.cpp), built by setup.py.
//
// Arrays come in through the buffer protocol: numpy arrays, or CPU torch tensors passed as
// tensor.numpy() (a view: nothing is copied, and libtorch is not linked).  Every argument is
// checked here, before the GIL is released, with an error that names it, the expected and the
// actual: TypeError for something that is not an array (a CUDA tensor included) or has the wrong
// dtype, ValueError for a wrong rank, shape, layout or value, or a read-only output.  The kernels
// themselves validate nothing.
//
// The module carries what it was built for (__version__, ABI, SOURCES_SHA256);
// fastclip/extension.py refuses a _C whose values are not its own, and uses the fallback backends.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "augment_cpu.h"
#include "loss_tiles_cpu.h"

namespace py = pybind11;

#ifndef FASTCLIP_VERSION
#define FASTCLIP_VERSION "unknown"
#endif
#ifndef FASTCLIP_SOURCES_SHA256
#define FASTCLIP_SOURCES_SHA256 ""
#endif

namespace {

// Bumped whenever a binding's signature or meaning changes; fastclip/extension.py's ABI agrees.
constexpr int kAbi = 2;

std::string describe(py::handle obj) {
    std::string s = Py_TYPE(obj.ptr())->tp_name;
    if (py::hasattr(obj, "dtype")) s += " of dtype " + std::string(py::str(obj.attr("dtype")));
    if (py::hasattr(obj, "device")) s += " on " + std::string(py::str(obj.attr("device")));
    return s;
}

std::string shape_str(const std::vector<py::ssize_t> &shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

// The dtype of a buffer as numpy names it (uint8, float32, int64, bool), from its format.
std::string dtype_name(const py::buffer_info &b) {
    std::string f = b.format;
    const bool little = [] { const uint16_t one = 1; return *reinterpret_cast<const uint8_t *>(&one) == 1; }();
    if (!f.empty() && (f[0] == '@' || f[0] == '=' || (f[0] == '<' && little) || (f[0] == '>' && !little)))
        f = f.substr(1);
    if (f.size() != 1) return "buffer format '" + b.format + "'";
    const std::string bits = std::to_string(8 * b.itemsize);
    switch (f[0]) {
        case '?': return "bool";
        case 'b': case 'h': case 'i': case 'l': case 'q': case 'n': return "int" + bits;
        case 'B': case 'H': case 'I': case 'L': case 'Q': case 'N': return "uint" + bits;
        case 'e': case 'f': case 'd': case 'g': return "float" + bits;
        default: return "buffer format '" + b.format + "'";
    }
}

struct Array {
    const char *name;
    py::buffer_info info;

    // A strided view of ``obj`` through the buffer protocol (no copy), or TypeError/ValueError.
    Array(const char *name_, py::handle obj, std::initializer_list<const char *> dtypes, bool writable = false)
        : name(name_) {
        if (!PyObject_CheckBuffer(obj.ptr()))
            throw py::type_error(std::string(name) + " must be a CPU array with the buffer protocol (a numpy "
                                 "array; a CPU torch tensor as tensor.numpy()), got " + describe(obj));
        auto *view = new Py_buffer();
        if (PyObject_GetBuffer(obj.ptr(), view, PyBUF_RECORDS_RO) != 0) {
            delete view;
            py::error_already_set err;
            throw py::type_error(std::string(name) + " cannot be read as a strided array: " + err.what());
        }
        info = py::buffer_info(view, true);
        const std::string got = dtype_name(info);
        bool ok = false;
        std::string want;
        for (const char *d : dtypes) {
            ok = ok || got == d;
            want += (want.empty() ? "" : " or ") + std::string(d);
        }
        if (!ok) throw py::type_error(std::string(name) + " must be " + want + ", got " + got);
        if (writable && info.readonly)
            throw py::value_error(std::string(name) + " must be writable, got a read-only array");
    }

    void shape(const std::vector<py::ssize_t> &want, const char *layout) const {
        if (info.shape != want)
            throw py::value_error(std::string(name) + " must have shape " + layout + " = " + shape_str(want) +
                                  ", got " + shape_str(info.shape));
    }

    void contiguous() const {
        py::ssize_t step = info.itemsize;
        for (py::ssize_t d = info.ndim - 1; d >= 0; d--) {
            if (info.shape[d] != 1 && info.strides[d] != step) {
                std::vector<py::ssize_t> strides(info.strides.begin(), info.strides.end());
                throw py::value_error(std::string(name) + " must be C-contiguous, got byte strides " +
                                      shape_str(strides) + " for shape " + shape_str(info.shape));
            }
            step *= info.shape[d];
        }
    }

    template <typename T> T *ptr() const { return static_cast<T *>(info.ptr); }
};

// augment(images, out, a, offset, luma, flip=None, taps=None, radii=None, kl=None, lo=None, hi=None)
void augment(py::object images_, py::object out_, py::object a_, py::object offset_, py::object luma_,
             py::object flip_, py::object taps_, py::object radii_, py::object kl_, py::object lo_,
             py::object hi_) {
    Array images("images", images_, {"uint8"});
    if (images.info.ndim != 4 || images.info.shape[3] != 3)
        throw py::value_error("images must be a uint8 array [B, H, W, 3] (any strides), got shape " +
                              shape_str(images.info.shape));
    const py::ssize_t n = images.info.shape[0], h = images.info.shape[1], w = images.info.shape[2];
    if (h < 1 || w < 1)
        throw py::value_error("images must be at least 1x1 pixels, got shape " + shape_str(images.info.shape));
    Array out("out", out_, {"float32"}, true);
    out.shape({n, 3, h, w}, "[B, 3, H, W]");
    out.contiguous();
    Array a("a", a_, {"float32"});
    a.shape({n, 3, 3}, "[B, 3, 3]");
    a.contiguous();
    Array offset("offset", offset_, {"float32"}), luma("luma", luma_, {"float32"});
    for (Array *v : {&offset, &luma}) {
        v->shape({3}, "[3]");
        v->contiguous();
    }

    const uint8_t *flip = nullptr;
    py::ssize_t flip_step = 0;
    std::vector<Array> keep;  // the optional views, alive until the kernel is done
    keep.reserve(6);  // no reallocation: references into it stay valid
    if (!flip_.is_none()) {
        keep.emplace_back("flip", flip_, std::initializer_list<const char *>{"bool", "uint8"});
        keep.back().shape({n}, "[B]");
        flip = keep.back().ptr<uint8_t>();
        flip_step = keep.back().info.strides[0];
    }
    const float *taps = nullptr;
    const int64_t *radii = nullptr;
    py::ssize_t row = 0, radius = 0;
    if (taps_.is_none() != radii_.is_none())
        throw py::value_error(std::string("taps and radii go together, got ") +
                              (taps_.is_none() ? "radii without taps" : "taps without radii"));
    if (!taps_.is_none()) {
        keep.emplace_back("taps", taps_, std::initializer_list<const char *>{"float32"});
        const Array &t = keep.back();
        if (t.info.ndim != 2 || t.info.shape[0] != n || t.info.shape[1] % 2 != 1)
            throw py::value_error("taps must have shape [B, 2R+1] with B = " + std::to_string(n) +
                                  " (one odd-length row per image, centred), got " + shape_str(t.info.shape));
        t.contiguous();
        taps = t.ptr<float>();
        row = t.info.shape[1];
        radius = row / 2;
        keep.emplace_back("radii", radii_, std::initializer_list<const char *>{"int64"});
        keep.back().shape({n}, "[B]");
        keep.back().contiguous();
        radii = keep.back().ptr<int64_t>();
        // reflect padding reads at most r pixels past an edge: r <= size - 1, and the row holds r taps each side
        const int64_t most = std::min<int64_t>(radius, std::min<int64_t>(h, w) - 1);
        for (py::ssize_t i = 0; i < n; i++)
            if (radii[i] < 0 || radii[i] > most)
                throw py::value_error("radii[" + std::to_string(i) + "] = " + std::to_string(radii[i]) +
                                      " is out of range: a blur radius must be in [0, min(R, H - 1, W - 1)] = [0, " +
                                      std::to_string(most) + "]");
    }
    const float *kl = nullptr;
    if (!kl_.is_none()) {
        keep.emplace_back("kl", kl_, std::initializer_list<const char *>{"float32"});
        keep.back().shape({n, 3}, "[B, 3]");
        keep.back().contiguous();
        kl = keep.back().ptr<float>();
    }
    const float *lo = nullptr, *hi = nullptr;
    if (lo_.is_none() != hi_.is_none())
        throw py::value_error(std::string("lo and hi go together (the clamp bounds), got ") +
                              (lo_.is_none() ? "hi without lo" : "lo without hi"));
    if (!lo_.is_none()) {
        keep.emplace_back("lo", lo_, std::initializer_list<const char *>{"float32"});
        keep.back().shape({3}, "[3]");
        keep.back().contiguous();
        lo = keep.back().ptr<float>();
        keep.emplace_back("hi", hi_, std::initializer_list<const char *>{"float32"});
        keep.back().shape({3}, "[3]");
        keep.back().contiguous();
        hi = keep.back().ptr<float>();
    }

    // uint8: byte strides are element strides
    const auto &st = images.info.strides;
    const uint8_t *src = images.ptr<uint8_t>();
    float *dst = out.ptr<float>();
    const float *am = a.ptr<float>(), *off = offset.ptr<float>(), *lu = luma.ptr<float>();
    // 64-byte aligned, as torch's allocator aligns: the vector loops over it are measurably
    // slower from malloc's 16-byte alignment (~10% for clip_aug at 224 px with AVX-512)
    std::vector<float> buffer(static_cast<size_t>(fc_augment_scratch(h, w, radius)) + 16);
    float *scratch = reinterpret_cast<float *>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
    py::gil_scoped_release nogil;
    for (py::ssize_t i = 0; i < n; i++) {
        const int64_t r = radii ? radii[i] : 0;
        fc_augment_image(src + i * st[0], st[3], st[1], st[2], h, w, flip ? flip[i * flip_step] != 0 : 0,
                         r ? taps + i * row + radius : nullptr, r, am + 9 * i, off, kl ? kl + 3 * i : nullptr,
                         lu, lo, hi, dst + i * 3 * h * w, scratch);
    }
}

// A float32 C-contiguous tile [m, k], as both tile kernels take it.
Array tile_arg(const char *name, py::handle obj, bool writable = false) {
    Array z(name, obj, {"float32"}, writable);
    if (z.info.ndim != 2)
        throw py::value_error(std::string(name) + " must be a 2-D tile [m, k], got shape " + shape_str(z.info.shape));
    z.contiguous();
    return z;
}

int thread_count(int threads) {
    if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
    return threads;
}

// tile_lse_rows_cols(z, row_out, col_out, threads=1)
void tile_lse_rows_cols(py::object z_, py::object row_, py::object col_, int threads) {
    thread_count(threads);
    Array z = tile_arg("z", z_);
    const py::ssize_t m = z.info.shape[0], k = z.info.shape[1];
    if (k < 1) throw py::value_error("z must have at least one column, got shape " + shape_str(z.info.shape));
    Array row("row_out", row_, {"float64"}, true), col("col_out", col_, {"float64"}, true);
    row.shape({m}, "[m]");
    row.contiguous();
    col.shape({k}, "[k]");
    col.contiguous();
    const float *zp = z.ptr<float>();
    double *rp = row.ptr<double>(), *cp = col.ptr<double>();
    py::gil_scoped_release nogil;
    fc_tile_lse_rows_cols(zp, m, k, rp, cp, threads);
}

// A statistic vector [n] (float32, or float64 split into float32 hi + lo as tiles.sub_stat does).
void split_stat(const char *name, py::handle obj, py::ssize_t n, const char *layout, std::vector<float> &hi,
                std::vector<float> &lo) {
    Array st(name, obj, {"float32", "float64"});
    st.shape({n}, layout);
    hi.resize(n);
    lo.assign(n, 0.0f);
    const py::ssize_t step = st.info.strides[0];
    const char *base = static_cast<const char *>(st.info.ptr);
    if (st.info.itemsize == 4) {
        for (py::ssize_t i = 0; i < n; i++) hi[i] = *reinterpret_cast<const float *>(base + i * step);
    } else {
        for (py::ssize_t i = 0; i < n; i++) {
            const double v = *reinterpret_cast<const double *>(base + i * step);
            hi[i] = (float)v;
            lo[i] = (float)(v - (double)hi[i]);
        }
    }
}

// tile_softmax_pair(z, row_stat, col_stat, out, threads=1)
void tile_softmax_pair(py::object z_, py::object row_, py::object col_, py::object out_, int threads) {
    thread_count(threads);
    Array z = tile_arg("z", z_);
    const py::ssize_t m = z.info.shape[0], k = z.info.shape[1];
    std::vector<float> rh, rl, ch, cl;
    split_stat("row_stat", row_, m, "[m]", rh, rl);
    split_stat("col_stat", col_, k, "[k]", ch, cl);
    Array out = tile_arg("out", out_, true);
    out.shape({m, k}, "[m, k]");
    const float *zp = z.ptr<float>();
    float *op = out.ptr<float>();
    if (op != zp && op < zp + m * k && zp < op + m * k)
        throw py::value_error("out must be z itself or not overlap it, got a partly overlapping array");
    py::gil_scoped_release nogil;
    fc_tile_softmax_pair(zp, m, k, rh.data(), rl.data(), ch.data(), cl.data(), op, threads);
}

// Which of fc_augment_image's clones this CPU runs (the order target_clones' resolver picks in).
std::string cpu_isa() {
#if FASTCLIP_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return "avx512f";
    if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
    return "default";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastclip's compiled kernels (csrc/); loaded through fastclip.extension, never directly.";
    m.attr("__version__") = FASTCLIP_VERSION;
    m.attr("ABI") = kAbi;
    m.attr("SOURCES_SHA256") = FASTCLIP_SOURCES_SHA256;
    m.attr("CLONES") = static_cast<bool>(FASTCLIP_CLONES);
    m.def("cpu_isa", &cpu_isa, "The vector width fc_augment_image runs at on this CPU (avx512f, avx2, default).");
    m.def("augment", &augment,
          "The augment op's kernel over a batch, the GIL released: uint8 images [B, H, W, 3] (any strides)\n"
          "-> float32 out [B, 3, H, W] (C-contiguous, writable).  a [B, 3, 3], offset [3], luma [3]: the\n"
          "folded colour map; flip bool [B]; taps float32 [B, 2R+1] with radii int64 [B] (image i blurs\n"
          "with the centred 2 radii[i] + 1 of its row); kl float32 [B, 3]: the mean-luma term; lo, hi\n"
          "float32 [3]: the clamp.  fastclip/ops/augment.py derives them; every argument is checked.",
          py::arg("images"), py::arg("out"), py::arg("a"), py::arg("offset"), py::arg("luma"), py::kw_only(),
          py::arg("flip") = py::none(), py::arg("taps") = py::none(), py::arg("radii") = py::none(),
          py::arg("kl") = py::none(), py::arg("lo") = py::none(), py::arg("hi") = py::none());
    m.def("tile_lse_rows_cols", &tile_lse_rows_cols,
          "Row and column log-sum-exp of a float32 C-contiguous tile z [m, k] (k >= 1), the GIL released:\n"
          "row_out float64 [m], col_out float64 [k] (contiguous, writable), as fastclip.ops.tiles.tile_lse\n"
          "gives them along dims 1 and 0 (fp32 max + log of the fp32 sum; an all -inf line gives -inf).\n"
          "Rows split over `threads` std::threads (fewer for a small tile).",
          py::arg("z"), py::arg("row_out"), py::arg("col_out"), py::kw_only(), py::arg("threads") = 1);
    m.def("tile_softmax_pair", &tile_softmax_pair,
          "out = exp(z - row_stat[:, None]) + exp(z - col_stat[None, :]) for a float32 C-contiguous tile\n"
          "z [m, k], the GIL released; row_stat [m], col_stat [k] float32 or float64 (any stride), a float64\n"
          "one applied as fastclip.ops.tiles.sub_stat applies it (hi then lo, in float32); out float32\n"
          "[m, k] (C-contiguous, writable; may be z itself).  Rows split over `threads` std::threads.",
          py::arg("z"), py::arg("row_stat"), py::arg("col_stat"), py::arg("out"), py::kw_only(),
          py::arg("threads") = 1);
}

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

namespace py = pybind11;

#ifndef FASTCLIP_VERSION
#define FASTCLIP_VERSION "unknown"
#endif
#ifndef FASTCLIP_SOURCES_SHA256
#define FASTCLIP_SOURCES_SHA256 ""
#endif

namespace {

// Bumped whenever a binding's signature or meaning changes; fastclip/extension.py's ABI agrees.
constexpr int kAbi = 1;

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
}

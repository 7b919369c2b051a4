// The training forward's quantizers fused into one pass each (bitnet_train._quant_ops), for
// bitnet_train/quant.py's _BitLinearFn on the CPU. Bit for bit what the PyTorch reference computes
// (quant.act_quant / weight_quant; tests/test_quant_ops.py): the same IEEE operations in the same order,
// rounding half to even. torch's tensors are passed as raw pointers (this module does not link torch):
// quant.py allocates every output, checks dtypes and contiguity, and keeps the tensors alive.
//
//   act_rows:     s_x = 127 / max(max|x|, eps) per row;  code = clamp(round(x * s_x), -128, 127) as int8;
//                 x_eff = code / s_x (fp32 or bf16, round to nearest even): the dequantized input for backward.
//   weight_codes: code = clamp(round(w / s_w), -1, 1) as int8;  w_eff = code * s_w (fp32 or bf16).
// A row holding a NaN gets s_x = NaN (as torch's amax propagates it) and codes 0, so its outputs are NaN.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_shared.h"

namespace py = pybind11;

namespace {

enum Kind { kNone = 0, kF32 = 1, kBF16 = 2 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch's float -> bfloat16 cast does (NaN kept a quiet NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Round half to even for |v| < 2^22 in the default rounding mode (adding and removing 1.5 * 2^23),
// which vectorizes where nearbyint may not. Callers clamp v first. (IEEE arithmetic: the compiler may
// not fold (v + m) - m; never build this file with -ffast-math.)
inline float round_even_small(float v) {
  const float m = 12582912.0f;
  return (v + m) - m;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void act_row(const void* x, bool bf16_in, int64_t cols, float eps, int8_t* codes, float* scale, void* xeff, int kind) {
  const float* xf = static_cast<const float*>(x);
  const uint16_t* xh = static_cast<const uint16_t*>(x);
  float amax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < cols; ++i) {
    const float a = std::fabs(bf16_in ? bf16_to_f32(xh[i]) : xf[i]);
    nan |= (a != a);
    amax = a > amax ? a : amax;
  }
  const float s = nan ? std::nanf("") : bitnet::act_scale(amax, eps);
  *scale = s;
  float* ef = static_cast<float*>(xeff);
  uint16_t* eh = static_cast<uint16_t*>(xeff);
  for (int64_t i = 0; i < cols; ++i) {
    float v = (bf16_in ? bf16_to_f32(xh[i]) : xf[i]) * s;
    v = v < -129.0f ? -129.0f : (v > 128.0f ? 128.0f : v);  // NaN falls through to the check below
    float c = round_even_small(v);
    c = c < -128.0f ? -128.0f : (c > 127.0f ? 127.0f : c);
    if (c != c) c = 0.0f;
    codes[i] = static_cast<int8_t>(c);
    const float e = c / s;
    if (kind == kF32) ef[i] = e;
    else if (kind == kBF16) eh[i] = f32_to_bf16(e);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void weight_chunk(const float* w, int64_t n, float s, int8_t* codes, void* weff, int kind) {
  float* ef = static_cast<float*>(weff);
  uint16_t* eh = static_cast<uint16_t*>(weff);
  for (int64_t i = 0; i < n; ++i) {
    float v = w[i] / s;
    v = v < -2.0f ? -2.0f : (v > 2.0f ? 2.0f : v);  // round(clamp(v, -2, 2)) clamps to the same code
    float c = round_even_small(v);
    c = c < -1.0f ? -1.0f : (c > 1.0f ? 1.0f : c);
    if (c != c) c = 0.0f;
    codes[i] = static_cast<int8_t>(c);
    const float e = c * s;
    if (kind == kF32) ef[i] = e;
    else if (kind == kBF16) eh[i] = f32_to_bf16(e);
  }
}

void check_kind(int kind) {
  if (kind != kNone && kind != kF32 && kind != kBF16) throw py::value_error("x_eff kind must be 0 (none), 1 (fp32) or 2 (bf16)");
}

}  // namespace

PYBIND11_MODULE(_quant_ops, m) {
  m.doc() = "The BitLinear training forward's quantizers, fused (bit-exact to bitnet_train.quant's reference)";
  m.def(
      "act_rows",
      [](uintptr_t x, bool bf16_in, int64_t rows, int64_t cols, float eps, uintptr_t codes, uintptr_t scales,
         uintptr_t xeff, int kind) {
        check_kind(kind);
        if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be >= 0");
        py::gil_scoped_release release;
        const int64_t in_bytes = bf16_in ? 2 : 4, out_bytes = kind == kBF16 ? 2 : 4;
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
          act_row(reinterpret_cast<const char*>(x) + r * cols * in_bytes, bf16_in, cols, eps,
                  reinterpret_cast<int8_t*>(codes) + r * cols, reinterpret_cast<float*>(scales) + r,
                  kind ? reinterpret_cast<char*>(xeff) + r * cols * out_bytes : nullptr, kind);
      },
      py::arg("x"), py::arg("bf16_in"), py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("codes"),
      py::arg("scales"), py::arg("xeff"), py::arg("kind"));
  m.def(
      "weight_codes",
      [](uintptr_t w, int64_t n, float s, uintptr_t codes, uintptr_t weff, int kind) {
        check_kind(kind);
        if (n < 0) throw py::value_error("n must be >= 0");
        py::gil_scoped_release release;
        const int64_t chunk = 1 << 16, out_bytes = kind == kBF16 ? 2 : 4;
#pragma omp parallel for schedule(static)
        for (int64_t c0 = 0; c0 < n; c0 += chunk)
          weight_chunk(reinterpret_cast<const float*>(w) + c0, n - c0 < chunk ? n - c0 : chunk, s,
                       reinterpret_cast<int8_t*>(codes) + c0,
                       kind ? reinterpret_cast<char*>(weff) + c0 * out_bytes : nullptr, kind);
      },
      py::arg("w"), py::arg("n"), py::arg("s"), py::arg("codes"), py::arg("weff"), py::arg("kind"));
}

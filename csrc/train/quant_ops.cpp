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
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);  // a select: vectorizes
}

// Round half to even for |v| < 2^22 in the default rounding mode (adding and removing 1.5 * 2^23),
// which vectorizes where nearbyint may not. Callers clamp v first. (IEEE arithmetic: the compiler may
// not fold (v + m) - m; never build this file with -ffast-math.)
inline float round_even_small(float v) {
  const float m = 12582912.0f;
  return (v + m) - m;
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

// One row: branch-free loops per (input type, output type), so that the compiler vectorizes them.
template <typename In, typename Out>
__attribute__((target_clones("avx512f", "avx2", "default")))
void act_row(const In* x, int64_t cols, float eps, int8_t* codes, float* scale, Out* xeff) {
  // max|x| as the largest sign-cleared bit pattern: for non-NaN floats the integer order is the float order
  // (an integer max reduction, which vectorizes), and a NaN is any pattern above infinity's.
  uint32_t top = 0;
  for (int64_t i = 0; i < cols; ++i) {
    const float v = load(x, i);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u &= 0x7fffffffu;
    top = u > top ? u : top;
  }
  float amax;
  std::memcpy(&amax, &top, 4);
  const float s = top > 0x7f800000u ? std::nanf("") : bitnet::act_scale(amax, eps);
  *scale = s;
  for (int64_t i = 0; i < cols; ++i) {
    float v = load(x, i) * s;
    v = v < -129.0f ? -129.0f : v;
    v = v > 128.0f ? 128.0f : v;
    float c = round_even_small(v);
    c = c < -128.0f ? -128.0f : c;
    c = c > 127.0f ? 127.0f : c;
    c = (c == c) ? c : 0.0f;  // NaN (the row's s is NaN): code 0
    codes[i] = static_cast<int8_t>(static_cast<int32_t>(c));
    store(xeff, i, c / s);
  }
}

template <typename Out>
__attribute__((target_clones("avx512f", "avx2", "default")))
void weight_chunk(const float* w, int64_t n, float s, int8_t* codes, Out* weff) {
  for (int64_t i = 0; i < n; ++i) {
    float v = w[i] / s;
    v = v < -2.0f ? -2.0f : v;  // round(clamp(v, -2, 2)) clamps to the same code
    v = v > 2.0f ? 2.0f : v;
    float c = round_even_small(v);
    c = c < -1.0f ? -1.0f : c;
    c = c > 1.0f ? 1.0f : c;
    c = (c == c) ? c : 0.0f;
    codes[i] = static_cast<int8_t>(static_cast<int32_t>(c));
    store(weff, i, c * s);
  }
}

template <typename In, typename Out>
void act_rows_t(const In* x, int64_t rows, int64_t cols, float eps, int8_t* codes, float* scales, Out* xeff) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) act_row(x + r * cols, cols, eps, codes + r * cols, scales + r, xeff + r * cols);
}

template <typename Out>
void weight_codes_t(const float* w, int64_t n, float s, int8_t* codes, Out* weff) {
  const int64_t chunk = 1 << 16;
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < n; c0 += chunk)
    weight_chunk(w + c0, n - c0 < chunk ? n - c0 : chunk, s, codes + c0, weff + c0);
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
        if (kind == kNone) throw py::value_error("act_rows writes x_eff: kind must be 1 (fp32) or 2 (bf16)");
        py::gil_scoped_release release;
        auto* c = reinterpret_cast<int8_t*>(codes);
        auto* sc = reinterpret_cast<float*>(scales);
        if (bf16_in && kind == kBF16)
          act_rows_t(reinterpret_cast<const uint16_t*>(x), rows, cols, eps, c, sc, reinterpret_cast<uint16_t*>(xeff));
        else if (bf16_in)
          act_rows_t(reinterpret_cast<const uint16_t*>(x), rows, cols, eps, c, sc, reinterpret_cast<float*>(xeff));
        else if (kind == kBF16)
          act_rows_t(reinterpret_cast<const float*>(x), rows, cols, eps, c, sc, reinterpret_cast<uint16_t*>(xeff));
        else
          act_rows_t(reinterpret_cast<const float*>(x), rows, cols, eps, c, sc, reinterpret_cast<float*>(xeff));
      },
      py::arg("x"), py::arg("bf16_in"), py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("codes"),
      py::arg("scales"), py::arg("xeff"), py::arg("kind"));
  m.def(
      "weight_codes",
      [](uintptr_t w, int64_t n, float s, uintptr_t codes, uintptr_t weff, int kind) {
        check_kind(kind);
        if (n < 0) throw py::value_error("n must be >= 0");
        if (kind == kNone) throw py::value_error("weight_codes writes w_eff: kind must be 1 (fp32) or 2 (bf16)");
        py::gil_scoped_release release;
        auto* c = reinterpret_cast<int8_t*>(codes);
        if (kind == kBF16)
          weight_codes_t(reinterpret_cast<const float*>(w), n, s, c, reinterpret_cast<uint16_t*>(weff));
        else
          weight_codes_t(reinterpret_cast<const float*>(w), n, s, c, reinterpret_cast<float*>(weff));
      },
      py::arg("w"), py::arg("n"), py::arg("s"), py::arg("codes"), py::arg("weff"), py::arg("kind"));
}

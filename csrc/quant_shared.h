// Quantization contract and i2_b128 code access as __host__ __device__ helpers: one definition
// that host C++ (g++) and CUDA (nvcc) code both compile. The layout itself is declared in
// cpu/i2_b128.h; the contract in DESIGN.md ("Quantization contract"):
//   s_x = 127 / max(max|x|, eps),   xq = clamp(round_half_even(x * s_x), -128, 127)
//   y   = float(sum_k c[k] * xq[k]) * (s_w / s_x)                      (int32 accumulation)
// Plain C++ when not compiled by nvcc; no CUDA headers needed on the host side.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BITNET_HD __host__ __device__ __forceinline__
#else
#define BITNET_HD inline
#endif

namespace bitnet {

// i2_b128: a 32-bit little-endian word holding bytes j..j+3 (j % 4 == 0) of a block gives, for
// field k = 0..3, the stored codes q = c + 1 of elements 32k+j .. 32k+j+3 as four bytes in order.
// So one masked shift lines four codes up with four consecutive int8 activations.
BITNET_HD uint32_t i2_word_codes(uint32_t word, int k) { return (word >> (2 * k)) & 0x03030303u; }

// sum_{i<4} int8(a.byte[i]) * int8(b.byte[i]) + c: __dp4a on the device, its twin on the host.
BITNET_HD int32_t dp4a_s8(uint32_t a, uint32_t b, int32_t c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int i = 0; i < 4; ++i)
    c += static_cast<int8_t>(static_cast<uint8_t>(a >> (8 * i))) * static_cast<int8_t>(static_cast<uint8_t>(b >> (8 * i)));
  return c;
#endif
}

// Because codes are stored as q = c + 1: sum_k c[k] x[k] = sum_k q[k] x[k] - sum_k x[k].
// Kernels accumulate q·x with dp4a and subtract the activation row's code sum once.
BITNET_HD int32_t ternary_dot_from_q(int32_t q_dot_x, int32_t x_sum) { return q_dot_x - x_sum; }

// Activation scale s_x for a row whose largest magnitude is amax (IEEE division on both sides;
// never build with --use_fast_math).
BITNET_HD float act_scale(float amax, float eps) { return 127.0f / fmaxf(amax, eps); }

// One activation code: round half to even (torch.round, nearbyint in the default rounding mode,
// __float2int_rn on the device), clamped to int8. The product is rounded alone (no FMA).
BITNET_HD int8_t quantize_act(float x, float s_x) {
#if defined(__CUDA_ARCH__)
  const int v = __float2int_rn(__fmul_rn(x, s_x));
  return static_cast<int8_t>(v < -128 ? -128 : (v > 127 ? 127 : v));
#else
  const float v = std::nearbyint(x * s_x);
  return static_cast<int8_t>(v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v));
#endif
}

// Output of a ternary dot product under the multiply convention (W ~ c * s_w).
BITNET_HD float ternary_output(int32_t c_dot_x, float s_w, float s_x) { return static_cast<float>(c_dot_x) * (s_w / s_x); }

}  // namespace bitnet

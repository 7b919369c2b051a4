// C++ test build only: SIMDe's portable AVX-512 plus the few intrinsics SIMDe 0.7 lacks, so that
// kernels_avx512.cpp runs (slowly, exactly) on a CPU without AVX-512 and is checked against the
// scalar reference. Included by kernels_avx512.cpp when BITNET_AVX512_EMULATE is defined.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/kernels.h"

namespace bitnet_emu {

inline int32_t reduce_add_epi32(simde__m512i v) {
  int32_t a[16];
  simde_mm512_storeu_si512(a, v);
  int32_t s = 0;
  for (int i = 0; i < 16; ++i) s += a[i];
  return s;
}
inline float reduce_add_ps(simde__m512 v) {
  float a[16];
  simde_mm512_storeu_ps(a, v);
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += a[i];
  return s;
}
inline float reduce_max_ps(simde__m512 v) {
  float a[16];
  simde_mm512_storeu_ps(a, v);
  float m = a[0];
  for (int i = 1; i < 16; ++i) m = m > a[i] ? m : a[i];
  return m;
}
inline simde__m512 maskz_loadu_ps(uint16_t k, const void* p) {
  float a[16] = {};
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(&a[i], static_cast<const char*>(p) + 4 * i, 4);
  return simde_mm512_loadu_ps(a);
}
inline simde__m256i maskz_loadu_epi16(uint16_t k, const void* p) {
  uint16_t a[16] = {};
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(&a[i], static_cast<const char*>(p) + 2 * i, 2);
  return simde_mm256_loadu_si256(a);
}
inline void mask_storeu_ps(void* p, uint16_t k, simde__m512 v) {
  float a[16];
  simde_mm512_storeu_ps(a, v);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<char*>(p) + 4 * i, &a[i], 4);
}
inline simde__m128i cvtepi32_epi8(simde__m512i v) {  // truncation, as vpmovdb
  int32_t a[16];
  simde_mm512_storeu_si512(a, v);
  uint8_t b[16];
  for (int i = 0; i < 16; ++i) b[i] = static_cast<uint8_t>(a[i] & 0xff);
  return simde_mm_loadu_si128(b);
}
inline void mask_storeu_epi8(void* p, uint16_t k, simde__m128i v) {
  uint8_t a[16];
  simde_mm_storeu_si128(a, v);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) static_cast<uint8_t*>(p)[i] = a[i];
}
inline simde__m512 cvtph_ps(simde__m256i v) {
  uint16_t a[16];
  simde_mm256_storeu_si256(a, v);
  float b[16];
  for (int i = 0; i < 16; ++i) b[i] = bitnet::fp16_to_fp32(a[i]);
  return simde_mm512_loadu_ps(b);
}
inline simde__m512i cvtepu16_epi32(simde__m256i v) {
  uint16_t a[16];
  simde_mm256_storeu_si256(a, v);
  int32_t b[16];
  for (int i = 0; i < 16; ++i) b[i] = a[i];
  return simde_mm512_loadu_si512(b);
}

inline simde__m512i add_epi8(simde__m512i a, simde__m512i b) {  // wrapping, without SIMDe's signed-overflow UB
  uint8_t x[64], y[64];
  simde_mm512_storeu_si512(x, a);
  simde_mm512_storeu_si512(y, b);
  for (int i = 0; i < 64; ++i) x[i] = static_cast<uint8_t>(x[i] + y[i]);
  return simde_mm512_loadu_si512(x);
}
inline simde__m512i srai_epi32(simde__m512i v, int imm) {  // arithmetic shift (SIMDe 0.7 lacks the 512-bit one)
  int32_t a[16];
  simde_mm512_storeu_si512(a, v);
  for (int i = 0; i < 16; ++i) a[i] = imm > 31 ? (a[i] < 0 ? -1 : 0) : (a[i] >> imm);
  return simde_mm512_loadu_si512(a);
}

inline simde__m512i cvtps_epi32(simde__m512 v) {  // current rounding mode; NaN / overflow -> INT32_MIN
  float a[16];
  simde_mm512_storeu_ps(a, v);
  int32_t b[16];
  for (int i = 0; i < 16; ++i) {
    const float r = std::nearbyint(a[i]);
    b[i] = (r >= -2147483648.0f && r < 2147483648.0f) ? static_cast<int32_t>(r) : INT32_MIN;
  }
  return simde_mm512_loadu_si512(b);
}

inline simde__m512 cvtepi32_ps(simde__m512i v) {  // round to nearest, as vcvtdq2ps under the default MXCSR
  int32_t a[16];
  simde_mm512_storeu_si512(a, v);
  float b[16];
  for (int i = 0; i < 16; ++i) b[i] = static_cast<float>(a[i]);
  return simde_mm512_loadu_ps(b);
}

}  // namespace bitnet_emu

#define _mm512_cvtps_epi32 bitnet_emu::cvtps_epi32
#define _mm512_cvtepi32_ps bitnet_emu::cvtepi32_ps
#define _mm512_srai_epi32 bitnet_emu::srai_epi32
#undef _mm512_add_epi8
#define _mm512_add_epi8 bitnet_emu::add_epi8
#define _mm512_reduce_add_epi32 bitnet_emu::reduce_add_epi32
#define _mm512_reduce_add_ps bitnet_emu::reduce_add_ps
#define _mm512_reduce_max_ps bitnet_emu::reduce_max_ps
#define _mm512_maskz_loadu_ps bitnet_emu::maskz_loadu_ps
#define _mm256_maskz_loadu_epi16 bitnet_emu::maskz_loadu_epi16
#define _mm512_cvtepi32_epi8 bitnet_emu::cvtepi32_epi8
#define _mm_mask_storeu_epi8 bitnet_emu::mask_storeu_epi8
#define _mm512_mask_storeu_ps bitnet_emu::mask_storeu_ps
#define _mm512_cvtph_ps bitnet_emu::cvtph_ps
#define _mm512_cvtepu16_epi32 bitnet_emu::cvtepu16_epi32

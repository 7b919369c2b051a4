// Weight panels for the batch kernels (AVX-512 and AMX): the codes q = c + 1 of a group of weight
// rows decoded once from the packing read in place (i2_b128 or t3_b160), then shared by every
// activation row of the batch. Included by kernels_avx512.cpp and kernels_amx.cpp after their
// intrinsics (or the SIMDe / emulated-tile headers of the test build); everything is internal.
#pragma once

#include <algorithm>
#include <cstring>

#include "cpu/kernels.h"

namespace bitnet {
namespace {

// 16 zmm of 16 dwords each -> their transpose: out[k] dword j = in[j] dword k. Two unpack stages
// give, per group G of 4 rows, 4 vectors S[G][e] whose 128-bit lane L holds rows 4G..4G+3 at dword
// 4L + e; two 128-bit lane shuffles then gather lane L of S[0..3][e] into out[4L + e].
inline void transpose16x16(const __m512i in[16], __m512i out[16]) {
  __m512i s[4][4];
  for (int g = 0; g < 4; ++g) {
    const __m512i r0 = in[4 * g], r1 = in[4 * g + 1], r2 = in[4 * g + 2], r3 = in[4 * g + 3];
    const __m512i lo01 = _mm512_unpacklo_epi32(r0, r1), hi01 = _mm512_unpackhi_epi32(r0, r1);
    const __m512i lo23 = _mm512_unpacklo_epi32(r2, r3), hi23 = _mm512_unpackhi_epi32(r2, r3);
    s[g][0] = _mm512_unpacklo_epi64(lo01, lo23);
    s[g][1] = _mm512_unpackhi_epi64(lo01, lo23);
    s[g][2] = _mm512_unpacklo_epi64(hi01, hi23);
    s[g][3] = _mm512_unpackhi_epi64(hi01, hi23);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i a = _mm512_shuffle_i32x4(s[0][e], s[1][e], 0x44), b = _mm512_shuffle_i32x4(s[0][e], s[1][e], 0xEE);
    const __m512i c = _mm512_shuffle_i32x4(s[2][e], s[3][e], 0x44), d = _mm512_shuffle_i32x4(s[2][e], s[3][e], 0xEE);
    out[e] = _mm512_shuffle_i32x4(a, c, 0x88);
    out[4 + e] = _mm512_shuffle_i32x4(a, c, 0xDD);
    out[8 + e] = _mm512_shuffle_i32x4(b, d, 0x88);
    out[12 + e] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

// Codes q of one weight row, k_codes of them, then zeros up to `padded`.
inline void decode_i2_row(const uint8_t* row, int64_t n_blocks, int64_t padded, uint8_t* out) {
  const __m512i mask = _mm512_set1_epi8(3);
  const __m512i shift01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  const __m512i shift23 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kI2BlockBytes)));
    _mm512_storeu_si512(out + b * kI2BlockCodes, _mm512_and_si512(_mm512_srlv_epi16(w, shift01), mask));
    _mm512_storeu_si512(out + b * kI2BlockCodes + 64, _mm512_and_si512(_mm512_srlv_epi16(w, shift23), mask));
  }
  std::memset(out + n_blocks * kI2BlockCodes, 0, static_cast<size_t>(padded - n_blocks * kI2BlockCodes));
}

inline void decode_t3_row(const uint8_t* row, int64_t n_blocks, int64_t padded, uint8_t* out) {
  const __m256i c86 = _mm256_set1_epi8(86), c171 = _mm256_set1_epi8(static_cast<char>(171));
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t b = 0; b < n_blocks; ++b) {
    __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kT3BlockBytes));
    for (int k = 0; k < kT3TritsPerByte; ++k) {  // q = (u > 85) + (u > 170), then u = 3 u (mod 256)
      // u >= c as 0xFF (-1) bytes: max(u, c) == u; q = 0 - ge86 - ge171 (AVX2 ops)
      const __m256i ge86 = _mm256_cmpeq_epi8(_mm256_max_epu8(u, c86), u);
      const __m256i ge171 = _mm256_cmpeq_epi8(_mm256_max_epu8(u, c171), u);
      const __m256i q = _mm256_sub_epi8(_mm256_sub_epi8(zero, ge86), ge171);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * kT3BlockCodes + 32 * k), q);
      u = _mm256_add_epi8(u, _mm256_add_epi8(u, u));
    }
  }
  std::memset(out + n_blocks * kT3BlockCodes, 0, static_cast<size_t>(padded - n_blocks * kT3BlockCodes));
}

}  // namespace
}  // namespace bitnet

// AVX2 kernels (compiled with -mavx2 -mfma -mf16c; only called when CPUID reports AVX2+FMA+F16C).
//
// Ternary dot trick: with q = c + 1 in {0, 1, 2} (unsigned) and x signed int8,
//   sum(c * x) = sum(q * x) - sum(x).
// _mm256_maddubs_epi16(q, x) forms q0*x0 + q1*x1 per int16 lane: |.| <= 2*128*2 = 512, and the
// four sums we add before widening stay <= 2048, far inside int16 (no saturation).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/kernels.h"

namespace bitnet {
namespace {

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline float hmax_ps(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void quantize_rows_avx2(const float* x, int64_t m, int64_t n, int64_t x_stride, float eps, int8_t* q,
                        int64_t q_stride, float* s_x, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i ones_u8 = _mm256_set1_epi8(1);
  const __m256i ones_i16 = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * x_stride;
    int8_t* qr = q + i * q_stride;
    __m256 vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xr + k), abs_mask));
    float amax = hmax_ps(vmax);
    for (; k < n; ++k) amax = std::fmax(amax, std::fabs(xr[k]));
    const float s = 127.0f / std::fmax(amax, eps);
    const __m256 vs = _mm256_set1_ps(s);
    __m256i vsum = _mm256_setzero_si256();
    k = 0;
    for (; k + 32 <= n; k += 32) {
      // cvtps_epi32 rounds with MXCSR (to nearest, ties to even) as nearbyint does; packs saturate
      // to [-128, 127] (NaN -> INT32_MIN -> -128, as the scalar clamp).
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vs));
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), vs));
      const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 16), vs));
      const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 24), vs));
      const __m256i ab = _mm256_packs_epi32(a, b);
      const __m256i cd = _mm256_packs_epi32(c, d);
      const __m256i abcd = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), abcd);
      vsum = _mm256_add_epi32(vsum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones_u8, abcd), ones_i16));
    }
    int32_t total = hsum_epi32(vsum);
    for (; k < n; ++k) {
      const float v = std::fmin(std::fmax(std::nearbyint(xr[k] * s), -128.0f), 127.0f);
      qr[k] = static_cast<int8_t>(v);
      total += qr[k];
    }
    for (k = n; k < q_stride; ++k) qr[k] = 0;
    s_x[i] = s;
    sum[i] = total;
  }
}

// One weight row against NA activation rows.
template <int NA>
inline void ternary_row_tile(const uint8_t* row, int64_t n_blocks, const QuantRows& x, int64_t i0, float s_w,
                             float* y, int64_t y_stride, int64_t r) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[NA];
  const int8_t* xq[NA];
  for (int a = 0; a < NA; ++a) {
    acc[a] = _mm256_setzero_si256();
    xq[a] = x.q + (i0 + a) * x.stride;
  }
  for (int64_t b = 0; b < n_blocks; ++b) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kI2BlockBytes));
    const __m256i q0 = _mm256_and_si256(w, mask);  // elements 0..31 of the block
    const __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(w, 2), mask);  // 32..63
    const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);  // 64..95
    const __m256i q3 = _mm256_and_si256(_mm256_srli_epi16(w, 6), mask);  // 96..127
    for (int a = 0; a < NA; ++a) {
      const auto* xb = reinterpret_cast<const __m256i*>(xq[a] + b * kI2BlockCodes);
      const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(q0, _mm256_loadu_si256(xb)),
                                           _mm256_maddubs_epi16(q1, _mm256_loadu_si256(xb + 1)));
      const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(q2, _mm256_loadu_si256(xb + 2)),
                                           _mm256_maddubs_epi16(q3, _mm256_loadu_si256(xb + 3)));
      acc[a] = _mm256_add_epi32(acc[a], _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones));
    }
  }
  for (int a = 0; a < NA; ++a) {
    const int32_t dot = hsum_epi32(acc[a]) - x.sum[i0 + a];
    y[(i0 + a) * y_stride + r] = static_cast<float>(dot) * (s_w / x.scale[i0 + a]);
  }
}

void ternary_rows_avx2(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                       float s_w, float* y, int64_t y_stride) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * n_blocks * kI2BlockBytes;
    int64_t i = 0;
    for (; i + 4 <= x.m; i += 4) ternary_row_tile<4>(row, n_blocks, x, i, s_w, y, y_stride, r);
    switch (x.m - i) {
      case 3: ternary_row_tile<3>(row, n_blocks, x, i, s_w, y, y_stride, r); break;
      case 2: ternary_row_tile<2>(row, n_blocks, x, i, s_w, y, y_stride, r); break;
      case 1: ternary_row_tile<1>(row, n_blocks, x, i, s_w, y, y_stride, r); break;
      default: break;
    }
  }
}

template <DType DT>
inline __m256 load8(const uint8_t* row, int64_t k) {
  if constexpr (DT == DType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
  } else if constexpr (DT == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
  } else {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
}

template <DType DT>
inline float load1(const uint8_t* row, int64_t k) {
  if constexpr (DT == DType::F32) {
    float f;
    std::memcpy(&f, row + 4 * k, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    if constexpr (DT == DType::F16) return _cvtsh_ss(h);
    return bf16_to_fp32(h);
  }
}

template <DType DT, int NA>
inline void dense_row_tile(const uint8_t* row, int64_t n, const float* x, int64_t i0, int64_t x_stride, float* y,
                           int64_t y_stride, int64_t r) {
  __m256 acc0[NA], acc1[NA];
  const float* xr[NA];
  for (int a = 0; a < NA; ++a) {
    acc0[a] = _mm256_setzero_ps();
    acc1[a] = _mm256_setzero_ps();
    xr[a] = x + (i0 + a) * x_stride;
  }
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m256 w0 = load8<DT>(row, k);
    const __m256 w1 = load8<DT>(row, k + 8);
    for (int a = 0; a < NA; ++a) {
      acc0[a] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr[a] + k), acc0[a]);
      acc1[a] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr[a] + k + 8), acc1[a]);
    }
  }
  for (; k + 8 <= n; k += 8) {
    const __m256 w0 = load8<DT>(row, k);
    for (int a = 0; a < NA; ++a) acc0[a] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr[a] + k), acc0[a]);
  }
  for (int a = 0; a < NA; ++a) {
    float s = hsum_ps(_mm256_add_ps(acc0[a], acc1[a]));
    for (int64_t t = k; t < n; ++t) s += load1<DT>(row, t) * xr[a][t];
    y[(i0 + a) * y_stride + r] = s;
  }
}

template <DType DT>
void dense_rows_t(const void* w, int64_t n, int64_t r0, int64_t r1, const float* x, int64_t m, int64_t x_stride,
                  float* y, int64_t y_stride) {
  const auto* base = static_cast<const uint8_t*>(w);
  const int64_t row_bytes = n * (DT == DType::F32 ? 4 : 2);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = base + r * row_bytes;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) dense_row_tile<DT, 4>(row, n, x, i, x_stride, y, y_stride, r);
    switch (m - i) {
      case 3: dense_row_tile<DT, 3>(row, n, x, i, x_stride, y, y_stride, r); break;
      case 2: dense_row_tile<DT, 2>(row, n, x, i, x_stride, y, y_stride, r); break;
      case 1: dense_row_tile<DT, 1>(row, n, x, i, x_stride, y, y_stride, r); break;
      default: break;
    }
  }
}

void dense_rows_avx2(const void* w, DType dt, int64_t n, int64_t r0, int64_t r1, const float* x, int64_t m,
                     int64_t x_stride, float* y, int64_t y_stride) {
  switch (dt) {
    case DType::F32: dense_rows_t<DType::F32>(w, n, r0, r1, x, m, x_stride, y, y_stride); break;
    case DType::F16: dense_rows_t<DType::F16>(w, n, r0, r1, x, m, x_stride, y, y_stride); break;
    case DType::BF16: dense_rows_t<DType::BF16>(w, n, r0, r1, x, m, x_stride, y, y_stride); break;
    default: break;  // the engine only hands dense float dtypes
  }
}

}  // namespace

const KernelTable kAvx2Kernels = {"avx2", quantize_rows_avx2, ternary_rows_avx2, dense_rows_avx2};

}  // namespace bitnet

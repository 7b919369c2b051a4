// AVX2 kernels (compiled with -mavx2 -mfma -mf16c; only called when CPUID reports AVX2+FMA+F16C).
//
// Ternary dot trick: with q = c + 1 in {0, 1, 2} (unsigned) and x signed int8,
//   sum(c * x) = sum(q * x) - sum(x).
// _mm256_maddubs_epi16(q, x) forms q0*x0 + q1*x1 per int16 lane: |.| <= 2*128*2 = 512 (no
// saturation); see ternary_tile for how many of them are summed in int16 before widening.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/kernels.h"
#include "cpu/row_blocks.h"

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

// R weight rows against A activation rows. The maddubs products are summed in int16 lanes for up
// to kFlushBlocks blocks (each block adds at most 4 * 512 = 2048 to a lane: 15 blocks <= 30720 <
// 32767, no saturation), then widened to int32 once per group instead of once per block.
constexpr int64_t kFlushBlocks = 15;

template <int R, int A>
inline void ternary_tile(const uint8_t* w, int64_t n_blocks, int64_t r, const QuantRows& x, int64_t i0, float s_w,
                         float* y, int64_t y_stride) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* rows[R];
  for (int j = 0; j < R; ++j) rows[j] = w + (r + j) * n_blocks * kI2BlockBytes;
  const int8_t* xq[A];
  for (int a = 0; a < A; ++a) xq[a] = x.q + (i0 + a) * x.stride;
  __m256i acc32[R][A];
  for (int j = 0; j < R; ++j)
    for (int a = 0; a < A; ++a) acc32[j][a] = _mm256_setzero_si256();
  for (int64_t g0 = 0; g0 < n_blocks; g0 += kFlushBlocks) {
    const int64_t g1 = std::min(n_blocks, g0 + kFlushBlocks);
    __m256i acc[R][A];
    for (int j = 0; j < R; ++j)
      for (int a = 0; a < A; ++a) acc[j][a] = _mm256_setzero_si256();
    for (int64_t b = g0; b < g1; ++b) {
      __m256i wv[R];
      for (int j = 0; j < R; ++j)
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + b * kI2BlockBytes));
      for (int k = 0; k < 4; ++k) {  // elements 32k .. 32k+31 of the block
        __m256i q[R];
        for (int j = 0; j < R; ++j) q[j] = _mm256_and_si256(k ? _mm256_srli_epi16(wv[j], 2 * k) : wv[j], mask);
        for (int a = 0; a < A; ++a) {
          const __m256i xv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[a] + b * kI2BlockCodes + 32 * k));
          for (int j = 0; j < R; ++j) acc[j][a] = _mm256_add_epi16(acc[j][a], _mm256_maddubs_epi16(q[j], xv));
        }
      }
    }
    for (int j = 0; j < R; ++j)
      for (int a = 0; a < A; ++a) acc32[j][a] = _mm256_add_epi32(acc32[j][a], _mm256_madd_epi16(acc[j][a], ones));
  }
  for (int j = 0; j < R; ++j)
    for (int a = 0; a < A; ++a) {
      const int32_t dot = hsum_epi32(acc32[j][a]) - x.sum[i0 + a];
      y[(i0 + a) * y_stride + r + j] = static_cast<float>(dot) * (s_w / x.scale[i0 + a]);
    }
}

// Decode (one activation row): two weight rows per pass share the activation loads.
// Prefill/batches: the weight rows go in blocks of 32 with the activation tile (4 rows) outside, so
// the block stays cached while every activation tile sweeps it.
void ternary_rows_avx2(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                       float s_w, float* y, int64_t y_stride) {
  constexpr int64_t kRowBlock = 32;  // 32 * 384 bytes for bitnet-large: stays in L1/L2 across the tiles
  const int64_t row_bytes = n_blocks * kI2BlockBytes;
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    int64_t i = 0;
    for (; i + 4 <= x.m; i += 4)
      for (int64_t r = b0; r < b1; ++r) ternary_tile<1, 4>(w, n_blocks, r, x, i, s_w, y, y_stride);
    const int64_t first = i;
    for (; i < x.m; ++i) {
      int64_t r = b0;
      for (; r + 2 <= b1; r += 2) {
        if (i == first) prefetch_ahead(w + r * row_bytes, 2 * row_bytes);  // decode: memory-bound
        ternary_tile<2, 1>(w, n_blocks, r, x, i, s_w, y, y_stride);
      }
      if (r < b1) ternary_tile<1, 1>(w, n_blocks, r, x, i, s_w, y, y_stride);
    }
  }
}

// t3_b160 (cpu/t3_b160.h): trit k of a block's 32 bytes is q_k = (u_k > 85) + (u_k > 170) with
// u_{k+1} = 3 u_k mod 256. AVX2 has signed byte compares only, so the bytes are kept offset by 128
// (u ^ 0x80 read as int8 = u - 128): the offset commutes with the chain (3 (u + 128) = 3u + 128
// mod 256), and u > 85, u > 170 become s > -43, s > 42. The compares give -1 for true, so
// q = (0 - m1) - m2. Products q * x go through maddubs as for i2_b128; each block adds at most
// 5 * 512 = 2560 to an int16 lane: flushed to int32 every 12 blocks (30720 < 32767).
constexpr int64_t kT3FlushBlocks = 12;

template <int R, int A>
inline void ternary_t3_tile(const uint8_t* w, int64_t n_blocks, int64_t r, const QuantRows& x, int64_t i0,
                            float s_w, float* y, int64_t y_stride) {
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i lo = _mm256_set1_epi8(-43), hi = _mm256_set1_epi8(42);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* rows[R];
  for (int j = 0; j < R; ++j) rows[j] = w + (r + j) * n_blocks * kT3BlockBytes;
  const int8_t* xq[A];
  for (int a = 0; a < A; ++a) xq[a] = x.q + (i0 + a) * x.stride;
  __m256i acc32[R][A];
  for (int j = 0; j < R; ++j)
    for (int a = 0; a < A; ++a) acc32[j][a] = _mm256_setzero_si256();
  for (int64_t g0 = 0; g0 < n_blocks; g0 += kT3FlushBlocks) {
    const int64_t g1 = std::min(n_blocks, g0 + kT3FlushBlocks);
    __m256i acc[R][A];
    for (int j = 0; j < R; ++j)
      for (int a = 0; a < A; ++a) acc[j][a] = _mm256_setzero_si256();
    for (int64_t b = g0; b < g1; ++b) {
      __m256i s[R];  // u_k - 128 as int8
      for (int j = 0; j < R; ++j)
        s[j] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + b * kT3BlockBytes)), offset);
#pragma GCC unroll 5
      for (int k = 0; k < kT3TritsPerByte; ++k) {  // elements 32k .. 32k+31 of the block
        __m256i q[R];
        for (int j = 0; j < R; ++j) {
          const __m256i m1 = _mm256_cmpgt_epi8(s[j], lo), m2 = _mm256_cmpgt_epi8(s[j], hi);
          q[j] = _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), m1), m2);
          if (k + 1 < kT3TritsPerByte) s[j] = _mm256_add_epi8(s[j], _mm256_add_epi8(s[j], s[j]));
        }
        for (int a = 0; a < A; ++a) {
          const __m256i xv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[a] + b * kT3BlockCodes + 32 * k));
          for (int j = 0; j < R; ++j) acc[j][a] = _mm256_add_epi16(acc[j][a], _mm256_maddubs_epi16(q[j], xv));
        }
      }
    }
    for (int j = 0; j < R; ++j)
      for (int a = 0; a < A; ++a) acc32[j][a] = _mm256_add_epi32(acc32[j][a], _mm256_madd_epi16(acc[j][a], ones));
  }
  for (int j = 0; j < R; ++j)
    for (int a = 0; a < A; ++a) {
      const int32_t dot = hsum_epi32(acc32[j][a]) - x.sum[i0 + a];
      y[(i0 + a) * y_stride + r + j] = static_cast<float>(dot) * (s_w / x.scale[i0 + a]);
    }
}

// The loop order of ternary_rows_avx2, on t3_b160 tiles.
void ternary_rows_t3_avx2(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                          float s_w, float* y, int64_t y_stride) {
  constexpr int64_t kRowBlock = 32;
  const int64_t row_bytes = n_blocks * kT3BlockBytes;
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    int64_t i = 0;
    for (; i + 4 <= x.m; i += 4)
      for (int64_t r = b0; r < b1; ++r) ternary_t3_tile<1, 4>(w, n_blocks, r, x, i, s_w, y, y_stride);
    const int64_t first = i;
    for (; i < x.m; ++i) {
      int64_t r = b0;
      for (; r + 2 <= b1; r += 2) {
        if (i == first) prefetch_ahead(w + r * row_bytes, 2 * row_bytes);  // decode: memory-bound
        ternary_t3_tile<2, 1>(w, n_blocks, r, x, i, s_w, y, y_stride);
      }
      if (r < b1) ternary_t3_tile<1, 1>(w, n_blocks, r, x, i, s_w, y, y_stride);
    }
  }
}

// Not a stored dtype: the int8 lm_head codes (int8_rows), loaded through the dense tiles below.
constexpr DType kI8Codes = static_cast<DType>(100);

template <DType DT>
inline __m256 load8(const uint8_t* row, int64_t k) {
  if constexpr (DT == kI8Codes) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
  } else if constexpr (DT == DType::F32) {
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
  if constexpr (DT == kI8Codes) {
    return static_cast<float>(static_cast<int8_t>(row[k]));
  } else if constexpr (DT == DType::F32) {
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
  const int64_t row_bytes = n * (DT == DType::F32 ? 4 : DT == kI8Codes ? 1 : 2);
  sweep_row_blocks(r0, r1, m, 16, [&](auto na, int64_t r, int64_t i) {  // 16 fp16 rows of 1536: 48 KB
    // no software prefetch: these rows stream faster without (the lm_head, bench/README.md "session 12")
    dense_row_tile<DT, decltype(na)::value>(base + r * row_bytes, n, x, i, x_stride, y, y_stride, r);
  });
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

inline __m256 kv_load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 kv_load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
}  // namespace

// fp32 or fp16 (T = uint16_t) keys and values; the arithmetic is fp32 either way. Keys stream once
// per head: see attend_prefetch.
template <class T>
void attend_avx2(const float* q, const T* K, const T* V, int64_t len, int64_t hd, float scale, float* p, float* out) {
  const int64_t hd8 = hd & ~int64_t{7};
  auto dot = [&](const T* k) {  // q . k for one position, the tail past hd8 in scalar
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < hd8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv_load8(k + i), a);
    float s = hsum_ps(a);
    for (int64_t i = hd8; i < hd; ++i) s += q[i] * kv_value(k[i]);
    return s;
  };
  float mx = -INFINITY;
  int64_t j = 0;
  const int64_t group_bytes = 4 * hd * static_cast<int64_t>(sizeof(T));
  for (; j + 4 <= len; j += 4) {  // four positions at a time: independent FMA chains
    const T* k0 = K + j * hd;
    attend_prefetch(k0, V + j * hd, group_bytes, K + len * hd);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < hd8; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qv, kv_load8(k0 + i), a0);
      a1 = _mm256_fmadd_ps(qv, kv_load8(k0 + hd + i), a1);
      a2 = _mm256_fmadd_ps(qv, kv_load8(k0 + 2 * hd + i), a2);
      a3 = _mm256_fmadd_ps(qv, kv_load8(k0 + 3 * hd + i), a3);
    }
    float s[4] = {hsum_ps(a0), hsum_ps(a1), hsum_ps(a2), hsum_ps(a3)};
    for (int t = 0; t < 4; ++t) {
      for (int64_t i = hd8; i < hd; ++i) s[t] += q[i] * kv_value(k0[t * hd + i]);
      p[j + t] = s[t] * scale;
      mx = std::max(mx, p[j + t]);
    }
  }
  for (; j < len; ++j) {
    p[j] = dot(K + j * hd) * scale;
    mx = std::max(mx, p[j]);
  }
  float denom = 0.0f;
  for (j = 0; j < len; ++j) {
    p[j] = std::exp(p[j] - mx);
    denom += p[j];
  }
  const __m256 inv = _mm256_set1_ps(1.0f / denom);
  int64_t i = 0;
  for (; i + 32 <= hd; i += 32) {  // 32 output lanes in registers while the positions stream by
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (j = 0; j < len; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const T* v = V + j * hd + i;
      o0 = _mm256_fmadd_ps(pj, kv_load8(v), o0);
      o1 = _mm256_fmadd_ps(pj, kv_load8(v + 8), o1);
      o2 = _mm256_fmadd_ps(pj, kv_load8(v + 16), o2);
      o3 = _mm256_fmadd_ps(pj, kv_load8(v + 24), o3);
    }
    _mm256_storeu_ps(out + i, _mm256_mul_ps(o0, inv));
    _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(o1, inv));
    _mm256_storeu_ps(out + i + 16, _mm256_mul_ps(o2, inv));
    _mm256_storeu_ps(out + i + 24, _mm256_mul_ps(o3, inv));
  }
  for (; i + 8 <= hd; i += 8) {
    __m256 o0 = _mm256_setzero_ps();
    for (j = 0; j < len; ++j) o0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), kv_load8(V + j * hd + i), o0);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(o0, inv));
  }
  const float inv_s = 1.0f / denom;
  for (; i < hd; ++i) {
    float o = 0.0f;
    for (j = 0; j < len; ++j) o += p[j] * kv_value(V[j * hd + i]);
    out[i] = o * inv_s;
  }
}

template void attend_avx2<float>(const float*, const float*, const float*, int64_t, int64_t, float, float*, float*);
template void attend_avx2<uint16_t>(const float*, const uint16_t*, const uint16_t*, int64_t, int64_t, float, float*,
                                    float*);

// F16C's vcvtps2ph rounds to nearest even, keeps subnormals, overflows to inf and quiets NaN as
// fp32_to_fp16 does (the C++ tests compare them on every case).
void to_fp16_avx2(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) out[i] = fp32_to_fp16(x[i]);
}

void int8_rows_avx2(const int8_t* w, const float* w_scale, int64_t n, int64_t r0, int64_t r1, const float* x,
                    int64_t m, int64_t x_stride, float* y, int64_t y_stride) {
  dense_rows_t<kI8Codes>(w, n, r0, r1, x, m, x_stride, y, y_stride);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = r0; r < r1; ++r) y[i * y_stride + r] *= w_scale[r];
}

const KernelTable kAvx2Kernels = {"avx2", quantize_rows_avx2, ternary_rows_avx2, ternary_rows_t3_avx2, dense_rows_avx2,
                                  attend_avx2<float>, attend_avx2<uint16_t>, int8_rows_avx2, to_fp16_avx2};

}  // namespace bitnet

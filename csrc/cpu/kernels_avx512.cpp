// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma -mf16c; only
// called when CPUID reports all of them).
//
// Ternary: one i2_b128 block (32 bytes) is broadcast to both 256-bit halves of a zmm and shifted by
// (0, 2) bits per half for elements 0..63 and by (4, 6) for 64..127, so each masked half lines up
// with 32 contiguous activations. _mm512_dpbusd_epi32(acc, q_u8, x_i8) then sums q*x in int32;
// sum(c*x) = sum(q*x) - sum(x) with q = c + 1.
//
// BITNET_AVX512_EMULATE (C++ test build only): the same code on SIMDe's portable AVX-512, so the
// logic is tested against the scalar reference on CPUs without AVX-512.
#ifdef BITNET_AVX512_EMULATE
#include "tests/avx512_emulation.h"
#define BITNET_AVX512_TABLE kAvx512EmulatedKernels
#define BITNET_AVX512_NAME "avx512-emulated"
#else
#include <immintrin.h>
#define BITNET_AVX512_TABLE kAvx512Kernels
#define BITNET_AVX512_NAME "avx512"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/kernels.h"
#include "cpu/row_blocks.h"

namespace bitnet {
namespace {

inline __mmask16 tail_mask16(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }

void quantize_rows_avx512(const float* x, int64_t m, int64_t n, int64_t x_stride, float eps, int8_t* q,
                          int64_t q_stride, float* s_x, int32_t* sum) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * x_stride;
    int8_t* qr = q + i * q_stride;
    __m512 vmax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
      vmax = _mm512_max_ps(vmax, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(xr + k)), abs_mask)));
    if (k < n) {
      const __m512 t = _mm512_maskz_loadu_ps(tail_mask16(n - k), xr + k);
      vmax = _mm512_max_ps(vmax, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(t), abs_mask)));
    }
    float amax = _mm512_reduce_max_ps(vmax);
    if (std::isnan(amax)) amax = 0.0f;  // keep the scalar fmax semantics (NaN ignored)
    const float s = 127.0f / std::fmax(amax, eps);
    const __m512 vs = _mm512_set1_ps(s);
    __m512i vsum = _mm512_setzero_si512();
    const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
    for (k = 0; k < n; k += 16) {
      const __mmask16 mk = n - k >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask16(n - k);
      // cvtps_epi32: MXCSR rounding (to nearest, ties to even) as nearbyint; NaN -> INT32_MIN -> -128.
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + k), vs));
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      vsum = _mm512_add_epi32(vsum, v);
      _mm_mask_storeu_epi8(qr + k, mk, _mm512_cvtepi32_epi8(v));
    }
    for (k = n; k < q_stride; ++k) qr[k] = 0;
    s_x[i] = s;
    sum[i] = _mm512_reduce_add_epi32(vsum);
  }
}

template <int NA>
inline void ternary_row_tile(const uint8_t* row, int64_t n_blocks, const QuantRows& x, int64_t i0, float s_w,
                             float* y, int64_t y_stride, int64_t r) {
  const __m512i mask = _mm512_set1_epi8(3);
  // per-16-bit-lane shift counts: low half 0 / high half 2 (elements 0..63); 4 / 6 (64..127)
  const __m512i shift01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  const __m512i shift23 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
  // Two blocks per step into four accumulators per activation row: vpdpbusd's latency (4-5
  // cycles) on two chains, not the loads, bounded the one-block loop (m = 1 decode).
  __m512i acc0[NA], acc1[NA], acc2[NA], acc3[NA];
  const int8_t* xq[NA];
  for (int a = 0; a < NA; ++a) {
    acc0[a] = acc1[a] = acc2[a] = acc3[a] = _mm512_setzero_si512();
    xq[a] = x.q + (i0 + a) * x.stride;
  }
  auto decode = [&](int64_t b, __m512i& q01, __m512i& q23) {
    const __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kI2BlockBytes)));
    q01 = _mm512_and_si512(_mm512_srlv_epi16(w, shift01), mask);
    q23 = _mm512_and_si512(_mm512_srlv_epi16(w, shift23), mask);
  };
  int64_t b = 0;
  for (; b + 2 <= n_blocks; b += 2) {
    __m512i qa01, qa23, qb01, qb23;
    decode(b, qa01, qa23);
    decode(b + 1, qb01, qb23);
    for (int a = 0; a < NA; ++a) {
      const int8_t* xb = xq[a] + b * kI2BlockCodes;
      acc0[a] = _mm512_dpbusd_epi32(acc0[a], qa01, _mm512_loadu_si512(xb));
      acc1[a] = _mm512_dpbusd_epi32(acc1[a], qa23, _mm512_loadu_si512(xb + 64));
      acc2[a] = _mm512_dpbusd_epi32(acc2[a], qb01, _mm512_loadu_si512(xb + 128));
      acc3[a] = _mm512_dpbusd_epi32(acc3[a], qb23, _mm512_loadu_si512(xb + 192));
    }
  }
  if (b < n_blocks) {
    __m512i q01, q23;
    decode(b, q01, q23);
    for (int a = 0; a < NA; ++a) {
      const int8_t* xb = xq[a] + b * kI2BlockCodes;
      acc0[a] = _mm512_dpbusd_epi32(acc0[a], q01, _mm512_loadu_si512(xb));
      acc1[a] = _mm512_dpbusd_epi32(acc1[a], q23, _mm512_loadu_si512(xb + 64));
    }
  }
  for (int a = 0; a < NA; ++a) {
    const __m512i sum4 = _mm512_add_epi32(_mm512_add_epi32(acc0[a], acc1[a]), _mm512_add_epi32(acc2[a], acc3[a]));
    const int32_t dot = _mm512_reduce_add_epi32(sum4) - x.sum[i0 + a];
    y[(i0 + a) * y_stride + r] = static_cast<float>(dot) * (s_w / x.scale[i0 + a]);
  }
}

// RW weight rows against NA activation rows: each decoded block (2 x 64 codes per weight row) is
// used by NA activation rows and each activation load by RW weight rows. One int32 accumulator per
// (weight row, activation row): a 4 x 4 tile uses 16 accumulators + 8 decoded blocks + 2 activation
// vectors + 3 constants of the 32 zmm registers.
template <int RW, int NA>
inline void ternary_tile(const uint8_t* w, int64_t n_blocks, int64_t r, const QuantRows& x, int64_t i0, float s_w,
                         float* y, int64_t y_stride) {
  const __m512i mask = _mm512_set1_epi8(3);
  const __m512i shift01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  const __m512i shift23 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
  const uint8_t* rows[RW];
  for (int j = 0; j < RW; ++j) rows[j] = w + (r + j) * n_blocks * kI2BlockBytes;
  const int8_t* xq[NA];
  for (int a = 0; a < NA; ++a) xq[a] = x.q + (i0 + a) * x.stride;
  __m512i acc[RW][NA];
  for (int j = 0; j < RW; ++j)
    for (int a = 0; a < NA; ++a) acc[j][a] = _mm512_setzero_si512();
  for (int64_t b = 0; b < n_blocks; ++b) {
    __m512i q01[RW], q23[RW];
    for (int j = 0; j < RW; ++j) {
      const __m512i wv =
          _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + b * kI2BlockBytes)));
      q01[j] = _mm512_and_si512(_mm512_srlv_epi16(wv, shift01), mask);
      q23[j] = _mm512_and_si512(_mm512_srlv_epi16(wv, shift23), mask);
    }
    for (int a = 0; a < NA; ++a) {
      const int8_t* xb = xq[a] + b * kI2BlockCodes;
      const __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 64);
      for (int j = 0; j < RW; ++j) {
        acc[j][a] = _mm512_dpbusd_epi32(acc[j][a], q01[j], x0);
        acc[j][a] = _mm512_dpbusd_epi32(acc[j][a], q23[j], x1);
      }
    }
  }
  for (int j = 0; j < RW; ++j)
    for (int a = 0; a < NA; ++a) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[j][a]) - x.sum[i0 + a];
      y[(i0 + a) * y_stride + r + j] = static_cast<float>(dot) * (s_w / x.scale[i0 + a]);
    }
}

// Weight rows in blocks of 32, cached while every activation tile sweeps them. Batches (4 or more
// activation rows) go in 4 x 4 tiles, compute-bound: measured 1.3x the one-row tiles on in-cache
// matrices. The m % 4 leftover rows (decode: m = 1, memory-bound) keep one weight row a tile,
// which streams from DRAM faster than four (measured 61 vs 45 GB/s on 64 MB of weights).
void ternary_rows_avx512(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                         float s_w, float* y, int64_t y_stride) {
  constexpr int64_t kRowBlock = 32;
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    int64_t i = 0;
    for (; i + 4 <= x.m; i += 4) {
      int64_t r = b0;
      for (; r + 4 <= b1; r += 4) {
        if (i == 0 && r + kRowBlock + 4 <= r1) {  // the next row block's matching rows, on the way to L1
          const uint8_t* next = w + (r + kRowBlock) * n_blocks * kI2BlockBytes;
          for (int64_t off = 0; off < 4 * n_blocks * kI2BlockBytes; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(next + off), _MM_HINT_T0);
        }
        ternary_tile<4, 4>(w, n_blocks, r, x, i, s_w, y, y_stride);
      }
      for (; r < b1; ++r) ternary_row_tile<4>(w + r * n_blocks * kI2BlockBytes, n_blocks, x, i, s_w, y, y_stride, r);
    }
    for (int64_t r = b0; r < b1 && i < x.m; ++r) {
      switch (x.m - i) {
        case 3: ternary_row_tile<3>(w + r * n_blocks * kI2BlockBytes, n_blocks, x, i, s_w, y, y_stride, r); break;
        case 2: ternary_row_tile<2>(w + r * n_blocks * kI2BlockBytes, n_blocks, x, i, s_w, y, y_stride, r); break;
        default: ternary_row_tile<1>(w + r * n_blocks * kI2BlockBytes, n_blocks, x, i, s_w, y, y_stride, r); break;
      }
    }
  }
}

template <DType DT>
inline __m512 load16(const uint8_t* row, int64_t k, __mmask16 mk) {
  if constexpr (DT == DType::F32) {
    return _mm512_maskz_loadu_ps(mk, reinterpret_cast<const float*>(row) + k);
  } else if constexpr (DT == DType::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, row + 2 * k));
  } else {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, row + 2 * k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
}

template <DType DT, int NA>
inline void dense_row_tile(const uint8_t* row, int64_t n, const float* x, int64_t i0, int64_t x_stride, float* y,
                           int64_t y_stride, int64_t r) {
  __m512 acc0[NA], acc1[NA];
  const float* xr[NA];
  for (int a = 0; a < NA; ++a) {
    acc0[a] = _mm512_setzero_ps();
    acc1[a] = _mm512_setzero_ps();
    xr[a] = x + (i0 + a) * x_stride;
  }
  const __mmask16 all = static_cast<__mmask16>(0xffff);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m512 w0 = load16<DT>(row, k, all);
    const __m512 w1 = load16<DT>(row, k + 16, all);
    for (int a = 0; a < NA; ++a) {
      acc0[a] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr[a] + k), acc0[a]);
      acc1[a] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr[a] + k + 16), acc1[a]);
    }
  }
  for (; k < n; k += 16) {
    const __mmask16 mk = n - k >= 16 ? all : tail_mask16(n - k);
    const __m512 w0 = load16<DT>(row, k, mk);
    for (int a = 0; a < NA; ++a) acc0[a] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mk, xr[a] + k), acc0[a]);
  }
  for (int a = 0; a < NA; ++a) y[(i0 + a) * y_stride + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[a], acc1[a]));
}

template <DType DT>
void dense_rows_t(const void* w, int64_t n, int64_t r0, int64_t r1, const float* x, int64_t m, int64_t x_stride,
                  float* y, int64_t y_stride) {
  const auto* base = static_cast<const uint8_t*>(w);
  const int64_t row_bytes = n * (DT == DType::F32 ? 4 : 2);
  sweep_row_blocks(r0, r1, m, 16, [&](auto na, int64_t r, int64_t i) {
    dense_row_tile<DT, decltype(na)::value>(base + r * row_bytes, n, x, i, x_stride, y, y_stride, r);
  });
}

void dense_rows_avx512(const void* w, DType dt, int64_t n, int64_t r0, int64_t r1, const float* x, int64_t m,
                       int64_t x_stride, float* y, int64_t y_stride) {
  switch (dt) {
    case DType::F32: dense_rows_t<DType::F32>(w, n, r0, r1, x, m, x_stride, y, y_stride); break;
    case DType::F16: dense_rows_t<DType::F16>(w, n, r0, r1, x, m, x_stride, y, y_stride); break;
    case DType::BF16: dense_rows_t<DType::BF16>(w, n, r0, r1, x, m, x_stride, y, y_stride); break;
    default: break;
  }
}

}  // namespace

#ifdef BITNET_HAVE_AVX2
const KernelTable BITNET_AVX512_TABLE = {BITNET_AVX512_NAME, quantize_rows_avx512, ternary_rows_avx512, dense_rows_avx512,
                                         attend_avx2<float>, attend_avx2<uint16_t>, int8_rows_avx2};
#else
const KernelTable BITNET_AVX512_TABLE = {BITNET_AVX512_NAME, quantize_rows_avx512, ternary_rows_avx512, dense_rows_avx512,
                                         attend_scalar<float>, attend_scalar<uint16_t>, int8_rows_scalar};
#endif

}  // namespace bitnet

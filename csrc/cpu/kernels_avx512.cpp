// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma -mf16c; only
// called when CPUID reports all of them).
//
// Ternary: one i2_b128 block (32 bytes) is broadcast to both 256-bit halves of a zmm and shifted by
// (0, 2) bits per half for elements 0..63 and by (4, 6) for 64..127, so each masked half lines up
// with 32 contiguous activations. _mm512_dpbusd_epi32(acc, q_u8, x_i8) then sums q*x in int32;
// sum(c*x) = sum(q*x) - sum(x) with q = c + 1.
//
// t3_b160 (cpu/t3_b160.h): two adjacent blocks are one 64-byte load; multiplying its bytes by 3
// (u + u + u, wrapping) steps both halves to the next digit, so one zmm holds digit k of 32
// elements of block b and 32 of block b + 1, lined up with the activations of those elements
// (two 32-byte pieces 160 bytes apart, inserted). Decode rows (one weight row against 1..4
// activation rows) use 3 u_k = 256 q_k + u_{k+1}: with A = sum u_k x, B = sum u_{k+1} x (both
// vpdpbusd on the raw bytes), sum q x = (3A - B) / 256 per lane, exactly, and no digit is ever
// extracted: 2 byte adds + 2 vpdpbusd per 64 codes. Tiles (4 activation rows) extract the digits
// once per weight row, q = (u > 85) + (u > 170) by two byte compares into masks, and share them
// over the activation rows with one vpdpbusd each.
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
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/panel_avx512.h"
#include "cpu/row_blocks.h"

namespace bitnet {
namespace {

inline __mmask16 tail_mask16(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }

// Batches of this many activation rows or more run the panel kernels (ternary_rows_panel, below).
// (measured: 1.5-1.9x the 4 x 4 tiles at m = 32..512, even at 16, slower at 8; bench/README.md)
constexpr int64_t kPanelMinRows = 16;

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
template <bool T3>
void ternary_rows_panel(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x, float s_w,
                        float* y, int64_t y_stride);

void ternary_rows_avx512(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                         float s_w, float* y, int64_t y_stride) {
  if (x.m >= kPanelMinRows) return ternary_rows_panel<false>(w, n_blocks, r0, r1, x, s_w, y, y_stride);
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
      prefetch_ahead(w + r * n_blocks * kI2BlockBytes, n_blocks * kI2BlockBytes);  // decode: memory-bound
      switch (x.m - i) {
        case 3: ternary_row_tile<3>(w + r * n_blocks * kI2BlockBytes, n_blocks, x, i, s_w, y, y_stride, r); break;
        case 2: ternary_row_tile<2>(w + r * n_blocks * kI2BlockBytes, n_blocks, x, i, s_w, y, y_stride, r); break;
        default: ternary_row_tile<1>(w + r * n_blocks * kI2BlockBytes, n_blocks, x, i, s_w, y, y_stride, r); break;
      }
    }
  }
}

// ---- t3_b160 ----

inline __m512i times3(__m512i u) { return _mm512_add_epi8(u, _mm512_add_epi8(u, u)); }

// acc += vpdpbusd(u, x), in place. With many accumulators live, GCC 12 copies each one to a fresh
// register and back around the intrinsic (measured: a quarter of the decode kernel's speed); the
// asm form keeps it in place. The emulated build (SIMDe) uses the intrinsic.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i x) {
#ifdef BITNET_AVX512_EMULATE
  return _mm512_dpbusd_epi32(acc, u, x);
#else
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(x));
  return acc;
#endif
}

// Weight bytes of blocks b and b + 1 of a row (PAIR), or of the last block b alone with zeros
// above (a zero byte has digits 0 and times3 keeps it 0, so the upper half adds nothing).
template <bool PAIR>
inline __m512i t3_weights(const uint8_t* row, int64_t b) {
  if constexpr (PAIR) return _mm512_loadu_si512(row + b * kT3BlockBytes);
  return _mm512_inserti64x4(_mm512_setzero_si512(),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kT3BlockBytes)), 0);
}
// Activations of digit k of blocks b and b + 1 (PAIR), or of block b alone with zeros above (the
// activation row ends at block b: nothing past it is read).
template <bool PAIR>
inline __m512i t3_acts(const int8_t* xq, int64_t b, int k) {
  const int8_t* p = xq + b * kT3BlockCodes + 32 * k;
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (PAIR)
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kT3BlockCodes)), 1);
  return _mm512_inserti64x4(_mm512_setzero_si512(), lo, 0);
}

// (3A - B) / 256 per lane (exact: see the top of this file), added into total.
inline __m512i t3_fold(__m512i total, __m512i a, __m512i b) {
  return _mm512_add_epi32(total, _mm512_srai_epi32(_mm512_sub_epi32(_mm512_add_epi32(a, _mm512_add_epi32(a, a)), b), 8));
}

// Pair steps between folds of A and B into the total, so that no int32 sum wraps: per lane and
// step, A (both chains) and B grow by at most 5 * 4 * 255 * 128 = 652800; over 256 steps 1.7e8,
// and 3A - B stays below 6.7e8.
constexpr int64_t kT3FoldPairs = 256;

// One weight row against NA activation rows: the A/B decode. CH accumulator chains per row and
// kind (digit k feeds chain k % CH): with fewer, vpdpbusd's latency bounds the loop (measured at
// m = 1: 5 chains 1.15x 2 chains; at m = 3, 2 chains are enough).
template <int NA, int CH = (NA <= 2 ? 5 : 2)>
inline void ternary_t3_row_tile(const uint8_t* row, int64_t n_blocks, const QuantRows& x, int64_t i0, float s_w,
                                float* y, int64_t y_stride, int64_t r) {
  const int8_t* xq[NA];
  __m512i total[NA];
  for (int a = 0; a < NA; ++a) {
    xq[a] = x.q + (i0 + a) * x.stride;
    total[a] = _mm512_setzero_si512();
  }
  for (int64_t b = 0; b < n_blocks;) {
    __m512i A[NA][CH], B[NA][CH];
    for (int a = 0; a < NA; ++a)
      for (int c = 0; c < CH; ++c) A[a][c] = B[a][c] = _mm512_setzero_si512();
    const int64_t end = std::min(n_blocks, b + 2 * kT3FoldPairs);
    for (; b + 2 <= end; b += 2) {
      __m512i u = t3_weights<true>(row, b);
#pragma GCC unroll 5  // A, B must stay in registers
      for (int k = 0; k < kT3TritsPerByte; ++k) {
        const __m512i n = times3(u);
        for (int a = 0; a < NA; ++a) {
          const __m512i xv = t3_acts<true>(xq[a], b, k);
          A[a][k % CH] = dpbusd(A[a][k % CH], u, xv);
          B[a][k % CH] = dpbusd(B[a][k % CH], n, xv);
        }
        u = n;
      }
    }
    if (b < end) {  // the row's last block, alone
      __m512i u = t3_weights<false>(row, b);
#pragma GCC unroll 5
      for (int k = 0; k < kT3TritsPerByte; ++k) {
        const __m512i n = times3(u);
        for (int a = 0; a < NA; ++a) {
          const __m512i xv = t3_acts<false>(xq[a], b, k);
          A[a][0] = dpbusd(A[a][0], u, xv);
          B[a][0] = dpbusd(B[a][0], n, xv);
        }
        u = n;
      }
      ++b;
    }
    for (int a = 0; a < NA; ++a) {
      __m512i sa = A[a][0], sb = B[a][0];
      for (int c = 1; c < CH; ++c) {
        sa = _mm512_add_epi32(sa, A[a][c]);
        sb = _mm512_add_epi32(sb, B[a][c]);
      }
      total[a] = t3_fold(total[a], sa, sb);
    }
  }
  for (int a = 0; a < NA; ++a) {
    const int32_t dot = _mm512_reduce_add_epi32(total[a]) - x.sum[i0 + a];
    y[(i0 + a) * y_stride + r] = static_cast<float>(dot) * (s_w / x.scale[i0 + a]);
  }
}

// RW weight rows against NA activation rows: digits extracted once per weight row and step, each
// activation vector loaded once per step for all RW rows; RW * NA int32 accumulators (4 x 4: 16
// accumulators + 4 weight vectors + 4 digit vectors + 4 constants + 1 activation vector of 32 zmm).
template <int RW, int NA>
inline void ternary_t3_tile(const uint8_t* w, int64_t n_blocks, int64_t r, const QuantRows& x, int64_t i0,
                            float s_w, float* y, int64_t y_stride) {
  const __m512i c85 = _mm512_set1_epi8(85), c170 = _mm512_set1_epi8(static_cast<char>(170));
  const __m512i one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2);
  const uint8_t* rows[RW];
  for (int j = 0; j < RW; ++j) rows[j] = w + (r + j) * n_blocks * kT3BlockBytes;
  const int8_t* xq[NA];
  for (int a = 0; a < NA; ++a) xq[a] = x.q + (i0 + a) * x.stride;
  __m512i acc[RW][NA];
  for (int j = 0; j < RW; ++j)
    for (int a = 0; a < NA; ++a) acc[j][a] = _mm512_setzero_si512();
  auto step = [&](auto pair, int64_t b) {
    constexpr bool kPair = decltype(pair)::value;
    __m512i u[RW];
    for (int j = 0; j < RW; ++j) u[j] = t3_weights<kPair>(rows[j], b);
#pragma GCC unroll 5
    for (int k = 0; k < kT3TritsPerByte; ++k) {
      __m512i q[RW];
      for (int j = 0; j < RW; ++j) {
        q[j] = _mm512_maskz_mov_epi8(_mm512_cmpgt_epu8_mask(u[j], c85), one);
        q[j] = _mm512_mask_mov_epi8(q[j], _mm512_cmpgt_epu8_mask(u[j], c170), two);
        if (k + 1 < kT3TritsPerByte) u[j] = times3(u[j]);
      }
      for (int a = 0; a < NA; ++a) {
        const __m512i xv = t3_acts<kPair>(xq[a], b, k);
        for (int j = 0; j < RW; ++j) acc[j][a] = dpbusd(acc[j][a], q[j], xv);
      }
    }
  };
  int64_t b = 0;
  for (; b + 2 <= n_blocks; b += 2) step(std::true_type{}, b);
  if (b < n_blocks) step(std::false_type{}, b);
  for (int j = 0; j < RW; ++j)
    for (int a = 0; a < NA; ++a) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[j][a]) - x.sum[i0 + a];
      y[(i0 + a) * y_stride + r + j] = static_cast<float>(dot) * (s_w / x.scale[i0 + a]);
    }
}

// The loop order of ternary_rows_avx512: weight rows in blocks of 32; 4 activation rows at a time
// in 4 x 4 tiles (measured against 1, 2 and 3 weight rows a tile: 1.1-1.3x at m = 8 and 128); the
// m % 4 leftover activation rows (decode) in row tiles.
void ternary_rows_t3_avx512(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                            float s_w, float* y, int64_t y_stride) {
  if (x.m >= kPanelMinRows) return ternary_rows_panel<true>(w, n_blocks, r0, r1, x, s_w, y, y_stride);
  constexpr int64_t kRowBlock = 32, kTileRows = 4;
  const int64_t row_bytes = n_blocks * kT3BlockBytes;
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    int64_t i = 0;
    for (; i + 4 <= x.m; i += 4) {
      int64_t r = b0;
      for (; r + kTileRows <= b1; r += kTileRows) {
        if (i == 0 && r + kRowBlock + kTileRows <= r1) {  // the next row block's matching rows, on the way to L1
          const uint8_t* next = w + (r + kRowBlock) * row_bytes;
          for (int64_t off = 0; off < kTileRows * row_bytes; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(next + off), _MM_HINT_T0);
        }
        ternary_t3_tile<kTileRows, 4>(w, n_blocks, r, x, i, s_w, y, y_stride);
      }
      for (; r < b1; ++r) ternary_t3_row_tile<4>(w + r * row_bytes, n_blocks, x, i, s_w, y, y_stride, r);
    }
    for (int64_t r = b0; r < b1 && i < x.m; ++r) {
      prefetch_ahead(w + r * row_bytes, row_bytes);  // decode: memory-bound
      switch (x.m - i) {
        case 3: ternary_t3_row_tile<3>(w + r * row_bytes, n_blocks, x, i, s_w, y, y_stride, r); break;
        case 2: ternary_t3_row_tile<2>(w + r * row_bytes, n_blocks, x, i, s_w, y, y_stride, r); break;
        default: ternary_t3_row_tile<1>(w + r * row_bytes, n_blocks, x, i, s_w, y, y_stride, r); break;
      }
    }
  }
}

// ---- batches: decoded weight panels in vpdpbusd's lane order ----
//
// For batches of kPanelMinRows or more activation rows (prefill, eval windows, serving batches) the
// codes q of each 32 weight rows are decoded once (panel_avx512.h) and transposed into lane order:
// for each group g of 4 consecutive codes, 128 bytes = rows 0..31's codes 4g..4g+3, so one zmm holds
// 16 rows' group g. One vpdpbusd of that zmm against an activation row's dword g broadcast adds 4
// products to each of 16 rows' sums: no decode in the inner loop (the 4 x 4 tiles above spend a
// third of their ops on it) and no horizontal sums (the lanes are the outputs). A tile is the 32
// rows against up to kPanelTileRows activation rows: 24 accumulators, 2 weight vectors, the
// broadcast.
constexpr int64_t kPanelRows = 32;
constexpr int kPanelTileRows = 12;

struct PanelScratch {
  std::vector<uint8_t> rows;   // the rows' codes, row-major
  std::vector<uint8_t> lanes;  // the lane-order panel
};

PanelScratch& panel_scratch() {
  static thread_local PanelScratch s;
  return s;
}

// lanes <- weight rows [p0, p0 + rows) in lane order, chunks x 64 codes each (rows past `rows` zero).
template <bool T3>
void build_lane_panel(const uint8_t* w, int64_t n_blocks, int64_t p0, int64_t rows, int64_t chunks, uint8_t* tmp,
                      int64_t tmp_stride, uint8_t* lanes) {
  const int64_t row_bytes = n_blocks * (T3 ? kT3BlockBytes : kI2BlockBytes);
  for (int64_t r = 0; r < kPanelRows; ++r) {
    uint8_t* out = tmp + r * tmp_stride;
    if (r >= rows) std::memset(out, 0, static_cast<size_t>(chunks * 64));
    else if (T3) decode_t3_row(w + (p0 + r) * row_bytes, n_blocks, chunks * 64, out);
    else decode_i2_row(w + (p0 + r) * row_bytes, n_blocks, chunks * 64, out);
  }
  for (int64_t kk = 0; kk < chunks; ++kk)
    for (int64_t half = 0; half < 2; ++half) {
      __m512i in[16], t[16];
      for (int i = 0; i < 16; ++i) in[i] = _mm512_load_si512(tmp + (16 * half + i) * tmp_stride + kk * 64);
      transpose16x16(in, t);
      for (int k = 0; k < 16; ++k) _mm512_store_si512(lanes + ((kk * 16 + k) * 2 + half) * 64, t[k]);
    }
}

template <int NA>
inline void lane_panel_tile(const uint8_t* lanes, int64_t groups, const QuantRows& x, int64_t i0, int64_t p0,
                            int64_t rows, float s_w, float* y, int64_t y_stride) {
  __m512i acc0[NA], acc1[NA];
  const int8_t* xq[NA];
  for (int a = 0; a < NA; ++a) {
    acc0[a] = acc1[a] = _mm512_setzero_si512();
    xq[a] = x.q + (i0 + a) * x.stride;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i w0 = _mm512_load_si512(lanes + g * 128), w1 = _mm512_load_si512(lanes + g * 128 + 64);
    for (int a = 0; a < NA; ++a) {
      int32_t v;
      std::memcpy(&v, xq[a] + 4 * g, 4);
      const __m512i xb = _mm512_set1_epi32(v);
      acc0[a] = dpbusd(acc0[a], w0, xb);
      acc1[a] = dpbusd(acc1[a], w1, xb);
    }
  }
  const __mmask16 m0 = tail_mask16(std::min<int64_t>(rows, 16));
  const __mmask16 m1 = rows > 16 ? tail_mask16(std::min<int64_t>(rows - 16, 16)) : static_cast<__mmask16>(0);
  for (int a = 0; a < NA; ++a) {
    const __m512 f = _mm512_set1_ps(s_w / x.scale[i0 + a]);
    const __m512i sx = _mm512_set1_epi32(x.sum[i0 + a]);
    float* yr = y + (i0 + a) * y_stride + p0;
    _mm512_mask_storeu_ps(yr, m0, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc0[a], sx)), f));
    if (m1) _mm512_mask_storeu_ps(yr + 16, m1, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc1[a], sx)), f));
  }
}

// lane_panel_tile<na> for 1 <= na <= NA.
template <int NA = kPanelTileRows>
inline void lane_panel_tiles(int64_t na, const uint8_t* lanes, int64_t groups, const QuantRows& x, int64_t i0,
                             int64_t p0, int64_t rows, float s_w, float* y, int64_t y_stride) {
  if constexpr (NA > 1)
    if (na < NA) return lane_panel_tiles<NA - 1>(na, lanes, groups, x, i0, p0, rows, s_w, y, y_stride);
  lane_panel_tile<NA>(lanes, groups, x, i0, p0, rows, s_w, y, y_stride);
}

template <bool T3>
void ternary_rows_panel(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x, float s_w,
                        float* y, int64_t y_stride) {
  const int64_t k_codes = n_blocks * (T3 ? kT3BlockCodes : kI2BlockCodes);
  const int64_t chunks = (k_codes + 63) / 64, groups = k_codes / 4;
  // one cache line more than the codes: 16 rows a power of two apart would share L1 sets
  const int64_t tmp_stride = chunks * 64 + 64;
  PanelScratch& s = panel_scratch();
  uint8_t* tmp = aligned64(s.rows, static_cast<size_t>(kPanelRows * tmp_stride));
  uint8_t* lanes = aligned64(s.lanes, static_cast<size_t>(kPanelRows * chunks * 64));
  // the activation rows in equal tiles of at most kPanelTileRows (16 = 8 + 8, not 12 + 4)
  const int64_t n_tiles = (x.m + kPanelTileRows - 1) / kPanelTileRows, tile = (x.m + n_tiles - 1) / n_tiles;
  for (int64_t p0 = r0; p0 < r1; p0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, r1 - p0);
    build_lane_panel<T3>(w, n_blocks, p0, rows, chunks, tmp, tmp_stride, lanes);
    for (int64_t i0 = 0; i0 < x.m; i0 += tile)
      lane_panel_tiles(std::min(tile, x.m - i0), lanes, groups, x, i0, p0, rows, s_w, y, y_stride);
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
    // no software prefetch: these rows stream faster without (the lm_head, bench/README.md "session 12")
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

// Attention for one query row over `len` cached positions (fp32 or fp16 keys and values; fp32
// arithmetic), as attend_scalar computes it. Scores four positions at a time (independent FMA
// chains, one reduce each); the weighted sum of V in one pass over the positions, with up to 128
// output lanes (8 zmm accumulators) held in registers, the tail lanes masked.
inline __m512 kv_load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 kv_load16(const uint16_t* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

template <int NC, class T>
void attend_v_chunk(const float* p, const T* V, int64_t len, int64_t hd, int64_t i0, float inv, float* out) {
  __m512 o[NC];
  __mmask16 mk[NC];
  for (int c = 0; c < NC; ++c) {
    o[c] = _mm512_setzero_ps();
    const int64_t left = hd - i0 - 16 * c;
    mk[c] = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
  }
  for (int64_t j = 0; j < len; ++j) {
    const __m512 pj = _mm512_set1_ps(p[j]);
    const T* v = V + j * hd + i0;
    for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(pj, kv_load16(v + 16 * c, mk[c]), o[c]);
  }
  const __m512 iv = _mm512_set1_ps(inv);
  for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(out + i0 + 16 * c, mk[c], _mm512_mul_ps(o[c], iv));
}

template <class T>
void attend_avx512(const float* q, const T* K, const T* V, int64_t len, int64_t hd, float scale, float* p,
                   float* out) {
  const int64_t nc = (hd + 15) / 16;
  const __mmask16 tail = (hd & 15) ? static_cast<__mmask16>((1u << (hd & 15)) - 1u) : static_cast<__mmask16>(0xffff);
  auto mask_of = [&](int64_t c) { return c == nc - 1 ? tail : static_cast<__mmask16>(0xffff); };
  float mx = -INFINITY;
  int64_t j = 0;
  const int64_t group_bytes = 4 * hd * static_cast<int64_t>(sizeof(T));
  for (; j + 4 <= len; j += 4) {
    const T* k0 = K + j * hd;
    attend_prefetch(k0, V + j * hd, group_bytes, K + len * hd);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < nc; ++c) {
      const __mmask16 mk = mask_of(c);
      const __m512 qv = _mm512_maskz_loadu_ps(mk, q + 16 * c);
      a0 = _mm512_fmadd_ps(qv, kv_load16(k0 + 16 * c, mk), a0);
      a1 = _mm512_fmadd_ps(qv, kv_load16(k0 + hd + 16 * c, mk), a1);
      a2 = _mm512_fmadd_ps(qv, kv_load16(k0 + 2 * hd + 16 * c, mk), a2);
      a3 = _mm512_fmadd_ps(qv, kv_load16(k0 + 3 * hd + 16 * c, mk), a3);
    }
    p[j] = _mm512_reduce_add_ps(a0) * scale;
    p[j + 1] = _mm512_reduce_add_ps(a1) * scale;
    p[j + 2] = _mm512_reduce_add_ps(a2) * scale;
    p[j + 3] = _mm512_reduce_add_ps(a3) * scale;
    mx = std::max(mx, std::max(std::max(p[j], p[j + 1]), std::max(p[j + 2], p[j + 3])));
  }
  for (; j < len; ++j) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      const __mmask16 mk = mask_of(c);
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + 16 * c), kv_load16(K + j * hd + 16 * c, mk), a);
    }
    p[j] = _mm512_reduce_add_ps(a) * scale;
    mx = std::max(mx, p[j]);
  }
  float denom = 0.0f;
  for (j = 0; j < len; ++j) {
    p[j] = std::exp(p[j] - mx);
    denom += p[j];
  }
  const float inv = 1.0f / denom;
  for (int64_t i0 = 0; i0 < hd; i0 += 128) {  // 128 output lanes per pass over V
    switch (std::min<int64_t>(8, (hd - i0 + 15) / 16)) {
      case 1: attend_v_chunk<1>(p, V, len, hd, i0, inv, out); break;
      case 2: attend_v_chunk<2>(p, V, len, hd, i0, inv, out); break;
      case 3: attend_v_chunk<3>(p, V, len, hd, i0, inv, out); break;
      case 4: attend_v_chunk<4>(p, V, len, hd, i0, inv, out); break;
      case 5: attend_v_chunk<5>(p, V, len, hd, i0, inv, out); break;
      case 6: attend_v_chunk<6>(p, V, len, hd, i0, inv, out); break;
      case 7: attend_v_chunk<7>(p, V, len, hd, i0, inv, out); break;
      default: attend_v_chunk<8>(p, V, len, hd, i0, inv, out); break;
    }
  }
}

}  // namespace

#ifdef BITNET_HAVE_AVX2
const KernelTable BITNET_AVX512_TABLE = {BITNET_AVX512_NAME, quantize_rows_avx512, ternary_rows_avx512,
                                         ternary_rows_t3_avx512, dense_rows_avx512, attend_avx512<float>,
                                         attend_avx512<uint16_t>, int8_rows_avx2, to_fp16_avx2};
#else
const KernelTable BITNET_AVX512_TABLE = {BITNET_AVX512_NAME, quantize_rows_avx512, ternary_rows_avx512,
                                         ternary_rows_t3_avx512, dense_rows_avx512, attend_avx512<float>,
                                         attend_avx512<uint16_t>, int8_rows_scalar, to_fp16_scalar};
#endif

}  // namespace bitnet

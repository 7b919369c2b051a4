// AMX-INT8 ternary kernels for batches (prefill, eval windows, big serving batches): compiled with the
// AVX-512 flags plus -mamx-tile -mamx-int8; only called when CPUID, XCR0 and the kernel's permission
// (arch_prctl ARCH_REQ_XCOMP_PERM, dispatch.cpp) all allow tile data.
//
// One TDPBUSD multiplies a 16 x 64 uint8 tile by a 64 x 16 int8 tile into 16 x 16 int32 sums
// (16,384 multiply-adds; the AVX-512 kernels' vpdpbusd does 64). The A tile is 16 weight rows' codes
// q = c + 1 in {0, 1, 2}, 64 consecutive codes per row, decoded from the packing read in place
// (i2_b128 or t3_b160) into a per-thread panel of 32 rows; the B tile is 16 activation rows in
// AMX's "VNNI" order (row kr holds codes 4kr .. 4kr + 3 of each activation row), made once per
// matrix input by pack_rows_amx (QuantBuffer::pack) with a 16 x 16 dword transpose per tile. Then
// sum(c x) = sum(q x) - sum(x), exact in int32 as in every other path, so y gets the same float as
// the scalar reference. Every group of 32 activation rows sweeps the panel in 2 x 2 tiles (4
// accumulators, 2 A and 2 B tiles: the 8 tile registers).
//
// Batches of fewer than kAmxMinRows activation rows (decode: memory-bound) use the AVX-512 kernels.
//
// BITNET_AMX_EMULATE (C++ test build only): the same code on emulated tiles and SIMDe's AVX-512
// (tests/amx_emulation.h), so CPUs without AMX test it against the scalar reference too.
#ifdef BITNET_AMX_EMULATE
#include "tests/amx_emulation.h"
#define BITNET_AMX_TABLE kAmxEmulatedKernels
#define BITNET_AMX_NAME "amx-emulated"
#define BITNET_AMX_BASE kAvx512EmulatedKernels
#else
#include <immintrin.h>
#define BITNET_AMX_TABLE kAmxKernels
#define BITNET_AMX_NAME "amx"
#define BITNET_AMX_BASE kAvx512Kernels
#endif

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/panel_avx512.h"

namespace bitnet {
namespace {

constexpr int64_t kTile = 16;          // rows of an A / C tile, weight rows of a B tile
constexpr int64_t kTileK = 64;         // codes of K per tile step
constexpr int64_t kTileBytes = 1024;   // 16 x 64
constexpr int64_t kPanelRows = 32;     // weight rows decoded together (2 B tiles)
// Below this many activation rows the AVX-512 kernels run (measured: bench/README.md).
constexpr int64_t kAmxMinRows = 16;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0..3: int32 accumulators C (weight group g, activation group a) = tile 2g + a;
// 4, 5: weight codes (A); 6, 7: activations (B). All 16 rows x 64 bytes.
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = kTileK;
  }
  _tile_loadconfig(&cfg);
}

struct Scratch {
  std::vector<uint8_t> panel;  // decoded codes q of kPanelRows weight rows, row-major (panel_stride bytes a row)
  std::vector<int8_t> packed;  // B tiles of x when the caller did not pack them
  alignas(64) int32_t c[kTile * kTile];  // one stored accumulator
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

inline int64_t x_chunks(const QuantRows& x) { return (x.stride + kTileK - 1) / kTileK; }

// B tile (g, kk) of x at out + (g * x_chunks + kk) KB: activation rows 16 g .. 16 g + 15, codes
// 64 kk .. 64 kk + 63 in VNNI order; rows past x.m and codes past x.stride are zero.
void pack_rows_amx(const QuantRows& x, int8_t* out) {
  const int64_t kc = x_chunks(x);
  for (int64_t g = 0; g * kTile < x.m; ++g)
    for (int64_t kk = 0; kk < kc; ++kk) {
      const int64_t left = std::min(kTileK, x.stride - kk * kTileK);
      const __mmask64 mk = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
      __m512i in[16], t[16];
      for (int64_t i = 0; i < kTile; ++i)
        in[i] = g * kTile + i < x.m ? _mm512_maskz_loadu_epi8(mk, x.q + (g * kTile + i) * x.stride + kk * kTileK)
                                    : _mm512_setzero_si512();
      transpose16x16(in, t);
      int8_t* tile = out + (g * kc + kk) * kTileBytes;
      for (int r = 0; r < 16; ++r) _mm512_storeu_si512(tile + r * 64, t[r]);
    }
}

// y[i, r] = float(C[r - r0][i - i0] - sum_x[i]) * (s_w / s_x[i]) for the valid part of one stored
// tile (rows: weight rows, columns: activation rows).
inline void write_out(const int32_t* c, const QuantRows& x, int64_t i0, int64_t r0, int64_t rows, float s_w,
                      float* y, int64_t y_stride) {
  for (int64_t i = 0; i < kTile && i0 + i < x.m; ++i) {
    const float f = s_w / x.scale[i0 + i];
    const int32_t sx = x.sum[i0 + i];
    float* yr = y + (i0 + i) * y_stride + r0;
    for (int64_t r = 0; r < rows; ++r) yr[r] = static_cast<float>(c[r * kTile + i] - sx) * f;
  }
}

template <bool T3>
void ternary_rows_amx_t(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x_in, float s_w,
                        float* y, int64_t y_stride) {
  Scratch& s = scratch();
  // unpacked on a direct call: pack here (the engine and ternary_matmul pack once per input)
  const QuantRows x = with_packed(BITNET_AMX_TABLE, x_in, s.packed);
  const int64_t k_codes = n_blocks * (T3 ? kT3BlockCodes : kI2BlockCodes);
  const int64_t kc = (k_codes + kTileK - 1) / kTileK, xkc = x_chunks(x);
  // one cache line more than the codes: 16 rows a power of two apart would share L1 sets
  const int64_t panel_stride = kc * kTileK + 64, row_bytes = n_blocks * 32;
  uint8_t* panel = aligned64(s.panel, static_cast<size_t>(kPanelRows * panel_stride));
  configure_tiles();
  for (int64_t p0 = r0; p0 < r1; p0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, r1 - p0);
    for (int64_t r = 0; r < kPanelRows; ++r) {
      uint8_t* out = panel + r * panel_stride;
      if (r >= rows) std::memset(out, 0, static_cast<size_t>(kc * kTileK));
      else if (T3) decode_t3_row(w + (p0 + r) * row_bytes, n_blocks, kc * kTileK, out);
      else decode_i2_row(w + (p0 + r) * row_bytes, n_blocks, kc * kTileK, out);
    }
    const bool two_w = rows > kTile;
    const uint8_t* a0 = panel;
    const uint8_t* a1 = panel + kTile * panel_stride;
    for (int64_t i0 = 0; i0 < x.m; i0 += 2 * kTile) {
      const bool two_x = i0 + kTile < x.m;
      const int8_t* b0 = x.packed + (i0 / kTile) * xkc * kTileBytes;
      const int8_t* b1 = b0 + xkc * kTileBytes;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kk = 0; kk < kc; ++kk) {
        _tile_loadd(4, a0 + kk * kTileK, panel_stride);
        _tile_loadd(6, b0 + kk * kTileBytes, 64);
        _tile_dpbusd(0, 4, 6);
        if (two_x) {
          _tile_loadd(7, b1 + kk * kTileBytes, 64);
          _tile_dpbusd(1, 4, 7);
        }
        if (two_w) {
          _tile_loadd(5, a1 + kk * kTileK, panel_stride);
          _tile_dpbusd(2, 5, 6);
          if (two_x) _tile_dpbusd(3, 5, 7);
        }
      }
      _tile_stored(0, s.c, 64);
      write_out(s.c, x, i0, p0, std::min(kTile, rows), s_w, y, y_stride);
      if (two_x) {
        _tile_stored(1, s.c, 64);
        write_out(s.c, x, i0 + kTile, p0, std::min(kTile, rows), s_w, y, y_stride);
      }
      if (two_w) {
        _tile_stored(2, s.c, 64);
        write_out(s.c, x, i0, p0 + kTile, rows - kTile, s_w, y, y_stride);
        if (two_x) {
          _tile_stored(3, s.c, 64);
          write_out(s.c, x, i0 + kTile, p0 + kTile, rows - kTile, s_w, y, y_stride);
        }
      }
    }
  }
  _tile_release();
}

void ternary_rows_amx(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x, float s_w,
                      float* y, int64_t y_stride) {
  if (x.m < kAmxMinRows) return BITNET_AMX_BASE.ternary_rows(w, n_blocks, r0, r1, x, s_w, y, y_stride);
  ternary_rows_amx_t<false>(w, n_blocks, r0, r1, x, s_w, y, y_stride);
}

void ternary_rows_t3_amx(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x, float s_w,
                         float* y, int64_t y_stride) {
  if (x.m < kAmxMinRows) return BITNET_AMX_BASE.ternary_rows_t3(w, n_blocks, r0, r1, x, s_w, y, y_stride);
  ternary_rows_amx_t<true>(w, n_blocks, r0, r1, x, s_w, y, y_stride);
}

}  // namespace

// The AVX-512 table with the AMX ternary kernels (everything else is the AVX-512 code).
const KernelTable BITNET_AMX_TABLE = {BITNET_AMX_NAME,
                                      BITNET_AMX_BASE.quantize_rows,
                                      ternary_rows_amx,
                                      ternary_rows_t3_amx,
                                      BITNET_AMX_BASE.dense_rows,
                                      BITNET_AMX_BASE.attend,
                                      BITNET_AMX_BASE.attend_f16,
                                      BITNET_AMX_BASE.int8_rows,
                                      BITNET_AMX_BASE.to_fp16,
                                      pack_rows_amx,
                                      kAmxMinRows};

}  // namespace bitnet

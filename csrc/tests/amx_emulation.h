// C++ test build only: AMX's tile registers and the five tile instructions the AMX kernels use,
// in plain C++ (a thread's 8 tiles of up to 16 rows x 64 bytes), plus SIMDe's portable AVX-512 for
// the rest of kernels_amx.cpp. So the AMX kernels' logic (decode into panels, VNNI packing, tile
// loops, partial tiles) is checked against the scalar reference on CPUs without AMX. Included by
// kernels_amx.cpp when BITNET_AMX_EMULATE is defined.
#pragma once

#include <cstdint>
#include <cstring>

#include "tests/avx512_emulation.h"

namespace bitnet_amx_emu {

struct Tiles {
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) uint8_t data[8][16 * 64] = {};
};

inline Tiles& tiles() {
  static thread_local Tiles t;
  return t;
}

// The 64-byte config of palette 1: colsb (uint16) of tile i at byte 16 + 2i, rows at byte 48 + i.
inline void loadconfig(const void* cfg) {
  const auto* c = static_cast<const uint8_t*>(cfg);
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&tiles().colsb[i], c + 16 + 2 * i, 2);
    tiles().rows[i] = c[48 + i];
  }
}
inline void zero(int t) { std::memset(tiles().data[t], 0, sizeof tiles().data[t]); }
inline void loadd(int t, const void* base, int64_t stride) {
  for (int r = 0; r < tiles().rows[t]; ++r)
    std::memcpy(tiles().data[t] + 64 * r, static_cast<const uint8_t*>(base) + r * stride, tiles().colsb[t]);
}
inline void stored(int t, void* base, int64_t stride) {
  for (int r = 0; r < tiles().rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles().data[t] + 64 * r, tiles().colsb[t]);
}
// TDPBUSD: C[m][n] += sum_k sum_t u8(A[m][4k + t]) * s8(B[k][4n + t]), int32.
inline void dpbusd(int c, int a, int b) {
  Tiles& T = tiles();
  for (int m = 0; m < T.rows[a]; ++m)
    for (int n = 0; n < T.colsb[b] / 4; ++n) {
      int32_t acc;
      std::memcpy(&acc, T.data[c] + 64 * m + 4 * n, 4);
      for (int k = 0; k < T.colsb[a] / 4; ++k)
        for (int t = 0; t < 4; ++t)
          acc += static_cast<int32_t>(T.data[a][64 * m + 4 * k + t]) *
                 static_cast<int32_t>(static_cast<int8_t>(T.data[b][64 * k + 4 * n + t]));
      std::memcpy(T.data[c] + 64 * m + 4 * n, &acc, 4);
    }
}
inline void release() { tiles() = Tiles{}; }

// SIMDe's byte adds overflow signed chars (UB under UBSan); AMX's t3 decode wraps bytes on purpose.
inline simde__m256i add_epi8_256(simde__m256i a, simde__m256i b) {
  uint8_t x[32], y[32];
  simde_mm256_storeu_si256(x, a);
  simde_mm256_storeu_si256(y, b);
  for (int i = 0; i < 32; ++i) x[i] = static_cast<uint8_t>(x[i] + y[i]);
  return simde_mm256_loadu_si256(x);
}

inline simde__m512i maskz_loadu_epi8(uint64_t k, const void* p) {  // reads only the selected bytes
  uint8_t a[64] = {};
  for (int i = 0; i < 64; ++i)
    if ((k >> i) & 1) a[i] = static_cast<const uint8_t*>(p)[i];
  return simde_mm512_loadu_si512(a);
}

}  // namespace bitnet_amx_emu

#undef _tile_loadconfig
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbusd
#undef _tile_release
#define _tile_loadconfig(cfg) bitnet_amx_emu::loadconfig(cfg)
#define _tile_zero(t) bitnet_amx_emu::zero(t)
#define _tile_loadd(t, base, stride) bitnet_amx_emu::loadd(t, base, stride)
#define _tile_stored(t, base, stride) bitnet_amx_emu::stored(t, base, stride)
#define _tile_dpbusd(c, a, b) bitnet_amx_emu::dpbusd(c, a, b)
#define _tile_release() bitnet_amx_emu::release()
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8 bitnet_amx_emu::maskz_loadu_epi8
#undef _mm256_add_epi8
#define _mm256_add_epi8 bitnet_amx_emu::add_epi8_256

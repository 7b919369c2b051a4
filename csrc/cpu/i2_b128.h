// i2_b128: the on-disk and in-memory layout of ternary weights (one place declares it).
//
// A weight matrix (out, in) is stored row by row. Each row's codes c in {-1, 0, 1} are stored as
// q = c + 1 in {0, 1, 2}, 2 bits each, padded with c = 0 (q = 1) to a multiple of 128 codes.
// A block holds 128 codes in 32 bytes: byte j (0..31) of block b holds the codes of elements
//   b*128 + 32*k + j   at bits 2k..2k+1, k = 0..3.
// So `(byte >> 2k) & 3` over the 32 bytes of a block gives 32 consecutive elements, in order:
// one 256-bit load + shift + mask yields codes lined up with 32 contiguous int8 activations.
// Row stride in bytes: ceil(in / 128) * 32.  2.0 bits per weight (padding aside).
#pragma once

#include <cstddef>
#include <cstdint>

namespace bitnet {

constexpr int64_t kI2BlockCodes = 128;  // codes per block
constexpr int64_t kI2BlockBytes = 32;   // bytes per block: 128 codes * 2 bits / 8

struct BlockI2B128 {
  uint8_t qs[kI2BlockBytes];  // 2.0 bits per weight
};
static_assert(sizeof(BlockI2B128) == kI2BlockBytes, "i2_b128 block must be 32 bytes");
static_assert(kI2BlockCodes * 2 / 8 == kI2BlockBytes, "i2_b128: 2 bits per code");

inline int64_t i2_blocks_per_row(int64_t in_features) {
  return (in_features + kI2BlockCodes - 1) / kI2BlockCodes;
}
inline int64_t i2_row_bytes(int64_t in_features) { return i2_blocks_per_row(in_features) * kI2BlockBytes; }

// Ternary code of element i (0..127) of a block: -1, 0 or +1 (+2 for the invalid q = 3).
inline int i2_code(const uint8_t* block, int i) {
  const int k = i / 32, j = i % 32;
  return ((block[j] >> (2 * k)) & 3) - 1;
}

}  // namespace bitnet

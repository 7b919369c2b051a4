// t3_b160: the 1.6-bit layout of ternary weights, read in place (one place declares it).
//
// A weight matrix (out, in) is stored row by row. Each row's codes c in {-1, 0, 1} are stored as
// q = c + 1 in {0, 1, 2}, padded with c = 0 (q = 1) to a multiple of 160 codes. A block holds
// 160 codes in 32 bytes: byte j (0..31) of block b holds the five codes of elements
//   b*160 + 32*k + j,  k = 0..4,
// as the base-3 number v = sum_k q_k * 3^(4-k) (q_0 the most significant digit), stored
// pre-scaled (as llama.cpp's TQ1_0):  byte = ceil(v * 256 / 243)  (0..255; v = (byte * 243) >> 8).
// Then trit k comes out with byte arithmetic only:
//   u_0 = byte,  u_{k+1} = 3 u_k mod 256   (u + u + u with wrapping byte adds)
//   q_k = floor(3 u_k / 256)  = (u_k > 85) + (u_k > 170)
// so the 32 bytes of a block give, for each k, 32 codes lined up with 32 contiguous activations,
// and 3 u_k = 256 q_k + u_{k+1} exactly (what the AVX-512 decode kernel uses: see kernels_avx512.cpp).
// 243 of the 256 byte values are such encodings; the other 13 (((byte * 243) & 255) >= 243:
// 1, 20, 40, 60, 79, 99, 119, 138, 158, 178, 197, 217, 237) are invalid and rejected at load.
// Row stride in bytes: ceil(in / 160) * 32.  1.6 bits per weight (padding aside): bitnet-2b
// (in 2560 / 6912) 1.600 / 1.630, the 100b shape (in 8192 / 45568) 1.625 / 1.601.
#pragma once

#include <cstddef>
#include <cstdint>

namespace bitnet {

constexpr int64_t kT3BlockCodes = 160;  // codes per block
constexpr int64_t kT3BlockBytes = 32;   // bytes per block: 5 codes per byte
constexpr int kT3TritsPerByte = 5;

struct BlockT3B160 {
  uint8_t qs[kT3BlockBytes];  // 1.6 bits per weight
};
static_assert(sizeof(BlockT3B160) == kT3BlockBytes, "t3_b160 block must be 32 bytes");
static_assert(kT3BlockCodes == kT3TritsPerByte * kT3BlockBytes, "t3_b160: 5 codes per byte");

inline int64_t t3_blocks_per_row(int64_t in_features) {
  return (in_features + kT3BlockCodes - 1) / kT3BlockCodes;
}
inline int64_t t3_row_bytes(int64_t in_features) { return t3_blocks_per_row(in_features) * kT3BlockBytes; }

// The stored byte of five digits q_0..q_4 (each 0..2), q_0 most significant.
inline uint8_t t3_encode(const int q[kT3TritsPerByte]) {
  int v = 0;
  for (int k = 0; k < kT3TritsPerByte; ++k) v = 3 * v + q[k];
  return static_cast<uint8_t>((v * 256 + 242) / 243);
}
// Whether a byte is one of the 243 encodings.
inline bool t3_byte_valid(uint8_t byte) { return ((byte * 243) & 255) < 243; }
// Digit k (0..4) of a byte: q_k in {0, 1, 2} (defined for every byte; valid ones decode exactly).
inline int t3_digit(uint8_t byte, int k) {
  unsigned u = byte;
  for (int i = 0; i < k; ++i) u = (3 * u) & 255;
  return static_cast<int>((3 * u) >> 8);
}
// Ternary code of element i (0..159) of a block: -1, 0 or +1.
inline int t3_code(const uint8_t* block, int i) { return t3_digit(block[i % 32], i / 32) - 1; }

}  // namespace bitnet

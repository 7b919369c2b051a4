// The loop order the GEMM-style kernels share (ISA-neutral: the tiles hold the intrinsics).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace bitnet {

// Weight rows [r0, r1) against m activation rows. Rows go in blocks of `block`; inside a block the
// activation tiles of 4 rows are the outer loop, so the block's weights stay in L1/L2 while every
// tile sweeps them and the activations stream once per block, not once per weight row (they are
// megabytes for an all-logits eval window). Then the m % 4 leftover activation rows.
// tile(std::integral_constant<int, NA>, r, i): weight row r against activation rows i .. i + NA - 1.
template <class Tile>
inline void sweep_row_blocks(int64_t r0, int64_t r1, int64_t m, int64_t block, const Tile& tile) {
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(r1, b0 + block);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
      for (int64_t r = b0; r < b1; ++r) tile(std::integral_constant<int, 4>{}, r, i);
    for (int64_t r = b0; r < b1 && i < m; ++r) {
      switch (m - i) {
        case 3: tile(std::integral_constant<int, 3>{}, r, i); break;
        case 2: tile(std::integral_constant<int, 2>{}, r, i); break;
        default: tile(std::integral_constant<int, 1>{}, r, i); break;
      }
    }
  }
}

}  // namespace bitnet

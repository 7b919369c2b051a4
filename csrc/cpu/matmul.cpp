#include "cpu/matmul.h"

#include <algorithm>
#include <vector>

#include "cpu/parallel.h"

namespace bitnet {

void ternary_matmul(const KernelTable& kt, Packing packing, const uint8_t* w, int64_t out, int64_t in,
                    const QuantRows& x, float s_w, float* y, int threads) {
  constexpr int64_t chunk = 32;
  const int64_t n_blocks = packing_blocks_per_row(packing, in);
  const auto rows = packing == Packing::T3B160 ? kt.ternary_rows_t3 : kt.ternary_rows;
  // the table's packed copy of x, once for every row chunk (as the engine does)
  std::vector<int8_t> packed;
  const QuantRows xp = with_packed(kt, x, packed);
  parallel_for((out + chunk - 1) / chunk, threads, [&](int64_t c) {
    rows(w, n_blocks, c * chunk, std::min(out, (c + 1) * chunk), xp, s_w, y, out);
  });
}

void dense_matmul(const KernelTable& kt, const void* w, DType dt, int64_t out, int64_t in, const float* x, int64_t m,
                  float* y, int threads) {
  constexpr int64_t chunk = 16;
  parallel_for((out + chunk - 1) / chunk, threads, [&](int64_t c) {
    kt.dense_rows(w, dt, in, c * chunk, std::min(out, (c + 1) * chunk), x, m, in, y, out);
  });
}

}  // namespace bitnet

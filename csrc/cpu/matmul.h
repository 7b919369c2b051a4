// Threaded single-matrix drivers over a kernel table (the engine batches several matrices itself).
#pragma once

#include "cpu/kernels.h"

namespace bitnet {

// y (x.m, out) = ternary matmul of x (quantized rows, padded to act_padded(in)) with the ternary
// matrix w (out, in) packed as `packing` (i2_b128 or t3_b160).
void ternary_matmul(const KernelTable& kt, Packing packing, const uint8_t* w, int64_t out, int64_t in,
                    const QuantRows& x, float s_w, float* y, int threads);
// y (m, out) = x (m, in) @ w^T for a dense (out, in) matrix of dtype dt.
void dense_matmul(const KernelTable& kt, const void* w, DType dt, int64_t out, int64_t in, const float* x, int64_t m,
                  float* y, int threads);

}  // namespace bitnet

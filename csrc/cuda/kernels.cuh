// CUDA kernels of the forward pass and their launchers (one launcher per kernel family; the
// launchers pick template instances and grid shapes from run-time sizes: no shape is built in).
// Conventions: row-major fp32 activations; "rows" are tokens; a null pointer means "not wanted".
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cpu/kernels.h"  // DType

namespace bitnet {
namespace cuda {

// Quantized activation rows: codes (m, stride) int8 zero-padded to stride (a multiple of 128),
// s_x (m), and the code sum of each row (m) for the q = c + 1 correction.
struct QuantView {
  const int8_t* q = nullptr;
  int64_t stride = 0;
  const float* scale = nullptr;
  const int32_t* sum = nullptr;
};

// One ternary matrix of a (possibly fused) launch: y[i*y_stride + r] (+)= W_r . xq_i.
struct TernaryJob {
  const uint8_t* w = nullptr;  // i2_b128 (out, n_blocks * 32)
  int64_t out = 0;
  float s_w = 0.0f;
  QuantView x;
  float* y = nullptr;
  int64_t y_stride = 0;
  bool accumulate = false;  // y += result (residual add fused)
};
constexpr int kMaxJobs = 3;  // q/k/v or gate/up share one launch

// Ternary linear(s) over m quantized rows sharing n_blocks (the input width / 128, rounded up).
// m <= 8: the decode GEMV (dp4a, weights streamed once); else the int8 tensor-core GEMM (WMMA).
void launch_ternary(const TernaryJob* jobs, int n_jobs, int64_t n_blocks, int64_t m, cudaStream_t s);
// The GEMV alone for any m (tiles of up to 8 rows), for the bench and for tests of both paths.
void launch_ternary_gemv(const TernaryJob* jobs, int n_jobs, int64_t n_blocks, int64_t m, cudaStream_t s);
void launch_ternary_gemm(const TernaryJob* jobs, int n_jobs, int64_t n_blocks, int64_t m, cudaStream_t s);

// Dense (hybrid-precision or lm_head) linear: y[i*y_stride + r] (+)= sum_k w[r,k] x[i*in + k],
// w (out, in) f32/f16/bf16, fp32 accumulation.
void launch_dense(const void* w, DType dt, int64_t out, int64_t in, const float* x, int64_t m, float* y,
                  int64_t y_stride, bool accumulate, cudaStream_t s);

// x[t, :] = fp32(embed[tokens[t], :]), t < n.
void launch_embed(const void* embed, DType dt, int64_t d, const int32_t* tokens, int64_t n, float* x, cudaStream_t s);

// Row preparation, one block per output row i (input row = row_map ? row_map[i] : i):
//   v = act(a, b)          act: 0 none (v = a), 1 SwiGLU (a * sigmoid(a) * b), 2 ReLU² (relu(a)^2 * b)
//   v = RMSNorm(v) * norm  when norm_w
//   out_f = v              when out_f
//   xq, s_x, sum = quantize(v) when q (codes zero-padded to q_stride)
enum class Act : int { None = 0, SwiGLU = 1, ReLU2 = 2 };
void launch_row_prep(const float* a, const float* b, Act act, const int32_t* row_map, int64_t rows, int64_t n,
                     const float* norm_w, float norm_eps, float* out_f, int8_t* q, int64_t q_stride, float* s_x,
                     int32_t* sum, float act_eps, cudaStream_t s);

// y (rows, n) += bias (n): the q/k/v biases (qkv_bias), fp32, after the product as on the CPU.
void launch_add_bias(float* y, const float* bias, int64_t rows, int64_t n, cudaStream_t s);

// RoPE (rotate-half) on q (n, nh*hd) in place and on k; writes k, v rows into the cache at
// (layer base, tok_seq[t], kv_head, tok_pos[t]).
struct CacheView {
  float* k = nullptr;  // this layer's keys: (n_seqs, n_kv, max_len, hd)
  float* v = nullptr;
  int64_t n_kv = 0, max_len = 0, hd = 0;
};
void launch_rope_store(float* q, const float* k, const float* v, int64_t n, int64_t nh, const CacheView& c,
                       const float* cos_t, const float* sin_t, const int32_t* tok_seq, const int32_t* tok_pos,
                       cudaStream_t s);

// Causal attention of each new token over its sequence's cached positions 0..tok_pos[t]:
// out (n, nh*hd). GQA: head h reads kv head h / (nh / n_kv).
void launch_attention(const float* q, const CacheView& c, int64_t n, int64_t nh, const int32_t* tok_seq,
                      const int32_t* tok_pos, float* out, cudaStream_t s);

// idx[i] = argmax_j logits[i*vocab + j] (first index on ties, as numpy).
void launch_argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* idx, cudaStream_t s);

// Greedy step bookkeeping: out[step * n + i] = next[i]; tok_pos[i] += 1; ++*step.
void launch_greedy_advance(const int32_t* next, int64_t n, int32_t* tok_pos, int32_t* step, int32_t* out,
                           cudaStream_t s);

// Raise the dynamic shared memory limit of the kernels that use it (once per device).
void configure_kernels(int max_dynamic_smem);

}  // namespace cuda
}  // namespace bitnet

// CUDA kernels of the forward pass. Layouts and design: README.md beside this file.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/kernels.cuh"
#include "quant_shared.h"

namespace bitnet {
namespace cuda {
namespace {

constexpr int kBlockCodes = 128;  // i2_b128 (cpu/i2_b128.h)
constexpr int kBlockBytes = 32;
constexpr unsigned kFull = 0xffffffffu;

int g_max_dynamic_smem = 48 * 1024;  // raised by configure_kernels

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel launch failed (") + what + "): " + cudaGetErrorString(e));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- small device helpers -------------------------------------------------------------------

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduce v over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// red: 32 shared slots. Starts with a barrier so back-to-back calls may reuse red.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity, T* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < n_warps ? red[lane] : identity;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// 16 bytes of a dense row -> 16 / sizeof(T) floats.
__device__ __forceinline__ void unpack16(const uint4& p, float* f, float) {
  f[0] = __uint_as_float(p.x);
  f[1] = __uint_as_float(p.y);
  f[2] = __uint_as_float(p.z);
  f[3] = __uint_as_float(p.w);
}
__device__ __forceinline__ void unpack16(const uint4& p, float* f, __half) {
  const uint32_t w[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
__device__ __forceinline__ void unpack16(const uint4& p, float* f, __nv_bfloat16) {
  const uint32_t w[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// ---- ternary linears --------------------------------------------------------------------------

// Jobs of one launch; each thread block works for exactly one job (block_start[j] <= blockIdx.x
// < block_start[j + 1]), so the block's activation rows are that job's.
struct JobsParam {
  TernaryJob job[kMaxJobs];
  int64_t block_start[kMaxJobs + 1];
  int n_jobs;
};

__device__ __forceinline__ int job_of_block(const JobsParam& p, int64_t block) {
  int j = 0;
#pragma unroll
  for (int i = 1; i < kMaxJobs; ++i)
    if (i < p.n_jobs && block >= p.block_start[i]) j = i;
  return j;
}

// Copy of job j with constant indices only (a run-time index into kernel parameters would spill).
__device__ __forceinline__ TernaryJob select_job(const JobsParam& p, int j) {
  TernaryJob job = p.job[0];
#pragma unroll
  for (int i = 1; i < kMaxJobs; ++i)
    if (j == i) job = p.job[i];
  return job;
}

// Decode GEMV: y[i, r] = W_r . xq_i for MT activation rows at once, each weight byte read once.
//
// G lanes (a power of two, G | 32) share one weight row; a block of 256 threads covers 256 / G
// rows. Lane g reads the row's 16-byte chunks g, g + G, ... (coalesced: G lanes read G * 16
// consecutive bytes) four at a time, all four loads issued before the first use. Chunk c is half
// h = c & 1 of block b = c >> 1: bytes 16h..16h+15, i.e. for field k the codes of elements
// 128b + 32k + 16h .. +15, which meet one 16-byte load of the activation row staged in shared
// memory. The field order is rotated by b, (k + b) & 3, so that the eight lanes of a 16-byte
// shared-memory phase (four blocks x two halves) read eight different bank groups.
//
// Accumulates sum q * x (q = c + 1 in 0..2, dp4a) and subtracts the row's code sum at the end.
template <int G, int MT>
__global__ void __launch_bounds__(256) ternary_gemv_kernel(const JobsParam p, int64_t n_blocks, int64_t m0, int64_t m) {
  extern __shared__ __align__(16) int8_t s_act[];  // (MT, n_pad) int8 codes
  constexpr int kRowsPerBlock = 256 / G;
  const int j = job_of_block(p, blockIdx.x);
  const TernaryJob job = select_job(p, j);
  const int64_t n_pad = n_blocks * kBlockCodes;
  const int64_t mt = min(static_cast<int64_t>(MT), m - m0);

  const int64_t vec_per_row = n_pad / 16;
  for (int i = 0; i < MT; ++i) {
    const uint4* src = reinterpret_cast<const uint4*>(job.x.q + (m0 + i) * job.x.stride);
    uint4* dst = reinterpret_cast<uint4*>(s_act + i * n_pad);
    for (int64_t c = threadIdx.x; c < vec_per_row; c += blockDim.x) dst[c] = i < mt ? __ldg(src + c) : make_uint4(0, 0, 0, 0);
  }
  __syncthreads();

  const int g = threadIdx.x % G;
  const int64_t r = (blockIdx.x - p.block_start[j]) * kRowsPerBlock + threadIdx.x / G;
  const bool valid = r < job.out;
  const int64_t n_chunks = n_blocks * 2;
  const uint4* row = reinterpret_cast<const uint4*>(job.w + (valid ? r : 0) * n_blocks * kBlockBytes);

  int32_t acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = 0;

  constexpr int U = 4;  // loads in flight per lane
  for (int64_t c0 = g; c0 < n_chunks; c0 += U * G) {
    uint4 w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u * G;
      w[u] = (valid && c < n_chunks) ? __ldcs(row + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u * G;
      if (c < n_chunks) {
        const int64_t b = c >> 1;
        const int h = static_cast<int>(c & 1);
        const int8_t* a_base = s_act + b * kBlockCodes + h * 16;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int kk = (k + static_cast<int>(b)) & 3;
          const uint32_t q0 = i2_word_codes(w[u].x, kk), q1 = i2_word_codes(w[u].y, kk);
          const uint32_t q2 = i2_word_codes(w[u].z, kk), q3 = i2_word_codes(w[u].w, kk);
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            const int4 a = *reinterpret_cast<const int4*>(a_base + i * n_pad + kk * 32);
            int32_t s = acc[i];
            s = dp4a_s8(q0, static_cast<uint32_t>(a.x), s);
            s = dp4a_s8(q1, static_cast<uint32_t>(a.y), s);
            s = dp4a_s8(q2, static_cast<uint32_t>(a.z), s);
            s = dp4a_s8(q3, static_cast<uint32_t>(a.w), s);
            acc[i] = s;
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(kFull, acc[i], off);

  if (valid && g == 0) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i < mt) {
        const int64_t xi = m0 + i;
        const float v = ternary_output(ternary_dot_from_q(acc[i], job.x.sum[xi]), job.s_w, job.x.scale[xi]);
        float* y = job.y + xi * job.y_stride + r;
        *y = job.accumulate ? *y + v : v;
      }
    }
  }
}

// Prefill / batch GEMM on int8 tensor cores (WMMA 16x16x16, s8 x s8 -> s32).
// Block tile: 64 tokens x 64 weight rows, K step = one i2_b128 block (128 codes); 4 warps, each
// 32 x 32 (2 x 2 fragments). Shared tiles are stored as 8 slices of 16 codes ([slice][row][16]):
// every fragment pointer is then 256-bit aligned, as wmma::load_matrix_sync requires. Weights
// are unpacked to q = c + 1 bytes on the way in (the q.x - sum(x) correction as in the GEMV).
// No double buffering yet: a first tensor-core version (README.md, "Next steps").
constexpr int kGemmTile = 64;
__global__ void __launch_bounds__(128) ternary_gemm_kernel(const JobsParam p, int64_t n_blocks, int64_t m) {
  using namespace nvcuda;
  __shared__ __align__(128) int8_t s_a[8][kGemmTile][16];  // tokens x 128 codes
  __shared__ __align__(128) int8_t s_b[8][kGemmTile][16];  // weight rows x 128 codes (B col-major)
  __shared__ __align__(128) int32_t s_c[kGemmTile][kGemmTile + 4];

  const int j = job_of_block(p, blockIdx.x);
  const TernaryJob job = select_job(p, j);
  const int64_t n0 = (blockIdx.x - p.block_start[j]) * kGemmTile;  // first weight row
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kGemmTile;  // first token
  const int tid = threadIdx.x, warp = tid / 32, wy = warp / 2, wx = warp % 2;
  const int64_t w_row_bytes = n_blocks * kBlockBytes;

  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[2][2];
#pragma unroll
  for (int fi = 0; fi < 2; ++fi)
#pragma unroll
    for (int fj = 0; fj < 2; ++fj) wmma::fill_fragment(acc[fi][fj], 0);

  for (int64_t kb = 0; kb < n_blocks; ++kb) {
    // activations: 64 rows x 8 slices of 16 bytes; consecutive threads read one row's 128 bytes
    for (int e = tid; e < kGemmTile * 8; e += blockDim.x) {
      const int r = e / 8, sl = e % 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + r < m) v = __ldg(reinterpret_cast<const uint4*>(job.x.q + (m0 + r) * job.x.stride + kb * kBlockCodes + sl * 16));
      *reinterpret_cast<uint4*>(&s_a[sl][r][0]) = v;
    }
    // weights: thread -> (row tid / 2, half tid % 2) = 16 bytes; field k of half h is slice 2k + h
    {
      const int r = tid / 2, h = tid % 2;
      uint4 w = make_uint4(0, 0, 0, 0);
      if (n0 + r < job.out) w = __ldcs(reinterpret_cast<const uint4*>(job.w + (n0 + r) * w_row_bytes + kb * kBlockBytes + h * 16));
#pragma unroll
      for (int k = 0; k < 4; ++k)
        *reinterpret_cast<uint4*>(&s_b[2 * k + h][r][0]) =
            make_uint4(i2_word_codes(w.x, k), i2_word_codes(w.y, k), i2_word_codes(w.z, k), i2_word_codes(w.w, k));
    }
    __syncthreads();
#pragma unroll
    for (int sl = 0; sl < 8; ++sl) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[2];
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::load_matrix_sync(fa[f], &s_a[sl][wy * 32 + f * 16][0], 16);
        wmma::load_matrix_sync(fb[f], &s_b[sl][wx * 32 + f * 16][0], 16);
      }
#pragma unroll
      for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) wmma::mma_sync(acc[fi][fj], fa[fi], fb[fj], acc[fi][fj]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int fi = 0; fi < 2; ++fi)
#pragma unroll
    for (int fj = 0; fj < 2; ++fj)
      wmma::store_matrix_sync(&s_c[wy * 32 + fi * 16][wx * 32 + fj * 16], acc[fi][fj], kGemmTile + 4, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kGemmTile * kGemmTile; e += blockDim.x) {
    const int r = e / kGemmTile, c = e % kGemmTile;  // consecutive threads: consecutive outputs
    const int64_t xi = m0 + r, col = n0 + c;
    if (xi < m && col < job.out) {
      const float v = ternary_output(ternary_dot_from_q(s_c[r][c], job.x.sum[xi]), job.s_w, job.x.scale[xi]);
      float* y = job.y + xi * job.y_stride + col;
      *y = job.accumulate ? *y + v : v;
    }
  }
}

// ---- dense linears (lm_head, hybrid precision) ------------------------------------------------

// One warp per weight row, MT activation rows per launch, fp32 accumulation. vec: rows are
// 16-byte aligned (in * sizeof(T) % 16 == 0), read with 16-byte streaming loads.
template <typename T, int MT>
__global__ void __launch_bounds__(256) dense_gemv_kernel(const T* __restrict__ w, int64_t out, int64_t in,
                                                         const float* __restrict__ x, int64_t m0, int64_t m,
                                                         float* y, int64_t y_stride, bool accumulate, bool vec) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (r >= out) return;  // the whole warp: r is uniform across it
  const int64_t mt = min(static_cast<int64_t>(MT), m - m0);
  float acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = 0.0f;
  const T* row = w + r * in;
  if (vec) {
    constexpr int E = 16 / sizeof(T);  // elements per 16-byte load
    const int64_t n_vec = in / E;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
#pragma unroll 2
    for (int64_t c = lane; c < n_vec; c += 32) {
      float wf[E];
      unpack16(__ldcs(rv + c), wf, T());
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        if (i < mt) {
          const float4* xr = reinterpret_cast<const float4*>(x + (m0 + i) * in + c * E);
#pragma unroll
          for (int e4 = 0; e4 < E / 4; ++e4) {
            const float4 xv = __ldg(xr + e4);
            acc[i] += wf[4 * e4] * xv.x + wf[4 * e4 + 1] * xv.y + wf[4 * e4 + 2] * xv.z + wf[4 * e4 + 3] * xv.w;
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < in; k += 32) {
      const float wk = to_float(row[k]);
#pragma unroll
      for (int i = 0; i < MT; ++i)
        if (i < mt) acc[i] += wk * __ldg(x + (m0 + i) * in + k);
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(kFull, acc[i], off);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
      if (i < mt) {
        float* yp = y + (m0 + i) * y_stride + r;
        *yp = accumulate ? *yp + acc[i] : acc[i];
      }
  }
}

template <typename T>
__global__ void embed_kernel(const T* __restrict__ embed, int64_t d, const int32_t* __restrict__ tokens, float* x) {
  const int64_t t = blockIdx.x;
  const T* src = embed + static_cast<int64_t>(tokens[t]) * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) x[t * d + i] = to_float(src[i]);
}

// ---- row preparation: activation, RMSNorm, quantization ---------------------------------------

template <int ACT>
__device__ __forceinline__ float act_value(const float* a, const float* b, int64_t k) {
  const float v = a[k];
  if (ACT == 1) return v / (1.0f + expf(-v)) * b[k];  // SwiGLU, as the CPU engine: g * sigmoid(g) * u
  if (ACT == 2) {
    const float r = fmaxf(v, 0.0f);
    return r * r * b[k];  // ReLU²
  }
  return v;
}

constexpr int kPrepThreads = 512;
template <int ACT>
__global__ void __launch_bounds__(kPrepThreads) row_prep_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                                                 const int32_t* __restrict__ row_map, int64_t n,
                                                                 const float* __restrict__ norm_w, float norm_eps,
                                                                 float* out_f, int8_t* q, int64_t q_stride, float* s_x,
                                                                 int32_t* sum, float act_eps) {
  __shared__ float red_f[32];
  __shared__ int32_t red_i[32];
  const int64_t i = blockIdx.x;
  const int64_t src = row_map ? row_map[i] : i;
  const float* ar = a + src * n;
  const float* br = b ? b + src * n : nullptr;

  float inv = 1.0f;
  if (norm_w) {
    float ss = 0.0f;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      const float v = act_value<ACT>(ar, br, k);
      ss += v * v;
    }
    ss = block_reduce(ss, SumOp(), 0.0f, red_f);
    inv = 1.0f / sqrtf(ss / static_cast<float>(n) + norm_eps);
  }
  // out = w * (v * inv): the CPU engine's operation order (no FMA: two plain products)
  auto value = [&](int64_t k) {
    const float v = act_value<ACT>(ar, br, k);
    return norm_w ? __fmul_rn(norm_w[k], __fmul_rn(v, inv)) : v;
  };
  float amax = 0.0f;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const float v = value(k);
    if (out_f) out_f[i * n + k] = v;
    amax = fmaxf(amax, fabsf(v));
  }
  if (q) {
    amax = block_reduce(amax, MaxOp(), 0.0f, red_f);
    const float s = act_scale(amax, act_eps);
    int8_t* qr = q + i * q_stride;
    int32_t total = 0;
    for (int64_t k = threadIdx.x; k < q_stride; k += blockDim.x) {
      const int8_t c = k < n ? quantize_act(value(k), s) : static_cast<int8_t>(0);
      qr[k] = c;
      total += c;
    }
    total = block_reduce(total, SumOp(), 0, red_i);
    if (threadIdx.x == 0) {
      s_x[i] = s;
      sum[i] = total;
    }
  }
}

__global__ void add_bias_kernel(float* y, const float* __restrict__ bias, int64_t total, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[e] = __fadd_rn(y[e], bias[e % n]);
}

// ---- RoPE + KV cache store, attention ---------------------------------------------------------

__global__ void rope_store_kernel(float* q, const float* __restrict__ k, const float* __restrict__ v, int64_t nh,
                                  const CacheView c, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                  const int32_t* __restrict__ tok_seq, const int32_t* __restrict__ tok_pos) {
  const int64_t t = blockIdx.x, hd = c.hd, half = hd / 2, nkv = c.n_kv;
  const int64_t pos = tok_pos[t], seq = tok_seq[t];
  const float* cs = cos_t + pos * half;
  const float* sn = sin_t + pos * half;
  for (int64_t e = threadIdx.x; e < (nh + nkv) * half; e += blockDim.x) {
    const int64_t head = e / half, i = e % half;
    const float co = cs[i], si = sn[i];
    const float* src;
    float* dst;
    if (head < nh) {
      src = dst = q + (t * nh + head) * hd;
    } else {
      const int64_t kh = head - nh;
      src = k + (t * nkv + kh) * hd;
      dst = c.k + ((seq * nkv + kh) * c.max_len + pos) * hd;
    }
    const float x1 = src[i], x2 = src[i + half];
    dst[i] = __fsub_rn(__fmul_rn(x1, co), __fmul_rn(x2, si));
    dst[i + half] = __fadd_rn(__fmul_rn(x2, co), __fmul_rn(x1, si));
  }
  for (int64_t e = threadIdx.x; e < nkv * hd; e += blockDim.x) {
    const int64_t kh = e / hd, i = e % hd;
    c.v[((seq * nkv + kh) * c.max_len + pos) * hd + i] = v[(t * nkv + kh) * hd + i];
  }
}

// One block per (token, query head): scores for 128 positions at a time (one thread each), an
// online softmax across chunks, and the weighted sum of V with threads over head_dim (coalesced).
constexpr int kAttnThreads = 128;
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const float* __restrict__ q, const CacheView c, int64_t nh,
                                                                 const int32_t* __restrict__ tok_seq,
                                                                 const int32_t* __restrict__ tok_pos, float* out, float scale) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  const int64_t hd = c.hd;
  float* s_q = sm;          // (hd)
  float* s_o = sm + hd;     // (hd) running output
  float* s_p = s_o + hd;    // (kAttnThreads) probabilities of the chunk
  const int64_t t = blockIdx.x, hh = blockIdx.y, kh = hh / (nh / c.n_kv);
  const int64_t pos = tok_pos[t], seq = tok_seq[t];
  const float* K = c.k + (seq * c.n_kv + kh) * c.max_len * hd;
  const float* V = c.v + (seq * c.n_kv + kh) * c.max_len * hd;
  const int tid = threadIdx.x;
  for (int64_t d = tid; d < hd; d += blockDim.x) {
    s_q[d] = q[(t * nh + hh) * hd + d];
    s_o[d] = 0.0f;
  }
  __syncthreads();
  float m_run = -INFINITY, l_run = 0.0f;
  for (int64_t j0 = 0; j0 <= pos; j0 += kAttnThreads) {
    const int64_t jj = j0 + tid;
    float s = -INFINITY;
    if (jj <= pos) {
      const float* kr = K + jj * hd;
      float acc = 0.0f;
      for (int64_t d = 0; d < hd; ++d) acc += s_q[d] * kr[d];
      s = acc * scale;
    }
    const float m_new = fmaxf(m_run, block_reduce(s, MaxOp(), -INFINITY, red));  // finite: position j0 is valid
    const float corr = expf(m_run - m_new);
    const float p = jj <= pos ? expf(s - m_new) : 0.0f;
    s_p[tid] = p;
    l_run = l_run * corr + block_reduce(p, SumOp(), 0.0f, red);  // its barriers publish s_p
    const int64_t count = min(static_cast<int64_t>(kAttnThreads), pos + 1 - j0);
    for (int64_t d = tid; d < hd; d += blockDim.x) {
      float acc = s_o[d] * corr;
      for (int64_t i = 0; i < count; ++i) acc += s_p[i] * V[(j0 + i) * hd + d];
      s_o[d] = acc;
    }
    m_run = m_new;
    __syncthreads();  // s_p is rewritten by the next chunk
  }
  const float inv = 1.0f / l_run;
  for (int64_t d = tid; d < hd; d += blockDim.x) out[(t * nh + hh) * hd + d] = s_o[d] * inv;
}

// ---- sampling helpers -------------------------------------------------------------------------

__global__ void __launch_bounds__(1024) argmax_kernel(const float* __restrict__ logits, int64_t vocab, int32_t* idx) {
  __shared__ float s_v[32];
  __shared__ int32_t s_i[32];
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  float best = -INFINITY;
  int32_t arg = 0x7fffffff;
  for (int64_t k = threadIdx.x; k < vocab; k += blockDim.x) {
    const float v = row[k];
    if (v > best) {  // k ascends per thread: the first maximum is kept
      best = v;
      arg = static_cast<int32_t>(k);
    }
  }
  auto better = [](float v, int32_t i, float bv, int32_t bi) { return v > bv || (v == bv && i < bi); };
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(kFull, best, off);
    const int32_t i = __shfl_xor_sync(kFull, arg, off);
    if (better(v, i, best, arg)) best = v, arg = i;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) s_v[warp] = best, s_i[warp] = arg;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x / 32;
    best = lane < n_warps ? s_v[lane] : -INFINITY;
    arg = lane < n_warps ? s_i[lane] : 0x7fffffff;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float v = __shfl_xor_sync(kFull, best, off);
      const int32_t i = __shfl_xor_sync(kFull, arg, off);
      if (better(v, i, best, arg)) best = v, arg = i;
    }
    if (lane == 0) idx[blockIdx.x] = arg == 0x7fffffff ? 0 : arg;  // all-NaN row: token 0
  }
}

__global__ void greedy_advance_kernel(const int32_t* next, int64_t n, int32_t* tok_pos, int32_t* step, int32_t* out) {
  const int32_t s = *step;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    out[s * n + i] = next[i];
    tok_pos[i] += 1;
  }
  __syncthreads();
  if (threadIdx.x == 0) *step = s + 1;
}

// ---- launch helpers ---------------------------------------------------------------------------

JobsParam make_jobs(const TernaryJob* jobs, int n_jobs, int64_t rows_per_block) {
  if (n_jobs < 1 || n_jobs > kMaxJobs) throw std::invalid_argument("ternary launch: 1 .. 3 jobs");
  JobsParam p{};
  p.n_jobs = n_jobs;
  p.block_start[0] = 0;
  for (int i = 0; i < n_jobs; ++i) {
    p.job[i] = jobs[i];
    p.block_start[i + 1] = p.block_start[i] + ceil_div(jobs[i].out, rows_per_block);
  }
  for (int i = n_jobs + 1; i <= kMaxJobs; ++i) p.block_start[i] = p.block_start[n_jobs];
  return p;
}

// Lanes per weight row: the largest G whose last pass over the row's 16-byte chunks is >= 95% full,
// else the fullest.
int pick_lanes(int64_t n_chunks) {
  int best = 32;
  double best_util = 0.0;
  for (int g : {32, 16, 8, 4}) {
    const double util = static_cast<double>(n_chunks) / static_cast<double>(g * ceil_div(n_chunks, g));
    if (util >= 0.95) return g;
    if (util > best_util + 1e-9) best = g, best_util = util;
  }
  return best;
}

template <int G, int MT>
void gemv_instance(const JobsParam& p, int64_t n_blocks, int64_t m0, int64_t m, cudaStream_t s) {
  const int64_t blocks = p.block_start[p.n_jobs];
  const size_t smem = static_cast<size_t>(MT * n_blocks * kBlockCodes);
  ternary_gemv_kernel<G, MT><<<static_cast<unsigned>(blocks), 256, smem, s>>>(p, n_blocks, m0, m);
}

template <int G>
void gemv_lanes(const TernaryJob* jobs, int n_jobs, int64_t n_blocks, int64_t m, cudaStream_t s) {
  const JobsParam p = make_jobs(jobs, n_jobs, 256 / G);
  const int64_t row_bytes = n_blocks * kBlockCodes;  // shared memory per activation row
  for (int64_t m0 = 0; m0 < m;) {
    const int64_t left = m - m0;
    int mt = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    if (left > mt && left < 8) mt = left > 4 ? 8 : left > 2 ? 4 : 2;  // one launch for 3, 5..7 rows
    while (mt > 1 && mt * row_bytes > g_max_dynamic_smem) mt /= 2;
    switch (mt) {
      case 8: gemv_instance<G, 8>(p, n_blocks, m0, m, s); break;
      case 4: gemv_instance<G, 4>(p, n_blocks, m0, m, s); break;
      case 2: gemv_instance<G, 2>(p, n_blocks, m0, m, s); break;
      default: gemv_instance<G, 1>(p, n_blocks, m0, m, s); break;
    }
    m0 += mt;
  }
  check_launch("ternary_gemv");
}

template <int G, int MT>
void set_gemv_smem(int bytes) {
  cudaFuncSetAttribute(ternary_gemv_kernel<G, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
template <int G>
void set_gemv_smem_all(int bytes) {
  set_gemv_smem<G, 1>(bytes);
  set_gemv_smem<G, 2>(bytes);
  set_gemv_smem<G, 4>(bytes);
  set_gemv_smem<G, 8>(bytes);
}

template <typename T>
void dense_typed(const void* w, int64_t out, int64_t in, const float* x, int64_t m, float* y, int64_t y_stride,
                 bool accumulate, cudaStream_t s) {
  const bool vec = (in * static_cast<int64_t>(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const auto* wt = static_cast<const T*>(w);
  const unsigned blocks = static_cast<unsigned>(ceil_div(out, 8));
  for (int64_t m0 = 0; m0 < m;) {
    const int64_t left = m - m0;
    if (left >= 5) {
      dense_gemv_kernel<T, 8><<<blocks, 256, 0, s>>>(wt, out, in, x, m0, m, y, y_stride, accumulate, vec);
      m0 += 8;
    } else if (left >= 2) {
      dense_gemv_kernel<T, 4><<<blocks, 256, 0, s>>>(wt, out, in, x, m0, m, y, y_stride, accumulate, vec);
      m0 += 4;
    } else {
      dense_gemv_kernel<T, 1><<<blocks, 256, 0, s>>>(wt, out, in, x, m0, m, y, y_stride, accumulate, vec);
      m0 += 1;
    }
  }
  check_launch("dense_gemv");
}

}  // namespace

void configure_kernels(int max_dynamic_smem) {
  g_max_dynamic_smem = max_dynamic_smem;
  set_gemv_smem_all<32>(max_dynamic_smem);
  set_gemv_smem_all<16>(max_dynamic_smem);
  set_gemv_smem_all<8>(max_dynamic_smem);
  set_gemv_smem_all<4>(max_dynamic_smem);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e));
}

void launch_ternary_gemv(const TernaryJob* jobs, int n_jobs, int64_t n_blocks, int64_t m, cudaStream_t s) {
  if (n_blocks * kBlockCodes > g_max_dynamic_smem)
    throw std::invalid_argument("ternary GEMV: in_features " + std::to_string(n_blocks * kBlockCodes) +
                                " exceeds the shared memory of one block; use the GEMM path");
  switch (pick_lanes(n_blocks * 2)) {
    case 32: gemv_lanes<32>(jobs, n_jobs, n_blocks, m, s); break;
    case 16: gemv_lanes<16>(jobs, n_jobs, n_blocks, m, s); break;
    case 8: gemv_lanes<8>(jobs, n_jobs, n_blocks, m, s); break;
    default: gemv_lanes<4>(jobs, n_jobs, n_blocks, m, s); break;
  }
}

void launch_ternary_gemm(const TernaryJob* jobs, int n_jobs, int64_t n_blocks, int64_t m, cudaStream_t s) {
  const JobsParam p = make_jobs(jobs, n_jobs, kGemmTile);
  const int64_t token_tiles = ceil_div(m, kGemmTile);
  if (token_tiles > 65535) throw std::invalid_argument("ternary GEMM: more than 65535 * 64 rows in one call");
  const dim3 grid(static_cast<unsigned>(p.block_start[n_jobs]), static_cast<unsigned>(token_tiles));
  ternary_gemm_kernel<<<grid, 128, 0, s>>>(p, n_blocks, m);
  check_launch("ternary_gemm");
}

void launch_ternary(const TernaryJob* jobs, int n_jobs, int64_t n_blocks, int64_t m, cudaStream_t s) {
  // The GEMV streams each weight once per 8 rows; past 8 rows the tensor-core GEMM reads less.
  if (m <= 8 && n_blocks * kBlockCodes <= g_max_dynamic_smem)
    launch_ternary_gemv(jobs, n_jobs, n_blocks, m, s);
  else
    launch_ternary_gemm(jobs, n_jobs, n_blocks, m, s);
}

void launch_dense(const void* w, DType dt, int64_t out, int64_t in, const float* x, int64_t m, float* y,
                  int64_t y_stride, bool accumulate, cudaStream_t s) {
  switch (dt) {
    case DType::F32: dense_typed<float>(w, out, in, x, m, y, y_stride, accumulate, s); break;
    case DType::F16: dense_typed<__half>(w, out, in, x, m, y, y_stride, accumulate, s); break;
    case DType::BF16: dense_typed<__nv_bfloat16>(w, out, in, x, m, y, y_stride, accumulate, s); break;
    default: throw std::invalid_argument("dense linear: dtype must be f32, f16 or bf16");
  }
}

void launch_embed(const void* embed, DType dt, int64_t d, const int32_t* tokens, int64_t n, float* x, cudaStream_t s) {
  const unsigned threads = static_cast<unsigned>(std::min<int64_t>(1024, ceil_div(d, 32) * 32));
  switch (dt) {
    case DType::F32: embed_kernel<<<static_cast<unsigned>(n), threads, 0, s>>>(static_cast<const float*>(embed), d, tokens, x); break;
    case DType::F16: embed_kernel<<<static_cast<unsigned>(n), threads, 0, s>>>(static_cast<const __half*>(embed), d, tokens, x); break;
    case DType::BF16:
      embed_kernel<<<static_cast<unsigned>(n), threads, 0, s>>>(static_cast<const __nv_bfloat16*>(embed), d, tokens, x);
      break;
    default: throw std::invalid_argument("embedding: dtype must be f32, f16 or bf16");
  }
  check_launch("embed");
}

void launch_row_prep(const float* a, const float* b, Act act, const int32_t* row_map, int64_t rows, int64_t n,
                     const float* norm_w, float norm_eps, float* out_f, int8_t* q, int64_t q_stride, float* s_x,
                     int32_t* sum, float act_eps, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(rows);
  switch (act) {
    case Act::None:
      row_prep_kernel<0><<<grid, kPrepThreads, 0, s>>>(a, b, row_map, n, norm_w, norm_eps, out_f, q, q_stride, s_x, sum, act_eps);
      break;
    case Act::SwiGLU:
      row_prep_kernel<1><<<grid, kPrepThreads, 0, s>>>(a, b, row_map, n, norm_w, norm_eps, out_f, q, q_stride, s_x, sum, act_eps);
      break;
    case Act::ReLU2:
      row_prep_kernel<2><<<grid, kPrepThreads, 0, s>>>(a, b, row_map, n, norm_w, norm_eps, out_f, q, q_stride, s_x, sum, act_eps);
      break;
  }
  check_launch("row_prep");
}

void launch_add_bias(float* y, const float* bias, int64_t rows, int64_t n, cudaStream_t s) {
  const int64_t total = rows * n;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
  add_bias_kernel<<<grid, 256, 0, s>>>(y, bias, total, n);
  check_launch("add_bias");
}

void launch_rope_store(float* q, const float* k, const float* v, int64_t n, int64_t nh, const CacheView& c,
                       const float* cos_t, const float* sin_t, const int32_t* tok_seq, const int32_t* tok_pos,
                       cudaStream_t s) {
  rope_store_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(q, k, v, nh, c, cos_t, sin_t, tok_seq, tok_pos);
  check_launch("rope_store");
}

void launch_attention(const float* q, const CacheView& c, int64_t n, int64_t nh, const int32_t* tok_seq,
                      const int32_t* tok_pos, float* out, cudaStream_t s) {
  const size_t smem = static_cast<size_t>(2 * c.hd + kAttnThreads) * sizeof(float);
  if (smem > static_cast<size_t>(g_max_dynamic_smem)) throw std::invalid_argument("attention: head_dim too large");
  if (smem > 48 * 1024) cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));  // as the CPU engine
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(nh));
  attention_kernel<<<grid, kAttnThreads, smem, s>>>(q, c, nh, tok_seq, tok_pos, out, scale);
  check_launch("attention");
}

void launch_argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* idx, cudaStream_t s) {
  argmax_kernel<<<static_cast<unsigned>(rows), 1024, 0, s>>>(logits, vocab, idx);
  check_launch("argmax");
}

void launch_greedy_advance(const int32_t* next, int64_t n, int32_t* tok_pos, int32_t* step, int32_t* out, cudaStream_t s) {
  greedy_advance_kernel<<<1, 256, 0, s>>>(next, n, tok_pos, step, out);
  check_launch("greedy_advance");
}

}  // namespace cuda
}  // namespace bitnet

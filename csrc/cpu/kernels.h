// CPU kernels: per-ISA function tables (scalar reference, AVX2, AVX-512 VNNI) and run-time choice.
//
// The quantization contract (DESIGN.md):
//   activation, per row:  s_x = 127 / max(max|x|, eps),  xq = clamp(nearbyint(x * s_x), -128, 127)
//   ternary linear:       y = float(sum_k c[r,k] * xq[k]) * (s_w / s_x), int32 accumulation.
// Each kernel handles a row range [r0, r1) of one matrix on the calling thread; threading lives
// in the drivers (threading.h) so several matrices can share one parallel region.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/i2_b128.h"
#include "cpu/t3_b160.h"

namespace bitnet {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, U8 = 3 };
const char* dtype_name(DType dt);
int64_t dtype_size(DType dt);

// How ternary codes are laid out in memory (both read in place): i2_b128 (cpu/i2_b128.h, 2 bits)
// or t3_b160 (cpu/t3_b160.h, 1.6 bits). Both have 32-byte blocks; the blocks per row differ.
enum class Packing : int { I2B128 = 0, T3B160 = 1 };
const char* packing_name(Packing p);               // "i2_b128" | "t3_b160"
Packing parse_packing(const std::string& name);    // throws std::invalid_argument naming the choices
inline int64_t packing_blocks_per_row(Packing p, int64_t in) {
  return p == Packing::T3B160 ? t3_blocks_per_row(in) : i2_blocks_per_row(in);
}
inline int64_t packing_row_bytes(Packing p, int64_t in) { return packing_blocks_per_row(p, in) * 32; }

// m activation rows quantized to int8. Row i: codes q[i*stride .. i*stride + n_pad), zero past n
// (n_pad = act_padded(n): n rounded up to 128 and to 160, so that both packings' kernels read whole
// blocks), scale s_x[i], and sum[i] = sum of its codes.
struct QuantRows {
  const int8_t* q = nullptr;
  int64_t stride = 0;
  const float* scale = nullptr;
  const int32_t* sum = nullptr;
  int64_t m = 0;
  // Optional: the same codes in the order of a table's pack_rows (the AMX kernels' B tiles), made
  // once per matrix input by QuantBuffer::pack; a kernel that wants them packs its own when null.
  const int8_t* packed = nullptr;
};

// Bytes of pack_rows' output for m rows of `stride` codes: 16-row x 64-code tiles of 1 KB.
inline int64_t packed_rows_bytes(int64_t m, int64_t stride) { return (m + 15) / 16 * ((stride + 63) / 64) * 1024; }

// n bytes of `storage` starting at a 64-byte boundary (grows it as needed; tile loads of rows that
// straddle cache lines read twice the lines).
template <class T>
T* aligned64(std::vector<T>& storage, size_t n) {
  if (storage.size() < n + 64) storage.resize(n + 64);
  const auto addr = reinterpret_cast<uintptr_t>(storage.data());
  return storage.data() + (64 - addr % 64) % 64;
}

inline int64_t act_padded(int64_t n) {
  const int64_t i2 = i2_blocks_per_row(n) * kI2BlockCodes, t3 = t3_blocks_per_row(n) * kT3BlockCodes;
  return i2 > t3 ? i2 : t3;
}

struct KernelTable;

// x with the packed copy table `kt` wants (pack_rows, from pack_min_rows rows) written into
// `storage` (64-byte aligned); x as it is when the table has none, wants none or x has one already.
QuantRows with_packed(const KernelTable& kt, const QuantRows& x, std::vector<int8_t>& storage);

// Owning buffer for QuantRows (64-byte aligned codes).
class QuantBuffer {
 public:
  void resize(int64_t m, int64_t n);  // keeps capacity; drops what pack made
  QuantRows view() const { return {q_, stride_, scale_.data(), sum_.data(), m_, packed_}; }
  // After the codes are written: the table's packed copy (pack_rows), if it has one and wants it for
  // m rows (kt.pack_min_rows); view() then carries it.
  void pack(const KernelTable& kt);
  int8_t* q() { return q_; }
  int64_t stride() const { return stride_; }
  float* scale() { return scale_.data(); }
  int32_t* sum() { return sum_.data(); }
  int64_t n() const { return n_; }
  int64_t m() const { return m_; }

 private:
  std::vector<int8_t> storage_;
  int8_t* q_ = nullptr;
  int64_t stride_ = 0, n_ = 0, m_ = 0;
  std::vector<float> scale_;
  std::vector<int32_t> sum_;
  std::vector<int8_t> packed_storage_;
  const int8_t* packed_ = nullptr;  // into packed_storage_ once pack made it
};

struct KernelTable {
  const char* name;
  // x: m rows of n floats (row stride x_stride) -> codes (row stride q_stride, zeros from n up to
  // q_stride), s_x and code sums.
  void (*quantize_rows)(const float* x, int64_t m, int64_t n, int64_t x_stride, float eps, int8_t* q,
                        int64_t q_stride, float* s_x, int32_t* sum);
  // w: i2_b128 matrix with n_blocks blocks per row. For r in [r0, r1), i in [0, x.m):
  //   y[i*y_stride + r] = float(sum_k c[r,k] * xq[i,k]) * (s_w / s_x[i])
  void (*ternary_rows)(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                       float s_w, float* y, int64_t y_stride);
  // The same for a t3_b160 matrix (n_blocks blocks of 160 codes per row; x padded to n_blocks * 160).
  void (*ternary_rows_t3)(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                          float s_w, float* y, int64_t y_stride);
  // w: dense (rows, n) matrix of dtype dt (f32/f16/bf16, any alignment). For r in [r0, r1), i < m:
  //   y[i*y_stride + r] = sum_k w[r,k] * x[i*x_stride + k]      (fp32 accumulation)
  void (*dense_rows)(const void* w, DType dt, int64_t n, int64_t r0, int64_t r1, const float* x, int64_t m,
                     int64_t x_stride, float* y, int64_t y_stride);
  // One query against len cached positions of one head (fp32, keys after RoPE; rows of hd floats):
  //   p[j] = exp(scale * q.K[j] - max), out = sum_j p[j] V[j] / sum_j p[j].   p: len floats of scratch.
  void (*attend)(const float* q, const float* K, const float* V, int64_t len, int64_t hd, float scale, float* p,
                 float* out);
  // The same with K and V stored as fp16 bits (the f16 KV cache); fp32 arithmetic.
  void (*attend_f16)(const float* q, const uint16_t* K, const uint16_t* V, int64_t len, int64_t hd, float scale,
                     float* p, float* out);
  // w: (rows, n) int8 with a per-row scale (the int8 lm_head). For r in [r0, r1), i < m:
  //   y[i*y_stride + r] = w_scale[r] * sum_k w[r,k] * x[i*x_stride + k]      (fp32 accumulation)
  void (*int8_rows)(const int8_t* w, const float* w_scale, int64_t n, int64_t r0, int64_t r1, const float* x,
                    int64_t m, int64_t x_stride, float* y, int64_t y_stride);
  // out[i] = fp32_to_fp16(x[i]) for i < n, bit for bit (the f16 KV cache's stores; F16C where present).
  void (*to_fp16)(const float* x, int64_t n, uint16_t* out);
  // Optional (null elsewhere): the AMX table's reordering of quantized rows into its B tiles
  // (packed_rows_bytes(x.m, x.stride) bytes), worth making once per input from pack_min_rows rows.
  void (*pack_rows)(const QuantRows& x, int8_t* out) = nullptr;
  int64_t pack_min_rows = 0;
};

// The attention and int8 kernels by name (the AVX-512 table uses the AVX2 ones: they are a small
// part of the work, and every AVX-512 CPU has AVX2).
// T = float (fp32 cache) or uint16_t (fp16 bits); instantiated for both.
template <class T>
void attend_scalar(const float* q, const T* K, const T* V, int64_t len, int64_t hd, float scale, float* p, float* out);
void int8_rows_scalar(const int8_t* w, const float* w_scale, int64_t n, int64_t r0, int64_t r1, const float* x,
                      int64_t m, int64_t x_stride, float* y, int64_t y_stride);
void to_fp16_scalar(const float* x, int64_t n, uint16_t* out);
#ifdef BITNET_HAVE_AVX2
void to_fp16_avx2(const float* x, int64_t n, uint16_t* out);
template <class T>
void attend_avx2(const float* q, const T* K, const T* V, int64_t len, int64_t hd, float scale, float* p, float* out);
void int8_rows_avx2(const int8_t* w, const float* w_scale, int64_t n, int64_t r0, int64_t r1, const float* x,
                    int64_t m, int64_t x_stride, float* y, int64_t y_stride);
#endif

// Per-row symmetric int8 of a dense (rows, n) matrix: scale[r] = max|w_r| / 127 (1 for an all-zero
// row), q = clamp(nearbyint(w / scale[r]), -127, 127).  The reference of the int8 lm_head option.
void quantize_rows_int8(const void* w, DType dt, int64_t rows, int64_t n, int8_t* q, float* scale);

// Scalar kernels: the reference every other path is tested against.
extern const KernelTable kScalarKernels;
#ifdef BITNET_HAVE_AVX2
extern const KernelTable kAvx2Kernels;
#endif
#ifdef BITNET_HAVE_AVX512
extern const KernelTable kAvx512Kernels;
#endif
#ifdef BITNET_HAVE_AMX  // the AVX-512 table with AMX-INT8 ternary kernels for batches (kernels_amx.cpp)
extern const KernelTable kAmxKernels;
#endif
#ifdef BITNET_HAVE_AMX_EMULATED  // C++ test build: the AMX kernels on emulated tiles (kernels_amx.cpp)
extern const KernelTable kAmxEmulatedKernels;
#endif
#ifdef BITNET_HAVE_AVX512_EMULATED  // C++ test build: AVX-512 code on SIMDe (see kernels_avx512.cpp)
extern const KernelTable kAvx512EmulatedKernels;
#endif

// "scalar", "avx2", "avx512", "amx": those compiled in and supported by this CPU, best last.
std::vector<std::string> available_isas();
// The table for an ISA name; "" or "auto" picks BITNET_ISA from the environment if set, else the
// best available. Throws std::invalid_argument for an unknown name and std::runtime_error for an
// ISA this build or CPU lacks.
const KernelTable& select_kernels(const std::string& isa);

// Scan i2_b128 data for the invalid code q = 3; returns the index of the first bad byte or -1.
int64_t find_invalid_i2_byte(const uint8_t* data, int64_t n_bytes);
// Scan t3_b160 data for the 13 bytes that are no encoding (t3_byte_valid); first bad index or -1.
int64_t find_invalid_t3_byte(const uint8_t* data, int64_t n_bytes);
// Either scan, by packing.
inline int64_t find_invalid_byte(Packing p, const uint8_t* data, int64_t n_bytes) {
  return p == Packing::T3B160 ? find_invalid_t3_byte(data, n_bytes) : find_invalid_i2_byte(data, n_bytes);
}
// rows x in codes: t3_b160 (rows, t3_row_bytes(in)) -> i2_b128 (rows, i2_row_bytes(in)), the same
// codes (the CUDA engine's upload; tests). Padding codes stay c = 0.
void repack_t3_b160_to_i2_b128(const uint8_t* t3, int64_t rows, int64_t in, uint8_t* i2);

// fp16 / bf16 bit patterns -> fp32 (portable, used by the scalar paths and at load).
float fp16_to_fp32(uint16_t h);
// fp32 -> fp16 bits, round to nearest even; overflow to +-inf, NaN stays NaN (as F16C's vcvtps2ph
// and numpy's astype(float16)). The f16 KV cache stores keys and values through this one function,
// so every kernel path reads the same fp16 values.
uint16_t fp32_to_fp16(float f);
// A cached key/value element as fp32 (the attention kernels read fp32 or fp16 caches).
// Software prefetch distance of the memory-bound loops (decode rows, attention keys): 8 KiB, or
// BITNET_PREFETCH_BYTES (0: off), read by select_kernels (so at each engine's load). Zen 4: one
// AVX-512 thread streamed 32-33 GB/s of i2_b128 rows with it vs 26 without, decode attention 65 ->
// 106-130 tok/s. Sapphire Rapids (a 480 MiB L3): 2 threads over one 1.2 GB matrix streamed faster
// without (25 vs 19 GB/s), but whole-model decode was slower without (bitnet-large 56-62 vs 72-91
// tok/s): bench/README.md.
extern std::atomic<int64_t> g_prefetch_bytes;

// The cache lines of [p + d, p + d + bytes), d = g_prefetch_bytes, requested ahead of use (a
// prefetch never faults, so it may run past the end of a mapping). Into L2 (prefetcht1), not L1:
// measured on Zen 4, 2 threads, bitnet-large i2 decode +5% (15 of 19 interleaved rounds ahead),
// t3 and AVX2 unchanged within the noise (bench/README.md, session 16). The likely reason, not
// measured: an L1 prefetch holds one of the core's few L1 miss buffers until its line arrives.
inline void prefetch_ahead(const void* p, int64_t bytes) {
  const int64_t dist = g_prefetch_bytes.load(std::memory_order_relaxed);
  if (dist <= 0) return;
  const char* a = static_cast<const char*>(p) + dist;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(a + off, 0, 2);
}

// Decode attention reads the whole KV cache once per step, from memory: while a group of keys is
// scored, the keys g_prefetch_bytes ahead (up to `k_end`) are requested into L1 and the group's
// values into L2 for the weighted sum that follows.
inline void attend_prefetch(const void* k, const void* v, int64_t bytes, const void* k_end) {
  const int64_t dist = g_prefetch_bytes.load(std::memory_order_relaxed);
  if (dist <= 0) return;
  const char* a = static_cast<const char*>(k) + dist;
  const char* end = static_cast<const char*>(k_end);
  for (int64_t off = 0; off < bytes && a + off < end; off += 64) __builtin_prefetch(a + off, 0, 3);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(v) + off, 0, 2);
}

inline float kv_value(float v) { return v; }
inline float kv_value(uint16_t h) { return fp16_to_fp32(h); }
inline float bf16_to_fp32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// Row r of a dense matrix (n columns) converted to fp32.
void dense_row_to_fp32(const void* w, DType dt, int64_t n, int64_t r, float* out);

}  // namespace bitnet

// Scalar reference kernels (plain C++, readable top to bottom) and shared helpers.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu/kernels.h"

namespace bitnet {

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::U8: return "u8";
  }
  return "?";
}

int64_t dtype_size(DType dt) {
  switch (dt) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::U8: return 1;
  }
  return 0;
}

const char* packing_name(Packing p) { return p == Packing::T3B160 ? "t3_b160" : "i2_b128"; }

Packing parse_packing(const std::string& name) {
  if (name == "i2_b128") return Packing::I2B128;
  if (name == "t3_b160") return Packing::T3B160;
  if (name == "t3_b5")
    throw std::invalid_argument("ternary packing 't3_b5' is not read in place; repack it to i2_b128 first "
                                "(Engine.load does) or export with t3_b160");
  throw std::invalid_argument("unknown ternary packing '" + name + "'; expected i2_b128 or t3_b160");
}

void QuantBuffer::resize(int64_t m, int64_t n) {
  const int64_t n_pad = act_padded(n);
  const size_t need = static_cast<size_t>(m * n_pad) + 64;
  if (storage_.size() < need) storage_.resize(need);
  auto addr = reinterpret_cast<uintptr_t>(storage_.data());
  q_ = storage_.data() + ((64 - addr % 64) % 64);
  stride_ = n_pad;
  n_ = n;
  m_ = m;
  scale_.resize(static_cast<size_t>(m));
  sum_.resize(static_cast<size_t>(m));
  packed_ = nullptr;
}

QuantRows with_packed(const KernelTable& kt, const QuantRows& x, std::vector<int8_t>& storage) {
  if (kt.pack_rows == nullptr || x.packed != nullptr || x.m < kt.pack_min_rows) return x;
  int8_t* p = aligned64(storage, static_cast<size_t>(packed_rows_bytes(x.m, x.stride)));
  kt.pack_rows(x, p);
  QuantRows out = x;
  out.packed = p;
  return out;
}

void QuantBuffer::pack(const KernelTable& kt) {
  packed_ = nullptr;  // view() must not carry a copy of other codes into with_packed
  packed_ = with_packed(kt, view(), packed_storage_).packed;
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | man << 13;  // inf / nan
  } else {
    bits = sign | (exp + (127 - 15)) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

// Element k of a dense matrix row (any alignment).
inline float dense_at(const uint8_t* row, DType dt, int64_t k) {
  if (dt == DType::F32) {
    float f;
    std::memcpy(&f, row + 4 * k, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, row + 2 * k, 2);
  return dt == DType::F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
}

void quantize_rows_scalar(const float* x, int64_t m, int64_t n, int64_t x_stride, float eps, int8_t* q,
                          int64_t q_stride, float* s_x, int32_t* sum) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * x_stride;
    int8_t* qr = q + i * q_stride;
    float amax = 0.0f;
    for (int64_t k = 0; k < n; ++k) amax = std::fmax(amax, std::fabs(xr[k]));
    const float s = 127.0f / std::fmax(amax, eps);
    int32_t total = 0;
    for (int64_t k = 0; k < n; ++k) {
      // nearbyint: current rounding mode (to nearest, ties to even), as torch.round.
      const float v = std::fmin(std::fmax(std::nearbyint(xr[k] * s), -128.0f), 127.0f);
      qr[k] = static_cast<int8_t>(v);
      total += qr[k];
    }
    for (int64_t k = n; k < q_stride; ++k) qr[k] = 0;
    s_x[i] = s;
    sum[i] = total;
  }
}

void ternary_rows_scalar(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                         float s_w, float* y, int64_t y_stride) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * n_blocks * kI2BlockBytes;
    for (int64_t i = 0; i < x.m; ++i) {
      const int8_t* xq = x.q + i * x.stride;
      int32_t acc = 0;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* blk = row + b * kI2BlockBytes;
        for (int e = 0; e < kI2BlockCodes; ++e) acc += i2_code(blk, e) * xq[b * kI2BlockCodes + e];
      }
      y[i * y_stride + r] = static_cast<float>(acc) * (s_w / x.scale[i]);
    }
  }
}

// The reference of t3_b160: every code decoded by its definition (t3_code), one at a time.
void ternary_rows_t3_scalar(const uint8_t* w, int64_t n_blocks, int64_t r0, int64_t r1, const QuantRows& x,
                            float s_w, float* y, int64_t y_stride) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * n_blocks * kT3BlockBytes;
    for (int64_t i = 0; i < x.m; ++i) {
      const int8_t* xq = x.q + i * x.stride;
      int32_t acc = 0;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* blk = row + b * kT3BlockBytes;
        for (int e = 0; e < kT3BlockCodes; ++e) acc += t3_code(blk, e) * xq[b * kT3BlockCodes + e];
      }
      y[i * y_stride + r] = static_cast<float>(acc) * (s_w / x.scale[i]);
    }
  }
}

void dense_rows_scalar(const void* w, DType dt, int64_t n, int64_t r0, int64_t r1, const float* x, int64_t m,
                       int64_t x_stride, float* y, int64_t y_stride) {
  const auto* base = static_cast<const uint8_t*>(w);
  const int64_t esz = dtype_size(dt);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = base + r * n * esz;
    for (int64_t i = 0; i < m; ++i) {
      const float* xr = x + i * x_stride;
      float acc = 0.0f;
      for (int64_t k = 0; k < n; ++k) acc += dense_at(row, dt, k) * xr[k];
      y[i * y_stride + r] = acc;
    }
  }
}

}  // namespace

uint16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN, quiet
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds (to even) to inf
  if (ax < 0x38800000u) {  // below 2^-14: fp16 subnormal (or zero) = round(|f| * 2^24), exact scaling
    float a;
    std::memcpy(&a, &ax, sizeof a);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f)));
  }
  // normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even; a carry
  // out of the mantissa moves into the exponent, which is the right result
  const uint32_t odd = (ax >> 13) & 1u;
  return static_cast<uint16_t>(sign | ((ax - 0x38000000u + 0xfffu + odd) >> 13));
}

void to_fp16_scalar(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = fp32_to_fp16(x[i]);
}

template <class T>
void attend_scalar(const float* q, const T* K, const T* V, int64_t len, int64_t hd, float scale, float* p, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    float s = 0.0f;
    for (int64_t i = 0; i < hd; ++i) s += q[i] * kv_value(K[j * hd + i]);
    p[j] = s * scale;
    mx = std::max(mx, p[j]);
  }
  float denom = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    p[j] = std::exp(p[j] - mx);
    denom += p[j];
  }
  std::fill_n(out, hd, 0.0f);
  for (int64_t j = 0; j < len; ++j)
    for (int64_t i = 0; i < hd; ++i) out[i] += p[j] * kv_value(V[j * hd + i]);
  const float inv = 1.0f / denom;
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}
template void attend_scalar<float>(const float*, const float*, const float*, int64_t, int64_t, float, float*, float*);
template void attend_scalar<uint16_t>(const float*, const uint16_t*, const uint16_t*, int64_t, int64_t, float, float*,
                                      float*);

void int8_rows_scalar(const int8_t* w, const float* w_scale, int64_t n, int64_t r0, int64_t r1, const float* x,
                      int64_t m, int64_t x_stride, float* y, int64_t y_stride) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0.0f;
      for (int64_t k = 0; k < n; ++k) acc += static_cast<float>(w[r * n + k]) * x[i * x_stride + k];
      y[i * y_stride + r] = acc * w_scale[r];
    }
}

void quantize_rows_int8(const void* w, DType dt, int64_t rows, int64_t n, int8_t* q, float* scale) {
  std::vector<float> row(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    dense_row_to_fp32(w, dt, n, r, row.data());
    float amax = 0.0f;
    for (float v : row) amax = std::fmax(amax, std::fabs(v));
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    for (int64_t k = 0; k < n; ++k)
      q[r * n + k] = static_cast<int8_t>(std::fmin(std::fmax(std::nearbyint(row[k] / s), -127.0f), 127.0f));
    scale[r] = s;
  }
}

void dense_row_to_fp32(const void* w, DType dt, int64_t n, int64_t r, float* out) {
  const auto* row = static_cast<const uint8_t*>(w) + r * n * dtype_size(dt);
  for (int64_t k = 0; k < n; ++k) out[k] = dense_at(row, dt, k);
}

int64_t find_invalid_i2_byte(const uint8_t* data, int64_t n_bytes) {
  // q = 3 is the only invalid 2-bit code: both bits of a field set. Chunks of 4 KiB are OR-reduced
  // 8 bytes at a time (a loop the compiler vectorizes, no early exit); only a chunk that holds an
  // invalid code is searched byte by byte. Memory-bound: the load-time check of a 70B file.
  constexpr int64_t kChunk = 4096;
  constexpr uint64_t kLow = 0x5555555555555555ull;
  for (int64_t c0 = 0; c0 < n_bytes; c0 += kChunk) {
    const int64_t c1 = std::min(n_bytes, c0 + kChunk);
    uint64_t bad = 0;
    int64_t i = c0;
    for (; i + 8 <= c1; i += 8) {
      uint64_t w;
      std::memcpy(&w, data + i, 8);
      bad |= w & (w >> 1) & kLow;
    }
    for (; i < c1; ++i) bad |= data[i] & (data[i] >> 1) & 0x55u;
    if (bad)
      for (int64_t j = c0; j < c1; ++j)
        if (data[j] & (data[j] >> 1) & 0x55u) return j;
  }
  return -1;
}

int64_t find_invalid_t3_byte(const uint8_t* data, int64_t n_bytes) {
  // A byte is invalid when (243 * byte) mod 256 >= 243, i.e. when (13 * byte - 1) mod 256 < 13
  // (243 = -13 mod 256). As find_invalid_i2_byte: 4 KiB chunks reduced without an early exit (a
  // byte loop the compiler vectorizes), then only a bad chunk is searched byte by byte.
  constexpr int64_t kChunk = 4096;
  for (int64_t c0 = 0; c0 < n_bytes; c0 += kChunk) {
    const int64_t c1 = std::min(n_bytes, c0 + kChunk);
    uint8_t bad = 0;
    for (int64_t i = c0; i < c1; ++i) bad |= static_cast<uint8_t>(static_cast<uint8_t>(data[i] * 13u - 1u) < 13u);
    if (bad)
      for (int64_t j = c0; j < c1; ++j)
        if (!t3_byte_valid(data[j])) return j;
  }
  return -1;
}

void repack_t3_b160_to_i2_b128(const uint8_t* t3, int64_t rows, int64_t in, uint8_t* i2) {
  const int64_t t3_bytes = t3_row_bytes(in), i2_bytes = i2_row_bytes(in);
  const int64_t groups = i2_blocks_per_row(in) * 4;  // 32-element groups of an i2 row
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = t3 + r * t3_bytes;
    uint8_t* dst = i2 + r * i2_bytes;
    // element 32 g + j: t3 block g / 5, digit g % 5, byte j; i2 block g / 4, field g % 4, byte j
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* out = dst + (g / 4) * kI2BlockBytes;
      const int shift = 2 * static_cast<int>(g % 4);
      if (g % 4 == 0) std::memset(out, 0, kI2BlockBytes);
      for (int j = 0; j < 32; ++j) {
        const int q = 32 * g + j < in ? t3_digit(src[(g / 5) * kT3BlockBytes + j], static_cast<int>(g % 5)) : 1;
        out[j] = static_cast<uint8_t>(out[j] | q << shift);
      }
    }
  }
}

const KernelTable kScalarKernels = {"scalar", quantize_rows_scalar, ternary_rows_scalar, ternary_rows_t3_scalar,
                                    dense_rows_scalar, attend_scalar<float>, attend_scalar<uint16_t>,
                                    int8_rows_scalar, to_fp16_scalar};

}  // namespace bitnet

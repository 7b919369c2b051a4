// C++ tests for the CPU engine: every kernel table against the scalar reference on odd shapes, a
// tiny model forward on every table, and bad input -> exceptions. Also the ASan + UBSan target:
//   cmake -S . -B build/san -DBITNET_PYTHON=OFF -DBITNET_SANITIZE=ON && cmake --build build/san
//   build/san/bitnet_cpp_tests
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/matmul.h"
#include "engine.h"

using namespace bitnet;

namespace {

int g_checks = 0, g_failures = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

template <class E>
void expect_throw(const std::function<void()>& fn, const std::string& what, const char* needle) {
  try {
    fn();
    check(false, what + ": no exception");
  } catch (const E& e) {
    check(std::strstr(e.what(), needle) != nullptr, what + ": message '" + e.what() + "' lacks '" + needle + "'");
  } catch (const std::exception& e) {
    check(false, what + ": wrong exception type: " + e.what());
  }
}

std::vector<const KernelTable*> tables() {
  std::vector<const KernelTable*> out;
  for (const auto& isa : available_isas()) out.push_back(&select_kernels(isa));
#ifdef BITNET_HAVE_AVX512_EMULATED
  out.push_back(&kAvx512EmulatedKernels);
#endif
#ifdef BITNET_HAVE_AMX_EMULATED
  out.push_back(&kAmxEmulatedKernels);
#endif
  return out;
}

// (out, in) codes in {-1, 0, 1} -> i2_b128 bytes (layout of cpu/i2_b128.h, written independently).
std::vector<uint8_t> pack(const std::vector<int8_t>& codes, int64_t out, int64_t in) {
  const int64_t nb = i2_blocks_per_row(in);
  std::vector<uint8_t> w(static_cast<size_t>(out * nb * 32), 0);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t e = 0; e < nb * 128; ++e) {
      const int q = e < in ? codes[r * in + e] + 1 : 1;
      const int64_t b = e / 128, k = (e % 128) / 32, j = e % 32;
      w[r * nb * 32 + b * 32 + j] |= static_cast<uint8_t>(q << (2 * k));
    }
  return w;
}

// (out, in) codes -> t3_b160 bytes (layout of cpu/t3_b160.h, written independently): byte j of
// block b holds the digits q = c + 1 of elements 160 b + 32 k + j, k = 0..4, as v = sum q_k 3^(4-k),
// stored as ceil(256 v / 243).
std::vector<uint8_t> pack_t3(const std::vector<int8_t>& codes, int64_t out, int64_t in) {
  const int64_t nb = (in + 159) / 160;
  std::vector<uint8_t> w(static_cast<size_t>(out * nb * 32));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < 32; ++j) {
        int v = 0;
        for (int64_t k = 0; k < 5; ++k) {
          const int64_t e = 160 * b + 32 * k + j;
          v = 3 * v + (e < in ? codes[r * in + e] + 1 : 1);
        }
        w[r * nb * 32 + b * 32 + j] = static_cast<uint8_t>((256 * v + 242) / 243);  // ceil(256 v / 243)
      }
  return w;
}

void test_kernels(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> code(-1, 1);
  const int64_t shapes[][3] = {{1, 1, 1},  {3, 31, 2},  {17, 127, 3}, {33, 128, 4}, {64, 129, 5},
                               {40, 300, 7}, {9, 4133, 6}, {37, 300, 1}, {68, 129, 1}, {8, 4133, 1}};  // m = 1: decode tiles
  for (const KernelTable* kt : tables()) {
    const std::string isa = kt->name;
    for (const auto& s : shapes) {
      const int64_t out = s[0], in = s[1], m = s[2];
      std::vector<int8_t> codes(static_cast<size_t>(out * in));
      for (auto& c : codes) c = static_cast<int8_t>(code(rng));
      std::vector<float> x(static_cast<size_t>(m * in));
      for (auto& v : x) v = normal(rng) * 3.0f;
      if (m > 2) std::fill(x.begin() + in, x.begin() + 2 * in, 0.0f);  // an all-zero row
      const auto w = pack(codes, out, in);
      QuantBuffer qa, qb;
      qa.resize(m, in);
      qb.resize(m, in);
      kScalarKernels.quantize_rows(x.data(), m, in, in, 1e-5f, qa.q(), qa.stride(), qa.scale(), qa.sum());
      kt->quantize_rows(x.data(), m, in, in, 1e-5f, qb.q(), qb.stride(), qb.scale(), qb.sum());
      const std::string tag = isa + " " + std::to_string(out) + "x" + std::to_string(in) + "x" + std::to_string(m);
      check(std::memcmp(qa.q(), qb.q(), static_cast<size_t>(m * qa.stride())) == 0, tag + ": quantized codes");
      check(std::memcmp(qa.scale(), qb.scale(), static_cast<size_t>(m) * 4) == 0, tag + ": s_x");
      check(std::memcmp(qa.sum(), qb.sum(), static_cast<size_t>(m) * 4) == 0, tag + ": code sums");
      std::vector<float> ya(static_cast<size_t>(m * out)), yb(ya.size());
      ternary_matmul(kScalarKernels, Packing::I2B128, w.data(), out, in, qa.view(), 0.05f, ya.data(), 1);
      ternary_matmul(*kt, Packing::I2B128, w.data(), out, in, qb.view(), 0.05f, yb.data(), 2);
      check(std::memcmp(ya.data(), yb.data(), ya.size() * 4) == 0, tag + ": ternary matmul (bit-exact)");
      // dense: f32 and f16 weights, misaligned by one element to exercise unaligned loads
      for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
        const int64_t esz = dtype_size(dt);
        std::vector<uint8_t> buf(static_cast<size_t>((out * in + 1) * esz));
        for (int64_t i = 0; i < out * in; ++i) {
          const float f = normal(rng);
          uint32_t u;
          std::memcpy(&u, &f, 4);
          uint16_t h = dt == DType::F16 ? static_cast<uint16_t>(0x3c00u | (u & 0x3ffu)) : static_cast<uint16_t>(u >> 16);
          std::memcpy(buf.data() + (i + 1) * esz, dt == DType::F32 ? static_cast<const void*>(&f) : &h, static_cast<size_t>(esz));
        }
        const void* wd = buf.data() + esz;
        dense_matmul(kScalarKernels, wd, dt, out, in, x.data(), m, ya.data(), 1);
        dense_matmul(*kt, wd, dt, out, in, x.data(), m, yb.data(), 2);
        float err = 0.0f, mag = 1.0f;
        for (size_t i = 0; i < ya.size(); ++i) {
          err = std::fmax(err, std::fabs(ya[i] - yb[i]));
          mag = std::fmax(mag, std::fabs(ya[i]));
        }
        check(err <= 1e-4f * mag * std::sqrt(static_cast<float>(in)), tag + " dense " + dtype_name(dt));
      }
    }
  }
}

// One kernel call over many rows and an activation count that is not a multiple of 4: the row
// blocks (cpu/row_blocks.h) and their leftover tiles, without the engine's chunking in between.
void test_kernels_whole_range(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> code(-1, 1);
  const int64_t out = 75, in = 200, m = 9;
  std::vector<int8_t> codes(static_cast<size_t>(out * in));
  for (auto& c : codes) c = static_cast<int8_t>(code(rng));
  const auto w = pack(codes, out, in);
  std::vector<float> x(static_cast<size_t>(m * in)), wd(static_cast<size_t>(out * in));
  for (auto& v : x) v = normal(rng);
  for (auto& v : wd) v = normal(rng);
  QuantBuffer q;
  q.resize(m, in);
  kScalarKernels.quantize_rows(x.data(), m, in, in, 1e-5f, q.q(), q.stride(), q.scale(), q.sum());
  const int64_t nb = i2_blocks_per_row(in);
  std::vector<float> ta(static_cast<size_t>(m * out)), tb(ta.size(), NAN), da(ta.size()), db(ta.size(), NAN);
  kScalarKernels.ternary_rows(w.data(), nb, 0, out, q.view(), 0.05f, ta.data(), out);
  kScalarKernels.dense_rows(wd.data(), DType::F32, in, 0, out, x.data(), m, in, da.data(), out);
  for (const KernelTable* kt : tables()) {
    kt->ternary_rows(w.data(), nb, 0, out, q.view(), 0.05f, tb.data(), out);
    check(std::memcmp(ta.data(), tb.data(), ta.size() * 4) == 0, std::string(kt->name) + " ternary rows 0..75 x 9");
    kt->dense_rows(wd.data(), DType::F32, in, 0, out, x.data(), m, in, db.data(), out);
    float err = 0.0f;
    bool written = true;  // every output was written (they start as NaN)
    for (size_t i = 0; i < da.size(); ++i) {
      err = std::fmax(err, std::fabs(da[i] - db[i]));
      written = written && std::isfinite(db[i]);
    }
    check(written && err <= 1e-3f, std::string(kt->name) + " dense rows 0..75 x 9");
  }
}

// Extremes: every code +1 (or -1) against activations all at +-127 over 40 blocks, the worst case
// for the int16 partial sums of the SIMD ternary kernels.
void test_kernel_extremes() {
  const int64_t out = 5, in = 128 * 40, m = 6;
  for (int sign : {1, -1}) {
    std::vector<int8_t> codes(static_cast<size_t>(out * in), static_cast<int8_t>(sign));
    const auto w = pack(codes, out, in);
    std::vector<float> x(static_cast<size_t>(m * in));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t k = 0; k < in; ++k) x[i * in + k] = (i % 2 ? -1.0f : 1.0f) * (k % 7 == 0 ? 1.0f : 0.999f);
    for (const KernelTable* kt : tables()) {
      QuantBuffer qb;
      qb.resize(m, in);
      kt->quantize_rows(x.data(), m, in, in, 1e-5f, qb.q(), qb.stride(), qb.scale(), qb.sum());
      std::vector<float> ya(static_cast<size_t>(m * out)), yb(ya.size());
      ternary_matmul(kScalarKernels, Packing::I2B128, w.data(), out, in, qb.view(), 1.0f, ya.data(), 1);
      ternary_matmul(*kt, Packing::I2B128, w.data(), out, in, qb.view(), 1.0f, yb.data(), 1);
      check(std::memcmp(ya.data(), yb.data(), ya.size() * 4) == 0,
            std::string(kt->name) + ": ternary matmul at the int16 extremes (sign " + std::to_string(sign) + ")");
      const int32_t expect = sign * static_cast<int32_t>(qb.q()[0]) * static_cast<int32_t>(in);
      check(std::fabs(yb[0] * qb.scale()[0] - static_cast<float>(expect)) <= 1e-3f * std::fabs(static_cast<float>(expect)),
            std::string(kt->name) + ": extreme dot equals codes * in");
    }
  }
}

// t3_b160's byte code: the 243 encodings decode to their digits, the other 13 bytes are invalid
// and found by the scan; the repack to i2_b128 keeps every code.
void test_t3_layout(std::mt19937& rng) {
  std::vector<int> is_code(256, 0);
  bool digits_ok = true;
  for (int v = 0; v < 243; ++v) {
    int q[5];
    for (int k = 0, rest = v; k < 5; ++k) {
      q[4 - k] = rest % 3;
      rest /= 3;
    }
    const uint8_t byte = t3_encode(q);
    is_code[byte] += 1;
    for (int k = 0; k < 5; ++k) digits_ok = digits_ok && t3_digit(byte, k) == q[k];
    digits_ok = digits_ok && ((byte * 243) >> 8) == v;
  }
  check(digits_ok, "t3_b160: every encoding decodes to its digits (and v = byte * 243 >> 8)");
  int n_codes = 0;
  bool valid_ok = true;
  for (int b = 0; b < 256; ++b) {
    n_codes += is_code[b] == 1;
    valid_ok = valid_ok && t3_byte_valid(static_cast<uint8_t>(b)) == (is_code[b] == 1);
    std::vector<uint8_t> buf(5000, t3_encode(std::array<int, 5>{1, 1, 1, 1, 1}.data()));
    buf[4321] = static_cast<uint8_t>(b);
    const int64_t at = find_invalid_t3_byte(buf.data(), static_cast<int64_t>(buf.size()));
    valid_ok = valid_ok && at == (is_code[b] == 1 ? -1 : 4321);
  }
  check(n_codes == 243 && valid_ok, "t3_b160: 243 distinct encodings; t3_byte_valid and the scan reject the other 13");
  std::uniform_int_distribution<int> code(-1, 1);
  for (const auto& s : {std::array<int64_t, 2>{3, 1}, {2, 159}, {5, 160}, {4, 161}, {3, 300}, {2, 641}, {1, 1000}}) {
    const int64_t out = s[0], in = s[1];
    std::vector<int8_t> codes(static_cast<size_t>(out * in));
    for (auto& c : codes) c = static_cast<int8_t>(code(rng));
    const auto t3 = pack_t3(codes, out, in);
    check(static_cast<int64_t>(t3.size()) == out * t3_row_bytes(in), "t3_b160 row bytes");
    bool codes_ok = true;
    for (int64_t r = 0; r < out; ++r)
      for (int64_t e = 0; e < t3_blocks_per_row(in) * 160; ++e)
        codes_ok = codes_ok && t3_code(t3.data() + r * t3_row_bytes(in) + (e / 160) * 32, static_cast<int>(e % 160)) ==
                                   (e < in ? codes[r * in + e] : 0);
    check(codes_ok, "t3_code reads back every code and zero padding, in " + std::to_string(in));
    std::vector<uint8_t> i2(static_cast<size_t>(out * i2_row_bytes(in)), 0xAA);
    repack_t3_b160_to_i2_b128(t3.data(), out, in, i2.data());
    check(i2 == pack(codes, out, in), "repack t3_b160 -> i2_b128, in " + std::to_string(in));
  }
}

// Batches (m >= 16: the AMX kernels' range; below it every table's tiles) in both packings against
// the scalar reference, bit for bit: activation counts around the 16-row tiles and 32-row groups,
// rows that are not a multiple of 64 / 128 / 160 (a row stride of 2720 codes ends inside a 64-code
// tile), row ranges that start inside a 32-row panel, a y stride wider than the matrix, and the
// int32 extremes (every code +-1 against +-127 over 90 blocks).
void test_batch_kernels(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> code(-1, 1);
  const int64_t shapes[][2] = {{1, 1}, {17, 63}, {16, 64}, {33, 65}, {50, 200}, {35, 641}, {20, 2561}, {40, 160 * 90}};
  for (const auto& s : shapes) {
    const int64_t out = s[0], in = s[1];
    const bool extreme = in == 160 * 90;
    std::vector<int8_t> codes(static_cast<size_t>(out * in));
    for (auto& c : codes) c = static_cast<int8_t>(extreme ? (out % 2 ? 1 : -1) : code(rng));
    const auto t3 = pack_t3(codes, out, in), i2 = pack(codes, out, in);
    for (int64_t m : {16, 17, 31, 32, 33, 47, 70}) {
      std::vector<float> x(static_cast<size_t>(m * in));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t k = 0; k < in; ++k)
          x[i * in + k] = extreme ? (i % 2 ? -1.0f : 1.0f) : normal(rng) * 3.0f;
      if (!extreme) std::fill(x.begin() + in, x.begin() + 2 * in, 0.0f);  // an all-zero row
      QuantBuffer qb;
      qb.resize(m, in);
      kScalarKernels.quantize_rows(x.data(), m, in, in, 1e-5f, qb.q(), qb.stride(), qb.scale(), qb.sum());
      const int64_t r0 = out > 20 ? 5 : 0, ys = out + 3;
      std::vector<float> ya(static_cast<size_t>(m * ys), 0.0f), yb(ya.size());
      const std::string tag = std::to_string(out) + "x" + std::to_string(in) + "x" + std::to_string(m);
      for (Packing p : {Packing::I2B128, Packing::T3B160}) {
        const auto& w = p == Packing::T3B160 ? t3 : i2;
        const int64_t nb = packing_blocks_per_row(p, in);
        auto rows = [&](const KernelTable& kt) { return p == Packing::T3B160 ? kt.ternary_rows_t3 : kt.ternary_rows; };
        std::fill(ya.begin(), ya.end(), 0.0f);
        rows(kScalarKernels)(w.data(), nb, r0, out, qb.view(), 0.05f, ya.data(), ys);
        if (extreme)
          check(ya[r0] * qb.scale()[0] == (out % 2 ? 1.0f : -1.0f) * 127.0f * static_cast<float>(in) * 0.05f,
                "scalar batch extreme dot equals codes * in, " + tag);
        for (const KernelTable* kt : tables()) {
          std::fill(yb.begin(), yb.end(), 0.0f);  // the columns outside [r0, out) must stay untouched
          rows(*kt)(w.data(), nb, r0, out, qb.view(), 0.05f, yb.data(), ys);
          check(std::memcmp(ya.data(), yb.data(), ya.size() * 4) == 0,
                std::string(kt->name) + " " + packing_name(p) + " batch rows " + std::to_string(r0) + ".." + tag);
        }
      }
    }
  }
}

// Every table's t3_b160 kernel against the scalar reference and against i2_b128 on the same codes
// (integer math: bit-identical), on rows that are not a multiple of 160, odd row counts, m = 1..17.
void test_t3_kernels(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> code(-1, 1);
  const int64_t shapes[][2] = {{1, 1}, {3, 31}, {17, 159}, {33, 160}, {9, 161}, {31, 319}, {5, 321}, {7, 1000}, {3, 2600}};
  for (const auto& s : shapes) {
    const int64_t out = s[0], in = s[1];
    std::vector<int8_t> codes(static_cast<size_t>(out * in));
    for (auto& c : codes) c = static_cast<int8_t>(code(rng));
    const auto t3 = pack_t3(codes, out, in), i2 = pack(codes, out, in);
    for (int64_t m = 1; m <= 17; m += (in > 1000 ? 4 : 1)) {
      std::vector<float> x(static_cast<size_t>(m * in));
      for (auto& v : x) v = normal(rng) * 3.0f;
      if (m > 2) std::fill(x.begin() + in, x.begin() + 2 * in, 0.0f);  // an all-zero row
      QuantBuffer qb;
      qb.resize(m, in);
      kScalarKernels.quantize_rows(x.data(), m, in, in, 1e-5f, qb.q(), qb.stride(), qb.scale(), qb.sum());
      std::vector<float> ya(static_cast<size_t>(m * out)), yb(ya.size(), NAN), yi(ya.size());
      ternary_matmul(kScalarKernels, Packing::T3B160, t3.data(), out, in, qb.view(), 0.05f, ya.data(), 1);
      ternary_matmul(kScalarKernels, Packing::I2B128, i2.data(), out, in, qb.view(), 0.05f, yi.data(), 1);
      const std::string tag = std::to_string(out) + "x" + std::to_string(in) + "x" + std::to_string(m);
      check(ya == yi, "scalar t3_b160 == scalar i2_b128 on the same codes, " + tag);
      for (const KernelTable* kt : tables()) {
        std::fill(yb.begin(), yb.end(), NAN);
        kt->ternary_rows_t3(t3.data(), t3_blocks_per_row(in), 0, out, qb.view(), 0.05f, yb.data(), out);  // one call, all rows
        check(std::memcmp(ya.data(), yb.data(), ya.size() * 4) == 0, std::string(kt->name) + " t3_b160 rows " + tag);
      }
    }
  }
  // Extremes: every code +1 (or -1) against activations at +-127, over 41 blocks (the int16 sums of
  // the AVX2 kernel) and over 1100 blocks (the int32 folds of the AVX-512 decode kernel).
  for (int64_t in : {160 * 41 + 37, 160 * 1100 + 5}) {
    const int64_t out = 3, m = in > 100000 ? 2 : 6;
    for (int sign : {1, -1}) {
      std::vector<int8_t> codes(static_cast<size_t>(out * in), static_cast<int8_t>(sign));
      const auto t3 = pack_t3(codes, out, in);
      std::vector<float> x(static_cast<size_t>(m * in));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t k = 0; k < in; ++k) x[i * in + k] = (i % 2 ? -1.0f : 1.0f) * (k % 7 == 0 ? 1.0f : 0.999f);
      QuantBuffer qb;
      qb.resize(m, in);
      kScalarKernels.quantize_rows(x.data(), m, in, in, 1e-5f, qb.q(), qb.stride(), qb.scale(), qb.sum());
      std::vector<float> ya(static_cast<size_t>(m * out)), yb(ya.size());
      ternary_matmul(kScalarKernels, Packing::T3B160, t3.data(), out, in, qb.view(), 1.0f, ya.data(), 1);
      const int32_t expect = sign * static_cast<int32_t>(qb.q()[0]) * static_cast<int32_t>(in);
      check(std::fabs(ya[0] * qb.scale()[0] - static_cast<float>(expect)) <= 1e-3f * std::fabs(static_cast<float>(expect)),
            "scalar t3_b160 extreme dot equals codes * in");
      for (const KernelTable* kt : tables()) {
        ternary_matmul(*kt, Packing::T3B160, t3.data(), out, in, qb.view(), 1.0f, yb.data(), 1);
        check(std::memcmp(ya.data(), yb.data(), ya.size() * 4) == 0, std::string(kt->name) + ": t3_b160 extremes, in " +
                                                                          std::to_string(in) + " sign " + std::to_string(sign));
      }
    }
  }
}

void test_attention(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  for (const KernelTable* kt : tables())
    for (int64_t hd : {1, 7, 8, 10, 15, 16, 17, 32, 40, 64, 80, 96, 100, 128, 144, 160, 257})
      for (int64_t len : {1, 3, 4, 5, 17, 130}) {
        std::vector<float> q(static_cast<size_t>(hd)), K(static_cast<size_t>(len * hd)), V(K.size());
        for (auto& v : q) v = normal(rng);
        for (auto& v : K) v = normal(rng);
        for (auto& v : V) v = normal(rng);
        std::vector<float> pa(static_cast<size_t>(len)), pb(pa.size()), oa(q.size()), ob(q.size(), NAN);
        attend_scalar(q.data(), K.data(), V.data(), len, hd, 0.3f, pa.data(), oa.data());
        kt->attend(q.data(), K.data(), V.data(), len, hd, 0.3f, pb.data(), ob.data());
        float err = 0.0f;
        for (int64_t i = 0; i < hd; ++i) err = std::fmax(err, std::fabs(oa[i] - ob[i]));
        check(err <= 1e-5f * (1.0f + std::sqrt(static_cast<float>(hd))),
              std::string(kt->name) + " attention hd " + std::to_string(hd) + " len " + std::to_string(len));
      }
}

// fp32 -> fp16 (the f16 KV cache): every finite fp16 value round-trips, and the rounding cases.
void test_fp16_rounding() {
  int bad = 0;
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const auto b = static_cast<uint16_t>(h);
    if ((b & 0x7c00u) == 0x7c00u && (b & 0x3ffu)) continue;  // NaN
    if (fp32_to_fp16(fp16_to_fp32(b)) != b) ++bad;
  }
  check(bad == 0, "fp16 -> fp32 -> fp16 round-trips every non-NaN pattern (" + std::to_string(bad) + " did not)");
  struct Case {
    float f;
    uint16_t h;
    const char* what;
  } cases[] = {
      {1.0f, 0x3c00, "1"},
      {-2.0f, 0xc000, "-2"},
      {-0.0f, 0x8000, "-0"},
      {1.0f + 0x1p-11f, 0x3c00, "tie below 1 + 2^-10 rounds to even (down)"},
      {1.0f + 3 * 0x1p-11f, 0x3c02, "tie above 1 + 2^-10 rounds to even (up)"},
      {1.0f + 0x1p-11f + 0x1p-20f, 0x3c01, "just above a tie rounds up"},
      {65504.0f, 0x7bff, "max"},
      {65519.0f, 0x7bff, "below the overflow tie"},
      {65520.0f, 0x7c00, "overflow tie rounds to inf"},
      {1e30f, 0x7c00, "overflow"},
      {-INFINITY, 0xfc00, "-inf"},
      {0x1p-24f, 0x0001, "smallest subnormal"},
      {0x1p-25f, 0x0000, "half the smallest subnormal: tie to even (0)"},
      {3 * 0x1p-25f, 0x0002, "1.5 subnormal units: tie to even (2)"},
      {0x1p-14f - 0x1p-25f, 0x0400, "largest subnormal tie carries into the smallest normal"},
      {1e-30f, 0x0000, "underflow"},
  };
  for (const Case& c : cases)
    check(fp32_to_fp16(c.f) == c.h, std::string("fp32_to_fp16: ") + c.what);
  const uint16_t nan = fp32_to_fp16(NAN);
  check((nan & 0x7c00u) == 0x7c00u && (nan & 0x3ffu), "fp32_to_fp16: NaN stays NaN");

  // every table's to_fp16 (the KV cache's stores) = fp32_to_fp16 bit for bit: the cases above, every
  // fp16 value and the midpoints next to it, and random fp32 bit patterns (NaNs, subnormals, all)
  std::vector<float> xs;
  for (const Case& c : cases) xs.push_back(c.f);
  xs.push_back(NAN);
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = fp16_to_fp32(static_cast<uint16_t>(h));
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    for (uint32_t d : {0u, 0xfffu, 0x1000u, 0x1001u}) {  // the value, just below / on / above the tie
      const uint32_t v = u + d;
      float g;
      std::memcpy(&g, &v, sizeof g);
      xs.push_back(g);
    }
  }
  std::mt19937 bits(7);
  for (int i = 0; i < 200003; ++i) {  // an odd count: the vector loops' scalar tails run too
    const uint32_t v = static_cast<uint32_t>(bits());
    float g;
    std::memcpy(&g, &v, sizeof g);
    xs.push_back(g);
  }
  std::vector<uint16_t> ref(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) ref[i] = fp32_to_fp16(xs[i]);
  for (const KernelTable* kt : tables()) {
    std::vector<uint16_t> got(xs.size(), 0x1234);
    kt->to_fp16(xs.data(), static_cast<int64_t>(xs.size()), got.data());
    const auto diff = std::mismatch(got.begin(), got.end(), ref.begin()).first;
    check(diff == got.end(), std::string(kt->name) + " to_fp16 = fp32_to_fp16 bit for bit" +
                                 (diff == got.end() ? "" : " (first difference at element " +
                                                               std::to_string(diff - got.begin()) + ")"));
  }
}

// attend_f16: every table against the scalar fp16 reference, and that reference against the fp32
// one on the same values (fp16 storage changes nothing but the stored values).
void test_attention_f16(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  for (int64_t hd : {1, 7, 8, 10, 17, 64, 96, 100, 128, 160})
    for (int64_t len : {1, 3, 4, 5, 130}) {
      std::vector<float> q(static_cast<size_t>(hd)), Kf(static_cast<size_t>(len * hd)), Vf(Kf.size());
      std::vector<uint16_t> K(Kf.size()), V(Kf.size());
      for (auto& v : q) v = normal(rng);
      for (size_t i = 0; i < K.size(); ++i) {
        K[i] = fp32_to_fp16(normal(rng));
        V[i] = fp32_to_fp16(normal(rng));
        Kf[i] = fp16_to_fp32(K[i]);
        Vf[i] = fp16_to_fp32(V[i]);
      }
      std::vector<float> pa(static_cast<size_t>(len)), pb(pa.size()), oa(q.size()), ob(q.size(), NAN);
      attend_scalar(q.data(), Kf.data(), Vf.data(), len, hd, 0.3f, pa.data(), oa.data());
      attend_scalar(q.data(), K.data(), V.data(), len, hd, 0.3f, pb.data(), ob.data());
      check(oa == ob, "scalar f16 attention = scalar fp32 attention on the fp16 values, hd " + std::to_string(hd));
      for (const KernelTable* kt : tables()) {
        std::fill(ob.begin(), ob.end(), NAN);
        kt->attend_f16(q.data(), K.data(), V.data(), len, hd, 0.3f, pb.data(), ob.data());
        float err = 0.0f;
        for (int64_t i = 0; i < hd; ++i) err = std::fmax(err, std::fabs(oa[i] - ob[i]));
        check(err <= 1e-5f * (1.0f + std::sqrt(static_cast<float>(hd))),
              std::string(kt->name) + " f16 attention hd " + std::to_string(hd) + " len " + std::to_string(len));
      }
    }
}

struct TinyModel {
  ModelConfig cfg;
  std::vector<std::vector<uint8_t>> bufs;
  TensorMap map;
};

TinyModel tiny_model(std::mt19937& rng, NormKind norm, FfnKind ffn, bool qkv_bias = false, bool qk_norm = false,
                     Packing packing = Packing::I2B128) {
  TinyModel t;
  ModelConfig& c = t.cfg;
  c.packing = packing;
  c.vocab_size = 50;
  c.hidden_size = 40;
  c.intermediate_size = 72;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 10;
  c.max_seq_len = 16;
  c.norm = norm;
  c.ffn = ffn;
  c.qkv_bias = qkv_bias;
  c.qk_norm = qk_norm;
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::uniform_int_distribution<int> code(-1, 1);
  auto dense = [&](const std::string& name, std::vector<int64_t> shape, float base) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<uint8_t> b(static_cast<size_t>(n * 4));
    for (int64_t i = 0; i < n; ++i) {
      const float f = base + normal(rng);
      std::memcpy(b.data() + 4 * i, &f, 4);
    }
    t.bufs.push_back(std::move(b));
    t.map[name] = {DType::F32, t.bufs.back().data(), shape};
  };
  auto linear = [&](const std::string& name, int64_t in, int64_t out) {
    std::vector<int8_t> codes(static_cast<size_t>(in * out));
    for (auto& v : codes) v = static_cast<int8_t>(code(rng));
    t.bufs.push_back(packing == Packing::T3B160 ? pack_t3(codes, out, in) : pack(codes, out, in));
    t.map[name + ".qweight"] = {DType::U8, t.bufs.back().data(), {out, packing_row_bytes(packing, in)}};
    const float s = 0.1f;
    t.bufs.emplace_back(4);
    std::memcpy(t.bufs.back().data(), &s, 4);
    t.map[name + ".scale"] = {DType::F32, t.bufs.back().data(), {1}};
    if (norm == NormKind::BitLinear) dense(name + ".norm.weight", {in}, 1.0f);
  };
  t.bufs.reserve(200);  // pointers into bufs stay valid
  const int64_t d = c.hidden_size, f = c.intermediate_size, qd = c.num_heads * c.head_dim, kvd = c.num_kv_heads * c.head_dim;
  dense("embed_tokens.weight", {c.vocab_size, d}, 0.0f);
  dense("lm_head.weight", {c.vocab_size, d}, 0.0f);
  dense("norm.weight", {d}, 1.0f);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    dense(p + "input_layernorm.weight", {d}, 1.0f);
    dense(p + "post_attention_layernorm.weight", {d}, 1.0f);
    linear(p + "self_attn.q_proj", d, qd);
    linear(p + "self_attn.k_proj", d, kvd);
    linear(p + "self_attn.v_proj", d, kvd);
    linear(p + "self_attn.o_proj", qd, d);
    linear(p + "mlp.gate_proj", d, f);
    linear(p + "mlp.up_proj", d, f);
    linear(p + "mlp.down_proj", f, d);
    if (norm == NormKind::SubLN) {
      dense(p + "self_attn.attn_sub_norm.weight", {qd}, 1.0f);
      dense(p + "mlp.ffn_sub_norm.weight", {f}, 1.0f);
    }
    if (qkv_bias) {
      dense(p + "self_attn.q_proj.bias", {qd}, 0.0f);
      dense(p + "self_attn.k_proj.bias", {kvd}, 0.0f);
      dense(p + "self_attn.v_proj.bias", {kvd}, 0.0f);
    }
    if (qk_norm) {
      dense(p + "self_attn.q_norm.weight", {c.head_dim}, 1.0f);
      dense(p + "self_attn.k_norm.weight", {c.head_dim}, 1.0f);
    }
  }
  return t;
}

std::vector<float> run(const Model& model, const std::vector<int32_t>& tokens, KVType kv = KVType::F32) {
  KVCache cache(model.config(), 2, model.config().max_seq_len, kv);
  Batch b;
  b.seq_ids = {1, 0};
  b.offsets = {0, 5, static_cast<int64_t>(tokens.size())};
  b.tokens = tokens.data();
  std::vector<float> logits(static_cast<size_t>(model.logits_rows(b, true) * model.config().vocab_size));
  model.forward(cache, b, true, logits.data());
  return logits;
}

// The int8 lm_head: kernels against the scalar one, the quantizer against its formula, and a model
// using it against the same model whose fp32 lm_head holds the dequantized int8 values.
void test_int8_lm_head(std::mt19937& rng, const std::vector<int32_t>& tokens) {
  std::normal_distribution<float> normal;
  for (const auto& s : {std::array<int64_t, 3>{3, 1, 1}, {17, 15, 2}, {9, 40, 5}, {33, 129, 4}}) {
    const int64_t rows = s[0], n = s[1], m = s[2];
    std::vector<float> w(static_cast<size_t>(rows * n)), x(static_cast<size_t>(m * n));
    for (auto& v : w) v = normal(rng);
    for (auto& v : x) v = normal(rng);
    std::fill_n(w.begin(), n, 0.0f);  // an all-zero row: scale 1, codes 0
    std::vector<int8_t> q(w.size());
    std::vector<float> scale(static_cast<size_t>(rows));
    quantize_rows_int8(w.data(), DType::F32, rows, n, q.data(), scale.data());
    bool formula = scale[0] == 1.0f;
    for (int64_t r = 1; r < rows; ++r) {
      float amax = 0.0f;
      for (int64_t k = 0; k < n; ++k) amax = std::fmax(amax, std::fabs(w[r * n + k]));
      formula = formula && scale[r] == amax / 127.0f;
      for (int64_t k = 0; k < n; ++k) formula = formula && q[r * n + k] == static_cast<int8_t>(std::nearbyint(w[r * n + k] / scale[r]));
    }
    check(formula, "int8 lm_head quantizer: scale = max|w|/127, q = round(w/scale)");
    std::vector<float> ya(static_cast<size_t>(m * rows)), yb(ya.size());
    int8_rows_scalar(q.data(), scale.data(), n, 0, rows, x.data(), m, n, ya.data(), rows);
    for (const KernelTable* kt : tables()) {
      kt->int8_rows(q.data(), scale.data(), n, 0, rows, x.data(), m, n, yb.data(), rows);
      float err = 0.0f;
      for (size_t i = 0; i < ya.size(); ++i) err = std::fmax(err, std::fabs(ya[i] - yb[i]));
      check(err <= 1e-4f * std::sqrt(static_cast<float>(n)), std::string(kt->name) + " int8 rows " + std::to_string(n));
    }
  }
  TinyModel t = tiny_model(rng, NormKind::SubLN, FfnKind::SwiGLU);
  const int64_t V = t.cfg.vocab_size, d = t.cfg.hidden_size;
  const auto* head = static_cast<const float*>(t.map["lm_head.weight"].data);
  std::vector<int8_t> q(static_cast<size_t>(V * d));
  std::vector<float> scale(static_cast<size_t>(V)), deq(q.size());
  quantize_rows_int8(head, DType::F32, V, d, q.data(), scale.data());
  for (int64_t i = 0; i < V * d; ++i) deq[i] = static_cast<float>(q[i]) * scale[i / d];
  for (const auto& isa : available_isas()) {
    Model m8(t.cfg, t.map, isa);
    m8.use_int8_lm_head();
    check(m8.int8_lm_head(), "use_int8_lm_head sets the flag");
    TensorMap dq = t.map;
    dq["lm_head.weight"].data = deq.data();
    Model md(t.cfg, dq, isa);
    check(m8.weight_bytes_per_token() < md.weight_bytes_per_token(), "int8 lm_head reads fewer bytes");
    const auto a = run(m8, tokens), b = run(md, tokens);
    float err = 0.0f;
    for (size_t i = 0; i < a.size(); ++i) err = std::fmax(err, std::fabs(a[i] - b[i]));
    check(err <= 1e-4f, isa + " int8 lm_head vs dequantized fp32 lm_head: err " + std::to_string(err));
  }
}

void test_engine(std::mt19937& rng) {
  const std::vector<int32_t> tokens = {1, 7, 3, 49, 0, 2, 2, 8};
  for (NormKind norm : {NormKind::SubLN, NormKind::BitLinear, NormKind::None})
    for (FfnKind ffn : {FfnKind::SwiGLU, FfnKind::ReLU2}) {
      TinyModel t = tiny_model(rng, norm, ffn);
      Model ref(t.cfg, t.map, "scalar");
      const auto base = run(ref, tokens);
      bool finite = true;
      for (float v : base) finite = finite && std::isfinite(v);
      check(finite, "scalar forward is finite");
      const auto base16 = run(ref, tokens, KVType::F16);
      check(base16 != base, "the f16 KV cache changes the logits (a little)");
      for (const auto& isa : available_isas()) {
        Model m(t.cfg, t.map, isa);
        for (KVType kv : {KVType::F32, KVType::F16}) {
          const auto got = run(m, tokens, kv);
          const auto& want = kv == KVType::F16 ? base16 : base;
          float err = 0.0f, mag = 1e-6f;
          for (size_t i = 0; i < got.size(); ++i) {
            err = std::fmax(err, std::fabs(got[i] - want[i]));
            mag = std::fmax(mag, std::fabs(want[i]));
          }
          // ternary math is exact; lm_head / dense sums reorder, and a rare int8 rounding flip follows
          check(err <= 0.05f * mag, "forward " + isa + " " + kv_type_name(kv) + " KV vs scalar: err " + std::to_string(err));
        }
      }
    }
  // Qwen2 biases and Qwen3 QK-norm: every ISA agrees with the scalar path, and each changes the logits
  for (const auto& [bias, qkn] : {std::pair{true, false}, std::pair{false, true}, std::pair{true, true}}) {
    TinyModel t = tiny_model(rng, NormKind::None, FfnKind::SwiGLU, bias, qkn);
    const auto base = run(Model(t.cfg, t.map, "scalar"), tokens);
    TinyModel plain = t;
    plain.cfg.qkv_bias = plain.cfg.qk_norm = false;
    for (auto it = plain.map.begin(); it != plain.map.end();)
      it = (it->first.find("_proj.bias") != std::string::npos || it->first.find("_norm.weight") != std::string::npos) &&
                   it->first.find("self_attn.") != std::string::npos
               ? plain.map.erase(it)
               : std::next(it);
    check(run(Model(plain.cfg, plain.map, "scalar"), tokens) != base, "q/k/v biases / QK-norm change the logits");
    for (const auto& isa : available_isas()) {
      const auto got = run(Model(t.cfg, t.map, isa), tokens);
      float err = 0.0f, mag = 1e-6f;
      for (size_t i = 0; i < got.size(); ++i) {
        err = std::fmax(err, std::fabs(got[i] - base[i]));
        mag = std::fmax(mag, std::fabs(base[i]));
      }
      check(err <= 0.05f * mag, "qkv_bias/qk_norm forward " + isa + " vs scalar: err " + std::to_string(err));
    }
    TinyModel missing = t;
    missing.map.erase(bias ? "layers.1.self_attn.v_proj.bias" : "layers.1.self_attn.k_norm.weight");
    expect_throw<std::invalid_argument>([&] { Model m(missing.cfg, missing.map, "scalar"); }, "a missing bias / QK-norm tensor",
                 bias ? "layers.1.self_attn.v_proj.bias" : "layers.1.self_attn.k_norm.weight");
  }
  test_int8_lm_head(rng, tokens);
  // t3_b160 weights read in place: the same logits as i2_b128 holding the same codes, on every ISA
  for (NormKind norm : {NormKind::SubLN, NormKind::BitLinear}) {
    std::mt19937 r1 = rng, r2 = rng;
    TinyModel a = tiny_model(r1, norm, FfnKind::SwiGLU, false, false, Packing::I2B128);
    TinyModel b = tiny_model(r2, norm, FfnKind::SwiGLU, false, false, Packing::T3B160);
    rng = r1;
    for (const auto& isa : available_isas()) {
      const Model mi(a.cfg, a.map, isa), mt(b.cfg, b.map, isa);
      check(run(mi, tokens) == run(mt, tokens), "forward " + isa + ": t3_b160 == i2_b128 (bit-identical)");
    }
  }
}

void test_bad_input(std::mt19937& rng) {
  TinyModel t = tiny_model(rng, NormKind::SubLN, FfnKind::SwiGLU);
  {
    TensorMap m = t.map;
    m["norm.weight"].shape = {41};
    expect_throw<std::invalid_argument>([&] { Model(t.cfg, m, "scalar"); }, "wrong norm shape", "'norm.weight' has shape (41,)");
  }
  {
    TensorMap m = t.map;
    m.erase("layers.1.mlp.up_proj.qweight");
    m.erase("layers.1.mlp.up_proj.scale");
    expect_throw<std::invalid_argument>([&] { Model(t.cfg, m, "scalar"); }, "missing linear", "layers.1.mlp.up_proj.weight");
  }
  {
    TensorMap m = t.map;
    m["extra.weight"] = m["norm.weight"];
    expect_throw<std::invalid_argument>([&] { Model(t.cfg, m, "scalar"); }, "extra tensor", "'extra.weight'");
  }
  {
    std::vector<uint8_t> bad(static_cast<size_t>(72 * i2_row_bytes(40)), 0x55);
    bad[100] = 0xff;
    TensorMap m = t.map;
    m["layers.0.mlp.gate_proj.qweight"].data = bad.data();
    expect_throw<std::invalid_argument>([&] { Model(t.cfg, m, "scalar"); }, "invalid code", "invalid 2-bit code 3 at byte 100");
  }
  {
    std::mt19937 r = rng;
    TinyModel t3 = tiny_model(r, NormKind::SubLN, FfnKind::SwiGLU, false, false, Packing::T3B160);
    std::vector<uint8_t> bad(static_cast<size_t>(72 * t3_row_bytes(40)), 121);
    bad[37] = 20;  // no encoding
    TensorMap m = t3.map;
    m["layers.1.mlp.up_proj.qweight"].data = bad.data();
    expect_throw<std::invalid_argument>([&] { Model(t3.cfg, m, "scalar"); }, "invalid t3 byte",
                                        "'layers.1.mlp.up_proj.qweight' holds the invalid t3_b160 byte 20 at byte 37");
    TensorMap wrong = t3.map;
    wrong["layers.0.self_attn.q_proj.qweight"].shape = {40, 64};
    expect_throw<std::invalid_argument>([&] { Model(t3.cfg, wrong, "scalar"); }, "t3 qweight shape",
                                        "has shape (40, 64); expected (40, 32) (t3_b160 ternary codes)");
  }
  expect_throw<std::invalid_argument>([] { parse_packing("t3_b5"); }, "t3_b5 is not read in place", "repack it to i2_b128");
  {
    ModelConfig c = t.cfg;
    c.num_kv_heads = 3;
    expect_throw<std::invalid_argument>([&] { Model(c, t.map, "scalar"); }, "bad config", "not a multiple of num_kv_heads");
  }
  expect_throw<std::invalid_argument>([&] { Model(t.cfg, t.map, "mmx"); }, "unknown isa", "unknown ISA 'mmx'");
  Model model(t.cfg, t.map, "");
  KVCache cache(t.cfg, 1, 8);
  std::vector<int32_t> toks(9, 1);
  Batch b;
  b.seq_ids = {0};
  b.offsets = {0, 9};
  b.tokens = toks.data();
  std::vector<float> logits(static_cast<size_t>(9 * t.cfg.vocab_size));
  expect_throw<std::invalid_argument>([&] { model.forward(cache, b, true, logits.data()); }, "context overflow", "exceeds the context of 8");
  b.offsets = {0, 3};
  toks[1] = 50;
  expect_throw<std::invalid_argument>([&] { model.forward(cache, b, true, logits.data()); }, "bad token", "token id 50");
  toks[1] = 1;
  b.seq_ids = {1};
  expect_throw<std::invalid_argument>([&] { model.forward(cache, b, true, logits.data()); }, "bad slot", "sequence slot 1 out of range");
  check(cache.length(0) == 0, "failed calls leave the cache unchanged");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  std::string isas;
  for (const KernelTable* kt : tables()) isas += std::string(" ") + kt->name;
  std::printf("kernel tables:%s\n", isas.c_str());
  test_kernels(rng);
  test_kernels_whole_range(rng);
  test_kernel_extremes();
  test_t3_layout(rng);
  test_t3_kernels(rng);
  test_batch_kernels(rng);
  test_attention(rng);
  test_fp16_rounding();
  test_attention_f16(rng);
  test_engine(rng);
  test_bad_input(rng);
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

// Streaming-read probe (bandwidth.h). Each ISA's loop is a target-attributed function, chosen by name.
#include "cpu/bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BITNET_X86 1
#endif

#include "cpu/parallel.h"

namespace bitnet {
namespace {

// Sum of 64-bit words of [p, p + n), n a multiple of 256: four independent accumulators.
uint64_t read_scalar(const uint8_t* p, int64_t n) {
#ifdef BITNET_X86
  __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 64) {
    a0 = _mm_add_epi64(a0, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i)));
    a1 = _mm_add_epi64(a1, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 16)));
    a2 = _mm_add_epi64(a2, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 32)));
    a3 = _mm_add_epi64(a3, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 48)));
  }
  const __m128i s = _mm_add_epi64(_mm_add_epi64(a0, a1), _mm_add_epi64(a2, a3));
  uint64_t out[2];
  std::memcpy(out, &s, sizeof(out));
  return out[0] + out[1];
#else
  uint64_t s[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < n; i += 32)
    for (int k = 0; k < 4; ++k) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * k, 8);
      s[k] += v;
    }
  return s[0] + s[1] + s[2] + s[3];
#endif
}

#ifdef BITNET_X86
__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  uint64_t out[4];
  std::memcpy(out, &s, sizeof(out));
  return out[0] + out[1] + out[2] + out[3];
}

__attribute__((target("avx512f"))) uint64_t read_avx512(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 192));
  }
  return static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3))));
}
#endif

}  // namespace

double stream_read_seconds(const uint8_t* data, int64_t bytes, int threads, const std::string& isa, int repeats,
                           uint64_t* checksum) {
  uint64_t (*read)(const uint8_t*, int64_t) = read_scalar;
#ifdef BITNET_X86
  if (isa == "avx512" || isa == "amx") read = read_avx512;  // amx: the AVX-512 loads (tiles add nothing to a read)
  else if (isa == "avx2") read = read_avx2;
  else if (isa != "scalar") throw std::invalid_argument("stream_read: unknown ISA '" + isa + "'");
#endif
  if (reinterpret_cast<uintptr_t>(data) % 64) throw std::invalid_argument("stream_read: the buffer must be 64-byte aligned");
  threads = std::max(1, threads);
  const int64_t share = bytes / threads / 256 * 256;  // each thread's contiguous part, whole 256-byte steps
  if (share <= 0) throw std::invalid_argument("stream_read: the buffer is too small for the thread count");
  double best = 1e300;
  std::vector<uint64_t> sums(static_cast<size_t>(threads));
  for (int rep = 0; rep < std::max(1, repeats); ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(threads, threads, [&](int64_t t) { sums[static_cast<size_t>(t)] = read(data + t * share, share); });
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  if (checksum) *checksum = total;
  return best;
}

}  // namespace bitnet

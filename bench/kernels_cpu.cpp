// Kernel microbenchmark: GMAC/s of each compiled ISA's ternary (i2_b128 "ternary", t3_b160 "t3")
// and dense kernels on one thread, for decode (m = 1), batches (m = 8, 16, 32) and prefill (m = 128, 512).
// Prints a table; "weight GB/s" counts the packed bytes each kernel reads.
//   cmake -S . -B build/bench -DBITNET_PYTHON=OFF -DBITNET_CPP_TESTS=ON -DBITNET_CUDA=OFF
//   cmake --build build/bench --target bitnet_kernel_bench && build/bench/bitnet_kernel_bench [OUT IN]
// OUT x IN is the weight matrix (default 4096 x 1536, 1.5 MB ternary: L3-resident on most CPUs; a
// small one such as 64 1536 stays in L1/L2 and shows the kernel's compute ceiling).
#include <chrono>
#include <functional>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/kernels.h"

using namespace bitnet;

namespace {

double seconds_per_call(const std::function<void()>& fn, double min_seconds = 0.3) {
  fn();  // warm
  int reps = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double el = 0;
  do {
    fn();
    ++reps;
    el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (el < min_seconds);
  return el / reps;
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(1);
  const int64_t out = argc > 1 ? std::atoll(argv[1]) : 4096, in = argc > 2 ? std::atoll(argv[2]) : 1536;
  if (out < 1 || in < 1) {
    std::fprintf(stderr, "usage: %s [OUT IN] (positive sizes)\n", argv[0]);
    return 2;
  }
  std::printf("weight matrix %lld x %lld\n", static_cast<long long>(out), static_cast<long long>(in));
  const int64_t nb = i2_blocks_per_row(in);
  std::vector<uint8_t> w(static_cast<size_t>(out * nb * kI2BlockBytes));
  std::uniform_int_distribution<int> code(0, 2);
  for (auto& b : w) b = static_cast<uint8_t>(code(rng) | code(rng) << 2 | code(rng) << 4 | code(rng) << 6);
  // t3_b160: each byte one of the 243 encodings, uniform (random codes; padding codes random too,
  // which costs nothing here: the padded activations are zero)
  const int64_t nb3 = t3_blocks_per_row(in);
  std::vector<uint8_t> w3(static_cast<size_t>(out * nb3 * kT3BlockBytes));
  std::uniform_int_distribution<int> value(0, 242);
  for (auto& b : w3) b = static_cast<uint8_t>((256 * value(rng) + 242) / 243);
  std::vector<uint16_t> wd(static_cast<size_t>(out * in));
  for (auto& h : wd) h = static_cast<uint16_t>(0x3000 + (rng() & 0x3ff));  // small fp16 values
  std::printf("%-8s %8s %6s %12s %12s\n", "isa", "kernel", "m", "GMAC/s", "weight GB/s");
  for (const std::string& isa : available_isas()) {
    const KernelTable& kt = select_kernels(isa);
    for (int64_t m : {1, 8, 16, 32, 128, 512}) {
      std::vector<float> x(static_cast<size_t>(m * in)), y(static_cast<size_t>(m * out));
      std::normal_distribution<float> nd;
      for (auto& v : x) v = nd(rng);
      QuantBuffer qb;
      qb.resize(m, in);
      kt.quantize_rows(x.data(), m, in, in, 1e-5f, qb.q(), qb.stride(), qb.scale(), qb.sum());
      const QuantRows xr = qb.view();
      if (isa == "scalar" && m > 8) continue;
      double s = seconds_per_call([&] { kt.ternary_rows(w.data(), nb, 0, out, xr, 0.02f, y.data(), out); });
      std::printf("%-8s %8s %6lld %12.2f %12.2f\n", isa.c_str(), "ternary", static_cast<long long>(m),
                  out * in * m / s * 1e-9, w.size() / s * 1e-9);
      s = seconds_per_call([&] { kt.ternary_rows_t3(w3.data(), nb3, 0, out, xr, 0.02f, y.data(), out); });
      std::printf("%-8s %8s %6lld %12.2f %12.2f\n", isa.c_str(), "t3", static_cast<long long>(m),
                  out * in * m / s * 1e-9, w3.size() / s * 1e-9);
      s = seconds_per_call([&] { kt.dense_rows(wd.data(), DType::F16, in, 0, out, x.data(), m, in, y.data(), out); });
      std::printf("%-8s %8s %6lld %12.2f %12.2f\n", isa.c_str(), "f16", static_cast<long long>(m),
                  out * in * m / s * 1e-9, wd.size() * 2 / s * 1e-9);
    }
  }
  // Decode attention: one query row over `len` fp16 cached positions (what a decode step runs per
  // head); GMAC/s counts q.k and p.v, "KV GB/s" the fp16 keys and values read.
  std::printf("\n%-8s %8s %6s %6s %12s %12s\n", "isa", "attn f16", "hd", "len", "GMAC/s", "KV GB/s");
  for (const std::string& isa : available_isas()) {
    const KernelTable& kt = select_kernels(isa);
    for (int64_t hd : {64, 96, 128})
      for (int64_t len : {160, 1024}) {
        std::vector<float> q(static_cast<size_t>(hd)), p(static_cast<size_t>(len)), o(static_cast<size_t>(hd));
        std::vector<uint16_t> K(static_cast<size_t>(len * hd)), V(K.size());
        for (auto& v : q) v = 0.1f * static_cast<float>(rng() % 21) - 1.0f;
        for (auto& h : K) h = static_cast<uint16_t>(0x3000 + (rng() & 0x3ff));
        for (auto& h : V) h = static_cast<uint16_t>(0x3000 + (rng() & 0x3ff));
        const double s = seconds_per_call(
            [&] { kt.attend_f16(q.data(), K.data(), V.data(), len, hd, 0.1f, p.data(), o.data()); }, 0.2);
        std::printf("%-8s %8s %6lld %6lld %12.2f %12.2f\n", isa.c_str(), "", static_cast<long long>(hd),
                    static_cast<long long>(len), 2.0 * len * hd / s * 1e-9, 4.0 * len * hd / s * 1e-9);
      }
  }
  return 0;
}

// Run-time choice of the kernel table: CPUID (__builtin_cpu_supports) + BITNET_ISA override.
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/kernels.h"

namespace bitnet {
namespace {

bool cpu_has_f16c() {  // CPUID leaf 1, ECX bit 29 (clang's __builtin_cpu_supports has no "f16c")
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// AMX-INT8: CPUID leaf 7 EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), the OS saving tile state (XCR0
// bits 17 and 18), and Linux's per-process permission to use tile data (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; Linux 5.16+), asked for once.
bool cpu_has_amx() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool ok = [] {
    if (!cpu_has_avx512()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv allowed
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool compiled(const std::string& isa) {
  if (isa == "scalar") return true;
#ifdef BITNET_HAVE_AVX2
  if (isa == "avx2") return true;
#endif
#ifdef BITNET_HAVE_AVX512
  if (isa == "avx512") return true;
#endif
#ifdef BITNET_HAVE_AMX
  if (isa == "amx") return true;
#endif
  return false;
}

bool supported(const std::string& isa) {
  if (isa == "scalar") return true;
  if (isa == "avx2") return cpu_has_avx2();
  if (isa == "avx512") return cpu_has_avx512();
  if (isa == "amx") return cpu_has_amx();
  return false;
}

const KernelTable& table(const std::string& isa) {
#ifdef BITNET_HAVE_AMX
  if (isa == "amx") return kAmxKernels;
#endif
#ifdef BITNET_HAVE_AVX512
  if (isa == "avx512") return kAvx512Kernels;
#endif
#ifdef BITNET_HAVE_AVX2
  if (isa == "avx2") return kAvx2Kernels;
#endif
  return kScalarKernels;
}

}  // namespace

std::atomic<int64_t> g_prefetch_bytes{8192};

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"scalar", "avx2", "avx512", "amx"})
    if (compiled(isa) && supported(isa)) out.emplace_back(isa);
  return out;
}

const KernelTable& select_kernels(const std::string& requested) {
  // the prefetch distance, read here so that every engine made after a change of the variable uses it
  int64_t prefetch = 8192;
  if (const char* env = std::getenv("BITNET_PREFETCH_BYTES"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end == env || *end != '\0' || v < 0)
      throw std::invalid_argument(std::string("BITNET_PREFETCH_BYTES must be a byte count >= 0 (0: no software prefetch), got '") +
                                  env + "'");
    prefetch = v;
  }
  g_prefetch_bytes.store(prefetch, std::memory_order_relaxed);
  std::string isa = requested;
  std::string source = "requested";
  if (isa.empty() || isa == "auto") {
    const char* env = std::getenv("BITNET_ISA");
    if (env != nullptr && *env != '\0') {
      isa = env;
      source = "BITNET_ISA";
    } else {
      return table(available_isas().back());
    }
  }
  if (isa != "scalar" && isa != "avx2" && isa != "avx512" && isa != "amx")
    throw std::invalid_argument("unknown ISA '" + isa + "' (" + source +
                                "); expected one of: scalar, avx2, avx512, amx, auto");
  if (!compiled(isa))
    throw std::runtime_error("ISA '" + isa + "' (" + source + ") is not compiled into this build of the engine");
  if (!supported(isa)) {
    std::string have;
    for (const auto& s : available_isas()) have += (have.empty() ? "" : ", ") + s;
    throw std::runtime_error("ISA '" + isa + "' (" + source + ") is not supported by this CPU; available: " + have);
  }
  return table(isa);
}

}  // namespace bitnet

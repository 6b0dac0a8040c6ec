#include "kernels/cpu_isa.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tsjax {

CpuIsa CpuBestIsa() {
#if defined(__x86_64__) || defined(__i386__)
  static const CpuIsa best = [] {
    CpuIsa isa = CpuIsa::kNone;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = CpuIsa::kAvx2;
    if (__builtin_cpu_supports("avx512f")) isa = CpuIsa::kAvx512;
    return isa;
  }();
  return best;
#else
  return CpuIsa::kNone;
#endif
}

CpuIsa CpuIsaFromEnv() {
  CpuIsa isa = CpuBestIsa();
  const char* s = std::getenv("TSJAX_CPU_ISA");
  if (s && std::strcmp(s, "avx2") == 0 && isa == CpuIsa::kAvx512) isa = CpuIsa::kAvx2;
  return isa;
}

bool CpuAmxBf16() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    if (!amx_bf16 || !amx_tile || CpuBestIsa() != CpuIsa::kAvx512) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1)) return false;  // AVX512-BF16
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  const char* s = std::getenv("TSJAX_CPU_ISA");
  return ok && !(s && (std::strcmp(s, "avx2") == 0 || std::strcmp(s, "avx512") == 0));
#else
  return false;
#endif
}

}  // namespace tsjax

// For the Python side (ctypes): 0 = no native convolution / attention on this CPU, 1 = AVX2+FMA,
// 2 = AVX-512F, after TSJAX_CPU_ISA.
extern "C" int TsjaxCpuIsa() { return static_cast<int>(tsjax::CpuIsaFromEnv()); }

// 1 when the bfloat16 AMX convolution is usable (tsjax::CpuAmxBf16), else 0.
extern "C" int TsjaxCpuAmxBf16() { return tsjax::CpuAmxBf16() ? 1 : 0; }

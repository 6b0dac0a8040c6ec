// Which SIMD instruction set tsjax's CPU kernels (convolution, attention) use, chosen at run time.
#pragma once

namespace tsjax {

enum class CpuIsa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU supports for the kernels (kNone: use another implementation).
CpuIsa CpuBestIsa();

// CpuBestIsa(), capped by the environment variable TSJAX_CPU_ISA=avx2 (read at every call; for tests and
// benchmarks of the AVX2 path on an AVX-512 machine).
CpuIsa CpuIsaFromEnv();

// True when the CPU has AMX-BF16 and AVX512-BF16 and the OS granted this process the AMX tile state
// (Linux arch_prctl ARCH_REQ_XCOMP_PERM, requested once); false under TSJAX_CPU_ISA=avx2 / avx512.
bool CpuAmxBf16();

}  // namespace tsjax

// AVX512 instantiation of the CPU GEGLU rows (kernels/geglu_cpu_impl.h).
#include <immintrin.h>

#include <cstdint>

#include "kernels/geglu.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#endif

namespace tsjax {
namespace geglu_detail {
namespace avx512 {

#include "kernels/simd_avx512.h"

#include "kernels/geglu_cpu_impl.h"

}  // namespace avx512

void ForwardAvx512(const GegluParams& p, const void* x, const float* bias, void* y, int64_t r0, int64_t r1) {
  avx512::Forward<avx512::V>(p, x, bias, y, r0, r1);
}

void BackwardAvx512(const GegluParams& p, const void* x, const float* bias, const void* dy, void* dx, float* dbias,
                 int64_t r0, int64_t r1) {
  avx512::Backward<avx512::V>(p, x, bias, dy, dx, dbias, r0, r1);
}

}  // namespace geglu_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

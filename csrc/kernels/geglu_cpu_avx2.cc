// AVX2+FMA instantiation of the CPU GEGLU rows (kernels/geglu_cpu_impl.h).
#include <immintrin.h>

#include <cstdint>

#include "kernels/geglu.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace tsjax {
namespace geglu_detail {
namespace avx2 {

#include "kernels/simd_avx2.h"

#include "kernels/geglu_cpu_impl.h"

}  // namespace avx2

void ForwardAvx2(const GegluParams& p, const void* x, const float* bias, void* y, int64_t r0, int64_t r1) {
  avx2::Forward<avx2::V>(p, x, bias, y, r0, r1);
}

void BackwardAvx2(const GegluParams& p, const void* x, const float* bias, const void* dy, void* dx, float* dbias,
                 int64_t r0, int64_t r1) {
  avx2::Backward<avx2::V>(p, x, bias, dy, dx, dbias, r0, r1);
}

}  // namespace geglu_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

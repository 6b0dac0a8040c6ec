// AVX2 instantiation of the CPU GroupNorm passes (kernels/group_norm_cpu_impl.h).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/group_norm.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace tsjax {
namespace group_norm_detail {
namespace avx2 {

#include "kernels/simd_avx2.h"

#include "kernels/group_norm_cpu_impl.h"

}  // namespace avx2

void SumAvx2(const Pass& t) { avx2::Sum<avx2::V>(t); }
void NormalizeAvx2(const Pass& t) { avx2::Normalize<avx2::V>(t); }
void GradSumsAvx2(const Pass& t) { avx2::GradSums<avx2::V>(t); }
void GradInputAvx2(const Pass& t) { avx2::GradInput<avx2::V>(t); }

}  // namespace group_norm_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// AVX512 instantiation of the CPU GroupNorm passes (kernels/group_norm_cpu_impl.h).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/group_norm.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#endif

namespace tsjax {
namespace group_norm_detail {
namespace avx512 {

#include "kernels/simd_avx512.h"

#include "kernels/group_norm_cpu_impl.h"

}  // namespace avx512

void SumAvx512(const Pass& t) { avx512::Sum<avx512::V>(t); }
void NormalizeAvx512(const Pass& t) { avx512::Normalize<avx512::V>(t); }
void GradSumsAvx512(const Pass& t) { avx512::GradSums<avx512::V>(t); }
void GradInputAvx512(const Pass& t) { avx512::GradInput<avx512::V>(t); }

}  // namespace group_norm_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// AVX512 instantiation of the CPU LayerNorm passes (kernels/layer_norm_cpu_impl.h).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/layer_norm.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#endif

namespace tsjax {
namespace layer_norm_detail {
namespace avx512 {

#include "kernels/simd_avx512.h"

#include "kernels/layer_norm_cpu_impl.h"

}  // namespace avx512

void ForwardAvx512(const Rows& t) {
  t.p->bf16 ? avx512::Forward<avx512::V, true>(t) : avx512::Forward<avx512::V, false>(t);
}
void BackwardAvx512(const Rows& t) {
  t.p->bf16 ? avx512::Backward<avx512::V, true>(t) : avx512::Backward<avx512::V, false>(t);
}

}  // namespace layer_norm_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

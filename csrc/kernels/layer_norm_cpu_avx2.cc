// AVX2 instantiation of the CPU LayerNorm passes (kernels/layer_norm_cpu_impl.h).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/layer_norm.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace tsjax {
namespace layer_norm_detail {
namespace avx2 {

#include "kernels/simd_avx2.h"

#include "kernels/layer_norm_cpu_impl.h"

}  // namespace avx2

void ForwardAvx2(const Rows& t) {
  t.p->bf16 ? avx2::Forward<avx2::V, true>(t) : avx2::Forward<avx2::V, false>(t);
}
void BackwardAvx2(const Rows& t) {
  t.p->bf16 ? avx2::Backward<avx2::V, true>(t) : avx2::Backward<avx2::V, false>(t);
}

}  // namespace layer_norm_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

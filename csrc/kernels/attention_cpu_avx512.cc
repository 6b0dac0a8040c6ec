// AVX-512F instantiation of the CPU flash attention (kernels/attention_cpu_impl.h).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/attention.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#endif

namespace tsjax {
namespace attention_detail {
namespace avx512 {

#include "kernels/simd_avx512.h"

#include "kernels/attention_cpu_impl.h"

}  // namespace avx512

void ForwardHeadAvx512(const AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                       float* o, float* lse) {
  avx512::ForwardHead<avx512::V>(p, b, h, q, k, v, o, lse);
}

void BackwardHeadAvx512(const AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                        const float* o, const float* lse, const float* dout, float* dq, float* dk, float* dv) {
  avx512::BackwardHead<avx512::V>(p, b, h, q, k, v, o, lse, dout, dq, dk, dv);
}

}  // namespace attention_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

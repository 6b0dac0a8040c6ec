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

struct V {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr int kAcc = 24;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T zero() { return _mm512_setzero_ps(); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static float hmax(T x) { return _mm512_reduce_max_ps(x); }
  static float hsum(T x) { return _mm512_reduce_add_ps(x); }
  // exp(x) to ~2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial), exp(x < -87.3) ~ 0.
  static T exp(T x) {
    x = _mm512_min_ps(_mm512_max_ps(x, set1(-87.33654f)), set1(88.72283f));
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    T y = set1(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, set1(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, set1(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, set1(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, set1(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, set1(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, set1(1.0f)));
    return _mm512_scalef_ps(y, n);
  }
};

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

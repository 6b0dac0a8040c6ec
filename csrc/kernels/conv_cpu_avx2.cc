// AVX2+FMA micro-kernels of the direct convolution (kernels/conv.h), for CPUs without AVX-512. A tile is
// computed 16 output channels (two 256-bit registers per row) at a time: 12 accumulators for 6 rows.
#include <immintrin.h>

#include "kernels/conv.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace tsjax {
namespace conv_detail {
namespace {

template <int MR>
void FwdTile16(const FwdTile& t, int g) {
  __m256 acc[MR][2];
  float* c = t.c + 16 * g;
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 2; ++j)
      acc[m][j] = t.accumulate ? _mm256_loadu_ps(c + m * t.ldc + 8 * j) : _mm256_setzero_ps();
  for (int tap = 0; tap < t.ntaps; ++tap) {
    const float* a[MR];
    for (int m = 0; m < MR; ++m) a[m] = t.a[tap * kMr + m] + t.c0;
    const float* b = t.b + tap * t.tap_stride + 16 * g;
#pragma GCC unroll 4
    for (int64_t k = 0; k < t.nci; ++k, b += t.ldb) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
      for (int m = 0; m < MR; ++m) {
        const __m256 av = _mm256_broadcast_ss(a[m] + k);
        acc[m][0] = _mm256_fmadd_ps(av, b0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(av, b1, acc[m][1]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 2; ++j) _mm256_storeu_ps(c + m * t.ldc + 8 * j, acc[m][j]);
}

template <int MR>
void Grad16(const GradRun* runs, int nruns, int64_t xoff, int64_t dyoff, int g, float* accmem) {
  __m256 acc[MR][2];
  float* am = accmem + 16 * g;
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 2; ++j) acc[m][j] = _mm256_loadu_ps(am + m * kPanel + 8 * j);
  for (int r = 0; r < nruns; ++r) {
    const float* x = runs[r].x0 + xoff;
    const float* dy = runs[r].dy0 + dyoff + 16 * g;
#pragma GCC unroll 4
    for (int64_t k = 0; k < runs[r].n; ++k, x += runs[r].xstride, dy += runs[r].dystride) {
      const __m256 b0 = _mm256_loadu_ps(dy), b1 = _mm256_loadu_ps(dy + 8);
      for (int m = 0; m < MR; ++m) {
        const __m256 av = _mm256_broadcast_ss(x + m);
        acc[m][0] = _mm256_fmadd_ps(av, b0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(av, b1, acc[m][1]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 2; ++j) _mm256_storeu_ps(am + m * kPanel + 8 * j, acc[m][j]);
}

template <int MR>
void FwdAll(const FwdTile& t) {
  for (int g = 0; g < t.nvec16; ++g) FwdTile16<MR>(t, g);
}

template <int MR>
void GradAll(const GradRun* runs, int nruns, int64_t xoff, int64_t dyoff, int nvec16, float* acc) {
  for (int g = 0; g < nvec16; ++g) Grad16<MR>(runs, nruns, xoff, dyoff, g, acc);
}

}  // namespace

void FwdTileAvx2(const FwdTile& t) {
  switch (t.mr) {
    case 1: return FwdAll<1>(t);
    case 2: return FwdAll<2>(t);
    case 3: return FwdAll<3>(t);
    case 4: return FwdAll<4>(t);
    case 5: return FwdAll<5>(t);
    default: return FwdAll<6>(t);
  }
}

void GradTileAvx2(const GradRun* runs, int nruns, int64_t xoff, int64_t dyoff, int mr, int nvec16, float* acc) {
  switch (mr) {
    case 1: return GradAll<1>(runs, nruns, xoff, dyoff, nvec16, acc);
    case 2: return GradAll<2>(runs, nruns, xoff, dyoff, nvec16, acc);
    case 3: return GradAll<3>(runs, nruns, xoff, dyoff, nvec16, acc);
    case 4: return GradAll<4>(runs, nruns, xoff, dyoff, nvec16, acc);
    case 5: return GradAll<5>(runs, nruns, xoff, dyoff, nvec16, acc);
    default: return GradAll<6>(runs, nruns, xoff, dyoff, nvec16, acc);
  }
}

// Winograd transforms (conv_winograd_impl.h) over this file's vector type.
namespace avx2 {

#include "kernels/simd_avx2.h"

#include "kernels/conv_winograd_impl.h"

}  // namespace avx2

void WinoInputAvx2(const WinoInput& t) { avx2::WinoInputDispatch<avx2::V>(t); }
void WinoKernelAvx2(const WinoKernel& t) { avx2::WinoKernelDispatch<avx2::V>(t); }
void WinoOutputAvx2(const WinoOutput& t) { avx2::WinoOutputDispatch<avx2::V>(t); }

}  // namespace conv_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// AVX-512F micro-kernels of the direct convolution (kernels/conv.h). Compiled for AVX-512 through a
// target pragma; called only when the CPU has it (ConvBestIsa).
#include <immintrin.h>

#include "kernels/conv.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#endif

namespace tsjax {
namespace conv_detail {
namespace {

// MR output pixels x NV*16 output channels, accumulators in 512-bit registers (MR*NV <= 24).
template <int MR, int NV>
void FwdTileT(const FwdTile& t) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j)
      acc[m][j] = t.accumulate ? _mm512_loadu_ps(t.c + m * t.ldc + 16 * j) : _mm512_setzero_ps();
  for (int tap = 0; tap < t.ntaps; ++tap) {
    const float* a[MR];
    for (int m = 0; m < MR; ++m) a[m] = t.a[tap * kMr + m] + t.c0;
    const float* b = t.b + tap * t.tap_stride;
#pragma GCC unroll 4
    for (int64_t c = 0; c < t.nci; ++c, b += t.ldb) {
      __m512 bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + 16 * j);
      for (int m = 0; m < MR; ++m) {
        const __m512 av = _mm512_set1_ps(a[m][c]);
        for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_fmadd_ps(av, bv[j], acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(t.c + m * t.ldc + 16 * j, acc[m][j]);
}

// MR input channels x NV*16 output channels of the kernel gradient, summed over runs of pixels.
template <int MR, int NV>
void GradT(const GradRun* runs, int nruns, int64_t xoff, int64_t dyoff, float* accmem) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_loadu_ps(accmem + m * kPanel + 16 * j);
  for (int r = 0; r < nruns; ++r) {
    const float* x = runs[r].x0 + xoff;
    const float* dy = runs[r].dy0 + dyoff;
#pragma GCC unroll 4
    for (int64_t k = 0; k < runs[r].n; ++k, x += runs[r].xstride, dy += runs[r].dystride) {
      __m512 bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(dy + 16 * j);
      for (int m = 0; m < MR; ++m) {
        const __m512 av = _mm512_set1_ps(x[m]);
        for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_fmadd_ps(av, bv[j], acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(accmem + m * kPanel + 16 * j, acc[m][j]);
}

template <int MR>
void FwdByNv(const FwdTile& t) {
  switch (t.nvec16) {
    case 1: return FwdTileT<MR, 1>(t);
    case 2: return FwdTileT<MR, 2>(t);
    case 3: return FwdTileT<MR, 3>(t);
    default: return FwdTileT<MR, 4>(t);
  }
}

template <int MR>
void GradByNv(const GradRun* runs, int nruns, int64_t xoff, int64_t dyoff, int nvec16, float* acc) {
  switch (nvec16) {
    case 1: return GradT<MR, 1>(runs, nruns, xoff, dyoff, acc);
    case 2: return GradT<MR, 2>(runs, nruns, xoff, dyoff, acc);
    case 3: return GradT<MR, 3>(runs, nruns, xoff, dyoff, acc);
    default: return GradT<MR, 4>(runs, nruns, xoff, dyoff, acc);
  }
}

}  // namespace

void FwdTileAvx512(const FwdTile& t) {
  switch (t.mr) {
    case 1: return FwdByNv<1>(t);
    case 2: return FwdByNv<2>(t);
    case 3: return FwdByNv<3>(t);
    case 4: return FwdByNv<4>(t);
    case 5: return FwdByNv<5>(t);
    default: return FwdByNv<6>(t);
  }
}

void GradTileAvx512(const GradRun* runs, int nruns, int64_t xoff, int64_t dyoff, int mr, int nvec16, float* acc) {
  switch (mr) {
    case 1: return GradByNv<1>(runs, nruns, xoff, dyoff, nvec16, acc);
    case 2: return GradByNv<2>(runs, nruns, xoff, dyoff, nvec16, acc);
    case 3: return GradByNv<3>(runs, nruns, xoff, dyoff, nvec16, acc);
    case 4: return GradByNv<4>(runs, nruns, xoff, dyoff, nvec16, acc);
    case 5: return GradByNv<5>(runs, nruns, xoff, dyoff, nvec16, acc);
    default: return GradByNv<6>(runs, nruns, xoff, dyoff, nvec16, acc);
  }
}

// Winograd transforms (conv_winograd_impl.h) over this file's vector type.
namespace avx512 {

#include "kernels/simd_avx512.h"

#include "kernels/conv_winograd_impl.h"

}  // namespace avx512

void WinoInputAvx512(const WinoInput& t) { avx512::WinoInputDispatch<avx512::V>(t); }
void WinoKernelAvx512(const WinoKernel& t) { avx512::WinoKernelDispatch<avx512::V>(t); }
void WinoOutputAvx512(const WinoOutput& t) { avx512::WinoOutputDispatch<avx512::V>(t); }

}  // namespace conv_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// GEGLU (the gated GELU of the transformer blocks' feed-forward) for the CPU, forward and backward,
// framework-agnostic.
//
// Why: XLA:CPU evaluates the exact GELU through erfc (an exp and a rational function per element), splits
// the projection, recomputes the forward in the backward and concatenates the two input-gradient halves:
// ~85 ms of the mid UNet's ~1.9 s forward+backward on one core, against ~40 ms for PyTorch's kernels
// (bench/README.md). Here, per row r of x [R, 2F] (the projection output; h = x[r, :F], g = x[r, F:]):
//
//   forward:   y[r] = h * gelu(g),  gelu(g) = g * Phi(g),  Phi(g) = (1 + erf(g / sqrt(2))) / 2
//   backward:  dx[r, :F] = dy * gelu(g),  dx[r, F:] = dy * h * (Phi(g) + g * exp(-g^2 / 2) / sqrt(2 pi))
//
// (PyTorch's ``x * 0.5 * (1 + erf(x * M_SQRT1_2))``). erf is the rational approximation XLA uses for
// float32 (|error| < 4e-7), exp the kernels' Cephes-style one. x / y / dy / dx are float32 or bfloat16
// (raw bits; arithmetic in float32); bias and dbias float32. F must be a multiple of the vector width (16 with
// AVX-512F, 8 with AVX2). dbias is summed per fixed block of rows in float32 and the blocks in double, in
// order: no result depends on the thread count.
#pragma once

#include <cstdint>

#include "kernels/cpu_isa.h"
#include "kernels/parallel.h"

namespace tsjax {

struct GegluParams {
  int64_t rows, f;  // x [rows, 2 f], y / dy [rows, f]
  bool bf16;
};

// y [R, F]
void GegluForwardCpu(const GegluParams& p, const void* x, const float* bias, void* y, CpuIsa isa,
                     const ParallelFor& parallel_for);

// dx [R, 2F], dbias [2F]
void GegluBackwardCpu(const GegluParams& p, const void* x, const float* bias, const void* dy, void* dx,
                      float* dbias, CpuIsa isa, const ParallelFor& parallel_for);

namespace geglu_detail {

// Rows [r0, r1) of the forward / backward (the backward adds its rows' dx to dbias [2F]).
void ForwardAvx512(const GegluParams& p, const void* x, const float* bias, void* y, int64_t r0, int64_t r1);
void ForwardAvx2(const GegluParams& p, const void* x, const float* bias, void* y, int64_t r0, int64_t r1);
void BackwardAvx512(const GegluParams& p, const void* x, const float* bias, const void* dy, void* dx, float* dbias,
                    int64_t r0, int64_t r1);
void BackwardAvx2(const GegluParams& p, const void* x, const float* bias, const void* dy, void* dx, float* dbias,
                  int64_t r0, int64_t r1);

}  // namespace geglu_detail
}  // namespace tsjax

// LayerNorm over the last (channel) axis for the CPU, forward and backward, framework-agnostic.
//
// Why: XLA:CPU computes the transformer blocks' LayerNorms (flax.linen.LayerNorm) as separate reduction
// passes for the mean and the variance plus a normalisation fusion, and its gradient as several more,
// ~55 ms of a UNet training step against ~15 ms for PyTorch's fused CPU kernel. Here every row of
// x [R, C] is read once per pass group (its later passes hit L1):
//
//   mean = mean(x[r, :]),  rstd = 1 / sqrt(mean((x - mean)^2) + eps)            (two-pass variance)
//   y = (x - mean) * (rstd * scale) + bias
//   backward: xhat = (x - mean) * rstd, g = dy * scale,
//             dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)),
//             dscale = sum_rows dy * xhat,  dbias = sum_rows dy
//
// (the semantics of flax.linen.LayerNorm(use_fast_variance=False) and torch.nn.LayerNorm).
// x / y / dy / dx are float32 or bfloat16 (raw bits), statistics and parameters float32. The rows are
// split into `groups` equal consecutive blocks with their own scale / bias rows ([groups, C]; 1 normally,
// the batch under vmap). dscale / dbias are accumulated per chunk of kChunk rows in float32 and the chunks
// combined in double, in chunk order, so results do not depend on the thread count. C must be a multiple
// of the vector width (16 with AVX-512F, 8 with AVX2).
#pragma once

#include <cstdint>

#include "kernels/cpu_isa.h"
#include "kernels/parallel.h"

namespace tsjax {

struct LayerNormParams {
  int64_t rows, c, groups;  // rows % groups == 0
  float eps;
  bool bf16;  // x / y / dy / dx are bfloat16 (else float32)
};

// x, y [R, C]; scale, bias [groups, C]; mean, rstd [R].
void LayerNormForwardCpu(const LayerNormParams& p, const void* x, const float* scale, const float* bias, void* y,
                         float* mean, float* rstd, CpuIsa isa, const ParallelFor& parallel_for);

// x, dy, dx [R, C]; scale [groups, C]; mean, rstd [R] (from the forward); dscale, dbias [groups, C].
void LayerNormBackwardCpu(const LayerNormParams& p, const void* x, const void* dy, const float* scale,
                          const float* mean, const float* rstd, void* dx, float* dscale, float* dbias, CpuIsa isa,
                          const ParallelFor& parallel_for);

namespace layer_norm_detail {

constexpr int64_t kChunk = 64;  // rows per work item

// Rows [r0, r1) of one group (scale / bias: that group's [C] rows).
//   Forward   writes out (y), mean[r], rstd[r]
//   Backward  reads mean_in[r], rstd_in[r], writes out (dx), sum1 = sum dy and sum2 = sum dy * xhat over
//             the rows ([C] partial sums of this chunk, overwritten)
struct Rows {
  const LayerNormParams* p;
  const void* x;
  const void* dy;
  void* out;
  int64_t r0, r1;
  const float* scale;
  const float* bias;
  float* mean;
  float* rstd;
  const float* mean_in;
  const float* rstd_in;
  float* sum1;
  float* sum2;
};

void ForwardAvx512(const Rows& t);
void ForwardAvx2(const Rows& t);
void BackwardAvx512(const Rows& t);
void BackwardAvx2(const Rows& t);

}  // namespace layer_norm_detail
}  // namespace tsjax

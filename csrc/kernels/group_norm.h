// GroupNorm (optionally followed by SiLU) for the CPU, forward and backward, framework-agnostic.
//
// Why: XLA:CPU spends 3-10x the memory-bandwidth bound on the UNets' and VAE's GroupNorm + SiLU (its
// statistics are separate reduction passes and the normalisation another fusion); PyTorch's fused CPU
// kernel is 2-4x faster (bench/README.md, "Native CPU GroupNorm"). Here, per batch element b and group g
// of the channels (NHWC, x [B, N, C], N = H * W pixels):
//
//   mean = mean(x[b, :, g]),  rstd = 1 / sqrt(mean((x - mean)^2) + eps)     (two passes over x)
//   z = (x - mean) * rstd * gamma + beta,  y = z or z * sigmoid(z) (silu)
//   backward: dz = dy or dy * sigmoid(z) * (1 + z * (1 - sigmoid(z))), xhat = (x - mean) * rstd,
//             dgamma = sum dz * xhat, dbeta = sum dz,
//             dx = rstd * (dz * gamma - mean_g(dz * gamma) - xhat * mean_g(dz * gamma * xhat))
//
// x / y / dy / dx are float32 or bfloat16 (raw bits), statistics and parameters float32; channel sums
// are accumulated per chunk of kChunk pixels in float32 and the chunks in double, in a fixed order, so
// results do not depend on the thread count. C must be a multiple of the vector width (16 with AVX-512F,
// 8 with AVX2) and of `groups`.
#pragma once

#include <cstdint>

#include "kernels/cpu_isa.h"
#include "kernels/parallel.h"

namespace tsjax {

struct GroupNormParams {
  int64_t batch, n, c, groups;
  float eps;
  bool silu;
  bool bf16;  // x / y / dy / dx are bfloat16 (else float32)
};

// y [B, N, C]; mean, rstd [B, groups].
void GroupNormForwardCpu(const GroupNormParams& p, const void* x, const float* gamma, const float* beta, void* y,
                         float* mean, float* rstd, CpuIsa isa, const ParallelFor& parallel_for);

// dx [B, N, C]; dgamma, dbeta [C].
void GroupNormBackwardCpu(const GroupNormParams& p, const void* x, const void* dy, const float* gamma,
                          const float* beta, const float* mean, const float* rstd, void* dx, float* dgamma,
                          float* dbeta, CpuIsa isa, const ParallelFor& parallel_for);

namespace group_norm_detail {

constexpr int64_t kChunk = 256;  // pixels per work item

// One pass of a work item over pixels [n0, n1) of batch element b, with per-channel coefficient vectors
// coef[k][C] (all vectorised over channels):
//   Sum        sum1 += x                        (coef[0] == nullptr)
//              sum1 += (x - coef[0])^2          (the group means, per channel)
//   Normalize  z = x * coef[0] + coef[1];  out = silu ? z * sigmoid(z) : z
//   GradSums   z as Normalize; dz = dy * (silu ? silu'(z) : 1); xhat = x * coef[2] + coef[3];
//              sum1 += dz; sum2 += dz * xhat
//   GradInput  z, dz, xhat as GradSums; out = dz * coef[4] + coef[5] + xhat * coef[6]
struct Pass {
  const GroupNormParams* p;
  const void* x;
  const void* dy;
  void* out;
  int64_t b, n0, n1;
  const float* coef[7];
  float* sum1;  // [C] partial sums of this chunk (overwritten)
  float* sum2;
};

void SumAvx512(const Pass& t);
void SumAvx2(const Pass& t);
void NormalizeAvx512(const Pass& t);
void NormalizeAvx2(const Pass& t);
void GradSumsAvx512(const Pass& t);
void GradSumsAvx2(const Pass& t);
void GradInputAvx512(const Pass& t);
void GradInputAvx2(const Pass& t);

}  // namespace group_norm_detail
}  // namespace tsjax

// Drivers of the CPU LayerNorm (kernels/layer_norm.h): work items are chunks of kChunk rows of one group;
// the backward's per-channel partial sums of the chunks are combined in double, in chunk order.
#include <algorithm>
#include <vector>

#include "kernels/layer_norm.h"

namespace tsjax {
namespace {

using layer_norm_detail::kChunk;
using layer_norm_detail::Rows;

// Calls fn on every chunk (of kChunk rows, per group) with t's other fields set: scale / bias point at
// the chunk's group and sum1 / sum2 (when part1 / part2 are given) at the chunk's [C] rows of them.
void RunChunks(const LayerNormParams& p, void (*fn)(const Rows&), const Rows& base, float* part1, float* part2,
               const ParallelFor& parallel_for) {
  const int64_t per_group = p.rows / p.groups, nchunk = (per_group + kChunk - 1) / kChunk;
  parallel_for(p.groups * nchunk, [&](int64_t item) {
    Rows t = base;
    const int64_t g = item / nchunk;
    t.r0 = g * per_group + (item % nchunk) * kChunk;
    t.r1 = std::min((g + 1) * per_group, t.r0 + kChunk);
    t.scale = base.scale + g * p.c;
    t.bias = base.bias ? base.bias + g * p.c : nullptr;
    t.sum1 = part1 ? part1 + item * p.c : nullptr;
    t.sum2 = part2 ? part2 + item * p.c : nullptr;
    fn(t);
  });
}

}  // namespace

void LayerNormForwardCpu(const LayerNormParams& p, const void* x, const float* scale, const float* bias, void* y,
                         float* mean, float* rstd, CpuIsa isa, const ParallelFor& parallel_for) {
  if (p.rows == 0) return;
  Rows t{};
  t.p = &p;
  t.x = x;
  t.out = y;
  t.scale = scale;
  t.bias = bias;
  t.mean = mean;
  t.rstd = rstd;
  using namespace layer_norm_detail;  // NOLINT
  RunChunks(p, isa == CpuIsa::kAvx512 ? ForwardAvx512 : ForwardAvx2, t, nullptr, nullptr, parallel_for);
}

void LayerNormBackwardCpu(const LayerNormParams& p, const void* x, const void* dy, const float* scale,
                          const float* mean, const float* rstd, void* dx, float* dscale, float* dbias, CpuIsa isa,
                          const ParallelFor& parallel_for) {
  if (p.rows == 0) {
    std::fill(dscale, dscale + p.groups * p.c, 0.0f);
    std::fill(dbias, dbias + p.groups * p.c, 0.0f);
    return;
  }
  const int64_t nchunk = (p.rows / p.groups + kChunk - 1) / kChunk;
  std::vector<float> part1(p.groups * nchunk * p.c), part2(p.groups * nchunk * p.c);
  Rows t{};
  t.p = &p;
  t.x = x;
  t.dy = dy;
  t.out = dx;
  t.scale = scale;
  t.mean_in = mean;
  t.rstd_in = rstd;
  using namespace layer_norm_detail;  // NOLINT
  RunChunks(p, isa == CpuIsa::kAvx512 ? BackwardAvx512 : BackwardAvx2, t, part1.data(), part2.data(), parallel_for);
  // dbias / dscale per (group, block of channels): the chunks' partial sums in chunk order
  constexpr int64_t kCols = 256;
  const int64_t nblock = (p.c + kCols - 1) / kCols;
  parallel_for(p.groups * nblock, [&](int64_t item) {
    const int64_t g = item / nblock, c0 = (item % nblock) * kCols, c1 = std::min(p.c, c0 + kCols);
    double s1[kCols] = {}, s2[kCols] = {};
    for (int64_t k = g * nchunk; k < (g + 1) * nchunk; ++k) {
      const float* q1 = part1.data() + k * p.c;
      const float* q2 = part2.data() + k * p.c;
      for (int64_t c = c0; c < c1; ++c) {
        s1[c - c0] += q1[c];
        s2[c - c0] += q2[c];
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      dbias[g * p.c + c] = static_cast<float>(s1[c - c0]);
      dscale[g * p.c + c] = static_cast<float>(s2[c - c0]);
    }
  });
}

}  // namespace tsjax

// Drivers of the CPU GroupNorm (kernels/group_norm.h): work items are chunks of kChunk pixels of one batch
// element; per-channel partial sums of the chunks are combined in double, in chunk order.
#include <cmath>
#include <vector>

#include "kernels/group_norm.h"

namespace tsjax {
namespace {

using group_norm_detail::kChunk;
using group_norm_detail::Pass;

struct Fns {
  void (*sum)(const Pass&);
  void (*normalize)(const Pass&);
  void (*grad_sums)(const Pass&);
  void (*grad_input)(const Pass&);
};

Fns Select(CpuIsa isa) {
  using namespace group_norm_detail;  // NOLINT
  if (isa == CpuIsa::kAvx512) return {SumAvx512, NormalizeAvx512, GradSumsAvx512, GradInputAvx512};
  return {SumAvx2, NormalizeAvx2, GradSumsAvx2, GradInputAvx2};
}

// Runs `fn` on every (b, chunk) with the given coefficient vectors (per batch element: coef[k] + b * C
// when per_batch) and returns the chunk sums combined per (b, c) in double: out1 / out2 [B * C].
void RunPass(const GroupNormParams& p, void (*fn)(const Pass&), const void* x, const void* dy, void* out,
             const std::vector<const float*>& coef, bool per_batch, std::vector<double>* out1,
             std::vector<double>* out2, const ParallelFor& parallel_for) {
  const int64_t nchunk = (p.n + kChunk - 1) / kChunk, items = p.batch * nchunk;
  std::vector<float> part1(out1 ? items * p.c : 0), part2(out2 ? items * p.c : 0);
  parallel_for(items, [&](int64_t item) {
    Pass t{};
    t.p = &p;
    t.x = x;
    t.dy = dy;
    t.out = out;
    t.b = item / nchunk;
    t.n0 = (item % nchunk) * kChunk;
    t.n1 = std::min(p.n, t.n0 + kChunk);
    for (size_t k = 0; k < coef.size(); ++k) t.coef[k] = coef[k] ? coef[k] + (per_batch ? t.b * p.c : 0) : nullptr;
    t.sum1 = out1 ? part1.data() + item * p.c : nullptr;
    t.sum2 = out2 ? part2.data() + item * p.c : nullptr;
    fn(t);
  });
  for (auto [part, total] : {std::pair{&part1, out1}, std::pair{&part2, out2}}) {
    if (!total) continue;
    total->assign(p.batch * p.c, 0.0);
    for (int64_t item = 0; item < items; ++item)
      for (int64_t c = 0; c < p.c; ++c) (*total)[(item / nchunk) * p.c + c] += (*part)[item * p.c + c];
  }
}

// Per (b, group): the sum over the group's channels of v[b, c] (times w[c] when given), over count.
std::vector<double> GroupMean(const GroupNormParams& p, const std::vector<double>& v, const float* w, double count) {
  const int64_t cg = p.c / p.groups;
  std::vector<double> out(p.batch * p.groups, 0.0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t c = 0; c < p.c; ++c) out[b * p.groups + c / cg] += v[b * p.c + c] * (w ? w[c] : 1.0);
  for (double& o : out) o /= count;
  return out;
}

}  // namespace

void GroupNormForwardCpu(const GroupNormParams& p, const void* x, const float* gamma, const float* beta, void* y,
                         float* mean, float* rstd, CpuIsa isa, const ParallelFor& parallel_for) {
  const Fns f = Select(isa);
  const int64_t cg = p.c / p.groups;
  const double count = static_cast<double>(p.n) * cg;
  std::vector<double> s;
  RunPass(p, f.sum, x, nullptr, nullptr, {nullptr}, false, &s, nullptr, parallel_for);
  const std::vector<double> m = GroupMean(p, s, nullptr, count);
  std::vector<float> mc(p.batch * p.c);  // the group mean, per channel
  for (int64_t i = 0; i < p.batch * p.c; ++i) mc[i] = static_cast<float>(m[(i / p.c) * p.groups + (i % p.c) / cg]);
  RunPass(p, f.sum, x, nullptr, nullptr, {mc.data()}, true, &s, nullptr, parallel_for);
  const std::vector<double> var = GroupMean(p, s, nullptr, count);
  std::vector<float> scale(p.batch * p.c), shift(p.batch * p.c);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t g = 0; g < p.groups; ++g) {
      mean[b * p.groups + g] = static_cast<float>(m[b * p.groups + g]);
      rstd[b * p.groups + g] = static_cast<float>(1.0 / std::sqrt(var[b * p.groups + g] + p.eps));
    }
  for (int64_t i = 0; i < p.batch * p.c; ++i) {
    const int64_t bg = (i / p.c) * p.groups + (i % p.c) / cg, c = i % p.c;
    scale[i] = rstd[bg] * gamma[c];
    shift[i] = beta[c] - mean[bg] * scale[i];
  }
  RunPass(p, f.normalize, x, nullptr, y, {scale.data(), shift.data()}, true, nullptr, nullptr, parallel_for);
}

void GroupNormBackwardCpu(const GroupNormParams& p, const void* x, const void* dy, const float* gamma,
                          const float* beta, const float* mean, const float* rstd, void* dx, float* dgamma,
                          float* dbeta, CpuIsa isa, const ParallelFor& parallel_for) {
  const Fns f = Select(isa);
  const int64_t cg = p.c / p.groups, bc = p.batch * p.c;
  std::vector<float> coef(7 * bc);  // scale, shift, rstd, -mean * rstd, rstd * gamma, k5, k6
  float* k[7];
  for (int j = 0; j < 7; ++j) k[j] = coef.data() + j * bc;
  for (int64_t i = 0; i < bc; ++i) {
    const int64_t bg = (i / p.c) * p.groups + (i % p.c) / cg, c = i % p.c;
    k[0][i] = rstd[bg] * gamma[c];
    k[1][i] = beta[c] - mean[bg] * k[0][i];
    k[2][i] = rstd[bg];
    k[3][i] = -mean[bg] * rstd[bg];
    k[4][i] = rstd[bg] * gamma[c];
  }
  std::vector<double> s1, s2;
  RunPass(p, f.grad_sums, x, dy, nullptr, {k[0], k[1], k[2], k[3]}, true, &s1, &s2, parallel_for);
  const double count = static_cast<double>(p.n) * cg;
  const std::vector<double> m1 = GroupMean(p, s1, gamma, count), m2 = GroupMean(p, s2, gamma, count);
  for (int64_t i = 0; i < bc; ++i) {
    const int64_t bg = (i / p.c) * p.groups + (i % p.c) / cg;
    k[5][i] = static_cast<float>(-rstd[bg] * m1[bg]);
    k[6][i] = static_cast<float>(-rstd[bg] * m2[bg]);
  }
  for (int64_t c = 0; c < p.c; ++c) {
    double g = 0.0, b = 0.0;
    for (int64_t bb = 0; bb < p.batch; ++bb) {
      g += s2[bb * p.c + c];
      b += s1[bb * p.c + c];
    }
    dgamma[c] = static_cast<float>(g);
    dbeta[c] = static_cast<float>(b);
  }
  RunPass(p, f.grad_input, x, dy, dx, {k[0], k[1], k[2], k[3], k[4], k[5], k[6]}, true, nullptr, nullptr,
          parallel_for);
}

}  // namespace tsjax

// Driver of the CPU GEGLU (kernels/geglu.h): work items are fixed blocks of whole rows; the backward's
// per-block dbias partial sums are combined in double, in block order.
#include <algorithm>
#include <vector>

#include "kernels/geglu.h"

namespace tsjax {
namespace {

constexpr int64_t kItemElems = 16384;  // output elements per work item (64 KiB of float32)

int64_t BlockRows(const GegluParams& p) { return std::max<int64_t>(1, kItemElems / std::max<int64_t>(1, p.f)); }

}  // namespace

void GegluForwardCpu(const GegluParams& p, const void* x, const float* bias, void* y, CpuIsa isa,
                     const ParallelFor& parallel_for) {
  auto* fn = isa == CpuIsa::kAvx512 ? geglu_detail::ForwardAvx512 : geglu_detail::ForwardAvx2;
  const int64_t block = BlockRows(p);
  parallel_for((p.rows + block - 1) / block,
               [&](int64_t i) { fn(p, x, bias, y, i * block, std::min(p.rows, (i + 1) * block)); });
}

void GegluBackwardCpu(const GegluParams& p, const void* x, const float* bias, const void* dy, void* dx,
                      float* dbias, CpuIsa isa, const ParallelFor& parallel_for) {
  auto* fn = isa == CpuIsa::kAvx512 ? geglu_detail::BackwardAvx512 : geglu_detail::BackwardAvx2;
  const int64_t block = BlockRows(p), items = (p.rows + block - 1) / block, f2 = 2 * p.f;
  std::vector<float> part(items * f2, 0.0f);
  parallel_for(items, [&](int64_t i) {
    fn(p, x, bias, dy, dx, part.data() + i * f2, i * block, std::min(p.rows, (i + 1) * block));
  });
  std::vector<double> total(f2, 0.0);
  for (int64_t i = 0; i < items; ++i)
    for (int64_t c = 0; c < f2; ++c) total[c] += part[i * f2 + c];
  for (int64_t c = 0; c < f2; ++c) dbias[c] = static_cast<float>(total[c]);
}

}  // namespace tsjax

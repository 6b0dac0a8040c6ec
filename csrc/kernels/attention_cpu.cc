// Drivers of the CPU flash attention (kernels/attention.h): one work item per (batch, head) pair.
#include "kernels/attention.h"

namespace tsjax {

void AttentionForwardCpu(const AttentionParams& p, const float* q, const float* k, const float* v, float* o,
                         float* lse, CpuIsa isa, const ParallelFor& parallel_for) {
  auto head = isa == CpuIsa::kAvx512 ? attention_detail::ForwardHeadAvx512 : attention_detail::ForwardHeadAvx2;
  parallel_for(p.batch * p.heads, [&](int64_t i) { head(p, i / p.heads, i % p.heads, q, k, v, o, lse); });
}

void AttentionBackwardCpu(const AttentionParams& p, const float* q, const float* k, const float* v, const float* o,
                          const float* lse, const float* dout, float* dq, float* dk, float* dv, CpuIsa isa,
                          const ParallelFor& parallel_for) {
  auto head = isa == CpuIsa::kAvx512 ? attention_detail::BackwardHeadAvx512 : attention_detail::BackwardHeadAvx2;
  parallel_for(p.batch * p.heads,
               [&](int64_t i) { head(p, i / p.heads, i % p.heads, q, k, v, o, lse, dout, dq, dk, dv); });
}

}  // namespace tsjax

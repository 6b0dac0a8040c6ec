// Flash attention (forward and backward) for the CPU, framework-agnostic.
//
// Why: XLA:CPU runs the UNets' self-attention over 1024-4096 tokens 1.7-2.5x slower than PyTorch's CPU
// flash attention (bench/README.md, "Native CPU attention"). These kernels compute, per batch b and
// head h, non-causal scaled dot-product attention without materialising the [N, M] weights:
//
//   forward   o = softmax(scale * q k^T) v,  lse = logsumexp(scale * q k^T) per query row
//   backward  p = exp(scale * q k^T - lse),  delta = rowsum(do * o),  ds = scale * p * (do v^T - delta)
//             dq = ds k,  dk = ds^T q,  dv = p^T do
//
// over blocks of keys and query rows (forward: up to kFcMax keys x kFr rows, online softmax; backward:
// kBc keys x kBr rows, the weights recomputed from lse). Layouts: q, o, do, dq [B, N, H, D]; k, v, dk, dv [B, M, H, D];
// lse [B, H, N]; all float32, D a multiple of the vector width (16 with AVX-512F, 8 with AVX2). Work
// items are (b, h) pairs; results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "kernels/cpu_isa.h"
#include "kernels/parallel.h"

namespace tsjax {

struct AttentionParams {
  int64_t batch, n, m, heads, dim;  // q [batch, n, heads, dim], k / v [batch, m, heads, dim]
  float scale;
};

void AttentionForwardCpu(const AttentionParams& p, const float* q, const float* k, const float* v, float* o,
                         float* lse, CpuIsa isa, const ParallelFor& parallel_for);

void AttentionBackwardCpu(const AttentionParams& p, const float* q, const float* k, const float* v, const float* o,
                          const float* lse, const float* dout, float* dq, float* dk, float* dv, CpuIsa isa,
                          const ParallelFor& parallel_for);

namespace attention_detail {

// Per-ISA entry points (attention_cpu_avx512.cc / attention_cpu_avx2.cc); one (b, h) pair each.
void ForwardHeadAvx512(const AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                       float* o, float* lse);
void ForwardHeadAvx2(const AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                     float* o, float* lse);
void BackwardHeadAvx512(const AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                        const float* o, const float* lse, const float* dout, float* dq, float* dk, float* dv);
void BackwardHeadAvx2(const AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                      const float* o, const float* lse, const float* dout, float* dq, float* dk, float* dv);

}  // namespace attention_detail
}  // namespace tsjax

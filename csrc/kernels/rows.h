// Row gather / scatter-add on the CPU: the memory-bound halves of per-pixel vertex lookups
// (tsjax.ops._rows). Framework-agnostic; rows are C 32-bit words, copied bit for bit by gather.
//
//  Gather:     out[b, n, :] = table[b if Bt == B else 0, idx[b, n], :]   (zeros for idx outside [0, R))
//  ScatterAdd: out[bo, r, :] = sum over (b, n) with idx[b, n] == r of values[b, n, :], where bo = b
//              when Bo == B and bo = 0 when Bo == 1; idx outside [0, R) is dropped. Every output row
//              is accumulated by one thread in (b, n) order, so results are deterministic and
//              independent of the thread count.
#pragma once
#include <cstdint>

namespace tsjax {

void GatherRowsCpu(const uint32_t* table, int64_t bt, int64_t rows, int64_t cols, const int32_t* idx,
                   int64_t batch, int64_t n, uint32_t* out, int num_threads);

void ScatterAddRowsCpu(const float* values, const int32_t* idx, int64_t batch, int64_t n, int64_t cols,
                       float* out, int64_t bo, int64_t rows, int num_threads);

}  // namespace tsjax

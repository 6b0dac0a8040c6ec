// CPU row gather / scatter-add (see rows.h).
#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "kernels/rows.h"

namespace tsjax {
namespace {

template <class F>
void ParallelFor(int64_t items, int num_threads, F&& fn) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  const int nt = static_cast<int>(std::min<int64_t>(num_threads, items));
  if (nt <= 1) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t)
    pool.emplace_back([&, t] { for (int64_t i = t; i < items; i += nt) fn(i); });
  for (auto& th : pool) th.join();
}

constexpr int64_t kGatherChunk = 1 << 16;  // rows per gather work item

}  // namespace

void GatherRowsCpu(const uint32_t* table, int64_t bt, int64_t rows, int64_t cols, const int32_t* idx,
                   int64_t batch, int64_t n, uint32_t* out, int num_threads) {
  const int64_t chunks = (n + kGatherChunk - 1) / kGatherChunk;
  ParallelFor(batch * chunks, num_threads, [&](int64_t item) {
    const int64_t b = item / chunks, n0 = (item % chunks) * kGatherChunk, n1 = std::min(n, n0 + kGatherChunk);
    const uint32_t* tb = table + (bt == batch ? b : 0) * rows * cols;
    const int32_t* ib = idx + b * n;
    uint32_t* ob = out + b * n * cols;
    for (int64_t k = n0; k < n1; ++k) {
      const int32_t r = ib[k];
      if (r >= 0 && r < rows) std::memcpy(ob + k * cols, tb + int64_t(r) * cols, cols * sizeof(uint32_t));
      else std::memset(ob + k * cols, 0, cols * sizeof(uint32_t));
    }
  });
}

void ScatterAddRowsCpu(const float* values, const int32_t* idx, int64_t batch, int64_t n, int64_t cols,
                       float* out, int64_t bo, int64_t rows, int num_threads) {
  std::fill(out, out + bo * rows * cols, 0.0f);
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  // Items: (output batch, row range). With one output batch per input batch and enough batches,
  // an item is a whole batch; otherwise the rows are split so every thread has work and each
  // item scans the (b, n) entries of its output batch, adding those in its row range.
  const int64_t parts = (bo == batch && batch >= num_threads) ? 1 : std::max<int64_t>(1, (num_threads + bo - 1) / bo);
  const int64_t span = (rows + parts - 1) / parts;
  ParallelFor(bo * parts, num_threads, [&](int64_t item) {
    const int64_t o = item / parts;
    const int64_t r0 = (item % parts) * span, r1 = std::min(rows, r0 + span);
    float* ob = out + o * rows * cols;
    const int64_t b0 = bo == batch ? o : 0, b1 = bo == batch ? o + 1 : batch;
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t* ib = idx + b * n;
      const float* vb = values + b * n * cols;
      for (int64_t k = 0; k < n; ++k) {
        const int64_t r = ib[k];
        if (r < r0 || r >= r1) continue;
        float* dst = ob + r * cols;
        const float* src = vb + k * cols;
        for (int64_t c = 0; c < cols; ++c) dst[c] += src[c];
      }
    }
  });
}

}  // namespace tsjax

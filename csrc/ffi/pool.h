// A ParallelFor (kernels/conv.h) on XLA's intra-op thread pool, for the CPU FFI handlers.
//
// The calling thread takes work items too, so a call completes even when every pool thread is busy;
// helper tasks that start after the call has returned find the loop closed and leave.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>

#include "kernels/parallel.h"
#include "xla/ffi/api/ffi.h"

namespace tsjax {
namespace ffi_pool {

// Shared by the calling thread and the helper tasks; owned jointly so that a helper that starts after
// the call has returned only sees `closed` and leaves.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
  std::atomic<bool> closed{false};
  std::mutex mu;
  std::condition_variable cv;
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;

  void Drain() {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) (*fn)(i);
  }
};

// The threads a PoolParallelFor(pool, cap_env) loop runs on (the calling one included): the pool's size,
// capped by the environment variable cap_env when it is set to a positive number.
inline int64_t PoolThreads(xla::ffi::ThreadPool& pool, const char* cap_env) {
  int64_t threads = pool.num_threads();
  const char* cap_s = std::getenv(cap_env);
  const int64_t cap = cap_s ? std::atoll(cap_s) : 0;
  if (cap > 0) threads = std::min(threads, cap);
  return std::max<int64_t>(1, threads);
}

inline tsjax::ParallelFor PoolParallelFor(xla::ffi::ThreadPool& pool, const char* cap_env) {
  return [&pool, cap_env](int64_t n, const std::function<void(int64_t)>& fn) {
    const int64_t threads = std::min(PoolThreads(pool, cap_env), n);
    if (threads <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto st = std::make_shared<ParallelState>();
    st->n = n;
    st->fn = &fn;
    for (int64_t k = 1; k < threads; ++k) {
      pool.Schedule([st] {
        st->active.fetch_add(1);
        if (!st->closed.load()) st->Drain();
        std::lock_guard<std::mutex> lock(st->mu);
        st->active.fetch_sub(1);
        st->cv.notify_all();
      });
    }
    st->Drain();
    st->closed.store(true);
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->active.load() == 0; });
  };
}

}  // namespace ffi_pool
}  // namespace tsjax

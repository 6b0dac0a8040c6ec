// The parallel-loop callback that tsjax's CPU kernels take (framework-agnostic).
#pragma once

#include <cstdint>
#include <functional>

namespace tsjax {

// ParallelFor(n, fn): call fn(i) once for every i in [0, n), possibly concurrently, and return when all
// calls have returned.
using ParallelFor = std::function<void(int64_t, const std::function<void(int64_t)>&)>;

}  // namespace tsjax

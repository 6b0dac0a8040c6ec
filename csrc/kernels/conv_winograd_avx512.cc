// AVX-512F instantiation of the Winograd transforms (kernels/conv_winograd_impl.h).
#include <immintrin.h>

#include <cstdint>

#include "kernels/conv.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#endif

namespace tsjax {
namespace conv_detail {
namespace avx512 {

#include "kernels/simd_avx512.h"

#include "kernels/conv_winograd_impl.h"

}  // namespace avx512

void WinoInputAvx512(const WinoInput& t) { avx512::WinoInputDispatch<avx512::V>(t); }
void WinoKernelAvx512(const WinoKernel& t) { avx512::WinoKernelDispatch<avx512::V>(t); }
void WinoOutputAvx512(const WinoOutput& t) { avx512::WinoOutputDispatch<avx512::V>(t); }

}  // namespace conv_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// AVX2+FMA instantiation of the Winograd transforms (kernels/conv_winograd_impl.h).
#include <immintrin.h>

#include <cstdint>

#include "kernels/conv.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace tsjax {
namespace conv_detail {
namespace avx2 {

#include "kernels/simd_avx2.h"

#include "kernels/conv_winograd_impl.h"

}  // namespace avx2

void WinoInputAvx2(const WinoInput& t) { avx2::WinoInputDispatch<avx2::V>(t); }
void WinoKernelAvx2(const WinoKernel& t) { avx2::WinoKernelDispatch<avx2::V>(t); }
void WinoOutputAvx2(const WinoOutput& t) { avx2::WinoOutputDispatch<avx2::V>(t); }

}  // namespace conv_detail
}  // namespace tsjax

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

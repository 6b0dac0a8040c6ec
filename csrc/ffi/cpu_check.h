// Argument checks shared by the CPU FFI handlers of the SIMD row kernels (attention, GroupNorm, LayerNorm,
// GEGLU): the data type of x and the instruction set with its vector width.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/cpu_isa.h"
#include "xla/ffi/api/ffi.h"

namespace tsjax {
namespace ffi_check {

// *bf16 = whether `type` is bfloat16; an error naming `op` unless it is float32 or bfloat16.
inline xla::ffi::Error FloatOrBf16(const char* op, xla::ffi::DataType type, bool* bf16) {
  *bf16 = type == xla::ffi::DataType::BF16;
  if (!*bf16 && type != xla::ffi::DataType::F32)
    return xla::ffi::Error::InvalidArgument(std::string(op) + ": x must be float32 or bfloat16");
  return xla::ffi::Error::Success();
}

// Floats per SIMD register of `isa` (AVX-512: 16, AVX2: 8).
inline int64_t VectorWidth(CpuIsa isa) { return isa == CpuIsa::kAvx512 ? 16 : 8; }

// An error naming `op` when `isa` (CpuIsaFromEnv()) is kNone or when `channels` (the dimension the kernel
// vectorises over, named `what` in the message) is not a positive multiple of the ISA's vector width.
inline xla::ffi::Error IsaAndWidth(const char* op, CpuIsa isa, int64_t channels, const char* what) {
  if (isa == CpuIsa::kNone)
    return xla::ffi::Error::Internal(std::string(op) + ": this CPU has neither AVX2+FMA nor AVX-512F");
  if (channels < 1 || channels % VectorWidth(isa) != 0)
    return xla::ffi::Error::InvalidArgument(std::string(op) + ": " + what + " must be a multiple of the vector width (" +
                                            std::to_string(VectorWidth(isa)) + ")");
  return xla::ffi::Error::Success();
}

}  // namespace ffi_check
}  // namespace tsjax

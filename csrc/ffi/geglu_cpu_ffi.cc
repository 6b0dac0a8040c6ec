// XLA FFI handlers (CPU) for the GEGLU kernels (kernels/geglu.h): x [R, 2F], y / dy [R, F], dx [R, 2F],
// all float32 or all bfloat16; bias / dbias [2F] float32. Threads: ffi/pool.h (TSJAX_CPU_THREADS).
#include "ffi/cpu_check.h"
#include "ffi/pool.h"
#include "kernels/geglu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tsjax::ffi_pool::PoolParallelFor;

// Validates x [R, 2F] and an [R, F] partner (y or dy) of x's dtype; fills p.
ffi::Error Check(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::F32>& bias, ffi::DataType half_type,
                 ffi::Span<const int64_t> half, tsjax::GegluParams* p) {
  auto d = x.dimensions();
  if (d.size() != 2 || d[1] % 2 != 0) return ffi::Error::InvalidArgument("geglu: x must be [R, 2F]");
  bool bf16;
  if (ffi::Error e = tsjax::ffi_check::FloatOrBf16("geglu", x.element_type(), &bf16); e.failure()) return e;
  if (bias.dimensions().size() != 1 || bias.dimensions()[0] != d[1])
    return ffi::Error::InvalidArgument("geglu: bias must be [2F] for x [R, 2F]");
  if (half_type != x.element_type()) return ffi::Error::InvalidArgument("geglu: y / dy dtype != x dtype");
  if (half.size() != 2 || half[0] != d[0] || half[1] != d[1] / 2)
    return ffi::Error::InvalidArgument("geglu: y / dy must be [R, F] for x [R, 2F]");
  if (ffi::Error e = tsjax::ffi_check::IsaAndWidth("geglu", tsjax::CpuIsaFromEnv(), d[1] / 2, "F"); e.failure())
    return e;
  *p = tsjax::GegluParams{d[0], d[1] / 2, bf16};
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> bias,
                       ffi::Result<ffi::AnyBuffer> y) {
  tsjax::GegluParams p;
  if (ffi::Error e = Check(x, bias, y->element_type(), y->dimensions(), &p); e.failure()) return e;
  tsjax::GegluForwardCpu(p, x.untyped_data(), bias.typed_data(), y->untyped_data(), tsjax::CpuIsaFromEnv(),
                         PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> bias, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dbias) {
  tsjax::GegluParams p;
  if (ffi::Error e = Check(x, bias, dy.element_type(), dy.dimensions(), &p); e.failure()) return e;
  if (dx->element_type() != x.element_type() || dx->dimensions().size() != 2 ||
      dx->dimensions()[0] != p.rows || dx->dimensions()[1] != 2 * p.f)
    return ffi::Error::InvalidArgument("geglu: dx must be [R, 2F] of x's dtype");
  if (dbias->dimensions().size() != 1 || dbias->dimensions()[0] != 2 * p.f)
    return ffi::Error::InvalidArgument("geglu: dbias must be [2F]");
  tsjax::GegluBackwardCpu(p, x.untyped_data(), bias.typed_data(), dy.untyped_data(), dx->untyped_data(),
                          dbias->typed_data(), tsjax::CpuIsaFromEnv(), PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxGegluForwardCpu, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxGegluBackwardCpu, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

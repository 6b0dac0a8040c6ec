// XLA FFI handlers (CPU) for the GroupNorm kernels (kernels/group_norm.h). x / y / dy / dx: float32 or
// bfloat16 ([B, N, C]); parameters and statistics float32. Threads: ffi/pool.h (TSJAX_CPU_THREADS).
#include "ffi/cpu_check.h"
#include "ffi/pool.h"
#include "kernels/group_norm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tsjax::ffi_pool::PoolParallelFor;

ffi::Error Check(const ffi::AnyBuffer& x, int64_t groups, float eps, bool silu, tsjax::GroupNormParams* p) {
  auto d = x.dimensions();
  if (d.size() != 3) return ffi::Error::InvalidArgument("group_norm: x must be [B, N, C]");
  bool bf16;
  if (ffi::Error e = tsjax::ffi_check::FloatOrBf16("group_norm", x.element_type(), &bf16); e.failure()) return e;
  if (ffi::Error e = tsjax::ffi_check::IsaAndWidth("group_norm", tsjax::CpuIsaFromEnv(), d[2], "channels"); e.failure())
    return e;
  if (groups < 1 || d[2] % groups != 0)
    return ffi::Error::InvalidArgument("group_norm: channels must be a multiple of groups");
  *p = tsjax::GroupNormParams{d[0], d[1], d[2], groups, eps, silu, bf16};
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> beta,
                       ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                       int64_t groups, float eps, bool silu) {
  tsjax::GroupNormParams p;
  if (ffi::Error e = Check(x, groups, eps, silu, &p); e.failure()) return e;
  if (y->element_type() != x.element_type()) return ffi::Error::InvalidArgument("group_norm: y dtype != x dtype");
  tsjax::GroupNormForwardCpu(p, x.untyped_data(), gamma.typed_data(), beta.typed_data(), y->untyped_data(),
                             mean->typed_data(), rstd->typed_data(), tsjax::CpuIsaFromEnv(),
                             PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> gamma,
                        ffi::Buffer<ffi::F32> beta, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dgamma,
                        ffi::ResultBuffer<ffi::F32> dbeta, int64_t groups, float eps, bool silu) {
  tsjax::GroupNormParams p;
  if (ffi::Error e = Check(x, groups, eps, silu, &p); e.failure()) return e;
  if (dy.element_type() != x.element_type() || dx->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("group_norm: dy / dx dtype != x dtype");
  tsjax::GroupNormBackwardCpu(p, x.untyped_data(), dy.untyped_data(), gamma.typed_data(), beta.typed_data(),
                              mean.typed_data(), rstd.typed_data(), dx->untyped_data(), dgamma->typed_data(),
                              dbeta->typed_data(), tsjax::CpuIsaFromEnv(), PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxGroupNormForwardCpu, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps")
                                  .Attr<bool>("silu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxGroupNormBackwardCpu, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps")
                                  .Attr<bool>("silu"));

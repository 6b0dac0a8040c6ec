// XLA FFI handlers (CPU) for the flash attention kernels (kernels/attention.h). Threads: ffi/pool.h,
// capped by TSJAX_CPU_THREADS; instruction set: TSJAX_CPU_ISA (kernels/cpu_isa.h).
#include <algorithm>

#include "ffi/cpu_check.h"
#include "ffi/pool.h"
#include "kernels/attention.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tsjax::ffi_pool::PoolParallelFor;

ffi::Error Check(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k, tsjax::CpuIsa isa, float scale,
                 tsjax::AttentionParams* p) {
  if (q.size() != 4 || k.size() != 4) return ffi::Error::InvalidArgument("attention: expected [B, N, H, D] arrays");
  if (q[0] != k[0] || q[2] != k[2] || q[3] != k[3])
    return ffi::Error::InvalidArgument("attention: q and k/v differ in batch, heads or head size");
  if (ffi::Error e = tsjax::ffi_check::IsaAndWidth("attention", isa, q[3], "head size"); e.failure()) return e;
  if (k[1] < 1) return ffi::Error::InvalidArgument("attention: no keys");
  *p = tsjax::AttentionParams{q[0], q[1], k[1], q[2], q[3], scale};
  return ffi::Error::Success();
}

// q [B, N, H, D], k / v [B, M, H, D] -> o [B, N, H, D], lse [B, H, N].
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, float scale) {
  const tsjax::CpuIsa isa = tsjax::CpuIsaFromEnv();
  tsjax::AttentionParams p;
  if (ffi::Error e = Check(q.dimensions(), k.dimensions(), isa, scale, &p); e.failure()) return e;
  auto kd = k.dimensions(), vd = v.dimensions();
  if (!std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("attention: k and v shapes differ");
  tsjax::AttentionForwardCpu(p, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(), lse->typed_data(), isa,
                             PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

// q, k, v, o, lse, do -> dq, dk, dv (shapes as the forward's).
ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale) {
  const tsjax::CpuIsa isa = tsjax::CpuIsaFromEnv();
  tsjax::AttentionParams p;
  if (ffi::Error e = Check(q.dimensions(), k.dimensions(), isa, scale, &p); e.failure()) return e;
  tsjax::AttentionBackwardCpu(p, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), lse.typed_data(),
                              dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(), isa,
                              PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxAttentionForwardCpu, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxAttentionBackwardCpu, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

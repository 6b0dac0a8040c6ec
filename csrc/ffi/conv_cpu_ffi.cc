// XLA FFI handlers (CPU) for the direct convolution kernels (kernels/conv.h).
//
// Work items run on XLA's intra-op thread pool (ffi/pool.h). Environment, read at every call:
//   TSJAX_CPU_THREADS  at most this many threads per call (0 / unset: the pool's size)
//   TSJAX_CPU_ISA      avx2: use AVX2 even where AVX-512F is available (for tests and benchmarks)
#include <cstdlib>
#include <cstring>

#include "ffi/pool.h"
#include "kernels/conv.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tsjax::ffi_pool::PoolParallelFor;
using tsjax::ffi_pool::PoolThreads;

ffi::Error Params(ffi::Span<const int64_t> x, ffi::Span<const int64_t> out_pixels, int64_t kh, int64_t kw,
                  int64_t ci, int64_t co, int64_t sh, int64_t sw, int64_t ph, int64_t pw, tsjax::ConvParams* p) {
  if (x.size() != 4 || out_pixels.size() != 4) return ffi::Error::InvalidArgument("conv: expected rank-4 NHWC arrays");
  if (x[3] != ci || out_pixels[0] != x[0] || out_pixels[3] != co)
    return ffi::Error::InvalidArgument("conv: shapes of input, kernel and output do not match");
  if (sh < 1 || sw < 1) return ffi::Error::InvalidArgument("conv: strides must be >= 1");
  if (co % 16 != 0) return ffi::Error::InvalidArgument("conv: output channels must be a multiple of 16");
  if (tsjax::CpuBestIsa() == tsjax::CpuIsa::kNone)
    return ffi::Error::Internal("conv: this CPU has neither AVX2+FMA nor AVX-512F");
  *p = tsjax::ConvParams{x[0], x[1], x[2], ci, out_pixels[1], out_pixels[2], co, kh, kw, sh, sw, ph, pw};
  return ffi::Error::Success();
}

// x [B, H, W, Ci], w [KH, KW, Ci, Co] (flip: [KH, KW, Co, Ci], used flipped) -> y [B, Ho, Wo, Co].
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool flip) {
  auto wd = w.dimensions();
  if (wd.size() != 4) return ffi::Error::InvalidArgument("conv: kernel must be [KH, KW, Ci, Co]");
  if (flip && (sh != 1 || sw != 1)) return ffi::Error::InvalidArgument("conv: a flipped kernel needs stride 1");
  tsjax::ConvParams p;
  if (ffi::Error e = Params(x.dimensions(), y->dimensions(), wd[0], wd[1], flip ? wd[3] : wd[2],
                            flip ? wd[2] : wd[3], sh, sw, ph, pw, &p);
      e.failure())
    return e;
  p.flip = flip;
  tsjax::ConvForwardCpu(p, x.typed_data(), w.typed_data(), y->typed_data(), tsjax::CpuIsaFromEnv(),
                        PoolParallelFor(pool, "TSJAX_CPU_THREADS"), PoolThreads(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

// x [B, H, W, Ci], dy [B, Ho, Wo, Co] -> dw [KH, KW, Ci, Co].
ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  auto wd = dw->dimensions();
  if (wd.size() != 4) return ffi::Error::InvalidArgument("conv: kernel gradient must be [KH, KW, Ci, Co]");
  tsjax::ConvParams p;
  if (ffi::Error e = Params(x.dimensions(), dy.dimensions(), wd[0], wd[1], wd[2], wd[3], sh, sw, ph, pw, &p);
      e.failure())
    return e;
  tsjax::ConvKernelGradCpu(p, x.typed_data(), dy.typed_data(), dw->typed_data(), tsjax::CpuIsaFromEnv(),
                           PoolParallelFor(pool, "TSJAX_CPU_THREADS"), PoolThreads(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

// x [B, H, W, Ci], w [3, 3, Ci, Co] (flip: [3, 3, Co, Ci], used flipped) -> y [B, Ho, Wo, Co]; stride 1,
// Winograd F(m x m, 3 x 3), m = 2 or 4.
ffi::Error ForwardWinogradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                               ffi::ResultBuffer<ffi::F32> y, int64_t ph, int64_t pw, bool flip, int64_t m) {
  auto wd = w.dimensions();
  if (wd.size() != 4 || wd[0] != 3 || wd[1] != 3) return ffi::Error::InvalidArgument("conv: Winograd needs a 3x3 kernel");
  if (m != 2 && m != 4) return ffi::Error::InvalidArgument("conv: Winograd tile size m must be 2 or 4");
  tsjax::ConvParams p;
  if (ffi::Error e = Params(x.dimensions(), y->dimensions(), 3, 3, flip ? wd[3] : wd[2], flip ? wd[2] : wd[3], 1, 1,
                            ph, pw, &p);
      e.failure())
    return e;
  if (p.ci % 16 != 0) return ffi::Error::InvalidArgument("conv: Winograd needs input channels a multiple of 16");
  p.flip = flip;
  tsjax::ConvForwardWinogradCpu(p, static_cast<int>(m), x.typed_data(), w.typed_data(), y->typed_data(),
                                tsjax::CpuIsaFromEnv(), PoolParallelFor(pool, "TSJAX_CPU_THREADS"),
                                PoolThreads(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

// bf16 x [B, H, W, Ci], bf16 w [KH, KW, Ci, Co] (flip: as ForwardImpl) -> bf16 y [B, Ho, Wo, Co]; stride 1, AMX.
ffi::Error ForwardBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                           ffi::ResultBuffer<ffi::BF16> y, int64_t ph, int64_t pw, bool flip) {
  auto wd = w.dimensions();
  if (wd.size() != 4) return ffi::Error::InvalidArgument("conv: kernel must be [KH, KW, Ci, Co]");
  if (!tsjax::CpuAmxBf16()) return ffi::Error::Internal("conv: bf16 AMX kernels are not available on this CPU");
  tsjax::ConvParams p;
  if (ffi::Error e = Params(x.dimensions(), y->dimensions(), wd[0], wd[1], flip ? wd[3] : wd[2], flip ? wd[2] : wd[3],
                            1, 1, ph, pw, &p);
      e.failure())
    return e;
  p.flip = flip;
  tsjax::ConvForwardBf16Amx(p, x.typed_data(), w.typed_data(), y->typed_data(), true,
                            PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxConvForwardBf16Cpu, ForwardBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<bool>("flip"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxConvForwardCpu, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<bool>("flip"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxConvForwardWinogradCpu, ForwardWinogradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<bool>("flip")
                                  .Attr<int64_t>("m"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxConvKernelGradCpu, KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

// XLA FFI handlers (CPU) for the direct convolution kernels (kernels/conv.h).
//
// Work items run on XLA's intra-op thread pool (the calling thread takes items too, so the call
// completes even when every pool thread is busy). Environment:
//   TSJAX_CONV_THREADS  at most this many threads per call (0 / unset: the pool's size)
//   TSJAX_CONV_ISA      avx2 | avx512: use at most this instruction set (for tests and benchmarks)
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "kernels/conv.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

int64_t EnvInt(const char* name) {
  const char* s = std::getenv(name);
  return s ? std::atoll(s) : 0;
}

tsjax::ConvIsa Isa() {
  tsjax::ConvIsa isa = tsjax::ConvBestIsa();
  const char* s = std::getenv("TSJAX_CONV_ISA");
  if (s && std::strcmp(s, "avx2") == 0 && isa == tsjax::ConvIsa::kAvx512) isa = tsjax::ConvIsa::kAvx2;
  return isa;
}

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

tsjax::ParallelFor PoolParallelFor(ffi::ThreadPool& pool) {
  return [&pool](int64_t n, const std::function<void(int64_t)>& fn) {
    int64_t threads = pool.num_threads();
    const int64_t cap = EnvInt("TSJAX_CONV_THREADS");
    if (cap > 0) threads = std::min(threads, cap);
    threads = std::min(threads, n);
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

ffi::Error Params(ffi::Span<const int64_t> x, ffi::Span<const int64_t> out_pixels, int64_t kh, int64_t kw,
                  int64_t ci, int64_t co, int64_t sh, int64_t sw, int64_t ph, int64_t pw, tsjax::ConvParams* p) {
  if (x.size() != 4 || out_pixels.size() != 4) return ffi::Error::InvalidArgument("conv: expected rank-4 NHWC arrays");
  if (x[3] != ci || out_pixels[0] != x[0] || out_pixels[3] != co)
    return ffi::Error::InvalidArgument("conv: shapes of input, kernel and output do not match");
  if (sh < 1 || sw < 1) return ffi::Error::InvalidArgument("conv: strides must be >= 1");
  if (co % 16 != 0) return ffi::Error::InvalidArgument("conv: output channels must be a multiple of 16");
  if (tsjax::ConvBestIsa() == tsjax::ConvIsa::kNone)
    return ffi::Error::Internal("conv: this CPU has neither AVX2+FMA nor AVX-512F");
  *p = tsjax::ConvParams{x[0], x[1], x[2], ci, out_pixels[1], out_pixels[2], co, kh, kw, sh, sw, ph, pw};
  return ffi::Error::Success();
}

// x [B, H, W, Ci], w [KH, KW, Ci, Co] -> y [B, Ho, Wo, Co].
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  auto wd = w.dimensions();
  if (wd.size() != 4) return ffi::Error::InvalidArgument("conv: kernel must be [KH, KW, Ci, Co]");
  tsjax::ConvParams p;
  if (ffi::Error e = Params(x.dimensions(), y->dimensions(), wd[0], wd[1], wd[2], wd[3], sh, sw, ph, pw, &p);
      e.failure())
    return e;
  tsjax::ConvForwardCpu(p, x.typed_data(), w.typed_data(), y->typed_data(), Isa(), PoolParallelFor(pool));
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
  tsjax::ConvKernelGradCpu(p, x.typed_data(), dy.typed_data(), dw->typed_data(), Isa(), PoolParallelFor(pool));
  return ffi::Error::Success();
}

}  // namespace

// 0: no native convolution on this CPU, 1: AVX2+FMA, 2: AVX-512F (after TSJAX_CONV_ISA).
extern "C" int TsjaxConvIsa() { return static_cast<int>(Isa()); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxConvForwardCpu, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

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

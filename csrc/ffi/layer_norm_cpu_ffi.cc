// XLA FFI handlers (CPU) for the LayerNorm kernels (kernels/layer_norm.h). x / y / dy / dx: float32 or
// bfloat16 [..., C], normalised over C; scale / bias / dscale / dbias float32 [..., C] whose leading dims
// are a prefix of x's (none normally; the batch dims under vmap, vmap_method="broadcast_all"); mean /
// rstd float32 [...] (x's leading dims). Threads: ffi/pool.h (TSJAX_CPU_THREADS).
#include <cstddef>

#include "ffi/cpu_check.h"
#include "ffi/pool.h"
#include "kernels/layer_norm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tsjax::ffi_pool::PoolParallelFor;

int64_t Product(ffi::Span<const int64_t> d, size_t n) {
  int64_t out = 1;
  for (size_t i = 0; i < n; ++i) out *= d[i];
  return out;
}

bool SameDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// Fills *p and *isa from x [..., C] and the parameter dims [..., C] (a prefix of x's leading dims).
ffi::Error Check(const ffi::AnyBuffer& x, ffi::Span<const int64_t> param, float eps, tsjax::LayerNormParams* p,
                 tsjax::CpuIsa* isa) {
  auto d = x.dimensions();
  if (d.size() < 2) return ffi::Error::InvalidArgument("layer_norm: x must be [..., R, C]");
  bool bf16;
  if (ffi::Error e = tsjax::ffi_check::FloatOrBf16("layer_norm", x.element_type(), &bf16); e.failure()) return e;
  if (param.size() < 1 || param.size() > d.size() - 1 || param[param.size() - 1] != d[d.size() - 1])
    return ffi::Error::InvalidArgument("layer_norm: scale / bias must be [C] (or [batch..., C] under vmap)");
  const size_t lead = param.size() - 1;
  for (size_t i = 0; i < lead; ++i)
    if (param[i] != d[i]) return ffi::Error::InvalidArgument("layer_norm: scale / bias batch dims != x's");
  const int64_t c = d[d.size() - 1];
  *isa = tsjax::CpuIsaFromEnv();
  if (*isa == tsjax::CpuIsa::kAvx512 && c % 16 != 0) *isa = tsjax::CpuIsa::kAvx2;  // rows of 8k channels
  if (ffi::Error e = tsjax::ffi_check::IsaAndWidth("layer_norm", *isa, c, "channels"); e.failure()) return e;
  *p = tsjax::LayerNormParams{Product(d, d.size() - 1), c, Product(param, lead), eps, bf16};
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  tsjax::LayerNormParams p;
  tsjax::CpuIsa isa;
  if (ffi::Error e = Check(x, scale.dimensions(), eps, &p, &isa); e.failure()) return e;
  if (!SameDims(bias.dimensions(), scale.dimensions()))
    return ffi::Error::InvalidArgument("layer_norm: bias shape != scale shape");
  if (y->element_type() != x.element_type() || !SameDims(y->dimensions(), x.dimensions()))
    return ffi::Error::InvalidArgument("layer_norm: y dtype / shape != x's");
  if (static_cast<int64_t>(mean->element_count()) != p.rows || static_cast<int64_t>(rstd->element_count()) != p.rows)
    return ffi::Error::InvalidArgument("layer_norm: mean / rstd must have one element per row of x");
  tsjax::LayerNormForwardCpu(p, x.untyped_data(), scale.typed_data(), bias.typed_data(), y->untyped_data(),
                             mean->typed_data(), rstd->typed_data(), isa, PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias, float eps) {
  tsjax::LayerNormParams p;
  tsjax::CpuIsa isa;
  if (ffi::Error e = Check(x, scale.dimensions(), eps, &p, &isa); e.failure()) return e;
  if (dy.element_type() != x.element_type() || dx->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("layer_norm: dy / dx dtype != x dtype");
  if (!SameDims(dy.dimensions(), x.dimensions()) || !SameDims(dx->dimensions(), x.dimensions()))
    return ffi::Error::InvalidArgument("layer_norm: dy / dx shape != x shape");
  if (static_cast<int64_t>(mean.element_count()) != p.rows || static_cast<int64_t>(rstd.element_count()) != p.rows)
    return ffi::Error::InvalidArgument("layer_norm: mean / rstd must have one element per row of x");
  if (!SameDims(dscale->dimensions(), scale.dimensions()) || !SameDims(dbias->dimensions(), scale.dimensions()))
    return ffi::Error::InvalidArgument("layer_norm: dscale / dbias shape != scale shape");
  tsjax::LayerNormBackwardCpu(p, x.untyped_data(), dy.untyped_data(), scale.typed_data(), mean.typed_data(),
                              rstd.typed_data(), dx->untyped_data(), dscale->typed_data(), dbias->typed_data(), isa,
                              PoolParallelFor(pool, "TSJAX_CPU_THREADS"));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxLayerNormForwardCpu, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxLayerNormBackwardCpu, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

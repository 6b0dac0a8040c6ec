// XLA FFI handlers (CPU): unpack buffers and call tsjax::RasterizeCpu.
//   TsjaxRasterizeCpu:    (pos, tris) -> (ids, bary)   ids + the kernel's own (u, v, z/w)
//   TsjaxRasterizeIdsCpu: (pos, tris) -> ids            ids only (what tsjax.ops.rasterize uses:
//                                                       it recomputes (u, v, z/w) differentiably)
#include <algorithm>
#include <cstdlib>
#include <string>

#include "kernels/rasterize.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Shared by both handlers; bary == nullptr -> ids only.
static ffi::Error Run(ffi::Buffer<ffi::F32> pos, ffi::Buffer<ffi::S32> tris, ffi::ResultBuffer<ffi::S32> ids,
                      float* bary) {
  auto pd = pos.dimensions();
  auto td = tris.dimensions();
  auto od = ids->dimensions();
  if (pd.size() != 3 || pd[2] != 4) return ffi::Error::InvalidArgument("pos must be [B,V,4]");
  if (td.size() != 2 || td[1] != 3) return ffi::Error::InvalidArgument("tris must be [F,3]");
  if (od.size() != 3 || od[0] != pd[0]) return ffi::Error::InvalidArgument("ids must be [B,H,W]");
  tsjax::RasterParams p;
  p.pos = pos.typed_data();
  p.tris = tris.typed_data();
  p.ids = ids->typed_data();
  p.bary = bary;
  p.batch = pd[0];
  p.num_verts = pd[1];
  p.num_tris = td[0];
  p.height = static_cast<int>(od[1]);
  p.width = static_cast<int>(od[2]);
  // Indices were validated in Python; re-check cheaply so a bad call can never read out of bounds.
  // (min/max reduction: branch-free, vectorised)
  int32_t lo = 0, hi = 0;
  if (p.num_tris > 0) {
    lo = hi = p.tris[0];
    for (int64_t k = 0; k < p.num_tris * 3; ++k) {
      lo = std::min(lo, p.tris[k]);
      hi = std::max(hi, p.tris[k]);
    }
  }
  if (lo < 0 || hi >= p.num_verts) return ffi::Error::InvalidArgument("triangle index out of range");
  int threads = 0;
  if (const char* s = std::getenv("TSJAX_RASTER_THREADS")) threads = std::atoi(s);
  tsjax::RasterizeCpu(p, threads);
  return ffi::Error::Success();
}

static ffi::Error RasterizeCpuImpl(ffi::Buffer<ffi::F32> pos, ffi::Buffer<ffi::S32> tris,
                                   ffi::ResultBuffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> bary) {
  auto od = ids->dimensions();
  auto bd = bary->dimensions();
  if (od.size() != 3 || bd.size() != 4 || bd[0] != od[0] || bd[1] != od[1] || bd[2] != od[2] || bd[3] != 3)
    return ffi::Error::InvalidArgument("bary must be [B,H,W,3] matching ids");
  return Run(pos, tris, ids, bary->typed_data());
}

static ffi::Error RasterizeIdsCpuImpl(ffi::Buffer<ffi::F32> pos, ffi::Buffer<ffi::S32> tris,
                                      ffi::ResultBuffer<ffi::S32> ids) {
  return Run(pos, tris, ids, nullptr);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxRasterizeCpu, RasterizeCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxRasterizeIdsCpu, RasterizeIdsCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// XLA FFI handlers (CPU) for tsjax::GatherRowsCpu / ScatterAddRowsCpu (kernels/rows.h).
#include <cstdlib>
#include <cstring>

#include "kernels/rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

int Threads() {
  const char* s = std::getenv("TSJAX_RASTER_THREADS");
  return s ? std::atoi(s) : 0;
}

// table [Bt, R, C] f32 (any 32-bit payload, copied bitwise), idx [B, N] s32 -> out [B, N, C].
ffi::Error GatherImpl(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  auto td = table.dimensions();
  auto id = idx.dimensions();
  auto od = out->dimensions();
  if (td.size() != 3 || id.size() != 2 || od.size() != 3) return ffi::Error::InvalidArgument("gather_rows: bad ranks");
  if (!(td[0] == 1 || td[0] == id[0]) || od[0] != id[0] || od[1] != id[1] || od[2] != td[2])
    return ffi::Error::InvalidArgument("gather_rows: shapes do not match");
  static_assert(sizeof(float) == sizeof(uint32_t), "32-bit rows");
  tsjax::GatherRowsCpu(reinterpret_cast<const uint32_t*>(table.typed_data()), td[0], td[1], td[2],
                       idx.typed_data(), id[0], id[1], reinterpret_cast<uint32_t*>(out->typed_data()), Threads());
  return ffi::Error::Success();
}

// values [B, N, C] f32, idx [B, N] s32 -> out [Bo, R, C] (Bo = 1 or B; R from the output shape).
ffi::Error ScatterImpl(ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  auto vd = values.dimensions();
  auto id = idx.dimensions();
  auto od = out->dimensions();
  if (vd.size() != 3 || id.size() != 2 || od.size() != 3) return ffi::Error::InvalidArgument("scatter_add_rows: bad ranks");
  if (vd[0] != id[0] || vd[1] != id[1] || !(od[0] == 1 || od[0] == vd[0]) || od[2] != vd[2])
    return ffi::Error::InvalidArgument("scatter_add_rows: shapes do not match");
  tsjax::ScatterAddRowsCpu(values.typed_data(), idx.typed_data(), vd[0], vd[1], vd[2], out->typed_data(), od[0],
                           od[1], Threads());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxGatherRowsCpu, GatherImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxScatterAddRowsCpu, ScatterImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

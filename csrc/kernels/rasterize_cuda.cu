// CUDA rasterizer + its XLA FFI handler (platform "CUDA").
//
// STATUS: compile-checked only (`python csrc/build.py --cuda on`); it has not been run on a GPU in
// this project. Semantics are those of csrc/kernels/rasterize.h and the pure-JAX reference:
//  1. clear: one 64-bit key per pixel set to ~0.
//  2. raster: one thread per (view, triangle): triangle setup (skip w <= eps, |area| <= eps or
//     non-finite), scan of the padded pixel box (part of the coverage rule), coverage by
//     barycentrics >= 0 (b = e * (1 / area)), depth z/w in [-1, 1]; atomicMin on key = (order-preserving bits of z/w) << 32 | triangle id, so the nearest
//     depth wins and equal depths go to the smaller id (the reference's tie rule).
//  3. resolve: one thread per pixel: id + 1 and perspective-correct (u, v, z/w) of the winner.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/rasterize.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

__device__ __forceinline__ uint32_t OrderedBits(float z) {
  uint32_t u = __float_as_uint(z);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float PixX(int j, int w) { return (2.0f * j + 1.0f) / w - 1.0f; }
__device__ __forceinline__ float PixY(int i, int h) { return 1.0f - (2.0f * i + 1.0f) / h; }

constexpr float kPad = 1e-2f;  // pixels, as csrc/kernels/rasterize_cpu.cc
__device__ __forceinline__ float SxOf(float x, int w) { return ((x + 1.0f) * w - 1.0f) * 0.5f; }
__device__ __forceinline__ float SyOf(float y, int h) { return ((1.0f - y) * h - 1.0f) * 0.5f; }
// float -> int with far-away values clamped first (conversion of out-of-range floats is undefined)
__device__ __forceinline__ int ClampPix(float v) { return int(fminf(fmaxf(v, -1e6f), 1e6f)); }

__global__ void ClearKernel(unsigned long long* keys, int64_t n) {
  int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k < n) keys[k] = ~0ull;
}

__global__ void RasterKernel(tsjax::RasterParams p, unsigned long long* keys) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= p.batch * p.num_tris) return;
  const int64_t b = t / p.num_tris, f = t % p.num_tris;
  const int h = p.height, w = p.width;
  const float* pos = p.pos + b * p.num_verts * 4;
  const int32_t* tv = p.tris + 3 * f;
  const float* a = pos + 4 * tv[0];
  const float* c1 = pos + 4 * tv[1];
  const float* c2 = pos + 4 * tv[2];
  if (!(a[3] > tsjax::kWEps && c1[3] > tsjax::kWEps && c2[3] > tsjax::kWEps)) return;
  const float x0 = a[0] / a[3], y0 = a[1] / a[3], z0 = a[2] / a[3];
  const float x1 = c1[0] / c1[3], y1 = c1[1] / c1[3], z1 = c1[2] / c1[3];
  const float x2 = c2[0] / c2[3], y2 = c2[1] / c2[3], z2 = c2[2] / c2[3];
  const float area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0);
  if (!(fabsf(area) > tsjax::kAreaEps) || !isfinite(area)) return;
  // Padded pixel box (part of the coverage rule, identical to the CPU kernel's per-vertex ranges):
  // sx = ((x + 1) W - 1) * 0.5 per corner, box = [ceil(min sx - pad), floor(max sx + pad)].
  const float sx0 = SxOf(x0, w), sx1 = SxOf(x1, w), sx2 = SxOf(x2, w);
  const float sy0 = SyOf(y0, h), sy1 = SyOf(y1, h), sy2 = SyOf(y2, h);
  const int j0 = max(0, ClampPix(ceilf(fminf(sx0, fminf(sx1, sx2)) - kPad)));
  const int j1 = min(w - 1, ClampPix(floorf(fmaxf(sx0, fmaxf(sx1, sx2)) + kPad)));
  const int i0 = max(0, ClampPix(ceilf(fminf(sy0, fminf(sy1, sy2)) - kPad)));
  const int i1 = min(h - 1, ClampPix(floorf(fmaxf(sy0, fmaxf(sy1, sy2)) + kPad)));
  if (j0 > j1 || i0 > i1) return;
  const float inv = 1.0f / area;
  unsigned long long* kb = keys + b * int64_t(h) * w;
  for (int i = i0; i <= i1; ++i) {
    const float py = PixY(i, h);
    for (int j = j0; j <= j1; ++j) {
      const float px = PixX(j, w);
      const float b0 = ((x1 - px) * (y2 - py) - (y1 - py) * (x2 - px)) * inv;
      const float bb1 = ((x2 - px) * (y0 - py) - (y2 - py) * (x0 - px)) * inv;
      const float b2 = 1.0f - b0 - bb1;
      if (!(b0 >= 0.0f && bb1 >= 0.0f && b2 >= 0.0f)) continue;
      // + 0.0f maps -0 to +0 so the key order treats them as the equal depths they are
      const float z = b0 * z0 + bb1 * z1 + b2 * z2 + 0.0f;
      if (!(z >= -1.0f && z <= 1.0f)) continue;
      const unsigned long long key = (static_cast<unsigned long long>(OrderedBits(z)) << 32) |
                                     static_cast<unsigned long long>(static_cast<uint32_t>(f));
      atomicMin(kb + int64_t(i) * w + j, key);
    }
  }
}

__global__ void ResolveKernel(tsjax::RasterParams p, const unsigned long long* keys) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int h = p.height, w = p.width;
  if (k >= p.batch * int64_t(h) * w) return;
  const int64_t b = k / (int64_t(h) * w);
  const int i = int((k / w) % h), j = int(k % w);
  float* o = p.bary + 3 * k;
  const unsigned long long key = keys[k];
  if (key == ~0ull) { p.ids[k] = 0; o[0] = o[1] = o[2] = 0.0f; return; }
  const int32_t f = static_cast<int32_t>(key & 0xffffffffull);
  p.ids[k] = f + 1;
  const float* pos = p.pos + b * p.num_verts * 4;
  const int32_t* tv = p.tris + 3 * int64_t(f);
  const float* a = pos + 4 * tv[0];
  const float* c1 = pos + 4 * tv[1];
  const float* c2 = pos + 4 * tv[2];
  const float x0 = a[0] / a[3], y0 = a[1] / a[3], z0 = a[2] / a[3];
  const float x1 = c1[0] / c1[3], y1 = c1[1] / c1[3], z1 = c1[2] / c1[3];
  const float x2 = c2[0] / c2[3], y2 = c2[1] / c2[3], z2 = c2[2] / c2[3];
  const float px = PixX(j, w), py = PixY(i, h);
  const float area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0);
  const float inv = 1.0f / area;
  const float b0 = ((x1 - px) * (y2 - py) - (y1 - py) * (x2 - px)) * inv;
  const float bb1 = ((x2 - px) * (y0 - py) - (y2 - py) * (x0 - px)) * inv;
  const float b2 = 1.0f - b0 - bb1;
  const float q0 = b0 / a[3], q1 = bb1 / c1[3], q2 = b2 / c2[3];
  float den = q0 + q1 + q2;
  if (!(fabsf(den) > 1e-20f)) den = 1.0f;
  o[0] = q0 / den;
  o[1] = q1 / den;
  o[2] = b0 * z0 + bb1 * z1 + b2 * z2;
}

ffi::Error RasterizeCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                             ffi::Buffer<ffi::F32> pos, ffi::Buffer<ffi::S32> tris,
                             ffi::ResultBuffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> bary) {
  auto pd = pos.dimensions();
  auto td = tris.dimensions();
  auto od = ids->dimensions();
  if (pd.size() != 3 || pd[2] != 4) return ffi::Error::InvalidArgument("pos must be [B,V,4]");
  if (td.size() != 2 || td[1] != 3) return ffi::Error::InvalidArgument("tris must be [F,3]");
  if (od.size() != 3 || od[0] != pd[0]) return ffi::Error::InvalidArgument("ids must be [B,H,W]");
  tsjax::RasterParams p;
  p.pos = pos.typed_data();
  p.tris = tris.typed_data();  // indices validated in Python (device memory is not re-checked here)
  p.ids = ids->typed_data();
  p.bary = bary->typed_data();
  p.batch = pd[0];
  p.num_verts = pd[1];
  p.num_tris = td[0];
  p.height = static_cast<int>(od[1]);
  p.width = static_cast<int>(od[2]);
  const int64_t npix = p.batch * int64_t(p.height) * p.width;
  auto mem = scratch.Allocate(sizeof(unsigned long long) * npix, alignof(unsigned long long));
  if (!mem.has_value()) return ffi::Error::Internal("tsjax rasterize: scratch allocation failed");
  auto* keys = static_cast<unsigned long long*>(*mem);
  constexpr int kBlock = 256;
  ClearKernel<<<(npix + kBlock - 1) / kBlock, kBlock, 0, stream>>>(keys, npix);
  const int64_t ntri = p.batch * p.num_tris;
  if (ntri > 0) RasterKernel<<<(ntri + kBlock - 1) / kBlock, kBlock, 0, stream>>>(p, keys);
  ResolveKernel<<<(npix + kBlock - 1) / kBlock, kBlock, 0, stream>>>(p, keys);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxRasterizeCuda, RasterizeCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

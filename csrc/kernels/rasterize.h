// tsjax rasterizer kernels: framework-agnostic, plain Params struct (no XLA/JAX types here).
//
// Conventions (docs/conventions.md, identical to the pure-JAX reference in tsjax/ops/rasterize.py):
//  * pos: [B, V, 4] float32 clip-space positions; tris: [F, 3] int32.
//  * Pixel (i, j) samples NDC x = (2j + 1)/W - 1, y = 1 - (2i + 1)/H (row 0 = top).
//  * Covered when all three screen-space barycentrics are >= 0 (no culling) and the pixel centre
//    lies in the triangle's pixel box widened by 0.01 pixel; depth test on z/w, smallest wins,
//    equal depth -> smaller triangle id; z/w must lie in [-1, 1].
//  * Arithmetic, one float32 rounding per operation in this order (the reference pins the same
//    roundings against FMA contraction): x = cx / w (per vertex); area = (x1-x0)(y2-y0) -
//    (y1-y0)(x2-x0); inv = 1 / area; b0 = e0 * inv, b1 = e1 * inv, b2 = (1 - b0) - b1;
//    z = (b0 z0 + b1 z1) + b2 z2; pixel-index coordinate sx = ((x + 1) W - 1) * 0.5.
//  * Triangles with a vertex at w <= 1e-8 or |2*area| <= 1e-12 (NDC) are skipped.
//  * Outputs: ids [B, H, W] int32 = triangle id + 1 (0 = empty); bary [B, H, W, 3] float32 =
//    perspective-correct (u, v, z/w) (0 where empty).
// Compiled with -ffp-contract=off (nvcc --fmad=false) so triangle ids agree exactly with the
// reference and barycentrics to float rounding.
#pragma once
#include <cstdint>

namespace tsjax {

struct RasterParams {
  const float* pos = nullptr;     // [B, V, 4]
  const int32_t* tris = nullptr;  // [F, 3]
  int32_t* ids = nullptr;         // [B, H, W]
  float* bary = nullptr;          // [B, H, W, 3], or nullptr: ids only (no barycentric work)
  int64_t batch = 0, num_verts = 0, num_tris = 0;
  int height = 0, width = 0;
};

constexpr float kWEps = 1e-8f;
constexpr float kAreaEps = 1e-12f;

// CPU: work items of 4/2/1 views (row bands when there are fewer items than threads); a vertex
// pass, a branch-free per-triangle pixel-box filter shared by the views of an item and SSE coverage
// and depth tests of the survivors; see rasterize_cpu.cc. num_threads <= 0 -> hardware concurrency.
// Results are identical for every thread count and work split.
void RasterizeCpu(const RasterParams& p, int num_threads);

}  // namespace tsjax

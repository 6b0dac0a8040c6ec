// CPU rasterizer: bounding-box scan with the reference's exact barycentric expressions.
#include "kernels/rasterize.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

namespace tsjax {
namespace {

struct Tri {
  float x0, y0, z0, x1, y1, z1, x2, y2, z2;  // NDC
  float w0, w1, w2;                         // clip w
  float area;                               // twice the signed NDC area
  int32_t id;                               // triangle index
  int i0, i1, j0, j1;                       // inclusive pixel bbox
};

inline float PixX(int j, int w) { return (2.0f * static_cast<float>(j) + 1.0f) / static_cast<float>(w) - 1.0f; }
inline float PixY(int i, int h) { return 1.0f - (2.0f * static_cast<float>(i) + 1.0f) / static_cast<float>(h); }

// Triangle setup for one view; invalid triangles are dropped. Surviving triangles are binned into
// the row bands their pixel box overlaps (bins[k] for rows [k*band, (k+1)*band)), in id order.
void Setup(const RasterParams& p, int64_t b, int band, std::vector<std::vector<Tri>>* bins) {
  const float* pos = p.pos + b * p.num_verts * 4;
  const int h = p.height, w = p.width;
  for (auto& v : *bins) v.clear();
  for (int64_t f = 0; f < p.num_tris; ++f) {
    const int32_t* t = p.tris + 3 * f;
    const float* a = pos + 4 * t[0];
    const float* c1 = pos + 4 * t[1];
    const float* c2 = pos + 4 * t[2];
    if (!(a[3] > kWEps && c1[3] > kWEps && c2[3] > kWEps)) continue;
    Tri r;
    r.w0 = a[3]; r.w1 = c1[3]; r.w2 = c2[3];
    r.x0 = a[0] / a[3]; r.y0 = a[1] / a[3]; r.z0 = a[2] / a[3];
    r.x1 = c1[0] / c1[3]; r.y1 = c1[1] / c1[3]; r.z1 = c1[2] / c1[3];
    r.x2 = c2[0] / c2[3]; r.y2 = c2[1] / c2[3]; r.z2 = c2[2] / c2[3];
    // same expression as tsjax.ops.rasterize._screen_bary evaluated at the origin
    r.area = (r.x1 - r.x0) * (r.y2 - r.y0) - (r.y1 - r.y0) * (r.x2 - r.x0);
    if (!(std::fabs(r.area) > kAreaEps) || !std::isfinite(r.area)) continue;
    const float xmin = std::min({r.x0, r.x1, r.x2}), xmax = std::max({r.x0, r.x1, r.x2});
    const float ymin = std::min({r.y0, r.y1, r.y2}), ymax = std::max({r.y0, r.y1, r.y2});
    if (xmax < -1.0f || xmin > 1.0f || ymax < -1.0f || ymin > 1.0f) continue;
    // pixel j has its centre at x_j = (2j+1)/W - 1  ->  j = ((x + 1) W - 1) / 2. Tight box of the
    // centres inside [xmin, xmax] x [ymin, ymax], widened by 1e-2 pixel so float rounding of the
    // coverage test at the box border can never drop a pixel the reference would cover.
    constexpr float kPad = 1e-2f;
    r.j0 = std::max(0, static_cast<int>(std::ceil(((xmin + 1.0f) * w - 1.0f) * 0.5f - kPad)));
    r.j1 = std::min(w - 1, static_cast<int>(std::floor(((xmax + 1.0f) * w - 1.0f) * 0.5f + kPad)));
    r.i0 = std::max(0, static_cast<int>(std::ceil(((1.0f - ymax) * h - 1.0f) * 0.5f - kPad)));
    r.i1 = std::min(h - 1, static_cast<int>(std::floor(((1.0f - ymin) * h - 1.0f) * 0.5f + kPad)));
    if (r.j0 > r.j1 || r.i0 > r.i1) continue;
    r.id = static_cast<int32_t>(f);
    for (int k = r.i0 / band; k <= r.i1 / band; ++k) (*bins)[k].push_back(r);
  }
}

// Rasterize rows [row0, row1) of view b.
void Band(const RasterParams& p, int64_t b, const std::vector<Tri>& tris, int row0, int row1,
          std::vector<float>* zbuf) {
  const int h = p.height, w = p.width;
  int32_t* ids = p.ids + b * int64_t(h) * w;
  float* bary = p.bary + b * int64_t(h) * w * 3;
  float* zb = zbuf->data();
  std::fill(zb, zb + int64_t(row1 - row0) * w, std::numeric_limits<float>::infinity());
  std::fill(ids + int64_t(row0) * w, ids + int64_t(row1) * w, 0);
  for (const Tri& t : tris) {
    const int i0 = std::max(t.i0, row0), i1 = std::min(t.i1, row1 - 1);
    const float sgn = t.area > 0.0f ? 1.0f : -1.0f;
    const float tiny = std::fabs(t.area) * 1e-30f;
    for (int i = i0; i <= i1; ++i) {
      const float py = PixY(i, h);
      for (int j = t.j0; j <= t.j1; ++j) {
        const float px = PixX(j, w);
        const float e0 = (t.x1 - px) * (t.y2 - py) - (t.y1 - py) * (t.x2 - px);
        // fast reject before the divisions: e0/area < 0 exactly when the signs differ, unless the
        // quotient underflows to (-)0, which only happens for |e0| < |area| * 2^-126 (kept exact).
        if (e0 * sgn < 0.0f && std::fabs(e0) > tiny) continue;
        const float e1 = (t.x2 - px) * (t.y0 - py) - (t.y2 - py) * (t.x0 - px);
        if (e1 * sgn < 0.0f && std::fabs(e1) > tiny) continue;
        const float b0 = e0 / t.area;
        const float b1 = e1 / t.area;
        const float b2 = 1.0f - b0 - b1;
        if (!(b0 >= 0.0f && b1 >= 0.0f && b2 >= 0.0f)) continue;
        const float z = b0 * t.z0 + b1 * t.z1 + b2 * t.z2;
        if (!(z >= -1.0f && z <= 1.0f)) continue;
        float& best = zb[int64_t(i - row0) * w + j];
        if (z < best) {
          best = z;
          ids[int64_t(i) * w + j] = t.id + 1;
        }
      }
    }
  }
  // Resolve: perspective-correct barycentrics of the winning triangle (the reference's formulas).
  for (int i = row0; i < row1; ++i) {
    const float py = PixY(i, h);
    for (int j = 0; j < w; ++j) {
      const int64_t k = int64_t(i) * w + j;
      float* o = bary + 3 * k;
      const int32_t id = ids[k];
      if (id == 0) { o[0] = o[1] = o[2] = 0.0f; continue; }
      const int32_t* tv = p.tris + 3 * int64_t(id - 1);
      const float* pos = p.pos + b * p.num_verts * 4;
      const float* a = pos + 4 * tv[0];
      const float* c1 = pos + 4 * tv[1];
      const float* c2 = pos + 4 * tv[2];
      const float x0 = a[0] / a[3], y0 = a[1] / a[3], z0 = a[2] / a[3];
      const float x1 = c1[0] / c1[3], y1 = c1[1] / c1[3], z1 = c1[2] / c1[3];
      const float x2 = c2[0] / c2[3], y2 = c2[1] / c2[3], z2 = c2[2] / c2[3];
      const float px = PixX(j, w);
      const float area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0);
      const float b0 = ((x1 - px) * (y2 - py) - (y1 - py) * (x2 - px)) / area;
      const float b1 = ((x2 - px) * (y0 - py) - (y2 - py) * (x0 - px)) / area;
      const float b2 = 1.0f - b0 - b1;
      const float q0 = b0 / a[3], q1 = b1 / c1[3], q2 = b2 / c2[3];
      float den = q0 + q1 + q2;
      if (!(std::fabs(den) > 1e-20f)) den = 1.0f;
      o[0] = q0 / den;
      o[1] = q1 / den;
      o[2] = b0 * z0 + b1 * z1 + b2 * z2;
    }
  }
}

}  // namespace

void RasterizeCpu(const RasterParams& p, int num_threads) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  const int h = p.height;
  // Work items: (view, band of 64 rows). Bands keep the depth/id buffers cache resident and give
  // every thread work even for one view (measured faster than one item per view).
  const int band = std::max(1, std::min(h, 64));
  const int nbands = (h + band - 1) / band;
  std::vector<std::vector<std::vector<Tri>>> setup(p.batch, std::vector<std::vector<Tri>>(nbands));
  {
    std::vector<std::thread> pool;
    const int nt = static_cast<int>(std::min<int64_t>(num_threads, p.batch));
    for (int t = 0; t < nt; ++t)
      pool.emplace_back([&, t] { for (int64_t b = t; b < p.batch; b += nt) Setup(p, b, band, &setup[b]); });
    for (auto& th : pool) th.join();
  }
  const int64_t items = p.batch * nbands;
  const int nt = static_cast<int>(std::min<int64_t>(num_threads, items));
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t) {
    pool.emplace_back([&, t] {
      std::vector<float> zbuf(int64_t(band) * p.width);
      for (int64_t it = t; it < items; it += nt) {
        const int64_t b = it / nbands;
        const int r0 = static_cast<int>(it % nbands) * band;
        Band(p, b, setup[b][r0 / band], r0, std::min(h, r0 + band), &zbuf);
      }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace tsjax

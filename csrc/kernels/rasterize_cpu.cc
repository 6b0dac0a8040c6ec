// CPU rasterizer: per-vertex setup + per-triangle pixel-box scan with the reference's exact
// barycentric expressions (bit-exact triangle ids, see rasterize.h). The padded pixel box is part
// of the coverage rule (tsjax.ops.rasterize._triangle_setup), not only an acceleration.
//
// Work is split into items (view, row band); one item is owned by one thread, so its depth/id
// buffer needs no synchronisation and triangles are visited in id order (strict depth test ->
// equal depths keep the smaller id). With at least as many views as threads every item is a whole
// view; with fewer views each view is cut into ceil(threads / views) row bands.
//
// Per item:
//  1. vertex pass: NDC x, y, z of every vertex (one division per coordinate, the same values the
//     reference computes per triangle corner), clip w, validity and its inclusive pixel-centre
//     range as int16, in one 32-byte record. Because ((x + 1) W - 1) / 2, the pad and ceil/floor
//     are monotone in x, the box of a triangle is the min/max of its corners' ranges,
//     bit-identical to evaluating the box formula at the triangle's xmin/xmax.
//  2. triangle pass: in id order, the pixel box from the three corner records (prefetched a few
//     triangles ahead: mesh vertex indices are scattered); at 1M triangles on a 512^2 image about
//     two thirds of the boxes hold no pixel centre and are rejected before any float work.
//     Surviving triangles get the area / validity test and the exact per-pixel coverage test;
//     each depth-test winner writes its perspective-correct (u, v, z/w) right away.
#include "kernels/rasterize.h"

#include <smmintrin.h>  // SSE4.1 (x86-64-v2)

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace tsjax {
namespace {

inline float PixX(int j, int w) { return (2.0f * static_cast<float>(j) + 1.0f) / static_cast<float>(w) - 1.0f; }
inline float PixY(int i, int h) { return 1.0f - (2.0f * static_cast<float>(i) + 1.0f) / static_cast<float>(h); }

// Pixel-centre range of one vertex: pixel j has its centre at x_j = (2j+1)/W - 1, so
// j = ((x + 1) W - 1) / 2. The range is widened by 1e-2 pixel so float rounding of the coverage
// test at the box border can never drop a pixel the reference would cover.
// Stored as (j0, -j1, i0, -i1) so that a triangle's box is the lane-wise minimum of its three
// corners' boxes (one SSE2 pminsw per pair of corners).
struct Box {
  int16_t j0, nj1, i0, ni1;
};
constexpr float kPad = 1e-2f;
constexpr float kClampPix = 1e6f;  // keeps float -> int conversions defined for far-away vertices

inline int16_t ToI16(float v) {  // v integral, clamp into [-1, 32767] (W, H <= 16384)
  v = std::min(std::max(v, -1.0f), 32767.0f);
  return static_cast<int16_t>(v);
}

// One vertex after the vertex pass: NDC x, y, z, clip w, pixel range and validity in one 32-byte
// record, so a triangle's box test and (for the survivors) its setup touch one cache line per corner.
struct alignas(32) Vtx {
  float x, y, z, w;
  Box box;
  int32_t ok;  // w > eps and finite x, y
  int32_t pad;
};

struct Workspace {
  std::vector<Vtx> vtx;     // [V]
  std::vector<float> zbuf;  // [rows, W]
  std::vector<float> px;    // [W] pixel-centre NDC x (PixX), precomputed: no division per pixel
  std::vector<float> py;    // [H] pixel-centre NDC y (PixY)
};

// Scalar vertex pass over vertices [v0, v1) (the reference definition of the SSE path below).
void VertexPassScalar(const float* pos, int64_t v0, int64_t v1, float fw, float fh, Vtx* vtx) {
  for (int64_t v = v0; v < v1; ++v) {
    const float* q = pos + 4 * v;
    const float w = q[3];
    const float x = q[0] / w, y = q[1] / w, z = q[2] / w;
    Vtx& o = vtx[v];
    o.x = x;
    o.y = y;
    o.z = z;
    o.w = w;
    const bool good = w > kWEps && std::isfinite(x) && std::isfinite(y);
    o.ok = good;
    if (!good) {  // never widens a box; the triangle is rejected by ok anyway
      o.box = Box{32767, 1, 32767, 1};
      continue;
    }
    float sx = ((x + 1.0f) * fw - 1.0f) * 0.5f;
    float sy = ((1.0f - y) * fh - 1.0f) * 0.5f;
    sx = std::min(std::max(sx, -kClampPix), kClampPix);
    sy = std::min(std::max(sy, -kClampPix), kClampPix);
    o.box = Box{ToI16(std::ceil(sx - kPad)), static_cast<int16_t>(-ToI16(std::floor(sx + kPad))),
                ToI16(std::ceil(sy - kPad)), static_cast<int16_t>(-ToI16(std::floor(sy + kPad)))};
  }
}

// Vertex pass of view b: four vertices per step with SSE4.1 (the same IEEE operations as the scalar
// code, lane by lane: divisions, adds/multiplies in the same order, ceil/floor), the tail in scalar.
void VertexPass(const RasterParams& p, int64_t b, Workspace* ws) {
  const int64_t nv = p.num_verts;
  const float* pos = p.pos + b * nv * 4;
  const float fw = static_cast<float>(p.width), fh = static_cast<float>(p.height);
  Vtx* vtx = ws->vtx.data();
  const int64_t n4 = nv & ~int64_t(3);
  const __m128 one = _mm_set1_ps(1.0f), half = _mm_set1_ps(0.5f), pad = _mm_set1_ps(kPad);
  const __m128 vw = _mm_set1_ps(fw), vh = _mm_set1_ps(fh), eps = _mm_set1_ps(kWEps);
  const __m128 fmax = _mm_set1_ps(std::numeric_limits<float>::max());
  const __m128 absmask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  const __m128 clo = _mm_set1_ps(-kClampPix), chi = _mm_set1_ps(kClampPix);
  const __m128 ilo = _mm_set1_ps(-1.0f), ihi = _mm_set1_ps(32767.0f);
  for (int64_t v = 0; v < n4; v += 4) {
    __m128 cx = _mm_loadu_ps(pos + 4 * v), cy = _mm_loadu_ps(pos + 4 * v + 4);
    __m128 cz = _mm_loadu_ps(pos + 4 * v + 8), cw = _mm_loadu_ps(pos + 4 * v + 12);
    _MM_TRANSPOSE4_PS(cx, cy, cz, cw);  // now cx = x of the 4 vertices, ... cw = w
    const __m128 x = _mm_div_ps(cx, cw), y = _mm_div_ps(cy, cw), z = _mm_div_ps(cz, cw);
    const __m128 ok = _mm_and_ps(_mm_cmpgt_ps(cw, eps),
                                 _mm_and_ps(_mm_cmple_ps(_mm_and_ps(x, absmask), fmax),
                                            _mm_cmple_ps(_mm_and_ps(y, absmask), fmax)));
    const __m128 xs = _mm_and_ps(ok, x), ys = _mm_and_ps(ok, y);  // 0 for invalid vertices
    __m128 sx = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_add_ps(xs, one), vw), one), half);
    __m128 sy = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_sub_ps(one, ys), vh), one), half);
    sx = _mm_min_ps(_mm_max_ps(sx, clo), chi);
    sy = _mm_min_ps(_mm_max_ps(sy, clo), chi);
    auto to_i = [&](__m128 t) { return _mm_cvttps_epi32(_mm_min_ps(_mm_max_ps(t, ilo), ihi)); };
    const __m128i jlo = to_i(_mm_ceil_ps(_mm_sub_ps(sx, pad))), jhi = to_i(_mm_floor_ps(_mm_add_ps(sx, pad)));
    const __m128i ilo_ = to_i(_mm_ceil_ps(_mm_sub_ps(sy, pad))), ihi_ = to_i(_mm_floor_ps(_mm_add_ps(sy, pad)));
    alignas(16) int32_t a0[4], a1[4], a2[4], a3[4], okm[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(a0), jlo);
    _mm_store_si128(reinterpret_cast<__m128i*>(a1), jhi);
    _mm_store_si128(reinterpret_cast<__m128i*>(a2), ilo_);
    _mm_store_si128(reinterpret_cast<__m128i*>(a3), ihi_);
    _mm_store_si128(reinterpret_cast<__m128i*>(okm), _mm_castps_si128(ok));
    __m128 tx = x, ty = y, tz = z, tw = cw;
    _MM_TRANSPOSE4_PS(tx, ty, tz, tw);  // back to per-vertex (x, y, z, w)
    const __m128 rec[4] = {tx, ty, tz, tw};
    for (int k = 0; k < 4; ++k) {
      Vtx& o = vtx[v + k];
      _mm_store_ps(&o.x, rec[k]);
      o.ok = okm[k] != 0;
      o.box = okm[k] ? Box{static_cast<int16_t>(a0[k]), static_cast<int16_t>(-a1[k]), static_cast<int16_t>(a2[k]),
                           static_cast<int16_t>(-a3[k])}
                     : Box{32767, 1, 32767, 1};
    }
  }
  VertexPassScalar(pos, n4, nv, fw, fh, vtx);
}

// Rasterize rows [row0, row1) of view b into ids (id + 1) and bary with the depth buffer ws->zbuf.
// Every depth-test winner also writes its perspective-correct (u, v, z/w) (the reference's
// formulas, tsjax.ops.rasterize._persp_terms): the last winner of a pixel is its final triangle, and
// its vertex records are already in cache here, unlike in a separate resolve pass over the ids.
void RasterBand(const RasterParams& p, int64_t b, int row0, int row1, Workspace* ws) {
  const int h = p.height, w = p.width;
  int32_t* ids = p.ids + b * int64_t(h) * w;
  float* bary = p.bary + b * int64_t(h) * w * 3;
  float* zb = ws->zbuf.data() - int64_t(row0) * w;  // indexed by absolute row
  std::fill(zb + int64_t(row0) * w, zb + int64_t(row1) * w, std::numeric_limits<float>::infinity());
  std::fill(ids + int64_t(row0) * w, ids + int64_t(row1) * w, 0);
  std::fill(bary + int64_t(row0) * w * 3, bary + int64_t(row1) * w * 3, 0.0f);
  const float* pxs = ws->px.data();
  const float* pys = ws->py.data();
  const Vtx* vtx = ws->vtx.data();
  const int32_t* tv = p.tris;
  const int r1 = row1 - 1, wm1 = w - 1;
  // Vertex indices of real meshes jump around memory, so the box loads are cache misses; prefetch
  // them kPrefetch triangles ahead (indices are only read here, never trusted: see the FFI check).
  constexpr int64_t kPrefetch = 32;
  const int64_t nf = p.num_tris;
  const __m128i lim = _mm_setr_epi16(0, static_cast<int16_t>(-wm1), static_cast<int16_t>(row0),
                                     static_cast<int16_t>(-r1), 0, 0, 0, 0);
  for (int64_t f = 0; f < nf; ++f, tv += 3) {
    if (f + kPrefetch < nf) {
      const int32_t* tp = tv + 3 * kPrefetch;
      __builtin_prefetch(vtx + tp[0]);
      __builtin_prefetch(vtx + tp[1]);
      __builtin_prefetch(vtx + tp[2]);
    }
    const Vtx& va = vtx[tv[0]];
    const Vtx& vc = vtx[tv[1]];
    const Vtx& vd = vtx[tv[2]];
    // box = lane-wise min of the corners' (j0, -j1, i0, -i1), clamped to the band; empty unless
    // j0 + (-j1) <= 0 and i0 + (-i1) <= 0 (saturating adds: no wrap-around)
    __m128i m = _mm_min_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(&va.box)),
                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&vc.box)));
    m = _mm_max_epi16(_mm_min_epi16(m, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&vd.box))), lim);
    const __m128i sum = _mm_adds_epi16(m, _mm_shufflelo_epi16(m, _MM_SHUFFLE(2, 3, 0, 1)));
    if (_mm_movemask_epi8(_mm_cmpgt_epi16(sum, _mm_setzero_si128())) & 0x33) continue;
    const int j0 = static_cast<int16_t>(_mm_extract_epi16(m, 0));
    const int j1 = -static_cast<int16_t>(_mm_extract_epi16(m, 1));
    const int i0 = static_cast<int16_t>(_mm_extract_epi16(m, 2));
    const int i1 = -static_cast<int16_t>(_mm_extract_epi16(m, 3));
    if (!(va.ok & vc.ok & vd.ok)) continue;
    const float x0 = va.x, y0 = va.y, z0 = va.z, w0 = va.w;
    const float x1 = vc.x, y1 = vc.y, z1 = vc.z, w1 = vc.w;
    const float x2 = vd.x, y2 = vd.y, z2 = vd.z, w2 = vd.w;
    // same expression as tsjax.ops.rasterize._screen_bary evaluated at the origin
    const float area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0);
    if (!(std::fabs(area) > kAreaEps) || !std::isfinite(area)) continue;
    const float inv = 1.0f / area;
    const int32_t id1 = static_cast<int32_t>(f) + 1;
    for (int i = i0; i <= i1; ++i) {
      const float py = pys[i];
      float* zrow = zb + int64_t(i) * w;
      int32_t* irow = ids + int64_t(i) * w;
      float* brow = bary + int64_t(i) * w * 3;
      for (int j = j0; j <= j1; ++j) {
        const float px = pxs[j];
        const float b0 = ((x1 - px) * (y2 - py) - (y1 - py) * (x2 - px)) * inv;
        if (!(b0 >= 0.0f)) continue;
        const float b1 = ((x2 - px) * (y0 - py) - (y2 - py) * (x0 - px)) * inv;
        if (!(b1 >= 0.0f)) continue;
        const float b2 = 1.0f - b0 - b1;
        if (!(b2 >= 0.0f)) continue;
        const float z = b0 * z0 + b1 * z1 + b2 * z2;
        if (!(z >= -1.0f && z <= 1.0f)) continue;
        if (z < zrow[j]) {
          zrow[j] = z;
          irow[j] = id1;
          const float q0 = b0 / w0, q1 = b1 / w1, q2 = b2 / w2;
          float den = q0 + q1 + q2;
          if (!(std::fabs(den) > 1e-20f)) den = 1.0f;
          float* o = brow + 3 * j;
          o[0] = q0 / den;
          o[1] = q1 / den;
          o[2] = z;
        }
      }
    }
  }
}

}  // namespace

void RasterizeCpu(const RasterParams& p, int num_threads) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  const int h = p.height;
  if (p.batch <= 0 || h <= 0 || p.width <= 0) return;
  // Row bands per view: 1 when there are enough views to keep every thread busy.
  const int64_t per_view = std::max<int64_t>(1, std::min<int64_t>(h, (num_threads + p.batch - 1) / p.batch));
  const int band = static_cast<int>((h + per_view - 1) / per_view);
  const int64_t nbands = (h + band - 1) / band;
  const int64_t items = p.batch * nbands;
  const int nt = static_cast<int>(std::min<int64_t>(num_threads, items));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    Workspace ws;
    ws.vtx.resize(p.num_verts);
    ws.px.resize(p.width);
    ws.py.resize(h);
    for (int j = 0; j < p.width; ++j) ws.px[j] = PixX(j, p.width);
    for (int i = 0; i < h; ++i) ws.py[i] = PixY(i, h);
    ws.zbuf.resize(int64_t(band) * p.width);
    int64_t have = -1;  // view whose vertex pass is in ws
    for (int64_t it = next++; it < items; it = next++) {
      const int64_t b = it / nbands;
      const int r0 = static_cast<int>(it % nbands) * band;
      const int r1 = std::min(h, r0 + band);
      if (have != b) {
        VertexPass(p, b, &ws);
        have = b;
      }
      RasterBand(p, b, r0, r1, &ws);
    }
  };
  if (nt <= 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
}

}  // namespace tsjax

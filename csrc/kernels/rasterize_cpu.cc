// CPU rasterizer: per-vertex pixel boxes, a branch-free box filter per triangle and an SSE
// coverage/depth stage for the survivors, with the reference's exact expressions (bit-exact
// triangle ids, see rasterize.h). The padded pixel box is part of the coverage rule
// (tsjax.ops.rasterize._triangle_setup), not only an acceleration.
//
// Work is split into items (group of G views, row band); one item is owned by one thread, so its
// depth/id buffers need no synchronisation and triangles are visited in id order (strict depth
// test -> equal depths keep the smaller id). G (4, 2 or 1) is the largest group size that still
// gives every thread a whole group; with fewer groups than threads each group is cut into
// ceil(threads / groups) row bands. Results never depend on G, the bands or the thread count.
//
// Per item:
//  1. vertex pass, per view of the group: the inclusive pixel-centre range of every vertex as
//     4 x int16 (8 bytes; the NDC division x = cx / w is the reference's), the G views of a vertex
//     side by side (8 G bytes). Because ((x + 1) W - 1) / 2, the pad and ceil/floor are monotone in
//     x, the box of a triangle is the min/max of its corners' ranges, bit-identical to evaluating
//     the box formula at the triangle's xmin/xmax.
//  2. triangle pass, in chunks of kChunk triangles (id order):
//     a. filter: the box of each triangle in each view of the group from its three corner records
//        (one read per corner serves all G views, two views per SSE register; prefetched: mesh
//        vertex indices are scattered), clamped to the band; triangles whose box holds a pixel
//        centre are appended to the view's small queue without a branch (at 1M triangles on a
//        512^2 image about two thirds of the boxes are empty: an unpredictable branch otherwise);
//     b. raster, per view: queued triangles four at a time. Their corners are gathered from the
//        clip positions and divided (the same float32 division as the vertex pass / reference); the
//        validity, area and, for one-pixel boxes (nearly all of them at high triangle counts), the
//        exact coverage, depth and perspective-correct (u, v) of that pixel are evaluated in SSE
//        lanes, one IEEE operation per scalar operation of the reference, in the same order. Then,
//        lane by lane in id order and without branches, the depth test; a winner writes its id and
//        (u, v, z/w). A group holding a triangle whose box has more than one pixel centre goes lane
//        by lane in id order; such a triangle is rasterized four pixels of a row at a time
//        (RasterBox, the same per-lane operations).
#include "kernels/rasterize.h"

#include <smmintrin.h>  // SSE4.1 (x86-64-v2)

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
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
// corners' boxes (one SSE2 pminsw per pair of corners). Invalid vertices (w <= eps, non-finite x
// or y) get the neutral box (32767, 1, 32767, 1): they never widen a box, and the triangle is
// rejected by the validity test of the raster stage.
struct Box {
  int16_t j0, nj1, i0, ni1;
};
constexpr float kPad = 1e-2f;
constexpr float kClampPix = 1e6f;  // keeps float -> int conversions defined for far-away vertices
constexpr float kFltMax = std::numeric_limits<float>::max();

inline int16_t ToI16(float v) {  // v integral, clamp into [-1, 32767] (W, H <= 16384)
  v = std::min(std::max(v, -1.0f), 32767.0f);
  return static_cast<int16_t>(v);
}

// Queue entry of the filter stage: the clamped box (j0, -j1, i0, -i1) in int16 lanes 0..3,
// the triangle id in int32 lane 3 (lane 2 is unused; the union reads what the SSE store wrote).
union Entry {
  __m128i v;
  struct {
    int16_t j0, nj1, i0, ni1;
    int32_t pad, f;
  } s;
};

constexpr int kChunk = 4096;  // triangles per filter/raster round (queues stay in L2)

struct Workspace {
  std::vector<Box> box;     // [V, G] vertex boxes of the item's G views, interleaved
  std::vector<float> zbuf;  // [G, rows, W] + 4 padding
  std::vector<float> px;    // [W + 4] pixel-centre NDC x (PixX), precomputed: no division per pixel
  std::vector<float> py;    // [H] pixel-centre NDC y (PixY)
  std::vector<Entry> queue; // [G, kChunk + 4] filter queues (+ 4: the last group is padded)
  int h = 0, w = 0;
};

// Workspaces outlive a call (the box buffer is large: page faults on every call otherwise); a
// call takes one per thread and returns it. Concurrent calls each take their own. At most 16 are
// kept; each holds ~8 G bytes per vertex + 4 G bytes per pixel of its largest call.
std::mutex g_pool_mu;
std::vector<std::unique_ptr<Workspace>> g_pool;

std::unique_ptr<Workspace> TakeWorkspace() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (g_pool.empty()) return std::make_unique<Workspace>();
  auto ws = std::move(g_pool.back());
  g_pool.pop_back();
  return ws;
}

void ReturnWorkspace(std::unique_ptr<Workspace> ws) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (g_pool.size() < 16) g_pool.push_back(std::move(ws));
}

// Scalar vertex pass over vertices [v0, v1) (the reference definition of the SSE path below).
void VertexPassScalar(const float* pos, int64_t v0, int64_t v1, float fw, float fh, Box* box, int stride) {
  for (int64_t v = v0; v < v1; ++v) {
    const float* q = pos + 4 * v;
    const float w = q[3];
    const float x = q[0] / w, y = q[1] / w;
    const bool good = w > kWEps && std::isfinite(x) && std::isfinite(y);
    if (!good) {
      box[v * stride] = Box{32767, 1, 32767, 1};
      continue;
    }
    float sx = ((x + 1.0f) * fw - 1.0f) * 0.5f;
    float sy = ((1.0f - y) * fh - 1.0f) * 0.5f;
    sx = std::min(std::max(sx, -kClampPix), kClampPix);
    sy = std::min(std::max(sy, -kClampPix), kClampPix);
    box[v * stride] = Box{ToI16(std::ceil(sx - kPad)), static_cast<int16_t>(-ToI16(std::floor(sx + kPad))),
                 ToI16(std::ceil(sy - kPad)), static_cast<int16_t>(-ToI16(std::floor(sy + kPad)))};
  }
}

// Vertex pass of view b into box[v * stride] (stride = views per group, see RasterGroupBand): four vertices per step with SSE4.1 (the same IEEE operations as the scalar
// code, lane by lane: divisions, adds/multiplies in the same order, ceil/floor), the tail in scalar.
void VertexPass(const RasterParams& p, int64_t b, Box* box, int stride) {
  const int64_t nv = p.num_verts;
  const float* pos = p.pos + b * nv * 4;
  const float fw = static_cast<float>(p.width), fh = static_cast<float>(p.height);
  const int64_t n4 = nv & ~int64_t(3);
  const __m128 one = _mm_set1_ps(1.0f), half = _mm_set1_ps(0.5f), pad = _mm_set1_ps(kPad);
  const __m128 vw = _mm_set1_ps(fw), vh = _mm_set1_ps(fh), eps = _mm_set1_ps(kWEps);
  const __m128 fmax = _mm_set1_ps(kFltMax);
  const __m128 absmask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  const __m128 clo = _mm_set1_ps(-kClampPix), chi = _mm_set1_ps(kClampPix);
  const __m128 ilo = _mm_set1_ps(-1.0f), ihi = _mm_set1_ps(32767.0f);
  const __m128i big = _mm_set1_epi32(32767), unit = _mm_set1_epi32(1), zero = _mm_setzero_si128();
  for (int64_t v = 0; v < n4; v += 4) {
    __m128 cx = _mm_loadu_ps(pos + 4 * v), cy = _mm_loadu_ps(pos + 4 * v + 4);
    __m128 cz = _mm_loadu_ps(pos + 4 * v + 8), cw = _mm_loadu_ps(pos + 4 * v + 12);
    _MM_TRANSPOSE4_PS(cx, cy, cz, cw);  // now cx = x of the 4 vertices, ... cw = w
    const __m128 x = _mm_div_ps(cx, cw), y = _mm_div_ps(cy, cw);
    const __m128 ok = _mm_and_ps(_mm_cmpgt_ps(cw, eps),
                                 _mm_and_ps(_mm_cmple_ps(_mm_and_ps(x, absmask), fmax),
                                            _mm_cmple_ps(_mm_and_ps(y, absmask), fmax)));
    const __m128i oki = _mm_castps_si128(ok);
    const __m128 xs = _mm_and_ps(ok, x), ys = _mm_and_ps(ok, y);  // 0 for invalid vertices
    __m128 sx = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_add_ps(xs, one), vw), one), half);
    __m128 sy = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_sub_ps(one, ys), vh), one), half);
    sx = _mm_min_ps(_mm_max_ps(sx, clo), chi);
    sy = _mm_min_ps(_mm_max_ps(sy, clo), chi);
    auto to_i = [&](__m128 t) { return _mm_cvttps_epi32(_mm_min_ps(_mm_max_ps(t, ilo), ihi)); };
    // (j0, -j1, i0, -i1) per vertex in int32 lanes, the neutral box where not ok
    const __m128i j0 = _mm_blendv_epi8(big, to_i(_mm_ceil_ps(_mm_sub_ps(sx, pad))), oki);
    const __m128i nj1 = _mm_blendv_epi8(unit, _mm_sub_epi32(zero, to_i(_mm_floor_ps(_mm_add_ps(sx, pad)))), oki);
    const __m128i i0 = _mm_blendv_epi8(big, to_i(_mm_ceil_ps(_mm_sub_ps(sy, pad))), oki);
    const __m128i ni1 = _mm_blendv_epi8(unit, _mm_sub_epi32(zero, to_i(_mm_floor_ps(_mm_add_ps(sy, pad)))), oki);
    // values lie in [-32767, 32767]: the saturating packs are exact
    const __m128i pj = _mm_packs_epi32(j0, i0);    // j0[0..3], i0[0..3]
    const __m128i pn = _mm_packs_epi32(nj1, ni1);  // -j1[0..3], -i1[0..3]
    const __m128i lo = _mm_unpacklo_epi16(pj, pn);  // (j0, -j1) per vertex
    const __m128i hi = _mm_unpackhi_epi16(pj, pn);  // (i0, -i1) per vertex
    const __m128i r01 = _mm_unpacklo_epi32(lo, hi), r23 = _mm_unpackhi_epi32(lo, hi);
    if (stride == 1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(box + v), r01);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(box + v + 2), r23);
    } else {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(box + v * stride), r01);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(box + (v + 1) * stride), _mm_unpackhi_epi64(r01, r01));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(box + (v + 2) * stride), r23);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(box + (v + 3) * stride), _mm_unpackhi_epi64(r23, r23));
    }
  }
  VertexPassScalar(pos, n4, nv, fw, fh, box, stride);
}

struct BandCtx {
  const float* pos;  // [V, 4] of this view
  const int32_t* tris;
  const float* pxs;
  const float* pys;
  float* zb;         // indexed by absolute row * W + column
  int32_t* ids;
  float* bary;       // nullptr: ids only (RasterParams::bary)
  int w;
};

// Depth test and write of one covered pixel (index k = i * W + j) by triangle id1 = id + 1.
inline void Resolve(const BandCtx& c, int64_t k, int32_t id1, float b0, float b1, float b2, float z, float w0,
                    float w1, float w2) {
  if (z < c.zb[k]) {
    c.zb[k] = z;
    c.ids[k] = id1;
    if (!c.bary) return;
    const float q0 = b0 / w0, q1 = b1 / w1, q2 = b2 / w2;
    float den = q0 + q1 + q2;
    if (!(std::fabs(den) > 1e-20f)) den = 1.0f;
    float* o = c.bary + 3 * k;
    o[0] = q0 / den;
    o[1] = q1 / den;
    o[2] = z;
  }
}

// One triangle whose (clamped, non-empty) pixel box [j0, j1] x [i0, i1] holds several pixel
// centres: four pixels of a row at a time in SSE lanes, one IEEE operation per scalar operation of
// the reference, in its order (lanes beyond j1 are masked). t = (x0, x1, x2, y0, y1, y2, z0, z1,
// z2, w0, w1, w2, inv) of the triangle: NDC corners, clip w and 1 / area. Pixels of one triangle
// are distinct, so their depth tests are independent.
void RasterBox(const BandCtx& c, int32_t id1, const float* t, int j0, int j1, int i0, int i1) {
  const __m128 x0 = _mm_set1_ps(t[0]), x1 = _mm_set1_ps(t[1]), x2 = _mm_set1_ps(t[2]);
  const __m128 y0 = _mm_set1_ps(t[3]), y1 = _mm_set1_ps(t[4]), y2 = _mm_set1_ps(t[5]);
  const __m128 z0 = _mm_set1_ps(t[6]), z1 = _mm_set1_ps(t[7]), z2 = _mm_set1_ps(t[8]);
  const __m128 inv = _mm_set1_ps(t[12]);
  const __m128 one = _mm_set1_ps(1.0f), zero = _mm_setzero_ps(), mone = _mm_set1_ps(-1.0f);
  for (int i = i0; i <= i1; ++i) {
    const __m128 py = _mm_set1_ps(c.pys[i]);
    for (int j = j0; j <= j1; j += 4) {
      const __m128 px = _mm_loadu_ps(c.pxs + j);  // pxs is padded: lanes past j1 read finite values
      const __m128 b0 = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_sub_ps(x1, px), _mm_sub_ps(y2, py)),
                                              _mm_mul_ps(_mm_sub_ps(y1, py), _mm_sub_ps(x2, px))),
                                   inv);
      const __m128 b1 = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_sub_ps(x2, px), _mm_sub_ps(y0, py)),
                                              _mm_mul_ps(_mm_sub_ps(y2, py), _mm_sub_ps(x0, px))),
                                   inv);
      const __m128 b2 = _mm_sub_ps(_mm_sub_ps(one, b0), b1);
      const __m128 zz = _mm_add_ps(_mm_add_ps(_mm_mul_ps(b0, z0), _mm_mul_ps(b1, z1)), _mm_mul_ps(b2, z2));
      const __m128 cov = _mm_and_ps(_mm_and_ps(_mm_cmpge_ps(b0, zero), _mm_cmpge_ps(b1, zero)),
                                    _mm_and_ps(_mm_cmpge_ps(b2, zero),
                                               _mm_and_ps(_mm_cmpge_ps(zz, mone), _mm_cmple_ps(zz, one))));
      const int64_t k = int64_t(i) * c.w + j;
      // zb is padded too: the 4-wide load never leaves the buffer
      const int lanes = (1 << std::min(4, j1 - j + 1)) - 1;
      const int win = _mm_movemask_ps(_mm_and_ps(cov, _mm_cmplt_ps(zz, _mm_loadu_ps(c.zb + k)))) & lanes;
      if (!win) continue;
      alignas(16) float fb0[4], fb1[4], fb2[4], fz[4];
      _mm_store_ps(fb0, b0);
      _mm_store_ps(fb1, b1);
      _mm_store_ps(fb2, b2);
      _mm_store_ps(fz, zz);
      for (int m = win; m; m &= m - 1) {
        const int l = __builtin_ctz(m);
        Resolve(c, k + l, id1, fb0[l], fb1[l], fb2[l], fz[l], t[9], t[10], t[11]);
      }
    }
  }
}

// Four queued triangles (entries e[0..3], lanes >= n inactive), in id order.
void RasterGroup(const BandCtx& c, const Entry* e, int n) {
  // gather the clip corners: lane l of cx[k] = clip x of corner k of triangle l, ...
  __m128 cx[3], cy[3], cz[3], cw[3];
  for (int k = 0; k < 3; ++k) {
    __m128 r0 = _mm_loadu_ps(c.pos + 4 * int64_t(c.tris[3 * int64_t(e[0].s.f) + k]));
    __m128 r1 = _mm_loadu_ps(c.pos + 4 * int64_t(c.tris[3 * int64_t(e[1].s.f) + k]));
    __m128 r2 = _mm_loadu_ps(c.pos + 4 * int64_t(c.tris[3 * int64_t(e[2].s.f) + k]));
    __m128 r3 = _mm_loadu_ps(c.pos + 4 * int64_t(c.tris[3 * int64_t(e[3].s.f) + k]));
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    cx[k] = r0, cy[k] = r1, cz[k] = r2, cw[k] = r3;
  }
  const __m128 eps = _mm_set1_ps(kWEps), fmax = _mm_set1_ps(kFltMax), aeps = _mm_set1_ps(kAreaEps);
  const __m128 absmask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  const __m128 one = _mm_set1_ps(1.0f), zero = _mm_setzero_ps(), mone = _mm_set1_ps(-1.0f);
  __m128 x[3], y[3], z[3];
  __m128 ok = _mm_castsi128_ps(_mm_set1_epi32(-1));
  for (int k = 0; k < 3; ++k) {
    x[k] = _mm_div_ps(cx[k], cw[k]);
    y[k] = _mm_div_ps(cy[k], cw[k]);
    z[k] = _mm_div_ps(cz[k], cw[k]);
    ok = _mm_and_ps(ok, _mm_and_ps(_mm_cmpgt_ps(cw[k], eps),
                                   _mm_and_ps(_mm_cmple_ps(_mm_and_ps(x[k], absmask), fmax),
                                              _mm_cmple_ps(_mm_and_ps(y[k], absmask), fmax))));
  }
  const __m128 area = _mm_sub_ps(_mm_mul_ps(_mm_sub_ps(x[1], x[0]), _mm_sub_ps(y[2], y[0])),
                                 _mm_mul_ps(_mm_sub_ps(y[1], y[0]), _mm_sub_ps(x[2], x[0])));
  const __m128 aa = _mm_and_ps(area, absmask);
  ok = _mm_and_ps(ok, _mm_and_ps(_mm_cmpgt_ps(aa, aeps), _mm_cmple_ps(aa, fmax)));
  const int okm = _mm_movemask_ps(ok) & ((1 << n) - 1);
  if (!okm) return;
  // one-pixel boxes: the pixel centre (j0, i0) of each lane
  alignas(16) float pxl[4], pyl[4];
  for (int l = 0; l < 4; ++l) {
    pxl[l] = c.pxs[e[l].s.j0];
    pyl[l] = c.pys[e[l].s.i0];
  }
  const __m128 px = _mm_load_ps(pxl), py = _mm_load_ps(pyl);
  const __m128 inv = _mm_div_ps(one, area);
  const __m128 b0 = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_sub_ps(x[1], px), _mm_sub_ps(y[2], py)),
                                          _mm_mul_ps(_mm_sub_ps(y[1], py), _mm_sub_ps(x[2], px))),
                               inv);
  const __m128 b1 = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_sub_ps(x[2], px), _mm_sub_ps(y[0], py)),
                                          _mm_mul_ps(_mm_sub_ps(y[2], py), _mm_sub_ps(x[0], px))),
                               inv);
  const __m128 b2 = _mm_sub_ps(_mm_sub_ps(one, b0), b1);
  const __m128 zz = _mm_add_ps(_mm_add_ps(_mm_mul_ps(b0, z[0]), _mm_mul_ps(b1, z[1])), _mm_mul_ps(b2, z[2]));
  const __m128 cov = _mm_and_ps(_mm_and_ps(_mm_cmpge_ps(b0, zero), _mm_cmpge_ps(b1, zero)),
                                _mm_and_ps(_mm_cmpge_ps(b2, zero),
                                           _mm_and_ps(_mm_cmpge_ps(zz, mone), _mm_cmple_ps(zz, one))));
  const int covm = _mm_movemask_ps(cov);
  int single = 0;  // lanes whose box holds exactly one pixel centre
  for (int l = 0; l < 4; ++l) single |= ((e[l].s.j0 + e[l].s.nj1 == 0) & (e[l].s.i0 + e[l].s.ni1 == 0)) << l;
  if (okm & ~single) {  // a triangle with a larger box: lane by lane in id order
    alignas(16) float fb0[4], fb1[4], fb2[4], fz[4], tv[13][4];
    _mm_store_ps(fb0, b0);
    _mm_store_ps(fb1, b1);
    _mm_store_ps(fb2, b2);
    _mm_store_ps(fz, zz);
    for (int k = 0; k < 3; ++k) {
      _mm_store_ps(tv[k], x[k]);
      _mm_store_ps(tv[3 + k], y[k]);
      _mm_store_ps(tv[6 + k], z[k]);
      _mm_store_ps(tv[9 + k], cw[k]);
    }
    _mm_store_ps(tv[12], inv);
    for (int m = okm; m; m &= m - 1) {
      const int l = __builtin_ctz(m);
      const Entry& el = e[l];
      const int j0 = el.s.j0, j1 = -el.s.nj1, i0 = el.s.i0, i1 = -el.s.ni1;
      if ((single >> l) & 1) {
        if ((covm >> l) & 1)
          Resolve(c, int64_t(i0) * c.w + j0, el.s.f + 1, fb0[l], fb1[l], fb2[l], fz[l], tv[9][l], tv[10][l], tv[11][l]);
      } else {
        float t[13];
        for (int r = 0; r < 13; ++r) t[r] = tv[r][l];
        RasterBox(c, el.s.f + 1, t, j0, j1, i0, i1);
      }
    }
    return;
  }
  const int hit = okm & covm;
  if (!hit) return;
  typedef uint32_t __attribute__((may_alias)) U32;  // bit views of float buffers
  U32* zbu = reinterpret_cast<U32*>(c.zb);
  alignas(16) float fz[4];
  alignas(16) uint32_t wz[4];
  _mm_store_ps(fz, zz);
  _mm_store_si128(reinterpret_cast<__m128i*>(wz), _mm_castps_si128(zz));
  if (!c.bary) {  // ids only: the depth tests lane by lane in id order, without branches
    for (int l = 0; l < 4; ++l) {
      const int64_t k = int64_t(e[l].s.i0) * c.w + e[l].s.j0;
      const uint32_t win = 0u - static_cast<uint32_t>(((hit >> l) & 1) & (fz[l] < c.zb[k]));
      zbu[k] ^= (zbu[k] ^ wz[l]) & win;
      c.ids[k] ^= (c.ids[k] ^ (e[l].s.f + 1)) & static_cast<int32_t>(win);
    }
    return;
  }
  // all one-pixel: perspective-correct (u, v) of every lane (Resolve's operations), then the depth
  // tests lane by lane in id order without branches (two lanes may share a pixel)
  const __m128 q0 = _mm_div_ps(b0, cw[0]), q1 = _mm_div_ps(b1, cw[1]), q2 = _mm_div_ps(b2, cw[2]);
  __m128 den = _mm_add_ps(_mm_add_ps(q0, q1), q2);
  den = _mm_blendv_ps(one, den, _mm_cmpgt_ps(_mm_and_ps(den, absmask), _mm_set1_ps(1e-20f)));
  alignas(16) float fu[4], fv[4];
  _mm_store_ps(fu, _mm_div_ps(q0, den));
  _mm_store_ps(fv, _mm_div_ps(q1, den));
  const U32* ufu = reinterpret_cast<const U32*>(fu);
  const U32* ufv = reinterpret_cast<const U32*>(fv);
  U32* bu = reinterpret_cast<U32*>(c.bary);
  for (int l = 0; l < 4; ++l) {  // bit selects: the compiler emits no branch (winners are random)
    const int64_t k = int64_t(e[l].s.i0) * c.w + e[l].s.j0;
    const uint32_t win = 0u - static_cast<uint32_t>(((hit >> l) & 1) & (fz[l] < c.zb[k]));
    zbu[k] ^= (zbu[k] ^ wz[l]) & win;
    c.ids[k] ^= (c.ids[k] ^ (e[l].s.f + 1)) & static_cast<int32_t>(win);
    U32* o = bu + 3 * k;
    o[0] ^= (o[0] ^ ufu[l]) & win;
    o[1] ^= (o[1] ^ ufv[l]) & win;
    o[2] ^= (o[2] ^ wz[l]) & win;
  }
}

// Rasterize rows [row0, row1) of the G views b0 .. b0 + G - 1 (G in {1, 2, 4}; views >= p.batch
// are absent: their slots hold neutral boxes, so nothing of them is queued) into ids (id + 1) and
// bary. ws->box holds the G views' vertex boxes interleaved, box[v * G + g], so the filter reads
// every corner once for all G views (one 8 G-byte record instead of G scattered cache lines) and
// handles two views per SSE register.
template <int G>
void RasterGroupBand(const RasterParams& p, int64_t b0, int row0, int row1, Workspace* ws) {
  const int h = p.height, w = p.width;
  const int nviews = static_cast<int>(std::min<int64_t>(G, p.batch - b0));
  BandCtx ctx[G];
  Entry* q[G];
  for (int g = 0; g < G; ++g) {
    q[g] = ws->queue.data() + g * (kChunk + 4);
    if (g >= nviews) continue;
    const int64_t b = b0 + g;
    int32_t* ids = p.ids + b * int64_t(h) * w;
    float* bary = p.bary ? p.bary + b * int64_t(h) * w * 3 : nullptr;
    float* zb = ws->zbuf.data() + int64_t(g) * (row1 - row0) * w - int64_t(row0) * w;  // absolute rows
    std::fill(zb + int64_t(row0) * w, zb + int64_t(row1) * w, std::numeric_limits<float>::infinity());
    std::fill(ids + int64_t(row0) * w, ids + int64_t(row1) * w, 0);
    if (bary) std::fill(bary + int64_t(row0) * w * 3, bary + int64_t(row1) * w * 3, 0.0f);
    ctx[g] = BandCtx{p.pos + b * p.num_verts * 4, p.tris, ws->px.data(), ws->py.data(), zb, ids, bary, w};
  }
  const Box* box = ws->box.data();
  const int r1 = row1 - 1, wm1 = w - 1;
  constexpr int64_t kPrefetch = 64;     // filter: triangles ahead
  constexpr int kAheadCorners = 24;      // raster: queue entries ahead (corner records)
  constexpr int kAheadPixels = 12;       // raster: queue entries ahead (depth/output lines)
  const int64_t nf = p.num_tris;
  const __m128i lim = _mm_setr_epi16(0, static_cast<int16_t>(-wm1), static_cast<int16_t>(row0),
                                     static_cast<int16_t>(-r1), 0, static_cast<int16_t>(-wm1),
                                     static_cast<int16_t>(row0), static_cast<int16_t>(-r1));
  const __m128i zero = _mm_setzero_si128();
  constexpr int kRegs = G == 1 ? 1 : G / 2;  // SSE registers per corner record
  auto load = [&](int32_t v, int r) {
    const __m128i* ptr = reinterpret_cast<const __m128i*>(box + int64_t(v) * G + 2 * r);
    return G == 1 ? _mm_loadl_epi64(ptr) : _mm_loadu_si128(ptr);
  };
  for (int64_t c0 = 0; c0 < nf; c0 += kChunk) {
    const int64_t c1 = std::min(nf, c0 + kChunk);
    // a. filter (no branch on the outcome: the entry is always written, the count advances by keep)
    int n[G] = {};
    const int32_t* tv = p.tris + 3 * c0;
    for (int64_t f = c0; f < c1; ++f, tv += 3) {
      if (f + kPrefetch < nf) {
        const int32_t* tp = tv + 3 * kPrefetch;
        __builtin_prefetch(box + int64_t(tp[0]) * G);
        __builtin_prefetch(box + int64_t(tp[1]) * G);
        __builtin_prefetch(box + int64_t(tp[2]) * G);
      }
      for (int r = 0; r < kRegs; ++r) {
        // box = lane-wise min of the corners' (j0, -j1, i0, -i1), clamped to the band; empty unless
        // j0 + (-j1) <= 0 and i0 + (-i1) <= 0 (saturating adds: no wrap-around); two views per register
        __m128i m = _mm_min_epi16(load(tv[0], r), load(tv[1], r));
        m = _mm_max_epi16(_mm_min_epi16(m, load(tv[2], r)), lim);
        const __m128i sum = _mm_adds_epi16(
            m, _mm_shufflehi_epi16(_mm_shufflelo_epi16(m, _MM_SHUFFLE(2, 3, 0, 1)), _MM_SHUFFLE(2, 3, 0, 1)));
        const int nonempty = ~_mm_movemask_epi8(_mm_cmpgt_epi16(sum, zero));
        const int g0 = 2 * r;
        _mm_storeu_si128(&q[g0][n[g0]].v, _mm_insert_epi32(m, static_cast<int32_t>(f), 3));
        n[g0] += (nonempty & 0x33) == 0x33;
        if (G > 1) {
          const int g1 = 2 * r + 1;
          _mm_storeu_si128(&q[g1][n[g1]].v, _mm_insert_epi32(_mm_unpackhi_epi64(m, m), static_cast<int32_t>(f), 3));
          n[g1] += (nonempty & 0x3300) == 0x3300;
        }
      }
    }
    // b. raster, per view four queued triangles at a time; the last group is padded with its last entry
    for (int g = 0; g < nviews; ++g) {
      const int ng = n[g];
      if (ng == 0) continue;
      Entry* qg = q[g];
      const BandCtx& cg = ctx[g];
      for (int k = ng; k < ((ng + 3) & ~3); ++k) qg[k] = qg[ng - 1];
      for (int k = 0; k < ng; k += 4) {
        if (k + kAheadCorners < ng) {  // corners of a group ahead
          for (int l = 0; l < 4; ++l) {
            const int32_t* t = p.tris + 3 * int64_t(qg[k + kAheadCorners + l].s.f);
            __builtin_prefetch(cg.pos + 4 * int64_t(t[0]));
            __builtin_prefetch(cg.pos + 4 * int64_t(t[1]));
            __builtin_prefetch(cg.pos + 4 * int64_t(t[2]));
          }
        }
        if (k + kAheadPixels < ng) {  // depth-buffer / output lines of a group ahead
          for (int l = 0; l < 4; ++l) {
            const int64_t px = int64_t(qg[k + kAheadPixels + l].s.i0) * w + qg[k + kAheadPixels + l].s.j0;
            __builtin_prefetch(cg.zb + px, 1);
            __builtin_prefetch(cg.ids + px, 1);
            if (cg.bary) __builtin_prefetch(cg.bary + 3 * px, 1);
          }
        }
        RasterGroup(cg, qg + k, std::min(4, ng - k));
      }
    }
  }
}

}  // namespace

void RasterizeCpu(const RasterParams& p, int num_threads) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  const int h = p.height;
  if (p.batch <= 0 || h <= 0 || p.width <= 0) return;
  // Views per group: as many (4, 2 or 1) as every thread still gets a whole group.
  const int64_t per_thread = std::max<int64_t>(1, p.batch / num_threads);
  const int G = per_thread >= 4 ? 4 : per_thread >= 2 ? 2 : 1;
  const int64_t groups = (p.batch + G - 1) / G;
  // Row bands per group: 1 when there are enough groups to keep every thread busy.
  const int64_t per_group = std::max<int64_t>(1, std::min<int64_t>(h, (num_threads + groups - 1) / groups));
  const int band = static_cast<int>((h + per_group - 1) / per_group);
  const int64_t nbands = (h + band - 1) / band;
  const int64_t items = groups * nbands;
  const int nt = static_cast<int>(std::min<int64_t>(num_threads, items));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    std::unique_ptr<Workspace> ws = TakeWorkspace();
    ws->box.resize(p.num_verts * G);
    if (ws->h != h || ws->w != p.width) {
      ws->px.resize(p.width + 4);  // 4 more (finite, never used): RasterBox loads four at a time
      ws->py.resize(h);
      for (int j = 0; j < p.width + 4; ++j) ws->px[j] = PixX(j, p.width);
      for (int i = 0; i < h; ++i) ws->py[i] = PixY(i, h);
      ws->h = h;
      ws->w = p.width;
    }
    ws->zbuf.resize(int64_t(G) * band * p.width + 4);  // + 4: RasterBox's 4-wide loads
    ws->queue.resize(G * (kChunk + 4));
    int64_t have = -1;  // group whose vertex pass is in ws
    for (int64_t it = next++; it < items; it = next++) {
      const int64_t grp = it / nbands;
      const int r0 = static_cast<int>(it % nbands) * band;
      const int r1 = std::min(h, r0 + band);
      const int64_t b0 = grp * G;
      if (have != grp) {
        for (int g = 0; g < G; ++g) {
          if (b0 + g < p.batch) {
            VertexPass(p, b0 + g, ws->box.data() + g, G);
          } else {  // absent view of a partial group: neutral boxes, never queued
            for (int64_t v = 0; v < p.num_verts; ++v) ws->box[v * G + g] = Box{32767, 1, 32767, 1};
          }
        }
        have = grp;
      }
      if (G == 4) {
        RasterGroupBand<4>(p, b0, r0, r1, ws.get());
      } else if (G == 2) {
        RasterGroupBand<2>(p, b0, r0, r1, ws.get());
      } else {
        RasterGroupBand<1>(p, b0, r0, r1, ws.get());
      }
    }
    ReturnWorkspace(std::move(ws));
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

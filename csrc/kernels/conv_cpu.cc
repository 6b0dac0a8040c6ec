// Drivers of the direct convolution (kernels/conv.h): weight packing, pixel -> row-pointer indirection,
// cache blocking and the split into work items; the arithmetic is in conv_cpu_avx512.cc / _avx2.cc.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "kernels/conv.h"

namespace tsjax {
namespace {

using conv_detail::FwdTile;
using conv_detail::GradRun;
using conv_detail::kMr;
using conv_detail::kPanel;

// Forward: a work item is kMc output pixels x a group of up to kMaxGroup 64-channel panels; its K loop
// (taps x input channels) runs in blocks of about kKc so that the packed weight block (kKc x 64 floats,
// 256 KiB) stays in L2. One thread, interleaved A/B of the same build with and without groups: 1x1 convs
// (dense layers) 8192x320 -> 320 / 2560, 2048x640 -> 640 / 5120: 0.90-0.97; 3x3 convs: 0.97-1.005.
constexpr int64_t kMc = 16 * kMr;
// Panels longer than L2 (taps * ci >= kBigPanelK: 2.25 MiB packed) stream their weights from L3 once per
// chunk, so those convs take chunks of kMcBig pixels. One thread, interleaved A/B: 3x3 convs with ci of
// 1024-2560 on 16x16 / 32x32 maps 0.82-0.87 with 288-pixel chunks; 3x3 convs with ci of 320-640 on 64x64
// maps were 1.03-1.13 with them, so they keep kMc.
constexpr int64_t kMcBig = 48 * kMr;
constexpr int64_t kBigPanelK = 9 * 1024;
constexpr int64_t kKc = 1024;
constexpr int64_t kGroupBytes = 512 * 1024;
constexpr int64_t kMaxGroup = 4;
constexpr int64_t kFwdItemsPerThread = 4;
// Output maps of at most this many pixels (all images) are one chunk, each panel packed by its item.
constexpr int64_t kSmallM = 64 * kMr;
// Kernel gradient: a work item is about kCiBlock input channels x one panel x a group of taps (all taps
// unless that leaves fewer than kGradItemsPerThread items per thread; splitting the taps makes every group
// read x and dy again: on one thread, 2x128x128x128 ran at 94 GFLOP/s in two groups, 106 in one); it walks
// the output pixels once, in chunks of
// about kPixChunk, and every tap and kMr-channel micro-tile of the item reads the chunk while it is in
// cache (each of x and dy is read from memory about once per panel / input block, not once per tap).
constexpr int64_t kCiBlock = 16 * kMr;
constexpr int64_t kPixChunk = 128;
constexpr int64_t kGradItemsPerThread = 2;

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using AlignedBuf = std::unique_ptr<float[], AlignedFree>;

AlignedBuf Alloc(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float)) + 63) / 64 * 64;
  return AlignedBuf(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n zeros: the row that out-of-image taps read.
AlignedBuf ZeroRow(int64_t n) {
  AlignedBuf z = Alloc(n);
  std::memset(z.get(), 0, std::max<int64_t>(n, 1) * sizeof(float));
  return z;
}

// Packed-weight buffers kept between calls. A fresh allocation of tens of MB is a fresh mmap whose pages
// are faulted in and zeroed on first touch, on every call (at 2x16x16x1280 -> 1280, 3x3, one thread,
// keeping the buffer measured 0.89-0.92 per round with the old one-panel-at-a-time packing, 0.97-0.98
// with the streamed packing below). A call takes the smallest kept buffer that is large enough (or
// allocates) and gives it back when done; at most kKeepBytes stay allocated between calls (the smallest
// buffers are freed first).
constexpr size_t kKeepBytes = size_t{256} << 20;

class PackBuffers {
 public:
  struct Lease {
    PackBuffers* owner;
    size_t cap;
    AlignedBuf buf;
    Lease(PackBuffers* o, size_t c, AlignedBuf b) : owner(o), cap(c), buf(std::move(b)) {}
    Lease(Lease&&) = default;
    ~Lease() {
      if (buf) owner->Give(cap, std::move(buf));
    }
    float* get() const { return buf.get(); }
  };

  Lease Take(int64_t n) {
    const size_t need = static_cast<size_t>(std::max<int64_t>(n, 1));
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = kept_.size();
      for (size_t i = 0; i < kept_.size(); ++i)
        if (kept_[i].first >= need && (best == kept_.size() || kept_[i].first < kept_[best].first)) best = i;
      if (best < kept_.size()) {
        Lease l(this, kept_[best].first, std::move(kept_[best].second));
        kept_.erase(kept_.begin() + best);
        bytes_ -= l.cap * sizeof(float);
        return l;
      }
    }
    return Lease(this, need, Alloc(n));
  }

 private:
  void Give(size_t cap, AlignedBuf buf) {
    std::lock_guard<std::mutex> lock(mu_);
    kept_.emplace_back(cap, std::move(buf));
    bytes_ += cap * sizeof(float);
    // Over the limit: drop the smallest buffers first (the large ones are the costly ones to re-fault).
    while (bytes_ > kKeepBytes && !kept_.empty()) {
      size_t smallest = 0;
      for (size_t i = 1; i < kept_.size(); ++i)
        if (kept_[i].first < kept_[smallest].first) smallest = i;
      bytes_ -= kept_[smallest].first * sizeof(float);
      kept_.erase(kept_.begin() + smallest);
    }
  }

  std::mutex mu_;
  std::vector<std::pair<size_t, AlignedBuf>> kept_;
  size_t bytes_ = 0;
};

PackBuffers& SharedPackBuffers() {
  static PackBuffers* pool = new PackBuffers();  // never destroyed: no teardown-order hazard at exit
  return *pool;
}

// Smallest k >= 0 with k * s + off >= 0, and one past the largest k with k * s + off < lim, clamped to
// [0, n): the range of output positions whose input position k * s + off lies inside [0, lim).
void ValidRange(int64_t off, int64_t s, int64_t lim, int64_t n, int64_t* lo, int64_t* hi) {
  int64_t a = off >= 0 ? 0 : CeilDiv(-off, s);
  int64_t b = lim - 1 - off < 0 ? 0 : (lim - 1 - off) / s + 1;
  *lo = std::min(a, n);
  *hi = std::max(*lo, std::min(b, n));
}

// One packed row: nn (<= kPanel) floats of src, zero-padded to kPanel.
void PackRow(const float* src, int64_t nn, float* d) {
  std::memcpy(d, src, nn * sizeof(float));
  if (nn < kPanel) std::memset(d + nn, 0, (kPanel - nn) * sizeof(float));
}

// Panel pn of this conv's weights: dst[t][c][0:64] = w'[t][c][pn * 64 + n] (zero past co), where w' is w
// ([t][c][co] rows) or, for a flipped kernel, w[taps-1-t][co][c]. The flipped kernel is transposed in
// 16 x 16 blocks: 16 source rows are read forward together (prefetch-friendly streams) and every packed
// line is written whole.
void PackPanel(const ConvParams& p, const float* w, int64_t pn, float* dst) {
  const int64_t taps = p.kh * p.kw, n0 = pn * kPanel, nn = std::min<int64_t>(kPanel, p.co - n0);
  for (int64_t t = 0; t < taps; ++t) {
    float* d = dst + t * p.ci * kPanel;
    if (!p.flip) {
      for (int64_t c = 0; c < p.ci; ++c, d += kPanel) PackRow(w + (t * p.ci + c) * p.co + n0, nn, d);
      continue;
    }
    const float* src = w + (taps - 1 - t) * p.co * p.ci;
    for (int64_t nb = 0; nb < kPanel; nb += 16) {
      const int64_t nr = std::clamp<int64_t>(nn - nb, 0, 16);  // valid source rows of this block
      for (int64_t c0 = 0; c0 < p.ci; c0 += 16) {
        const int64_t cn = std::min<int64_t>(16, p.ci - c0);
        float tile[16][16];
        for (int64_t r = 0; r < 16; ++r) {
          const float* row = src + (n0 + nb + r) * p.ci + c0;
          for (int64_t c = 0; c < 16; ++c) tile[c][r] = (r < nr && c < cn) ? row[c] : 0.0f;
        }
        for (int64_t c = 0; c < cn; ++c) std::memcpy(d + (c0 + c) * kPanel + nb, tile[c], 16 * sizeof(float));
      }
    }
  }
}

// Every panel of a non-flipped kernel into dst (panel pn at dst + pn * panel_size), walking w's rows in
// order and scattering each over the panels: w is read as one forward stream (one panel at a time would
// read 256-byte pieces at a stride of co floats, one memory latency each).
void PackAllPanels(const ConvParams& p, const float* w, float* dst, const ParallelFor& parallel_for) {
  const int64_t rows = p.kh * p.kw * p.ci, npan = CeilDiv(p.co, kPanel), panel_size = rows * kPanel;
  if (p.flip) {
    parallel_for(npan, [&](int64_t pn) { PackPanel(p, w, pn, dst + pn * panel_size); });
    return;
  }
  constexpr int64_t kRowsPerItem = 256;
  parallel_for(CeilDiv(rows, kRowsPerItem), [&](int64_t item) {
    const int64_t r1 = std::min(rows, (item + 1) * kRowsPerItem);
    for (int64_t r = item * kRowsPerItem; r < r1; ++r)
      for (int64_t pn = 0; pn < npan; ++pn) {
        PackRow(w + r * p.co + pn * kPanel, std::min<int64_t>(kPanel, p.co - pn * kPanel),
                dst + pn * panel_size + r * kPanel);
      }
  });
}

struct KBlock {
  int t0, nt;
  int64_t c0, nc;
};

std::vector<KBlock> KBlocks(int64_t taps, int64_t ci) {
  std::vector<KBlock> kb;
  if (ci >= kKc) {
    for (int t = 0; t < taps; ++t)
      for (int64_t c0 = 0; c0 < ci; c0 += kKc) kb.push_back({t, 1, c0, std::min(kKc, ci - c0)});
  } else {
    const int per = static_cast<int>(std::max<int64_t>(1, kKc / ci));
    for (int t = 0; t < taps; t += per) kb.push_back({t, static_cast<int>(std::min<int64_t>(per, taps - t)), 0, ci});
  }
  return kb;
}

// Kernel gradient of a 1x1, stride-1, unpadded conv: one GEMM, dw[ci, co] = sum_k x[k, ci] dy[k, co] over
// the kk = batch * h * w pixels (a dense layer's weight gradient: tsjax/diffusion/layers.py sends those
// here). In place, x's and dy's rows are read at a stride of ci / co floats, a power of two in the
// UNets, so a block of rows maps onto a few L1 sets and evicts itself; this path copies each block of
// kKcDense pixels into contiguous buffers first (GotoBLAS-style): dy's panels as [panel][kc][64] once
// per block for all the item's input channels, then per kCiBlock-sized input block x's columns as
// [kc][nci], and runs the kernel-gradient micro-tiles over them, accumulating in a per-item buffer.
// Work item: (a run of input blocks, a group of up to kDensePanels panels), at least kDenseItems items
// where the shape allows.
constexpr int64_t kKcDense = 64;
constexpr int64_t kDensePanels = 8;
constexpr int64_t kDenseItems = 4;

void DenseKernelGrad(int64_t kk, int64_t ci, int64_t co, const float* x, const float* dy, float* dw, CpuIsa isa,
                     const ParallelFor& parallel_for) {
  const int64_t npan = CeilDiv(co, kPanel), ncib = CeilDiv(ci, kCiBlock);
  const int64_t cib_size = CeilDiv(CeilDiv(ci, ncib), kMr) * kMr;
  const int64_t ngrp = CeilDiv(npan, kDensePanels);
  const int64_t per_sb = CeilDiv(ncib, std::min(ncib, CeilDiv(kDenseItems, ngrp)));  // input blocks per item
  const int64_t nsb = CeilDiv(ncib, per_sb);
  auto tile_fn = isa == CpuIsa::kAvx512 ? conv_detail::GradTileAvx512 : conv_detail::GradTileAvx2;
  parallel_for(nsb * ngrp, [&](int64_t item) {
    const int64_t sb = item / ngrp, grp = item % ngrp;
    const int64_t ci_lo = sb * per_sb * cib_size, ci_hi = std::min(ci, (sb + 1) * per_sb * cib_size);
    const int64_t p0 = grp * kDensePanels, np = std::min(kDensePanels, npan - p0);
    const int64_t nsub_max = CeilDiv(cib_size, kMr), tile_acc = nsub_max * kMr * kPanel;
    const int64_t nblk = CeilDiv(ci_hi - ci_lo, cib_size);
    auto nvec16 = [&](int64_t q) { return static_cast<int>(std::min<int64_t>(kPanel, co - (p0 + q) * kPanel) / 16); };
    thread_local std::vector<float> buf;
    const size_t need = static_cast<size_t>(kKcDense * (cib_size + np * kPanel) + nblk * np * tile_acc);
    if (buf.size() < need) buf.resize(need);
    float* const ap = buf.data();               // [kc][nci]: one input block's columns of x
    float* const bp = ap + kKcDense * cib_size;      // [np][kc][kPanel]: dy's panels p0 .. p0 + np
    float* const acc = bp + kKcDense * np * kPanel;  // [block][np][nsub_max * kMr][kPanel]
    std::memset(acc, 0, nblk * np * tile_acc * sizeof(float));
    for (int64_t k0 = 0; k0 < kk; k0 += kKcDense) {
      const int64_t kc = std::min(kKcDense, kk - k0);
      for (int64_t q = 0; q < np; ++q)
        for (int64_t k = 0; k < kc; ++k)
          std::memcpy(bp + (q * kKcDense + k) * kPanel, dy + (k0 + k) * co + (p0 + q) * kPanel,
                      nvec16(q) * 16 * sizeof(float));
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t ci0 = ci_lo + blk * cib_size, nci = std::min(cib_size, ci_hi - ci0), nsub = CeilDiv(nci, kMr);
        for (int64_t k = 0; k < kc; ++k) std::memcpy(ap + k * nci, x + (k0 + k) * ci + ci0, nci * sizeof(float));
        for (int64_t q = 0; q < np; ++q) {
          const GradRun run{ap, nci, bp + q * kKcDense * kPanel, kPanel, kc};
          float* acc_q = acc + (blk * np + q) * tile_acc;
          for (int64_t s = 0; s < nsub; ++s)
            tile_fn(&run, 1, s * kMr, 0, static_cast<int>(std::min<int64_t>(kMr, nci - s * kMr)), nvec16(q),
                    acc_q + s * kMr * kPanel);
        }
      }
    }
    for (int64_t blk = 0; blk < nblk; ++blk)
      for (int64_t q = 0; q < np; ++q) {
        const int64_t ci0 = ci_lo + blk * cib_size, nci = std::min(cib_size, ci_hi - ci0);
        for (int64_t c = 0; c < nci; ++c)
          std::memcpy(dw + (ci0 + c) * co + (p0 + q) * kPanel, acc + (blk * np + q) * tile_acc + c * kPanel,
                      nvec16(q) * 16 * sizeof(float));
      }
  });
}

}  // namespace

void ConvForwardCpu(const ConvParams& p, const float* x, const float* w, float* y, CpuIsa isa,
                    const ParallelFor& parallel_for, int64_t threads) {
  const int64_t taps = p.kh * p.kw, m_total = p.batch * p.ho * p.wo;
  const int64_t npan = CeilDiv(p.co, kPanel), panel_size = taps * p.ci * kPanel;
  // Small maps (all pixels in one chunk): each work item packs its own panel into a per-thread buffer
  // right before using it (the weights are read once, in parallel, and stay in cache); larger maps share
  // one packed copy of the weights.
  const bool per_item = m_total <= kSmallM;
  const int64_t mchunk = per_item ? m_total : taps * p.ci >= kBigPanelK ? kMcBig : kMc;
  std::optional<PackBuffers::Lease> shared;  // all panels (large maps only)
  if (!per_item) {
    shared.emplace(SharedPackBuffers().Take(npan * panel_size));
    PackAllPanels(p, w, shared->get(), parallel_for);
  }
  const float* const packed = shared ? shared->get() : nullptr;
  const AlignedBuf zeros = ZeroRow(p.ci);
  const std::vector<KBlock> kblocks = KBlocks(taps, p.ci);
  auto tile_fn = isa == CpuIsa::kAvx512 ? conv_detail::FwdTileAvx512 : conv_detail::FwdTileAvx2;

  const int64_t nchunks = CeilDiv(m_total, mchunk);
  // Panels per work item: the item runs every panel of its group on one pixel micro-tile before the
  // next, so the tile's x rows stay in L1 while the group's packed weight blocks (up to kGroupBytes) are
  // read from L2. Smaller groups where that would leave fewer than kFwdItemsPerThread items per thread.
  int64_t kc_max = 1;
  for (const KBlock& kb : kblocks) kc_max = std::max<int64_t>(kc_max, kb.nt * kb.nc);
  int64_t G = per_item ? 1
                       : std::clamp<int64_t>(kGroupBytes / (kc_max * kPanel * int64_t{sizeof(float)}), 1, kMaxGroup);
  const int64_t min_items = kFwdItemsPerThread * (threads > 0 ? threads : 4);
  while (G > 1 && nchunks * CeilDiv(npan, G) < min_items) G /= 2;
  const int64_t ngroups = CeilDiv(npan, G);
  parallel_for(nchunks * ngroups, [&](int64_t item) {
    const int64_t chunk = item / ngroups, grp = item % ngroups;
    const int64_t pn0 = grp * G, pn1 = std::min(npan, pn0 + G);
    const int64_t m0 = chunk * mchunk, mc = std::min(mchunk, m_total - m0);
    const int64_t ntiles = CeilDiv(mc, kMr);
    // Row pointers ptr[tile][t][m]: x row of pixel m0 + tile * kMr + m for tap t, or the zero row.
    std::vector<const float*> ptr(ntiles * taps * kMr, zeros.get());
    for (int64_t k = 0; k < mc; ++k) {
      const int64_t m = m0 + k, b = m / (p.ho * p.wo), r = m % (p.ho * p.wo), ho = r / p.wo, wo = r % p.wo;
      const float** row = ptr.data() + (k / kMr) * taps * kMr + (k % kMr);
      for (int64_t i = 0; i < p.kh; ++i) {
        const int64_t hi = ho * p.sh + i - p.ph;
        if (hi < 0 || hi >= p.h) continue;
        for (int64_t j = 0; j < p.kw; ++j) {
          const int64_t wi = wo * p.sw + j - p.pw;
          if (wi >= 0 && wi < p.w) row[(i * p.kw + j) * kMr] = x + ((b * p.h + hi) * p.w + wi) * p.ci;
        }
      }
    }
    const float* own_panel = nullptr;  // per_item: the item's one panel (G = 1)
    if (per_item) {
      thread_local std::vector<float> own;
      if (static_cast<int64_t>(own.size()) < panel_size) own.resize(panel_size);
      PackPanel(p, w, pn0, own.data());
      own_panel = own.data();
    }
    for (size_t q = 0; q < kblocks.size(); ++q) {
      const KBlock& kb = kblocks[q];
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        for (int64_t pn = pn0; pn < pn1; ++pn) {
          const int64_t n0 = pn * kPanel;
          FwdTile t;
          t.a = ptr.data() + (tile * taps + kb.t0) * kMr;
          t.ntaps = kb.nt;
          t.c0 = kb.c0;
          t.nci = kb.nc;
          t.b = (per_item ? own_panel : packed + pn * panel_size) + (kb.t0 * p.ci + kb.c0) * kPanel;
          t.tap_stride = p.ci * kPanel;
          t.ldb = kPanel;
          t.c = y + (m0 + tile * kMr) * p.co + n0;
          t.ldc = p.co;
          t.mr = static_cast<int>(std::min<int64_t>(kMr, mc - tile * kMr));
          t.nvec16 = static_cast<int>(std::min<int64_t>(kPanel, p.co - n0) / 16);
          t.accumulate = q > 0;
          tile_fn(t);
        }
      }
    }
  });
}

// Winograd forward (kernels/conv.h). The kernel is packed into 64-channel panels as for the direct
// forward (both orientations), then transformed to U[k][panel][ci][64] (k < alpha^2). A work item is a
// block of up to nb tiles x a group of panels: it transforms its tiles' inputs into V[k][tile][ci] (a
// per-thread buffer; block size below), then per panel runs the alpha^2 GEMMs M[k] = V[k] U[k][panel] on the
// direct forward's 6 x 64 micro-kernel (U[k][panel], ci x 64 floats, stays in L2 across the block's
// micro-tiles) and transforms M back into the panel's output channels.
namespace {

// Tiles per block: every block streams all of U once (alpha^2 * ci * co floats, from memory when ci * co is
// large), i.e. 2 / kWinoTiles bytes per flop. With blocks sized to keep V in L2 (2 MiB: 24 tiles at
// ci = 512) the F(4x4) 8x16x16x512 conv ran 1.9x slower than with 96 tiles (V then 7 MiB, but each GEMM
// reads one V[k] slice, nb * ci floats, and the whole of V once per panel: a few GB/s from L3). One
// thread, 96 / 144 / 192 tiles: within noise on 256x256x64 ... 8x16x16x512; 96 keeps V + M of a 64-channel
// conv in L2 (1.8 MiB), where 192 was up to 1.15x slower.
constexpr int64_t kWinoTiles = 16 * kMr;
// ... but at most kWinoVBytes of transformed input per block (a per-thread buffer kept between calls): 96
// tiles up to 568 input channels with F(4x4), fewer at SD's 1280-2560.
constexpr int64_t kWinoVBytes = int64_t{8} << 20;

struct ThreadBuf {
  AlignedBuf buf;
  int64_t cap = 0;
  float* get(int64_t n) {
    if (n > cap) {
      buf = Alloc(n);
      cap = n;
    }
    return buf.get();
  }
};

}  // namespace

void ConvForwardWinogradCpu(const ConvParams& p, int m, const float* x, const float* w, float* y, CpuIsa isa,
                            const ParallelFor& parallel_for, int64_t threads) {
  const int a = m + 2;
  const int64_t a2 = a * a, npan = CeilDiv(p.co, kPanel), panel_size = 9 * p.ci * kPanel;
  const int64_t th = CeilDiv(p.ho, m), tw = CeilDiv(p.wo, m), ntiles = p.batch * th * tw;
  const bool avx512 = isa == CpuIsa::kAvx512;
  auto in_fn = avx512 ? conv_detail::WinoInputAvx512 : conv_detail::WinoInputAvx2;
  auto ker_fn = avx512 ? conv_detail::WinoKernelAvx512 : conv_detail::WinoKernelAvx2;
  auto out_fn = avx512 ? conv_detail::WinoOutputAvx512 : conv_detail::WinoOutputAvx2;
  auto tile_fn = avx512 ? conv_detail::FwdTileAvx512 : conv_detail::FwdTileAvx2;

  // U[k][pn][c][0:64] = (G g G^T)[k] of panel pn, input channel c.
  const int64_t uplane = npan * p.ci * kPanel;
  PackBuffers::Lease u = SharedPackBuffers().Take(a2 * uplane);
  {
    PackBuffers::Lease packed = SharedPackBuffers().Take(npan * panel_size);
    PackAllPanels(p, w, packed.get(), parallel_for);
    constexpr int64_t kCiPerItem = 64;
    const int64_t ncb = CeilDiv(p.ci, kCiPerItem);
    parallel_for(npan * ncb, [&](int64_t item) {
      const int64_t pn = item / ncb, c0 = (item % ncb) * kCiPerItem;
      conv_detail::WinoKernel t{m, packed.get() + pn * panel_size, p.ci, c0, std::min(p.ci, c0 + kCiPerItem),
                                u.get() + pn * p.ci * kPanel, uplane};
      ker_fn(t);
    });
  }

  // Tiles per block (a multiple of kMr) and panels per group: blocks of kWinoTiles tiles; where that leaves
  // fewer than kFwdItemsPerThread items per thread, smaller panel groups (each re-transforms its block's
  // input, a small cost next to a panel's GEMMs), then smaller blocks.
  int64_t nb = std::clamp<int64_t>(kWinoVBytes / (a2 * p.ci * int64_t{sizeof(float)}), kMr, kWinoTiles) / kMr * kMr;
  nb = std::min(nb, CeilDiv(ntiles, kMr) * kMr);
  const int64_t min_items = kFwdItemsPerThread * (threads > 0 ? threads : 4);
  int64_t G = npan;
  while (G > 1 && CeilDiv(ntiles, nb) * CeilDiv(npan, G) < min_items) G = CeilDiv(G, 2);
  while (nb > kMr && CeilDiv(ntiles, nb) * CeilDiv(npan, G) < min_items) nb = std::max<int64_t>(kMr, nb / 2 / kMr * kMr);
  const int64_t nblocks = CeilDiv(ntiles, nb), ngroups = CeilDiv(npan, G);
  const AlignedBuf zeros = ZeroRow(p.ci);

  parallel_for(nblocks * ngroups, [&](int64_t item) {
    const int64_t blk = item / ngroups, grp = item % ngroups;
    const int64_t t0 = blk * nb, nt = std::min(nb, ntiles - t0);
    const int64_t pn0 = grp * G, pn1 = std::min(npan, pn0 + G);
    thread_local ThreadBuf vb, mb;
    float* const v = vb.get(a2 * nb * p.ci);   // V[k][tile][ci]
    float* const mm = mb.get(a2 * nb * kPanel);  // M[k][tile][64] of one panel
    auto tile_at = [&](int64_t q, int64_t* b, int64_t* ty, int64_t* tx) {
      const int64_t tile = t0 + q, r = tile % (th * tw);
      *b = tile / (th * tw);
      *ty = r / tw;
      *tx = r % tw;
    };
    const float* src[36];
    for (int64_t q = 0; q < nt; ++q) {
      int64_t b, ty, tx;
      tile_at(q, &b, &ty, &tx);
      for (int i = 0; i < a; ++i) {
        const int64_t yy = ty * m + i - p.ph;
        for (int j = 0; j < a; ++j) {
          const int64_t xx = tx * m + j - p.pw;
          const bool in = yy >= 0 && yy < p.h && xx >= 0 && xx < p.w;
          src[i * a + j] = in ? x + ((b * p.h + yy) * p.w + xx) * p.ci : zeros.get();
        }
      }
      in_fn(conv_detail::WinoInput{m, src, p.ci, v + q * p.ci, nb * p.ci});
    }
    for (int64_t pn = pn0; pn < pn1; ++pn) {
      const int nvec16 = static_cast<int>(std::min<int64_t>(kPanel, p.co - pn * kPanel) / 16);
      for (int64_t k = 0; k < a2; ++k) {
        const float* bk = u.get() + k * uplane + pn * p.ci * kPanel;
        for (int64_t r0 = 0; r0 < nt; r0 += kMr) {
          const int mr = static_cast<int>(std::min<int64_t>(kMr, nt - r0));
          const float* rows[kMr];
          for (int r = 0; r < kMr; ++r) rows[r] = v + (k * nb + r0 + std::min(r, mr - 1)) * p.ci;
          FwdTile t;
          t.a = rows;
          t.ntaps = 1;
          t.c0 = 0;
          t.nci = p.ci;
          t.b = bk;
          t.tap_stride = 0;
          t.ldb = kPanel;
          t.c = mm + (k * nb + r0) * kPanel;
          t.ldc = kPanel;
          t.mr = mr;
          t.nvec16 = nvec16;
          t.accumulate = false;
          tile_fn(t);
        }
      }
      float* dst[16];
      for (int64_t q = 0; q < nt; ++q) {
        int64_t b, ty, tx;
        tile_at(q, &b, &ty, &tx);
        for (int r = 0; r < m; ++r)
          for (int s2 = 0; s2 < m; ++s2) {
            const int64_t oy = ty * m + r, ox = tx * m + s2;
            dst[r * m + s2] = oy < p.ho && ox < p.wo ? y + ((b * p.ho + oy) * p.wo + ox) * p.co + pn * kPanel : nullptr;
          }
        out_fn(conv_detail::WinoOutput{m, mm + q * kPanel, nb * kPanel, dst, nvec16});
      }
    }
  });
}

void ConvKernelGradCpu(const ConvParams& p, const float* x, const float* dy, float* dw, CpuIsa isa,
                       const ParallelFor& parallel_for, int64_t threads) {
  const int64_t taps = p.kh * p.kw;
  if (taps == 1 && p.sh == 1 && p.sw == 1 && p.ph == 0 && p.pw == 0 && p.ho == p.h && p.wo == p.w)
    return DenseKernelGrad(p.batch * p.h * p.w, p.ci, p.co, x, dy, dw, isa, parallel_for);
  const int64_t npan = CeilDiv(p.co, kPanel), ncib = CeilDiv(p.ci, kCiBlock);
  // Input-channel blocks of about equal size (multiples of kMr), so that work items are balanced.
  const int64_t cib_size = CeilDiv(CeilDiv(p.ci, ncib), kMr) * kMr;
  // Taps are split into groups only when there are too few (input block, panel) items to share out. Every
  // dw element is still summed by one item in pixel order, so the split never changes a result.
  const int64_t min_items = kGradItemsPerThread * (threads > 0 ? threads : 4);
  int64_t ngroups = 1;
  while (ngroups < taps && ncib * npan * ngroups < min_items) ++ngroups;
  const int64_t tpg = CeilDiv(taps, ngroups);
  ngroups = CeilDiv(taps, tpg);
  // Output-row segments of at most kPixChunk pixels, in pixel order, grouped into chunks of about
  // kPixChunk pixels (a segment is never split): the chunk's dy rows stay in L1 / L2 while every tap and
  // input-channel micro-tile of the item reads them.
  struct Seg {
    int64_t b, ho, s, n;
  };
  std::vector<Seg> segs;
  std::vector<size_t> chunk_end;
  int64_t in_chunk = 0;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t ho = 0; ho < p.ho; ++ho)
      for (int64_t s = 0; s < p.wo; s += kPixChunk) {
        const int64_t n = std::min(kPixChunk, p.wo - s);
        if (in_chunk + n > kPixChunk && in_chunk > 0) {
          chunk_end.push_back(segs.size());
          in_chunk = 0;
        }
        segs.push_back({b, ho, s, n});
        in_chunk += n;
      }
  chunk_end.push_back(segs.size());
  // Per tap: the output columns whose input column is inside the image.
  std::vector<int64_t> wlo(taps), whi(taps);
  for (int64_t t = 0; t < taps; ++t) ValidRange(t % p.kw - p.pw, p.sw, p.w, p.wo, &wlo[t], &whi[t]);
  auto tile_fn = isa == CpuIsa::kAvx512 ? conv_detail::GradTileAvx512 : conv_detail::GradTileAvx2;

  parallel_for(ngroups * ncib * npan, [&](int64_t item) {
    const int64_t g = item / (ncib * npan), cib = (item / npan) % ncib, pn = item % npan;
    const int64_t t0 = g * tpg, nt = std::min(tpg, taps - t0);
    const int64_t ci0 = cib * cib_size, nci = std::min(cib_size, p.ci - ci0);
    const int64_t n0 = pn * kPanel, nsub = CeilDiv(nci, kMr);
    const int nvec16 = static_cast<int>(std::min<int64_t>(kPanel, p.co - n0) / 16);
    // acc[t][c][0:64]: this item's block of dw for tap t0 + t, input channel ci0 + c.
    const int64_t tap_acc = nsub * kMr * kPanel;
    AlignedBuf acc = Alloc(nt * tap_acc);
    std::memset(acc.get(), 0, nt * tap_acc * sizeof(float));
    std::vector<GradRun> runs;
    size_t q0 = 0;
    for (size_t q1 : chunk_end) {
      for (int64_t t = t0; t < t0 + nt; ++t) {
        if (whi[t] <= wlo[t]) continue;
        const int64_t i = t / p.kw, j = t % p.kw;
        runs.clear();
        for (size_t q = q0; q < q1; ++q) {
          const Seg& sg = segs[q];
          const int64_t hi = sg.ho * p.sh + i - p.ph;
          const int64_t lo = std::max(sg.s, wlo[t]), up = std::min(sg.s + sg.n, whi[t]);
          if (hi < 0 || hi >= p.h || lo >= up) continue;
          GradRun r;
          r.n = up - lo;
          r.x0 = x + ((sg.b * p.h + hi) * p.w + lo * p.sw + j - p.pw) * p.ci;
          r.xstride = p.sw * p.ci;
          r.dy0 = dy + ((sg.b * p.ho + sg.ho) * p.wo + lo) * p.co;
          r.dystride = p.co;
          runs.push_back(r);
        }
        if (runs.empty()) continue;
        for (int64_t s = 0; s < nsub; ++s) {
          const int mr = static_cast<int>(std::min<int64_t>(kMr, nci - s * kMr));
          tile_fn(runs.data(), static_cast<int>(runs.size()), ci0 + s * kMr, n0, mr, nvec16,
                  acc.get() + (t - t0) * tap_acc + s * kMr * kPanel);
        }
      }
      q0 = q1;
    }
    const int64_t ncols = nvec16 * 16;
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t c = 0; c < nci; ++c)
        std::memcpy(dw + ((t0 + t) * p.ci + ci0 + c) * p.co + n0, acc.get() + t * tap_acc + c * kPanel,
                    ncols * sizeof(float));
  });
}

}  // namespace tsjax

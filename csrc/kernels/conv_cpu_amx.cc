// bfloat16 direct convolution on Intel AMX tiles (kernels/conv.h: ConvForwardBf16Amx).
//
// Stride 1 only. The input is copied once into a zero-padded bf16 buffer xp [B, Hp, Wp, Cp] (Hp = Ho +
// KH - 1, Wp = Wo + KW - 1, Cp = Ci rounded up to 32), so that for every tap (i, j) the input rows of 16
// consecutive "flat" output positions q = ho * Wp + wo are 16 consecutive rows of xp, starting at
// q + i * Wp + j: one strided tile load, no im2col. The wo >= Wo positions of each output row are computed
// and dropped (KW - 1 of every Wp). The kernel is packed once into VNNI tiles (pairs of input channels
// interleaved per output channel). A micro-tile is 32 positions x 32 output channels: four 16x16 float32
// accumulator tiles, two A tiles (activations) and two B tiles (weights), TDPBF16PS over taps x 32-channel
// blocks. Accumulation is float32 (each TDPBF16PS sums 32 products); the output is float32 or bf16
// (round to nearest even).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/conv.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16"))), \
                             apply_to = function)
#endif

namespace tsjax {
namespace {

constexpr int64_t kQChunk = 8;  // 32-row micro-tiles per work item

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void LoadConfig() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

}  // namespace

void ConvForwardBf16Amx(const ConvParams& p, const uint16_t* x, const uint16_t* w, void* y, bool y_bf16,
                        const ParallelFor& parallel_for) {
  const int64_t hp = p.ho + p.kh - 1, wp = p.wo + p.kw - 1, cp = RoundUp(p.ci, 32), taps = p.kh * p.kw;
  const int64_t img = hp * wp, slack = p.kw + 64;
  // zero-padded input
  std::vector<uint16_t> xp((p.batch * img + slack) * cp, 0);
  parallel_for(p.batch * hp, [&](int64_t bh) {
    const int64_t b = bh / hp, r = bh % hp, hi = r - p.ph;
    if (hi < 0 || hi >= p.h) return;
    for (int64_t c = 0; c < wp; ++c) {
      const int64_t wi = c - p.pw;
      if (wi >= 0 && wi < p.w)
        std::memcpy(&xp[((b * hp + r) * wp + c) * cp], x + ((b * p.h + hi) * p.w + wi) * p.ci, p.ci * 2);
    }
  });
  // VNNI-packed kernel: tile (t, kb, nb) = [16 channel pairs kk][16 output channels n][2 e] holding this
  // conv's w[t][kb * 32 + 2 kk + e][nb * 16 + n] (zero past ci)
  const int64_t nkb = cp / 32, nnb = p.co / 16;
  std::vector<uint16_t> wt(taps * nkb * nnb * 512);
  parallel_for(taps * nkb, [&](int64_t tk) {
    const int64_t t = tk / nkb, kb = tk % nkb;
    for (int64_t nb = 0; nb < nnb; ++nb) {
      uint16_t* tile = &wt[((t * nkb + kb) * nnb + nb) * 512];
      if (!p.flip) {  // rows ci and ci + 1 of [t][ci][co], 16 channels each, interleaved
        for (int64_t kk = 0; kk < 16; ++kk) {
          const int64_t ci = kb * 32 + 2 * kk;
          const __m256i zero = _mm256_setzero_si256();
          const uint16_t* r0 = w + (t * p.ci + ci) * p.co + nb * 16;
          const __m512i lo = _mm512_cvtepu16_epi32(
              ci < p.ci ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)) : zero);
          const __m512i hi = _mm512_cvtepu16_epi32(
              ci + 1 < p.ci ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + p.co)) : zero);
          _mm512_storeu_si512(tile + kk * 32, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      } else if ((kb + 1) * 32 <= p.ci && p.ci % 2 == 0) {  // flipped [taps-1-t][co][ci]: a 16 x 16 transpose of channel pairs
        const uint16_t* src = w + ((taps - 1 - t) * p.co + nb * 16) * p.ci + kb * 32;
        const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                _mm512_set1_epi32(static_cast<int>(p.ci / 2)));
        for (int64_t kk = 0; kk < 16; ++kk)
          _mm512_storeu_si512(tile + kk * 32, _mm512_i32gather_epi32(rows, src + 2 * kk, 4));
      } else {  // flipped, last partial channel block
        for (int64_t kk = 0; kk < 16; ++kk)
          for (int64_t n = 0; n < 16; ++n)
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t ci = kb * 32 + 2 * kk + e;
              tile[kk * 32 + 2 * n + e] = ci < p.ci ? w[((taps - 1 - t) * p.co + nb * 16 + n) * p.ci + ci] : 0;
            }
      }
    }
  });
  const int64_t q_img = p.ho * wp, nq = (q_img + 31) / 32, nchunk = (nq + kQChunk - 1) / kQChunk;
  const int64_t ncg = (nnb + 1) / 2;
  const int64_t stride = cp * 2;
  parallel_for(p.batch * nchunk * ncg, [&](int64_t item) {
    const int64_t cg = item % ncg, chunk = (item / ncg) % nchunk, b = item / (ncg * nchunk);
    const bool two = 2 * cg + 1 < nnb;  // a second 16-channel output tile
    LoadConfig();
    alignas(64) float out[32 * 32];
    for (int64_t qg = chunk * kQChunk; qg < std::min(nq, (chunk + 1) * kQChunk); ++qg) {
      const int64_t q0 = qg * 32;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t off = (t / p.kw) * wp + t % p.kw;
        const uint16_t* a0 = &xp[(b * img + q0 + off) * cp];
        const uint16_t* bt = &wt[(t * nkb * nnb + 2 * cg) * 512];
        for (int64_t kb = 0; kb < nkb; ++kb, a0 += 32, bt += nnb * 512) {
          _tile_loadd(4, a0, stride);
          _tile_loadd(5, a0 + 16 * cp, stride);
          _tile_loadd(6, bt, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (two) {
            _tile_loadd(7, bt + 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      _tile_stored(0, out, 128);
      _tile_stored(2, out + 16 * 32, 128);
      if (two) {
        _tile_stored(1, out + 16, 128);
        _tile_stored(3, out + 16 * 32 + 16, 128);
      }
      const int64_t ncol = two ? 32 : 16, co0 = cg * 32;
      for (int64_t r = 0; r < 32; ++r) {
        const int64_t q = q0 + r, ho = q / wp, wo = q % wp;
        if (ho >= p.ho || wo >= p.wo) continue;
        const int64_t o = ((b * p.ho + ho) * p.wo + wo) * p.co + co0;
        for (int64_t n = 0; n < ncol; n += 16) {
          const __m512 v = _mm512_load_ps(out + r * 32 + n);
          if (y_bf16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(y) + o + n),
                                (__m256i)_mm512_cvtneps_pbh(v));
          else
            _mm512_storeu_ps(static_cast<float*>(y) + o + n, v);
        }
      }
    }
    _tile_release();
  });
}

}  // namespace tsjax

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif

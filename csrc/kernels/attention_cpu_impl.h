// Flash attention for one (batch, head) pair, written once over a SIMD vector type V (kernels/attention.h).
//
// Included by attention_cpu_avx512.cc and attention_cpu_avx2.cc after their target pragmas, each with its
// own V and inside its own namespace. V provides: T (register type), W (floats per register), kAcc (how
// many accumulator registers a micro-tile may use), load / store (unaligned), set1, zero, add, sub, mul,
// fmadd, max, hmax, hsum, exp.
//
// Everything is a small GEMM C (+)= A B with A read through strides (a row-major matrix, or the transpose
// of one) and B read as rows of vectors, over blocks that stay in L1/L2.
// The includer has included <algorithm>, <cmath>, <cstring>, <limits> and <vector> (this file is
// included inside a namespace).

constexpr int64_t kBr = 64;  // query rows per block
constexpr int64_t kBc = 64;  // keys per block (a multiple of every W)

// C[MR rows, NV vectors] (+)= sum_k A(m, k) * B[k, :], A(m, k) = a[m * ams + k * aks].
template <class V, int MR, int NV>
void Tile(float* c, int64_t ldc, const float* a, int64_t ams, int64_t aks, const float* b, int64_t ldb, int64_t kk,
          bool accumulate) {
  typename V::T acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = accumulate ? V::load(c + m * ldc + j * V::W) : V::zero();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kk; ++k) {
    typename V::T bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = V::load(b + k * ldb + j * V::W);
    for (int m = 0; m < MR; ++m) {
      const typename V::T av = V::set1(a[m * ams + k * aks]);
      for (int j = 0; j < NV; ++j) acc[m][j] = V::fmadd(av, bv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) V::store(c + m * ldc + j * V::W, acc[m][j]);
}

template <class V, int NV>
void TileRows(int mr, float* c, int64_t ldc, const float* a, int64_t ams, int64_t aks, const float* b, int64_t ldb,
              int64_t kk, bool accumulate) {
  switch (mr) {
    case 1: return Tile<V, 1, NV>(c, ldc, a, ams, aks, b, ldb, kk, accumulate);
    case 2: return Tile<V, 2, NV>(c, ldc, a, ams, aks, b, ldb, kk, accumulate);
    case 3: return Tile<V, 3, NV>(c, ldc, a, ams, aks, b, ldb, kk, accumulate);
    case 4: return Tile<V, 4, NV>(c, ldc, a, ams, aks, b, ldb, kk, accumulate);
    case 5: return Tile<V, 5, NV>(c, ldc, a, ams, aks, b, ldb, kk, accumulate);
    case 6: return Tile<V, 6, NV>(c, ldc, a, ams, aks, b, ldb, kk, accumulate);
    case 7: return Tile<V, 7, NV>(c, ldc, a, ams, aks, b, ldb, kk, accumulate);
    default: return Tile<V, 8, NV>(c, ldc, a, ams, aks, b, ldb, kk, accumulate);
  }
}

// C[M, N] (+)= A[M, K] B[K, N] with A(m, k) = a[m * ams + k * aks]; N a multiple of V::W.
template <class V>
void Gemm(float* c, int64_t ldc, const float* a, int64_t ams, int64_t aks, const float* b, int64_t ldb, int64_t mm,
          int64_t nn, int64_t kk, bool accumulate) {
  for (int64_t n0 = 0; n0 < nn; n0 += 4 * V::W) {
    const int nv = static_cast<int>(std::min<int64_t>(4, (nn - n0) / V::W));
    const int mr_max = std::min(8, V::kAcc / nv);
    for (int64_t m0 = 0; m0 < mm; m0 += mr_max) {
      const int mr = static_cast<int>(std::min<int64_t>(mr_max, mm - m0));
      float* cc = c + m0 * ldc + n0;
      const float* aa = a + m0 * ams;
      const float* bb = b + n0;
      switch (nv) {
        case 1: TileRows<V, 1>(mr, cc, ldc, aa, ams, aks, bb, ldb, kk, accumulate); break;
        case 2: TileRows<V, 2>(mr, cc, ldc, aa, ams, aks, bb, ldb, kk, accumulate); break;
        case 3: TileRows<V, 3>(mr, cc, ldc, aa, ams, aks, bb, ldb, kk, accumulate); break;
        default: TileRows<V, 4>(mr, cc, ldc, aa, ams, aks, bb, ldb, kk, accumulate); break;
      }
    }
  }
}

// Per (b, h): the head's rows of q/k/v/o are `rs` = H * D floats apart.
struct Head {
  int64_t n, m, d, rs, nkb;
  const float* q;  // row i: q + i * rs
  const float* k;
  const float* v;
};

inline Head MakeHead(const tsjax::AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k,
                     const float* v) {
  const int64_t rs = p.heads * p.dim;
  return Head{p.n, p.m, p.dim, rs, (p.m + kBc - 1) / kBc, q + b * p.n * rs + h * p.dim, k + b * p.m * rs + h * p.dim,
              v + b * p.m * rs + h * p.dim};
}

// scale * x^T packed per block of `bc` keys: out[j][e][c] = scale * x[(j * bc + c) * rs + e], zero past m;
// out holds ceil(m / bc) * d * bc floats.
inline void PackTransposed(const float* x, int64_t m, int64_t d, int64_t rs, int64_t bc, float scale, float* out) {
  const int64_t nb = (m + bc - 1) / bc;
  std::memset(out, 0, sizeof(float) * nb * d * bc);
  for (int64_t j = 0; j < nb; ++j) {
    float* oj = out + j * d * bc;
    const float* xj = x + j * bc * rs;
    for (int64_t c = 0; c < std::min(bc, m - j * bc); ++c)
      for (int64_t e = 0; e < d; ++e) oj[e * bc + c] = scale * xj[c * rs + e];
  }
}

// x's rows packed contiguously: out[c][:] = x[c * rs : c * rs + d].
inline void PackRows(const float* x, int64_t m, int64_t d, int64_t rs, float* out) {
  for (int64_t c = 0; c < m; ++c) std::memcpy(out + c * d, x + c * rs, sizeof(float) * d);
}

// The forward's key blocks are longer than the backward's: up to kFcMax keys (the keys rounded up to a
// vector when fewer), so the per-row softmax bookkeeping (two horizontal reductions, the rescale of the
// accumulator row) is paid once per 256 keys, not per 64; the scale is folded into the packed k^T, and
// the max and the exp-sum run with two accumulators each. One pinned core, interleaved with PyTorch's
// SDPA: the mid UNet's level-0 self-attention (2 x 1024 tokens, 8 heads of 16) 1.28 -> 1.10-1.16x
// SDPA's time, its cross-attention (77 keys) 0.74 -> 0.54x, level 1 (256 tokens, head dim 32) 1.13 ->
// 0.97-1.08x.
constexpr int64_t kFr = 64;      // forward: query rows per block
constexpr int64_t kFcMax = 256;  // forward: keys per block at most (a multiple of every W)

template <class V>
void ForwardHead(const tsjax::AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k,
                 const float* v, float* o, float* lse) {
  const Head hd = MakeHead(p, b, h, q, k, v);
  const int64_t d = hd.d;
  const int64_t fc = std::min<int64_t>(kFcMax, (hd.m + V::W - 1) / V::W * V::W);
  const int64_t nfb = (hd.m + fc - 1) / fc;
  std::vector<float> kt(nfb * d * fc), vp(hd.m * d), s(kFr * fc), acc(kFr * d), mrow(kFr), lrow(kFr);
  PackTransposed(hd.k, hd.m, d, hd.rs, fc, p.scale, kt.data());  // the scale folded into k^T
  PackRows(hd.v, hd.m, d, hd.rs, vp.data());
  float* out = o + b * p.n * hd.rs + h * d;
  float* lse_row = lse + (b * p.heads + h) * p.n;
  for (int64_t i0 = 0; i0 < hd.n; i0 += kFr) {
    const int64_t br = std::min(kFr, hd.n - i0);
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(mrow.begin(), mrow.end(), -std::numeric_limits<float>::infinity());
    std::fill(lrow.begin(), lrow.end(), 0.0f);
    for (int64_t j = 0; j < nfb; ++j) {
      const int64_t bc = std::min(fc, hd.m - j * fc);
      const int64_t bv = (bc + V::W - 1) / V::W * V::W;  // columns computed (past bc: unused)
      const int64_t full = bc / V::W * V::W;              // columns in whole vectors
      Gemm<V>(s.data(), fc, hd.q + i0 * hd.rs, hd.rs, 1, kt.data() + j * d * fc, fc, br, bv, d, false);
      for (int64_t r = 0; r < br; ++r) {
        float* row = s.data() + r * fc;
        typename V::T mx0 = V::set1(mrow[r]), mx1 = mx0;
        int64_t c = 0;
        for (; c + 2 * V::W <= full; c += 2 * V::W) {
          mx0 = V::max(mx0, V::load(row + c));
          mx1 = V::max(mx1, V::load(row + c + V::W));
        }
        if (c < full) mx0 = V::max(mx0, V::load(row + c));
        float m_new = V::hmax(V::max(mx0, mx1));
        for (c = full; c < bc; ++c) m_new = std::max(m_new, row[c]);
        const typename V::T mv = V::set1(m_new);
        typename V::T sum0 = V::zero(), sum1 = V::zero();
        for (c = 0; c + 2 * V::W <= full; c += 2 * V::W) {
          const typename V::T e0 = V::exp(V::sub(V::load(row + c), mv));
          const typename V::T e1 = V::exp(V::sub(V::load(row + c + V::W), mv));
          V::store(row + c, e0);
          V::store(row + c + V::W, e1);
          sum0 = V::add(sum0, e0);
          sum1 = V::add(sum1, e1);
        }
        for (; c < bv; c += V::W) {
          const typename V::T e = V::exp(V::sub(V::load(row + c), mv));
          V::store(row + c, e);
          if (c + V::W <= full) sum0 = V::add(sum0, e);
        }
        float total = V::hsum(V::add(sum0, sum1));
        for (c = full; c < bc; ++c) total += row[c];
        const float corr = std::isinf(mrow[r]) ? 0.0f : std::exp(mrow[r] - m_new);
        lrow[r] = lrow[r] * corr + total;
        mrow[r] = m_new;
        if (corr != 1.0f) {
          const typename V::T cv = V::set1(corr);
          for (int64_t e = 0; e < d; e += V::W) V::store(acc.data() + r * d + e, V::mul(V::load(acc.data() + r * d + e), cv));
        }
      }
      Gemm<V>(acc.data(), d, s.data(), fc, 1, vp.data() + j * fc * d, d, br, d, bc, true);
    }
    for (int64_t r = 0; r < br; ++r) {
      const typename V::T inv = V::set1(1.0f / lrow[r]);
      for (int64_t e = 0; e < d; e += V::W) V::store(out + (i0 + r) * hd.rs + e, V::mul(V::load(acc.data() + r * d + e), inv));
      lse_row[i0 + r] = mrow[r] + std::log(lrow[r]);
    }
  }
}

template <class V>
void BackwardHead(const tsjax::AttentionParams& p, int64_t b, int64_t h, const float* q, const float* k,
                  const float* v, const float* o, const float* lse, const float* dout, float* dq, float* dk,
                  float* dv) {
  const Head hd = MakeHead(p, b, h, q, k, v);
  const int64_t d = hd.d, off_n = b * p.n * hd.rs + h * d, off_m = b * p.m * hd.rs + h * d;
  const float* orow = o + off_n;
  const float* dorow = dout + off_n;
  const float* lse_row = lse + (b * p.heads + h) * p.n;
  std::vector<float> kt(hd.nkb * d * kBc), vt(hd.nkb * d * kBc), kp(hd.m * d), delta(hd.n), dqa(hd.n * d, 0.0f),
      pbuf(kBr * kBc), ds(kBr * kBc), dkj(kBc * d), dvj(kBc * d);
  PackTransposed(hd.k, hd.m, d, hd.rs, kBc, 1.0f, kt.data());
  PackTransposed(hd.v, hd.m, d, hd.rs, kBc, 1.0f, vt.data());
  PackRows(hd.k, hd.m, d, hd.rs, kp.data());
  for (int64_t i = 0; i < hd.n; ++i) {
    typename V::T s = V::zero();
    for (int64_t e = 0; e < d; e += V::W)
      s = V::fmadd(V::load(dorow + i * hd.rs + e), V::load(orow + i * hd.rs + e), s);
    delta[i] = V::hsum(s);
  }
  const typename V::T scale = V::set1(p.scale);
  for (int64_t j = 0; j < hd.nkb; ++j) {
    const int64_t bc = std::min(kBc, hd.m - j * kBc);
    std::fill(dkj.begin(), dkj.end(), 0.0f);
    std::fill(dvj.begin(), dvj.end(), 0.0f);
    for (int64_t i0 = 0; i0 < hd.n; i0 += kBr) {
      const int64_t br = std::min(kBr, hd.n - i0);
      Gemm<V>(pbuf.data(), kBc, hd.q + i0 * hd.rs, hd.rs, 1, kt.data() + j * d * kBc, kBc, br, kBc, d, false);
      for (int64_t r = 0; r < br; ++r) {  // p = exp(scale * s - lse), zero past the valid keys
        float* row = pbuf.data() + r * kBc;
        const typename V::T l = V::set1(lse_row[i0 + r]);
        for (int64_t c = 0; c < kBc; c += V::W) V::store(row + c, V::exp(V::sub(V::mul(V::load(row + c), scale), l)));
        for (int64_t c = bc; c < kBc; ++c) row[c] = 0.0f;
      }
      // dv_j += p^T do_i
      Gemm<V>(dvj.data(), d, pbuf.data(), 1, kBc, dorow + i0 * hd.rs, hd.rs, bc, d, br, true);
      // dp = do_i v_j^T, then ds = scale * p * (dp - delta)
      Gemm<V>(ds.data(), kBc, dorow + i0 * hd.rs, hd.rs, 1, vt.data() + j * d * kBc, kBc, br, kBc, d, false);
      for (int64_t r = 0; r < br; ++r) {
        float* row = ds.data() + r * kBc;
        const float* prow = pbuf.data() + r * kBc;
        const typename V::T dl = V::set1(delta[i0 + r]);
        for (int64_t c = 0; c < kBc; c += V::W)
          V::store(row + c, V::mul(V::mul(V::load(prow + c), V::sub(V::load(row + c), dl)), scale));
      }
      // dq_i += ds k_j; dk_j += ds^T q_i
      Gemm<V>(dqa.data() + i0 * d, d, ds.data(), kBc, 1, kp.data() + j * kBc * d, d, br, d, bc, true);
      Gemm<V>(dkj.data(), d, ds.data(), 1, kBc, hd.q + i0 * hd.rs, hd.rs, bc, d, br, true);
    }
    for (int64_t c = 0; c < bc; ++c) {
      std::memcpy(dk + off_m + (j * kBc + c) * hd.rs, dkj.data() + c * d, sizeof(float) * d);
      std::memcpy(dv + off_m + (j * kBc + c) * hd.rs, dvj.data() + c * d, sizeof(float) * d);
    }
  }
  for (int64_t i = 0; i < hd.n; ++i) std::memcpy(dq + off_n + i * hd.rs, dqa.data() + i * d, sizeof(float) * d);
}

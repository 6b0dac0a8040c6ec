// The passes of the CPU GroupNorm (kernels/group_norm.h) over a SIMD vector type V (kernels/simd_*.h).
// Included inside a per-ISA namespace after the target pragma; the includer has included <cstdint> and
// <cstring>.

template <class V>
typename V::T Sigmoid(typename V::T z) {
  return V::div(V::set1(1.0f), V::add(V::set1(1.0f), V::exp(V::sub(V::zero(), z))));
}

// Channels are processed kCb vectors at a time (their accumulators stay in registers) over all pixels.
constexpr int kCb = 8;

template <class V>
void Sum(const group_norm_detail::Pass& t) {
  const auto& p = *t.p;
  for (int64_t c0 = 0; c0 < p.c; c0 += kCb * V::W) {
    const int nv = static_cast<int>(std::min<int64_t>(kCb, (p.c - c0) / V::W));
    typename V::T acc[kCb], sh[kCb];
    for (int j = 0; j < nv; ++j) {
      acc[j] = V::zero();
      sh[j] = t.coef[0] ? V::load(t.coef[0] + c0 + j * V::W) : V::zero();
    }
    for (int64_t i = t.n0; i < t.n1; ++i) {
      const int64_t row = (t.b * p.n + i) * p.c + c0;
      for (int j = 0; j < nv; ++j) {
        const typename V::T v = V::load(t.x, row + j * V::W, p.bf16);
        if (t.coef[0]) {
          const typename V::T d = V::sub(v, sh[j]);
          acc[j] = V::fmadd(d, d, acc[j]);
        } else {
          acc[j] = V::add(acc[j], v);
        }
      }
    }
    for (int j = 0; j < nv; ++j) V::store(t.sum1 + c0 + j * V::W, acc[j]);
  }
}

template <class V>
void Normalize(const group_norm_detail::Pass& t) {
  const auto& p = *t.p;
  for (int64_t i = t.n0; i < t.n1; ++i) {
    const int64_t row = (t.b * p.n + i) * p.c;
    for (int64_t c = 0; c < p.c; c += V::W) {
      typename V::T z = V::fmadd(V::load(t.x, row + c, p.bf16), V::load(t.coef[0] + c), V::load(t.coef[1] + c));
      if (p.silu) z = V::mul(z, Sigmoid<V>(z));
      V::store(t.out, row + c, p.bf16, z);
    }
  }
}

// dz and xhat at (row + c).
template <class V>
void DzXhat(const group_norm_detail::Pass& t, int64_t row, int64_t c, typename V::T* dz, typename V::T* xhat) {
  const auto& p = *t.p;
  const typename V::T x = V::load(t.x, row + c, p.bf16);
  typename V::T d = V::load(t.dy, row + c, p.bf16);
  if (p.silu) {
    const typename V::T z = V::fmadd(x, V::load(t.coef[0] + c), V::load(t.coef[1] + c));
    const typename V::T s = Sigmoid<V>(z);
    d = V::mul(d, V::mul(s, V::fmadd(z, V::sub(V::set1(1.0f), s), V::set1(1.0f))));
  }
  *dz = d;
  *xhat = V::fmadd(x, V::load(t.coef[2] + c), V::load(t.coef[3] + c));
}

template <class V>
void GradSums(const group_norm_detail::Pass& t) {
  const auto& p = *t.p;
  for (int64_t c0 = 0; c0 < p.c; c0 += kCb * V::W) {
    const int nv = static_cast<int>(std::min<int64_t>(kCb, (p.c - c0) / V::W));
    typename V::T s1[kCb], s2[kCb];
    for (int j = 0; j < nv; ++j) s1[j] = s2[j] = V::zero();
    for (int64_t i = t.n0; i < t.n1; ++i) {
      const int64_t row = (t.b * p.n + i) * p.c;
      for (int j = 0; j < nv; ++j) {
        typename V::T dz, xh;
        DzXhat<V>(t, row, c0 + j * V::W, &dz, &xh);
        s1[j] = V::add(s1[j], dz);
        s2[j] = V::fmadd(dz, xh, s2[j]);
      }
    }
    for (int j = 0; j < nv; ++j) {
      V::store(t.sum1 + c0 + j * V::W, s1[j]);
      V::store(t.sum2 + c0 + j * V::W, s2[j]);
    }
  }
}

template <class V>
void GradInput(const group_norm_detail::Pass& t) {
  const auto& p = *t.p;
  for (int64_t i = t.n0; i < t.n1; ++i) {
    const int64_t row = (t.b * p.n + i) * p.c;
    for (int64_t c = 0; c < p.c; c += V::W) {
      typename V::T dz, xh;
      DzXhat<V>(t, row, c, &dz, &xh);
      const typename V::T g = V::fmadd(dz, V::load(t.coef[4] + c), V::load(t.coef[5] + c));
      V::store(t.out, row + c, p.bf16, V::fmadd(xh, V::load(t.coef[6] + c), g));
    }
  }
}

// The row passes of the CPU LayerNorm (kernels/layer_norm.h) over a SIMD vector type V (kernels/simd_*.h).
// Included inside a per-ISA namespace after the target pragma; the includer has included <cmath>,
// <cstdint> and <cstring>. Both passes are templated on the data type (kBf16: bfloat16, else float32).

// Per row: the sum of x, then of (x - mean)^2 (four accumulators each; the row is in L1 after the first
// pass), then y = (x - mean) * (rstd * scale) + bias.
template <class V, bool kBf16>
void Forward(const layer_norm_detail::Rows& t) {
  using T = typename V::T;
  constexpr int W = V::W;
  const auto& p = *t.p;
  const int64_t c = p.c, c4 = c - c % (4 * W);
  const float count = static_cast<float>(c), eps = p.eps;
  const void* x = t.x;
  void* y = t.out;
  const float* scale = t.scale;
  const float* bias = t.bias;
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const int64_t row = r * c;
    T a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    int64_t i = 0;
    for (; i < c4; i += 4 * W) {
      a0 = V::add(a0, V::load(x, row + i, kBf16));
      a1 = V::add(a1, V::load(x, row + i + W, kBf16));
      a2 = V::add(a2, V::load(x, row + i + 2 * W, kBf16));
      a3 = V::add(a3, V::load(x, row + i + 3 * W, kBf16));
    }
    for (; i < c; i += W) a0 = V::add(a0, V::load(x, row + i, kBf16));
    const float m = V::hsum(V::add(V::add(a0, a1), V::add(a2, a3))) / count;
    const T mv = V::set1(m);
    a0 = a1 = a2 = a3 = V::zero();
    for (i = 0; i < c4; i += 4 * W) {
      const T d0 = V::sub(V::load(x, row + i, kBf16), mv), d1 = V::sub(V::load(x, row + i + W, kBf16), mv);
      const T d2 = V::sub(V::load(x, row + i + 2 * W, kBf16), mv);
      const T d3 = V::sub(V::load(x, row + i + 3 * W, kBf16), mv);
      a0 = V::fmadd(d0, d0, a0);
      a1 = V::fmadd(d1, d1, a1);
      a2 = V::fmadd(d2, d2, a2);
      a3 = V::fmadd(d3, d3, a3);
    }
    for (; i < c; i += W) {
      const T d = V::sub(V::load(x, row + i, kBf16), mv);
      a0 = V::fmadd(d, d, a0);
    }
    const float var = V::hsum(V::add(V::add(a0, a1), V::add(a2, a3))) / count;
    const float rs = 1.0f / std::sqrt(var + eps);
    t.mean[r] = m;
    t.rstd[r] = rs;
    const T rv = V::set1(rs);
    for (i = 0; i < c; i += W) {
      const T d = V::sub(V::load(x, row + i, kBf16), mv);
      V::store(y, row + i, kBf16, V::fmadd(d, V::mul(rv, V::load(scale + i)), V::load(bias + i)));
    }
  }
}

// Per row: mean_c(g), mean_c(g * xhat) (g = dy * scale, xhat = (x - mean) * rstd; two accumulators each)
// and the chunk's per-channel sums of dy and dy * xhat (row by row, in order) in one pass, then
// dx = g * rstd - rstd * mean_c(g) - xhat * (rstd * mean_c(g * xhat)) (x and dy from L1).
template <class V, bool kBf16>
void Backward(const layer_norm_detail::Rows& t) {
  using T = typename V::T;
  constexpr int W = V::W;
  const int64_t c = t.p->c, c2 = c - c % (2 * W);
  const float count = static_cast<float>(c);
  const void* x = t.x;
  const void* dy = t.dy;
  void* dx = t.out;
  const float* scale = t.scale;
  float* sum1 = t.sum1;
  float* sum2 = t.sum2;
  std::memset(sum1, 0, c * sizeof(float));
  std::memset(sum2, 0, c * sizeof(float));
  // One vector of the first pass: the row sums s1 += g, s2 += g * xhat; sum1 += dy, sum2 += dy * xhat.
  auto sums = [&](int64_t row, int64_t i, T mv, T rv, T* s1, T* s2) {
    const T d = V::load(dy, row + i, kBf16);
    const T xh = V::mul(V::sub(V::load(x, row + i, kBf16), mv), rv);
    const T g = V::mul(d, V::load(scale + i));
    *s1 = V::add(*s1, g);
    *s2 = V::fmadd(g, xh, *s2);
    V::store(sum1 + i, V::add(V::load(sum1 + i), d));
    V::store(sum2 + i, V::fmadd(d, xh, V::load(sum2 + i)));
  };
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const int64_t row = r * c;
    const float rs = t.rstd_in[r];
    const T mv = V::set1(t.mean_in[r]), rv = V::set1(rs);
    T s1a = V::zero(), s1b = V::zero(), s2a = V::zero(), s2b = V::zero();
    int64_t i = 0;
    for (; i < c2; i += 2 * W) {
      sums(row, i, mv, rv, &s1a, &s2a);
      sums(row, i + W, mv, rv, &s1b, &s2b);
    }
    if (i < c) sums(row, i, mv, rv, &s1a, &s2a);
    const float m1 = V::hsum(V::add(s1a, s1b)) / count, m2 = V::hsum(V::add(s2a, s2b)) / count;
    const T k1 = V::set1(-rs * m1), k2 = V::set1(-rs * m2);
    for (i = 0; i < c; i += W) {
      const T xh = V::mul(V::sub(V::load(x, row + i, kBf16), mv), rv);
      const T g = V::mul(V::load(dy, row + i, kBf16), V::load(scale + i));
      V::store(dx, row + i, kBf16, V::fmadd(xh, k2, V::fmadd(g, rv, k1)));
    }
  }
}

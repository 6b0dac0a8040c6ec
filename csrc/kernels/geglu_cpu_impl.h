// The CPU GEGLU rows (kernels/geglu.h) over a SIMD vector type V (kernels/simd_*.h). Included inside a
// per-ISA namespace after the target pragma; the includer has included <cstdint>.

// erf(x): x P(x^2) / Q(x^2) on x clamped to +-3.8325 (where float32 erf rounds to +-1); XLA's float32
// approximation, |error| < 4e-7.
template <class V>
typename V::T Erf(typename V::T x) {
  x = V::min(V::max(x, V::set1(-3.832506856900711f)), V::set1(3.832506856900711f));
  const typename V::T x2 = V::mul(x, x);
  typename V::T p = V::set1(0.00022905065861350646f);
  p = V::fmadd(p, x2, V::set1(0.0034082910107109506f));
  p = V::fmadd(p, x2, V::set1(0.050955695062380861f));
  p = V::fmadd(p, x2, V::set1(0.18520832239976145f));
  p = V::fmadd(p, x2, V::set1(1.128379143519084f));
  typename V::T q = V::set1(-1.1791602954361697e-7f);
  q = V::fmadd(q, x2, V::set1(0.000023547966471313185f));
  q = V::fmadd(q, x2, V::set1(0.0010179625278914885f));
  q = V::fmadd(q, x2, V::set1(0.014070470171167667f));
  q = V::fmadd(q, x2, V::set1(0.11098505178285362f));
  q = V::fmadd(q, x2, V::set1(0.49746925110067538f));
  q = V::fmadd(q, x2, V::set1(1.0f));
  return V::div(V::mul(x, p), q);
}

// Phi(g) = (1 + erf(g / sqrt(2))) / 2, the standard normal CDF.
template <class V>
typename V::T Phi(typename V::T g) {
  return V::mul(V::set1(0.5f), V::add(V::set1(1.0f), Erf<V>(V::mul(g, V::set1(0.70710678118654752f)))));
}

template <class V, class E>
void ForwardRows(int64_t f, const E* x, const float* bias, E* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const E* h = x + r * 2 * f;
    const E* g = h + f;
    E* out = y + r * f;
    for (int64_t c = 0; c < f; c += V::W) {
      const typename V::T gv = V::add(V::load(g + c), V::load(bias + f + c));
      const typename V::T hv = V::add(V::load(h + c), V::load(bias + c));
      V::store(out + c, V::mul(hv, V::mul(gv, Phi<V>(gv))));
    }
  }
}

// Also adds this block's dx rows to dbias [2 f] (float32 partial sums, in row order).
template <class V, class E>
void BackwardRows(int64_t f, const E* x, const float* bias, const E* dy, E* dx, float* dbias, int64_t r0,
                  int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const E* h = x + r * 2 * f;
    const E* g = h + f;
    const E* d = dy + r * f;
    E* dh = dx + r * 2 * f;
    E* dg = dh + f;
    for (int64_t c = 0; c < f; c += V::W) {
      const typename V::T gv = V::add(V::load(g + c), V::load(bias + f + c)), dv = V::load(d + c);
      const typename V::T hv = V::add(V::load(h + c), V::load(bias + c));
      const typename V::T cdf = Phi<V>(gv);
      // exp(-g^2 / 2) / sqrt(2 pi)
      const typename V::T pdf =
          V::mul(V::exp(V::mul(V::mul(gv, gv), V::set1(-0.5f))), V::set1(0.39894228040143268f));
      const typename V::T dhv = V::mul(dv, V::mul(gv, cdf));
      const typename V::T dgv = V::mul(V::mul(dv, hv), V::fmadd(gv, pdf, cdf));
      V::store(dh + c, dhv);
      V::store(dg + c, dgv);
      V::store(dbias + c, V::add(V::load(dbias + c), dhv));
      V::store(dbias + f + c, V::add(V::load(dbias + f + c), dgv));
    }
  }
}

template <class V>
void Forward(const GegluParams& p, const void* x, const float* bias, void* y, int64_t r0, int64_t r1) {
  if (p.bf16)
    ForwardRows<V>(p.f, static_cast<const uint16_t*>(x), bias, static_cast<uint16_t*>(y), r0, r1);
  else
    ForwardRows<V>(p.f, static_cast<const float*>(x), bias, static_cast<float*>(y), r0, r1);
}

template <class V>
void Backward(const GegluParams& p, const void* x, const float* bias, const void* dy, void* dx, float* dbias,
              int64_t r0, int64_t r1) {
  if (p.bf16)
    BackwardRows<V>(p.f, static_cast<const uint16_t*>(x), bias, static_cast<const uint16_t*>(dy),
                    static_cast<uint16_t*>(dx), dbias, r0, r1);
  else
    BackwardRows<V>(p.f, static_cast<const float*>(x), bias, static_cast<const float*>(dy), static_cast<float*>(dx),
                    dbias, r0, r1);
}

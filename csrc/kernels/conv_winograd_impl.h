// Winograd F(m x m, 3 x 3) transforms of the native convolution (kernels/conv.h, ConvForwardWinogradCpu),
// written once over the SIMD vector type V (simd_avx512.h / simd_avx2.h): conv_cpu_avx512.cc and
// conv_cpu_avx2.cc include it inside a namespace, after that header. Every transform is vectorised over
// channels (NHWC rows, packed 64-channel panels) and does the same operations in the same order in every
// lane, so AVX2 and AVX-512 builds give identical results.
//
// Matrices (Lavin & Gray 2016), alpha = m + 2 points:
//   F(2, 3): points 0, 1, -1, inf.     F(4, 3): points 0, 1, -1, 2, -2, inf.
// input  V = B^T d B  (alpha x alpha tile of x),  kernel U = G g G^T,  output Y = A^T (U . V) A.

template <class V, int M>
struct Wino;

template <class V>
struct Wino<V, 2> {
  static constexpr int A = 4;
  using T = typename V::T;
  static void In(const T (&d)[A], T (&o)[A]) {
    o[0] = V::sub(d[0], d[2]);
    o[1] = V::add(d[1], d[2]);
    o[2] = V::sub(d[2], d[1]);
    o[3] = V::sub(d[1], d[3]);
  }
  static void Ker(const T (&g)[3], T (&o)[A]) {
    const T h = V::set1(0.5f), s = V::add(g[0], g[2]);
    o[0] = g[0];
    o[1] = V::mul(V::add(s, g[1]), h);
    o[2] = V::mul(V::sub(s, g[1]), h);
    o[3] = g[2];
  }
  static void Out(const T (&m)[A], T (&o)[2]) {
    o[0] = V::add(V::add(m[0], m[1]), m[2]);
    o[1] = V::sub(V::sub(m[1], m[2]), m[3]);
  }
};

template <class V>
struct Wino<V, 4> {
  static constexpr int A = 6;
  using T = typename V::T;
  static void In(const T (&d)[A], T (&o)[A]) {
    o[0] = V::fmadd(V::set1(4.0f), d[0], V::fmadd(V::set1(-5.0f), d[2], d[4]));
    const T t1 = V::fmadd(V::set1(-4.0f), d[2], d[4]), t2 = V::fmadd(V::set1(-4.0f), d[1], d[3]);
    o[1] = V::add(t1, t2);
    o[2] = V::sub(t1, t2);
    const T t3 = V::sub(d[4], d[2]), t4 = V::mul(V::set1(2.0f), V::sub(d[3], d[1]));
    o[3] = V::add(t3, t4);
    o[4] = V::sub(t3, t4);
    o[5] = V::fmadd(V::set1(4.0f), d[1], V::fmadd(V::set1(-5.0f), d[3], d[5]));
  }
  static void Ker(const T (&g)[3], T (&o)[A]) {
    const T s = V::add(g[0], g[2]), sixth = V::set1(-1.0f / 6.0f);
    o[0] = V::mul(g[0], V::set1(0.25f));
    o[1] = V::mul(V::add(s, g[1]), sixth);
    o[2] = V::mul(V::sub(s, g[1]), sixth);
    const T q = V::fmadd(g[0], V::set1(1.0f / 24.0f), V::mul(g[2], V::set1(1.0f / 6.0f)));
    o[3] = V::fmadd(g[1], V::set1(1.0f / 12.0f), q);
    o[4] = V::fmadd(g[1], V::set1(-1.0f / 12.0f), q);
    o[5] = g[2];
  }
  static void Out(const T (&m)[A], T (&o)[4]) {
    const T a = V::add(m[1], m[2]), b = V::sub(m[1], m[2]), c = V::add(m[3], m[4]), d = V::sub(m[3], m[4]);
    o[0] = V::add(V::add(m[0], a), c);
    o[1] = V::fmadd(V::set1(2.0f), d, b);
    o[2] = V::fmadd(V::set1(4.0f), c, a);
    o[3] = V::add(V::fmadd(V::set1(8.0f), d, b), m[5]);
  }
};

// v[k * plane + c] = (B^T d B)[k] for the alpha x alpha tile whose rows are t.src (k = xi * alpha + nu).
template <class V, int M>
void WinoInputT(const WinoInput& t) {
  using W = Wino<V, M>;
  constexpr int A = W::A;
  using T = typename V::T;
  for (int64_t c = 0; c < t.ci; c += V::W) {
    T tmp[A][A];
    for (int j = 0; j < A; ++j) {
      T col[A], o[A];
      for (int i = 0; i < A; ++i) col[i] = V::load(t.src[i * A + j] + c);
      W::In(col, o);
      for (int i = 0; i < A; ++i) tmp[i][j] = o[i];
    }
    for (int i = 0; i < A; ++i) {
      T o[A];
      W::In(tmp[i], o);
      for (int j = 0; j < A; ++j) V::store(t.v + (i * A + j) * t.plane + c, o[j]);
    }
  }
}

// u[k * plane + c * 64 + n] = (G g G^T)[k] for channels c in [c0, c1) of one packed panel g[tap][c][64].
template <class V, int M>
void WinoKernelT(const WinoKernel& t) {
  using W = Wino<V, M>;
  constexpr int A = W::A;
  using T = typename V::T;
  for (int64_t c = t.c0; c < t.c1; ++c)
    for (int n = 0; n < conv_detail::kPanel; n += V::W) {
      T tmp[A][3];
      for (int j = 0; j < 3; ++j) {
        const T col[3] = {V::load(t.g + ((0 * 3 + j) * t.ci + c) * conv_detail::kPanel + n),
                          V::load(t.g + ((1 * 3 + j) * t.ci + c) * conv_detail::kPanel + n),
                          V::load(t.g + ((2 * 3 + j) * t.ci + c) * conv_detail::kPanel + n)};
        T o[A];
        W::Ker(col, o);
        for (int i = 0; i < A; ++i) tmp[i][j] = o[i];
      }
      for (int i = 0; i < A; ++i) {
        T o[A];
        W::Ker(tmp[i], o);
        for (int j = 0; j < A; ++j) V::store(t.u + (i * A + j) * t.plane + c * conv_detail::kPanel + n, o[j]);
      }
    }
}

// The m x m outputs of one tile: dst[r * m + s][n] = (A^T mm A)[r][s] for the panel's nvec16 * 16 channels
// (dst rows that are null lie outside the output and are skipped).
template <class V, int M>
void WinoOutputT(const WinoOutput& t) {
  using W = Wino<V, M>;
  constexpr int A = W::A;
  using T = typename V::T;
  for (int n = 0; n < t.nvec16 * 16; n += V::W) {
    T tmp[M][A];
    for (int j = 0; j < A; ++j) {
      T col[A], o[M];
      for (int i = 0; i < A; ++i) col[i] = V::load(t.mm + (i * A + j) * t.plane + n);
      W::Out(col, o);
      for (int r = 0; r < M; ++r) tmp[r][j] = o[r];
    }
    for (int r = 0; r < M; ++r) {
      T o[M];
      W::Out(tmp[r], o);
      for (int s = 0; s < M; ++s)
        if (t.dst[r * M + s] != nullptr) V::store(t.dst[r * M + s] + n, o[s]);
    }
  }
}

template <class V>
void WinoInputDispatch(const WinoInput& t) {
  if (t.m == 2) return WinoInputT<V, 2>(t);
  WinoInputT<V, 4>(t);
}
template <class V>
void WinoKernelDispatch(const WinoKernel& t) {
  if (t.m == 2) return WinoKernelT<V, 2>(t);
  WinoKernelT<V, 4>(t);
}
template <class V>
void WinoOutputDispatch(const WinoOutput& t) {
  if (t.m == 2) return WinoOutputT<V, 2>(t);
  WinoOutputT<V, 4>(t);
}

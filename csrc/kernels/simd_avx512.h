// The AVX512 SIMD vector type of tsjax's CPU kernels (attention, group norm): include inside a
// namespace, after a target pragma that enables AVX-512F (see attention_cpu_avx512.cc).
//
// V: T (register type), W (floats per register), kAcc (accumulator registers a micro-tile may use),
// load / store (unaligned), set1, zero, add, sub, mul, div, fmadd, min, max, hmax, hsum, exp, and load / store of
// W bfloat16 values (loadbf / storebf: widened to / rounded from float32, round to nearest even;
// also as load / store overloads on uint16_t pointers and on an untyped base + bfloat16 flag).
struct V {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr int kAcc = 24;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T zero() { return _mm512_setzero_ps(); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T loadbf(const uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static void storebf(uint16_t* p, T x) {  // round to nearest even; NaN -> quiet NaN
    const __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  // The same through the element type: float32 or bfloat16 (uint16_t) pointers, or an untyped base with
  // an element offset i and a run-time (or constant-folded) bfloat16 flag.
  static T load(const uint16_t* p) { return loadbf(p); }
  static void store(uint16_t* p, T x) { storebf(p, x); }
  static T load(const void* base, int64_t i, bool bf16) {
    return bf16 ? loadbf(static_cast<const uint16_t*>(base) + i) : load(static_cast<const float*>(base) + i);
  }
  static void store(void* base, int64_t i, bool bf16, T x) {
    if (bf16)
      storebf(static_cast<uint16_t*>(base) + i, x);
    else
      store(static_cast<float*>(base) + i, x);
  }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static float hmax(T x) { return _mm512_reduce_max_ps(x); }
  static float hsum(T x) { return _mm512_reduce_add_ps(x); }
  // exp(x) to ~2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial), exp(x < -87.3) ~ 0.
  static T exp(T x) {
    x = _mm512_min_ps(_mm512_max_ps(x, set1(-87.33654f)), set1(88.72283f));
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    T y = set1(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, set1(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, set1(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, set1(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, set1(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, set1(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, set1(1.0f)));
    return _mm512_scalef_ps(y, n);
  }
};

// The AVX2 SIMD vector type of tsjax's CPU kernels (attention, group norm): include inside a
// namespace, after a target pragma that enables AVX2 and FMA (see attention_cpu_avx2.cc).
//
// V: T (register type), W (floats per register), kAcc (accumulator registers a micro-tile may use),
// load / store (unaligned), set1, zero, add, sub, mul, div, fmadd, min, max, hmax, hsum, exp, and load / store of
// W bfloat16 values (loadbf / storebf: widened to / rounded from float32, round to nearest even;
// also as load / store overloads on uint16_t pointers and on an untyped base + bfloat16 flag).
struct V {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr int kAcc = 12;
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T zero() { return _mm256_setzero_ps(); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T loadbf(const uint16_t* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static void storebf(uint16_t* p, T x) {  // round to nearest even; NaN -> quiet NaN
    const __m256i b = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
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
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static float hmax(T x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hsum(T x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  // exp(x) as the AVX-512 version; 2^n through the exponent bits (n in [-126, 127] after the clamp).
  static T exp(T x) {
    x = _mm256_min_ps(_mm256_max_ps(x, set1(-87.33654f)), set1(88.37626f));
    const T n = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    T y = set1(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, set1(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, set1(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, set1(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, set1(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, set1(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, set1(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
};

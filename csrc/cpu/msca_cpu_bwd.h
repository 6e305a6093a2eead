// Fused MSCA backward on CPU: the kernel body, compiled once per vector ISA.
//
// This is NOT an ordinary header: msca_cpu_bwd.cpp includes it several times, each time inside its own namespace,
// under its own `#pragma GCC target(...)` region, with these macros set:
//   SEGNEXT_BWD_ISA   2 = AVX-512 (16 float lanes), 1 = AVX2+FMA (8 lanes), 0 = portable scalar (1 lane)
//   SEGNEXT_BWD_REAL  float (all vector paths, fp16/bf16/fp32 inputs) or double (scalar path, fp64 inputs)
// and with <immintrin.h>, <ATen/Parallel.h>, c10 Half/BFloat16 and BwdArgs (msca_cpu_bwd.cpp) already visible.
// Everything here has internal linkage, so the copies do not collide.
//
// Algorithm (per image b, per band of R full-width rows [r0, r1), bands fixed by the shape only):
//   P1 (parallel over fixed pixel chunks of the band's halo rows [r0-12, r1+12) clipped to the image):
//      d_att = g*u for all channels into a band buffer; d_s = w3^T d_att (own GEMM micro-kernel) into a band buffer.
//   P2 (parallel over channels; per-thread scratch of ~11 padded row planes of the band, in L2):
//      recompute a (rows +-10), h_k (rows +-10), s (own rows, into a band buffer); d_h_k (rows +-2, vertical
//      correlation of d_s), d_a (rows +-2), du_conv = dw5x5^T(d_a) (own rows, into a band buffer); the depthwise
//      weight/bias gradients of the channel summed over the band's own rows (registers, then a fixed-order lane sum).
//   P3 (parallel over fixed blocks of 6 output channels, pixel chunks outer): att = w3 s + b3 (micro-kernel),
//      du = g*att + du_conv (written in du's dtype and strides), dw3 += d_att s^T and db3 += sum d_att (lanes over
//      pixels, per-chunk fixed-order lane sums).
// Every reduction has one owner task and a fixed order (bands in order, chunks in order), so all results are
// bitwise identical for any thread count. Intermediates outside the image are stored zeros (never masked by a
// multiply), so NaN/Inf propagate as in the eager composition.

using real = SEGNEXT_BWD_REAL;

// ---------------------------------------------------------------------------------------------------------------
// Vector primitives
// ---------------------------------------------------------------------------------------------------------------
#if SEGNEXT_BWD_ISA == 2
using V = __m512;
constexpr int VL = 16;
static inline V vld(const float* p) { return _mm512_loadu_ps(p); }
static inline void vst(float* p, V v) { _mm512_storeu_ps(p, v); }
static inline V vset(float x) { return _mm512_set1_ps(x); }
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
static inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline __mmask16 vmask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
static inline V vldn(const float* p, int n) { return _mm512_maskz_loadu_ps(vmask(n), p); }
static inline void vstn(float* p, V v, int n) { _mm512_mask_storeu_ps(p, vmask(n), v); }
static inline float vhsum(V v) { return _mm512_reduce_add_ps(v); }
#elif SEGNEXT_BWD_ISA == 1
using V = __m256;
constexpr int VL = 8;
static inline V vld(const float* p) { return _mm256_loadu_ps(p); }
static inline void vst(float* p, V v) { _mm256_storeu_ps(p, v); }
static inline V vset(float x) { return _mm256_set1_ps(x); }
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
static inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline __m256i vmask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline V vldn(const float* p, int n) { return _mm256_maskload_ps(p, vmask(n)); }
static inline void vstn(float* p, V v, int n) { _mm256_maskstore_ps(p, vmask(n), v); }
static inline float vhsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
using V = real;
constexpr int VL = 1;
static inline V vld(const real* p) { return *p; }
static inline void vst(real* p, V v) { *p = v; }
static inline V vset(real x) { return x; }
static inline V vzero() { return real(0); }
static inline V vfma(V a, V b, V c) { return a * b + c; }
static inline V vadd(V a, V b) { return a + b; }
static inline V vmul(V a, V b) { return a * b; }
static inline V vldn(const real* p, int n) { return n > 0 ? *p : real(0); }
static inline void vstn(real* p, V v, int n) {
  if (n > 0) *p = v;
}
static inline real vhsum(V v) { return v; }
#endif

// Loads/stores of the last, possibly partial vector of a span of n elements starting at x.
static inline V vld_tail(const real* p, int64_t rem) { return rem >= VL ? vld(p) : vldn(p, static_cast<int>(rem)); }
static inline void vst_tail(real* p, V v, int64_t rem) {
  if (rem >= VL) vst(p, v);
  else vstn(p, v, static_cast<int>(rem));
}

// ---------------------------------------------------------------------------------------------------------------
// dtype conversion of the input/output rows (g, u in; du out); sx = element stride along the row.
// ---------------------------------------------------------------------------------------------------------------
static inline real cvt_in(float x) { return static_cast<real>(x); }
static inline real cvt_in(double x) { return static_cast<real>(x); }
static inline real cvt_in(c10::BFloat16 x) { return static_cast<real>(static_cast<float>(x)); }
static inline real cvt_in(c10::Half x) { return static_cast<real>(static_cast<float>(x)); }
template <typename T>
static inline T cvt_out(real x) { return static_cast<T>(x); }

#if SEGNEXT_BWD_ISA == 2
static inline V vcvt_load(const float* p) { return _mm512_loadu_ps(p); }
static inline V vcvt_load(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline V vcvt_load(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#define SEGNEXT_BWD_HAS_VCVT 1
#elif SEGNEXT_BWD_ISA == 1
static inline V vcvt_load(const float* p) { return _mm256_loadu_ps(p); }
static inline V vcvt_load(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline V vcvt_load(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#define SEGNEXT_BWD_HAS_VCVT 1
#else
#define SEGNEXT_BWD_HAS_VCVT 0
#endif

// dst[0, n) = src[0, n sx)
template <typename T>
static inline void load_row(const T* src, int64_t sx, int64_t n, real* dst) {
  if (sx == 1) {
    int64_t i = 0;
#if SEGNEXT_BWD_HAS_VCVT
    if constexpr (!std::is_same<T, double>::value) {
      for (; i + VL <= n; i += VL) vst(dst + i, vcvt_load(src + i));
    }
#endif
    for (; i < n; ++i) dst[i] = cvt_in(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = cvt_in(src[i * sx]);
  }
}

// dst[0, n) = g * u
template <typename T>
static inline void load_mul_row(const T* g, int64_t gsx, const T* u, int64_t usx, int64_t n, real* dst) {
  if (gsx == 1 && usx == 1) {
    int64_t i = 0;
#if SEGNEXT_BWD_HAS_VCVT
    if constexpr (!std::is_same<T, double>::value) {
      for (; i + VL <= n; i += VL) vst(dst + i, vmul(vcvt_load(g + i), vcvt_load(u + i)));
    }
#endif
    for (; i < n; ++i) dst[i] = cvt_in(g[i]) * cvt_in(u[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = cvt_in(g[i * gsx]) * cvt_in(u[i * usx]);
  }
}

// out[0, n sx) = g * att + dc   (one rounding to T)
template <typename T>
static inline void store_du_row(const T* g, int64_t gsx, const real* att, const real* dc, int64_t n, T* out,
                                int64_t osx) {
  if constexpr (std::is_same<T, real>::value) {
    if (gsx == 1 && osx == 1) {
      int64_t i = 0;
      for (; i + VL <= n; i += VL) vst(out + i, vfma(vld(g + i), vld(att + i), vld(dc + i)));
      for (; i < n; ++i) out[i] = g[i] * att[i] + dc[i];
      return;
    }
  }
#if SEGNEXT_BWD_HAS_VCVT
  if constexpr (!std::is_same<T, real>::value && !std::is_same<T, double>::value) {
    if (gsx == 1 && osx == 1) {
      alignas(64) float tmp[VL];
      int64_t i = 0;
      for (; i + VL <= n; i += VL) {
        vst(tmp, vfma(vcvt_load(g + i), vld(att + i), vld(dc + i)));
        for (int j = 0; j < VL; ++j) out[i + j] = cvt_out<T>(tmp[j]);
      }
      for (; i < n; ++i) out[i] = cvt_out<T>(cvt_in(g[i]) * att[i] + dc[i]);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const real gi = cvt_in(g[i * gsx]);
    out[i * osx] = cvt_out<T>(gi * att[i] + dc[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row-plane helpers. A padded plane row: PL zero columns, then Wv = round_up(W, VL) columns (image columns [0, W),
// zero tail [W, Wv)), then PR zero columns; row stride WS = PL + Wv + PR. Pointers address column 0.
// ---------------------------------------------------------------------------------------------------------------
constexpr int PL = 16;
constexpr int PR = 16;

struct Geo {
  int64_t H, W, Wv, WS;
};

static inline void zero_span(real* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = real(0);
}
static inline void fix_row(real* r, const Geo& g) {
  zero_span(r - PL, PL);
  zero_span(r + g.W, g.Wv + PR - g.W);
}
static inline void zero_row(real* r, const Geo& g) { zero_span(r - PL, g.WS); }

// Row i < nrows: out[x] = bias + (acc ? out[x] : 0) + sum_t w[t] in[x + t - K/2] for x in [0, n), n a multiple of
// VL (weights stay in registers across the rows).
template <int K>
static void hconv_rows(const real* in, int64_t ins, const real* w, real bias, bool acc, real* out, int64_t outs,
                       int64_t nrows, int64_t n) {
  V wv[K];
  for (int t = 0; t < K; ++t) wv[t] = vset(w[t]);
  const V bv = vset(bias);
  for (int64_t i = 0; i < nrows; ++i) {
    const real* ir = in + i * ins - K / 2;
    real* orow = out + i * outs;
    for (int64_t x = 0; x < n; x += VL) {
      V a = acc ? vadd(vld(orow + x), bv) : bv;
#pragma GCC unroll 32
      for (int t = 0; t < K; ++t) a = vfma(wv[t], vld(ir + x + t), a);
      vst(orow + x, a);
    }
  }
}

// 5x5, rows i < nrows: out_i[x] = bias + sum_{ky,kx} w[ky*5+kx] in_{i+ky}[x + kx - 2]; in points at the row of
// i = 0, ky = 0; input and output rows share the stride rs.
static void conv5x5_rows(const real* in, const real* w, real bias, real* out, int64_t rs, int64_t nrows, int64_t n) {
  V wv[25];
  for (int t = 0; t < 25; ++t) wv[t] = vset(w[t]);
  const V bv = vset(bias);
  for (int64_t i = 0; i < nrows; ++i) {
    const real* ib = in + i * rs - 2;
    real* orow = out + i * rs;
    for (int64_t x = 0; x < n; x += VL) {
      V a0 = bv, a1 = vzero();
#pragma GCC unroll 5
      for (int ky = 0; ky < 5; ++ky) {
        const real* r = ib + ky * rs + x;
        a0 = vfma(wv[ky * 5 + 0], vld(r + 0), a0);
        a1 = vfma(wv[ky * 5 + 1], vld(r + 1), a1);
        a0 = vfma(wv[ky * 5 + 2], vld(r + 2), a0);
        a1 = vfma(wv[ky * 5 + 3], vld(r + 3), a1);
        a0 = vfma(wv[ky * 5 + 4], vld(r + 4), a0);
      }
      vst(orow + x, vadd(a0, a1));
    }
  }
}

// Vertical: out row i = (acc ? out row i : 0) + sum_t w[t] in row (i + t), for i in [0, nrows).
template <int K>
static void vconv_rows(const real* in, int64_t ins, const real* w, real* out, int64_t outs, int64_t nrows, int64_t n,
                       bool acc) {
  V wv[K];
  for (int t = 0; t < K; ++t) wv[t] = vset(w[t]);
  int64_t i = 0;
  for (; i + 4 <= nrows; i += 4) {
    const real* ib = in + i * ins;
    real* ob = out + i * outs;
    for (int64_t x = 0; x < n; x += VL) {
      V a0, a1, a2, a3;
      if (acc) {
        a0 = vld(ob + x);
        a1 = vld(ob + outs + x);
        a2 = vld(ob + 2 * outs + x);
        a3 = vld(ob + 3 * outs + x);
      } else {
        a0 = a1 = a2 = a3 = vzero();
      }
#pragma GCC unroll 32
      for (int j = 0; j < K + 3; ++j) {
        const V d = vld(ib + j * ins + x);
        if (j < K) a0 = vfma(wv[j], d, a0);
        if (j >= 1 && j - 1 < K) a1 = vfma(wv[j - 1], d, a1);
        if (j >= 2 && j - 2 < K) a2 = vfma(wv[j - 2], d, a2);
        if (j >= 3) a3 = vfma(wv[j - 3], d, a3);
      }
      vst(ob + x, a0);
      vst(ob + outs + x, a1);
      vst(ob + 2 * outs + x, a2);
      vst(ob + 3 * outs + x, a3);
    }
  }
  for (; i < nrows; ++i) {
    const real* ib = in + i * ins;
    real* ob = out + i * outs;
    for (int64_t x = 0; x < n; x += VL) {
      V a = acc ? vld(ob + x) : vzero();
#pragma GCC unroll 32
      for (int j = 0; j < K; ++j) a = vfma(wv[j], vld(ib + j * ins + x), a);
      vst(ob + x, a);
    }
  }
}

// Weight gradient of a vertical conv: acc[t] += sum_{i<nrows, x<n} d(i, x) * h(i + t, x).
template <int K>
static void wgrad_v(const real* d, int64_t ds, const real* h, int64_t hs, int64_t nrows, int64_t n, double* out) {
  V a[K];
  #pragma GCC unroll 32
  for (int t = 0; t < K; ++t) a[t] = vzero();
  for (int64_t i = 0; i < nrows; ++i) {
    const real* dr = d + i * ds;
    const real* hr = h + i * hs;
    for (int64_t x = 0; x < n; x += VL) {
      const V dv = vld(dr + x);
#pragma GCC unroll 32
      for (int t = 0; t < K; ++t) a[t] = vfma(dv, vld(hr + t * hs + x), a[t]);
    }
  }
  #pragma GCC unroll 32
  for (int t = 0; t < K; ++t) out[t] += static_cast<double>(vhsum(a[t]));
}

// Weight gradient of a horizontal conv: acc[t] += sum d(i, x) * a(i, x + t - K/2).
template <int K>
static void wgrad_h(const real* d, const real* s, int64_t rs, int64_t nrows, int64_t n, double* out) {
  V a[K];
  #pragma GCC unroll 32
  for (int t = 0; t < K; ++t) a[t] = vzero();
  for (int64_t i = 0; i < nrows; ++i) {
    const real* dr = d + i * rs;
    const real* sr = s + i * rs - K / 2;
    for (int64_t x = 0; x < n; x += VL) {
      const V dv = vld(dr + x);
#pragma GCC unroll 32
      for (int t = 0; t < K; ++t) a[t] = vfma(dv, vld(sr + x + t), a[t]);
    }
  }
  #pragma GCC unroll 32
  for (int t = 0; t < K; ++t) out[t] += static_cast<double>(vhsum(a[t]));
}

// 5x5 weight gradient: acc[ky*5+kx] += sum d(i, x) * u(i + ky, x + kx - 2); u points at the row of ky = 0, i = 0.
static void wgrad_5x5(const real* d, const real* u, int64_t rs, int64_t nrows, int64_t n, double* out) {
  V a[25];
  #pragma GCC unroll 32
  for (int t = 0; t < 25; ++t) a[t] = vzero();
  for (int64_t i = 0; i < nrows; ++i) {
    const real* dr = d + i * rs;
    const real* ur = u + i * rs - 2;
    for (int64_t x = 0; x < n; x += VL) {
      const V dv = vld(dr + x);
#pragma GCC unroll 25
      for (int t = 0; t < 25; ++t) a[t] = vfma(dv, vld(ur + (t / 5) * rs + x + t % 5), a[t]);
    }
  }
  #pragma GCC unroll 32
  for (int t = 0; t < 25; ++t) out[t] += static_cast<double>(vhsum(a[t]));
}

static double rows_sum(const real* d, int64_t rs, int64_t nrows, int64_t n) {
  V a = vzero();
  for (int64_t i = 0; i < nrows; ++i)
    for (int64_t x = 0; x < n; x += VL) a = vadd(a, vld(d + i * rs + x));
  return static_cast<double>(vhsum(a));
}

// ---------------------------------------------------------------------------------------------------------------
// GEMM micro-kernels on channel-major pixel panels.
// ---------------------------------------------------------------------------------------------------------------
constexpr int MR = 6;   // rows of the A operand per micro-tile
constexpr int NRV = 4;  // vectors of pixels per micro-tile

// out[m][p] = bias[m] + sum_k A[m][k] X[k][p] for m < MRr, p in [0, nv*VL) (last vector has `last` lanes).
// (FULL: all NV vectors complete; else the last one has `last` lanes. Two loops, so that the accumulators stay in
// registers.)
template <int MRr, int NV, bool FULL>
static inline void gemm_tile_k(const real* A, int64_t lda, const real* X, int64_t ldx, real* out, int64_t ldo,
                               int64_t K, const real* bias, int last) {
  V acc[MRr][NV];
  #pragma GCC unroll 32
  for (int i = 0; i < MRr; ++i) {
    const V b = bias ? vset(bias[i]) : vzero();
    #pragma GCC unroll 32
    for (int j = 0; j < NV; ++j) acc[i][j] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    const real* xr = X + k * ldx;
    V xv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) xv[j] = (FULL || j < NV - 1) ? vld(xr + j * VL) : vldn(xr + j * VL, last);
#pragma GCC unroll 6
    for (int i = 0; i < MRr; ++i) {
      const V a = vset(A[i * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(a, xv[j], acc[i][j]);
    }
  }
  #pragma GCC unroll 32
  for (int i = 0; i < MRr; ++i)
    #pragma GCC unroll 32
    for (int j = 0; j < NV; ++j) {
      if (!FULL && j == NV - 1) vstn(out + i * ldo + j * VL, acc[i][j], last);
      else vst(out + i * ldo + j * VL, acc[i][j]);
    }
}

// out[m][p] = bias[m] + sum_k A[m][k] X[k][p] for m < MRr, p in [0, nv*VL) (last vector has `last` lanes).
template <int MRr, int NV>
static void gemm_tile(const real* A, int64_t lda, const real* X, int64_t ldx, real* out, int64_t ldo, int64_t K,
                      const real* bias, int last) {
  if (last >= VL) gemm_tile_k<MRr, NV, true>(A, lda, X, ldx, out, ldo, K, bias, last);
  else gemm_tile_k<MRr, NV, false>(A, lda, X, ldx, out, ldo, K, bias, last);
}

// out (M x N, ldo) = A (M x K, lda) X (K x N, ldx) + bias (M, or null). Pixel tiles outer, so the K x 64 panel of X
// stays in L1 while every row block of A passes over it.
static void gemm_nn(const real* A, int64_t lda, const real* X, int64_t ldx, real* out, int64_t ldo, int64_t M,
                    int64_t K, int64_t N, const real* bias) {
  for (int64_t p = 0; p < N; p += NRV * VL) {
    const int64_t rem = N - p;
    const int nv = static_cast<int>(std::min<int64_t>(NRV, (rem + VL - 1) / VL));
    const int last = static_cast<int>(rem - (nv - 1) * VL >= VL ? VL : rem - (nv - 1) * VL);
    for (int64_t m = 0; m < M; m += MR) {
      const int mr = static_cast<int>(std::min<int64_t>(MR, M - m));
      const real* Am = A + m * lda;
      real* om = out + m * ldo + p;
      const real* bm = bias ? bias + m : nullptr;
      const real* Xp = X + p;
#define SEGNEXT_BWD_GEMM_NV(MRR)                                                    \
  switch (nv) {                                                                   \
    case 4: gemm_tile<MRR, 4>(Am, lda, Xp, ldx, om, ldo, K, bm, last); break;     \
    case 3: gemm_tile<MRR, 3>(Am, lda, Xp, ldx, om, ldo, K, bm, last); break;     \
    case 2: gemm_tile<MRR, 2>(Am, lda, Xp, ldx, om, ldo, K, bm, last); break;     \
    default: gemm_tile<MRR, 1>(Am, lda, Xp, ldx, om, ldo, K, bm, last); break;    \
  }
      switch (mr) {
        case 6: SEGNEXT_BWD_GEMM_NV(6) break;
        case 5: SEGNEXT_BWD_GEMM_NV(5) break;
        case 4: SEGNEXT_BWD_GEMM_NV(4) break;
        case 3: SEGNEXT_BWD_GEMM_NV(3) break;
        case 2: SEGNEXT_BWD_GEMM_NV(2) break;
        default: SEGNEXT_BWD_GEMM_NV(1) break;
      }
#undef SEGNEXT_BWD_GEMM_NV
    }
  }
}

// acc[o][i] += sum_{p < n} D[o][p] S[i][p]   (o < MO, i < NI); lanes over pixels, fixed-order lane sum at the end.
template <int MO, int NI>
static void dw3_tile(const real* D, int64_t ldd, const real* S, int64_t lds, int64_t n, double* acc, int64_t ldacc) {
  V a[MO][NI];
  #pragma GCC unroll 32
  for (int o = 0; o < MO; ++o)
    #pragma GCC unroll 32
    for (int i = 0; i < NI; ++i) a[o][i] = vzero();
  int64_t p = 0;
  for (; p + VL <= n; p += VL) {
    V d[MO];
    #pragma GCC unroll 32
    for (int o = 0; o < MO; ++o) d[o] = vld(D + o * ldd + p);
    #pragma GCC unroll 32
    for (int i = 0; i < NI; ++i) {
      const V s = vld(S + i * lds + p);
      #pragma GCC unroll 32
      for (int o = 0; o < MO; ++o) a[o][i] = vfma(d[o], s, a[o][i]);
    }
  }
  if (p < n) {
    const int r = static_cast<int>(n - p);
    V d[MO];
    #pragma GCC unroll 32
    for (int o = 0; o < MO; ++o) d[o] = vldn(D + o * ldd + p, r);
    #pragma GCC unroll 32
    for (int i = 0; i < NI; ++i) {
      const V s = vldn(S + i * lds + p, r);
      #pragma GCC unroll 32
      for (int o = 0; o < MO; ++o) a[o][i] = vfma(d[o], s, a[o][i]);
    }
  }
  #pragma GCC unroll 32
  for (int o = 0; o < MO; ++o)
    #pragma GCC unroll 32
    for (int i = 0; i < NI; ++i) acc[o * ldacc + i] += static_cast<double>(vhsum(a[o][i]));
}

template <int MO>
static void dw3_rows(const real* D, int64_t ldd, const real* S, int64_t lds, int64_t C, int64_t n, double* acc) {
  int64_t i = 0;
  for (; i + 4 <= C; i += 4) dw3_tile<MO, 4>(D, ldd, S + i * lds, lds, n, acc + i, C);
  switch (C - i) {
    case 3: dw3_tile<MO, 3>(D, ldd, S + i * lds, lds, n, acc + i, C); break;
    case 2: dw3_tile<MO, 2>(D, ldd, S + i * lds, lds, n, acc + i, C); break;
    case 1: dw3_tile<MO, 1>(D, ldd, S + i * lds, lds, n, acc + i, C); break;
    default: break;
  }
}

static double span_sum(const real* d, int64_t n) {
  V a = vzero();
  int64_t p = 0;
  for (; p + VL <= n; p += VL) a = vadd(a, vld(d + p));
  if (p < n) a = vadd(a, vldn(d + p, static_cast<int>(n - p)));
  return static_cast<double>(vhsum(a));
}

// ---------------------------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t HALO_S = 12;  // rows of d_s (and u) beyond the band that the band needs
constexpr int64_t HALO_A = 10;  // rows of a, h_k beyond the band

struct Band {
  int64_t r0, r1;    // own rows
  int64_t hr0, hr1;  // rows of d_att / d_s held (halo rows clipped to the image)
};

struct Flags {
  bool du, dw0, db0, dws, dbs, dw3, db3;
  bool ds;   // d_s and d_h_k needed
  bool s;    // s needed (att for du, or dw3)
  bool ah;   // a and h_k needed (s, or the strip weight gradients)
  bool da;   // d_a needed
  bool datt; // d_att needed
};

struct Plan {
  int64_t B, C, H, W, R, nbands;
  Geo geo;
  int64_t NU, NA, ND;  // rows of the U/DS, A/H, DH/DA scratch planes
  int64_t p2_floats;   // per-thread P2 scratch
  int64_t NB1, NB3;    // pixel chunk of P1, P3
};

struct Acc {
  double *dw0, *db0, *dws, *dbs, *dw3, *db3;
};

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct AlignedBuf {
  real* p = nullptr;
  explicit AlignedBuf(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(real)), 64));
    p = static_cast<real*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p != nullptr, "msca_backward (cpu): out of memory allocating ", bytes, " bytes of scratch");
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// The per-process scratch arena: reused by the next call (touched pages stay mapped); a call that finds it in use
// by another thread allocates its own.
struct Arena {
  std::mutex mu;
  real* p = nullptr;
  int64_t cap = 0;
};
static Arena& arena() {
  static Arena* a = new Arena();  // never destroyed: no teardown-order issues at exit
  return *a;
}
struct ArenaLease {
  real* p = nullptr;
  bool locked = false;
  std::unique_ptr<AlignedBuf> own;
  explicit ArenaLease(int64_t n) {
    Arena& a = arena();
    n = std::max<int64_t>(n, 16);
    if (a.mu.try_lock()) {
      locked = true;
      if (a.cap < n) {
        std::free(a.p);
        a.p = nullptr;
        a.cap = 0;
        AlignedBuf nb(n);
        a.p = nb.p;
        nb.p = nullptr;
        a.cap = n;
      }
      p = a.p;
    } else {
      own.reset(new AlignedBuf(n));
      p = own->p;
    }
  }
  ~ArenaLease() {
    if (locked) arena().mu.unlock();
  }
  ArenaLease(const ArenaLease&) = delete;
  ArenaLease& operator=(const ArenaLease&) = delete;
};

template <typename T>
struct Io {
  const T* u;
  int64_t us[4];
  const T* g;
  int64_t gs[4];
  T* du;
  int64_t dus[4];
};

// Calls f(y, x0, len, off) for the row segments covering pixels [p0, p0 + n) of the rows starting at row y0 (pixel p
// is row y0 + p / W, column p % W); off = offset of the segment in the span.
template <typename F>
static inline void for_segments(int64_t y0, int64_t W, int64_t p0, int64_t n, F&& f) {
  int64_t off = 0;
  while (off < n) {
    const int64_t p = p0 + off;
    const int64_t y = y0 + p / W, x = p % W;
    const int64_t len = std::min<int64_t>(W - x, n - off);
    f(y, x, len, off);
    off += len;
  }
}

// ---- P1: d_att = g*u and d_s = w3^T d_att over pixels [p0, p0+n) of the halo rows ----
template <typename T>
static void p1_chunk(const Plan& pl, const Flags& fl, const Io<T>& io, int64_t b, const Band& bd, int64_t p0,
                     int64_t n, const real* w3t, real* datt, real* dsb) {
  const int64_t PH = (bd.hr1 - bd.hr0) * pl.W;
  for (int64_t c = 0; c < pl.C; ++c) {
    const T* gb = io.g + b * io.gs[0] + c * io.gs[1];
    const T* ub = io.u + b * io.us[0] + c * io.us[1];
    real* dst = datt + c * PH + p0;
    for_segments(bd.hr0, pl.W, p0, n, [&](int64_t y, int64_t x, int64_t len, int64_t off) {
      load_mul_row(gb + y * io.gs[2] + x * io.gs[3], io.gs[3], ub + y * io.us[2] + x * io.us[3], io.us[3], len,
                   dst + off);
    });
  }
  if (fl.ds) gemm_nn(w3t, pl.C, datt + p0, PH, dsb + p0, PH, pl.C, pl.C, n, nullptr);
}

// ---- P2: the depthwise chain of one channel over one band ----
template <typename T>
static void p2_channel(const Plan& pl, const Flags& fl, const Io<T>& io, int64_t b, const Band& bd, int64_t c,
                       const real* w0, const real* b0, const real* ws, const real* bs, const real* dsb, real* sb,
                       real* dcb, real* scr, const Acc& acc) {
  const Geo& g = pl.geo;
  const int64_t H = pl.H, W = pl.W, Wv = g.Wv, WS = g.WS;
  const int64_t r0 = bd.r0, r1 = bd.r1, R = r1 - r0;
  const int64_t PH = (bd.hr1 - bd.hr0) * W, P = R * W;
  const real* w0c = w0 + c * 25;
  const real* wsc = ws + c * 78;
  const real* bsc = bs + c * 6;
  // planes
  real* U = scr + PL;                  // rows r0-12 .. r1+12
  real* A = U + pl.NU * WS;            // rows r0-10 .. r1+10
  real* Hk[3] = {A + pl.NA * WS, A + 2 * pl.NA * WS, A + 3 * pl.NA * WS};
  real* DS = A + 4 * pl.NA * WS;       // rows r0-12 .. r1+12
  real* DH[3] = {DS + pl.NU * WS, DS + pl.NU * WS + pl.ND * WS, DS + pl.NU * WS + 2 * pl.ND * WS};
  real* DA = DS + pl.NU * WS + 3 * pl.ND * WS;  // rows r0-2 .. r1+2
  real* SR = DA + pl.ND * WS;          // own rows (s, then du_conv staging)
  auto Ur = [&](int64_t y) { return U + (y - (r0 - HALO_S)) * WS; };
  auto Ar = [&](int64_t y) { return A + (y - (r0 - HALO_A)) * WS; };
  auto Hr = [&](int k, int64_t y) { return Hk[k] + (y - (r0 - HALO_A)) * WS; };
  auto DSr = [&](int64_t y) { return DS + (y - (r0 - HALO_S)) * WS; };
  auto DHr = [&](int k, int64_t y) { return DH[k] + (y - (r0 - 2)) * WS; };
  auto DAr = [&](int64_t y) { return DA + (y - (r0 - 2)) * WS; };
  auto inimg = [&](int64_t y) { return y >= 0 && y < H; };

  // u rows
  if (fl.ah || fl.dw0) {
    const T* ub = io.u + b * io.us[0] + c * io.us[1];
    for (int64_t y = r0 - HALO_S; y < r1 + HALO_S; ++y) {
      real* r = Ur(y);
      if (inimg(y)) {
        load_row(ub + y * io.us[2], io.us[3], W, r);
        fix_row(r, g);
      } else {
        zero_row(r, g);
      }
    }
  }
  // a, h_k on rows [r0-10, r1+10): zero outside the image
  if (fl.ah) {
    const int64_t y0 = std::max<int64_t>(r0 - HALO_A, 0), y1 = std::min<int64_t>(r1 + HALO_A, H);
    for (int64_t y = r0 - HALO_A; y < r1 + HALO_A; ++y)
      if (!inimg(y)) {
        zero_row(Ar(y), g);
        for (int k = 0; k < 3; ++k) zero_row(Hr(k, y), g);
      }
    conv5x5_rows(Ur(y0 - 2), w0c, b0[c], Ar(y0), WS, y1 - y0, Wv);
    for (int64_t y = y0; y < y1; ++y) fix_row(Ar(y), g);
    hconv_rows<7>(Ar(y0), WS, wsc + 0, bsc[0], false, Hr(0, y0), WS, y1 - y0, Wv);
    hconv_rows<11>(Ar(y0), WS, wsc + 14, bsc[2], false, Hr(1, y0), WS, y1 - y0, Wv);
    hconv_rows<21>(Ar(y0), WS, wsc + 36, bsc[4], false, Hr(2, y0), WS, y1 - y0, Wv);
    for (int k = 0; k < 3; ++k)
      for (int64_t y = y0; y < y1; ++y) fix_row(Hr(k, y), g);
  }
  // s (own rows) -> sb
  if (fl.s) {
    const real bsum = bsc[1] + bsc[3] + bsc[5];
    for (int64_t y = r0; y < r1; ++y) {
      const real* ar = Ar(y);
      real* sr = SR + (y - r0) * WS;
      for (int64_t x = 0; x < Wv; ++x) sr[x] = ar[x] + bsum;
    }
    vconv_rows<7>(Hr(0, r0 - 3), WS, wsc + 7, SR, WS, R, Wv, true);
    vconv_rows<11>(Hr(1, r0 - 5), WS, wsc + 25, SR, WS, R, Wv, true);
    vconv_rows<21>(Hr(2, r0 - 10), WS, wsc + 57, SR, WS, R, Wv, true);
    real* dst = sb + c * P;
    for (int64_t y = r0; y < r1; ++y) std::memcpy(dst + (y - r0) * W, SR + (y - r0) * WS, sizeof(real) * W);
  }
  if (!fl.ds) return;

  // d_s rows (zero outside the image)
  for (int64_t y = r0 - HALO_S; y < r1 + HALO_S; ++y) {
    real* r = DSr(y);
    if (inimg(y)) {
      std::memcpy(r, dsb + c * PH + (y - bd.hr0) * W, sizeof(real) * W);
      fix_row(r, g);
    } else {
      zero_row(r, g);
    }
  }
  double* dwsc = acc.dws ? acc.dws + c * 78 : nullptr;
  double* dbsc = acc.dbs ? acc.dbs + c * 6 : nullptr;
  // strip kx1 weight / bias gradients: d_v_k = d_s
  if (fl.dws) {
    wgrad_v<7>(DSr(r0), WS, Hr(0, r0 - 3), WS, R, Wv, dwsc + 7);
    wgrad_v<11>(DSr(r0), WS, Hr(1, r0 - 5), WS, R, Wv, dwsc + 25);
    wgrad_v<21>(DSr(r0), WS, Hr(2, r0 - 10), WS, R, Wv, dwsc + 57);
  }
  if (fl.dbs) {
    const double sds = rows_sum(DSr(r0), WS, R, Wv);
    dbsc[1] += sds;
    dbsc[3] += sds;
    dbsc[5] += sds;
  }
  // d_h_k rows [r0-2, r1+2) in the image: vertical correlation of d_s with the flipped kx1 kernel
  const int64_t ya = std::max<int64_t>(r0 - 2, 0), yb = std::min<int64_t>(r1 + 2, H);
  for (int64_t y = r0 - 2; y < r1 + 2; ++y)
    if (!inimg(y)) {
      for (int k = 0; k < 3; ++k) zero_row(DHr(k, y), g);
      if (fl.da) zero_row(DAr(y), g);
    }
  {
    real wf[21];
    const int ks[3] = {7, 11, 21};
    const int offv[3] = {7, 25, 57};
    for (int k = 0; k < 3; ++k) {
      const int K = ks[k];
      for (int t = 0; t < K; ++t) wf[t] = wsc[offv[k] + K - 1 - t];
      const real* in = DSr(ya - K / 2);
      if (k == 0) vconv_rows<7>(in, WS, wf, DHr(0, ya), WS, yb - ya, Wv, false);
      else if (k == 1) vconv_rows<11>(in, WS, wf, DHr(1, ya), WS, yb - ya, Wv, false);
      else vconv_rows<21>(in, WS, wf, DHr(2, ya), WS, yb - ya, Wv, false);
      for (int64_t y = ya; y < yb; ++y) fix_row(DHr(k, y), g);
    }
  }
  if (fl.dws) {
    wgrad_h<7>(DHr(0, r0), Ar(r0), WS, R, Wv, dwsc + 0);
    wgrad_h<11>(DHr(1, r0), Ar(r0), WS, R, Wv, dwsc + 14);
    wgrad_h<21>(DHr(2, r0), Ar(r0), WS, R, Wv, dwsc + 36);
  }
  if (fl.dbs) {
    dbsc[0] += rows_sum(DHr(0, r0), WS, R, Wv);
    dbsc[2] += rows_sum(DHr(1, r0), WS, R, Wv);
    dbsc[4] += rows_sum(DHr(2, r0), WS, R, Wv);
  }
  if (!fl.da) return;
  // d_a rows [r0-2, r1+2) in the image = d_s + sum_k horizontal correlation of d_h_k with the flipped 1xk kernel
  {
    real f7[7], f11[11], f21[21];
    for (int t = 0; t < 7; ++t) f7[t] = wsc[0 + 6 - t];
    for (int t = 0; t < 11; ++t) f11[t] = wsc[14 + 10 - t];
    for (int t = 0; t < 21; ++t) f21[t] = wsc[36 + 20 - t];
    for (int64_t y = ya; y < yb; ++y) std::memcpy(DAr(y), DSr(y), sizeof(real) * Wv);
    hconv_rows<7>(DHr(0, ya), WS, f7, real(0), true, DAr(ya), WS, yb - ya, Wv);
    hconv_rows<11>(DHr(1, ya), WS, f11, real(0), true, DAr(ya), WS, yb - ya, Wv);
    hconv_rows<21>(DHr(2, ya), WS, f21, real(0), true, DAr(ya), WS, yb - ya, Wv);
    for (int64_t y = ya; y < yb; ++y) fix_row(DAr(y), g);
  }
  if (fl.dw0) wgrad_5x5(DAr(r0), Ur(r0 - 2), WS, R, Wv, acc.dw0 + c * 25);
  if (fl.db0) acc.db0[c] += rows_sum(DAr(r0), WS, R, Wv);
  if (fl.du) {
    real wf[25];
    for (int t = 0; t < 25; ++t) wf[t] = w0c[24 - t];
    real* dst = dcb + c * P;
    conv5x5_rows(DAr(r0 - 2), wf, real(0), SR, WS, R, Wv);
    for (int64_t y = r0; y < r1; ++y) std::memcpy(dst + (y - r0) * W, SR + (y - r0) * WS, sizeof(real) * W);
  }
}

// ---- P3: att, du, dw3, db3 for output channels [o0, o0+mo) over own pixels [p0, p0+n) ----
template <typename T>
static void p3_block(const Plan& pl, const Flags& fl, const Io<T>& io, int64_t b, const Band& bd, int64_t o0,
                     int64_t mo, int64_t p0, int64_t n, const real* w3, const real* b3, const real* datt,
                     const real* sb, const real* dcb, real* att, const Acc& acc) {
  const int64_t C = pl.C, W = pl.W;
  const int64_t PH = (bd.hr1 - bd.hr0) * W, P = (bd.r1 - bd.r0) * W;
  const real* dat0 = datt + (bd.r0 - bd.hr0) * W;  // own pixels of channel 0
  if (fl.du) {
    gemm_nn(w3 + o0 * C, C, sb + p0, P, att, pl.NB3, mo, C, n, b3 + o0);
    for (int64_t o = o0; o < o0 + mo; ++o) {
      const T* gb = io.g + b * io.gs[0] + o * io.gs[1];
      T* db = io.du + b * io.dus[0] + o * io.dus[1];
      const real* at = att + (o - o0) * pl.NB3;
      const real* dc = dcb + o * P + p0;
      for_segments(bd.r0, W, p0, n, [&](int64_t y, int64_t x, int64_t len, int64_t off) {
        store_du_row(gb + y * io.gs[2] + x * io.gs[3], io.gs[3], at + off, dc + off, len,
                     db + y * io.dus[2] + x * io.dus[3], io.dus[3]);
      });
    }
  }
  if (fl.dw3) {
    const real* D = dat0 + o0 * PH + p0;
    double* a = acc.dw3 + o0 * C;
    switch (mo) {
      case 6: dw3_rows<6>(D, PH, sb + p0, P, C, n, a); break;
      case 5: dw3_rows<5>(D, PH, sb + p0, P, C, n, a); break;
      case 4: dw3_rows<4>(D, PH, sb + p0, P, C, n, a); break;
      case 3: dw3_rows<3>(D, PH, sb + p0, P, C, n, a); break;
      case 2: dw3_rows<2>(D, PH, sb + p0, P, C, n, a); break;
      default: dw3_rows<1>(D, PH, sb + p0, P, C, n, a); break;
    }
  }
  if (fl.db3)
    for (int64_t o = o0; o < o0 + mo; ++o) acc.db3[o] += span_sum(dat0 + o * PH + p0, n);
}

// Band height: the largest R with about BAND_ELEMS band elements (C * R * W), balanced over the bands. Depends on
// the shape only (never on the thread count).
#ifndef SEGNEXT_BWD_BAND_ELEMS
#define SEGNEXT_BWD_BAND_ELEMS (1 << 19)
#endif

#ifdef SEGNEXT_BWD_PROFILE
static double prof_now() {  // calling thread's CPU time (profiling builds, run with one thread)
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
#endif

template <typename T>
static void run(const BwdArgs& a) {
  Plan pl;
  pl.B = a.B;
  pl.C = a.C;
  pl.H = a.H;
  pl.W = a.W;
  const int64_t C = a.C, H = a.H, W = a.W;
  int64_t R = std::max<int64_t>(1, SEGNEXT_BWD_BAND_ELEMS / std::max<int64_t>(1, C * W));
  R = std::max<int64_t>(R, 8);
  if (R >= H) R = H;
  pl.nbands = (H + R - 1) / R;
  R = (H + pl.nbands - 1) / pl.nbands;
  pl.R = R;
  pl.geo.H = H;
  pl.geo.W = W;
  pl.geo.Wv = round_up(W, VL);
  pl.geo.WS = PL + pl.geo.Wv + PR;
  pl.NU = R + 2 * HALO_S;
  pl.NA = R + 2 * HALO_A;
  pl.ND = R + 4;
  pl.p2_floats = (2 * pl.NU + 4 * pl.NA + 4 * pl.ND + R) * pl.geo.WS + 64;
  pl.NB1 = std::max<int64_t>(64, std::min<int64_t>(4096, round_up((int64_t(1) << 16) / C, 64)));
  pl.NB3 = std::max<int64_t>(256, std::min<int64_t>(4096, round_up((int64_t(1) << 17) / C, 64)));

  Flags fl;
  fl.du = a.need[0];
  fl.dw0 = a.need[1];
  fl.db0 = a.need[2];
  fl.dws = a.need[3];
  fl.dbs = a.need[4];
  fl.dw3 = a.need[5];
  fl.db3 = a.need[6];
  fl.da = fl.du || fl.dw0 || fl.db0;
  fl.ds = fl.da || fl.dws || fl.dbs;
  fl.s = fl.du || fl.dw3;
  fl.ah = fl.s || fl.dws;
  fl.datt = fl.ds || fl.dw3 || fl.db3;
  if (!(fl.datt || fl.du)) return;

  Acc acc{a.dw0, a.db0, a.dws, a.dbs, a.dw3, a.db3};
  const real* w0 = static_cast<const real*>(a.w0);
  const real* b0 = static_cast<const real*>(a.b0);
  const real* ws = static_cast<const real*>(a.ws);
  const real* bs = static_cast<const real*>(a.bs);
  const real* w3 = static_cast<const real*>(a.w3);
  const real* b3 = static_cast<const real*>(a.b3);
  Io<T> io;
  io.u = static_cast<const T*>(a.u);
  io.g = static_cast<const T*>(a.g);
  io.du = static_cast<T*>(a.du);
  for (int i = 0; i < 4; ++i) {
    io.us[i] = a.us[i];
    io.gs[i] = a.gs[i];
    io.dus[i] = a.dus[i];
  }

  const int64_t PHmax = std::min<int64_t>(H, R + 2 * HALO_S) * W;
  const int64_t Pmax = R * W;
  const int nthr = std::max(1, at::get_num_threads());
  const bool need_p2 = fl.s || fl.ds;
  // One scratch arena per call, carved into 64-byte aligned pieces; kept between calls (page faults of fresh
  // allocations cost more than the whole backward at small shapes).
  const int64_t sizes[7] = {fl.ds ? C * C : 0,           fl.datt ? C * PHmax : 0, fl.ds ? C * PHmax : 0,
                            fl.s ? C * Pmax : 0,         fl.du ? C * Pmax : 0,    need_p2 ? pl.p2_floats * nthr : 0,
                            fl.du ? MR * pl.NB3 * nthr : 0};
  int64_t total = 0;
  for (int64_t sz : sizes) total += round_up(sz, 16);
  ArenaLease lease(total);
  real* bufs[7];
  {
    real* q = lease.p;
    for (int i = 0; i < 7; ++i) {
      bufs[i] = q;
      q += round_up(sizes[i], 16);
    }
  }
  real* const w3t = bufs[0];
  real* const datt = bufs[1];
  real* const dsb = bufs[2];
  real* const sbuf = bufs[3];
  real* const dcb = bufs[4];
  real* const p2s = bufs[5];
  real* const p3s = bufs[6];
  if (fl.ds)  // in 16 x 16 blocks: a plain strided transpose missed the cache on every store (C = 512: 0.3+ ms)
    for (int64_t o0 = 0; o0 < C; o0 += 16)
      for (int64_t i0 = 0; i0 < C; i0 += 16)
        for (int64_t o = o0; o < std::min<int64_t>(C, o0 + 16); ++o)
          for (int64_t i = i0; i < std::min<int64_t>(C, i0 + 16); ++i) w3t[i * C + o] = w3[o * C + i];
  const int64_t nob = (C + MR - 1) / MR;

  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t bi = 0; bi < pl.nbands; ++bi) {
      Band bd;
      bd.r0 = bi * R;
      bd.r1 = std::min<int64_t>(H, bd.r0 + R);
      if (fl.ds) {
        bd.hr0 = std::max<int64_t>(0, bd.r0 - HALO_S);
        bd.hr1 = std::min<int64_t>(H, bd.r1 + HALO_S);
      } else {
        bd.hr0 = bd.r0;
        bd.hr1 = bd.r1;
      }
      const int64_t PH = (bd.hr1 - bd.hr0) * W;
      const int64_t P = (bd.r1 - bd.r0) * W;
#ifdef SEGNEXT_BWD_PROFILE
      const double t0 = prof_now();
#endif
      // P1
      if (fl.datt) {
        const int64_t nch = (PH + pl.NB1 - 1) / pl.NB1;
        at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t k = c0; k < c1; ++k) {
            const int64_t p0 = k * pl.NB1;
            p1_chunk<T>(pl, fl, io, b, bd, p0, std::min<int64_t>(pl.NB1, PH - p0), w3t, datt, dsb);
          }
        });
      }
#ifdef SEGNEXT_BWD_PROFILE
      const double t1 = prof_now();
#endif
      // P2
      if (need_p2) {
        at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
          const int tid = at::get_thread_num();
          std::unique_ptr<AlignedBuf> own;  // a caller running this region inline with an unexpected thread id
          real* scr;
          if (tid >= 0 && tid < nthr) {
            scr = p2s + static_cast<int64_t>(tid) * pl.p2_floats;
          } else {
            own.reset(new AlignedBuf(pl.p2_floats));
            scr = own->p;
          }
          for (int64_t c = c0; c < c1; ++c)
            p2_channel<T>(pl, fl, io, b, bd, c, w0, b0, ws, bs, dsb, sbuf, dcb, scr, acc);
        });
      }
#ifdef SEGNEXT_BWD_PROFILE
      const double t2 = prof_now();
#endif
      // P3
      if (fl.du || fl.dw3 || fl.db3) {
        at::parallel_for(0, nob, 1, [&](int64_t ob0, int64_t ob1) {
          const int tid = at::get_thread_num();
          std::unique_ptr<AlignedBuf> own;
          real* att = nullptr;
          if (fl.du) {
            if (tid >= 0 && tid < nthr) {
              att = p3s + static_cast<int64_t>(tid) * MR * pl.NB3;
            } else {
              own.reset(new AlignedBuf(MR * pl.NB3));
              att = own->p;
            }
          }
          for (int64_t p0 = 0; p0 < P; p0 += pl.NB3) {
            const int64_t n = std::min<int64_t>(pl.NB3, P - p0);
            for (int64_t ob = ob0; ob < ob1; ++ob) {
              const int64_t o0 = ob * MR;
              p3_block<T>(pl, fl, io, b, bd, o0, std::min<int64_t>(MR, C - o0), p0, n, w3, b3, datt, sbuf, dcb, att, acc);
            }
          }
        });
      }
#ifdef SEGNEXT_BWD_PROFILE
      const double t3 = prof_now();
      auto ms = [](double d) { return d * 1e3; };
      std::fprintf(stderr, "band %lld R=%lld: P1 %.3f P2 %.3f P3 %.3f ms\n", (long long)bi, (long long)R, ms(t1 - t0),
                   ms(t2 - t1), ms(t3 - t2));
#endif
    }
  }
}

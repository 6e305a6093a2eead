// Internals shared by the fused MLP forward and backward on CPU (mlp_cpu_fwd.cpp, mlp_cpu_bwd.cpp; math in
// mlp_cpu.h).
//
// Two parts:
//  1. (include-guarded) the tiling plan, scratch buffers, the row-major GEMM wrapper (oneDNN brgemm / torch BLAS)
//     and the table of row kernels;
//  2. (SEGNEXT_MLP_ROWS defined: 0 portable scalar, 1 AVX2+FMA, 2 AVX-512) the row kernels themselves, included once
//     per ISA under #pragma GCC target by mlp_cpu_fwd.cpp, so nothing here needs -m flags.
//
// Layout of a hidden tile: m hidden channels x (rows * W) pixels, row-major per channel (planar, like NCHW), so the
// depthwise 3x3 runs along W with masked loads at the borders (the zero padding is exact: lanes outside the image
// read nothing).
#ifndef SEGNEXT_MLP_CPU_KERNELS_H_COMMON
#define SEGNEXT_MLP_CPU_KERNELS_H_COMMON

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "cpu_isa.h"
#include "cpu_plans.h"
#include "cpu_scratch.h"

namespace segnext_cpu {
namespace mlp {

// Per-thread scratch kept between calls (cpu_scratch.h, slots shared with the MSCA forward): slots 0-4 and 7.
inline void* scratch(int which, size_t bytes) { return thread_scratch(which).get(bytes); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiling plan: a function of the shape only (never of the thread count), so every output element and every
// weight-gradient partial is computed by the same operations whatever the number of threads.
//   rows: rows per band (nb bands per image), hc: hidden channels per GEMM block, G: hidden groups (forward only:
//   small images with few bands split the hidden channels into G groups whose partial outputs are summed in order).
struct Plan {
  int64_t rows = 1, nb = 1, hc = 128, G = 1;
};

// The override "<pixels per band>:<hidden block>[:<groups>]" (SEGNEXT_MLP_PLAN / SEGNEXT_MLP_BWD_PLAN, read once by
// the Python package: cpu_plans.h) replaces the defaults (tuning, plan tests).
// Forward defaults (one-off A/B on the AMD EPYC dev machine, 2 threads, min of 12 interleaved runs): hidden blocks
// of 128 (64: 2-8 % slower at every SegNeXt stage shape); images of at most 2048 pixels and 32 rows or more in two
// bands of rows (one halo row recomputed, ~6 % of fc1 at 32 x 32) rather than one band split into hidden groups
// (C = 320, Hd = 1280 at 32 x 32: 4.4 vs 4.8 ms; C = 160: 1.36 vs 1.48 ms).
inline Plan choose_plan(int64_t B, int64_t Hd, int64_t H, int64_t W, bool backward) {
  int64_t px = backward ? 1024 : (H * W <= 2048 && H >= 32 ? ceil_div(H, 2) * W : 2048);
  int64_t hc = backward ? 32 : 128, G = -1;
  const std::string s = plan_override(backward ? PlanKnob::mlp_bwd : PlanKnob::mlp_fwd);
  if (!s.empty()) {
    px = std::max<int64_t>(1, std::atoll(s.c_str()));
    auto c = s.find(':');
    if (c != std::string::npos) {
      hc = std::max<int64_t>(1, std::atoll(s.c_str() + c + 1));
      auto c2 = s.find(':', c + 1);
      if (c2 != std::string::npos) G = std::max<int64_t>(1, std::atoll(s.c_str() + c2 + 1));
    }
  }
  Plan pl;
  pl.hc = std::min(hc, Hd);
  int64_t rows = std::min<int64_t>(H, std::max<int64_t>(1, ceil_div(px, W)));
  pl.nb = ceil_div(H, rows);
  pl.rows = ceil_div(H, pl.nb);
  pl.nb = ceil_div(H, pl.rows);
  const int64_t nchunks = ceil_div(Hd, pl.hc);
  if (G < 0) {
    G = 1;
    const int64_t tasks = B * pl.nb;
    if (!backward && tasks > 0 && tasks < 4) G = ceil_div(4, tasks);
  }
  pl.G = backward ? 1 : std::max<int64_t>(1, std::min(G, nchunks));
  return pl;
}

// Columns of B per brgemm call: the K x n panel of B stays within 256 KiB (a quarter of a 1 MiB L2). One-off timing
// on the AMD EPYC dev machine, 1 thread, M = 64: K = 320 ran 232 GF/s at n = 256 and 152 at n = 768; K = 512 221 at
// n = 256 and 121 at n = 4096 (the ukernel streams the whole panel of B once per block of rows of A).
inline int64_t brgemm_cols(int64_t K, int64_t N) {
  const int64_t n = std::max<int64_t>(64, (65536 / std::max<int64_t>(K, 1)) / 64 * 64);
  return n >= N ? N : n;
}

// A leading dimension whose rows fall into few cache sets (a multiple of 256 floats, 1 KiB: the image planes H*W =
// 4096, 1024, 256 of a 512 x 512 input): the rows of a K x n panel then evict each other from L1. One-off timing as
// above, M = 128, K = 960: 164 GF/s at ldb = 4096, 244 at ldb = 4112, 253 packed (ldb = n).
inline bool aliasing_ld(int64_t ld) { return ld % 256 == 0; }
// A leading dimension for a scratch buffer of rows of n elements that is not aliasing_ld.
inline int64_t padded_ld(int64_t n) { return aliasing_ld(n) ? n + 16 : n; }

// Row-major C (M x N) = op(A) op(B) (+ C when accumulate); op(A) is M x K (A stored K x M when ta), op(B) K x N;
// leading dimensions in elements. float without transposes runs oneDNN's batch-reduce GEMM micro-kernel
// (at::native::cpublas::brgemm: JIT AVX-512 / AVX2 code, no tensor wrappers; torch falls back to its CPU BLAS where
// oneDNN's ukernel is unavailable) on blocks of brgemm_cols(K, N) columns. The rest runs at::mm_out /
// at::addmm_out on strided views of the buffers (torch's CPU BLAS: MKL sgemm / dgemm, single-threaded inside an
// OpenMP region), which write C in place for these strides.
template <class S>
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B,
                    int64_t ldb, bool accumulate, S* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<S, float>) {
    if (!ta && !tb && K > 0) {
      const int64_t nb = brgemm_cols(K, N);
      // B with an aliasing_ld is copied panel by panel into a contiguous K x n buffer (scratch slot 7)
      const bool pack = aliasing_ld(ldb) && K >= 24 && N >= 32;
      float* panel = pack ? static_cast<float*>(scratch(7, sizeof(float) * K * nb)) : nullptr;
      for (int64_t j = 0; j < N; j += nb) {
        const int64_t n = std::min(nb, N - j);
        if (pack) {
          for (int64_t k = 0; k < K; ++k) std::memcpy(panel + k * n, B + k * ldb + j, sizeof(float) * n);
          at::native::cpublas::brgemm(M, n, K, lda, n, ldc, accumulate, A, panel, C + j, false);
        } else {
          at::native::cpublas::brgemm(M, n, K, lda, ldb, ldc, accumulate, A, B + j, C + j, false);
        }
      }
      return;
    }
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
  at::Tensor a = ta ? at::from_blob(const_cast<S*>(A), {K, M}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<S*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<S*>(B), {N, K}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<S*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (K == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  if (accumulate) at::addmm_out(c, c, a, b);
  else at::mm_out(c, a, b);
}

// Phi(x) = (1 + erf(x / sqrt 2)) / 2 on [-6, 6] for the AVX-512 GELU (V::gelu_table): 32 intervals of 0.375, on each
// the least-squares polynomial of degree 4 in u = t - i - 1/2 (t = (x + 6) * 8/3, i = floor t, so |u| <= 1/2) through
// 64 Chebyshev nodes, fitted in float64 with Python's math.erf and rounded to fp32; kGeluPhi[d][i] = coefficient of
// u^d on interval i. Max |Phi error| of the fit plus fp32 evaluation ~4e-7 over a dense grid of [-6, 6].
alignas(64) inline constexpr float kGeluPhi[5][32] = {
    {3.0775031412133558e-09f, 2.701761658840951e-08f, 2.0690140445367433e-07f, 1.3828303053742275e-06f, 8.070996045717038e-06f, 4.1167593735735863e-05f, 0.00018367018492426723f, 0.0007175425416789949f, 0.0024579011369496584f, 0.007394606247544289f, 0.01958007737994194f, 0.04575362429022789f, 0.09467574208974838f, 0.17425072193145752f, 0.2868877053260803f, 0.42563432455062866f, 0.5743656754493713f, 0.7131122946739197f, 0.8257492780685425f, 0.9053242802619934f, 0.9542464017868042f, 0.980419933795929f, 0.9926053881645203f, 0.9975420832633972f, 0.9992824792861938f, 0.999816358089447f, 0.9999588131904602f, 0.9999919533729553f, 0.9999986290931702f, 0.9999998211860657f, 1.0f, 1.0f},
    {6.874345537255522e-09f, 5.671203950896597e-08f, 4.064186782670731e-07f, 2.5300985271314858e-06f, 1.3682843928108923e-05f, 6.428347114706412e-05f, 0.0002623700420372188f, 0.000930311216507107f, 0.0028658113442361355f, 0.007669689133763313f, 0.017832964658737183f, 0.03602375462651253f, 0.06322332471609116f, 0.09640317410230637f, 0.12771235406398773f, 0.14699527621269226f, 0.14699527621269226f, 0.12771235406398773f, 0.09640317410230637f, 0.06322332471609116f, 0.03602375462651253f, 0.017832964658737183f, 0.007669689133763313f, 0.0028658113442361355f, 0.000930311216507107f, 0.0002623700420372188f, 6.428347114706412e-05f, 1.3682843928108923e-05f, 2.5300985271314858e-06f, 4.064186782670731e-07f, 5.671203950896597e-08f, 6.874345981344732e-09f},
    {7.503262011709921e-09f, 5.7885742421603936e-08f, 3.8610735941801977e-07f, 2.2250856090977322e-06f, 1.106864419853082e-05f, 4.74731859867461e-05f, 0.00017528812168166041f, 0.0005560694844461977f, 0.0015113599365577102f, 0.003505378495901823f, 0.0068963682278990746f, 0.011398039758205414f, 0.01555862557142973f, 0.01694556139409542f, 0.013469405472278595f, 0.005167703609913588f, -0.005167703609913588f, -0.013469405472278595f, -0.01694556139409542f, -0.01555862557142973f, -0.011398039758205414f, -0.0068963682278990746f, -0.003505378495901823f, -0.0015113599365577102f, -0.0005560694844461977f, -0.00017528812168166041f, -4.74731859867461e-05f, -1.106864419853082e-05f, -2.2250856090977322e-06f, -3.8610735941801977e-07f, -5.7885742421603936e-08f, -7.503259347174662e-09f},
    {5.640448108579221e-09f, 4.014276910879744e-08f, 2.4575109591751243e-07f, 1.2917727190142614e-06f, 5.8163932408206165e-06f, 2.2363172320183367e-05f, 7.31048421585001e-05f, 0.0002019252860918641f, 0.00046682398533448577f, 0.0008892904152162373f, 0.0013559028739109635f, 0.0015488947974517941f, 0.0010566578712314367f, -0.0002809962898027152f, -0.002038290025666356f, -0.0033030773047357798f, -0.0033030773047357798f, -0.002038290025666356f, -0.0002809962898027152f, 0.0010566578712314367f, 0.0015488947974517941f, 0.0013559028739109635f, 0.0008892904152162373f, 0.00046682398533448577f, 0.0002019252860918641f, 7.31048421585001e-05f, 2.2363172320183367e-05f, 5.8163932408206165e-06f, 1.2917727190142614e-06f, 2.4575109591751243e-07f, 4.014276910879744e-08f, 5.640444999954752e-09f},
    {2.8400690688101804e-09f, 1.8760070830126097e-08f, 1.0581295128986312e-07f, 5.07826769080566e-07f, 2.063930651274859e-06f, 7.055882633721922e-06f, 2.008678529819008e-05f, 4.684935629484244e-05f, 8.691493712831289e-05f, 0.00012016813707305118f, 9.999738540500402e-05f, -2.160065560019575e-05f, -0.00023265357594937086f, -0.0004187836602795869f, -0.00042030357872135937f, -0.00017800144269131124f, 0.00017800144269131124f, 0.00042030357872135937f, 0.0004187836602795869f, 0.00023265357594937086f, 2.160065560019575e-05f, -9.999738540500402e-05f, -0.00012016813707305118f, -8.691493712831289e-05f, -4.684935629484244e-05f, -2.008678529819008e-05f, -7.055882633721922e-06f, -2.063930651274859e-06f, -5.07826769080566e-07f, -1.0581296550071784e-07f, -1.8760076159196615e-08f, -2.8400808371742414e-09f}
};

// The row kernels of one ISA for compute type E (float; double on the portable path) and GEMM-operand type TG
// (float, bfloat16, double). Row pointers are nullptr for rows outside the image. wk: 9 taps (ky * 3 + kx).
template <class E, class TG>
struct Rows {
  // out[x] = dwb + sum_{valid taps} wk * (row_ky[x + kx - 1] + b1)   (the depthwise 3x3 of fc1's output + bias)
  void (*dw)(const E* up, const E* mid, const E* dn, const E* wk, E b1, E dwb, int64_t W, E* out);
  // out[x] = GELU(p[x]) (converted to TG)
  void (*gelu)(const E* p, int64_t W, TG* out);
  // The forward's depthwise 3x3 + GELU of one hidden channel, rows [r0, r1) of an H-row image in one call (no row
  // buffer): g[(y - r0) * W + x] = GELU(dw(y, x)), dw as row_dw's out; h holds the channel's rows ri0, ri0 + 1, ...
  // (W apart), g is TG.
  void (*dw_gelu)(const E* h, int64_t ri0, int64_t r0, int64_t r1, int64_t H, int64_t W, const E* wk, E b1, E dwb,
                  TG* g);
  // dp[x] = dg[x] * GELU'(p[x]) (dp may alias dg); g[x] = GELU(p[x]) when g != nullptr
  void (*gelu_bwd)(const E* p, const E* dg, int64_t W, E* dp, TG* g);
  // acc[t] += sum_x dp[x] * (row_ky[x + kx - 1] + b1) for the 9 taps t over valid taps (fc1's output is h + b1;
  // acc of absent rows unchanged)
  void (*dw_wgrad)(const E* dp, const E* up, const E* mid, const E* dn, E b1, int64_t W, E* acc);
  // out (TG) = in (E) converted (not stored when out is nullptr or in); sum[0] += sum of in (sum != nullptr)
  void (*convert)(const E* in, int64_t W, TG* out, E* sum);
};

}  // namespace mlp
}  // namespace segnext_cpu

#endif  // SEGNEXT_MLP_CPU_KERNELS_H_COMMON

// ================================================================================================================
// Row kernels, one copy per ISA (the includer opens a namespace and, for ISA 1/2, a #pragma GCC target region).
#ifdef SEGNEXT_MLP_ROWS

#if SEGNEXT_MLP_ROWS == 0
// Portable scalar (float or double): libm's erf / exp.
template <class E>
struct V {
  using reg = E;
  static constexpr int L = 1;
  static inline reg ldm(const E* p, int lo, int hi) { return (lo <= 0 && 0 < hi) ? *p : E(0); }
  static inline void stm(E* p, reg v, int n) { if (n > 0) *p = v; }
  static inline reg set1(E x) { return x; }
  static inline reg put(reg, int, E x) { return x; }  // lane i of a (the only lane) set to x
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline E hsum(reg v) { return v; }
  static inline void gelu2(reg v, reg* g, reg* d) {
    const E cdf2 = E(1) + std::erf(v * E(0.70710678118654752440));  // 2 Phi(v)
    if (g) *g = E(0.5) * v * cdf2;
    if (d) *d = E(0.5) * cdf2 + v * E(0.39894228040143267794) * std::exp(E(-0.5) * v * v);
  }
  static inline reg gelu_fwd(reg v) {
    reg g;
    gelu2(v, &g, nullptr);
    return g;
  }
  template <class TG>
  static inline void stm_cvt(TG* p, reg v, int n) { if (n > 0) *p = static_cast<TG>(v); }
};
#define SEGNEXT_MLP_E_T template <class E>
#define SEGNEXT_MLP_V V<E>

#else  // x86 vector ISAs, float only
#if SEGNEXT_MLP_ROWS == 2
struct V {
  using reg = __m512;
  static constexpr int L = 16;
  static inline __mmask16 mask(int lo, int hi) {
    uint32_t m = (hi >= 16 ? 0xffffu : ((1u << std::max(hi, 0)) - 1u)) & ~((1u << std::max(lo, 0)) - 1u);
    return static_cast<__mmask16>(m);
  }
  static inline reg ldm(const float* p, int lo, int hi) {
    if (lo <= 0 && hi >= 16) return _mm512_loadu_ps(p);
    return _mm512_maskz_loadu_ps(mask(lo, hi), p);
  }
  static inline void stm(float* p, reg v, int n) {
    if (n >= 16) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, mask(0, n), v);
  }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg put(reg a, int i, float x) {  // lane i of a set to x
    return _mm512_mask_mov_ps(a, static_cast<__mmask16>(1u << i), _mm512_set1_ps(x));
  }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(reg v) { return _mm512_reduce_add_ps(v); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg abs(reg a) { return _mm512_abs_ps(a); }
  static inline reg maxv(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline reg minv(reg a, reg b) { return _mm512_min_ps(a, b); }
  static inline reg rcp(reg d) {  // 1/d to ~2^-28 (rcp14 + one Newton step)
    reg r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  }
  static inline reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline reg scale2(reg p, reg n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
  static inline reg select_ge0(reg z, reg a, reg b) {  // z >= 0 ? a : b
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
  }
  // GELU(v) = v Phi(v) with Phi from kGeluPhi: the interval's 5 coefficients picked per lane by vpermt2ps (32 entries
  // in two registers), 4 FMAs in u; Phi = 0 below -6 (|GELU| < 6e-9 there, eager gives -0), the last interval's
  // value (1 in fp32) above 6. About 15 vector FP operations + 5 permutes per 16 values, against ~20 FP operations of
  // the rational erf. Special values as v Phi(v) in IEEE arithmetic (the float64 formula, and eager's GELU in float64
  // and on AVX2): NaN stays NaN (max takes the clamp's constant for a NaN t; the mask keeps NaN lanes), +inf gives
  // +inf (Phi = 1), -inf NaN (-inf * 0). Eager's fp32 GELU on AVX-512 gives NaN for +inf as well.
  static inline reg gelu_table(reg v) {
    const reg t = _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(8.0f / 3.0f), _mm512_set1_ps(16.0f)),
                                              _mm512_setzero_ps()),
                                _mm512_set1_ps(31.999998f));
    const reg f = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512i i = _mm512_cvttps_epi32(f);
    const reg u = _mm512_sub_ps(_mm512_sub_ps(t, f), _mm512_set1_ps(0.5f));
    auto coef = [&](int d) {
      return _mm512_permutex2var_ps(_mm512_load_ps(kGeluPhi[d]), i, _mm512_load_ps(kGeluPhi[d] + 16));
    };
    reg p = _mm512_fmadd_ps(coef(4), u, coef(3));
    p = _mm512_fmadd_ps(p, u, coef(2));
    p = _mm512_fmadd_ps(p, u, coef(1));
    p = _mm512_fmadd_ps(p, u, coef(0));
    // v Phi(v), Phi = 0 below -6: -0 for a finite v there, NaN for -inf
    return _mm512_mul_ps(v, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(-6.0f), _CMP_NLT_UQ), p));
  }
  template <class TG>
  static inline void stm_cvt(TG* p, reg v, int n) {
    if constexpr (std::is_same_v<TG, float>) {
      stm(p, v, n);
    } else {
      if (n >= 16) {
        vec::VecAvx512::store_cvt<TG>(p, v);
      } else {
        alignas(64) TG tmp[16];
        vec::VecAvx512::store_cvt<TG>(tmp, v);
        std::memcpy(p, tmp, sizeof(TG) * std::max(n, 0));
      }
    }
  }
#else  // AVX2
struct V {
  using reg = __m256;
  static constexpr int L = 8;
  static inline __m256i mask(int lo, int hi) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i ge_lo = _mm256_cmpgt_epi32(iota, _mm256_set1_epi32(lo - 1));
    __m256i lt_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), iota);
    return _mm256_and_si256(ge_lo, lt_hi);
  }
  static inline reg ldm(const float* p, int lo, int hi) {
    if (lo <= 0 && hi >= 8) return _mm256_loadu_ps(p);
    return _mm256_maskload_ps(p, mask(lo, hi));
  }
  static inline void stm(float* p, reg v, int n) {
    if (n >= 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, mask(0, n), v);
  }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg put(reg a, int i, float x) {  // lane i of a set to x
    return _mm256_blendv_ps(a, _mm256_set1_ps(x), _mm256_castsi256_ps(mask(i, i + 1)));
  }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline reg maxv(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline reg minv(reg a, reg b) { return _mm256_min_ps(a, b); }
  static inline reg rcp(reg d) {  // rcp (2^-12) + one Newton step
    reg r = _mm256_rcp_ps(d);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  }
  static inline reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline reg scale2(reg p, reg n) {  // n integral in [-127, 0]
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static inline reg select_ge0(reg z, reg a, reg b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ));
  }
  template <class TG>
  static inline void stm_cvt(TG* p, reg v, int n) {
    if constexpr (std::is_same_v<TG, float>) {
      stm(p, v, n);
    } else {
      if (n >= 8) {
        vec::VecAvx2::store_cvt<TG>(p, v);
      } else {
        alignas(32) TG tmp[8];
        vec::VecAvx2::store_cvt<TG>(tmp, v);
        std::memcpy(p, tmp, sizeof(TG) * std::max(n, 0));
      }
    }
  }
#endif
  // exp(x) for x <= 0 (x >= -87 after the clamp; a smaller result than e^-87 does not matter here).
  static inline reg exp_neg(reg x) {
    x = maxv(x, set1(-87.0f));
    reg n = round(mul(x, set1(1.44269504088896341f)));
    reg r = fma(n, set1(-0.693145751953125f), x);  // ln 2 = hi + lo, hi exact in 16 bits
    r = fma(n, set1(-1.428606820309417232e-06f), r);
    // Taylor series of e^r to degree 7 on |r| <= ln2/2: relative error < 2e-8
    reg p = set1(1.0f / 5040);
    p = fma(p, r, set1(1.0f / 720));
    p = fma(p, r, set1(1.0f / 120));
    p = fma(p, r, set1(1.0f / 24));
    p = fma(p, r, set1(1.0f / 6));
    p = fma(p, r, set1(0.5f));
    p = fma(p, r, set1(1.0f));
    p = fma(p, r, set1(1.0f));
    return scale2(p, n);
  }
  // g = GELU(v) = v Phi(v), d = GELU'(v) = Phi(v) + v phi(v); erf by Abramowitz & Stegun 7.1.26
  // (|error| <= 1.5e-7), written as 2 Phi(v) = 1 + erf(z) = (z >= 0 ? 2 - q : q), q = erfc(|z|) ~ poly(t) e^{-z^2},
  // so the left tail has no cancellation.
  static inline void gelu2(reg v, reg* g, reg* d) {
    reg z = mul(v, set1(0.70710678118654752f));
    reg a = abs(z);
    reg t = rcp(fma(a, set1(0.3275911f), set1(1.0f)));
    reg poly = set1(1.061405429f);
    poly = fma(poly, t, set1(-1.453152027f));
    poly = fma(poly, t, set1(1.421413741f));
    poly = fma(poly, t, set1(-0.284496736f));
    poly = fma(poly, t, set1(0.254829592f));
    poly = mul(poly, t);
    reg e = exp_neg(mul(a, sub(set1(0.0f), a)));  // e^{-z^2} = e^{-v^2/2}
    reg q = mul(poly, e);
    reg cdf2 = select_ge0(z, sub(set1(2.0f), q), q);
    if (g) *g = mul(mul(set1(0.5f), v), cdf2);
    if (d) *d = fma(mul(v, set1(0.3989422804014327f)), e, mul(set1(0.5f), cdf2));
  }
  // GELU(v) alone (forwards): erf(z) as an odd / even rational function of z clamped to [-4, 4] (beyond it erf is
  // +-1 in fp32); the minimax coefficients of XLA's and Eigen's single-precision erf. |erf error| <= 5e-7, GELU's
  // absolute error about 1e-6 at |v| ~ 8, as eager fp32's own (measured against float64); about half the operations
  // of gelu2, whose derivative the backward needs. NaN stays NaN: x86 max/min return their second operand when one
  // is NaN, so the clamp takes z second.
  static inline reg gelu_fwd(reg v) {
#if SEGNEXT_MLP_ROWS == 2
    return gelu_table(v);  // AVX-512: the table (fewer operations); the rational below is the AVX2 path
#else
    const reg z = minv(set1(4.0f), maxv(set1(-4.0f), mul(v, set1(0.70710678118654752f))));
    const reg z2 = mul(z, z);
    reg p = fma(z2, set1(-2.72614225801306e-10f), set1(2.77068142495902e-08f));
    p = fma(z2, p, set1(-2.10102402082508e-06f));
    p = fma(z2, p, set1(-5.69250639462346e-05f));
    p = fma(z2, p, set1(-7.34990630326855e-04f));
    p = fma(z2, p, set1(-2.95459980854025e-03f));
    p = fma(z2, p, set1(-1.60960333262415e-02f));
    p = mul(z, p);
    reg q = fma(z2, set1(-1.45660718464996e-05f), set1(-2.13374055278905e-04f));
    q = fma(z2, q, set1(-1.68282697438203e-03f));
    q = fma(z2, q, set1(-7.37332916720468e-03f));
    q = fma(z2, q, set1(-1.42647390514189e-02f));
    const reg erf = mul(p, rcp(q));
    const reg hv = mul(set1(0.5f), v);
    // v * 0 below -6 (erf's rounding left |v| * 1e-8 there, far from 0 for a large |v|): -0 for a finite v, NaN
    // for -inf and for NaN (the comparison fails); +inf gives +inf (erf(4) = 1), as the float64 formula
    return select_ge0(add(v, set1(6.0f)), fma(hv, erf, hv), mul(v, set1(0.0f)));
#endif
  }
};
#define SEGNEXT_MLP_E_T template <class E = float>
#define SEGNEXT_MLP_V V
#endif

SEGNEXT_MLP_E_T
void row_dw(const E* up, const E* mid, const E* dn, const E* wk, E b1, E dwb, int64_t W, E* out) {
  using Vv = SEGNEXT_MLP_V;
  using reg = typename Vv::reg;
  const E* rows[3] = {up, mid, dn};
  E wsum = 0;
  for (int ky = 0; ky < 3; ++ky)
    if (rows[ky]) wsum += wk[ky * 3] + wk[ky * 3 + 1] + wk[ky * 3 + 2];
  const reg base = Vv::set1(dwb + b1 * wsum);
  reg w[9];
  for (int t = 0; t < 9; ++t) w[t] = Vv::set1(wk[t]);
  for (int64_t x0 = 0; x0 < W; x0 += Vv::L) {
    const int n = static_cast<int>(std::min<int64_t>(Vv::L, W - x0));
    const int nr = static_cast<int>(std::min<int64_t>(Vv::L, W - 1 - x0));
    reg acc = base;
    for (int ky = 0; ky < 3; ++ky) {
      const E* r = rows[ky];
      if (!r) continue;
      acc = Vv::fma(w[ky * 3 + 0], Vv::ldm(r + x0 - 1, x0 == 0 ? 1 : 0, n), acc);
      acc = Vv::fma(w[ky * 3 + 1], Vv::ldm(r + x0, 0, n), acc);
      acc = Vv::fma(w[ky * 3 + 2], Vv::ldm(r + x0 + 1, 0, nr), acc);
    }
    Vv::stm(out + x0, acc, n);
  }
  if (b1 != E(0)) {  // the border columns: fc1's bias is absent where the tap falls in the padding
    const int64_t xs[2] = {0, W - 1};
    for (int i = 0; i < (W > 1 ? 2 : 1); ++i) {
      const int64_t x = xs[i];
      E acc = dwb;
      for (int ky = 0; ky < 3; ++ky) {
        const E* r = rows[ky];
        if (!r) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t xx = x + kx - 1;
          if (xx >= 0 && xx < W) acc += wk[ky * 3 + kx] * (r[xx] + b1);
        }
      }
      out[x] = acc;
    }
  }
}

template <class TG, class E>
void row_gelu(const E* p, int64_t W, TG* out) {
  using Vv = SEGNEXT_MLP_V;
  using reg = typename Vv::reg;
  for (int64_t x0 = 0; x0 < W; x0 += Vv::L) {
    const int n = static_cast<int>(std::min<int64_t>(Vv::L, W - x0));
    Vv::template stm_cvt<TG>(out + x0, Vv::gelu_fwd(Vv::ldm(p + x0, 0, n)), n);
  }
}

// dw + GELU over a plane (Rows::dw_gelu), a row at a time. AVX-512: GELU applied to each vector of 9-tap sums in
// registers and stored once (the 9 taps and GELU's table fit the 32 zmm registers; through an L1 row buffer and a
// second loop it was 4-7% slower per MLP at the SegNeXt-T stage shapes, one-off). AVX2 / portable: the sums through
// the row buffer, then GELU (in registers it was 5-7% slower on AVX2, one-off). fc1's bias b1 enters
// as b1 * (the sum of the taps inside the image): a per-row constant except in the two border columns' lanes.
template <class TG, class E>
void plane_dw_gelu(const E* h, int64_t ri0, int64_t r0, int64_t r1, int64_t H, int64_t W, const E* wk, E b1, E dwb,
                   TG* g) {
  using Vv = SEGNEXT_MLP_V;
  using reg = typename Vv::reg;
  constexpr int L = Vv::L;
#if SEGNEXT_MLP_ROWS == 2
  constexpr bool in_regs = true;  // 32 zmm registers hold the taps and the GELU table
#else
  constexpr bool in_regs = false;  // 16 ymm: the taps and GELU's constants would spill (one-off: 5-7% slower)
#endif
  E* tmp = in_regs ? nullptr : static_cast<E*>(scratch(2, sizeof(E) * (W + 64)));
  reg w[9];
  for (int t = 0; t < 9; ++t) w[t] = Vv::set1(wk[t]);
  for (int64_t yy = r0; yy < r1; ++yy) {
    TG* grow = g + (yy - r0) * W;
    auto put = [&](int64_t x0, reg v, int n) {  // GELU(v) to g, or v to the row buffer
      if constexpr (in_regs) Vv::template stm_cvt<TG>(grow + x0, Vv::gelu_fwd(v), n);
      else Vv::stm(tmp + x0, v, n);
    };
    const E* rows[3] = {yy > 0 ? h + (yy - 1 - ri0) * W : nullptr, h + (yy - ri0) * W,
                        yy + 1 < H ? h + (yy + 1 - ri0) * W : nullptr};
    E cl = 0, cc = 0, cr = 0;  // the column sums of the taps kx = 0, 1, 2 over the rows inside the image
    for (int ky = 0; ky < 3; ++ky) {
      if (!rows[ky]) continue;
      cl += wk[ky * 3];
      cc += wk[ky * 3 + 1];
      cr += wk[ky * 3 + 2];
    }
    const E mid = dwb + b1 * (cl + cc + cr);
    const E left = W > 1 ? dwb + b1 * (cc + cr) : dwb + b1 * cc;  // x = 0: no kx = 0 tap (W = 1: kx = 1 only)
    const E right = dwb + b1 * (cl + cc);                          // x = W - 1 (W > 1): no kx = 2 tap
    const reg base = Vv::set1(mid);
    // one partial sum per kernel row: three short dependency chains instead of one of nine FMAs (FMA latency)
    auto edge_chunk = [&](int64_t x0) {  // masked loads, rows outside the image skipped, border bias lanes
      const int n = static_cast<int>(std::min<int64_t>(L, W - x0));
      const int nr = static_cast<int>(std::min<int64_t>(L, W - 1 - x0));
      reg acc = base;
      if (x0 == 0) acc = Vv::put(acc, 0, left);
      if (W > 1 && x0 + L >= W) acc = Vv::put(acc, static_cast<int>(W - 1 - x0), right);
      reg part[3] = {acc, Vv::set1(E(0)), Vv::set1(E(0))};
      for (int ky = 0; ky < 3; ++ky) {
        const E* r = rows[ky];
        if (!r) continue;
        reg a = part[ky];
        a = Vv::fma(w[ky * 3 + 0], Vv::ldm(r + x0 - 1, x0 == 0 ? 1 : 0, n), a);
        a = Vv::fma(w[ky * 3 + 1], Vv::ldm(r + x0, 0, n), a);
        part[ky] = Vv::fma(w[ky * 3 + 2], Vv::ldm(r + x0 + 1, 0, nr), a);
      }
      put(x0, Vv::add(Vv::add(part[0], part[2]), part[1]), n);
    };
    edge_chunk(0);
    int64_t x0 = L;
    if (rows[0] && rows[2]) {  // interior chunks of an interior row: every load whole, no branches
      const E *ru = rows[0], *rm = rows[1], *rd = rows[2];
      for (; x0 + L + 1 <= W; x0 += L) {
        reg a = Vv::fma(w[0], Vv::ldm(ru + x0 - 1, 0, L), base);
        reg b = Vv::mul(w[3], Vv::ldm(rm + x0 - 1, 0, L));
        reg c = Vv::mul(w[6], Vv::ldm(rd + x0 - 1, 0, L));
        a = Vv::fma(w[1], Vv::ldm(ru + x0, 0, L), a);
        b = Vv::fma(w[4], Vv::ldm(rm + x0, 0, L), b);
        c = Vv::fma(w[7], Vv::ldm(rd + x0, 0, L), c);
        a = Vv::fma(w[2], Vv::ldm(ru + x0 + 1, 0, L), a);
        b = Vv::fma(w[5], Vv::ldm(rm + x0 + 1, 0, L), b);
        c = Vv::fma(w[8], Vv::ldm(rd + x0 + 1, 0, L), c);
        put(x0, Vv::add(Vv::add(a, c), b), L);
      }
    }
    for (; x0 < W; x0 += L) edge_chunk(x0);
    if constexpr (!in_regs) row_gelu<TG, E>(tmp, W, grow);
  }
}

template <class TG, class E>
void row_gelu_bwd(const E* p, const E* dg, int64_t W, E* dp, TG* g) {
  using Vv = SEGNEXT_MLP_V;
  using reg = typename Vv::reg;
  for (int64_t x0 = 0; x0 < W; x0 += Vv::L) {
    const int n = static_cast<int>(std::min<int64_t>(Vv::L, W - x0));
    reg gv, dv;
    Vv::gelu2(Vv::ldm(p + x0, 0, n), g ? &gv : nullptr, &dv);
    Vv::stm(dp + x0, Vv::fma(dv, Vv::ldm(dg + x0, 0, n), Vv::set1(E(0))), n);
    if (g) Vv::template stm_cvt<TG>(g + x0, gv, n);
  }
}

SEGNEXT_MLP_E_T
void row_dw_wgrad(const E* dp, const E* up, const E* mid, const E* dn, E b1, int64_t W, E* acc_out) {
  using Vv = SEGNEXT_MLP_V;
  using reg = typename Vv::reg;
  const E* rows[3] = {up, mid, dn};
  reg acc[9];
  for (int t = 0; t < 9; ++t) acc[t] = Vv::set1(E(0));
  reg dsum = Vv::set1(E(0));
  for (int64_t x0 = 0; x0 < W; x0 += Vv::L) {
    const int n = static_cast<int>(std::min<int64_t>(Vv::L, W - x0));
    const int nr = static_cast<int>(std::min<int64_t>(Vv::L, W - 1 - x0));
    const reg d = Vv::ldm(dp + x0, 0, n);
    dsum = Vv::fma(d, Vv::set1(E(1)), dsum);
    for (int ky = 0; ky < 3; ++ky) {
      const E* r = rows[ky];
      if (!r) continue;
      acc[ky * 3 + 0] = Vv::fma(d, Vv::ldm(r + x0 - 1, x0 == 0 ? 1 : 0, n), acc[ky * 3 + 0]);
      acc[ky * 3 + 1] = Vv::fma(d, Vv::ldm(r + x0, 0, n), acc[ky * 3 + 1]);
      acc[ky * 3 + 2] = Vv::fma(d, Vv::ldm(r + x0 + 1, 0, nr), acc[ky * 3 + 2]);
    }
  }
  const E S = Vv::hsum(dsum);
  const E bl = b1 * (W > 1 ? S - dp[0] : E(0)), bc = b1 * S, br = b1 * (W > 1 ? S - dp[W - 1] : E(0));
  for (int ky = 0; ky < 3; ++ky) {
    if (!rows[ky]) continue;
    acc_out[ky * 3 + 0] += Vv::hsum(acc[ky * 3 + 0]) + bl;
    acc_out[ky * 3 + 1] += Vv::hsum(acc[ky * 3 + 1]) + bc;
    acc_out[ky * 3 + 2] += Vv::hsum(acc[ky * 3 + 2]) + br;
  }
}

template <class TG, class E>
void row_convert(const E* in, int64_t W, TG* out, E* sum) {
  using Vv = SEGNEXT_MLP_V;
  using reg = typename Vv::reg;
  reg s = Vv::set1(E(0));
  for (int64_t x0 = 0; x0 < W; x0 += Vv::L) {
    const int n = static_cast<int>(std::min<int64_t>(Vv::L, W - x0));
    reg v = Vv::ldm(in + x0, 0, n);
    s = Vv::fma(v, Vv::set1(E(1)), s);
    if (out == nullptr || static_cast<const void*>(out) == static_cast<const void*>(in)) continue;
    if constexpr (!std::is_same_v<TG, E>) Vv::template stm_cvt<TG>(out + x0, v, n);
    else Vv::stm(out + x0, v, n);
  }
  if (sum) sum[0] += Vv::hsum(s);
}

template <class E, class TG>
segnext_cpu::mlp::Rows<E, TG> make_rows() {
  segnext_cpu::mlp::Rows<E, TG> r;
  r.dw = &row_dw<E>;
  r.gelu = &row_gelu<TG, E>;
  r.dw_gelu = &plane_dw_gelu<TG, E>;
  r.gelu_bwd = &row_gelu_bwd<TG, E>;
  r.dw_wgrad = &row_dw_wgrad<E>;
  r.convert = &row_convert<TG, E>;
  return r;
}

#undef SEGNEXT_MLP_E_T
#undef SEGNEXT_MLP_V
#endif  // SEGNEXT_MLP_ROWS

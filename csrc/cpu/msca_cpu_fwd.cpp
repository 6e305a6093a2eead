// Fused MSCA forward on CPU (see msca_cpu.h for the math and the packed weight layout).
//
// One pass per (image, band of rows): for every channel the depthwise chain streams down the rows of the band
// (5x5 -> 1x7 / 1x11 / 1x21 -> 7x1 / 11x1 / 21x1 -> sum) in groups of 4 rows through small ring buffers of rows
// (u: 8, a: 14, h21: 24, h11: 19, h7: 17; ~45 KiB at W = 128, L1/L2), register-blocked over the 4 rows (every
// weight loaded into a register once per group, each h row loaded once for the 4 vertical outputs, 4+ independent
// FMA chains per vector even when a row is a single vector), and writes s of the band into a per-thread scratch
// S[C][rows][Wp]; then a register-blocked micro-kernel (6 output channels x 4 pixel vectors on AVX-512) does the
// 1x1 mix over the band's pixels (all C channels of a pixel read from S), adds the bias and gates by u while
// storing. Intermediates are never materialised at B*C*H*W size: S holds one band of one image (or, for small
// images with fewer images than threads, the s of a small group of whole images of <= ~2 MiB, split by channels
// between threads for the depthwise part and by pixels for the mix: the "two-phase" plan, no halo recompute).
// Bands of one image overlap by the 10-row halo of the 21-tap strip (recomputed, ~12 % of the depthwise work at
// 128x128 with 2 bands); whole images per task when the batch divides the threads.
//
// Rows are vectorised along W (NCHW): rows of a / u live in zero-padded buffers (16 zero columns each side), so the
// horizontal taps are unaligned loads at fixed offsets and the zero "same" padding of EVERY intermediate is exact:
// a is zeroed beyond W, rows of u / a / h outside the image are read as a row of zeros (never computed from the
// halo), so nothing out of the image (including uninitialised memory) reaches an output.
//
// Every output element is computed by the same sequence of floating-point operations whatever the band / block /
// thread it lands in (pixel lanes are independent, the mix sums over input channels in order 0..C-1 in every tile
// shape, zero rows depend on the absolute row only), so results are bitwise identical for any number of threads
// and any plan (the plan depends on the shape and at::get_num_threads(); SEGNEXT_MSCA_FWD_PLAN=band:<n>|two:<g>
// forces one, for tests).
//
// ISA: the kernel body below (between SEGNEXT_MSCA_FWD_BODY guards) is compiled three times in this file, for a
// portable GCC-vector-extension target, for AVX2+FMA+F16C and for AVX-512 F/BW/VL/DQ (by #pragma GCC target, no
// -march flags), and msca_forward dispatches on segnext_cpu::isa(). bfloat16 on a CPU with AVX512-BF16 does the mix
// with vdpbf16ps on s rounded to bfloat16 (fp32 accumulation); with AMX too, on AMX tiles (gemm::gemm_bf16 in
// mix_range_gemm). float64 runs the portable path in double.
//
// Build: -O3 -fopenmp -std=c++17 (-fopenmp is required: ATen's at::parallel_for is header-inline OpenMP).

#ifndef SEGNEXT_MSCA_FWD_BODY

#include "msca_cpu.h"
#include "cpu_plans.h"
#include "cpu_scratch.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <utility>
#include <string>

#include "cpu_alloc.h"
#include "cpu_isa.h"
#include "cpu_vec.h"
#include "gemm_bf16.h"
#include "mlp_cpu_kernels.h"

namespace segnext_cpu {
namespace fwd_common {

// Execution plan (shape and thread-count dependent; results do not depend on it).
struct Plan {
  int mode = 0;      // 0: bands (each task = one band of one image, all channels, depthwise + mix)
                     // 1: two-phase (groups of whole images: depthwise split by channel, then mix split by pixels)
  int64_t nb = 1;    // bands per image (mode 0)
  int64_t group = 1; // images per group (mode 1)
};

// Per-thread scratch kept between calls (cpu_scratch.h, slots shared with the MLP kernels): 0-3 the kernel's scratch,
// 4 msca_forward_official's packed weights.
using Buffer = ScratchBuffer;
inline Buffer& thread_buffer(int which) { return thread_scratch(which); }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The override "band:<n>" | "two:<images per group>" (SEGNEXT_MSCA_FWD_PLAN, read once by the Python package:
// cpu_plans.h) replaces the plan (tuning, tests of plan invariance).
inline Plan choose_plan(int64_t B, int64_t C, int64_t H, int64_t Wp, int64_t esize) {
  Plan pl;
  const std::string s = plan_override(PlanKnob::msca_fwd);
  if (!s.empty()) {
    if (s.rfind("band:", 0) == 0) {
      pl.mode = 0;
      pl.nb = std::max<int64_t>(1, std::min<int64_t>(H, std::atoll(s.c_str() + 5)));
      return pl;
    }
    if (s.rfind("two:", 0) == 0) {
      pl.mode = 1;
      pl.group = std::max<int64_t>(1, std::min<int64_t>(B, std::atoll(s.c_str() + 4)));
      return pl;
    }
  }
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  if (nt == 1 || B % nt == 0) return pl;  // whole images per task: no halo recompute
  const int64_t img = C * H * Wp * esize;
  // small images (s of one image <= 1.5 MiB, i.e. cache-sized: stages 3-4 of SegNeXt at 512x512, stage 2 of -T):
  // two-phase on groups of images whose s stays within ~1.5 MiB, no halo recompute. Larger images: row bands.
  constexpr int64_t kTwoPhaseBytes = int64_t(3) << 19;
  if (img <= kTwoPhaseBytes) {
    pl.mode = 1;
    pl.group = std::max<int64_t>(1, std::min<int64_t>(B, kTwoPhaseBytes / img));
    return pl;
  }
  const int64_t g = std::gcd(B, nt);
  pl.nb = std::max<int64_t>(1, std::min<int64_t>(nt / g, H / 8));
  return pl;
}

}  // namespace fwd_common

// ----------------------------------------------------------------------------------------------------------------
// The kernel body, compiled per ISA.
namespace fwd_generic {
#define SEGNEXT_MSCA_FWD_BODY 0
#include "msca_cpu_fwd.cpp"
#undef SEGNEXT_MSCA_FWD_BODY
void run_f32(const float* u, float* out, int64_t B, int64_t C, int64_t H, int64_t W, const float* w0,
             const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  run<vec::VecGeneric<float>, float>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
void run_bf16(const c10::BFloat16* u, c10::BFloat16* out, int64_t B, int64_t C, int64_t H, int64_t W,
              const float* w0, const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  run<vec::VecGeneric<float>, c10::BFloat16>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
void run_f16(const c10::Half* u, c10::Half* out, int64_t B, int64_t C, int64_t H, int64_t W, const float* w0,
             const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  run<vec::VecGeneric<float>, c10::Half>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
void run_f64(const double* u, double* out, int64_t B, int64_t C, int64_t H, int64_t W, const double* w0,
             const double* b0, const double* ws, const double* bs, const double* w3, const double* b3) {
  run<vec::VecGeneric<double>, double>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
}  // namespace fwd_generic

#if SEGNEXT_VEC_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fwd_avx2 {
#define SEGNEXT_MSCA_FWD_BODY 1
#include "msca_cpu_fwd.cpp"
#undef SEGNEXT_MSCA_FWD_BODY
void run_f32(const float* u, float* out, int64_t B, int64_t C, int64_t H, int64_t W, const float* w0,
             const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  run<vec::VecAvx2, float>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
void run_bf16(const c10::BFloat16* u, c10::BFloat16* out, int64_t B, int64_t C, int64_t H, int64_t W,
              const float* w0, const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  run<vec::VecAvx2, c10::BFloat16>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
void run_f16(const c10::Half* u, c10::Half* out, int64_t B, int64_t C, int64_t H, int64_t W, const float* w0,
             const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  run<vec::VecAvx2, c10::Half>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
}  // namespace fwd_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace fwd_avx512 {
#define SEGNEXT_MSCA_FWD_BODY 2
#include "msca_cpu_fwd.cpp"
#undef SEGNEXT_MSCA_FWD_BODY
void run_f32(const float* u, float* out, int64_t B, int64_t C, int64_t H, int64_t W, const float* w0,
             const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  run<vec::VecAvx512, float>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
void run_bf16(const c10::BFloat16* u, c10::BFloat16* out, int64_t B, int64_t C, int64_t H, int64_t W,
              const float* w0, const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  // with AMX the bf16 mix runs as gemm_bf16 on AMX tiles from the fp32 S layout (mix_range_gemm), else vdpbf16ps tiles
  run<vec::VecAvx512, c10::BFloat16>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3,
                                     has_avx512_bf16() && !gemm::amx_available());
}
void run_f16(const c10::Half* u, c10::Half* out, int64_t B, int64_t C, int64_t H, int64_t W, const float* w0,
             const float* b0, const float* ws, const float* bs, const float* w3, const float* b3) {
  run<vec::VecAvx512, c10::Half>(u, out, B, C, H, W, w0, b0, ws, bs, w3, b3, false);
}
}  // namespace fwd_avx512
#pragma GCC pop_options
#endif  // SEGNEXT_VEC_X86

// ----------------------------------------------------------------------------------------------------------------
namespace {



at::Tensor msca_forward_ptrs(const at::Tensor& u, const void* const pw[6]) {
  const auto dt = u.scalar_type();
  const int64_t B = u.size(0), C = u.size(1), H = u.size(2), W = u.size(3);
  at::Tensor out = empty_output_like(u);
  if (u.numel() == 0) return out;

  const at::Tensor uc = u.contiguous();
  at::Tensor oc = out.is_contiguous() ? out : empty_output(u.sizes(), u.options());

  if (dt == at::kDouble) {
    const double* pd[6];
    for (int i = 0; i < 6; ++i) pd[i] = static_cast<const double*>(pw[i]);
    fwd_generic::run_f64(uc.data_ptr<double>(), oc.data_ptr<double>(), B, C, H, W, pd[0], pd[1], pd[2], pd[3],
                         pd[4], pd[5]);
  } else {
    const float* pf[6];
    for (int i = 0; i < 6; ++i) pf[i] = static_cast<const float*>(pw[i]);
    const Isa is = isa();
#define SEGNEXT_FWD_CALL(NS)                                                                                     \
  if (dt == at::kFloat)                                                                                          \
    NS::run_f32(uc.data_ptr<float>(), oc.data_ptr<float>(), B, C, H, W, pf[0], pf[1], pf[2], pf[3], pf[4], pf[5]); \
  else if (dt == at::kBFloat16)                                                                                  \
    NS::run_bf16(uc.data_ptr<c10::BFloat16>(), oc.data_ptr<c10::BFloat16>(), B, C, H, W, pf[0], pf[1], pf[2],   \
                 pf[3], pf[4], pf[5]);                                                                           \
  else                                                                                                           \
    NS::run_f16(uc.data_ptr<c10::Half>(), oc.data_ptr<c10::Half>(), B, C, H, W, pf[0], pf[1], pf[2], pf[3],     \
                pf[4], pf[5]);
#if SEGNEXT_VEC_X86
    if (is == Isa::avx512) {
      SEGNEXT_FWD_CALL(fwd_avx512)
    } else if (is == Isa::avx2) {
      SEGNEXT_FWD_CALL(fwd_avx2)
    } else {
      SEGNEXT_FWD_CALL(fwd_generic)
    }
#else
    (void)is;
    SEGNEXT_FWD_CALL(fwd_generic)
#endif
#undef SEGNEXT_FWD_CALL
  }
  if (!oc.is_same(out)) out.copy_(oc);
  return out;
}

void check_u(const at::Tensor& u) {
  TORCH_CHECK(u.device().is_cpu(), "msca_forward: u must be a CPU tensor, got device ", u.device());
  TORCH_CHECK(u.dim() == 4, "msca_forward: u must be 4-D (B, C, H, W), got ", u.dim(), "-D with shape ", u.sizes());
  const auto dt = u.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "msca_forward: u must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(u.size(1) >= 1, "msca_forward: u must have C >= 1 channels, got shape ", u.sizes());
}

}  // namespace

at::Tensor msca_forward(const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& ws,
                        const at::Tensor& bs, const at::Tensor& w3, const at::Tensor& b3) {
  check_u(u);
  const int64_t C = u.size(1);
  const auto wdt = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_packed_weights("msca_forward", C, wdt, w0, b0, ws, bs, w3, b3);
  const at::Tensor wc[6] = {w0.contiguous(), b0.contiguous(), ws.contiguous(), bs.contiguous(), w3.contiguous(),
                            b3.contiguous()};
  const void* pw[6];
  for (int i = 0; i < 6; ++i) pw[i] = wc[i].data_ptr();
  return msca_forward_ptrs(u, pw);
}

at::Tensor msca_forward_official(const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0,
                                 const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& bs,
                                 const at::Tensor& w3, const at::Tensor& b3) {
  check_u(u);
  const int64_t C = u.size(1);
  const bool f64 = u.scalar_type() == at::kDouble;
  const size_t esize = f64 ? sizeof(double) : sizeof(float);
  // the packed small weights go to a buffer of this thread that is kept between calls (a fresh allocation each
  // call was page-faulted in again: ~15 us at C = 256); w3 is used in place when it is dense already
  void* small = fwd_common::thread_buffer(4).get(static_cast<size_t>(C) * kSmallElems * esize);
  const at::Tensor w3c = msca_pack_small(small, u.scalar_type(), w0, b0, ws, bs, w3, b3);
  const char* p = static_cast<const char*>(small);
  const void* pw[6] = {p + C * kSmallW0 * esize, p + C * kSmallB0 * esize, p + C * kSmallWs * esize,
                       p + C * kSmallBs * esize, w3c.data_ptr(), p + C * kSmallB3 * esize};
  return msca_forward_ptrs(u, pw);
}

}  // namespace segnext_cpu

#else  // SEGNEXT_MSCA_FWD_BODY: the per-ISA kernel body ----------------------------------------------------------

using fwd_common::Buffer;
using fwd_common::Plan;
using fwd_common::round_up;
using fwd_common::thread_buffer;

constexpr int64_t kPad = 16;  // zero columns each side of the padded row buffers (>= 10 taps, multiple of L)
constexpr int64_t kSPad = 16, kSPad16 = 32;  // S channel stride padding (elements): no 4 KiB set aliasing

// Depthwise weights of one channel (E: float, or double for the float64 path).
template <class E>
struct ChanW {
  const E* w0;  // 25
  E b0;
  const E* ws;  // 78
  const E* bs;  // 6
  E bsum;       // bs[1] + bs[3] + bs[5] (vertical biases), added to a
};

// Per-thread ring buffers of the depthwise chain of one channel. The chain advances in groups of up to kG rows:
// a / h rows t .. t+kG-1 are computed together, then s rows y .. y+kG-1 (t = y + 10): every weight is loaded into
// a register once per group, and the row blocking gives kG independent accumulation chains per vector (the
// chains of one vector are latency-bound when a row is a single vector, W <= 16).
constexpr int kG = 4;
constexpr int64_t kRU = 8, kRA = 14, kR21 = 24, kR11 = 19, kR7 = 17;  // ring sizes (rows)

template <class E>
struct DwBuf {
  int64_t H, W, Wp, RW;
  E* zrow;  // RW zeros
  E* uring; // kRU x RW
  E* aring; // kRA x RW
  E* h21;   // kR21 x Wp
  E* h11;   // kR11 x Wp
  E* h7;    // kR7 x Wp
  static int64_t elems(int64_t Wp) { return (1 + kRU + kRA) * (Wp + 2 * kPad) + (kR21 + kR11 + kR7) * Wp; }
  void init(E* base, int64_t H_, int64_t W_, int64_t Wp_) {
    H = H_; W = W_; Wp = Wp_; RW = Wp + 2 * kPad;
    std::memset(base, 0, sizeof(E) * elems(Wp));  // pads and tails stay zero
    zrow = base; uring = zrow + RW; aring = uring + kRU * RW; h21 = aring + kRA * RW; h11 = h21 + kR21 * Wp;
    h7 = h11 + kR11 * Wp;
  }
  bool in(int64_t r) const { return r >= 0 && r < H; }
  const E* urow(int64_t r) const { return in(r) ? uring + (r % kRU) * RW + kPad : zrow + kPad; }
  E* arow(int64_t r) const { return aring + (r % kRA) * RW + kPad; }
  const E* arow_or0(int64_t r) const { return in(r) ? arow(r) : zrow + kPad; }
  E* h21row(int64_t r) const { return h21 + (r % kR21) * Wp; }
  E* h11row(int64_t r) const { return h11 + (r % kR11) * Wp; }
  E* h7row(int64_t r) const { return h7 + (r % kR7) * Wp; }
  const E* h21_or0(int64_t r) const { return in(r) ? h21row(r) : zrow + kPad; }
  const E* h11_or0(int64_t r) const { return in(r) ? h11row(r) : zrow + kPad; }
  const E* h7_or0(int64_t r) const { return in(r) ? h7row(r) : zrow + kPad; }
};

template <class V, class T>
static inline void copy_row(const T* src, typename V::E* dst, int64_t W) {
  constexpr int L = V::L;
  int64_t x = 0;
  for (; x + L <= W; x += L) V::store(dst + x, V::template load_cvt<T>(src + x));
  for (; x < W; ++x) dst[x] = static_cast<typename V::E>(src[x]);
}

// a(t .. t+NR-1) = b0 + 5x5 taps (ky, then kx order) over u rows t-2 .. t+NR+1 (zero rows outside the image);
// lanes >= W zeroed.
template <class V, int NR>
static inline void dw_a_rows(const DwBuf<typename V::E>& bf, const ChanW<typename V::E>& cw, int64_t t) {
  using E = typename V::E;
  using R = typename V::reg;
  constexpr int L = V::L;
  const E* r[NR + 4];
  for (int k = 0; k < NR + 4; ++k) r[k] = bf.urow(t - 2 + k);
  E* o[NR];
  for (int k = 0; k < NR; ++k) o[k] = bf.arow(t + k);
  R w[25];
  for (int k = 0; k < 25; ++k) w[k] = V::set1(cw.w0[k]);
  const R b = V::set1(cw.b0);
  for (int64_t x = 0; x < bf.Wp; x += L) {
    R acc[NR];
    for (int k = 0; k < NR; ++k) acc[k] = b;
#pragma GCC unroll 8
    for (int ki = 0; ki < NR + 4; ++ki) {
#pragma GCC unroll 5
      for (int kx = 0; kx < 5; ++kx) {
        const R d = V::loadu(r[ki] + x + kx - 2);
#pragma GCC unroll 4
        for (int k = 0; k < NR; ++k) {
          const int ky = ki - k;
          if (ky >= 0 && ky < 5) acc[k] = V::fmadd(w[ky * 5 + kx], d, acc[k]);
        }
      }
    }
    for (int k = 0; k < NR; ++k) V::store(o[k] + x, acc[k]);
  }
  for (int k = 0; k < NR; ++k)
    for (int64_t x = bf.W; x < bf.Wp; ++x) o[k][x] = E(0);
}

#if SEGNEXT_MSCA_FWD_BODY == 2
// AVX-512 h21, h11, h7 of rows t .. t+NR-1 in one pass: per row and output vector three aligned loads (x - 16, x,
// x + 16) and the 21 shifted windows (offsets -10 .. 10) built from them by valignd, each window feeding the taps of
// every strip that reads it (39 FMAs per 21 windows). The unaligned loads of the generic version below split cache
// lines for 15 of 16 offsets. Same FMA sequence per accumulator as the generic version (bitwise the same h).
template <int D>
static inline __m512 window16(__m512 lo, __m512 mid, __m512 hi) {
  if constexpr (D == 0) {
    return mid;
  } else if constexpr (D > 0) {
    return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(mid), D));
  } else {
    return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(mid), _mm512_castps_si512(lo), 16 + D));
  }
}

struct HAcc {
  __m512 e, o, c11, c7;  // h21's even / odd taps, h11, h7
};

template <int I>
static inline void h_tap(HAcc& h, __m512 lo, __m512 mid, __m512 hi, const float* w21, const float* w11,
                         const float* w7) {
  constexpr int D = I - 10;
  const __m512 v = window16<D>(lo, mid, hi);
  if constexpr (I % 2 == 0) h.e = _mm512_fmadd_ps(_mm512_set1_ps(w21[I]), v, h.e);
  else h.o = _mm512_fmadd_ps(_mm512_set1_ps(w21[I]), v, h.o);
  if constexpr (D >= -5 && D <= 5) h.c11 = _mm512_fmadd_ps(_mm512_set1_ps(w11[D + 5]), v, h.c11);
  if constexpr (D >= -3 && D <= 3) h.c7 = _mm512_fmadd_ps(_mm512_set1_ps(w7[D + 3]), v, h.c7);
}

template <int... I>
static inline void h_taps(std::integer_sequence<int, I...>, HAcc& h, __m512 lo, __m512 mid, __m512 hi,
                          const float* w21, const float* w11, const float* w7) {
  (h_tap<I>(h, lo, mid, hi, w21, w11, w7), ...);
}

template <int NR>
static inline void dw_h_rows_avx512(const DwBuf<float>& bf, const ChanW<float>& cw, int64_t t) {
  const float* a[NR];
  float *o21[NR], *o11[NR], *o7[NR];
  for (int k = 0; k < NR; ++k) {
    a[k] = bf.arow(t + k); o21[k] = bf.h21row(t + k); o11[k] = bf.h11row(t + k); o7[k] = bf.h7row(t + k);
  }
  const float *w21 = cw.ws + 36, *w11 = cw.ws + 14, *w7 = cw.ws;
  const __m512 b21 = _mm512_set1_ps(cw.bs[4]), b11 = _mm512_set1_ps(cw.bs[2]), b7 = _mm512_set1_ps(cw.bs[0]);
  for (int64_t x = 0; x < bf.Wp; x += 16) {
#pragma GCC unroll 4
    for (int k = 0; k < NR; ++k) {
      const __m512 lo = _mm512_load_ps(a[k] + x - 16), mid = _mm512_load_ps(a[k] + x),
                   hi = _mm512_load_ps(a[k] + x + 16);
      HAcc h{b21, _mm512_setzero_ps(), b11, b7};
      h_taps(std::make_integer_sequence<int, 21>{}, h, lo, mid, hi, w21, w11, w7);
      _mm512_store_ps(o21[k] + x, _mm512_add_ps(h.e, h.o));
      _mm512_store_ps(o11[k] + x, h.c11);
      _mm512_store_ps(o7[k] + x, h.c7);
    }
  }
}
#endif

// h21, h11, h7 of rows t .. t+NR-1 from a: h21 in one pass (21 weights in registers, two chains per row), then h11
// and h7 in a second pass sharing the 11 shifted loads.
template <class V, int NR>
static inline void dw_h_rows(const DwBuf<typename V::E>& bf, const ChanW<typename V::E>& cw, int64_t t) {
  using E = typename V::E;
  using R = typename V::reg;
  constexpr int L = V::L;
#if SEGNEXT_MSCA_FWD_BODY == 2
  if constexpr (std::is_same_v<V, vec::VecAvx512>) {
    dw_h_rows_avx512<NR>(bf, cw, t);
    return;
  }
#endif
  const E* a[NR];
  E *o21[NR], *o11[NR], *o7[NR];
  for (int k = 0; k < NR; ++k) {
    a[k] = bf.arow(t + k); o21[k] = bf.h21row(t + k); o11[k] = bf.h11row(t + k); o7[k] = bf.h7row(t + k);
  }
  {
    R w[21];
    for (int d = 0; d < 21; ++d) w[d] = V::set1(cw.ws[36 + d]);
    const R b21 = V::set1(cw.bs[4]);
    for (int64_t x = 0; x < bf.Wp; x += L) {
      R e[NR], o[NR];
      for (int k = 0; k < NR; ++k) { e[k] = b21; o[k] = V::zero(); }
#pragma GCC unroll 10
      for (int d = 0; d < 20; d += 2) {
#pragma GCC unroll 4
        for (int k = 0; k < NR; ++k) {
          e[k] = V::fmadd(w[d], V::loadu(a[k] + x + d - 10), e[k]);
          o[k] = V::fmadd(w[d + 1], V::loadu(a[k] + x + d - 9), o[k]);
        }
      }
      for (int k = 0; k < NR; ++k) {
        e[k] = V::fmadd(w[20], V::loadu(a[k] + x + 10), e[k]);
        V::store(o21[k] + x, V::add(e[k], o[k]));
      }
    }
  }
  {
    R w11[11], w7[7];
    for (int d = 0; d < 11; ++d) w11[d] = V::set1(cw.ws[14 + d]);
    for (int d = 0; d < 7; ++d) w7[d] = V::set1(cw.ws[d]);
    const R b7 = V::set1(cw.bs[0]), b11 = V::set1(cw.bs[2]);
    for (int64_t x = 0; x < bf.Wp; x += L) {
      R a11[NR], a7[NR];
      for (int k = 0; k < NR; ++k) { a11[k] = b11; a7[k] = b7; }
#pragma GCC unroll 11
      for (int d = 0; d < 11; ++d) {
#pragma GCC unroll 4
        for (int k = 0; k < NR; ++k) {
          const R v = V::loadu(a[k] + x + d - 5);
          a11[k] = V::fmadd(w11[d], v, a11[k]);
          if (d >= 2 && d < 9) a7[k] = V::fmadd(w7[d - 2], v, a7[k]);
        }
      }
      for (int k = 0; k < NR; ++k) { V::store(o11[k] + x, a11[k]); V::store(o7[k] + x, a7[k]); }
    }
  }
}

// s(y .. y+NR-1) = [a + bsum + 21-tap vertical] + [11-tap + 7-tap vertical] (taps in order; rows outside the image
// are zero rows), the vertical taps register-blocked over the NR output rows (each h row loaded once).
template <class V, int NR>
static inline void dw_s_rows(const DwBuf<typename V::E>& bf, const ChanW<typename V::E>& cw, int64_t y,
                             typename V::E* so, int64_t sstride) {
  using E = typename V::E;
  using R = typename V::reg;
  constexpr int L = V::L;
  const E* p21[NR + 20];
  const E* p11[NR + 10];
  const E* p7[NR + 6];
  const E* pa[NR];
  for (int k = 0; k < NR + 20; ++k) p21[k] = bf.h21_or0(y - 10 + k);
  for (int k = 0; k < NR + 10; ++k) p11[k] = bf.h11_or0(y - 5 + k);
  for (int k = 0; k < NR + 6; ++k) p7[k] = bf.h7_or0(y - 3 + k);
  for (int k = 0; k < NR; ++k) pa[k] = bf.arow(y + k);
  const R bsum = V::set1(cw.bsum);
  // weights broadcast where used (an embedded-broadcast FMA operand): an array of broadcast registers inside the
  // loop was re-broadcast and stored to the stack on every x step (39 64-byte stores per vector of NR rows)
  const E* w = cw.ws + 57;
  const E* w11 = cw.ws + 25;
  const E* w7 = cw.ws + 7;
  for (int64_t x = 0; x < bf.Wp; x += L) {
    R sa[NR], sb[NR];
    {
      for (int k = 0; k < NR; ++k) sa[k] = V::add(V::load(pa[k] + x), bsum);
#pragma GCC unroll 24
      for (int r = 0; r < NR + 20; ++r) {
        const R d = V::load(p21[r] + x);
#pragma GCC unroll 4
        for (int k = 0; k < NR; ++k) {
          const int j = r - k;
          if (j >= 0 && j < 21) sa[k] = V::fmadd(V::set1(w[j]), d, sa[k]);
        }
      }
    }
    {
      for (int k = 0; k < NR; ++k) sb[k] = V::zero();
#pragma GCC unroll 14
      for (int r = 0; r < NR + 10; ++r) {
        const R d = V::load(p11[r] + x);
#pragma GCC unroll 4
        for (int k = 0; k < NR; ++k) {
          const int j = r - k;
          if (j >= 0 && j < 11) sb[k] = V::fmadd(V::set1(w11[j]), d, sb[k]);
        }
      }
#pragma GCC unroll 10
      for (int r = 0; r < NR + 6; ++r) {
        const R d = V::load(p7[r] + x);
#pragma GCC unroll 4
        for (int k = 0; k < NR; ++k) {
          const int j = r - k;
          if (j >= 0 && j < 7) sb[k] = V::fmadd(V::set1(w7[j]), d, sb[k]);
        }
      }
    }
    for (int k = 0; k < NR; ++k) V::store(so + k * sstride + x, V::add(sa[k], sb[k]));
  }
}

template <class V, template <class, int> class K, class... A>
static inline void dispatch_rows(int nr, A&&... args) {
  switch (nr) {
    case 1: K<V, 1>::run(args...); break;
    case 2: K<V, 2>::run(args...); break;
    case 3: K<V, 3>::run(args...); break;
    default: K<V, 4>::run(args...); break;
  }
}
template <class V, int NR>
struct KA { template <class... A> static void run(A&&... a) { dw_a_rows<V, NR>(a...); } };
template <class V, int NR>
struct KH { template <class... A> static void run(A&&... a) { dw_h_rows<V, NR>(a...); } };
template <class V, int NR>
struct KS { template <class... A> static void run(A&&... a) { dw_s_rows<V, NR>(a...); } };

// The depthwise chain of one channel plane (u rows of W elements, NCHW) for output rows [y0, y1): s rows into
// so (row stride Wp).
template <class V, class T>
static void dw_channel(DwBuf<typename V::E>& bf, const ChanW<typename V::E>& cw, const T* up, int64_t y0,
                       int64_t y1, typename V::E* so) {
  const int64_t H = bf.H, W = bf.W, Wp = bf.Wp;
  int64_t tdone = std::max<int64_t>(0, y0 - 10);  // next a / h row to compute
  int64_t uload = std::max<int64_t>(0, tdone - 2); // next u row to copy
  for (int64_t y = y0; y < y1; y += kG) {
    const int64_t nr = std::min<int64_t>(kG, y1 - y);
    const int64_t need = std::min<int64_t>(H, y + nr + 10);
    while (tdone < need) {
      const int64_t na = std::min<int64_t>(kG, need - tdone);
      const int64_t uneed = std::min<int64_t>(H, tdone + na + 2);
      for (; uload < uneed; ++uload) copy_row<V, T>(up + uload * W, bf.uring + (uload % kRU) * bf.RW + kPad, W);
      dispatch_rows<V, KA>(static_cast<int>(na), bf, cw, tdone);
      dispatch_rows<V, KH>(static_cast<int>(na), bf, cw, tdone);
      tdone += na;
    }
    dispatch_rows<V, KS>(static_cast<int>(nr), bf, cw, y, so + (y - y0) * Wp, Wp);
  }
}

template <class E>
static inline ChanW<E> chan_weights(const E* w0, const E* b0, const E* ws, const E* bs, int64_t c) {
  ChanW<E> cw;
  cw.w0 = w0 + c * 25;
  cw.b0 = b0[c];
  cw.ws = ws + c * 78;
  cw.bs = bs + c * 6;
  cw.bsum = cw.bs[1] + cw.bs[3] + cw.bs[5];
  return cw;
}

// ---- the 1x1 mix ------------------------------------------------------------------------------------------------

template <class V>
struct MixShape;
template <>
struct MixShape<vec::VecGeneric<float>> { static constexpr int M = 4, N = 3; };
template <>
struct MixShape<vec::VecGeneric<double>> { static constexpr int M = 4, N = 3; };
#if SEGNEXT_VEC_X86
template <>
struct MixShape<vec::VecAvx2> { static constexpr int M = 4, N = 3; };
template <>
struct MixShape<vec::VecAvx512> { static constexpr int M = 6, N = 4; };
#endif

// Where the mix writes: pixel vector v of the S block (rows of nvw vectors) -> image row ys0 + v / nvw.
template <class T, class E>
struct MixOut {
  const T* u;   // image base, NCHW contiguous
  T* out;       // image base
  const E* b3;
  int64_t C, H, W, nvw, ys0;
};

template <class V, class T, int M, int N>
static inline void mix_epilogue(const MixOut<T, typename V::E>& mo, int64_t co0, int64_t v0,
                                const typename V::reg (&acc)[M][N]) {
  using E = typename V::E;
  using R = typename V::reg;
  constexpr int L = V::L;
  const int64_t HW = mo.H * mo.W;
  for (int n = 0; n < N; ++n) {
    const int64_t v = v0 + n;
    const int64_t r = v / mo.nvw, xv = v - r * mo.nvw;
    const int64_t x = xv * L;
    const int64_t nval = std::min<int64_t>(L, mo.W - x);
    const int64_t off = (mo.ys0 + r) * mo.W + x;
    for (int m = 0; m < M; ++m) {
      const int64_t co = co0 + m;
      const R att = V::add(acc[m][n], V::set1(mo.b3[co]));
      const int64_t base = co * HW + off;
      if (nval == L) {
        V::template store_cvt<T>(mo.out + base, V::mul(att, V::template load_cvt<T>(mo.u + base)));
      } else {
        alignas(64) E tu[L];
        alignas(64) E to[L];
        for (int q = 0; q < L; ++q) tu[q] = q < nval ? static_cast<E>(mo.u[base + q]) : E(0);
        V::store(to, V::mul(att, V::load(tu)));
        for (int64_t q = 0; q < nval; ++q) mo.out[base + q] = static_cast<T>(to[q]);
      }
    }
  }
}

// out[co0 .. co0+M) x pixel vectors [v0, v0+N) of S (channel stride cs).
template <class V, class T, int M, int N>
static void mix_tile(const typename V::E* S, int64_t cs, int64_t v0, const typename V::E* w3, int64_t co0,
                     const MixOut<T, typename V::E>& mo) {
  using E = typename V::E;
  using R = typename V::reg;
  constexpr int L = V::L;
  const int64_t C = mo.C;
  R acc[M][N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) acc[m][n] = V::zero();
  const E* sp = S + v0 * L;
  const E* wp = w3 + co0 * C;
  for (int64_t ci = 0; ci < C; ++ci) {
    R s[N];
    for (int n = 0; n < N; ++n) s[n] = V::load(sp + n * L);
    for (int m = 0; m < M; ++m) {
      const R w = V::set1(wp[m * C + ci]);
      for (int n = 0; n < N; ++n) acc[m][n] = V::fmadd(w, s[n], acc[m][n]);
    }
    sp += cs;
  }
  mix_epilogue<V, T, M, N>(mo, co0, v0, acc);
}

template <class V, class T, int M>
static inline void mix_tile_n(int n, const typename V::E* S, int64_t cs, int64_t v0, const typename V::E* w3,
                              int64_t co0, const MixOut<T, typename V::E>& mo) {
  constexpr int NR = MixShape<V>::N;
  static_assert(NR <= 4, "");
  switch (n) {
    case 1: mix_tile<V, T, M, 1>(S, cs, v0, w3, co0, mo); break;
    case 2: if constexpr (NR >= 2) mix_tile<V, T, M, 2>(S, cs, v0, w3, co0, mo); break;
    case 3: if constexpr (NR >= 3) mix_tile<V, T, M, 3>(S, cs, v0, w3, co0, mo); break;
    default: if constexpr (NR >= 4) mix_tile<V, T, M, 4>(S, cs, v0, w3, co0, mo); break;
  }
}

#if SEGNEXT_MSCA_FWD_BODY == 2
// From this many channels the fp32 mix runs oneDNN's brgemm (mlp::gemm_rm) on blocks of 256 pixels into an fp32
// tile, then bias + gating from the tile: with C x C weights of >= 64 KiB the register-blocked mix_tile streams w3
// and the band's S from L2 on every tile.
constexpr int64_t kMixGemmC = 128;

template <class V, class T>
static void mix_range_gemm(const float* S, int64_t cs, int64_t vb, int64_t ve, const float* w3,
                           const MixOut<T, float>& mo) {
  constexpr int L = V::L;
  constexpr int64_t kNV = 16;                  // pixel vectors per GEMM (256 pixels)
  constexpr int64_t ldt = kNV * L + 16;        // tile rows padded off 1 KiB strides
  const int64_t C = mo.C, HW = mo.H * mo.W;
  float* tile = static_cast<float*>(thread_buffer(3).get(sizeof(float) * C * ldt));
  for (int64_t v0 = vb; v0 < ve; v0 += kNV) {
    const int64_t nv = std::min(kNV, ve - v0);
    if (std::is_same_v<T, c10::BFloat16> && gemm::amx_available())  // s and w3 rounded to bf16, as the vdpbf16ps mix
      gemm::gemm_bf16<float, float>(C, nv * L, C, w3, C, S + v0 * L, cs, false, tile, ldt);
    else
      mlp::gemm_rm<float>(false, false, C, nv * L, C, w3, C, S + v0 * L, cs, false, tile, ldt);
    int64_t off[kNV], valid[kNV];  // per pixel vector: offset in a channel plane, lanes inside the image
    for (int64_t n = 0; n < nv; ++n) {
      const int64_t v = v0 + n;
      const int64_t r = v / mo.nvw, x = (v - r * mo.nvw) * L;
      valid[n] = std::min<int64_t>(L, mo.W - x);
      off[n] = (mo.ys0 + r) * mo.W + x;
    }
    for (int64_t co = 0; co < C; ++co) {
      const __m512 bias = _mm512_set1_ps(mo.b3[co]);
      const float* tr = tile + co * ldt;
      for (int64_t n = 0; n < nv; ++n) {
        const int64_t nval = valid[n];
        const int64_t base = co * HW + off[n];
        const __m512 att = _mm512_add_ps(_mm512_loadu_ps(tr + n * L), bias);
        if (nval == L) {
          V::template store_cvt<T>(mo.out + base, _mm512_mul_ps(att, V::template load_cvt<T>(mo.u + base)));
        } else {
          alignas(64) float tu[L];
          alignas(64) float to[L];
          for (int q = 0; q < L; ++q) tu[q] = q < nval ? static_cast<float>(mo.u[base + q]) : 0.0f;
          _mm512_store_ps(to, _mm512_mul_ps(att, _mm512_load_ps(tu)));
          for (int64_t q = 0; q < nval; ++q) mo.out[base + q] = static_cast<T>(to[q]);
        }
      }
    }
  }
}
#endif

// The mix over pixel vectors [vb, ve) of S, all output channels.
template <class V, class T>
static void mix_range(const typename V::E* S, int64_t cs, int64_t vb, int64_t ve, const typename V::E* w3,
                      const MixOut<T, typename V::E>& mo) {
#if SEGNEXT_MSCA_FWD_BODY == 2
  if constexpr (std::is_same_v<typename V::E, float>) {
    if (mo.C >= kMixGemmC || (std::is_same_v<T, c10::BFloat16> && gemm::amx_available())) {
      mix_range_gemm<V, T>(S, cs, vb, ve, w3, mo);
      return;
    }
  }
#endif
  constexpr int MR = MixShape<V>::M, NR = MixShape<V>::N;
  static_assert(MR <= 6, "");
  const int64_t C = mo.C;
  for (int64_t v0 = vb; v0 < ve; v0 += NR) {
    const int n = static_cast<int>(std::min<int64_t>(NR, ve - v0));
    int64_t co0 = 0;
    for (; co0 + MR <= C; co0 += MR) mix_tile_n<V, T, MR>(n, S, cs, v0, w3, co0, mo);
    switch (C - co0) {
      case 1: mix_tile_n<V, T, 1>(n, S, cs, v0, w3, co0, mo); break;
      case 2: if constexpr (MR > 2) mix_tile_n<V, T, 2>(n, S, cs, v0, w3, co0, mo); break;
      case 3: if constexpr (MR > 3) mix_tile_n<V, T, 3>(n, S, cs, v0, w3, co0, mo); break;
      case 4: if constexpr (MR > 4) mix_tile_n<V, T, 4>(n, S, cs, v0, w3, co0, mo); break;
      case 5: if constexpr (MR > 5) mix_tile_n<V, T, 5>(n, S, cs, v0, w3, co0, mo); break;
      default: break;
    }
  }
}

#if SEGNEXT_MSCA_FWD_BODY == 2
// ---- bfloat16 mix with AVX512-BF16 (vdpbf16ps): s rounded to bf16, pairs of input channels interleaved ----------
#define SEGNEXT_T_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))

// S16 layout: [C2 = ceil(C/2)][P pixels][2] bf16 (uint16 bits); w3b: [C][C2] pairs (uint32).
static inline void pack_pair_bf16(const float* e, const float* o, uint16_t* dst, int64_t P) {
  for (int64_t p = 0; p < P; p += 16) {
    const __m512i be = _mm512_cvtepu16_epi32(vec::VecAvx512::to_bf16_bits(_mm512_load_ps(e + p)));
    const __m512i bo = o ? _mm512_cvtepu16_epi32(vec::VecAvx512::to_bf16_bits(_mm512_load_ps(o + p)))
                         : _mm512_setzero_si512();
    _mm512_store_si512(reinterpret_cast<void*>(dst + 2 * p), _mm512_or_si512(be, _mm512_slli_epi32(bo, 16)));
  }
}

static inline void pack_w3_bf16(const float* w3, int64_t C, uint32_t* w3b) {
  const int64_t C2 = (C + 1) / 2;
  for (int64_t co = 0; co < C; ++co) {
    uint16_t* d = reinterpret_cast<uint16_t*>(w3b + co * C2);
    const float* s = w3 + co * C;
    int64_t ci = 0;
    for (; ci + 16 <= C; ci += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + ci), vec::VecAvx512::to_bf16_bits(_mm512_loadu_ps(s + ci)));
    for (; ci < C; ++ci) d[ci] = c10::BFloat16(s[ci]).x;
    if (C & 1) d[C] = 0;
  }
}

template <class T, int M, int N>
SEGNEXT_T_BF16 static void mix_tile_bf16(const uint16_t* S16, int64_t cs16, int64_t v0, const uint32_t* w3b,
                                         int64_t co0, const MixOut<T, float>& mo) {
  using V = vec::VecAvx512;
  const int64_t C2 = (mo.C + 1) / 2;
  __m512 acc[M][N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) acc[m][n] = _mm512_setzero_ps();
  const uint16_t* sp = S16 + v0 * 32;
  const uint32_t* wp = w3b + co0 * C2;
  for (int64_t k = 0; k < C2; ++k) {
    __m512bh s[N];
    for (int n = 0; n < N; ++n) s[n] = (__m512bh)_mm512_load_si512(reinterpret_cast<const void*>(sp + n * 32));
    for (int m = 0; m < M; ++m) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(wp[m * C2 + k]));
      for (int n = 0; n < N; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], w, s[n]);
    }
    sp += cs16;
  }
  mix_epilogue<V, T, M, N>(mo, co0, v0, acc);
}

template <class T, int M>
SEGNEXT_T_BF16 static inline void mix_tile_bf16_n(int n, const uint16_t* S16, int64_t cs16, int64_t v0,
                                                  const uint32_t* w3b, int64_t co0, const MixOut<T, float>& mo) {
  switch (n) {
    case 1: mix_tile_bf16<T, M, 1>(S16, cs16, v0, w3b, co0, mo); break;
    case 2: mix_tile_bf16<T, M, 2>(S16, cs16, v0, w3b, co0, mo); break;
    case 3: mix_tile_bf16<T, M, 3>(S16, cs16, v0, w3b, co0, mo); break;
    default: mix_tile_bf16<T, M, 4>(S16, cs16, v0, w3b, co0, mo); break;
  }
}

template <class T>
SEGNEXT_T_BF16 static void mix_range_bf16(const uint16_t* S16, int64_t cs16, int64_t vb, int64_t ve,
                                          const uint32_t* w3b, const MixOut<T, float>& mo) {
  constexpr int MR = 6, NR = 4;
  const int64_t C = mo.C;
  for (int64_t v0 = vb; v0 < ve; v0 += NR) {
    const int n = static_cast<int>(std::min<int64_t>(NR, ve - v0));
    int64_t co0 = 0;
    for (; co0 + MR <= C; co0 += MR) mix_tile_bf16_n<T, MR>(n, S16, cs16, v0, w3b, co0, mo);
    switch (C - co0) {
      case 1: mix_tile_bf16_n<T, 1>(n, S16, cs16, v0, w3b, co0, mo); break;
      case 2: mix_tile_bf16_n<T, 2>(n, S16, cs16, v0, w3b, co0, mo); break;
      case 3: mix_tile_bf16_n<T, 3>(n, S16, cs16, v0, w3b, co0, mo); break;
      case 4: mix_tile_bf16_n<T, 4>(n, S16, cs16, v0, w3b, co0, mo); break;
      case 5: mix_tile_bf16_n<T, 5>(n, S16, cs16, v0, w3b, co0, mo); break;
      default: break;
    }
  }
}
#endif  // SEGNEXT_MSCA_FWD_BODY == 2

// ---- driver -----------------------------------------------------------------------------------------------------

// Depthwise chain of channels [c0, c0 + nc) (nc = 1, or 2 for a bf16 pair) of image plane base u_img for rows
// [y0, y1) into S (fp32: channel c at S + c * cs) or, in bf16-mix mode, into the pair's slot of S16.
template <class V, class T>
static void dw_channels(DwBuf<typename V::E>& bf, const T* u_img, int64_t C, int64_t H, int64_t W, int64_t y0,
                        int64_t y1, int64_t c0, int64_t nc, const typename V::E* w0, const typename V::E* b0,
                        const typename V::E* ws, const typename V::E* bs, typename V::E* S, int64_t cs,
                        uint16_t* S16, int64_t cs16, typename V::E* tmp) {
  if (S16 == nullptr) {
    for (int64_t c = c0; c < c0 + nc; ++c)
      dw_channel<V, T>(bf, chan_weights(w0, b0, ws, bs, c), u_img + c * H * W, y0, y1, S + c * cs);
    return;
  }
#if SEGNEXT_MSCA_FWD_BODY == 2
  if constexpr (std::is_same_v<typename V::E, float>) {
    const int64_t P = (y1 - y0) * bf.Wp;
    for (int64_t c = c0; c < c0 + nc; c += 2) {
      float* te = tmp;
      float* to = tmp + P;
      dw_channel<V, T>(bf, chan_weights(w0, b0, ws, bs, c), u_img + c * H * W, y0, y1, te);
      const bool odd = c + 1 < C;
      if (odd) dw_channel<V, T>(bf, chan_weights(w0, b0, ws, bs, c + 1), u_img + (c + 1) * H * W, y0, y1, to);
      pack_pair_bf16(te, odd ? to : nullptr, S16 + (c / 2) * cs16, P);
    }
  }
#else
  (void)tmp; (void)C; (void)cs16;
#endif
}

template <class V, class T>
static void run(const T* u, T* out, int64_t B, int64_t C, int64_t H, int64_t W, const typename V::E* w0,
                const typename V::E* b0, const typename V::E* ws, const typename V::E* bs,
                const typename V::E* w3, const typename V::E* b3, bool bf16mix) {
  using E = typename V::E;
  constexpr int L = V::L;
  const int64_t Wp = round_up(W, L), nvw = Wp / L;
  const int64_t CHW = C * H * W;
  const int64_t C2 = (C + 1) / 2;
  const Plan pl = fwd_common::choose_plan(B, C, H, Wp, sizeof(E));
  const int64_t dwe = DwBuf<E>::elems(Wp);

  uint32_t* w3b = nullptr;
#if SEGNEXT_MSCA_FWD_BODY == 2
  Buffer& wbuf = thread_buffer(2);
  if (bf16mix) {
    if constexpr (std::is_same_v<E, float>) {
      w3b = static_cast<uint32_t*>(wbuf.get(sizeof(uint32_t) * C * C2));
      pack_w3_bf16(w3, C, w3b);
    }
  }
#else
  (void)bf16mix;
#endif
  const bool b16 = w3b != nullptr;

  if (pl.mode == 0) {
    const int64_t nb = pl.nb;
    const int64_t rmax = (H + nb - 1) / nb;
    at::parallel_for(0, B * nb, 1, [&](int64_t tb, int64_t te) {
      // scratch: dw rings | S (fp32 C x rows x Wp) or S16 (bf16 pairs) + two fp32 band rows buffers
      const int64_t Pmax = rmax * Wp;
      const int64_t s_elems = b16 ? (C2 * (2 * Pmax + kSPad16) * 2 + sizeof(E) - 1) / sizeof(E) + 2 * Pmax
                                  : C * (Pmax + kSPad);
      E* base = static_cast<E*>(thread_buffer(0).get(sizeof(E) * (round_up(dwe, 16) + s_elems)));
      DwBuf<E> bf;
      bf.init(base, H, W, Wp);
      E* S = base + round_up(dwe, 16);
      for (int64_t task = tb; task < te; ++task) {
        const int64_t b = task / nb, k = task % nb;
        const int64_t y0 = k * H / nb, y1 = (k + 1) * H / nb;
        if (y1 <= y0) continue;
        const int64_t P = (y1 - y0) * Wp;
        const T* ui = u + b * CHW;
        MixOut<T, E> mo{ui, out + b * CHW, b3, C, H, W, nvw, y0};
        if (!b16) {
          dw_channels<V, T>(bf, ui, C, H, W, y0, y1, 0, C, w0, b0, ws, bs, S, P + kSPad, nullptr, 0, nullptr);
          mix_range<V, T>(S, P + kSPad, 0, P / L, w3, mo);
        } else {
#if SEGNEXT_MSCA_FWD_BODY == 2
          if constexpr (std::is_same_v<E, float>) {
            uint16_t* S16 = reinterpret_cast<uint16_t*>(S + 2 * Pmax);
            dw_channels<V, T>(bf, ui, C, H, W, y0, y1, 0, C, w0, b0, ws, bs, nullptr, 0, S16, 2 * P + kSPad16, S);
            mix_range_bf16<T>(S16, 2 * P + kSPad16, 0, P / 16, w3b, mo);
          }
#endif
        }
      }
    });
    return;
  }

  // two-phase on groups of whole images
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t P = H * Wp;
  for (int64_t g0 = 0; g0 < B; g0 += pl.group) {
    const int64_t gB = std::min<int64_t>(pl.group, B - g0);
    const int64_t cs = P + kSPad, cs16 = 2 * P + kSPad16;
    const int64_t s_elems = b16 ? (gB * C2 * cs16 * 2 + sizeof(E) - 1) / sizeof(E) : gB * C * cs;
    E* S = static_cast<E*>(thread_buffer(1).get(sizeof(E) * s_elems));
    uint16_t* S16 = b16 ? reinterpret_cast<uint16_t*>(S) : nullptr;
    const int64_t cu = b16 ? C2 : C;  // depthwise work units per image (channels, or bf16 channel pairs)
    at::parallel_for(0, gB * cu, 1, [&](int64_t tb, int64_t te) {
      E* base = static_cast<E*>(thread_buffer(0).get(sizeof(E) * (round_up(dwe, 16) + 2 * P)));
      DwBuf<E> bf;
      bf.init(base, H, W, Wp);
      E* tmp = base + round_up(dwe, 16);
      for (int64_t task = tb; task < te; ++task) {
        const int64_t bl = task / cu, j = task % cu;
        const T* ui = u + (g0 + bl) * CHW;
        if (!b16)
          dw_channels<V, T>(bf, ui, C, H, W, 0, H, j, 1, w0, b0, ws, bs, S + bl * C * cs, cs, nullptr, 0, nullptr);
        else
          dw_channels<V, T>(bf, ui, C, H, W, 0, H, 2 * j, 2, w0, b0, ws, bs, nullptr, 0, S16 + bl * C2 * cs16, cs16,
                            tmp);
      }
    });
    // mix: pixel blocks of each image
    const int64_t NR = b16 ? 4 : MixShape<V>::N;
    const int64_t vper = P / (b16 ? 16 : L);
    const int64_t blk = round_up(std::max<int64_t>(1, (vper * gB + nt - 1) / nt), NR);
    const int64_t nblk = (vper + blk - 1) / blk;
    at::parallel_for(0, gB * nblk, 1, [&](int64_t tb, int64_t te) {
      for (int64_t task = tb; task < te; ++task) {
        const int64_t bl = task / nblk, k = task % nblk;
        const int64_t vb = k * blk, ve = std::min<int64_t>(vper, vb + blk);
        const int64_t b = g0 + bl;
        MixOut<T, E> mo{u + b * CHW, out + b * CHW, b3, C, H, W, nvw, 0};
        if (!b16) {
          mix_range<V, T>(S + bl * C * cs, cs, vb, ve, w3, mo);
        } else {
#if SEGNEXT_MSCA_FWD_BODY == 2
          if constexpr (std::is_same_v<E, float>) mix_range_bf16<T>(S16 + bl * C2 * cs16, cs16, vb, ve, w3b, mo);
#endif
        }
      }
    });
  }
}

#endif  // SEGNEXT_MSCA_FWD_BODY

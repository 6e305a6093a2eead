// Fused MLP forward on CPU (math and layouts in mlp_cpu.h; row kernels in mlp_cpu_kernels.h).
//
// Tasks = (image, band of rows, group of hidden channels); per task, for each block of hc hidden channels:
//   h  (hc x (rows + 2 halo) * W, fp32) = W1[block] @ x[band + halo]          at::mm_out on the tile (bias folded into dw)
//   g  (hc x rows * W, fp32)            = GELU(dw3x3(h + b1) + bdw)           hand-written, a plane per call
//   acc (C x rows * W, fp32)           (+)= W2[:, block] @ g                   at::addmm_out after the first block
// then y = acc + b2 (converted to x's dtype). h and g live in per-thread scratch (L2); nothing is B*Hd*H*W sized.
// With G > 1 hidden groups (small images: few bands), each group's acc is a plane of a (G, B, C, H*W) fp32 buffer and
// y = sum over groups in order + b2.
//
// The plan (mlp_cpu_kernels.h, choose_plan) depends on the shape only, and every task runs the same calls in the same
// order whichever thread runs it, so results are bitwise identical for any number of threads. The GEMMs run inside
// the OpenMP region of at::parallel_for, where MKL runs single-threaded.
//
// This file also compiles the row kernels once per ISA (portable, AVX2+FMA, AVX-512) and exports their tables to
// mlp_cpu_bwd.cpp (rows_for<E, TG>()).

#include "mlp_cpu.h"

#include <ATen/Parallel.h>

#include <type_traits>

#include "cpu_alloc.h"
#include "cpu_isa.h"
#include "cpu_vec.h"
#include "gemm_bf16.h"
#include "mlp_cpu_kernels.h"

namespace segnext_cpu {
namespace mlp {

namespace rows_generic {
#define SEGNEXT_MLP_ROWS 0
#include "mlp_cpu_kernels.h"
#undef SEGNEXT_MLP_ROWS
}  // namespace rows_generic

#if SEGNEXT_VEC_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace rows_avx2 {
#define SEGNEXT_MLP_ROWS 1
#include "mlp_cpu_kernels.h"
#undef SEGNEXT_MLP_ROWS
}  // namespace rows_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace rows_avx512 {
#define SEGNEXT_MLP_ROWS 2
#include "mlp_cpu_kernels.h"
#undef SEGNEXT_MLP_ROWS
}  // namespace rows_avx512
#pragma GCC pop_options
#endif

template <class E, class TG>
Rows<E, TG> rows_for() {
  if constexpr (std::is_same_v<E, float>) {
#if SEGNEXT_VEC_X86
    static const Rows<E, TG> r512 = rows_avx512::make_rows<E, TG>();
    static const Rows<E, TG> r2 = rows_avx2::make_rows<E, TG>();
    if (isa() == Isa::avx512) return r512;
    if (isa() == Isa::avx2) return r2;
#endif
  }
  return rows_generic::make_rows<E, TG>();
}
template Rows<float, float> rows_for<float, float>();
template Rows<double, double> rows_for<double, double>();
template Rows<float, c10::BFloat16> rows_for<float, c10::BFloat16>();

namespace {

// C (E) (+)= A B on a tile: the bfloat16 GEMM (gemm_bf16.h) when lowp, else gemm_rm (fp32 / fp64 operands only).
template <class TA, class TB, class E>
inline void tile_gemm(bool lowp, int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, const TB* B, int64_t ldb,
                      bool accumulate, E* C, int64_t ldc) {
  if constexpr (std::is_same_v<E, float>) {
    if (lowp) {
      gemm::gemm_bf16<TA, TB>(M, N, K, A, lda, B, ldb, accumulate, C, ldc);
      return;
    }
  }
  if constexpr (std::is_same_v<TA, E> && std::is_same_v<TB, E>) {
    gemm_rm<E>(false, false, M, N, K, A, lda, B, ldb, accumulate, C, ldc);
  } else {
    TORCH_CHECK(false, "mlp_forward: internal error: a bfloat16 GEMM without the bfloat16 kernel");
  }
}

// T: x / weights / y dtype; E: compute (float, double for T = double); TG: GEMM operand type of g (T). lowp: the
// GEMMs on bfloat16 operands with fp32 accumulation (T = bfloat16 on a CPU with AVX512-BF16, or float32 asked;
// E = float).
template <class T, class E>
void forward_impl(const T* x, T* y, int64_t B, int64_t C, int64_t Hd, int64_t H, int64_t W, const T* w1,
                  const E* b1, const E* wdw, const E* bdw, const T* w2, const E* b2, const T* res,
                  const E* in_scale, const E* in_shift, const E* out_scale, bool lowp) {
  using TG = T;
  const Rows<E, TG> rk = rows_for<E, TG>();
  const Plan pl = choose_plan(B, Hd, H, W, false);
  const int64_t HW = H * W;
  const int64_t nchunks = ceil_div(Hd, pl.hc);
  const int64_t G = pl.G;
  const int64_t ntasks = B * pl.nb * G;
  // G > 1: per-group partial sums, reduced below in group order
  at::Tensor part;
  E* partp = nullptr;
  if (G > 1) {
    part = at::empty({G, B, C, HW}, at::TensorOptions().dtype(std::is_same_v<E, double> ? at::kDouble : at::kFloat));
    partp = part.data_ptr<E>();
  }
  constexpr bool direct = std::is_same_v<T, E>;  // accumulate straight into y (fp32 / fp64, G == 1)

  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t grp = task % G;
      const int64_t band = (task / G) % pl.nb;
      const int64_t b = task / (G * pl.nb);
      const int64_t r0 = band * pl.rows, r1 = std::min(H, r0 + pl.rows);
      const int64_t ri0 = std::max<int64_t>(0, r0 - 1), ri1 = std::min(H, r1 + 1);
      const int64_t Nin = (ri1 - ri0) * W, Nout = (r1 - r0) * W;
      const int64_t c0 = grp * nchunks / G, c1 = (grp + 1) * nchunks / G;
      const T* xb = x + b * C * HW;

      // scratch rows get leading dimensions that do not alias in the caches (padded_ld): g is fc2's B operand
      const int64_t ldh = padded_ld(Nin), ldg = padded_ld(Nout);
      E* h = static_cast<E*>(scratch(0, sizeof(E) * pl.hc * ldh));
      TG* g = static_cast<TG*>(scratch(1, sizeof(TG) * pl.hc * ldg));
      // the input affine (an eval BatchNorm before fc1) on the band + halo, into scratch: fc1 reads it from there
      const T* xin = xb + ri0 * W;
      const E* xsc = nullptr;  // the affine's output (E), when in_scale
      int64_t ldx = HW;
      if (in_scale) {
        const int64_t ldxs = padded_ld(Nin);
        E* xs = static_cast<E*>(scratch(4, sizeof(E) * C * ldxs));
        for (int64_t c = 0; c < C; ++c) {
          const E sc = in_scale[c], sh = in_shift[c];
          const T* src = xin + c * HW;
          E* dst = xs + c * ldxs;
          for (int64_t i = 0; i < Nin; ++i) dst[i] = static_cast<E>(src[i]) * sc + sh;
        }
        xsc = xs;
        ldx = ldxs;
      }
      E* acc;
      int64_t ldacc;
      if (G > 1) {
        acc = partp + ((grp * B + b) * C) * HW + r0 * W;
        ldacc = HW;
      } else if constexpr (direct) {
        acc = reinterpret_cast<E*>(y + b * C * HW + r0 * W);
        ldacc = HW;
      } else {
        acc = static_cast<E*>(scratch(3, sizeof(E) * C * Nout));
        ldacc = Nout;
      }

      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t j0 = ch * pl.hc, m = std::min(pl.hc, Hd - j0);
        // h = W1[j0:j0+m] @ x[:, ri0:ri1]
        if (xsc) tile_gemm(lowp, m, Nin, C, w1 + j0 * C, C, xsc, ldx, false, h, ldh);
        else tile_gemm(lowp, m, Nin, C, w1 + j0 * C, C, xin, ldx, false, h, ldh);
        for (int64_t jj = 0; jj < m; ++jj) {
          const int64_t j = j0 + jj;
          rk.dw_gelu(h + jj * ldh, ri0, r0, r1, H, W, wdw + j * 9, b1[j], bdw[j], g + jj * ldg);
        }
        // acc (+)= W2[:, j0:j0+m] @ g
        tile_gemm(lowp, C, Nout, m, w2 + j0, Hd, g, ldg, ch != c0, acc, ldacc);
      }
      if (c1 == c0) {  // an empty group (Hd < G * hc never happens: G <= nchunks); keep the partial defined
        for (int64_t c = 0; c < C; ++c) std::fill(acc + c * ldacc, acc + c * ldacc + Nout, E(0));
      }
      if (G == 1) {  // epilogue: y = out_scale * (acc + b2) (+ res)
        T* yb = y + b * C * HW + r0 * W;
        for (int64_t c = 0; c < C; ++c) {
          const E bias = b2[c];
          const E* a = acc + c * ldacc;
          T* o = yb + c * HW;
          if (out_scale) {
            const E gm = out_scale[c], gb = out_scale[c] * bias;
            const T* rr = res ? res + b * C * HW + r0 * W + c * HW : nullptr;
            if (rr) for (int64_t i = 0; i < Nout; ++i) o[i] = static_cast<T>(a[i] * gm + gb + rr[i]);
            else for (int64_t i = 0; i < Nout; ++i) o[i] = static_cast<T>(a[i] * gm + gb);
          } else if (res) {
            const T* rr = res + b * C * HW + r0 * W + c * HW;
            for (int64_t i = 0; i < Nout; ++i) o[i] = static_cast<T>(a[i] + bias + rr[i]);
          } else {
            for (int64_t i = 0; i < Nout; ++i) o[i] = static_cast<T>(a[i] + bias);
          }
        }
      }
    }
  });

  if (G > 1) {  // y = sum_g part[g] + b2, groups in order
    at::parallel_for(0, B * C, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const E bias = b2[q % C];
        T* o = y + q * HW;
        const E* p0 = partp + q * HW;
        const T* rr = res ? res + q * HW : nullptr;
        const E gm = out_scale ? out_scale[q % C] : E(1);
        for (int64_t i = 0; i < HW; ++i) {
          E s = p0[i];
          for (int64_t gi = 1; gi < G; ++gi) s += p0[gi * B * C * HW + i];
          const E v = out_scale ? (s + bias) * gm : s + bias;
          o[i] = rr ? static_cast<T>(v + rr[i]) : static_cast<T>(v);
        }
      }
    });
  }
}

void check_weight(const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "mlp_forward: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, "mlp_forward: ", name, " must have dtype ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "mlp_forward: ", name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace

void check_mlp_args(const char* fn, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& wdw, const at::Tensor& bdw, const at::Tensor& w2, const at::Tensor& b2) {
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, fn, ": x must be 4-D (B, C, H, W), got ", x.dim(), "-D with shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, fn,
              ": x must be float32, float64 or bfloat16, got ", dt);
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C >= 1 && H >= 1 && W >= 1, fn, ": x must have C, H, W >= 1, got shape ", x.sizes());
  TORCH_CHECK(w1.dim() == 2, fn, ": w1 must be 2-D (Hd, C), got shape ", w1.sizes());
  const int64_t Hd = w1.size(0);
  TORCH_CHECK(Hd >= 1, fn, ": w1 must have Hd >= 1 rows, got shape ", w1.sizes());
  check_weight(w1, "w1", dt, {Hd, C});
  check_weight(b1, "b1", dt, {Hd});
  check_weight(wdw, "wdw", dt, {Hd, 9});
  check_weight(bdw, "bdw", dt, {Hd});
  check_weight(w2, "w2", dt, {C, Hd});
  check_weight(b2, "b2", dt, {C});
}

}  // namespace mlp

at::Tensor mlp_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& wdw,
                       const at::Tensor& bdw, const at::Tensor& w2, const at::Tensor& b2,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& affine,
                       bool lowp) {
  mlp::check_mlp_args("mlp_forward", x, w1, b1, wdw, bdw, w2, b2);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Hd = w1.size(0);
  if (residual.has_value()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == x.scalar_type() &&
                    residual->sizes() == x.sizes(),
                "mlp_forward: residual must be a CPU tensor like x (", x.sizes(), " ", x.scalar_type(), "), got ",
                residual->sizes(), " ", residual->scalar_type(), " on ", residual->device());
  }
  if (affine.has_value()) {
    TORCH_CHECK(affine->device().is_cpu() && affine->scalar_type() == at::kFloat && x.scalar_type() != at::kDouble &&
                    affine->sizes() == at::IntArrayRef({3, x.size(1)}),
                "mlp_forward: affine must be a float32 CPU tensor of shape (3, ", x.size(1), ") (input scale, input "
                "shift, output scale) with float32 or bfloat16 x, got ", affine->sizes(), " ", affine->scalar_type(),
                " (x ", x.scalar_type(), ")");
  }
  at::Tensor out = empty_output_like(x);
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor afc = affine.has_value() ? affine->contiguous() : at::Tensor();
  const float* af = affine.has_value() ? afc.data_ptr<float>() : nullptr;
  const int64_t Cn = x.size(1);
  at::Tensor oc = out.is_contiguous() ? out : empty_output(x.sizes(), x.options());
  const auto dt = x.scalar_type();
  if (dt == at::kDouble) {
    auto cd = [](const at::Tensor& t) { return t.contiguous(); };
    at::Tensor w1c = cd(w1), b1c = cd(b1), wdc = cd(wdw), bdc = cd(bdw), w2c = cd(w2), b2c = cd(b2);
    const at::Tensor rc = residual.has_value() ? residual->contiguous() : at::Tensor();
    mlp::forward_impl<double, double>(xc.data_ptr<double>(), oc.data_ptr<double>(), B, C, Hd, H, W,
                                      w1c.data_ptr<double>(), b1c.data_ptr<double>(), wdc.data_ptr<double>(),
                                      bdc.data_ptr<double>(), w2c.data_ptr<double>(), b2c.data_ptr<double>(),
                                      residual.has_value() ? rc.data_ptr<double>() : nullptr, nullptr, nullptr,
                                      nullptr, false);
  } else if (dt == at::kBFloat16 && gemm::bf16_available()) {
    // bfloat16 on AVX512-BF16: the GEMMs on bfloat16 operands (x, w1, w2 as given; h and g rounded), fp32 accumulation;
    // the depthwise 3x3, GELU and epilogue in fp32; y rounded once
    using bf = c10::BFloat16;
    auto cf = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
    at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous(), b1c = cf(b1), wdc = cf(wdw), bdc = cf(bdw), b2c = cf(b2);
    const at::Tensor rc = residual.has_value() ? residual->contiguous() : at::Tensor();
    mlp::forward_impl<bf, float>(xc.data_ptr<bf>(), oc.data_ptr<bf>(), B, C, Hd, H, W, w1c.data_ptr<bf>(),
                                 b1c.data_ptr<float>(), wdc.data_ptr<float>(), bdc.data_ptr<float>(), w2c.data_ptr<bf>(),
                                 b2c.data_ptr<float>(), residual.has_value() ? rc.data_ptr<bf>() : nullptr, af,
                                 af ? af + Cn : nullptr, af ? af + 2 * Cn : nullptr, true);
  } else {
    // float32 (lowp: its GEMMs on bfloat16-rounded operands, gemm_bf16 on any CPU); bfloat16 without AVX512-BF16:
    // the fp32 path on x converted once (GEMMs in fp32, so fp32 accumulation throughout, h and g not rounded), y
    // rounded once
    auto cf = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
    at::Tensor w1c = cf(w1), b1c = cf(b1), wdc = cf(wdw), bdc = cf(bdw), w2c = cf(w2), b2c = cf(b2);
    at::Tensor xf = dt == at::kFloat ? xc : xc.to(at::kFloat);
    at::Tensor of = dt == at::kFloat ? oc : at::empty(x.sizes(), xf.options());
    const at::Tensor rf = residual.has_value() ? residual->to(at::kFloat).contiguous() : at::Tensor();
    mlp::forward_impl<float, float>(xf.data_ptr<float>(), of.data_ptr<float>(), B, C, Hd, H, W,
                                    w1c.data_ptr<float>(), b1c.data_ptr<float>(), wdc.data_ptr<float>(),
                                    bdc.data_ptr<float>(), w2c.data_ptr<float>(), b2c.data_ptr<float>(),
                                    residual.has_value() ? rf.data_ptr<float>() : nullptr, af,
                                    af ? af + Cn : nullptr, af ? af + 2 * Cn : nullptr,
                                    lowp);
    if (!of.is_same(oc)) oc.copy_(of);
  }
  if (!oc.is_same(out)) out.copy_(oc);
  return out;
}

}  // namespace segnext_cpu

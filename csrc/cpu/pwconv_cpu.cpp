// Fused pointwise (1x1) convolution + epilogue on CPU, forward (math in pwconv_cpu.h).
//
// Tasks = (image, block of output channels, block of pixels). Per task: brgemm C (m x n) = W[o0:o0+m, :] (m x Cin)
// @ x_b[:, p0:p0+n] (Cin x n, leading dimension H*W) written into y_b's tile (leading dimension H*W), then per row
// of the tile the epilogue (bias, alpha * r, activation; the GELU rows of mlp_cpu_kernels.h) while the tile is in
// L2. The GEMM of a task is one micro-kernel call of fixed shape, so every element is computed by the same
// operations whichever thread runs it.
#include "pwconv_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <type_traits>

#include "cpu_alloc.h"
#include "gemm_bf16.h"
#include "mlp_cpu_kernels.h"

namespace segnext_cpu {
namespace mlp {
template <class E, class TG>
Rows<E, TG> rows_for();  // mlp_cpu_fwd.cpp
}  // namespace mlp

namespace {

void check_vec(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), "pwconv_forward: ", name, " must be a CPU tensor, got device ", t->device());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "pwconv_forward: ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "pwconv_forward: ", name, " must have shape (", n, "), got ",
              t->sizes());
}

}  // namespace

namespace {

// The tiles of pwconv_forward. TX: x's type (the GEMM's B operand: float, or bfloat16 with lowp); TY: r's and y's
// type (float: the GEMM writes y's tile in place; bfloat16: an fp32 tile in scratch, y rounded once). lowp: the GEMM
// on bfloat16-rounded operands (gemm_bf16.h), else fp32 (oneDNN brgemm; TX = float).
template <class TX, class TY>
void run_tiles(const TX* xp, const float* wf, const TY* rp, const float* bp, const float* ap, const float* gp, TY* yp,
               int64_t B, int64_t Cin, int64_t Cout, int64_t HW, int64_t act, bool lowp) {
  constexpr bool direct = std::is_same_v<TY, float>;
  // tiles: up to 128 output channels x up to 512 pixels (a 256 KiB fp32 tile: the epilogue reads it from L2); the
  // channel blocks are of equal size (Cout = 150: 75 + 75, not 128 + 22), so the threads' shares of tiles, split in
  // order, hold the same work
  const int64_t nm = mlp::ceil_div(Cout, 128), MB = mlp::ceil_div(Cout, nm), NBLK = std::min<int64_t>(HW, 512);
  const int64_t nn = mlp::ceil_div(HW, NBLK);
  const mlp::Rows<float, float> rk = mlp::rows_for<float, float>();
  const mlp::Rows<float, TY> rky = mlp::rows_for<float, TY>();
  at::parallel_for(0, B * nm * nn, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pb = t % nn, mb = (t / nn) % nm, b = t / (nn * nm);
      const int64_t o0 = mb * MB, m = std::min(MB, Cout - o0);
      const int64_t p0 = pb * NBLK, n = std::min(NBLK, HW - p0);
      TY* yt = yp + (b * Cout + o0) * HW + p0;
      float* ct;
      int64_t ldt;
      if constexpr (direct) {
        ct = yt;
        ldt = HW;
      } else {
        ldt = mlp::padded_ld(NBLK);
        ct = static_cast<float*>(mlp::scratch(5, sizeof(float) * MB * ldt));
      }
      const TX* xt = xp + b * Cin * HW + p0;
      if (lowp) {
        gemm::gemm_bf16<float, TX>(m, n, Cin, wf + o0 * Cin, Cin, xt, HW, false, ct, ldt);
      } else if constexpr (std::is_same_v<TX, float>) {
        mlp::gemm_rm<float>(false, false, m, n, Cin, wf + o0 * Cin, Cin, xt, HW, false, ct, ldt);
      } else {
        TORCH_CHECK(false, "pwconv_forward: internal error: a bfloat16 x without the bfloat16 GEMM");
      }
      for (int64_t i = 0; i < m; ++i) {
        const int64_t o = o0 + i;
        float* row = ct + i * ldt;
        const float bo = bp ? bp[o] : 0.0f;
        if (gp) {
          const float go = gp[o];
          for (int64_t j = 0; j < n; ++j) row[j] *= go;
        }
        if (rp) {
          const TY* rr = rp + (b * Cout + o) * HW + p0;
          const float ao = ap ? ap[o] : 1.0f;
          for (int64_t j = 0; j < n; ++j) row[j] += bo + ao * static_cast<float>(rr[j]);
        } else if (bp) {
          for (int64_t j = 0; j < n; ++j) row[j] += bo;
        }
        if (act == 2)  // ReLU; NaN stays NaN, as torch.relu
          for (int64_t j = 0; j < n; ++j) row[j] = row[j] > 0.0f ? row[j] : (row[j] == row[j] ? 0.0f : row[j]);
        if constexpr (direct) {
          if (act == 1) rk.gelu(row, n, row);
        } else {
          TY* yr = yt + i * HW;
          if (act == 1) rky.gelu(row, n, yr);
          else rky.convert(row, n, yr, nullptr);
        }
      }
    }
  });
}

const char* dtype_name(at::ScalarType t) { return t == at::kFloat ? "float32" : t == at::kBFloat16 ? "bfloat16" : "?"; }

}  // namespace

at::Tensor pwconv_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                          int64_t act, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& r,
                          const std::optional<at::Tensor>& gamma, std::optional<at::ScalarType> out_dtype,
                          bool lowp) {
  TORCH_CHECK(x.device().is_cpu(), "pwconv_forward: x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, "pwconv_forward: x must be 4-D (B, Cin, H, W), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "pwconv_forward: x must be float32 or bfloat16, got ", dt);
  const auto ot = out_dtype.value_or(dt);
  TORCH_CHECK(ot == at::kFloat || ot == at::kBFloat16, "pwconv_forward: out_dtype must be float32 or bfloat16, got ",
              ot);
  TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == dt || w.scalar_type() == at::kFloat) && w.dim() == 2 &&
                  w.size(1) == x.size(1),
              "pwconv_forward: w must be a ", dtype_name(dt), (dt == at::kFloat ? "" : " or float32"),
              " CPU tensor of shape (Cout, ", x.size(1), "), got ", w.sizes(), " ", w.scalar_type(), " on ",
              w.device());
  TORCH_CHECK(act >= 0 && act <= 2, "pwconv_forward: act must be 0 (none), 1 (gelu) or 2 (relu), got ", act);
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), Cout = w.size(0), HW = H * W;
  TORCH_CHECK(Cin >= 1 && Cout >= 1 && H >= 1 && W >= 1, "pwconv_forward: expected Cin, Cout, H, W >= 1, got x ",
              x.sizes(), ", w ", w.sizes());
  check_vec(bias, "bias", Cout);
  check_vec(alpha, "alpha", Cout);
  check_vec(gamma, "gamma", Cout);
  if (r.has_value()) {
    TORCH_CHECK(r->device().is_cpu() && r->scalar_type() == ot, "pwconv_forward: r must be a ", dtype_name(ot),
                " CPU tensor (the output dtype), got ", r->scalar_type(), " on ", r->device());
    TORCH_CHECK(r->sizes() == at::IntArrayRef({B, Cout, H, W}), "pwconv_forward: r must have shape (", B, ", ", Cout,
                ", ", H, ", ", W, "), got ", r->sizes());
  }
  at::Tensor y = empty_output({B, Cout, H, W}, x.options().dtype(ot));
  if (y.numel() == 0) return y;
  const at::Tensor rc = r.has_value() ? r->contiguous() : at::Tensor();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor ac = alpha.has_value() ? alpha->contiguous() : at::Tensor();
  const at::Tensor gc = gamma.has_value() ? gamma->contiguous() : at::Tensor();
  const float* gp = gamma.has_value() ? gc.data_ptr<float>() : nullptr;
  const float* bp = bias.has_value() ? bc.data_ptr<float>() : nullptr;
  const float* ap = alpha.has_value() ? ac.data_ptr<float>() : nullptr;
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  // bfloat16 operands (a bfloat16 x, or lowp asked: gemm_bf16, whose fallback without AVX512-BF16 rounds them too,
  // so a bfloat16 x with a float32 weight multiplies the weight rounded as eager's autocast does); otherwise the
  // fp32 GEMM on x converted once
  const bool use_lowp = lowp || dt == at::kBFloat16;
  const at::Tensor xc = use_lowp ? x.contiguous() : x.to(at::kFloat).contiguous();
  using bf = c10::BFloat16;
  auto run = [&](auto xtag, auto ytag) {
    using TX = decltype(xtag);
    using TY = decltype(ytag);
    run_tiles<TX, TY>(xc.data_ptr<TX>(), wf.data_ptr<float>(), r.has_value() ? rc.data_ptr<TY>() : nullptr, bp, ap, gp,
                      y.data_ptr<TY>(), B, Cin, Cout, HW, act, use_lowp);
  };
  const bool xb = xc.scalar_type() == at::kBFloat16, yb = ot == at::kBFloat16;
  if (xb && yb) run(bf(), bf());
  else if (xb) run(bf(), 0.0f);
  else if (yb) run(0.0f, bf());
  else run(0.0f, 0.0f);
  return y;
}

}  // namespace segnext_cpu

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

#include "cpu_alloc.h"
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

at::Tensor pwconv_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                          int64_t act, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& r,
                          const std::optional<at::Tensor>& gamma) {
  TORCH_CHECK(x.device().is_cpu(), "pwconv_forward: x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, "pwconv_forward: x must be 4-D (B, Cin, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "pwconv_forward: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(1) == x.size(1),
              "pwconv_forward: w must be a float32 CPU tensor of shape (Cout, ", x.size(1), "), got ", w.sizes(),
              " ", w.scalar_type(), " on ", w.device());
  TORCH_CHECK(act >= 0 && act <= 2, "pwconv_forward: act must be 0 (none), 1 (gelu) or 2 (relu), got ", act);
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), Cout = w.size(0), HW = H * W;
  TORCH_CHECK(Cin >= 1 && Cout >= 1 && H >= 1 && W >= 1, "pwconv_forward: expected Cin, Cout, H, W >= 1, got x ",
              x.sizes(), ", w ", w.sizes());
  check_vec(bias, "bias", Cout);
  check_vec(alpha, "alpha", Cout);
  check_vec(gamma, "gamma", Cout);
  if (r.has_value()) {
    TORCH_CHECK(r->device().is_cpu() && r->scalar_type() == at::kFloat, "pwconv_forward: r must be a float32 CPU "
                "tensor, got ", r->scalar_type(), " on ", r->device());
    TORCH_CHECK(r->sizes() == at::IntArrayRef({B, Cout, H, W}), "pwconv_forward: r must have shape (", B, ", ", Cout,
                ", ", H, ", ", W, "), got ", r->sizes());
  }
  at::Tensor y = empty_output({B, Cout, H, W}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor rc = r.has_value() ? r->contiguous() : at::Tensor();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor ac = alpha.has_value() ? alpha->contiguous() : at::Tensor();
  const at::Tensor gc = gamma.has_value() ? gamma->contiguous() : at::Tensor();
  const float* gp = gamma.has_value() ? gc.data_ptr<float>() : nullptr;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* rp = r.has_value() ? rc.data_ptr<float>() : nullptr;
  const float* bp = bias.has_value() ? bc.data_ptr<float>() : nullptr;
  const float* ap = alpha.has_value() ? ac.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  // tiles: up to 128 output channels x up to 512 pixels (a 256 KiB fp32 tile: the epilogue reads it from L2); the
  // channel blocks are of equal size (Cout = 150: 75 + 75, not 128 + 22), so the threads' shares of tiles, split in
  // order, hold the same work
  const int64_t nm = mlp::ceil_div(Cout, 128), MB = mlp::ceil_div(Cout, nm), NBLK = std::min<int64_t>(HW, 512);
  const int64_t nn = mlp::ceil_div(HW, NBLK);
  const mlp::Rows<float, float> rk = mlp::rows_for<float, float>();
  at::parallel_for(0, B * nm * nn, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pb = t % nn, mb = (t / nn) % nm, b = t / (nn * nm);
      const int64_t o0 = mb * MB, m = std::min(MB, Cout - o0);
      const int64_t p0 = pb * NBLK, n = std::min(NBLK, HW - p0);
      float* yt = yp + (b * Cout + o0) * HW + p0;
      mlp::gemm_rm<float>(false, false, m, n, Cin, wp + o0 * Cin, Cin, xp + b * Cin * HW + p0, HW, false, yt, HW);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t o = o0 + i;
        float* row = yt + i * HW;
        const float bo = bp ? bp[o] : 0.0f;
        if (gp) {
          const float go = gp[o];
          for (int64_t j = 0; j < n; ++j) row[j] *= go;
        }
        if (rp) {
          const float* rr = rp + (b * Cout + o) * HW + p0;
          const float ao = ap ? ap[o] : 1.0f;
          for (int64_t j = 0; j < n; ++j) row[j] += bo + ao * rr[j];
        } else if (bp) {
          for (int64_t j = 0; j < n; ++j) row[j] += bo;
        }
        if (act == 1) rk.gelu(row, n, row);
        else if (act == 2)  // ReLU; NaN stays NaN, as torch.relu
          for (int64_t j = 0; j < n; ++j) row[j] = row[j] > 0.0f ? row[j] : (row[j] == row[j] ? 0.0f : row[j]);
      }
    }
  });
  return y;
}

}  // namespace segnext_cpu

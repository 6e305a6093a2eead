// Fused MLP backward on CPU (math and layouts in mlp_cpu.h; row kernels in mlp_cpu_kernels.h, compiled per ISA in
// mlp_cpu_fwd.cpp).
//
// Nothing of the forward is saved: each task (a band of rows [r0, r1) of one image) recomputes what it needs from x,
// one block of hc hidden channels at a time, with a 2-row halo (p on rows r0-1 .. r1, h on r0-2 .. r1+1):
//   h   = W1[blk] @ x[rows r0-2 .. r1+1]                      GEMM
//   dg  = W2[:, blk]^T @ gy[rows r0-1 .. r1]                   GEMM
//   p   = dw3x3(h + b1) + bdw;  dp = dg * GELU'(p);  g = GELU(p) (owned rows)      rows (L1)
//   ddw += sum dp(owned) * h(shifted);  dbdw += sum dp(owned)                      rows
//   dh  = dw3x3^T(dp) (owned rows: the flipped kernel over dp, zero outside the image);  db1 += sum dh
//   dW1[blk] += dh @ x[owned]^T;  dW2[:, blk] += gy[owned] @ g^T                   GEMMs
//   dx[owned] (+)= W1[blk]^T @ dh                                                   GEMM (accumulated over blocks)
//   db2 += sum gy[owned]
// Weight-gradient partials: a fixed number of slots (a function of the shape), each summing a fixed run of tasks in
// order; the slots are then summed in slot order. So every result is bitwise identical for any number of threads.
// Only the gradients asked for are computed (and only the GEMMs they need).

#include "mlp_cpu.h"

#include <ATen/Parallel.h>

#include <type_traits>

#include "cpu_alloc.h"
#include "cpu_isa.h"
#include "mlp_cpu_kernels.h"

namespace segnext_cpu {
namespace mlp {

template <class E, class TG>
Rows<E, TG> rows_for();  // mlp_cpu_fwd.cpp
void check_mlp_args(const char* fn, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& wdw, const at::Tensor& bdw, const at::Tensor& w2, const at::Tensor& b2);

namespace {

constexpr int64_t kMaxSlots = 16;

template <class E>
void backward_impl(const E* gy, const E* x, int64_t B, int64_t C, int64_t Hd, int64_t H, int64_t W, const E* w1,
                   const E* b1, const E* wdw, const E* bdw, const E* w2, E* dx, E* dw1, E* db1, E* dwdw, E* dbdw,
                   E* dw2, E* db2, const std::array<bool, 7>& need) {
  const Rows<E, E> rk = rows_for<E, E>();
  const Plan pl = choose_plan(B, Hd, H, W, true);
  const int64_t HW = H * W;
  const int64_t nchunks = ceil_div(Hd, pl.hc);
  const int64_t ntasks = B * pl.nb;
  const bool need_dx = need[0], need_w1 = need[1], need_b1 = need[2], need_dw = need[3], need_db = need[4],
             need_w2 = need[5], need_b2 = need[6];
  const bool need_dh = need_dx || need_w1 || need_b1;
  const bool need_dp = need_dh || need_dw || need_db;
  const bool need_g = need_w2;
  const bool need_hidden = need_dp || need_g;
  const bool need_wgrad = need_w1 || need_b1 || need_dw || need_db || need_w2 || need_b2;

  // per-slot partial sums: [dW1 Hd*C | db1 Hd | ddw Hd*9 | dbdw Hd | dW2 C*Hd | db2 C]
  const int64_t o_w1 = 0, o_b1 = o_w1 + Hd * C, o_dw = o_b1 + Hd, o_db = o_dw + Hd * 9, o_w2 = o_db + Hd,
                o_b2 = o_w2 + C * Hd, S = o_b2 + C;
  const int64_t nslots = need_wgrad ? std::min(ntasks, kMaxSlots) : 0;
  const auto fopts = at::TensorOptions().dtype(std::is_same_v<E, double> ? at::kDouble : at::kFloat);
  at::Tensor part = need_wgrad ? at::zeros({nslots, S}, fopts) : at::Tensor();
  E* partp = need_wgrad ? part.data_ptr<E>() : nullptr;

  auto run_task = [&](int64_t task, E* wp) {
    const int64_t band = task % pl.nb, b = task / pl.nb;
    const int64_t r0 = band * pl.rows, r1 = std::min(H, r0 + pl.rows);
    const int64_t pa = std::max<int64_t>(0, r0 - 1), pb = std::min(H, r1 + 1);
    const int64_t ha = std::max<int64_t>(0, r0 - 2), hb = std::min(H, r1 + 2);
    const int64_t Nout = (r1 - r0) * W, Np = (pb - pa) * W, Nh = (hb - ha) * W;
    const E* xb = x + b * C * HW;
    const E* gyb = gy + b * C * HW;
    E* dxb = need_dx ? dx + b * C * HW + r0 * W : nullptr;

    if (wp && need_b2) {
      for (int64_t c = 0; c < C; ++c) {
        E s = 0;
        rk.convert(gyb + c * HW + r0 * W, Nout, nullptr, &s);
        wp[o_b2 + c] += s;
      }
    }
    if (!need_hidden) return;
    E* h = static_cast<E*>(scratch(0, sizeof(E) * pl.hc * Nh));
    E* dg = static_cast<E*>(scratch(1, sizeof(E) * pl.hc * Np));
    E* g = static_cast<E*>(scratch(2, sizeof(E) * pl.hc * Nout));
    E* dh = static_cast<E*>(scratch(3, sizeof(E) * pl.hc * Nout));
    E* tmp = static_cast<E*>(scratch(4, sizeof(E) * (W + 64)));

    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t j0 = ch * pl.hc, m = std::min(pl.hc, Hd - j0);
      gemm_rm<E>(false, false, m, Nh, C, w1 + j0 * C, C, xb + ha * W, HW, false, h, Nh);
      if (need_dp) gemm_rm<E>(true, false, m, Np, C, w2 + j0, Hd, gyb + pa * W, HW, false, dg, Np);
      for (int64_t jj = 0; jj < m; ++jj) {
        const int64_t j = j0 + jj;
        const E* hj = h + jj * Nh;
        auto hrow = [&](int64_t yy) -> const E* { return (yy >= 0 && yy < H) ? hj + (yy - ha) * W : nullptr; };
        E* dgj = dg + jj * Np;
        for (int64_t yy = need_dp ? pa : r0; yy < (need_dp ? pb : r1); ++yy) {
          rk.dw(hrow(yy - 1), hrow(yy), hrow(yy + 1), wdw + j * 9, b1[j], bdw[j], W, tmp);
          const bool owned = yy >= r0 && yy < r1;
          E* grow = (need_g && owned) ? g + jj * Nout + (yy - r0) * W : nullptr;
          if (need_dp) rk.gelu_bwd(tmp, dgj + (yy - pa) * W, W, dgj + (yy - pa) * W, grow);
          else rk.gelu(tmp, W, grow);
        }
        if (!need_dp) continue;
        auto dprow = [&](int64_t yy) -> const E* { return (yy >= pa && yy < pb) ? dgj + (yy - pa) * W : nullptr; };
        if (need_dw || need_db) {
          E acc9[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
          E sdb = 0;
          for (int64_t yy = r0; yy < r1; ++yy) {
            if (need_dw) rk.dw_wgrad(dprow(yy), hrow(yy - 1), hrow(yy), hrow(yy + 1), b1[j], W, acc9);
            if (need_db) rk.convert(dprow(yy), W, nullptr, &sdb);
          }
          for (int t = 0; t < 9; ++t) wp[o_dw + j * 9 + t] += acc9[t];
          wp[o_db + j] += sdb;
        }
        if (need_dh) {
          E wf[9];
          for (int t = 0; t < 9; ++t) wf[t] = wdw[j * 9 + 8 - t];
          E sb1 = 0;
          for (int64_t yy = r0; yy < r1; ++yy) {
            E* out = dh + jj * Nout + (yy - r0) * W;
            rk.dw(dprow(yy - 1), dprow(yy), dprow(yy + 1), wf, E(0), E(0), W, out);
            if (need_b1) rk.convert(out, W, nullptr, &sb1);
          }
          if (need_b1) wp[o_b1 + j] += sb1;
        }
      }
      if (need_w1) gemm_rm<E>(false, true, m, C, Nout, dh, Nout, xb + r0 * W, HW, true, wp + o_w1 + j0 * C, C);
      if (need_w2) gemm_rm<E>(false, true, C, m, Nout, gyb + r0 * W, HW, g, Nout, true, wp + o_w2 + j0, Hd);
      if (need_dx) gemm_rm<E>(true, false, C, Nout, m, w1 + j0 * C, C, dh, Nout, ch > 0, dxb, HW);
    }
  };

  if (need_wgrad) {
    at::parallel_for(0, nslots, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s)
        for (int64_t t = s * ntasks / nslots; t < (s + 1) * ntasks / nslots; ++t) run_task(t, partp + s * S);
    });
    // weight gradients: slots summed in order
    E* dsts[6] = {dw1, db1, dwdw, dbdw, dw2, db2};
    const int64_t offs[7] = {o_w1, o_b1, o_dw, o_db, o_w2, o_b2, S};
    at::parallel_for(0, S, 2048, [&](int64_t i0, int64_t i1) {
      for (int k = 0; k < 6; ++k) {
        if (!need[k + 1]) continue;
        const int64_t a = std::max(i0, offs[k]), e = std::min(i1, offs[k + 1]);
        for (int64_t i = a; i < e; ++i) {
          E s = partp[i];
          for (int64_t sl = 1; sl < nslots; ++sl) s += partp[sl * S + i];
          dsts[k][i - offs[k]] = s;
        }
      }
    });
  } else {
    at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run_task(t, nullptr);
    });
  }
}

}  // namespace
}  // namespace mlp

std::vector<at::Tensor> mlp_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                                     const at::Tensor& b1, const at::Tensor& wdw, const at::Tensor& bdw,
                                     const at::Tensor& w2, const at::Tensor& b2, std::array<bool, 7> needs) {
  mlp::check_mlp_args("mlp_backward", x, w1, b1, wdw, bdw, w2, b2);
  TORCH_CHECK(grad_out.device().is_cpu(), "mlp_backward: grad_out must be a CPU tensor, got ", grad_out.device());
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "mlp_backward: grad_out must have x's shape ", x.sizes(), ", got ",
              grad_out.sizes());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Hd = w1.size(0);
  const auto dt = x.scalar_type();
  const at::Tensor* like[7] = {&x, &w1, &b1, &wdw, &bdw, &w2, &b2};
  std::vector<at::Tensor> res(7);
  for (int i = 0; i < 7; ++i) {
    if (!needs[i]) res[i] = at::empty({0}, x.options());
    else if (i == 0) res[i] = empty_output_like(x);
    else res[i] = empty_output(like[i]->sizes(), like[i]->options());
  }
  bool any = false;
  for (bool n : needs) any = any || n;
  if (!any) return res;
  if (B == 0) {  // empty batch: dx is empty, weight gradients are zero
    for (int i = 1; i < 7; ++i)
      if (needs[i]) res[i].zero_();
    return res;
  }
  const auto cdt = dt == at::kDouble ? at::kDouble : at::kFloat;  // bfloat16: computed in fp32
  auto cv = [&](const at::Tensor& t) { return t.to(cdt).contiguous(); };
  const at::Tensor xc = cv(x), gyc = cv(grad_out), w1c = cv(w1), b1c = cv(b1), wdc = cv(wdw), bdc = cv(bdw),
                   w2c = cv(w2);
  // compute-type outputs: the results themselves when they already are contiguous in the compute dtype
  std::vector<at::Tensor> work(7);
  for (int i = 0; i < 7; ++i) {
    if (!needs[i]) continue;
    const bool direct = res[i].scalar_type() == cdt && res[i].is_contiguous();
    work[i] = direct ? res[i] : at::empty(res[i].sizes(), res[i].options().dtype(cdt));
  }
  auto ptr = [&](int i) -> void* { return needs[i] ? work[i].data_ptr() : nullptr; };
  if (cdt == at::kDouble) {
    mlp::backward_impl<double>(gyc.data_ptr<double>(), xc.data_ptr<double>(), B, C, Hd, H, W,
                               w1c.data_ptr<double>(), b1c.data_ptr<double>(), wdc.data_ptr<double>(),
                               bdc.data_ptr<double>(), w2c.data_ptr<double>(), static_cast<double*>(ptr(0)),
                               static_cast<double*>(ptr(1)), static_cast<double*>(ptr(2)),
                               static_cast<double*>(ptr(3)), static_cast<double*>(ptr(4)),
                               static_cast<double*>(ptr(5)), static_cast<double*>(ptr(6)), needs);
  } else {
    mlp::backward_impl<float>(gyc.data_ptr<float>(), xc.data_ptr<float>(), B, C, Hd, H, W, w1c.data_ptr<float>(),
                              b1c.data_ptr<float>(), wdc.data_ptr<float>(), bdc.data_ptr<float>(),
                              w2c.data_ptr<float>(), static_cast<float*>(ptr(0)), static_cast<float*>(ptr(1)),
                              static_cast<float*>(ptr(2)), static_cast<float*>(ptr(3)), static_cast<float*>(ptr(4)),
                              static_cast<float*>(ptr(5)), static_cast<float*>(ptr(6)), needs);
  }
  for (int i = 0; i < 7; ++i)
    if (needs[i] && !work[i].is_same(res[i])) res[i].copy_(work[i]);
  return res;
}

}  // namespace segnext_cpu

// NMF2D forward on CPU (math and layout in nmf_cpu.h).
//
// Per sample: x is cut into T tiles of nt columns (nt chosen from D only), grouped into P fixed chunks of
// consecutive tiles. A step is one parallel pass over the (sample, chunk) tasks; per tile:
//   At  (R x n)  = B^T x_tile                      brgemm, the packed tile read from L2
//   Cin          = the stored coef tile, or (first step) softmax_r(inv_t At) (ATen's softmax over dim 0)
//   den (R x n)  = G Cin                           G = B^T B is symmetric, so G Cin = (Cin^T G)^T
//   Cnew         = Cin * At / (den + eps)          the reference's order of operations, one rounding each
//   E_c (D x R) += x_tile Cnew^T,  H_c (R x R) += Cnew Cnew^T      the bases update's partial sums
// then per sample the chunks' partials are summed in chunk order and B <- B * E / (B H + eps), G <- B^T B. The last
// pass does the final coef update and writes y = B C^T tile by tile. Every sum runs in an order fixed by the shape
// (chunks, tiles, the micro-kernel's own order), never by the thread count.
#include "nmf_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "cpu_alloc.h"
#include "cpu_isa.h"
#include "mlp_cpu_kernels.h"

namespace segnext_cpu {
namespace {

using mlp::ceil_div;

// out[i] = a[i] * b[i] / (d[i] + eps) (out may alias a): the multiplicative update, one copy per ISA (the loop is
// vectorised by the compiler for each target; mul, add and div are exactly rounded, so every copy gives the same bits).
#define SEGNEXT_NMF_MUL_DIV(NAME, ATTR)                                                                   \
  ATTR void NAME(const float* a, const float* b, const float* d, float eps, int64_t n, float* out) {     \
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i] / (d[i] + eps);                                 \
  }
SEGNEXT_NMF_MUL_DIV(mul_div_generic, )
#if defined(__x86_64__)
SEGNEXT_NMF_MUL_DIV(mul_div_avx2, __attribute__((target("avx2"))))
SEGNEXT_NMF_MUL_DIV(mul_div_avx512, __attribute__((target("avx512f"))))
#endif
#undef SEGNEXT_NMF_MUL_DIV

using MulDiv = void (*)(const float*, const float*, const float*, float, int64_t, float*);

MulDiv mul_div_for_isa() {
#if defined(__x86_64__)
  if (isa() == Isa::avx512) return mul_div_avx512;
  if (isa() == Isa::avx2) return mul_div_avx2;
#endif
  return mul_div_generic;
}

// dst (cols x rows, leading dimension ldd) = src^T, src (rows x cols, leading dimension lds).
void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  constexpr int64_t BL = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += BL)
    for (int64_t j0 = 0; j0 < cols; j0 += BL) {
      const int64_t i1 = std::min(rows, i0 + BL), j1 = std::min(cols, j0 + BL);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ldd + i] = src[i * lds + j];
    }
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 bool accumulate, float* C, int64_t ldc) {
  mlp::gemm_rm<float>(false, false, M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

}  // namespace

std::vector<at::Tensor> nmf_forward(const at::Tensor& x, const at::Tensor& bases0, int64_t steps, double eps,
                                    double inv_t, bool return_state) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3,
              "nmf_forward: x must be a 3-D (B, D, N) float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type(),
              " on ", x.device());
  const int64_t B = x.size(0), D = x.size(1), N = x.size(2);
  TORCH_CHECK(bases0.device().is_cpu() && bases0.scalar_type() == at::kFloat && bases0.dim() == 3 &&
                  bases0.size(0) == B && bases0.size(1) == D && bases0.size(2) >= 1,
              "nmf_forward: bases0 must be a float32 CPU tensor of shape (", B, ", ", D, ", R) with R >= 1, got ",
              bases0.sizes(), " ", bases0.scalar_type(), " on ", bases0.device());
  TORCH_CHECK(D >= 1 && N >= 1, "nmf_forward: expected D, N >= 1, got x of shape ", x.sizes());
  TORCH_CHECK(steps >= 0, "nmf_forward: steps must be >= 0, got ", steps);
  TORCH_CHECK(eps > 0, "nmf_forward: eps must be > 0, got ", eps);
  const int64_t R = bases0.size(2);
  const auto opts = x.options();
  at::Tensor y = empty_output({B, D, N}, opts);
  at::Tensor bases = empty_output({B, D, R}, opts);
  at::Tensor coef_f = return_state ? empty_output({B, N, R}, opts) : at::empty({0}, opts);
  if (B == 0) return {y, return_state ? bases : at::empty({0}, opts), coef_f};
  bases.copy_(bases0);

  // tiles of nt pixels: the packed tile (D x nt) takes at most ~512 KiB of L2 (a shape-only choice)
  const int64_t nt_max = std::max<int64_t>(16, std::min<int64_t>(256, (131072 / D) / 16 * 16));
  const int64_t nt = std::min(N, nt_max);
  const int64_t ldt = nt + 16;  // padded rows: tile rows do not alias in the caches
  const int64_t T = ceil_div(N, nt);
  const int64_t tpc = ceil_div(T, std::min<int64_t>(T, 8));  // tiles per chunk: at most 8 chunks per sample
  const int64_t P = ceil_div(T, tpc);
  const float epsf = static_cast<float>(eps), inv_tf = static_cast<float>(inv_t);
  const MulDiv mul_div = mul_div_for_isa();

  at::Tensor xpk = at::empty({B, T, D, ldt}, opts);  // x packed tile by tile (first pass)
  at::Tensor coef_t = at::empty({B, R, N}, opts);    // the coefficients, transposed
  at::Tensor bt = at::empty({B, R, D}, opts), gram = at::empty({B, R, R}, opts);
  at::Tensor epart = at::empty({B, P, D, R}, opts), hpart = at::empty({B, P, R, R}, opts);
  float* const xp = xpk.data_ptr<float>();
  float* const cp = coef_t.data_ptr<float>();
  float* const bp = bases.data_ptr<float>();
  float* const btp = bt.data_ptr<float>();
  float* const gp = gram.data_ptr<float>();
  float* const ep = epart.data_ptr<float>();
  float* const hp = hpart.data_ptr<float>();
  float* const yp = y.data_ptr<float>();
  float* const cfp = return_state ? coef_f.data_ptr<float>() : nullptr;
  const float* const xin = x.data_ptr<float>();
  const int64_t sb = x.stride(0), sd = x.stride(1), sn = x.stride(2);

  // B^T and G = B^T B of every sample
  auto refresh = [&](int64_t b) {
    const float* bm = bp + b * D * R;
    float* btb = btp + b * R * D;
    transpose(bm, D, R, R, btb, D);
    gemm(R, R, D, btb, D, bm, R, false, gp + b * R * R, R);
  };
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) refresh(b);
  });

  // One pass over x. init: the coef starts as softmax_r(inv_t At) (the first pass); else it is the stored one.
  // final == false: the coef update of every tile and the partial sums of the bases update; final: the last coef
  // update and the reconstruction y = B C^T (and coef_F).
  auto pass = [&](bool pack, bool init, bool final) {
    at::parallel_for(0, B * P, 1, [&](int64_t t0, int64_t t1) {
      float* at_ = static_cast<float*>(mlp::scratch(0, sizeof(float) * R * nt));
      float* cs = static_cast<float*>(mlp::scratch(1, sizeof(float) * R * nt));
      float* den = static_cast<float*>(mlp::scratch(2, sizeof(float) * R * nt));
      float* cnt = static_cast<float*>(mlp::scratch(3, sizeof(float) * nt * R));
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / P, c = task % P;
        const float* bm = bp + b * D * R;
        const float* btb = btp + b * R * D;
        const float* g = gp + b * R * R;
        float* e_c = ep + (b * P + c) * D * R;
        float* h_c = hp + (b * P + c) * R * R;
        const int64_t j0 = c * tpc, j1 = std::min(T, j0 + tpc);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t n0 = j * nt, n = std::min(nt, N - n0);
          float* xt = xp + ((b * T + j) * D) * ldt;
          if (pack) {  // D rows of n pixels
            const float* src = xin + b * sb + n0 * sn;
            for (int64_t d = 0; d < D; ++d) {
              const float* s = src + d * sd;
              float* o = xt + d * ldt;
              if (sn == 1) std::memcpy(o, s, sizeof(float) * n);
              else for (int64_t i = 0; i < n; ++i) o[i] = s[i * sn];
            }
          }
          gemm(R, n, D, btb, D, xt, ldt, false, at_, n);  // At = B^T x_tile
          float* ct = cp + b * R * N + n0;                 // the stored coef tile (R x n, leading dimension N)
          const float* cin = ct;
          int64_t ldin = N;
          if (init) {  // softmax over r of inv_t At (the columns of the (R, n) tile)
            for (int64_t i = 0; i < R * n; ++i) den[i] = inv_tf * at_[i];
            at::Tensor logits = at::from_blob(den, {R, n}, opts), soft = at::from_blob(cs, {R, n}, opts);
            at::_softmax_out(soft, logits, 0, false);
            cin = cs;
            ldin = n;
          }
          gemm(R, n, R, g, R, cin, ldin, false, den, n);  // den = G Cin
          float* cout = final ? cs : ct;                  // in place: each element is read before it is written
          const int64_t ldout = final ? n : N;
          for (int64_t r = 0; r < R; ++r)
            mul_div(cin + r * ldin, at_ + r * n, den + r * n, epsf, n, cout + r * ldout);
          if (!final) {
            transpose(cout, R, n, ldout, cnt, R);  // Cnew^T (n x R)
            const bool acc = j > j0;
            gemm(D, R, n, xt, ldt, cnt, R, acc, e_c, R);       // E_c += x_tile Cnew^T
            gemm(R, R, n, cout, ldout, cnt, R, acc, h_c, R);   // H_c += Cnew Cnew^T
          } else {
            gemm(D, n, R, bm, R, cout, ldout, false, yp + b * D * N + n0, N);  // y tile = B Cf
            if (cfp) transpose(cout, R, n, ldout, cfp + (b * N + n0) * R, R);
          }
        }
      }
    });
  };

  // the bases update of every sample from the chunks' partial sums (summed in chunk order)
  auto bases_update = [&]() {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      float* es = static_cast<float*>(mlp::scratch(4, sizeof(float) * D * R));
      float* hs = static_cast<float*>(mlp::scratch(5, sizeof(float) * R * R));
      float* dn = static_cast<float*>(mlp::scratch(6, sizeof(float) * D * R));
      for (int64_t b = b0; b < b1; ++b) {
        const float* e0 = ep + b * P * D * R;
        const float* h0 = hp + b * P * R * R;
        std::memcpy(es, e0, sizeof(float) * D * R);
        std::memcpy(hs, h0, sizeof(float) * R * R);
        for (int64_t c = 1; c < P; ++c) {
          const float* ec = e0 + c * D * R;
          const float* hc = h0 + c * R * R;
          for (int64_t i = 0; i < D * R; ++i) es[i] += ec[i];
          for (int64_t i = 0; i < R * R; ++i) hs[i] += hc[i];
        }
        float* bm = bp + b * D * R;
        gemm(D, R, R, bm, R, hs, R, false, dn, R);  // B H
        mul_div(bm, es, dn, epsf, D * R, bm);
        refresh(b);
      }
    });
  };

  for (int64_t k = 0; k < steps; ++k) {
    pass(k == 0, k == 0, false);
    bases_update();
  }
  pass(steps == 0, steps == 0, true);
  return {y, return_state ? bases : at::empty({0}, opts), coef_f};
}

}  // namespace segnext_cpu

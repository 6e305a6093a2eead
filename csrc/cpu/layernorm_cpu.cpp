// LayerNorm over channels on NCHW memory (math in layernorm_cpu.h). The block kernel is compiled once per ISA
// (portable, AVX2, AVX-512) and vectorised by the compiler along the pixels; adds, multiplies, divisions and square
// roots are exactly rounded, so every copy gives the same bits.
#include "layernorm_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu_alloc.h"
#include "cpu_isa.h"

namespace segnext_cpu {
namespace {

constexpr int64_t kBlock = 64;  // pixels per task

// y[c * N + p] for p in [0, n) of one block: x, y point at the block's first pixel of channel 0.
#define SEGNEXT_LN_BLOCK(NAME, ATTR)                                                                           \
  ATTR void NAME(const float* x, float* y, int64_t C, int64_t N, int64_t n, const float* w, const float* b,   \
                 float eps) {                                                                                  \
    float mean[kBlock], rstd[kBlock];                                                                          \
    for (int64_t p = 0; p < n; ++p) mean[p] = 0.0f;                                                            \
    for (int64_t c = 0; c < C; ++c) {                                                                          \
      const float* xc = x + c * N;                                                                             \
      for (int64_t p = 0; p < n; ++p) mean[p] += xc[p];                                                        \
    }                                                                                                          \
    const float inv_c = 1.0f / static_cast<float>(C);                                                          \
    for (int64_t p = 0; p < n; ++p) {                                                                          \
      mean[p] *= inv_c;                                                                                        \
      rstd[p] = 0.0f;                                                                                          \
    }                                                                                                          \
    for (int64_t c = 0; c < C; ++c) {                                                                          \
      const float* xc = x + c * N;                                                                             \
      for (int64_t p = 0; p < n; ++p) {                                                                        \
        const float d = xc[p] - mean[p];                                                                       \
        rstd[p] += d * d;                                                                                      \
      }                                                                                                        \
    }                                                                                                          \
    for (int64_t p = 0; p < n; ++p) rstd[p] = 1.0f / std::sqrt(rstd[p] * inv_c + eps);                         \
    for (int64_t c = 0; c < C; ++c) {                                                                          \
      const float* xc = x + c * N;                                                                             \
      float* yc = y + c * N;                                                                                   \
      const float wc = w[c], bc = b[c];                                                                        \
      for (int64_t p = 0; p < n; ++p) yc[p] = (xc[p] - mean[p]) * rstd[p] * wc + bc;                           \
    }                                                                                                          \
  }
SEGNEXT_LN_BLOCK(ln_block_generic, )
#if defined(__x86_64__)
SEGNEXT_LN_BLOCK(ln_block_avx2, __attribute__((target("avx2"))))
SEGNEXT_LN_BLOCK(ln_block_avx512, __attribute__((target("avx512f"))))
#endif
#undef SEGNEXT_LN_BLOCK

using LnBlock = void (*)(const float*, float*, int64_t, int64_t, int64_t, const float*, const float*, float);

LnBlock ln_block_for_isa() {
#if defined(__x86_64__)
  if (isa() == Isa::avx512) return ln_block_avx512;
  if (isa() == Isa::avx2) return ln_block_avx2;
#endif
  return ln_block_generic;
}

}  // namespace

at::Tensor channel_layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3,
              "channel_layer_norm_forward: x must be a 3-D (B, C, N) float32 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  TORCH_CHECK(C >= 1 && N >= 1, "channel_layer_norm_forward: x must have C, N >= 1, got shape ", x.sizes());
  for (const auto* t : {&weight, &bias})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->sizes() == at::IntArrayRef({C}),
                "channel_layer_norm_forward: weight and bias must be float32 CPU tensors of shape (", C, "), got ",
                t->sizes(), " ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK(eps > 0, "channel_layer_norm_forward: eps must be > 0, got ", eps);
  at::Tensor y = empty_output({B, C, N}, x.options());
  if (B == 0) return y;
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), bc = bias.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const LnBlock block = ln_block_for_isa();
  const int64_t nblk = (N + kBlock - 1) / kBlock;
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, p0 = (t % nblk) * kBlock, n = std::min(kBlock, N - p0);
      block(xp + b * C * N + p0, yp + b * C * N + p0, C, N, n, wp, bp, epsf);
    }
  });
  return y;
}

}  // namespace segnext_cpu

// The CPU backend of MSCAN's stage norms: LayerNorm over the channels of every pixel, read from and written to
// NCHW memory (official mscan.py: norm(x.flatten(2).transpose(1, 2)) on the (B, N, C) view of an NCHW tensor, then
// reshape and permute back: two copies in eager PyTorch, none here). Bound to Python by csrc/cpu/binding.cpp.
//
//   y[b, c, p] = (x[b, c, p] - mean[b, p]) * rstd[b, p] * weight[c] + bias[c]
//   mean = sum_c x / C, var = sum_c (x - mean)^2 / C (two passes, fp32), rstd = 1 / sqrt(var + eps)
//
// Tasks are (image, block of 64 pixels): the block's C x 64 values stay in L1/L2 over the three passes (sum,
// squared deviations, normalise), every vector lane a pixel. Every output is computed by the same operations
// whichever thread runs it: results are bitwise identical for any thread count.
#pragma once

#include <ATen/ATen.h>

namespace segnext_cpu {

// x: (B, C, N) float32 CPU tensor (copied to contiguous once when it is not), B >= 0, C, N >= 1; weight, bias:
// float32 (C,) CPU tensors; eps > 0. Returns (B, C, N) contiguous float32.
at::Tensor channel_layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      double eps);

}  // namespace segnext_cpu

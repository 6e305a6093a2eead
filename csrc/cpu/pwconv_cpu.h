// The CPU backend of the fused pointwise (1x1) convolution with its epilogue, forward only (inference): entry point
// of pwconv_cpu.cpp, bound to Python by csrc/cpu/binding.cpp.
//
//   y[b, o, p] = act( gamma[o] sum_i W[o, i] x[b, i, p] + bias[o] + alpha[o] r[b, o, p] )      p = pixel (h, w)
//
// act: 0 none, 1 exact GELU (erf), 2 ReLU. gamma, bias, alpha and r are optional (absent: 1, 0, 1 and 0). This is the 1x1
// convolution of every SegNeXt block and head layer with what follows it fused in: proj_1 + GELU, proj_2 + shortcut
// + layer scale + residual (the layer scale is gamma; with the BatchNorm before proj_1 it makes alpha and bias), the
// head's 1x1 ConvModules (+ ReLU).
// Per image, tiles of (a block of output channels x a block of pixels) run the GEMM through oneDNN's batch-reduce
// GEMM micro-kernel (at::native::cpublas::brgemm) straight into y, and the epilogue on the tile while it is in cache.
// float32 only (the Python layer runs its reference for other dtypes). The work partition depends on the shape only:
// results are bitwise identical for any number of threads.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace segnext_cpu {

// x: (B, Cin, H, W) float32 CPU, any strides (non-NCHW copied once); w: (Cout, Cin) float32; bias: (Cout,) or none;
// alpha: (Cout,) or none; r: (B, Cout, H, W) or none (any strides); gamma: (Cout,) or none. Returns y
// (B, Cout, H, W) float32, contiguous NCHW.
at::Tensor pwconv_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                          int64_t act, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& r,
                          const std::optional<at::Tensor>& gamma);

}  // namespace segnext_cpu

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
// float32 and bfloat16 (the Python layer runs its reference for other dtypes). The work partition depends on the
// shape only: results are bitwise identical for any number of threads.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace segnext_cpu {

// x: (B, Cin, H, W) float32 or bfloat16 CPU, any strides (non-NCHW copied once); w: (Cout, Cin) in x's dtype or
// float32; bias: (Cout,) float32 or none; alpha: (Cout,) float32 or none; r: (B, Cout, H, W) in the output dtype or
// none (any strides); gamma: (Cout,) float32 or none; out_dtype: float32 or bfloat16 (none: x's dtype); lowp: the GEMM
// on bfloat16-rounded operands with fp32 accumulation (gemm_bf16.h: on any CPU, vdpbf16ps where it has AVX512-BF16),
// as a bfloat16 x always gets. Returns y (B, Cout, H, W) in the output dtype, contiguous NCHW.
at::Tensor pwconv_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                          int64_t act, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& r,
                          const std::optional<at::Tensor>& gamma, std::optional<at::ScalarType> out_dtype,
                          bool lowp);

}  // namespace segnext_cpu

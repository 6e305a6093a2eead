// The CPU backend of the fused MSCAN MLP (official mscan.py `Mlp`): entry points of the C++ kernels (forward in
// mlp_cpu_fwd.cpp, backward in mlp_cpu_bwd.cpp; shared internals in mlp_cpu_kernels.h), bound to Python by
// csrc/cpu/binding.cpp.
//
//   h = fc1(x) = W1 x + b1                 1x1 conv C -> Hd (per pixel)
//   p = dw3x3(h) + bdw                      depthwise 3x3, zero padding 1 (the padding zeros are zeros of h)
//   g = GELU(p) = p/2 (1 + erf(p / sqrt 2)) exact GELU (dropout p = 0: identity)
//   y = fc2(g) = W2 g + b2                  1x1 conv Hd -> C
//
// Weights (nn.Conv2d parameters reshaped, contiguous, all in x's dtype): w1 (Hd, C), b1 (Hd,), wdw (Hd, 9) taps
// row-major (ky * 3 + kx), bdw (Hd,), w2 (C, Hd), b2 (C,).
//
// The hidden activations are computed per cache-sized tile (a band of rows of one image, all channels, with a 1-row
// halo; a block of hidden channels at a time) and never exist at B*Hd*H*W size. The two 1x1 GEMMs of a tile call
// at::mm_out / at::addmm_out on views of the tile buffers (torch's CPU BLAS, MKL); the depthwise 3x3, biases and GELU
// are hand-written vector code (AVX-512 / AVX2 / portable, chosen at run time by segnext_cpu::isa()). float32;
// bfloat16 (computed in fp32 on inputs converted once, output rounded once); float64 (plain path, for gradcheck). The work partition depends on the
// shape only, never on the number of threads, so results are bitwise identical for any thread count.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <vector>

namespace segnext_cpu {

// x: (B, C, H, W) float32 / bfloat16 / float64 CPU tensor, any strides, B >= 0, C, H, W >= 1; weights as above;
// residual: none or a tensor like x, added in the epilogue (y = fc2(...) + residual: the block's residual with the
// layer scale folded into fc2); affine: none or a (3, C) float32 tensor (float32 / bfloat16 x) of the input scale s,
// the input shift t and the output scale g: y = g * fc2(GELU(dw(fc1(s * x + t)))) (+ residual), an eval BatchNorm
// before fc1 and the layer scale after fc2 without copies of the weights. lowp (float32 x): both GEMMs on
// bfloat16-rounded operands with fp32 accumulation (gemm_bf16.h: on any CPU, vdpbf16ps where it has AVX512-BF16), as
// a bfloat16 x gets there; the rest stays fp32. Returns y (B, C, H, W) in x's dtype with the memory format of
// at::empty_like(x).
at::Tensor mlp_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& wdw,
                       const at::Tensor& bdw, const at::Tensor& w2, const at::Tensor& b2,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& affine,
                       bool lowp = false);

// grad_out: (B, C, H, W), any strides (converted to x's dtype). needs: which of (dx, dw1, db1, dwdw, dbdw, dw2, db2)
// to compute. Returns those 7 tensors: dx like at::empty_like(x); the others contiguous in the weights' dtype with
// the shapes above; an entry not needed is an empty (0,) tensor. Hidden activations are recomputed from x per tile
// (2-row halo). Weight gradients: per-tile partials summed in a fixed order (bitwise identical for any number of
// threads).
std::vector<at::Tensor> mlp_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                                     const at::Tensor& b1, const at::Tensor& wdw, const at::Tensor& bdw,
                                     const at::Tensor& w2, const at::Tensor& b2, std::array<bool, 7> needs);

}  // namespace segnext_cpu

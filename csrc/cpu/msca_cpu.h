// The CPU backend of fused MSCA: entry points of the hand-written C++ kernels (forward in msca_cpu_fwd.cpp,
// backward in msca_cpu_bwd.cpp), bound to Python by csrc/cpu/binding.cpp.
//
// MSCA (SegNeXt paper section 3.1, official mmseg/models/backbones/mscan.py AttentionModule), all depthwise convs
// with bias and zero "same" padding:
//   a = dw5x5(u); h_k = dw_1xk(a); v_k = dw_kx1(h_k) for k = 7, 11, 21; s = a + v_7 + v_11 + v_21;
//   out = (w3 @ s + b3) * u   (1x1 channel mix per pixel, gated by u)
//
// Packed weights (segnext_kernels msca reference pack_weights), contiguous, float32 (float64 for float64 u):
//   w0 (C, 25) 5x5 taps row-major (ky * 5 + kx); b0 (C,);
//   ws (C, 78) the six strip kernels per channel at offsets 0 (1x7), 7 (7x1), 14 (1x11), 25 (11x1), 36 (1x21),
//   57 (21x1); bs (C, 6) their biases in the same order; w3 (C, C) [out, in]; b3 (C,).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

namespace segnext_cpu {

// u: (B, C, H, W) float16 / bfloat16 / float32 / float64 CPU tensor, any strides, B >= 0, C, H, W >= 1.
// Returns out (B, C, H, W) in u's dtype with the memory format of at::empty_like(u).
at::Tensor msca_forward(const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& ws,
                        const at::Tensor& bs, const at::Tensor& w3, const at::Tensor& b3);

// grad_out: (B, C, H, W) in u's dtype, any strides. needs: which of (du, dw0, db0, dws, dbs, dw3, db3) to compute.
// Returns those 7 tensors: du like at::empty_like(u); the others contiguous in the packed weights' dtype with the
// packed shapes; an entry not needed is an empty (0,) tensor. Weight gradients are bitwise identical for any
// number of threads (fixed work partition, partials summed in a fixed order).
std::vector<at::Tensor> msca_backward(const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& w0,
                                      const at::Tensor& b0, const at::Tensor& ws, const at::Tensor& bs,
                                      const at::Tensor& w3, const at::Tensor& b3, std::array<bool, 7> needs);

// msca_cpu_weights.cpp. check_packed_weights: RuntimeError (starting with `op`) unless the six packed weights are
// defined CPU tensors of dtype wdt with the packed shapes for C channels.
void check_packed_weights(const char* op, int64_t C, at::ScalarType wdt, const at::Tensor& w0, const at::Tensor& b0,
                          const at::Tensor& ws, const at::Tensor& bs, const at::Tensor& w3, const at::Tensor& b3);
// The eager direct path, the official weights in: w0 (C, 1, 5, 5), b0 (C,), ws 6 strips
// (C, 1, 1, k) / (C, 1, k, 1) in official order, bs 6 x (C,), w3 (C, C, 1, 1), b3 (C,), in u's dtype, already
// checked by the caller (segnext_kernels.msca).
// msca_forward_official: msca_forward on them (packed into a per-thread buffer kept between calls).
at::Tensor msca_forward_official(const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0,
                                 const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& bs,
                                 const at::Tensor& w3, const at::Tensor& b3);
// msca_pack_weights: the packed layout above, float32 (float64 when float64 is set), as tensors (views of one).
std::vector<at::Tensor> msca_pack_weights(const at::Tensor& w0, const at::Tensor& b0,
                                          const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& bs,
                                          const at::Tensor& w3, const at::Tensor& b3, bool float64);
// msca_pack_small: w0, b0, ws, bs, b3 packed into dst (C x kSmallElems elements of the packed dtype for u_dtype, one
// after another from the offsets below times C); returns w3 as a dense (C, C) tensor of that dtype.
constexpr int64_t kSmallW0 = 0, kSmallB0 = 25, kSmallWs = 26, kSmallBs = 104, kSmallB3 = 110, kSmallElems = 111;
at::Tensor msca_pack_small(void* dst, at::ScalarType u_dtype, const at::Tensor& w0, const at::Tensor& b0,
                           const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& bs, const at::Tensor& w3,
                           const at::Tensor& b3);
// msca_unpack_grads: the 7 tensors of msca_backward to the 16 official weight gradients in `dtype` (contiguous;
// undefined where needs[i] is false).
std::vector<at::Tensor> msca_unpack_grads(const std::vector<at::Tensor>& g, at::ScalarType dtype,
                                          const std::vector<bool>& needs);

}  // namespace segnext_cpu

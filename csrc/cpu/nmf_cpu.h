// The CPU backend of NMF2D (the Hamburger's matrix decomposition), forward only (inference): entry point of
// nmf_cpu.cpp, bound to Python by csrc/cpu/binding.cpp.
//
// Per sample b, x (D, N), initial bases B0 (D, R) (official NMF2D, mmseg/models/decode_heads/ham_head.py):
//
//   C = softmax_r(inv_t * x^T B)                         (N, R)
//   K times:  C <- C * (x^T B) / (C (B^T B) + eps)      coef update
//             B <- B * (x C)   / (B (C^T C) + eps)      bases update
//   C <- C * (x^T B) / (C (B^T B) + eps)                  final coef update
//   y = B C^T                                            (D, N)
//
// One pass over x per step: x is cut into tiles of columns (pixels), packed once into a cache-friendly copy; per
// tile the products x^T B and x C share the tile while it is in L2, the coef update runs on the tile, and the
// partial sums x C and C^T C of the bases update accumulate per fixed chunk of tiles. The GEMMs are oneDNN's batch-
// reduce micro-kernel (at::native::cpublas::brgemm); the softmax of the initialisation is ATen's. The coefficients
// are kept transposed (R, N) inside. The work partition depends on the shape only: results are bitwise identical
// for any number of threads.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace segnext_cpu {

// x: (B, D, N) float32 CPU, any strides (copied into tiles); bases0: (B, D, R) float32; steps K >= 0; eps > 0.
// Returns {y (B, D, N) float32 contiguous, bases_K (B, D, R), coef_F (B, N, R)}; with return_state false the last
// two are empty (0,) tensors.
std::vector<at::Tensor> nmf_forward(const at::Tensor& x, const at::Tensor& bases0, int64_t steps, double eps,
                                    double inv_t, bool return_state);

}  // namespace segnext_cpu

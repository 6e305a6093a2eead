"""The "cpu" backend of NMF2D: C++ (``csrc/cpu/nmf_cpu.cpp``), forward only (inference).

One pass over x per multiplicative step: x is packed once into tiles of pixels; per tile the products x^T B and
x C share the tile while it is in cache, the coef update runs on it, and the bases update's partial sums (x C,
C^T C) accumulate per fixed chunk of tiles; the GEMMs are oneDNN's batch-reduce micro-kernel
(``at::native::cpublas::brgemm``), the initial softmax ATen's. Threaded with torch's intra-op pool; bitwise
identical for any number of threads. The updates run in float32: float16 / bfloat16 x is converted first and the
reconstruction converted back (as the reference does). A function of the extension ``segnext_kernels._C_cpu``,
loaded (or JIT-built) lazily by ``extension.CPU_EXTENSION``; it runs inside the custom op ``nmf2d_fwd`` of
``nmf/interface.py``. ``segnext_kernels.nmf2d`` runs the eager reference whenever a gradient is needed.
"""
from __future__ import annotations

import torch

from ..extension import CPU_EXTENSION

__all__ = ["forward"]


def forward(x: torch.Tensor, bases0: torch.Tensor, steps: int, eps: float, inv_t: float, return_state: bool):
    """x (B, D, N) float32 / bfloat16 / float16 CPU, any strides (the dtypes registered in ``nmf/__init__.py``);
    bases0 (B, D, R) float32, any strides.

    Returns (y (B, D, N) in x's dtype, contiguous; bases_K (B, D, R) float32; coef_F (B, N, R) float32), the last
    two empty (0,) tensors unless ``return_state``."""
    xf = x if x.dtype == torch.float32 else x.float()
    y, bases_k, coef_f = CPU_EXTENSION.load().nmf_forward(xf, bases0, int(steps), float(eps), float(inv_t),
                                                          bool(return_state))
    return (y if x.dtype == torch.float32 else y.to(x.dtype)), bases_k, coef_f

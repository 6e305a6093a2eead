"""The "cpu" backend of the MLP: C++ kernels (``csrc/cpu/mlp_cpu_fwd.cpp``, ``mlp_cpu_bwd.cpp``): per cache-sized
tile (a band of rows of one image with a 1-row halo, a block of hidden channels at a time) fc1 and fc2 run as GEMMs
through torch's CPU BLAS on the tile and the depthwise 3x3 + biases + exact GELU in between are hand-written vector
code (AVX-512 / AVX2 / portable chosen at run time, ``csrc/cpu/cpu_isa.h``); the hidden activations never exist at
full size. Threaded with torch's intra-op pool. Functions of the extension ``segnext_kernels._C_cpu``, loaded (or
JIT-built) lazily by ``extension.CPU_EXTENSION``; they run inside the custom ops of ``mlp/interface.py``.

Precision: float32; bfloat16 computed in fp32 (inputs converted once, results rounded once); float64 plain path
(gradcheck). Results are bitwise identical for any number of threads (the tiling depends on the shape only;
weight-gradient partials are summed in a fixed order).
"""
from __future__ import annotations

from ..extension import CPU_EXTENSION

__all__ = ["forward", "backward"]


def forward(x, w1, b1, wdw, bdw, w2, b2, residual=None, affine=None, lowp=False):
    """Fused MLP forward. x: (B, C, H, W) float32/bfloat16/float64 CPU tensor, any strides; packed weights as
    ``mlp.reference.pack_weights`` in x's dtype; residual: None or a tensor like x, added in the epilogue; affine:
    None or (3, C) float32 (input scale, input shift, output scale); lowp: float32 x with both GEMMs on bfloat16
    operands (fp32 accumulation; on any CPU: csrc/cpu/gemm_bf16.h). Returns (B, C, H, W) in x's dtype, memory format of
    empty_like(x)."""
    return CPU_EXTENSION.load().mlp_forward(x, w1, b1, wdw, bdw, w2, b2, residual, affine, bool(lowp))


def backward(grad_out, x, w1, b1, wdw, bdw, w2, b2, needs_input_grad):
    """Fused MLP backward (recomputes the hidden activations from x). needs_input_grad: 7 bools for
    (x, w1, b1, wdw, bdw, w2, b2). Returns (dx, dw1 (Hd, C), db1, dwdw (Hd, 9), dbdw, dw2 (C, Hd), db2); entries not
    needed are None."""
    needs = [bool(n) for n in needs_input_grad]
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    grads = CPU_EXTENSION.load().mlp_backward(grad_out, x, w1, b1, wdw, bdw, w2, b2, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))

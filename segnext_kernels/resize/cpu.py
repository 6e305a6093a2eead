"""The "cpu" backend of the bilinear resize: C++ kernels (``csrc/cpu/resize_cpu.cpp``). Per output row the two
source rows are blended once into an L1 row buffer, then the horizontal lerp reads it through per-column (index,
weight) tables (AVX-512 two-register permutes, gathers for wide downsampling, AVX2 gathers, portable scalar code;
chosen at run time, ``csrc/cpu/cpu_isa.h``). Source indices and weights are PyTorch's (``ATen/native/UpSample.h``),
so results match ``F.interpolate`` to ~1 ulp. Outputs of 4 MiB or more get a 2 MiB-aligned mapping of their own
(Linux), written with non-temporal stores (float32); a freed one goes back to a small cache (512 MiB at most) that
the next call reuses, already faulted in, which saves the page-fault cost of a fresh 150-class full-resolution
output whenever the previous output has been dropped. Threaded with torch's intra-op pool; bitwise identical for any number of
threads. A function of the extension ``segnext_kernels._C_cpu`` (``extension.CPU_EXTENSION``, loaded or JIT-built
lazily); it runs inside the custom op of ``resize/interface.py``.

Precision: float32; bfloat16 computed in fp32 (fp32 weights, rounded once); float64 plain path (gradcheck).
"""
from __future__ import annotations

from ..extension import CPU_EXTENSION

__all__ = ["forward"]


def forward(x, out_h: int, out_w: int, align_corners: bool):
    """Bilinear resize. x: (B, C, H, W) float32/bfloat16/float64 CPU tensor, any strides. Returns (B, C, out_h,
    out_w) contiguous in x's dtype."""
    return CPU_EXTENSION.load().resize_bilinear_forward(x, int(out_h), int(out_w), bool(align_corners))

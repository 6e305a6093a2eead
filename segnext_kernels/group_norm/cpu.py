"""The "cpu" backend of GroupNorm: C++ kernels (``csrc/cpu/group_norm_cpu.cpp``). Tasks of one (image, group); per
task the mean, the squared deviations (two passes, fp32, vector partial sums in a fixed order) and the per-channel
affine over the group's contiguous C/G * HW values (compiled per ISA, chosen at run time). Bitwise identical for any
number of threads. A function of the extension ``segnext_kernels._C_cpu`` (``extension.CPU_EXTENSION``, loaded or
JIT-built lazily); it runs inside the custom op of ``group_norm/interface.py``.
"""
from __future__ import annotations

from ..extension import CPU_EXTENSION

__all__ = ["forward"]


def forward(x, num_groups: int, weight, bias, eps: float):
    """x (B, C, *) float32 / bfloat16 CPU, any strides; weight, bias (C,) float32 or x's dtype, or None. Returns
    (B, C, *) in x's dtype, contiguous NCHW (statistics and the affine in fp32)."""
    return CPU_EXTENSION.load().group_norm_forward(x, int(num_groups), weight, bias, float(eps))

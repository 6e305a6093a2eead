"""The "cpu" backend of the channel LayerNorm: C++ kernels (``csrc/cpu/layernorm_cpu.cpp``). Tasks of 64 pixels of
one image; per task the mean, the squared deviations (two passes, fp32) and the normalised output over all C
channels, the pixels in vector lanes (compiled per ISA, chosen at run time). Bitwise identical for any number of
threads. A function of the extension ``segnext_kernels._C_cpu`` (``extension.CPU_EXTENSION``, loaded or JIT-built
lazily); it runs inside the custom op of ``layernorm/interface.py``.
"""
from __future__ import annotations

from ..extension import CPU_EXTENSION

__all__ = ["forward"]


def forward(x, weight, bias, eps: float):
    """x (B, C, N) float32 CPU, any strides; weight, bias (C,) float32. Returns (B, C, N) float32, contiguous."""
    return CPU_EXTENSION.load().channel_layer_norm_forward(x, weight, bias, float(eps))

"""The "cpu" backend of the fused pointwise convolution: C++ (``csrc/cpu/pwconv_cpu.cpp``): per tile of output
channels x pixels, oneDNN's batch-reduce GEMM micro-kernel (``at::native::cpublas::brgemm``) writes the tile and the
epilogue (bias, alpha * r, GELU / ReLU; vector code chosen at run time) runs on it while it is in cache. Threaded
with torch's intra-op pool; bitwise identical for any number of threads. float32. A function of the extension
``segnext_kernels._C_cpu``, loaded (or JIT-built) lazily by ``extension.CPU_EXTENSION``; it runs inside the custom
op of ``pwconv/interface.py``.
"""
from __future__ import annotations

from ..extension import CPU_EXTENSION

__all__ = ["forward"]

_ACT_CODES = {"none": 0, "gelu": 1, "relu": 2}


def forward(x, weight, bias, act, alpha, r, gamma=None):
    """x (B, Cin, H, W) float32 CPU, any strides; weight (Cout, Cin) contiguous; bias / alpha / gamma (Cout,) or
    None; r (B, Cout, H, W) or None; act "none" / "gelu" / "relu". Returns y (B, Cout, H, W) float32, contiguous
    NCHW."""
    return CPU_EXTENSION.load().pwconv_forward(x, weight, bias, _ACT_CODES[act], alpha, r, gamma)

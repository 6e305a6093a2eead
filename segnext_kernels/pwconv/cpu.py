"""The "cpu" backend of the fused pointwise convolution: C++ (``csrc/cpu/pwconv_cpu.cpp``): per tile of output
channels x pixels, oneDNN's batch-reduce GEMM micro-kernel (``at::native::cpublas::brgemm``) writes the tile and the
epilogue (bias, alpha * r, GELU / ReLU; vector code chosen at run time) runs on it while it is in cache. Threaded
with torch's intra-op pool; bitwise identical for any number of threads. float32 and bfloat16 (the GEMM on
bfloat16 operands with fp32 accumulation: ``csrc/cpu/gemm_bf16.h``, AVX512-BF16 or AMX; elsewhere the fp32 GEMM
on bfloat16-rounded copies). A function of the extension
``segnext_kernels._C_cpu``, loaded (or JIT-built) lazily by ``extension.CPU_EXTENSION``; it runs inside the custom
op of ``pwconv/interface.py``.
"""
from __future__ import annotations

from ..extension import CPU_EXTENSION

__all__ = ["forward"]

_ACT_CODES = {"none": 0, "gelu": 1, "relu": 2}


def forward(x, weight, bias, act, alpha, r, gamma=None, out_dtype=None, lowp=False):
    """x (B, Cin, H, W) float32 / bfloat16 CPU, any strides; weight (Cout, Cin) contiguous, x's dtype or float32; bias
    / alpha / gamma (Cout,) float32 or None; r (B, Cout, H, W) in the output dtype or None; act "none" / "gelu" /
    "relu"; out_dtype float32 / bfloat16 / None (x's); lowp: the GEMM on bfloat16 operands (a bfloat16 x always).
    Returns y (B, Cout, H, W) in the output dtype, contiguous NCHW."""
    return CPU_EXTENSION.load().pwconv_forward(x, weight, bias, _ACT_CODES[act], alpha, r, gamma, out_dtype,
                                               bool(lowp))

"""The "cpu" backend of MSCA: hand-written C++ kernels (``csrc/cpu/msca_cpu_fwd.cpp``, ``msca_cpu_bwd.cpp``), one
pass over cache-sized tiles with AVX-512 / AVX2 / portable code chosen at run time (``csrc/cpu/cpu_isa.h``;
``SEGNEXT_CPU_ISA`` lowers it), threaded with torch's intra-op pool (``torch.set_num_threads``). Functions of the
extension ``segnext_kernels._C_cpu`` (``csrc/cpu/binding.cpp``), loaded (or JIT-built) lazily by
``extension.CPU_EXTENSION``; they run inside the custom ops of ``msca/interface.py``.

Precision: fp32 accumulation for float32, bfloat16 and float16 inputs (converted on load and store), float64 for
float64 (a plain path, for gradcheck). Results are bitwise identical for any number of threads: the work partition
does not depend on it and the weight-gradient partials are summed in a fixed order.
"""
from __future__ import annotations

from ..extension import CPU_EXTENSION

__all__ = ["forward", "backward", "isa"]


def isa() -> str:
    """The vector ISA the kernels run with here: "avx512", "avx2" or "scalar" (loads the extension)."""
    return CPU_EXTENSION.load().isa()


def forward(u, w0, b0, ws, bs, w3, b3):
    """Fused MSCA forward. u: (B, C, H, W) float32/bfloat16/float16/float64 CPU tensor, any strides; packed weights
    as ``msca.reference.pack_weights``. Returns out (B, C, H, W) in u's dtype, memory format of empty_like(u)."""
    return CPU_EXTENSION.load().msca_forward(u, w0, b0, ws, bs, w3, b3)


def backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad):
    """Fused MSCA backward: grad_out (B, C, H, W) any strides; needs_input_grad: 7 bools for (u, w0, b0, ws, bs, w3,
    b3). Returns (du, dw0 (C, 25), db0 (C,), dws (C, 78), dbs (C, 6), dw3 (C, C), db3 (C,)); entries not needed are
    None."""
    needs = [bool(n) for n in needs_input_grad]
    if grad_out.dtype != u.dtype:
        grad_out = grad_out.to(u.dtype)
    grads = CPU_EXTENSION.load().msca_backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))

"""The "cpu" backend of MSCA: hand-written C++ kernels (``csrc/cpu/msca_cpu_fwd.cpp``, ``msca_cpu_bwd.cpp``), one
pass over cache-sized tiles with AVX-512 / AVX2 / portable code chosen at run time (``csrc/cpu/cpu_isa.h``;
``SEGNEXT_CPU_ISA`` lowers it), threaded with torch's intra-op pool (``torch.set_num_threads``). Functions of the
extension ``segnext_kernels._C_cpu`` (``csrc/cpu/binding.cpp``), loaded (or JIT-built) lazily by
``extension.CPU_EXTENSION``; they run inside the custom ops of ``msca/interface.py``, and, in plain eager code, in
``direct`` (below) without them.

Precision: fp32 accumulation for float32, bfloat16 and float16 inputs (converted on load and store), float64 for
float64 (a plain path, for gradcheck). Results are bitwise identical for any number of threads: the work partition
does not depend on it and the weight-gradient partials are summed in a fixed order.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..extension import CPU_EXTENSION

__all__ = ["forward", "backward", "direct", "isa"]


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


# ------------------------------------------------------------------------------------------- the eager direct path
# Which packed weight each of the 16 official weights feeds: (w0, b0, 6 strip weights, 6 strip biases, w3, b3) ->
# index into the packed (u, w0, b0, ws, bs, w3, b3)
_PACKED_OF = (1, 2) + (3,) * 6 + (4,) * 6 + (5, 6)


class _Direct(torch.autograd.Function):
    """``msca`` on this backend without the custom ops: the official weights packed in C++ (the values
    ``pack_weights`` gives), the kernels called directly, the packed gradients unpacked in C++ to the official
    shapes and dtypes. Inputs: u, then the 16 official weights (conv0 weight, bias, the 6 strip weights, the 6 strip
    biases, conv3 weight, bias)."""

    @staticmethod
    def forward(ctx, u, *w):
        ext = CPU_EXTENSION.load()
        packed = ext.msca_pack_weights(w[0], w[1], w[2:8], w[8:14], w[14], w[15], u.dtype == torch.float64)
        ctx.save_for_backward(u, *packed)
        return ext.msca_forward(u, *packed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        need_u, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1:]
        needs = [need_u] + [False] * 6
        for n, i in zip(need_w, _PACKED_OF):
            needs[i] = needs[i] or n
        u, *packed = ctx.saved_tensors
        ext = CPU_EXTENSION.load()
        if grad_out.dtype != u.dtype:
            grad_out = grad_out.to(u.dtype)
        g = ext.msca_backward(grad_out, u, *packed, needs)
        return (g[0] if need_u else None, *ext.msca_unpack_grads(g, u.dtype, list(need_w)))


def direct(u, w0, b0, ws, bs, w3, b3):
    """``msca`` on this backend in plain eager code, without the custom ops: the same kernels and results. The
    caller (``msca.interface.msca``) has checked the arguments and ``_direct.eager_direct_ok``. u: (B, C, H, W) CPU
    tensor; w0 .. b3: ``segnext_kernels.msca``'s official weights in u's dtype. Differentiable with respect to u
    and every weight (``_Direct``) when grad mode is on and one of them requires grad."""
    if torch.is_grad_enabled() and (u.requires_grad or w0.requires_grad or b0.requires_grad or w3.requires_grad
                                    or b3.requires_grad or any(t.requires_grad for t in ws)
                                    or any(t.requires_grad for t in bs)):
        return _Direct.apply(u, w0, b0, *ws, *bs, w3, b3)
    return CPU_EXTENSION.load().msca_forward_official(u, w0, b0, ws, bs, w3, b3)

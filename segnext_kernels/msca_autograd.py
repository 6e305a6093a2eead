"""Autograd for fused MSCA: one ``torch.autograd.Function`` shared by the Triton and CUDA backends.

The kernels take the packed weight layout of ``msca_reference.pack_weights``; this file packs on the way in and
unpacks the gradients back to the nn.Conv2d shapes on the way out. Nothing but ``u`` and the weights is saved:
the backward kernels recompute the intermediates from ``u``.
"""
from __future__ import annotations

import torch

from .backend import get_impl
from .msca_reference import pack_weights, unpack_grads


def _param_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


class MSCAFunction(torch.autograd.Function):
    """apply(backend, u, conv0_weight, conv0_bias, *6 strip weights, *6 strip biases, conv3_weight, conv3_bias)."""

    @staticmethod
    def forward(ctx, backend, u, w0, b0, sw0, sw1, sw2, sw3, sw4, sw5, sb0, sb1, sb2, sb3, sb4, sb5, w3, b3):
        strip_w = [sw0, sw1, sw2, sw3, sw4, sw5]
        strip_b = [sb0, sb1, sb2, sb3, sb4, sb5]
        impl = get_impl(backend)
        out = impl.msca_forward(u, *pack_weights(w0, b0, strip_w, strip_b, w3, b3, _param_dtype(u)))
        ctx.backend = backend
        ctx.save_for_backward(u, w0, b0, *strip_w, *strip_b, w3, b3)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, w0, b0, *rest = ctx.saved_tensors
        strip_w, strip_b, (w3, b3) = rest[:6], rest[6:12], rest[12:]
        n = ctx.needs_input_grad  # (backend, u, w0, b0, 6 strip w, 6 strip b, w3, b3)
        needs = (n[1], n[2], n[3], any(n[4:10]), any(n[10:16]), n[16], n[17])
        if not any(needs):
            return (None,) * 18
        impl = get_impl(ctx.backend)
        packed = pack_weights(w0, b0, strip_w, strip_b, w3, b3, _param_dtype(u))
        grads = impl.msca_backward(grad_out, u, *packed, needs)
        du, dw0, db0, dsw, dsb, dw3, db3 = unpack_grads(grads, w0, strip_w, w3)
        dsw = [g if n[4 + i] else None for i, g in enumerate(dsw)]
        dsb = [g if n[10 + i] else None for i, g in enumerate(dsb)]
        return (None, du, dw0, db0, *dsw, *dsb, dw3, db3)

"""Fused MSCA as PyTorch custom operators (``torch.library.custom_op``), shared by the Triton and CUDA backends.

Operators (namespace ``segnext_kernels``; the C++ extension owns ``segnext::`` with its own ``TORCH_LIBRARY``, so the
Python-defined ops live in a namespace of their own and never meet it):

``torch.ops.segnext_kernels.msca_forward(u, w0, b0, ws, bs, w3, b3, backend) -> Tensor``
    u (B, C, H, W) float16/bfloat16/float32/float64 (cuda: no float64), any strides; packed weights as
    ``msca_reference.pack_weights`` (w0 (C, 25), b0 (C,), ws (C, 78), bs (C, 6), w3 (C, C), b3 (C,), float32 or
    float64 for float64 u, contiguous); backend "triton" or "cuda" (``backend.get_impl`` picks the launcher).
    Returns out (B, C, H, W) in u's dtype and dense memory format (``torch.empty_like(u)``). Differentiable w.r.t.
    u and the six packed weights (``register_autograd`` below).
``torch.ops.segnext_kernels.msca_backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad, backend)``
    needs_input_grad: 7 bools for (u, w0, b0, ws, bs, w3, b3). Returns 7 tensors (du, dw0, db0, dws, dbs, dw3, db3):
    du like ``empty_like(u)``, the rest contiguous in the packed weights' dtype; an entry whose flag is False is an
    empty (0,) tensor (custom ops cannot return None). Deterministic: fixed-order reductions, no atomics.

Both have fake (meta) implementations, so ``torch.compile`` (fullgraph), FakeTensor tracing and
``torch.library.opcheck`` treat them as opaque calls and never trace into the Triton kernels.

Autograd: the public ``segnext_kernels.msca`` packs the nn.Conv2d weights with ordinary (differentiable) torch ops
and calls ``msca_forward``; autograd of the packing (reshape / cat / stack / dtype cast) unpacks the packed
gradients back to the nn.Conv2d shapes and dtypes. Saved for backward: u and the packed weights only (the backward
kernels recompute the intermediates from u), and only when grad mode is on and an input requires grad (under
``torch.no_grad`` / ``torch.inference_mode`` the op runs without any autograd node). The backward computes only the
gradients ``ctx.needs_input_grad`` asks for (the Triton backward skips the dw3 / depthwise kernels accordingly).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .backend import get_impl
from .msca_reference import pack_weights

__all__ = ["msca_fused", "param_dtype"]


def param_dtype(u: Tensor) -> torch.dtype:
    """The dtype of the packed weights (and of the weight gradients) for input ``u``."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _fresh(outs, inputs):
    """Clone any output sharing storage with an input or an earlier output (custom ops must not return aliases;
    e.g. for C == 1 the Triton backward's weight-gradient slices of one partial-sum buffer are all views)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    res = []
    for t in outs:
        if t.numel():
            p = t.untyped_storage().data_ptr()
            if p in seen:
                t = t.clone()
                p = t.untyped_storage().data_ptr()
            seen.add(p)
        res.append(t)
    return res


# ------------------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("segnext_kernels::msca_forward", mutates_args=())
def msca_forward(u: Tensor, w0: Tensor, b0: Tensor, ws: Tensor, bs: Tensor, w3: Tensor, b3: Tensor,
                 backend: str) -> Tensor:
    return get_impl(backend).msca_forward(u, w0, b0, ws, bs, w3, b3)


@msca_forward.register_fake
def _msca_forward_fake(u, w0, b0, ws, bs, w3, b3, backend):
    return torch.empty_like(u)


# ------------------------------------------------------------------------------------------------------ backward
@torch.library.custom_op("segnext_kernels::msca_backward", mutates_args=())
def msca_backward(grad_out: Tensor, u: Tensor, w0: Tensor, b0: Tensor, ws: Tensor, bs: Tensor, w3: Tensor,
                  b3: Tensor, needs_input_grad: Sequence[bool], backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs_input_grad)
    if len(needs) != 7:
        raise ValueError(f"needs_input_grad: expected 7 bools, got {len(needs)}")
    grads = get_impl(backend).msca_backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs)
    like = (u, w0, b0, ws, bs, w3, b3)
    outs = [(g if g.is_contiguous() or i == 0 else g.contiguous()) if (n and g is not None) else t.new_empty((0,))
            for i, (g, n, t) in enumerate(zip(grads, needs, like))]
    return tuple(_fresh(outs, (grad_out,) + like))


@msca_backward.register_fake
def _msca_backward_fake(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad, backend):
    needs = [bool(n) for n in needs_input_grad]
    du = torch.empty_like(u) if needs[0] else u.new_empty((0,))
    rest = [torch.empty_like(t, memory_format=torch.contiguous_format) if n else t.new_empty((0,))
            for t, n in zip((w0, b0, ws, bs, w3, b3), needs[1:])]
    return (du, *rest)


# ------------------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    u, w0, b0, ws, bs, w3, b3, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(u, w0, b0, ws, bs, w3, b3)


def _backward(ctx, grad_out):
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:7])  # (u, w0, b0, ws, bs, w3, b3, backend)
    if not any(needs):
        return (None,) * 8
    grads = torch.ops.segnext_kernels.msca_backward(grad_out, *ctx.saved_tensors, list(needs), ctx.backend)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,)


msca_forward.register_autograd(_backward, setup_context=_setup_context)


def msca_fused(backend: str, u: Tensor, conv0_weight: Tensor, conv0_bias: Tensor, strip_weights, strip_biases,
               conv3_weight: Tensor, conv3_bias: Tensor) -> Tensor:
    """Pack the nn.Conv2d weights and run ``segnext_kernels::msca_forward`` on ``backend`` ("triton" or "cuda",
    already resolved by ``backend.resolve_backend``; arguments already validated). Differentiable."""
    packed = pack_weights(conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias,
                          param_dtype(u))
    return torch.ops.segnext_kernels.msca_forward(u, *packed, backend)

"""Autograd for fused NMF2D (Triton backend): one ``torch.autograd.Function`` for both gradient modes.

Gradient modes (see ``segnext.ham_head.nmf2d_reference`` and ``nmf_triton``'s module docstring):
  "unrolled" -- back-prop through the softmax init and every multiplicative step (official SegNeXt / mmseg).
  "one_step" -- the init and the K steps are constants; only the final coef update and the reconstruction are
      differentiated (Hamburger paper, Enjoy-Hamburger, JSeg). The caller (``segnext_kernels.nmf2d``) detaches
      the initial bases when K >= 1, as the reference's ``torch.no_grad()`` does; the returned final bases are then
      not differentiable either.

Saved for backward: x and the per-step small tensors listed in ``nmf_triton`` (no x-sized intermediate).
"""
from __future__ import annotations

import torch

from . import nmf_triton


class NMF2DFunction(torch.autograd.Function):
    """apply(x, bases0, steps, eps, inv_t, grad_mode, return_state, save) -> y or (y, bases_K, coef_F).

    x (B, D, N) any floating dtype and strides; bases0 (B, D, R) contiguous in the compute dtype (float32, or
    float64 for float64 x); ``save``: whether a backward may follow (grad enabled and an input requires grad).
    Gradients: x (in x's dtype) and bases0 (compute dtype).
    """

    @staticmethod
    def forward(ctx, x, bases0, steps, eps, inv_t, grad_mode, return_state, save):
        y, bases_k, coef_f, saved = nmf_triton.nmf_forward(x, bases0, steps, eps, inv_t,
                                                           save=grad_mode if save else None)
        ctx.set_materialize_grads(False)
        ctx.steps, ctx.eps, ctx.inv_t, ctx.grad_mode = steps, eps, inv_t, grad_mode
        ctx.keys = sorted(saved)
        ctx.save_for_backward(x, *(saved[k] for k in ctx.keys))
        if not return_state:
            return y
        bases_k, coef_f = bases_k.clone(), coef_f.clone()
        if grad_mode == "one_step" and steps > 0:
            ctx.mark_non_differentiable(bases_k)
        return y, bases_k, coef_f

    @staticmethod
    def backward(ctx, grad_y, grad_bases=None, grad_coef=None):
        x, *tensors = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 6
        if not (need_x or need_b) or (grad_y is None and grad_bases is None and grad_coef is None):
            return (None, None) + none
        saved = dict(zip(ctx.keys, tensors))
        gx, gb = nmf_triton.nmf_backward(grad_y, grad_bases, grad_coef, x, saved, ctx.grad_mode, ctx.steps,
                                         ctx.eps, ctx.inv_t, need_x, need_b)
        return (gx if need_x else None, gb if need_b else None) + none

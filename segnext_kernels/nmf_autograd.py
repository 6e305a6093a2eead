"""Fused NMF2D (Triton and CUDA backends) as PyTorch custom operators (``torch.library.custom_op``), for both
gradient modes. Both backends run the same orchestration (``nmf_driver``) over their own kernels
(``nmf_triton.KERNELS``, ``nmf_cuda.KERNELS``), with the same saved tensors, so one fake and one autograd
registration serve both.

Gradient modes (see ``segnext.ham_head.nmf2d_reference`` and ``nmf_triton``'s module docstring):
  "unrolled" -- back-prop through the softmax init and every multiplicative step (official SegNeXt / mmseg).
  "one_step" -- the init and the K steps are constants; only the final coef update and the reconstruction are
      differentiated (Hamburger paper, Enjoy-Hamburger, JSeg). The caller (``segnext_kernels.nmf2d``) detaches
      the initial bases when K >= 1, as the reference's ``torch.no_grad()`` does, and detaches the returned final
      bases then (they are not differentiable in that mode).

Operators (namespace ``segnext_kernels``, separate from the C++ extension's ``segnext::``):

``torch.ops.segnext_kernels.nmf2d_forward(x, bases0, steps, eps, inv_t, save, return_state, backend)
        -> (y, bases_K, coef_F, saved: Tensor[])``
    x (B, D, N) float16/bfloat16/float32/float64, any strides, B, D, N >= 1; bases0 (B, D, R) contiguous in the
    compute dtype (float32; float64 for float64 x); steps K >= 0; eps > 0; save: "none", "one_step" or "unrolled"
    (what a backward of that grad mode needs; "none" when no backward can follow). Returns y (B, D, N) in x's
    dtype, contiguous; with return_state bases_K (B, D, R) and coef_F (B, N, R) in the compute dtype, else two
    empty (0,) tensors; saved: the small per-step tensors of ``nmf_driver.nmf_forward`` in ``SAVED_KEYS[save]``
    order (empty for "none"); backend: "triton" or "cuda" (x float16/bfloat16/float32 only). Differentiable w.r.t.
    x and bases0 (``register_autograd`` below).
``torch.ops.segnext_kernels.nmf2d_backward(grad_y?, grad_bases?, grad_coef?, x, saved, grad_mode, steps, eps, inv_t,
        need_x, need_bases, backend) -> (g_x, g_bases0)``
    g_x (B, D, N) in x's dtype (contiguous) when need_x; g_bases0 (B, D, R) in the compute dtype when need_bases
    and (grad_mode == "unrolled" or steps == 0); otherwise empty (0,) tensors (custom ops cannot return None).

Both have fake implementations, so ``torch.compile`` and FakeTensor tracing never enter the kernels.
Saved for backward: x and the per-step small tensors (no x-sized intermediate), only when grad mode is on and x
or bases0 requires grad. Deterministic: every partial sum is reduced in a fixed order. The backends' modules
(``nmf_triton`` imports Triton; ``nmf_cuda`` loads the extension) are imported on first call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .msca_autograd import _fresh

__all__ = ["nmf2d_fused", "SAVED_KEYS"]

#: The keys of ``nmf_triton.nmf_forward``'s ``saved`` dict per save mode, in the order of the op's ``saved`` list.
SAVED_KEYS = {"none": (), "one_step": ("C", "G", "bases"), "unrolled": ("C", "E", "G", "H", "bases")}


def _rp(R: int) -> int:
    """The padded rank RP of both backends: R padded to max(16, next power of two)."""
    return max(16, 1 << (max(1, int(R)) - 1).bit_length())


def _kernels(backend: str):
    """The kernels object of a resolved backend name for ``nmf_driver``."""
    if backend == "triton":
        from . import nmf_triton

        return nmf_triton.KERNELS
    if backend == "cuda":
        from . import nmf_cuda

        return nmf_cuda.KERNELS
    raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")


# ------------------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("segnext_kernels::nmf2d_forward", mutates_args=())
def nmf2d_forward(x: Tensor, bases0: Tensor, steps: int, eps: float, inv_t: float, save: str,
                  return_state: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    from .nmf_driver import nmf_forward

    if save not in SAVED_KEYS:
        raise ValueError(f"save: expected one of {tuple(SAVED_KEYS)}, got {save!r}")
    y, bases_k, coef_f, saved = nmf_forward(_kernels(backend), x, bases0, steps, eps, inv_t,
                                            save=None if save == "none" else save)
    if return_state:  # bases_K / coef_F are slots of the saved histories: copy them out
        bases_k, coef_f = bases_k.clone(), coef_f.clone()
    else:
        bases_k, coef_f = bases0.new_empty((0,)), bases0.new_empty((0,))
    sv = [saved[k] for k in SAVED_KEYS[save]]
    sv = [t.clone() if t.storage_offset() else t for t in sv]  # one_step: the last slot of a history (small)
    y, bases_k, coef_f, *sv = _fresh([y, bases_k, coef_f, *sv], (x, bases0))
    return y, bases_k, coef_f, sv


@nmf2d_forward.register_fake
def _nmf2d_forward_fake(x, bases0, steps, eps, inv_t, save, return_state, backend):
    B, D, N = x.shape
    R = bases0.shape[-1]
    K = int(steps)
    RP = _rp(R)
    acc = bases0.dtype
    new = lambda *s: x.new_empty(s, dtype=acc)  # noqa: E731
    y = x.new_empty((B, D, N))
    bk, cf = (new(B, D, R), new(B, N, R)) if return_state else (new(0), new(0))
    if save == "unrolled":
        sv = [new(K + 2, B, N, R), new(K, B, D, R), new(K + 1, B, RP, RP), new(K, B, RP, RP), new(K + 1, B, D, R)]
    elif save == "one_step":
        sv = [new(2, B, N, R), new(1, B, RP, RP), new(1, B, D, R)]
    else:
        sv = []
    return y, bk, cf, sv


# ------------------------------------------------------------------------------------------------------ backward
@torch.library.custom_op("segnext_kernels::nmf2d_backward", mutates_args=())
def nmf2d_backward(grad_y: Optional[Tensor], grad_bases: Optional[Tensor], grad_coef: Optional[Tensor], x: Tensor,
                   saved: list[Tensor], grad_mode: str, steps: int, eps: float, inv_t: float, need_x: bool,
                   need_bases: bool, backend: str) -> tuple[Tensor, Tensor]:
    from .nmf_driver import nmf_backward

    if grad_mode not in ("unrolled", "one_step"):
        raise ValueError(f"grad_mode: expected 'unrolled' or 'one_step', got {grad_mode!r}")
    sd = dict(zip(SAVED_KEYS[grad_mode], saved))
    gx, gb = nmf_backward(_kernels(backend), grad_y, grad_bases, grad_coef, x, sd, grad_mode, steps, eps, inv_t,
                          need_x, need_bases)
    acc = saved[0].dtype
    gx = gx.contiguous() if (need_x and gx is not None) else x.new_empty((0,))
    gb = gb.contiguous() if gb is not None else x.new_empty((0,), dtype=acc)
    return tuple(_fresh([gx, gb], (grad_y, grad_bases, grad_coef, x, *saved)))


@nmf2d_backward.register_fake
def _nmf2d_backward_fake(grad_y, grad_bases, grad_coef, x, saved, grad_mode, steps, eps, inv_t, need_x,
                         need_bases, backend):
    B, D, N = x.shape
    acc = saved[0].dtype
    R = saved[-1].shape[-1]  # "bases" history (.., B, D, R)
    gx = x.new_empty((B, D, N)) if need_x else x.new_empty((0,))
    want_b = need_bases and (grad_mode == "unrolled" or int(steps) == 0)
    gb = x.new_empty((B, D, R), dtype=acc) if want_b else x.new_empty((0,), dtype=acc)
    return gx, gb


# ------------------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    x, bases0, steps, eps, inv_t, save, return_state, backend = inputs
    y, bases_k, coef_f, saved = output
    ctx.set_materialize_grads(False)
    ctx.steps, ctx.eps, ctx.inv_t, ctx.save_mode, ctx.return_state = steps, eps, inv_t, save, return_state
    ctx.backend = backend
    ctx.save_for_backward(x, *saved)


def _backward(ctx, grad_y, grad_bases, grad_coef, *grad_saved):
    need_x, need_b = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    none = (None,) * 6
    if not ctx.return_state:
        grad_bases = grad_coef = None
    if not (need_x or need_b) or (grad_y is None and grad_bases is None and grad_coef is None):
        return (None, None) + none
    if ctx.save_mode == "none":
        raise RuntimeError("segnext_kernels::nmf2d_forward: backward through a forward run with save='none'")
    x, *saved = ctx.saved_tensors
    mode = ctx.save_mode
    gx, gb = torch.ops.segnext_kernels.nmf2d_backward(grad_y, grad_bases, grad_coef, x, saved, mode, ctx.steps,
                                                      ctx.eps, ctx.inv_t, need_x, need_b, ctx.backend)
    want_b = need_b and (mode == "unrolled" or ctx.steps == 0)
    return (gx if need_x else None, gb if want_b else None) + none


nmf2d_forward.register_autograd(_backward, setup_context=_setup_context)


def nmf2d_fused(x: Tensor, bases0: Tensor, steps: int, eps: float, inv_t: float, grad_mode: str,
                return_state: bool, backend: str = "triton"):
    """Run ``segnext_kernels::nmf2d_forward`` for ``segnext_kernels.nmf2d`` (arguments validated, x non-empty,
    bases0 contiguous in the compute dtype and already detached for "one_step" with steps >= 1; backend resolved:
    "triton" or "cuda").

    Returns y, or (y, bases_K, coef_F) with return_state (bases_K detached in "one_step" mode with steps >= 1)."""
    need = torch.is_grad_enabled() and (x.requires_grad or bases0.requires_grad)
    y, bases_k, coef_f, _ = torch.ops.segnext_kernels.nmf2d_forward(
        x, bases0, int(steps), float(eps), float(inv_t), grad_mode if need else "none", bool(return_state),
        backend)
    if not return_state:
        return y
    if grad_mode == "one_step" and steps > 0:
        bases_k = bases_k.detach()
    return y, bases_k, coef_f

"""Pure-PyTorch NMF2D: the oracle, the fallback and the benchmark baseline of every fused NMF2D kernel.

NMF2D is the matrix decomposition "ham" of SegNeXt's Hamburger decoder (official ``NMF2D`` in
``mmseg/models/decode_heads/ham_head.py``; Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021).
The multiplicative updates are the model's own (``segnext.ham_head.nmf_coef_update`` / ``nmf_bases_update``, the
official ``local_step``); this file runs them as one function of (x, bases, steps).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from segnext.ham_head import _autocast_off, nmf_bases_update, nmf_coef_update

__all__ = ["nmf2d_reference", "nmf_coef_update", "nmf_bases_update"]


def nmf2d_reference(x: torch.Tensor, bases: torch.Tensor, steps: int, eps: float = 1e-6,
                    inv_t: float = 1.0, grad_mode: str = "unrolled", return_state: bool = False):
    """NMF of a batch of non-negative matrices, exactly as official ``NMF2D`` (docs/reference_model.md, "NMF2D").

    1. ``coef = softmax(inv_t * x^T bases, dim=-1)``;
    2. ``steps`` times: coef update, then bases update with the new coef (``local_step``);
    3. one more coef update (``compute_coef``);
    4. reconstruction ``bases @ coef^T``.

    Args:
        x: (B, D, N) non-negative input, any floating dtype.
        bases: (B, D, R) initial bases (already normalised; official: L2 over D).
        steps: number of ``local_step`` iterations (official: 6 in train, 7 in eval).
        eps: the ``+eps`` in both update denominators.
        inv_t: softmax inverse temperature of the coef init (official NMF2D forces 1).
        grad_mode: ``"unrolled"`` -- back-prop through every step (official SegNeXt / mmseg), or
            ``"one_step"`` -- init and iterations run under ``torch.no_grad()``, only the final
            coef update and the reconstruction are differentiable (Enjoy-Hamburger HamNet).
            Forward values are identical in both modes.
        return_state: also return the final bases and coef.

    Returns:
        recon (B, D, N) in ``x.dtype``; with ``return_state`` the tuple
        ``(recon, bases (B, D, R), coef (B, N, R))``, the latter two in the compute dtype.

    Numerics: half/bfloat16 inputs are computed in float32 (float64 stays float64), with
    autocast disabled, and the reconstruction is cast back to ``x.dtype``.

    Raises:
        ValueError: bad ``grad_mode`` or shapes that do not match.
    """
    if grad_mode not in ("unrolled", "one_step"):
        raise ValueError(f"grad_mode must be 'unrolled' or 'one_step', got {grad_mode!r}")
    if x.dim() != 3 or bases.dim() != 3 or bases.shape[:2] != x.shape[:2]:
        raise ValueError(f"expected x (B, D, N) and bases (B, D, R), got {tuple(x.shape)} "
                         f"and {tuple(bases.shape)}")
    out_dtype = x.dtype
    cdtype = torch.promote_types(x.dtype, torch.float32)
    with _autocast_off(x.device.type):
        x = x.to(cdtype)
        bases = bases.to(device=x.device, dtype=cdtype)
        with torch.no_grad() if grad_mode == "one_step" else contextlib.nullcontext():
            coef = F.softmax(inv_t * torch.bmm(x.transpose(1, 2), bases), dim=-1)
            for _ in range(steps):
                coef = nmf_coef_update(x, bases, coef, eps)
                bases = nmf_bases_update(x, bases, coef, eps)
        coef = nmf_coef_update(x, bases, coef, eps)
        recon = torch.bmm(bases, coef.transpose(1, 2)).to(out_dtype)
    return (recon, bases, coef) if return_state else recon

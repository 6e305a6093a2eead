"""Eager PyTorch reference of the channel LayerNorm: ``F.layer_norm`` over C of every pixel of x (B, C, N), what
MSCAN's stage norms compute (official ``mscan.py``: ``norm(x.flatten(2).transpose(1, 2))``). The oracle, fallback
and benchmark baseline of ``segnext_kernels.channel_layer_norm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_layer_norm_reference"]


def channel_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 eps: float = 1e-6) -> torch.Tensor:
    """x: (B, C, N); weight, bias: (C,). Returns (B, C, N) (a transposed view of F.layer_norm's (B, N, C) result),
    differentiable by autograd. No input checks (``channel_layer_norm`` validates)."""
    return F.layer_norm(x.transpose(1, 2), (x.shape[1],), weight, bias, eps).transpose(1, 2)

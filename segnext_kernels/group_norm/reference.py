"""Eager PyTorch reference of GroupNorm: ``F.group_norm`` (torch ``nn.GroupNorm`` semantics; the ``gn`` of mmcv's
``ConvModule`` in SegNeXt's LightHamHead, ``norm_cfg=dict(type="GN", num_groups=32)``). The oracle, fallback and
benchmark baseline of ``segnext_kernels.group_norm``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["group_norm_reference"]


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """x: (B, C, *); weight, bias: (C,) or None. Returns ``F.group_norm(x, num_groups, weight, bias, eps)`` (B, C, *),
    differentiable by autograd. No input checks (``group_norm`` validates)."""
    return F.group_norm(x, num_groups, weight, bias, eps)

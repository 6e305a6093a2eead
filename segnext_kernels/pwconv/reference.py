"""Eager PyTorch reference of the fused pointwise convolution::

    y = act(gamma * conv1x1(x, weight) + bias + alpha * r)      (per output channel; act: none, exact GELU or ReLU)

the 1x1 convolution of SegNeXt's blocks and head with what follows it (official ``mscan.py`` ``SpatialAttention``:
``proj_1`` + GELU, ``proj_2`` + shortcut; the block's layer scale and residual; mmseg ``LightHamHead``'s 1x1
``ConvModule``s + ReLU). The oracle, fallback and benchmark baseline of ``segnext_kernels.pwconv``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["pwconv_reference"]


def pwconv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, act: str = "none",
                     alpha: Optional[torch.Tensor] = None, r: Optional[torch.Tensor] = None,
                     gamma: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                     gemm_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The fused pointwise convolution in eager ops.

    Args:
        x: (B, Cin, H, W); weight: (Cout, Cin) or (Cout, Cin, 1, 1); bias, alpha, gamma: (Cout,) or None; r:
            (B, Cout, H, W) or None (alpha without r is ignored; r without alpha is added as is); act: "none", "gelu",
            "relu"; out_dtype: y's dtype (None: x's); gemm_dtype: the convolution's dtype (None: x's).

    Returns:
        (B, Cout, H, W) in out_dtype, differentiable by autograd. No input checks (``pwconv`` validates).
    """
    od, gd = out_dtype or x.dtype, gemm_dtype or x.dtype
    w = (weight if weight.dim() == 4 else weight[:, :, None, None]).to(gd)
    bias, alpha, gamma = (None if v is None else v.to(od) for v in (bias, alpha, gamma))  # float32 ones too
    if gamma is None and gd == od:
        y = F.conv2d(x.to(gd), w, bias)
    else:
        y = F.conv2d(x.to(gd), w).to(od)
        if gamma is not None:
            y = y * gamma[None, :, None, None]
        if bias is not None:
            y = y + bias[None, :, None, None]
    if r is not None:
        y = y + (r if alpha is None else alpha[None, :, None, None] * r)
    if act == "gelu":
        return F.gelu(y)
    if act == "relu":
        return F.relu(y)
    return y

"""Eager PyTorch reference of the MSCAN MLP (official ``mmseg/models/backbones/mscan.py`` ``Mlp``; ``segnext.Mlp``)::

    h = fc1(x)               1x1 conv C -> Hd, bias          fc1.weight (Hd, C, 1, 1), fc1.bias (Hd,)
    p = dwconv(h)            depthwise 3x3, padding 1, bias  dwconv.dwconv.weight (Hd, 1, 3, 3), .bias (Hd,)
    g = GELU(p)              exact (erf)
    y = fc2(g)               1x1 conv Hd -> C, bias          fc2.weight (C, Hd, 1, 1), fc2.bias (C,)

Dropout (after GELU and after fc2) has p = 0 in every SegNeXt config and is left out. The oracle, fallback and
benchmark baseline of ``segnext_kernels.mlp``; also the layout the kernels take (``pack_weights``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segnext.depthwise import depthwise_conv2d

__all__ = ["mlp_reference", "pack_weights"]


def mlp_reference(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, dw_weight: torch.Tensor,
                  dw_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor) -> torch.Tensor:
    """The MLP in eager ops, op for op as the official module's forward (dropout p = 0).

    Args:
        x: (B, C, H, W), any floating dtype and memory format.
        fc1_weight: (Hd, C, 1, 1); fc1_bias: (Hd,); dw_weight: (Hd, 1, 3, 3); dw_bias: (Hd,);
        fc2_weight: (C_out, Hd, 1, 1); fc2_bias: (C_out,).

    Returns:
        (B, C_out, H, W) in x's dtype, differentiable by autograd with respect to every argument. float16 on CPU:
        the depthwise conv runs in float32 and rounds once (``segnext.depthwise``), as the eager model does.

    No input checks: callers go through ``segnext_kernels.mlp``, which validates.
    """
    Hd = fc1_weight.shape[0]
    h = F.conv2d(x, fc1_weight, fc1_bias)
    h = depthwise_conv2d(h, dw_weight, dw_bias, padding=1, groups=Hd)
    h = F.gelu(h)
    return F.conv2d(h, fc2_weight, fc2_bias)


def pack_weights(fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias):
    """The kernels' weight layout (``csrc/cpu/mlp_cpu.h``): ``(w1 (Hd, C), b1 (Hd,), wdw (Hd, 9), bdw (Hd,),
    w2 (C, Hd), b2 (C,))``, contiguous, dtypes unchanged. Differentiable (reshapes): autograd maps the packed
    gradients back to the nn.Conv2d shapes."""
    Hd, C = fc1_weight.shape[0], fc1_weight.shape[1]
    return (fc1_weight.reshape(Hd, C).contiguous(), fc1_bias.contiguous(), dw_weight.reshape(Hd, 9).contiguous(),
            dw_bias.contiguous(), fc2_weight.reshape(fc2_weight.shape[0], Hd).contiguous(), fc2_bias.contiguous())

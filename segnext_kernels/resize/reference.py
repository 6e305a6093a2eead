"""Eager PyTorch reference of the final resize of SegNeXt's logits (``SegNeXt.forward``, mmseg
``EncoderDecoder.encode_decode`` / ``BaseDecodeHead.predict_by_feat``)::

    F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=align_corners)

The oracle, fallback and benchmark baseline of ``segnext_kernels.resize``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize_bilinear_reference"]


def resize_bilinear_reference(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """``F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)``: x (B, C, H, W), any floating
    dtype, memory format and device; size (out_h, out_w). Differentiable. No input checks (callers go through
    ``segnext_kernels.resize.resize_bilinear``, which validates)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=bool(align_corners))

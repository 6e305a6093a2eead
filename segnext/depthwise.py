"""Depthwise convolutions that never take oneDNN's float16 CPU path.

On CPUs with AVX512-FP16, ``F.conv2d`` in float16 on CPU tensors with a long depthwise strip (1x21) does not return:
oneDNN's AVX512-FP16 kernel generation (``jit_brdgmm_kernel_base_t``) hangs (seen with torch 2.13.0+cpu). The
environment variable ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` avoids it, but a library must not set it behind the
user's back. So float16 CPU depthwise convolutions here run in float32 and round the result once to float16: the
float16 convolution computes the same sums in float32 and rounds once too, so this is as exact (it may differ from
a float16 oneDNN run by the rounding of the products, at most an ulp of float16), and it is fast. Every other device
and dtype calls ``F.conv2d`` unchanged. Autograd goes through the casts: gradients are rounded to float16 the same
way.

Used by the eager SegNeXt (``AttentionModule``, ``DWConv``) and the MSCA reference of ``segnext_kernels``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["depthwise_conv2d", "DepthwiseConv2d"]


def _avoid_fp16_cpu(x: torch.Tensor) -> bool:
    return x.dtype == torch.float16 and x.device.type == "cpu"


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                     dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``, except that float16 CPU inputs are
    convolved in float32 and the result rounded to float16 (see the module docstring).

    Args and result as ``F.conv2d``: x (B, C_in, H, W), weight (C_out, C_in / groups, kH, kW), bias (C_out,) or None.
    """
    if _avoid_fp16_cpu(x) or _avoid_fp16_cpu(weight):
        out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding, dilation,
                       groups)
        return out.to(torch.promote_types(x.dtype, weight.dtype))
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same constructor, parameters and ``state_dict``) whose forward is ``depthwise_conv2d``: float16
    on CPU runs in float32 and rounds once. Only ``padding_mode="zeros"`` is used by SegNeXt; other modes fall back to
    ``nn.Conv2d``'s forward."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return depthwise_conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

"""GroupNorm's interface: argument checks, the custom op (with its fake) and the public ``group_norm``.

Custom op (namespace ``segnext_kernels``): ``torch.ops.segnext_kernels.group_norm_fwd(x, num_groups, weight, bias,
eps, backend) -> Tensor``: x (B, C, *) float32 or bfloat16 on CPU (what the backend takes: ``backends.supports``),
any strides; returns (B, C, *) in x's dtype, contiguous. Forward only: the public function runs the reference when
autograd needs a gradient. Its fake implementation makes it an opaque call to ``torch.compile`` and
``torch.library.opcheck``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .._custom_op import check_float_tensor, check_vec, fresh_outputs
from ..backends import kernel_module, resolve
from .reference import group_norm_reference

__all__ = ["check_group_norm_args", "group_norm"]


def check_group_norm_args(x, num_groups, weight, bias, eps) -> None:
    """Validate ``segnext_kernels.group_norm`` arguments.

    Raises:
        TypeError: x not a tensor, weight / bias neither a tensor nor None, an unsupported dtype, a weight / bias
            dtype other than x's (float32 is accepted too for a float16 / bfloat16 x), num_groups not an int, eps
            not a number.
        ValueError: x with fewer than 2 dimensions or C < 1, num_groups < 1 or not dividing C, a weight / bias
            shape other than (C,), eps not finite and > 0.
        RuntimeError: weight or bias on another device than x.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor of 2 or more dimensions (B, C, *), got {x.dim()}-D with shape "
                         f"{tuple(x.shape)}")
    check_float_tensor("x", x, x.dim(), "B, C, *")  # the dtype
    C = x.shape[1]
    if C < 1:
        raise ValueError(f"x: expected C >= 1 channels (B = 0 is fine), got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {type(num_groups).__name__}")
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups: expected an int >= 1 dividing C = {C} (the channels of x), got {num_groups}")
    check_vec("weight", weight, C, x, fp32_ok=True)
    check_vec("bias", bias, C, x, fp32_ok=True)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite number > 0, got {eps}")


@torch.library.custom_op("segnext_kernels::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   backend: str) -> Tensor:
    out = kernel_module("group_norm", backend).forward(x, num_groups, weight, bias, eps)
    return fresh_outputs([out], [x])[0]


@group_norm_fwd.register_fake
def _group_norm_fwd_fake(x, num_groups, weight, bias, eps, backend):
    return x.new_empty(x.shape)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, backend: str = "auto") -> Tensor:
    """GroupNorm: ``F.group_norm(x, num_groups, weight, bias, eps)`` (torch ``nn.GroupNorm`` semantics; the ``gn`` of
    mmcv's ``ConvModule`` with ``norm_cfg=dict(type="GN", num_groups=32)`` in SegNeXt's LightHamHead): the channels
    split into ``num_groups`` groups, each (image, group) normalised by its mean and biased variance over its C/G
    channels and all positions, then ``y = x_hat * weight[c] + bias[c]``.

    Args:
        x: (B, C, *) (e.g. (B, C, H, W)) float16, bfloat16, float32 or float64, any strides; B >= 0, C >= 1, any
            trailing sizes (0 included).
        num_groups: G >= 1 dividing C.
        weight, bias: (C,) in x's dtype (float32 too for a float16 / bfloat16 x), on x's device, or None (1 and 0).
        eps: > 0, finite (nn.GroupNorm's eps).
        backend: "auto", "cpu" or "reference". "cpu" runs the custom op ``torch.ops.segnext_kernels.group_norm_fwd``
            (float32 and bfloat16 CPU tensors; bfloat16 with fp32 statistics); it is forward only, so when autograd
            needs a gradient, and under ``torch.export``, the reference runs instead.

    Returns:
        (B, C, *) in x's dtype: contiguous (NCHW, whatever x's strides, channels_last included) from the "cpu"
        kernel, F.group_norm's result from the reference.

    Raises:
        TypeError, ValueError, RuntimeError: see ``check_group_norm_args``; a requested backend that cannot run here
        or does not take x's dtype.
    """
    check_group_norm_args(x, num_groups, weight, bias, eps)
    name = "reference" if torch.compiler.is_exporting() else resolve("group_norm", backend, x.device, x.dtype)
    if name == "reference" or _needs_grad(x, weight, bias):
        return group_norm_reference(x, num_groups, weight, bias, eps)
    return torch.ops.segnext_kernels.group_norm_fwd(x, int(num_groups), weight, bias, float(eps), name)

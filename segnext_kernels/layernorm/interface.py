"""The channel LayerNorm's interface: argument checks, the custom op (with its fake) and the public
``channel_layer_norm``.

Custom op (namespace ``segnext_kernels``): ``torch.ops.segnext_kernels.channel_layer_norm_fwd(x, weight, bias, eps,
backend) -> Tensor``: x (B, C, N) float32 on CPU (what the backend takes: ``backends.supports``), any strides;
returns (B, C, N) contiguous. Forward only: the public function runs the reference when autograd needs a gradient.
Its fake implementation makes it an opaque call to ``torch.compile`` and ``torch.library.opcheck``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._custom_op import check_float_tensor, check_vec, fresh_outputs
from ..backends import kernel_module, resolve
from .reference import channel_layer_norm_reference

__all__ = ["channel_layer_norm", "check_channel_layer_norm_args"]


def check_channel_layer_norm_args(x, weight, bias, eps) -> None:
    """Validate ``segnext_kernels.channel_layer_norm`` arguments.

    Raises:
        TypeError: a non-tensor, an unsupported dtype, a weight / bias dtype other than x's, eps not a number.
        ValueError: x not 3-D, C or N < 1, a weight / bias shape other than (C,), eps not finite and > 0.
        RuntimeError: weight or bias on another device than x.
    """
    check_float_tensor("x", x, 3, "B, C, N")
    C = x.shape[1]
    if C < 1 or x.shape[2] < 1:
        raise ValueError(f"x: expected C, N >= 1 (B = 0 is fine), got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        check_vec(name, t, C, x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite number > 0, got {eps}")


@torch.library.custom_op("segnext_kernels::channel_layer_norm_fwd", mutates_args=())
def channel_layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str) -> Tensor:
    out = kernel_module("channel_layer_norm", backend).forward(x, weight, bias, eps)
    return fresh_outputs([out], [x])[0]


@channel_layer_norm_fwd.register_fake
def _channel_layer_norm_fwd_fake(x, weight, bias, eps, backend):
    return x.new_empty(x.shape)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def channel_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """LayerNorm over the channels of every pixel: ``y[b, :, p] = layer_norm(x[b, :, p])`` with ``weight`` and
    ``bias``, the stage norms of MSCAN (official ``mscan.py``, ``norm{i}`` on ``x.flatten(2).transpose(1, 2)``),
    computed on x's (B, C, N) layout without the transposed copies.

    Args:
        x: (B, C, N) float16, bfloat16, float32 or float64, any strides; B >= 0, C, N >= 1.
        weight, bias: (C,) in x's dtype, on x's device.
        eps: > 0, finite (nn.LayerNorm's eps).
        backend: "auto", "cpu" or "reference". "cpu" runs the custom op
            ``torch.ops.segnext_kernels.channel_layer_norm_fwd`` (float32 CPU tensors); it is forward only, so when
            autograd needs a gradient, and under ``torch.export``, the reference runs instead.

    Returns:
        (B, C, N) in x's dtype: contiguous from the "cpu" kernel, a transposed view of F.layer_norm's result from
        the reference.

    Raises:
        TypeError, ValueError, RuntimeError: see ``check_channel_layer_norm_args``; a requested backend that cannot
        run here or does not take x's dtype.
    """
    check_channel_layer_norm_args(x, weight, bias, eps)
    name = "reference" if torch.compiler.is_exporting() else resolve("channel_layer_norm", backend, x.device, x.dtype)
    if name == "reference" or _needs_grad(x, weight, bias):
        return channel_layer_norm_reference(x, weight, bias, eps)
    return torch.ops.segnext_kernels.channel_layer_norm_fwd(x, weight, bias, float(eps), name)

"""The resize's interface: argument checks, the custom ops (with their fakes and autograd) and the public
``resize_bilinear``.

Custom ops (namespace ``segnext_kernels``; the compiled extension exports a plain function that runs inside the
forward):

``torch.ops.segnext_kernels.resize_bilinear_fwd(x, out_h, out_w, align_corners, backend) -> Tensor``
    x (B, C, H, W) float32/bfloat16/float64 (what the backend takes: ``backends.supports``), any strides; out_h,
    out_w >= 1; backend: a resolved fused backend ("cpu"), whose module (``resize/<backend>.py``) provides
    ``forward``. Returns (B, C, out_h, out_w) in x's dtype, contiguous (NCHW) whatever x's memory format.
    Differentiable w.r.t. x (nothing is saved but x's shape), through:
``torch.ops.segnext_kernels.resize_bilinear_bwd(grad_out, input_size, align_corners) -> Tensor``
    ATen's ``upsample_bilinear2d_backward`` of grad_out (B, C, out_h, out_w) to ``input_size`` (the reference
    gradient), contiguous. An op of its own so that its fake takes symbolic sizes (ATen's meta of that op does not).
    Differentiable w.r.t. grad_out (double backward: the forward resize).

Both have fake implementations, so ``torch.compile`` (fullgraph), FakeTensor tracing and ``torch.library.opcheck``
treat them as opaque calls.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._custom_op import check_float_tensor, fresh_outputs
from ..backends import kernel_module, resolve
from .reference import resize_bilinear_reference

__all__ = ["resize_bilinear", "check_resize_args"]

def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def check_resize_args(x, size, align_corners) -> tuple[int, int, bool]:
    """Validate ``segnext_kernels.resize_bilinear`` arguments; returns ``(out_h, out_w, align_corners)``.

    Raises:
        TypeError: x not a tensor or not of a floating dtype; size not an int or a pair of ints; align_corners not a
            bool (or None, meaning False).
        ValueError: x not 4-D, C, H or W < 1, an output size < 1.
    """
    check_float_tensor("x", x, 4, "B, C, H, W")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x: expected C, H, W >= 1 (B = 0 is fine), got shape {tuple(x.shape)}")
    if _is_int(size):
        size = (size, size)
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 or not all(_is_int(s) for s in size):
        raise TypeError(f"size: expected an int or a pair of ints (out_h, out_w), got {size!r}")
    out_h, out_w = size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size: expected out_h, out_w >= 1, got {tuple(size)}")
    if align_corners is None:
        align_corners = False
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners: expected a bool, got {type(align_corners).__name__}")
    return out_h, out_w, align_corners


# ------------------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("segnext_kernels::resize_bilinear_fwd", mutates_args=())
def resize_bilinear_fwd(x: Tensor, out_h: int, out_w: int, align_corners: bool, backend: str) -> Tensor:
    out = kernel_module("resize_bilinear", backend).forward(x, out_h, out_w, align_corners)
    return fresh_outputs([out], [x])[0]


@resize_bilinear_fwd.register_fake
def _resize_bilinear_fwd_fake(x, out_h, out_w, align_corners, backend):
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))


# ------------------------------------------------------------------------------------------------------ backward
@torch.library.custom_op("segnext_kernels::resize_bilinear_bwd", mutates_args=())
def resize_bilinear_bwd(grad_out: Tensor, input_size: Sequence[int], align_corners: bool) -> Tensor:
    grad = torch.ops.aten.upsample_bilinear2d_backward(grad_out, list(grad_out.shape[2:]), list(input_size),
                                                       align_corners, None, None)
    return fresh_outputs([grad.contiguous()], [grad_out])[0]


@resize_bilinear_bwd.register_fake
def _resize_bilinear_bwd_fake(grad_out, input_size, align_corners):
    return grad_out.new_empty(list(input_size))


def _bwd_setup_context(ctx, inputs, output):
    grad_out, input_size, align_corners = inputs
    ctx.output_size = list(grad_out.shape[2:])
    ctx.align_corners = align_corners


def _bwd_backward(ctx, grad_grad):  # the backward is linear in grad_out: its adjoint is the forward resize
    if not ctx.needs_input_grad[0]:
        return None, None, None
    gg = torch.ops.aten.upsample_bilinear2d.vec(grad_grad, ctx.output_size, ctx.align_corners, None)
    return gg, None, None


resize_bilinear_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# ------------------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    x, out_h, out_w, align_corners, backend = inputs
    ctx.input_size = list(x.shape)
    ctx.align_corners = align_corners


def _backward(ctx, grad_out):
    if not ctx.needs_input_grad[0]:
        return (None,) * 5
    return torch.ops.segnext_kernels.resize_bilinear_bwd(grad_out, ctx.input_size, ctx.align_corners), None, None, \
        None, None


resize_bilinear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public function
def resize_bilinear(x: Tensor, size, align_corners: bool = False, backend: str = "auto") -> Tensor:
    """Bilinear resize, ``F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)``: the final
    resize of ``SegNeXt.forward`` (head logits at stride 8 -> the input size).

    Args:
        x: (B, C, H, W) float16, bfloat16, float32 or float64; NCHW, channels_last or any other strides; B >= 0,
            C, H, W >= 1.
        size: (out_h, out_w), or an int for both; each >= 1 (smaller than H, W downsamples).
        align_corners: as F.interpolate (None means False).
        backend: "auto", "cpu" or "reference" ("cuda" / "triton" have no resize kernels; ``segnext_kernels.backends``
            says why one cannot run). "cpu" runs the custom op ``torch.ops.segnext_kernels.resize_bilinear_fwd``
            (opaque to torch.compile; autograd through ATen's ``upsample_bilinear2d_backward``); "reference" runs
            F.interpolate. "auto" on CPU tensors runs "cpu" for float32 / bfloat16 / float64 and the reference for
            float16 (and on other devices the reference).

    Under ``torch.export`` the reference's aten op is recorded.

    Returns:
        (B, C, out_h, out_w) in x's dtype, differentiable with respect to x. The "cpu" backend returns NCHW
        contiguous tensors (F.interpolate keeps a channels_last input channels_last) whose values match
        F.interpolate's to ~1 ulp (float32 / float64; bfloat16 is computed in fp32 with fp32 weights and rounded
        once, where ATen rounds its weights to bfloat16).

    Raises:
        TypeError: x not a tensor or of a non-floating dtype, a bad size or align_corners type, or a requested
            backend that does not take x's dtype.
        ValueError: x not 4-D, an empty C / H / W, an output size < 1, unknown backend.
        RuntimeError: a requested backend that cannot run here.
    """
    out_h, out_w, align_corners = check_resize_args(x, size, align_corners)
    name = "reference" if torch.compiler.is_exporting() else resolve("resize_bilinear", backend, x.device, x.dtype)
    if name == "reference":
        return resize_bilinear_reference(x, (out_h, out_w), align_corners)
    return torch.ops.segnext_kernels.resize_bilinear_fwd(x, out_h, out_w, align_corners, name)

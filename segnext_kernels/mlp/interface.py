"""The MLP's interface: argument checks, the custom ops (with their fakes and autograd) and the public ``mlp``.

Custom ops (namespace ``segnext_kernels``; the compiled extension exports plain functions that run inside these):

``torch.ops.segnext_kernels.mlp_fwd(x, w1, b1, wdw, bdw, w2, b2, backend, residual=None, affine=None, lowp=False)``
    x (B, C, H, W) float32/bfloat16/float64 (what the backend takes: ``backends.supports``), any strides; packed
    weights as ``mlp.reference.pack_weights``, in x's dtype: w1 (Hd, C), b1 (Hd,), wdw (Hd, 9), bdw (Hd,), w2 (C, Hd),
    b2 (C,); backend: a resolved fused backend ("cpu"), whose module (``mlp/<backend>.py``) provides ``forward`` /
    ``backward``; residual: None or a tensor like x added to the output (the block's residual, fused into the
    epilogue); affine: None or a (3, C) float32 tensor (input scale, input shift, output scale; float32 or bfloat16
    x, inference only: a backward through it raises); lowp: float32 x with bfloat16 GEMMs (fp32 accumulation;
    inference only, as affine). Returns y (B, C, H, W) in x's dtype with the memory format of
    ``torch.empty_like(x)``. Differentiable w.r.t. x, the six packed weights and residual (without affine).
``torch.ops.segnext_kernels.mlp_bwd(grad_out, x, w1, b1, wdw, bdw, w2, b2, needs_input_grad, backend)``
    needs_input_grad: 7 bools for (x, w1, b1, wdw, bdw, w2, b2). Returns 7 tensors: dx like ``empty_like(x)``, the rest
    contiguous with the packed shapes in x's dtype; an entry whose flag is False is an empty (0,) tensor.
    Deterministic (fixed-order reductions).

Both have fake implementations, so ``torch.compile`` (fullgraph), FakeTensor tracing and ``torch.library.opcheck``
treat them as opaque calls. Autograd: ``mlp`` packs the nn.Conv2d weights with differentiable reshapes and calls
``mlp_fwd``; saved for backward: x and the packed weights only (the backward recomputes the hidden activations).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._custom_op import fresh_outputs
from ..backends import kernel_module, resolve
from .reference import mlp_reference, pack_weights

__all__ = ["mlp", "check_mlp_args"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tensor(name: str, t) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_like(name: str, t, shape: tuple, x: Tensor, fp32_ok: bool = False) -> None:
    """t: shape, x's dtype (or float32 with ``fp32_ok`` and a float16 / bfloat16 x), x's device."""
    _tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    low = fp32_ok and x.dtype in (torch.float16, torch.bfloat16)
    if t.dtype != x.dtype and not (low and t.dtype == torch.float32):
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x){' or float32' if low else ''}, "
                        f"got {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(f"{name}: expected a tensor on {x.device} (the device of x), got one on {t.device}")


def check_mlp_args(x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias) -> None:
    """Validate ``segnext_kernels.mlp`` arguments.

    Raises:
        TypeError: a non-tensor, a non-floating or unsupported dtype, or a dtype different from x's.
        ValueError: wrong rank or shape (the message gives the expected shape), C, H or W < 1.
        RuntimeError: a tensor on another device than x.
    """
    _tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor (B, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    C = x.shape[1]
    if C < 1:
        raise ValueError(f"x: expected at least one channel (C >= 1), got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x: expected H, W >= 1 (B = 0 is fine), got shape {tuple(x.shape)}")
    _tensor("fc1_weight", fc1_weight)
    if fc1_weight.dim() != 4 or fc1_weight.shape[0] < 1:
        raise ValueError(f"fc1_weight: expected shape (Hd, {C}, 1, 1) with Hd >= 1, got {tuple(fc1_weight.shape)}")
    Hd = fc1_weight.shape[0]
    _check_like("fc1_weight", fc1_weight, (Hd, C, 1, 1), x)
    _check_like("fc1_bias", fc1_bias, (Hd,), x)
    _check_like("dw_weight", dw_weight, (Hd, 1, 3, 3), x)
    _check_like("dw_bias", dw_bias, (Hd,), x)
    _tensor("fc2_weight", fc2_weight)
    if fc2_weight.dim() != 4 or fc2_weight.shape[0] < 1:
        raise ValueError(f"fc2_weight: expected shape (C_out, {Hd}, 1, 1), got {tuple(fc2_weight.shape)}")
    _check_like("fc2_weight", fc2_weight, (fc2_weight.shape[0], Hd, 1, 1), x)
    _check_like("fc2_bias", fc2_bias, (fc2_weight.shape[0],), x)


# ------------------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("segnext_kernels::mlp_fwd", mutates_args=())
def mlp_fwd(x: Tensor, w1: Tensor, b1: Tensor, wdw: Tensor, bdw: Tensor, w2: Tensor, b2: Tensor,
            backend: str, residual: Optional[Tensor] = None, affine: Optional[Tensor] = None,
            lowp: bool = False) -> Tensor:
    return kernel_module("mlp", backend).forward(x, w1, b1, wdw, bdw, w2, b2, residual, affine, lowp)


@mlp_fwd.register_fake
def _mlp_fwd_fake(x, w1, b1, wdw, bdw, w2, b2, backend, residual=None, affine=None, lowp=False):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------------ backward
@torch.library.custom_op("segnext_kernels::mlp_bwd", mutates_args=())
def mlp_bwd(grad_out: Tensor, x: Tensor, w1: Tensor, b1: Tensor, wdw: Tensor, bdw: Tensor, w2: Tensor, b2: Tensor,
            needs_input_grad: Sequence[bool], backend: str
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs_input_grad)
    if len(needs) != 7:
        raise ValueError(f"needs_input_grad: expected 7 bools, got {len(needs)}")
    grads = kernel_module("mlp", backend).backward(grad_out, x, w1, b1, wdw, bdw, w2, b2, needs)
    like = (x, w1, b1, wdw, bdw, w2, b2)
    outs = [(g if g.is_contiguous() or i == 0 else g.contiguous()) if (n and g is not None) else t.new_empty((0,))
            for i, (g, n, t) in enumerate(zip(grads, needs, like))]
    return tuple(fresh_outputs(outs, (grad_out,) + like))


@mlp_bwd.register_fake
def _mlp_bwd_fake(grad_out, x, w1, b1, wdw, bdw, w2, b2, needs_input_grad, backend):
    needs = [bool(n) for n in needs_input_grad]
    dx = torch.empty_like(x) if needs[0] else x.new_empty((0,))
    rest = [torch.empty_like(t, memory_format=torch.contiguous_format) if n else t.new_empty((0,))
            for t, n in zip((w1, b1, wdw, bdw, w2, b2), needs[1:])]
    return (dx, *rest)


# ------------------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    x, w1, b1, wdw, bdw, w2, b2, backend = inputs[:8]
    ctx.backend = backend
    ctx.affine = (len(inputs) > 9 and inputs[9] is not None) or (len(inputs) > 10 and bool(inputs[10]))
    ctx.save_for_backward(x, w1, b1, wdw, bdw, w2, b2)


def _backward(ctx, grad_out):
    # ctx.needs_input_grad has one entry per argument given: 8, or 9 with residual (y = mlp(x) + residual)
    n_in = len(ctx.needs_input_grad)
    if ctx.affine:
        raise RuntimeError("mlp: the affine and lowp arguments (an eval BatchNorm and layer scale fused into the "
                           "kernel; bfloat16 GEMMs on float32 tensors) are for inference only; call mlp without them "
                           "where a gradient is needed")
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:7])
    d_residual = grad_out if n_in > 8 and ctx.needs_input_grad[8] else None
    if not any(needs):
        return ((None,) * 8 + (d_residual, None, None))[:n_in]
    grads = torch.ops.segnext_kernels.mlp_bwd(grad_out, *ctx.saved_tensors, list(needs), ctx.backend)
    return (tuple(g if n else None for g, n in zip(grads, needs)) + (None, d_residual, None, None))[:n_in]


mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public function
def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, dw_weight: Tensor, dw_bias: Tensor, fc2_weight: Tensor,
        fc2_bias: Tensor, *, residual: Optional[Tensor] = None, affine: Optional[Tensor] = None,
        gemm_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """Fused MSCAN MLP (official ``Mlp`` of ``mscan.py``, dropout p = 0)::

        y = fc2(GELU(dwconv3x3(fc1(x)))) (+ residual)
        with affine = (s, t, g):  y = g * fc2(GELU(dwconv3x3(fc1(s * x + t)))) (+ residual)

    Args:
        x: (B, C, H, W) float16, bfloat16, float32 or float64; NCHW, channels_last or any other strides; B >= 0,
            C, H, W >= 1.
        fc1_weight: (Hd, C, 1, 1); fc1_bias: (Hd,); dw_weight: (Hd, 1, 3, 3); dw_bias: (Hd,);
        fc2_weight: (C_out, Hd, 1, 1); fc2_bias: (C_out,). All in x's dtype and on x's device.
        residual: None or a tensor like x (same shape, dtype, device), added in the kernel's epilogue (the MSCAN
            block's residual ``x + layer_scale * mlp(x)``).
        affine: None or a (3, C) tensor in x's dtype (or float32 for a float16 / bfloat16 x): per channel an input
            scale and shift (an eval BatchNorm before fc1) and an output scale (the block's layer scale), applied in
            the kernel (in fp32) without copies of the weights. Inference only: with a gradient needed the reference
            runs it, and a backward through the fused op raises RuntimeError.
        gemm_dtype: None (x's dtype) or torch.bfloat16 with a float32 x: fc1 and fc2 on bfloat16 operands with fp32
            accumulation (the kernel rounds x / the GELU output and the weights while it packs them: vdpbf16ps / AMX
            where the CPU has them, elsewhere the fp32 GEMM on the rounded copies), everything else and the output
            in float32 (what ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` means for a matmul). Inference: with a gradient
            needed the reference runs the two 1x1 convolutions in bfloat16.
        backend: "auto", "cpu" or "reference" ("cuda" / "triton" have no MLP kernels; ``segnext_kernels.backends``
            says why one cannot run). "cpu" runs the custom op ``torch.ops.segnext_kernels.mlp_fwd`` (opaque to
            torch.compile, autograd via ``register_autograd``); "reference" runs eager ops (``mlp.reference``).
            C_out != C (no SegNeXt config has it) always runs the reference.

    Under ``torch.export`` the reference's aten ops are recorded. Under ``torch.autocast`` x and the weights are cast
    to the autocast dtype first (as eager's convolutions are); the result is in that dtype.

    Returns:
        (B, C_out, H, W) in x's dtype, differentiable with respect to x and every weight. The fused kernels keep every
        intermediate in fp32 (fp64 for fp64); for bfloat16 on a CPU with AVX512-BF16 the two GEMMs take bfloat16
        operands (fc1's input as given, the GELU output rounded) with fp32 accumulation, the rest in fp32.

    Raises:
        TypeError: non-tensor argument, unsupported dtype, a weight dtype different from x's, a gemm_dtype other
            than None / x's dtype / bfloat16 with a float32 x, or a requested backend that does not take x's dtype.
        ValueError: wrong rank or weight shape (the message names the expected shape), unknown backend.
        RuntimeError: a tensor on another device than x, or a requested backend that cannot run here.
    """
    if (isinstance(x, torch.Tensor) and x.dtype in _AUTOCAST_DTYPES and torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type)):
        dt = torch.get_autocast_dtype(x.device.type)
        cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            return mlp(cast(x), cast(fc1_weight), cast(fc1_bias), cast(dw_weight), cast(dw_bias), cast(fc2_weight),
                       cast(fc2_bias), residual=cast(residual),
                       affine=None if affine is None else affine.float() if dt != torch.float32 else affine,
                       backend=backend)
    check_mlp_args(x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias)
    if gemm_dtype not in (None, x.dtype) and not (gemm_dtype == torch.bfloat16 and x.dtype == torch.float32):
        raise TypeError(f"gemm_dtype: expected None, x's dtype ({x.dtype}) or torch.bfloat16 with a float32 x, got "
                        f"{gemm_dtype}")
    lowp = gemm_dtype == torch.bfloat16 and x.dtype == torch.float32
    if residual is not None:
        _check_like("residual", residual, (x.shape[0], fc2_weight.shape[0], x.shape[2], x.shape[3]), x)
    if affine is not None:
        _check_like("affine", affine, (3, x.shape[1]), x, fp32_ok=True)
    name = "reference" if torch.compiler.is_exporting() else resolve("mlp", backend, x.device, x.dtype)
    inference_only = affine is not None or lowp
    fused_ok = not inference_only or (x.dtype in (torch.float32, torch.bfloat16) and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                        for t in (x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias,
                                                  affine))))
    if name == "reference" or fc2_weight.shape[0] != x.shape[1] or not fused_ok:
        af = None if affine is None else affine.to(x.dtype)
        xin = x if af is None else x * af[0][None, :, None, None] + af[1][None, :, None, None]
        ws = (fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias)
        y = (mlp_reference(xin.bfloat16(), *(w.bfloat16() for w in ws)).to(x.dtype) if lowp
             else mlp_reference(xin, *ws))
        if af is not None:
            y = y * af[2][None, :, None, None]
        return y if residual is None else y + residual
    packed = pack_weights(fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias)
    return torch.ops.segnext_kernels.mlp_fwd(x, *packed, name, residual, None if affine is None else affine.float(),
                                             lowp)

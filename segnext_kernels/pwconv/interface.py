"""The fused pointwise convolution's interface: argument checks, the custom op (with its fake) and the public
``pwconv``.

Custom op (namespace ``segnext_kernels``; the compiled extension exports a plain function that runs inside it):

``torch.ops.segnext_kernels.pwconv_fwd(x, weight, bias, act, alpha, r, backend, gamma=None, out_dtype=None,
lowp=False) -> Tensor``
    x (B, Cin, H, W) float32 / bfloat16 CPU, any strides; weight (Cout, Cin) in x's dtype or float32; bias, alpha,
    gamma (Cout,) float32 or None; r (B, Cout, H, W) in the output dtype or None; act "none" / "gelu" / "relu";
    backend: a resolved fused backend ("cpu"); out_dtype: float32 / bfloat16 (None: x's); lowp: the GEMM on
    bfloat16 operands (always for a bfloat16 x). Returns y (B, Cout, H, W) in the output dtype, contiguous NCHW. Forward only: ``pwconv`` runs the reference whenever a gradient is needed.

The fake implementation lets ``torch.compile`` (fullgraph), FakeTensor tracing and ``torch.library.opcheck`` treat
it as an opaque call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._custom_op import check_vec
from ..backends import kernel_module, resolve
from .reference import pwconv_reference

__all__ = ["ACTIVATIONS", "pwconv", "check_pwconv_args"]

ACTIVATIONS = ("none", "gelu", "relu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_OUT_DTYPES = (torch.float32, torch.bfloat16)  # what the fused kernels write


def check_pwconv_args(x, weight, bias, act, alpha, r, gamma=None, out_dtype=None, gemm_dtype=None) -> None:
    """Validate ``segnext_kernels.pwconv`` arguments.

    Raises:
        TypeError: a non-tensor, an unsupported dtype, a dtype different from x's (float32 weight / vectors with a
            float16 / bfloat16 x are fine; r must have the output dtype), out_dtype not a floating dtype, gemm_dtype
            not None / x's dtype / bfloat16.
        ValueError: wrong rank or shape (the message gives the expected shape), C, H or W < 1, unknown act.
        RuntimeError: a tensor on another device than x.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor (B, Cin, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    B, Cin, H, W = x.shape
    if Cin < 1 or H < 1 or W < 1:
        raise ValueError(f"x: expected Cin, H, W >= 1 (B = 0 is fine), got shape {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if not (weight.dim() == 2 or (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1))) or \
            weight.shape[1] != Cin or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape (Cout, {Cin}) or (Cout, {Cin}, 1, 1), got {tuple(weight.shape)}")
    low = x.dtype in (torch.float16, torch.bfloat16)
    if weight.dtype != x.dtype and not (low and weight.dtype == torch.float32):
        extra = " or float32" if low else ""
        raise TypeError(f"weight: expected dtype {x.dtype} (the dtype of x){extra}, got {weight.dtype}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected None or a floating dtype, got {out_dtype}")
    if gemm_dtype not in (None, x.dtype, torch.bfloat16):
        raise TypeError(f"gemm_dtype: expected None, x's dtype ({x.dtype}) or torch.bfloat16, got {gemm_dtype}")
    od = out_dtype or x.dtype
    if weight.device != x.device:
        raise RuntimeError(f"weight: expected a tensor on {x.device} (the device of x), got one on {weight.device}")
    Cout = weight.shape[0]
    check_vec("bias", bias, Cout, x, fp32_ok=True)
    check_vec("alpha", alpha, Cout, x, fp32_ok=True)
    check_vec("gamma", gamma, Cout, x, fp32_ok=True)
    if r is not None:
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"r: expected a torch.Tensor or None, got {type(r).__name__}")
        if tuple(r.shape) != (B, Cout, H, W):
            raise ValueError(f"r: expected shape {(B, Cout, H, W)}, got {tuple(r.shape)}")
        if r.dtype != od:
            raise TypeError(f"r: expected dtype {od} (the output dtype), got {r.dtype}")
        if r.device != x.device:
            raise RuntimeError(f"r: expected a tensor on {x.device} (the device of x), got one on {r.device}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act: expected one of {ACTIVATIONS}, got {act!r}")


@torch.library.custom_op("segnext_kernels::pwconv_fwd", mutates_args=())
def pwconv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, alpha: Optional[Tensor],
               r: Optional[Tensor], backend: str, gamma: Optional[Tensor] = None,
               out_dtype: Optional[torch.dtype] = None, lowp: bool = False) -> Tensor:
    return kernel_module("pwconv", backend).forward(x, weight, bias, act, alpha, r, gamma, out_dtype, lowp)


@pwconv_fwd.register_fake
def _pwconv_fwd_fake(x, weight, bias, act, alpha, r, backend, gamma=None, out_dtype=None, lowp=False):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), dtype=out_dtype or x.dtype)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def pwconv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, act: str = "none",
           alpha: Optional[Tensor] = None, r: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
           out_dtype: Optional[torch.dtype] = None, gemm_dtype: Optional[torch.dtype] = None,
           backend: str = "auto") -> Tensor:
    """Fused pointwise (1x1) convolution with epilogue::

        y = act(gamma[c] * conv1x1(x, weight) + bias[c] + alpha[c] * r)

    The 1x1 convolutions of SegNeXt with what follows them (official ``mscan.py`` ``SpatialAttention.proj_1`` + GELU
    and ``proj_2`` + shortcut, ``Block``'s layer scale and residual; mmseg ``LightHamHead``'s 1x1 ``ConvModule``s).

    Args:
        x: (B, Cin, H, W) float16, bfloat16, float32 or float64, any strides; B >= 0, Cin, H, W >= 1.
        weight: (Cout, Cin) or (Cout, Cin, 1, 1); bias, alpha, gamma: (Cout,) or None (gamma None: 1); r:
            (B, Cout, H, W) or None (alpha without r has no effect). All on x's device; weight in x's dtype (or
            float32 for a float16 / bfloat16 x); bias, alpha, gamma in x's dtype or float32 (float16 / bfloat16 x);
            r in the output dtype.
        act: "none", "gelu" (exact, erf) or "relu".
        out_dtype: the dtype of y (and r); None: x's. The cpu kernel writes float32 or bfloat16.
        gemm_dtype: None (x's dtype) or torch.bfloat16: the GEMM on bfloat16 operands with fp32 accumulation (the
            kernel rounds x and the weight while it packs them: vdpbf16ps / AMX where the CPU has them, elsewhere
            the fp32 GEMM on the rounded copies, the same operands), the epilogue in fp32. A bfloat16 x always gets
            it. With a gradient needed the reference runs the 1x1 convolution in gemm_dtype.
        backend: "auto", "cpu" or "reference". "cpu" runs the custom op ``torch.ops.segnext_kernels.pwconv_fwd``
            (float32 or bfloat16 CPU tensors; bfloat16: the GEMM on bfloat16 operands with fp32 accumulation
            on any CPU, a float32 weight rounded as autocast does, the epilogue in fp32, y rounded once); it is
            forward only, so when autograd needs a gradient (grad mode on and an argument requiring grad), and under ``torch.export``,
            the eager reference runs instead.

    Returns:
        (B, Cout, H, W) in out_dtype (None: x's dtype; the kernel writes contiguous NCHW).

    Raises:
        TypeError, ValueError, RuntimeError: see ``check_pwconv_args``; a requested backend that cannot run here or
        does not take x's dtype.
    """
    check_pwconv_args(x, weight, bias, act, alpha, r, gamma, out_dtype, gemm_dtype)
    name = "reference" if torch.compiler.is_exporting() else resolve("pwconv", backend, x.device, x.dtype)
    od = out_dtype or x.dtype
    if name == "reference" or _needs_grad(x, weight, bias, alpha, r, gamma) or od not in _KERNEL_OUT_DTYPES:
        return pwconv_reference(x, weight, bias, act, alpha, r, gamma, out_dtype, gemm_dtype)
    w2 = weight.reshape(weight.shape[0], weight.shape[1]).contiguous()
    bias, alpha, gamma = (None if v is None else v.float() for v in (bias, alpha, gamma))  # the kernels' epilogue
    return torch.ops.segnext_kernels.pwconv_fwd(x, w2, bias, act, alpha, r, name, gamma, od,
                                                gemm_dtype == torch.bfloat16 or x.dtype == torch.bfloat16)

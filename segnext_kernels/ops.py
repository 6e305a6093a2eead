"""Public functional ops of segnext_kernels."""
from __future__ import annotations

from typing import Sequence

import torch

from ._validate import check_msca_args
from .backend import resolve_backend
from .msca_autograd import msca_fused
from .msca_reference import msca_reference

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def msca(
    u: torch.Tensor,
    conv0_weight: torch.Tensor,
    conv0_bias: torch.Tensor,
    strip_weights: Sequence[torch.Tensor],
    strip_biases: Sequence[torch.Tensor],
    conv3_weight: torch.Tensor,
    conv3_bias: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused MSCA (multi-scale convolutional attention, SegNeXt paper section 3.1, eq. 1-2; the official
    ``AttentionModule`` in ``mmseg/models/backbones/mscan.py``)::

        a = dw5x5(u); s = a + sum_{k in 7, 11, 21} dw_kx1(dw_1xk(a)); out = conv3(s) * u

    Args:
        u: (B, C, H, W) float16, bfloat16, float32 or float64; NCHW, channels_last or any other strides.
            B >= 0, C >= 1, H, W >= 1 (images smaller than the 21-tap strip are fine).
        conv0_weight: (C, 1, 5, 5); conv0_bias: (C,).
        strip_weights: 6 tensors, the official order conv0_1 (C, 1, 1, 7), conv0_2 (C, 1, 7, 1), conv1_1 (C, 1, 1, 11),
            conv1_2 (C, 1, 11, 1), conv2_1 (C, 1, 1, 21), conv2_2 (C, 1, 21, 1); strip_biases: 6 tensors (C,).
        conv3_weight: (C, C, 1, 1); conv3_bias: (C,). All weights in u's dtype and on u's device.
        backend: "auto", "triton", "cuda" or "reference" (see ``segnext_kernels.backend``). "triton" and "cuda" run
            the custom op ``torch.ops.segnext_kernels.msca_forward`` (``msca_autograd``): opaque to
            ``torch.compile`` (fake implementations registered), autograd via ``torch.library.register_autograd``.
            "reference" runs eager PyTorch ops (``msca_reference``).

    Under ``torch.autocast`` (fp32/fp16/bf16 inputs) u and the weights are cast to the autocast dtype first, as eager
    PyTorch casts them for each convolution of the module; the result is in that dtype.

    Returns:
        (B, C, H, W) in u's dtype, differentiable with respect to u and every weight. Fused kernels accumulate in
        fp32 (fp64 for fp64 inputs); half-precision results therefore differ from eager PyTorch, which rounds every
        intermediate to half, by up to a few half-precision ulps.

    Raises:
        TypeError: non-tensor argument, unsupported dtype, or a weight dtype different from u's.
        ValueError: wrong rank or weight shape (the message names the expected shape), unknown backend.
        RuntimeError: a tensor on another device than u, or a requested backend that cannot run here.
    """
    if isinstance(u, torch.Tensor) and u.dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(u.device.type):
        # autocast: the convs run in the autocast dtype, as eager's conv2d does; eager's final gating `att * u`
        # then type-promotes with the uncast u, so the result has dtype promote(autocast dtype, u.dtype)
        dt = torch.get_autocast_dtype(u.device.type)
        cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) else t  # noqa: E731
        seq = lambda ts: [cast(t) for t in ts] if isinstance(ts, (list, tuple)) else ts  # noqa: E731
        with torch.autocast(u.device.type, enabled=False):
            out = msca(cast(u), cast(conv0_weight), cast(conv0_bias), seq(strip_weights), seq(strip_biases),
                       cast(conv3_weight), cast(conv3_bias), backend=backend)
        return out.to(torch.promote_types(dt, u.dtype))
    check_msca_args(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias)
    name = resolve_backend(backend, u.device)
    if name == "reference":
        return msca_reference(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias)
    return msca_fused(name, u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias)

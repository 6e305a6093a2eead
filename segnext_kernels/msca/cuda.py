"""The "cuda" backend of MSCA: hand-written CUDA kernels (``csrc/msca/``), functions of the extension
``segnext_kernels._C`` (``csrc/binding.cpp``) loaded lazily by ``extension.CUDA_EXTENSION``; they run inside the
custom ops of ``msca/interface.py``, which own the fakes and autograd. Importing this module builds nothing.

Precision: fp32 accumulation throughout. The 1x1 channel mix runs on tensor cores: bf16/fp16 operands for half
inputs, TF32 for fp32 inputs when ``torch.backends.cuda.matmul.allow_tf32`` is set (read at each call), exact fp32
FMA otherwise. Weight gradients are per-CTA partials summed in a fixed order: the backward is deterministic.
Dtypes: float32, float16, bfloat16 (registered in ``msca/__init__.py``).

Knobs (``segnext_kernels.knobs``, read from the environment once at import): ``forward`` and ``backward`` read
``knobs.KNOBS`` at each call and pass its tile, depthwise-variant, channels_last and poison settings to the extension
as arguments; both take the depthwise variant (``msca_cuda_dw``) from the same ``KNOBS``, so a backward recomputes
the forward's s.
"""
from __future__ import annotations

import torch

from .. import knobs
from ..extension import CUDA_EXTENSION

__all__ = ["forward", "backward"]

#: ``knobs.Knobs.msca_cuda_dw`` -> MscaDwVariant (csrc/msca/msca_params.h): MSCA_DW_AUTO, MSCA_DW_MMA, MSCA_DW_FMA
DW_VARIANTS = {"auto": 0, "tc": 1, "fma": 2}


def _knob_args(k: knobs.Knobs, tile: int) -> dict:
    """The extension's keyword arguments for knobs ``k`` (``tile``: the forward's or the backward's tile knob)."""
    if k.msca_cuda_dw not in DW_VARIANTS:
        raise ValueError(f"SEGNEXT_MSCA_CUDA_DW: expected 'auto', 'tc' or 'fma', got '{k.msca_cuda_dw}'")
    return dict(tile_cfg=tile, dw_variant=DW_VARIANTS[k.msca_cuda_dw], cl_direct=k.msca_cuda_cl_direct,
                poison=k.msca_cuda_poison)


def forward(u, w0, b0, ws, bs, w3, b3):
    """Fused MSCA forward. u: (B, C, H, W) fp32/fp16/bf16 CUDA tensor, any strides (NCHW, channels_last, views);
    packed fp32 weights as ``msca.reference.pack_weights``. Returns out (B, C, H, W) in u's dtype and (dense)
    memory format.

    Raises:
        ValueError: ``knobs.KNOBS.msca_cuda_dw`` (``SEGNEXT_MSCA_CUDA_DW``) is not "auto", "tc" or "fma".
        RuntimeError: from the extension: a bad argument (device, dtype, shape), a forced tile or depthwise variant
            that cannot run this problem (e.g. "tc" with float32, a tile beyond the device's shared memory).
    """
    k = knobs.KNOBS
    return CUDA_EXTENSION.load().msca_forward(u, w0, b0, ws, bs, w3, b3, **_knob_args(k, k.msca_cuda_tile))


def backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad):
    """Fused MSCA backward.

    Args: grad_out (B, C, H, W) any strides, u's dtype; u and packed weights as in ``forward``; needs_input_grad: 7
    bools for (u, w0, b0, ws, bs, w3, b3).
    Returns (du, dw0 (C, 25), db0 (C,), dws (C, 78), dbs (C, 6), dw3 (C, C), db3 (C,)): du in u's dtype and memory
    format, the rest float32; entries not needed are None. Deterministic (fixed-order reductions, no atomics).
    Raises as ``forward`` (the backward's tile knob is ``msca_cuda_tile_bwd``).
    """
    needs = [bool(n) for n in needs_input_grad]
    if grad_out.dtype != u.dtype:
        grad_out = grad_out.to(u.dtype)
    k = knobs.KNOBS
    grads = CUDA_EXTENSION.load().msca_backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs,
                                                **_knob_args(k, k.msca_cuda_tile_bwd))
    return tuple(g if n else None for g, n in zip(grads, needs))

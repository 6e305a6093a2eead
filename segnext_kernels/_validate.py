"""Argument checks shared by the public ops: clear errors naming the argument, what was expected and what came."""
from __future__ import annotations

import torch

from .msca_reference import strip_weight_shapes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_like(name: str, t, shape: tuple, u: torch.Tensor) -> None:
    _tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != u.dtype:
        raise TypeError(f"{name}: expected dtype {u.dtype} (the dtype of u), got {t.dtype}")
    if t.device != u.device:
        raise RuntimeError(f"{name}: expected a tensor on {u.device} (the device of u), got one on {t.device}")


def check_msca_args(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias) -> None:
    """Validate ``segnext_kernels.msca`` arguments.

    Raises:
        TypeError: a non-tensor, a non-floating or unsupported dtype, or a dtype different from u's.
        ValueError: wrong rank or shape (the message gives the expected shape), C, H or W < 1, wrong number of strip
            tensors.
        RuntimeError: a tensor on another device than u.
    """
    _tensor("u", u)
    if u.dim() != 4:
        raise ValueError(f"u: expected a 4-D tensor (B, C, H, W), got {u.dim()}-D with shape {tuple(u.shape)}")
    if u.dtype not in FLOAT_DTYPES:
        raise TypeError(f"u: expected dtype float16, bfloat16, float32 or float64, got {u.dtype}")
    C = u.shape[1]
    if C < 1:
        raise ValueError(f"u: expected at least one channel (C >= 1), got shape {tuple(u.shape)}")
    if u.shape[2] < 1 or u.shape[3] < 1:
        raise ValueError(f"u: expected H, W >= 1 (an empty image has nothing to convolve; B = 0 is fine), got shape "
                         f"{tuple(u.shape)}")
    _check_like("conv0_weight", conv0_weight, (C, 1, 5, 5), u)
    _check_like("conv0_bias", conv0_bias, (C,), u)
    for name, seq in (("strip_weights", strip_weights), ("strip_biases", strip_biases)):
        if not isinstance(seq, (list, tuple)) or len(seq) != 6:
            got = f"{type(seq).__name__} of length {len(seq)}" if isinstance(seq, (list, tuple)) else type(seq).__name__
            raise ValueError(f"{name}: expected a list of 6 tensors (conv0_1, conv0_2, conv1_1, conv1_2, conv2_1, "
                             f"conv2_2), got {got}")
    for i, shape in enumerate(strip_weight_shapes(C)):
        _check_like(f"strip_weights[{i}]", strip_weights[i], shape, u)
        _check_like(f"strip_biases[{i}]", strip_biases[i], (C,), u)
    _check_like("conv3_weight", conv3_weight, (C, C, 1, 1), u)
    _check_like("conv3_bias", conv3_bias, (C,), u)

"""What every custom op of the package needs: outputs that never alias an input or each other, and the first checks of
a tensor argument."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "check_float_tensor", "check_vec", "fresh_outputs"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t, ndim: int, dims: str) -> None:
    """Raises TypeError unless ``t`` is a tensor of a floating dtype (``FLOAT_DTYPES``) and ValueError unless it has
    ``ndim`` dimensions (``dims`` names them in the message, e.g. ``"B, C, H, W"``); ``name`` starts each message."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor ({dims}), got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")


def fresh_outputs(outs, inputs):
    """Clone any output sharing storage with an input or an earlier output (custom ops must not return aliases;
    e.g. for C == 1 the Triton backward's weight-gradient slices of one partial-sum buffer are all views)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    res = []
    for t in outs:
        if t.numel():
            p = t.untyped_storage().data_ptr()
            if p in seen:
                t = t.clone()
                p = t.untyped_storage().data_ptr()
            seen.add(p)
        res.append(t)
    return res


def check_vec(name: str, t, n: int, x: Tensor, fp32_ok: bool = False) -> None:
    """A per-channel vector argument: None, or a (n,) tensor in x's dtype (or float32 with ``fp32_ok`` and a
    float16 / bfloat16 x) on x's device. Raises TypeError (not a tensor, another dtype), ValueError (another shape)
    or RuntimeError (another device), naming ``name``."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    if t.dtype != x.dtype and not (fp32_ok and t.dtype == torch.float32 and x.dtype in (torch.float16,
                                                                                          torch.bfloat16)):
        extra = " or float32" if fp32_ok and x.dtype in (torch.float16, torch.bfloat16) else ""
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x){extra}, got {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(f"{name}: expected a tensor on {x.device} (the device of x), got one on {t.device}")

"""The "cuda" backend of MSCA: hand-written CUDA kernels (``csrc/``) behind the custom ops
``torch.ops.segnext.msca_forward`` and ``torch.ops.segnext.msca_backward``.

The extension (one for MSCA and NMF2D) is loaded lazily, on first use, by ``cuda_extension.load_extension``
(prebuilt ``segnext_kernels._C`` or a cached JIT build); importing this module never builds anything.

Fake (meta) implementations: the op schemas are defined in C++ (``TORCH_LIBRARY(segnext, m)`` in binding.cpp), so
the ops exist only once the extension is loaded. ``load_extension()`` registers the fakes below right after loading
it, and importing this module registers them too if the ops already exist (e.g. the library was loaded some other
way). binding.cpp also calls ``set_python_module("segnext_kernels.msca_cuda")``, so torch imports this module
whenever it needs a fake for these ops. Net effect: whenever the ops can be called, their fakes exist, and
``torch.compile`` / FakeTensor tracing work without running the kernels.

Precision: fp32 accumulation throughout. The 1x1 channel mix runs on tensor cores: bf16/fp16 operands for half
inputs, TF32 for fp32 inputs when ``torch.backends.cuda.matmul.allow_tf32`` is set (read at each call), exact fp32
FMA otherwise. Weight gradients are per-CTA partials summed in a fixed order: the backward is deterministic.
"""
from __future__ import annotations

import torch

from .cuda_extension import cuda_status, load_extension

__all__ = ["cuda_status", "load_extension", "msca_forward", "msca_backward", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_fakes_registered = False


# ---------------------------------------------------------------------------------------------------------------
# Fake implementations (shapes, dtypes and memory formats only)
# ---------------------------------------------------------------------------------------------------------------
def _fake_forward(u, w0, b0, ws, bs, w3, b3):
    return torch.empty_like(u)


def _fake_backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad):
    C = u.shape[1]
    need_du = bool(needs_input_grad[0])
    need_dwdw = any(bool(n) for n in needs_input_grad[1:5])
    need_w3 = bool(needs_input_grad[5]) or bool(needs_input_grad[6])

    def f(need, *shape):
        return u.new_empty(shape if need else (0,), dtype=torch.float32)

    du = torch.empty_like(u) if need_du else u.new_empty((0,))
    return (du, f(need_dwdw, C, 25), f(need_dwdw, C), f(need_dwdw, C, 78), f(need_dwdw, C, 6),
            f(need_w3, C, C), f(need_w3, C))


def _ops_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("segnext::msca_forward", "")
        torch._C._dispatch_find_schema_or_throw("segnext::msca_backward", "")
        return True
    except Exception:
        return False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    torch.library.register_fake("segnext::msca_forward")(_fake_forward)
    torch.library.register_fake("segnext::msca_backward")(_fake_backward)
    _fakes_registered = True


if _ops_defined():  # the library was loaded before this module (or torch imports us for the fakes)
    _register_fakes()


# ---------------------------------------------------------------------------------------------------------------
# The backend interface used by segnext_kernels.msca_autograd
# ---------------------------------------------------------------------------------------------------------------
def _check_dtype(u: torch.Tensor) -> None:
    if u.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"u: the cuda MSCA backend supports float32, float16 and bfloat16, got {u.dtype}; use "
                        "backend='triton' or backend='reference' for it")


def msca_forward(u, w0, b0, ws, bs, w3, b3):
    """Fused MSCA forward. u: (B, C, H, W) fp32/fp16/bf16 CUDA tensor, any strides (NCHW, channels_last, views);
    packed fp32 weights as ``msca_reference.pack_weights``. Returns out (B, C, H, W) in u's dtype and (dense)
    memory format."""
    _check_dtype(u)
    load_extension()
    return torch.ops.segnext.msca_forward(u, w0, b0, ws, bs, w3, b3)


def msca_backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad):
    """Fused MSCA backward.

    Args: grad_out (B, C, H, W) any strides, u's dtype; u and packed weights as in ``msca_forward``;
    needs_input_grad: 7 bools for (u, w0, b0, ws, bs, w3, b3).
    Returns (du, dw0 (C, 25), db0 (C,), dws (C, 78), dbs (C, 6), dw3 (C, C), db3 (C,)): du in u's dtype and memory
    format, the rest float32; entries not needed are None. Deterministic (fixed-order reductions, no atomics).
    """
    _check_dtype(u)
    needs = [bool(n) for n in needs_input_grad]
    if len(needs) != 7:
        raise ValueError(f"needs_input_grad: expected 7 bools, got {len(needs)}")
    load_extension()
    if grad_out.dtype != u.dtype:
        grad_out = grad_out.to(u.dtype)
    grads = torch.ops.segnext.msca_backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))

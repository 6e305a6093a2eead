"""When a caller may run a backend's kernel functions itself instead of through the custom ops.

The custom ops (``torch.library.custom_op``) are what ``torch.compile``, ``torch.export``, the profiler, torch
function / dispatch modes and functorch transforms see; each call costs tens of microseconds of dispatch on top of
the kernel. In plain eager code nothing observes the ops, and callers that have already checked their arguments
(the fused blocks, ``msca``) call the kernel functions directly. ``eager_direct_ok`` says when that is allowed.
"""
from __future__ import annotations

import torch

__all__ = ["eager_direct_ok"]

# Private torch hooks; where one is missing (another torch), the custom ops always run.
_C = torch._C
_OBSERVERS = tuple(getattr(obj, name, None) for obj, name in (
    (getattr(_C, "_autograd", None), "_profiler_enabled"), (_C, "_is_torch_function_mode_enabled"),
    (_C, "_are_functorch_transforms_active")))
_DISPATCH_STACK = getattr(_C, "_len_torch_dispatch_stack", None)
DIRECT_HOOKS = all(f is not None for f in _OBSERVERS) and _DISPATCH_STACK is not None


def eager_direct_ok(x: torch.Tensor) -> bool:
    """True when ``x`` is a plain ``torch.Tensor`` (no subclass) and nothing observes or transforms ops: not inside
    a torch.compile / torch.export trace (checked first: dynamo cannot trace the private hooks), no autograd
    profiler, no torch function mode, no dispatch mode, no functorch transform. Dtype, layout, grad and autocast
    are the caller's to check."""
    return (not torch.compiler.is_compiling() and DIRECT_HOOKS and type(x) is torch.Tensor
            and not any(f() for f in _OBSERVERS) and _DISPATCH_STACK() == 0)

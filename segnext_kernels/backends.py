"""The one backend registry of every fused op: which backend runs where, and why not.

Backends (``BACKENDS``):

- ``"cuda"``: hand-written CUDA kernels (``csrc/``, extension ``segnext_kernels._C``), CUDA tensors.
- ``"triton"``: Triton kernels, CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1`` was set before Triton was
  first imported (Triton's interpreter: how CI tests them).
- ``"cpu"``: hand-written C++ kernels (``csrc/cpu/``, extension ``segnext_kernels._C_cpu``), CPU tensors.
- ``"reference"``: eager PyTorch (each op's ``reference.py``), any device.
- ``"auto"``: on CPU tensors ``"cpu"``; on CUDA tensors ``"triton"`` (and ``"cuda"`` first once it has passed the GPU
  tests on real hardware: ``AUTO_ORDER``). When the first choice cannot run, the next one is taken, with a one-time
  warning naming why; the eager reference is the last resort. The choice on CPU is said once, as a warning.

Each op's folder registers its kernels with one line per backend (``register_kernel`` in ``msca/__init__.py``,
``nmf/__init__.py``): the module implementing the op on that backend (imported on first use) and the dtypes it
takes. Whether a backend can run on a device at all (Triton installed, extension loadable, right device type) is a
``status`` function here, shared by every op. ``supports`` answers ``(ok, why)``; ``resolve`` maps a user's
``backend=`` argument to the backend that runs, or raises saying why it cannot and how to fix it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["BACKENDS", "AUTO_ORDER", "Backend", "register_kernel", "supports", "resolve", "kernel_module",
           "check_backend_name", "triton_interpreting"]

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

#: The backends "auto" tries, in order, per device type (then the reference). The CUDA backend has been compiled
#: (sm_80/sm_90) and emulated on CPU but not yet run on a GPU, so "auto" keeps Triton first on CUDA tensors until the
#: GPU tests pass (see README, "What runs where").
AUTO_ORDER = {"cuda": ("triton",), "cpu": ("cpu",)}

#: The environment is read once, at import: Triton decides interpretation when it is first imported.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: find_spec does not import triton; a constant for torch.compile (no cache to fill lazily).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None

_warned: set[str] = set()


def warn_once(msg: str, stacklevel: int = 4) -> None:
    """``warnings.warn(msg, RuntimeWarning)`` the first time ``msg`` is seen in this process."""
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _TRITON_INTERPRET


# ------------------------------------------------------------------------------------------------ device status
def _triton_status(device: torch.device) -> tuple[bool, str]:
    if not _TRITON_FOUND:
        return False, "the triton package is not installed (pip install triton)"
    if device.type == "cuda" or (device.type == "cpu" and _TRITON_INTERPRET):
        return True, ""
    return False, (f"Triton kernels need CUDA tensors (got {device.type} tensors); to run them on CPU tensors set "
                   "TRITON_INTERPRET=1 before triton is first imported")


def _cuda_status(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"the CUDA backend needs CUDA tensors (got {device.type} tensors)"
    from .extension import CUDA_EXTENSION

    return CUDA_EXTENSION.status()


def _cpu_status(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the CPU backend needs CPU tensors (got {device.type} tensors)"
    from .extension import CPU_EXTENSION

    return CPU_EXTENSION.status()


def _reference_status(device: torch.device) -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Backend:
    """A backend: its name, what it is, and ``status(device) -> (ok, why)``: whether it can run on tensors of that
    device at all (builds or loads nothing heavy)."""
    name: str
    what: str
    status: Callable[[torch.device], tuple[bool, str]]
    #: how to make it available, appended to "not available" errors
    hint: str = ""


_BACKENDS = {
    "cuda": Backend("cuda", "hand-written CUDA kernels", _cuda_status,
                    "Build the extension on a machine with a CUDA GPU and nvcc: SEGNEXT_KERNELS_FORCE_BUILD=1 pip "
                    "install --no-build-isolation -e ."),
    "triton": Backend("triton", "Triton kernels", _triton_status),
    "cpu": Backend("cpu", "hand-written C++ CPU kernels", _cpu_status,
                   "Reinstall with a C++ compiler present (pip install --no-build-isolation -e .), or let the JIT "
                   "build run (needs g++ and ninja)"),
    "reference": Backend("reference", "eager PyTorch reference", _reference_status),
}


@dataclass(frozen=True)
class _Kernel:
    module: str
    dtypes: tuple


_KERNELS: dict[tuple[str, str], _Kernel] = {}


def register_kernel(op: str, backend: str, module: str, dtypes) -> None:
    """Register ``module`` (a dotted import path, imported on first use) as ``op``'s implementation on ``backend``
    for inputs of ``dtypes``. The module defines the op's backend functions (for MSCA ``forward`` / ``backward``;
    for NMF2D ``KERNELS``)."""
    if backend not in _BACKENDS or backend == "reference":
        raise ValueError(f"backend: expected one of {tuple(b for b in _BACKENDS if b != 'reference')}, got {backend!r}")
    _KERNELS[(op, backend)] = _Kernel(module, tuple(dtypes))


def check_backend_name(backend) -> None:
    """Raises ValueError naming the choices when ``backend`` is not one of ``BACKENDS``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def supports(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on tensors of ``device`` and ``dtype``: ``(True, "")`` or
    ``(False, why)``. Loads nothing heavy (an extension that is not built yet counts as available when it can be
    built)."""
    check_backend_name(backend)
    if backend == "auto":
        raise ValueError("supports: ask about a concrete backend, not 'auto'")
    if backend == "reference":
        return True, ""
    kernel = _KERNELS.get((op, backend))
    if kernel is None:
        return False, f"{backend} has no {op} kernels"
    if dtype is not None and dtype not in kernel.dtypes:
        return False, (f"the {backend} {op} kernels take {', '.join(_dtype_name(d) for d in kernel.dtypes)}, "
                       f"got {_dtype_name(dtype)}")
    return _BACKENDS[backend].status(torch.device(device))


def resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs ``op`` for a user's ``backend`` argument on ``device`` / ``dtype``: a concrete name.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: an explicitly requested backend cannot run here (the message says why and how to fix it).
        TypeError: an explicitly requested backend does not take ``dtype``.
    """
    check_backend_name(backend)
    return _resolve(op, backend, torch.device(device).type, dtype)


@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, device_type: str, dtype: Optional[torch.dtype]) -> str:
    """``resolve`` on a device type. Under torch.compile this runs once at trace time and its answer is a constant
    of the graph (it reads files and the environment, which dynamo cannot trace)."""
    device = torch.device(device_type)
    if backend == "reference":
        return backend
    if backend != "auto":
        ok, why = supports(op, backend, device, dtype)
        if ok:
            return backend
        kernel = _KERNELS.get((op, backend))
        if kernel is not None and dtype is not None and dtype not in kernel.dtypes:
            raise TypeError(f"backend={backend!r}: {why}; use another backend (e.g. 'reference') for it")
        hint = _BACKENDS[backend].hint
        raise RuntimeError(f"backend={backend!r} is not available: {why}" + (f". {hint}" if hint else ""))
    reasons = []
    for name in AUTO_ORDER.get(device.type, ()):
        ok, why = supports(op, name, device, dtype)
        if ok and name in ("cpu", "cuda"):
            ok, why = _loads(name)  # "auto" must not fail on a build that cannot work: try it now, once
        if ok:
            if reasons:
                warn_once(f"segnext_kernels: backend 'auto' falls back to '{name}' for {op} ({'; '.join(reasons)})")
            elif device.type == "cpu":
                warn_once(f"segnext_kernels: backend 'auto' runs '{name}' ({_BACKENDS[name].what}) for {op} on CPU "
                          "tensors", stacklevel=5)
            return name
        reasons.append(f"{name}: {why}")
    if reasons:
        warn_once(f"segnext_kernels: backend 'auto' falls back to the eager reference for {op} ({'; '.join(reasons)})")
    return "reference"


def _loads(name: str) -> tuple[bool, str]:
    from .extension import CPU_EXTENSION, CUDA_EXTENSION

    ext = CPU_EXTENSION if name == "cpu" else CUDA_EXTENSION
    try:
        ext.load()
    except RuntimeError as err:
        return False, str(err)
    return True, ""


def kernel_module(op: str, backend: str):
    """The module implementing ``op`` on a resolved ``backend`` (imported now if it was not yet)."""
    kernel = _KERNELS.get((op, backend))
    if kernel is None:
        raise ValueError(f"backend {backend!r} has no {op} kernels")
    return importlib.import_module(kernel.module)

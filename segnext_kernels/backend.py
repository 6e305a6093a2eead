"""The one place that decides which backend runs a fused op.

Backends: ``"cuda"`` (hand-written CUDA extension, ``csrc/``), ``"triton"`` (``msca_triton.py``), ``"reference"``
(eager PyTorch, ``msca_reference.py``) and ``"auto"``.

``"auto"``: CPU tensors run the reference. CUDA tensors run Triton; the CUDA extension is used by "auto" only
once it has passed the GPU test suite on real hardware (``AUTO_PREFERS_CUDA`` below; until then ask for it with
``backend="cuda"``). When "auto" cannot use its first choice it falls back with a one-time warning naming why.
With ``TRITON_INTERPRET=1`` set before Triton is imported, ``backend="triton"`` runs the kernels on CPU tensors in
Triton's interpreter (how CI tests them).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cuda", "triton", "reference")

#: The CUDA backend has been compiled (sm_80/sm_90) but not yet run on a GPU: "auto" keeps Triton first until the
#: GPU tests pass (see README, "What has been verified").
AUTO_PREFERS_CUDA = False

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Looked up once at import (find_spec does not import triton): a constant for torch.compile, which would warn about
#: an lru_cache here and recompile after a lazily filled cache.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _triton_importable() -> tuple[bool, str]:
    if not _TRITON_FOUND:
        return False, "the triton package is not installed (pip install triton)"
    return True, ""


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton backend can run on tensors of ``device``; (False, reason) otherwise."""
    ok, why = _triton_importable()
    if not ok:
        return ok, why
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpreting():
        return True, ""
    return False, (f"Triton kernels need CUDA tensors (got {device.type} tensors); to run them on CPU tensors set "
                   "TRITON_INTERPRET=1 before triton is first imported")


def cuda_status(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA extension backend can run on tensors of ``device``; (False, reason) otherwise.

    Does not build anything: building happens on first use (``cuda_extension.load_extension``)."""
    if device.type != "cuda":
        return False, f"the CUDA backend needs CUDA tensors (got {device.type} tensors)"
    from . import cuda_extension

    return cuda_extension.cuda_status()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user's ``backend`` argument to the backend that will run on ``device``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: an explicitly requested backend cannot run here (the message says why and how to fix it).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "triton":
        ok, why = triton_status(device)
        if not ok:
            raise RuntimeError(f"backend='triton' is not available: {why}")
        return backend
    if backend == "cuda":
        ok, why = cuda_status(device)
        if not ok:
            raise RuntimeError(
                f"backend='cuda' is not available: {why}. Build the extension on a machine with a CUDA GPU and nvcc: "
                "SEGNEXT_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e .")
        return backend
    # auto
    if device.type != "cuda":
        return "reference"
    order = ("cuda", "triton") if AUTO_PREFERS_CUDA else ("triton",)
    reasons = []
    for name in order:
        ok, why = (cuda_status if name == "cuda" else triton_status)(device)
        if ok:
            if reasons:
                _warn_once(f"segnext_kernels: backend 'auto' falls back to '{name}' ({'; '.join(reasons)})")
            return name
        reasons.append(f"{name}: {why}")
    _warn_once(f"segnext_kernels: backend 'auto' falls back to the eager reference ({'; '.join(reasons)})")
    return "reference"


def get_impl(name: str):
    """The module implementing ``msca_forward``/``msca_backward`` for a resolved backend name."""
    if name == "triton":
        from . import msca_triton

        return msca_triton
    if name == "cuda":
        from . import msca_cuda

        return msca_cuda
    raise ValueError(f"backend {name!r} has no kernel implementation")

"""The "cuda" backend of MSCA: hand-written CUDA kernels (``csrc/``) behind the custom ops
``torch.ops.segnext.msca_forward`` and ``torch.ops.segnext.msca_backward``.

Loading (lazy; importing this module never builds anything):

1. a prebuilt extension ``segnext_kernels._C`` (``SEGNEXT_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e .``
   on a machine with nvcc, or a plain install there: setup.py builds it whenever torch has CUDA), else
2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja) of ``csrc/*.cu`` (MSCA and NMF2D kernels) and
   ``csrc/binding.cpp`` into ``~/.cache/segnext_kernels/<torch version>-cu<cuda version>/`` (override with
   ``SEGNEXT_KERNELS_BUILD_DIR``), cached by ninja. ``TORCH_CUDA_ARCH_LIST`` selects the architectures as usual
   (default there: the visible GPU's).

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

import importlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path

import torch

__all__ = ["cuda_status", "load_extension", "msca_forward", "msca_backward", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BUILD_HINT = ("Build it on a machine with a CUDA GPU and nvcc: SEGNEXT_KERNELS_FORCE_BUILD=1 pip install "
              "--no-build-isolation -e .")
_SRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
#: every kernel of the extension (MSCA and NMF2D: one extension, one build)
_SOURCES = ("msca_fwd.cu", "msca_bwd.cu", "nmf_fwd.cu", "nmf_bwd.cu", "binding.cpp")
_HEADERS = ("cuda_common.cuh", "msca_params.h", "msca_common.cuh", "nmf_params.h")

_lock = threading.Lock()
_ext = None            # the loaded extension module
_load_error = None     # message of a failed load/build (not retried in this process)
_fakes_registered = False


# ---------------------------------------------------------------------------------------------------------------
# Status and loading
# ---------------------------------------------------------------------------------------------------------------
def _prebuilt_spec():
    try:
        return importlib.util.find_spec("segnext_kernels._C")
    except (ImportError, ValueError):
        return None


def _cuda_home():
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - broken torch install
        return None
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return CUDA_HOME
    return None


def _nvcc_available() -> bool:
    return _cuda_home() is not None or shutil.which("nvcc") is not None


def cuda_status() -> tuple[bool, str]:
    """(True, "") if the CUDA backend can run here (extension prebuilt, already loaded, or buildable), else
    (False, reason). Builds nothing."""
    if torch.version.cuda is None:
        return False, f"this torch build has no CUDA support (torch {torch.__version__}, torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, (f"the CUDA kernels need compute capability 8.0 or newer (bf16/fp16 mma.m16n8k16); this GPU has "
                       f"{major}.{minor}")
    if _load_error is not None:
        return False, _load_error
    if _ext is not None or _prebuilt_spec() is not None:
        return True, ""
    if not _nvcc_available():
        return False, "the extension segnext_kernels._C is not built and no nvcc / CUDA_HOME was found to build it"
    if not all((_SRC_DIR / s).exists() for s in _SOURCES + _HEADERS):
        return False, f"the extension segnext_kernels._C is not built and its sources are missing under {_SRC_DIR}"
    return True, ""


def _build_dir() -> Path:
    env = os.environ.get("SEGNEXT_KERNELS_BUILD_DIR")
    if env:
        return Path(env)
    tag = f"{torch.__version__}-cu{torch.version.cuda}".replace("+", "_").replace("/", "_")
    return Path.home() / ".cache" / "segnext_kernels" / tag


def _jit_build():
    from torch.utils.cpp_extension import load

    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build_error.log"
    flags = ["-O3"]  # torch adds the C++ standard its headers need (C++17 or C++20)
    nvcc_threads = os.environ.get("NVCC_THREADS")
    cuda_flags = flags + ["-lineinfo"] + ([f"--threads={int(nvcc_threads)}"] if nvcc_threads else [])
    try:
        module = load(
            name="segnext_kernels_C",
            sources=[str(_SRC_DIR / s) for s in _SOURCES],
            extra_include_paths=[str(_SRC_DIR)],
            extra_cflags=flags,
            extra_cuda_cflags=cuda_flags,
            build_directory=str(build_dir),
            with_cuda=True,
            verbose=os.environ.get("SEGNEXT_KERNELS_VERBOSE_BUILD", "0") == "1",
        )
    except Exception as e:  # the message carries the compiler output
        log.write_text(f"{type(e).__name__}: {e}\n")
        raise RuntimeError(f"building the segnext_kernels CUDA extension failed ({type(e).__name__}); compiler output "
                           f"in {log} (build directory {build_dir}). To build ahead of time: {BUILD_HINT}") from e
    if log.exists():
        log.unlink()
    return module


def load_extension():
    """Load (or JIT-build, once) the CUDA extension and register the ops' fake implementations.

    Returns the extension module. Raises RuntimeError saying why it cannot (no GPU, no nvcc, a failed build with the
    path of its log) and how to build it."""
    global _ext, _load_error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _load_error is not None:
            raise RuntimeError(f"backend='cuda' is not available: {_load_error}")
        ok, why = cuda_status()
        if not ok:
            raise RuntimeError(f"backend='cuda' is not available: {why}. {BUILD_HINT}")
        module = None
        prebuilt_error = None
        if _prebuilt_spec() is not None:
            try:
                module = importlib.import_module("segnext_kernels._C")
            except ImportError as e:  # e.g. built against another torch
                prebuilt_error = e
        if module is None:
            if not _nvcc_available():
                _load_error = (f"the prebuilt extension segnext_kernels._C failed to import ({prebuilt_error}) and no "
                               "nvcc was found to rebuild it")
                raise RuntimeError(f"backend='cuda' is not available: {_load_error}. {BUILD_HINT}")
            try:
                module = _jit_build()
            except RuntimeError as e:
                _load_error = str(e)
                raise
        _ext = module
        _register_fakes()
        return _ext


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

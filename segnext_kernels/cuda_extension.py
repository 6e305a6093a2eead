"""The package's one CUDA extension, ``segnext_kernels._C`` (MSCA and NMF2D kernels of ``csrc/``): its status and
its lazy loading. Importing this module builds nothing.

Loading (``load_extension``, on first use of a "cuda" backend):

1. a prebuilt extension ``segnext_kernels._C`` (``SEGNEXT_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e .``
   on a machine with nvcc, or a plain install there: setup.py builds it whenever torch has CUDA), else
2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja) of ``csrc/*.cu`` and ``csrc/binding.cpp`` into
   ``~/.cache/segnext_kernels/<torch version>-cu<cuda version>/`` (override with ``SEGNEXT_KERNELS_BUILD_DIR``),
   cached by ninja. ``TORCH_CUDA_ARCH_LIST`` selects the architectures as usual (default there: the visible GPUs'),
   entries below sm_80 dropped with a warning (segnext_kernels/_arch.py); ``NVCC_THREADS`` is passed to nvcc;
   ``SEGNEXT_KERNELS_VERBOSE_BUILD=1`` shows the compiler output.

A failed load or build is remembered for the process: later calls raise the same error (with the build log's path)
instead of rebuilding. Users: ``msca_cuda`` (MSCA ops, whose fake implementations are registered right after the
load) and ``nmf_cuda`` (NMF2D launchers).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

from ._arch import supported_arch_list

__all__ = ["cuda_status", "load_extension", "BUILD_HINT"]

BUILD_HINT = ("Build it on a machine with a CUDA GPU and nvcc: SEGNEXT_KERNELS_FORCE_BUILD=1 pip install "
              "--no-build-isolation -e .")
_SRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
#: every kernel of the extension (MSCA and NMF2D: one extension, one build)
_SOURCES = ("msca_fwd.cu", "msca_bwd.cu", "nmf_fwd.cu", "nmf_bwd.cu", "binding.cpp")
_HEADERS = ("cuda_common.cuh", "msca_params.h", "msca_common.cuh", "nmf_params.h")

_lock = threading.Lock()
_ext = None            # the loaded extension module
_load_error = None     # message of a failed load/build (not retried in this process)


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
    # architectures: TORCH_CUDA_ARCH_LIST if set, else the visible GPUs'; those below sm_80 dropped (see _arch)
    asked = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if asked is None and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        asked = ";".join(f"{a}.{b}" for a, b in caps)
    arch, dropped = supported_arch_list(asked)
    if dropped:
        warnings.warn(f"segnext_kernels: building the CUDA extension without {' '.join(dropped)} (the kernels need "
                      "sm_80 or newer)", stacklevel=3)
    saved_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
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
    finally:
        if saved_env is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_env
    if log.exists():
        log.unlink()
    return module


def load_extension():
    """Load (or JIT-build, once) the CUDA extension and register the MSCA ops' fake implementations.

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
        from . import msca_cuda  # the C++ ops exist now: give them their fake implementations

        msca_cuda._register_fakes()
        return _ext

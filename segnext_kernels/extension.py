"""The package's compiled extensions, loaded lazily: ``CUDA_EXTENSION`` (``segnext_kernels._C``: the MSCA and NMF2D
CUDA kernels of ``csrc/msca``, ``csrc/nmf``) and ``CPU_EXTENSION`` (``segnext_kernels._C_cpu``: the C++ CPU kernels of
``csrc/cpu``). Importing this module builds and loads nothing; the package imports without either extension and says,
only when a backend that needs one runs, why it is missing and how to build it.

Loading (``Extension.load``, on first use of the "cuda" / "cpu" backend):

1. the prebuilt extension (``pip install --no-build-isolation -e .`` builds the CPU one on every machine with a C++
   compiler, and the CUDA one where torch has CUDA and nvcc is present; ``SEGNEXT_KERNELS_FORCE_BUILD=1`` forces
   the CUDA build), else
2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja) of the sources (shipped inside the package as
   ``segnext_kernels/csrc``, or the checkout's ``csrc/``) into ``~/.cache/segnext_kernels/<torch version>[-cu<cuda
   version>]/<name>`` (override with ``SEGNEXT_KERNELS_BUILD_DIR``), cached by ninja.

A failed load or build is remembered for the process: later calls raise the same error, naming the build log,
instead of rebuilding.

Build knobs (read once, when this module is imported): ``SEGNEXT_KERNELS_BUILD_DIR``, ``SEGNEXT_KERNELS_VERBOSE_BUILD=1``
(show the compiler output), ``NVCC_THREADS``, ``TORCH_CUDA_ARCH_LIST`` (CUDA; entries below sm_80 are dropped,
``_arch.py``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from ._arch import supported_arch_list
from ._sources import CPU_CFLAGS, CPU_LDFLAGS, CPU_SOURCES, CUDA_SOURCES

__all__ = ["Extension", "CUDA_EXTENSION", "CPU_EXTENSION", "source_dir"]

_BUILD_DIR = os.environ.get("SEGNEXT_KERNELS_BUILD_DIR")
_VERBOSE = os.environ.get("SEGNEXT_KERNELS_VERBOSE_BUILD", "0") == "1"
_NVCC_THREADS = os.environ.get("NVCC_THREADS")
_ARCH_LIST = os.environ.get("TORCH_CUDA_ARCH_LIST")


def source_dir() -> Path:
    """Where the C++/CUDA sources are: the package's ``csrc`` (an installed wheel) or the checkout's ``csrc/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "binding.cpp").exists():
            return cand
    return here.parent / "csrc"


def _cuda_home() -> Optional[str]:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - broken torch install
        return None
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return CUDA_HOME
    return None


def _nvcc_available() -> bool:
    return _cuda_home() is not None or shutil.which("nvcc") is not None


def _cxx_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def _ninja_available() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except Exception:  # pragma: no cover
        return False
    return is_ninja_available()


class Extension:
    """One compiled extension: ``status()`` says whether it can be had here (prebuilt, loaded, or buildable), without
    building; ``load()`` returns the module, JIT-building it once if needed.

    Args:
        module: the prebuilt module's import name, e.g. ``"segnext_kernels._C"``.
        jit_name: the JIT build's module name (distinct from any prebuilt one).
        sources: source files relative to ``source_dir()``.
        device_check: ``() -> (ok, why)``: whether this machine can run the kernels at all (e.g. a CUDA GPU).
        build_tools: ``() -> (ok, why)``: whether a JIT build can be tried.
        build_hint: how to build it ahead of time, appended to errors.
        on_load: ``(module) -> None`` run once when the module is loaded (hands it the knobs read at import).
    """

    def __init__(self, module: str, jit_name: str, sources: tuple, device_check: Callable[[], tuple[bool, str]],
                 build_tools: Callable[[], tuple[bool, str]], build_hint: str, cuda: bool,
                 on_load: Optional[Callable] = None):
        self.module, self.jit_name, self.sources = module, jit_name, tuple(sources)
        self._on_load = on_load
        self._device_check, self._build_tools, self.build_hint, self.cuda = device_check, build_tools, build_hint, cuda
        self._lock = threading.Lock()
        self._ext = None
        self._error: Optional[str] = None

    def _prebuilt_spec(self):
        try:
            return importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None

    def status(self) -> tuple[bool, str]:
        """(True, "") if the extension is loaded, prebuilt or buildable here, else (False, reason). Builds nothing."""
        if self._ext is not None:
            return True, ""
        ok, why = self._device_check()
        if not ok:
            return ok, why
        if self._error is not None:
            return False, self._error
        if self._prebuilt_spec() is not None:
            return True, ""
        ok, why = self._build_tools()
        if not ok:
            return False, f"the extension {self.module} is not built and {why}"
        missing = [s for s in self.sources if not (source_dir() / s).exists()]
        if missing:
            return False, f"the extension {self.module} is not built and its sources are missing: {missing}"
        return True, ""

    def load(self):
        """The extension module, loading (or JIT-building, once) it.

        Raises:
            RuntimeError: it cannot be had here (the reason; for a failed build, the path of its log) and how to
                build it."""
        if self._ext is not None:
            return self._ext
        with self._lock:
            if self._ext is not None:
                return self._ext
            if self._error is not None:
                raise RuntimeError(f"{self._error}. {self.build_hint}")
            ok, why = self.status()
            if not ok:
                raise RuntimeError(f"{why}. {self.build_hint}")
            module, prebuilt_error = None, None
            if self._prebuilt_spec() is not None:
                try:
                    module = importlib.import_module(self.module)
                except ImportError as e:  # e.g. built against another torch
                    prebuilt_error = e
            if module is None:
                ok, why = self._build_tools()
                if not ok:
                    self._error = f"the prebuilt extension {self.module} failed to import ({prebuilt_error}) and {why}"
                    raise RuntimeError(f"{self._error}. {self.build_hint}")
                try:
                    module = self._jit_build()
                except RuntimeError as e:
                    self._error = str(e)
                    raise RuntimeError(f"{self._error}. {self.build_hint}") from e
            if self._on_load is not None:
                self._on_load(module)
            self._ext = module
            return module

    # ------------------------------------------------------------------------------------------------ JIT build
    def build_dir(self) -> Path:
        tag = torch.__version__ + (f"-cu{torch.version.cuda}" if self.cuda else "")
        base = Path(_BUILD_DIR) if _BUILD_DIR else Path.home() / ".cache" / "segnext_kernels" / tag.replace("+", "_")
        return base / self.jit_name

    def _jit_build(self):
        from torch.utils.cpp_extension import load

        build_dir = self.build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        log = build_dir / "build_error.log"
        src = source_dir()
        kwargs = dict(name=self.jit_name, sources=[str(src / s) for s in self.sources],
                      extra_include_paths=[str(src)], build_directory=str(build_dir), verbose=_VERBOSE)
        saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        try:
            if self.cuda:
                asked = _ARCH_LIST
                if asked is None and torch.cuda.is_available():
                    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                    asked = ";".join(f"{a}.{b}" for a, b in caps)
                arch, dropped = supported_arch_list(asked)
                if dropped:
                    warnings.warn(f"segnext_kernels: building the CUDA extension without {' '.join(dropped)} (the "
                                  "kernels need sm_80 or newer)", stacklevel=4)
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch
                threads = [f"--threads={int(_NVCC_THREADS)}"] if _NVCC_THREADS else []
                kwargs.update(extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"] + threads, with_cuda=True)
            else:
                kwargs.update(extra_cflags=list(CPU_CFLAGS), extra_ldflags=list(CPU_LDFLAGS), with_cuda=False)
            module = load(**kwargs)
        except Exception as e:  # the message carries the compiler output
            log.write_text(f"{type(e).__name__}: {e}\n")
            raise RuntimeError(f"building the extension {self.module} failed ({type(e).__name__}); compiler output in "
                               f"{log} (build directory {build_dir})") from e
        finally:
            if self.cuda:
                if saved_arch is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
        if log.exists():
            log.unlink()
        return module


def _cuda_device_check() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, f"this torch build has no CUDA support (torch {torch.__version__}, torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, (f"the CUDA kernels need compute capability 8.0 or newer (bf16/fp16 mma.m16n8k16); this GPU has "
                       f"{major}.{minor}")
    return True, ""


def _cuda_build_tools() -> tuple[bool, str]:
    if not _nvcc_available():
        return False, "no nvcc / CUDA_HOME was found to build it"
    return True, ""


def _cpu_build_tools() -> tuple[bool, str]:
    if not _cxx_available():
        return False, "no C++ compiler (c++ / g++) was found to build it"
    if not _ninja_available():
        return False, "ninja is not installed (pip install ninja) to build it"
    return True, ""


CUDA_EXTENSION = Extension(
    "segnext_kernels._C", "segnext_kernels_C", CUDA_SOURCES, _cuda_device_check, _cuda_build_tools,
    "Build it on a machine with a CUDA GPU and nvcc: SEGNEXT_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation "
    "-e .", cuda=True)
CPU_EXTENSION = Extension(
    "segnext_kernels._C_cpu", "segnext_kernels_C_cpu", CPU_SOURCES, lambda: (True, ""), _cpu_build_tools,
    "Install with a C++ compiler present (pip install --no-build-isolation -e . builds it), or install g++ and "
    "ninja for the JIT build", cuda=False, on_load=lambda module: _apply_cpu_knobs(module))


def _apply_cpu_knobs(module) -> None:
    """The CPU kernels' knobs (``knobs.KNOBS``, read from the environment at import: tiling-plan overrides,
    ``csrc/cpu/cpu_plans.h``; the output-cache limit, ``csrc/cpu/resize_cpu.h``) handed to the extension once, when
    it loads."""
    from .knobs import apply_cpu_knobs

    apply_cpu_knobs(module)

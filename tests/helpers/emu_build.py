"""Builds the package's CUDA kernels for the CPU emulation (tests/helpers/emu/cuda_emu.h runs them): g++ compiles the
very sources of csrc/ with ``-DSEGNEXT_EMU`` and one include dir for them, ``csrc/`` (``#include "msca/..."``,
``"nmf/..."``, ``"common/..."``), plus ``tests/helpers/emu`` (cuda_emu.h) and the CUDA toolkit's headers.

Two kinds of build:

- ``build_ctypes_library``: kernel sources + a C entry-point file (tests/helpers/emu/emu_main.cpp for MSCA,
  nmf_emu_main.cpp for NMF2D) into a shared library for ctypes (tests/msca/test_msca_cuda_emu.py,
  tests/nmf/test_nmf_cuda_emu.py).
- ``build_torch_extension``: ``csrc/binding.cpp`` and every kernel source into a torch C++ extension named ``NAME``
  whose functions take CPU tensors (tests/integration/test_cuda_backend_emu.py drives the "cuda" backend with it: the
  public API, binding.cpp's checks and launch code, and the kernels). Like the real extension it registers nothing in
  torch's dispatcher: its MSCA and NMF2D entry points are plain module functions (``msca_forward``,
  ``msca_backward``, ``tile_table``, ``nmf_geom``, ``nmf_bases``, ``nmf_coef``, ``nmf_bwd_stage``, ``nmf_gx``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "emu"
#: the kernel sources of the CUDA extension, relative to csrc/ (binding.cpp is its one other source)
MSCA_KERNEL_SOURCES = ("msca/msca_fwd.cu", "msca/msca_bwd.cu")
NMF_KERNEL_SOURCES = ("nmf/nmf_fwd.cu", "nmf/nmf_bwd.cu")
KERNEL_SOURCES = MSCA_KERNEL_SOURCES + NMF_KERNEL_SOURCES
#: module name of the emulated extension: its own, so it never meets the real extension's in one process
NAME = "segnext_kernels_cuda_emu"


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_fp16.h, cuda_bf16.h, cuda_runtime_api.h), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    for c in cands:
        if c and all((Path(c) / "include" / h).exists() for h in ("cuda_bf16.h", "cuda_fp16.h", "cuda_runtime_api.h")):
            return Path(c) / "include"
    return None


def skip_reason(torch_extension: bool = False) -> str | None:
    """Why the emulation (``torch_extension``: the emulated torch extension) cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found: cannot build the CPU emulation of the CUDA kernels"
    if cuda_include() is None:
        return ("CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime_api.h) not found (set CUDA_HOME): cannot build "
                "the emulation")
    if torch_extension:
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            return "ninja not found (pip install ninja): torch.utils.cpp_extension builds the extension with it"
    return None


def include_dirs() -> list[Path]:
    """Include directories of an emulation build: csrc/ (the extension's one include dir), the emulator, CUDA."""
    return [CSRC, EMU, cuda_include()]


def build_ctypes_library(out: Path, kernel_sources, main: Path, timeout: int = 900) -> None:
    """g++ ``kernel_sources`` (paths relative to csrc/, compiled as C++) and the entry-point file ``main`` into the
    shared library ``out``; raises RuntimeError with the compiler's messages when the build fails."""
    cmd = ["g++", "-std=c++17", "-O1", "-DSEGNEXT_EMU", "-shared", "-fPIC", *(f"-I{d}" for d in include_dirs())]
    for src in kernel_sources:
        cmd += ["-x", "c++", str(CSRC / src)]
    cmd += ["-x", "c++", str(main), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"building the emulation failed:\n{proc.stderr[-6000:]}")


def build_torch_extension(build_dir: Path):
    """Build (ninja keeps it incremental; torch's file lock serialises concurrent pytest-xdist workers) and import
    the emulated extension ``NAME`` from ``build_dir``. Returns the module (functions listed in the module docstring,
    on CPU tensors)."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for src in KERNEL_SOURCES:  # .cu files would go to nvcc: compile each through a C++ file that includes it
        w = build_dir / f"emu_{Path(src).stem}.cpp"
        text = f'#include "{CSRC / src}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        wrappers.append(str(w))
    return load(
        name=NAME,
        sources=[str(CSRC / "binding.cpp"), *wrappers],
        extra_include_paths=[str(d) for d in include_dirs()],
        extra_cflags=["-O1", "-DSEGNEXT_EMU"],
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=False,
    )

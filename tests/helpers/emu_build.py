"""Builds the package's CUDA extension for the CPU emulation: ``csrc/binding.cpp`` and the four kernel files compiled
by g++ with ``-DSEGNEXT_EMU`` into a torch C++ extension whose ops take CPU tensors (tests/helpers/emu/cuda_emu.h runs the
kernels). Used by tests/integration/test_cuda_backend_emu.py to drive the "cuda" backend end to end on a machine without a GPU:
the public API, the custom ops and their fakes, binding.cpp's checks and launch code, and the kernels.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "emu"
KERNEL_SOURCES = ("msca_fwd.cu", "msca_bwd.cu", "nmf_fwd.cu", "nmf_bwd.cu")
NAME = "segnext_kernels_emu_C"


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


def build_torch_extension(build_dir: Path):
    """Build (ninja keeps it incremental; torch's file lock serialises concurrent pytest-xdist workers) and import
    the emulated extension from ``build_dir``. Returns the module; its ops are ``torch.ops.segnext.*`` on CPU."""
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
        extra_include_paths=[str(CSRC), str(EMU), str(cuda_include())],
        extra_cflags=["-O1", "-DSEGNEXT_EMU"],
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=False,
    )

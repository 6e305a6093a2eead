"""Build script of segnext-kernels.

Package metadata and the list of packages (segnext, segnext_kernels, bench) live in pyproject.toml; this file only
adds the optional CUDA extension ``segnext_kernels._C`` (csrc/msca_fwd.cu, csrc/msca_bwd.cu, csrc/nmf_fwd.cu,
csrc/nmf_bwd.cu, csrc/binding.cpp).

The extension is built when the torch found at build time has CUDA (``torch.version.cuda is not None``) and nvcc is
available, or always when ``SEGNEXT_KERNELS_FORCE_BUILD=1`` (then a missing toolkit is an error). Otherwise the
install is pure Python and the CUDA backend can still be JIT-built on first use (segnext_kernels/cuda_extension.py).

torch must be importable here, so install without build isolation::

    pip install --no-build-isolation -e .                                   # pure Python on a CPU-only torch
    SEGNEXT_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e .     # with the CUDA extension
    SEGNEXT_KERNELS_FORCE_BUILD=1 python setup.py build_ext --inplace       # extension only, in place

Knobs: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"; entries below 8.0 are dropped: the kernels need sm_80), MAX_JOBS
(parallel compile jobs, read by torch's ninja build), NVCC_THREADS (nvcc --threads, default 2: both architectures of
a file compile in parallel).
"""
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# segnext_kernels/_arch.py by path: importing the package here would need its dependencies at build time
_spec = importlib.util.spec_from_file_location("_segnext_arch", os.path.join(ROOT, "segnext_kernels", "_arch.py"))
_arch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_arch)
FORCE = os.environ.get("SEGNEXT_KERNELS_FORCE_BUILD", "0") == "1"


def _log(msg):
    print(f"segnext-kernels setup: {msg}", file=sys.stderr)


def _extension_kwargs():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if FORCE:
            raise RuntimeError("SEGNEXT_KERNELS_FORCE_BUILD=1 but torch is not importable; install torch first and "
                               "use pip install --no-build-isolation") from e
        _log("torch is not importable at build time: installing pure Python (use --no-build-isolation)")
        return {}
    if not FORCE:
        if torch.version.cuda is None:
            _log(f"torch {torch.__version__} has no CUDA: installing pure Python (the CUDA backend is unavailable; "
                 "SEGNEXT_KERNELS_FORCE_BUILD=1 forces a build)")
            return {}
        if cpp_extension.CUDA_HOME is None:
            _log("torch has CUDA but no CUDA toolkit (nvcc / CUDA_HOME) was found: installing pure Python; the "
                 "extension will be JIT-built on first use if nvcc appears")
            return {}
    arch, dropped = _arch.supported_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if dropped:
        _log(f"TORCH_CUDA_ARCH_LIST: dropping {' '.join(dropped)} (the kernels need sm_80 or newer)")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, f) for f in ("msca_fwd.cu", "msca_bwd.cu", "nmf_fwd.cu", "nmf_bwd.cu", "binding.cpp")]
    ext = cpp_extension.CUDAExtension(
        name="segnext_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # no -std here: torch adds the standard its headers need (C++17 or C++20); the kernels need >= C++17
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", f"--threads={int(nvcc_threads)}"],
        },
    )
    _log(f"building segnext_kernels._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(**_extension_kwargs())

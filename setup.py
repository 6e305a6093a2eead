"""Build script of segnext-kernels.

Package metadata lives in pyproject.toml; this file lists the packages (segnext, segnext_kernels, and the C++/CUDA
sources shipped inside the package as ``segnext_kernels/csrc`` so that a JIT build works from an installed wheel;
``bench`` and the test tooling are not installed) and adds the compiled extensions:

- ``segnext_kernels._C_cpu`` (csrc/cpu: the C++ CPU kernels), built on every machine where torch is importable at
  build time. It is optional: if it fails to compile, the install goes on and the "cpu" backend is JIT-built on
  first use (with a clear error naming the build log if that fails too). ``SEGNEXT_KERNELS_NO_CPU_BUILD=1`` skips it.
- ``segnext_kernels._C`` (csrc/msca, csrc/nmf: the CUDA kernels), built when the torch found at build time has CUDA
  (``torch.version.cuda is not None``) and nvcc is available, or always when ``SEGNEXT_KERNELS_FORCE_BUILD=1`` (then
  a missing toolkit or a failed compile is an error). Otherwise the CUDA backend can still be JIT-built on first use.

torch must be importable here, so install without build isolation::

    pip install --no-build-isolation -e .                                   # CPU extension (+ CUDA where possible)
    SEGNEXT_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e .     # the CUDA extension too, or fail

Knobs: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"; entries below 8.0 are dropped: the kernels need sm_80), MAX_JOBS
(parallel compile jobs, read by torch's ninja build), NVCC_THREADS (nvcc --threads, default 2: both architectures of
a file compile in parallel).
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load(name):  # a torch-free module of the package, by path (importing the package needs its dependencies)
    spec = importlib.util.spec_from_file_location(f"_segnext_{name}", os.path.join(ROOT, "segnext_kernels", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_arch, _sources = _load("_arch"), _load("_sources")
FORCE = os.environ.get("SEGNEXT_KERNELS_FORCE_BUILD", "0") == "1"
NO_CPU = os.environ.get("SEGNEXT_KERNELS_NO_CPU_BUILD", "0") == "1"
CSRC = "csrc"
CSRC_DIRS = ("", "common", "cpu", "msca", "nmf")


def _log(msg):
    print(f"segnext-kernels setup: {msg}", file=sys.stderr)


def _packages():
    pkgs = find_packages(include=["segnext", "segnext.*", "segnext_kernels", "segnext_kernels.*"])
    return {
        "packages": pkgs + ["segnext_kernels.csrc"],
        "package_dir": {"segnext_kernels.csrc": CSRC},
        "package_data": {"segnext_kernels.csrc": [os.path.join(d, f"*.{ext}") if d else f"*.{ext}"
                                                  for d in CSRC_DIRS for ext in ("cpp", "h", "cu", "cuh")]},
    }


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if FORCE:
            raise RuntimeError("SEGNEXT_KERNELS_FORCE_BUILD=1 but torch is not importable; install torch first and "
                               "use pip install --no-build-isolation") from e
        _log("torch is not importable at build time: installing pure Python (use --no-build-isolation); the "
             "extensions will be JIT-built on first use")
        return {}
    include = [os.path.join(ROOT, CSRC)]
    exts = []
    if NO_CPU:
        _log("SEGNEXT_KERNELS_NO_CPU_BUILD=1: not building the CPU extension (JIT-built on first use)")
    else:
        exts.append(cpp_extension.CppExtension(
            name="segnext_kernels._C_cpu",
            sources=[os.path.join(CSRC, s) for s in _sources.CPU_SOURCES],
            include_dirs=include,
            extra_compile_args={"cxx": list(_sources.CPU_CFLAGS)},
            extra_link_args=list(_sources.CPU_LDFLAGS),
            optional=not FORCE,
        ))
        _log("building segnext_kernels._C_cpu (the C++ CPU kernels; optional: a failure leaves it to the JIT build)")
    build_cuda = FORCE
    if not FORCE:
        if torch.version.cuda is None:
            _log(f"torch {torch.__version__} has no CUDA: not building the CUDA extension (the CUDA backend is "
                 "unavailable; SEGNEXT_KERNELS_FORCE_BUILD=1 forces a build)")
        elif cpp_extension.CUDA_HOME is None:
            _log("torch has CUDA but no CUDA toolkit (nvcc / CUDA_HOME) was found: not building the CUDA extension; "
                 "it will be JIT-built on first use if nvcc appears")
        else:
            build_cuda = True
    if build_cuda:
        arch, dropped = _arch.supported_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        if dropped:
            _log(f"TORCH_CUDA_ARCH_LIST: dropping {' '.join(dropped)} (the kernels need sm_80 or newer)")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        nvcc_threads = os.environ.get("NVCC_THREADS", "2")
        exts.append(cpp_extension.CUDAExtension(
            name="segnext_kernels._C",
            sources=[os.path.join(CSRC, s) for s in _sources.CUDA_SOURCES],
            include_dirs=include,
            extra_compile_args={
                # no -std here: torch adds the standard its headers need (C++17 or C++20); the kernels need >= C++17
                "cxx": ["-O3"],
                "nvcc": ["-O3", "-lineinfo", f"--threads={int(nvcc_threads)}"],
            },
        ))
        _log(f"building segnext_kernels._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    if not exts:
        return {}
    return {
        "ext_modules": exts,
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(**_packages(), **_extensions())

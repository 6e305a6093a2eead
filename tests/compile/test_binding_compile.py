"""Syntax and type check of the extension's binding (csrc/binding.cpp) on a machine without a GPU.

binding.cpp is the only file that includes <torch/extension.h>; nothing else compiles it before a GPU machine builds
the extension. Here g++ compiles it (host code only, no link) against the installed torch's headers (a CPU torch ships
the c10/cuda headers but not their generated ``cuda_cmake_macros.h``, which a stub replaces) and the CUDA runtime
headers, with csrc/ as the one include dir as in the real build: a type error, a wrong launcher signature, a
params-struct mismatch with csrc/msca/msca_params.h or csrc/nmf/nmf_params.h, infinite recursion or a missing return
fails here.
About 45 s on 2 cores. Skipped (saying why) without g++, the CUDA headers or torch's C++ headers.
"""
from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from emu_build import CSRC, cuda_include


def test_binding_cpp_compiles(tmp_path):
    from torch.utils.cpp_extension import include_paths

    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot syntax-check csrc/binding.cpp")
    cuda_inc = cuda_include()
    if cuda_inc is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found (set CUDA_HOME): cannot syntax-check binding.cpp")
    incs = include_paths()
    if not any((Path(p) / "c10" / "cuda" / "CUDAGuard.h").exists() for p in incs):
        pytest.skip("this torch install has no c10/cuda headers: cannot syntax-check binding.cpp")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    # compiled to an object file (not -fsyntax-only): GCC's flow warnings need the code generated; the two made
    # errors catch what a GPU run would meet as a hang or garbage (a wrapper that calls itself, a missing return)
    cmd = (["g++", "-std=c++17", "-c", "-O0", "-o", str(tmp_path / "binding.o"), "-Werror=infinite-recursion",
            "-Werror=return-type", "-DTORCH_EXTENSION_NAME=_C", f"-I{CSRC}", f"-I{tmp_path}",
            f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}"] + [f"-I{p}" for p in incs]
           + [str(CSRC / "binding.cpp")])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln]
    assert proc.returncode == 0, "binding.cpp does not compile:\n" + "\n".join(errors[:40] or [proc.stderr[-4000:]])

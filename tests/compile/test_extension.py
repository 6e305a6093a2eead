"""The extension loader (segnext_kernels/extension.py) without a GPU: importing builds nothing, asking for an extension
where it cannot run raises an error saying why and how to build it, a failed build is reported with its log and
remembered (not retried on every call), the CUDA arch list is filtered, and the sources ship inside the package.
Loading on a GPU: tests/msca/test_msca_cuda_gpu.py; the CPU extension's kernels: tests/msca/test_msca_cpu.py."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segnext_kernels import extension
from segnext_kernels.extension import CPU_EXTENSION, CUDA_EXTENSION, Extension

ROOT = Path(__file__).resolve().parents[2]


def test_import_builds_and_loads_nothing():
    code = ("import sys, segnext_kernels, segnext_kernels.msca.cuda, segnext_kernels.msca.cpu, "
            "segnext_kernels.nmf.cuda; from segnext_kernels import extension as e; "
            "assert e.CUDA_EXTENSION._ext is None and e.CPU_EXTENSION._ext is None; "
            "assert not [m for m in sys.modules if m.startswith('segnext_kernels._C')], sorted(sys.modules); "
            "assert 'torch.utils.cpp_extension' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_no_gpu_says_why_and_how_to_build():
    ok, why = CUDA_EXTENSION.status()
    assert not ok and ("CUDA support" in why or "no CUDA device" in why), why
    with pytest.raises(RuntimeError) as e:
        CUDA_EXTENSION.load()
    assert why in str(e.value) and CUDA_EXTENSION.build_hint in str(e.value)


def _fresh(ext: Extension, monkeypatch, tmp_path):
    """A copy of ``ext`` that has no prebuilt module and builds into tmp_path."""
    new = Extension(ext.module + "_absent", ext.jit_name, ext.sources, lambda: (True, ""), lambda: (True, ""),
                    ext.build_hint, ext.cuda)
    monkeypatch.setattr(extension, "_BUILD_DIR", str(tmp_path / "build"))
    return new


@pytest.mark.parametrize("which", ["cuda", "cpu"])
def test_failed_jit_build_reports_its_log_and_is_not_retried(monkeypatch, tmp_path, which):
    ext = _fresh(CUDA_EXTENSION if which == "cuda" else CPU_EXTENSION, monkeypatch, tmp_path)
    cpp_extension = importlib.import_module("torch.utils.cpp_extension")
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("c++: error: synthetic compile error")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(RuntimeError, match=f"building the extension {ext.module} failed") as e:
        ext.load()
    log = ext.build_dir() / "build_error.log"
    assert str(log) in str(e.value) and ext.build_hint in str(e.value)
    assert "synthetic compile error" in log.read_text()
    assert len(calls) == 1
    assert [Path(s).name for s in calls[0]["sources"]] == [Path(s).name for s in ext.sources]
    assert all(Path(s).exists() for s in calls[0]["sources"]), calls[0]["sources"]
    if which == "cpu":
        assert "-fopenmp" in calls[0]["extra_cflags"] and not any("march" in f for f in calls[0]["extra_cflags"])
    with pytest.raises(RuntimeError, match=f"building the extension {ext.module} failed"):
        ext.load()
    assert len(calls) == 1, "a failed build must not be retried in the same process"
    ok, why = ext.status()
    assert not ok and "build_error.log" in why


def test_missing_build_tools_are_named(monkeypatch):
    ext = Extension("segnext_kernels._absent", "x", ("cpu/binding.cpp",), lambda: (True, ""),
                    lambda: (False, "no C++ compiler (c++ / g++) was found to build it"), "hint", cuda=False)
    ok, why = ext.status()
    assert not ok and "is not built and no C++ compiler" in why
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler.*hint"):
        ext.load()


@pytest.mark.parametrize("value, built, dropped", [
    (None, "8.0;9.0", []),
    ("", "8.0;9.0", []),
    ("8.0;9.0", "8.0;9.0", []),
    ("7.5;8.0;9.0", "8.0;9.0", ["7.5"]),          # e.g. a container's default list: the build would fail on 7.5
    ("6.1 7.0 8.6+PTX 9.0a", "8.6+PTX;9.0a", ["6.1", "7.0"]),
    ("7.5", "8.0;9.0", ["7.5"]),                  # nothing left: the default
])
def test_arch_list_keeps_sm80_and_newer(value, built, dropped):
    from segnext_kernels._arch import supported_arch_list
    assert supported_arch_list(value) == (built, dropped)


def test_arch_list_rejects_names_it_cannot_read():
    from segnext_kernels._arch import supported_arch_list
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST.*'Ampere'"):
        supported_arch_list("8.0;Ampere")


def test_jit_build_filters_the_arch_list(monkeypatch, tmp_path):
    """The CUDA JIT build hands torch's loader the filtered list and restores the caller's variable afterwards."""
    ext = _fresh(CUDA_EXTENSION, monkeypatch, tmp_path)
    seen = {}

    def fake_load(**kw):
        seen["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        return object()

    monkeypatch.setattr(extension, "_ARCH_LIST", "7.5;9.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "caller's value")
    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    with pytest.warns(UserWarning, match="without 7.5"):
        ext.load()
    assert seen["arch"] == "9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "caller's value"


def test_package_ships_the_sources_and_not_the_tooling(tmp_path):
    """setup.py's build_py (what a wheel holds, without compiling): csrc inside the package, no bench / tests."""
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, SEGNEXT_KERNELS_NO_CPU_BUILD="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    from segnext_kernels._sources import CPU_SOURCES, CUDA_SOURCES
    csrc = tmp_path / "segnext_kernels" / "csrc"
    for s in CUDA_SOURCES + CPU_SOURCES:
        assert (csrc / s).exists(), s
    headers = {p.relative_to(ROOT / "csrc") for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh")}
    assert headers and all((csrc / h).exists() for h in headers), sorted(headers)
    assert not (tmp_path / "bench").exists() and not (tmp_path / "tests").exists()
    assert (tmp_path / "segnext" / "mscan.py").exists() and (tmp_path / "segnext_kernels" / "msca" / "cpu.py").exists()

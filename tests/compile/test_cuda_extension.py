"""The CUDA extension loader (segnext_kernels/cuda_extension.py) without a GPU: importing builds nothing, asking for
the extension where it cannot run raises an error saying why and how to build it, and a failed build is reported
with its log and remembered (not retried on every call). Loading on a GPU: tests/msca/test_msca_cuda_gpu.py."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segnext_kernels import cuda_extension


def test_import_builds_nothing_and_leaves_the_extension_unloaded():
    code = ("import sys, segnext_kernels, segnext_kernels.msca_cuda, segnext_kernels.nmf_cuda; "
            "from segnext_kernels import cuda_extension as ce; "
            "assert ce._ext is None and ce._load_error is None; "
            "assert 'segnext_kernels._C' not in sys.modules and 'torch.utils.cpp_extension' not in sys.modules, "
            "sorted(m for m in sys.modules if 'cpp_extension' in m or m.endswith('._C'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_no_gpu_says_why_and_how_to_build():
    ok, why = cuda_extension.cuda_status()
    assert not ok and ("CUDA support" in why or "no CUDA device" in why), why
    with pytest.raises(RuntimeError, match="backend='cuda' is not available") as e:
        cuda_extension.load_extension()
    assert why in str(e.value) and cuda_extension.BUILD_HINT in str(e.value)


def test_failed_jit_build_reports_its_log_and_is_not_retried(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_extension, "cuda_status", lambda: (True, ""))
    monkeypatch.setattr(cuda_extension, "_prebuilt_spec", lambda: None)
    monkeypatch.setattr(cuda_extension, "_nvcc_available", lambda: True)
    monkeypatch.setattr(cuda_extension, "_ext", None)
    monkeypatch.setattr(cuda_extension, "_load_error", None)
    monkeypatch.setenv("SEGNEXT_KERNELS_BUILD_DIR", str(tmp_path / "build"))
    cpp_extension = importlib.import_module("torch.utils.cpp_extension")
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("nvcc: error: msca_fwd.cu(1): synthetic compile error")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(RuntimeError, match="building the segnext_kernels CUDA extension failed") as e:
        cuda_extension.load_extension()
    log = tmp_path / "build" / "build_error.log"
    assert str(log) in str(e.value) and cuda_extension.BUILD_HINT in str(e.value)
    assert "synthetic compile error" in log.read_text()
    assert len(calls) == 1
    srcs = {s.rsplit("/", 1)[-1] for s in calls[0]["sources"]}
    assert {"msca_fwd.cu", "msca_bwd.cu", "nmf_fwd.cu", "nmf_bwd.cu", "binding.cpp"} == srcs
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: building the segnext_kernels"):
        cuda_extension.load_extension()
    assert len(calls) == 1, "a failed build must not be retried in the same process"


def test_backends_share_the_one_loader():
    from segnext_kernels import msca_cuda

    assert msca_cuda.load_extension is cuda_extension.load_extension
    assert msca_cuda.cuda_status is cuda_extension.cuda_status


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


def test_setup_and_jit_build_filter_the_arch_list(monkeypatch, tmp_path):
    """The JIT build hands torch's loader the filtered list and restores the caller's variable afterwards."""
    from segnext_kernels import cuda_extension
    seen = {}

    def fake_load(**kw):
        seen["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        return object()

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;9.0")
    monkeypatch.setenv("SEGNEXT_KERNELS_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    with pytest.warns(UserWarning, match="without 7.5"):
        cuda_extension._jit_build()
    assert seen["arch"] == "9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5;9.0"
    src = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert "supported_arch_list(os.environ.get(\"TORCH_CUDA_ARCH_LIST\"))" in src

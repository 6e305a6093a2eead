"""The CUDA extension loader (segnext_kernels/cuda_extension.py) without a GPU: importing builds nothing, asking for
the extension where it cannot run raises an error saying why and how to build it, and a failed build is reported
with its log and remembered (not retried on every call). Loading on a GPU: tests/test_msca_cuda.py."""
import importlib
import subprocess
import sys

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

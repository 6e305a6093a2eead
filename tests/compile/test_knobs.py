"""segnext_kernels.knobs: each environment variable parses into its field, bad values are errors naming the variable,
and ``KNOBS`` is read once (an environment changed after import changes nothing)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from segnext_kernels import knobs


def test_defaults():
    k = knobs.Knobs.from_env({})
    assert k == knobs.Knobs()
    assert (k.msca_cuda_tile, k.msca_cuda_tile_bwd, k.msca_cuda_dw, k.msca_cuda_cl_direct, k.msca_cuda_poison,
            k.nmf_cuda_p, k.nmf_cuda_mtw) == (-1, -1, "auto", False, False, 0, 0)
    assert (k.msca_cpu_fwd_plan, k.mlp_cpu_plan, k.mlp_cpu_bwd_plan) == ("", "", "")
    assert k.cpu_output_cache_mib == 512
    assert knobs.Knobs.from_env({"SEGNEXT_MSCA_CUDA_TILE": "", "SEGNEXT_MSCA_CUDA_POISON": " "}) == knobs.Knobs()


@pytest.mark.parametrize("var, value, field, expected", [
    ("SEGNEXT_MSCA_CUDA_TILE", "3", "msca_cuda_tile", 3),
    ("SEGNEXT_MSCA_CUDA_TILE_BWD", "0", "msca_cuda_tile_bwd", 0),
    ("SEGNEXT_MSCA_CUDA_DW", "fma", "msca_cuda_dw", "fma"),
    ("SEGNEXT_MSCA_CUDA_DW", "wgmma", "msca_cuda_dw", "wgmma"),  # kept: the cuda backend rejects it when called
    ("SEGNEXT_MSCA_CUDA_CL_DIRECT", "1", "msca_cuda_cl_direct", True),
    ("SEGNEXT_MSCA_CUDA_CL_DIRECT", "0", "msca_cuda_cl_direct", False),
    ("SEGNEXT_MSCA_CUDA_POISON", "1", "msca_cuda_poison", True),
    ("SEGNEXT_MSCA_CUDA_POISON", "True", "msca_cuda_poison", True),
    ("SEGNEXT_NMF_P", "3", "nmf_cuda_p", 3),
    ("SEGNEXT_NMF_MTW", "1", "nmf_cuda_mtw", 1),
    ("SEGNEXT_MSCA_FWD_PLAN", "some-plan", "msca_cpu_fwd_plan", "some-plan"),
    ("SEGNEXT_MLP_PLAN", "some-plan", "mlp_cpu_plan", "some-plan"),
    ("SEGNEXT_MLP_BWD_PLAN", "some-plan", "mlp_cpu_bwd_plan", "some-plan"),
    ("SEGNEXT_CPU_OUTPUT_CACHE_MIB", "0", "cpu_output_cache_mib", 0),
    ("SEGNEXT_CPU_OUTPUT_CACHE_MIB", "64", "cpu_output_cache_mib", 64),
])
def test_each_variable_parses(var, value, field, expected):
    k = knobs.Knobs.from_env({var: value})
    assert getattr(k, field) == expected
    assert dataclasses.replace(k, **{field: getattr(knobs.Knobs(), field)}) == knobs.Knobs(), "another field changed"


@pytest.mark.parametrize("var, value", [("SEGNEXT_MSCA_CUDA_TILE", "big"), ("SEGNEXT_NMF_P", "-2"),
                                        ("SEGNEXT_NMF_MTW", "3"), ("SEGNEXT_MSCA_CUDA_POISON", "maybe"),
                                        ("SEGNEXT_CPU_OUTPUT_CACHE_MIB", "-1"),
                                        ("SEGNEXT_CPU_OUTPUT_CACHE_MIB", "lots")])
def test_bad_values_name_the_variable(var, value):
    with pytest.raises(ValueError, match=var):
        knobs.Knobs.from_env({var: value})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        knobs.KNOBS.msca_cuda_dw = "fma"


def test_read_once_at_import(monkeypatch):
    """KNOBS is the environment at import; a later change of the environment leaves it as it was."""
    before = knobs.KNOBS
    monkeypatch.setenv("SEGNEXT_MSCA_CUDA_DW", "fma" if before.msca_cuda_dw != "fma" else "tc")
    monkeypatch.setenv("SEGNEXT_NMF_P", str(before.nmf_cuda_p + 1))
    import segnext_kernels  # noqa: F401  (already imported: nothing is re-read)
    from segnext_kernels.msca import cuda  # noqa: F401  (nor by importing a backend)

    assert knobs.KNOBS is before
    assert knobs.KNOBS != knobs.Knobs.from_env(os.environ)  # what a per-call read would have seen


def test_import_reads_the_environment():
    """A fresh process that imports the package with the variables set has them in KNOBS."""
    env = dict(os.environ, SEGNEXT_MSCA_CUDA_DW="fma", SEGNEXT_MSCA_CUDA_TILE="2", SEGNEXT_NMF_MTW="1")
    code = ("import segnext_kernels as sk; k = sk.knobs.KNOBS; "
            "print(k.msca_cuda_dw, k.msca_cuda_tile, k.nmf_cuda_mtw)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["fma", "2", "1"]

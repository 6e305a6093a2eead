"""The hand-written CUDA NMF2D backend (csrc/nmf_*.cu, segnext_kernels/nmf_cuda.py) on a GPU.

Compared with the float64 eager reference (``nmf2d_reference``) under the rule of tests/helpers/nmf_helpers.py (kernel
error <= ERR_FACTOR x eager error in the same dtype + atol x scale), forward and both gradient modes, and with the
Triton backend. Every buffer the driver hands to the CUDA kernels is poisoned with NaN (``nmf_cuda._empty``), so an
unwritten element fails. Skipped only where there is no CUDA device; a failing build fails the tests.
The CPU emulation of the same kernels is tests/nmf/test_nmf_cuda_emu.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels.nmf import cuda as nmf_cuda
from segnext_kernels.nmf import nmf2d

from nmf_helpers import check, make, max_err, opcheck_nmf_ops, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["unrolled", "one_step"]
#: fp32 without TF32 must be about as accurate as eager fp32 (products on split-TF32 or FMA); with TF32 allowed the
#: bound is TOL_TF32 x scale alone
ATOL_FP32 = 1e-5
TOL_TF32 = 5e-3


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    def empty(*shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(nmf_cuda, "_empty", empty)


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _atol(dtype):
    return ATOL_FP32 if dtype == torch.float32 else None


def test_extension_has_nmf_launchers():
    ext = nmf_cuda._ext()
    for name in ("nmf_geom", "nmf_bases", "nmf_coef", "nmf_bwd_stage", "nmf_gx"):
        assert hasattr(ext, name), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 37, 53, 5), (1, 70, 300, 16), (2, 96, 1000, 64), (3, 19, 7, 1)])
def test_against_reference(shape, mode, dtype):
    B, D, N, R = shape
    x, bases = make(B, D, N, R)
    x, bases = x.to(DEV), bases.to(DEV)
    gy = torch.randn(B, D, N, dtype=torch.float64, device=DEV)
    y, gx, _ = check(x, bases, 3, mode, dtype, gy, backend="cuda", atol=_atol(dtype))
    assert y.dtype == dtype and gx.dtype == dtype


@pytest.mark.parametrize("steps", [0, 1, 7])
def test_steps(steps):
    x, bases = make(2, 64, 200, 16)
    x, bases = x.to(DEV), bases.to(DEV)
    gy = torch.randn(2, 64, 200, dtype=torch.float64, device=DEV)
    for mode in MODES:
        check(x, bases, steps, mode, torch.float32, gy, backend="cuda", atol=ATOL_FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 256, 4096, 16), (1, 512, 8192, 64)])
def test_decoder_shapes_forward(shape, dtype):
    # SegNeXt-T-like (D = 256, R = 16) and SegNeXt-B-like (D = 512, R = 64) decoder slices, 7 eval steps
    B, D, N, R = shape
    x, bases = make(B, D, N, R)
    x, bases = x.to(DEV), bases.to(DEV)
    check(x, bases, 7, "unrolled", dtype, None, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_triton(dtype):
    x, bases = make(2, 128, 777, 16)
    x, bases = x.to(DEV).to(dtype), bases.to(DEV).float()
    gy = torch.randn(2, 128, 777, device=DEV, dtype=dtype)
    yc, gxc, gbc = run(x, bases, 3, "unrolled", "cuda", gy)
    yt, gxt, gbt = run(x, bases, 3, "unrolled", "triton", gy)
    ref = run(x.double(), bases.double(), 3, "unrolled", "reference", gy.double())
    for name, c, t, r in zip(("recon", "grad x", "grad bases"), (yc, gxc, gbc), (yt, gxt, gbt), ref):
        scale = max(r.abs().max().item(), 1e-30)
        # both backends within a few of their dtype's ulps of the fp64 oracle, so within that of each other
        tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype] * scale
        assert max_err(c, t) <= tol, f"{name}: cuda vs triton {max_err(c, t):.3e} > {tol:.3e}"


def test_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True
    x, bases = make(2, 128, 500, 16)
    x, bases = x.to(DEV), bases.to(DEV)
    gy = torch.randn(2, 128, 500, dtype=torch.float64, device=DEV)
    got = run(x, bases, 3, "unrolled", "cuda", gy, torch.float32)
    ref = run(x, bases, 3, "unrolled", "reference", gy, torch.float64)
    for name, g, r in zip(("recon", "grad x", "grad bases"), got, ref):
        scale = max(r.abs().max().item(), 1e-30)
        assert max_err(g, r) <= TOL_TF32 * scale, f"{name}: {max_err(g, r):.3e} (tf32)"


def test_noncontiguous_x_and_strided_grad():
    base = torch.rand(2, 300, 48, device=DEV)
    x = base.transpose(1, 2)                                   # (2, 48, 300), stride 1 along D
    bases = torch.nn.functional.normalize(torch.rand(2, 48, 16, device=DEV), dim=1)
    gy = torch.randn(1, 48, 1, device=DEV).expand(2, 48, 300)   # zero strides
    got = run(x, bases, 3, "unrolled", "cuda", gy)
    ref = run(x.double(), bases.double(), 3, "unrolled", "reference", gy.double())
    for name, g, r in zip(("recon", "grad x", "grad bases"), got, ref):
        scale = max(r.abs().max().item(), 1e-30)
        assert max_err(g, r) <= 1e-4 * scale, name


def test_zero_rows_and_columns_stay_finite():
    x, bases = make(2, 40, 90, 8, dtype=torch.float32)
    x, bases = x.to(DEV), bases.to(DEV)
    x[:, 3] = 0
    x[:, :, 10:20] = 0
    gy = torch.randn_like(x)
    for mode in MODES:
        y, gx, _ = run(x, bases, 4, mode, "cuda", gy)
        assert torch.isfinite(y).all() and torch.isfinite(gx).all(), mode


def test_deterministic_bits():
    x, bases = make(2, 96, 1000, 64, dtype=torch.bfloat16)
    x, bases = x.to(DEV), bases.to(DEV)
    gy = torch.randn_like(x)
    a = run(x, bases, 3, "unrolled", "cuda", gy)
    b = run(x, bases, 3, "unrolled", "cuda", gy)
    for name, u, v in zip(("recon", "grad x", "grad bases"), a, b):
        assert torch.equal(u, v), name


def test_return_state():
    x, bases = make(2, 48, 120, 6, dtype=torch.float32)
    x, bases = x.to(DEV), bases.to(DEV)
    y, bk, cf = nmf2d(x, bases, 3, return_state=True, backend="cuda")
    yr, bkr, cfr = nmf2d_reference(x.double(), bases.double(), 3, return_state=True)
    for name, g, r in (("recon", y, yr), ("bases", bk, bkr), ("coef", cf, cfr)):
        scale = max(r.abs().max().item(), 1e-30)
        assert max_err(g, r) <= 1e-4 * scale, name


def test_float64_is_refused():
    x, bases = make(1, 8, 10, 2)
    with pytest.raises(TypeError, match=r"backend=.cuda.: the cuda nmf2d kernels take float32, float16, bfloat16"):
        nmf2d(x.to(DEV), bases.to(DEV), 1, backend="cuda")


def test_opcheck_cuda_backend():
    x, b = make(1, 16, 40, 3, dtype=torch.float32)
    opcheck_nmf_ops(x.to(DEV), b.to(DEV), "cuda", MODES)


def test_cuda_graph_capture():
    x, bases = make(2, 64, 300, 16, dtype=torch.bfloat16)
    x, bases = x.to(DEV), bases.to(DEV).float()
    nmf2d(x, bases, 3, backend="cuda")  # warm-up (loads the extension) outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        nmf2d(x, bases, 3, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = nmf2d(x, bases, 3, backend="cuda")
    x.copy_(torch.rand_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, nmf2d(x, bases, 3, backend="cuda"))

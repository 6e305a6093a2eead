"""Triton NMF2D kernels (forward, "unrolled" and "one_step" backward) against the eager oracle
``segnext.ham_head.nmf2d_reference``.

On a machine without CUDA these run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1).
Tolerance rule (docs/kernels.md, "Correctness protocol"): the kernel's max error against a float64 reference is at most
``ERR_FACTOR`` x the error of the eager reference run in the same dtype, plus ``ATOL[dtype]`` x the reference's
max magnitude. float64 runs are compared tightly.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import segnext_kernels.nmf as nmf_mod
from segnext_kernels.backends import resolve
from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels.nmf import triton as nmf_triton
from segnext_kernels.nmf import nmf2d

from nmf_helpers import DEVICE, check, make, max_err, run

MODES = ["unrolled", "one_step"]
#: several N-tiles, D-chunks and persistent programs (P < tiles) for small shapes
SMALL_BLOCKS = dict(BN=16, BD=16, P=2)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the Triton launchers allocate (outputs, histories, partials) starts as NaN."""
    def empty(*shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(nmf_triton, "_empty", empty)


@pytest.fixture
def blocks(monkeypatch):
    """Set nmf_triton.BLOCK_OVERRIDES for one test."""
    def set_blocks(**over):
        monkeypatch.setattr(nmf_triton, "BLOCK_OVERRIDES", dict(over))
    return set_blocks


# ------------------------------------------------------------------------------------------------ float64, exact
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_fp64_multi_tile(mode, steps, poison, blocks):
    # D = 37, N = 53 not multiples of the 16-wide blocks; P = 2 persistent programs over 4 N-tiles per sample
    blocks(**SMALL_BLOCKS)
    x, bases = make(2, 37, 53, 5)
    gy = torch.randn(2, 37, 53, dtype=torch.float64, device=DEVICE)
    check(x, bases, steps, mode, torch.float64, gy)


@pytest.mark.parametrize("R", [1, 16, 64])
def test_fp64_ranks(R, poison):
    # default (interpreter) blocks: D = 19, N = 45 are masked inside one 32 x 64 block; R pads to >= 16
    x, bases = make(2, 19, 45, R)
    gy = torch.randn(2, 19, 45, dtype=torch.float64, device=DEVICE)
    for mode in MODES:
        check(x, bases, 2, mode, torch.float64, gy)


def test_fp64_inv_t_eps(poison, blocks):
    blocks(BN=32, BD=16, P=1)
    x, bases = make(1, 20, 70, 6)
    gy = torch.randn(1, 20, 70, dtype=torch.float64, device=DEVICE)
    for mode in MODES:
        check(x, bases, 2, mode, torch.float64, gy, inv_t=2.5, eps=1e-3)


@pytest.mark.parametrize("bn", ["BN", "BN_BWD"])
def test_gpu_geometry_under_interpreter(bn, poison, blocks):
    # the GPU block geometry (forward N-tile, then the backward one) with D, N not multiples of it and 2
    # persistent programs per sample
    geo = dict(nmf_triton.GPU_BLOCKS)
    geo["BN"] = geo[bn]
    blocks(**geo, P=2)
    x, bases = make(1, 70, 300, 16)
    gy = torch.randn(1, 70, 300, dtype=torch.float64, device=DEVICE)
    check(x, bases, 2, "unrolled", torch.float64, gy)


# ----------------------------------------------------------------------------------------- low precision, the rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_dtypes_rule(dtype, mode, poison, blocks):
    blocks(BN=32, BD=16, P=2)
    x, bases = make(2, 24, 70, 8, dtype=torch.float64)
    gy = torch.randn(2, 24, 70, dtype=torch.float64, device=DEVICE)
    y, gx, _ = check(x, bases, 3, mode, dtype, gy)
    assert y.dtype == dtype and gx.dtype == dtype


def test_fp32_official_steps_r16(poison):
    # SegNeXt-T-like head slice: R = 16, 7 eval steps, D = 64, N = 96
    x, bases = make(1, 64, 96, 16, dtype=torch.float64)
    gy = torch.randn(1, 64, 96, dtype=torch.float64, device=DEVICE)
    check(x, bases, 7, "unrolled", torch.float32, gy)


# ------------------------------------------------------------------------------------------------------ gradcheck
def test_gradcheck_unrolled_fp64():
    # every output of return_state: recon, final bases, final coef
    x, bases = make(1, 5, 7, 3)
    x.requires_grad_(True)
    bases.requires_grad_(True)

    def f(x, b):
        return nmf2d(x, b, 2, grad_mode="unrolled", return_state=True, backend="triton")

    assert torch.autograd.gradcheck(f, (x, bases), fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_one_step_fp64():
    # The one-step gradient is the exact gradient only where the frozen part does not depend on the inputs:
    # steps = 0 and inv_t = 0 (softmax init = 1/R whatever x) -- then gradcheck applies to the final coef update
    # and reconstruction, which is what the one_step backward differentiates for any steps (and steps > 0 is
    # compared with the reference's one_step gradient above).
    x, bases = make(1, 5, 7, 3)
    x.requires_grad_(True)
    bases.requires_grad_(True)

    def f(x, b):
        return nmf2d(x, b, 0, grad_mode="one_step", inv_t=0.0, return_state=True, backend="triton")

    assert torch.autograd.gradcheck(f, (x, bases), fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_one_step_is_not_the_unrolled_gradient():
    x, bases = make(1, 6, 9, 3)
    gy = torch.randn(1, 6, 9, dtype=torch.float64, device=DEVICE)
    _, gx1, gb1 = run(x, bases, 2, "one_step", "triton", gy)
    _, gx2, gb2 = run(x, bases, 2, "unrolled", "triton", gy)
    assert gb1 is None and gb2 is not None
    assert max_err(gx1, gx2) > 1e-6


# --------------------------------------------------------------------------------------------- state and outputs
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps", [0, 2])
def test_return_state_and_its_gradients(mode, steps, poison, blocks):
    blocks(**SMALL_BLOCKS)
    x, bases = make(2, 21, 40, 4)
    gy = torch.randn(2, 21, 40, dtype=torch.float64, device=DEVICE)
    gb_out = torch.randn(2, 21, 4, dtype=torch.float64, device=DEVICE)
    gc_out = torch.randn(2, 40, 4, dtype=torch.float64, device=DEVICE)
    res = {}
    for backend in ("triton", "reference"):
        xx = x.clone().requires_grad_(True)
        bb = bases.clone().requires_grad_(True)
        fn = nmf2d_reference if backend == "reference" else nmf_mod.nmf2d
        kw = {} if backend == "reference" else dict(backend="triton")
        y, b_fin, c_fin = fn(xx, bb, steps, grad_mode=mode, return_state=True, **kw)
        assert b_fin.shape == (2, 21, 4) and c_fin.shape == (2, 40, 4)
        loss = (y * gy).sum() + (c_fin * gc_out).sum()
        if b_fin.requires_grad:
            loss = loss + (b_fin * gb_out).sum()
        grads = torch.autograd.grad(loss, [xx, bb], allow_unused=True)
        res[backend] = (y, b_fin, c_fin, b_fin.requires_grad) + tuple(grads)
    got, ref = res["triton"], res["reference"]
    assert got[3] == ref[3]  # final bases differentiable exactly when the reference's are
    for name, g, r in zip(("recon", "bases", "coef", "", "grad x", "grad bases"), got, ref):
        if name == "":
            continue
        if r is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g.detach(), r.detach(), rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_only_coef_output_used():
    # backward with no gradient on the reconstruction (grad_y None) and none on the final bases
    x, bases = make(1, 9, 20, 3)
    gc = torch.randn(1, 20, 3, dtype=torch.float64, device=DEVICE)
    out = []
    for backend in ("triton", "reference"):
        xx = x.clone().requires_grad_(True)
        bb = bases.clone().requires_grad_(True)
        _, _, c = nmf2d(xx, bb, 2, return_state=True, backend=backend)
        out.append(torch.autograd.grad((c * gc).sum(), [xx, bb]))
    for g, r in zip(*out):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["x", "bases"])
def test_partial_requires_grad(which):
    x, bases = make(1, 10, 30, 4)
    gy = torch.randn(1, 10, 30, dtype=torch.float64, device=DEVICE)
    res = []
    for backend in ("triton", "reference"):
        xx = x.clone().requires_grad_(which == "x")
        bb = bases.clone().requires_grad_(which == "bases")
        y = nmf2d(xx, bb, 2, backend=backend)
        res.append(torch.autograd.grad(y, [xx if which == "x" else bb], gy)[0])
    torch.testing.assert_close(res[0], res[1], rtol=1e-10, atol=1e-12)


def test_no_grad_forward_matches(poison):
    x, bases = make(2, 12, 33, 4)
    with torch.no_grad():
        y = nmf2d(x.requires_grad_(True), bases, 3, backend="triton")
    assert not y.requires_grad
    torch.testing.assert_close(y, nmf2d_reference(x.detach(), bases, 3), rtol=1e-10, atol=1e-12)


class _CountLaunches:
    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


@pytest.mark.parametrize("mode", MODES)
def test_passes_over_x(mode, monkeypatch):
    # the design's read count: K + 1 kernels stream x in the forward (K coef passes that also accumulate the
    # bases-update products, then the final coef update fused with the reconstruction), the rest only touches
    # (D, R) / (R, R) tensors; the backward streams x once per differentiated stage and writes g_x once.
    counts = {k: _CountLaunches(getattr(nmf_triton, k)) for k in
              ("_nmf_coef_kernel", "_nmf_bases_kernel", "_nmf_bwd_kernel", "_nmf_gx_kernel")}
    for k, c in counts.items():
        monkeypatch.setattr(nmf_triton, k, c)
    K = 3
    x, bases = make(1, 9, 20, 3)
    run(x, bases, K, mode, "triton", torch.randn(1, 9, 20, dtype=torch.float64, device=DEVICE))
    n = {k[5:-7]: c.n for k, c in counts.items()}
    assert n == dict(coef=K + 1, bases=K + 1, bwd=K + 1 if mode == "unrolled" else 1, gx=1), n


# ------------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("mode", MODES)
def test_zero_rows_and_columns_stay_finite(mode, poison, blocks):
    blocks(**SMALL_BLOCKS)
    x, bases = make(2, 20, 35, 4, dtype=torch.float32)
    x[0, :, 3] = 0          # all-zero columns
    x[0, :, 17:20] = 0
    x[0, 5] = 0             # all-zero rows
    x[1, 11:13] = 0
    gy = torch.randn(2, 20, 35, device=DEVICE)
    y, gx, gb = check(x, bases, 3, mode, torch.float32, gy)
    assert torch.count_nonzero(y[0, :, 3]) == 0  # a zero column reconstructs to zero
    # an all-zero sample: bases and coef collapse to zero, denominators stay eps
    xz = torch.zeros(1, 8, 12, device=DEVICE)
    bz = F.normalize(torch.rand(1, 8, 3, device=DEVICE), dim=1)
    gz = torch.randn(1, 8, 12, device=DEVICE)
    y, gx, gb = run(xz, bz, 2, mode, "triton", gz)
    ry, rgx, rgb = run(xz, bz, 2, mode, "reference", gz)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert gb is None or torch.isfinite(gb).all()
    assert torch.count_nonzero(y) == 0 and torch.count_nonzero(ry) == 0
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_steps_zero(mode, poison):
    x, bases = make(2, 11, 26, 5)
    gy = torch.randn(2, 11, 26, dtype=torch.float64, device=DEVICE)
    check(x, bases, 0, mode, torch.float64, gy)


@pytest.mark.parametrize("shape", [(0, 6, 10, 3), (2, 6, 0, 3)])
def test_empty_inputs(shape):
    B, D, N, R = shape
    x, bases = make(B, D, N, R, dtype=torch.float32)
    xx = x.requires_grad_(True)
    bb = bases.requires_grad_(True)
    y = nmf2d(xx, bb, 2, backend="triton")
    assert y.shape == (B, D, N) and y.dtype == torch.float32
    gx, gb = torch.autograd.grad(y.sum() + 0 * bb.sum(), [xx, bb])
    assert gx.shape == xx.shape and gb.shape == bb.shape


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_noncontiguous_x_and_strided_grad(layout, poison, blocks):
    blocks(BN=32, BD=16, P=2)
    if layout == "sliced":   # gaps and offsets in D and N
        x = torch.rand(2, 50, 2 * 37 + 3, dtype=torch.float64, device=DEVICE)[:, 3:40, 1:75:2]
        gy = torch.randn((), dtype=torch.float64, device=DEVICE).expand(2, 37, 37)  # what .sum() gives: stride 0
    else:                    # N-major (a transposed view)
        x = torch.rand(2, 37, 37, dtype=torch.float64, device=DEVICE).transpose(1, 2)
        gy = torch.randn(2, 37, 75, dtype=torch.float64, device=DEVICE)[:, :, 1::2]  # a strided slice
    assert not x.is_contiguous() and not gy.is_contiguous()
    _, bases = make(2, 37, 1, 4)
    for mode in MODES:
        check(x, bases, 2, mode, torch.float64, gy)


def test_deterministic_bits(blocks):
    blocks(**SMALL_BLOCKS)
    x, bases = make(2, 30, 50, 6, dtype=torch.float32)
    gy = torch.randn(2, 30, 50, device=DEVICE)
    a = run(x, bases, 3, "unrolled", "triton", gy)
    b = run(x, bases, 3, "unrolled", "triton", gy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_output_rounds_to_nearest(dtype, poison):
    # the updates run in fp32 whatever x's dtype: a half x gives exactly the fp32 result of its upcast, rounded
    # to nearest (under the interpreter too, where a plain fp32 -> bf16 cast would truncate)
    x, bases = make(2, 20, 50, 4, dtype=dtype)
    gy = torch.randn(2, 20, 50, device=DEVICE).to(dtype)
    y, gx, _ = run(x, bases, 2, "unrolled", "triton", gy)
    y32, gx32, _ = run(x.float(), bases, 2, "unrolled", "triton", gy.float())
    assert torch.equal(y, y32.to(dtype))
    assert torch.equal(gx, gx32.to(dtype))


def test_bases_dtype_and_half_input(poison):
    # NMF2D hands float32 bases to a half-precision x; bases in x's own dtype are accepted too
    x, bases = make(1, 16, 40, 4, dtype=torch.float16)
    y1 = nmf2d(x, bases.float(), 2, backend="triton")
    y2 = nmf2d(x, bases.half(), 2, backend="triton")
    assert y1.dtype == y2.dtype == torch.float16
    torch.testing.assert_close(y1, nmf2d_reference(x, bases.float(), 2), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(y2, nmf2d_reference(x, bases.half(), 2), rtol=2e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------------ backends
def test_backend_selection():
    x, bases = make(1, 6, 10, 2, dtype=torch.float32)
    if DEVICE.type == "cpu":
        with pytest.raises(RuntimeError, match="backend='cuda' is not available: the CUDA backend needs CUDA tensors"):
            nmf2d(x, bases, 1, backend="cuda")
    else:
        with pytest.raises(TypeError, match=r"backend='cuda': the cuda nmf2d kernels take float32, float16, bfloat16, got float64"):
            nmf2d(x.double(), bases.double(), 1, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        nmf2d(x, bases, 1, backend="cudnn")
    if DEVICE.type == "cpu":  # "auto" on CPU tensors: the C++ kernels (tests/nmf/test_nmf_cpu.py), never Triton
        assert resolve("nmf2d", "auto", DEVICE, torch.float32) == "cpu"
        assert torch.equal(nmf2d(x, bases, 2, backend="reference"), nmf2d_reference(x, bases, 2))
    else:
        assert resolve("nmf2d", "auto", DEVICE, torch.float32) == "triton"
    assert resolve("nmf2d", "reference", DEVICE, torch.float32) == "reference"


# bad input (argument checks of nmf2d and FusedNMF2D): tests/nmf/test_nmf_bad_input.py

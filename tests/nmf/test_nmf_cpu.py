"""The "cpu" NMF2D (csrc/cpu/nmf_cpu.cpp, segnext_kernels/nmf/cpu.py; forward only) against the float64 reference:
SegNeXt shapes, odd sizes and tile borders, steps 0..7, layouts, dtypes, B = 0, NaN-poisoned outputs, NaN
propagation, threads, autocast, torch integration, the reference for gradients and bad input.

Tolerance (tests/helpers/nmf_helpers.py): error <= 2 x eager's error in the same dtype + atol x the reference's
magnitude against float64, atol 1e-5 for float32 (the brgemm tiles sum in another order than MKL's batched GEMM;
as the autocast checks' float32 bound).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segnext_kernels import backends, nmf2d
from segnext_kernels.nmf.reference import nmf2d_reference

import nmf_helpers
from autocast_checks import check_autocast_nmf2d_updates_stay_fp32
from cpu_ext_helpers import check_opcheck_and_compile, ext, poison  # noqa: F401  (the extension; NaN-poisoned outputs)

ATOL32 = 1e-5


def make(B, D, N, R, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(B, D, N, generator=g, dtype=torch.float64))  # half zeros, as after ham_in's ReLU
    bases = F.normalize(torch.rand(B, D, R, generator=g, dtype=torch.float64), dim=1)
    return x.to(dtype), bases.float()


def check(x, bases, steps, inv_t=1.0, atol=ATOL32):
    with torch.no_grad():
        got = nmf2d(x, bases, steps, inv_t=inv_t, return_state=True, backend="cpu")
    ref = nmf2d_reference(x.double(), bases.double(), steps, inv_t=inv_t, return_state=True)
    eager = nmf2d_reference(x, bases, steps, inv_t=inv_t, return_state=True)
    for name, g, r, e in zip(("recon", "bases", "coef"), got, ref, eager):
        assert g.shape == r.shape, name
        nmf_helpers.assert_rule(f"cpu {name}", g, r, e, x.dtype if name == "recon" else torch.float32,
                                atol=atol if x.dtype == torch.float32 or name != "recon" else None)
    return got


@pytest.mark.parametrize("shape", [(1, 256, 4096, 16), (1, 512, 1024, 64), (1, 1, 1, 1), (2, 37, 301, 5),
                                   (3, 7, 257, 3), (1, 600, 515, 16), (1, 2100, 70, 9), (2, 16, 16, 33)], ids=str)
def test_shapes_against_float64(shape):
    """SegNeXt-T / -B ham shapes (D 256 / 512, R 16 / 64), one pixel, tile borders (N = 257, 515: a last tile of
    1 and 3 pixels), D large enough to shrink the tile (2100), R above D and N."""
    x, bases = make(*shape)
    check(x, bases, 3)


@pytest.mark.parametrize("steps", [0, 1, 2, 7])
def test_steps(steps):
    x, bases = make(2, 40, 530, 8, seed=steps)
    check(x, bases, steps)


def test_inv_t_of_the_mmseg_config():
    """mmseg's configs pass inv_t = 100 (a sharp softmax init)."""
    x, bases = make(1, 64, 333, 16, seed=3)
    check(x, bases, 2, inv_t=100.0)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_x(layout):
    x, bases = make(2, 24, 300, 6, seed=4)
    if layout == "transposed":
        xin = x.transpose(1, 2).contiguous().transpose(1, 2)  # pixel stride D
    else:
        xin = torch.cat([x, x], 2)[:, :, ::2].clone()
        xin = torch.stack([xin, xin], 3)[..., 0]  # pixel stride 2
    assert not xin.is_contiguous()
    got = check(xin, bases, 2)
    assert got[0].is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """Half x: updates in float32, the reconstruction rounded to x's dtype (as the reference)."""
    x, bases = make(2, 32, 200, 8, seed=5, dtype=dtype)
    y, bk, cf = check(x, bases, 2)
    assert y.dtype == dtype and bk.dtype == cf.dtype == torch.float32


def test_autocast_leaves_the_updates_in_float32():
    check_autocast_nmf2d_updates_stay_fp32("cpu", torch.bfloat16, torch.device("cpu"))


def test_batch_zero_and_return_state_shapes():
    x, bases = make(0, 5, 7, 3)
    assert nmf2d(x, bases, 2, backend="cpu").shape == (0, 5, 7)
    x, bases = make(2, 5, 7, 3)
    with torch.no_grad():
        y, bk, cf = nmf2d(x, bases, 2, backend="cpu", return_state=True)
    assert y.shape == (2, 5, 7) and bk.shape == (2, 5, 3) and cf.shape == (2, 7, 3)


def test_nan_propagates_as_eager():
    x, bases = make(1, 6, 40, 4, seed=6)
    x[0, 2, 17] = float("nan")
    with torch.no_grad():
        got = nmf2d(x, bases, 2, backend="cpu")
    ref = nmf2d_reference(x, bases, 2)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))


def test_one_and_two_threads_bitwise_equal():
    x, bases = make(2, 96, 2000, 16, seed=7)
    try:
        torch.set_num_threads(1)
        one = nmf2d(x, bases, 3, backend="cpu", return_state=True)
        torch.set_num_threads(2)
        two = nmf2d(x, bases, 3, backend="cpu", return_state=True)
    finally:
        torch.set_num_threads(2)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_gradient_needed_runs_the_reference():
    """Forward-only kernels: with a gradient needed the eager reference runs, with its gradients."""
    x, bases = make(1, 8, 30, 4, seed=8)
    x.requires_grad_()
    y = nmf2d(x, bases, 2, backend="cpu")
    assert y.grad_fn is not None
    (gx,) = torch.autograd.grad(y.square().sum(), [x])
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(nmf2d_reference(xr, bases, 2).square().sum(), [xr])
    torch.testing.assert_close(gx, gr, rtol=0, atol=0)


def test_auto_picks_cpu_and_float64_runs_the_reference():
    assert backends.resolve("nmf2d", "auto", torch.device("cpu"), torch.float32) == "cpu"
    assert backends.resolve("nmf2d", "auto", torch.device("cpu"), torch.float64) == "reference"
    x, bases = make(1, 8, 30, 4)
    with pytest.raises(TypeError, match="cpu nmf2d kernels take float32, bfloat16, float16, got float64"):
        nmf2d(x.double(), bases.double(), 2, backend="cpu")


def test_opcheck_and_compile_fullgraph():
    x, bases = make(1, 9, 50, 4, seed=9)
    fn = lambda x: nmf2d(x, bases, 2, backend="cpu")  # noqa: E731
    args = (x, bases, 2, 1e-6, 1.0, "none", True, "cpu")
    check_opcheck_and_compile(torch.ops.segnext_kernels.nmf2d_fwd.default, args, fn, x)


def test_bad_input(ext):
    x, bases = make(1, 8, 30, 4)
    with pytest.raises(ValueError, match=r"bases: expected a 3-D tensor of shape \(1, 8, R\)"):
        nmf2d(x, bases[:, :5], 2, backend="cpu")
    with pytest.raises(ValueError, match="save: the cpu NMF2D kernels are forward only"):
        torch.ops.segnext_kernels.nmf2d_fwd(x, bases, 2, 1e-6, 1.0, "unrolled", False, "cpu")
    with pytest.raises(RuntimeError, match=r"nmf_forward: bases0 must be a float32 CPU tensor of shape \(1, 8, R\)"):
        ext.nmf_forward(x, bases[:, :3].contiguous(), 2, 1e-6, 1.0, False)
    with pytest.raises(RuntimeError, match="nmf_forward: x must be a 3-D"):
        ext.nmf_forward(x[0], bases, 2, 1e-6, 1.0, False)
    with pytest.raises(RuntimeError, match="nmf_forward: eps must be > 0"):
        ext.nmf_forward(x, bases, 2, 0.0, 1.0, False)

"""Triton MSCA kernels (forward and backward) against the eager reference.

On a machine without CUDA these run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
import math

import pytest
import torch

import segnext_kernels
from segnext_kernels.msca import triton as msca_triton
from segnext_kernels.msca.reference import pack_weights

from msca_helpers import (DEVICE, assert_within_rule, cast, leaves, make_msca, rebuild, reference_fwd_bwd)

BORDER_SHAPES = [(1, 3, 1, 1), (2, 3, 2, 3), (1, 4, 5, 21), (1, 2, 23, 7)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the Triton launchers allocate (outputs, scratch, partials) starts as NaN."""
    def empty(*shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(msca_triton, "_empty", empty)
    monkeypatch.setattr(msca_triton, "_empty_like", lambda t: torch.full_like(t, math.nan))


def run_triton(args, grad_out=None):
    flat = [t.detach().clone().requires_grad_(True) for t in leaves(args)]
    out = segnext_kernels.msca(*rebuild(flat), backend="triton")
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, flat, grad_out)
    return out.detach(), [g.detach() for g in grads]


def check(args, dtype, grad_out=None, names=None):
    out, grads = run_triton(args, grad_out)
    ref_out, ref_grads = reference_fwd_bwd(args, None if grad_out is None else grad_out, torch.float64)
    eager_out, eager_grads = reference_fwd_bwd(args, grad_out, dtype)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert_within_rule("out", out, ref_out, eager_out, dtype)
    if grad_out is not None:
        names = ["u", "conv0.weight", "conv0.bias"] + [f"strip_w[{i}]" for i in range(6)] + \
            [f"strip_b[{i}]" for i in range(6)] + ["conv3.weight", "conv3.bias"]
        for n, g, r, e in zip(names, grads, ref_grads, eager_grads):
            assert g.shape == r.shape, n
            assert_within_rule(f"grad {n}", g, r, e, dtype)
    return out, grads


@pytest.mark.parametrize("shape", BORDER_SHAPES + [(2, 5, 9, 13)])
def test_forward_backward_fp64_borders(shape, poison):
    args = make_msca(*shape, dtype=torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    check(args, torch.float64, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_backward_dtypes(dtype, poison):
    shape = (2, 6, 11, 17)
    args = make_msca(*shape, dtype=dtype)
    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    check(args, dtype, grad_out)


def test_multi_tile_and_channel_blocks(poison):
    # H, W above the interpreter's 32-pixel tile and C above its 16-channel block: several tiles and chunks,
    # so tile seams and channel-block tails are exercised.
    shape = (1, 19, 37, 35)
    args = make_msca(*shape, dtype=torch.float32)
    check(args, torch.float32, torch.randn(shape, device=DEVICE))


def test_many_channels_gemm_tails(poison):
    # C = 70 > 64: the 1x1 mix loops over several channel blocks with a ragged tail.
    shape = (1, 70, 3, 5)
    args = make_msca(*shape, dtype=torch.float32)
    check(args, torch.float32, torch.randn(shape, device=DEVICE))


@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
def test_layouts(layout, poison):
    shape = (2, 5, 7, 9)
    args = make_msca(*shape, dtype=torch.float32, channels_last=layout == "channels_last",
                     noncontig=layout == "noncontig")
    if layout == "noncontig":
        assert not args[0].is_contiguous()
    out, grads = check(args, torch.float32, torch.randn(shape, device=DEVICE))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["expanded", "sliced", "channels_last"])
def test_strided_grad_output(kind, poison):
    shape = (1, 4, 6, 10)
    args = make_msca(*shape, dtype=torch.float32)
    if kind == "expanded":   # what out.sum().backward() produces: stride 0 everywhere
        grad_out = torch.randn((), device=DEVICE).expand(shape)
    elif kind == "sliced":   # a view from torch.split along W
        grad_out = torch.randn(1, 4, 6, 21, device=DEVICE).split(10, dim=3)[1]
    else:
        grad_out = torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
    check(args, torch.float32, grad_out)


def test_gradcheck_fp64():
    args = make_msca(1, 2, 6, 7, dtype=torch.float64)
    flat = [t.detach().requires_grad_(True) for t in leaves(args)]

    def f(*xs):
        return segnext_kernels.msca(*rebuild(list(xs)), backend="triton")

    assert torch.autograd.gradcheck(f, flat, fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_empty_batch():
    args = make_msca(0, 3, 5, 6)
    out, grads = run_triton(args, torch.randn(0, 3, 5, 6, device=DEVICE))
    assert out.shape == (0, 3, 5, 6)
    assert grads[0].shape == (0, 3, 5, 6)
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


def test_deterministic_bits():
    shape = (2, 5, 9, 8)
    args = make_msca(*shape)
    grad_out = torch.randn(shape, device=DEVICE)
    out1, g1 = run_triton(args, grad_out)
    out2, g2 = run_triton(args, grad_out)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_partial_requires_grad():
    # Only u needs a gradient: the weight-gradient kernels are skipped and nothing else is returned.
    shape = (1, 3, 5, 6)
    u, w0, b0, sw, sb, w3, b3 = make_msca(*shape)
    pk = pack_weights(w0, b0, sw, sb, w3, b3, torch.float32)
    g = torch.randn(shape, device=DEVICE)
    res = msca_triton.backward(g, u, *pk, (True, False, False, False, False, False, False))
    assert res[0] is not None and all(r is None for r in res[1:])
    res = msca_triton.backward(g, u, *pk, (False, False, False, False, False, True, True))
    assert res[0] is None and res[5] is not None and res[6] is not None
    ref = reference_fwd_bwd((u, w0, b0, sw, sb, w3, b3), g)[1]
    du = msca_triton.backward(g, u, *pk, (True,) * 7)[0]
    torch.testing.assert_close(du, ref[0], rtol=1e-4, atol=1e-5)


def test_large_kernel_interior_identity():
    # Away from the borders the whole depthwise part is one 25x25 depthwise kernel (docs/kernels.md, "MSCA: the math"): an
    # independent check of the strip ordering and offsets on a single image.
    C, H, W = 2, 27, 27
    u, w0, b0, sw, sb, w3, b3 = make_msca(1, C, H, W, dtype=torch.float64)
    out = segnext_kernels.msca(u, w0, b0, sw, sb, w3, b3, backend="triton")
    ker = torch.zeros(C, 25, 25, dtype=torch.float64, device=DEVICE)
    ker[:, 10:15, 10:15] += w0[:, 0]
    bias = b0.clone()
    for i, k in enumerate((7, 11, 21)):
        wh, wv = sw[2 * i][:, 0, 0, :], sw[2 * i + 1][:, 0, :, 0]
        # dw_kx1(dw_1xk(dw5x5(u))) = outer(wv, wh) * w0 (full 2-D convolution of the kernels)
        kk = torch.einsum("ci,cj->cij", wv, wh)
        full = torch.stack([torch.nn.functional.conv2d(kk[c][None, None], w0[c:c + 1].flip(-1, -2), padding=4)[0, 0]
                            for c in range(C)])
        p = (25 - full.shape[-1]) // 2
        ker[:, p:p + full.shape[-1], p:p + full.shape[-1]] += full
        bias = bias + sb[2 * i + 1] + sb[2 * i] * wv.sum(1) + b0 * wv.sum(1) * wh.sum(1)
    s = torch.nn.functional.conv2d(u, ker[:, None], bias, groups=C)   # valid region only: 3x3 outputs
    expect = torch.nn.functional.conv2d(s, w3, b3) * u[:, :, 12:15, 12:15]
    torch.testing.assert_close(out[:, :, 12:15, 12:15], expect, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("geometry", ["fwd", "bwd_mix", "small"])
def test_tile_geometry_seams_and_channel_tails(geometry, poison, monkeypatch):
    # The GPU tile geometries (and a smaller one), run under the interpreter: ragged tiles in both directions,
    # several channel blocks with a ragged tail, the 1x1 mix over several K blocks, and persistent programs that
    # each loop over several tiles (max_programs).
    if geometry != "small":   # a GPU geometry (msca_triton.GPU_TILES), applied to all three tile kernels
        over = dict(msca_triton.GPU_TILES[geometry], max_programs=3)
        shape = (1, 6, 17, 33)
    else:
        over = dict(TH=8, TW=16, BLOCK_C=8, BLOCK_K=16, max_programs=3)
        shape = (1, 19, 13, 20)
    monkeypatch.setattr(msca_triton, "TILE_OVERRIDES", over)
    args = make_msca(*shape, dtype=torch.float32)
    check(args, torch.float32, torch.randn(shape, device=DEVICE))

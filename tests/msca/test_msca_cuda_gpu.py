"""The hand-written CUDA MSCA backend (csrc/msca/, segnext_kernels/msca/cuda.py) on a GPU.

Compared with the float64 eager reference (``msca_reference``) under the flash-attention rule of msca_helpers
(kernel error <= ERR_FACTOR x eager error in the same dtype + ATOL[dtype] x scale); fp32 with TF32 allowed has its
own absolute bound (TOL_TF32 below), since eager and kernel then round differently. Outputs, gradients and the
workspace are poisoned with NaN before every launch (``knobs.KNOBS.msca_cuda_poison``), so an unwritten element fails.
The first test builds the extension if needed (JIT, a few minutes).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import segnext_kernels
from segnext_kernels import knobs
from segnext_kernels.extension import CUDA_EXTENSION
from segnext_kernels.msca import cuda as msca_cuda
from segnext_kernels.msca.reference import pack_weights

from msca_helpers import GRAD_NAMES, TOL_TF32, check_backend as check, leaves, make_msca, max_err, rebuild, run_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BORDER_SHAPES = [(1, 3, 1, 1), (2, 3, 2, 3), (1, 4, 5, 21), (1, 2, 23, 7)]


def set_knobs(monkeypatch, **change):
    """Replace ``knobs.KNOBS`` with ``change`` applied, for the rest of the test."""
    monkeypatch.setattr(knobs, "KNOBS", dataclasses.replace(knobs.KNOBS, **change))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    set_knobs(monkeypatch, msca_cuda_poison=True, msca_cuda_tile=-1, msca_cuda_tile_bwd=-1, msca_cuda_dw="auto")


@pytest.fixture(autouse=True)
def no_tf32():
    old_mm, old_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the eager fp32 baseline in exact fp32 too
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_mm, old_cudnn




# ---------------------------------------------------------------------------------------------------------------
def test_extension_loads():
    ok, why = CUDA_EXTENSION.status()
    assert ok, why
    ext = CUDA_EXTENSION.load()
    assert len(ext.tile_table()) == 6
    assert hasattr(ext, "msca_forward") and hasattr(ext, "msca_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BORDER_SHAPES + [(2, 5, 9, 13), (2, 3, 31, 45)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_borders_and_odd_sizes(shape, dtype, channels_last):
    args = make_msca(*shape, dtype=dtype, device=DEV, channels_last=channels_last)
    grad_out = torch.randn(shape, device=DEV, dtype=dtype)
    check(args, dtype, grad_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 3, 32, 64, 160])
@pytest.mark.parametrize("B", [1, 2])
def test_channels_and_batch(B, C, dtype):
    shape = (B, C, 19, 37)
    args = make_msca(*shape, dtype=dtype, device=DEV, channels_last=C % 2 == 0)
    grad_out = torch.randn(shape, device=DEV, dtype=dtype)
    check(args, dtype, grad_out)


@pytest.mark.parametrize("dw", ["tc", "fma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", BORDER_SHAPES + [(2, 40, 31, 45)], ids=str)
def test_depthwise_variants(monkeypatch, shape, dtype, dw):
    """fp16/bf16 with the depthwise part on tensor cores (the default) and on fp32 FMA (knob msca_cuda_dw)."""
    set_knobs(monkeypatch, msca_cuda_dw=dw)
    args = make_msca(*shape, dtype=dtype, device=DEV, channels_last=shape[0] == 2)
    check(args, dtype, torch.randn(shape, device=DEV, dtype=dtype))


@pytest.mark.parametrize("dtype, dw", [(torch.float32, "fma"), (torch.float16, "tc"), (torch.float16, "fma"),
                                       (torch.bfloat16, "tc"), (torch.bfloat16, "fma")], ids=str)
def test_nonfinite_like_eager(monkeypatch, dtype, dw):
    """A NaN and a +Inf in u: NaN / +-Inf in the output exactly where eager PyTorch (same dtype) puts them, for
    both depthwise variants (the tensor-core one, fp16/bf16 only, redoes such tiles with the direct taps; fp32 always
    runs the FMA one)."""
    set_knobs(monkeypatch, msca_cuda_dw=dw)
    args = list(make_msca(1, 5, 37, 41, dtype=dtype, device=DEV))
    u = args[0].detach().clone()
    u[0, 1, 3, 4] = float("nan")
    u[0, 3, 30, 35] = float("inf")
    args[0] = u
    out, _ = run_backend(args)
    eager, _ = reference_fwd_bwd(args, None, dtype)
    for what, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(f(out), f(eager)), f"{what} positions differ ({int(f(out).sum())} vs {int(f(eager).sum())})"
    assert torch.isnan(eager).any() and torch.isfinite(eager).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_zero(dtype):
    args = make_msca(0, 8, 7, 9, dtype=dtype, device=DEV)
    out, grads = run_backend(args, torch.randn(0, 8, 7, 9, device=DEV, dtype=dtype))
    assert out.shape == (0, 8, 7, 9)
    assert grads[0].shape == (0, 8, 7, 9)
    for n, g in zip(GRAD_NAMES[1:], grads[1:]):
        assert torch.count_nonzero(g) == 0, n


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_grad_output_and_noncontiguous_u(dtype):
    shape = (2, 6, 17, 20)
    args = make_msca(*shape, dtype=dtype, device=DEV, noncontig=True)
    wide = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], device=DEV, dtype=dtype)
    grad_out = wide[..., ::2]                                   # strided
    check(args, dtype, grad_out)
    g_expand = torch.randn(1, shape[1], 1, 1, device=DEV, dtype=dtype).expand(shape)  # zero strides (from .sum())
    check(args, dtype, g_expand)


def test_tf32_mix():
    torch.backends.cuda.matmul.allow_tf32 = True
    shape = (2, 64, 21, 30)
    args = make_msca(*shape, dtype=torch.float32, device=DEV, channels_last=True)
    check(args, torch.float32, torch.randn(shape, device=DEV), tf32=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_tile_config(monkeypatch, dtype):
    shape = (2, 48, 20, 36)
    args = make_msca(*shape, dtype=dtype, device=DEV)
    grad_out = torch.randn(shape, device=DEV, dtype=dtype)
    CUDA_EXTENSION.load()
    tried = 0
    for cfg in range(6):
        set_knobs(monkeypatch, msca_cuda_tile=cfg, msca_cuda_tile_bwd=cfg)
        try:
            check(args, dtype, grad_out)
            tried += 1
        except RuntimeError as e:  # a config that does not fit this device's shared memory for this C
            assert "shared memory" in str(e), str(e)
    assert tried >= 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_bit_identical(dtype):
    shape = (2, 64, 33, 40)
    args = make_msca(*shape, dtype=dtype, device=DEV)
    grad_out = torch.randn(shape, device=DEV, dtype=dtype)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        r1 = run_backend(args, grad_out)
        r2 = run_backend(args, grad_out)
    finally:
        torch.use_deterministic_algorithms(old)
    assert torch.equal(r1[0], r2[0])
    for n, a, b in zip(GRAD_NAMES, r1[1], r2[1]):
        assert torch.equal(a, b), f"{n} differs between two identical runs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_triton_backend(dtype):
    pytest.importorskip("triton")
    shape = (2, 32, 27, 41)
    args = make_msca(*shape, dtype=dtype, device=DEV, channels_last=True)
    grad_out = torch.randn(shape, device=DEV, dtype=dtype)
    out_c, g_c = check(args, dtype, grad_out)
    out_t, g_t = run_backend(args, grad_out, backend="triton")
    ref_out, ref_grads = reference_fwd_bwd(args, grad_out, torch.float64)
    eager_out, eager_grads = reference_fwd_bwd(args, grad_out, dtype)
    # both within the rule of the reference, hence within twice of it of each other
    assert_within_rule("triton out", out_t, ref_out, eager_out, dtype)
    bound = 2 * (2 * max_err(eager_out, ref_out)) + 1e-2 * max(ref_out.abs().max().item(), 1.0)
    assert max_err(out_c, out_t) <= bound
    for n, a, b, r, e in zip(GRAD_NAMES, g_c, g_t, ref_grads, eager_grads):
        bound = 2 * (2 * max_err(e, r)) + 1e-2 * max(r.abs().max().item(), 1.0)
        assert max_err(a, b) <= bound, f"grad {n}: cuda vs triton {max_err(a, b):.3e} > {bound:.3e}"


def test_partial_needs_direct():
    """msca_backward computes only what is asked for and returns None for the rest."""
    shape = (1, 16, 12, 15)
    u, w0, b0, sw, sb, w3, b3 = make_msca(*shape, dtype=torch.float32, device=DEV)
    packed = pack_weights(w0, b0, sw, sb, w3, b3, torch.float32)
    g = torch.randn(shape, device=DEV)
    full = msca_cuda.backward(g, u, *packed, (True,) * 7)
    for needs in [(True, False, False, False, False, False, False), (False, True, False, True, False, False, False),
                  (False, False, False, False, False, True, True), (False, False, True, False, True, False, False)]:
        part = msca_cuda.backward(g, u, *packed, needs)
        for i, (n, p, f) in enumerate(zip(needs, part, full)):
            if n:
                assert torch.equal(p, f), i
            else:
                assert p is None, i


def test_opcheck_and_compile():
    CUDA_EXTENSION.load()
    shape = (2, 8, 9, 11)
    u, w0, b0, sw, sb, w3, b3 = make_msca(*shape, dtype=torch.bfloat16, device=DEV)
    packed = pack_weights(w0, b0, sw, sb, w3, b3, torch.float32)
    g = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    # the package's custom ops (the one op layer; the extension's functions run inside them)
    torch.library.opcheck(torch.ops.segnext_kernels.msca_fwd.default,
                          (u.clone().requires_grad_(), *[p.clone().requires_grad_() for p in packed], "cuda"))
    torch.library.opcheck(torch.ops.segnext_kernels.msca_bwd.default, (g, u, *packed, [True] * 7, "cuda"),
                          test_utils=("test_schema", "test_faketensor"))

    def f(u, *ws):
        return segnext_kernels.msca(u, ws[0], ws[1], list(ws[2:8]), list(ws[8:14]), ws[14], ws[15],
                                    backend="cuda")

    ws = [w0, b0, *sw, *sb, w3, b3]
    compiled = torch.compile(f, fullgraph=False)
    assert torch.equal(compiled(u, *ws), f(u, *ws))


@pytest.mark.slow
def test_int64_indexing():
    """B*C*H*W > 2^31: only the last image gets a gradient, so its reference is cheap."""
    B, C, H, W = 2049, 64, 128, 128   # 2.15e9 elements, 4.3 GB in bf16
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2 ** 30:
        pytest.skip("needs about 40 GB of free GPU memory")
    dtype = torch.bfloat16
    small = make_msca(1, C, H, W, dtype=dtype, device=DEV, seed=0)
    u = torch.randn(B, C, H, W, device=DEV, dtype=dtype)
    u[-1] = small[0][0]
    args = (u, *small[1:])
    grad_out = torch.zeros(B, C, H, W, device=DEV, dtype=dtype)
    grad_out[-1] = torch.randn(C, H, W, device=DEV, dtype=dtype)
    out, grads = run_backend(args, grad_out)
    last_args = (u[-1:].clone(), *small[1:])
    ref_out, ref_grads = reference_fwd_bwd(last_args, grad_out[-1:], torch.float64)
    eager_out, eager_grads = reference_fwd_bwd(last_args, grad_out[-1:], dtype)
    assert_within_rule("out[-1]", out[-1:], ref_out, eager_out, dtype)
    assert_within_rule("du[-1]", grads[0][-1:], ref_grads[0], eager_grads[0], dtype)
    assert torch.count_nonzero(grads[0][:-1]) == 0
    for n, g, r, e in zip(GRAD_NAMES[1:], grads[1:], ref_grads[1:], eager_grads[1:]):
        assert_within_rule(f"grad {n}", g, r, e, dtype)

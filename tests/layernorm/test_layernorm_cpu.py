"""The "cpu" channel LayerNorm (csrc/cpu/layernorm_cpu.cpp, segnext_kernels/layernorm/) and ``FusedStageNorm``
against the eager reference in float64: SegNeXt stage widths, odd sizes and the 64-pixel block borders, C = 1,
non-contiguous x, B = 0, NaN-poisoned outputs, NaN propagation, threads, torch integration, the reference fallbacks,
bad input; the stage-norm module inside MSCAN (no copies, the same state_dict, the fallbacks).

Tolerance (the flash-attention rule of tests/helpers/msca_helpers.py): error <= 2 x eager's float32 error + ATOL x
scale, against float64.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import segnext
from segnext_kernels import FusedStageNorm, backends, channel_layer_norm, channel_layer_norm_reference, fuse

from cpu_ext_helpers import check_opcheck_and_compile, ext, poison  # noqa: F401  (the extension; NaN-poisoned outputs)
from msca_helpers import ATOL, ERR_FACTOR, max_err


def make(B, C, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, N, generator=g, dtype=torch.float64) * 3 + 1.5  # a mean away from 0
    return x, torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)


def check(x, w, b, eps=1e-6):
    got = channel_layer_norm(x.float(), w.float(), b.float(), eps, backend="cpu")
    ref = channel_layer_norm_reference(x, w, b, eps)
    eager = channel_layer_norm_reference(x.float(), w.float(), b.float(), eps)
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous()
    assert not torch.isnan(got).any(), "NaN: an unwritten element?"
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    assert max_err(got, ref) <= ERR_FACTOR * max_err(eager, ref) + ATOL[torch.float32] * scale
    return got


@pytest.mark.parametrize("shape", [(1, 32, 128 * 128), (1, 64, 64 * 64), (2, 160, 32 * 32), (1, 256, 16 * 16),
                                   (1, 1, 1), (3, 7, 65), (2, 37, 127), (1, 512, 63)], ids=str)
def test_shapes_against_float64(shape):
    """SegNeXt-T stage widths at 512x512, one pixel, 64-pixel block borders (65, 127, 63), odd C, C = 1."""
    check(*make(*shape))


def test_c1_gives_the_bias_and_eps_matters():
    x, w, b = make(2, 1, 70)
    torch.testing.assert_close(check(x, w, b), b.float().expand(2, 1, 70).contiguous(), rtol=0, atol=0)
    x, w, b = make(1, 16, 40)
    x = x * 1e-4  # variance ~1e-8: eps = 1e-2 dominates it
    check(x, w, b, eps=1e-2)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_x(layout):
    x, w, b = make(2, 24, 90)
    x = x.transpose(1, 2).contiguous().transpose(1, 2) if layout == "transposed" else \
        torch.cat([x, x], dim=2)[:, :, ::2]
    assert not x.is_contiguous()
    check(x, w, b)


def test_batch_zero():
    x, w, b = make(0, 8, 30)
    assert channel_layer_norm(x.float(), w.float(), b.float(), backend="cpu").shape == (0, 8, 30)


def test_nan_propagates_as_eager():
    x, w, b = make(1, 8, 100)
    x[0, 3, 17] = float("nan")
    got = channel_layer_norm(x.float(), w.float(), b.float(), backend="cpu")
    eager = channel_layer_norm_reference(x.float(), w.float(), b.float())
    assert torch.equal(torch.isnan(got), torch.isnan(eager))
    assert torch.isnan(got[0, :, 17]).all() and not torch.isnan(got[0, :, 16]).any()


def test_one_and_two_threads_bitwise_equal():
    x, w, b = (t.float() for t in make(2, 64, 1000))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = channel_layer_norm(x, w, b, backend="cpu")
        torch.set_num_threads(2)
        two = channel_layer_norm(x, w, b, backend="cpu")
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)


def test_gradient_needed_runs_the_reference():
    x, w, b = (t.float().requires_grad_() for t in make(1, 12, 50))
    y = channel_layer_norm(x, w, b, backend="cpu")
    y.square().sum().backward()
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    channel_layer_norm_reference(xr, wr, br).square().sum().backward()
    for got, ref in ((x, xr), (w, wr), (b, br)):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


def test_auto_picks_cpu_for_float32_only():
    cpu = torch.device("cpu")
    assert backends.resolve("channel_layer_norm", "auto", cpu, torch.float32) == "cpu"
    for dt in (torch.float64, torch.bfloat16):
        with pytest.warns(RuntimeWarning, match="falls back to the eager reference for channel_layer_norm"):
            assert backends.resolve("channel_layer_norm", "auto", cpu, dt) == "reference"
    x, w, b = make(1, 8, 30)
    torch.testing.assert_close(channel_layer_norm(x, w, b), channel_layer_norm_reference(x, w, b), rtol=0, atol=0)
    with pytest.raises(TypeError, match="cpu channel_layer_norm kernels take float32, got float64"):
        channel_layer_norm(x, w, b, backend="cpu")


def test_opcheck_and_compile_fullgraph():
    x, w, b = (t.float() for t in make(1, 9, 70, seed=3))
    fn = lambda x: channel_layer_norm(x, w, b, 1e-5, backend="cpu")  # noqa: E731
    check_opcheck_and_compile(torch.ops.segnext_kernels.channel_layer_norm_fwd.default, (x, w, b, 1e-5, "cpu"), fn, x)


def test_bad_input(ext):
    x, w, b = (t.float() for t in make(1, 8, 30))
    with pytest.raises(ValueError, match=r"x: expected a 3-D tensor \(B, C, N\)"):
        channel_layer_norm(x[0], w, b)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\), got \(7,\)"):
        channel_layer_norm(x, w[:7], b)
    with pytest.raises(TypeError, match="bias: expected dtype torch.float32"):
        channel_layer_norm(x, w, b.double())
    with pytest.raises(TypeError, match="eps: expected a float, got bool"):
        channel_layer_norm(x, w, b, True)
    with pytest.raises(ValueError, match="eps: expected a finite number > 0, got 0"):
        channel_layer_norm(x, w, b, 0)
    with pytest.raises(TypeError, match="x: expected dtype float16, bfloat16, float32 or float64, got torch.int64"):
        channel_layer_norm(x.long(), w, b)
    with pytest.raises(RuntimeError, match=r"channel_layer_norm_forward: weight and bias must be float32 CPU tensors"):
        ext.channel_layer_norm_forward(x, w[:3], b, 1e-6)
    with pytest.raises(RuntimeError, match="channel_layer_norm_forward: eps must be > 0"):
        ext.channel_layer_norm_forward(x, w, b, 0.0)


# ------------------------------------------------------------------------------------------ the stage-norm module
def test_fused_stage_norm_on_the_transposed_view_copies_nothing():
    """MSCAN's ``norm(x.flatten(2).transpose(1, 2)).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()``: the
    same values as nn.LayerNorm, and the final tensor is the kernel's own output (no copy on the way)."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    fused = FusedStageNorm.from_module(ln)
    assert fused.weight is ln.weight and fused.bias is ln.bias
    assert fused.state_dict().keys() == ln.state_dict().keys()
    x = torch.randn(2, 48, 9, 13) * 2 + 1
    with torch.no_grad():
        t = fused(x.flatten(2).transpose(1, 2))
        out = t.reshape(2, 9, 13, 48).permute(0, 3, 1, 2).contiguous()
        ref = ln(x.flatten(2).transpose(1, 2)).reshape(2, 9, 13, 48).permute(0, 3, 1, 2)
    assert out.data_ptr() == t.data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_stage_norm_falls_back():
    ln = nn.LayerNorm(16)
    fused = FusedStageNorm.from_module(ln)
    t = torch.randn(2, 30, 16)  # a contiguous (B, N, C) tensor: nn.LayerNorm's own path
    torch.testing.assert_close(fused(t), ln(t), rtol=0, atol=0)
    ld = nn.LayerNorm(16).double()  # float64: nn.LayerNorm's own path on the transposed view too
    td = torch.randn(2, 16, 30, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(FusedStageNorm.from_module(ld)(td), ld(td), rtol=0, atol=0)
    with torch.autocast("cpu", torch.bfloat16):  # autocast: nn.LayerNorm's path (and its autocast rules)
        tf = torch.randn(2, 16, 30).transpose(1, 2)
        torch.testing.assert_close(fused(tf), ln(tf), rtol=0, atol=0)
    with pytest.raises(TypeError, match="norm: expected an nn.LayerNorm over one dimension"):
        FusedStageNorm.from_module(nn.LayerNorm((4, 4)))


def test_fuse_swaps_the_four_stage_norms():
    torch.manual_seed(0)
    model = segnext.segnext_t(num_classes=19).eval()
    keys = model.state_dict().keys()
    assert fuse(model)["norm"] == 4
    assert all(isinstance(getattr(model.backbone, f"norm{i}"), FusedStageNorm) for i in range(1, 5))
    assert model.state_dict().keys() == keys

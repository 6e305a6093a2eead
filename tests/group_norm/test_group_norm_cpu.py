"""The "cpu" GroupNorm (csrc/cpu/group_norm_cpu.cpp, segnext_kernels/group_norm/) and ``FusedGroupNorm`` against the
float64 reference: the LightHamHead shape, odd sizes, one value per group, 2-D and 3-D x, B = 0 and HW = 0,
channels_last and sliced x, None weight / bias, NaN-poisoned outputs, NaN / Inf propagation, threads, each ISA,
torch integration, the reference fallbacks, bad input; the module (state_dict, nn.GroupNorm's values, autocast
dtypes, fallbacks) and ``fuse`` on SegNeXt-T.

Inputs are fresh random values every run (a seed drawn from the OS, named in every failure message). Tolerance (the
flash-attention rule of tests/helpers/msca_helpers.py): error <= 2 x eager's error in the same dtype + ATOL x scale,
against F.group_norm in float64 of the same input values; ATOL 1e-5 (float32), 1e-2 (bfloat16).
"""
from __future__ import annotations

import copy
import random
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segnext
from segnext_kernels import FusedGroupNorm, backends, fuse, fused_norms, group_norm, group_norm_reference
from segnext_kernels.extension import CPU_EXTENSION  # noqa: F401  (run_with_isa reports its ISA)

from cpu_ext_helpers import check_opcheck_and_compile, ext, poison, run_with_isa  # noqa: F401  (fixtures)
from msca_helpers import ATOL, ERR_FACTOR, max_err


def make(shape, seed=None, dtype=torch.float64, affine=True):
    """(x, weight, bias, seed): x of ``shape`` with a mean away from 0, (C,) weight and bias (None without affine)."""
    seed = random.SystemRandom().randrange(2 ** 31) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    C = shape[1]
    w, b = (torch.randn(C, generator=g, dtype=torch.float64) for _ in range(2))
    return (x, w, b, seed) if affine else (x, None, None, seed)


def check(x, G, w, b, seed, dtype=torch.float32, eps=1e-5):
    """Runs the "cpu" kernel on x (any layout) in ``dtype`` with float32 weight / bias and checks the tolerance rule
    against F.group_norm in float64 of the same values."""
    xk = x.to(dtype)
    wk, bk = (None if t is None else t.float() for t in (w, b))
    got = group_norm(xk, G, wk, bk, eps, backend="cpu")
    wd, bd = (None if t is None else t.double() for t in (wk, bk))
    ref = F.group_norm(xk.double(), G, wd, bd, eps)
    eager = F.group_norm(xk, G, wk, bk, eps)
    msg = f"seed {seed}, shape {tuple(x.shape)}, G {G}, {dtype}"
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous(), msg
    assert not torch.isnan(got).any(), f"NaN: an unwritten element? ({msg})"
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    err, bound = max_err(got, ref), ERR_FACTOR * max_err(eager, ref) + ATOL[dtype] * scale
    assert err <= bound, f"error {err:.3e} > bound {bound:.3e} ({msg})"
    return got


SHAPES = [((1, 256, 64, 64), 32),  # the LightHamHead's GN at 512x512 (SegNeXt-T)
          ((2, 6, 5, 7), 3), ((3, 4, 1, 1), 4),  # odd sizes; one value per group
          ((1, 8, 13), 2), ((4, 6), 3),  # 3-D and 2-D x
          ((2, 64, 9, 11), 32), ((1, 96, 33, 35), 4), ((2, 5, 3, 17), 1)]  # vector tails, G = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,G", SHAPES, ids=str)
def test_shapes_against_float64(shape, G, dtype):
    x, w, b, seed = make(shape)
    check(x, G, w, b, seed, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_weight_and_bias_and_a_large_eps(dtype):
    x, _, _, seed = make((2, 12, 7, 9), affine=False)
    check(x, 4, None, None, seed, dtype=dtype)
    x, w, b, seed = make((1, 16, 5, 8))
    check(x * 1e-3, 4, w, b, seed, dtype=dtype, eps=1e-2)  # variance ~1e-5: eps = 1e-2 dominates it
    check(x, 4, w, None, seed, dtype=dtype)


def test_one_value_per_group_gives_the_bias_and_a_large_mean_is_fine():
    x, w, b, seed = make((3, 4, 1, 1))
    got = check(x, 4, w, b, seed)
    assert torch.equal(got, b.float().view(1, 4, 1, 1).expand(3, 4, 1, 1)), f"seed {seed}"
    x, w, b, seed = make((2, 16, 9, 9))
    check(x + 200, 4, w, b, seed)  # mean ~200 against a spread ~3


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous_x_gives_contiguous_nchw(layout):
    x, w, b, seed = make((2, 24, 10, 12))
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else \
        torch.cat([x, x], dim=3)[:, :, 1:, ::2]
    assert not x.is_contiguous()
    check(x, 8, w, b, seed)


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 3), (0, 8)], ids=str)
def test_empty(shape):
    x, w, b, _ = make(shape)
    for dt in (torch.float32, torch.bfloat16):
        y = group_norm(x.to(dt), 4, w.float(), b.float(), backend="cpu")
        assert y.shape == shape and y.dtype == dt


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_propagate_as_eager(bad):
    x, w, b, _ = make((2, 8, 6, 7))
    x[1, 5, 2, 3] = bad  # group 2 of image 1
    x, w, b = x.float(), w.float(), b.float()
    got, eager = group_norm(x, 4, w, b, backend="cpu"), F.group_norm(x, 4, w, b)
    assert torch.equal(torch.isnan(got), torch.isnan(eager)) and torch.equal(torch.isinf(got), torch.isinf(eager))
    assert torch.isnan(got[1, 4:6]).all() and not torch.isnan(got[1, :4]).any() and not torch.isnan(got[0]).any()


def test_one_and_two_threads_bitwise_equal():
    x, w, b, _ = make((2, 64, 33, 31))
    saved = torch.get_num_threads()
    try:
        for dt in (torch.float32, torch.bfloat16):
            torch.set_num_threads(1)
            one = group_norm(x.to(dt), 32, w.float(), b.float(), backend="cpu")
            torch.set_num_threads(2)
            two = group_norm(x.to(dt), 32, w.float(), b.float(), backend="cpu")
            assert torch.equal(one, two), dt
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_each_isa(ext, isa):
    if isa == "avx2" and ext.isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    body = ("for dt in (torch.float32, torch.bfloat16):\n"
            "    for shape, G in t.SHAPES:\n"
            "        x, w, b, seed = t.make(shape)\n"
            "        t.check(x, G, w, b, seed, dtype=dt)")
    run_with_isa("tests/group_norm/test_group_norm_cpu.py", body, isa)


def test_gradient_needed_runs_the_reference():
    x, w, b, _ = make((2, 12, 5, 6))
    x, w, b = (t.float().requires_grad_() for t in (x, w, b))
    y = group_norm(x, 3, w, b, backend="cpu")
    y.square().sum().backward()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.group_norm(xr, 3, wr, br).square().sum().backward()
    for got, ref in ((x, xr), (w, wr), (b, br)):
        torch.testing.assert_close(got.grad, ref.grad, rtol=0, atol=0)


def test_auto_picks_cpu_for_float32_and_bfloat16():
    cpu = torch.device("cpu")
    for dt in (torch.float32, torch.bfloat16):
        assert backends.resolve("group_norm", "auto", cpu, dt) == "cpu"
    with pytest.warns(RuntimeWarning, match="falls back to the eager reference for group_norm"):
        assert backends.resolve("group_norm", "auto", cpu, torch.float64) == "reference"
    x, w, b, _ = make((1, 8, 5, 6))
    torch.testing.assert_close(group_norm(x, 2, w, b), group_norm_reference(x, 2, w, b), rtol=0, atol=0)
    with pytest.raises(TypeError, match="cpu group_norm kernels take float32, bfloat16, got float64"):
        group_norm(x, 2, w, b, backend="cpu")


def test_opcheck_and_compile_fullgraph():
    x, w, b, _ = make((2, 12, 7, 5))
    x, w, b = x.float(), w.float(), b.float()
    fn = lambda x: group_norm(x, 4, w, b, 1e-5, backend="cpu")  # noqa: E731
    check_opcheck_and_compile(torch.ops.segnext_kernels.group_norm_fwd.default, (x, 4, w, b, 1e-5, "cpu"), fn, x)
    torch.library.opcheck(torch.ops.segnext_kernels.group_norm_fwd.default, (x.bfloat16(), 4, None, None, 1e-5, "cpu"))


def test_bad_input(ext):
    x, w, b, _ = make((1, 6, 4, 5))
    x, w, b = x.float(), w.float(), b.float()
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        group_norm([1.0, 2.0], 2)
    with pytest.raises(ValueError, match=r"x: expected a tensor of 2 or more dimensions \(B, C, \*\), got 1-D"):
        group_norm(x[0, 0, 0], 1)
    with pytest.raises(TypeError, match="x: expected dtype float16, bfloat16, float32 or float64, got torch.int64"):
        group_norm(x.long(), 2)
    with pytest.raises(ValueError, match=r"num_groups: expected an int >= 1 dividing C = 6 \(the channels of x\), "
                                         "got 4"):
        group_norm(x, 4, w, b)
    with pytest.raises(ValueError, match="num_groups: expected an int >= 1 dividing C = 6"):
        group_norm(x, 0, w, b)
    with pytest.raises(TypeError, match="num_groups: expected an int, got float"):
        group_norm(x, 2.0, w, b)
    with pytest.raises(ValueError, match=r"weight: expected shape \(6,\), got \(5,\)"):
        group_norm(x, 2, w[:5], b)
    with pytest.raises(TypeError, match="bias: expected dtype torch.float32 \\(the dtype of x\\), got torch.float64"):
        group_norm(x, 2, w, b.double())
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor or None, got int"):
        group_norm(x, 2, 1, b)
    with pytest.raises(TypeError, match="eps: expected a float, got bool"):
        group_norm(x, 2, w, b, True)
    with pytest.raises(ValueError, match="eps: expected a finite number > 0, got inf"):
        group_norm(x, 2, w, b, float("inf"))
    with pytest.raises(RuntimeError, match=r"group_norm_forward: num_groups must be >= 1 and divide C"):
        ext.group_norm_forward(x, 4, w, b, 1e-5)
    with pytest.raises(RuntimeError, match=r"group_norm_forward: bias must be a float32 or bfloat16 CPU tensor"):
        ext.group_norm_forward(x, 2, w, b[:3], 1e-5)
    with pytest.raises(RuntimeError, match=r"group_norm_forward: x must be a \(B, C, \*\) float32 or bfloat16"):
        ext.group_norm_forward(x.double(), 2, None, None, 1e-5)


# ------------------------------------------------------------------------------------------------------ the module
def random_gn(G, C, eps=1e-5, seed=0):
    gn = nn.GroupNorm(G, C, eps=eps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        gn.bias.copy_(torch.randn(C, generator=g))
    return gn


def mock_spy():
    """Counts the calls of the op from FusedGroupNorm."""
    return mock.patch.object(fused_norms, "group_norm", wraps=fused_norms.group_norm)


def test_fused_group_norm_is_nn_group_norm():
    gn = random_gn(8, 32)
    fused = FusedGroupNorm.from_module(gn)
    assert fused.weight is gn.weight and fused.bias is gn.bias and isinstance(fused, nn.GroupNorm)
    assert list(fused.state_dict()) == list(gn.state_dict())
    assert all(torch.equal(v, gn.state_dict()[k]) for k, v in fused.state_dict().items())
    x = make((2, 32, 11, 13))[0].float()
    with torch.no_grad(), mock_spy() as spy:
        got = fused(x)
    assert spy.call_count == 1, "the kernel did not run"
    with torch.no_grad():
        torch.testing.assert_close(got, gn(x), rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, got, rtol=0, atol=0)
    plain = FusedGroupNorm.from_module(nn.GroupNorm(4, 8, affine=False))
    x8 = make((1, 8, 6, 5))[0].float()
    torch.testing.assert_close(plain(x8), F.group_norm(x8, 4), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="norm: expected an nn.GroupNorm"):
        FusedGroupNorm.from_module(nn.BatchNorm2d(4))


def test_fused_group_norm_falls_back():
    gn = random_gn(4, 16)
    fused = FusedGroupNorm.from_module(gn)
    x = make((2, 16, 5, 7))[0].float()
    # a gradient needed (trainable parameters, grad mode): nn.GroupNorm's own path, the same gradients
    fused(x).square().sum().backward()
    gw, gb = gn.weight.grad.clone(), gn.bias.grad.clone()
    gn.zero_grad()
    gn(x).square().sum().backward()
    assert torch.equal(gw, gn.weight.grad) and torch.equal(gb, gn.bias.grad)
    xd = x.double()  # float64: nn.GroupNorm's path
    gd = copy.deepcopy(gn).double()
    with torch.no_grad():
        torch.testing.assert_close(FusedGroupNorm.from_module(gd)(xd), gd(xd), rtol=0, atol=0)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_group_norm_bf16_autocast_has_eager_dtype(in_dtype):
    gn = random_gn(8, 32)
    fused = FusedGroupNorm.from_module(gn)
    x = make((1, 32, 9, 10))[0].to(in_dtype)
    ref = F.group_norm(x.double(), 8, gn.weight.double(), gn.bias.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with mock_spy() as spy:
            got = fused(x)
        eager = gn(x)
    assert spy.call_count == 1, "the kernel did not run"
    assert got.dtype == eager.dtype
    err, bound = max_err(got, ref), ERR_FACTOR * max_err(eager, ref) + ATOL[eager.dtype] * ref.abs().max().item()
    assert err <= bound, f"error {err:.3e} > bound {bound:.3e}"


def test_fuse_swaps_the_three_head_group_norms_and_keeps_the_logits():
    torch.manual_seed(0)
    eager = segnext.segnext_t(num_classes=150).eval()
    with torch.no_grad():  # GroupNorm's defaults (1, 0) would hide a wrong channel of weight or bias
        for m in eager.decode_head.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    fused = copy.deepcopy(eager)
    sd = eager.state_dict()
    report = fuse(fused)
    assert report["group_norm"] == 3
    head = fused.decode_head
    assert all(isinstance(m.gn, FusedGroupNorm) for m in (head.squeeze, head.hamburger.ham_out, head.align))
    assert fused.state_dict().keys() == sd.keys() and all(torch.equal(sd[k], v) for k, v in fused.state_dict().items())
    images = torch.randn(1, 3, 97, 131)
    with torch.no_grad(), mock_spy() as spy:
        torch.manual_seed(1)  # the same NMF2D bases draw in both models
        ref = eager(images)
        torch.manual_seed(1)
        out = fused(images)
    assert spy.call_count == 3
    err = (out - ref).abs().max().item()
    assert not torch.isnan(out).any() and err <= 1e-4 * max(ref.abs().max().item(), 1.0), f"error {err:.3e}"
    assert fuse(copy.deepcopy(eager), backend="reference")["group_norm"] == 0

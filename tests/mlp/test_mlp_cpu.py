"""The "cpu" MLP backend (csrc/cpu/mlp_cpu_*.cpp, segnext_kernels/mlp/cpu.py) against the eager reference: forward
and every gradient, dtypes, borders, SegNeXt widths, layouts, threads, torch integration and a fully fused SegNeXt-T.

Tolerances: the flash-attention rule (tests/helpers/msca_helpers.py): kernel error <= 2 x eager's error in the same
dtype + ATOL x scale, against float64. Outputs and gradients are poisoned with NaN at allocation (``set_poison``).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import segnext
from segnext_kernels.extension import CPU_EXTENSION
from segnext_kernels.mlp import cpu as mlp_cpu
from segnext_kernels.mlp import mlp, mlp_reference, pack_weights
from segnext_kernels import FusedMlp, fuse_mlp

from cpu_ext_helpers import ext, poison, run_with_isa  # noqa: F401  (the extension; NaN-poisoned outputs)
from msca_helpers import ATOL, ERR_FACTOR, max_err

GRAD_NAMES = ["x", "fc1.weight", "fc1.bias", "dw.weight", "dw.bias", "fc2.weight", "fc2.bias"]


def make(B, C, Hd, H, W, dtype=torch.float32, seed=0, channels_last=False, noncontig=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if noncontig:
        x = r(B, 2 * C + 1, H + 3, W + 2)[:, 1::2, 2:H + 2, 1:W + 1]
    else:
        x = r(B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return [x, r(Hd, C, 1, 1, scale=C ** -0.5), r(Hd, scale=0.5), r(Hd, 1, 3, 3, scale=0.3), r(Hd, scale=0.5),
            r(C, Hd, 1, 1, scale=Hd ** -0.5), r(C, scale=0.5)]


def run(args, grad_out=None, backend="cpu", dtype=None, fn=None):
    leaves = [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in args]
    out = (fn or (lambda *a: mlp(*a, backend=backend)))(*leaves)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def within(name, got, ref64, eager, dtype):
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten element?)"
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    bound = ERR_FACTOR * max_err(eager, ref64) + ATOL[dtype] * scale
    err = max_err(got, ref64)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


def check(args, dtype, grad_out=None):
    out, grads = run(args, grad_out)
    ref, rgrads = run(args, grad_out, fn=mlp_reference, dtype=torch.float64)
    eag, egrads = run(args, grad_out, fn=mlp_reference, dtype=dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    if args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    within("out", out, ref, eag, dtype)
    if grad_out is not None:
        for n, g, r, e in zip(GRAD_NAMES, grads, rgrads, egrads):
            assert g.shape == r.shape, n
            within(f"grad {n}", g, r, e, dtype)
    return out, grads


def test_extension_has_the_mlp(ext):
    assert hasattr(ext, "mlp_forward") and hasattr(ext, "mlp_backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 8, 1, 1), (2, 3, 7, 2, 3), (1, 5, 12, 7, 9), (2, 17, 40, 33, 18),
                                   (1, 1, 16, 30, 31)], ids=str)
def test_borders_and_odd_sizes(shape, dtype):
    args = make(*shape, dtype=dtype)
    B, C, _, H, W = shape
    check(args, dtype, torch.randn(B, C, H, W, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 32, 256, 32, 40), (1, 64, 512, 17, 12), (1, 160, 640, 9, 8),
                                   (1, 256, 1024, 6, 5), (1, 48, 192, 16, 16)], ids=str)
def test_segnext_hidden_widths(shape, dtype):
    args = make(*shape, dtype=dtype)
    B, C, _, H, W = shape
    check(args, dtype, torch.randn(B, C, H, W).to(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
def test_layouts_and_strided_grad_output(layout):
    args = make(2, 6, 24, 11, 14, channels_last=layout == "channels_last", noncontig=layout == "noncontig")
    wide = torch.randn(2, 6, 11, 28)
    check(args, torch.float32, wide[..., ::2])


def test_plans_agree(ext):
    """Other tilings (bands, hidden blocks, hidden groups; the SEGNEXT_MLP_PLAN / SEGNEXT_MLP_BWD_PLAN overrides, set
    here through the binding as the package does at load) give the same results up to rounding."""
    args = make(1, 8, 40, 21, 19)
    go = torch.randn(1, 8, 21, 19)
    base, bgrads = run(args, go)
    differs = False
    for plan in ("19:8", "40:16:3", "1000:40", "7:5:2"):
        ext.set_plan_override(1, plan)
        ext.set_plan_override(2, plan)
        try:
            out, grads = run(args, go)
        finally:
            ext.set_plan_override(1, "")
            ext.set_plan_override(2, "")
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
        for n, g, b in zip(GRAD_NAMES, grads, bgrads):
            torch.testing.assert_close(g, b, rtol=1e-4, atol=1e-4, msg=n)
        differs = differs or not torch.equal(out, base)
    assert differs, "no override changed the rounding: the overrides did not reach the kernels"
    with pytest.raises(RuntimeError, match="which must be"):
        ext.set_plan_override(3, "1:1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_residual_epilogue(dtype):
    """mlp(..., residual=r) = mlp(...) + r, with the residual's gradient (= grad_out)."""
    args = make(2, 6, 24, 9, 11, dtype=dtype)
    r = torch.randn(2, 6, 9, 11, dtype=torch.float64).to(dtype)
    go = torch.randn(2, 6, 9, 11, dtype=torch.float64).to(dtype)
    fn = lambda *a: mlp(*a[:7], residual=a[7], backend="cpu")  # noqa: E731
    ref_fn = lambda *a: mlp_reference(*a[:7]) + a[7]  # noqa: E731
    out, grads = run(args + [r], go, fn=fn)
    ref, rgrads = run(args + [r], go, fn=ref_fn, dtype=torch.float64)
    eag, egrads = run(args + [r], go, fn=ref_fn, dtype=dtype)
    within("out", out, ref, eag, dtype)
    for n, g, rr, e in zip(GRAD_NAMES + ["residual"], grads, rgrads, egrads):
        within(f"grad {n}", g, rr, e, dtype)
    if dtype == torch.float64:
        small = [t.detach().clone().requires_grad_(True) for t in make(1, 3, 6, 4, 5, dtype=dtype)]
        small.append(torch.randn(1, 3, 4, 5, dtype=dtype, requires_grad=True))
        assert torch.autograd.gradcheck(fn, small, eps=1e-6, atol=1e-8, rtol=1e-6)
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 6, 9, 11\)"):
        mlp(*args, residual=r[:, :5], backend="cpu")


def test_gradcheck_fp64():
    args = [t.requires_grad_(True) for t in make(1, 3, 6, 5, 4, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: mlp(*a, backend="cpu"), args, eps=1e-6, atol=1e-8, rtol=1e-6,
                                    fast_mode=True)


def test_batch_zero():
    out, grads = run(make(0, 5, 10, 8, 9), torch.randn(0, 5, 8, 9))
    assert out.shape == (0, 5, 8, 9) and grads[0].shape == (0, 5, 8, 9)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def test_partial_requires_grad():
    args = make(1, 4, 16, 9, 10)
    go = torch.randn(1, 4, 9, 10)
    _, ref = run(args, go, fn=mlp_reference, dtype=torch.float64)
    for want in ([0], [5, 6], [3, 4], [1, 2], [0, 5]):
        leaves = [t.clone().requires_grad_(i in want) for i, t in enumerate(args)]
        out = mlp(*leaves, backend="cpu")
        grads = torch.autograd.grad(out, [leaves[i] for i in want], go)
        for i, g in zip(want, grads):
            assert max_err(g, ref[i]) <= 1e-4 * max(1.0, ref[i].abs().max().item()), GRAD_NAMES[i]
    res = mlp_cpu.backward(go, args[0], *pack_weights(*args[1:]), (False,) * 5 + (True, True))
    assert res[:5] == (None,) * 5 and res[5] is not None and res[6] is not None


def _threads(n, dtype):
    torch.set_num_threads(n)
    try:
        args = make(2, 24, 96, 33, 37, dtype=dtype, seed=3)
        return [run(args, torch.randn(2, 24, 33, 37, generator=torch.Generator().manual_seed(4)).to(dtype))[0]] + \
            run(args, torch.randn(2, 24, 33, 37, generator=torch.Generator().manual_seed(4)).to(dtype))[1]
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_bitwise_equal(dtype):
    a, b = _threads(1, dtype), _threads(2, dtype)
    for n, x, y in zip(["out"] + GRAD_NAMES, a, b):
        assert torch.equal(x, y), n


def test_small_image_hidden_groups_threads_bitwise():
    """B = 1 small images take the hidden-group plan; still thread-count independent."""
    torch.set_num_threads(1)
    args = make(1, 16, 64, 8, 8)
    a = run(args)[0]
    torch.set_num_threads(2)
    assert torch.equal(a, run(args)[0])


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_lower_vector_isas(isa):
    """SEGNEXT_CPU_ISA is read once per process: each lower ISA in a fresh one (the AVX-512 path runs above)."""
    body = ("for dt, shape in ((torch.float32, (2, 5, 24, 13, 29)), (torch.bfloat16, (1, 3, 16, 8, 21)),\n"
            "                  (torch.float32, (1, 3, 8, 1, 1)), (torch.float32, (1, 4, 8, 3, 17))):\n"
            "    B, C, Hd, H, W = shape\n"
            "    t.check(t.make(*shape, dtype=dt), dt, torch.randn(B, C, H, W).to(dt))\n"
            "t.test_gemm_dtype_bf16_on_float32((2, 5, 20, 7, 9))")  # gemm_bf16's fallback: no vdpbf16ps below AVX-512
    run_with_isa("tests/mlp/test_mlp_cpu.py", body, isa)


def test_opcheck():
    args = make(1, 3, 8, 7, 9)
    packed = [p.clone().requires_grad_() for p in pack_weights(*args[1:])]
    torch.library.opcheck(torch.ops.segnext_kernels.mlp_fwd.default, (args[0].clone().requires_grad_(), *packed,
                                                                        "cpu"))


def test_compile_fullgraph():
    m = FusedMlp(8, 32, backend="cpu")
    x = torch.randn(1, 8, 13, 11, requires_grad=True)
    ref = m(x)
    torch._dynamo.reset()
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=0, atol=0)


def test_autocast_bf16():
    ref_mod = segnext.Mlp(12, 48)
    fused = FusedMlp.from_module(ref_mod, backend="cpu")
    x = torch.randn(1, 12, 15, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, eager = fused(x), ref_mod(x)
    assert got.dtype == eager.dtype == torch.bfloat16
    ref = ref_mod.double()(x.double())
    assert max_err(got, ref) <= 2 * max_err(eager, ref) + 1e-2 * ref.abs().max().item()


def test_bad_input():
    args = make(1, 4, 8, 5, 5)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        mlp(args[0][0], *args[1:], backend="cpu")
    with pytest.raises(ValueError, match=r"fc1_bias: expected shape \(8,\)"):
        mlp(args[0], args[1], args[2][:7], *args[3:], backend="cpu")
    with pytest.raises(TypeError, match="dw_weight: expected dtype torch.float32"):
        mlp(args[0], args[1], args[2], args[3].double(), *args[4:], backend="cpu")
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        mlp(None, *args[1:], backend="cpu")
    with pytest.raises(TypeError, match="cpu mlp kernels take"):
        mlp(*[t.half() for t in args], backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        mlp(*args, backend="nope")
    with pytest.raises(RuntimeError, match="w1 must have shape"):
        CPU_EXTENSION.load().mlp_forward(args[0], torch.zeros(8, 3), *pack_weights(*args[1:])[1:])


def test_module_state_dict_dropout_and_fuse():
    m = segnext.Mlp(6, 24)
    f = FusedMlp.from_module(m, backend="cpu")
    assert list(f.state_dict()) == list(m.state_dict()) and f.fc1.weight is m.fc1.weight
    x = torch.randn(2, 6, 7, 9)
    torch.testing.assert_close(f(x), m(x), rtol=1e-5, atol=1e-5)
    d = FusedMlp.from_module(segnext.Mlp(6, 24, drop=0.5), backend="cpu").train()
    assert d(x).shape == x.shape  # dropout active: eager path
    with pytest.raises(TypeError):
        FusedMlp.from_module(torch.nn.Linear(3, 3))
    net = torch.nn.Sequential(segnext.Mlp(4, 16), torch.nn.Sequential(segnext.Mlp(4, 8)))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    assert fuse_mlp(net, backend="cpu") == 2 and isinstance(net[0], FusedMlp)
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())
    with pytest.raises(RuntimeError):
        fuse_mlp(torch.nn.Sequential(segnext.Mlp(4, 16)).to("meta"), backend="cpu")


def _loss(logits, target):
    return F.cross_entropy(logits, target)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_segnext_t_matches_eager(channels_last):
    torch.manual_seed(0)
    eager = segnext.segnext_t(num_classes=19)
    fused = copy.deepcopy(eager)
    assert fuse_mlp(fused, backend="cpu") == 13
    images = torch.randn(1, 3, 62, 50)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 19, (1, 62, 50))
    eager.eval(), fused.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        ref = eager(images)
        torch.manual_seed(1)
        out = fused(images)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    eager.train(), fused.train()
    torch.manual_seed(2)
    _loss(eager(images), target).backward()
    torch.manual_seed(2)
    _loss(fused(images), target).backward()
    fp = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        q = fp[name]
        scale = p.grad.abs().max().item() + 1e-12
        assert (q.grad - p.grad).abs().max().item() <= 2e-3 * scale + 1e-7, name


def test_plan_environment_reaches_the_kernels_once():
    """SEGNEXT_MLP_PLAN is read once at import (knobs.KNOBS) and handed to the extension when it loads: in a fresh
    process it changes the tiling (so the rounding), and clearing the override restores the default plan."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, torch; sys.path[:0] = ['tests/helpers', 'tests/mlp']; import test_mlp_cpu as t\n"
            "from segnext_kernels.knobs import KNOBS\n"
            "assert KNOBS.mlp_cpu_plan == '7:5:2', KNOBS\n"
            "args = t.make(1, 8, 40, 21, 19)\n"
            "forced = t.run(args)[0]\n"
            "t.CPU_EXTENSION.load().set_plan_override(1, '')\n"
            "default = t.run(args)[0]\n"
            "torch.testing.assert_close(forced, default, rtol=1e-5, atol=1e-5)\n"
            "print('differs' if not torch.equal(forced, default) else 'same')\n")
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, SEGNEXT_MLP_PLAN="7:5:2"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.split()[-1] == "differs"


# (1, 40, 96, 16, 16): one band of 16 x 16 = 256 pixels, a leading dimension the kernel pads in its scratch
# (padded_ld) and whose image planes fc1 packs (aliasing_ld)
@pytest.mark.parametrize("shape", [(2, 6, 24, 9, 11), (1, 40, 96, 16, 16)], ids=str)
def test_affine_inference_epilogues(shape):
    """mlp(..., affine=(s, t, g), residual=r) = g * mlp(s x + t) + r (an eval BatchNorm before fc1 and the layer
    scale after fc2, inside the kernel), float32; the fused op refuses a backward through it, and with a gradient
    needed the public function runs the reference."""
    B, C, _, H, W = shape
    args = make(*shape)
    r = torch.randn(B, C, H, W, dtype=torch.float64)
    aff = torch.stack([torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64) * 0.3,
                       torch.rand(C, dtype=torch.float64) * 0.5])

    def ref_fn(a, rr, af):
        x = a[0] * af[0][None, :, None, None] + af[1][None, :, None, None]
        return mlp_reference(x, *a[1:]) * af[2][None, :, None, None] + rr

    with torch.no_grad():
        got = mlp(*[t.float() for t in args], residual=r.float(), affine=aff.float(), backend="cpu")
        ref = ref_fn([t.double() for t in args], r, aff)
        eager = ref_fn([t.float() for t in args], r.float(), aff.float())
    within("out", got, ref, eager, torch.float32)
    leaves = [t.float().requires_grad_() for t in args]
    y = mlp(*leaves, affine=aff.float(), backend="cpu")  # a gradient is needed: the reference, differentiable
    y.sum().backward()
    assert leaves[0].grad is not None
    packed = pack_weights(*[t.float() for t in args[1:]])
    xg = args[0].float().requires_grad_()
    out = torch.ops.segnext_kernels.mlp_fwd(xg, *packed, "cpu", None, aff.float())
    with pytest.raises(RuntimeError, match="inference only"):
        out.sum().backward()
    with pytest.raises(ValueError, match=rf"affine: expected shape \(3, {C}\)"):
        mlp(*args, affine=aff[:2], backend="cpu")


@pytest.mark.parametrize("shape", [(1, 32, 256, 19, 23), (2, 5, 20, 7, 9)], ids=str)
def test_gemm_dtype_bf16_on_float32(shape):
    """float32 x with gemm_dtype=bfloat16: the kernel's GEMMs on bfloat16-rounded operands, float32 output, within
    the bfloat16 rule of eager's bfloat16 MLP; the affine path too; with a gradient needed the reference (bfloat16
    convolutions) runs and gradients reach the float32 weights."""
    args = make(*shape, dtype=torch.float64)
    B, C = shape[:2]
    ref = mlp_reference(*args)
    eager = mlp_reference(*(t.bfloat16() for t in args))
    f32 = [t.float() for t in args]
    with torch.no_grad():
        got = mlp(*f32, gemm_dtype=torch.bfloat16, backend="cpu")
        exact = mlp(*f32, backend="cpu")
    assert got.dtype == torch.float32 and not torch.equal(got, exact)
    within("out", got, ref, eager, torch.bfloat16)
    aff = torch.stack([torch.rand(C) + 0.5, torch.randn(C) * 0.1, torch.rand(C) * 0.1]).float().double()
    xa = args[0] * aff[0][None, :, None, None] + aff[1][None, :, None, None]
    ref_a = mlp_reference(xa, *args[1:]) * aff[2][None, :, None, None] + args[0]
    with torch.no_grad():
        got_a = mlp(*f32, residual=f32[0], affine=aff.float(), gemm_dtype=torch.bfloat16, backend="cpu")
    eager_a = (mlp_reference(xa.bfloat16(), *(t.bfloat16() for t in args[1:])) * aff[2][None, :, None, None]
               + args[0])
    within("out (affine)", got_a, ref_a, eager_a, torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in f32]
    mlp(*leaves, gemm_dtype=torch.bfloat16, backend="cpu").sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
    with pytest.raises(TypeError, match="gemm_dtype: expected None"):
        mlp(*f32, gemm_dtype=torch.float16, backend="cpu")

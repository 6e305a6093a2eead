"""The "cpu" fused pointwise convolution (csrc/cpu/pwconv_cpu.cpp, segnext_kernels/pwconv/) against its eager
reference in float64, float32 and bfloat16: every activation and epilogue combination, odd sizes, SegNeXt widths,
layouts, B = 0, NaN-poisoned outputs, NaN propagation, threads, torch integration, the reference fallbacks and bad
input.

Tolerance (the flash-attention rule of tests/helpers/msca_helpers.py): error <= 2 x eager's error in the same dtype +
ATOL x scale, against float64.
"""
from __future__ import annotations

import math

import pytest
import torch

from segnext_kernels.extension import CPU_EXTENSION  # noqa: F401  (run_with_isa reports its ISA)
from segnext_kernels.pwconv import pwconv, pwconv_reference

from cpu_ext_helpers import check_opcheck_and_compile, ext, poison, run_with_isa  # noqa: F401  (the extension; NaN-poisoned outputs)
from msca_helpers import ATOL, ERR_FACTOR, max_err


def make(B, Cin, Cout, H, W, seed=0, layout="nchw"):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    if layout == "noncontig":
        x = r(B, 2 * Cin + 1, H + 2, W + 3)[:, 1::2, 1:H + 1, 2:W + 2]
        res = r(B, Cout, H, 2 * W)[..., ::2]
    else:
        x, res = r(B, Cin, H, W), r(B, Cout, H, W)
    if layout == "channels_last":
        x, res = (t.contiguous(memory_format=torch.channels_last) for t in (x, res))
    return x, r(Cout, Cin, scale=Cin ** -0.5), r(Cout, scale=0.5), r(Cout, scale=0.7), res


def check(x, w, act, bias=None, alpha=None, r=None, gamma=None, dtype=torch.float32, fp32_vectors=False):
    """dtype float32, or bfloat16 (x, w, r; the vectors too unless fp32_vectors): the GEMM on bfloat16 operands."""
    cv = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    vec = (lambda t: None if t is None else t.float()) if fp32_vectors else cv  # noqa: E731
    got = pwconv(cv(x), cv(w), vec(bias), act=act, alpha=vec(alpha), r=cv(r), gamma=vec(gamma), backend="cpu")
    ref = pwconv_reference(x, w, bias, act, alpha, r, gamma)
    eager = pwconv_reference(cv(x), cv(w), cv(bias), act, cv(alpha), cv(r), cv(gamma))
    assert got.dtype == dtype and got.shape == ref.shape
    assert not torch.isnan(got).any(), "NaN: an unwritten element?"
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    assert max_err(got, ref) <= ERR_FACTOR * max_err(eager, ref) + ATOL[dtype] * scale
    return got


@pytest.mark.parametrize("act", ["none", "gelu", "relu"])
@pytest.mark.parametrize("epilogue", ["plain", "bias", "residual", "bias_alpha_residual", "gamma_bias_alpha_residual"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 5, 7, 9, 13), (1, 3, 130, 5, 110), (2, 17, 3, 23, 29)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_epilogues_and_odd_sizes(shape, epilogue, act, dtype):
    x, w, b, a, res = make(*shape)
    kw = {"plain": {}, "bias": dict(bias=b), "residual": dict(r=res),
          "bias_alpha_residual": dict(bias=b, alpha=a, r=res),
          "gamma_bias_alpha_residual": dict(bias=b, alpha=a, r=res, gamma=a.flip(0) + 0.5)}[epilogue]
    check(x, w, act, dtype=dtype, **kw)


# (.., 16, 16) and (.., 32, 16): H * W = 256 / 512, image planes the GEMM packs (aliasing_ld); Cout = 150 / 130: two
# equal channel blocks (75 + 75, 65 + 65)
@pytest.mark.parametrize("shape", [(1, 32, 32, 40, 37), (1, 64, 64, 17, 12), (1, 160, 160, 9, 8),
                                   (1, 256, 256, 6, 5), (1, 480, 256, 11, 13), (1, 256, 150, 8, 9),
                                   (1, 40, 150, 16, 16), (2, 330, 130, 32, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segnext_widths(shape, dtype):
    x, w, b, a, res = make(*shape)
    check(x, w, "gelu", bias=b, dtype=dtype)
    check(x, w, "none", bias=b, alpha=a, r=res, dtype=dtype)


def test_out_dtype_and_gemm_dtype():
    """float32 x with gemm_dtype=bfloat16 (bfloat16 GEMM operands, rounded in the kernel) and out_dtype bfloat16 /
    float32; a bfloat16 x with a float32 weight, r and output (the fused block's proj_2 under autocast)."""
    x, w, b, a, res = make(1, 40, 24, 13, 11)
    f32 = lambda t: t.float()  # noqa: E731
    bf = torch.bfloat16
    ref = pwconv_reference(x, w, b, "gelu", a, res)
    for od in (torch.float32, bf):
        got = pwconv(f32(x), f32(w), f32(b), act="gelu", alpha=f32(a), r=res.to(od), out_dtype=od, gemm_dtype=bf,
                     backend="cpu")
        eager = pwconv_reference(f32(x), f32(w), f32(b), "gelu", f32(a), res.to(od), out_dtype=od, gemm_dtype=bf)
        assert got.dtype == od
        bound = ERR_FACTOR * max_err(eager, ref) + ATOL[bf] * max(ref.abs().max().item(), 1.0)
        assert max_err(got, ref) <= bound, od
    got = pwconv(x.to(bf), f32(w), f32(b), alpha=f32(a), r=f32(res), out_dtype=torch.float32, backend="cpu")
    ref = pwconv_reference(x.to(bf).double(), w.to(bf).double(), b, "none", a, res)
    assert got.dtype == torch.float32
    assert max_err(got, ref) <= ATOL[torch.float32] * max(ref.abs().max().item(), 1.0) * 10
    with pytest.raises(TypeError, match="r: expected dtype torch.bfloat16 \\(the output dtype\\)"):
        pwconv(f32(x), f32(w), r=f32(res), out_dtype=bf, backend="cpu")
    with pytest.raises(TypeError, match="gemm_dtype: expected None"):
        pwconv(f32(x), f32(w), gemm_dtype=torch.float16, backend="cpu")


def test_bf16_with_float32_vectors():
    """bfloat16 x with float32 bias / alpha / gamma (the fused block's folded vectors): accepted, fp32 epilogue."""
    x, w, b, a, res = make(1, 40, 24, 13, 11)
    check(x, w, "gelu", bias=b, alpha=a, r=res, gamma=a.flip(0) + 0.5, dtype=torch.bfloat16, fp32_vectors=True)
    with pytest.raises(TypeError, match="bias: expected dtype torch.float32 \\(the dtype of x\\), got torch.bfloat16"):
        pwconv(x.float(), w.float(), b.bfloat16(), backend="cpu")


@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
def test_layouts(layout):
    x, w, b, a, res = make(2, 6, 10, 11, 14, layout=layout)
    got = check(x, w, "relu", bias=b, alpha=a, r=res)
    assert got.is_contiguous()


def test_batch_zero():
    x, w, b, a, res = make(0, 3, 4, 5, 6)
    assert pwconv(x.float(), w.float(), b.float(), backend="cpu").shape == (0, 4, 5, 6)


def test_nan_and_inf_propagate_as_eager():
    x, w, b, a, res = (t.float() for t in make(1, 4, 5, 6, 7))
    x[0, 1, 2, 3] = float("nan")
    res[0, 2, 4, 5] = float("inf")
    for act in ("none", "gelu", "relu"):
        got = pwconv(x, w, b, act=act, alpha=a, r=res, backend="cpu")
        ref = pwconv_reference(x, w, b, act, a, res)
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), act
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_bitwise_equal(dtype):
    x, w, b, a, res = (t.to(dtype) for t in make(2, 48, 40, 37, 41))
    try:
        torch.set_num_threads(1)
        one = pwconv(x, w, b, act="gelu", alpha=a, r=res, backend="cpu")
        torch.set_num_threads(2)
        two = pwconv(x, w, b, act="gelu", alpha=a, r=res, backend="cpu")
    finally:
        torch.set_num_threads(2)
    assert torch.equal(one, two)


def test_gradient_needed_runs_the_reference():
    """The kernel is forward only: with a gradient needed the reference runs and autograd works."""
    x, w, b, a, res = (t.float().requires_grad_() for t in make(1, 4, 5, 6, 7))
    y = pwconv(x, w, b, act="gelu", alpha=a, r=res, backend="cpu")
    assert y.grad_fn is not None
    y.sum().backward()
    assert all(t.grad is not None for t in (x, w, b, a, res))


def test_other_dtypes_fall_back_to_the_reference():
    x, w, b, a, res = make(1, 4, 5, 6, 7)
    for dt in (torch.float64, torch.float16):
        got = pwconv(x.to(dt), w.to(dt), b.to(dt), act="gelu", backend="auto")
        assert got.dtype == dt
        torch.testing.assert_close(got, pwconv_reference(x.to(dt), w.to(dt), b.to(dt), "gelu"))
    with pytest.raises(TypeError, match="cpu"):
        pwconv(x, w, b, backend="cpu")  # float64 is not a dtype of the cpu kernel


def check_gelu_accuracy():
    """GELU alone (a 1 -> 1 channel pwconv with weight 1: the GEMM is exact) on a dense grid of [-12, 12] and the
    special values, against float64 GELU of the same fp32 inputs: absolute error <= 1.5e-6 (eager fp32's own is 1.2e-6
    on this grid; the AVX-512 table 5.3e-7, the AVX2 rational 1.1e-6); NaN, +inf and -inf give NaN, +inf and NaN as
    the float64 formula x / 2 (1 + erf(x / sqrt 2)) in IEEE arithmetic (eager fp32 GELU depends on the CPU: NaN for
    +inf on AVX-512, +inf on AVX2); far below -6 the result is within 1e-8 of 0."""
    x = torch.linspace(-12, 12, 400_001).reshape(1, 1, 1, -1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -6.0, 6.0, -5.9999, 5.9999, 0.0, -1e30, 1e30])
    with torch.no_grad():
        got = pwconv(x, torch.ones(1, 1), None, act="gelu", backend="cpu").double().flatten()
        sgot = pwconv(special.reshape(1, 1, 1, -1), torch.ones(1, 1), None, act="gelu", backend="cpu").flatten()
    xd = x.double().flatten()
    ref = xd * 0.5 * (1 + torch.erf(xd / math.sqrt(2)))
    err = (got - ref).abs().max().item()
    assert err <= 1.5e-6, f"GELU abs error {err:.3e}"
    sd = special.double()
    sref = sd * 0.5 * (1 + torch.erf(sd / math.sqrt(2)))
    assert torch.equal(torch.isnan(sgot), torch.isnan(sref)) and sgot[1].item() == math.inf, sgot
    assert sgot[8].item() == pytest.approx(0.0, abs=1e-8) and sgot[9].item() == special[9].item()


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_gelu_accuracy(isa):
    """The epilogue's GELU (shared with the fused MLP: the AVX-512 table, the AVX2 rational erf)."""
    if isa == "native":
        check_gelu_accuracy()
    else:
        run_with_isa("tests/pwconv/test_pwconv_cpu.py", "t.check_gelu_accuracy()", isa)


@pytest.mark.parametrize("isa", ["avx2"])
def test_bf16_without_avx512_bf16(isa):
    """Below AVX-512 (no vdpbf16ps) bfloat16 runs the fp32 GEMM on bfloat16-rounded copies (gemm_bf16's fallback):
    same checks, out_dtype / gemm_dtype too, fresh process."""
    body = ("x, w, b, a, res = t.make(2, 19, 21, 9, 37)\n"
            "t.check(x, w, 'gelu', bias=b, alpha=a, r=res, dtype=torch.bfloat16)\n"
            "t.check(x, w, 'relu', bias=b, dtype=torch.bfloat16, fp32_vectors=True)\n"
            "t.test_out_dtype_and_gemm_dtype()")
    run_with_isa("tests/pwconv/test_pwconv_cpu.py", body, isa)


def test_opcheck_and_compile_fullgraph():
    x, w, b, a, res = (t.float() for t in make(1, 3, 4, 7, 9))
    fn = lambda x: pwconv(x, w, b, act="relu", alpha=a, r=res, backend="cpu")  # noqa: E731
    check_opcheck_and_compile(torch.ops.segnext_kernels.pwconv_fwd.default, (x, w, b, "gelu", a, res, "cpu"), fn, x)


def test_bad_input(ext):
    x, w, b, a, res = (t.float() for t in make(1, 4, 5, 6, 7))
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        pwconv(x[0], w, b, backend="cpu")
    with pytest.raises(ValueError, match=r"weight: expected shape \(Cout, 4\)"):
        pwconv(x, w[:, :3], b, backend="cpu")
    with pytest.raises(ValueError, match=r"bias: expected shape \(5,\)"):
        pwconv(x, w, b[:4], backend="cpu")
    with pytest.raises(TypeError, match="alpha: expected dtype torch.float32"):
        pwconv(x, w, b, alpha=a.double(), r=res, backend="cpu")
    with pytest.raises(ValueError, match=r"r: expected shape \(1, 5, 6, 7\)"):
        pwconv(x, w, b, r=res[:, :4], backend="cpu")
    with pytest.raises(ValueError, match="act: expected one of"):
        pwconv(x, w, b, act="silu", backend="cpu")
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        pwconv(None, w, b, backend="cpu")
    with pytest.raises(RuntimeError, match="pwconv_forward: act must be"):
        ext.pwconv_forward(x, w, b, 7, None, None)
    with pytest.raises(RuntimeError, match=r"pwconv_forward: w must be a float32 CPU tensor of shape \(Cout, 4\)"):
        ext.pwconv_forward(x, w[:, :2].contiguous(), b, 0, None, None)

"""Bad input to segnext_kernels.nmf2d and to the FusedNMF2D constructor raises a clear error (type and message)
naming the argument, what was expected and what came. nmf2d validates before choosing a backend, so every case is
checked with the "triton" and "reference" backends alike (the checks run on CPU tensors; no kernel is launched)."""
import math

import pytest
import torch

import segnext_kernels.nmf as nmf_mod
from segnext_kernels import backends
from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels import FusedNMF2D, nmf2d

_X = torch.rand(2, 6, 10)
_B = torch.rand(2, 6, 3)
_SHAPE = r"bases: expected a 3-D tensor of shape \(2, 6, R\) with R >= 1 \(B and D of x \(2, 6, 10\)\), got "

CASES = [
    # tensors, ranks, shapes
    ("x not a tensor", dict(x=_X.numpy()), TypeError, r"x: expected a torch.Tensor, got ndarray"),
    ("bases not a tensor", dict(bases=[1.0]), TypeError, r"bases: expected a torch.Tensor, got list"),
    ("x 2-D", dict(x=_X[0]), ValueError, r"x: expected a 3-D tensor \(B, D, N\), got 2-D with shape \(6, 10\)"),
    ("x 4-D", dict(x=_X[None]), ValueError, r"x: expected a 3-D tensor \(B, D, N\), got 4-D"),
    ("bases 2-D", dict(bases=_B[0]), ValueError, _SHAPE + r"a 2-D tensor of shape \(6, 3\)"),
    ("bases B mismatch", dict(bases=_B[:1]), ValueError, _SHAPE + r"shape \(1, 6, 3\)"),
    ("bases D mismatch", dict(bases=_B[:, :5]), ValueError, _SHAPE + r"shape \(2, 5, 3\)"),
    ("bases R = 0", dict(bases=_B[:, :, :0]), ValueError, _SHAPE + r"shape \(2, 6, 0\)"),
    # dtypes
    ("x int32", dict(x=_X.to(torch.int32)), TypeError,
     r"x: expected dtype float16, bfloat16, float32 or float64, got torch.int32"),
    ("x int64", dict(x=_X.long()), TypeError, r"x: expected dtype .* got torch.int64"),
    ("x bool", dict(x=_X > 0.5), TypeError, r"x: expected dtype .* got torch.bool"),
    ("x complex64", dict(x=_X.to(torch.complex64)), TypeError, r"x: expected dtype .* got torch.complex64"),
    ("x float8", dict(x=_X.to(torch.float8_e4m3fn)), TypeError, r"x: expected dtype .* got torch.float8_e4m3fn"),
    ("bases float64 for float32 x", dict(bases=_B.double()), TypeError,
     r"bases: expected dtype torch.float32 \(x's dtype or the compute dtype\), got torch.float64"),
    ("bases float16 for float32 x", dict(bases=_B.half()), TypeError,
     r"bases: expected dtype torch.float32 .* got torch.float16"),
    ("bases float16 for bfloat16 x", dict(x=_X.bfloat16(), bases=_B.half()), TypeError,
     r"bases: expected dtype torch.bfloat16 or torch.float32 .* got torch.float16"),
    ("bases int64", dict(bases=_B.long()), TypeError, r"bases: expected dtype torch.float32 .* got torch.int64"),
    # devices (meta stands in for a second device; the CUDA case is below)
    ("bases on meta", dict(bases=_B.to("meta")), RuntimeError,
     r"bases: expected a tensor on cpu \(the device of x\), got one on meta"),
    # steps
    ("steps negative", dict(steps=-1), ValueError, r"steps: expected steps >= 0, got -1"),
    ("steps float", dict(steps=2.0), TypeError, r"steps: expected an int, got float"),
    ("steps bool", dict(steps=True), TypeError, r"steps: expected an int, got bool"),
    ("steps str", dict(steps="2"), TypeError, r"steps: expected an int, got str"),
    # grad mode
    ("grad_mode unknown", dict(grad_mode="full"), ValueError, r"grad_mode: expected one of \('unrolled', 'one_step'\), got 'full'"),
    ("grad_mode None", dict(grad_mode=None), ValueError, r"grad_mode: expected one of .* got None"),
    # eps: positive, finite, and not rounded to zero (NaN-producing) in the compute dtype
    ("eps zero", dict(eps=0.0), ValueError, r"eps: expected eps > 0 .* got 0.0"),
    ("eps negative", dict(eps=-1e-6), ValueError, r"eps: expected eps > 0 .* got -1e-06"),
    ("eps inf", dict(eps=math.inf), ValueError, r"eps: expected a finite number > 0, got inf"),
    ("eps nan", dict(eps=math.nan), ValueError, r"eps: expected a finite number > 0, got nan"),
    ("eps below float32 normal", dict(eps=1e-40), ValueError,
     r"eps: expected eps >= 1.17549e-38 \(the smallest normal torch.float32, the compute dtype; a smaller eps "
     r"rounds to 0 there and all-zero rows/columns of x give NaN\), got 1e-40"),
    ("eps str", dict(eps="1e-6"), TypeError, r"eps: expected a real number, got str"),
    ("eps bool", dict(eps=True), TypeError, r"eps: expected a real number, got bool"),
    # inv_t
    ("inv_t nan", dict(inv_t=math.nan), ValueError, r"inv_t: expected a finite number, got nan"),
    ("inv_t -inf", dict(inv_t=-math.inf), ValueError, r"inv_t: expected a finite number, got -inf"),
    ("inv_t beyond float32", dict(inv_t=1e39), ValueError,
     r"inv_t: expected \|inv_t\| <= 3.40282e\+38 \(finite in torch.float32, the compute dtype\), got 1e\+39"),
    ("inv_t None", dict(inv_t=None), TypeError, r"inv_t: expected a real number, got NoneType"),
    # return_state
    ("return_state int", dict(return_state=1), TypeError, r"return_state: expected a bool, got int"),
]


def _call(backend, **change):
    args = dict(x=_X, bases=_B, steps=2, grad_mode="unrolled", eps=1e-6, inv_t=1.0, return_state=False)
    args.update(change)
    x, bases, steps = args.pop("x"), args.pop("bases"), args.pop("steps")
    return nmf2d(x, bases, steps, backend=backend, **args)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name,change,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, change, exc, msg, backend):
    with pytest.raises(exc, match=msg):
        _call(backend, **change)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a real device mismatch; this "
                                                         "machine has none (the meta-device case covers the check)")
@pytest.mark.parametrize("which", ["bases", "x"])
def test_device_mismatch_cuda(which):
    x, b = (_X, _B.cuda()) if which == "bases" else (_X.cuda(), _B)
    with pytest.raises(RuntimeError, match=rf"bases: expected a tensor on {x.device} \(the device of x\), got one on "
                                           rf"{b.device}"):
        nmf2d(x, b, 2, backend="reference")


def test_eps_that_rounds_to_zero_really_gives_nan():
    # why "eps below float32 normal" is refused: in float32, 1e-46 is 0 and an all-zero column of x makes the final
    # coef update 0 / 0 (eager reference shown); float64 computes it exactly, so the same eps is accepted there
    x = torch.rand(1, 4, 6)
    x[:, :, 2] = 0
    b = torch.nn.functional.normalize(torch.rand(1, 4, 3), dim=1)
    assert torch.isnan(nmf2d_reference(x, b, 1, eps=1e-46)[..., 2]).all()
    y = nmf2d(x.double(), b.double(), 1, eps=1e-46, backend="reference")
    assert torch.isfinite(y).all()


# unknown backend names ("cudnn") and backend="cuda" on CPU tensors: tests/nmf/test_nmf_triton.py::test_backend_selection
def test_backend_none():
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'cuda', 'triton', 'cpu', 'reference'\), got None"):
        _call(None)


def test_triton_unavailable_says_why(monkeypatch):
    # CPU tensors without the interpreter: Triton cannot run them, and the error says how to make it
    monkeypatch.setattr(backends, "_TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match=r"backend='triton' is not available: Triton kernels need CUDA tensors "
                                           r"\(got cpu tensors\); to run them on CPU tensors set TRITON_INTERPRET=1"):
        _call("triton")
    # on CPU tensors "auto" never tries Triton: the cpu kernels (or, without the extension, the reference)
    assert backends.resolve("nmf2d", "auto", torch.device("cpu"), torch.float32) in ("cpu", "reference")


# ---------------------------------------------------------------------------------------------- FusedNMF2D options
MODULE_CASES = [
    ("MD_S 0", dict(MD_S=0), ValueError, r"MD_S: expected MD_S >= 1, got 0"),
    ("MD_S float", dict(MD_S=1.5), TypeError, r"MD_S: expected an int, got float"),
    ("MD_R 0", dict(MD_R=0), ValueError, r"MD_R: expected MD_R >= 1, got 0"),
    ("MD_R str", dict(MD_R="16"), TypeError, r"MD_R: expected an int, got str"),
    ("train_steps negative", dict(train_steps=-1), ValueError, r"train_steps: expected train_steps >= 0, got -1"),
    ("eval_steps bool", dict(eval_steps=True), TypeError, r"eval_steps: expected an int, got bool"),
    ("eps zero", dict(eps=0), ValueError, r"eps: expected eps > 0 .* got 0"),
    ("eps nan", dict(eps=math.nan), ValueError, r"eps: expected a finite number > 0, got nan"),
    ("inv_t inf", dict(inv_t=math.inf), ValueError, r"inv_t: expected a finite number, got inf"),
    ("inv_t str", dict(inv_t="1"), TypeError, r"inv_t: expected a real number, got str"),
    ("grad_mode unknown", dict(grad_mode="full"), ValueError,
     r"grad_mode must be 'unrolled' or 'one_step', got 'full'"),
    ("generator not a Generator", dict(generator=42), TypeError,
     r"generator: expected a torch.Generator or None, got int"),
    ("backend unknown", dict(backend="tensorrt"), ValueError,
     r"backend: expected one of \('auto', 'cuda', 'triton', 'cpu', 'reference'\), got 'tensorrt'"),
]


@pytest.mark.parametrize("name,kw,exc,msg", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_fused_nmf2d_constructor(name, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        FusedNMF2D(**kw)


def test_fused_nmf2d_generator_reassignment_checked():
    m = FusedNMF2D(MD_R=4)
    with pytest.raises(TypeError, match=r"generator: expected a torch.Generator or None, got int"):
        m.generator = 7
    m.generator = torch.Generator()  # a Generator (or None) is fine at any time
    m.generator = None


def test_fused_nmf2d_errors_at_forward():
    # what only the input decides is checked at the first forward, with nmf2d's messages
    x = torch.rand(1, 8, 3, 3)
    with pytest.raises(ValueError, match=r"eps: expected eps >= 1.17549e-38"):
        FusedNMF2D(MD_R=2, eps=1e-40, backend="reference")(x)           # fine for float64 inputs only
    FusedNMF2D(MD_R=2, eps=1e-40, backend="reference")(x.double())
    m = FusedNMF2D(MD_R=2, backend="reference")
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor \(B, C, H, W\), got 3-D with shape \(8, 3, 3\)"):
        m(x[0])
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, got list"):
        m([1.0])
    with pytest.raises(TypeError, match=r"x: expected dtype float16, bfloat16, float32 or float64, got torch.int64"):
        m(x.long())
    # C not divisible by MD_S and a wrong bases shape: tests/nmf/test_nmf_modules.py::test_generator_option_and_explicit_bases

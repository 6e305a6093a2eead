"""The "cuda" backend end to end on the CPU: the package's own extension code (``csrc/binding.cpp`` and the kernel
files) built with g++ and ``-DSEGNEXT_EMU`` into a torch extension whose functions take CPU tensors, the
kernels running in the CUDA emulation of ``tests/helpers/emu/cuda_emu.h`` (``tests/helpers/emu_build.py`` builds it).

What this adds to the kernel-level emulation tests (test_msca_cuda_emu.py, test_nmf_cuda_emu.py, which call the
launchers through C shims): the path a user's call takes on a GPU, from ``segnext_kernels.msca`` / ``nmf2d`` with
``backend="cuda"`` through the autograd custom ops and their fakes (``torch.library.opcheck``), ``msca/cuda.py`` /
``nmf/cuda.py``, binding.cpp's functions and argument checks, stride and layout handling (the NCHW copy of a
channels_last ``u``), workspace allocation, NaN poisoning and partial-gradient handling, down to the kernels. The
GPU tests' own check function (``msca_helpers.check_backend``) runs here too. Not covered: anything of the real device
runtime (streams, device guard, launch errors, device attributes: binding.cpp's ``SEGNEXT_EMU`` block stands in for
them with an H100's 132 SMs and 227 KB of shared memory), timing and the hardware (tests/msca/test_msca_cuda_gpu.py,
tests/nmf/test_nmf_cuda_gpu.py on a GPU).

Skipped, saying why, where g++, ninja or the CUDA headers are missing. The first test builds the extension (about a
minute; cached under pytest's cache directory, or a session temp dir with ``-p no:cacheprovider``).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import segnext
import segnext_kernels
from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels import backends, extension, knobs
from segnext_kernels.msca import cuda as msca_cuda
from segnext_kernels.nmf import cuda as nmf_cuda
from segnext_kernels.msca.reference import pack_weights
from segnext_kernels.nmf import nmf2d

from msca_helpers import GRAD_NAMES, check_backend as msca_check, check_fused_segnext_t_matches_eager, make_msca, run_backend
from nmf_helpers import check as nmf_check, make as nmf_make, max_err as nmf_max_err, opcheck_nmf_ops
from autocast_checks import (check_autocast_fused_model, check_autocast_fused_msca,
                             check_autocast_nmf2d_updates_stay_fp32)
from emu_build import build_torch_extension, skip_reason

pytestmark = pytest.mark.skipif(skip_reason(torch_extension=True) is not None,
                                reason=str(skip_reason(torch_extension=True)))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def emu_ext(request, tmp_path_factory):
    cache_plugin = getattr(request.config, "cache", None)
    build_dir = Path(cache_plugin.mkdir("cuda_ext_emu")) if cache_plugin else tmp_path_factory.mktemp("cuda_ext_emu")
    return build_torch_extension(build_dir)


def set_knobs(monkeypatch, **change):
    """Replace ``knobs.KNOBS`` with ``change`` applied, for the rest of the test."""
    monkeypatch.setattr(knobs, "KNOBS", dataclasses.replace(knobs.KNOBS, **change))


@pytest.fixture(autouse=True)
def cuda_backend_on_cpu(emu_ext, monkeypatch):
    """For one test: the emulated extension is the loaded extension and backend="cuda" accepts CPU tensors; outputs
    and workspaces of the MSCA ops and every NMF buffer are poisoned with NaN, the other CUDA knobs at their defaults
    (``knobs.KNOBS`` replaced); TF32 off (the GPU tests' defaults)."""
    monkeypatch.setattr(extension.CUDA_EXTENSION, "_ext", emu_ext)
    monkeypatch.setattr(extension.CUDA_EXTENSION, "_error", None)
    cuda = backends._BACKENDS["cuda"]
    monkeypatch.setitem(backends._BACKENDS, "cuda", backends.Backend(cuda.name, cuda.what, lambda device: (True, ""),
                                                                     cuda.hint))
    monkeypatch.setattr(knobs, "KNOBS", dataclasses.replace(
        knobs.KNOBS, msca_cuda_tile=-1, msca_cuda_tile_bwd=-1, msca_cuda_dw="auto", msca_cuda_cl_direct=False,
        msca_cuda_poison=True, nmf_cuda_p=0, nmf_cuda_mtw=0))
    monkeypatch.setattr(nmf_cuda, "_empty",
                        lambda *shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------------------------------------------------
# MSCA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    (torch.float32, (2, 5, 9, 13), "nchw"),
    (torch.bfloat16, (1, 6, 11, 8), "channels_last"),        # binding's NCHW copy of u, du written back
    (torch.float16, (2, 3, 7, 10), "noncontig"),             # a view with offsets and gaps
    (torch.float32, (1, 3, 1, 1), "nchw"),                   # smaller than every filter
    (torch.bfloat16, (1, 4, 5, 23), "channels_last_direct"),  # knob msca_cuda_cl_direct: u read in place
], ids=lambda c: f"{str(c[0])[6:]}-{'x'.join(map(str, c[1]))}-{c[2]}")
def test_msca_public_api_forward_backward(case, monkeypatch):
    """segnext_kernels.msca(..., backend="cuda") against the float64 reference, with the GPU test's own check."""
    dtype, shape, layout = case
    if layout == "channels_last_direct":
        set_knobs(monkeypatch, msca_cuda_cl_direct=True)
    args = make_msca(*shape, dtype=dtype, device="cpu", channels_last=layout.startswith("channels_last"),
                     noncontig=layout == "noncontig")
    wide = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], dtype=dtype)
    msca_check(args, dtype, wide[..., ::2])  # strided grad_output


def test_fused_segnext_t_matches_eager_model():
    """All 13 MSCA modules of SegNeXt-T on the cuda backend (C from 32 to 256): logits and every parameter gradient
    against the eager model (the check tests/msca/test_msca_modules.py runs for Triton)."""
    check_fused_segnext_t_matches_eager("cuda", torch.device("cpu"))


def test_msca_tf32_mix():
    torch.backends.cuda.matmul.allow_tf32 = True  # read by binding.cpp at each call (restored by the fixture)
    shape = (1, 16, 6, 9)
    args = make_msca(*shape, dtype=torch.float32, device="cpu")
    msca_check(args, torch.float32, torch.randn(shape), tf32=True)


def test_msca_batch_zero():
    args = make_msca(0, 4, 5, 6, dtype=torch.bfloat16, device="cpu")
    out, grads = run_backend(args, torch.randn(0, 4, 5, 6, dtype=torch.bfloat16))
    assert out.shape == (0, 4, 5, 6) and grads[0].shape == (0, 4, 5, 6)
    for n, g in zip(GRAD_NAMES[1:], grads[1:]):
        assert torch.count_nonzero(g) == 0, n


def test_msca_partial_needs():
    """Only the gradient groups asked for are computed; the rest come back as None, and what is computed equals the
    full backward's bits."""
    shape = (1, 4, 6, 7)
    u, w0, b0, sw, sb, w3, b3 = make_msca(*shape, dtype=torch.float32, device="cpu")
    packed = pack_weights(w0, b0, sw, sb, w3, b3, torch.float32)
    g = torch.randn(shape)
    full = msca_cuda.backward(g, u, *packed, (True,) * 7)
    assert all(t is not None and not torch.isnan(t).any() for t in full)
    for needs in [(True,) + (False,) * 6, (False, True, False, True, False, False, False),
                  (False,) * 5 + (True, True)]:
        part = msca_cuda.backward(g, u, *packed, needs)
        for i, (n, p, f) in enumerate(zip(needs, part, full)):
            assert torch.equal(p, f) if n else p is None, (needs, i)


def test_msca_custom_op_opcheck_and_compile():
    """The package's custom op on the cuda backend (opcheck with autograd), and torch.compile of the public op."""
    shape = (1, 4, 6, 5)
    u, w0, b0, sw, sb, w3, b3 = make_msca(*shape, dtype=torch.float32, device="cpu")
    packed = [t.requires_grad_() for t in pack_weights(w0, b0, sw, sb, w3, b3, torch.float32)]
    torch.library.opcheck(torch.ops.segnext_kernels.msca_fwd.default, (u.requires_grad_(), *packed, "cuda"))
    ws = [w0, b0, *sw, *sb, w3, b3]

    def f(u, *ws):
        return segnext_kernels.msca(u, ws[0], ws[1], list(ws[2:8]), list(ws[8:14]), ws[14], ws[15], backend="cuda")

    with torch.no_grad():
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(u, *ws), f(u, *ws))


def test_msca_binding_rejects_bad_arguments(emu_ext):
    """binding.cpp's own checks (what reaches its functions directly) name the argument and what was expected."""
    shape = (1, 4, 5, 6)
    u, w0, b0, sw, sb, w3, b3 = make_msca(*shape, dtype=torch.float32, device="cpu")
    packed = list(pack_weights(w0, b0, sw, sb, w3, b3, torch.float32))
    op = emu_ext.msca_forward
    with pytest.raises(RuntimeError, match=r"u: the cuda MSCA backend supports float32, float16 and bfloat16"):
        op(u.double(), *packed)
    with pytest.raises(RuntimeError, match=r"u: expected a 4-D tensor"):
        op(u[0], *packed)
    bad = list(packed)
    bad[4] = torch.zeros(5, 5)
    with pytest.raises(RuntimeError, match=r"w3: expected shape \[4, 4\], got \[5, 5\]"):
        op(u, *bad)
    bad = list(packed)
    bad[0] = packed[0].half()
    with pytest.raises(RuntimeError, match=r"w0: expected float32 packed weights"):
        op(u, *bad)
    with pytest.raises(RuntimeError, match=r"grad_out: expected dtype"):
        emu_ext.msca_backward(torch.randn(shape).half(), u, *packed, [True] * 7)
    with pytest.raises(RuntimeError, match=r"grad_out: expected shape"):
        emu_ext.msca_backward(torch.randn(1, 4, 5, 7), u, *packed, [True] * 7)
    with pytest.raises(RuntimeError, match=r"dw_variant: expected 0 \(auto\), 1 \(tensor cores\) or 2 \(fp32 FMA\), "
                                           r"got 7"):
        op(u, *packed, dw_variant=7)
    with pytest.raises(TypeError):  # the knobs are keyword-only
        op(u, *packed, -1)
    with pytest.raises(TypeError, match=r"backend='cuda': the cuda msca kernels take float32, float16, bfloat16"):
        segnext_kernels.msca(*make_msca(*shape, dtype=torch.float64, device="cpu"), backend="cuda")


def test_msca_depthwise_variant_knob(monkeypatch):
    """knobs.KNOBS.msca_cuda_dw (SEGNEXT_MSCA_CUDA_DW) picks the depthwise variant (fp16/bf16 run on tensor cores
    unless it says "fma"); "tc" refuses float32 and an unknown value is an error naming the variable."""
    shape = (1, 5, 9, 12)
    set_knobs(monkeypatch, msca_cuda_dw="fma")
    msca_check(make_msca(*shape, dtype=torch.bfloat16, device="cpu"), torch.bfloat16,
               torch.randn(shape, dtype=torch.bfloat16))
    set_knobs(monkeypatch, msca_cuda_dw="tc")
    with pytest.raises(RuntimeError, match="tensor-core depthwise variant takes float16/bfloat16"):
        segnext_kernels.msca(*make_msca(*shape, dtype=torch.float32, device="cpu"), backend="cuda")
    set_knobs(monkeypatch, msca_cuda_dw="wgmma")
    with pytest.raises(ValueError, match="SEGNEXT_MSCA_CUDA_DW: expected 'auto', 'tc' or 'fma', got 'wgmma'"):
        segnext_kernels.msca(*make_msca(*shape, dtype=torch.bfloat16, device="cpu"), backend="cuda")


def test_msca_knobs_reach_forward_and_backward(monkeypatch, emu_ext):
    """msca/cuda.py passes the knobs of knobs.KNOBS to the extension as arguments, the same depthwise variant to the
    forward and the backward, the forward's and the backward's tile knob to each."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(emu_ext, name)

            def call(*a, **k):
                calls.append((name, k))
                return fn(*a, **k)
            return call

    monkeypatch.setattr(extension.CUDA_EXTENSION, "_ext", Spy())
    set_knobs(monkeypatch, msca_cuda_dw="fma", msca_cuda_tile=3, msca_cuda_tile_bwd=2)
    shape = (1, 4, 6, 7)
    run_backend(make_msca(*shape, dtype=torch.bfloat16, device="cpu"), torch.randn(shape, dtype=torch.bfloat16))
    assert [(n, k) for n, k in calls if n.startswith("msca_")] == [
        ("msca_forward", dict(tile_cfg=3, dw_variant=2, cl_direct=False, poison=True)),
        ("msca_backward", dict(tile_cfg=2, dw_variant=2, cl_direct=False, poison=True))], calls


def test_bench_runs_both_depthwise_variants(monkeypatch):
    """bench.msca times the cuda backend as "cuda" (depthwise on tensor cores for bf16) and "cuda_fma"
    (knobs.KNOBS.msca_cuda_dw = "fma" during its rows only); fp32 has no separate cuda_fma row."""
    from bench import common, msca as bench_msca

    seen = []
    real = segnext_kernels.msca
    before = knobs.KNOBS

    def spy(*a, **k):
        seen.append(knobs.KNOBS.msca_cuda_dw)
        return real(*a, **k)

    monkeypatch.setattr(segnext_kernels, "msca", spy)
    rows = bench_msca.run_cases({"t": (1, 4, 8, 8)}, ["bf16", "fp32"], ["fwd"], ["cuda", "cuda_fma"],
                                torch.device("cpu"), {}, common.Budget(None), labels={}, warmup_ms=1, rep_ms=1)
    st = {(r["dtype"], r["impl"]): r for r in rows}
    assert st[("bf16", "cuda")]["status"] == "ok" and st[("bf16", "cuda_fma")]["status"] == "ok", rows
    assert st[("fp32", "cuda_fma")]["status"].startswith("skipped"), rows
    assert st[("bf16", "cuda_fma")]["rel_err"] < bench_msca.CHECK_TOL["bf16"]
    assert set(seen) == {"auto", "fma"} and knobs.KNOBS is before


def test_msca_forced_tile_too_big_for_shared_memory_is_reported(monkeypatch):
    """A tile configuration whose shared memory exceeds the device's is refused by the plan with a clear error."""
    C = 1200  # the largest tile's S buffer (P x C) is far beyond 227 KB
    args = make_msca(1, C, 4, 4, dtype=torch.float32, device="cpu")
    set_knobs(monkeypatch, msca_cuda_tile=0)
    with pytest.raises(RuntimeError, match="shared memory"):
        segnext_kernels.msca(*args, backend="cuda")


# ---------------------------------------------------------------------------------------------------------------
# NMF2D
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["unrolled", "one_step"])
def test_nmf_public_api_forward_backward(mode, dtype):
    """nmf2d(..., backend="cuda") against the float64 reference, forward and both gradients (odd D, N, R)."""
    x, bases = nmf_make(2, 19, 37, 5)
    gy = torch.randn(2, 19, 37, dtype=torch.float64)
    y, gx, _ = nmf_check(x, bases, 2, mode, dtype, gy, backend="cuda",
                         atol=1e-5 if dtype == torch.float32 else None)
    assert y.dtype == dtype and gx.dtype == dtype


def test_nmf_strided_x_return_state_and_steps_zero():
    x, bases = nmf_make(1, 24, 50, 3, dtype=torch.float32)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, D, N) values with D-contiguous strides
    y, bk, cf = nmf2d(xt, bases, 2, return_state=True, backend="cuda")
    yr, bkr, cfr = nmf2d_reference(x.double(), bases.double(), 2, return_state=True)
    for name, g, r in (("recon", y, yr), ("bases", bk, bkr), ("coef", cf, cfr)):
        assert nmf_max_err(g, r) <= 1e-4 * max(r.abs().max().item(), 1e-30), name
    y0 = nmf2d(x, bases, 0, backend="cuda")
    assert nmf_max_err(y0, nmf2d_reference(x.double(), bases.double(), 0)) <= 1e-4 * y0.abs().max().item()


def test_nmf_opcheck_cuda_backend():
    """The package's NMF2D custom ops on the cuda backend (as tests/nmf/test_nmf_cuda_gpu.py does on a GPU)."""
    x, b = nmf_make(1, 16, 20, 3, dtype=torch.float32)
    opcheck_nmf_ops(x, b, "cuda")


def test_nmf_float64_is_refused():
    x, bases = nmf_make(1, 8, 10, 2)
    with pytest.raises(TypeError, match=r"backend='cuda': the cuda nmf2d kernels take float32, float16, bfloat16"):
        nmf2d(x, bases, 1, backend="cuda")


def test_fused_nmf2d_module_on_cuda_backend():
    """FusedNMF2D(backend="cuda") equals the reference NMF2D under the same seed (forward), and back-propagates."""
    torch.manual_seed(0)
    ref = segnext.NMF2D(MD_R=4, train_steps=2, eval_steps=2)
    fused = segnext_kernels.FusedNMF2D(MD_R=4, train_steps=2, eval_steps=2, backend="cuda")
    x = torch.rand(1, 12, 5, 7)
    torch.manual_seed(1)
    y_ref = ref(x.double())
    torch.manual_seed(1)
    xg = x.clone().requires_grad_()
    y = fused(xg)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert nmf_max_err(y, y_ref) <= 1e-4 * y_ref.abs().max().item()
    y.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# autocast (the GPU tests' checks, on torch.autocast("cpu"))
# ---------------------------------------------------------------------------------------------------------------
def test_autocast_fused_msca():
    check_autocast_fused_msca("cuda", torch.bfloat16, torch.device("cpu"), C=8, H=9, W=11)


def test_autocast_nmf2d_updates_stay_fp32():
    check_autocast_nmf2d_updates_stay_fp32("cuda", torch.bfloat16, torch.device("cpu"), B=2, D=24, N=40, R=4)


def test_autocast_fused_segnext_t():
    """fuse(model, backend="cuda") on a small SegNeXt-T (4 MSCA, 1 NMF2D) under autocast, forward and backward."""
    check_autocast_fused_model("cuda", torch.bfloat16, torch.device("cpu"), size=32)

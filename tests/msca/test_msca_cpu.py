"""The "cpu" MSCA backend (hand-written C++ kernels, csrc/cpu/, segnext_kernels/msca/cpu.py) against the eager
reference: forward and every gradient, all dtypes, borders, layouts, NaN/Inf, threads, every vector ISA, torch
integration and a whole fused SegNeXt-T.

Tolerances: the flash-attention rule of msca_helpers (kernel error <= 2 x eager's error in the same dtype + ATOL x
scale, against float64). Outputs and weight gradients are poisoned with NaN at allocation (``set_poison``), so an
element the kernels do not write fails the test.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import segnext
import segnext_kernels
from segnext_kernels.extension import CPU_EXTENSION
from segnext_kernels.msca import cpu as msca_cpu
from segnext_kernels.msca.reference import pack_weights

from msca_helpers import (GRAD_NAMES, check_backend, check_fused_segnext_t_matches_eager, leaves, make_msca,
                          max_err, rebuild, reference_fwd_bwd, run_backend)

ROOT = Path(__file__).resolve().parents[2]
BORDER_SHAPES = [(1, 3, 1, 1), (2, 3, 2, 3), (1, 4, 5, 21), (1, 2, 23, 7), (1, 5, 7, 23)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(scope="module")
def ext():
    return CPU_EXTENSION.load()  # a build or load failure fails here, loudly (no skip: the backend must exist)


@pytest.fixture(autouse=True)
def poison(ext):
    ext.set_poison(True)
    yield
    ext.set_poison(False)


def check(args, dtype, grad_out=None):
    return check_backend(args, dtype, grad_out, backend="cpu")


def test_extension_loads_and_names_its_isa(ext):
    assert msca_cpu.isa() in ("avx512", "avx2", "scalar")
    assert segnext_kernels.supports("msca", "cpu", "cpu", torch.float32) == (True, "")
    ok, why = segnext_kernels.supports("msca", "cpu", "meta", torch.float32)
    assert not ok and "needs CPU tensors" in why


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BORDER_SHAPES + [(2, 17, 9, 13), (1, 1, 30, 31)], ids=str)
def test_borders_and_odd_sizes(shape, dtype):
    args = make_msca(*shape, dtype=dtype, device="cpu")
    check(args, dtype, torch.randn(shape, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 32, 48, 40), (1, 64, 20, 24), (2, 160, 9, 8), (1, 256, 6, 5)], ids=str)
def test_stage_like_shapes(shape, dtype):
    """SegNeXt's stage widths at small, odd images (the tiling across channels and rows)."""
    args = make_msca(*shape, dtype=dtype, device="cpu")
    check(args, dtype, torch.randn(shape).to(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_and_strided_grad_output(layout, dtype):
    shape = (2, 6, 11, 14)
    args = make_msca(*shape, dtype=dtype, device="cpu", channels_last=layout == "channels_last",
                     noncontig=layout == "noncontig")
    wide = torch.randn(2, 6, 11, 28, dtype=dtype)
    out, _ = check(args, dtype, wide[..., ::2])                       # strided grad_output
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    check(args, dtype, torch.randn(1, 6, 11, 1, dtype=dtype).expand(shape))   # zero-stride grad_output


def test_gradcheck_fp64():
    args = make_msca(1, 3, 6, 7, dtype=torch.float64, device="cpu")
    flat = [t.detach().clone().requires_grad_(True) for t in leaves(args)]
    assert torch.autograd.gradcheck(lambda *f: segnext_kernels.msca(*rebuild(list(f)), backend="cpu"), flat,
                                    eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_batch_zero():
    args = make_msca(0, 5, 8, 9, device="cpu")
    out, grads = run_backend(args, torch.randn(0, 5, 8, 9), backend="cpu")
    assert out.shape == (0, 5, 8, 9)
    assert grads[0].shape == (0, 5, 8, 9) and all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def test_partial_requires_grad_computes_only_what_is_asked(ext):
    args = make_msca(1, 4, 9, 10, device="cpu")
    u, w0, b0, sw, sb, w3, b3 = [t.detach() for t in leaves(args)[:3]] + [None] * 4
    flat = [t.detach().clone() for t in leaves(args)]
    ref_out, ref_grads = reference_fwd_bwd(args, torch.ones(1, 4, 9, 10), torch.float64)
    for want in ([0], [15, 16], [1, 2, 3, 9], [0, 15]):   # u only; the 1x1 only; depthwise only; mixed
        leaves_ = [t.clone().requires_grad_(i in want) for i, t in enumerate(flat)]
        out = segnext_kernels.msca(*rebuild(leaves_), backend="cpu")
        grads = torch.autograd.grad(out, [leaves_[i] for i in want], torch.ones_like(out))
        for i, g in zip(want, grads):
            assert max_err(g, ref_grads[i]) <= 1e-4 * max(1.0, ref_grads[i].abs().max().item()), GRAD_NAMES[i]
    packed = pack_weights(*leaves(args)[1:3], leaves(args)[3:9], leaves(args)[9:15], *leaves(args)[15:],
                          torch.float32)
    res = msca_cpu.backward(torch.ones(1, 4, 9, 10), flat[0], *packed, (False, False, False, False, False, True, True))
    assert res[:5] == (None,) * 5 and res[5] is not None and res[6] is not None


def test_nonfinite_like_eager():
    args = make_msca(1, 4, 40, 48, device="cpu")
    u = args[0].clone()
    u[0, 1, 2, 3] = float("nan")       # each spreads over its 25 x 25 receptive field, through every channel
    u[0, 2, 36, 44] = float("inf")
    args = (u,) + tuple(args[1:])
    out, _ = run_backend(args, backend="cpu")
    ref, _ = reference_fwd_bwd(args)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.isnan(ref).any() and torch.isinf(ref).any() and finite.sum() > finite.numel() // 4
    assert max_err(out[finite], ref[finite]) <= 1e-4 * ref[finite].abs().max().item()


def _run_threads(threads: int, dtype) -> list:
    torch.set_num_threads(threads)
    try:
        args = make_msca(2, 40, 33, 37, dtype=dtype, device="cpu", seed=3)
        g = torch.randn(2, 40, 33, 37, generator=torch.Generator().manual_seed(4)).to(dtype)
        out, grads = run_backend(args, g, backend="cpu")
        return [out] + grads
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_bitwise_equal(dtype):
    a, b = _run_threads(1, dtype), _run_threads(2, dtype)
    for name, x, y in zip(["out"] + GRAD_NAMES, a, b):
        assert torch.equal(x, y), name
    c = _run_threads(2, dtype)
    assert all(torch.equal(x, y) for x, y in zip(b, c))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_vector_isa(isa):
    """SEGNEXT_CPU_ISA is read once per process: each ISA in a fresh one (a lower ISA than the CPU has is forced;
    a higher one falls back to the best the CPU has, and the test then checks that path again)."""
    code = (
        "import sys, torch; sys.path.insert(0, 'tests/helpers'); import msca_helpers as h\n"
        "from segnext_kernels.msca import cpu\n"
        "print(cpu.isa())\n"
        "for dt, shape in ((torch.float32, (2, 19, 13, 29)), (torch.bfloat16, (1, 33, 8, 21)),\n"
        "                  (torch.float16, (1, 4, 5, 21)), (torch.float32, (1, 3, 1, 1))):\n"
        "    args = h.make_msca(*shape, dtype=dt, device='cpu')\n"
        "    h.check_backend(args, dt, torch.randn(shape).to(dt), backend='cpu')\n")
    env = dict(os.environ, SEGNEXT_CPU_ISA=isa)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    got = p.stdout.split()[0]
    order = ["scalar", "avx2", "avx512"]
    assert order.index(got) <= order.index(isa), got


def test_opcheck():
    args = make_msca(1, 3, 7, 9, device="cpu")
    packed = pack_weights(*leaves(args)[1:3], leaves(args)[3:9], leaves(args)[9:15], *leaves(args)[15:],
                          torch.float32)
    u = args[0].clone().requires_grad_()
    packed = [p.clone().requires_grad_() for p in packed]
    torch.library.opcheck(torch.ops.segnext_kernels.msca_fwd.default, (u, *packed, "cpu"))


def test_compile_fullgraph_no_graph_break():
    m = segnext_kernels.FusedMSCA(8, backend="cpu")
    x = torch.randn(1, 8, 13, 11, requires_grad=True)
    ref = m(x)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    (rx,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, rx, rtol=0, atol=0)


def test_autocast_bf16():
    ref_mod = segnext.AttentionModule(12)
    fused = segnext_kernels.FusedMSCA.from_module(ref_mod, backend="cpu")
    x = torch.randn(1, 12, 15, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(x)
        eager = ref_mod(x)
    assert got.dtype == eager.dtype
    with torch.no_grad():
        ref64 = segnext.AttentionModule(12).double()
        ref64.load_state_dict(ref_mod.state_dict())
        r = ref64(x.double())
    scale = r.abs().max().item()
    assert max_err(got, r) <= 2 * max_err(eager, r) + 1e-2 * scale


def test_bad_input_same_errors_as_other_backends():
    args = make_msca(1, 4, 6, 6, device="cpu")
    u, w0, b0, sw, sb, w3, b3 = args
    with pytest.raises(ValueError, match=r"conv0_weight: expected shape \(4, 1, 5, 5\)"):
        segnext_kernels.msca(u, w0[:, :, :3], b0, sw, sb, w3, b3, backend="cpu")
    with pytest.raises(TypeError, match="conv3_bias: expected dtype torch.float32"):
        segnext_kernels.msca(u, w0, b0, sw, sb, w3, b3.double(), backend="cpu")
    with pytest.raises(RuntimeError, match="backend='cpu' is not available: the CPU backend needs CPU tensors"):
        segnext_kernels.msca(*[t.to("meta") if isinstance(t, torch.Tensor) else [s.to("meta") for s in t]
                               for t in args], backend="cpu")


def test_the_extension_checks_its_arguments(ext):
    """The C++ entry points check what the Python layer already did (a direct caller gets an error, not a crash)."""
    args = make_msca(1, 4, 6, 6, device="cpu")
    packed = pack_weights(*leaves(args)[1:3], leaves(args)[3:9], leaves(args)[9:15], *leaves(args)[15:],
                          torch.float32)
    with pytest.raises(RuntimeError, match="w3"):
        ext.msca_forward(args[0], *packed[:4], packed[4][:2], packed[5])
    with pytest.raises(RuntimeError):
        ext.msca_forward(args[0].to(torch.int32), *packed)


def test_no_memory_growth():
    m = segnext_kernels.FusedMSCA(16, backend="cpu")
    x = torch.randn(1, 16, 20, 21, requires_grad=True)

    def step():
        m(x).sum().backward()

    for _ in range(3):
        step()
    gc.collect()
    n0 = len(gc.get_objects())
    for _ in range(20):
        step()
    gc.collect()
    assert len(gc.get_objects()) - n0 < 50


def test_fused_segnext_t_matches_eager_model():
    check_fused_segnext_t_matches_eager("cpu", torch.device("cpu"))


def test_auto_picks_cpu_and_says_so_once():
    from segnext_kernels import backends

    backends._warned.clear()
    with pytest.warns(RuntimeWarning, match="backend 'auto' runs 'cpu'"):
        assert backends.resolve("msca", "auto", torch.device("cpu"), torch.float32) == "cpu"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("msca", "auto", torch.device("cpu"), torch.float32) == "cpu"


def test_torch_export_and_onnx_export_run_in_onnxruntime():
    """A model with fused MSCA modules exports (torch.export; torch.onnx.export with dynamo=True) as the reference's
    ops, and ONNX Runtime runs the exported model with eager's outputs."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[bench]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -e '.[bench]')")
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), segnext.AttentionModule(8)).eval()
    fused = torch.nn.Sequential(eager[0], segnext_kernels.FusedMSCA.from_module(eager[1], backend="cpu")).eval()
    x = torch.randn(1, 8, 19, 23)
    with torch.no_grad():
        ref = eager(x)
        assert max_err(fused(x), ref) <= 1e-5 * ref.abs().max().item()
    ep = torch.export.export(fused, (x,))
    assert max_err(ep.module()(x), ref) <= 1e-5 * ref.abs().max().item()
    onnx_program = torch.onnx.export(fused, (x,), dynamo=True)
    path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"fused_msca_{os.getpid()}.onnx"
    onnx_program.save(str(path))
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    finally:
        path.unlink(missing_ok=True)
    assert max_err(torch.from_numpy(got), ref) <= 1e-4 * ref.abs().max().item()

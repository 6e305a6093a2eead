"""MSCA's eager direct path on the "cpu" backend (``segnext_kernels/msca/cpu.py`` ``direct``,
``csrc/cpu/msca_cpu_direct.cpp``): in plain eager code ``segnext_kernels.msca`` calls the kernels without the custom
ops, the weights packed in C++. It must give bitwise the custom ops' results (forward and every gradient, every
dtype, layouts, partial requires_grad), follow in-place weight updates, and step aside (custom ops) wherever
something observes the ops: the profiler, a dispatch mode, torch.compile.

The rest of the backend's tests (tests/msca/test_msca_cpu.py) call ``msca`` in plain eager code and so run this
path against the float64 reference.
"""
from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import segnext_kernels
from segnext_kernels.extension import CPU_EXTENSION
from segnext_kernels.msca import cpu as msca_cpu
from segnext_kernels.msca.reference import pack_weights

from msca_helpers import leaves, make_msca, rebuild

interface = importlib.import_module("segnext_kernels.msca.interface")


@pytest.fixture(autouse=True)
def poison():
    ext = CPU_EXTENSION.load()
    ext.set_poison(True)
    yield
    ext.set_poison(False)


def _run(flat, grad_out, want):
    out = segnext_kernels.msca(*rebuild(flat), backend="cpu")
    grads = torch.autograd.grad(out, [flat[i] for i in want], grad_out) if want else []
    return [out, *grads]


def _both(flat, grad_out, want):
    """(direct path, custom-op path) results of the same call."""
    calls = []
    real = msca_cpu._Direct.apply
    with mock.patch.object(msca_cpu._Direct, "apply", side_effect=lambda *a: calls.append(1) or real(*a)):
        a = _run(flat, grad_out, want)
    assert calls or not want, "the direct path did not run"
    with mock.patch.object(interface, "eager_direct_ok", return_value=False):
        b = _run(flat, grad_out, want)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_direct_equals_custom_op_bitwise(dtype, layout):
    args = make_msca(2, 19, 13, 29, dtype=dtype, device="cpu", channels_last=layout == "channels_last",
                     noncontig=layout == "noncontig")
    flat = [t.detach().clone().requires_grad_(True) for t in leaves(args)]
    g = torch.randn(2, 19, 13, 58, dtype=torch.float64).to(dtype)[..., ::2]  # strided grad_output
    a, b = _both(flat, g, list(range(17)))
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x, y), i
    assert a[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("want", [[0], [16, 1], [3, 12], [2, 5, 9, 14], []], ids=str)
def test_direct_partial_requires_grad(want):
    args = make_msca(1, 7, 9, 10, device="cpu")
    flat = [t.detach().clone().requires_grad_(i in want) for i, t in enumerate(leaves(args))]
    a, b = _both(flat, torch.randn(1, 7, 9, 10), want)
    assert len(a) == len(want) + 1 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_direct_noncontiguous_weights():
    """Weights that are views with gaps (the C++ packing reads any strides)."""
    args = make_msca(1, 6, 8, 9, device="cpu")
    u, w0, b0, sw, sb, w3, b3 = args
    views = (u, torch.randn(6, 1, 5, 10)[..., ::2], torch.randn(12)[::2], [torch.randn(*s[:3], 2 * s[3])[..., ::2]
             if s[3] > 1 else torch.randn(s[0], s[1], 2 * s[2], 1)[:, :, ::2] for s in (t.shape for t in sw)],
             [torch.randn(12)[1::2] for _ in sb], torch.randn(6, 6, 1, 1).transpose(0, 1), b3)
    with torch.no_grad():
        got = segnext_kernels.msca(*views, backend="cpu")
        with mock.patch.object(interface, "eager_direct_ok", return_value=False):
            ref = segnext_kernels.msca(*views, backend="cpu")
    assert torch.equal(got, ref)


def test_direct_follows_in_place_weight_updates():
    """Nothing is cached between calls: an in-place update of any weight changes the next result."""
    args = make_msca(1, 5, 7, 8, device="cpu")
    flat = [t.detach().clone() for t in leaves(args)]
    with torch.no_grad():
        before = segnext_kernels.msca(*rebuild(flat), backend="cpu")
        for i in range(1, 17):
            flat[i].add_(0.125)
            after = segnext_kernels.msca(*rebuild(flat), backend="cpu")
            assert not torch.equal(after, before), i
            before = after
        with mock.patch.object(interface, "eager_direct_ok", return_value=False):
            assert torch.equal(segnext_kernels.msca(*rebuild(flat), backend="cpu"), before)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_observed_code_gets_the_custom_op():
    args = make_msca(1, 4, 6, 7, device="cpu")
    with torch.no_grad():
        ref = segnext_kernels.msca(*args, backend="cpu")
        with _Ops() as mode:
            got = segnext_kernels.msca(*args, backend="cpu")
        assert any("segnext_kernels.msca_fwd" in n for n in mode.names), mode.names
        assert torch.equal(got, ref)
        with torch.profiler.profile() as prof:
            segnext_kernels.msca(*args, backend="cpu")
        assert any(e.name == "segnext_kernels::msca_fwd" for e in prof.events())


def test_direct_path_skips_the_custom_op_in_plain_eager():
    args = make_msca(1, 4, 6, 7, device="cpu")
    flat = [t.detach().clone().requires_grad_(True) for t in leaves(args)]
    with mock.patch.object(torch.ops.segnext_kernels, "msca_fwd", side_effect=AssertionError("custom op ran")):
        out = segnext_kernels.msca(*rebuild(flat), backend="cpu")
        torch.autograd.grad(out, flat, torch.randn_like(out))
        with torch.no_grad():
            segnext_kernels.msca(*args, backend="cpu")


def test_direct_gradcheck_fp64_and_bad_input():
    args = make_msca(1, 3, 6, 7, dtype=torch.float64, device="cpu")
    flat = [t.detach().clone().requires_grad_(True) for t in leaves(args)]
    assert torch.autograd.gradcheck(lambda *f: msca_cpu.direct(*rebuild(list(f))), flat, eps=1e-6, atol=1e-8,
                                    rtol=1e-6, fast_mode=True)
    ext = CPU_EXTENSION.load()
    u, w0, b0, sw, sb, w3, b3 = make_msca(1, 4, 6, 6, device="cpu")
    with pytest.raises(RuntimeError, match="6 strip weights"):
        ext.msca_pack_weights(w0, b0, sw[:5], sb, w3, b3, False)
    with pytest.raises(RuntimeError, match="u must be 4-D"):
        ext.msca_forward_official(u[0], w0, b0, sw, sb, w3, b3)


def test_packing_matches_reference_pack_weights():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        args = make_msca(1, 9, 4, 4, dtype=dtype, device="cpu")
        f = leaves(args)
        wdt = torch.float64 if dtype == torch.float64 else torch.float32
        want = pack_weights(f[1], f[2], f[3:9], f[9:15], f[15], f[16], wdt)
        got = CPU_EXTENSION.load().msca_pack_weights(f[1], f[2], f[3:9], f[9:15], f[15], f[16], dtype == torch.float64)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)

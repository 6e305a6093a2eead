"""Production behaviour on a CUDA GPU (the whole module is skipped where there is none): CUDA graph capture and
replay, torch.autocast, torch.library.opcheck on CUDA tensors, no memory growth and the forward's allocations,
64-bit indexing of the NMF kernels (and of the Triton MSCA kernels) on tensors above 2^31 elements.

Backends: MSCA "triton" and "cuda"; NMF2D "triton" and "cuda". A "cuda" case is skipped, saying why, where the
backend cannot run (``segnext_kernels.backends.resolve`` raises, or the built extension lacks the NMF
launchers); whether the extension builds and is right is tests/msca/test_msca_cuda_gpu.py's and tests/nmf/test_nmf_cuda_gpu.py's
business. The CPU counterparts are in tests/integration/test_production.py and tests/integration/test_torch_integration.py.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import segnext
import segnext_kernels
from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels import FusedMSCA, FusedNMF2D, fuse, nmf2d
from segnext_kernels.backends import resolve
from segnext_kernels.extension import CUDA_EXTENSION
from segnext_kernels.msca.interface import param_dtype
from segnext_kernels.msca.reference import pack_weights

from autocast_checks import (check_autocast_fused_model, check_autocast_fused_msca,
                             check_autocast_nmf2d_updates_stay_fp32)
import nmf_helpers
from msca_helpers import assert_within_rule, leaves, make_msca, rebuild, reference_fwd_bwd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")

DEV = torch.device("cuda")
OPS = torch.ops.segnext_kernels
BACKENDS = ["triton", "cuda"]
HALF = [torch.bfloat16, torch.float16]
_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
MSCA_GRADS = ["u", "conv0.weight", "conv0.bias"] + [f"strip_w[{i}]" for i in range(6)] + \
    [f"strip_b[{i}]" for i in range(6)] + ["conv3.weight", "conv3.bias"]


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 products in eager and in the kernels, so fp32 comparisons are tight."""
    old_mm, old_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_mm, old_cudnn


def _extension_or_skip():
    try:
        return CUDA_EXTENSION.load()
    except RuntimeError as e:  # on a GPU machine the extension must load: a failure, not a skip
        pytest.fail(f"the CUDA extension does not load on this GPU machine: {e}")


def need_msca(backend):
    try:
        resolve("msca", backend, DEV, torch.float32)
    except RuntimeError as e:
        pytest.skip(f"MSCA backend {backend!r} cannot run here: {e}")
    if backend == "cuda":
        _extension_or_skip()


def need_nmf(backend, dtype=torch.float32):
    try:
        resolve("nmf2d", backend, DEV, dtype)
    except RuntimeError as e:
        pytest.skip(f"NMF2D backend {backend!r} cannot run here: {e}")
    if backend == "cuda" and not hasattr(_extension_or_skip(), "nmf_coef"):
        pytest.skip("the built CUDA extension has no NMF2D launchers (tests/nmf/test_nmf_cuda_gpu.py reports it)")


def nmf_inputs(B=2, D=64, N=300, R=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, D, N, generator=g).to(DEV, dtype)
    bases = F.normalize(torch.rand(B, D, R, generator=g), dim=1).to(DEV)
    return x, bases


def _capture(run):
    """Warm up ``run`` on a side stream (Triton compiles, the extension loads), then capture it in a CUDA graph;
    returns (graph, the static outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


# ------------------------------------------------------------------------------------------------ CUDA graphs
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_msca(backend, backward):
    """msca (forward, or forward and every input gradient) captured in a CUDA graph: replays on new values of the
    static inputs give bit for bit what eager gives on those values."""
    need_msca(backend)
    shape = (2, 32, 24, 40)
    flat = [t.detach().clone().requires_grad_(backward)
            for t in leaves(make_msca(*shape, dtype=torch.bfloat16, device=DEV, seed=0))]
    gout = torch.randn(shape, device=DEV, dtype=torch.bfloat16)

    def run():
        out = segnext_kernels.msca(*rebuild(flat), backend=backend)
        return [out] + (list(torch.autograd.grad(out, flat, gout)) if backward else [])

    graph, static = _capture(run)
    for seed in (1, 2):
        new = leaves(make_msca(*shape, dtype=torch.bfloat16, device=DEV, seed=seed))
        with torch.no_grad():
            for t, v in zip(flat, new):
                t.copy_(v)
            gout.copy_(torch.randn_like(gout))
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(["out"] + MSCA_GRADS, static, run()):
            assert torch.equal(a, b), f"{backend} {name}: replay differs from eager"


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_nmf2d(backend, backward):
    """nmf2d (unrolled gradient) captured in a CUDA graph: replays on new x and bases equal eager bit for bit.
    (The random draw of FusedNMF2D happens on the CPU generator and is not capturable; pass ``bases``.)"""
    need_nmf(backend, torch.bfloat16)
    x, bases = nmf_inputs(dtype=torch.bfloat16)
    x.requires_grad_(backward)
    bases.requires_grad_(backward)
    gy = torch.randn_like(x)

    def run():
        y = nmf2d(x, bases, 3, backend=backend)
        return [y] + (list(torch.autograd.grad(y, [x, bases], gy)) if backward else [])

    graph, static = _capture(run)
    for seed in (1, 2):
        nx, nb = nmf_inputs(dtype=torch.bfloat16, seed=seed)
        with torch.no_grad():
            x.copy_(nx)
            bases.copy_(nb)
            gy.copy_(torch.randn_like(gy))
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(("y", "grad x", "grad bases"), static, run()):
            assert torch.equal(a, b), f"{backend} {name}: replay differs from eager"


# --------------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_fused_msca(backend, dtype):
    """FusedMSCA under torch.autocast("cuda", dtype): eager autocast's dtype, within the rule of the float64 module
    (autocast_checks.check_autocast_fused_msca)."""
    need_msca(backend)
    check_autocast_fused_msca(backend, dtype, DEV)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_nmf2d_updates_stay_fp32(backend, dtype):
    """nmf2d under torch.autocast("cuda", dtype): updates in float32, results bit-identical to no autocast
    (autocast_checks.check_autocast_nmf2d_updates_stay_fp32)."""
    need_nmf(backend, dtype)
    check_autocast_nmf2d_updates_stay_fp32(backend, dtype, DEV)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_fused_model(backend, dtype):
    """A small fused SegNeXt-T under torch.autocast("cuda", dtype) against eager autocast
    (autocast_checks.check_autocast_fused_model)."""
    need_msca(backend)
    need_nmf(backend, dtype)
    check_autocast_fused_model(backend, dtype, DEV)


# ---------------------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_msca_ops_cuda(backend, dtype):
    """torch.library.opcheck of segnext_kernels::msca_fwd (schema, autograd registration, fake tensor, AOT
    dispatch) and msca_backward on CUDA tensors, NCHW and channels_last."""
    need_msca(backend)
    for cl in (False, True):
        u, w0, b0, sw, sb, w3, b3 = make_msca(2, 8, 9, 11, dtype=dtype, device=DEV, seed=0, channels_last=cl)
        packed = pack_weights(w0, b0, sw, sb, w3, b3, param_dtype(u))
        args = [u.clone().requires_grad_(), *(t.clone().requires_grad_() for t in packed), backend]
        torch.library.opcheck(OPS.msca_fwd, args,
                              test_utils=("test_schema", "test_faketensor") if cl else _OPCHECK_TESTS)
        g = torch.randn_like(u)
        for needs in ([True] * 7, [False, True, False, True, False, False, True]):
            torch.library.opcheck(OPS.msca_bwd, [g, u, *packed, needs, backend],
                                  test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mode", ["unrolled", "one_step"])
def test_opcheck_nmf_ops_cuda_triton(mode):
    """opcheck of segnext_kernels::nmf2d_fwd / nmf2d_bwd with the Triton backend on CUDA tensors (the CUDA
    backend: tests/nmf/test_nmf_cuda_gpu.py::test_opcheck_cuda_backend), and of segnext_kernels::nmf_rand_bases with a
    CUDA generator."""
    need_nmf("triton")
    x, b = nmf_inputs(B=1, D=16, N=40, R=3)
    fwd = [x.clone().requires_grad_(), b.clone().requires_grad_(), 2, 1e-6, 1.0, mode, True, "triton"]
    torch.library.opcheck(OPS.nmf2d_fwd, fwd, test_utils=_OPCHECK_TESTS)
    with torch.no_grad():
        y, bk, cf, saved = OPS.nmf2d_fwd(x, b, 2, 1e-6, 1.0, mode, True, "triton")
    bwd = [torch.rand_like(y), torch.rand_like(bk), None, x, list(saved), mode, 2, 1e-6, 1.0, True, True, "triton"]
    torch.library.opcheck(OPS.nmf2d_bwd, bwd, test_utils=("test_schema", "test_faketensor"))
    m = FusedNMF2D(MD_R=3, generator=torch.Generator(device=DEV).manual_seed(0), backend="triton")
    torch.library.opcheck(OPS.nmf_rand_bases, (m._generator_key, 2, 16, 3, DEV),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fused_nmf2d_cuda_generator():
    """FusedNMF2D with a CUDA generator under torch.compile(fullgraph=True) (aot_eager) equals eager bit for bit."""
    need_nmf("triton")
    x = torch.rand(2, 16, 8, 8, device=DEV)
    eager = FusedNMF2D(MD_R=4, generator=torch.Generator(device=DEV).manual_seed(3), backend="triton").eval()
    comp = FusedNMF2D(MD_R=4, generator=torch.Generator(device=DEV).manual_seed(3), backend="triton").eval()
    torch._dynamo.reset()
    cm = torch.compile(comp, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        assert torch.equal(cm(x), eager(x))


# ----------------------------------------------------------------------------------------------------- memory
def _small_fused_segnext(backend):
    torch.manual_seed(0)
    model = segnext.segnext_t(num_classes=7, embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), drop_path_rate=0.0,
                              channels=32, ham_channels=32, ham_kwargs=dict(MD_R=8, train_steps=2, eval_steps=2))
    assert fuse(model, backend=backend) == {"msca": 4, "ham": 1, "block": 0,
                                            "conv1x1": 0, "resize": 0, "norm": 0, "embed": 0, "group_norm": 0, "head": 0}
    return model.to(DEV)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_model_no_memory_growth_gpu(backend):
    """200 inference runs and 50 training steps of a small fused SegNeXt-T leave torch.cuda.memory_allocated()
    where it was after the warm-up."""
    need_msca(backend)
    need_nmf(backend)
    model = _small_fused_segnext(backend)
    images = torch.randn(2, 3, 64, 64, device=DEV)

    def infer():
        with torch.no_grad():
            model(images)

    def train():
        model(images).square().mean().backward()
        model.zero_grad(set_to_none=True)

    for mode, step, n in (("eval", infer, 200), ("train", train, 50)):
        model.train(mode == "train")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        assert after == before, f"{backend} {mode}: memory_allocated grew by {after - before} bytes over {n} runs"


def _block(nbytes: int) -> int:
    """The CUDA caching allocator's block size for a request (rounded up to 512 bytes)."""
    return max(512, (nbytes + 511) // 512 * 512)


@pytest.mark.parametrize("backend", BACKENDS)
def test_msca_forward_allocates_only_its_output(backend, monkeypatch):
    """The fused MSCA forward (the op on packed weights, no grad) keeps only its output allocated; its peak is the
    output plus the launcher's own workspace and nothing else: Triton, the per-program scratch it asks for through
    msca_triton._empty (bounded by the number of programs, not by the input); CUDA, the packed 1x1 weights
    (align_up(CP^2 x 2 or 4 bytes, 256), CP = C rounded up to 32). Through FusedMSCA under no_grad the weight
    packing is transient too: only the output stays."""
    need_msca(backend)
    B, C, H, W = 2, 64, 64, 96
    u, w0, b0, sw, sb, w3, b3 = make_msca(B, C, H, W, dtype=torch.bfloat16, device=DEV, seed=0)
    packed = pack_weights(w0, b0, sw, sb, w3, b3, torch.float32)
    workspace = []
    if backend == "triton":
        from segnext_kernels.msca import triton as msca_triton

        real = msca_triton._empty

        def recording(*shape, dtype, device):
            t = real(*shape, dtype=dtype, device=device)
            workspace.append(_block(t.untyped_storage().nbytes()))
            return t

        monkeypatch.setattr(msca_triton, "_empty", recording)
    with torch.no_grad():
        OPS.msca_fwd(u, *packed, backend)  # warm-up (compile / load)
    torch.cuda.synchronize()
    workspace.clear()
    # no cached free blocks: every block is then split to its rounded request (a cached block up to 1 MiB larger
    # than the request may be handed out whole, which memory_allocated would count)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = OPS.msca_fwd(u, *packed, backend)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    kept = torch.cuda.memory_allocated() - base
    out_b = _block(out.untyped_storage().nbytes())
    assert kept == out_b, f"{backend}: {kept} bytes stay allocated, the output is {out_b}"
    bound = sum(workspace) if backend == "triton" else _block(((C + 31) // 32 * 32) ** 2 * 4)
    assert out_b <= peak <= out_b + bound, f"{backend}: peak {peak} bytes > output {out_b} + workspace {bound}"
    del out
    m = FusedMSCA(C, backend=backend).to(DEV).bfloat16()
    with torch.no_grad():
        m(u)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        out = m(u)
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base == out_b


# ------------------------------------------------------------------------------------------ 64-bit indexing
def _free_gib():
    torch.cuda.empty_cache()  # blocks cached by earlier tests count as used in mem_get_info
    return torch.cuda.mem_get_info()[0] / 2 ** 30


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_nmf_int64_indexing(backend):
    """x (1, 64, N), N = 2^25 + 2^20: x has 64 N > 2^31 elements and, at R = 64, every coef buffer N R > 2^31.
    Forward (2 steps, bf16) with all columns of x zero but a few at the start, middle and end: a zero column keeps a
    zero coef row from the first update on, so it adds nothing to the bases updates and reconstructs to exact
    zeros, and the nonzero columns must give what the eager reference gives on them alone."""
    need_nmf(backend, torch.bfloat16)
    D, R, N = 64, 64, 2 ** 25 + 2 ** 20
    if _free_gib() < 48:
        pytest.skip(f"needs about 48 GiB of free GPU memory, {_free_gib():.0f} GiB free")
    cols = torch.tensor([0, 1, 2, N // 2, N - 3, N - 2, N - 1], device=DEV)
    x = torch.zeros(1, D, N, device=DEV, dtype=torch.bfloat16)
    x[0][:, cols] = torch.rand(D, len(cols), device=DEV, dtype=torch.bfloat16)
    bases = F.normalize(torch.rand(1, D, R, device=DEV), dim=1)
    with torch.no_grad():
        y = nmf2d(x, bases, 2, backend=backend)
    xs = x[:, :, cols].contiguous()
    nmf_helpers.assert_rule(f"{backend} y[cols]", y[:, :, cols], nmf2d_reference(xs.double(), bases.double(), 2),
                            nmf2d_reference(xs, bases, 2), torch.bfloat16)
    assert torch.count_nonzero(y) == torch.count_nonzero(y[:, :, cols])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_nmf_int64_indexing_backward(backend):
    """The same construction at R = 16 with the unrolled backward (1 step): x, grad_y and grad_x have 64 N > 2^31
    elements. grad_y is zero outside the nonzero columns; there grad_x must equal the eager reference's gradient of
    the columns alone, and it is exactly zero elsewhere (a zero column gets no coef, hence no gradient path)."""
    need_nmf(backend, torch.bfloat16)
    D, R, N = 64, 16, 2 ** 25 + 2 ** 20
    if _free_gib() < 48:
        pytest.skip(f"needs about 48 GiB of free GPU memory, {_free_gib():.0f} GiB free")
    cols = torch.tensor([0, 1, N // 2, N - 2, N - 1], device=DEV)
    x = torch.zeros(1, D, N, device=DEV, dtype=torch.bfloat16)
    x[0][:, cols] = torch.rand(D, len(cols), device=DEV, dtype=torch.bfloat16)
    gy = torch.zeros_like(x)
    gy[0][:, cols] = torch.randn(D, len(cols), device=DEV, dtype=torch.bfloat16)
    bases = F.normalize(torch.rand(1, D, R, device=DEV), dim=1)
    x.requires_grad_()
    y = nmf2d(x, bases, 1, backend=backend)
    (gx,) = torch.autograd.grad(y, x, gy)
    del y
    xs, gs = x.detach()[:, :, cols].contiguous(), gy[:, :, cols].contiguous()
    got = nmf_helpers.run(xs, bases, 1, "unrolled", "reference", gs)      # eager bf16 on the columns alone
    ref = nmf_helpers.run(xs.double(), bases.double(), 1, "unrolled", "reference", gs.double())
    nmf_helpers.assert_rule(f"{backend} grad x[cols]", gx[:, :, cols], ref[1], got[1], torch.bfloat16)
    assert torch.count_nonzero(gx) == torch.count_nonzero(gx[:, :, cols])


@pytest.mark.slow
def test_msca_int64_indexing_triton():
    """The Triton MSCA kernels on B*C*H*W > 2^31 (the CUDA backend's: tests/msca/test_msca_cuda_gpu.py::test_int64_indexing):
    only the last image gets a gradient, so its reference is cheap."""
    need_msca("triton")
    B, C, H, W = 2049, 64, 128, 128   # 2.15e9 elements, 4.3 GB in bf16; the Triton backward's fp32 buffers 34 GB
    if _free_gib() < 64:
        pytest.skip(f"needs about 64 GiB of free GPU memory, {_free_gib():.0f} GiB free")
    dtype = torch.bfloat16
    small = make_msca(1, C, H, W, dtype=dtype, device=DEV, seed=0)
    u = torch.randn(B, C, H, W, device=DEV, dtype=dtype)
    u[-1] = small[0][0]
    grad_out = torch.zeros(B, C, H, W, device=DEV, dtype=dtype)
    grad_out[-1] = torch.randn(C, H, W, device=DEV, dtype=dtype)
    flat = [u.requires_grad_()] + [t.detach().clone().requires_grad_(True) for t in leaves(small)[1:]]
    out = segnext_kernels.msca(*rebuild(flat), backend="triton")
    grads = torch.autograd.grad(out, flat, grad_out)
    last = (u[-1:].clone(), *small[1:])
    ref_out, ref_grads = reference_fwd_bwd(last, grad_out[-1:], torch.float64)
    eager_out, eager_grads = reference_fwd_bwd(last, grad_out[-1:], dtype)
    assert_within_rule("out[-1]", out[-1:].detach(), ref_out, eager_out, dtype)
    assert_within_rule("du[-1]", grads[0][-1:], ref_grads[0], eager_grads[0], dtype)
    assert torch.count_nonzero(grads[0][:-1]) == 0
    for n, g, r, e in zip(MSCA_GRADS[1:], grads[1:], ref_grads[1:], eager_grads[1:]):
        assert_within_rule(f"grad {n}", g, r, e, dtype)

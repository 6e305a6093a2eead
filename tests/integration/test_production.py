"""Production behaviour checked without a GPU: NaN/Inf propagation like eager PyTorch (on the GPU where there is
one), 64-bit offsets in the Triton kernels, no memory growth over many runs. torch.compile of FusedNMF2D with a
generator: tests/integration/test_torch_integration.py. The GPU counterparts (CUDA graphs, autocast, opcheck on CUDA, GPU
memory, tensors above 2^31 elements) are in tests/integration/test_production_gpu.py."""
import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import segnext
from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels import FusedMSCA, FusedNMF2D, fuse_ham, fuse_msca, nmf2d

from msca_helpers import DEVICE

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- NaN / Inf propagation
def _same_nonfinite(got, ref, name):
    """got and ref have NaN, +Inf and -Inf at the same positions, and close finite values elsewhere."""
    for what, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(f(got), f(ref)), f"{name}: {what} positions differ from eager " \
                                            f"({int(f(got).sum())} vs {int(f(ref).sum())})"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy computing with NaN / Inf
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_msca_nan_inf_propagate_like_eager(backend):
    """A NaN and a +Inf in u: the fused output and du have NaN / +-Inf exactly where the eager module's have them
    (each spreads over its 25 x 25 receptive field through every channel; the rest stays finite and equal)."""
    torch.manual_seed(0)
    eager = segnext.AttentionModule(4).to(DEVICE)
    fused = FusedMSCA.from_module(eager, backend=backend)
    u = torch.randn(1, 4, 30, 30, device=DEVICE)
    u[0, 1, 2, 3] = float("nan")
    u[0, 2, 26, 25] = float("inf")
    g = torch.randn_like(u)
    res = []
    for m in (eager, fused):
        x = u.clone().requires_grad_()
        out = m(x)
        (du,) = torch.autograd.grad(out, x, g)
        res.append((out.detach(), du))
    (out_e, du_e), (out_f, du_f) = res
    assert torch.isnan(out_e).any() and torch.isinf(out_e).any() and torch.isfinite(out_e).any()
    _same_nonfinite(out_f, out_e, f"{backend} out")
    assert torch.isnan(du_e).any() and torch.isfinite(du_e).any()
    _same_nonfinite(du_f, du_e, f"{backend} du")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nmf_nan_inf_propagate_like_reference(backend):
    """NaN or Inf in one column of x: with steps = 0 only that column of the reconstruction is NaN (each column's
    coef depends on its own column); with steps >= 1 the bases update sums over all columns, so the whole sample is
    NaN. Other samples of the batch stay finite and unchanged. Same positions as the eager reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 8, 20, generator=g).to(DEVICE)
    bases = F.normalize(torch.rand(3, 8, 4, generator=g), dim=1).to(DEVICE)
    x[0, 3, 5] = float("nan")
    x[1, 2, 7] = float("inf")
    for steps in (0, 2):
        y = nmf2d(x, bases, steps, backend=backend)
        ref = nmf2d_reference(x, bases, steps)
        _same_nonfinite(y, ref, f"{backend} steps={steps}")
        for b, col in ((0, 5), (1, 7)):
            bad = torch.isnan(ref[b])
            assert bad.all() if steps else (bad[:, col].all() and bad.sum() == bad.shape[0])
        assert torch.isfinite(ref[2]).all()


# ------------------------------------------------------------------------------------------------ 64-bit offsets
_INT64_SCRIPT = r'''
import torch
import segnext_kernels
from segnext_kernels import nmf2d
from segnext_kernels.msca.reference import strip_weight_shapes

S = 2 ** 30 + 3   # a stride below 2^31 (an int32 kernel argument) whose multiples 2S, 2S + ... exceed 2^31
try:
    # 2^31 + 2^20 fp16 elements (4 GiB) of untouched virtual memory: only the pages of the views below get touched
    big = torch.empty(2 ** 31 + 2 ** 20, dtype=torch.float16)
except RuntimeError as e:
    print("SKIP: cannot reserve 4 GiB of virtual memory:", e)
    raise SystemExit(0)
torch.manual_seed(0)
C = 3
w0, b0 = torch.randn(C, 1, 5, 5, dtype=torch.float16) * 0.2, torch.randn(C, dtype=torch.float16)
sw = [torch.randn(s, dtype=torch.float16) * 0.25 for s in strip_weight_shapes(C)]
sb = [torch.randn(C, dtype=torch.float16) for _ in range(6)]
w3, b3 = torch.randn(C, C, 1, 1, dtype=torch.float16) * 0.5, torch.randn(C, dtype=torch.float16)

def view(shape, strides, offset):
    # element offsets up to about 2S + 16 (> 2^31) inside big, and distinct elements
    v = big.as_strided(shape, strides, offset)
    v.copy_(torch.randn(shape))
    return v

# MSCA forward: the batch, channel, row and column strides each reach past 2^31; backward: the channel stride of u
# and grad_out (the backward kernels read both through the same offset code as the forward). Compared with the eager
# reference in float32 on the same fp16 values (a wrapped offset would read other memory: gross errors or a crash).
def close(name, got, ref):
    scale = ref.abs().max().item()
    err = (got.float() - ref).abs().max().item()
    assert err <= 1e-2 * scale, f"{name}: error {err:.3e} vs scale {scale:.3e} (wrong elements read?)"

w16 = [w0, b0, sw, sb, w3, b3]
w32 = [w0.float(), b0.float(), [w.float() for w in sw], [b.float() for b in sb], w3.float(), b3.float()]
for dim in range(4):
    shape = [1, C, 2, 2]
    shape[dim] = 3
    strides = [0, 0, 0, 0]
    small = 1
    for d in (3, 2, 1, 0):
        if d != dim:
            strides[d] = small
            small *= shape[d]
    strides[dim] = S
    u = view(shape, strides, 0)
    if dim != 1:
        close(f"msca out, stride 2^30 in dim {dim}", segnext_kernels.msca(u, *w16, backend="triton"),
              segnext_kernels.msca_reference(u.float(), *w32))
        continue
    gout = view(shape, strides, 64)
    uu, ur = u.detach().requires_grad_(), u.float().requires_grad_()
    out = segnext_kernels.msca(uu, *w16, backend="triton")
    ref = segnext_kernels.msca_reference(ur, *w32)
    close("msca out, stride 2^30 in C", out, ref)
    close("msca du, stride 2^30 in C", torch.autograd.grad(out, uu, gout)[0],
          torch.autograd.grad(ref, ur, gout.float())[0])

# NMF2D: the batch, D and N strides of x and grad_y each reach past 2^31, forward and backward
bases = torch.nn.functional.normalize(torch.rand(3, 3, 2), dim=1)
for dim in range(3):
    shape = [2, 2, 2]
    shape[dim] = 3
    strides = [0, 0, 0]
    small = 1
    for d in (2, 1, 0):
        if d != dim:
            strides[d] = small
            small *= shape[d]
    strides[dim] = S
    x = view(shape, strides, 128).abs_()
    gy = view(shape, strides, 192)
    b = bases[:shape[0], :shape[1]].contiguous()
    xx, xr = x.detach().requires_grad_(), x.float().requires_grad_()
    y = nmf2d(xx, b, 2, backend="triton")
    ref = segnext_kernels.nmf.nmf2d_reference(xr, b, 2)
    close(f"nmf y, stride 2^30 in dim {dim}", y, ref)
    close(f"nmf dx, stride 2^30 in dim {dim}", torch.autograd.grad(y, xx, gy)[0],
          torch.autograd.grad(ref, xr, gy.float())[0])
print("OK")
'''


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_offsets_are_64_bit():
    """The Triton kernels index their inputs with 64-bit offsets: MSCA and NMF2D on fp16 views whose stride in one
    dimension is 2^30 + 3 (an int32 kernel argument), so element offsets pass 2^31, give bit for bit what they give
    on the compact copies, forward and backward. The views live in a 4 GiB torch.empty that is never touched beyond
    their few elements (Linux maps it lazily), and run in a subprocess under the Triton interpreter: an offset
    computed in int32 would wrap to a negative address there and crash that process, not the test run. (The GPU
    counterparts with > 2^31-element tensors: test_msca_cuda.py::test_int64_indexing,
    test_production_gpu.py::test_nmf_int64_indexing.)"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _INT64_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    if r.returncode == 0 and r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), \
        f"exit status {r.returncode}{' (killed by a signal)' if r.returncode < 0 else ''}\n{r.stdout[-3000:]}\n" \
        f"{r.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------------- memory growth
def _census():
    gc.collect()
    counts = {}
    for o in gc.get_objects():  # (not collections.Counter(generator): its isinstance checks add ABC-cache weakrefs)
        k = type(o).__name__
        counts[k] = counts.get(k, 0) + 1
    return counts


def _torch_cpu_net_bytes(step, n):
    """Net bytes the torch CPU allocator handed out over n steps (allocations minus frees, from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(n):
            step()
    return sum(e.self_cpu_memory_usage for e in prof.events())


def _assert_no_growth(step, n=4, warmup=2):
    """After a warm-up, n more steps leave no more live Python objects of any type (gc census), at most 32 KiB more
    Python heap (tracemalloc; one-time growth happens: eager PyTorch adds about 100 B per step through its own calls,
    the Triton interpreter resizes a class dict it patches at each launch by 6.5 KiB once), and the same net torch
    CPU allocation over n and over 2n steps (the profiler's
    count, which sees only blocks allocated while it runs: ``step`` must free what it allocates, e.g.
    zero_grad(set_to_none=True) at its end). A leaked tensor, autograd graph or ctx fails the census or the
    allocation count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and no OpenMP spinning on a busy machine
    try:
        _no_growth(step, n, warmup)
    finally:
        torch.set_num_threads(threads)


def _no_growth(step, n, warmup):
    for _ in range(warmup):
        step()
    before = _census()
    tracemalloc.start()
    try:
        t0 = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            step()
        gc.collect()
        heap = tracemalloc.get_traced_memory()[0] - t0
    finally:
        tracemalloc.stop()
    after = _census()
    grown = {k: after[k] - before[k] for k in after if after[k] - before[k] >= n}
    assert not grown, f"live Python objects grew by at least one per step: {grown}"
    assert heap <= 32 * 1024, f"Python heap grew by {heap} bytes over {n} steps"
    # last: the profiler leaves objects of its own behind. Compared over n and 2n steps rather than with 0: the
    # Triton interpreter keeps the tensor arguments of its latest launch alive until the next one, a constant
    net_n, net_2n = _torch_cpu_net_bytes(step, n), _torch_cpu_net_bytes(step, 2 * n)
    assert net_2n == net_n, f"torch CPU allocations grew by {net_2n - net_n} bytes over {n} more steps"


def _small_segnext():
    torch.manual_seed(0)
    return segnext.segnext_t(num_classes=5, embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), drop_path_rate=0.0,
                             channels=32, ham_channels=32, ham_kwargs=dict(MD_R=4, train_steps=1, eval_steps=1))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_model_no_memory_growth_cpu(train):
    """A small SegNeXt-T fused onto the C++ CPU kernels (fuse(model, backend="cpu") for MSCA; NMF2D has no CPU
    kernels, its modules run the reference) run again and again: training steps (forward, backward, zero_grad) or
    no_grad inference, through the custom ops, their autograd and saved tensors."""
    model = _small_segnext()
    assert fuse_msca(model, backend="cpu") == 4 and fuse_ham(model) == 1
    assert {m.backend for m in model.modules() if isinstance(m, FusedMSCA)} == {"cpu"}
    model.train(train)
    images = torch.randn(2, 3, 32, 32)

    def step():
        if train:
            model(images).square().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(images)

    _assert_no_growth(step)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fused_modules_custom_op_path_no_memory_growth_cpu(monkeypatch):
    """FusedMSCA and FusedNMF2D on the "triton" backend, through the custom ops, their autograd and saved tensors:
    FusedNMF2D runs its real Triton kernels (interpreter); FusedMSCA's two launchers are replaced by eager
    stand-ins returning what the kernels return (shapes, dtypes, fresh tensors), as the interpreter needs seconds
    per MSCA call. Forward, backward and zero_grad, again and again."""
    from segnext_kernels.msca import triton as msca_triton

    def fwd(u, w0, b0, ws, bs, w3, b3):
        return torch.empty_like(u).copy_(u * b3.to(u.dtype)[None, :, None, None])

    def bwd(g, u, w0, b0, ws, bs, w3, b3, needs):
        grads = (torch.empty_like(u).copy_(g),) + tuple(torch.zeros_like(t) for t in (w0, b0, ws, bs, w3, b3))
        return tuple(t if n else None for t, n in zip(grads, needs))

    monkeypatch.setattr(msca_triton, "forward", fwd)
    monkeypatch.setattr(msca_triton, "backward", bwd)
    torch.manual_seed(0)
    net = torch.nn.Sequential(FusedMSCA(8, backend="triton"), torch.nn.ReLU(),
                              FusedNMF2D(MD_R=4, train_steps=1, eval_steps=1, backend="triton",
                                         generator=torch.Generator().manual_seed(0)))
    x = torch.randn(1, 8, 6, 5, requires_grad=True)

    def step():
        net(x).square().mean().backward()
        net.zero_grad(set_to_none=True)
        x.grad = None

    _assert_no_growth(step)

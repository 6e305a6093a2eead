"""Shared helpers of the NMF2D kernel tests (tests/nmf/test_nmf_triton.py, tests/nmf/test_nmf_cuda_gpu.py).

Tolerance rule (docs/kernels.md, "Correctness protocol"): a kernel's max error against a float64 reference is at most ``ERR_FACTOR`` x
the error of the eager reference run in the same dtype, plus ``ATOL[dtype]`` x the reference's max magnitude.
float64 runs are compared tightly.
"""
import torch
import torch.nn.functional as F

from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels.nmf import nmf2d

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ERR_FACTOR = 2.0
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 1e-3}


def make(B, D, N, R, dtype=torch.float64, bases_dtype=None):
    """Fresh random non-negative x (B, D, N) and L2-normalised bases (B, D, R) (as NMF2D builds them)."""
    x = torch.rand(B, D, N, dtype=torch.float64, device=DEVICE).to(dtype)
    bases = F.normalize(torch.rand(B, D, R, dtype=torch.float64, device=DEVICE), dim=1)
    return x, bases.to(bases_dtype or torch.promote_types(dtype, torch.float32))


def run(x, bases, steps, mode, backend, gy=None, dtype=None, **kw):
    """(recon, grad_x, grad_bases) with x, bases cast to ``dtype``; grads are None when gy is None or the input
    got no gradient (one_step mode with steps >= 1 for the bases)."""
    xx = x.detach().to(dtype or x.dtype).requires_grad_(True)
    bdt = torch.promote_types(xx.dtype, torch.float32)
    bb = bases.detach().to(bdt).requires_grad_(True)
    if backend == "reference":
        y = nmf2d_reference(xx, bb, steps, grad_mode=mode, **kw)
    else:
        y = nmf2d(xx, bb, steps, grad_mode=mode, backend=backend, **kw)
    if gy is None:
        return y.detach(), None, None
    gx, gb = torch.autograd.grad(y, [xx, bb], gy.to(y.dtype), allow_unused=True)
    return y.detach(), gx, gb


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_rule(name, got, ref64, eager, dtype, atol=None):
    assert got.dtype == eager.dtype, f"{name}: dtype {got.dtype} != {eager.dtype}"
    assert torch.isfinite(got).all(), f"{name}: NaN/inf in result (an unwritten element?)"
    scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1.0
    e_kernel, e_eager = max_err(got, ref64), max_err(eager, ref64)
    bound = ERR_FACTOR * e_eager + (ATOL[dtype] if atol is None else atol) * scale
    assert e_kernel <= bound, f"{name}: error {e_kernel:.3e} > bound {bound:.3e} (eager error {e_eager:.3e})"


def check(x, bases, steps, mode, dtype, gy=None, backend="triton", atol=None, **kw):
    """Kernel (``backend``) vs float64 reference vs eager reference in ``dtype``, forward and both gradients.
    atol: overrides ``ATOL[dtype]``."""
    got = run(x, bases, steps, mode, backend, gy, dtype, **kw)
    xr = x.to(dtype)  # the kernel and eager see the same rounded inputs; the oracle sees them exactly
    ref = run(xr.double(), bases.double(), steps, mode, "reference", gy, torch.float64, **kw)
    eager = run(xr, bases, steps, mode, "reference", gy, dtype, **kw)
    for name, g, r, e in zip(("recon", "grad x", "grad bases"), got, ref, eager):
        if e is None:
            assert g is None and r is None, f"{name}: expected no gradient"
            continue
        assert g is not None and g.shape == r.shape, name
        if dtype == torch.float64:
            scale = max(r.abs().max().item(), 1.0)
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12 * scale, msg=lambda m: f"{name}: {m}")
            assert torch.isfinite(g).all(), name
        else:
            assert_rule(name, g, r, e, dtype, atol)
    return got


def opcheck_nmf_ops(x, b, backend, modes=("unrolled", "one_step")):
    """torch.library.opcheck of segnext_kernels::nmf2d_fwd / nmf2d_bwd on ``backend`` (x (B, D, N), b
    (B, D, R) on the device under test), for each gradient mode, 2 steps, with the saved state the forward returns."""
    ops = torch.ops.segnext_kernels
    for mode in modes:
        torch.library.opcheck(ops.nmf2d_fwd, [x.clone().requires_grad_(), b.clone().requires_grad_(), 2, 1e-6,
                                                  1.0, mode, True, backend])
        with torch.no_grad():
            y, bk, cf, saved = ops.nmf2d_fwd(x, b, 2, 1e-6, 1.0, mode, True, backend)
        torch.library.opcheck(ops.nmf2d_bwd, [torch.rand_like(y), torch.rand_like(bk), None, x, list(saved),
                                                   mode, 2, 1e-6, 1.0, True, True, backend])

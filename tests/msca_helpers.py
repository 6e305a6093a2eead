"""Inputs and tolerances shared by the MSCA tests.

Tolerance rule (kernels.md section 5, the flash-attention rule): a fused kernel's max error against a float64
reference must be at most ``ERR_FACTOR`` times the error of eager PyTorch run in the same dtype, plus ``ATOL``.
"""
import torch

from segnext_kernels.msca_reference import msca_reference, strip_weight_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ERR_FACTOR = 2.0
#: absolute slack per dtype, relative to the reference's max magnitude
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_msca(B, C, H, W, dtype=torch.float32, device=DEVICE, seed=None, channels_last=False, noncontig=False):
    """Random u and MSCA weights (fresh random values; scaled so activations stay O(1))."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    if noncontig:  # a view with offsets and gaps in every dimension
        big = r(B, 2 * C + 1, H + 3, W + 2)
        u = big[:, 1::2, 2:H + 2, 1:W + 1]
    else:
        u = r(B, C, H, W)
    if channels_last:
        u = u.contiguous(memory_format=torch.channels_last)
    w0 = r(C, 1, 5, 5, scale=0.2)
    b0 = r(C, scale=0.5)
    sw = [r(*s, scale=0.25) for s in strip_weight_shapes(C)]
    sb = [r(C, scale=0.5) for _ in range(6)]
    w3 = r(C, C, 1, 1, scale=C ** -0.5)
    b3 = r(C, scale=0.5)
    return u, w0, b0, sw, sb, w3, b3


def leaves(args):
    u, w0, b0, sw, sb, w3, b3 = args
    return [u, w0, b0, *sw, *sb, w3, b3]


def rebuild(flat):
    return flat[0], flat[1], flat[2], flat[3:9], flat[9:15], flat[15], flat[16]


def cast(args, dtype):
    return rebuild([t.detach().to(dtype) for t in leaves(args)])


def reference_fwd_bwd(args, grad_out=None, dtype=None):
    """(out, grads) of the eager reference with inputs cast to ``dtype`` (default: their own)."""
    flat = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in leaves(args)]
    out = msca_reference(*rebuild(flat))
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, flat, grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(name, got, ref64, eager, dtype):
    """got: kernel result; ref64: float64 reference; eager: reference run in ``dtype``."""
    assert not torch.isnan(got).any(), f"{name}: NaN in result (an unwritten element?)"
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    e_kernel = max_err(got, ref64)
    e_eager = max_err(eager, ref64)
    bound = ERR_FACTOR * e_eager + ATOL[dtype] * scale
    assert e_kernel <= bound, f"{name}: error {e_kernel:.3e} > bound {bound:.3e} (eager error {e_eager:.3e})"

"""Inputs and tolerances shared by the MSCA tests.

Tolerance rule (docs/kernels.md, "Correctness protocol": the flash-attention rule): a fused kernel's max error against a float64
reference must be at most ``ERR_FACTOR`` times the error of eager PyTorch run in the same dtype, plus ``ATOL``.
"""
import copy

import torch

import segnext
import segnext_kernels
from segnext_kernels import fuse_msca
from segnext_kernels.msca.reference import msca_reference, strip_weight_shapes

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


def assert_within_rule(name, got, ref64, eager, dtype, n_sum=1):
    """got: kernel result; ref64: float64 reference; eager: reference run in ``dtype``. n_sum: the number of terms
    each element sums (a weight gradient: the B*H*W pixels): the ATOL term grows as sqrt(n_sum / 256), the random-walk
    growth of a rounded sum's error, since such a sum can cancel to a value far below its terms (a 930-pixel conv3
    gradient of |value| ~2 from O(1) terms missed the fixed bound by 10%)."""
    assert not torch.isnan(got).any(), f"{name}: NaN in result (an unwritten element?)"
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    scale *= max(1.0, (n_sum / 256) ** 0.5)
    e_kernel = max_err(got, ref64)
    e_eager = max_err(eager, ref64)
    bound = ERR_FACTOR * e_eager + ATOL[dtype] * scale
    assert e_kernel <= bound, f"{name}: error {e_kernel:.3e} > bound {bound:.3e} (eager error {e_eager:.3e})"


GRAD_NAMES = (["u", "conv0.weight", "conv0.bias"] + [f"strip_w[{i}]" for i in range(6)]
              + [f"strip_b[{i}]" for i in range(6)] + ["conv3.weight", "conv3.bias"])
#: fp32 with torch.backends.cuda.matmul.allow_tf32: max error relative to the reference's max magnitude
TOL_TF32 = 5e-3


def run_backend(args, grad_out=None, backend="cuda"):
    """segnext_kernels.msca on fresh leaves of ``args``: (out, grads of every input or None)."""
    flat = [t.detach().clone().requires_grad_(True) for t in leaves(args)]
    out = segnext_kernels.msca(*rebuild(flat), backend=backend)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, flat, grad_out)
    return out.detach(), [g.detach() for g in grads]


def check_backend(args, dtype, grad_out=None, tf32=False, backend="cuda"):
    """Forward (and gradients for ``grad_out``) of ``backend`` against the float64 reference, under the
    flash-attention rule (``assert_within_rule``), or TOL_TF32 for fp32 with TF32 allowed. Returns (out, grads)."""
    out, grads = run_backend(args, grad_out, backend)
    ref_out, ref_grads = reference_fwd_bwd(args, grad_out, torch.float64)
    eager_out, eager_grads = reference_fwd_bwd(args, grad_out, dtype)
    u = args[0]
    assert out.dtype == dtype and out.shape == u.shape
    if u.is_contiguous(memory_format=torch.channels_last) and not u.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "out lost u's memory format"

    def one(name, got, ref, eager):
        if tf32:
            assert not torch.isnan(got).any(), f"{name}: NaN"
            scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
            assert max_err(got, ref) <= TOL_TF32 * scale, f"{name}: error {max_err(got, ref):.3e} (tf32)"
        else:
            n_sum = 1 if name in ("out", "grad u") else u.shape[0] * u.shape[2] * u.shape[3]
            assert_within_rule(name, got, ref, eager, dtype, n_sum)

    one("out", out, ref_out, eager_out)
    if grad_out is not None:
        for n, g, r, e in zip(GRAD_NAMES, grads, ref_grads, eager_grads):
            assert g is not None and g.shape == r.shape, n
            one(f"grad {n}", g, r, e)
    return out, grads


def _loss(logits, target):
    return torch.nn.functional.cross_entropy(logits, target)


def check_fused_segnext_t_matches_eager(backend, device):
    """SegNeXt-T (all 13 MSCA modules) with fuse_msca(model, backend) against the eager model: eval logits, and every
    parameter gradient of a training step under the same seed (also run by tests/integration/test_cuda_backend_emu.py)."""
    torch.manual_seed(0)
    eager = segnext.segnext_t(num_classes=19).to(device)
    fused = copy.deepcopy(eager)
    assert fuse_msca(fused, backend=backend) == 13
    images = torch.randn(1, 3, 64, 48, device=device)
    target = torch.randint(0, 19, (1, 64, 48), device=device)

    # eval: logits (NMF bases drawn from the same seed)
    eager.eval()
    fused.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        ref = eager(images)
        torch.manual_seed(1)
        out = fused(images)
    assert out.shape == (1, 19, 64, 48)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())

    # train: same DropPath / Dropout2d / NMF draws under the same seed; compare every parameter gradient
    eager.train()
    fused.train()
    torch.manual_seed(2)
    _loss(eager(images), target).backward()
    torch.manual_seed(2)
    _loss(fused(images), target).backward()
    fused_params = dict(fused.named_parameters())
    checked = 0
    for name, p in eager.named_parameters():
        q = fused_params[name]
        assert q.grad is not None, name
        scale = p.grad.abs().max().item() + 1e-12
        err = (q.grad - p.grad).abs().max().item()
        assert err <= 2e-3 * scale + 1e-7, f"{name}: grad error {err:.3e} vs scale {scale:.3e}"
        checked += 1
    assert checked == len(list(eager.parameters()))

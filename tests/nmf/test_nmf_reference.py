"""The NMF2D reference (segnext_kernels/nmf/reference.py, the oracle of the fused kernels) against the model's own
NMF2D (segnext.NMF2D: the official module's local_step / compute_coef), values and gradients in both grad modes."""
import pytest
import torch
import torch.nn.functional as F

from segnext import NMF2D
from segnext_kernels.nmf.reference import nmf2d_reference


def test_nmf2d_reference_state_and_methods():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 16, 30, generator=gen)
    bases = F.normalize(torch.rand(2, 16, 5, generator=gen), dim=1)
    recon, b, c = nmf2d_reference(x, bases, 3, return_state=True)
    nmf = NMF2D(MD_R=5)
    coef = torch.softmax(x.transpose(1, 2) @ bases, -1)
    bb = bases
    for _ in range(3):
        bb, coef = nmf.local_step(x, bb, coef)
    coef = nmf.compute_coef(x, bb, coef)
    assert torch.equal(b, bb) and torch.equal(c, coef) and torch.equal(recon, bb @ coef.mT)
    with pytest.raises(ValueError):
        nmf2d_reference(x, bases, 3, grad_mode="none")
    with pytest.raises(ValueError):
        nmf2d_reference(x, bases[:, :8], 3)


@pytest.mark.parametrize("grad_mode", ["unrolled", "one_step"])
def test_model_nmf2d_equals_reference_with_gradients(grad_mode):
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 12, 5, 7, dtype=torch.float64, generator=gen).requires_grad_()
    bases = F.normalize(torch.rand(2, 12, 4, dtype=torch.float64, generator=gen), dim=1).requires_grad_()
    nmf = NMF2D(MD_R=4, grad_mode=grad_mode).eval()
    out = nmf(x, bases)
    ref = nmf2d_reference(x.reshape(2, 12, 35), bases, 7, grad_mode=grad_mode).reshape(2, 12, 5, 7)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, bases), g, allow_unused=True)
    want = torch.autograd.grad(ref, (x, bases), g, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if grad_mode == "one_step":
        assert got[1] is None  # the bases of the init get no gradient after K >= 1 no-grad steps

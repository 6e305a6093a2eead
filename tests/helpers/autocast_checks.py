"""Autocast checks of the fused ops, shared by the GPU tests (tests/integration/test_production_gpu.py, torch.autocast("cuda"))
and the CPU run of the "cuda" backend through the emulated extension (tests/integration/test_cuda_backend_emu.py,
torch.autocast("cpu")): the same assertions whatever the device.

Rules: the fused result has eager autocast's dtype and is at least about as close to a float64 reference as eager
autocast is (the flash-attention rule of msca_helpers / nmf_helpers); NMF2D updates are untouched by autocast.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import segnext
from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels import FusedMSCA, fuse, nmf2d

import nmf_helpers
from msca_helpers import assert_within_rule


def check_autocast_fused_msca(backend, dtype, device, C=32, H=20, W=28):
    """Under torch.autocast(device.type, dtype) FusedMSCA gives eager autocast's dtype and is at least about as close
    to a float64 reference (eager module in float64 on the same rounded inputs) as eager autocast is, output and
    gradients."""
    torch.manual_seed(0)
    eager = segnext.AttentionModule(C).to(device)
    fused = FusedMSCA.from_module(copy.deepcopy(eager), backend=backend)
    x = torch.randn(2, C, H, W, device=device)
    g = torch.randn(2, C, H, W, device=device)
    res = {}
    for name, m in (("eager", eager), ("fused", fused)):
        xx = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=dtype):
            out = m(xx)
        params = [m.conv0.weight, m.conv0.bias, m.conv2_1.weight, m.conv3.weight, m.conv3.bias]
        res[name] = [out] + list(torch.autograd.grad(out, [xx] + params, g.to(out.dtype)))
    # the float64 oracle sees what autocast hands the convolutions: inputs and weights rounded to dtype
    ref_m = copy.deepcopy(eager)
    with torch.no_grad():
        for p in ref_m.parameters():
            p.copy_(p.to(dtype))
    ref_m = ref_m.double()
    xr = x.to(dtype).double().requires_grad_()
    out_r = ref_m(xr)
    params_r = [ref_m.conv0.weight, ref_m.conv0.bias, ref_m.conv2_1.weight, ref_m.conv3.weight, ref_m.conv3.bias]
    ref = [out_r] + list(torch.autograd.grad(out_r, [xr] + params_r, g.double()))
    assert res["fused"][0].dtype == res["eager"][0].dtype
    names = ("out", "grad x", "grad conv0.weight", "grad conv0.bias", "grad conv2_1.weight", "grad conv3.weight",
             "grad conv3.bias")
    for name, got, e, r in zip(names, res["fused"], res["eager"], ref):
        assert got.dtype == e.dtype, name
        # bound in the autocast dtype: eager's error is that of a half-precision computation
        assert_within_rule(f"{backend} {dtype} {name}", got.detach(), r.detach(), e.detach(), dtype)


def check_autocast_nmf2d_updates_stay_fp32(backend, dtype, device, B=2, D=64, N=300, R=16):
    """autocast does not reach into nmf2d: the updates run in float32 (the returned state is float32), half inputs
    give half reconstructions, and the results are the same bits as without autocast; the eager reference (which
    turns autocast off itself) agrees within the NMF rule."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(B, D, N, generator=gen).to(device)
    bases = F.normalize(torch.rand(B, D, R, generator=gen), dim=1).to(device)
    for xin in (x, x.to(dtype)):
        with torch.autocast(device.type, dtype=dtype):
            y, bk, cf = nmf2d(xin, bases, 3, return_state=True, backend=backend)
        assert y.dtype == xin.dtype and bk.dtype == cf.dtype == torch.float32
        plain = nmf2d(xin, bases, 3, return_state=True, backend=backend)
        for name, a, b in zip(("y", "bases", "coef"), (y, bk, cf), plain):
            assert torch.equal(a, b), f"{name}: autocast changed the result"
        ref64 = nmf2d_reference(xin.double(), bases.double(), 3)
        eager = nmf2d_reference(xin, bases, 3)
        nmf_helpers.assert_rule(f"{backend} x {xin.dtype}", y, ref64, eager, xin.dtype,
                                atol=1e-5 if xin.dtype == torch.float32 else None)


def check_autocast_fused_model(backend, dtype, device, size=64):
    """A small SegNeXt-T with fuse(model, backend) under autocast against the same eager model under autocast: the
    fused logits are within twice eager autocast's distance to the float32 eager logits (plus 1e-2 x scale), and
    every parameter gradient is finite with the eager gradient's dtype."""
    torch.manual_seed(0)
    eager = segnext.segnext_t(num_classes=7, embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1),
                              drop_path_rate=0.0, channels=32, ham_channels=32,
                              ham_kwargs=dict(MD_R=8)).to(device).eval()
    fused = copy.deepcopy(eager)
    assert fuse(fused, backend=backend) == {"msca": 4, "ham": 1, "block": 0,
                                            "conv1x1": 0, "resize": 0, "norm": 0, "embed": 0, "group_norm": 0, "head": 0}
    images = torch.randn(2, 3, size, size, device=device)
    torch.manual_seed(1)               # the same NMF bases draw in every run
    ref = eager(images).detach()
    outs = {}
    for name, m in (("eager", eager), ("fused", fused)):
        torch.manual_seed(1)
        with torch.autocast(device.type, dtype=dtype):
            out = m(images)
        out.float().square().mean().backward()
        outs[name] = out.detach()
    assert outs["fused"].dtype == outs["eager"].dtype
    e_eager = (outs["eager"].float() - ref).abs().max().item()
    e_fused = (outs["fused"].float() - ref).abs().max().item()
    bound = 2 * e_eager + 1e-2 * ref.abs().max().item()
    assert e_fused <= bound, f"fused autocast error {e_fused:.3e} > {bound:.3e} (eager autocast {e_eager:.3e})"
    fp = dict(fused.named_parameters())
    for n, p in eager.named_parameters():
        if p.grad is None:
            assert fp[n].grad is None, n
            continue
        assert fp[n].grad is not None and fp[n].grad.dtype == p.grad.dtype, n
        assert torch.isfinite(fp[n].grad).all(), n

"""``FusedPatchEmbed`` (segnext_kernels/fused_embeds.py): MSCAN's stem and patch embeddings with their eval
BatchNorms folded into the convolutions, against the original modules in float64 (randomised BN statistics, odd
sizes), the state_dict, the folded-weight cache following in-place changes, and the fallbacks (training, a gradient,
float64, autocast, bad modules)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segnext.mscan import OverlapPatchEmbed, StemConv
from segnext_kernels.fused_embeds import FusedPatchEmbed, fuse_patch_embeds


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                C = m.num_features
                m.running_mean.copy_(torch.randn(C, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(C, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                m.bias.copy_(torch.randn(C, generator=g) * 0.2)


@pytest.mark.parametrize("make, cin, size", [(lambda: StemConv(3, 32), 3, (37, 50)),
                                             (lambda: OverlapPatchEmbed(32, 64), 32, (19, 24)),
                                             (lambda: OverlapPatchEmbed(160, 256), 160, (8, 9))],
                         ids=["stem", "embed2", "embed4"])
def test_matches_the_original_in_float64(make, cin, size):
    torch.manual_seed(0)
    orig = make().eval()
    _randomise_bn(orig)
    keys = {k: v.clone() for k, v in orig.state_dict().items()}
    fused = FusedPatchEmbed.from_module(orig)
    assert fused.state_dict().keys() == keys.keys()
    x = torch.randn(2, cin, *size)
    with torch.no_grad():
        got = fused(x)
        ref = orig.double()(x.double())
        eager = orig.float()(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    scale = max(ref.abs().max().item(), 1.0)
    assert (got.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max() + 1e-5 * scale


def test_cache_follows_in_place_changes():
    orig = OverlapPatchEmbed(8, 16).eval()
    _randomise_bn(orig)
    fused = FusedPatchEmbed.from_module(orig)
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        fused(x)
        orig.norm.running_mean.add_(0.5)  # in place: the version counter moves
        orig.proj.weight.mul_(1.1)
        torch.testing.assert_close(fused(x), orig(x), rtol=1e-5, atol=1e-5)


def test_fallbacks_run_the_original_modules():
    orig = StemConv(3, 16)
    _randomise_bn(orig)
    fused = FusedPatchEmbed.from_module(orig)
    x = torch.randn(2, 3, 20, 22)
    fused.train()  # training: batch statistics, the original modules
    torch.manual_seed(0)
    torch.testing.assert_close(fused(x), orig.train()(x), rtol=0, atol=0)
    fused.eval()
    orig.eval()
    y = fused(x)  # grad mode with trainable parameters: differentiable, the original modules
    y.sum().backward()
    assert orig.proj[0].weight.grad is not None
    fd = FusedPatchEmbed.from_module(StemConv(3, 16).double().eval())
    xd = x.double()
    with torch.no_grad():
        torch.testing.assert_close(fd(xd), fd._eager(xd), rtol=0, atol=0)
        with torch.autocast("cpu", torch.float16):  # another autocast dtype: the original modules
            torch.testing.assert_close(fused(x), orig(x), rtol=0, atol=0)
        # bfloat16 autocast: the folded convs in bfloat16, within twice eager autocast's error of the float64 module
        ref = copy.deepcopy(orig).double()(x.double())
        with torch.autocast("cpu", torch.bfloat16):
            got, eager = fused(x), orig(x)
        assert got.dtype == eager.dtype == torch.bfloat16
        e_got, e_eager = ((t.double() - ref).abs().max().item() for t in (got, eager))
        assert e_got <= 2 * e_eager + 1e-2 * ref.abs().max().item(), (e_got, e_eager)
    with pytest.raises(TypeError, match="module: expected a segnext StemConv or OverlapPatchEmbed"):
        FusedPatchEmbed.from_module(nn.Conv2d(3, 3, 3))


@pytest.mark.parametrize("fast", [True, False], ids=["onednn_bf16", "bf16_via_fp32"])
def test_bf16_autocast_both_conv_paths(monkeypatch, fast):
    """bfloat16 autocast, inference, for both ways the folded convs run: eager's bfloat16 conv (oneDNN, AVX-512 /
    AMX CPUs) and, where torch has none (AVX2-only CPUs: its slow fallback), the fp32 conv of the bfloat16-rounded
    operands rounded to bfloat16. Each forced on this CPU; each within twice eager autocast's error of the float64
    module, bfloat16 out; the fp32 path equals its definition exactly."""
    from segnext_kernels import fused_embeds

    monkeypatch.setattr(fused_embeds, "_fast_bf16_conv", lambda: fast)
    orig = StemConv(3, 16)
    _randomise_bn(orig)
    orig.eval()
    fused = FusedPatchEmbed.from_module(copy.deepcopy(orig)).eval()
    x = torch.randn(1, 3, 37, 30)
    ref = copy.deepcopy(orig).double()(x.double())
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            got, eager = fused(x), orig(x)
        assert got.dtype == eager.dtype == torch.bfloat16
        e_got, e_eager = ((t.double() - ref).abs().max().item() for t in (got, eager))
        assert e_got <= 2 * e_eager + 1e-2 * ref.abs().max().item(), (e_got, e_eager)
        if not fast:
            (c0, _, act), (c1, _, _) = fused_embeds._pairs(fused, "StemConv")
            (w0, b0), (w1, b1) = fused._folded()
            bf = torch.bfloat16
            conv = lambda t, w, b, c: F.conv2d(t.to(bf).float(), w.to(bf).float(), b.to(bf).float(),  # noqa: E731
                                               c.stride, c.padding).to(bf)
            torch.testing.assert_close(got, conv(act(conv(x, w0, b0, c0)), w1, b1, c1), rtol=0, atol=0)


def test_fuse_swaps_stem_and_patch_embeds():
    import segnext

    model = segnext.segnext_t(num_classes=19).eval()
    keys = model.state_dict().keys()
    assert fuse_patch_embeds(model) == 4
    assert isinstance(model.backbone.patch_embed1, FusedPatchEmbed)
    assert model.state_dict().keys() == keys
    assert fuse_patch_embeds(model) == 0  # already swapped

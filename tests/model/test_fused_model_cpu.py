"""The fused CPU model (segnext_kernels/fused_blocks.py, ``fuse``): FusedBlock and FusedConv1x1 against the eager
modules, and SegNeXt-T / -B after ``fuse`` against eager: logits (eval, odd sizes, channels_last input), every
parameter gradient (train), state_dict unchanged, what ``fuse`` reports, and where it swaps nothing.

BatchNorm running statistics and affine parameters and the layer scales are randomised (the defaults, mean 0, var
1, scale 0.01, would hide a wrong fold), within ranges where the untrained deep models stay finite. Tolerance:
float32 rounding of a deep network, relative to the logits' scale (the folds change the order of a few operations).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import segnext
from segnext_kernels import fuse
from segnext_kernels.extension import CPU_EXTENSION
from segnext_kernels.fused_blocks import FusedBlock, FusedConv1x1, fuse_blocks, fuse_head_convs


@pytest.fixture(scope="module", autouse=True)
def ext():
    ext = CPU_EXTENSION.load()
    ext.set_poison(True)
    yield ext
    ext.set_poison(False)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                C = m.num_features
                m.running_mean.copy_(torch.rand(C, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(C, generator=g) * 0.6 + 0.7)
                m.weight.copy_(torch.rand(C, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.rand(C, generator=g) * 0.2 - 0.1)
        for n, p in model.named_parameters():
            if "layer_scale" in n:
                p.copy_(torch.rand(p.shape, generator=g) * 0.09 + 0.01)
    return model


def close(got, ref, rel=2e-5):
    assert not torch.isnan(got).any()
    err = (got - ref).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1.0), f"error {err:.3e}"


@pytest.mark.parametrize("dim,ratio,shape", [(32, 8, (1, 19, 23)), (64, 4, (2, 9, 8)), (5, 4, (1, 1, 1))], ids=str)
def test_fused_block_matches_block(dim, ratio, shape):
    block = randomise(segnext.mscan.Block(dim, mlp_ratio=ratio)).eval()
    fused = FusedBlock.from_module(copy.deepcopy(block))
    assert list(fused.state_dict()) == list(block.state_dict())
    x = torch.randn(shape[0], dim, *shape[1:])
    with torch.no_grad():
        close(fused(x), block(x))
        y1 = fused(x)
        fused.layer_scale_1.mul_(0.5)  # a parameter changed in place: the folded cache must notice
        fused.norm2.running_var.mul_(1.5)
        y2 = fused(x)
        assert not torch.equal(y2, y1)
        close(y2, fused._eager(x))


def test_fused_block_layouts_and_grad_paths():
    block = randomise(segnext.mscan.Block(16, mlp_ratio=4)).eval()
    fused = FusedBlock.from_module(copy.deepcopy(block))
    x = torch.randn(1, 16, 13, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        close(fused(x), block(x))
        close(fused(x[:, :, 1:, :-1]), block(x[:, :, 1:, :-1]))
    # grad mode with parameters requiring grad: the eager ops, gradients equal eager's
    xg = torch.randn(1, 16, 9, 10, requires_grad=True)
    fused(xg).sum().backward()
    block(xg.detach().requires_grad_()).sum().backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), block.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_conv1x1():
    conv = torch.nn.Conv2d(12, 7, 1)
    fused = FusedConv1x1.from_module(conv)
    assert fused.weight is conv.weight and list(fused.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 12, 5, 9)
    with torch.no_grad():
        close(fused(x), conv(x))
    with pytest.raises(TypeError):
        FusedConv1x1.from_module(torch.nn.Conv2d(3, 3, 3))


@pytest.mark.parametrize("variant", ["t", "b"])
def test_fused_segnext_matches_eager(variant):
    torch.manual_seed(0)
    eager = randomise(getattr(segnext, f"segnext_{variant}")(num_classes=19)).eval()
    fused = copy.deepcopy(eager)
    sd = {k: v.clone() for k, v in eager.state_dict().items()}
    depth = sum(segnext.mscan.MSCAN_CONFIGS[variant]["depths"])
    assert fuse(fused) == {"msca": depth, "ham": 1, "block": depth, "conv1x1": 5, "resize": 2, "norm": 4,
                           "embed": 4}
    assert all(isinstance(b, FusedBlock) for b in fused.backbone.block1)
    assert fused.state_dict().keys() == sd.keys() and all(torch.equal(sd[k], v) for k, v in fused.state_dict().items())
    for shape, cl in (((1, 3, 97, 131), False), ((2, 3, 64, 72), True)):
        images = torch.randn(*shape)
        if cl:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.manual_seed(1)
            ref = eager(images)
            torch.manual_seed(1)
            out = fused(images)
        close(out, ref, rel=1e-4)


def test_fused_segnext_t_training_gradients():
    torch.manual_seed(0)
    eager = randomise(segnext.segnext_t(num_classes=19))
    fused = copy.deepcopy(eager)
    fuse(fused)
    images, target = torch.randn(1, 3, 62, 50), torch.randint(0, 19, (1, 62, 50))
    for m in (eager, fused):
        torch.manual_seed(2)
        F.cross_entropy(m(images), target).backward()
    fp = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        scale = p.grad.abs().max().item() + 1e-12
        assert (fp[name].grad - p.grad).abs().max().item() <= 2e-3 * scale + 1e-7, name


def test_fuse_swaps_blocks_only_where_the_cpu_kernels_run():
    model = segnext.segnext_t(num_classes=5)
    assert fuse_blocks(copy.deepcopy(model), backend="reference") == 0
    assert fuse_head_convs(copy.deepcopy(model), backend="triton") == 0
    r = fuse(copy.deepcopy(model), backend="reference")
    assert r["block"] == 0 and r["conv1x1"] == 0 and r["resize"] == 0 and \
        r["norm"] == 0 and r["embed"] == 0 and r["msca"] == 13
    assert fuse_blocks(copy.deepcopy(model).to("meta")) == 0
    with pytest.raises(ValueError, match="backend"):
        fuse_blocks(model, backend="nope")
    with pytest.raises(TypeError):
        FusedBlock.from_module(torch.nn.Linear(2, 2))

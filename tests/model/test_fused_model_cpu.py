"""The fused CPU model (segnext_kernels/fused_blocks.py, ``fuse``): FusedBlock and FusedConv1x1 against the eager
modules, and SegNeXt-T / -B after ``fuse`` against eager: logits (eval, odd sizes, channels_last input), every
parameter gradient (train), state_dict unchanged, what ``fuse`` reports, and where it swaps nothing; bfloat16 autocast
(blocks, head 1x1s, SegNeXt-T) within twice eager autocast's error.

BatchNorm running statistics and affine parameters and the layer scales are randomised (the defaults, mean 0, var
1, scale 0.01, would hide a wrong fold), within ranges where the untrained deep models stay finite. Tolerance:
float32 rounding of a deep network, relative to the logits' scale (the folds change the order of a few operations).
"""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import segnext
from segnext_kernels import fuse
from segnext_kernels.extension import CPU_EXTENSION
from segnext_kernels import fused_blocks
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


def _block_with_fused_msca(dim, ratio, seed=0):
    from segnext_kernels.modules import FusedMSCA

    torch.manual_seed(seed)
    block = randomise(segnext.mscan.Block(dim, mlp_ratio=ratio), seed).eval()
    fused = FusedBlock.from_module(copy.deepcopy(block))
    fused.attn.spatial_gating_unit = FusedMSCA.from_module(fused.attn.spatial_gating_unit)
    return block, fused


@pytest.mark.parametrize("dim,ratio,shape", [(32, 8, (1, 19, 23)), (24, 4, (2, 7, 5)), (3, 4, (1, 1, 1))], ids=str)
def test_fused_block_direct_path(dim, ratio, shape):
    """Plain eager inference calls the cpu kernel functions directly (no custom-op dispatch): bitwise what the op
    path gives, in-place weight changes (MSCA's packed copy included) are seen, and anything observing ops (the
    profiler, a dispatch mode) gets the custom ops."""
    from segnext_kernels.mlp import cpu as mlp_cpu

    block, fused = _block_with_fused_msca(dim, ratio)
    x = torch.randn(shape[0], dim, *shape[1:])
    with torch.no_grad():
        with mock.patch.object(mlp_cpu, "forward", wraps=mlp_cpu.forward) as spy, \
                mock.patch.object(fused_blocks, "mlp", wraps=fused_blocks.mlp) as op_spy:
            direct = fused(x)
        assert spy.call_count == 1 and op_spy.call_count == 0, "the direct path did not run"
        with mock.patch.object(fused_blocks, "_direct_ok", return_value=False):
            via_ops = fused(x)
        assert torch.equal(direct, via_ops)
        close(direct, block(x))
        for conv in (fused.attn.spatial_gating_unit.conv2_1, fused.mlp.fc2, fused.attn.proj_2):
            conv.weight.mul_(0.5)  # in place: the direct path's packed weights must follow
        for conv in (block.attn.spatial_gating_unit.conv2_1, block.mlp.fc2, block.attn.proj_2):
            conv.weight.mul_(0.5)
        close(fused(x), block(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the bfloat16 autocast path has its direct path too
            with mock.patch.object(mlp_cpu, "forward", wraps=mlp_cpu.forward) as spy:
                direct = fused(x)
            assert spy.call_count == 1
            with mock.patch.object(fused_blocks, "_direct_ok", return_value=False):
                assert torch.equal(direct, fused(x))
            fused.attn.spatial_gating_unit.conv0.weight.mul_(0.5)  # the bf16 packed MSCA weights must follow
            with mock.patch.object(fused_blocks, "_direct_ok", return_value=False):
                via_ops = fused(x)
            assert torch.equal(fused(x), via_ops) and not torch.equal(via_ops, direct)
        with torch.profiler.profile() as prof:
            fused(x)
    names = {e.key for e in prof.key_averages()}
    assert {"segnext_kernels::mlp_fwd", "segnext_kernels::msca_fwd", "segnext_kernels::pwconv_fwd"} <= names


def test_fused_conv1x1():
    conv = torch.nn.Conv2d(12, 7, 1)
    fused = FusedConv1x1.from_module(conv)
    assert fused.weight is conv.weight and list(fused.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 12, 5, 9)
    from segnext_kernels.pwconv import cpu as pwconv_cpu

    with torch.no_grad():
        with mock.patch.object(pwconv_cpu, "forward", wraps=pwconv_cpu.forward) as spy, \
                mock.patch.object(fused_blocks, "pwconv", wraps=fused_blocks.pwconv) as op_spy:
            close(fused(x), conv(x))
        assert spy.call_count == 1 and op_spy.call_count == 0, "the direct path did not run"
        conv.weight.mul_(0.5)  # shared and changed in place: the direct path must see it
        close(fused(x), conv(x))
        direct = fused(x)
        with mock.patch.object(fused_blocks, "_direct_ok", return_value=False):
            assert torch.equal(fused(x), direct)  # the op path: the same kernel, bitwise
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
                           "embed": 4, "group_norm": 3, "head": 1}
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


def within_autocast(got, eager, ref):
    """bfloat16 autocast rule: the fused error against the float64 / float32 reference is at most twice eager
    autocast's + 1e-2 x scale; same dtype as eager's."""
    assert got.dtype == eager.dtype and not torch.isnan(got).any()
    e_eager = (eager.double() - ref.double()).abs().max().item()
    e_got = (got.double() - ref.double()).abs().max().item()
    bound = 2 * e_eager + 1e-2 * max(ref.abs().max().item(), 1.0)
    assert e_got <= bound, f"fused autocast error {e_got:.3e} > {bound:.3e} (eager autocast {e_eager:.3e})"


@pytest.mark.parametrize("dim,ratio,shape", [(32, 8, (1, 19, 23)), (40, 4, (2, 9, 8))], ids=str)
def test_fused_block_bf16_autocast(dim, ratio, shape):
    """Under bfloat16 autocast a bfloat16 or float32 x runs the fused kernels with bfloat16 GEMMs (the weights rounded
    in the kernels, so an in-place change shows at once); the result has eager autocast's dtype (float32) and is
    within the autocast rule."""
    block = randomise(segnext.mscan.Block(dim, mlp_ratio=ratio)).eval()
    fused = FusedBlock.from_module(copy.deepcopy(block))
    x = torch.randn(shape[0], dim, *shape[1:]).bfloat16()
    ref = copy.deepcopy(block).double()(x.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with mock.patch.object(fused_blocks, "mlp", wraps=fused_blocks.mlp) as spy:
            got, eager = fused(x), block(x)
            got32 = fused(x.float())
        assert spy.call_count == 2, "the fused bfloat16 path did not run"
        within_autocast(got, eager, ref)
        within_autocast(got32, block(x.float()), ref)
        fused.mlp.fc1.weight.mul_(0.5)  # a weight changed in place: the bf16 copies must follow
        block.mlp.fc1.weight.mul_(0.5)
        got2, eager2 = fused(x), block(x)
    assert not torch.equal(got2, got)
    with torch.no_grad():
        within_autocast(got2, eager2, copy.deepcopy(block).double()(x.double()))


def test_fused_conv1x1_bf16_autocast():
    conv = torch.nn.Conv2d(24, 13, 1)
    fused = FusedConv1x1.from_module(conv)
    x = torch.randn(2, 24, 7, 9)
    with torch.no_grad():
        ref = conv.double()(x.double())
        conv.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with mock.patch.object(fused_blocks, "pwconv", wraps=fused_blocks.pwconv) as spy:
                got, eager = fused(x), conv(x)
            assert spy.call_count == 1, "the fused bfloat16 path did not run"
    within_autocast(got, eager, ref)
    # a gradient needed: eager autocast's conv, gradients reach the float32 parameters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x.requires_grad_()).float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32


def test_fused_segnext_t_bf16_autocast():
    """SegNeXt-T fused under bfloat16 autocast (blocks and head 1x1s in bfloat16 kernels) against eager float32."""
    torch.manual_seed(0)
    eager = randomise(segnext.segnext_t(num_classes=19)).eval()
    fused = copy.deepcopy(eager)
    fuse(fused)
    images = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        torch.manual_seed(1)
        ref = eager(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(1)
            eag = eager(images)
            torch.manual_seed(1)
            from segnext_kernels.mlp import cpu as mlp_cpu

            with mock.patch.object(mlp_cpu, "forward", wraps=mlp_cpu.forward) as spy:  # the direct path's kernel
                out = fused(images)
    assert spy.call_count == sum(segnext.mscan.MSCAN_CONFIGS["t"]["depths"]), "not every block ran fused"
    within_autocast(out, eag, ref)


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
        r["norm"] == 0 and r["embed"] == 0 and r["group_norm"] == 0 and r["msca"] == 13
    assert fuse_blocks(copy.deepcopy(model).to("meta")) == 0
    with pytest.raises(ValueError, match="backend"):
        fuse_blocks(model, backend="nope")
    with pytest.raises(TypeError):
        FusedBlock.from_module(torch.nn.Linear(2, 2))

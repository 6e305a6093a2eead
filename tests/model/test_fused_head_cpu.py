"""FusedLightHamHead (segnext_kernels/fused_head.py): the squeeze 1x1 run per map before the resize, against the
eager ``segnext.LightHamHead`` sharing the same parameters.

Maps at odd sizes (stage 2 19x23, stage 3 10x12, stage 4 5x6, so the resizes are not exact multiples), both
``align_corners``, channels_last and sliced (non-contiguous) maps. The NMF2D bases are random at every forward
(``rand_init``), so each pair of calls runs under the same seed. Tolerances: float64 fused against float64 eager
(the reorder is exact in real arithmetic): 1e-10 relative; float32 fused against float32 eager: 2e-5 of the logits'
scale (summation order before the GroupNorm); gradients 1e-3 of each gradient's scale; bfloat16 autocast: the rule
of tests/model/test_fused_model_cpu.py (at most twice eager autocast's error against float64 + 1e-2 x scale).
"""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

import segnext
from segnext.ham_head import LightHamHead
from segnext_kernels import fuse_head_squeeze
from segnext_kernels import fused_head
from segnext_kernels.fused_head import FusedLightHamHead

from cpu_ext_helpers import ext, poison  # noqa: F401  (fixtures: the extension, NaN-poisoned outputs)

IN_CH = (16, 24, 40)


def make_head(align_corners=False, seed=0):
    torch.manual_seed(seed)
    head = LightHamHead(in_channels=IN_CH, channels=32, num_classes=7, ham_channels=64, dropout_ratio=0.1,
                        align_corners=align_corners)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # GroupNorm affine and conv_seg away from their identity / zero init
        for m in head.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
        head.conv_seg.weight.normal_(0, 0.2, generator=g)
        head.conv_seg.bias.normal_(0, 0.1, generator=g)
    return head


def maps(B=2, sizes=((19, 23), (10, 12), (5, 6)), dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, c, *s, generator=g, dtype=dtype) for c, s in zip(IN_CH, sizes)]
    return [torch.randn(B, 8, 40, 46, generator=g, dtype=dtype)] + feats  # stage 1 (not read: in_index 1, 2, 3)


def run(head, inputs, seed=5):
    torch.manual_seed(seed)
    return head(inputs)


def scale_err(got, ref):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert not torch.isnan(got).any()
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_fused_head_matches_eager(align_corners):
    head = make_head(align_corners).eval()
    fused = FusedLightHamHead.from_module(copy.deepcopy(head))
    assert list(fused.state_dict()) == list(head.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), head.state_dict().values()))
    inputs = maps()
    with torch.no_grad():
        # float64: the reorder alone (pwconv's reference path), exact up to float64 rounding
        h64, f64 = copy.deepcopy(head).double(), copy.deepcopy(fused).double()
        in64 = [t.double() for t in inputs]
        ref64 = run(h64, in64)
        assert scale_err(run(f64, in64), ref64) <= 1e-10
        # float32 (the cpu pwconv and resize kernels), also channels_last and sliced maps
        ref = run(head, inputs)
        assert scale_err(run(fused, inputs), ref) <= 2e-5
        cl = [t.contiguous(memory_format=torch.channels_last) for t in inputs]
        assert scale_err(run(fused, cl), ref) <= 2e-5
        wide = [torch.cat([t, t], dim=1)[:, : t.shape[1]] for t in inputs]  # non-contiguous views, same values
        assert not wide[2].is_contiguous()
        assert scale_err(run(fused, wide), ref) <= 2e-5


def test_fused_head_runs_the_parts():
    """The squeeze runs as one pwconv per selected map (not one on the concatenation)."""
    head = make_head().eval()
    fused = FusedLightHamHead.from_module(copy.deepcopy(head))
    with torch.no_grad(), mock.patch.object(fused_head, "pwconv", wraps=fused_head.pwconv) as spy:
        run(fused, maps())
    assert spy.call_count == 3
    assert [c.args[1].shape[1] for c in spy.call_args_list] == [IN_CH[1], IN_CH[2], IN_CH[0]]


def test_fused_head_weight_change_seen():
    head = make_head().eval()
    fused = FusedLightHamHead.from_module(copy.deepcopy(head))
    inputs = maps()
    with torch.no_grad():
        first = run(fused, inputs)
        fused.squeeze.conv.weight.mul_(0.5)  # in place: the cached column blocks must follow
        head.squeeze.conv.weight.mul_(0.5)
        second = run(fused, inputs)
        assert not torch.equal(first, second)
        assert scale_err(second, run(head, inputs)) <= 2e-5


def test_fused_head_same_size_maps_fall_back():
    """Every selected map at stage 2's size: nothing to reorder, the head's own forward runs (bitwise eager)."""
    head = make_head().eval()
    fused = FusedLightHamHead.from_module(copy.deepcopy(head))
    inputs = maps(sizes=((9, 11), (9, 11), (9, 11)))
    with torch.no_grad(), mock.patch.object(fused_head, "pwconv", wraps=fused_head.pwconv) as spy:
        got = run(fused, inputs)
    assert spy.call_count == 0
    with torch.no_grad():
        assert torch.equal(got, run(head, inputs))


def test_fused_head_training_gradients():
    head = make_head().train()
    fused = FusedLightHamHead.from_module(copy.deepcopy(head))
    grads = []
    for m in (head, fused):
        inputs = [t.requires_grad_() for t in maps()]
        out = run(m, inputs)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append(({n: p.grad for n, p in m.named_parameters()}, [t.grad for t in inputs[1:]]))
    (pe, xe), (pf, xf) = grads
    for name, g in pe.items():
        assert pf[name] is not None, name
        assert (pf[name] - g).abs().max().item() <= 1e-3 * (g.abs().max().item() + 1e-12) + 1e-7, name
    for a, b in zip(xf, xe):
        assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item() + 1e-7


def test_fused_head_bf16_autocast():
    head = make_head().eval()
    fused = FusedLightHamHead.from_module(copy.deepcopy(head))
    inputs = maps()
    with torch.no_grad():
        ref = run(copy.deepcopy(head).double(), [t.double() for t in inputs])
        seen = []  # the dtype the squeeze's GroupNorm gets: eager autocast's conv output dtype in both
        hook = lambda mod, args: seen.append(args[0].dtype)  # noqa: E731
        handles = [m.squeeze.gn.register_forward_pre_hook(hook) for m in (head, fused)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = run(head, inputs)
            with mock.patch.object(fused_head, "pwconv", wraps=fused_head.pwconv) as spy:
                got = run(fused, inputs)
        for h in handles:
            h.remove()
    assert spy.call_count == 3 and all(c.kwargs["gemm_dtype"] == torch.bfloat16 for c in spy.call_args_list)
    assert got.dtype == eager.dtype and seen[0] == seen[1], seen
    e_eager = (eager.double() - ref).abs().max().item()
    e_got = (got.double() - ref).abs().max().item()
    assert e_got <= 2 * e_eager + 1e-2 * max(ref.abs().max().item(), 1.0), (e_got, e_eager)


def test_fuse_head_squeeze_where_and_errors():
    model = segnext.segnext_t(num_classes=5)
    assert fuse_head_squeeze(copy.deepcopy(model), backend="reference") == 0
    assert fuse_head_squeeze(copy.deepcopy(model).to("meta")) == 0
    m = copy.deepcopy(model)
    assert fuse_head_squeeze(m) == 1 and isinstance(m.decode_head, FusedLightHamHead)
    assert fuse_head_squeeze(m) == 0  # already fused
    with pytest.raises(ValueError, match="backend"):
        fuse_head_squeeze(model, backend="nope")
    with pytest.raises(TypeError, match="head"):
        FusedLightHamHead.from_module(torch.nn.Conv2d(2, 2, 1))

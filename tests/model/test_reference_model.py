"""Tests of the pure-PyTorch SegNeXt reference model (segnext/), CPU only, small inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segnext
from segnext import NMF2D, SegNeXt, segnext_b, segnext_l, segnext_s, segnext_t
from segnext.mscan import DropPath

FACTORIES = {"t": segnext_t, "s": segnext_s, "b": segnext_b, "l": segnext_l}


@pytest.fixture(scope="module")
def model_t():
    torch.manual_seed(0)
    return segnext_t().eval()


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("variant, params, keys", [
    ("t", 4_263_414, 550), ("s", 13_932_886, 436), ("b", 27_636_310, 854),
    ("l", 48_926_550, 1500)])
def test_param_and_key_counts(variant, params, keys):
    model = FACTORIES[variant](num_classes=150)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys
    assert not [k for k in model.state_dict() if "hamburger.ham." in k]  # NMF2D has no state


def test_spec_example_keys_and_shapes(model_t):
    sd = model_t.state_dict()
    b, g = "backbone.block1.0.", "backbone.block1.0.attn.spatial_gating_unit."
    expected = {
        "backbone.patch_embed1.proj.0.weight": (16, 3, 3, 3),
        "backbone.patch_embed1.proj.1.running_mean": (16,),
        "backbone.patch_embed1.proj.3.weight": (32, 16, 3, 3),
        "backbone.patch_embed1.proj.4.num_batches_tracked": (),
        "backbone.patch_embed2.proj.weight": (64, 32, 3, 3),
        "backbone.patch_embed2.norm.running_var": (64,),
        b + "layer_scale_1": (32,), b + "layer_scale_2": (32,), b + "norm1.weight": (32,),
        b + "attn.proj_1.weight": (32, 32, 1, 1), b + "attn.proj_2.weight": (32, 32, 1, 1),
        g + "conv0.weight": (32, 1, 5, 5), g + "conv0_1.weight": (32, 1, 1, 7),
        g + "conv0_2.weight": (32, 1, 7, 1), g + "conv1_1.weight": (32, 1, 1, 11),
        g + "conv1_2.weight": (32, 1, 11, 1), g + "conv2_1.weight": (32, 1, 1, 21),
        g + "conv2_2.weight": (32, 1, 21, 1), g + "conv3.weight": (32, 32, 1, 1),
        b + "mlp.fc1.weight": (256, 32, 1, 1), b + "mlp.dwconv.dwconv.weight": (256, 1, 3, 3),
        b + "mlp.dwconv.dwconv.bias": (256,), b + "mlp.fc2.weight": (32, 256, 1, 1),
        "backbone.block4.1.mlp.fc1.weight": (1024, 256, 1, 1),
        "backbone.norm1.weight": (32,), "backbone.norm4.bias": (256,),
        "decode_head.conv_seg.weight": (150, 256, 1, 1), "decode_head.conv_seg.bias": (150,),
        "decode_head.squeeze.conv.weight": (256, 480, 1, 1), "decode_head.squeeze.gn.weight": (256,),
        "decode_head.hamburger.ham_in.conv.weight": (256, 256, 1, 1),
        "decode_head.hamburger.ham_in.conv.bias": (256,),
        "decode_head.hamburger.ham_out.conv.weight": (256, 256, 1, 1),
        "decode_head.hamburger.ham_out.gn.bias": (256,),
        "decode_head.align.conv.weight": (256, 256, 1, 1), "decode_head.align.gn.weight": (256,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    for absent in ("decode_head.squeeze.conv.bias", "decode_head.hamburger.ham_out.conv.bias",
                   "decode_head.align.conv.bias", b + "mlp.dwconv.weight"):
        assert absent not in sd
    keys = list(sd)
    block_keys = [k for k in keys if k.startswith(b)]
    assert block_keys[:2] == [b + "layer_scale_1", b + "layer_scale_2"]
    assert [k for k in keys if k.startswith("decode_head.")][0] == "decode_head.conv_seg.weight"


def test_head_widths_per_variant():
    sd_l = segnext_l(num_classes=19).decode_head.state_dict()
    assert tuple(sd_l["squeeze.conv.weight"].shape) == (1024, 960, 1, 1)
    assert tuple(sd_l["align.conv.weight"].shape) == (1024, 1024, 1, 1)
    assert tuple(sd_l["conv_seg.weight"].shape) == (19, 1024, 1, 1)
    ranks = {v: FACTORIES[v]().decode_head.hamburger.ham.R for v in "tsb"}
    assert ranks == {"t": 16, "s": 16, "b": 64}
    assert segnext_l().backbone.block4[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert segnext_t().backbone.block4[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_syncbn_same_keys_and_runs_on_cpu():
    bn, sync = segnext_t(), segnext_t(norm_cfg="SyncBN")
    assert isinstance(sync.backbone.block1[0].norm1, torch.nn.SyncBatchNorm)
    assert {k: v.shape for k, v in bn.state_dict().items()} == \
        {k: v.shape for k, v in sync.state_dict().items()}
    sync.load_state_dict(bn.state_dict())
    x = torch.randn(1, 3, 64, 64)
    bn.eval(), sync.eval()
    torch.manual_seed(1)
    a = bn(x)
    torch.manual_seed(1)
    assert torch.equal(a, sync(x))
    with pytest.raises(ValueError):
        segnext_t(norm_cfg="LN")


def test_init(model_t):
    bb = model_t.backbone
    assert torch.all(bb.block2[1].layer_scale_1 == 1e-2)
    fc1 = segnext_b().backbone.block3[0].mlp.fc1  # 1280 x 320 weights
    assert fc1.weight.std().item() == pytest.approx(math.sqrt(2 / 1280), rel=0.05)
    assert torch.all(fc1.bias == 0) and torch.all(bb.norm2.weight == 1)
    assert model_t.decode_head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_factory_rejects_unknown_override():
    with pytest.raises(TypeError):
        segnext_t(foo=1)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("hw", [(33, 47), (64, 64), (97, 65)])
def test_forward_shapes_odd_sizes(model_t, hw):
    x = torch.randn(2, 3, *hw)
    feats = model_t.backbone(x)
    (h, w), sizes = hw, []
    for stage in range(4):  # every stride-2 conv (k3, p1) gives ceil(size / 2)
        for _ in range(2 if stage == 0 else 1):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    assert [tuple(f.shape[2:]) for f in feats] == sizes
    assert [f.shape[1] for f in feats] == [32, 64, 160, 256]
    with torch.no_grad():
        out = model_t(x)
    assert out.shape == (2, 150, *hw) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_eval_deterministic_under_manual_seed(model_t):
    x = torch.randn(1, 3, 65, 47)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model_t(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])  # fresh random NMF bases at eval, as official


def test_generator_reproducible_independent_of_global_rng():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = segnext_t(ham_kwargs=dict(generator=gen)).eval()
    assert model.decode_head.hamburger.ham.R == 16  # ham_kwargs override is merged
    x = torch.randn(1, 3, 64, 64)
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gen.manual_seed(123)
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    gen.manual_seed(124)
    with torch.no_grad():
        assert not torch.equal(model(x), outs[0])


def _graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return len(seen)


def test_one_step_vs_unrolled_same_values_different_gradients():
    torch.manual_seed(0)
    model = segnext_t().eval()
    ham = model.decode_head.hamburger.ham
    x0 = torch.randn(1, 3, 64, 48)
    res = {}
    for mode in ("unrolled", "one_step"):
        ham.grad_mode = mode
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(7)
        out = model(x)
        out.square().mean().backward()
        res[mode] = out.detach(), x.grad, _graph_size(out)
    assert torch.equal(res["unrolled"][0], res["one_step"][0])
    assert not torch.allclose(res["unrolled"][1], res["one_step"][1], rtol=1e-3, atol=0)
    assert res["one_step"][2] < res["unrolled"][2]

    # module level: in one_step only the final coef update and the reconstruction are recorded
    e = torch.rand(1, 32, 6, 5, requires_grad=True)
    bases = F.normalize(torch.rand(1, 32, 4), dim=1)
    sizes = {m: _graph_size(NMF2D(MD_R=4, grad_mode=m).eval()(e, bases)) for m in
             ("unrolled", "one_step")}
    assert sizes["one_step"] < sizes["unrolled"] // 5


def _reference_block(blk, x):
    """Block forward written directly from the formulas of docs/reference_model.md with F.conv2d."""
    p = {k: v for k, v in blk.state_dict().items()}
    C = x.shape[1]

    def bn(t, pre):
        return F.batch_norm(t, p[pre + "running_mean"], p[pre + "running_var"], p[pre + "weight"],
                            p[pre + "bias"], False, 0.0, 1e-5)

    def conv(t, pre, groups=1):
        w = p[pre + "weight"]
        return F.conv2d(t, w, p[pre + "bias"], padding=(w.shape[2] // 2, w.shape[3] // 2),
                        groups=groups)

    y = bn(x, "norm1.")
    u = F.gelu(conv(y, "attn.proj_1."))
    g = "attn.spatial_gating_unit."
    a = conv(u, g + "conv0.", C)
    branches = [conv(conv(a, f"{g}conv{i}_1.", C), f"{g}conv{i}_2.", C) for i in range(3)]
    att = conv(a + sum(branches), g + "conv3.") * u
    x = x + p["layer_scale_1"].view(-1, 1, 1) * (conv(att, "attn.proj_2.") + y)
    y = bn(x, "norm2.")
    hidden = p["mlp.fc1.weight"].shape[0]
    h = F.gelu(conv(conv(y, "mlp.fc1."), "mlp.dwconv.dwconv.", hidden))
    return x + p["layer_scale_2"].view(-1, 1, 1) * conv(h, "mlp.fc2.")


def test_block_matches_spec_formula():
    torch.manual_seed(0)
    blk = segnext_t().backbone.block2[1].eval().double()
    with torch.no_grad():
        for name, t in blk.state_dict().items():  # non-trivial biases, BN stats, scales
            if t.is_floating_point():
                t.uniform_(0.5, 2) if "running_var" in name else t.add_(torch.randn_like(t) / 4)
        x = torch.randn(2, 64, 9, 7, dtype=torch.float64)
        torch.testing.assert_close(blk(x), _reference_block(blk, x), rtol=1e-12, atol=1e-12)


def test_segmentor_composition(model_t):
    """SegNeXt.forward == resize(head(select/resize/concat of backbone stages 2-4))."""
    x = torch.randn(1, 3, 70, 45)
    head = model_t.decode_head
    with torch.no_grad():
        f = model_t.backbone(x)[1:]
        size = f[0].shape[2:]
        cat = torch.cat([f[0]] + [F.interpolate(t, size, mode="bilinear", align_corners=False)
                                  for t in f[1:]], 1)
        sq = head.squeeze(cat)
        ham = head.hamburger
        torch.manual_seed(5)
        e = ham.ham_out(ham.ham(F.relu(ham.ham_in(sq))))
        y = head.conv_seg(head.align(F.relu(sq + e)))
        expected = F.interpolate(y, x.shape[2:], mode="bilinear", align_corners=False)
        torch.manual_seed(5)
        torch.testing.assert_close(model_t(x), expected, rtol=0, atol=0)


def test_droppath_per_sample():
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    x = torch.rand(64, 3, 4, 4) + 1
    y = dp(x)
    kept = (y != 0).flatten(1)
    assert torch.all(kept.all(1) | (~kept).all(1))  # whole samples dropped
    assert 0 < kept.all(1).sum() < 64
    torch.testing.assert_close(y[kept.all(1)], x[kept.all(1)] / 0.5)
    assert torch.equal(dp.eval()(x), x)


# --------------------------------------------------------------------------- NMF2D
def _numpy_nmf(x, bases, steps, eps=1e-6, inv_t=1.0):
    """Straightforward per-sample loop over the NMF2D update formulas, float64 numpy."""
    out = []
    for X, Bm in zip(x, bases):
        logits = inv_t * (X.T @ Bm)
        Cm = np.exp(logits - logits.max(1, keepdims=True))
        Cm /= Cm.sum(1, keepdims=True)
        for _ in range(steps):
            Cm = Cm * (X.T @ Bm) / (Cm @ (Bm.T @ Bm) + eps)
            Bm = Bm * (X @ Cm) / (Bm @ (Cm.T @ Cm) + eps)
        Cm = Cm * (X.T @ Bm) / (Cm @ (Bm.T @ Bm) + eps)
        out.append(Bm @ Cm.T)
    return np.stack(out)


@pytest.mark.parametrize("S, training", [(1, False), (1, True), (2, False)])
def test_nmf2d_matches_independent_float64(S, training):
    gen = torch.Generator().manual_seed(1)
    B, C, H, W, R = 2, 24, 5, 7, 6
    x = torch.rand(B, C, H, W, dtype=torch.float64, generator=gen)
    bases = F.normalize(torch.rand(B * S, C // S, R, dtype=torch.float64, generator=gen), dim=1)
    nmf = NMF2D(MD_S=S, MD_R=R).train(training)
    out = nmf(x, bases)
    assert out.dtype == torch.float64 and out.shape == x.shape
    ref = _numpy_nmf(x.reshape(B * S, C // S, H * W).numpy(), bases.numpy(), 6 if training else 7)
    np.testing.assert_allclose(out.reshape(B * S, C // S, H * W).numpy(), ref, rtol=1e-10,
                               atol=1e-12)


def test_nmf2d_bases_follow_official_rng_and_errors():
    nmf = NMF2D(MD_S=2, MD_R=8)
    torch.manual_seed(11)
    bases = nmf._build_bases(3, 10, torch.device("cpu"))
    torch.manual_seed(11)
    expected = F.normalize(torch.rand(6, 10, 8), dim=1)
    assert bases.dtype == torch.float32 and torch.equal(bases, expected)
    torch.testing.assert_close(bases.norm(dim=1), torch.ones(6, 8))
    x = torch.rand(3, 20, 4, 4)
    torch.manual_seed(11)
    assert torch.equal(nmf.eval()(x), nmf(x, expected))
    with pytest.raises(ValueError):
        nmf(x, expected[:, :, :4])
    with pytest.raises(ValueError):
        nmf(torch.rand(1, 21, 4, 4))
    with pytest.raises(ValueError):
        NMF2D(grad_mode="exact")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nmf2d_low_precision_runs_in_float32(dtype):
    x = torch.rand(2, 32, 6, 6).to(dtype)
    bases = F.normalize(torch.rand(2, 32, 8), dim=1)
    nmf = NMF2D(MD_R=8).eval()
    out = nmf(x, bases)
    assert out.dtype == dtype
    assert torch.equal(out, nmf(x.float(), bases).to(dtype))
    expected = nmf(x.float(), bases)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not lower the NMF
        assert torch.equal(nmf(x.float(), bases), expected)


def test_public_exports():
    for name in ("MSCAN", "AttentionModule", "SpatialAttention", "Block", "NMF2D", "Hamburger",
                 "LightHamHead", "SegNeXt", "segnext_t", "segnext_s", "segnext_b", "segnext_l",
                 "mscan_t", "mscan_s", "mscan_b", "mscan_l", "load_checkpoint", "CheckpointError"):
        assert hasattr(segnext, name), name
    assert isinstance(segnext_t(), SegNeXt)
    assert sum(p.numel() for p in segnext.mscan_t().parameters()) == 3_903_584


# ------------------------------------------------------------------ official / mmseg option names (issue 19)
def test_ham_kwargs_official_meaning():
    from segnext.config import MMSEG_HAM_KWARGS, nmf_kwargs
    ham = segnext.Hamburger(64, dict(MMSEG_HAM_KWARGS)).ham       # an mmseg config's dict, verbatim
    assert (ham.S, ham.R, ham.train_steps, ham.eval_steps, ham.inv_t, ham.rand_init) == (1, 16, 6, 7, 1, True)
    official = dict(SPATIAL=True, MD_S=1, MD_D=512, MD_R=32, TRAIN_STEPS=3, EVAL_STEPS=4, INV_T=100, ETA=0.9,
                    RAND_INIT=True)
    ham = segnext.Hamburger(64, official).ham
    assert (ham.R, ham.train_steps, ham.eval_steps, ham.inv_t) == (32, 3, 4, 1)
    assert segnext.Hamburger(64, dict(softmax_inv_t=2.5)).ham.inv_t == 2.5   # a real temperature
    with pytest.raises(TypeError, match="'md_r'"):
        nmf_kwargs(dict(md_r=16))
    with pytest.raises(ValueError, match="'train_steps'=6 and 'TRAIN_STEPS'=3"):
        nmf_kwargs(dict(train_steps=6, TRAIN_STEPS=3))
    # factory: an official spelling replaces the variant's value
    assert segnext_b(ham_kwargs=dict(TRAIN_STEPS=2, inv_t=100)).decode_head.hamburger.ham.train_steps == 2
    assert segnext_b(config="mmseg").decode_head.hamburger.ham.R == 16
    assert segnext_b().decode_head.hamburger.ham.R == 64
    with pytest.raises(ValueError, match="config"):
        segnext_t(config="mmcv")


def test_nmf2d_rand_init_false_buffer_and_spatial_false():
    x = torch.rand(2, 8, 3, 5)
    nmf = NMF2D(MD_S=2, MD_R=3, rand_init=False).eval()
    assert nmf.bases is None and dict(nmf.state_dict()) == {}
    torch.manual_seed(0)
    y = nmf(x)
    torch.manual_seed(0)
    b0 = F.normalize(torch.rand(2, 4, 3), dim=1)
    assert torch.equal(nmf.bases, b0) and list(nmf.state_dict()) == ["bases"]
    torch.testing.assert_close(y, NMF2D(MD_S=2, MD_R=3).eval()(x, b0.repeat(2, 1, 1)))
    torch.manual_seed(5)
    assert torch.equal(nmf(x), y)                         # the buffer is reused, never updated
    fresh = NMF2D(MD_S=2, MD_R=3, rand_init=False)
    fresh.load_state_dict(nmf.state_dict())               # loads before its first forward
    assert torch.equal(fresh.bases, b0)
    with pytest.raises(ValueError, match="stored bases"):
        nmf(torch.rand(1, 6, 3, 5))
    # SPATIAL=False: the matrices are (H*W, C/S)
    ns = NMF2D(MD_S=2, MD_R=3, spatial=False).eval()
    bases = F.normalize(torch.rand(4, 15, 3), dim=1)
    xs = x.reshape(4, 4, 15).transpose(1, 2)               # (B*S, D=H*W, N=C/S)
    expected = np.asarray(_numpy_nmf(xs.double().numpy(), bases.double().numpy(), 7))
    out = ns(x, bases).reshape(4, 4, 15).transpose(1, 2)
    torch.testing.assert_close(out.double(), torch.from_numpy(expected).reshape(out.shape), rtol=1e-4, atol=1e-5)


def test_align_corners_reaches_the_final_resize():
    model = segnext_t(align_corners=True).eval()
    assert model.align_corners and model.decode_head.align_corners
    x = torch.randn(1, 3, 40, 56)
    gen = torch.Generator()
    model.decode_head.hamburger.ham.generator = gen
    gen.manual_seed(0)
    out = model(x)
    gen.manual_seed(0)
    logits = model.decode_head(model.backbone(x))
    torch.testing.assert_close(out, F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True))
    model.align_corners = False                            # one flag, the head's (mmseg EncoderDecoder)
    assert not model.decode_head.align_corners


def test_mmcv_option_names_accepted_or_refused_by_name():
    m = segnext.mscan_t(norm_cfg=dict(type="BN", requires_grad=False, eps=1e-3), act_cfg=dict(type="GELU"),
                        attention_kernel_sizes=[5, [1, 7], [1, 11], [1, 21]], in_channels=3, num_stages=4)
    bn = m.block1[0].norm1
    assert bn.eps == 1e-3 and not bn.weight.requires_grad and m.block1[0].attn.proj_1.weight.requires_grad
    head = segnext_t(head_norm_cfg=dict(type="GN", num_groups=32, requires_grad=False)).decode_head
    assert not head.squeeze.gn.weight.requires_grad
    assert len(segnext.mscan_t(num_stages=3)(torch.randn(1, 3, 32, 32))) == 3
    for kwargs, pattern in [(dict(in_channels=4), "in_channels=4"),
                            (dict(attention_kernel_sizes=[5, [1, 9], [1, 11], [1, 21]]), "attention_kernel_sizes"),
                            (dict(attention_kernel_paddings=[2, [0, 3]]), "attention_kernel_paddings"),
                            (dict(init_cfg=dict(type="Pretrained", checkpoint="x.pth")), "init_cfg"),
                            (dict(pretrained="x.pth"), "pretrained"),
                            (dict(act_cfg=dict(type="ReLU")), "act_cfg"),
                            (dict(norm_cfg=dict(type="BN", frozen=True)), r"\['frozen'\]"),
                            (dict(norm_cfg=dict(type="BN", requires_grad="yes")), "requires_grad"),
                            (dict(num_stages=5), "num_stages")]:
        with pytest.raises(ValueError, match=pattern):
            segnext.mscan_t(**kwargs)
    with pytest.raises(ValueError, match="conv_cfg"):
        segnext_t(conv_cfg=dict(type="DCN"))
    with pytest.raises(ValueError, match="act_cfg"):
        segnext_t(head_act_cfg=dict(type="GELU"))
    with pytest.raises(TypeError, match="loss_decode"):
        segnext_t(loss_decode=dict(type="CrossEntropyLoss"))

"""Parity with mmsegmentation 1.2.2's own SegNeXt: its ``MSCAN`` and ``LightHamHead`` are built from the installed
package's source files with its own configs (``configs/segnext/segnext_mscan-{t,s,b,l}_*.py``, read by mmengine's
``Config.fromfile``), the weights are shared with ours both ways (mmseg's key spelling into ours, ours back into
mmseg's), and logits are compared in float64 (eval, the same NMF2D bases) before and after
``segnext_kernels.fuse``; ``fuse`` applied to mmseg's model swaps its ``MSCAAttention`` / ``NMF2D`` modules and
keeps its outputs; an mmengine checkpoint whose ``meta['cfg']`` says MD_R=16 loaded into ``segnext_b()`` gives
mmseg's logits.

Needs mmsegmentation 1.2.2, mmengine and mmcv-lite (pure Python; mmcv's compiled ops are not used by SegNeXt):

    pip install --no-deps mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0
    pip install addict yapf platformdirs termcolor rich pyyaml packaging opencv-python-headless

Without them the mmseg tests are skipped, saying which import failed. mmseg's package ``__init__`` files import
the whole model zoo (scipy, ftfy, mmcv's compiled ops), so only the files SegNeXt needs are imported, under
namespace stand-ins for those packages; everything that runs is mmseg's, mmengine's and mmcv-lite's own code.
The one change to mmseg's modules: its ``NMF2D._build_bases`` draws ``torch.rand`` in the default dtype, which
does not run in a float64 model (bmm of float64 by float32); the test makes it draw as ours does (float32 on the
CPU default generator, L2-normalised over D), so that both see the same bases under one seed.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import segnext
import segnext_kernels
from segnext.config import MMSEG_HAM_KWARGS
from segnext_kernels import FusedMSCA, FusedNMF2D, fuse, fuse_ham, fuse_msca

MMSEG_VERSION = "1.2.2"
VARIANTS = {"t": segnext.segnext_t, "s": segnext.segnext_s, "b": segnext.segnext_b, "l": segnext.segnext_l}
DEPTHS = {"t": 13, "s": 10, "b": 21, "l": 38}
SIZE = (32, 48)  # input H, W: the smallest the model takes, non-square (float64 depthwise convs are slow on CPU)
BATCH = {"t": 2, "s": 1, "b": 1, "l": 1}
ATOL = 1e-9      # float64


# ------------------------------------------------------------------------------------------------ loading mmseg
def _stub_package(name: str, path: str) -> None:
    if name in sys.modules:
        return
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    mod.__package__ = name
    sys.modules[name] = mod


@functools.lru_cache(maxsize=None)
def _load_mmseg():
    """(namespace with MSCAN, LightHamHead, config dir, Config) or raise ImportError saying what is missing. Loaded
    once per process: the module fixture is set up again when pytest-xdist's worksteal interleaves this file with
    others, and a second find_spec("mmseg") would meet the stub package below (``__spec__`` None: a ValueError, a
    skip that hid the parity tests)."""
    for dep in ("mmengine", "mmcv", "mmseg"):
        if importlib.util.find_spec(dep) is None:
            raise ImportError(f"{dep} is not installed")
    import mmengine.config  # noqa: F401  (real package: registry, BaseModule, Config)
    import mmcv.cnn  # noqa: F401  (mmcv-lite: ConvModule, build_norm_layer, DropPath; no compiled ops needed)
    root = os.path.dirname(importlib.util.find_spec("mmseg").origin)
    _stub_package("mmseg", root)
    version = importlib.import_module("mmseg.version").__version__
    if version != MMSEG_VERSION:
        raise ImportError(f"mmsegmentation {version} is installed; this test is written against {MMSEG_VERSION}")
    for sub in ("models", "models.backbones", "models.decode_heads", "models.utils", "models.losses", "utils"):
        _stub_package("mmseg." + sub, os.path.join(root, *sub.split(".")))
    typing_utils = importlib.import_module("mmseg.utils.typing_utils")
    for name in dir(typing_utils):
        if not name.startswith("_"):
            setattr(sys.modules["mmseg.utils"], name, getattr(typing_utils, name))
    sys.modules["mmseg.models.utils"].resize = importlib.import_module("mmseg.models.utils.wrappers").resize
    sys.modules["mmseg.models.losses"].accuracy = importlib.import_module("mmseg.models.losses.accuracy").accuracy
    importlib.import_module("mmseg.models.losses.cross_entropy_loss")  # registers the configs' loss_decode type
    mscan = importlib.import_module("mmseg.models.backbones.mscan")
    ham_head = importlib.import_module("mmseg.models.decode_heads.ham_head")
    from mmengine.config import Config
    return types.SimpleNamespace(MSCAN=mscan.MSCAN, LightHamHead=ham_head.LightHamHead, NMF2D=ham_head.NMF2D,
                                 MSCAAttention=mscan.MSCAAttention, resize=sys.modules["mmseg.models.utils"].resize,
                                 Config=Config, configs=os.path.join(root, ".mim", "configs", "segnext"))


@pytest.fixture(scope="module")
def mm():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _load_mmseg()
    except Exception as err:  # noqa: BLE001 - any import failure is a skip with its reason
        pytest.skip(f"mmsegmentation {MMSEG_VERSION} parity needs mmsegmentation=={MMSEG_VERSION}, mmengine and "
                    f"mmcv-lite (see this file's docstring): {type(err).__name__}: {err}")


def _config(mm, variant):
    path = os.path.join(mm.configs, f"segnext_mscan-{variant}_1xb16-adamw-160k_ade20k-512x512.py")
    return mm.Config.fromfile(path)


def _our_draw(self, B, S, D, R, device=None):
    """mmseg ``NMF2D._build_bases`` drawing as segnext.NMF2D does (float32 torch.rand on the CPU default
    generator, L2-normalised over D), in float64 for the float64 model; see the module docstring."""
    bases = F.normalize(torch.rand((B * S, D, R), dtype=torch.float32), dim=1)
    return bases.to(device=device or "cpu", dtype=torch.float64)


class MMSegSegNeXt(torch.nn.Module):
    """mmseg's backbone + head, with mmseg ``EncoderDecoder.encode_decode``'s steps: ``decode_head.predict`` (its
    ``forward`` then ``predict_by_feat``'s resize to the image with the head's ``align_corners``)."""

    def __init__(self, mm, cfg, **head_overrides):
        super().__init__()
        backbone = {k: v for k, v in cfg.model.backbone.items() if k not in ("type", "init_cfg")}
        head = {k: v for k, v in cfg.model.decode_head.items() if k != "type"}
        head.update(head_overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.backbone, self.decode_head = mm.MSCAN(**backbone), mm.LightHamHead(**head)
        self.test_cfg = cfg.model.test_cfg
        for m in self.modules():
            if isinstance(m, mm.NMF2D):
                m._build_bases = types.MethodType(_our_draw, m)

    def forward(self, x):
        metas = [dict(img_shape=tuple(x.shape[2:]), pad_shape=tuple(x.shape[2:]))] * x.shape[0]
        return self.decode_head.predict(self.backbone(x), metas, self.test_cfg)


@torch.no_grad()
def _randomise(model, seed=0):
    """Weights away from their init (layer scales, norms, BN statistics), so every path matters."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
        elif name.endswith(("running_mean", ".bias")):
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.1)
        elif "layer_scale" in name:  # moderate: 38 residual blocks (L) must not overflow
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 0.1 + 0.05)
        elif t.dim() == 1:
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 0.5 + 0.75)
        else:
            t.mul_(1.0 + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))


def _mmseg_spelling(sd):
    return {k.replace(".mlp.dwconv.dwconv.", ".mlp.dwconv."): v for k, v in sd.items()}


def _run(model, x, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


def _maxdiff(a, b):
    return (a - b).abs().max().item()




# ------------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_mmseg_before_and_after_fuse(mm, variant):
    cfg = _config(mm, variant)
    ref = MMSegSegNeXt(mm, cfg)
    _randomise(ref, seed=ord(variant))
    ref = ref.double().eval()
    # ours from the variant factory with mmseg's configs: mmseg's B/L use MD_R=16
    ours = VARIANTS[variant](config="mmseg").double().eval()
    assert ours.decode_head.hamburger.ham.R == 16
    report = segnext.load_checkpoint(ours, dict(ref.state_dict()))  # mmseg key spelling in
    assert report == ([], [], []) and report.config_source == "model"
    back = MMSegSegNeXt(mm, cfg).double().eval()
    back.load_state_dict(_mmseg_spelling(ours.state_dict()))       # official spelling out, renamed for mmseg
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in back.state_dict().items())
    x = torch.randn(BATCH[variant], 3, *SIZE, dtype=torch.float64)
    expected = _run(ref, x)
    assert expected.shape == (BATCH[variant], 150, *SIZE) and torch.isfinite(expected).all()
    diffs = {"eager": _maxdiff(_run(ours, x), expected)}
    # fused, reference backend
    fused = VARIANTS[variant](config="mmseg").double().eval()
    fused.load_state_dict(ours.state_dict())
    assert fuse(fused, backend="reference") == {"msca": DEPTHS[variant], "ham": 1,
                                                "block": 0, "conv1x1": 0, "resize": 0, "norm": 0, "embed": 0,
                                                "group_norm": 0, "head": 0}
    diffs["fuse reference"] = _maxdiff(_run(fused, x), expected)
    # fused, CPU backend (C++ kernels), where it runs float64
    if segnext_kernels.supports("msca", "cpu", "cpu", torch.float64)[0]:
        cpu = VARIANTS[variant](config="mmseg").double().eval()
        cpu.load_state_dict(ours.state_dict())
        nmf_cpu = segnext_kernels.supports("nmf2d", "cpu", "cpu", torch.float64)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert fuse_msca(cpu, backend="cpu") == DEPTHS[variant]
            assert fuse_ham(cpu, backend="cpu" if nmf_cpu else "reference") == 1
        diffs["fuse cpu"] = _maxdiff(_run(cpu, x), expected)
    if variant == "t":  # another seed, other bases: fresh random bases at every forward, in eval too, in both
        assert _maxdiff(_run(ours, x, seed=4), expected) > 1e-6
    print(f"\nSegNeXt-{variant.upper()} max |ours - mmseg| (float64): " +
          ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for name, d in diffs.items():
        assert d < ATOL, (name, d)


@pytest.mark.parametrize("variant", ["t"])
def test_fuse_on_mmseg_model_swaps_its_modules_and_keeps_outputs(mm, variant):
    model = MMSegSegNeXt(mm, _config(mm, variant))
    _randomise(model, seed=11)
    model = model.double().eval()
    x = torch.randn(1, 3, *SIZE, dtype=torch.float64)
    expected = _run(model, x)
    keys = list(model.state_dict())
    assert fuse(model, backend="reference") == {"msca": DEPTHS[variant], "ham": 1,
                                                "block": 0, "conv1x1": 0, "resize": 0, "norm": 0, "embed": 0,
                                                "group_norm": 0, "head": 0}
    assert not any(isinstance(m, (mm.MSCAAttention, mm.NMF2D)) for m in model.modules())
    assert sum(isinstance(m, FusedMSCA) for m in model.modules()) == DEPTHS[variant]
    ham = model.decode_head.hamburger.ham
    assert isinstance(ham, FusedNMF2D)
    # mmseg NMF2D's attributes map: S, R, steps, inv_t (forced to 1 there), eps / grad mode of its code
    assert (ham.S, ham.R, ham.train_steps, ham.eval_steps, ham.inv_t, ham.eps, ham.grad_mode) == \
        (1, 16, 6, 7, 1, 1e-6, "unrolled")
    assert list(model.state_dict()) == keys
    d = _maxdiff(_run(model, x), expected)
    print(f"\nmmseg SegNeXt-{variant.upper()} fused in place (reference backend): max diff {d:.2e}")
    assert d < ATOL


def test_rand_init_false_matches_mmseg_and_bases_load(mm):
    ham_kwargs = {**MMSEG_HAM_KWARGS, "rand_init": False}
    ref = MMSegSegNeXt(mm, _config(mm, "t"), ham_kwargs=ham_kwargs)
    _randomise(ref, seed=5)
    ref = ref.double().eval()
    ours = segnext.segnext_t(ham_kwargs=ham_kwargs).double().eval()
    segnext.load_checkpoint(ours, dict(ref.state_dict()))
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    expected = _run(ref, x, seed=8)  # first forward: the bases buffer (S, D, R) is drawn once and registered
    assert _maxdiff(_run(ours, x, seed=8), expected) < ATOL
    assert "decode_head.hamburger.ham.bases" in ours.state_dict()
    assert ours.decode_head.hamburger.ham.bases.shape == ref.decode_head.hamburger.ham.bases.shape == (1, 256, 16)
    # later forwards reuse the buffer: no draw, whatever the seed
    again = _run(ref, x, seed=99)
    assert _maxdiff(again, expected) == 0
    assert _maxdiff(_run(ours, x, seed=42), again) < ATOL
    # mmseg's state_dict now holds the bases; a fresh model of ours loads them (strict) before any forward
    fresh = segnext.segnext_t(ham_kwargs=ham_kwargs).double().eval()
    assert segnext.load_checkpoint(fresh, dict(ref.state_dict())) == ([], [], [])
    assert _maxdiff(_run(fresh, x, seed=1), again) < ATOL


def test_checkpoint_meta_names_md_r(mm, tmp_path):
    cfg = _config(mm, "b")
    ref = MMSegSegNeXt(mm, cfg)
    _randomise(ref, seed=21)
    ref = ref.double().eval()
    x = torch.randn(1, 3, *SIZE, dtype=torch.float64)
    expected = _run(ref, x)
    sd = {k: v.float() for k, v in ref.state_dict().items()}
    # what mmengine's Runner.save_checkpoint writes: meta['cfg'] is the config's pretty_text
    torch.save({"meta": {"cfg": cfg.pretty_text, "seed": 0, "iter": 160000, "mmengine_version": "0.10.7"},
                "state_dict": sd}, tmp_path / "mmseg_b.pth")
    torch.save({"state_dict": sd}, tmp_path / "bare_b.pth")
    model = segnext.segnext_b()                       # official: MD_R=64
    assert model.decode_head.hamburger.ham.R == 64
    with pytest.warns(UserWarning, match=r"decode_head\.hamburger\.ham\.R=16 \(model: 64\)"):
        report = segnext.load_checkpoint(model, tmp_path / "mmseg_b.pth")
    assert report == ([], [], [])
    assert report.config_source == "meta['cfg'] (config text)"
    assert report.config_applied["decode_head.hamburger.ham.R"] == 16
    assert report.config_applied["decode_head.align_corners"] is False
    model = model.double().eval()
    d_meta = _maxdiff(_run(model, x), expected)
    # without meta: the official default (MD_R=64) is kept, and the logits are not mmseg's
    plain = segnext.segnext_b()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = segnext.load_checkpoint(plain, tmp_path / "bare_b.pth")
    assert report.config_source == "model" and report.config_applied == {}
    assert plain.decode_head.hamburger.ham.R == 64
    d_bare = _maxdiff(_run(plain.double().eval(), x), expected)
    # use_config=False keeps the model's settings too
    kept = segnext.segnext_b()
    assert segnext.load_checkpoint(kept, tmp_path / "mmseg_b.pth", use_config=False).config_source == "model"
    assert kept.decode_head.hamburger.ham.R == 64
    print(f"\nSegNeXt-B checkpoint with meta['cfg'] (MD_R=16): max diff {d_meta:.2e}; "
          f"without meta (MD_R=64): {d_bare:.2e}")
    assert d_meta < 1e-5          # the weights went through float32
    assert d_bare > 1e-3


def test_our_modules_accept_mmseg_config_dicts(mm):
    """The backbone and head dicts of mmseg's configs, passed to our classes as they are (less ``type``,
    ``init_cfg`` -- init-time loading, refused -- and ``loss_decode`` -- training, refused)."""
    for variant in VARIANTS:
        cfg = _config(mm, variant)
        bb = {k: v for k, v in cfg.model.backbone.items() if k != "type"}
        head = {k: v for k, v in cfg.model.decode_head.items() if k != "type"}
        with pytest.raises(ValueError, match="init_cfg"):
            segnext.MSCAN(**bb)
        with pytest.raises(TypeError, match="loss_decode"):
            segnext.LightHamHead(**head)
        bb.pop("init_cfg")
        head.pop("loss_decode")
        model = segnext.SegNeXt(segnext.MSCAN(**bb), segnext.LightHamHead(**head))
        ref = VARIANTS[variant](config="mmseg")
        assert list(model.state_dict()) == list(ref.state_dict())
        assert model.decode_head.hamburger.ham.R == ref.decode_head.hamburger.ham.R == 16
        assert model.decode_head.hamburger.ham.inv_t == 1   # the configs' inv_t=100 has no effect, as in mmseg

"""Tests of segnext.checkpoint.load_checkpoint (mmcv/mmengine layouts, key spellings, reports)."""
import datetime
import sys
import types

import pytest
import torch
from torch import nn

import segnext
from segnext import MSCAN, load_checkpoint, mscan_t, segnext_t

DW_KEY = "backbone.block1.0.mlp.dwconv.dwconv.weight"


@pytest.fixture(scope="module")
def source():
    """A T model with non-default weights and BN statistics, and its state dict."""
    torch.manual_seed(0)
    model = segnext_t(num_classes=19)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.uniform_(0.5, 2) if "running_var" in name else t.add_(torch.randn_like(t) / 50)
    return model.eval(), model.state_dict()


def _fresh(num_classes=19):
    torch.manual_seed(123)
    return segnext_t(num_classes=num_classes).eval()


def _run(model, x):
    torch.manual_seed(42)  # same NMF bases for every call
    with torch.no_grad():
        return model(x)


def _mmseg_spelling(sd):
    return {k.replace(".mlp.dwconv.dwconv.", ".mlp.dwconv."): v for k, v in sd.items()}


def _assert_same(model, sd):
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_mmcv_file_with_mmseg_spelling(tmp_path, source):
    src, sd = source
    renamed = _mmseg_spelling(sd)
    assert DW_KEY not in renamed and DW_KEY.replace("dwconv.dwconv", "dwconv") in renamed
    path = tmp_path / "mmseg.pth"
    torch.save({"meta": {"CLASSES": ("road", "sidewalk"), "PALETTE": [[128, 64, 128]]},
                "state_dict": renamed, "optimizer": {"state": {}, "param_groups": []}}, path)
    model = _fresh()
    x = torch.randn(1, 3, 65, 47)
    expected = _run(src, x)
    assert torch.isfinite(expected).all() and not torch.equal(_run(model, x), expected)
    report = load_checkpoint(model, path)
    assert report == ([], [], [])
    _assert_same(model, sd)
    assert torch.equal(_run(model, x), expected)


def test_official_spelling_bare_module_prefix_and_model_key(tmp_path, source):
    _, sd = source
    variants = {"bare": dict(sd), "module": {"module." + k: v for k, v in sd.items()},
                "model": {"model": dict(sd), "meta": {}}}
    for name, obj in variants.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        model = _fresh()
        assert load_checkpoint(model, str(path)) == ([], [], []), name
        _assert_same(model, sd)
    model = _fresh()  # an in-memory mmcv-style dict works too
    assert load_checkpoint(model, {"state_dict": _mmseg_spelling(sd), "meta": {}}).mismatched == []
    _assert_same(model, sd)


def test_model_with_mmseg_spelling_accepts_official_keys():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.dwconv = nn.Conv2d(4, 4, 3, padding=1, groups=4)

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Mlp()

    model = nn.Module()
    model.block1 = nn.ModuleList([Blk()])
    sd = {"block1.0.mlp.dwconv.dwconv.weight": torch.ones(4, 1, 3, 3),
          "block1.0.mlp.dwconv.dwconv.bias": torch.zeros(4)}
    assert load_checkpoint(model, sd) == ([], [], [])
    assert torch.all(model.block1[0].mlp.dwconv.weight == 1)


def test_missing_key_strict_raises_and_nonstrict_reports(source):
    _, sd = source
    partial = {k: v for k, v in sd.items() if k != DW_KEY}
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"missing key: " + DW_KEY.replace(".", r"\.")):
        load_checkpoint(model, {"state_dict": partial, "meta": {}})
    _assert_same(model, before)  # strict failure loads nothing
    report = load_checkpoint(model, partial, strict=False)
    assert report.missing_keys == [DW_KEY] and not report.unexpected_keys and not report.mismatched
    assert torch.equal(model.state_dict()[DW_KEY], before[DW_KEY])
    assert torch.equal(model.decode_head.conv_seg.weight, sd["decode_head.conv_seg.weight"])


def test_unexpected_key_named(source):
    _, sd = source
    extra = dict(sd, **{"backbone.head.weight": torch.zeros(1000, 256)})
    with pytest.raises(RuntimeError, match=r"unexpected key: backbone\.head\.weight"):
        load_checkpoint(_fresh(), extra)
    model = _fresh()
    report = load_checkpoint(model, extra, strict=False)
    assert report.unexpected_keys == ["backbone.head.weight"] and not report.missing_keys
    _assert_same(model, sd)


def test_shape_mismatch_named_with_shapes(source):
    _, sd = source  # 19-class checkpoint into a 150-class model
    model = _fresh(num_classes=150)
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(model, sd)
    msg = str(err.value)
    assert "decode_head.conv_seg.weight: checkpoint (19, 256, 1, 1) vs model (150, 256, 1, 1)" in msg
    assert "decode_head.conv_seg.bias" in msg
    report = load_checkpoint(model, sd, strict=False)
    assert report.mismatched == [("decode_head.conv_seg.weight", (19, 256, 1, 1), (150, 256, 1, 1)),
                                 ("decode_head.conv_seg.bias", (19,), (150,))]
    assert torch.equal(model.decode_head.squeeze.conv.weight, sd["decode_head.squeeze.conv.weight"])
    assert model.decode_head.conv_seg.weight.shape == (150, 256, 1, 1)


def test_backbone_only_imagenet_style_checkpoint(source):
    _, sd = source
    backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    backbone_sd = _mmseg_spelling(backbone_sd)
    backbone_sd["head.weight"] = torch.zeros(1000, 256)  # classifier of the ImageNet model
    model = mscan_t()
    assert isinstance(model, MSCAN)
    report = load_checkpoint(model, {"state_dict": backbone_sd}, strict=False)
    assert report == ([], ["head.weight"], [])
    assert torch.equal(model.block1[0].mlp.dwconv.dwconv.weight, sd[DW_KEY])


def test_file_needing_weights_only_false(tmp_path, source):
    _, sd = source
    fake = types.ModuleType("fake_mmengine_mod")

    class HistoryBuffer:  # stands for an mmengine object in "message_hub"
        def __init__(self):
            self.data = [1.0, 2.0]

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = fake.__name__, "HistoryBuffer"
    fake.HistoryBuffer = HistoryBuffer
    sys.modules[fake.__name__] = fake
    try:
        obj = {"meta": {"time": datetime.date(2023, 2, 10)}, "state_dict": sd,
               "message_hub": {"log": HistoryBuffer()}}
        torch.save(obj, tmp_path / "mmengine.pth")
    finally:
        del sys.modules[fake.__name__]  # class no longer importable at load time
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(segnext.CheckpointError, match=r"mmengine\.pth.*trust_pickle=True") as err:
        load_checkpoint(model, tmp_path / "mmengine.pth")
    assert "Traceback" not in str(err.value) and err.value.__cause__ is None
    _assert_same(model, before)
    assert load_checkpoint(model, tmp_path / "mmengine.pth", trust_pickle=True) == ([], [], [])
    _assert_same(model, sd)


class _Payload:
    """Unpickling this runs code: it writes the file named by ``target``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def test_pickle_payload_never_runs_by_default(tmp_path, source):
    _, sd = source
    target = tmp_path / "pwned.txt"
    torch.save({"state_dict": sd, "meta": {"hook": _Payload(target)}}, tmp_path / "evil.pth")
    with pytest.raises(segnext.CheckpointError, match="evil.pth"):
        load_checkpoint(_fresh(), tmp_path / "evil.pth")
    with pytest.raises(segnext.CheckpointError):
        segnext.read_state_dict(tmp_path / "evil.pth")
    assert not target.exists()
    # the payload is real: the explicit, documented full-pickle load does run it
    load_checkpoint(_fresh(), tmp_path / "evil.pth", trust_pickle=True)
    assert target.read_text() == "pwned"


def test_numpy_meta_loads_without_pickle(tmp_path, source):
    np = pytest.importorskip("numpy")
    _, sd = source
    torch.save({"state_dict": sd, "meta": {"seed": np.int64(7), "hist": np.arange(3.0)}}, tmp_path / "np.pth")
    model = _fresh()
    assert load_checkpoint(model, tmp_path / "np.pth") == ([], [], [])
    _assert_same(model, sd)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_file_one_clear_error(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(segnext.CheckpointError, match=r"broken\.pth.*cannot be read") as err:
        load_checkpoint(_fresh(), path)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(segnext.CheckpointError, match="no such file"):
        load_checkpoint(_fresh(), tmp_path / "absent.pth")


def test_nothing_matches_gives_a_summary(source):
    _, sd = source
    foreign = {f"encoder.layer{i}.weight": torch.zeros(3) for i in range(40)}
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(_fresh(), foreign)
    msg = str(err.value)
    n_model = len(_fresh().state_dict())
    assert f"{n_model} missing, 40 unexpected" in msg and "no key matches" in msg
    assert len(msg.splitlines()) <= 1 + 2 * 6 + 2, msg
    assert "... and 35 more unexpected keys" in msg


def test_not_a_state_dict():
    with pytest.raises(TypeError):
        load_checkpoint(_fresh(), {"state_dict": {"a": 1}})


# ----------------------------------------------------------------------- the config in meta (issue 19)
_MMSEG_B_CFG_TEXT = """model = dict(
    type='EncoderDecoder',
    decode_head=dict(
        type='LightHamHead',
        align_corners=False,
        ham_kwargs=dict(
            MD_R=16, MD_S=1, eval_steps=7, inv_t=100, rand_init=True, train_steps=6),
        in_channels=[128, 320, 512]))
norm_cfg = dict(type='SyncBN', requires_grad=True)
"""


def test_meta_config_text_and_dict_applied_and_reported():
    from segnext import segnext_b
    sd = segnext_b().state_dict()
    for meta, source in (({"cfg": _MMSEG_B_CFG_TEXT}, "meta['cfg'] (config text)"),
                         ({"config": {"model": {"decode_head": {"type": "LightHamHead",
                                                                "ham_kwargs": {"MD_R": 16}}}}},
                          "meta['config'] (dict)")):
        model = segnext_b()
        with pytest.warns(UserWarning, match=r"ham\.R=16 \(model: 64\)"):
            report = load_checkpoint(model, {"state_dict": sd, "meta": meta})
        assert report == ([], [], []) and report.config_source == source
        assert model.decode_head.hamburger.ham.R == 16 and report.config_applied["decode_head.hamburger.ham.R"] == 16
        assert "config_source" in repr(report)
    # no config: the model's (official) settings; use_config=False: the same
    model = segnext_b()
    assert load_checkpoint(model, {"state_dict": sd, "meta": {"seed": 1}}).config_source == "model"
    assert model.decode_head.hamburger.ham.R == 64
    report = load_checkpoint(model, {"state_dict": sd, "meta": {"cfg": _MMSEG_B_CFG_TEXT}}, use_config=False)
    assert report.config_source == "model" and model.decode_head.hamburger.ham.R == 64


def test_meta_config_unreadable_or_foreign_keeps_model_settings(tmp_path):
    from segnext import segnext_b
    sd = segnext_b().state_dict()
    for meta, problem in (({"cfg": "model = dict(decode_head=dict(type='LightHamHead', ham_kwargs=make()))"},
                           "cannot be read safely"),
                          ({"cfg": "model = dict("}, "not Python source"),
                          ({"cfg": "model = dict(decode_head=dict(type='UPerHead'))"}, "not a LightHamHead")):
        model = segnext_b()
        with pytest.warns(UserWarning, match=problem):
            report = load_checkpoint(model, {"state_dict": sd, "meta": meta})
        assert report.config_source == "model" and problem in report.config_problem
        assert model.decode_head.hamburger.ham.R == 64
    # a strict failure changes no setting
    model = segnext_b()
    with pytest.raises(RuntimeError):
        load_checkpoint(model, {"state_dict": {}, "meta": {"cfg": _MMSEG_B_CFG_TEXT}})
    assert model.decode_head.hamburger.ham.R == 64


def test_rand_init_false_bases_key_loads_strictly():
    model = segnext_t(ham_kwargs=dict(rand_init=False))
    sd = dict(model.state_dict())
    sd["decode_head.hamburger.ham.bases"] = torch.rand(1, 256, 16)
    assert load_checkpoint(model, sd) == ([], [], [])
    assert torch.equal(model.decode_head.hamburger.ham.bases, sd["decode_head.hamburger.ham.bases"])
    with pytest.raises(RuntimeError, match="unexpected"):
        load_checkpoint(segnext_t(), sd)                 # rand_init=True has no such buffer

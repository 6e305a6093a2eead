"""SegNeXt encoder-decoder segmentor and the T/S/B/L factories (pure PyTorch reference).

Mirrors mmseg ``EncoderDecoder.encode_decode`` (docs/reference_model.md, "LightHamHead decoder", step 5) with the
official ``local_configs`` of Visual-Attention-Network/SegNeXt (docs/reference_model.md, "Variants"; paper Table 2).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MMSEG_HAM_KWARGS, nmf_kwargs
from .ham_head import LightHamHead, LogitsResize  # noqa: F401  (LogitsResize: also its old home)
from .mscan import MSCAN, MSCAN_CONFIGS

__all__ = ["SegNeXt", "LogitsResize", "segnext_t", "segnext_s", "segnext_b", "segnext_l", "HEAD_CONFIGS"]

# Official head settings (docs/reference_model.md, "Variants"); in_channels are derived from the backbone's embed_dims.
HEAD_CONFIGS = {
    "t": dict(channels=256, ham_channels=256, ham_kwargs=dict(MD_R=16)),
    "s": dict(channels=256, ham_channels=256, ham_kwargs=dict(MD_R=16)),
    "b": dict(channels=512, ham_channels=512, ham_kwargs=dict(MD_R=64)),
    "l": dict(channels=1024, ham_channels=1024, ham_kwargs=dict(MD_R=64)),
}


class SegNeXt(nn.Module):
    """Backbone + decode head, ``forward`` = mmseg ``EncoderDecoder.encode_decode``.

    Forward: images (B, 3, H, W) float (normalised RGB) -> logits (B, num_classes, H, W), the
    stride-8 head logits resized bilinearly to the input size with the head's ``align_corners``
    (mmseg 1.2.2 ``EncoderDecoder`` sets ``self.align_corners = self.decode_head.align_corners`` and
    ``BaseDecodeHead.predict_by_feat`` resizes with it). Any H, W >= 32 works (stage sizes round up:
    ceil(H/2) per stride-2 conv). State-dict prefixes: ``backbone.`` and ``decode_head.``.

    Args:
        align_corners: None (default) keeps the head's flag; a bool sets the head's flag (one flag for both
            resizes, as in mmseg). ``model.align_corners`` reads / writes the head's flag.

    The final resize is the parameterless submodule ``resize`` (:class:`LogitsResize`), which can be swapped.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, align_corners: Optional[bool] = None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.resize = LogitsResize()
        if align_corners is not None:
            self.align_corners = align_corners

    def __setstate__(self, state):
        super().__setstate__(state)
        if "resize" not in self._modules:  # a model pickled before the resize became a submodule
            self.resize = LogitsResize()

    @property
    def align_corners(self) -> bool:
        return bool(getattr(self.decode_head, "align_corners", False))

    @align_corners.setter
    def align_corners(self, value: bool) -> None:
        self.decode_head.align_corners = bool(value)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(images))
        return self.resize(logits, tuple(images.shape[2:]), self.align_corners)


# ``in_channels`` and ``act_cfg`` name head options here (mmseg's MSCAN ``in_channels`` is ``in_chans``; the head's
# act_cfg is ``head_act_cfg``).
_HEAD_ARGS = set(inspect.signature(LightHamHead).parameters) - {"num_classes", "norm_cfg", "act_cfg"}
_BACKBONE_ARGS = set(inspect.signature(MSCAN).parameters) - {"in_channels"}

#: ``config="mmseg"``: the head options of mmsegmentation 1.2.2's configs/segnext/*.py where they differ from the
#: official ones -- B and L inherit T's ham_kwargs (MD_R=16; official B/L: 64). (Their inv_t=100 has no effect.)
MMSEG_HEAD_OVERRIDES = {v: dict(ham_kwargs=dict(MMSEG_HAM_KWARGS)) for v in "tsbl"}


def _segnext(variant: str, num_classes: int, overrides: dict) -> SegNeXt:
    bb_kw, head_kw = dict(MSCAN_CONFIGS[variant]), dict(HEAD_CONFIGS[variant])
    config = overrides.pop("config", "official")
    if config == "mmseg":
        head_kw["ham_kwargs"] = {**head_kw["ham_kwargs"], **MMSEG_HEAD_OVERRIDES[variant]["ham_kwargs"]}
    elif config != "official":
        raise ValueError(f"config: expected 'official' or 'mmseg', got {config!r}")
    for key, value in overrides.items():
        if key in _BACKBONE_ARGS:
            bb_kw[key] = value
        elif key == "head_norm_cfg":
            head_kw["norm_cfg"] = value
        elif key == "head_act_cfg":
            head_kw["act_cfg"] = value
        elif key == "ham_kwargs":
            head_kw[key] = _merge_ham_kwargs(head_kw[key], value)
        elif key in _HEAD_ARGS:
            head_kw[key] = value
        else:
            raise TypeError(f"segnext_{variant}() got an unexpected keyword argument {key!r}")
    backbone = MSCAN(**bb_kw)
    in_index = head_kw.setdefault("in_index", (1, 2, 3))
    head_kw.setdefault("in_channels", [backbone.embed_dims[i] for i in in_index])
    return SegNeXt(backbone, LightHamHead(num_classes=num_classes, **head_kw))


def _merge_ham_kwargs(base: dict, value) -> dict:
    """The variant's ham_kwargs updated by the user's: each option by any of its spellings (``TRAIN_STEPS``
    replaces the variant's ``train_steps``)."""
    if value is None:
        return dict(base)
    given = nmf_kwargs(value)  # validates (TypeError naming an unknown key)
    kept = {k: v for k, v in base.items() if nmf_kwargs({k: v}).keys().isdisjoint(given) or k in value}
    return {**kept, **value}


_FACTORY_DOC = """SegNeXt-{V} with the official config (docs/reference_model.md, "Variants"; paper Table 2).

    Args:
        num_classes: classes K (ADE20K 150, Cityscapes 19, COCO-Stuff 171).
        config: ``"official"`` (default: the official SegNeXt configs; B/L use MD_R=64) or ``"mmseg"``
            (mmsegmentation 1.2.2's configs/segnext: every variant's ham_kwargs are
            ``dict(MD_S=1, MD_R=16, train_steps=6, eval_steps=7, inv_t=100, rand_init=True)``, so B/L use
            MD_R=16). Pick the one the checkpoint was trained with; ``segnext.load_checkpoint`` also applies
            the config a checkpoint's ``meta`` carries.
        **overrides: MSCAN arguments (``embed_dims, depths, mlp_ratios, drop_rate,
            drop_path_rate, norm_cfg, num_stages, act_cfg, attention_kernel_sizes,
            attention_kernel_paddings, pretrained, init_cfg, in_chans`` -- ``norm_cfg`` is the backbone
            norm, "BN"/"SyncBN" or an mmcv dict with ``requires_grad``), LightHamHead arguments
            (``channels, ham_channels, in_index, in_channels, dropout_ratio, align_corners, conv_cfg``;
            ``head_norm_cfg`` / ``head_act_cfg`` for the head's norm / activation), and ``ham_kwargs``
            (official / mmseg spellings with the official meaning, see :func:`segnext.config.nmf_kwargs`:
            ``inv_t`` / ``INV_T`` have no effect there, ``softmax_inv_t`` is a real inverse temperature),
            merged into the variant's NMF2D options (e.g. ``ham_kwargs=dict(grad_mode="one_step",
            generator=g)`` keeps MD_R). ``align_corners`` applies to the head's resizes and the final one.

    Returns:
        :class:`SegNeXt`; forward (B, 3, H, W) -> (B, num_classes, H, W).

    Random NMF2D bases: as in the official code, the head's NMF2D draws fresh random bases at every
    forward, in eval too, so two calls on the same image give logits that differ by about 0.1. For
    deterministic outputs pass ``ham_kwargs=dict(generator=g)`` with ``g = torch.Generator()``
    and call ``g.manual_seed(s)`` before each forward (or ``torch.manual_seed(s)``).

    Raises:
        TypeError: unknown override or ham_kwargs key (named).
        ValueError: an option value this model does not implement (named), unknown ``config``.
    """


def segnext_t(num_classes: int = 150, **overrides) -> SegNeXt:
    return _segnext("t", num_classes, overrides)


def segnext_s(num_classes: int = 150, **overrides) -> SegNeXt:
    return _segnext("s", num_classes, overrides)


def segnext_b(num_classes: int = 150, **overrides) -> SegNeXt:
    return _segnext("b", num_classes, overrides)


def segnext_l(num_classes: int = 150, **overrides) -> SegNeXt:
    return _segnext("l", num_classes, overrides)


for _v, _f in zip("TSBL", (segnext_t, segnext_s, segnext_b, segnext_l)):
    _f.__doc__ = _FACTORY_DOC.format(V=_v)

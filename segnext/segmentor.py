"""SegNeXt encoder-decoder segmentor and the T/S/B/L factories (pure PyTorch reference).

Mirrors mmseg ``EncoderDecoder.encode_decode`` (spec section 2.2 step 6) with the official
``local_configs`` of Visual-Attention-Network/SegNeXt (spec 1.3 and 2.3, paper Table 2).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .ham_head import LightHamHead
from .mscan import MSCAN, MSCAN_CONFIGS

__all__ = ["SegNeXt", "segnext_t", "segnext_s", "segnext_b", "segnext_l", "HEAD_CONFIGS"]

# Official head settings (spec 2.3); in_channels are derived from the backbone's embed_dims.
HEAD_CONFIGS = {
    "t": dict(channels=256, ham_channels=256, ham_kwargs=dict(MD_R=16)),
    "s": dict(channels=256, ham_channels=256, ham_kwargs=dict(MD_R=16)),
    "b": dict(channels=512, ham_channels=512, ham_kwargs=dict(MD_R=64)),
    "l": dict(channels=1024, ham_channels=1024, ham_kwargs=dict(MD_R=64)),
}


class SegNeXt(nn.Module):
    """Backbone + decode head, ``forward`` = mmseg ``EncoderDecoder.encode_decode``.

    Forward: images (B, 3, H, W) float (normalised RGB) -> logits (B, num_classes, H, W), the
    stride-8 head logits resized bilinearly (``align_corners=False``) to the input size.
    Any H, W >= 32 works (stage sizes round up: ceil(H/2) per stride-2 conv).
    State-dict prefixes: ``backbone.`` and ``decode_head.``.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.align_corners = align_corners

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[2:], mode="bilinear",
                             align_corners=self.align_corners)


_BACKBONE_ARGS = set(inspect.signature(MSCAN).parameters)
_HEAD_ARGS = set(inspect.signature(LightHamHead).parameters) - {"num_classes", "norm_cfg"}


def _segnext(variant: str, num_classes: int, overrides: dict) -> SegNeXt:
    bb_kw, head_kw = dict(MSCAN_CONFIGS[variant]), dict(HEAD_CONFIGS[variant])
    for key, value in overrides.items():
        if key in _BACKBONE_ARGS:
            bb_kw[key] = value
        elif key == "head_norm_cfg":
            head_kw["norm_cfg"] = value
        elif key == "ham_kwargs":
            head_kw[key] = {**head_kw[key], **(value or {})}
        elif key in _HEAD_ARGS:
            head_kw[key] = value
        else:
            raise TypeError(f"segnext_{variant}() got an unexpected keyword argument {key!r}")
    backbone = MSCAN(**bb_kw)
    in_index = head_kw.setdefault("in_index", (1, 2, 3))
    head_kw.setdefault("in_channels", [backbone.embed_dims[i] for i in in_index])
    return SegNeXt(backbone, LightHamHead(num_classes=num_classes, **head_kw))


_FACTORY_DOC = """SegNeXt-{V} with the official config (spec 1.3 / 2.3, paper Table 2).

    Args:
        num_classes: classes K (ADE20K 150, Cityscapes 19, COCO-Stuff 171).
        **overrides: MSCAN arguments (``embed_dims, depths, mlp_ratios, drop_rate,
            drop_path_rate, norm_cfg`` -- ``norm_cfg`` is the backbone norm "BN"/"SyncBN"),
            LightHamHead arguments (``channels, ham_channels, in_index, in_channels,
            dropout_ratio, align_corners``; ``head_norm_cfg`` for the head norm), and
            ``ham_kwargs`` which is merged into the variant's NMF2D options (e.g.
            ``ham_kwargs=dict(grad_mode="one_step", generator=g)`` keeps MD_R).

    Returns:
        :class:`SegNeXt`; forward (B, 3, H, W) -> (B, num_classes, H, W).

    Raises:
        TypeError: unknown override.
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

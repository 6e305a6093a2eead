"""MSCAN backbone of SegNeXt (pure PyTorch reference).

Re-implemented from the facts collected in ``docs/reference_model.md`` ("MSCAN backbone"), which
describe the official ``mmseg/models/backbones/mscan.py`` of Visual-Attention-Network/SegNeXt
and the SegNeXt paper (Guo et al., NeurIPS 2022), section 3.1 and Table 2.

Attribute names equal the official state_dict names, e.g.
``block1.0.attn.spatial_gating_unit.conv0_1.weight`` or ``block1.0.mlp.dwconv.dwconv.weight``.
Every module here works on NCHW tensors; only the stage-end LayerNorm is applied on the token
layout (B, H*W, C), exactly like the official code, so results are numerically the same.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .config import as_nested_tuple, build_norm_layer, check_act_cfg
from .depthwise import DepthwiseConv2d

NormCfg = Union[str, Mapping, None]
GELU = {"type": "GELU"}

__all__ = ["MSCAN", "StemConv", "OverlapPatchEmbed", "AttentionModule", "SpatialAttention",
           "DWConv", "Mlp", "Block", "DropPath", "build_norm", "mscan_t", "mscan_s", "mscan_b",
           "mscan_l", "MSCAN_CONFIGS"]

# Official ``local_configs`` (docs/reference_model.md, "Variants"). Class defaults are used by no released model.
MSCAN_CONFIGS = {
    "t": dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), mlp_ratios=(8, 8, 4, 4),
              drop_path_rate=0.1),
    "s": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), mlp_ratios=(8, 8, 4, 4),
              drop_path_rate=0.1),
    "b": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), mlp_ratios=(8, 8, 4, 4),
              drop_path_rate=0.1),
    "l": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), mlp_ratios=(8, 8, 4, 4),
              drop_path_rate=0.3),
}


def build_norm(norm_cfg: NormCfg, channels: int) -> nn.Module:
    """Backbone norm layer, like mmcv ``build_norm_layer``.

    Args:
        norm_cfg: ``"BN"`` (``nn.BatchNorm2d``, mmseg configs) or ``"SyncBN"``
            (``nn.SyncBatchNorm``, official configs), or an mmcv-style dict ``{"type": ..., "requires_grad": ...,
            ...}`` (see :func:`segnext.config.build_norm_layer`: ``requires_grad=False`` freezes the norm, the
            layer's own keys such as ``eps`` / ``momentum`` are passed on, any other key is refused). BN and
            SyncBN give identical state_dict keys; SyncBN without an initialised process group behaves like BN.
        channels: number of channels C of the (B, C, H, W) input.

    Raises:
        ValueError: unknown norm type or key.
    """
    if norm_cfg is None:
        norm_cfg = "BN"
    kind = norm_cfg.get("type") if isinstance(norm_cfg, Mapping) else norm_cfg
    if kind not in ("BN", "BN2d", "SyncBN"):
        raise ValueError(f"norm_cfg type must be 'BN' or 'SyncBN', got {kind!r}")
    return build_norm_layer(norm_cfg, channels)[1]


def _gelu(act_cfg) -> nn.Module:
    return nn.GELU(**check_act_cfg(act_cfg, "GELU"))


class DropPath(nn.Module):
    """Per-sample stochastic depth (mmcv ``DropPath``): in training, zero a whole sample with
    probability ``drop_prob`` and divide the survivors by ``1 - drop_prob``; identity in eval.

    Input/output: any shape (B, ...), any floating dtype.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype,
                                  device=x.device)).floor_()
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class StemConv(nn.Module):
    """Stage-1 patch embedding (official ``StemConv``): conv3x3/s2 -> Norm -> GELU ->
    conv3x3/s2 -> Norm, total stride 4.

    Shapes: (B, C_in, H, W) -> (B, C_out, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2)).
    State-dict: ``proj.{0,3}`` convs (bias), ``proj.{1,4}`` norms.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_cfg: NormCfg = "BN", act_cfg=GELU):
        super().__init__()
        mid = out_channels // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, 2, 1), build_norm(norm_cfg, mid), _gelu(act_cfg),
            nn.Conv2d(mid, out_channels, 3, 2, 1), build_norm(norm_cfg, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class OverlapPatchEmbed(nn.Module):
    """Stages 2-4 patch embedding (official ``OverlapPatchEmbed``): conv3x3/s2/p1 -> Norm.

    Shapes: (B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2)). The official class also has
    a 7x7/stride-4 configuration that no model uses; only the 3x3/stride-2 one is provided.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 3, stride: int = 2,
                 norm_cfg: NormCfg = "BN"):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride, patch_size // 2)
        self.norm = build_norm(norm_cfg, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class AttentionModule(nn.Module):
    """Multi-scale convolutional attention, MSCA (paper section 3.1, Eq. 1; official
    ``AttentionModule``, mmseg ``MSCAAttention``).

    ``a = conv0(u)`` (5x5 depth-wise); three strip branches on ``a``, each 1xk then kx1
    depth-wise (k = 7, 11, 21); ``a = conv3(a + b7 + b11 + b21)`` (1x1); returns ``a * u``
    (no sigmoid). Shapes: (B, C, H, W) -> (B, C, H, W), any floating dtype.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = DepthwiseConv2d(dim, dim, 5, padding=2, groups=dim)
        for i, k in enumerate((7, 11, 21)):
            setattr(self, f"conv{i}_1", DepthwiseConv2d(dim, dim, (1, k), padding=(0, k // 2), groups=dim))
            setattr(self, f"conv{i}_2", DepthwiseConv2d(dim, dim, (k, 1), padding=(k // 2, 0), groups=dim))
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.conv0(x)
        b0 = self.conv0_2(self.conv0_1(attn))
        b1 = self.conv1_2(self.conv1_1(attn))
        b2 = self.conv2_2(self.conv2_1(attn))
        attn = self.conv3(attn + b0 + b1 + b2)
        return attn * x


class SpatialAttention(nn.Module):
    """Attention sub-layer of a Block (official ``SpatialAttention``, mmseg
    ``MSCASpatialAttention``): ``proj_2(MSCA(GELU(proj_1(x)))) + x`` -- note the inner
    residual on the (normalised) input. Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, d_model: int, act_cfg=GELU):
        super().__init__()
        self.proj_1 = nn.Conv2d(d_model, d_model, 1)
        self.activation = _gelu(act_cfg)
        self.spatial_gating_unit = AttentionModule(d_model)
        self.proj_2 = nn.Conv2d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.spatial_gating_unit(self.activation(self.proj_1(x)))
        return self.proj_2(x) + shortcut


class DWConv(nn.Module):
    """3x3 depth-wise conv wrapper (official ``DWConv``); kept so the key is
    ``mlp.dwconv.dwconv.weight`` as in the official checkpoints (mmseg drops the wrapper; the
    loader in :mod:`segnext.checkpoint` maps between both). Shapes: (B, C, H, W) -> same.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = DepthwiseConv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class Mlp(nn.Module):
    """Convolutional FFN (official ``Mlp``): fc1 (1x1) -> DWConv 3x3 -> GELU -> Dropout ->
    fc2 (1x1) -> Dropout. Shapes: (B, C, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 drop: float = 0.0, act_cfg=GELU):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = DWConv(hidden_features)
        self.act = _gelu(act_cfg)
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """MSCAN block (official ``Block``, mmseg ``MSCABlock``)::

        x = x + DropPath(layer_scale_1 * SpatialAttention(norm1(x)))
        x = x + DropPath(layer_scale_2 * Mlp(norm2(x)))

    Shapes: (B, C, H, W) -> (B, C, H, W). (The official block takes tokens (B, N, C) plus H, W
    and reshapes to NCHW internally; this one takes NCHW directly -- same arithmetic.)
    ``layer_scale_1/2`` are registered first, so they lead the block's state_dict.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 norm_cfg: NormCfg = "BN", layer_scale_init: float = 1e-2, act_cfg=GELU):
        super().__init__()
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.norm1 = build_norm(norm_cfg, dim)
        self.attn = SpatialAttention(dim, act_cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = build_norm(norm_cfg, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, act_cfg=act_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


#: mmseg ``MSCAN`` / ``MSCAAttention`` defaults: the SegNeXt kernels (5x5, then 1x7/7x1, 1x11/11x1, 1x21/21x1).
ATTENTION_KERNEL_SIZES = (5, (1, 7), (1, 11), (1, 21))
ATTENTION_KERNEL_PADDINGS = (2, (0, 3), (0, 5), (0, 10))


def _check_mmseg_options(kernel_sizes, paddings, in_channels, pretrained, init_cfg) -> None:
    if as_nested_tuple(kernel_sizes) != ATTENTION_KERNEL_SIZES:
        raise ValueError(f"attention_kernel_sizes: only the SegNeXt kernels [5, [1, 7], [1, 11], [1, 21]] are "
                         f"supported, got {kernel_sizes!r}")
    if as_nested_tuple(paddings) != ATTENTION_KERNEL_PADDINGS:
        raise ValueError(f"attention_kernel_paddings: only the SegNeXt paddings [2, [0, 3], [0, 5], [0, 10]] are "
                         f"supported, got {paddings!r}")
    if in_channels is not None and in_channels != 3:
        raise ValueError(f"in_channels={in_channels!r}: the official and mmseg MSCAN ignore in_channels (their stem "
                         f"always takes 3 channels); pass in_chans={in_channels!r} for a stem of that width")
    for name, value in (("pretrained", pretrained), ("init_cfg", init_cfg)):
        if value is not None:
            raise ValueError(f"{name}={value!r}: weight loading at init is not supported; build the model, then "
                             f"segnext.load_checkpoint(model, path)")


class MSCAN(nn.Module):
    """Multi-Scale Convolutional Attention Network (paper section 3.1; official ``MSCAN``).

    Args:
        in_chans: input channels (3).
        embed_dims, depths, mlp_ratios: per-stage widths, block counts, FFN expansion ratios
            (see :data:`MSCAN_CONFIGS` for the released T/S/B/L values).
        drop_rate: dropout in the FFN (0 in every released config).
        drop_path_rate: stochastic-depth rate, linearly increased over all blocks
            (``linspace(0, drop_path_rate, sum(depths))``).
        norm_cfg: ``"BN"`` (default) or ``"SyncBN"`` for all backbone norms except the four
            stage-end ``nn.LayerNorm``; or an mmcv dict such as the configs' ``dict(type='BN',
            requires_grad=True)`` (``requires_grad=False`` freezes those norms; see :func:`build_norm`).
        num_stages: stages built (official / mmseg option, default ``len(depths)``; the stochastic-depth
            schedule still spans ``sum(depths)``, as there).
        act_cfg: ``{"type": "GELU"}`` (mmseg option; the only activation supported, ``approximate`` allowed).
        attention_kernel_sizes, attention_kernel_paddings: mmseg options; only the SegNeXt values
            ``[5, [1, 7], [1, 11], [1, 21]]`` / ``[2, [0, 3], [0, 5], [0, 10]]`` (the defaults, any list/tuple
            nesting) are supported -- the fused kernels implement exactly these.
        in_channels: mmseg's spelling of ``in_chans``. The official and mmseg MSCAN ignore it (their stem
            always takes 3 channels), so only 3 is accepted; ``in_chans`` builds a stem of another width.
        pretrained, init_cfg: official / mmseg init-time weight loading; only ``None`` is accepted (load weights
            with :func:`segnext.load_checkpoint` after building).

    Forward: images (B, in_chans, H, W), float -> list of num_stages maps (B, C_i, H_i, W_i) with
    strides 4/8/16/32 (each stage halves with ceil: H_1 = ceil(ceil(H/2)/2), H_{i+1} =
    ceil(H_i/2)). Each map is the LayerNorm-ed stage output, which also feeds the next stage.

    Weights get the official from-scratch init (``init_weights``): Conv2d ~ N(0, sqrt(2/fan_out)),
    fan_out = kh*kw*out/groups, bias 0; LayerNorm (1, 0); BN (1, 0); layer scales 1e-2.

    Raises:
        ValueError: list lengths differ, ``num_stages`` out of range, or an mmseg/official option with a value
            this model does not implement (the message names it).
    """

    def __init__(self, in_chans: int = 3, embed_dims: Sequence[int] = (64, 128, 256, 512),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, depths: Sequence[int] = (3, 4, 6, 3),
                 norm_cfg: NormCfg = "BN", num_stages: Optional[int] = None, act_cfg=GELU,
                 attention_kernel_sizes=ATTENTION_KERNEL_SIZES, attention_kernel_paddings=ATTENTION_KERNEL_PADDINGS,
                 in_channels: Optional[int] = None, pretrained=None, init_cfg=None):
        super().__init__()
        if not len(embed_dims) == len(mlp_ratios) == len(depths):
            raise ValueError("embed_dims, mlp_ratios and depths must have the same length")
        _check_mmseg_options(attention_kernel_sizes, attention_kernel_paddings, in_channels, pretrained, init_cfg)
        num_stages = len(depths) if num_stages is None else num_stages
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= len(depths):
            raise ValueError(f"num_stages: expected an int in [1, {len(depths)}] (len(depths)), got {num_stages!r}")
        self.embed_dims, self.depths = list(embed_dims), list(depths)
        self.num_stages = num_stages
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        cur = 0
        for i in range(self.num_stages):
            if i == 0:
                patch_embed = StemConv(in_chans, embed_dims[0], norm_cfg, act_cfg)
            else:
                patch_embed = OverlapPatchEmbed(embed_dims[i - 1], embed_dims[i], norm_cfg=norm_cfg)
            blocks = nn.ModuleList(
                Block(embed_dims[i], mlp_ratios[i], drop_rate, dpr[cur + j], norm_cfg, act_cfg=act_cfg)
                for j in range(depths[i]))
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i]))
            cur += depths[i]
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official from-scratch init (``init_cfg=None``), see class docstring."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x)
            B, C, H, W = x.shape
            x = getattr(self, f"norm{i}")(x.flatten(2).transpose(1, 2))
            x = x.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


def _mscan(variant: str, **overrides) -> MSCAN:
    return MSCAN(**{**MSCAN_CONFIGS[variant], **overrides})


def mscan_t(**overrides) -> MSCAN:
    """MSCAN-T backbone (official config; keyword arguments override it)."""
    return _mscan("t", **overrides)


def mscan_s(**overrides) -> MSCAN:
    """MSCAN-S backbone (official config; keyword arguments override it)."""
    return _mscan("s", **overrides)


def mscan_b(**overrides) -> MSCAN:
    """MSCAN-B backbone (official config; keyword arguments override it)."""
    return _mscan("b", **overrides)


def mscan_l(**overrides) -> MSCAN:
    """MSCAN-L backbone (official config; keyword arguments override it)."""
    return _mscan("l", **overrides)

"""LightHamHead decoder of SegNeXt with the NMF2D Hamburger (pure PyTorch reference).

Re-implemented from the project spec (``shared/spec/reference_model.md`` section 2), which
describes the official ``mmseg/models/decode_heads/ham_head.py`` of Visual-Attention-Network/
SegNeXt, mmsegmentation's port and Enjoy-Hamburger (Geng et al., "Is Attention Better Than
Matrix Decomposition?", ICLR 2021); SegNeXt paper section 3.2.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvModule", "NMF2D", "Hamburger", "LightHamHead", "nmf2d_reference",
           "nmf_coef_update", "nmf_bases_update"]

GN32 = {"type": "GN", "num_groups": 32}
RELU = {"type": "ReLU"}


def _cfg_type(cfg) -> Optional[str]:
    if cfg is None:
        return None
    return cfg if isinstance(cfg, str) else cfg["type"]


class ConvModule(nn.Module):
    """conv -> norm -> act block (mmcv ``ConvModule``, order ``("conv", "norm", "act")``).

    Args:
        norm_cfg: ``None``, ``{"type": "GN", "num_groups": G}`` (submodule ``gn``) or
            ``{"type": "BN" | "SyncBN"}`` (submodule ``bn``), as in mmcv; a bare type string
            is accepted too (GN then uses 32 groups).
        act_cfg: ``{"type": "ReLU"}`` (default, in-place ReLU, no parameters) or ``None``.
        bias: ``"auto"`` (mmcv semantics: bias only when there is no norm) or a bool.

    Init (mmcv ``ConvModule.init_weights``): conv Kaiming-normal (fan_out, ReLU gain), bias 0;
    norm weight 1, bias 0. Shapes: (B, C_in, H, W) -> (B, C_out, H', W').

    Raises:
        ValueError: unsupported norm or activation type.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, bias="auto", norm_cfg=None, act_cfg=RELU):
        super().__init__()
        norm_type, act_type = _cfg_type(norm_cfg), _cfg_type(act_cfg)
        if bias == "auto":
            bias = norm_type is None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.norm_name = None
        if norm_type == "GN":
            groups = norm_cfg.get("num_groups", 32) if isinstance(norm_cfg, Mapping) else 32
            self.norm_name, norm = "gn", nn.GroupNorm(groups, out_channels)
        elif norm_type in ("BN", "SyncBN"):
            self.norm_name = "bn"
            norm = nn.BatchNorm2d(out_channels) if norm_type == "BN" else nn.SyncBatchNorm(out_channels)
        elif norm_type is not None:
            raise ValueError(f"unsupported norm type {norm_type!r}")
        if self.norm_name:
            self.add_module(self.norm_name, norm)
        if act_type not in (None, "ReLU"):
            raise ValueError(f"unsupported activation type {act_type!r}")
        self.activate = nn.ReLU(inplace=True) if act_type else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_name:
            x = getattr(self, self.norm_name)(x)
        return self.activate(x) if self.activate is not None else x


# --------------------------------------------------------------------------- NMF2D
def nmf_coef_update(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor,
                    eps: float = 1e-6) -> torch.Tensor:
    """Multiplicative NMF update of the coefficients (official ``NMF2D.local_step`` first half
    and ``NMF2D.compute_coef``): ``coef * (x^T bases) / (coef (bases^T bases) + eps)``.

    Shapes: x (B, D, N), bases (B, D, R), coef (B, N, R) -> (B, N, R).
    """
    numerator = torch.bmm(x.transpose(1, 2), bases)
    denominator = coef.bmm(bases.transpose(1, 2).bmm(bases))
    return coef * numerator / (denominator + eps)


def nmf_bases_update(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor,
                     eps: float = 1e-6) -> torch.Tensor:
    """Multiplicative NMF update of the bases (official ``NMF2D.local_step`` second half):
    ``bases * (x coef) / (bases (coef^T coef) + eps)``.

    Shapes: x (B, D, N), bases (B, D, R), coef (B, N, R) -> (B, D, R).
    """
    numerator = torch.bmm(x, coef)
    denominator = bases.bmm(coef.transpose(1, 2).bmm(coef))
    return bases * numerator / (denominator + eps)


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def nmf2d_reference(x: torch.Tensor, bases: torch.Tensor, steps: int, eps: float = 1e-6,
                    inv_t: float = 1.0, grad: str = "unrolled", return_state: bool = False):
    """NMF of a batch of non-negative matrices, exactly as official ``NMF2D`` (spec 2.4).

    1. ``coef = softmax(inv_t * x^T bases, dim=-1)``;
    2. ``steps`` times: coef update, then bases update with the new coef (``local_step``);
    3. one more coef update (``compute_coef``);
    4. reconstruction ``bases @ coef^T``.

    Args:
        x: (B, D, N) non-negative input, any floating dtype.
        bases: (B, D, R) initial bases (already normalised; official: L2 over D).
        steps: number of ``local_step`` iterations (official: 6 in train, 7 in eval).
        eps: the ``+eps`` in both update denominators.
        inv_t: softmax inverse temperature of the coef init (official NMF2D forces 1).
        grad: ``"unrolled"`` -- back-prop through every step (official SegNeXt / mmseg), or
            ``"one_step"`` -- init and iterations run under ``torch.no_grad()``, only the final
            coef update and the reconstruction are differentiable (Enjoy-Hamburger HamNet).
            Forward values are identical in both modes.
        return_state: also return the final bases and coef.

    Returns:
        recon (B, D, N) in ``x.dtype``; with ``return_state`` the tuple
        ``(recon, bases (B, D, R), coef (B, N, R))``, the latter two in the compute dtype.

    Numerics: half/bfloat16 inputs are computed in float32 (float64 stays float64), with
    autocast disabled, and the reconstruction is cast back to ``x.dtype``.

    Raises:
        ValueError: bad ``grad`` or shapes that do not match.
    """
    if grad not in ("unrolled", "one_step"):
        raise ValueError(f"grad must be 'unrolled' or 'one_step', got {grad!r}")
    if x.dim() != 3 or bases.dim() != 3 or bases.shape[:2] != x.shape[:2]:
        raise ValueError(f"expected x (B, D, N) and bases (B, D, R), got {tuple(x.shape)} "
                         f"and {tuple(bases.shape)}")
    out_dtype = x.dtype
    cdtype = torch.promote_types(x.dtype, torch.float32)
    with _autocast_off(x.device.type):
        x = x.to(cdtype)
        bases = bases.to(device=x.device, dtype=cdtype)
        with torch.no_grad() if grad == "one_step" else contextlib.nullcontext():
            coef = F.softmax(inv_t * torch.bmm(x.transpose(1, 2), bases), dim=-1)
            for _ in range(steps):
                coef = nmf_coef_update(x, bases, coef, eps)
                bases = nmf_bases_update(x, bases, coef, eps)
        coef = nmf_coef_update(x, bases, coef, eps)
        recon = torch.bmm(bases, coef.transpose(1, 2)).to(out_dtype)
    return (recon, bases, coef) if return_state else recon


class NMF2D(nn.Module):
    """Non-negative matrix factorisation "ham" of the Hamburger (official ``NMF2D`` with
    ``SPATIAL=True, RAND_INIT=True``; Enjoy-Hamburger ``NMF2D``). No parameters or buffers.

    Args:
        MD_S: number of groups S the channels are split into (D = C / S).
        MD_R: rank R (official T/S configs: 16; B/L: 64).
        train_steps / eval_steps: iterations in ``training`` / eval mode (6 / 7).
        inv_t: softmax inverse temperature of the coef init. The official NMF2D constructor
            forces it to 1 (config values such as 100 are ignored there); default 1.
        eps: stabiliser in the update denominators (1e-6).
        grad_mode: ``"unrolled"`` (official) or ``"one_step"``, see :func:`nmf2d_reference`.
        generator: optional ``torch.Generator``; bases are then drawn from it (on its device)
            instead of the CPU default generator, making outputs independent of global RNG.

    Forward: x (B, C, H, W), non-negative, any floating dtype -> (B, C, H, W) same dtype.
    Fresh random bases are drawn on every call, in train and in eval (as in the official code),
    unless ``bases`` (B*S, D, R) is given.

    Raises:
        ValueError: C not divisible by S, bad ``grad_mode`` or wrong ``bases`` shape.
    """

    def __init__(self, MD_S: int = 1, MD_R: int = 64, train_steps: int = 6, eval_steps: int = 7,
                 inv_t: float = 1, eps: float = 1e-6, grad_mode: str = "unrolled",
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if grad_mode not in ("unrolled", "one_step"):
            raise ValueError(f"grad_mode must be 'unrolled' or 'one_step', got {grad_mode!r}")
        self.S, self.R = MD_S, MD_R
        self.train_steps, self.eval_steps = train_steps, eval_steps
        self.inv_t, self.eps, self.grad_mode = inv_t, eps, grad_mode
        self.generator = generator

    def _build_bases(self, B: int, D: int, device) -> torch.Tensor:
        """Random initial bases (B*S, D, R), float32: ``torch.rand`` on the CPU default generator
        (or on ``self.generator``'s device), moved to ``device``, L2-normalised over D (dim 1)."""
        gen = self.generator
        bases = torch.rand((B * self.S, D, self.R), generator=gen, dtype=torch.float32,
                           device=gen.device if gen is not None else "cpu")
        return F.normalize(bases.to(device), dim=1)

    def local_step(self, x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor):
        """One NMF iteration: coef update, then bases update with the new coef.
        x (B', D, N), bases (B', D, R), coef (B', N, R) -> (bases, coef)."""
        coef = nmf_coef_update(x, bases, coef, self.eps)
        return nmf_bases_update(x, bases, coef, self.eps), coef

    def compute_coef(self, x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Final coef update with the final bases; same shapes as :meth:`local_step`."""
        return nmf_coef_update(x, bases, coef, self.eps)

    def forward(self, x: torch.Tensor, bases: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        if C % self.S:
            raise ValueError(f"channels {C} not divisible by MD_S={self.S}")
        D = C // self.S
        x = x.reshape(B * self.S, D, H * W)
        if bases is None:
            bases = self._build_bases(B, D, x.device)
        elif tuple(bases.shape) != (B * self.S, D, self.R):
            raise ValueError(f"bases must have shape {(B * self.S, D, self.R)}, "
                             f"got {tuple(bases.shape)}")
        steps = self.train_steps if self.training else self.eval_steps
        return self._factorize(x, bases, steps).reshape(B, C, H, W)

    def _factorize(self, x: torch.Tensor, bases: torch.Tensor, steps: int) -> torch.Tensor:
        """Softmax init, ``steps`` local steps, compute_coef and reconstruction: x (B*S, D, N), bases (B*S, D, R)
        -> (B*S, D, N). The hook a fused subclass (``segnext_kernels.FusedNMF2D``) overrides."""
        return nmf2d_reference(x, bases, steps, self.eps, self.inv_t, self.grad_mode)

    def extra_repr(self) -> str:
        return (f"S={self.S}, R={self.R}, train_steps={self.train_steps}, "
                f"eval_steps={self.eval_steps}, inv_t={self.inv_t}, grad_mode={self.grad_mode!r}")


class Hamburger(nn.Module):
    """Light Hamburger (official ``Hamburger``): ``e = ReLU(ham_in(x))`` (1x1 conv with bias),
    ``e = ham_out(NMF2D(e))`` (1x1 conv, no bias, GN), ``return ReLU(x + e)``.

    Args:
        ham_channels: C. ham_kwargs: keyword arguments of :class:`NMF2D`.
        norm_cfg: norm of ``ham_out`` (the head forwards its GN(32) config here).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, ham_channels: int = 512, ham_kwargs: Optional[dict] = None, norm_cfg=GN32):
        super().__init__()
        self.ham_in = ConvModule(ham_channels, ham_channels, 1, norm_cfg=None, act_cfg=None)
        self.ham = NMF2D(**(ham_kwargs or {}))
        self.ham_out = ConvModule(ham_channels, ham_channels, 1, norm_cfg=norm_cfg, act_cfg=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enjoy = F.relu(self.ham_in(x), inplace=True)
        enjoy = self.ham_out(self.ham(enjoy))
        return F.relu(x + enjoy, inplace=True)


class LightHamHead(nn.Module):
    """SegNeXt decoder (official ``LightHamHead``, an mmseg ``BaseDecodeHead`` with
    ``input_transform='multiple_select'``; paper section 3.2, Fig. 3c).

    Forward: list of backbone maps; those at ``in_index`` (default stages 2-4, (B, C_i, H_i, W_i))
    are bilinearly resized (``align_corners``) to the first selected map's size, concatenated ->
    ``squeeze`` (1x1, GN, ReLU) -> ``hamburger`` -> ``align`` (1x1, GN, ReLU) -> Dropout2d ->
    ``conv_seg`` -> logits (B, num_classes, H_1, W_1) at that size (stride 8).

    Args:
        in_channels: channels of the selected maps. channels: ``align`` output width.
        ham_channels: ``squeeze`` / Hamburger width. ham_kwargs: :class:`NMF2D` options.
        norm_cfg: norm of the ConvModules (official: GN with 32 groups).
        dropout_ratio: Dropout2d before ``conv_seg`` (0.1).

    ``conv_seg`` is registered first and initialised N(0, 0.01), bias 0 (mmseg BaseDecodeHead).

    Raises:
        ValueError: ``in_channels`` and ``in_index`` lengths differ.
    """

    def __init__(self, in_channels: Sequence[int] = (64, 160, 256), channels: int = 256,
                 num_classes: int = 150, ham_channels: int = 256, ham_kwargs: Optional[dict] = None,
                 in_index: Sequence[int] = (1, 2, 3), dropout_ratio: float = 0.1,
                 norm_cfg=GN32, align_corners: bool = False):
        super().__init__()
        if len(in_channels) != len(in_index):
            raise ValueError("in_channels and in_index must have the same length")
        self.in_channels, self.in_index = list(in_channels), list(in_index)
        self.num_classes, self.align_corners = num_classes, align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.squeeze = ConvModule(sum(in_channels), ham_channels, 1, norm_cfg=norm_cfg)
        self.hamburger = Hamburger(ham_channels, ham_kwargs, norm_cfg=norm_cfg)
        self.align = ConvModule(ham_channels, channels, 1, norm_cfg=norm_cfg)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = [inputs[i] for i in self.in_index]
        size = feats[0].shape[2:]
        feats = [f if f.shape[2:] == size else
                 F.interpolate(f, size=size, mode="bilinear", align_corners=self.align_corners)
                 for f in feats]
        x = self.hamburger(self.squeeze(torch.cat(feats, dim=1)))
        return self.conv_seg(self.dropout(self.align(x)))

"""LightHamHead decoder of SegNeXt with the NMF2D Hamburger (pure PyTorch reference).

Re-implemented from the facts collected in ``docs/reference_model.md`` ("LightHamHead decoder"), which
describes the official ``mmseg/models/decode_heads/ham_head.py`` of Visual-Attention-Network/
SegNeXt, mmsegmentation's port and Enjoy-Hamburger (Geng et al., "Is Attention Better Than
Matrix Decomposition?", ICLR 2021); SegNeXt paper section 3.2.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import build_norm_layer, check_act_cfg, nmf_kwargs

__all__ = ["ConvModule", "NMF2D", "Hamburger", "LightHamHead",
           "nmf_coef_update", "nmf_bases_update"]

GN32 = {"type": "GN", "num_groups": 32}
RELU = {"type": "ReLU"}


class ConvModule(nn.Module):
    """conv -> norm -> act block (mmcv ``ConvModule``, order ``("conv", "norm", "act")``).

    Args:
        norm_cfg: ``None`` or an mmcv norm config: ``{"type": "GN", "num_groups": G}`` (submodule ``gn``),
            ``{"type": "BN" | "SyncBN"}`` (submodule ``bn``), with ``requires_grad`` and the layer's own keys
            (see :func:`segnext.config.build_norm_layer`); a bare type string is accepted too (GN then uses 32
            groups).
        act_cfg: ``{"type": "ReLU"}`` (default, ReLU, no parameters; ``inplace`` accepted) or ``None``.
        bias: ``"auto"`` (mmcv semantics: bias only when there is no norm) or a bool.

    Init (mmcv ``ConvModule.init_weights``): conv Kaiming-normal (fan_out, ReLU gain), bias 0;
    norm weight 1, bias 0. Shapes: (B, C_in, H, W) -> (B, C_out, H', W').

    Raises:
        ValueError: unsupported norm or activation type, or an unknown key of either config (named).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, bias="auto", norm_cfg=None, act_cfg=RELU):
        super().__init__()
        if act_cfg is not None:
            check_act_cfg(act_cfg, "ReLU")
        if bias == "auto":
            bias = norm_cfg is None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.norm_name = None
        if norm_cfg is not None:
            self.norm_name, norm = build_norm_layer(norm_cfg, out_channels)
            self.add_module(self.norm_name, norm)
        self.activate = nn.ReLU(inplace=True) if act_cfg is not None else None
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


class NMF2D(nn.Module):
    """Non-negative matrix factorisation "ham" of the Hamburger (official SegNeXt ``NMF2D`` /
    ``_MatrixDecomposition2DBase``, mmsegmentation 1.2.2 ``NMF2D`` / ``Matrix_Decomposition_2D_Base``;
    Enjoy-Hamburger ``NMF2D``).

    Args:
        MD_S: number of groups S the channels are split into (D = C / S).
        MD_R: rank R (official T/S configs: 16; B/L: 64; mmseg's B/L configs: 16).
        train_steps / eval_steps: iterations in ``training`` / eval mode (6 / 7).
        inv_t: softmax inverse temperature of the coef init, applied as given (default 1). NOTE: the official and
            mmseg NMF2D overwrite it with 1, so the ``inv_t=100`` of their configs has no effect there; a
            ``ham_kwargs`` dict given to :class:`Hamburger` / :class:`LightHamHead` / the ``segnext_*`` factories
            keeps that meaning (see :func:`segnext.config.nmf_kwargs`; its ``softmax_inv_t`` reaches this one).
        eps: stabiliser in the update denominators (1e-6; hard-coded in the official code).
        grad_mode: ``"unrolled"`` (official SegNeXt / mmseg: back-prop through every step) or ``"one_step"``
            (the init and the steps run under ``torch.no_grad()``; only the final coef update and the
            reconstruction are differentiated: Hamburger paper / Enjoy-Hamburger). Forward values are equal.
        generator: optional ``torch.Generator``; bases are then drawn from it (on its device)
            instead of the CPU default generator, making outputs independent of global RNG.
        rand_init: True (every released config): fresh random bases at every forward. False (official option
            ``RAND_INIT=False`` / mmseg ``rand_init=False``): at the first forward, bases (S, D, R) are drawn once
            like the random ones (``torch.rand``, L2-normalised over D) and registered as the buffer ``bases`` (so
            they enter ``state_dict`` from then on, key ``...ham.bases``), then repeated over the batch at every
            forward, unchanged (neither implementation updates them: the official ``ETA`` is never applied). A
            ``state_dict`` holding ``bases`` loads into a module that has none yet (the official code drops it).
        spatial: True (official ``SPATIAL=True``, every config): the factorised matrix of each of the B*S groups
            is (D = C/S, N = H*W). False: (D = H*W, N = C/S), as the official ``SPATIAL=False``.

    Forward: x (B, C, H, W), non-negative, any floating dtype -> (B, C, H, W) same dtype;
    computed in float32 (float64 stays float64) with autocast off, cast back to x's dtype.

    Random bases: with ``rand_init=True`` fresh random bases are drawn on every call, IN EVAL TOO, as in the
    official code, so the same input gives logits that differ by about 0.1 between calls. For repeatable
    outputs pass ``generator=torch.Generator().manual_seed(s)`` and re-seed it before each call,
    seed the global RNG (``torch.manual_seed``) before each call, or pass ``bases`` (B*S, D, R).

    Raises:
        ValueError: C not divisible by S, bad ``grad_mode`` or wrong ``bases`` shape (also a stored ``bases``
            buffer whose (S, D, R) does not fit the input).
    """

    def __init__(self, MD_S: int = 1, MD_R: int = 64, train_steps: int = 6, eval_steps: int = 7,
                 inv_t: float = 1, eps: float = 1e-6, grad_mode: str = "unrolled",
                 generator: Optional[torch.Generator] = None, rand_init: bool = True, spatial: bool = True):
        super().__init__()
        if grad_mode not in ("unrolled", "one_step"):
            raise ValueError(f"grad_mode must be 'unrolled' or 'one_step', got {grad_mode!r}")
        self.S, self.R = MD_S, MD_R
        self.train_steps, self.eval_steps = train_steps, eval_steps
        self.inv_t, self.eps, self.grad_mode = inv_t, eps, grad_mode
        self.generator = generator
        self.rand_init, self.spatial = bool(rand_init), bool(spatial)
        self.register_buffer("bases", None)  # rand_init=False: set at the first forward (or by load_state_dict)

    def _build_bases(self, B: int, D: int, device) -> torch.Tensor:
        """Random initial bases (B*S, D, R), float32: ``torch.rand`` on the CPU default generator
        (or on ``self.generator``'s device), moved to ``device``, L2-normalised over D (dim 1)."""
        gen = self.generator
        bases = torch.rand((B * self.S, D, self.R), generator=gen, dtype=torch.float32,
                           device=gen.device if gen is not None else "cpu")
        return F.normalize(bases.to(device), dim=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "bases"
        if key in state_dict and not self.rand_init and self.bases is None and torch.is_tensor(state_dict[key]):
            self.bases = torch.empty_like(state_dict[key])  # the lazily registered buffer of rand_init=False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
        if self.spatial:
            D = C // self.S
            x = x.reshape(B * self.S, D, H * W)
        else:
            D = H * W
            x = x.reshape(B * self.S, C // self.S, D).transpose(1, 2)
        if bases is not None:
            if tuple(bases.shape) != (B * self.S, D, self.R):
                raise ValueError(f"bases must have shape {(B * self.S, D, self.R)}, "
                                 f"got {tuple(bases.shape)}")
        elif self.rand_init:
            bases = self._build_bases(B, D, x.device)
        else:
            if self.bases is None:
                self.bases = self._build_bases(1, D, x.device)
            elif tuple(self.bases.shape) != (self.S, D, self.R):
                raise ValueError(f"the stored bases (rand_init=False) have shape {tuple(self.bases.shape)}, "
                                 f"this input needs {(self.S, D, self.R)}")
            bases = self.bases.repeat(B, 1, 1)
        steps = self.train_steps if self.training else self.eval_steps
        out = self._factorize(x, bases, steps)
        if not self.spatial:
            out = out.transpose(1, 2)
        return out.reshape(B, C, H, W)

    def _factorize(self, x: torch.Tensor, bases: torch.Tensor, steps: int) -> torch.Tensor:
        """Softmax init, ``steps`` local steps, compute_coef and reconstruction (official
        ``local_inference`` + ``compute_coef``): x (B*S, D, N), bases (B*S, D, R) -> (B*S, D, N).
        The hook a fused subclass (``segnext_kernels.FusedNMF2D``) overrides."""
        out_dtype = x.dtype
        cdtype = torch.promote_types(x.dtype, torch.float32)
        with _autocast_off(x.device.type):
            x = x.to(cdtype)
            bases = bases.to(device=x.device, dtype=cdtype)
            with torch.no_grad() if self.grad_mode == "one_step" else contextlib.nullcontext():
                coef = F.softmax(self.inv_t * torch.bmm(x.transpose(1, 2), bases), dim=-1)
                for _ in range(steps):
                    bases, coef = self.local_step(x, bases, coef)
            coef = self.compute_coef(x, bases, coef)
            return torch.bmm(bases, coef.transpose(1, 2)).to(out_dtype)

    def extra_repr(self) -> str:
        extra = "" if self.rand_init else ", rand_init=False"
        extra += "" if self.spatial else ", spatial=False"
        return (f"S={self.S}, R={self.R}, train_steps={self.train_steps}, "
                f"eval_steps={self.eval_steps}, inv_t={self.inv_t}, grad_mode={self.grad_mode!r}{extra}")


class Hamburger(nn.Module):
    """Light Hamburger (official ``Hamburger``): ``e = ReLU(ham_in(x))`` (1x1 conv with bias),
    ``e = ham_out(NMF2D(e))`` (1x1 conv, no bias, GN), ``return ReLU(x + e)``.

    Args:
        ham_channels: C.
        ham_kwargs: the NMF2D options as an official / mmseg config gives them (``MD_R``, ``train_steps``,
            ``rand_init``, ``TRAIN_STEPS``, ...), with the official meaning -- ``inv_t`` / ``INV_T`` have no effect,
            as there -- plus this package's ``eps``, ``grad_mode``, ``generator``, ``softmax_inv_t``; see
            :func:`segnext.config.nmf_kwargs` (TypeError for an unknown key).
        norm_cfg: norm of ``ham_out`` (the head forwards its GN(32) config here).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, ham_channels: int = 512, ham_kwargs: Optional[dict] = None, norm_cfg=GN32):
        super().__init__()
        self.ham_in = ConvModule(ham_channels, ham_channels, 1, norm_cfg=None, act_cfg=None)
        self.ham = NMF2D(**nmf_kwargs(ham_kwargs))
        self.ham_out = ConvModule(ham_channels, ham_channels, 1, norm_cfg=norm_cfg, act_cfg=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enjoy = F.relu(self.ham_in(x), inplace=True)
        enjoy = self.ham_out(self.ham(enjoy))
        return F.relu(x + enjoy, inplace=True)


class LogitsResize(nn.Module):
    """A bilinear resize as a module: ``F.interpolate(logits, size, mode="bilinear", align_corners)``; the final
    resize of ``SegNeXt.forward`` (``SegNeXt.resize``) and the decode head's resize of its inputs to the first
    selected map's size (``LightHamHead.resize``).

    A module of its own (no parameters or buffers: ``state_dict`` has no entry for it) so that it can be swapped,
    e.g. for ``segnext_kernels.FusedLogitsResize`` (``segnext_kernels.fuse_resize``).

    forward(logits, size, align_corners): logits (B, K, h, w) -> (B, K, *size).
    """

    def forward(self, logits: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


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
        norm_cfg: norm of the ConvModules (official: GN with 32 groups; an mmcv dict with ``requires_grad``
            etc., see :func:`segnext.config.build_norm_layer`).
        dropout_ratio: Dropout2d before ``conv_seg`` (0.1).
        align_corners: of the resizes here and, as in mmseg's ``EncoderDecoder`` (which takes it from the head),
            of :class:`segnext.SegNeXt`'s final resize to the input size.
        act_cfg: ``{"type": "ReLU"}`` (mmseg ``BaseDecodeHead`` default; the only one supported).
        conv_cfg: ``None`` or ``{"type": "Conv2d"}`` / ``{"type": "Conv"}`` (mmcv's plain conv; the only one
            supported).

    Other mmseg ``BaseDecodeHead`` options (``loss_decode``, ``sampler``, ``ignore_index``, ``init_cfg``, ...)
    concern training and are not accepted (TypeError naming the keyword).

    ``conv_seg`` is registered first and initialised N(0, 0.01), bias 0 (mmseg BaseDecodeHead).

    Raises:
        ValueError: ``in_channels`` and ``in_index`` lengths differ; an unsupported ``act_cfg`` / ``conv_cfg`` /
            ``norm_cfg`` (named).
        TypeError: an unknown ``ham_kwargs`` key (named).
    """

    def __init__(self, in_channels: Sequence[int] = (64, 160, 256), channels: int = 256,
                 num_classes: int = 150, ham_channels: int = 256, ham_kwargs: Optional[dict] = None,
                 in_index: Sequence[int] = (1, 2, 3), dropout_ratio: float = 0.1,
                 norm_cfg=GN32, align_corners: bool = False, act_cfg=RELU, conv_cfg=None):
        super().__init__()
        if len(in_channels) != len(in_index):
            raise ValueError("in_channels and in_index must have the same length")
        check_act_cfg(act_cfg, "ReLU")
        conv_type = conv_cfg.get("type") if isinstance(conv_cfg, dict) and len(conv_cfg) == 1 else conv_cfg
        if conv_type not in (None, "Conv2d", "Conv"):
            raise ValueError(f"conv_cfg: only None / {{'type': 'Conv2d'}} is supported, got {conv_cfg!r}")
        self.in_channels, self.in_index = list(in_channels), list(in_index)
        self.num_classes, self.align_corners = num_classes, align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.squeeze = ConvModule(sum(in_channels), ham_channels, 1, norm_cfg=norm_cfg)
        self.hamburger = Hamburger(ham_channels, ham_kwargs, norm_cfg=norm_cfg)
        self.align = ConvModule(ham_channels, channels, 1, norm_cfg=norm_cfg)
        self.resize = LogitsResize()  # no parameters: state_dict unchanged
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "resize" not in self._modules:  # a head pickled before the resize became a submodule
            self.resize = LogitsResize()

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = [inputs[i] for i in self.in_index]
        size = feats[0].shape[2:]
        feats = [f if f.shape[2:] == size else self.resize(f, size, self.align_corners) for f in feats]
        x = self.hamburger(self.squeeze(torch.cat(feats, dim=1)))
        return self.conv_seg(self.dropout(self.align(x)))

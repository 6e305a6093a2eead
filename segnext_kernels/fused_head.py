"""The LightHamHead's squeeze run on each backbone map at its own resolution: ``FusedLightHamHead`` /
``fuse_head_squeeze`` (``fuse`` in ``modules.py`` applies it on CPU).

The official head (``ham_head.py`` ``LightHamHead.forward``; ``segnext.LightHamHead``) resizes stages 3 and 4 to
stage 2's size, concatenates the maps (sum C_i channels) and runs ``squeeze`` (a 1x1 ConvModule: conv, GroupNorm,
ReLU) on the concatenation. A 1x1 convolution mixes channels per pixel and a bilinear resize blends pixels per
channel with the same weights in every channel, so the two commute::

    squeeze.conv(cat(f_2, up(f_3), up(f_4))) = W_2 f_2 + up(W_3 f_3) + up(W_4 f_4) (+ bias)

with W_i the columns of the squeeze weight that read map i. The right side runs each part of the 1x1 at its map's
own resolution (stage 3 has 4x, stage 4 16x fewer pixels than stage 2), resizes ham_channels-wide results instead
of the inputs and never writes the concatenation: SegNeXt-T at 512x512 1.01 -> 0.25 GFLOP, SegNeXt-B 4.03 -> 1.01.
Equal in exact arithmetic; in floating point the terms are summed in another order (a few ulp before the
GroupNorm). Parameters, submodules and ``state_dict`` are the head's own; the GroupNorm, ReLU, Hamburger, align and
``conv_seg`` run as in the head. The parts run ``segnext_kernels.pwconv`` (the resized sum enters the last part's
epilogue as its residual), so training and gradients work as there; under ``torch.autocast("cpu", torch.bfloat16)``
the GEMMs take bfloat16 operands with fp32 accumulation and the sum is fp32, rounded once to bfloat16 (eager's
autocast conv output dtype).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from segnext.ham_head import LightHamHead

from .backends import check_backend_name
from .fused_blocks import _bf16_autocast, _runs_on_cpu, adopt
from .modules import swap_modules
from .pwconv import pwconv

__all__ = ["FusedLightHamHead", "fuse_head_squeeze"]


class FusedLightHamHead(LightHamHead):
    """Drop-in for ``segnext.LightHamHead`` whose squeeze 1x1 runs per input map before the resize (module
    docstring). Shares the head's submodules and parameters (``state_dict`` unchanged).

    Args (``from_module``): head: the ``segnext.LightHamHead`` (exactly that class); backend: "auto" or "cpu" for
    ``pwconv``, read at every forward.

    forward(inputs): the backbone maps (B, C_i, H_i, W_i); those at ``in_index`` are read -> logits (B,
    num_classes, H_1, W_1) at the first selected map's size, as ``LightHamHead.forward``. Falls back to it where
    the reorder buys nothing (every selected map already has the first one's size) or the squeeze is not a plain
    1x1 convolution. Raises what ``segnext_kernels.pwconv`` and the head's own modules raise for bad maps.
    """

    @classmethod
    def from_module(cls, head: nn.Module, backend: str = "auto") -> "FusedLightHamHead":
        """Raises: TypeError when ``head`` is not a ``segnext.LightHamHead``."""
        if type(head) is not LightHamHead:
            raise TypeError(f"head: expected a segnext.LightHamHead, got {type(head).__name__}")
        check_backend_name(backend)
        fused = adopt(cls, head)
        fused.backend = backend
        fused._parts_key = None
        fused._parts = None
        return fused

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def _weight_parts(self, weight: torch.Tensor, grad: bool):
        """The squeeze weight's column blocks, one (ham_channels, C_i) per selected map: views while autograd
        records (the gradient reaches the parameter) or a trace runs; otherwise contiguous copies cached by version
        counter."""
        w2 = weight.reshape(weight.shape[0], weight.shape[1])
        if grad:
            return list(w2.split(self.in_channels, dim=1))
        key = (id(weight), weight._version)
        if key != self._parts_key:
            self._parts = [p.detach().contiguous() for p in w2.split(self.in_channels, dim=1)]
            self._parts_key = key
        return self._parts

    def forward(self, inputs):
        feats = [inputs[i] for i in self.in_index]
        size = feats[0].shape[2:]
        conv = self.squeeze.conv
        if (all(f.shape[2:] == size for f in feats) or conv.kernel_size != (1, 1) or conv.groups != 1
                or conv.weight.shape[1] != sum(self.in_channels) or any(f.dim() != 4 for f in feats)
                or [f.shape[1] for f in feats] != list(self.in_channels)):
            return super().forward(inputs)
        grad = torch.is_grad_enabled() and (conv.weight.requires_grad or any(f.requires_grad for f in feats))
        parts = self._weight_parts(conv.weight, grad or torch.compiler.is_compiling())  # no cache in a trace
        low = feats[0].device.type == "cpu" and _bf16_autocast()
        gd = torch.bfloat16 if low else None
        od = torch.float32 if low else None  # parts and sum in fp32 under autocast, rounded once below
        r = None  # the sum of every part but the first map's, at its size
        with torch.autocast("cpu", enabled=False) if low else contextlib.nullcontext():
            for f, w in zip(feats[1:], parts[1:]):
                z = pwconv(f, w, None, out_dtype=od, gemm_dtype=gd, backend=self.backend)
                if z.shape[2:] != size:
                    z = self.resize(z, size, self.align_corners)
                r = z if r is None else (r + z if grad else r.add_(z))
            x = pwconv(feats[0], parts[0], conv.bias, r=r.to(od or feats[0].dtype), out_dtype=od, gemm_dtype=gd,
                       backend=self.backend)
        if low:
            x = x.to(torch.bfloat16)
        sq = self.squeeze
        if sq.norm_name:
            x = getattr(sq, sq.norm_name)(x)
        if sq.activate is not None:
            x = sq.activate(x)
        x = self.hamburger(x)
        return self.conv_seg(self.dropout(self.align(x)))


def _is_head(m: nn.Module) -> bool:
    return type(m) is LightHamHead


def fuse_head_squeeze(model: nn.Module, backend: str = "auto") -> int:
    """Swap every ``segnext.LightHamHead`` inside ``model`` (a submodule; ``model`` itself is never replaced) for a
    ``FusedLightHamHead`` sharing its submodules, in place, when the fused CPU ops run on ``model``'s device
    ("auto" / "cpu" on a CPU model; elsewhere nothing is swapped). Returns the number swapped. Raises ValueError
    for an unknown backend, RuntimeError when backend="cpu" cannot run here."""
    check_backend_name(backend)
    if not _runs_on_cpu(model, backend):
        return 0
    return swap_modules(model, _is_head, lambda m: FusedLightHamHead.from_module(m, backend=backend))

"""MSCAN's stem and patch embeddings with their eval BatchNorms folded into the convolutions: ``FusedPatchEmbed``
/ ``fuse_patch_embeds`` (``fuse`` in ``modules.py`` applies them on CPU models).

``segnext.StemConv`` (conv3x3/s2 -> BN -> GELU -> conv3x3/s2 -> BN) and ``segnext.OverlapPatchEmbed``
(conv3x3/s2 -> BN) in eval mode run each conv -> BN pair as one ``F.conv2d`` with the folded weight
``w * s[o]`` and bias ``(b - mean) * s + beta`` (``s = gamma / sqrt(var + eps)``): no BatchNorm pass and no
intermediate tensor. The module keeps the original submodules (``proj``, ``norm``), so ``state_dict`` is unchanged;
the folded copies (the conv weights' size) are recomputed when a parameter or running statistic changes (version
counters). Under bfloat16 autocast the folded convolutions run in bfloat16, as eager's convolutions do (the fold is
then rounded once instead of the conv output and the BatchNorm separately); where torch has no fast bfloat16
convolution for this CPU (oneDNN's needs AVX-512 or AMX; elsewhere eager falls back to ``_slow_conv2d_forward``,
most of the fused model's bf16 time in a torch.profiler run on an AVX2-only CPU) each runs as the float32 convolution of
the bfloat16-rounded input, weight and bias with the output rounded to bfloat16: eager's operands, fp32
accumulation, its output dtype. Training, a gradient needed, another
autocast dtype, tracing, a dtype other than float32 (bfloat16 under autocast) or a norm that is not an eval
BatchNorm run the original modules.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .fused_blocks import _bn_affine, _is_eval_bn

__all__ = ["FusedPatchEmbed", "fuse_patch_embeds"]


@functools.lru_cache(maxsize=None)
def _fast_bf16_conv() -> bool:
    """Whether eager's bfloat16 convolution on this CPU is oneDNN's (read once; a torch without the private probe:
    assumed yes, eager's conv runs)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if probe is None else bool(probe())


def _conv_bf16_via_fp32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Autocast's bfloat16 convolution computed in float32 on the bfloat16-rounded operands (products of bfloat16
    values are exact in fp32); the output rounded to bfloat16. x: (B, Cin, H, W) float32 or bfloat16."""
    bf = torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        y = F.conv2d(x.to(bf).float(), w.to(bf).float(), b.to(bf).float(), conv.stride, conv.padding, conv.dilation,
                     conv.groups)
    return y.to(bf)


def _pairs(module: nn.Module, kind: str) -> list:
    """The (conv, bn, act-after) triples of a StemConv (its ``proj`` Sequential) or an OverlapPatchEmbed."""
    if kind == "StemConv":
        p = module.proj
        return [(p[0], p[1], p[2]), (p[3], p[4], None)]
    return [(module.proj, module.norm, None)]


def _is_embed(m: nn.Module) -> bool:
    """Our (NCHW-returning) ``segnext.StemConv`` / ``segnext.OverlapPatchEmbed`` with conv -> norm pairs."""
    from segnext import mscan

    if type(m) is mscan.StemConv:
        p = m.proj
        return len(p) == 5 and isinstance(p[0], nn.Conv2d) and isinstance(p[3], nn.Conv2d)
    return type(m) is mscan.OverlapPatchEmbed and isinstance(m.proj, nn.Conv2d)


class FusedPatchEmbed(nn.Module):
    """Drop-in for a ``segnext.StemConv`` or ``segnext.OverlapPatchEmbed`` holding its submodules (the same
    parameters and ``state_dict``). forward(x): (B, C_in, H, W) -> (B, C_out, H', W'), as the wrapped module."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedPatchEmbed":
        """Raises: TypeError when ``module`` is not a ``segnext`` StemConv / OverlapPatchEmbed."""
        if not _is_embed(module):
            raise TypeError(f"module: expected a segnext StemConv or OverlapPatchEmbed, got {type(module).__name__}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.kind = type(module).__name__
        for name, child in module.named_children():
            setattr(fused, name, child)
        fused._cache_key, fused._cache = None, None
        fused.train(module.training)
        return fused

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "StemConv":
            return self.proj(x)
        return self.norm(self.proj(x))

    def _fast_ok(self, x: torch.Tensor) -> bool:
        if self.training or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        if torch.is_autocast_enabled("cpu"):  # bfloat16 autocast: the folded convs run in bfloat16 as eager's convs
            if not (torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)):
                return False
        elif x.dtype != torch.float32:
            return False
        if x.device.type != "cpu":
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return all(_is_eval_bn(bn) and conv.weight.dtype == torch.float32 for conv, bn, _ in _pairs(self, self.kind))

    def _folded(self):
        ts = [t for conv, bn, _ in _pairs(self, self.kind) for t in (conv.weight, conv.bias, bn.weight, bn.bias,
                                                            bn.running_mean, bn.running_var)]
        key = tuple((id(t), t._version) if t is not None else None for t in ts)
        if key != self._cache_key or self._cache is None:
            with torch.no_grad():
                cache = []
                for conv, bn, _ in _pairs(self, self.kind):
                    s, t = _bn_affine(bn)
                    w = (conv.weight * s[:, None, None, None]).contiguous()
                    b = t if conv.bias is None else conv.bias * s + t
                    cache.append((w, b.contiguous()))
            self._cache_key, self._cache = key, cache
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_ok(x):
            return self._eager(x)
        slow_bf16 = torch.is_autocast_enabled("cpu") and not _fast_bf16_conv()
        for (conv, _, act), (w, b) in zip(_pairs(self, self.kind), self._folded()):
            if slow_bf16:
                x = _conv_bf16_via_fp32(x, w, b, conv)
            else:
                x = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
            if act is not None:
                x = act(x)
        return x


def fuse_patch_embeds(model: nn.Module, backend: str = "auto") -> int:
    """Swap every ``segnext`` StemConv / OverlapPatchEmbed inside ``model`` for a ``FusedPatchEmbed``, in place,
    where the fused CPU ops run ("auto" / "cpu" on a CPU model). Returns the number swapped. Raises ValueError for
    an unknown backend, RuntimeError when backend="cpu" cannot run here."""
    from .backends import check_backend_name
    from .fused_blocks import _runs_on_cpu
    from .modules import swap_modules

    check_backend_name(backend)
    if not _runs_on_cpu(model, backend):
        return 0
    return swap_modules(model, _is_embed, FusedPatchEmbed.from_module)

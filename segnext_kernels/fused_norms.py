"""MSCAN's stage norms without their transposed copies: ``FusedStageNorm`` / ``fuse_stage_norms`` (``fuse`` in
``modules.py`` applies them on CPU models).

MSCAN (official ``mscan.py``; ``segnext.MSCAN``) ends every stage with::

    x = norm_i(x.flatten(2).transpose(1, 2))                   # LayerNorm over C of the (B, N, C) view
    x = x.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()

Eager PyTorch copies the transposed view into a contiguous (B, N, C) tensor for the LayerNorm and copies the result
back to NCHW. ``FusedStageNorm`` is an ``nn.LayerNorm`` (the same parameters and ``state_dict``) that, given such a
view of an NCHW tensor, runs ``segnext_kernels.channel_layer_norm`` on the NCHW memory and returns the (B, N, C)
transposed view of its NCHW result, so the reshape / permute / contiguous above are views: no copy at all. Any
other input (a contiguous (B, N, C) tensor, another dtype or device) runs ``nn.LayerNorm.forward``; under autocast a
float32 input still runs the kernel (eager's LayerNorm of a float32 tensor is float32 there too).

The LightHamHead's GroupNorms (``FusedGroupNorm`` / ``fuse_head_norms``): the ``gn`` of its ``squeeze``,
``hamburger.ham_out`` and ``align`` ConvModules (mmcv ``ConvModule``, ``GN`` with 32 groups) run
``segnext_kernels.group_norm`` in inference.
"""
from __future__ import annotations

import torch
from torch import nn

from .backends import check_backend_name
from .group_norm import group_norm
from .layernorm import channel_layer_norm

__all__ = ["FusedGroupNorm", "FusedStageNorm", "fuse_head_norms", "fuse_stage_norms"]


class FusedStageNorm(nn.LayerNorm):
    """Drop-in for an ``nn.LayerNorm`` over the last dimension C applied to ``x.flatten(2).transpose(1, 2)`` of an
    NCHW tensor x (MSCAN's ``norm1`` .. ``norm4``), sharing its weight and bias.

    forward(t): (B, N, C) -> (B, N, C). For t the transpose of a contiguous (B, C, N) float32 CPU tensor (and an
    affine LayerNorm) the result is the transposed view of ``channel_layer_norm``'s contiguous (B, C, N)
    output (a gradient needed: its reference); otherwise ``nn.LayerNorm.forward(t)``.
    """

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, backend: str = "auto") -> "FusedStageNorm":
        """Raises: TypeError when ``norm`` is not an ``nn.LayerNorm`` over one dimension."""
        if not _is_stage_norm(norm):
            raise TypeError(f"norm: expected an nn.LayerNorm over one dimension, got {norm!r}")
        check_backend_name(backend)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.normalized_shape = norm.normalized_shape
        fused.eps = norm.eps
        fused.elementwise_affine = norm.elementwise_affine
        fused.weight = norm.weight
        fused.bias = norm.bias
        fused.backend = backend
        fused.train(norm.training)
        return fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if (t.dim() == 3 and t.device.type == "cpu" and t.dtype == torch.float32 and self.weight is not None
                and self.bias is not None and t.stride(1) == 1 and t.stride(2) == t.shape[1]
                and t.stride(0) == t.shape[1] * t.shape[2]):  # autocast too: eager's LayerNorm of fp32 is fp32
            return channel_layer_norm(t.transpose(1, 2), self.weight, self.bias, self.eps,
                                      backend=self.backend).transpose(1, 2)
        return super().forward(t)


def _is_stage_norm(m: nn.Module) -> bool:
    return type(m) is nn.LayerNorm and len(m.normalized_shape) == 1


def fuse_stage_norms(model: nn.Module, backend: str = "auto") -> int:
    """Swap the LayerNorms of every MSCAN backbone inside ``model`` (``segnext.MSCAN`` or mmseg's ``MSCAN``: its
    stage norms) for ``FusedStageNorm`` sharing their parameters, in place, where the fused CPU ops run ("auto" /
    "cpu" on a CPU model). Returns the number swapped. Raises ValueError for an unknown backend, RuntimeError when
    backend="cpu" cannot run here."""
    from .fused_blocks import _runs_on_cpu
    from .modules import swap_modules

    check_backend_name(backend)
    if not _runs_on_cpu(model, backend):
        return 0
    nets = [m for m in model.modules() if type(m).__name__ == "MSCAN"]
    return sum(swap_modules(n, _is_stage_norm, lambda m: FusedStageNorm.from_module(m, backend=backend))
               for n in nets)


# ------------------------------------------------------------------------------------------- the head's GroupNorms
#: Whether this torch's CPU autocast has a rule for group_norm (CUDA autocast's is float32; a release registering one
#: for CPU would cast x to float32). torch 2.13 has none: under autocast eager's GroupNorm keeps x's dtype (bfloat16
#: in, bfloat16 out; float32 in, float32 out). The True branch is not exercised by the tests here.
_AUTOCAST_CPU_GN_FP32 = torch._C._dispatch_has_kernel_for_dispatch_key("aten::group_norm", "AutocastCPU")


class FusedGroupNorm(nn.GroupNorm):
    """Drop-in for an ``nn.GroupNorm`` (the same num_groups, num_channels, eps, affine, weight and bias: the
    ``state_dict`` is unchanged) running ``segnext_kernels.group_norm`` in inference.

    forward(x): (B, C, *) -> (B, C, *). A float32 or bfloat16 CPU x with float32 parameters (or none), no gradient
    needed, runs the kernel (a contiguous NCHW result; bfloat16: fp32 statistics, a bfloat16 result, as eager's
    mixed-dtype GroupNorm). Under ``torch.autocast("cpu", torch.bfloat16)`` the same, with eager autocast's result
    dtype (x's on torch 2.13, which has no CPU autocast rule for group_norm; float32 where a release puts it on
    the fp32 list: x is then cast to float32 first). Anything else (another device or dtype, a gradient needed,
    another autocast dtype) runs ``nn.GroupNorm.forward``.
    """

    @classmethod
    def from_module(cls, norm: nn.GroupNorm, backend: str = "auto") -> "FusedGroupNorm":
        """Raises: TypeError when ``norm`` is not an ``nn.GroupNorm``."""
        if type(norm) is not nn.GroupNorm:
            raise TypeError(f"norm: expected an nn.GroupNorm, got {norm!r}")
        check_backend_name(backend)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in ("num_groups", "num_channels", "eps", "affine", "weight", "bias"):
            setattr(fused, name, getattr(norm, name))
        fused.backend = backend
        fused.train(norm.training)
        return fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def _runs_kernel(self, x: torch.Tensor) -> bool:
        params = [p for p in (self.weight, self.bias) if p is not None]
        autocast = torch.is_autocast_enabled("cpu")
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() >= 2
                and all(p.dtype == torch.float32 for p in params)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))
                and (not autocast or torch.get_autocast_dtype("cpu") == torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._runs_kernel(x):
            return super().forward(x)
        if _AUTOCAST_CPU_GN_FP32 and torch.is_autocast_enabled("cpu"):
            x = x.float()  # eager autocast's fp32 rule (the custom op has no autocast rule of its own)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)


def fuse_head_norms(model: nn.Module, backend: str = "auto") -> int:
    """Swap the GroupNorms of every ``LightHamHead`` inside ``model`` (``segnext.LightHamHead`` or mmseg's: the
    ``gn`` of its squeeze, hamburger.ham_out and align ConvModules) for ``FusedGroupNorm`` sharing their parameters,
    in place, where the fused CPU ops run ("auto" / "cpu" on a CPU model). Returns the number swapped. Raises
    ValueError for an unknown backend, RuntimeError when backend="cpu" cannot run here."""
    from .fused_blocks import _runs_on_cpu
    from .modules import swap_modules

    check_backend_name(backend)
    if not _runs_on_cpu(model, backend):
        return 0
    heads = [m for m in model.modules() if type(m).__name__ == "LightHamHead"]
    return sum(swap_modules(h, lambda m: type(m) is nn.GroupNorm,
                            lambda m: FusedGroupNorm.from_module(m, backend=backend)) for h in heads)

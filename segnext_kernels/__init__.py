"""segnext-kernels: fused kernels for SegNeXt (MSCA attention, NMF2D Hamburger) in C++ for CPU, CUDA and Triton.

Public API:
    msca(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias, *, backend="auto")
    nmf2d(x, bases, steps, *, grad_mode="unrolled", eps=1e-6, inv_t=1.0, return_state=False, backend="auto")
    mlp(x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, *, residual=None, backend="auto"):
        MSCAN's Mlp
    pwconv(x, weight, bias=None, *, act="none", alpha=None, r=None, backend="auto"): 1x1 conv + epilogue (inference)
    resize_bilinear(x, size, align_corners=False, backend="auto"): F.interpolate(mode="bilinear")
    channel_layer_norm(x, weight, bias, eps=1e-6, backend="auto"): LayerNorm over C of (B, C, N) (inference)
    group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, backend="auto"): F.group_norm (inference)
    FusedMSCA, FusedNMF2D, FusedMlp: drop-in modules; fuse_msca / fuse_ham / fuse_mlp(model): swap them in;
    FusedLogitsResize / fuse_resize(model): SegNeXt's final resize of the logits;
    FusedBlock / fuse_blocks, FusedConv1x1 / fuse_head_convs: MSCAN blocks and the head's 1x1 convs on CPU;
    FusedStageNorm / fuse_stage_norms: MSCAN's stage LayerNorms on NCHW memory (CPU);
    FusedGroupNorm / fuse_head_norms: the decode head's GroupNorms (CPU);
    FusedPatchEmbed / fuse_patch_embeds: the stem and patch embeddings with eval BatchNorms folded (CPU);
    fuse(model): all of them (blocks, head convs, resize, stage and head norms, embeddings where the CPU kernels run)
    msca_reference, nmf2d_reference: the eager oracles; BACKENDS, supports(op, backend, device, dtype)

Layout: one folder per op (``msca/``, ``nmf/``, ``mlp/``, ``pwconv/``, ``resize/``, ``layernorm/``,
``group_norm/``) with its ``reference.py``, ``interface.py`` and one file per backend; ``backends.py`` (which backend
runs where), ``extension.py`` (the compiled extensions, loaded lazily), ``modules.py`` and ``fused_blocks.py``,
``fused_norms.py``, ``fused_embeds.py``, ``fused_head.py`` (fused modules and model rewriters), ``knobs.py`` (tuning and test knobs, read
from the environment once, when this package is imported).

Importing this package needs no GPU, no Triton and no compiled extension: Triton kernels are imported on first use,
and an extension is loaded (or built) the first time a backend that needs it runs; only then is it said why one is
missing and how to build it.
"""
from . import knobs  # noqa: F401  (the environment's knobs are read now, once)
from .backends import BACKENDS, supports
from .fused_blocks import FusedBlock, FusedConv1x1, fuse_blocks, fuse_head_convs
from .fused_embeds import FusedPatchEmbed, fuse_patch_embeds
from .fused_head import FusedLightHamHead, fuse_head_squeeze
from .fused_norms import FusedGroupNorm, FusedStageNorm, fuse_head_norms, fuse_stage_norms
from .group_norm import group_norm, group_norm_reference
from .layernorm import channel_layer_norm, channel_layer_norm_reference
from .mlp import mlp, mlp_reference
from .modules import (FusedLogitsResize, FusedMlp, FusedMSCA, FusedNMF2D, fuse, fuse_ham, fuse_mlp, fuse_msca,
                      fuse_resize)
from .msca import msca, msca_reference
from .nmf import nmf2d, nmf2d_reference
from .pwconv import pwconv, pwconv_reference
from .resize import resize_bilinear, resize_bilinear_reference

__all__ = ["BACKENDS", "FusedBlock", "FusedConv1x1", "FusedGroupNorm", "FusedLightHamHead", "FusedLogitsResize", "FusedMSCA", "FusedMlp",
           "FusedNMF2D", "FusedPatchEmbed", "FusedStageNorm", "channel_layer_norm", "channel_layer_norm_reference",
           "fuse", "fuse_blocks", "fuse_ham", "fuse_head_convs", "fuse_head_norms", "fuse_head_squeeze", "fuse_mlp", "fuse_msca",
           "fuse_patch_embeds", "fuse_resize", "fuse_stage_norms", "group_norm", "group_norm_reference", "mlp",
           "mlp_reference", "msca", "msca_reference", "nmf2d", "nmf2d_reference", "pwconv", "pwconv_reference",
           "resize_bilinear", "resize_bilinear_reference", "supports"]
__version__ = "0.1.0"

"""Bilinear resize of SegNeXt's logits (``F.interpolate(logits, size, mode="bilinear", align_corners)``, the last op
of ``SegNeXt.forward``).

Files: ``reference.py`` (the eager oracle, fallback and benchmark baseline), ``interface.py`` (argument checks, the
custom op with its fake and autograd, the public ``resize_bilinear``), ``cpu.py`` (the C++ CPU backend); the modules
``FusedLogitsResize`` / ``fuse_resize`` live in ``segnext_kernels/modules.py``. Each backend is registered below with
the dtypes it takes.
"""
import torch

from ..backends import register_kernel
from .interface import resize_bilinear
from .reference import resize_bilinear_reference

register_kernel("resize_bilinear", "cpu", "segnext_kernels.resize.cpu", (torch.float32, torch.bfloat16, torch.float64))

__all__ = ["resize_bilinear", "resize_bilinear_reference"]

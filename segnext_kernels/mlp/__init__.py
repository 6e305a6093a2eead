"""Fused MSCAN MLP (official ``mscan.py`` ``Mlp``: fc1 1x1 -> depthwise 3x3 -> GELU -> fc2 1x1).

Files: ``reference.py`` (the eager oracle, fallback and benchmark baseline; the packed weight layout),
``interface.py`` (argument checks, custom ops with fakes and autograd, the public ``mlp``), ``cpu.py`` (the C++ CPU
backend), (the modules ``FusedMlp`` / ``fuse_mlp`` live in ``segnext_kernels/modules.py``). Each backend is registered below with the dtypes it takes.
"""
import torch

from ..backends import register_kernel
from .interface import mlp
from .reference import mlp_reference, pack_weights

register_kernel("mlp", "cpu", "segnext_kernels.mlp.cpu", (torch.float32, torch.bfloat16, torch.float64))

__all__ = ["mlp", "mlp_reference", "pack_weights"]

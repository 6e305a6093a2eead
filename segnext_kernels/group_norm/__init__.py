"""GroupNorm (``F.group_norm``) for the LightHamHead's ConvModules, forward (inference).

Files: ``reference.py`` (the eager oracle, fallback and benchmark baseline), ``interface.py`` (argument checks, the
custom op with its fake, the public ``group_norm``), ``cpu.py`` (the C++ CPU backend). ``FusedGroupNorm`` /
``fuse_head_norms`` (``segnext_kernels/fused_norms.py``) swap it into a model. Each backend is registered below
with the dtypes it takes (bfloat16: fp32 statistics, a bfloat16 output).
"""
import torch

from ..backends import register_kernel
from .interface import group_norm
from .reference import group_norm_reference

register_kernel("group_norm", "cpu", "segnext_kernels.group_norm.cpu", (torch.float32, torch.bfloat16))

__all__ = ["group_norm", "group_norm_reference"]

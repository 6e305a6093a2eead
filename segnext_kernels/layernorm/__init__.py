"""LayerNorm over the channels of (B, C, N) tensors: MSCAN's stage norms without their transposed copies, forward
(inference).

Files: ``reference.py`` (the eager oracle, fallback and benchmark baseline), ``interface.py`` (argument checks, the
custom op with its fake, the public ``channel_layer_norm``), ``cpu.py`` (the C++ CPU backend). ``FusedStageNorm`` /
``fuse_stage_norms`` (``segnext_kernels/fused_norms.py``) swap it into a model. Each backend is registered below
with the dtypes it takes.
"""
import torch

from ..backends import register_kernel
from .interface import channel_layer_norm
from .reference import channel_layer_norm_reference

register_kernel("channel_layer_norm", "cpu", "segnext_kernels.layernorm.cpu", (torch.float32,))

__all__ = ["channel_layer_norm", "channel_layer_norm_reference"]

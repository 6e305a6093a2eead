"""Fused MSCA (multi-scale convolutional attention, SegNeXt section 3.1; official ``AttentionModule``).

Files: ``reference.py`` (the eager oracle, fallback and benchmark baseline; the packed weight layout),
``interface.py`` (argument checks, custom ops with fakes and autograd, the public ``msca``), one file per backend:
``cpu.py``, ``cuda.py``, ``triton.py``. Each backend is registered below with the dtypes it takes.
"""
import torch

from ..backends import register_kernel
from .interface import msca
from .reference import msca_reference, pack_weights

register_kernel("msca", "cpu", "segnext_kernels.msca.cpu", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
register_kernel("msca", "cuda", "segnext_kernels.msca.cuda", (torch.float32, torch.float16, torch.bfloat16))
register_kernel("msca", "triton", "segnext_kernels.msca.triton",
                (torch.float32, torch.float16, torch.bfloat16, torch.float64))

__all__ = ["msca", "msca_reference", "pack_weights"]

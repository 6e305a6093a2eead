"""Fused NMF2D (the matrix decomposition "ham" of SegNeXt's Hamburger decoder; official ``NMF2D``).

Files: ``reference.py`` (the eager oracle, fallback and benchmark baseline), ``interface.py`` (argument checks,
custom ops with fakes and autograd, the public ``nmf2d``), ``driver.py`` (the step orchestration both fused
backends share), one file per backend: ``cuda.py``, ``triton.py`` and ``cpu.py`` (forward only: the C++ CPU
kernels, driven without ``driver.py``). Each backend is registered below with the dtypes
it takes.
"""
import torch

from ..backends import register_kernel
from .interface import GRAD_MODES, nmf2d
from .reference import nmf2d_reference

register_kernel("nmf2d", "cuda", "segnext_kernels.nmf.cuda", (torch.float32, torch.float16, torch.bfloat16))
register_kernel("nmf2d", "cpu", "segnext_kernels.nmf.cpu", (torch.float32, torch.bfloat16, torch.float16))
register_kernel("nmf2d", "triton", "segnext_kernels.nmf.triton",
                (torch.float32, torch.float16, torch.bfloat16, torch.float64))

__all__ = ["GRAD_MODES", "nmf2d", "nmf2d_reference"]

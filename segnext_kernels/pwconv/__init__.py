"""Fused pointwise (1x1) convolution with its epilogue: ``y = act(W x + bias + alpha * r)``, forward (inference).

Files: ``reference.py`` (the eager oracle, fallback and benchmark baseline), ``interface.py`` (argument checks, the
custom op with its fake, the public ``pwconv``), ``cpu.py`` (the C++ CPU backend). The fused blocks and head layers
of ``segnext_kernels/modules.py`` run it in eval mode. Each backend is registered below with the dtypes it takes.
"""
import torch

from ..backends import register_kernel
from .interface import ACTIVATIONS, pwconv
from .reference import pwconv_reference

register_kernel("pwconv", "cpu", "segnext_kernels.pwconv.cpu", (torch.float32, torch.bfloat16))

__all__ = ["ACTIVATIONS", "pwconv", "pwconv_reference"]

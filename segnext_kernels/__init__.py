"""segnext-kernels: fused Triton and CUDA kernels for SegNeXt (MSCA attention).

Public API:
    msca(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias, *, backend="auto")
    FusedMSCA, fuse_msca(model, backend="auto")
    msca_reference (the eager oracle), BACKENDS

Importing this package needs neither a GPU nor the CUDA extension; the extension is loaded (or built) lazily the
first time the "cuda" backend runs.
"""
from .backend import BACKENDS
from .modules import FusedMSCA, fuse_msca
from .msca_reference import msca_reference
from .ops import msca

__all__ = ["BACKENDS", "FusedMSCA", "fuse_msca", "msca", "msca_reference"]
__version__ = "0.1.0"

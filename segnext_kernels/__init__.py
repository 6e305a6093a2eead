"""segnext-kernels: fused Triton and CUDA kernels for SegNeXt (MSCA attention, NMF2D Hamburger).

Public API:
    msca(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias, *, backend="auto")
    FusedMSCA, fuse_msca(model, backend="auto") -> int
    nmf2d(x, bases, steps, *, grad="unrolled", eps=1e-6, inv_t=1.0, return_state=False, backend="auto")
    FusedNMF2D, fuse_ham(model, backend="auto") -> int
    fuse(model, backend="auto") -> {"msca": n, "ham": n}
    msca_reference (the eager MSCA oracle), BACKENDS

Importing this package needs neither a GPU, Triton nor the CUDA extension: Triton kernels are imported on first
use, and the extension is loaded (or built) lazily the first time the "cuda" backend runs.
"""
from .backend import BACKENDS
from .modules import FusedMSCA, fuse_msca
from .msca_reference import msca_reference
from .nmf import FusedNMF2D, fuse, fuse_ham, nmf2d
from .ops import msca

__all__ = ["BACKENDS", "FusedMSCA", "FusedNMF2D", "fuse", "fuse_ham", "fuse_msca", "msca", "msca_reference",
           "nmf2d"]
__version__ = "0.1.0"

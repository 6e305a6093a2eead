"""nn.Modules that drop into a SegNeXt model in place of the reference ones, keeping parameters and state_dict."""
from __future__ import annotations

import torch
from torch import nn

from .backend import BACKENDS
from .ops import msca

#: Submodule names of the official MSCA module (``AttentionModule``; mmseg's ``MSCAAttention`` uses the same).
MSCA_CONV_NAMES = ("conv0", "conv0_1", "conv0_2", "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3")
_MSCA_CLASS_NAMES = ("AttentionModule", "MSCAAttention")


class FusedMSCA(nn.Module):
    """Drop-in for ``segnext.AttentionModule`` (official ``mscan.py``) running ``segnext_kernels.msca``.

    Same submodules (conv0, conv0_1, conv0_2, conv1_1, conv1_2, conv2_1, conv2_2, conv3: nn.Conv2d with the official
    shapes) and therefore the same ``state_dict`` keys; checkpoints load unchanged either way.

    Args:
        dim: channels C.
        backend: "auto", "triton", "cuda" or "reference"; read at every forward, so it can be changed later.

    forward(x): x (B, C, H, W) -> (B, C, H, W), same dtype. Raises what ``segnext_kernels.msca`` raises.
    """

    def __init__(self, dim: int, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv0_1 = nn.Conv2d(dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.conv0_2 = nn.Conv2d(dim, dim, (7, 1), padding=(3, 0), groups=dim)
        self.conv1_1 = nn.Conv2d(dim, dim, (1, 11), padding=(0, 5), groups=dim)
        self.conv1_2 = nn.Conv2d(dim, dim, (11, 1), padding=(5, 0), groups=dim)
        self.conv2_1 = nn.Conv2d(dim, dim, (1, 21), padding=(0, 10), groups=dim)
        self.conv2_2 = nn.Conv2d(dim, dim, (21, 1), padding=(10, 0), groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 1)
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedMSCA":
        """A FusedMSCA sharing ``module``'s convolutions (the same Parameter objects, so optimizers keep working).

        Raises:
            TypeError: ``module`` lacks one of the official conv submodules.
        """
        missing = [n for n in MSCA_CONV_NAMES if not isinstance(getattr(module, n, None), nn.Conv2d)]
        if missing:
            raise TypeError(f"module: expected an MSCA module with nn.Conv2d submodules {MSCA_CONV_NAMES}, "
                            f"{type(module).__name__} lacks {missing}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for n in MSCA_CONV_NAMES:
            setattr(fused, n, getattr(module, n))
        fused.backend = backend
        fused.train(module.training)
        return fused

    def extra_repr(self) -> str:
        return f"dim={self.conv0.in_channels}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = [getattr(self, n) for n in MSCA_CONV_NAMES[1:7]]
        return msca(x, self.conv0.weight, self.conv0.bias, [c.weight for c in convs], [c.bias for c in convs],
                    self.conv3.weight, self.conv3.bias, backend=self.backend)


def _is_msca(module: nn.Module) -> bool:
    return type(module).__name__ in _MSCA_CLASS_NAMES and all(hasattr(module, n) for n in MSCA_CONV_NAMES)


def fuse_msca(model: nn.Module, backend: str = "auto") -> int:
    """Swap every MSCA module (``segnext.AttentionModule``, or mmseg's ``MSCAAttention``) inside ``model`` for a
    ``FusedMSCA`` sharing its weights, in place. ``model.state_dict()`` keys and values are unchanged.

    Returns:
        the number of modules swapped (0 when ``model`` has none, or is itself an MSCA module: wrap it, or use
        ``FusedMSCA.from_module``).

    Raises:
        ValueError: unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return swap_modules(model, _is_msca, lambda m: FusedMSCA.from_module(m, backend=backend))


def swap_modules(model: nn.Module, match, make) -> int:
    """Replace, in place, every submodule ``m`` of ``model`` with ``match(m)`` true by ``make(m)``; returns the count.
    (``model`` itself is never replaced.) Shared by ``fuse_msca`` and ``fuse_ham``."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
                swapped += 1
    return swapped

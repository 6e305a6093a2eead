"""Pure-PyTorch reference implementation of SegNeXt (Guo et al., NeurIPS 2022).

Module tree, forward order, configs and state_dict keys follow the official
Visual-Attention-Network/SegNeXt code (see ``docs/reference_model.md``).
"""
from . import config
from .checkpoint import CheckpointError, LoadReport, load_checkpoint, read_state_dict
from .ham_head import (ConvModule, Hamburger, LightHamHead, NMF2D,
                       nmf_bases_update, nmf_coef_update)
from .mscan import (MSCAN, AttentionModule, Block, DropPath, Mlp, OverlapPatchEmbed,
                    SpatialAttention, StemConv, mscan_b, mscan_l, mscan_s, mscan_t)
from .segmentor import LogitsResize, SegNeXt, segnext_b, segnext_l, segnext_s, segnext_t

__all__ = [
    "MSCAN", "StemConv", "OverlapPatchEmbed", "AttentionModule", "SpatialAttention", "Mlp",
    "Block", "DropPath", "mscan_t", "mscan_s", "mscan_b", "mscan_l",
    "ConvModule", "NMF2D", "Hamburger", "LightHamHead", "nmf_coef_update",
    "nmf_bases_update",
    "SegNeXt", "LogitsResize", "segnext_t", "segnext_s", "segnext_b", "segnext_l",
    "load_checkpoint", "read_state_dict", "LoadReport", "CheckpointError",
]

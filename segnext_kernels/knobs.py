"""Tuning and test knobs of the kernels, read from the environment once, when the package is imported.

``KNOBS`` (a frozen ``Knobs``) is built by ``Knobs.from_env()`` at import; changing the environment afterwards changes
nothing. The backends read the module attribute ``knobs.KNOBS`` at each call and pass its values to the compiled
functions as arguments (no compiled code reads the environment), so a test replaces it for one test with
``monkeypatch.setattr(knobs, "KNOBS", dataclasses.replace(knobs.KNOBS, msca_cuda_dw="fma"))``. The forward and the
backward of one MSCA call take the depthwise variant from the same ``KNOBS``: keep it unchanged between them.

CUDA backend (``msca/cuda.py``, ``nmf/cuda.py``; defaults = automatic / off):

``SEGNEXT_MSCA_CUDA_TILE`` (``msca_cuda_tile``, int, -1 = automatic)
    Force the tile configuration of the MSCA forward (an index in the extension's ``tile_table()``, 0..5; see
    ``csrc/msca/msca_fwd.cu``). A configuration that does not fit the device's shared memory is an error.
``SEGNEXT_MSCA_CUDA_TILE_BWD`` (``msca_cuda_tile_bwd``, int, -1 = automatic)
    The same for the backward's mix kernel.
``SEGNEXT_MSCA_CUDA_DW`` (``msca_cuda_dw``, ``auto`` | ``tc`` | ``fma``, default ``auto``)
    The depthwise part of the MSCA forward and of the backward's recompute: tensor cores (``tc``, fp16/bf16 only;
    ``csrc/msca/msca_depthwise_mma.cuh``), fp32 FMA (``fma``), or tensor cores for fp16/bf16 where a tile allows it
    (``auto``). Kept as given; the cuda backend raises ValueError naming the variable for another value.
``SEGNEXT_MSCA_CUDA_CL_DIRECT=1`` (``msca_cuda_cl_direct``, bool)
    channels_last u: the depthwise tile loads read u in place instead of an NCHW copy.
``SEGNEXT_MSCA_CUDA_POISON=1`` (``msca_cuda_poison``, bool)
    Fill the MSCA outputs, gradients and workspaces with NaN before each launch (tests: an unwritten element shows).
``SEGNEXT_NMF_P`` (``nmf_cuda_p``, int, 0 = automatic)
    Force the CTAs per sample of the NMF2D pass kernels (clamped to [1, number of N-tiles]).
``SEGNEXT_NMF_MTW`` (``nmf_cuda_mtw``, 0, 1 or 2; 0 = automatic)
    Force the tile width of the NMF2D forward pass kernel (the backward always uses 1).

CPU backend (tiling plans of the CPU kernels, ``""`` = automatic; handed to the extension once, when it loads:
``apply_cpu_knobs``; syntax in ``csrc/cpu/cpu_plans.h``):

``SEGNEXT_MSCA_FWD_PLAN`` (``msca_cpu_fwd_plan``): ``band:<n>`` | ``two:<images per group>``;
``SEGNEXT_MLP_PLAN`` (``mlp_cpu_plan``), ``SEGNEXT_MLP_BWD_PLAN`` (``mlp_cpu_bwd_plan``):
``<pixels per band>:<hidden block>[:<groups>]``. Tests set them through the extension's ``set_plan_override``.

``SEGNEXT_CPU_OUTPUT_CACHE_MIB`` (``cpu_output_cache_mib``, int >= 0, default 512)
    MiB of idle big-output mappings the CPU extension may keep resident between calls (``csrc/cpu/resize_cpu.h``):
    the final 150-class logits of SegNeXt at 512x512 (150 MiB) are then written into pages faulted in by the previous
    call instead of fresh ones. 0 = no cache: the process holds ~150 MiB less between calls and each call pays the
    page faults again (docs/kernels.md, "Memory", has the measured figures). Handed over by ``apply_cpu_knobs``.

Booleans take 1/0, true/false, yes/no, on/off (an empty or unset variable is the default); a value that does not
parse raises ValueError naming the variable when the package is imported.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

__all__ = ["Knobs", "KNOBS", "apply_cpu_knobs"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    v = environ.get(name, "").strip()
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {v!r}") from None


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    v = environ.get(name, "").strip().lower()
    if not v:
        return default
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}: expected 1 or 0 (or true/false, yes/no, on/off), got {v!r}")


def _str(environ: Mapping[str, str], name: str, default: str) -> str:
    return environ.get(name, "").strip() or default


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The knobs (module docstring: one environment variable each)."""

    msca_cuda_tile: int = -1
    msca_cuda_tile_bwd: int = -1
    msca_cuda_dw: str = "auto"
    msca_cuda_cl_direct: bool = False
    msca_cuda_poison: bool = False
    nmf_cuda_p: int = 0
    nmf_cuda_mtw: int = 0
    msca_cpu_fwd_plan: str = ""
    mlp_cpu_plan: str = ""
    mlp_cpu_bwd_plan: str = ""
    cpu_output_cache_mib: int = 512

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Knobs":
        """The knobs set in ``environ`` (unset or empty variables give the defaults).

        Raises:
            ValueError: a variable that does not parse (names it), ``SEGNEXT_NMF_MTW`` other than 0, 1, 2, or a
                negative ``SEGNEXT_NMF_P`` or ``SEGNEXT_CPU_OUTPUT_CACHE_MIB``.
        """
        mtw = _int(environ, "SEGNEXT_NMF_MTW", 0)
        if mtw not in (0, 1, 2):
            raise ValueError(f"SEGNEXT_NMF_MTW: expected 0 (automatic), 1 or 2, got {mtw}")
        p = _int(environ, "SEGNEXT_NMF_P", 0)
        if p < 0:
            raise ValueError(f"SEGNEXT_NMF_P: expected 0 (automatic) or a positive count, got {p}")
        cache = _int(environ, "SEGNEXT_CPU_OUTPUT_CACHE_MIB", 512)
        if cache < 0:
            raise ValueError(f"SEGNEXT_CPU_OUTPUT_CACHE_MIB: expected 0 (no cache) or a positive number of MiB, "
                             f"got {cache}")
        return cls(
            msca_cuda_tile=_int(environ, "SEGNEXT_MSCA_CUDA_TILE", -1),
            msca_cuda_tile_bwd=_int(environ, "SEGNEXT_MSCA_CUDA_TILE_BWD", -1),
            msca_cuda_dw=_str(environ, "SEGNEXT_MSCA_CUDA_DW", "auto"),
            msca_cuda_cl_direct=_bool(environ, "SEGNEXT_MSCA_CUDA_CL_DIRECT", False),
            msca_cuda_poison=_bool(environ, "SEGNEXT_MSCA_CUDA_POISON", False),
            nmf_cuda_p=p,
            nmf_cuda_mtw=mtw,
            msca_cpu_fwd_plan=_str(environ, "SEGNEXT_MSCA_FWD_PLAN", ""),
            mlp_cpu_plan=_str(environ, "SEGNEXT_MLP_PLAN", ""),
            mlp_cpu_bwd_plan=_str(environ, "SEGNEXT_MLP_BWD_PLAN", ""),
            cpu_output_cache_mib=cache,
        )


#: read once, when the package is imported (tests replace it with ``dataclasses.replace``; module docstring)
KNOBS = Knobs.from_env()


def apply_cpu_knobs(ext, knobs: "Knobs | None" = None) -> None:
    """Hand the CPU knobs of ``knobs`` (default ``KNOBS``: the tiling-plan overrides and the output-cache limit) to
    the CPU extension module ``ext`` (``segnext_kernels._C_cpu``; ``extension.CPU_EXTENSION`` calls this once, when it
    loads)."""
    k = KNOBS if knobs is None else knobs
    for which, value in enumerate((k.msca_cpu_fwd_plan, k.mlp_cpu_plan, k.mlp_cpu_bwd_plan)):
        ext.set_plan_override(which, value)
    ext.set_output_cache_limit(k.cpu_output_cache_mib << 20)

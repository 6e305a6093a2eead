"""The "cuda" backend of NMF2D: hand-written CUDA kernels (``csrc/nmf/``) driven by ``nmf/driver.py`` exactly as the
Triton kernels are.

The kernels live in the same extension as the CUDA MSCA kernels (``segnext_kernels._C``, loaded or JIT-built lazily
by ``extension.CUDA_EXTENSION``); importing this module builds nothing. The extension's launchers (``nmf_geom``,
``nmf_bases``, ``nmf_coef``, ``nmf_bwd_stage``, ``nmf_gx``) are internal: they run inside the custom ops
``torch.ops.segnext_kernels.nmf2d_fwd / nmf2d_bwd`` (``nmf/interface.py``), which own the fake implementations
and the autograd registration, so ``torch.compile`` never sees them.

Dtypes: x in float32, float16 or bfloat16 (updates in fp32); float64 is not supported here (use "triton" or
"reference"). The products with x (and the R x R products of the pass kernels) run on bf16 tensor cores over split
"pieces" (``csrc/nmf_common.cuh``): bf16 x is one exact piece and the fp32 operand two (2 mma, relative error about
2^-17); fp16 x is two exact bf16 pieces (3 mma); fp32 x three pieces each (6 mma, about fp32 accuracy), or two when
``torch.backends.cuda.matmul.allow_tf32`` is set (3 mma, about 2^-17: more accurate than TF32). Deterministic:
per-CTA partials reduced in a fixed order.

Knobs (``segnext_kernels.knobs``, read from the environment once at import): ``config`` passes
``knobs.KNOBS.nmf_cuda_p`` / ``nmf_cuda_mtw`` (0 = automatic) to ``nmf_geom``, read at each call.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import knobs
from ..extension import CUDA_EXTENSION

__all__ = ["CudaKernels", "KERNELS", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _empty(*shape, dtype, device):
    """Every buffer handed to a CUDA NMF kernel comes from here (tests poison them with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _ext():
    return CUDA_EXTENSION.load()


class CudaKernels:
    """The CUDA backend's kernels object for ``nmf/driver.py`` (see its docstring for the methods' semantics)."""

    name = "cuda"

    @staticmethod
    def acc_dtype(dtype: torch.dtype) -> torch.dtype:
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"x: the cuda NMF2D backend supports float32, float16 and bfloat16, got {dtype}; use "
                            "backend='triton' or backend='reference' for it")
        return torch.float32

    @staticmethod
    def empty(*shape, dtype, device):
        return _empty(*shape, dtype=dtype, device=device)

    @staticmethod
    def config(B, D, N, R, device, dtype, backward):
        probe = torch.empty((1, 1, 1), dtype=dtype, device=device)  # carries device and dtype to the C++ side
        k = knobs.KNOBS
        RP, BN, T, P, work = _ext().nmf_geom(B, D, N, R, probe, bool(backward), p_override=k.nmf_cuda_p,
                                             mtw_override=k.nmf_cuda_mtw)
        return SimpleNamespace(RP=int(RP), BN=int(BN), T=int(T), P=int(P), work_floats=int(work))

    @staticmethod
    def gram(cfg, bases, G):
        _ext().nmf_bases(bases, None, G, None, None, None, None, None, 1.0, cfg.P, cfg.work_floats, False, False)

    @staticmethod
    def bases_update(cfg, bin, bout, G, pxc, pcc, E, H, eps, store_eh, work):
        _ext().nmf_bases(bin, bout, G, pxc, pcc, E, H, work, float(eps), cfg.P, cfg.work_floats, True,
                         bool(store_eh))

    @staticmethod
    def coef(cfg, x, bases, G, cin, cout, c0, pxc, pcc, y, eps, inv_t, *, init, store_c0, accum, recon):
        _ext().nmf_coef(x, bases, G, cin, cout, c0, pxc, pcc, y, float(eps), float(inv_t), cfg.P, cfg.BN,
                        bool(init), bool(store_c0), bool(accum), bool(recon))

    @staticmethod
    def bwd_stage(cfg, x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg, eps, inv_t, *,
                  final, init, store_gc, store_ga):
        if gy is not None and gy.dtype != x.dtype:
            gy = gy.to(x.dtype)
        _ext().nmf_bwd_stage(x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg, float(eps),
                             float(inv_t), cfg.P, cfg.BN, bool(final), bool(init), bool(store_gc), bool(store_ga))

    @staticmethod
    def gx(cfg, l1, r1, m1, l2, r2, m2, gx):
        _ext().nmf_gx(l1, r1, int(m1), l2, r2, int(m2), gx)


KERNELS = CudaKernels()


"""Orchestration of the fused NMF2D, shared by the Triton and the CUDA backends.

The math, the kernels' roles and the saved tensors are described in ``nmf/triton.py``'s module docstring; the CUDA
kernels (``csrc/nmf_fwd.cu``, ``csrc/nmf_bwd.cu``, interface ``csrc/nmf_params.h``) have the same roles and buffers.
This module runs the K steps and the backward stages by calling a backend's kernels object (``nmf/triton.py: KERNELS``,
``nmf/cuda.py: KERNELS``), which provides:

``config(B, D, N, R, device, dtype, backward)`` -> cfg with attributes ``RP`` (padded rank), ``P`` (programs per
    sample of the pass kernels: the partial buffers are (B, P, ...)) and ``work_floats`` (fp32 workspace of
    ``bases_update``, may be 0).
``empty(*shape, dtype, device)``: every buffer handed to a kernel comes from here (tests poison them with NaN).
``gram(cfg, bases, G)``: G = B^T B (padded (B, RP, RP)).
``bases_update(cfg, bin, bout, G, pxc, pcc, E, H, eps, store_eh, work)``: H = sum_p pcc, E = sum_p pxc,
    B_out = B_in E / (B_in H + eps), G = B_out^T B_out (E, H stored when store_eh).
``coef(cfg, x, bases, G, cin, cout, c0, pxc, pcc, y, eps, inv_t, *, init, store_c0, accum, recon)``: one coef
    update over all N-tiles (init: softmax init folded in), with the bases-update partials (accum) or the
    reconstruction (recon).
``bwd_stage(cfg, x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg, eps, inv_t, *, final, init,
    store_gc, store_ga)``: backward of one coef update over all N-tiles.
``gx(cfg, l1, r1, m1, l2, r2, m2, gx)``: g_X = sum_m L1[m] R1[m]^T + sum_m L2[m] R2[m]^T.
``acc_dtype(dtype)``: the compute dtype for input dtype ``dtype``.

Unused tensor arguments are None. The driver assumes validated arguments (``segnext_kernels.nmf.nmf2d`` validates).
"""
from __future__ import annotations

import torch

__all__ = ["nmf_forward", "nmf_backward"]


def nmf_forward(kern, x: torch.Tensor, bases0: torch.Tensor, steps: int, eps: float, inv_t: float, save=None):
    """Fused NMF2D forward on backend ``kern``.

    Args:
        x: (B, D, N) in a dtype the backend supports, any strides, B, D, N >= 1.
        bases0: (B, D, R) contiguous, in the compute dtype (``kern.acc_dtype(x.dtype)``), on x's device.
        steps: K >= 0. eps > 0. inv_t: softmax inverse temperature.
        save: None, "one_step" or "unrolled": what the backward of that grad mode needs.

    Returns:
        (y (B, D, N) in x's dtype, contiguous; bases_K (B, D, R); coef_F (B, N, R); saved: dict of tensors for
        ``nmf_backward`` (empty when ``save`` is None)).
    """
    B, D, N = x.shape
    R = bases0.shape[-1]
    K = int(steps)
    dev = x.device
    acc_t = kern.acc_dtype(x.dtype)
    cfg = kern.config(B, D, N, R, dev, x.dtype, False)
    RP = cfg.RP
    empty = kern.empty
    unrolled = save == "unrolled"

    bases_h = empty(K + 1, B, D, R, dtype=acc_t, device=dev)
    bases_h[0].copy_(bases0)
    G_h = empty(K + 1, B, RP, RP, dtype=acc_t, device=dev)
    if unrolled:
        C_h = empty(K + 2, B, N, R, dtype=acc_t, device=dev)
        cslot = lambda i: C_h[i]  # noqa: E731
        coef_f = C_h[K + 1]
        E_h = empty(max(K, 1), B, D, R, dtype=acc_t, device=dev)
        H_h = empty(max(K, 1), B, RP, RP, dtype=acc_t, device=dev)
    else:
        pp = [empty(B, N, R, dtype=acc_t, device=dev) for _ in range(2 if K > 0 else 1)]
        cslot = lambda i: pp[i % len(pp)]  # noqa: E731
        coef_f = empty(B, N, R, dtype=acc_t, device=dev)
        E_h = H_h = None
    y = empty(B, D, N, dtype=x.dtype, device=dev)
    pxc = pcc = work = None
    if K > 0:
        pxc = empty(B, cfg.P, D, RP, dtype=acc_t, device=dev)
        pcc = empty(B, cfg.P, RP, RP, dtype=acc_t, device=dev)
        if cfg.work_floats:
            work = empty(cfg.work_floats, dtype=acc_t, device=dev)

    kern.gram(cfg, bases_h[0], G_h[0])
    for k in range(K):
        kern.coef(cfg, x, bases_h[k], G_h[k], cslot(k) if k else None, cslot(k + 1),
                  cslot(0) if unrolled else None, pxc, pcc, None, eps, inv_t,
                  init=k == 0, store_c0=unrolled and k == 0, accum=True, recon=False)
        kern.bases_update(cfg, bases_h[k], bases_h[k + 1], G_h[k + 1], pxc, pcc,
                          E_h[k] if unrolled else None, H_h[k] if unrolled else None, eps, unrolled, work)
    c0_final = K == 0 and save is not None
    kern.coef(cfg, x, bases_h[K], G_h[K], cslot(K) if K else None, coef_f, cslot(0) if c0_final else None,
              None, None, y, eps, inv_t, init=K == 0, store_c0=c0_final, accum=False, recon=True)

    saved = {}
    if unrolled:
        saved = dict(bases=bases_h, G=G_h, C=C_h, E=E_h[:K], H=H_h[:K])
    elif save == "one_step":
        saved = dict(bases=bases_h[K:], G=G_h[K:], C=torch.stack([cslot(K), coef_f]))
    return y, bases_h[K], coef_f, saved


def _pad_rr(m: torch.Tensor, RP: int) -> torch.Tensor:
    R = m.shape[-1]
    return torch.nn.functional.pad(m, (0, RP - R, 0, RP - R)).contiguous()


def nmf_backward(kern, grad_y, grad_bases, grad_coef, x, saved, mode: str, steps: int, eps: float, inv_t: float,
                 need_x: bool, need_bases: bool):
    """Fused NMF2D backward on backend ``kern``.

    Args:
        grad_y: (B, D, N) gradient of the reconstruction in x's dtype, any strides, or None (zero).
        grad_bases: (B, D, R) gradient of the returned final bases, or None. grad_coef: (B, N, R) of the returned
            final coef, or None.
        x: the forward's x. saved: ``nmf_forward``'s ``saved`` for the same ``mode`` ("unrolled" or "one_step").
        need_x / need_bases: which gradients to return.

    Returns:
        (g_x (B, D, N) in x's dtype or None, g_bases0 (B, D, R) in the compute dtype or None). In "one_step" mode
        g_bases0 is None unless steps == 0 (the K steps are constants there).
    """
    B, D, N = x.shape
    bases_h, G_h, C_h = saved["bases"], saved["G"], saved["C"]
    R = bases_h.shape[-1]
    K = int(steps)
    dev = x.device
    acc_t = kern.acc_dtype(x.dtype)
    cfg = kern.config(B, D, N, R, dev, x.dtype, True)
    RP = cfg.RP
    empty = kern.empty
    unrolled = mode == "unrolled"
    chain = unrolled and K > 0 and (need_x or need_bases)
    want_b = need_bases and (unrolled or K == 0)
    if not (need_x or want_b):
        return None, None

    n_stage = K + 1 if unrolled else 1
    gA_h = empty(n_stage, B, N, R, dtype=acc_t, device=dev) if need_x else None
    gE_h = empty(K, B, D, R, dtype=acc_t, device=dev) if (need_x and unrolled and K > 0) else None
    pxg = empty(B, cfg.P, D, RP, dtype=acc_t, device=dev)
    pgy = empty(B, cfg.P, D, RP, dtype=acc_t, device=dev) if grad_y is not None else None
    pgg = empty(B, cfg.P, RP, RP, dtype=acc_t, device=dev)
    gcs = [empty(B, N, R, dtype=acc_t, device=dev) for _ in range(2)] if chain else [None, None]
    if grad_coef is not None:
        grad_coef = grad_coef.to(acc_t).contiguous()

    def partial_sum(part):
        return part.sum(1)[..., :R]

    def bases_grad_tail(bk, extra):
        gG = partial_sum(pgg)[:, :R, :]
        g = partial_sum(pxg) + torch.bmm(bk, gG + gG.transpose(1, 2))
        return g if extra is None else g + extra

    # final stage: C_F = C_K A_K / (C_K G_K + eps), Y = B_K C_F^T
    iK = K if unrolled else 0
    bK, GK, cK, cF = bases_h[iK], G_h[iK], C_h[iK], C_h[iK + 1]
    kern.bwd_stage(cfg, x, grad_y, bK, None, cF, grad_coef, None, cK, GK, gcs[0] if chain else None,
                   gA_h[n_stage - 1] if need_x else None, pxg, pgy, pgg, eps, inv_t,
                   final=True, init=unrolled and K == 0, store_gc=chain, store_ga=need_x)
    gB = None
    if chain or want_b:
        extra = partial_sum(pgy) if grad_y is not None else None
        if grad_bases is not None and (unrolled or K == 0):
            gbk = grad_bases.to(acc_t)
            extra = gbk if extra is None else extra + gbk
        gB = bases_grad_tail(bK, extra)

    if chain:
        for j in range(K - 1, -1, -1):
            b, bn, e, H = bases_h[j], bases_h[j + 1], saved["E"][j], saved["H"][j][:, :R, :R]
            # bases update B_{j+1} = b * e / (b H + eps): its backward on the small (D, R) / (R, R) tensors
            pden = torch.bmm(b, H) + eps
            ge = gB * b / pden
            gp = -gB * bn / pden
            gb_direct = gB * e / pden + torch.bmm(gp, H.transpose(1, 2))
            gH = torch.bmm(b.transpose(1, 2), gp)
            S = _pad_rr(gH + gH.transpose(1, 2), RP)
            ge = ge.contiguous()
            if gE_h is not None:
                gE_h[j].copy_(ge)
            kern.bwd_stage(cfg, x, None, b, ge, C_h[j + 1], gcs[(K - 1 - j) % 2], S, C_h[j], G_h[j],
                           gcs[(K - j) % 2] if j > 0 else None, gA_h[j] if need_x else None, pxg, pgy, pgg,
                           eps, inv_t, final=False, init=j == 0, store_gc=j > 0, store_ga=need_x)
            gB = bases_grad_tail(b, gb_direct)

    gx = None
    if need_x:
        gx = empty(B, D, N, dtype=x.dtype, device=dev)
        if unrolled:
            l1, r1, m1 = bases_h, gA_h, K + 1
            l2, r2, m2 = (gE_h, C_h[1:K + 1], K) if K > 0 else (None, None, 0)
        else:
            l1, r1, m1 = bases_h, gA_h, 1
            l2, r2, m2 = None, None, 0
        kern.gx(cfg, l1, r1, m1, l2, r2, m2, gx)
    return gx, (gB if want_b else None)

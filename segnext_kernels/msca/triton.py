"""Fused MSCA in Triton: one-launch forward, three-kernel backward.

Math and reference: ``msca/reference.py`` (official ``AttentionModule``, SegNeXt section 3.1).
Weights arrive packed by ``msca.reference.pack_weights``: w0 (C, 25), b0 (C,), ws (C, 78), bs (C, 6), w3 (C, C),
b3 (C,), float32 (float64 for float64 inputs).

Forward (``_msca_fwd_kernel``), one program per spatial tile (TH x TW pixels of one image), persistent over tiles:
  phase A, per block of BLOCK_C channels:
    a   = dw5x5(u) on the tile grown by 10 pixels (zero outside the image)      -> per-program scratch
    h_k = dw_1xk(a) on the tile rows grown by 10 (zero outside the image)       -> per-program scratch
    s   = a + sum_k dw_kx1(h_k) on the tile                                     -> per-program scratch (all C)
  phase B: out[co] = (sum_ci w3[co, ci] s[ci] + b3[co]) * u[co] as tl.dot over channel blocks, BLOCK_P pixels of
    the tile at a time.
  u is read from global memory (halo re-reads hit L1/L2) and out is written once. Triton cannot shift a register
  tile, so the chained depthwise convs stage their intermediates in a small per-program scratch buffer behind
  ``tl.debug_barrier()`` (docs/kernels.md, "Traps").

Backward (g = dL/dout):
  ``_msca_bwd_mix_kernel``: recompute s per tile -> S; att = w3 s + b3; d_att = g u -> DATT; du_gate = g att -> DUG;
      d_s = w3^T d_att -> DS (all fp32, (B, C, H, W) contiguous).
  ``_msca_bwd_w3_kernel``: dw3 = sum d_att s^T, db3 = sum d_att: split-K partials over (B, H*W), summed in a fixed
      order afterwards (deterministic).
  ``_msca_bwd_dw_kernel``: recompute a, h_k; d_h_k = dw_kx1^T(d_s); d_a = d_s + sum_k dw_1xk^T(d_h_k);
      du = du_gate + dw5x5^T(d_a); per-tile partials of every depthwise weight and bias gradient, summed in a fixed
      order afterwards (deterministic).
Accumulation is fp32 (fp64 for fp64 inputs). Under TRITON_INTERPRET=1 the same kernels run on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import STRIP_OFFSETS

#: Triton decides at decoration time whether kernels are interpreted; mirror that decision here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Layout of the per-tile depthwise-gradient partials: dw0 (25) | dws (78) | db0 (1) | dbs (6).
_DW0, _DWS, _DB0, _DBS, _NPART = 0, 25, 103, 104, 110


# ----------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_img(ptr, base, c_off, y, x, valid, H, W, sH, sW, ACC: tl.constexpr):
    """Load ptr[base + c_off + y*sH + x*sW] for a [BLOCK_C, P] tile, zero outside the image.

    c_off must address existing channels: callers clamp the channel index to C - 1 (``_clamp_c``) instead of masking
    it, and never store the rows of channels >= C. The mask is then per pixel, shared by the BLOCK_C rows: a 2-D
    mask costs one predicate per element (32 per thread for a [4, 2048] tile), registers and instructions."""
    m = valid & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    off = y.to(tl.int64) * sH + x.to(tl.int64) * sW
    return tl.load(ptr + base + c_off[:, None] + off[None, :], mask=m[None, :], other=0.0).to(ACC)


@triton.jit
def _clamp_c(c_idx, C):
    """Channel indices clamped to C - 1, as int64 (for ``_load_img`` offsets)."""
    return tl.minimum(c_idx, C - 1).to(tl.int64)


@triton.jit
def _opaque_zero(v):
    """0 for any v >= 0 (an image size), as a value the compilers cannot fold to a constant. Added to the trip count
    of a short tap loop it keeps ptxas from unrolling the loop completely and issuing the loads of every tap at
    once (it then unrolls by 4 with a remainder loop): fully unrolled, the vertical-strip taps of ``_stage_s`` held
    150+ registers of loads and weights in the forward (and the horizontal ones, on the small [2, 512] tiles of the
    backward, likewise), and ptxas spilled the long-lived values around them. (v may be a constexpr: the JIT turns
    an argument equal to 1 into one; the loops are then simply unrolled.)"""
    return ((tl.zeros((), tl.int32) + v) < 0).to(tl.int32)


@triton.jit
def _hstrip(a_scr, h_scr, ws_ptr, bs_ptr, c_idx, cmask, lc, yh, inside_h, rh, ch, nz,
            K: tl.constexpr, WOFF: tl.constexpr, BIDX: tl.constexpr,
            TW: tl.constexpr, AW: tl.constexpr, PA: tl.constexpr, PH: tl.constexpr, BLOCK_C: tl.constexpr,
            ACC: tl.constexpr):
    """h = dw_1xK(a) + bias on the H-region (tile rows +-10, tile columns); zero outside the image."""
    P: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_C, PH], ACC)
    for j in range(K + nz):
        w = tl.load(ws_ptr + c_idx * 78 + WOFF + j, mask=cmask, other=0.0).to(ACC)
        src = rh * AW + ch + (10 + j - P)
        acc += w[:, None] * tl.load(a_scr + lc[:, None] * PA + src[None, :], mask=inside_h[None, :], other=0.0)
    b = tl.load(bs_ptr + c_idx * 6 + BIDX, mask=cmask, other=0.0).to(ACC)
    h = tl.where(inside_h[None, :], acc + b[:, None], 0.0)
    tl.store(h_scr + lc[:, None] * PH + tl.arange(0, PH)[None, :], h)


@triton.jit
def _stage_a_h(u_ptr, ub, c_idx, cmask, lc, w0_ptr, b0_ptr, ws_ptr, bs_ptr, a_scr, h_scr,
               y0, x0, C, H, W, sC, sH, sW,
               TH: tl.constexpr, TW: tl.constexpr, PA: tl.constexpr, PH: tl.constexpr, BLOCK_C: tl.constexpr,
               ACC: tl.constexpr):
    """Phase A, first half: a on the A-region and the three h_k on the H-region, into scratch.

    A-region: rows [y0-10, y0+TH+10), cols [x0-10, x0+TW+10), flattened row-major with row length AW = TW + 20.
    H-region: rows [y0-10, y0+TH+10), cols [x0, x0+TW), row length TW. Both zero outside the image.
    """
    AW: tl.constexpr = TW + 20
    AH: tl.constexpr = TH + 20
    c_off = _clamp_c(c_idx, C) * sC
    pa = tl.arange(0, PA)
    ya = y0 - 10 + pa // AW
    xa = x0 - 10 + pa % AW
    va = pa < AH * AW
    acc = tl.zeros([BLOCK_C, PA], ACC)
    for t in range(25):
        w = tl.load(w0_ptr + c_idx * 25 + t, mask=cmask, other=0.0).to(ACC)
        acc += w[:, None] * _load_img(u_ptr, ub, c_off, ya + (t // 5 - 2), xa + (t % 5 - 2), va,
                                      H, W, sH, sW, ACC)
    b = tl.load(b0_ptr + c_idx, mask=cmask, other=0.0).to(ACC)
    inside_a = va & (ya >= 0) & (ya < H) & (xa >= 0) & (xa < W)
    a = tl.where(inside_a[None, :], acc + b[:, None], 0.0)
    tl.store(a_scr + lc[:, None] * PA + pa[None, :], a)
    tl.debug_barrier()

    ph = tl.arange(0, PH)
    rh = ph // TW
    ch = ph % TW
    yh = y0 - 10 + rh
    xh = x0 + ch
    inside_h = (ph < AH * TW) & (yh >= 0) & (yh < H) & (xh < W)
    nz = _opaque_zero(H)
    _hstrip(a_scr, h_scr, ws_ptr, bs_ptr, c_idx, cmask, lc, yh, inside_h, rh, ch, nz,
            7, 0, 0, TW, AW, PA, PH, BLOCK_C, ACC)
    _hstrip(a_scr, h_scr + BLOCK_C * PH, ws_ptr, bs_ptr, c_idx, cmask, lc, yh, inside_h, rh, ch, nz,
            11, 14, 2, TW, AW, PA, PH, BLOCK_C, ACC)
    _hstrip(a_scr, h_scr + 2 * BLOCK_C * PH, ws_ptr, bs_ptr, c_idx, cmask, lc, yh, inside_h, rh, ch, nz,
            21, 36, 4, TW, AW, PA, PH, BLOCK_C, ACC)


@triton.jit
def _vstrip(h_scr, ws_ptr, bs_ptr, c_idx, cmask, lc, ro, co, vo, nz,
            K: tl.constexpr, WOFF: tl.constexpr, BIDX: tl.constexpr,
            TW: tl.constexpr, PH: tl.constexpr, PO: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """v = dw_Kx1(h) + bias on the tile, h read from the H-region scratch. nz: an ``_opaque_zero``."""
    P: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_C, PO], ACC)
    for i in range(K + nz):
        w = tl.load(ws_ptr + c_idx * 78 + WOFF + i, mask=cmask, other=0.0).to(ACC)
        src = (ro + 10 + i - P) * TW + co
        acc += w[:, None] * tl.load(h_scr + lc[:, None] * PH + src[None, :], mask=vo[None, :], other=0.0)
    b = tl.load(bs_ptr + c_idx * 6 + BIDX, mask=cmask, other=0.0).to(ACC)
    return acc + b[:, None]


@triton.jit
def _stage_s(a_scr, h_scr, ws_ptr, bs_ptr, c_idx, cmask, lc, nz,
             TH: tl.constexpr, TW: tl.constexpr, PA: tl.constexpr, PH: tl.constexpr, PO: tl.constexpr,
             BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Phase A, second half: s = a + v_7 + v_11 + v_21 on the TH x TW tile, as a [BLOCK_C, PO] tensor."""
    AW: tl.constexpr = TW + 20
    po = tl.arange(0, PO)
    ro = po // TW
    co = po % TW
    vo = po < TH * TW
    s = tl.load(a_scr + lc[:, None] * PA + ((ro + 10) * AW + co + 10)[None, :], mask=vo[None, :], other=0.0)
    s += _vstrip(h_scr, ws_ptr, bs_ptr, c_idx, cmask, lc, ro, co, vo, nz, 7, 7, 1, TW, PH, PO, BLOCK_C, ACC)
    s += _vstrip(h_scr + BLOCK_C * PH, ws_ptr, bs_ptr, c_idx, cmask, lc, ro, co, vo, nz, 11, 25, 3,
                 TW, PH, PO, BLOCK_C, ACC)
    s += _vstrip(h_scr + 2 * BLOCK_C * PH, ws_ptr, bs_ptr, c_idx, cmask, lc, ro, co, vo, nz, 21, 57, 5,
                 TW, PH, PO, BLOCK_C, ACC)
    return s


@triton.jit
def _phase_s(u_ptr, ub, w0_ptr, b0_ptr, ws_ptr, bs_ptr, a_scr, h_scr, dst_ptr, dst_cstride, dst_pix, dst_mask,
             C, y0, x0, H, W, sC, sH, sW,
             TH: tl.constexpr, TW: tl.constexpr, PA: tl.constexpr, PH: tl.constexpr, PO: tl.constexpr,
             BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Phase A for every channel of a tile: s -> dst[c * dst_cstride + dst_pix], in blocks of BLOCK_C channels."""
    lc = tl.arange(0, BLOCK_C)
    # disable_licm: the region index vectors, masks and scratch pointers, the same for every channel block, are
    # recomputed per block (a few integer instructions per pixel, next to 103 taps) instead of being hoisted out of
    # this loop and held in registers through the whole tile, phase B included
    for c0 in tl.range(0, C, BLOCK_C, disable_licm=True):
        c_idx = c0 + lc
        cmask = c_idx < C
        _stage_a_h(u_ptr, ub, c_idx, cmask, lc, w0_ptr, b0_ptr, ws_ptr, bs_ptr, a_scr, h_scr,
                   y0, x0, C, H, W, sC, sH, sW, TH, TW, PA, PH, BLOCK_C, ACC)
        tl.debug_barrier()
        s = _stage_s(a_scr, h_scr, ws_ptr, bs_ptr, c_idx, cmask, lc, _opaque_zero(H), TH, TW, PA, PH, PO, BLOCK_C, ACC)
        tl.store(dst_ptr + c_idx.to(tl.int64)[:, None] * dst_cstride + dst_pix[None, :], s,
                 mask=cmask[:, None] & dst_mask[None, :])
        tl.debug_barrier()


@triton.jit
def _mix(w3_ptr, src_ptr, src_cstride, src_pix, pix_mask, co, com, C, TRANSPOSE: tl.constexpr,
         BLOCK_K: tl.constexpr, PO: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
         DOT_PREC: tl.constexpr):
    """1x1 channel mix of a tile: acc[co, p] = sum_ci M[co, ci] src[ci * src_cstride + src_pix[p]], M = w3 or w3^T."""
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K, PO], ACC)
    for i0 in range(0, C, BLOCK_K):
        ci = i0 + kk
        cim = ci < C
        if TRANSPOSE:
            w = tl.load(w3_ptr + ci[None, :] * C + co[:, None], mask=com[:, None] & cim[None, :], other=0.0)
        else:
            w = tl.load(w3_ptr + co[:, None] * C + ci[None, :], mask=com[:, None] & cim[None, :], other=0.0)
        sv = tl.load(src_ptr + ci.to(tl.int64)[:, None] * src_cstride + src_pix[None, :],
                     mask=cim[:, None] & pix_mask[None, :], other=0.0)
        acc = tl.dot(w.to(DOT_DTYPE), sv.to(DOT_DTYPE), acc, input_precision=DOT_PREC, out_dtype=ACC)
    return acc


@triton.jit
def _tile_coords(t, n_ty, n_tx, TH: tl.constexpr, TW: tl.constexpr):
    per_img = n_ty * n_tx
    b = t // per_img
    r = t % per_img
    return b, (r // n_tx) * TH, (r % n_tx) * TW


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _msca_fwd_kernel(u_ptr, out_ptr, w0_ptr, b0_ptr, ws_ptr, bs_ptr, w3_ptr, b3_ptr, scr_ptr, sscr_ptr,
                     C, H, W, sB, sC, sH, sW, oB, oC, oH, oW, n_ty, n_tx, n_tiles,
                     TH: tl.constexpr, TW: tl.constexpr, PA: tl.constexpr, PH: tl.constexpr, PO: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    a_scr = scr_ptr + pid.to(tl.int64) * (BLOCK_C * (PA + 3 * PH))
    h_scr = a_scr + BLOCK_C * PA
    s_scr = sscr_ptr + pid.to(tl.int64) * C * PO
    po = tl.arange(0, PO)
    kk = tl.arange(0, BLOCK_K)
    # disable_licm (also on the channel loop of _phase_s): what does not depend on the tile (index vectors, masks and
    # pointers of the regions) is recomputed per tile, a few instructions, rather than hoisted out of the loop and
    # held in registers across both phases (these long-lived values were what ptxas spilled)
    for t in tl.range(pid, n_tiles, nprog, disable_licm=True):
        b, y0, x0 = _tile_coords(t, n_ty, n_tx, TH, TW)
        ub = b.to(tl.int64) * sB
        y = y0 + po // TW
        x = x0 + po % TW
        vpix = (po < TH * TW) & (y < H) & (x < W)
        # phase A: s for every channel of the tile, into the per-program scratch
        _phase_s(u_ptr, ub, w0_ptr, b0_ptr, ws_ptr, bs_ptr, a_scr, h_scr, s_scr, PO, po, vpix,
                 C, y0, x0, H, W, sC, sH, sW, TH, TW, PA, PH, PO, BLOCK_C, ACC)
        # phase B: 1x1 channel mix, bias, gating by u, BLOCK_P pixels of the tile at a time
        for p0 in range(0, PO, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)
            yp = y0 + pp // TW
            xp = x0 + pp % TW
            vp = (pp < TH * TW) & (yp < H) & (xp < W)
            pix = (yp.to(tl.int64) * oH + xp.to(tl.int64) * oW)[None, :]
            for o0 in range(0, C, BLOCK_K):
                co = o0 + kk
                com = co < C
                acc = _mix(w3_ptr, s_scr, PO, pp, vp, co, com, C, False, BLOCK_K, BLOCK_P, ACC, DOT_DTYPE, DOT_PREC)
                bias = tl.load(b3_ptr + co, mask=com, other=0.0).to(ACC)
                uv = _load_img(u_ptr, ub, _clamp_c(co, C) * sC, yp, xp, vp, H, W, sH, sW, ACC)
                res = (acc + bias[:, None]) * uv
                optr = out_ptr + b.to(tl.int64) * oB + co.to(tl.int64)[:, None] * oC + pix
                tl.store(optr, res.to(out_ptr.dtype.element_ty), mask=com[:, None] & vp[None, :])
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _msca_bwd_mix_kernel(u_ptr, g_ptr, w0_ptr, b0_ptr, ws_ptr, bs_ptr, w3_ptr, b3_ptr, scr_ptr,
                         s_ptr, datt_ptr, ds_ptr, dug_ptr,
                         C, H, W, sB, sC, sH, sW, gB, gC, gH, gW, n_ty, n_tx, n_tiles,
                         TH: tl.constexpr, TW: tl.constexpr, PA: tl.constexpr, PH: tl.constexpr, PO: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Per tile: S = s, DATT = g*u, DUG = g*att, DS = w3^T DATT; fp32 (B, C, H, W) contiguous outputs."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    a_scr = scr_ptr + pid.to(tl.int64) * (BLOCK_C * (PA + 3 * PH))
    h_scr = a_scr + BLOCK_C * PA
    po = tl.arange(0, PO)
    kk = tl.arange(0, BLOCK_K)
    HW = H * W
    for t in tl.range(pid, n_tiles, nprog, disable_licm=True):   # (as in the forward)
        b, y0, x0 = _tile_coords(t, n_ty, n_tx, TH, TW)
        ub = b.to(tl.int64) * sB
        fb = b.to(tl.int64) * C * HW
        y = y0 + po // TW
        x = x0 + po % TW
        vpix = (po < TH * TW) & (y < H) & (x < W)
        fpix = y.to(tl.int64) * W + x
        _phase_s(u_ptr, ub, w0_ptr, b0_ptr, ws_ptr, bs_ptr, a_scr, h_scr, s_ptr + fb, HW, fpix, vpix,
                 C, y0, x0, H, W, sC, sH, sW, TH, TW, PA, PH, PO, BLOCK_C, ACC)
        for o0 in range(0, C, BLOCK_K):
            co = o0 + kk
            com = co < C
            acc = _mix(w3_ptr, s_ptr + fb, HW, fpix, vpix, co, com, C, False, BLOCK_K, PO, ACC, DOT_DTYPE, DOT_PREC)
            att = acc + tl.load(b3_ptr + co, mask=com, other=0.0).to(ACC)[:, None]
            co_ld = _clamp_c(co, C)
            uv = _load_img(u_ptr, ub, co_ld * sC, y, x, vpix, H, W, sH, sW, ACC)
            gv = _load_img(g_ptr, b.to(tl.int64) * gB, co_ld * gC, y, x, vpix, H, W, gH, gW, ACC)
            m2 = com[:, None] & vpix[None, :]
            dst = fb + co.to(tl.int64)[:, None] * HW + fpix[None, :]
            tl.store(datt_ptr + dst, gv * uv, mask=m2)
            tl.store(dug_ptr + dst, gv * att, mask=m2)
        tl.debug_barrier()
        for i0 in range(0, C, BLOCK_K):
            ci = i0 + kk
            cim = ci < C
            acc = _mix(w3_ptr, datt_ptr + fb, HW, fpix, vpix, ci, cim, C, True, BLOCK_K, PO, ACC, DOT_DTYPE, DOT_PREC)
            tl.store(ds_ptr + fb + ci.to(tl.int64)[:, None] * HW + fpix[None, :], acc,
                     mask=cim[:, None] & vpix[None, :])
        tl.debug_barrier()


@triton.jit
def _msca_bwd_w3_kernel(datt_ptr, s_ptr, dw3_ptr, db3_ptr, C, HW, n_pchunks, n_work,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                        ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """Split-K partials: dw3[split, co, ci] = sum d_att[b, co, p] s[b, ci, p]; db3[split, co] = sum d_att."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    com = co < C
    cim = ci < C
    pp = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    dbias = tl.zeros([BLOCK_M], ACC)
    for q in range(pid_s, n_work, n_split):
        b = q // n_pchunks
        p = (q % n_pchunks) * BLOCK_P + pp
        pm = p < HW
        base = b.to(tl.int64) * C * HW
        da = tl.load(datt_ptr + base + co.to(tl.int64)[:, None] * HW + p[None, :],
                     mask=com[:, None] & pm[None, :], other=0.0)
        sv = tl.load(s_ptr + base + ci.to(tl.int64)[None, :] * HW + p[:, None],
                     mask=cim[None, :] & pm[:, None], other=0.0)
        acc = tl.dot(da, sv, acc, input_precision=DOT_PREC, out_dtype=ACC)
        dbias += tl.sum(da, axis=1)
    out = dw3_ptr + pid_s.to(tl.int64) * C * C + co[:, None] * C + ci[None, :]
    tl.store(out, acc, mask=com[:, None] & cim[None, :])
    tl.store(db3_ptr + pid_s.to(tl.int64) * C + co, dbias, mask=com & ((co * 0 + pid_n) == 0))


@triton.jit
def _dh_strip(ds_ptr, fb, c_off, cmask, lc, ws_ptr, bs_ptr, c_idx, dh_scr, ydh, xdh, vdh, inside_dh, H, W,
              K: tl.constexpr, WOFF: tl.constexpr, PDH: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """d_h = dw_Kx1^T(d_s) on the DH-region, zero outside the image (d_s read from global, zero outside)."""
    P: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_C, PDH], ACC)
    for i in range(K):
        w = tl.load(ws_ptr + c_idx * 78 + WOFF + i, mask=cmask, other=0.0).to(ACC)
        acc += w[:, None] * _load_img(ds_ptr, fb, c_off, ydh - i + P, xdh, vdh, H, W, W, 1, ACC)
    dh = tl.where(inside_dh[None, :], acc, 0.0)
    tl.store(dh_scr + lc[:, None] * PDH + tl.arange(0, PDH)[None, :], dh)


@triton.jit
def _da_strip(dh_scr, ws_ptr, c_idx, cmask, lc, rda, cda, vda,
              K: tl.constexpr, WOFF: tl.constexpr, DHW: tl.constexpr, PDH: tl.constexpr, PDA: tl.constexpr,
              BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """dw_1xK^T(d_h) on the DA-region, d_h read from the DH-region scratch."""
    P: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_C, PDA], ACC)
    for j in range(K):
        w = tl.load(ws_ptr + c_idx * 78 + WOFF + j, mask=cmask, other=0.0).to(ACC)
        src = rda * DHW + cda + (10 - j + P)
        acc += w[:, None] * tl.load(dh_scr + lc[:, None] * PDH + src[None, :], mask=vda[None, :], other=0.0)
    return acc


@triton.jit
def _strip_wgrad(part_ptr, c_idx, cmask, up, src_scr, src_base, vo, ACC: tl.constexpr,
                 K: tl.constexpr, COL: tl.constexpr, BIDX: tl.constexpr, SHIFT_ROWS: tl.constexpr,
                 rowlen: tl.constexpr, ro, co, roff: tl.constexpr, coff: tl.constexpr):
    """Partials for one strip conv: dw[j] = sum_tile up * src(shifted by j - K//2), db = sum_tile up.

    src is a scratch region of row length ``rowlen``; tile pixel (ro, co) sits at (ro + roff, co + coff) in it,
    and the tap shift moves along rows (SHIFT_ROWS, for kx1 convs) or columns (for 1xk convs).
    """
    P: tl.constexpr = K // 2
    for j in range(K):
        if SHIFT_ROWS:
            src = (ro + roff + j - P) * rowlen + co + coff
        else:
            src = (ro + roff) * rowlen + co + coff + j - P
        x = tl.load(src_scr + src_base + src[None, :], mask=vo[None, :], other=0.0)
        tl.store(part_ptr + c_idx * 110 + 25 + COL + j, tl.sum(up * x, axis=1), mask=cmask)
    tl.store(part_ptr + c_idx * 110 + 104 + BIDX, tl.sum(up, axis=1), mask=cmask)


# n_ty, n_tx not specialised: equal to 1 (stage 4 at 512 x 512: one 16 x 16 tile per image) the JIT made them
# constants and ptxas spilled 8 B for sm_90 (Triton 3.9); they only index tiles.
@triton.jit(do_not_specialize=["n_ty", "n_tx"])
def _msca_bwd_dw_kernel(u_ptr, w0_ptr, b0_ptr, ws_ptr, bs_ptr, ds_ptr, dug_ptr, du_ptr, scr_ptr, part_ptr,
                        C, H, W, sB, sC, sH, sW, dB, dC, dH, dW, n_ty, n_tx, n_tiles,
                        TH: tl.constexpr, TW: tl.constexpr, PA: tl.constexpr, PH: tl.constexpr, PO: tl.constexpr,
                        PDH: tl.constexpr, PDA: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Depthwise backward per tile: du and per-tile partials (n_tiles, C, 110) of every depthwise grad."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lc = tl.arange(0, BLOCK_C)
    a_scr = scr_ptr + pid.to(tl.int64) * (BLOCK_C * (PA + 3 * PH + 3 * PDH + PDA))
    h_scr = a_scr + BLOCK_C * PA
    dh_scr = h_scr + 3 * BLOCK_C * PH
    da_scr = dh_scr + 3 * BLOCK_C * PDH
    AW: tl.constexpr = TW + 20
    DHW: tl.constexpr = TW + 24   # DH-region: rows [y0-2, y0+TH+2), cols [x0-12, x0+TW+12)
    DAW: tl.constexpr = TW + 4    # DA-region: rows [y0-2, y0+TH+2), cols [x0-2, x0+TW+2)
    HW = H * W
    po = tl.arange(0, PO)
    ro = po // TW
    co = po % TW
    pdh = tl.arange(0, PDH)
    rdh = pdh // DHW
    cdh = pdh % DHW
    vdh = pdh < (TH + 4) * DHW
    pda = tl.arange(0, PDA)
    rda = pda // DAW
    cda = pda % DAW
    vda = pda < (TH + 4) * DAW
    for t in range(pid, n_tiles, nprog):
        b, y0, x0 = _tile_coords(t, n_ty, n_tx, TH, TW)
        ub = b.to(tl.int64) * sB
        fb = b.to(tl.int64) * C * HW
        y = y0 + ro
        x = x0 + co
        vpix = (po < TH * TW) & (y < H) & (x < W)
        ydh = y0 - 2 + rdh
        xdh = x0 - 12 + cdh
        inside_dh = vdh & (ydh >= 0) & (ydh < H) & (xdh >= 0) & (xdh < W)
        yda = y0 - 2 + rda
        xda = x0 - 2 + cda
        inside_da = vda & (yda >= 0) & (yda < H) & (xda >= 0) & (xda < W)
        part = part_ptr + tl.cast(t, tl.int64) * C * 110
        for c0 in range(0, C, BLOCK_C):
            c_idx = c0 + lc
            cmask = c_idx < C
            c_ld = _clamp_c(c_idx, C)
            c_off = c_ld * HW
            # forward recompute: a (A-region) and h_k (H-region) into scratch
            _stage_a_h(u_ptr, ub, c_idx, cmask, lc, w0_ptr, b0_ptr, ws_ptr, bs_ptr, a_scr, h_scr,
                       y0, x0, C, H, W, sC, sH, sW, TH, TW, PA, PH, BLOCK_C, ACC)
            # d_h_k on the DH-region
            _dh_strip(ds_ptr, fb, c_off, cmask, lc, ws_ptr, bs_ptr, c_idx, dh_scr, ydh, xdh, vdh, inside_dh,
                      H, W, 7, 7, PDH, BLOCK_C, ACC)
            _dh_strip(ds_ptr, fb, c_off, cmask, lc, ws_ptr, bs_ptr, c_idx, dh_scr + BLOCK_C * PDH, ydh, xdh, vdh,
                      inside_dh, H, W, 11, 25, PDH, BLOCK_C, ACC)
            _dh_strip(ds_ptr, fb, c_off, cmask, lc, ws_ptr, bs_ptr, c_idx, dh_scr + 2 * BLOCK_C * PDH, ydh, xdh,
                      vdh, inside_dh, H, W, 21, 57, PDH, BLOCK_C, ACC)
            tl.debug_barrier()
            # d_a on the DA-region
            da = _load_img(ds_ptr, fb, c_off, yda, xda, vda, H, W, W, 1, ACC)
            da += _da_strip(dh_scr, ws_ptr, c_idx, cmask, lc, rda, cda, vda, 7, 0, DHW, PDH, PDA, BLOCK_C, ACC)
            da += _da_strip(dh_scr + BLOCK_C * PDH, ws_ptr, c_idx, cmask, lc, rda, cda, vda, 11, 14,
                            DHW, PDH, PDA, BLOCK_C, ACC)
            da += _da_strip(dh_scr + 2 * BLOCK_C * PDH, ws_ptr, c_idx, cmask, lc, rda, cda, vda, 21, 36,
                            DHW, PDH, PDA, BLOCK_C, ACC)
            da = tl.where(inside_da[None, :], da, 0.0)
            tl.store(da_scr + lc[:, None] * PDA + pda[None, :], da)
            tl.debug_barrier()
            # du = du_gate + dw5x5^T(d_a) on the tile, and the conv0 weight/bias partials
            du = _load_img(dug_ptr, fb, c_off, y, x, vpix, H, W, W, 1, ACC)
            da_t = tl.load(da_scr + lc[:, None] * PDA + ((ro + 2) * DAW + co + 2)[None, :],
                           mask=vpix[None, :], other=0.0)
            for tap in range(25):
                ky = tap // 5
                kx = tap % 5
                w = tl.load(w0_ptr + c_idx * 25 + tap, mask=cmask, other=0.0).to(ACC)
                src = (ro + 4 - ky) * DAW + co + 4 - kx
                du += w[:, None] * tl.load(da_scr + lc[:, None] * PDA + src[None, :], mask=vpix[None, :], other=0.0)
                uv = _load_img(u_ptr, ub, c_ld * sC, y + ky - 2, x + kx - 2, vpix,
                               H, W, sH, sW, ACC)
                tl.store(part + c_idx * 110 + tap, tl.sum(da_t * uv, axis=1), mask=cmask)
            tl.store(part + c_idx * 110 + 103, tl.sum(da_t, axis=1), mask=cmask)
            dptr = du_ptr + b.to(tl.int64) * dB + c_idx.to(tl.int64)[:, None] * dC \
                + (y.to(tl.int64) * dH + x.to(tl.int64) * dW)[None, :]
            tl.store(dptr, du.to(du_ptr.dtype.element_ty), mask=cmask[:, None] & vpix[None, :])
            # strip-conv partials. kx1 convs: upstream d_s, input h_k (H-region, tile at row offset 10).
            ds_t = _load_img(ds_ptr, fb, c_off, y, x, vpix, H, W, W, 1, ACC)
            hp = lc[:, None] * PH
            _strip_wgrad(part, c_idx, cmask, ds_t, h_scr, hp, vpix, ACC, 7, 7, 1, True, TW, ro, co, 10, 0)
            _strip_wgrad(part, c_idx, cmask, ds_t, h_scr + BLOCK_C * PH, hp, vpix, ACC, 11, 25, 3, True, TW,
                         ro, co, 10, 0)
            _strip_wgrad(part, c_idx, cmask, ds_t, h_scr + 2 * BLOCK_C * PH, hp, vpix, ACC, 21, 57, 5, True,
                         TW, ro, co, 10, 0)
            # 1xk convs: upstream d_h_k (DH-region, tile at (2, 12)), input a (A-region, tile at (10, 10)).
            ap = lc[:, None] * PA
            dhp = lc[:, None] * PDH + ((ro + 2) * DHW + co + 12)[None, :]
            dh7 = tl.load(dh_scr + dhp, mask=vpix[None, :], other=0.0)
            _strip_wgrad(part, c_idx, cmask, dh7, a_scr, ap, vpix, ACC, 7, 0, 0, False, AW, ro, co, 10, 10)
            dh11 = tl.load(dh_scr + BLOCK_C * PDH + dhp, mask=vpix[None, :], other=0.0)
            _strip_wgrad(part, c_idx, cmask, dh11, a_scr, ap, vpix, ACC, 11, 14, 2, False, AW, ro, co, 10, 10)
            dh21 = tl.load(dh_scr + 2 * BLOCK_C * PDH + dhp, mask=vpix[None, :], other=0.0)
            _strip_wgrad(part, c_idx, cmask, dh21, a_scr, ap, vpix, ACC, 21, 36, 4, False, AW, ro, co, 10, 10)
            tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _empty(*shape, dtype, device):
    """Every buffer the launchers hand to a kernel comes from here or ``_empty_like`` (tests poison them with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def _next_pow2(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def _dtypes(dtype: torch.dtype):
    """(torch accumulator dtype, tl accumulator dtype, tl dot-operand dtype, dot input_precision)."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        tf32 = (not INTERPRET) and torch.backends.cuda.matmul.allow_tf32
        return torch.float32, tl.float32, tl.float32, "tf32" if tf32 else "ieee"
    # fp16 / bf16: tensor-core operands on a GPU; fp32 under the interpreter, whose bf16 dot is wrong.
    if INTERPRET:
        return torch.float32, tl.float32, tl.float32, "ieee"
    return torch.float32, tl.float32, (tl.float16 if dtype == torch.float16 else tl.bfloat16), "ieee"


#: Force tile geometry (keys TH, TW, BLOCK_C, BLOCK_K, BLOCK_P, num_warps, num_stages, max_programs): for tests (e.g.
#: the GPU geometry under the interpreter) and tuning. Empty in normal use.
TILE_OVERRIDES: dict = {}

#: The geometry used on a GPU, per kernel (the backward kernels exchange data only through full-size global
#: tensors, so their tiles are independent). Chosen from the ptxas report of the AOT compile check
#: (tests/helpers/triton_aot.py, specialised at both --msca-shape and generic): the largest tiles with no register spills and
#: no stack frame for sm_90 and sm_80, fp32 and bf16 (Triton 3.9). Not yet timed on a GPU: smaller backward tiles
#: cost more halo recompute.
#: fwd: phase B (1x1 mix, bias, gating, store) runs on BLOCK_P = 256 of the 512 tile pixels at a time: with all 512
#: at once its [16, 512] accumulator and operands plus the 64-bit addresses of the unvectorised epilogue (odd and
#: generic strides) reached 255 registers by themselves and spilled. Same loads, MACs and stores; the cost is one
#: w3-tile load per K step and chunk instead of per K step (about +1% of the kernel's instructions at C = 64).
#: bwd_mix: num_stages=1, no software pipelining of its two tl.dot loops: the cp.async addresses and masks of the
#: pipelined S / DATT / w3 tiles took about 100 registers in the odd and generic builds (255 registers, 48-72 B of
#: spills) and pushed the segnext builds just past 128. Unpipelined it needs 80-128 registers, i.e. 2-3 CTAs (16-24
#: warps) per SM instead of 1, whose warps are expected to hide the latency of those L2-resident reads (not yet
#: timed); the mix is a small part of this kernel next to the phase-A recompute. (Larger bwd_mix tiles, e.g.
#: 16 x 16, still spill in the odd and generic builds.)
GPU_TILES = {
    "fwd": dict(TH=16, TW=32, BLOCK_C=4, BLOCK_K=16, BLOCK_P=256, num_warps=8),
    "bwd_mix": dict(TH=8, TW=16, BLOCK_C=2, BLOCK_K=16, num_warps=8, num_stages=1),
    "bwd_dw": dict(TH=16, TW=16, BLOCK_C=2, BLOCK_K=16, num_warps=8),
}

#: The dw3 split-K GEMM on a GPU (same AOT check). 64 x 64 output tiles (the reads of DATT and S scale with C / 64);
#: K steps of BLOCK_P = 16 pixels: with 32, ptxas (13.x, and 12.9 for sm_80, under Triton's --regAllocOptLevel=2)
#: aimed at 80 / 64 registers (3 / 4 CTAs per SM) and spilled 8-16 B of loop-invariant values to reach that, an
#: allocator artifact (the same PTX given .maxnreg 80 compiles without spills). Same loads and MACs, half the shared
#: memory per pipeline stage.
GPU_W3 = dict(BLOCK_MN=64, BLOCK_P=16, num_warps=8)


class _TileConfig:
    """Tile geometry of the tile kernels. Under the interpreter its cost is (programs) x (ops per program), nearly
    independent of tile size, so tiles are large there; on a GPU they are sized for registers (see docs/kernels.md, "Floors")."""

    def __init__(self, B: int, C: int, H: int, W: int, device: torch.device, kernel: str = "fwd"):
        self.BLOCK_P = 1 << 30   # fwd phase B: all pixels of the tile at once unless GPU_TILES says otherwise
        self.num_stages = None   # Triton's default software pipelining of the tl.dot loops unless GPU_TILES says
        if INTERPRET:
            # interpreter cost is per op, not per element: few programs, wide channel blocks (<= 2^18 elements)
            self.TH, self.TW = min(H, 32), min(W, 32)
            pa = _next_pow2((self.TH + 20) * (self.TW + 20))
            self.BLOCK_C = min(_next_pow2(C), max(16, (1 << 18) // pa))
            self.BLOCK_K = max(16, min(_next_pow2(C), 256))
            self.num_warps = 4
        else:
            for k, v in GPU_TILES[kernel].items():
                setattr(self, k, v)
        max_programs = None if INTERPRET or device.type != "cuda" else \
            4 * torch.cuda.get_device_properties(device).multi_processor_count
        for k, v in TILE_OVERRIDES.items():
            if k == "max_programs":
                max_programs = v
            else:
                setattr(self, k, v)
        self.TH, self.TW = TH, TW = min(self.TH, H), min(self.TW, W)
        self.PA = _next_pow2((TH + 20) * (TW + 20))
        self.PH = _next_pow2((TH + 20) * TW)
        self.PO = max(16, _next_pow2(TH * TW))
        self.PDH = _next_pow2((TH + 4) * (TW + 24))
        self.PDA = _next_pow2((TH + 4) * (TW + 4))
        self.n_ty = triton.cdiv(H, TH)
        self.n_tx = triton.cdiv(W, TW)
        self.n_tiles = B * self.n_ty * self.n_tx
        # persistent programs: each loops over tiles, so scratch stays bounded (and L2-resident on a GPU)
        self.n_prog = self.n_tiles if max_programs is None else max(1, min(self.n_tiles, max_programs))

    def consts(self):
        return dict(TH=self.TH, TW=self.TW, PA=self.PA, PH=self.PH, PO=self.PO, BLOCK_C=self.BLOCK_C)

    def launch_opts(self):
        opts = dict(num_warps=self.num_warps)
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        return opts


def forward(u, w0, b0, ws, bs, w3, b3):
    """Fused MSCA forward (Triton). u: (B, C, H, W) fp16/bf16/fp32/fp64, any strides; packed weights as
    ``msca.reference.pack_weights``. Returns out (B, C, H, W) in u's dtype and (dense) memory format."""
    B, C, H, W = u.shape
    out = _empty_like(u)
    if out.numel() == 0:
        return out
    cfg = _TileConfig(B, C, H, W, u.device)
    acc_t, ACC, DOT, PREC = _dtypes(u.dtype)
    scr = _empty(cfg.n_prog * cfg.BLOCK_C * (cfg.PA + 3 * cfg.PH), dtype=acc_t, device=u.device)
    sscr = _empty(cfg.n_prog * C * cfg.PO, dtype=acc_t, device=u.device)
    _msca_fwd_kernel[(cfg.n_prog,)](
        u, out, w0, b0, ws, bs, w3, b3, scr, sscr,
        C, H, W, *u.stride(), *out.stride(), cfg.n_ty, cfg.n_tx, cfg.n_tiles,
        BLOCK_K=cfg.BLOCK_K, BLOCK_P=min(cfg.BLOCK_P, cfg.PO), ACC=ACC, DOT_DTYPE=DOT, DOT_PREC=PREC,
        **cfg.launch_opts(), **cfg.consts())
    return out


def backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad):
    """Fused MSCA backward (Triton).

    Args: grad_out (B, C, H, W) any strides; u and packed weights as in ``forward``; needs_input_grad: 7 bools
    for (u, w0, b0, ws, bs, w3, b3). Returns (du, dw0 (C, 25), db0 (C,), dws (C, 78), dbs (C, 6), dw3 (C, C),
    db3 (C,)); du in u's dtype and memory format, the rest float32 (float64 for float64 inputs); entries not
    needed are None. Weight gradients are per-tile / split-K partials summed in a fixed order: deterministic.
    """
    B, C, H, W = u.shape
    need_du, need_w0, need_b0, need_ws, need_bs, need_w3, need_b3 = needs_input_grad
    acc_t, ACC, DOT, PREC = _dtypes(u.dtype)
    dev = u.device
    if u.numel() == 0:
        z = lambda *s: torch.zeros(*s, dtype=acc_t, device=dev)  # noqa: E731
        grads = (torch.zeros_like(u), z(C, 25), z(C), z(C, 78), z(C, 6), z(C, C), z(C))
        return tuple(g if n else None for g, n in zip(grads, needs_input_grad))
    cfg = _TileConfig(B, C, H, W, dev, "bwd_mix")
    S = _empty(B, C, H, W, dtype=acc_t, device=dev)
    DATT = _empty_like(S)
    DS = _empty_like(S)
    DUG = _empty_like(S)
    scr = _empty(cfg.n_prog * cfg.BLOCK_C * (cfg.PA + 3 * cfg.PH), dtype=acc_t, device=dev)
    _msca_bwd_mix_kernel[(cfg.n_prog,)](
        u, grad_out, w0, b0, ws, bs, w3, b3, scr, S, DATT, DS, DUG,
        C, H, W, *u.stride(), *grad_out.stride(), cfg.n_ty, cfg.n_tx, cfg.n_tiles,
        BLOCK_K=cfg.BLOCK_K, ACC=ACC, DOT_DTYPE=DOT, DOT_PREC=PREC, **cfg.launch_opts(), **cfg.consts())

    dw3 = db3 = None
    if need_w3 or need_b3:
        HW = H * W
        if INTERPRET:
            BM = BN = max(16, min(_next_pow2(C), 64))
            BP = max(16, min(_next_pow2(HW), 1024))
        else:
            BM = BN = GPU_W3["BLOCK_MN"]
            BP = GPU_W3["BLOCK_P"]
        n_pchunks = triton.cdiv(HW, BP)
        n_work = B * n_pchunks
        tiles_mn = triton.cdiv(C, BM) * triton.cdiv(C, BN)
        if INTERPRET or dev.type != "cuda":
            split = 1
        else:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            split = max(1, min(n_work, (4 * sms) // tiles_mn))
        dw3_part = _empty(split, C, C, dtype=acc_t, device=dev)
        db3_part = _empty(split, C, dtype=acc_t, device=dev)
        _msca_bwd_w3_kernel[(triton.cdiv(C, BM), triton.cdiv(C, BN), split)](
            DATT, S, dw3_part, db3_part, C, HW, n_pchunks, n_work,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_P=BP, ACC=ACC, DOT_PREC=PREC,
            num_warps=4 if INTERPRET else GPU_W3["num_warps"])
        dw3 = dw3_part.sum(0) if need_w3 else None
        db3 = db3_part.sum(0) if need_b3 else None

    du = dw0 = db0 = dws = dbs = None
    if need_du or need_w0 or need_b0 or need_ws or need_bs:
        cfg = _TileConfig(B, C, H, W, dev, "bwd_dw")
        du = _empty_like(u)
        part = _empty(cfg.n_tiles, C, _NPART, dtype=acc_t, device=dev)
        scr = _empty(cfg.n_prog * cfg.BLOCK_C * (cfg.PA + 3 * cfg.PH + 3 * cfg.PDH + cfg.PDA),
                          dtype=acc_t, device=dev)
        _msca_bwd_dw_kernel[(cfg.n_prog,)](
            u, w0, b0, ws, bs, DS, DUG, du, scr, part,
            C, H, W, *u.stride(), *du.stride(), cfg.n_ty, cfg.n_tx, cfg.n_tiles,
            PDH=cfg.PDH, PDA=cfg.PDA, ACC=ACC, **cfg.launch_opts(), **cfg.consts())
        tot = part.sum(0)
        dw0 = tot[:, _DW0:_DWS].contiguous() if need_w0 else None
        dws = tot[:, _DWS:_DB0].contiguous() if need_ws else None
        db0 = tot[:, _DB0].contiguous() if need_b0 else None
        dbs = tot[:, _DBS:_NPART].contiguous() if need_bs else None
        if not need_du:
            du = None
    return du, dw0, db0, dws, dbs, dw3, db3

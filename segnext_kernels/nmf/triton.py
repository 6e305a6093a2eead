"""Fused NMF2D (the "ham" of SegNeXt's Hamburger decoder) in Triton: forward and both backward modes.

Math (official ``NMF2D`` of ``mmseg/models/decode_heads/ham_head.py`` in Visual-Attention-Network/SegNeXt and
mmsegmentation; Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021; docs/reference_model.md,
"NMF2D"). Per sample, X (D, N) non-negative, B_0 (D, R) the given initial bases::

    A_k = X^T B_k (N, R)       G_k = B_k^T B_k (R, R)
    C_0 = softmax(inv_t * A_0) over R
    step k = 0..K-1:  C_{k+1} = C_k * A_k / (C_k G_k + eps)                  (coef update)
                      E_k = X C_{k+1} (D, R)    H_k = C_{k+1}^T C_{k+1} (R, R)
                      B_{k+1} = B_k * E_k / (B_k H_k + eps)                   (bases update)
    C_F = C_K * A_K / (C_K G_K + eps)                                         (final coef update, ``compute_coef``)
    Y   = B_K C_F^T (D, N)                                                    (reconstruction)

Forward kernels (everything accumulated in fp32, fp64 for fp64 inputs; x may be fp16/bf16/fp32/fp64, any strides):
  ``_nmf_bases_kernel`` (UPDATE=False): G_0 = B_0^T B_0. Tiny, one program per sample.
  ``_nmf_coef_kernel`` (one per step), grid (B, P), each program persistent over the N-tiles t = p, p+P, ...:
      sweep 1 over D chunks: A_tile = x_tile^T B_k (the x tile is BD x BN, B_k streamed by D chunk);
      C_0 tile = softmax(inv_t A_tile) when k = 0 (the init folds into step 1, reusing A_0);
      C_{k+1} tile = C_k * A / (C_k G_k + eps), written once;
      H partial += C_{k+1}^T C_{k+1} (registers, R x R);
      sweep 2 over D chunks: E partial[p] += x_tile C_{k+1} (a per-program (D, R) fp32 buffer, read-modify-written
      once per tile, no atomics; the same x tile is re-read right after sweep 1, so that re-read is expected to
      hit L1/L2 rather than HBM -- not measured yet). The partials cost 2 x D x R x 4 bytes of L2 traffic per
      N-tile against D x BN x sizeof(x) bytes of x: BN (GPU_BLOCKS) is chosen large for that reason.
  The bases update (as csrc/nmf_fwd.cu's): ``_nmf_psum_kernel`` H = sum_p H partial[p]; ``_nmf_bases_kernel``
      (UPDATE=True), grid (B, NCH), one program per group of D chunks: E = sum_p E partial[p] on its rows,
      B_{k+1} = B_k * E / (B_k H + eps) and its part of G_{k+1} = B_{k+1}^T B_{k+1}; ``_nmf_psum_kernel`` G = sum of
      the parts. Every sum in a fixed order (deterministic). (One program per sample read all P partials, P x D x R
      x 4 bytes, alone: about 35 MB per step at Cityscapes batch 1, R = 64.)
  ``_nmf_coef_kernel`` with RECON=True: the final coef update (init folded in too when K = 0) and the
      reconstruction Y_tile = B_K C_F_tile^T, written in x's dtype.
  Passes over x: one per step plus one for the final pass, K + 1 in total, plus one write of Y (eager PyTorch:
  2K + 2 reads: init, two per step, final). coef (N x R, fp32) is read and written once per step.
  Launches: 4K + 2 (Gram, K coef passes, K bases updates of 3 kernels, final) where eager needs about 90 for K = 7.

Backward (grad modes of ``nmf2d_reference``):
  "unrolled" (official SegNeXt / mmseg: back-prop through every step) and "one_step" (Hamburger paper /
  Enjoy-Hamburger / JSeg: init and the K steps are constants, only the final coef update and the reconstruction are
  differentiated, so x gets B_K g_A_K^T and the initial bases get a gradient only when K = 0).
  Saved by the forward ("unrolled"): B_0..B_K, G_0..G_K, C_0..C_K and C_F, E_0..E_{K-1}, H_0..H_{K-1} (all small:
  D x R, R x R or N x R per step) and x itself. "one_step" saves B_K, G_K, C_K, C_F and x.
  Recomputed: A_k = X^T B_k (in the backward kernel's sweep over x), the denominators C_k G_k + eps and
  B_k H_k + eps.
  ``_nmf_bwd_kernel``, one launch per stage (the final stage, then steps K-1..0), grid (B, P) over N-tiles:
      sweep 1: A = x^T B, and the gradient U reaching the stage's new coef: final stage g_Y^T B_K (and partial
      g_Y C_F for g_B_K, reading g_Y once); step k: g_C_{k+1} (from the later stage) + x^T g_E_k + C_{k+1} S_k,
      where g_E_k and S_k = g_H_k + g_H_k^T come from the bases-update backward;
      then the coef-update backward on the tile (g_A, g_C_k, partial C_k^T g_Q for g_G_k), the softmax backward
      folded in at k = 0; sweep 2: partial x g_A (D x R).
  The D x R / R x R algebra between launches (bases-update backward, sums of the partials, B (g_G + g_G^T)) runs
  as torch ops on those small tensors. ``_nmf_gx_kernel`` writes g_X once, as one GEMM with inner dimension
  (2K + 1) R over the stacked small factors: g_X = sum_stages B_s g_A_s^T + sum_k g_E_k C_{k+1}^T.
  Reads of x in the backward: one per stage (K + 1), plus one read of g_Y and one write of g_X.

Products run on fp32 operands with input_precision="ieee" (TF32 only for fp32 inputs when
``torch.backends.cuda.matmul.allow_tf32`` is set, as eager bmm would); R is padded to RP = max(16, 2^ceil(log2 R))
with zero columns (excluded from the softmax), so tl.dot shapes are legal for any R >= 1. eps > 0 keeps every
denominator positive for non-negative inputs, so all-zero rows/columns of x give zeros, not NaN.

Divisions: Triton compiles an fp32 ``/`` to PTX ``div.full.f32`` (approximate, error at most 2 ulp, no IEEE slow-path
subroutine call; fp64 keeps ``div.rn.f64``). The backward divides once per element, U / Q, and multiplies that by
C_prev, C_new and A instead of forming three quotients: the results differ from U C_prev / Q etc. by rounding only
(about 1 ulp more), far inside the fp32 tolerances of the tests against fp64.

All partial sums are per program and reduced in a fixed order: results are bitwise deterministic. Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors (the tests do that). The launchers here assume validated
arguments (``segnext_kernels.nmf.nmf2d`` validates; out-of-bounds reads are silent in the interpreter).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Triton decides at decoration time whether kernels are interpreted; mirror that decision here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_x(base, d, dm, n, nm, sd, sn, ACC: tl.constexpr):
    """A [BD, BN] tile of a (D, N) matrix with strides (sd, sn), zero outside, upcast to ACC."""
    off = d[:, None].to(tl.int64) * sd + n[None, :].to(tl.int64) * sn
    return tl.load(base + off, mask=dm[:, None] & nm[None, :], other=0.0).to(ACC)


@triton.jit
def _to_out(v, ptr, BF16_RNE: tl.constexpr):
    """Cast an fp32/fp64 tile to ptr's element type. BF16_RNE (set under the interpreter for bfloat16 outputs):
    round the fp32 bits to nearest-even first, since the interpreter's fp32 -> bf16 cast truncates while the
    compiled cast rounds to nearest."""
    if BF16_RNE:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _load_dr(base, d, dm, rr, rm, R):
    """A [BD, RP] chunk of a contiguous (D, R) matrix, zero outside."""
    return tl.load(base + d[:, None].to(tl.int64) * R + rr[None, :], mask=dm[:, None] & rm[None, :], other=0.0)


@triton.jit
def _rmw_partial(pbase, d, dm, rr, part, t, p, RP: tl.constexpr):
    """Accumulate part [BD, RP] into a per-program (D, RP) partial; the program's first tile (t == p) overwrites,
    so the buffer needs no zeroing. Other threads of the program may have stored the rows at tile t - P (the load's
    and the store's layouts need not match): the callers' tile loops begin with a barrier."""
    off = pbase + d[:, None].to(tl.int64) * RP + rr[None, :]
    keep = (rr * 0 + t) != p
    prev = tl.load(off, mask=dm[:, None] & keep[None, :], other=0.0)
    tl.store(off, prev + part, mask=dm[:, None])


@triton.jit
def _nmf_bases_kernel(bin_ptr, bout_ptr, gp_ptr, pxc_ptr, e_ptr, h_ptr, sc_ptr, D, R, P,
                      BD: tl.constexpr, RP: tl.constexpr, UPDATE: tl.constexpr, STORE_E: tl.constexpr,
                      ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B, NP): program (b, j) takes the D-chunks j, j + NP, ... of sample b (B on axis 0: no 65535 limit).
    UPDATE: E = sum_p E partial[p] over the chunk (fixed order), B_out = B_in * E / (B_in H + eps) with
    H = sum_p H partial[p] already summed at h_ptr (B, RP, RP). Always: the program's part of G = B_out^T B_out,
    stored padded (RP, RP) at gp[b * NP + j] (NP = 1: G itself)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    npr = tl.num_programs(1)
    rr = tl.arange(0, RP)
    rm = rr < R
    dd = tl.arange(0, BD)
    eps = tl.load(sc_ptr)
    rr2 = rr[:, None] * RP + rr[None, :]
    if UPDATE:
        H = tl.load(h_ptr + b * RP * RP + rr2)
    G = tl.zeros([RP, RP], ACC)
    for d0 in range(j * BD, D, npr * BD):
        d = d0 + dd
        dm = d < D
        m2 = dm[:, None] & rm[None, :]
        off = b * D * R + d[:, None].to(tl.int64) * R + rr[None, :]
        bt = tl.load(bin_ptr + off, mask=m2, other=0.0)
        if UPDATE:
            E = tl.zeros([BD, RP], ACC)
            for q in range(0, P):
                E += tl.load(pxc_ptr + ((b * P + q) * D + d[:, None]) * RP + rr[None, :], mask=dm[:, None],
                             other=0.0)
            if STORE_E:
                tl.store(e_ptr + off, E, mask=m2)
            den = tl.dot(bt, H, input_precision=PREC, out_dtype=ACC) + eps
            bt = tl.where(m2, bt * E / den, 0.0)
            tl.store(bout_ptr + off, bt, mask=m2)
        G += tl.dot(tl.trans(bt), bt, input_precision=PREC, out_dtype=ACC)
    tl.store(gp_ptr + (b * npr + j) * RP * RP + rr2, G)


@triton.jit
def _nmf_psum_kernel(src_ptr, dst_ptr, Q, n, BLK: tl.constexpr):
    """Grid (B, cdiv(n, BLK)): dst[b, i] = sum over q = 0, 1, ..., Q - 1 (in that order) of src[b, q, i], i < n."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLK + tl.arange(0, BLK)
    m = i < n
    acc = tl.load(src_ptr + b * Q * n + i, mask=m, other=0.0)
    for q in range(1, Q):
        acc += tl.load(src_ptr + (b * Q + q) * n + i, mask=m, other=0.0)
    tl.store(dst_ptr + b * n + i, acc, mask=m)


@triton.jit
def _nmf_coef_kernel(x_ptr, sxb, sxd, sxn, bases_ptr, g_ptr, cin_ptr, cout_ptr, c0_ptr, pxc_ptr, pcc_ptr,
                     y_ptr, syb, syd, syn, sc_ptr, D, N, R, T, P,
                     BN: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr,
                     INIT: tl.constexpr, STORE_C0: tl.constexpr, ACCUM: tl.constexpr, RECON: tl.constexpr,
                     BF16_RNE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     NS1: tl.constexpr, NS2: tl.constexpr, NS3: tl.constexpr):
    """One coef update over N-tiles (see the module docstring). grid (B, P); program p handles tiles p, p+P, ...

    INIT: the incoming coef is softmax(inv_t x^T B) (stored to c0 when STORE_C0), else it is read from cin.
    ACCUM: accumulate E = x C_new and H = C_new^T C_new partials for the bases update.
    RECON: write Y = B C_new^T in y's dtype.
    """
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    rr = tl.arange(0, RP)
    rm = rr < R
    nn = tl.arange(0, BN)
    dd = tl.arange(0, BD)
    eps = tl.load(sc_ptr)
    inv_t = tl.load(sc_ptr + 1)
    rr2 = rr[:, None] * RP + rr[None, :]
    G = tl.load(g_ptr + b * RP * RP + rr2)
    xb = x_ptr + b * sxb
    bb = bases_ptr + b * D * R
    pbase = pxc_ptr + (b * P + p) * D * RP
    cc = tl.zeros([RP, RP], ACC)
    for t in range(p, T, P):
        tl.debug_barrier()  # the previous tile's _rmw_partial stores before this tile's loads of the same rows
        n = t * BN + nn
        nm = n < N
        a = tl.zeros([BN, RP], ACC)
        for d0 in tl.range(0, D, BD, num_stages=NS1):
            d = d0 + dd
            dm = d < D
            xt = _load_x(xb, d, dm, n, nm, sxd, sxn, ACC)
            bt = _load_dr(bb, d, dm, rr, rm, R)
            a += tl.dot(tl.trans(xt), bt, input_precision=PREC, out_dtype=ACC)
        cm = nm[:, None] & rm[None, :]
        coff = b * N * R + n[:, None].to(tl.int64) * R + rr[None, :]
        if INIT:
            z = tl.where(rm[None, :], a * inv_t, float("-inf"))
            z = tl.exp(z - tl.max(z, axis=1)[:, None])
            c = tl.where(cm, z / tl.sum(z, axis=1)[:, None], 0.0)
            if STORE_C0:
                tl.store(c0_ptr + coff, c, mask=cm)
        else:
            c = tl.load(cin_ptr + coff, mask=cm, other=0.0)
        den = tl.dot(c, G, input_precision=PREC, out_dtype=ACC) + eps
        cn = c * a / den
        tl.store(cout_ptr + coff, cn, mask=cm)
        if ACCUM:
            cc += tl.dot(tl.trans(cn), cn, input_precision=PREC, out_dtype=ACC)
            for d0 in tl.range(0, D, BD, num_stages=NS2):
                d = d0 + dd
                dm = d < D
                xt = _load_x(xb, d, dm, n, nm, sxd, sxn, ACC)
                part = tl.dot(xt, cn, input_precision=PREC, out_dtype=ACC)
                _rmw_partial(pbase, d, dm, rr, part, t, p, RP)
        if RECON:
            yb = y_ptr + b * syb
            for d0 in tl.range(0, D, BD, num_stages=NS3):
                d = d0 + dd
                dm = d < D
                bt = _load_dr(bb, d, dm, rr, rm, R)
                y = tl.dot(bt, tl.trans(cn), input_precision=PREC, out_dtype=ACC)
                yoff = d[:, None].to(tl.int64) * syd + n[None, :].to(tl.int64) * syn
                tl.store(yb + yoff, _to_out(y, y_ptr, BF16_RNE), mask=dm[:, None] & nm[None, :])
    if ACCUM:
        tl.store(pcc_ptr + (b * P + p) * RP * RP + rr2, cc)


@triton.jit
def _nmf_bwd_kernel(x_ptr, sxb, sxd, sxn, gy_ptr, sgb, sgd, sgn,
                    bases_ptr, ge_ptr, cnew_ptr, gcin_ptr, s_ptr, cprev_ptr, g_ptr,
                    gcout_ptr, ga_ptr, pxg_ptr, pgy_ptr, pgg_ptr, sc_ptr, D, N, R, T, P,
                    BN: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr,
                    FINAL: tl.constexpr, HAS_GY: tl.constexpr, HAS_GCIN: tl.constexpr, INIT: tl.constexpr,
                    STORE_GC: tl.constexpr, STORE_GA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    NS1: tl.constexpr, NS2: tl.constexpr):
    """Backward of one coef update C_new = C_prev * A / (C_prev G + eps), A = x^T B, over N-tiles; grid (B, P).

    U (the gradient reaching C_new on the tile):
      FINAL (C_new = C_F, B = B_K): U = g_Y^T B_K (+ gcin), with partial g_Y C_F -> pgy (for g_B_K);
      step (C_new = C_{k+1}, B = B_k): U = gcin + x^T g_E_k + C_{k+1} S_k, S_k = g_H + g_H^T (padded RP x RP).
    Then g_A = U C_prev / Q, g_Q = -U C_new / Q, g_C_prev = U A / Q + g_Q G^T, partial C_prev^T g_Q -> pgg (g_G),
    with Q = C_prev G + eps. INIT: C_prev = softmax(inv_t A) and its backward is added to g_A (g_C_prev is not
    stored). Partial x g_A -> pxg (for g_B). g_C_prev -> gcout (STORE_GC), g_A -> ga (STORE_GA, for g_X).
    """
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    rr = tl.arange(0, RP)
    rm = rr < R
    nn = tl.arange(0, BN)
    dd = tl.arange(0, BD)
    eps = tl.load(sc_ptr)
    inv_t = tl.load(sc_ptr + 1)
    rr2 = rr[:, None] * RP + rr[None, :]
    G = tl.load(g_ptr + b * RP * RP + rr2)
    S = tl.zeros([RP, RP], ACC)
    if not FINAL:
        S = tl.load(s_ptr + b * RP * RP + rr2)
    xb = x_ptr + b * sxb
    gyb = gy_ptr + b * sgb
    bb = bases_ptr + b * D * R
    geb = ge_ptr + b * D * R
    pxb = pxg_ptr + (b * P + p) * D * RP
    pyb = pgy_ptr + (b * P + p) * D * RP
    gG = tl.zeros([RP, RP], ACC)
    for t in range(p, T, P):
        tl.debug_barrier()  # the previous tile's _rmw_partial stores before this tile's loads of the same rows
        n = t * BN + nn
        nm = n < N
        cm = nm[:, None] & rm[None, :]
        coff = b * N * R + n[:, None].to(tl.int64) * R + rr[None, :]
        if FINAL:
            cnew = tl.load(cnew_ptr + coff, mask=cm, other=0.0)  # sweep 1 needs it (g_Y C_F)
        a = tl.zeros([BN, RP], ACC)
        u = tl.zeros([BN, RP], ACC)
        for d0 in tl.range(0, D, BD, num_stages=NS1):
            d = d0 + dd
            dm = d < D
            xt = _load_x(xb, d, dm, n, nm, sxd, sxn, ACC)
            bt = _load_dr(bb, d, dm, rr, rm, R)
            a += tl.dot(tl.trans(xt), bt, input_precision=PREC, out_dtype=ACC)
            if FINAL:
                if HAS_GY:
                    gt = _load_x(gyb, d, dm, n, nm, sgd, sgn, ACC)
                    u += tl.dot(tl.trans(gt), bt, input_precision=PREC, out_dtype=ACC)
                    part = tl.dot(gt, cnew, input_precision=PREC, out_dtype=ACC)
                    _rmw_partial(pyb, d, dm, rr, part, t, p, RP)
            else:
                get = _load_dr(geb, d, dm, rr, rm, R)
                u += tl.dot(tl.trans(xt), get, input_precision=PREC, out_dtype=ACC)
        # the (BN, RP) tiles not needed by sweep 1 are loaded after it (shorter live ranges)
        if HAS_GCIN:
            u += tl.load(gcin_ptr + coff, mask=cm, other=0.0)
        if not FINAL:
            cnew = tl.load(cnew_ptr + coff, mask=cm, other=0.0)
            u += tl.dot(cnew, S, input_precision=PREC, out_dtype=ACC)
        cprev = tl.load(cprev_ptr + coff, mask=cm, other=0.0)
        # one division U / Q for the three quotients
        uq = u / (tl.dot(cprev, G, input_precision=PREC, out_dtype=ACC) + eps)
        ga = uq * cprev
        gq = -uq * cnew
        gc = uq * a + tl.dot(gq, tl.trans(G), input_precision=PREC, out_dtype=ACC)
        gG += tl.dot(tl.trans(cprev), gq, input_precision=PREC, out_dtype=ACC)
        if INIT:
            ga += inv_t * cprev * (gc - tl.sum(gc * cprev, axis=1)[:, None])
        if STORE_GC:
            tl.store(gcout_ptr + coff, gc, mask=cm)
        if STORE_GA:
            tl.store(ga_ptr + coff, ga, mask=cm)
        for d0 in tl.range(0, D, BD, num_stages=NS2):
            d = d0 + dd
            dm = d < D
            xt = _load_x(xb, d, dm, n, nm, sxd, sxn, ACC)
            part = tl.dot(xt, ga, input_precision=PREC, out_dtype=ACC)
            _rmw_partial(pxb, d, dm, rr, part, t, p, RP)
    tl.store(pgg_ptr + (b * P + p) * RP * RP + rr2, gG)


@triton.jit
def _gx_accumulate(acc, l_ptr, r_ptr, M, B, b, D, N, R, d, dm, n, nm, rk, RK: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr):
    """acc += sum_m L[m, b][d] R[m, b][n]^T, L (M, B, D, R), R (M, B, N, R) contiguous, RK columns of R at a time."""
    for m in range(0, M):
        for r0 in range(0, R, RK):
            rr = r0 + rk
            rm = rr < R
            lt = _load_dr(l_ptr + (m * B + b) * D * R, d, dm, rr, rm, R)
            rt = _load_dr(r_ptr + (m * B + b) * N * R, n, nm, rr, rm, R)
            acc += tl.dot(lt, tl.trans(rt), input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _nmf_gx_kernel(l1_ptr, r1_ptr, M1, l2_ptr, r2_ptr, M2, gx_ptr, sgb, sgd, sgn, B, D, N, R,
                   BD: tl.constexpr, BN: tl.constexpr, RK: tl.constexpr, BF16_RNE: tl.constexpr,
                   ACC: tl.constexpr, PREC: tl.constexpr):
    """g_X[b] = sum_m L1[m, b] R1[m, b]^T + sum_m L2[m, b] R2[m, b]^T; L (M, B, D, R), R (M, B, N, R) contiguous.
    grid (cdiv(N, BN), cdiv(D, BD), B): N on axis 0, the only one not limited to 65535 programs on CUDA (N is H*W);
    g_X written once in its own dtype and strides. The inner dimension R of each factor pair is taken RK columns
    at a time (the FMA-lowered fp32 dot holds its operands' K-slices in registers, so RK bounds its register use)."""
    pn = tl.program_id(0)
    pd = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rk = tl.arange(0, RK)
    d = pd * BD + tl.arange(0, BD)
    dm = d < D
    n = pn * BN + tl.arange(0, BN)
    nm = n < N
    acc = tl.zeros([BD, BN], ACC)
    acc = _gx_accumulate(acc, l1_ptr, r1_ptr, M1, B, b, D, N, R, d, dm, n, nm, rk, RK, ACC, PREC)
    acc = _gx_accumulate(acc, l2_ptr, r2_ptr, M2, B, b, D, N, R, d, dm, n, nm, rk, RK, ACC, PREC)
    off = b * sgb + d[:, None].to(tl.int64) * sgd + n[None, :].to(tl.int64) * sgn
    tl.store(gx_ptr + off, _to_out(acc, gx_ptr, BF16_RNE), mask=dm[:, None] & nm[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _empty(*shape, dtype, device):
    """Every buffer the launchers hand to a kernel comes from here (tests poison them with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _bf16_rne(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _dtypes(dtype: torch.dtype):
    """(torch accumulator dtype, tl accumulator dtype, tl.dot input_precision) for input dtype ``dtype``.

    The updates are divisions of products: every product runs on fp32 (fp64) operands. TF32 is used for fp32
    inputs only when ``torch.backends.cuda.matmul.allow_tf32`` is set (never under the interpreter)."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, "ieee"
    tf32 = (not INTERPRET) and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return torch.float32, tl.float32, "tf32" if tf32 else "ieee"


#: Force block geometry (any key of GPU_BLOCKS, plus P (programs per sample); BN and P apply to the forward and the
#: backward kernels alike): for tests (several N-tiles / D-chunks / persistent programs under the interpreter) and
#: tuning. Empty in normal use.
BLOCK_OVERRIDES: dict = {}

#: The geometry used on a GPU (not timed on hardware yet) for RP = 16 (R <= 16, SegNeXt-T/S); GPU_BLOCKS_RP replaces
#: entries per padded rank RP (an RP not listed there keeps these with BN and BN_BWD scaled by 16 / RP). BN, BD,
#: num_warps: the coef kernel's N-tile, D-chunk and warps (the bases kernels use BD and num_warps); num_stages: software
#: pipelining stages of its three D-loops (sweep 1, sweep 2 when ACCUM, the reconstruction when RECON). *_BWD: the same
#: for ``_nmf_bwd_kernel`` (stages of its two sweeps). BN_X x BD_X: the g_X tile, RK_X: columns of R per g_X product.
#:
#: Chosen from the ptxas report of tests/helpers/triton_aot.py (Triton 3.9 / ptxas 12.9 and 13.4; sm_90 and sm_80; bf16 and
#: fp32; R = 16 and 64; arguments specialised as the JIT does): no stack frame in any kernel, and none with generic
#: arguments either except the R = 64 backward (below). Every product is an fp32 "ieee" dot lowered to FMAs, so the
#: kernels are expected to be FMA/issue-bound (not yet timed) and registers, not bandwidth, bound the tiles; BN
#: is kept as large as registers allow because the (D, RP) partials cost 2 x D x RP x 4 bytes of L2 traffic per
#: N-tile. What cost registers:
#:  - Triton's default 3-stage pipelining of every D-loop (cp.async buffers plus the addresses of the loads in flight):
#:    it put the backward at 255 registers with 100-180 B frames and the R = 64 reconstruction at 80 B. Stages are set
#:    per loop; a loop is pipelined where that fits without spilling (fewer stages also means fewer instructions).
#:  - an FMA dot keeps a K-slice of both operands per thread: K = R = 64 in the g_X GEMM took 255 registers on sm_80
#:    (hence RK_X = 16); K = BD in the sweeps (BD = 16 in the forward; 32 spills the coef kernel).
#:  - The 8-24 B frames at 64-168 registers were not division slow paths (fp32 "/" is div.full.f32, no CALL; the
#:    CALL.REL.NOINC in the SASS is ptxas's loop construct) but ptxas's occupancy-driven register target spilling one
#:    or two loop-invariant values: they come and go with any code change, so each setting below was checked.
#: Per kernel (instruction counts: static SASS of the loops, per N-column of x, against the former geometry):
#:  - coef, R = 16: BN = 128, BD = 16, 8 warps, stages (2, 1, 1): 60-166 registers, 0..-5 % instructions.
#:    R = 64: BN = 32 (BN = 64 spills hundreds of bytes at any warps / stages), stages (1, 3, 1): 102-170 registers,
#:    -3..-10 %.
#:  - backward, R = 16: BN_BWD = 64, BD_BWD = 32, 8 warps, both sweeps 2-stage pipelined: half the partials' L2
#:    traffic of BN_BWD = 32 and -7..-12 % instructions; 80-186 registers (8-24 warps per SM, was 8-16).
#:    R = 64: BN_BWD = 16, BD_BWD = 16, 4 warps, no pipelining: 166-218 registers, -5..-8 %. BN_BWD = 32 needs 8 warps
#:    and then runs one CTA per SM (up to 255 registers) with its D-loops unpipelined; 8 warps at BN_BWD = 16 has no
#:    frame with generic arguments either but executes ~13 % more instructions, so the generic-argument R = 64
#:    backward keeps its 100-850 B frames (reloads mostly outside the D-loops, ~1 % of its instructions;
#:    SegNeXt-B/L training shapes compile specialised).
#:  - g_X: 128 x 64 tile, 8 warps (4 x 8 outputs per thread), RK_X = 16, 2 stages: ~1.18 instructions per FMA in
#:    the loop, was 1.2-1.34 at 64 x 64; 117-128 registers.
GPU_BLOCKS = dict(BN=128, BD=16, num_warps=8, num_stages=(2, 1, 1),
                  BN_BWD=64, BD_BWD=32, num_warps_BWD=8, num_stages_BWD=(2, 2),
                  BN_X=128, BD_X=64, RK_X=16, num_warps_X=8, num_stages_X=2)

#: Per padded rank RP: entries replacing GPU_BLOCKS' (RP = 64: SegNeXt-B/L, R = 64); see the comment above.
GPU_BLOCKS_RP = {64: dict(BN=32, num_stages=(1, 3, 1), BN_BWD=16, BD_BWD=16, num_warps_BWD=4, num_stages_BWD=(1, 1))}


class _Config:
    """Block geometry. Under the interpreter its cost is (programs) x (ops per program), nearly independent of the
    block size, so blocks are large there; on a GPU they are sized for registers."""

    def __init__(self, B: int, D: int, N: int, R: int, device: torch.device, backward: bool = False):
        self.RP = max(16, _next_pow2(R))
        if INTERPRET:
            self.BN = min(max(16, _next_pow2(N)), 512)
            self.BD = min(max(16, _next_pow2(D)), 256)
            self.BN_X, self.BD_X, self.RK_X = self.BN, self.BD, self.RP
            self.num_warps = self.num_warps_BWD = self.num_warps_X = 4
            self.num_stages_X = 1
            self.num_stages = (1, 1, 1)
            self.num_stages_BWD = (1, 1)
            target = 2 * B
        else:
            for k, v in GPU_BLOCKS.items():
                setattr(self, k, v)
            wide = GPU_BLOCKS_RP.get(self.RP)
            for k, v in (wide or {}).items():
                setattr(self, k, v)
            if backward:
                self.BN, self.BD = self.BN_BWD, self.BD_BWD
            if wide is None:
                # the (BN, RP) register tiles grow with RP: keep them at their RP = 16 size
                self.BN = max(16, self.BN * 16 // self.RP)
            # the GPU geometry also applies to non-CUDA tensors outside the interpreter, so that
            # tests/helpers/triton_aot.py (which records launches on CPU tensors) compiles what a GPU would run
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
            target = 2 * sms
        self.sm_target = target  # programs wanted in a launch (about 2 per SM on a GPU)
        P = None
        for k, v in BLOCK_OVERRIDES.items():
            if k == "P":
                P = v
            else:
                setattr(self, k, v)
        self.T = triton.cdiv(N, self.BN)
        if P is None:
            P = triton.cdiv(target, max(B, 1))
        self.P = max(1, min(self.T, P))


class TritonKernels:
    """The Triton backend's kernels object for ``nmf/driver.py`` (see its docstring for the methods' semantics).

    Kernels and ``_empty`` are looked up in this module at call time, so tests can wrap or poison them."""

    name = "triton"

    @staticmethod
    def acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return _dtypes(dtype)[0]

    @staticmethod
    def empty(*shape, dtype, device):
        return _empty(*shape, dtype=dtype, device=device)

    @staticmethod
    def config(B, D, N, R, device, dtype, backward):
        cfg = _Config(B, D, N, R, device, backward=backward)
        cfg.acc = _dtypes(dtype)
        # bases update: D-chunks of BD rows, at most one program per chunk, about 2 programs per SM in all
        chunks = triton.cdiv(D, cfg.BD)
        cfg.NCH = max(1, min(chunks, triton.cdiv(cfg.sm_target, max(B, 1))))
        cfg.BLK_SUM = min(1024, cfg.RP * cfg.RP)
        cfg.work_floats = B * cfg.RP * cfg.RP * (1 + cfg.NCH)
        cfg.sc = {}
        return cfg

    @staticmethod
    def _sc(cfg, eps, inv_t, device):
        """The (eps, inv_t) scalars as a device tensor in the compute dtype (a Python float argument would reach the
        kernel as fp32, too coarse for the fp64 path). Filled by kernels, not copied from the host, so that the launch
        sequence can be captured in a CUDA graph."""
        key = (eps, inv_t)
        if key not in cfg.sc:
            sc = torch.empty(2, dtype=cfg.acc[0], device=device)
            sc[0].fill_(eps)
            sc[1].fill_(inv_t)
            cfg.sc[key] = sc
        return cfg.sc[key]

    @staticmethod
    def gram(cfg, bases, G):
        B, D, R = bases.shape
        # one program per sample (NP = 1: G itself); unused pointers (eps too: UPDATE=False) get G
        _nmf_bases_kernel[(B, 1)](bases, bases, G, G, G, G, G, D, R, 1,
                                  BD=cfg.BD, RP=cfg.RP, UPDATE=False, STORE_E=False, ACC=cfg.acc[1],
                                  PREC=cfg.acc[2], num_warps=cfg.num_warps)

    @classmethod
    def bases_update(cls, cfg, bin, bout, G, pxc, pcc, E, H, eps, store_eh, work):
        """Three launches: H = sum_p pcc; per D-chunk program E, B_out and a part of G; G = sum of the parts (every
        sum in a fixed order). work: (B, RP, RP) for H unless stored, then (B, NCH, RP, RP) for the parts of G."""
        B, D, R = bin.shape
        RP, nch = cfg.RP, cfg.NCH
        sc = cls._sc(cfg, eps, 1.0, bin.device)
        hsum = H if store_eh else work[:B * RP * RP]
        gp = work[B * RP * RP:B * RP * RP * (1 + nch)]
        grid_rr = (B, triton.cdiv(RP * RP, cfg.BLK_SUM))
        _nmf_psum_kernel[grid_rr](pcc, hsum, cfg.P, RP * RP, BLK=cfg.BLK_SUM, num_warps=4)
        _nmf_bases_kernel[(B, nch)](bin, bout, gp, pxc, E if store_eh else sc, hsum, sc, D, R, cfg.P,
                                    BD=cfg.BD, RP=RP, UPDATE=True, STORE_E=bool(store_eh), ACC=cfg.acc[1],
                                    PREC=cfg.acc[2], num_warps=cfg.num_warps)
        _nmf_psum_kernel[grid_rr](gp, G, nch, RP * RP, BLK=cfg.BLK_SUM, num_warps=4)

    @classmethod
    def coef(cls, cfg, x, bases, G, cin, cout, c0, pxc, pcc, y, eps, inv_t, *, init, store_c0, accum, recon):
        B, D, N = x.shape
        R = bases.shape[-1]
        sc = cls._sc(cfg, eps, inv_t, x.device)
        ys = y.stride() if recon else (0, 0, 0)
        d = lambda t: sc if t is None else t  # noqa: E731  (unused pointer arguments)
        _nmf_coef_kernel[(B, cfg.P)](
            x, *x.stride(), bases, G, d(cin), cout, d(c0), d(pxc), d(pcc), d(y), *ys, sc, D, N, R, cfg.T, cfg.P,
            BN=cfg.BN, BD=cfg.BD, RP=cfg.RP, INIT=init, STORE_C0=store_c0, ACCUM=accum, RECON=recon,
            BF16_RNE=_bf16_rne(x.dtype), ACC=cfg.acc[1], PREC=cfg.acc[2], NS1=cfg.num_stages[0], NS2=cfg.num_stages[1],
            NS3=cfg.num_stages[2], num_warps=cfg.num_warps)

    @classmethod
    def bwd_stage(cls, cfg, x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg, eps, inv_t, *,
                  final, init, store_gc, store_ga):
        B, D, N = x.shape
        R = bases.shape[-1]
        sc = cls._sc(cfg, eps, inv_t, x.device)
        gys = gy.stride() if gy is not None else (0, 0, 0)
        d = lambda t: sc if t is None else t  # noqa: E731
        _nmf_bwd_kernel[(B, cfg.P)](
            x, *x.stride(), d(gy), *gys, bases, d(ge), cnew, d(gcin), d(S), cprev, G, d(gcout), d(ga),
            pxg, d(pgy), pgg, sc, D, N, R, cfg.T, cfg.P,
            BN=cfg.BN, BD=cfg.BD, RP=cfg.RP, FINAL=final, HAS_GY=gy is not None, HAS_GCIN=gcin is not None,
            INIT=init, STORE_GC=store_gc, STORE_GA=store_ga, ACC=cfg.acc[1], PREC=cfg.acc[2],
            NS1=cfg.num_stages_BWD[0], NS2=cfg.num_stages_BWD[1], num_warps=cfg.num_warps_BWD)

    @staticmethod
    def gx(cfg, l1, r1, m1, l2, r2, m2, gx):
        B, D, N = gx.shape
        R = l1.shape[-1]
        if l2 is None:
            l2, r2, m2 = l1, r1, 0
        _nmf_gx_kernel[(triton.cdiv(N, cfg.BN_X), triton.cdiv(D, cfg.BD_X), B)](
            l1, r1, m1, l2, r2, m2, gx, *gx.stride(), B, D, N, R,
            BD=cfg.BD_X, BN=cfg.BN_X, RK=min(cfg.RP, cfg.RK_X), BF16_RNE=_bf16_rne(gx.dtype), ACC=cfg.acc[1],
            PREC=cfg.acc[2], num_warps=cfg.num_warps_X, num_stages=cfg.num_stages_X)


KERNELS = TritonKernels()


def nmf_forward(x: torch.Tensor, bases0: torch.Tensor, steps: int, eps: float, inv_t: float, save=None):
    """Fused NMF2D forward on the Triton kernels: ``driver.nmf_forward`` (see there). x may also be float64."""
    from .driver import nmf_forward as drive

    return drive(KERNELS, x, bases0, steps, eps, inv_t, save=save)


def nmf_backward(grad_y, grad_bases, grad_coef, x, saved, mode: str, steps: int, eps: float, inv_t: float,
                 need_x: bool, need_bases: bool):
    """Fused NMF2D backward on the Triton kernels: ``driver.nmf_backward`` (see there)."""
    from .driver import nmf_backward as drive

    return drive(KERNELS, grad_y, grad_bases, grad_coef, x, saved, mode, steps, eps, inv_t, need_x, need_bases)

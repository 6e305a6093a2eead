// The depthwise part of MSCA (5x5, then the 1xk and kx1 strips for k = 7, 11, 21, and their sum s) on tensor cores,
// for fp16/bf16 inputs: the tensor-core ("mma") variant of the depthwise part, beside the fp32 FMA one
// (compute_s_tile_fma, msca_common.cuh); compute_s_tile (the end of this file) runs one of them in the forward kernel
// and in the backward mix kernel: this one when MscaGeom::dw_mma is set (msca_fwd_plan / msca_bwd_plan decide;
// SEGNEXT_MSCA_CUDA_DW forces).
//
// Why: the FMA variant spends about 205 fp32 FMAs per output element on a 16x32 tile (103 taps plus the halo
// recompute), i.e. about twice the FMA floor (docs/kernels.md, "Floors") before any overhead. Here every 1-D
// convolution over a row (or a column) of 8 outputs is a product with a banded (Toeplitz) matrix built from the taps,
// run as mma.sync m16n8k16 with fp32 accumulation:
//   a    (5x5):  for each dy, D[rows][8 cols] += U[rows + dy][16-col window] x T_dy[16][8]     (5 k-steps)
//   h_k  (1xk):  D[rows][8 cols] += A[rows][32-col window] x T_k[32][8], the three strips sharing the A fragments
//   v_k  (kx1):  transposed, D[16 cols][8 rows] += H_k^T[16 cols][row window] x T_k[window][8] (ldmatrix.trans),
//                the three strips accumulating into one D = v7 + v11 + v21 (window 16 rows for k = 7, 32 else)
// The Toeplitz B fragments depend only on the lane and the channel: prep_band_kernel packs them once per launch from
// the fp32 weights (rounded to the input dtype, as eager's convolutions use them) into the workspace; each warp loads
// its lane's 36 registers per channel with 9 coalesced 16-byte loads.
// Tensor-core MACs per output element (16x32 tile): 420 (a) + 288 (h) + 80 (v), about 0.4 mma per output element
// and channel, against 205 FMA instructions per output element for the FMA variant.
// Instruction count (static, from the loop bodies of the sm_90 SASS, cuobjdump; interior tiles; not a timing): per
// channel, u tile 14 per row step (cp.async), a 30 per 16x8 block, h 96 per 16x8 block of the three strips, v 54
// per 16x8 block (python -m bench.sass_census): on the 28x16 tile (stage 1) about 3.6 warp instructions per output
// element and channel for the depthwise part, against the FMA floor of 103 / 32 = 3.2
// (the FMA variant: about 15 by an earlier hand count, not from the SASS).
// What keeps it there: no integer division in the loops, the bias in the mma accumulator input, one HFMA2 per
// packed pair for the NaN/Inf check, two accumulators per block (mma chains of 3 and 2 instead of 5), the whole u
// tile in flight at once (cp.async) and, where shared memory allows it at the same CTAs per SM, the next channel's
// u tile loading into a second buffer while this one computes (MscaGeom::mma_off_x1). Tiles whose halo lies inside
// the image (most tiles of large images) skip the border masks (EDGE = false). Not timed on a GPU yet.
//
// Numerics: a and h_k are rounded to the input dtype between the convolutions (where eager PyTorch rounds them
// too); s = a + v7 + v11 + v21 + biases is summed in fp32 and rounded once into S. Zero taps of the banded
// matrices multiply neighbouring values (0 * Inf = NaN), so a channel whose u tile, a or h_k holds a NaN or Inf is
// redone with the direct taps (channel_s_direct): non-finite values propagate exactly as in eager PyTorch.
//
// Work split: each warp owns one channel at a time (channels warp, warp + 8, ...) and its own work area
//   U   [UH][ULD]   u tile, rows/cols from -12 (zero outside the image and outside the loaded TH+24 x TW+24)
//   H21 [THp+24][HLD], H11 [THp+24][HLD], H7 [THp+8][HLD]   the 1xk outputs from rows -10, -5, -3 (alias U)
//   A   [MA][ALD]   a, rows/cols from -10 (zero outside the image)
//   (U/H a second time at mma_off_x1 when double-buffered: channel k of the warp uses buffer k % 2)
// so the phases of a channel need only __syncwarp(); one __syncthreads() ends the tile. Row strides are odd
// multiples of 16 bytes (conflict-free ldmatrix). Needs TH % 4 == 0 and TW in {16, 32, 64} (msca_tile_mma_ok); with
// TH not a multiple of 8 the last block of 8 output rows is partial (THp = TH rounded up to 8 sizes the H_k windows).
#pragma once

#include "msca/msca_common.cuh"

namespace msca {

// One register of the B fragment (k16 x n8) of a banded matrix for lane `lane`: B[k][n] for n = g, k = k0 + 2t + 8r
// + {0, 1} (lower k in the lower 16 bits), with B[k][n] = w[k - n + shift] where 0 <= k - n + shift < taps, else 0.
// w: one channel's fp32 taps (global), rounded to the input dtype.
template <typename T>
MSCA_DEV uint32_t band_reg(const float* __restrict__ w, int taps, int k0, int shift, int lane, int r) {
  const int g = lane >> 2, t = lane & 3;
  const int j0 = k0 + 2 * t + 8 * r - g + shift;
  const float lo = (j0 >= 0 && j0 < taps) ? w[j0] : 0.f;
  const float hi = (j0 + 1 >= 0 && j0 + 1 < taps) ? w[j0 + 1] : 0.f;
  return pack2<T>(lo, hi);
}

// Every banded B fragment of every channel, packed per lane by prep_band_kernel into the workspace (gm.mma_band_off):
// uint4 [C][MSCA_BAND_CHUNKS][32 lanes], i.e. 36 registers per lane and channel, register i in chunk i / 4:
//   0..9   5x5, dy = i/2, reg i%2            (window: u cols [x-2, x+14) for 8 outputs from x; taps dx = k - n)
//   12..23 1xk strip s = (i-12)/4 (7, 11, 21), k-step ((i-12)/2)%2, reg i%2  (a cols [x0-10, x0+22))
//   24, 25 7x1; 26..29 11x1 (k-step (i-26)/2); 30..33 21x1 (k-step (i-30)/2)  (H_k rows [y0-hk, +16 or +32))
//   10, 11, 34, 35 unused (zero)
constexpr int MSCA_BAND_CHUNKS = 9;

template <typename T>
MSCA_DEV uint32_t band_reg_of(int i, int lane, const float* __restrict__ w0c, const float* __restrict__ wc) {
  if (i < 10) return band_reg<T>(w0c + (i >> 1) * 5, 5, 0, 0, lane, i & 1);
  if (i >= 12 && i < 24) {
    const int s = (i - 12) >> 2, q = ((i - 12) >> 1) & 1;
    const int off = s == 0 ? 0 : (s == 1 ? 14 : 36), taps = s == 0 ? 7 : (s == 1 ? 11 : 21);
    const int hk = taps >> 1;
    return band_reg<T>(wc + off, taps, 16 * q, hk - 10, lane, i & 1);
  }
  if (i == 24 || i == 25) return band_reg<T>(wc + 7, 7, 0, 0, lane, i & 1);
  if (i >= 26 && i < 30) return band_reg<T>(wc + 25, 11, 16 * ((i - 26) >> 1), 0, lane, i & 1);
  if (i >= 30 && i < 34) return band_reg<T>(wc + 57, 21, 16 * ((i - 30) >> 1), 0, lane, i & 1);
  return 0u;
}

// dst: uint4 [C][MSCA_BAND_CHUNKS][32] (see above); w0 (C, 25), ws (C, 78) packed fp32 weights.
template <typename T>
__global__ void __launch_bounds__(256) prep_band_kernel(const float* __restrict__ w0, const float* __restrict__ ws,
                                                        int C, uint4* __restrict__ dst) {
  const long long total = (long long)C * MSCA_BAND_CHUNKS * 32;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const int lane = (int)(e & 31);
    const long long cq = e >> 5;
    const int c = (int)(cq / MSCA_BAND_CHUNKS), q = (int)(cq % MSCA_BAND_CHUNKS);
    const float* w0c = w0 + (int64_t)c * 25;
    const float* wc = ws + (int64_t)c * 78;
    uint4 v;
    v.x = band_reg_of<T>(4 * q + 0, lane, w0c, wc);
    v.y = band_reg_of<T>(4 * q + 1, lane, w0c, wc);
    v.z = band_reg_of<T>(4 * q + 2, lane, w0c, wc);
    v.w = band_reg_of<T>(4 * q + 3, lane, w0c, wc);
    dst[e] = v;
  }
}

// One warp loads channel c's u tile (src = the channel's plane) into U: rows/cols [-12, TH+12) x [-12, TW+12) from
// the image, zero outside it and in the rest of the UH x UWc area. Rows of 4 contiguous elements (the usual NCHW
// case: sW == 1, W and sH multiples of 4, 8-byte aligned plane) move as one 8-byte cp.async each (the tile origin
// x0 - 12 is a multiple of 4, so a group of 4 columns is wholly inside or wholly outside the image), committed as
// one group: the caller waits (cp_async_wait<0>) and __syncwarp()s before reading U. Other layouts: element by
// element, synchronously (and an empty group).
template <typename T, bool EDGE>
MSCA_DEV void load_u_tile_mma(T* U, const MscaGeom& gm, const T* __restrict__ src, int64_t sH, int64_t sW,
                             const TileCtx& tile) {
  const int lane = lane_id();
  const int UWc = gm.mma_UWc, ULD = gm.mma_ULD, LH = gm.TH + 24, LW = gm.TW + 24;
  if (sW == 1 && (sH & 3) == 0 && (tile.W & 3) == 0 && (reinterpret_cast<uintptr_t>(src) & 7) == 0) {
    // lane = (row offset lr0, 4-column group), fixed; rows advance by rpi = 32 / gpr (lanes past rpi * gpr idle).
    // One 8-byte cp.async per group (zero-filled outside the image / the loaded area): all of the tile's copies are
    // in flight at once instead of one load's latency per row.
    const int gpr = UWc >> 2, rpi = 32 / gpr;
    const int lr0 = lane / gpr, col = 4 * (lane - lr0 * gpr);
    if (lr0 < rpi) {
      const int xx = tile.x0 - 12 + col;
      const bool cin = col < LW && (!EDGE || (unsigned)xx < (unsigned)tile.W);
      int yy = tile.y0 - 12 + lr0;
      const T* gp = src + (int64_t)yy * sH + xx;  // formed for every lane, read only where in the image
      const int64_t gstep = (int64_t)rpi * sH;
      T* sp = U + lr0 * ULD + col;
      const int sstep = rpi * ULD;
      for (int r = lr0; r < gm.mma_UH; r += rpi, yy += rpi, gp += gstep, sp += sstep) {
        const bool ok = cin && r < LH && (!EDGE || (unsigned)yy < (unsigned)tile.H);
        cp_async8(sp, ok ? gp : src, ok);
      }
    }
    cp_async_commit();
    return;
  }
  const int n = gm.mma_UH * UWc;
  const int dr = 32 / UWc, dc = 32 - dr * UWc;
  int r = lane / UWc, col = lane - r * UWc;
  for (int idx = lane; idx < n; idx += 32) {
    const int yy = tile.y0 - 12 + r, xx = tile.x0 - 12 + col;
    T v = st_zero<T>();
    if (r < LH && col < LW && (!EDGE || ((unsigned)yy < (unsigned)tile.H && (unsigned)xx < (unsigned)tile.W)))
      v = src[(int64_t)yy * sH + (int64_t)xx * sW];
    U[r * ULD + col] = v;
    r += dr;
    col += dc;
    if (col >= UWc) { col -= UWc; ++r; }
  }
  cp_async_commit();  // an empty group: one group per call on either path keeps the callers' wait counts right
}

// s of one channel with the direct taps (no banded products), on the same buffers and with the same roundings as
// compute_s_tile_mma: the path for tiles with a NaN or Inf, which then propagates exactly as in eager PyTorch. One
// warp; U holds the u tile; writes A, then H_k (over U), then Sc. Slow (scalar), and rare.
template <typename T>
MSCA_DEV void channel_s_direct(const T* U, T* A, T* H7, T* H11, T* H21, T* Sc, const MscaGeom& gm,
                               const float* __restrict__ w0c, float b0c, const float* __restrict__ wc,
                               const float* __restrict__ bc, const TileCtx& tile) {
  const int lane = lane_id();
  const int TH = gm.TH, TW = gm.TW, ULD = gm.mma_ULD, ALD = gm.mma_ALD, HLD = gm.mma_HLD;
  // a on rows/cols [-10, TH+10) x [-10, TW+10)
  for (int idx = lane; idx < (TH + 20) * (TW + 20); idx += 32) {
    const int r = idx / (TW + 20), col = idx - r * (TW + 20);
    const bool in =
        (unsigned)(tile.y0 - 10 + r) < (unsigned)tile.H && (unsigned)(tile.x0 - 10 + col) < (unsigned)tile.W;
    float acc = b0c;
    for (int dy = 0; dy < 5; ++dy)
      for (int dx = 0; dx < 5; ++dx) acc = fmaf(w0c[dy * 5 + dx], to_f(U[(r + dy) * ULD + col + dx]), acc);
    A[r * ALD + col] = in ? from_f<T>(acc) : st_zero<T>();
  }
  __syncwarp();
  // h_k on rows [-hk, TH+hk), tile cols; the kx1 window rows past them zero
  T* Hk[3] = {H7, H11, H21};
  const int THp = (TH + 7) / 8 * 8;
  const int hk[3] = {3, 5, 10}, woff[3] = {0, 14, 36}, rows[3] = {THp + 8, THp + 24, THp + 24};
  for (int s = 0; s < 3; ++s) {
    const int k = 2 * hk[s] + 1;
    for (int idx = lane; idx < rows[s] * TW; idx += 32) {
      const int hrow = idx / TW, x = idx - hrow * TW;
      const int y = hrow - hk[s];  // tile row
      float acc = bc[2 * s];
      if (hrow < TH + 2 * hk[s])
        for (int j = 0; j < k; ++j) acc = fmaf(wc[woff[s] + j], to_f(A[(y + 10) * ALD + x + 10 - hk[s] + j]), acc);
      const bool in = hrow < TH + 2 * hk[s] && (unsigned)(tile.y0 + y) < (unsigned)tile.H &&
                      (unsigned)(tile.x0 + x) < (unsigned)tile.W;
      Hk[s][hrow * HLD + x] = in ? from_f<T>(acc) : st_zero<T>();
    }
  }
  __syncwarp();
  // s = a + v7 + v11 + v21 + biases on the tile
  const int voff[3] = {7, 25, 57};
  const float bsum = bc[1] + bc[3] + bc[5];
  for (int idx = lane; idx < TH * TW; idx += 32) {
    const int y = idx / TW, x = idx - y * TW;
    float acc = 0.f;
    for (int s = 0; s < 3; ++s)
      for (int j = 0; j <= 2 * hk[s]; ++j) acc = fmaf(wc[voff[s] + j], to_f(Hk[s][(y + j) * HLD + x]), acc);
    const bool in = (unsigned)(tile.y0 + y) < (unsigned)tile.H && (unsigned)(tile.x0 + x) < (unsigned)tile.W;
    Sc[y * TW + x] = in ? from_f<T>(acc + to_f(A[(y + 10) * ALD + x + 10]) + bsum) : st_zero<T>();
  }
}

// One warp writes channel c's a (A: rows/cols origin -10, in T) on the tile's pixels inside the image to the a
// scratch of the backward (as.ptr: tensor base; tile.b selects the image). Lane = (row offset, column), TW in
// {16, 32, 64}: consecutive lanes store consecutive columns.
template <typename T, bool EDGE>
MSCA_DEV void store_a_tile_mma(const T* A, const MscaGeom& gm, const ASave& as, int c, const TileCtx& tile) {
  const int lane = lane_id();
  const int TH = gm.TH, TW = gm.TW, ALD = gm.mma_ALD;
  T* dst = reinterpret_cast<T*>(as.ptr) + (int64_t)tile.b * as.sB + (int64_t)c * as.sC;
  const int rpi = TW >= 32 ? 1 : 32 / TW, r0 = TW >= 32 ? 0 : lane / TW, x1 = TW >= 32 ? lane : lane - r0 * TW;
  for (int y = r0; y < TH; y += rpi) {
    const int yy = tile.y0 + y;
    if (EDGE && yy >= tile.H) break;
    for (int x = x1; x < TW; x += 32) {
      const int xx = tile.x0 + x;
      if (!EDGE || xx < tile.W) dst[(int64_t)yy * as.sH + (int64_t)xx * as.sW] = A[(y + 10) * ALD + x + 10];
    }
  }
}

// compute_s_tile_mma for one tile; EDGE = false: the u tile with its 12-pixel halo lies inside the image, so no value
// needs the image-border masks (the a rows/columns computed past the needed ones are finite and meet only zero taps).
template <typename T, bool EDGE, bool SAVE_A>
MSCA_DEV void compute_s_tile_mma_impl(T* S, unsigned char* work_raw, const MscaGeom& gm, const T* __restrict__ u_img,
                                int64_t sC, int64_t sH, int64_t sW, const float* __restrict__ w0,
                                const float* __restrict__ b0, const float* __restrict__ ws,
                                const float* __restrict__ bs, const uint4* __restrict__ band, const TileCtx& tile,
                                const ASave& as) {
  zero_s_padding<T>(S, gm, tile);
  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int g = lane >> 2, t = lane & 3;
  const int TH = gm.TH, TW = gm.TW, MA = gm.mma_MA, NBA = gm.mma_nbA;
  const int ULD = gm.mma_ULD, ALD = gm.mma_ALD, HLD = gm.mma_HLD;
  T* wk = reinterpret_cast<T*>(work_raw) + (size_t)warp * gm.mma_warp;
  // U/H buffers: channel k of this warp uses X[k % 2] (one buffer when mma_off_x1 == 0); with two, the next channel's
  // u tile is in flight (cp.async) into the other one while this channel computes
  T* const X0 = wk;
  T* const X1 = wk + gm.mma_off_x1;
  const bool dbuf = gm.mma_off_x1 != 0;
  T* A = wk + gm.mma_off_a;
  // per-lane constants: ldmatrix row addresses (non-transposed operand: rows m, 16-byte k chunks; transposed
  // operand: rows k) and the lane's D fragment position (rows g, g + 8; columns 2t, 2t + 1)
  const int lr = (lane & 7) + ((lane >> 3) & 1) * 8, lc = (lane >> 4) * 8;
  const int kr = (lane & 7) + ((lane >> 4) & 1) * 8, mc = ((lane >> 3) & 1) * 8;
  const T zero = st_zero<T>();
  const int THp = (TH + 7) / 8 * 8;
  // zeroing of the H_k tails: 16-byte chunks, cpr per row (TW / 8 divides 32: msca_tile_mma_ok)
  const int cpr = TW >> 3, zr0 = lane / cpr, zk = lane - zr0 * cpr, zrpi = 32 / cpr;

  constexpr int kWarps = MSCA_NT / 32;
  if (dbuf && warp < tile.C) load_u_tile_mma<T, EDGE>(X0, gm, u_img + (int64_t)warp * sC, sH, sW, tile);
  int k = 0;
  for (int c = warp; c < tile.C; c += kWarps, ++k) {
    T* U = (k & 1) ? X1 : X0;
    T* H21 = U;
    T* H11 = U + gm.mma_off_h11;
    T* H7 = U + gm.mma_off_h7;
    // ---- u tile: rows/cols [-12, TH+12) x [-12, TW+12) from the image, zero elsewhere ----------------------------
    if (!dbuf) {
      load_u_tile_mma<T, EDGE>(U, gm, u_img + (int64_t)c * sC, sH, sW, tile);
      cp_async_wait<0>();
    } else if (c + kWarps < tile.C) {
      // the other buffer held the previous channel (done: the __syncwarp() ending its iteration)
      load_u_tile_mma<T, EDGE>((k & 1) ? X0 : X1, gm, u_img + (int64_t)(c + kWarps) * sC, sH, sW, tile);
      cp_async_wait<1>();  // this channel's group done, the next one's may still fly
    } else {
      cp_async_wait<0>();
    }
    // A NaN or Inf in u always reaches a stored value of a (every loaded pixel is within 2 of a computed one). nf
    // accumulates v * 0 of every stored a and h_k pair as rounded to T (nonfinite_acc2): it stays +-0 unless one of
    // them is NaN or +-Inf (also after an fp16 overflow in the rounding, which eager's fp16 convolutions make too).
    uint32_t nf = 0u;
    __syncwarp();
    // ---- a = dw5x5(u) + b0 on rows [-10, MA-10), cols [-10, 8*NBA-10); zero outside the image ---------------------
    // Block (rb, i): D[16 rows][8 cols] = b0 + sum_dy U[rows + dy][16-col window] x T_dy, the dy terms split over
    // two accumulators (dy even / odd: two shorter mma chains), bias in the accumulator input.
    {
      const uint4* bq = band + (size_t)c * MSCA_BAND_CHUNKS * 32 + lane;
      const uint4 q0 = bq[0], q1 = bq[32], q2 = bq[64];
      const uint32_t bw[5][2] = {{q0.x, q0.y}, {q0.z, q0.w}, {q1.x, q1.y}, {q1.z, q1.w}, {q2.x, q2.y}};
      const float bias = b0[c];
      const float cb[4] = {bias, bias, bias, bias};
      const T* ul = U + lr * ULD + lc;
      T* al = A + g * ALD + 2 * t;
      for (int rb = 0; rb < (MA >> 4); ++rb) {
        bool yin0 = true, yin1 = true;
        if (EDGE) {
          const int y = tile.y0 - 10 + 16 * rb + g;
          yin0 = (unsigned)y < (unsigned)tile.H;
          yin1 = (unsigned)(y + 8) < (unsigned)tile.H;
        }
        const T* ur = ul + 16 * rb * ULD;
        T* ar = al + 16 * rb * ALD;
        for (int i = 0; i < NBA; ++i) {
          float acc0[4], acc1[4] = {0.f, 0.f, 0.f, 0.f};
          uint32_t f[4];
          ldmatrix_x4<false>(f, ur + 8 * i);
          mma_16816_c<IsBF16<T>::value>(acc0, f, bw[0], cb);
          ldmatrix_x4<false>(f, ur + 8 * i + ULD);
          mma_16816<IsBF16<T>::value>(acc1, f, bw[1]);
          ldmatrix_x4<false>(f, ur + 8 * i + 2 * ULD);
          mma_16816<IsBF16<T>::value>(acc0, f, bw[2]);
          ldmatrix_x4<false>(f, ur + 8 * i + 3 * ULD);
          mma_16816<IsBF16<T>::value>(acc1, f, bw[3]);
          ldmatrix_x4<false>(f, ur + 8 * i + 4 * ULD);
          mma_16816<IsBF16<T>::value>(acc0, f, bw[4]);
          float v[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) v[r] = acc0[r] + acc1[r];
          if (EDGE) {
            const int x = tile.x0 - 10 + 8 * i + 2 * t;
            const bool xin0 = (unsigned)x < (unsigned)tile.W, xin1 = (unsigned)(x + 1) < (unsigned)tile.W;
            v[0] = yin0 && xin0 ? v[0] : 0.f;
            v[1] = yin0 && xin1 ? v[1] : 0.f;
            v[2] = yin1 && xin0 ? v[2] : 0.f;
            v[3] = yin1 && xin1 ? v[3] : 0.f;
          }
          const uint32_t p0 = pack2<T>(v[0], v[1]), p1 = pack2<T>(v[2], v[3]);
          *reinterpret_cast<uint32_t*>(ar + 8 * i) = p0;
          *reinterpret_cast<uint32_t*>(ar + 8 * i + 8 * ALD) = p1;
          nonfinite_acc2<T>(nf, p0);
          nonfinite_acc2<T>(nf, p1);
        }
      }
    }
    __syncwarp();
    // ---- h_k = dw_1xk(a) + bh_k on tile cols [0, TW), rows [-hk, TH+hk); zero outside the image -------------------
    // Block (rb, j): the A fragments of the 32-col window a cols [8j-10, 8j+22) serve the three strips; a strip
    // whose rows [-hk, TH+hk) miss the block's a rows [16rb-10, 16rb+6) is skipped.
    {
      const float* bc = bs + (int64_t)c * 6;
      // strip (7, 11, 21), k-step, reg; window = a cols [x0-10, x0+22) for 8 outputs at x0
      const uint4* bq = band + ((size_t)c * MSCA_BAND_CHUNKS + 3) * 32 + lane;
      const uint4 q3 = bq[0], q4 = bq[32], q5 = bq[64];
      const uint32_t bh[3][2][2] = {{{q3.x, q3.y}, {q3.z, q3.w}}, {{q4.x, q4.y}, {q4.z, q4.w}},
                                    {{q5.x, q5.y}, {q5.z, q5.w}}};
      const float cb[3][4] = {{bc[0], bc[0], bc[0], bc[0]}, {bc[2], bc[2], bc[2], bc[2]},
                              {bc[4], bc[4], bc[4], bc[4]}};
      const int hk[3] = {3, 5, 10};
      T* Hk[3] = {H7, H11, H21};
      const T* al = A + lr * ALD + lc;
      for (int rb = 0; rb < (MA >> 4); ++rb) {
        const int arow = 16 * rb + g;  // the lane's first a row (buffer), image row y0 - 10 + arow; second: + 8
        bool yin0 = true, yin1 = true;
        if (EDGE) {
          yin0 = (unsigned)(tile.y0 - 10 + arow) < (unsigned)tile.H;
          yin1 = (unsigned)(tile.y0 - 2 + arow) < (unsigned)tile.H;
        }
        const T* ar = al + 16 * rb * ALD;
        for (int j = 0; j < (TW >> 3); ++j) {
          uint32_t a0[4], a1[4];
          ldmatrix_x4<false>(a0, ar + 8 * j);
          ldmatrix_x4<false>(a1, ar + 8 * j + 16);
          bool xin0 = true, xin1 = true;
          if (EDGE) {
            const int x = tile.x0 + 8 * j + 2 * t;
            xin0 = (unsigned)x < (unsigned)tile.W;
            xin1 = (unsigned)(x + 1) < (unsigned)tile.W;
          }
#pragma unroll
          for (int s = 0; s < 3; ++s) {
            // strip s keeps H rows [0, TH + 2hk), i.e. a rows [10 - hk, TH + 10 + hk): skip blocks outside (uniform)
            if (16 * rb >= TH + 10 + hk[s]) continue;  // (10 - hk >= 0: no block lies wholly above them)
            float acc[4];
            mma_16816_c<IsBF16<T>::value>(acc, a0, bh[s][0], cb[s]);
            mma_16816<IsBF16<T>::value>(acc, a1, bh[s][1]);
            const int hrow = arow - 10 + hk[s];  // the lane's first row in H_k (origin -hk); second: + 8
            T* hp = Hk[s] + hrow * HLD + 8 * j + 2 * t;
            if (hrow >= 0 && hrow < TH + 2 * hk[s]) {
              const uint32_t pv = pack2<T>(yin0 && xin0 ? acc[0] : 0.f, yin0 && xin1 ? acc[1] : 0.f);
              *reinterpret_cast<uint32_t*>(hp) = pv;
              nonfinite_acc2<T>(nf, pv);
            }
            if (hrow + 8 >= 0 && hrow + 8 < TH + 2 * hk[s]) {
              const uint32_t pv = pack2<T>(yin1 && xin0 ? acc[2] : 0.f, yin1 && xin1 ? acc[3] : 0.f);
              *reinterpret_cast<uint32_t*>(hp + 8 * HLD) = pv;
              nonfinite_acc2<T>(nf, pv);
            }
          }
        }
      }
      // rows of the kx1 windows past the strip's own rows: zero (zero taps must not meet stale values)
      const int tail_lo[3] = {TH + 6, TH + 10, TH + 20}, tail_hi[3] = {THp + 8, THp + 24, THp + 24};
#pragma unroll
      for (int s = 0; s < 3; ++s)
        for (int r = tail_lo[s] + zr0; r < tail_hi[s]; r += zrpi)
          *reinterpret_cast<uint4*>(Hk[s] + r * HLD + 8 * zk) = make_uint4(0u, 0u, 0u, 0u);
    }
    __syncwarp();
    // ---- s = a + v7 + v11 + v21 + biases on the tile -> S[c] ---------------------------------------------------
    // Block (yb, xb): D[16 cols][8 rows] = sum over the strips of H_k^T[cols][row window] x T_k, over two
    // accumulators (bias sum in the first), then + a.
    {
      const float* bc = bs + (int64_t)c * 6;
      // window = H_k rows [y0-hk, y0-hk+16 or 32) for 8 output rows y0..
      const uint4* bq = band + ((size_t)c * MSCA_BAND_CHUNKS + 6) * 32 + lane;
      const uint4 q6 = bq[0], q7 = bq[32], q8 = bq[64];
      const uint32_t bv7[2] = {q6.x, q6.y};
      const uint32_t bv11[2][2] = {{q6.z, q6.w}, {q7.x, q7.y}};
      const uint32_t bv21[2][2] = {{q7.z, q7.w}, {q8.x, q8.y}};
      const float bsum = bc[1] + bc[3] + bc[5];
      const float cb[4] = {bsum, bsum, bsum, bsum};
      T* Sc = S + (size_t)c * gm.s_ld;
      // the lane's D elements: x = x0 + g + 8h, y = y0 + 2t + e (d[2h + e])
      const T* al = A + (2 * t + 10) * ALD + g + 10;
      T* sl = Sc + 2 * t * TW + g;
      const int kofs = kr * HLD + mc;
      for (int y0 = 0; y0 < TH; y0 += 8) {
        for (int x0 = 0; x0 < TW; x0 += 16) {
          float acc0[4], acc1[4] = {0.f, 0.f, 0.f, 0.f};
          uint32_t f[4];
          ldmatrix_x4<true>(f, H21 + y0 * HLD + x0 + kofs);
          mma_16816_c<IsBF16<T>::value>(acc0, f, bv21[0], cb);
          ldmatrix_x4<true>(f, H21 + (y0 + 16) * HLD + x0 + kofs);
          mma_16816<IsBF16<T>::value>(acc1, f, bv21[1]);
          ldmatrix_x4<true>(f, H11 + y0 * HLD + x0 + kofs);
          mma_16816<IsBF16<T>::value>(acc0, f, bv11[0]);
          ldmatrix_x4<true>(f, H11 + (y0 + 16) * HLD + x0 + kofs);
          mma_16816<IsBF16<T>::value>(acc1, f, bv11[1]);
          ldmatrix_x4<true>(f, H7 + y0 * HLD + x0 + kofs);
          mma_16816<IsBF16<T>::value>(acc0, f, bv7);
          const T* ap = al + y0 * ALD + x0;
          T* sp = sl + y0 * TW + x0;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const bool xin = !EDGE || (unsigned)(tile.x0 + x0 + g + 8 * h) < (unsigned)tile.W;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int y = y0 + 2 * t + e;
              if (y >= TH) continue;  // the partial last block of rows when TH % 8 == 4
              const bool in = xin && (!EDGE || (unsigned)(tile.y0 + y) < (unsigned)tile.H);
              const float sv = acc0[2 * h + e] + acc1[2 * h + e] + to_f(ap[e * ALD + 8 * h]);
              sp[e * TW + 8 * h] = in ? from_f<T>(sv) : zero;
            }
          }
        }
      }
    }
    if (warp_any(nonfinite_seen(nf))) {
      // a NaN or Inf in this channel's u tile, a or h_k: the banded products would spread it through zero taps
      // (0 * Inf = NaN). Redo the channel with the direct taps so that it propagates exactly as in eager PyTorch.
#ifdef SEGNEXT_EMU
      if (lane == 0) ++::emu::mma_direct_redos();  // the emulation tests check it stays 0 for finite inputs
#endif
      __syncwarp();
      load_u_tile_mma<T, EDGE>(U, gm, u_img + (int64_t)c * sC, sH, sW, tile);
      cp_async_wait<0>();  // (also waits for the next channel's tile when double-buffered: rare, harmless)
      __syncwarp();
      channel_s_direct<T>(U, A, H7, H11, H21, S + (size_t)c * gm.s_ld, gm, w0 + (int64_t)c * 25, b0[c],
                          ws + (int64_t)c * 78, bs + (int64_t)c * 6, tile);
    }
    if constexpr (SAVE_A) {
      if (as.ptr != nullptr) store_a_tile_mma<T, EDGE>(A, gm, as, c, tile);
    }
    __syncwarp();  // the next channel's u tile overwrites H
  }
  __syncthreads();
}

// Compute s for all channels of the tile into S[CP][s_ld] (rows >= C zeroed). Ends with a __syncthreads().
template <typename T, bool SAVE_A>
MSCA_DEV void compute_s_tile_mma(T* S, unsigned char* work_raw, const MscaGeom& gm, const T* __restrict__ u_img,
                                int64_t sC, int64_t sH, int64_t sW, const float* __restrict__ w0,
                                const float* __restrict__ b0, const float* __restrict__ ws,
                                const float* __restrict__ bs, const uint4* __restrict__ band, const TileCtx& tile,
                                const ASave& as) {
  const bool interior =
      tile.y0 >= 12 && tile.y0 + gm.TH + 12 <= tile.H && tile.x0 >= 12 && tile.x0 + gm.TW + 12 <= tile.W;
  if (interior)
    compute_s_tile_mma_impl<T, false, SAVE_A>(S, work_raw, gm, u_img, sC, sH, sW, w0, b0, ws, bs, band, tile, as);
  else
    compute_s_tile_mma_impl<T, true, SAVE_A>(S, work_raw, gm, u_img, sC, sH, sW, w0, b0, ws, bs, band, tile, as);
}

// s of the tile for the forward and backward-mix kernels (P: MscaFwdParams or MscaBwdParams; both hold u_dw, its
// strides and the packed weights): the tensor-core variant (DW_MMA, fp16/bf16; band fragments at gm.mma_band_off of
// p.workspace) or the FMA one (tf32: S rounded to TF32 for the TF32 channel mix). SAVE_A (backward mix kernel): also
// write a = dw5x5(u) + b0 of the tile's pixels to as.ptr (when not null) for the depthwise-backward kernel. Ends
// with a __syncthreads().
template <typename T, bool DW_MMA, bool SAVE_A = false, typename P>
MSCA_DEV void compute_s_tile(T* S, unsigned char* smem, const MscaGeom& gm, const P& p, const TileCtx& tile,
                                bool tf32, const ASave& as = ASave{}) {
  const T* udw_img = reinterpret_cast<const T*>(p.u_dw) + (int64_t)tile.b * p.udw_sB;
  if constexpr (DW_MMA)
    compute_s_tile_mma<T, SAVE_A>(S, smem + gm.s_bytes, gm, udw_img, p.udw_sC, p.udw_sH, p.udw_sW, p.w0, p.b0, p.ws,
                                 p.bs, reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(p.workspace) +
                                                                      gm.mma_band_off),
                                 tile, as);
  else
    compute_s_tile_fma<T, T, SAVE_A>(S, reinterpret_cast<float*>(smem + gm.s_bytes), gm, udw_img, p.udw_sC, p.udw_sH,
                                 p.udw_sW, p.w0, p.b0, p.ws, p.bs, tile, tf32, as);
}

}  // namespace msca

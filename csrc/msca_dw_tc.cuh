// The depthwise part of MSCA (5x5, then the 1xk and kx1 strips for k = 7, 11, 21, and their sum s) on tensor cores,
// for fp16/bf16 inputs: the "tc" variant of compute_s_tile (msca_common.cuh), used by the forward kernel and by the
// backward mix kernel when MscaGeom::tc is set (msca_fwd_plan / msca_bwd_plan decide; SEGNEXT_MSCA_CUDA_DW forces).
//
// Why: the FMA variant spends about 205 fp32 FMAs per output element on a 16x32 tile (103 taps plus the halo
// recompute), i.e. about twice the FMA floor of kernels.md section 2 before any overhead. Here every 1-D
// convolution over a row (or a column) of 8 outputs is a product with a banded (Toeplitz) matrix built from the taps
// (kernels.md section 2), run as mma.sync m16n8k16 with fp32 accumulation:
//   a    (5x5):  for each dy, D[rows][8 cols] += U[rows + dy][16-col window] x T_dy[16][8]     (5 k-steps)
//   h_k  (1xk):  D[rows][8 cols] += A[rows][32-col window] x T_k[32][8], the three strips sharing the A fragments
//   v_k  (kx1):  transposed, D[16 cols][8 rows] += H_k^T[16 cols][row window] x T_k[window][8] (ldmatrix.trans),
//                the three strips accumulating into one D = v7 + v11 + v21 (window 16 rows for k = 7, 32 else)
// The Toeplitz B fragments depend only on the lane and the channel: prep_band_kernel packs them once per launch from
// the fp32 weights (rounded to the input dtype, as eager's convolutions use them) into the workspace; each warp loads
// its lane's 36 registers per channel with 9 coalesced 16-byte loads.
// Tensor-core MACs per output element (16x32 tile): 420 (a) + 288 (h) + 80 (v), about 0.4 mma per output element
// and channel, against 205 FMA instructions per output element for the FMA variant. Counting the instructions of the
// code by hand (an estimate, not a measurement) gives about 8 warp instructions per output element and channel for
// this variant on a 16x16 tile, dominated by the mma blocks' epilogues and the tile load, against about 15 for the
// FMA variant; the FMA floor of kernels.md section 2 corresponds to 103 / 32 = 3.2. Tiles whose halo lies inside
// the image (most tiles of large images) skip the border masks (EDGE = false). Not measured yet.
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
// so the phases of a channel need only __syncwarp(); one __syncthreads() ends the tile. Row strides are odd
// multiples of 16 bytes (conflict-free ldmatrix). Needs TH % 4 == 0 and TW % 16 == 0 (msca_tile_tc_ok); with TH not a
// multiple of 8 the last block of 8 output rows is partial (THp = TH rounded up to 8 sizes the H_k windows).
#pragma once

#include "msca_common.cuh"

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

// Every banded B fragment of every channel, packed per lane by prep_band_kernel into the workspace (gm.tc_band_off):
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

// Store lo, hi rounded to T at p (4-byte aligned); nf += (stored values) * 0, i.e. nf turns NaN when a stored value is
// NaN or +-Inf, including a finite value that rounding to T overflows (fp16 beyond 65504).
template <typename T>
MSCA_DEV void store2_nf(T* p, float lo, float hi, float& nf) {
  const uint32_t v = pack2<T>(lo, hi);
  *reinterpret_cast<uint32_t*>(p) = v;
  const float2 r = unpack2<T>(v);
  nf = fmaf(r.y, 0.f, fmaf(r.x, 0.f, nf));
}

// One warp loads channel c's u tile (src = the channel's plane) into U: rows/cols [-12, TH+12) x [-12, TW+12) from
// the image, zero outside it and in the rest of the UH x UWc area. Rows of 4 contiguous elements (the usual NCHW
// case: sW == 1, W and sH multiples of 4, 8-byte aligned plane) move as one 8-byte load each: the tile origin
// x0 - 12 is a multiple of 4, so a group of 4 columns is wholly inside or wholly outside the image.
template <typename T, bool EDGE>
MSCA_DEV void load_u_tile_tc(T* U, const MscaGeom& gm, const T* __restrict__ src, int64_t sH, int64_t sW,
                             const TileCtx& tc) {
  const int lane = lane_id();
  const int UWc = gm.tc_UWc, ULD = gm.tc_ULD, LH = gm.TH + 24, LW = gm.TW + 24;
  if (sW == 1 && (sH & 3) == 0 && (tc.W & 3) == 0 && (reinterpret_cast<uintptr_t>(src) & 7) == 0) {
    // group index idx = r * gpr + q advances by 32 per iteration: step (r, q) without a division per element
    const int gpr = UWc >> 2, n = gm.tc_UH * gpr;
    const int dr = 32 / gpr, dq = 32 - dr * gpr;
    int r = lane / gpr, q = lane - r * gpr;
    for (int idx = lane; idx < n; idx += 32) {
      const int col = 4 * q;
      const int yy = tc.y0 - 12 + r, xx = tc.x0 - 12 + col;
      uint2 v = make_uint2(0u, 0u);
      if (r < LH && col < LW && (!EDGE || ((unsigned)yy < (unsigned)tc.H && (unsigned)xx < (unsigned)tc.W)))
        v = *reinterpret_cast<const uint2*>(src + (int64_t)yy * sH + xx);
      *reinterpret_cast<uint2*>(U + r * ULD + col) = v;
      r += dr;
      q += dq;
      if (q >= gpr) { q -= gpr; ++r; }
    }
    return;
  }
  const int n = gm.tc_UH * UWc;
  const int dr = 32 / UWc, dc = 32 - dr * UWc;
  int r = lane / UWc, col = lane - r * UWc;
  for (int idx = lane; idx < n; idx += 32) {
    const int yy = tc.y0 - 12 + r, xx = tc.x0 - 12 + col;
    T v = st_zero<T>();
    if (r < LH && col < LW && (!EDGE || ((unsigned)yy < (unsigned)tc.H && (unsigned)xx < (unsigned)tc.W)))
      v = src[(int64_t)yy * sH + (int64_t)xx * sW];
    U[r * ULD + col] = v;
    r += dr;
    col += dc;
    if (col >= UWc) { col -= UWc; ++r; }
  }
}

// s of one channel with the direct taps (no banded products), on the same buffers and with the same roundings as
// compute_s_tile_tc: the path for tiles with a NaN or Inf, which then propagates exactly as in eager PyTorch. One
// warp; U holds the u tile; writes A, then H_k (over U), then Sc. Slow (scalar), and rare.
template <typename T>
MSCA_DEV void channel_s_direct(const T* U, T* A, T* H7, T* H11, T* H21, T* Sc, const MscaGeom& gm,
                               const float* __restrict__ w0c, float b0c, const float* __restrict__ wc,
                               const float* __restrict__ bc, const TileCtx& tc) {
  const int lane = lane_id();
  const int TH = gm.TH, TW = gm.TW, ULD = gm.tc_ULD, ALD = gm.tc_ALD, HLD = gm.tc_HLD;
  // a on rows/cols [-10, TH+10) x [-10, TW+10)
  for (int idx = lane; idx < (TH + 20) * (TW + 20); idx += 32) {
    const int r = idx / (TW + 20), col = idx - r * (TW + 20);
    const bool in = (unsigned)(tc.y0 - 10 + r) < (unsigned)tc.H && (unsigned)(tc.x0 - 10 + col) < (unsigned)tc.W;
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
      const bool in = hrow < TH + 2 * hk[s] && (unsigned)(tc.y0 + y) < (unsigned)tc.H &&
                      (unsigned)(tc.x0 + x) < (unsigned)tc.W;
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
    const bool in = (unsigned)(tc.y0 + y) < (unsigned)tc.H && (unsigned)(tc.x0 + x) < (unsigned)tc.W;
    Sc[y * TW + x] = in ? from_f<T>(acc + to_f(A[(y + 10) * ALD + x + 10]) + bsum) : st_zero<T>();
  }
}

// compute_s_tile_tc for one tile; EDGE = false: the u tile with its 12-pixel halo lies inside the image, so no value
// needs the image-border masks (the a rows/columns computed past the needed ones are finite and meet only zero taps).
template <typename T, bool EDGE>
MSCA_DEV void compute_s_tile_tc_impl(T* S, unsigned char* work_raw, const MscaGeom& gm, const T* __restrict__ u_img,
                                int64_t sC, int64_t sH, int64_t sW, const float* __restrict__ w0,
                                const float* __restrict__ b0, const float* __restrict__ ws,
                                const float* __restrict__ bs, const uint4* __restrict__ band, const TileCtx& tc) {
  zero_s_padding<T>(S, gm, tc);
  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int g = lane >> 2, t = lane & 3;
  const int TH = gm.TH, TW = gm.TW, MA = gm.tc_MA, NBA = gm.tc_nbA;
  const int ULD = gm.tc_ULD, ALD = gm.tc_ALD, HLD = gm.tc_HLD;
  T* wk = reinterpret_cast<T*>(work_raw) + (size_t)warp * gm.tc_warp;
  T* U = wk;
  T* H21 = wk;
  T* H11 = wk + gm.tc_off_h11;
  T* H7 = wk + gm.tc_off_h7;
  T* A = wk + gm.tc_off_a;
  // ldmatrix row addresses: non-transposed A operand (rows m, 16-byte k chunks) and transposed A operand (rows k)
  const int lr = (lane & 7) + ((lane >> 3) & 1) * 8, lc = (lane >> 4) * 8;
  const int kr = (lane & 7) + ((lane >> 4) & 1) * 8, mc = ((lane >> 3) & 1) * 8;
  const T zero = st_zero<T>();

  for (int c = warp; c < tc.C; c += MSCA_NT / 32) {
    // ---- u tile: rows/cols [-12, TH+12) x [-12, TW+12) from the image, zero elsewhere ----------------------------
    load_u_tile_tc<T, EDGE>(U, gm, u_img + (int64_t)c * sC, sH, sW, tc);
    // a NaN or Inf in u always reaches a stored value of a (every loaded pixel is within 2 of a computed one). nf
    // collects v * 0 of every stored a and h_k value as rounded to T: it stays 0 unless one of them is NaN or +-Inf
    // (also after an fp16 overflow in the rounding, which eager's fp16 convolutions make as well).
    float nf = 0.f;
    __syncwarp();
    // ---- a = dw5x5(u) + b0 on rows [-10, MA-10), cols [-10, 8*NBA-10); zero outside the image ---------------------
    {
      const uint4* bq = band + (size_t)c * MSCA_BAND_CHUNKS * 32 + lane;
      const uint4 q0 = bq[0], q1 = bq[32], q2 = bq[64];
      const uint32_t bw[5][2] = {{q0.x, q0.y}, {q0.z, q0.w}, {q1.x, q1.y}, {q1.z, q1.w}, {q2.x, q2.y}};
      const float bias = b0[c];
      for (int it = 0; it < (MA >> 4) * NBA; ++it) {
        const int rb = it / NBA, i = it - rb * NBA;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int dy = 0; dy < 5; ++dy) {
          uint32_t a[4];
          ldmatrix_x4<false>(a, U + (16 * rb + dy + lr) * ULD + 8 * i + lc);
          mma_16816<IsBF16<T>::value>(acc, a, bw[dy]);
        }
        const int col = 8 * i + 2 * t, x = tc.x0 - 10 + col;
        const bool xin0 = !EDGE || (unsigned)x < (unsigned)tc.W, xin1 = !EDGE || (unsigned)(x + 1) < (unsigned)tc.W;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = 16 * rb + g + 8 * h;
          const bool yin = !EDGE || (unsigned)(tc.y0 - 10 + row) < (unsigned)tc.H;
          const float v0 = yin && xin0 ? acc[2 * h] + bias : 0.f, v1 = yin && xin1 ? acc[2 * h + 1] + bias : 0.f;
          store2_nf<T>(A + row * ALD + col, v0, v1, nf);
        }
      }
    }
    __syncwarp();
    // ---- h_k = dw_1xk(a) + bh_k on tile cols [0, TW), rows [-hk, TH+hk); zero outside the image -------------------
    {
      const float* bc = bs + (int64_t)c * 6;
      // strip (7, 11, 21), k-step, reg; window = a cols [x0-10, x0+22) for 8 outputs at x0
      const uint4* bq = band + ((size_t)c * MSCA_BAND_CHUNKS + 3) * 32 + lane;
      const uint4 q3 = bq[0], q4 = bq[32], q5 = bq[64];
      const uint32_t bh[3][2][2] = {{{q3.x, q3.y}, {q3.z, q3.w}}, {{q4.x, q4.y}, {q4.z, q4.w}},
                                    {{q5.x, q5.y}, {q5.z, q5.w}}};
      const float bias[3] = {bc[0], bc[2], bc[4]};
      const int hk[3] = {3, 5, 10};
      T* Hk[3] = {H7, H11, H21};
      const int nbh = TW >> 3;
      for (int it = 0; it < (MA >> 4) * nbh; ++it) {
        const int rb = it / nbh, j = it - rb * nbh;
        uint32_t a0[4], a1[4];
        ldmatrix_x4<false>(a0, A + (16 * rb + lr) * ALD + 8 * j + lc);
        ldmatrix_x4<false>(a1, A + (16 * rb + lr) * ALD + 8 * j + 16 + lc);
        const int col = 8 * j + 2 * t, x = tc.x0 + col;
        const bool xin0 = !EDGE || (unsigned)x < (unsigned)tc.W, xin1 = !EDGE || (unsigned)(x + 1) < (unsigned)tc.W;
#pragma unroll
        for (int s = 0; s < 3; ++s) {
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
          mma_16816<IsBF16<T>::value>(acc, a0, bh[s][0]);
          mma_16816<IsBF16<T>::value>(acc, a1, bh[s][1]);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int arow = 16 * rb + g + 8 * h;       // a buffer row, image row y0 - 10 + arow
            const int hrow = arow - 10 + hk[s];         // row in H_k (origin -hk)
            if (hrow < 0 || hrow >= TH + 2 * hk[s]) continue;
            const bool yin = !EDGE || (unsigned)(tc.y0 - 10 + arow) < (unsigned)tc.H;
            const float v0 = yin && xin0 ? acc[2 * h] + bias[s] : 0.f;
            const float v1 = yin && xin1 ? acc[2 * h + 1] + bias[s] : 0.f;
            store2_nf<T>(Hk[s] + hrow * HLD + col, v0, v1, nf);
          }
        }
      }
      // rows of the kx1 windows past the strip's own rows: zero (zero taps must not meet stale values)
      const int THp = (TH + 7) / 8 * 8;
      const int tail_lo[3] = {TH + 6, TH + 10, TH + 20}, tail_hi[3] = {THp + 8, THp + 24, THp + 24};
#pragma unroll
      for (int s = 0; s < 3; ++s) {
        const int n = (tail_hi[s] - tail_lo[s]) * TW;
        for (int idx = lane; idx < n; idx += 32) {
          const int r = idx / TW, col = idx - r * TW;
          Hk[s][(tail_lo[s] + r) * HLD + col] = zero;
        }
      }
    }
    __syncwarp();
    // ---- s = a + v7 + v11 + v21 + biases on the tile -> S[c] ---------------------------------------------------
    {
      const float* bc = bs + (int64_t)c * 6;
      // window = H_k rows [y0-hk, y0-hk+16 or 32) for 8 output rows y0..
      const uint4* bq = band + ((size_t)c * MSCA_BAND_CHUNKS + 6) * 32 + lane;
      const uint4 q6 = bq[0], q7 = bq[32], q8 = bq[64];
      const uint32_t bv7[2] = {q6.x, q6.y};
      const uint32_t bv11[2][2] = {{q6.z, q6.w}, {q7.x, q7.y}};
      const uint32_t bv21[2][2] = {{q7.z, q7.w}, {q8.x, q8.y}};
      const float bsum = bc[1] + bc[3] + bc[5];
      T* Sc = S + (size_t)c * gm.s_ld;
      const int nbx = TW >> 4;
      for (int it = 0; it < ((TH + 7) >> 3) * nbx; ++it) {
        const int yb = it / nbx, xb = it - yb * nbx;
        const int y0 = 8 * yb, x0 = 16 * xb;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        uint32_t a[4];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          ldmatrix_x4<true>(a, H21 + (y0 + 16 * q + kr) * HLD + x0 + mc);
          mma_16816<IsBF16<T>::value>(acc, a, bv21[q]);
          ldmatrix_x4<true>(a, H11 + (y0 + 16 * q + kr) * HLD + x0 + mc);
          mma_16816<IsBF16<T>::value>(acc, a, bv11[q]);
        }
        ldmatrix_x4<true>(a, H7 + (y0 + kr) * HLD + x0 + mc);
        mma_16816<IsBF16<T>::value>(acc, a, bv7);
        // D[m = col x][n = row y]: d[2h + e] at x = x0 + g + 8h, y = y0 + 2t + e
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int x = x0 + g + 8 * h;
          const bool xin = !EDGE || (unsigned)(tc.x0 + x) < (unsigned)tc.W;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int y = y0 + 2 * t + e;
            if (y >= TH) continue;  // the partial last block of rows when TH % 8 == 4
            const bool in = xin && (!EDGE || (unsigned)(tc.y0 + y) < (unsigned)tc.H);
            const float sv = acc[2 * h + e] + to_f(A[(y + 10) * ALD + x + 10]) + bsum;
            Sc[y * TW + x] = in ? from_f<T>(sv) : zero;
          }
        }
      }
    }
    if (warp_any(nf != 0.f)) {
      // a NaN or Inf in this channel's u tile, a or h_k: the banded products would spread it through zero taps
      // (0 * Inf = NaN). Redo the channel with the direct taps so that it propagates exactly as in eager PyTorch.
      __syncwarp();
      load_u_tile_tc<T, EDGE>(U, gm, u_img + (int64_t)c * sC, sH, sW, tc);
      __syncwarp();
      channel_s_direct<T>(U, A, H7, H11, H21, S + (size_t)c * gm.s_ld, gm, w0 + (int64_t)c * 25, b0[c],
                          ws + (int64_t)c * 78, bs + (int64_t)c * 6, tc);
    }
    __syncwarp();  // the next channel's u tile overwrites H
  }
  __syncthreads();
}

// Compute s for all channels of the tile into S[CP][s_ld] (rows >= C zeroed). Ends with a __syncthreads().
template <typename T>
MSCA_DEV void compute_s_tile_tc(T* S, unsigned char* work_raw, const MscaGeom& gm, const T* __restrict__ u_img,
                                int64_t sC, int64_t sH, int64_t sW, const float* __restrict__ w0,
                                const float* __restrict__ b0, const float* __restrict__ ws,
                                const float* __restrict__ bs, const uint4* __restrict__ band, const TileCtx& tc) {
  const bool interior = tc.y0 >= 12 && tc.y0 + gm.TH + 12 <= tc.H && tc.x0 >= 12 && tc.x0 + gm.TW + 12 <= tc.W;
  if (interior)
    compute_s_tile_tc_impl<T, false>(S, work_raw, gm, u_img, sC, sH, sW, w0, b0, ws, bs, band, tc);
  else
    compute_s_tile_tc_impl<T, true>(S, work_raw, gm, u_img, sC, sH, sW, w0, b0, ws, bs, band, tc);
}

// s of the tile for the forward and backward-mix kernels (P: MscaFwdParams or MscaBwdParams; both hold u_dw, its
// strides and the packed weights): the tensor-core variant (TC, fp16/bf16; band fragments at gm.tc_band_off of
// p.workspace) or the FMA one (tf32: S rounded to TF32 for the TF32 channel mix). Ends with a __syncthreads().
template <typename T, bool TC, typename P>
MSCA_DEV void compute_s_tile_of(T* S, unsigned char* smem, const MscaGeom& gm, const P& p, const TileCtx& tc,
                                bool tf32) {
  const T* udw_img = reinterpret_cast<const T*>(p.u_dw) + (int64_t)tc.b * p.udw_sB;
  if constexpr (TC)
    compute_s_tile_tc<T>(S, smem + gm.s_bytes, gm, udw_img, p.udw_sC, p.udw_sH, p.udw_sW, p.w0, p.b0, p.ws, p.bs,
                         reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(p.workspace) +
                                                        gm.tc_band_off),
                         tc);
  else
    compute_s_tile<T, T>(S, reinterpret_cast<float*>(smem + gm.s_bytes), gm, udw_img, p.udw_sC, p.udw_sH, p.udw_sW,
                         p.w0, p.b0, p.ws, p.bs, tc, tf32);
}

}  // namespace msca

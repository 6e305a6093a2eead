// Device building blocks shared by msca_fwd.cu and msca_bwd.cu: the depthwise phases on a spatial tile and the
// warp-level GEMMs of the 1x1 channel mix. Generic helpers (dtype conversion, mma.sync / ldmatrix wrappers, warp
// reductions, the emulation switch SEGNEXT_EMU) live in cuda_common.cuh.
#pragma once

#include "common/cuda_common.cuh"
#include "msca/msca_params.h"

#define MSCA_DYN_SMEM SK_DYN_SMEM
#define MSCA_LAUNCH SK_LAUNCH
#define MSCA_SET_SMEM_ATTR SK_SET_SMEM_ATTR
#define MSCA_DEV SK_DEV

namespace msca {

using namespace ::sk;

// ------------------------------------------------------------------------------------------------------------------
// ST: the element type of s / d_att in shared memory (half types stay half, fp32 stays fp32). GEMM mode: 0 =
// fp16/bf16 m16n8k16 tensor cores, 1 = TF32 m16n8k8 tensor cores, 2 = exact fp32 FMA.
// ------------------------------------------------------------------------------------------------------------------
// Store a float into S / DATT: half types round to nearest even, fp32 rounds to TF32 when the GEMM runs on TF32.
template <typename ST> MSCA_DEV ST to_st(float x, bool tf32);
template <> MSCA_DEV float to_st<float>(float x, bool tf32) { return tf32 ? tf32_round(x) : x; }
template <> MSCA_DEV __half to_st<__half>(float x, bool) { return __float2half_rn(x); }
template <> MSCA_DEV __nv_bfloat16 to_st<__nv_bfloat16>(float x, bool) { return __float2bfloat16_rn(x); }

template <typename ST> MSCA_DEV ST st_zero();
template <> MSCA_DEV float st_zero<float>() { return 0.f; }
template <> MSCA_DEV __half st_zero<__half>() { return __float2half_rn(0.f); }
template <> MSCA_DEV __nv_bfloat16 st_zero<__nv_bfloat16>() { return __float2bfloat16_rn(0.f); }

// ------------------------------------------------------------------------------------------------------------------
// Packed conv3 weight (the A operand of the channel-mix GEMMs), written by prep_w3_kernel, read with one 16-byte
// load per lane and k-step. A[m][k] = transpose ? w3[k][m] : w3[m][k], zero outside [0,C)^2, padded to CP x CP.
//   mode 0 (fp16/bf16): uint32 [CP/16 m-tiles][CP/16 k-tiles][32 lanes][4 regs], each reg two halves (fragment
//                       layouts: common/cuda_common.cuh)
//   mode 1 (tf32):      float  [CP/16][CP/8][32][4] (rounded to TF32)
//   mode 2 (fp32 FMA):  float  [CP/16][CP/4][16 rows][4 k]
// ------------------------------------------------------------------------------------------------------------------

template <typename T, int MODE>
__global__ void __launch_bounds__(256) prep_w3_kernel(const float* __restrict__ w3, int C, int CP, int transpose,
                                                      void* __restrict__ dst) {
  const long long total = (long long)CP * CP / (MODE == 0 ? 2 : 1);
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    auto W = [&](int m, int k) -> float {
      if (m >= C || k >= C) return 0.f;
      return transpose ? w3[(long long)k * C + m] : w3[(long long)m * C + k];
    };
    if constexpr (MODE == 0) {  // constexpr: pack2 exists for 16-bit T only
      const int r = (int)(e & 3), ln = (int)((e >> 2) & 31);
      const long long tile = e >> 7;  // mt * KT + kt
      const int KT = CP / 16;
      const int mt = (int)(tile / KT), kt = (int)(tile % KT);
      const int g = ln >> 2, t = ln & 3;
      const int m = mt * 16 + g + 8 * (r & 1), k = kt * 16 + 2 * t + 8 * (r >> 1);
      reinterpret_cast<uint32_t*>(dst)[e] = pack2<T>(W(m, k), W(m, k + 1));
    } else if (MODE == 1) {
      const int r = (int)(e & 3), ln = (int)((e >> 2) & 31);
      const long long tile = e >> 7;
      const int KT = CP / 8;
      const int mt = (int)(tile / KT), kt = (int)(tile % KT);
      const int g = ln >> 2, t = ln & 3;
      const int m = mt * 16 + g + 8 * (r & 1), k = kt * 8 + t + 4 * (r >> 1);
      reinterpret_cast<float*>(dst)[e] = tf32_round(W(m, k));
    } else {
      const int kk = (int)(e & 3), row = (int)((e >> 2) & 15);
      const long long tile = e >> 6;
      const int K4 = CP / 4;
      const int mt = (int)(tile / K4), k4 = (int)(tile % K4);
      reinterpret_cast<float*>(dst)[e] = W(mt * 16 + row, k4 * 4 + kk);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Warp GEMM: 32 (M) x 32 (N) warp tile, acc[i][j][r] = D fragment r of m-tile i (rows m0+16i..) and n-tile j
// (cols n0+8j..). Element (i,j,r) sits at row m0 + 16i + g + 8(r>>1), col n0 + 8j + 2t + (r&1).
// ------------------------------------------------------------------------------------------------------------------
MSCA_DEV void acc_zero(float acc[2][4][4]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
}

// D[m][n] += sum_k A[m][k] * B[k][n]; A = packed conv3 weight (global, mode layout above), m-tiles mt0, mt0+1;
// B in shared memory, row-major [k][n] with row stride ldb elements (k = channel rows of S / DATT, n = pixels).
template <typename ST, int MODE>
MSCA_DEV void gemm_packedA_smemKN(float acc[2][4][4], const void* __restrict__ Apack, int mt0, int CP,
                                  const ST* Bs, int ldb, int n0) {
  const int lane = lane_id();
  const int g = lane >> 2, t = lane & 3;
  if constexpr (MODE == 0) {
    const int KT = CP / 16;
    const uint4* A0 = reinterpret_cast<const uint4*>(Apack) + ((size_t)mt0 * KT) * 32 + lane;
    const uint4* A1 = A0 + (size_t)KT * 32;
    // ldmatrix.trans row address: matrix mi = lane>>3 covers k-half (mi&1), n-half (mi>>1)
    const ST* brow = Bs + (size_t)((lane & 7) + ((lane >> 3) & 1) * 8) * ldb + n0 + (lane >> 4) * 8;
    uint4 a0n = A0[0], a1n = A1[0];
    for (int kt = 0; kt < KT; ++kt) {
      const uint32_t a0[4] = {a0n.x, a0n.y, a0n.z, a0n.w};
      const uint32_t a1[4] = {a1n.x, a1n.y, a1n.z, a1n.w};
      if (kt + 1 < KT) { a0n = A0[(kt + 1) * 32]; a1n = A1[(kt + 1) * 32]; }
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        uint32_t b[4];
        ldmatrix_x4<true>(b, brow + (size_t)kt * 16 * ldb + jj * 16);
        const uint32_t b0[2] = {b[0], b[1]};
        const uint32_t b1[2] = {b[2], b[3]};
        mma_16816<IsBF16<ST>::value>(acc[0][2 * jj], a0, b0);
        mma_16816<IsBF16<ST>::value>(acc[0][2 * jj + 1], a0, b1);
        mma_16816<IsBF16<ST>::value>(acc[1][2 * jj], a1, b0);
        mma_16816<IsBF16<ST>::value>(acc[1][2 * jj + 1], a1, b1);
      }
    }
  } else if constexpr (MODE == 1) {
    const int KT = CP / 8;
    const uint4* A0 = reinterpret_cast<const uint4*>(Apack) + ((size_t)mt0 * KT) * 32 + lane;
    const uint4* A1 = A0 + (size_t)KT * 32;
    uint4 a0n = A0[0], a1n = A1[0];
    for (int kt = 0; kt < KT; ++kt) {
      const uint32_t a0[4] = {a0n.x, a0n.y, a0n.z, a0n.w};
      const uint32_t a1[4] = {a1n.x, a1n.y, a1n.z, a1n.w};
      if (kt + 1 < KT) { a0n = A0[(kt + 1) * 32]; a1n = A1[(kt + 1) * 32]; }
      const float* b_lo = reinterpret_cast<const float*>(Bs) + (size_t)(kt * 8 + t) * ldb + n0 + g;
      const float* b_hi = b_lo + (size_t)4 * ldb;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t b[2] = {__float_as_uint(b_lo[8 * j]), __float_as_uint(b_hi[8 * j])};
        mma_1688_tf32(acc[0][j], a0, b);
        mma_1688_tf32(acc[1][j], a1, b);
      }
    }
  } else {
    const int K4 = CP / 4;
    const float4* A0 = reinterpret_cast<const float4*>(Apack) + (size_t)mt0 * K4 * 16;
    const float4* A1 = A0 + (size_t)K4 * 16;
    const float* bcol = reinterpret_cast<const float*>(Bs) + n0 + 2 * t;
    for (int k4 = 0; k4 < K4; ++k4) {
      const float4 a0l = A0[k4 * 16 + g], a0h = A0[k4 * 16 + g + 8];
      const float4 a1l = A1[k4 * 16 + g], a1h = A1[k4 * 16 + g + 8];
      const float a0lo[4] = {a0l.x, a0l.y, a0l.z, a0l.w}, a0hi[4] = {a0h.x, a0h.y, a0h.z, a0h.w};
      const float a1lo[4] = {a1l.x, a1l.y, a1l.z, a1l.w}, a1hi[4] = {a1h.x, a1h.y, a1h.z, a1h.w};
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const float* brow = bcol + (size_t)(k4 * 4 + kk) * ldb;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 b = *reinterpret_cast<const float2*>(brow + 8 * j);
          acc[0][j][0] = fmaf(a0lo[kk], b.x, acc[0][j][0]);
          acc[0][j][1] = fmaf(a0lo[kk], b.y, acc[0][j][1]);
          acc[0][j][2] = fmaf(a0hi[kk], b.x, acc[0][j][2]);
          acc[0][j][3] = fmaf(a0hi[kk], b.y, acc[0][j][3]);
          acc[1][j][0] = fmaf(a1lo[kk], b.x, acc[1][j][0]);
          acc[1][j][1] = fmaf(a1lo[kk], b.y, acc[1][j][1]);
          acc[1][j][2] = fmaf(a1hi[kk], b.x, acc[1][j][2]);
          acc[1][j][3] = fmaf(a1hi[kk], b.y, acc[1][j][3]);
        }
      }
    }
  }
}

// D[m][n] += sum_k A[m][k] * B[n][k]; both operands in shared memory with k contiguous: A rows m (row stride lda),
// B rows n (row stride ldb); K a multiple of 32. Used for dw3 = d_att x s^T (k = pixels).
template <typename ST, int MODE>
MSCA_DEV void gemm_smemMK_smemNK(float acc[2][4][4], const ST* As, int lda, int m0, const ST* Bs, int ldb, int n0,
                                 int K) {
  const int lane = lane_id();
  const int g = lane >> 2, t = lane & 3;
  if constexpr (MODE == 0) {
    // A matrices: mi = lane>>3 -> m-half (mi&1), k-half (mi>>1) = a[0..3]
    const ST* arow = As + (size_t)(m0 + (lane & 7) + ((lane >> 3) & 1) * 8) * lda + (lane >> 4) * 8;
    // B matrices: mi -> n-half (mi>>1), k-half (mi&1) = {b0, b1} of n-tile 2jj, {b0, b1} of n-tile 2jj+1
    const ST* brow = Bs + (size_t)(n0 + (lane & 7) + (lane >> 4) * 8) * ldb + ((lane >> 3) & 1) * 8;
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4<false>(a0, arow + k0);
      ldmatrix_x4<false>(a1, arow + (size_t)16 * lda + k0);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        uint32_t b[4];
        ldmatrix_x4<false>(b, brow + (size_t)jj * 16 * ldb + k0);
        const uint32_t b0[2] = {b[0], b[1]};
        const uint32_t b1[2] = {b[2], b[3]};
        mma_16816<IsBF16<ST>::value>(acc[0][2 * jj], a0, b0);
        mma_16816<IsBF16<ST>::value>(acc[0][2 * jj + 1], a0, b1);
        mma_16816<IsBF16<ST>::value>(acc[1][2 * jj], a1, b0);
        mma_16816<IsBF16<ST>::value>(acc[1][2 * jj + 1], a1, b1);
      }
    }
  } else if constexpr (MODE == 1) {
    const float* A = reinterpret_cast<const float*>(As);
    const float* B = reinterpret_cast<const float*>(Bs);
    for (int k0 = 0; k0 < K; k0 += 8) {
      uint32_t a[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float* r0 = A + (size_t)(m0 + 16 * i + g) * lda + k0 + t;
        const float* r1 = r0 + (size_t)8 * lda;
        a[i][0] = __float_as_uint(r0[0]);
        a[i][1] = __float_as_uint(r1[0]);
        a[i][2] = __float_as_uint(r0[4]);
        a[i][3] = __float_as_uint(r1[4]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float* br = B + (size_t)(n0 + 8 * j + g) * ldb + k0 + t;
        const uint32_t b[2] = {__float_as_uint(br[0]), __float_as_uint(br[4])};
        mma_1688_tf32(acc[0][j], a[0], b);
        mma_1688_tf32(acc[1][j], a[1], b);
      }
    }
  } else {
    const float* A = reinterpret_cast<const float*>(As);
    const float* B = reinterpret_cast<const float*>(Bs);
    for (int k0 = 0; k0 < K; k0 += 4) {
      float4 a[2][2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          a[i][h] = *reinterpret_cast<const float4*>(A + (size_t)(m0 + 16 * i + g + 8 * h) * lda + k0);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 b = *reinterpret_cast<const float4*>(B + (size_t)(n0 + 8 * j + 2 * t + e) * ldb + k0);
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float s = acc[i][j][2 * h + e];
              s = fmaf(a[i][h].x, b.x, s);
              s = fmaf(a[i][h].y, b.y, s);
              s = fmaf(a[i][h].z, b.z, s);
              s = fmaf(a[i][h].w, b.w, s);
              acc[i][j][2 * h + e] = s;
            }
        }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Depthwise phases on one spatial tile. The CTA processes G channels at a time; thread tid works on channel
// gi = tid / NTC of the group with index t = tid % NTC inside it (NTC is a multiple of 32, so each warp stays on one
// channel and loads that channel's weights into registers once per phase).
// ------------------------------------------------------------------------------------------------------------------
struct TileCtx {
  int b;           // image
  int y0, x0;      // tile origin (pixels)
  int H, W, C;
};

// The three strips k = 7, 11, 21 (radius k / 2): offsets of their taps in a channel's packed ws row and of their
// biases in its bs row (msca_params.h), 1xk then kx1.
__host__ __device__ constexpr int ws_off_1xk(int k) { return k == 7 ? 0 : (k == 11 ? 14 : 36); }
__host__ __device__ constexpr int ws_off_kx1(int k) { return ws_off_1xk(k) + k; }
__host__ __device__ constexpr int bs_idx_1xk(int k) { return k == 7 ? 0 : (k == 11 ? 2 : 4); }

// Where the backward mix kernel writes a = dw5x5(u) + b0 for the depthwise-backward kernel (B, C, H, W) in the input
// dtype, strides in elements; ptr == nullptr: not written.
struct ASave {
  void* ptr = nullptr;
  int64_t sB = 0, sC = 0, sH = 0, sW = 0;
};

// Load a (TH+24) x (TW+24) tile (origin -12,-12) of channels [cbase, cbase+G) of one image of a dtype-T tensor into
// the channel work areas at float offset `dst_off`; zero outside the image and for channels >= C.
// src: pointer to the image (already offset by b * sB). Channels-last tensors (sC == 1) map consecutive threads to
// consecutive channels for coalescing, others to consecutive columns.
template <typename T>
MSCA_DEV void load_tile_group(float* work, const MscaGeom& gm, int dst_off, const T* __restrict__ src, int64_t sC,
                              int64_t sH, int64_t sW, int cbase, const TileCtx& tile) {
  const int tid = threadIdx.x;
  const int UH = gm.UH, UW = gm.UW;
  const int n = UH * UW;
  if (sC == 1 && tile.C > 1) {
    for (int idx = tid; idx < gm.G * n; idx += MSCA_NT) {
      const int gi = idx % gm.G, pix = idx / gm.G;
      const int r = pix / UW, col = pix - r * UW;
      const int c = cbase + gi, yy = tile.y0 - 12 + r, xx = tile.x0 - 12 + col;
      float v = 0.f;
      if (c < tile.C && (unsigned)yy < (unsigned)tile.H && (unsigned)xx < (unsigned)tile.W)
        v = to_f(src[(int64_t)c * sC + (int64_t)yy * sH + (int64_t)xx * sW]);
      work[gi * gm.ch_floats + dst_off + pix] = v;
    }
  } else {
    const int gi = tid / gm.NTC, t = tid % gm.NTC;
    const int c = cbase + gi;
    const bool cv = c < tile.C;
    const T* s = src + (int64_t)(cv ? c : 0) * sC;
    float* d = work + gi * gm.ch_floats + dst_off;
    // pix = r * UW + col advances by NTC per iteration: step (r, col) without a division per element
    const int dr = gm.NTC / UW, dc = gm.NTC - dr * UW;
    int r = t / UW, col = t - r * UW;
    for (int pix = t; pix < n; pix += gm.NTC) {
      const int yy = tile.y0 - 12 + r, xx = tile.x0 - 12 + col;
      float v = 0.f;
      if (cv && (unsigned)yy < (unsigned)tile.H && (unsigned)xx < (unsigned)tile.W)
        v = to_f(s[(int64_t)yy * sH + (int64_t)xx * sW]);
      d[pix] = v;
      r += dr;
      col += dc;
      if (col >= UW) { col -= UW; ++r; }
    }
  }
}

// a = conv5x5(u) + b0 on rows/cols [-10, T+10) of the tile; zero outside the image. Items: 2 rows x 4 cols.
MSCA_DEV void phase_a(const float* U, float* A, const MscaGeom& gm, const float* __restrict__ w0,
                      const float* __restrict__ b0, int c, bool cv, int t, const TileCtx& tile) {
  float w[25];
#pragma unroll
  for (int i = 0; i < 25; ++i) w[i] = cv ? w0[(int64_t)c * 25 + i] : 0.f;
  const float bias = cv ? b0[c] : 0.f;
  const int nq = gm.AW >> 2;
  const int nitems = (gm.AH >> 1) * nq;
  const int UW = gm.UW, AW = gm.AW;
  for (int it = t; it < nitems; it += gm.NTC) {
    const int ar = (it / nq) * 2, ac = (it % nq) * 4;
    float acc[2][4];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][e] = 0.f;
#pragma unroll
    for (int ir = 0; ir < 6; ++ir) {
      const float4* row = reinterpret_cast<const float4*>(U + (ar + ir) * UW + ac);
      const float4 v0 = row[0], v1 = row[1];
      const float in[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int dy = ir - r;
        if (dy < 0 || dy > 4) continue;
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int dx = 0; dx < 5; ++dx) acc[r][e] = fmaf(w[dy * 5 + dx], in[e + dx], acc[r][e]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int y = tile.y0 - 10 + ar + r;
      const bool rin = (unsigned)y < (unsigned)tile.H;
      float o[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int x = tile.x0 - 10 + ac + e;
        o[e] = (rin && (unsigned)x < (unsigned)tile.W) ? acc[r][e] + bias : 0.f;
      }
      *reinterpret_cast<float4*>(A + (ar + r) * AW + ac) = make_float4(o[0], o[1], o[2], o[3]);
    }
  }
}

// The 1xk strip with K taps on one item of phase_h: a[24] holds a row of a from col xc - 10, h_k = bias + the K taps on
// cols xc..xc+3 (zero where in[] is false), stored to row ar - (10 - K/2) of H_k (its rows start at -K/2) when
// tile row ar - 10 is one of h_k's rows [-K/2, TH + K/2).
template <int K>
MSCA_DEV void h_strip(const float (&a)[24], const float (&w)[K], float bias, const bool (&in)[4], float* Hk, int ar,
                      int TH, int HS, int xc) {
  constexpr int skip = 10 - K / 2;  // rows of a above h_k's first row
  if (skip > 0 && (ar < skip || ar >= TH + 20 - skip)) return;
  float o[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float s = bias;
#pragma unroll
    for (int j = 0; j < K; ++j) s = fmaf(w[j], a[e + skip + j], s);
    o[e] = in[e] ? s : 0.f;
  }
  *reinterpret_cast<float4*>(Hk + (ar - skip) * HS + xc) = make_float4(o[0], o[1], o[2], o[3]);
}

// The three horizontal strips on tile cols [0, TW): h21 on rows [-10, TH+10), h11 on [-5, TH+5), h7 on [-3, TH+3);
// zero outside the image. Item: one row of a, 4 output columns; the 24 a values loaded serve all three strips.
MSCA_DEV void phase_h(const float* A, float* H21, float* H11, float* H7, const MscaGeom& gm,
                      const float* __restrict__ ws, const float* __restrict__ bs, int c, bool cv, int t,
                      const TileCtx& tile) {
  float w7[7], w11[11], w21[21];
  const float* wc = ws + (int64_t)(cv ? c : 0) * 78;
#pragma unroll
  for (int j = 0; j < 7; ++j) w7[j] = cv ? wc[ws_off_1xk(7) + j] : 0.f;
#pragma unroll
  for (int j = 0; j < 11; ++j) w11[j] = cv ? wc[ws_off_1xk(11) + j] : 0.f;
#pragma unroll
  for (int j = 0; j < 21; ++j) w21[j] = cv ? wc[ws_off_1xk(21) + j] : 0.f;
  const float* bc = bs + (int64_t)(cv ? c : 0) * 6;
  const float bb7 = cv ? bc[bs_idx_1xk(7)] : 0.f, bb11 = cv ? bc[bs_idx_1xk(11)] : 0.f;
  const float bb21 = cv ? bc[bs_idx_1xk(21)] : 0.f;
  const int TH = gm.TH, TW = gm.TW, AW = gm.AW, HS = gm.hs;
  const int nq = TW >> 2;
  const int nitems = gm.AH * nq;
  for (int it = t; it < nitems; it += gm.NTC) {
    const int ar = it / nq, xc = (it % nq) * 4;
    const float4* row = reinterpret_cast<const float4*>(A + ar * AW + xc);
    float a[24];
#pragma unroll
    for (int v = 0; v < 6; ++v) {
      const float4 q = row[v];
      a[4 * v] = q.x; a[4 * v + 1] = q.y; a[4 * v + 2] = q.z; a[4 * v + 3] = q.w;
    }
    const int y = tile.y0 - 10 + ar;
    const bool rin = (unsigned)y < (unsigned)tile.H;
    bool in[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) in[e] = rin && (unsigned)(tile.x0 + xc + e) < (unsigned)tile.W;
    h_strip<21>(a, w21, bb21, in, H21, ar, TH, HS, xc);
    h_strip<11>(a, w11, bb11, in, H11, ar, TH, HS, xc);
    h_strip<7>(a, w7, bb7, in, H7, ar, TH, HS, xc);
  }
}

// The kx1 strip with K taps on one item of phase_v_items: acc[r] += v_k(yb + r) - bias
// = sum_j w[j] h_k(yb + r - K/2 + j) for R consecutive tile rows of one column; Hk points at h_k's buffer row of tile row yb - K/2 (its rows start at
// -K/2), row stride HS.
template <int K, int R>
MSCA_DEV void v_strip(const float* Hk, int HS, const float (&w)[K], float (&acc)[R]) {
#pragma unroll
  for (int i = 0; i < R + K - 1; ++i) {
    const float hv = Hk[i * HS];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int j = i - r;
      if (j >= 0 && j < K) acc[r] = fmaf(w[j], hv, acc[r]);
    }
  }
}

// s = a + v7 + v11 + v21 on the tile (v_k = vertical k-strip of h_k + bias), written to S[c][p] as ST; zero outside
// the image. Item: R consecutive rows of one column.
template <int R, typename ST>
MSCA_DEV void phase_v_items(const float* A, const float* H21, const float* H11, const float* H7, ST* Srow,
                            const MscaGeom& gm, const float (&w7)[7], const float (&w11)[11], const float (&w21)[21],
                            float bsum, int t, const TileCtx& tile, bool tf32) {
  const int TW = gm.TW, AW = gm.AW, HS = gm.hs;
  const int nitems = (gm.TH / R) * TW;
  for (int it = t; it < nitems; it += gm.NTC) {
    const int yb = (it / TW) * R, x = it % TW;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = A[(yb + r + 10) * AW + x + 10] + bsum;
    // the h_k buffer row of tile row y is y + k/2: the window of tile row yb starts at buffer row yb
    v_strip<21, R>(H21 + yb * HS + x, HS, w21, acc);
    v_strip<11, R>(H11 + yb * HS + x, HS, w11, acc);
    v_strip<7, R>(H7 + yb * HS + x, HS, w7, acc);
    const bool xin = (unsigned)(tile.x0 + x) < (unsigned)tile.W;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool in = xin && (unsigned)(tile.y0 + yb + r) < (unsigned)tile.H;
      Srow[(yb + r) * TW + x] = in ? to_st<ST>(acc[r], tf32) : st_zero<ST>();
    }
  }
}

template <typename ST>
MSCA_DEV void phase_v(const float* A, const float* H21, const float* H11, const float* H7, ST* Srow,
                      const MscaGeom& gm, const float* __restrict__ ws, const float* __restrict__ bs, int c, int t,
                      const TileCtx& tile, bool tf32) {
  // only called for valid channels (c < C)
  float w7[7], w11[11], w21[21];
  const float* wc = ws + (int64_t)c * 78;
#pragma unroll
  for (int j = 0; j < 7; ++j) w7[j] = wc[ws_off_kx1(7) + j];
#pragma unroll
  for (int j = 0; j < 11; ++j) w11[j] = wc[ws_off_kx1(11) + j];
#pragma unroll
  for (int j = 0; j < 21; ++j) w21[j] = wc[ws_off_kx1(21) + j];
  const float* bc = bs + (int64_t)c * 6;
  const float bsum = bc[1] + bc[3] + bc[5];
  if (gm.RV == 4)
    phase_v_items<4, ST>(A, H21, H11, H7, Srow, gm, w7, w11, w21, bsum, t, tile, tf32);
  else
    phase_v_items<2, ST>(A, H21, H11, H7, Srow, gm, w7, w11, w21, bsum, t, tile, tf32);
}

// Zero the padding rows [C, CP) of S (the GEMM's k rows past C; disjoint from the rows the depthwise phases write).
template <typename ST>
MSCA_DEV void zero_s_padding(ST* S, const MscaGeom& gm, const TileCtx& tile) {
  const int n = (gm.CP - tile.C) * gm.s_ld;
  ST* s0 = S + (size_t)tile.C * gm.s_ld;
  for (int i = threadIdx.x; i < n; i += MSCA_NT) s0[i] = st_zero<ST>();
}

// The NTC threads of channel c's group write its a (A: fp32, rows/cols origin -10, stride AW) on the tile's pixels
// inside the image to as, rounded to T.
template <typename T>
MSCA_DEV void store_a_tile(const float* A, const MscaGeom& gm, const ASave& as, int c, int t, const TileCtx& tile) {
  T* dst = reinterpret_cast<T*>(as.ptr) + (int64_t)tile.b * as.sB + (int64_t)c * as.sC;
  const int TW = gm.TW, n = gm.TH * TW;
  // pix = y * TW + x advances by NTC per iteration: step (y, x) without a division per element
  const int dy = gm.NTC / TW, dx = gm.NTC - dy * TW;
  int y = t / TW, x = t - y * TW;
  for (int pix = t; pix < n; pix += gm.NTC) {
    const int yy = tile.y0 + y, xx = tile.x0 + x;
    if (yy < tile.H && xx < tile.W)
      dst[(int64_t)yy * as.sH + (int64_t)xx * as.sW] = from_f<T>(A[(y + 10) * gm.AW + x + 10]);
    y += dy;
    x += dx;
    if (x >= TW) { x -= TW; ++y; }
  }
}

// Compute s for all channels of the tile into S[CP][s_ld] (rows >= C zeroed). Ends with a __syncthreads().
// SAVE_A: also write a on the tile's pixels to as (when as.ptr is not null; see ASave).
template <typename T, typename ST, bool SAVE_A = false>
MSCA_DEV void compute_s_tile_fma(ST* S, float* work, const MscaGeom& gm, const T* __restrict__ u_img, int64_t sC,
                             int64_t sH, int64_t sW, const float* __restrict__ w0, const float* __restrict__ b0,
                             const float* __restrict__ ws, const float* __restrict__ bs, const TileCtx& tile,
                             bool tf32, const ASave& as = ASave{}) {
  const int tid = threadIdx.x;
  zero_s_padding<ST>(S, gm, tile);
  const int gi = tid / gm.NTC, t = tid % gm.NTC;
  float* wk = work + gi * gm.ch_floats;
  float* U = wk;
  float* A = wk + gm.off_A;
  float* H21 = wk;  // aliases U (dead once a is computed)
  float* H11 = wk + gm.off_H11;
  float* H7 = wk + gm.off_H7;
  for (int cbase = 0; cbase < tile.C; cbase += gm.G) {
    const int c = cbase + gi;
    const bool cv = c < tile.C;
    load_tile_group<T>(work, gm, 0, u_img, sC, sH, sW, cbase, tile);
    __syncthreads();
    phase_a(U, A, gm, w0, b0, c, cv, t, tile);
    __syncthreads();
    phase_h(A, H21, H11, H7, gm, ws, bs, c, cv, t, tile);
    __syncthreads();
    if (cv) phase_v<ST>(A, H21, H11, H7, S + (size_t)c * gm.s_ld, gm, ws, bs, c, t, tile, tf32);
    if constexpr (SAVE_A) {
      if (cv && as.ptr != nullptr) store_a_tile<T>(A, gm, as, c, t, tile);
    }
    __syncthreads();
  }
}

// Decode the CTA's tile.
MSCA_DEV TileCtx tile_ctx(const MscaGeom& gm, long long cta, int64_t C, int64_t H, int64_t W) {
  TileCtx tile;
  const long long per_img = (long long)gm.tiles_x * gm.tiles_y;
  tile.b = (int)(cta / per_img);
  const int r = (int)(cta - (long long)tile.b * per_img);
  tile.y0 = (r / gm.tiles_x) * gm.TH;
  tile.x0 = (r % gm.tiles_x) * gm.TW;
  tile.H = (int)H; tile.W = (int)W; tile.C = (int)C;
  return tile;
}

}  // namespace msca

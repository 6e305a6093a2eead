// Fused MSCA backward: three kernels plus the conv3 weight packing, all on one stream, deterministic.
//
//   g = grad_out ; d_att = g*u ; du = g*att + dw5x5^T(d_a) ; d_s = w3^T d_att ; dw3 = sum_pixels d_att s^T ;
//   db3 = sum d_att ; d_h_k = dw_kx1^T(d_s) ; d_a = d_s + sum_k dw_1xk^T(d_h_k) ; depthwise weight/bias grads =
//   sums over (B,H,W) of upstream grad x shifted input of that conv (u for conv0, a for the 1xk, h_k for the kx1).
//
// The mix kernel, msca_bwd_mix_kernel (one CTA per TH x TW tile, geometry chosen like the forward's): recomputes s
//    for all channels into shared memory (same code as the forward, tensor-core or FMA depthwise variant; when the
//    depthwise weight gradients are wanted it also writes a = dw5x5(u) + b0 of its pixels to a scratch tensor for the
//    depthwise-backward kernel), att = w3 s + b3 on tensor cores; epilogue d_att = g*u into shared memory (input
//    dtype) and du_gate = g*att into du. Then dw3/db3 per-CTA partials = d_att x s^T (tensor cores, k = pixels of the
//    tile) straight to global memory, and d_s = w3^T d_att (tensor cores) into a scratch tensor in u's dtype and
//    memory format.
// The depthwise-backward kernel, msca_bwd_depthwise_kernel (16x16 tiles, 2 channels at a time, 67 KiB shared
//    memory; geometry in namespace dw_bwd): per channel reads d_s with a 12-pixel halo, computes d_h_k (tile rows
//    +-2, cols +-12), d_a (tile +-2), du += dw5x5^T(d_a); when the depthwise weight gradients are wanted, also reads a
//    (10-pixel halo; the mix kernel's, instead of recomputing the 5x5 on 36x36 pixels per 16x16 tile: a quarter of
//    this kernel's multiply-adds) and u (2-pixel halo), recomputes h_k from a, and computes the 110 depthwise
//    weight/bias gradients of the tile as warp jobs whose per-lane partial sums are combined by a fixed-order shuffle
//    transpose-reduction into per-CTA partials (no atomics).
// The reduce kernel, msca_bwd_reduce_kernel: sums the per-CTA partials in a fixed order into dw3, db3, dw0, db0, dws,
//    dbs.
//
// Trade-off: the per-CTA dw3 partial is C*C floats per tile of P pixels, i.e. 8*C/P bytes per element written and
// read again; cheap for C <= P (stages 1-2 of SegNeXt) but about 4x the input size at C=320..512 with small tiles.
// Writing s and d_att to global memory and running a split-K GEMM would cost 8 bytes per element instead; measure
// before switching. Zero padding: values of a, h_k, d_h_k, d_a outside the image are 0, d_s is read as 0 there.
#include "msca/msca_common.cuh"
#include "msca/msca_depthwise_mma.cuh"

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace msca {

// ------------------------------------------------------------------------------------------------------------------
// The mix kernel: recompute s, att; d_att, du_gate; dw3/db3 partials; d_s.
// ------------------------------------------------------------------------------------------------------------------
struct MixArgs {
  const void* w3a;   // packed w3  (A[m=cout][k=cin])
  const void* w3t;   // packed w3^T (A[m=cin][k=cout])
  void* ds;          // d_s scratch (input dtype), strides below
  int64_t ds_sB, ds_sC, ds_sH, ds_sW;
  float* w3_part;         // dw3/db3 partials [num_ctas][C*C + C]
  int need_ds;
  ASave as;          // a of the tile's pixels for the depthwise-backward kernel (ptr null unless it computes the
                     // depthwise weight gradients)
};

// DW_MMA: recompute s with the tensor-core depthwise variant (msca_depthwise_mma.cuh; MODE 0 only).
template <typename T, int MODE, bool DW_MMA>
__global__ void __launch_bounds__(MSCA_NT, 2) msca_bwd_mix_kernel(const MscaBwdParams p, const MscaGeom gm,
                                                                  const MixArgs ma) {
  MSCA_DYN_SMEM(smem);
  T* S = reinterpret_cast<T*>(smem);
  T* DATT = reinterpret_cast<T*>(smem + gm.s_bytes);       // aliases the depthwise work area (dead by then)
  const long long cta = blockIdx.x;
  const TileCtx tile = tile_ctx(gm, cta, p.C, p.H, p.W);
  const T* u_img = reinterpret_cast<const T*>(p.u) + (int64_t)tile.b * p.u_sB;
  const T* g_img = reinterpret_cast<const T*>(p.g) + (int64_t)tile.b * p.g_sB;
  T* du_img = p.need_du ? reinterpret_cast<T*>(p.du) + (int64_t)tile.b * p.du_sB : nullptr;
  constexpr bool kTF32 = MODE == 1;

  compute_s_tile<T, DW_MMA, true>(S, smem, gm, p, tile, kTF32, ma.as);

  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int g = lane >> 2, t = lane & 3;
  const int nmb = gm.CP >> 5, nnb = gm.P >> 5;

  // ---- att = w3 s + b3 ; d_att = g*u -> DATT ; du_gate = g*att -> du -------------------------------------------
  for (int wt = warp; wt < nmb * nnb; wt += MSCA_NT / 32) {
    const int mb = wt % nmb, nb = wt / nmb;
    float acc[2][4][4];
    acc_zero(acc);
    gemm_packedA_smemKN<T, MODE>(acc, ma.w3a, mb * 2, gm.CP, S, gm.s_ld, nb * 32);
    // per output channel: bases (4 channels per thread); per pixel: offsets computed in the loop
    const T* uc[2][2];
    const T* gc[2][2];
    T* dc[2][2];
    float bias[2][2];
    bool mv[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = mb * 32 + 16 * i + g + 8 * h;
        mv[i][h] = m < tile.C;
        const int64_t mc = mv[i][h] ? m : 0;
        bias[i][h] = mv[i][h] ? p.b3[m] : 0.f;
        uc[i][h] = u_img + mc * p.u_sC;
        gc[i][h] = g_img + mc * p.g_sC;
        dc[i][h] = p.need_du ? du_img + mc * p.du_sC : nullptr;
      }
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int n = nb * 32 + 8 * j + 2 * t + e;
        const int y = tile.y0 + n / gm.TW, x = tile.x0 + n % gm.TW;
        const bool vn = y < tile.H && x < tile.W;
        const int64_t su = (int64_t)y * p.u_sH + (int64_t)x * p.u_sW;
        const int64_t sg = (int64_t)y * p.g_sH + (int64_t)x * p.g_sW;
        const int64_t sd = (int64_t)y * p.du_sH + (int64_t)x * p.du_sW;
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int m = mb * 32 + 16 * i + g + 8 * h;
            float datt = 0.f;
            if (mv[i][h] && vn) {
              const float gv = to_f(gc[i][h][sg]);
              datt = gv * to_f(uc[i][h][su]);
              if (p.need_du) dc[i][h][sd] = from_f<T>(gv * (acc[i][j][2 * h + e] + bias[i][h]));
            }
            DATT[(size_t)m * gm.s_ld + n] = to_st<T>(datt, kTF32);
          }
      }
  }
  __syncthreads();

  // ---- dw3 / db3 partials of this tile ---------------------------------------------------------------------------
  if (p.need_w3) {
    const int64_t C = tile.C;
    float* w3_part = ma.w3_part + cta * (C * C + C);
    for (int wt = warp; wt < nmb * nmb; wt += MSCA_NT / 32) {
      const int mb = wt % nmb, nb = wt / nmb;
      float acc[2][4][4];
      acc_zero(acc);
      gemm_smemMK_smemNK<T, MODE>(acc, DATT, gm.s_ld, mb * 32, S, gm.s_ld, nb * 32, gm.P);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = mb * 32 + 16 * i + g + 8 * h;
          if (m >= tile.C) continue;
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int n = nb * 32 + 8 * j + 2 * t + e;
              if (n < tile.C) w3_part[(int64_t)m * C + n] = acc[i][j][2 * h + e];
            }
        }
    }
    for (int m = threadIdx.x; m < tile.C; m += MSCA_NT) {
      const T* row = DATT + (size_t)m * gm.s_ld;
      float s0 = 0.f, s1 = 0.f;
      for (int n = 0; n < gm.P; n += 2) {
        s0 += to_f(row[n]);
        s1 += to_f(row[n + 1]);
      }
      w3_part[C * C + m] = s0 + s1;
    }
  }

  // ---- d_s = w3^T d_att --------------------------------------------------------------------------------------------
  if (ma.need_ds) {
    T* ds_img = reinterpret_cast<T*>(ma.ds) + (int64_t)tile.b * ma.ds_sB;
    for (int wt = warp; wt < nmb * nnb; wt += MSCA_NT / 32) {
      const int mb = wt % nmb, nb = wt / nmb;
      float acc[2][4][4];
      acc_zero(acc);
      gemm_packedA_smemKN<T, MODE>(acc, ma.w3t, mb * 2, gm.CP, DATT, gm.s_ld, nb * 32);
      int64_t sp[4][2];
      bool vn[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = nb * 32 + 8 * j + 2 * t + e;
          const int y = tile.y0 + n / gm.TW, x = tile.x0 + n % gm.TW;
          vn[j][e] = y < tile.H && x < tile.W;
          sp[j][e] = (int64_t)y * ma.ds_sH + (int64_t)x * ma.ds_sW;
        }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = mb * 32 + 16 * i + g + 8 * h;
          if (m >= tile.C) continue;
          T* dc = ds_img + (int64_t)m * ma.ds_sC;
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (vn[j][e]) dc[sp[j][e]] = from_f<T>(acc[i][j][2 * h + e]);
        }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// The depthwise-backward kernel on 16x16 tiles; dw_bwd: its geometry.
// ------------------------------------------------------------------------------------------------------------------
namespace dw_bwd {
constexpr int TH = 16, TW = 16, G = 2, NTC = MSCA_NT / G;
constexpr int UW = TW + 24, UH = TH + 24;       // u and d_s tiles, origin (-12,-12)
constexpr int AW = TW + 20, AH = TH + 20;       // a, origin (-10,-10)
constexpr int DHR = TH + 4;                     // d_h rows, origin row -2
constexpr int W21 = TW + 24, W11 = TW + 16, W7 = TW + 12;  // d_h_k widths (origin col -2-r; >= TW+4+2r, % 4 == 0)
constexpr int DAW = TW + 4;                     // d_a, origin (-2,-2)
constexpr int OFF_U = 0;
constexpr int OFF_DS = OFF_U + UH * UW;
constexpr int OFF_A = OFF_DS + UH * UW;
constexpr int HS = TW + 4;                      // h_k row stride: conflict-free float2 reads in job_dwv
constexpr int OFF_H21 = OFF_A + AH * AW;
constexpr int OFF_H11 = OFF_H21 + (TH + 20) * HS;
constexpr int OFF_H7 = OFF_H11 + (TH + 10) * HS;
constexpr int OFF_DH21 = OFF_H7 + (TH + 6) * HS;
constexpr int OFF_DH11 = OFF_DH21 + DHR * W21;
constexpr int OFF_DH7 = OFF_DH11 + DHR * W11;
constexpr int OFF_DA = OFF_DH7 + DHR * W7;
constexpr int CH = OFF_DA + DHR * DAW;
static_assert(CH % 4 == 0 && OFF_DS % 4 == 0 && OFF_A % 4 == 0 && OFF_H21 % 4 == 0 && OFF_H11 % 4 == 0 &&
                  OFF_H7 % 4 == 0 && OFF_DH21 % 4 == 0 && OFF_DH11 % 4 == 0 && OFF_DH7 % 4 == 0 && OFF_DA % 4 == 0,
              "16-byte alignment of the depthwise-backward buffers");
constexpr size_t SMEM = (size_t)G * CH * sizeof(float);
}  // namespace dw_bwd

// d_h_k(ri, ci) = sum_j wv_k[j] d_s(ri-2 + r - j, ci-2-r) on rows [-2, TH+2), cols [-2-r, ...); 0 outside the image.
// Items: 5 rows x 1 column.
template <int K>
MSCA_DEV void phase_dh(const float* DS, float* DH, int WDH, const float* wv, bool cv, int t, const TileCtx& tile) {
  constexpr int r = K / 2;
  float w[K];
#pragma unroll
  for (int j = 0; j < K; ++j) w[j] = cv ? wv[j] : 0.f;
  const int nitems = 4 * WDH;
  for (int it = t; it < nitems; it += dw_bwd::NTC) {
    const int rb = it / WDH, ci = it - rb * WDH;
    const int ri0 = rb * 5;
    float acc[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
    const float* d = DS + (ri0 + 10 - r) * dw_bwd::UW + ci + 10 - r;
#pragma unroll
    for (int ii = 0; ii < 5 + 2 * r; ++ii) {
      const float v = d[ii * dw_bwd::UW];
#pragma unroll
      for (int rr = 0; rr < 5; ++rr) {
        const int j = rr + 2 * r - ii;
        if (j >= 0 && j < K) acc[rr] = fmaf(w[j], v, acc[rr]);
      }
    }
    const bool xin = (unsigned)(tile.x0 - 2 - r + ci) < (unsigned)tile.W;
#pragma unroll
    for (int rr = 0; rr < 5; ++rr) {
      const bool in = xin && (unsigned)(tile.y0 - 2 + ri0 + rr) < (unsigned)tile.H;
      DH[(ri0 + rr) * WDH + ci] = in ? acc[rr] : 0.f;
    }
  }
}

// acc[e] += sum_j w[j] d_h_k(ri, c0 + e + r - j), e < 4: the transposed 1xk strip with K taps (r = K/2) on 4 columns
// of d_a's row ri. DH: d_h_k, row stride WDH, column origin -2-r; the K + 3 values come as float4 loads.
template <int K, int WDH>
MSCA_DEV void da_strip(const float* DH, const float (&w)[K], int ri, int c0, float (&acc)[4]) {
  constexpr int NV = (K + 6) / 4;  // float4 loads covering the K + 3 values
  const float4* row = reinterpret_cast<const float4*>(DH + ri * WDH + c0);
  float d[4 * NV];
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const float4 q = row[v];
    d[4 * v] = q.x; d[4 * v + 1] = q.y; d[4 * v + 2] = q.z; d[4 * v + 3] = q.w;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e)
#pragma unroll
    for (int j = 0; j < K; ++j) acc[e] = fmaf(w[j], d[e + K - 1 - j], acc[e]);
}

// d_a(ri, ci) = d_s + sum_k sum_j wh_k[j] d_h_k(ri, ci + r - j) on the tile +-2; 0 outside the image.
// Items: one row, 4 columns.
MSCA_DEV void phase_da(const float* DS, const float* DH21, const float* DH11, const float* DH7, float* DA,
                       const float* wc, bool cv, int t, const TileCtx& tile) {
  float w7[7], w11[11], w21[21];
#pragma unroll
  for (int j = 0; j < 7; ++j) w7[j] = cv ? wc[ws_off_1xk(7) + j] : 0.f;
#pragma unroll
  for (int j = 0; j < 11; ++j) w11[j] = cv ? wc[ws_off_1xk(11) + j] : 0.f;
#pragma unroll
  for (int j = 0; j < 21; ++j) w21[j] = cv ? wc[ws_off_1xk(21) + j] : 0.f;
  constexpr int NQ = dw_bwd::DAW / 4;
  for (int it = t; it < dw_bwd::DHR * NQ; it += dw_bwd::NTC) {
    const int ri = it / NQ, c0 = (it % NQ) * 4;
    float acc[4];
    {
      const float2* dsr = reinterpret_cast<const float2*>(DS + (ri + 10) * dw_bwd::UW + c0 + 10);
      const float2 d0 = dsr[0], d1 = dsr[1];
      acc[0] = d0.x; acc[1] = d0.y; acc[2] = d1.x; acc[3] = d1.y;
    }
    da_strip<21, dw_bwd::W21>(DH21, w21, ri, c0, acc);
    da_strip<11, dw_bwd::W11>(DH11, w11, ri, c0, acc);
    da_strip<7, dw_bwd::W7>(DH7, w7, ri, c0, acc);
    const int yy = tile.y0 - 2 + ri;
    const bool rin = (unsigned)yy < (unsigned)tile.H;
    float o[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = (rin && (unsigned)(tile.x0 - 2 + c0 + e) < (unsigned)tile.W) ? acc[e] : 0.f;
    *reinterpret_cast<float4*>(DA + ri * dw_bwd::DAW + c0) = make_float4(o[0], o[1], o[2], o[3]);
  }
}

// dw0 (25 taps) and db0 of one channel over the tile: lane = (row y, half row); d_a x shifted u.
MSCA_DEV void job_dw0(const float* U, const float* DA, float* part_c) {
  const int lane = lane_id();
  const int y = lane >> 1, xb = (lane & 1) * 8;
  float da[8];
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    const float2 q = *reinterpret_cast<const float2*>(DA + (y + 2) * dw_bwd::DAW + xb + 2 + 2 * v);
    da[2 * v] = q.x; da[2 * v + 1] = q.y;
  }
  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 5; ++i) {
    float u[12];
#pragma unroll
    for (int v = 0; v < 6; ++v) {
      const float2 q = *reinterpret_cast<const float2*>(U + (y + 10 + i) * dw_bwd::UW + xb + 10 + 2 * v);
      u[2 * v] = q.x; u[2 * v + 1] = q.y;
    }
#pragma unroll
    for (int j = 0; j < 5; ++j)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i * 5 + j] = fmaf(da[e], u[e + j], acc[i * 5 + j]);
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[25] += da[e];
  const float v = warp_transpose_reduce<32>(acc);
  if (lane < 26) part_c[lane] = v;  // taps 0..24 = dw0, 25 = db0
}

// dwh_k (K taps) and dbh_k: lane = (row y, half row); d_h_k on the tile x a shifted horizontally.
template <int K>
MSCA_DEV void job_dwh(const float* DH, int WDH, const float* A, float* part_c, int tap_w, int tap_b) {
  constexpr int r = K / 2;
  constexpr int N = (K + 1 <= 16) ? 16 : 32;
  const int lane = lane_id();
  const int y = lane >> 1, xb = (lane & 1) * 8;
  float dh[8], a[8 + 2 * r];
#pragma unroll
  for (int e = 0; e < 8; ++e) dh[e] = DH[(y + 2) * WDH + xb + 2 + r + e];
#pragma unroll
  for (int m = 0; m < 8 + 2 * r; ++m) a[m] = A[(y + 10) * dw_bwd::AW + xb + 10 - r + m];
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[j] = fmaf(dh[e], a[e + j], acc[j]);
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[K] += dh[e];
  const float v = warp_transpose_reduce<N>(acc);
  if (lane < K) part_c[tap_w + lane] = v;
  else if (lane == K) part_c[tap_b] = v;
}

// dwv_k (K taps) [+ dbv for K == 21]: lane = (column pair, quarter of the rows); d_s x h_k shifted vertically.
template <int K>
MSCA_DEV void job_dwv(const float* DS, const float* Hk, float* part_c, int tap_w) {
  constexpr int N = (K + 1 <= 16) ? 16 : 32;
  const int lane = lane_id();
  const int xp = lane & 7, yq = lane >> 3;
  float2 ds[4];
#pragma unroll
  for (int yy = 0; yy < 4; ++yy)
    ds[yy] = *reinterpret_cast<const float2*>(DS + (4 * yq + yy + 12) * dw_bwd::UW + 2 * xp + 12);
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;
#pragma unroll
  for (int ii = 0; ii < 4 + K - 1; ++ii) {
    const float2 h = *reinterpret_cast<const float2*>(Hk + (4 * yq + ii) * dw_bwd::HS + 2 * xp);
#pragma unroll
    for (int yy = 0; yy < 4; ++yy) {
      const int j = ii - yy;
      if (j >= 0 && j < K) acc[j] = fmaf(ds[yy].x, h.x, fmaf(ds[yy].y, h.y, acc[j]));
    }
  }
  if (K == 21) {
#pragma unroll
    for (int yy = 0; yy < 4; ++yy) acc[K] += ds[yy].x + ds[yy].y;
  }
  const float v = warp_transpose_reduce<N>(acc);
  if (lane < K) part_c[tap_w + lane] = v;
  if (K == 21 && lane == K) {  // dbv_7 = dbv_11 = dbv_21 = sum d_s
    part_c[MSCA_TAP_BS + 1] = v;
    part_c[MSCA_TAP_BS + 3] = v;
    part_c[MSCA_TAP_BS + 5] = v;
  }
}

// du(y, x..x+3) += sum_ij w0[i][j] d_a(y+2-i, x+2-j) for 32 quads of the tile (job half d of 64 quads).
template <typename T>
MSCA_DEV void job_du(const float* DA, const float* __restrict__ w0c, T* du_c, int64_t sH, int64_t sW, int d,
                     const TileCtx& tile) {
  const int lane = lane_id();
  const int it = d * 32 + lane;
  const int y = it >> 2, q = it & 3;
  float w[25];
#pragma unroll
  for (int i = 0; i < 25; ++i) w[i] = w0c[i];
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int rr = 0; rr < 5; ++rr) {
    const float4* row = reinterpret_cast<const float4*>(DA + (y + rr) * dw_bwd::DAW + 4 * q);
    const float4 v0 = row[0], v1 = row[1];
    const float in[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
    const int i = 4 - rr;
#pragma unroll
    for (int j = 0; j < 5; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[e] = fmaf(w[i * 5 + j], in[e + 4 - j], acc[e]);
  }
  const int yy = tile.y0 + y;
  if (yy >= tile.H) return;  // no barrier or shuffle follows in this job
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int xx = tile.x0 + 4 * q + e;
    if (xx < tile.W) {
      T* ptr = du_c + (int64_t)yy * sH + (int64_t)xx * sW;
      *ptr = from_f<T>(to_f(*ptr) + acc[e]);
    }
  }
}

struct DwArgs {
  const void* ds;
  int64_t ds_sB, ds_sC, ds_sH, ds_sW;
  const void* a;  // a = dw5x5(u) + b0 written by the mix kernel (strides ds_s*; read only when need_dwdw)
  float* dw_part;      // [num_ctas][C][MSCA_NTAP]
};

// Load rows and cols [ORG, ORG + NH) x [ORG, ORG + NW) (tile coordinates) of channels [cbase, cbase + G) of one image
// into the channel work areas at float offset DST, row stride LD; zero outside the image and for channels >= C.
// Mapping of threads as in load_tile_group (channels_last: consecutive threads, consecutive channels). Sizes are
// template arguments: divisions by constants, and no spill in the depthwise-backward kernel at 128 registers (sm_80).
template <typename T, int DST, int LD, int ORG, int NH, int NW>
MSCA_DEV void load_region_group(float* work, const T* __restrict__ src, int64_t sC, int64_t sH, int64_t sW, int cbase,
                                const TileCtx& tile) {
  constexpr int dst_off = DST, ld = LD, y_org = ORG, x_org = ORG, nw = NW, n = NH * NW;
  const int tid = threadIdx.x;
  if (sC == 1 && tile.C > 1) {
#pragma unroll 2
    for (int idx = tid; idx < dw_bwd::G * n; idx += MSCA_NT) {
      const int gi = idx % dw_bwd::G, pix = idx / dw_bwd::G;
      const int r = pix / nw, col = pix - r * nw;
      const int c = cbase + gi, yy = tile.y0 + y_org + r, xx = tile.x0 + x_org + col;
      float v = 0.f;
      if (c < tile.C && (unsigned)yy < (unsigned)tile.H && (unsigned)xx < (unsigned)tile.W)
        v = to_f(src[(int64_t)c * sC + (int64_t)yy * sH + (int64_t)xx * sW]);
      work[gi * dw_bwd::CH + dst_off + r * ld + col] = v;
    }
  } else {
    const int gi = tid / dw_bwd::NTC, t = tid % dw_bwd::NTC;
    const int c = cbase + gi;
    const bool cv = c < tile.C;
    const T* s = src + (int64_t)(cv ? c : 0) * sC;
    float* d = work + gi * dw_bwd::CH + dst_off;
    const int dr = dw_bwd::NTC / nw, dc = dw_bwd::NTC - dr * nw;
    int r = t / nw, col = t - r * nw;
#pragma unroll 2
    for (int pix = t; pix < n; pix += dw_bwd::NTC) {
      const int yy = tile.y0 + y_org + r, xx = tile.x0 + x_org + col;
      float v = 0.f;
      if (cv && (unsigned)yy < (unsigned)tile.H && (unsigned)xx < (unsigned)tile.W)
        v = to_f(s[(int64_t)yy * sH + (int64_t)xx * sW]);
      d[r * ld + col] = v;
      r += dr;
      col += dc;
      if (col >= nw) { col -= nw; ++r; }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(MSCA_NT, 2) msca_bwd_depthwise_kernel(const MscaBwdParams p, const MscaGeom gm,
                                                                 const DwArgs da) {
  MSCA_DYN_SMEM(smem);
  float* work = reinterpret_cast<float*>(smem);
  const long long cta = blockIdx.x;
  const TileCtx tile = tile_ctx(gm, cta, p.C, p.H, p.W);
  const T* u_img = reinterpret_cast<const T*>(p.u_dw) + (int64_t)tile.b * p.udw_sB;
  const T* ds_img = reinterpret_cast<const T*>(da.ds) + (int64_t)tile.b * da.ds_sB;
  const int tid = threadIdx.x;
  const int gi = tid / dw_bwd::NTC, t = tid % dw_bwd::NTC, wl = (tid >> 5) & 3;
  float* wk = work + gi * dw_bwd::CH;
  float* U = wk + dw_bwd::OFF_U;
  float* DS = wk + dw_bwd::OFF_DS;
  float* A = wk + dw_bwd::OFF_A;
  float* H21 = wk + dw_bwd::OFF_H21;
  float* H11 = wk + dw_bwd::OFF_H11;
  float* H7 = wk + dw_bwd::OFF_H7;
  float* DH21 = wk + dw_bwd::OFF_DH21;
  float* DH11 = wk + dw_bwd::OFF_DH11;
  float* DH7 = wk + dw_bwd::OFF_DH7;
  float* DA = wk + dw_bwd::OFF_DA;
  float* dw_part = da.dw_part + cta * (int64_t)tile.C * MSCA_NTAP;

  for (int cbase = 0; cbase < tile.C; cbase += dw_bwd::G) {
    const int c = cbase + gi;
    const bool cv = c < tile.C;
    const float* wsc = p.ws + (int64_t)(cv ? c : 0) * 78;
    if (p.need_dwdw) {
      // a (from the mix kernel) on rows/cols [-10, T+10); u only on [-2, T+2) (the 5x5 weight gradient's window)
      load_region_group<T, dw_bwd::OFF_A, dw_bwd::AW, -10, dw_bwd::AH, dw_bwd::AW>(
          work, reinterpret_cast<const T*>(da.a) + (int64_t)tile.b * da.ds_sB, da.ds_sC, da.ds_sH, da.ds_sW, cbase,
          tile);
      load_region_group<T, dw_bwd::OFF_U + 10 * dw_bwd::UW + 10, dw_bwd::UW, -2, dw_bwd::TH + 4, dw_bwd::TW + 4>(
          work, u_img, p.udw_sC, p.udw_sH, p.udw_sW, cbase, tile);
    }
    load_tile_group<T>(work, gm, dw_bwd::OFF_DS, ds_img, da.ds_sC, da.ds_sH, da.ds_sW, cbase, tile);
    __syncthreads();
    phase_dh<21>(DS, DH21, dw_bwd::W21, wsc + ws_off_kx1(21), cv, t, tile);
    phase_dh<11>(DS, DH11, dw_bwd::W11, wsc + ws_off_kx1(11), cv, t, tile);
    phase_dh<7>(DS, DH7, dw_bwd::W7, wsc + ws_off_kx1(7), cv, t, tile);
    __syncthreads();
    if (p.need_dwdw) phase_h(A, H21, H11, H7, gm, p.ws, p.bs, c, cv, t, tile);
    phase_da(DS, DH21, DH11, DH7, DA, wsc, cv, t, tile);
    __syncthreads();
    if (cv) {
      float* pc = dw_part + (int64_t)c * MSCA_NTAP;
      // 9 warp-uniform jobs per channel over its 4 warps, most expensive first
      for (int job = wl; job < 9; job += 4) {
        switch (job) {
          case 0: if (p.need_dwdw) job_dwh<21>(DH21, dw_bwd::W21, A, pc, MSCA_TAP_WS + 36, MSCA_TAP_BS + 4); break;
          case 1: if (p.need_dwdw) job_dwv<21>(DS, H21, pc, MSCA_TAP_WS + 57); break;
          case 2: if (p.need_dwdw) job_dw0(U, DA, pc); break;
          case 3:
          case 4:
            if (p.need_du)
              job_du<T>(DA, p.w0 + (int64_t)c * 25,
                        reinterpret_cast<T*>(p.du) + (int64_t)tile.b * p.du_sB + (int64_t)c * p.du_sC, p.du_sH,
                        p.du_sW, job - 3, tile);
            break;
          case 5: if (p.need_dwdw) job_dwh<11>(DH11, dw_bwd::W11, A, pc, MSCA_TAP_WS + 14, MSCA_TAP_BS + 2); break;
          case 6: if (p.need_dwdw) job_dwv<11>(DS, H11, pc, MSCA_TAP_WS + 25); break;
          case 7: if (p.need_dwdw) job_dwh<7>(DH7, dw_bwd::W7, A, pc, MSCA_TAP_WS + 0, MSCA_TAP_BS + 0); break;
          case 8: if (p.need_dwdw) job_dwv<7>(DS, H7, pc, MSCA_TAP_WS + 7); break;
          default: break;
        }
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------------------------------
// The reduce kernel: fixed-order sums of the per-CTA partials.
// ------------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(256) msca_bwd_reduce_kernel(const float* __restrict__ w3_part, long long n_w3,
                                                              const float* __restrict__ dw_part, long long n_dw, int C,
                                                              int need_w3, int need_dwdw, float* dw3, float* db3,
                                                              float* dw0, float* db0, float* dws, float* dbs) {
  const long long seg1 = need_w3 ? (long long)C * C + C : 0;
  const long long seg2 = need_dwdw ? (long long)C * MSCA_NTAP : 0;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < seg1 + seg2;
       e += (long long)gridDim.x * blockDim.x) {
    const float* src;
    long long n, stride, off;
    if (e < seg1) { src = w3_part; n = n_w3; stride = seg1; off = e; }
    else { src = dw_part; n = n_dw; stride = seg2; off = e - seg1; }
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    long long i = 0;
    for (; i + 4 <= n; i += 4) {
      s0 += src[(i + 0) * stride + off];
      s1 += src[(i + 1) * stride + off];
      s2 += src[(i + 2) * stride + off];
      s3 += src[(i + 3) * stride + off];
    }
    for (; i < n; ++i) s0 += src[i * stride + off];
    const float s = (s0 + s1) + (s2 + s3);
    if (e < seg1) {
      if (off < (long long)C * C) dw3[off] = s;
      else db3[off - (long long)C * C] = s;
    } else {
      const long long c = off / MSCA_NTAP;
      const int tap = (int)(off - c * MSCA_NTAP);
      if (tap < MSCA_TAP_DB0) dw0[c * 25 + tap] = s;
      else if (tap == MSCA_TAP_DB0) db0[c] = s;
      else if (tap < MSCA_TAP_BS) dws[c * 78 + (tap - MSCA_TAP_WS)] = s;
      else dbs[c * 6 + (tap - MSCA_TAP_BS)] = s;
    }
  }
}

}  // namespace msca

// ------------------------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------------------------
static inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }

static MscaGeom dw_bwd_geom(int64_t B, int64_t C, int64_t H, int64_t W) {
  MscaGeom g{};
  g.cfg = -1;
  g.TH = msca::dw_bwd::TH; g.TW = msca::dw_bwd::TW; g.G = msca::dw_bwd::G; g.NTC = msca::dw_bwd::NTC; g.RV = 0;
  g.P = g.TH * g.TW;
  g.tiles_x = (int)((std::max<int64_t>(W, 1) + g.TW - 1) / g.TW);
  g.tiles_y = (int)((std::max<int64_t>(H, 1) + g.TH - 1) / g.TH);
  g.num_ctas = (long long)B * g.tiles_x * g.tiles_y;
  g.CP = (int)((C + 31) / 32 * 32);
  g.UH = msca::dw_bwd::UH; g.UW = msca::dw_bwd::UW; g.AH = msca::dw_bwd::AH; g.AW = msca::dw_bwd::AW;
  g.hs = msca::dw_bwd::HS;
  g.ch_floats = msca::dw_bwd::CH;
  g.smem_bytes = msca::dw_bwd::SMEM;
  return g;
}

MscaBwdPlan msca_bwd_plan(const MscaBwdParams& p) {
  MscaBwdPlan plan{};
  plan.ok = false;
  if (p.dtype != MSCA_F32 && p.dtype != MSCA_F16 && p.dtype != MSCA_BF16) {
    snprintf(plan.error, sizeof(plan.error), "unsupported dtype code %d", p.dtype);
    return plan;
  }
  if (p.C < 1 || p.B < 0 || p.H < 0 || p.W < 0 || p.C > (1 << 20) || p.H > (1 << 30) || p.W > (1 << 30)) {
    snprintf(plan.error, sizeof(plan.error), "bad sizes B=%lld C=%lld H=%lld W=%lld", (long long)p.B,
             (long long)p.C, (long long)p.H, (long long)p.W);
    return plan;
  }
  const int eb = p.dtype == MSCA_F32 ? 4 : 2;
  int dw_mma = 0;
  const int cfg = msca_choose_variant(p.dw_variant, p.tile_cfg, p.dtype, p.B, p.C, p.H, p.W, 1, p.smem_limit,
                                      plan.error, sizeof(plan.error), &dw_mma);
  if (cfg < 0) return plan;
  plan.mix_geom = msca_make_geom(cfg, p.B, p.C, p.H, p.W, eb, 1, dw_mma);
  msca_mma_double_buffer(plan.mix_geom, 1, eb, p.smem_limit);
  const MscaGeom dw_g = dw_bwd_geom(p.B, p.C, p.H, p.W);
  plan.dw_ctas = dw_g.num_ctas;
  plan.dw_tiles_x = dw_g.tiles_x;
  plan.dw_tiles_y = dw_g.tiles_y;
  plan.dw_smem = dw_g.smem_bytes;
  if (plan.dw_smem > (size_t)p.smem_limit) {
    snprintf(plan.error, sizeof(plan.error), "the depthwise backward kernel needs %zu bytes of shared memory, "
             "device allows %d", plan.dw_smem, p.smem_limit);
    return plan;
  }
  if (plan.mix_geom.num_ctas > 0x7fffffffLL || plan.dw_ctas > 0x7fffffffLL) {
    snprintf(plan.error, sizeof(plan.error), "too many tiles for one launch");
    return plan;
  }
  const int64_t C = p.C, B = p.B, H = p.H, W = p.W;
  if (p.udw_sC == 1 && C > 1) {  // channels_last scratch (only when the tile loads read channels_last anyway)
    plan.ds_sB = H * W * C; plan.ds_sC = 1; plan.ds_sH = W * C; plan.ds_sW = C;
  } else {
    plan.ds_sB = C * H * W; plan.ds_sC = H * W; plan.ds_sH = W; plan.ds_sW = 1;
  }
  const bool need_dw_bwd = p.need_du || p.need_dwdw;
  const size_t pack = (size_t)plan.mix_geom.CP * plan.mix_geom.CP * (p.dtype == MSCA_F32 ? 4 : 2);
  size_t off = 0;
  plan.off_w3a = off; off = align256(off + pack);
  plan.off_w3t = off; off = align256(off + pack);
  plan.off_ds = off;  off = align256(off + (need_dw_bwd ? (size_t)(B * C * H * W) * eb : 0));
  plan.off_a = off;   off = align256(off + (p.need_dwdw ? (size_t)(B * C * H * W) * eb : 0));
  plan.off_w3_part = off;  off = align256(off + (p.need_w3 ? (size_t)plan.mix_geom.num_ctas * (C * C + C) * 4 : 0));
  plan.off_dw_part = off;  off = align256(off + (p.need_dwdw ? (size_t)plan.dw_ctas * C * MSCA_NTAP * 4 : 0));
  if (plan.mix_geom.dw_mma) {
    plan.mix_geom.mma_band_off = off;
    off = align256(off + msca_band_bytes(C));
  }
  plan.workspace_bytes = off;
  plan.ok = true;
  return plan;
}

namespace {

template <typename T, int MODE>
void launch_bwd_typed(const MscaBwdParams& p, const MscaBwdPlan& plan, cudaStream_t stream) {
  const MscaGeom& mix_g = plan.mix_geom;
  unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
  const bool need_dw_bwd = p.need_du || p.need_dwdw;
  const long long pack_total = (long long)mix_g.CP * mix_g.CP / (MODE == 0 ? 2 : 1);
  const int prep_blocks = (int)std::min<long long>((pack_total + 255) / 256, 4096);
  auto prep = msca::prep_w3_kernel<T, MODE>;
  MSCA_LAUNCH(prep, dim3(prep_blocks), dim3(256), 0, stream, p.w3, (int)p.C, mix_g.CP, 0,
              (void*)(ws + plan.off_w3a));
  if (need_dw_bwd)
    MSCA_LAUNCH(prep, dim3(prep_blocks), dim3(256), 0, stream, p.w3, (int)p.C, mix_g.CP, 1,
                (void*)(ws + plan.off_w3t));

  msca::MixArgs ma{};
  ma.w3a = ws + plan.off_w3a;
  ma.w3t = ws + plan.off_w3t;
  ma.ds = ws + plan.off_ds;
  ma.ds_sB = plan.ds_sB; ma.ds_sC = plan.ds_sC; ma.ds_sH = plan.ds_sH; ma.ds_sW = plan.ds_sW;
  ma.w3_part = reinterpret_cast<float*>(ws + plan.off_w3_part);
  ma.need_ds = need_dw_bwd ? 1 : 0;
  if (p.need_dwdw) {
    ma.as.ptr = ws + plan.off_a;
    ma.as.sB = plan.ds_sB; ma.as.sC = plan.ds_sC; ma.as.sH = plan.ds_sH; ma.as.sW = plan.ds_sW;
  }
  bool mix_launched = false;
  if constexpr (MODE == 0) {
    if (mix_g.dw_mma) {
      launch_prep_band<T>(p.w0, p.ws, p.C, ws + mix_g.mma_band_off, stream);
      auto mix_kernel = msca::msca_bwd_mix_kernel<T, MODE, true>;
      MSCA_SET_SMEM_ATTR(mix_kernel, mix_g.smem_bytes);
      MSCA_LAUNCH(mix_kernel, dim3((unsigned)mix_g.num_ctas), dim3(MSCA_NT), mix_g.smem_bytes, stream, p, mix_g, ma);
      mix_launched = true;
    }
  }
  if (!mix_launched) {
    auto mix_kernel = msca::msca_bwd_mix_kernel<T, MODE, false>;
    MSCA_SET_SMEM_ATTR(mix_kernel, mix_g.smem_bytes);
    MSCA_LAUNCH(mix_kernel, dim3((unsigned)mix_g.num_ctas), dim3(MSCA_NT), mix_g.smem_bytes, stream, p, mix_g, ma);
  }

  if (need_dw_bwd) {
    msca::DwArgs da{};
    da.ds = ws + plan.off_ds;
    da.ds_sB = plan.ds_sB; da.ds_sC = plan.ds_sC; da.ds_sH = plan.ds_sH; da.ds_sW = plan.ds_sW;
    da.a = ws + plan.off_a;
    da.dw_part = reinterpret_cast<float*>(ws + plan.off_dw_part);
    const MscaGeom dw_g = dw_bwd_geom(p.B, p.C, p.H, p.W);
    auto dw_kernel = msca::msca_bwd_depthwise_kernel<T>;
    MSCA_SET_SMEM_ATTR(dw_kernel, dw_g.smem_bytes);
    MSCA_LAUNCH(dw_kernel, dim3((unsigned)dw_g.num_ctas), dim3(MSCA_NT), dw_g.smem_bytes, stream, p, dw_g, da);
  }
}

}  // namespace

void msca_bwd_launch(const MscaBwdParams& p, cudaStream_t stream) {
  if (!p.need_du && !p.need_dwdw && !p.need_w3) return;
  if (p.B == 0 || p.H == 0 || p.W == 0) return;  // the binding returns zeros for the weight gradients
  const MscaBwdPlan plan = msca_bwd_plan(p);
  if (!plan.ok) throw std::runtime_error(std::string("msca_bwd_launch: ") + plan.error);
  switch (p.dtype) {
    case MSCA_F32:
      if (p.allow_tf32) launch_bwd_typed<float, 1>(p, plan, stream);
      else launch_bwd_typed<float, 2>(p, plan, stream);
      break;
    case MSCA_F16: launch_bwd_typed<__half, 0>(p, plan, stream); break;
    case MSCA_BF16: launch_bwd_typed<__nv_bfloat16, 0>(p, plan, stream); break;
    default: throw std::runtime_error("msca_bwd_launch: bad dtype");
  }
  if (p.need_w3 || p.need_dwdw) {
    unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
    const long long total = (p.need_w3 ? p.C * p.C + p.C : 0) + (p.need_dwdw ? p.C * MSCA_NTAP : 0);
    const int blocks = (int)std::max<long long>(1, std::min<long long>((total + 255) / 256, 8192));
    MSCA_LAUNCH(msca::msca_bwd_reduce_kernel, dim3(blocks), dim3(256), 0, stream,
                reinterpret_cast<const float*>(ws + plan.off_w3_part), plan.mix_geom.num_ctas,
                reinterpret_cast<const float*>(ws + plan.off_dw_part), plan.dw_ctas, (int)p.C, p.need_w3, p.need_dwdw,
                p.dw3, p.db3, p.dw0, p.db0, p.dws, p.dbs);
  }
}

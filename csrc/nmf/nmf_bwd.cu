// CUDA NMF2D backward: the per-stage pass kernel (backward of one coef update over all N-tiles) and the g_X GEMM.
// Semantics: nmf_params.h; building blocks and precision scheme: nmf_common.cuh.
//
// nmf_bwd_kernel, CTA (b, p) persistent over the N-tiles p, p+P, ... (BN columns each), 256 threads:
//   C_new, C_prev -> bf16 pieces;
//   sweep 1 over D-chunks (x chunk prefetched one chunk ahead, like the forward): A += X^T B; final: U += g_Y^T B
//       and the CTA's pgy partial += g_Y C_new (g_Y read once); step: U += X^T g_E (the x chunk is used twice);
//   U += gcin; step: U += C_new S (tensor cores); Q = C_prev G (+eps); in the fragment layout
//       g_A = U C_prev / Q, g_Q = -U C_new / Q, g_C = U A / Q; then g_C += g_Q G^T (tensor cores) and
//       pgg += C_prev^T g_Q (shared memory if it fits, else read-modify-written in pgg); init: softmax backward
//       (row pass); gcout / ga stored (coalesced); g_A -> pieces;
//   sweep 2 over D-chunks: pxg partial += X g_A (re-reading x, expected from L2).
// nmf_gx_kernel: 128 x 128 output tiles, g_X = sum_m L_m R_m^T over the stacked factors (k-chunks of <= 64 ranks
//   as pieces in shared memory), staged in shared memory in g_X's dtype and stored along its unit stride.
#include <stdexcept>
#include <string>

#include "nmf/nmf_common.cuh"

namespace nmf {

template <typename T, int L, int RP, int MTW>
struct BwdLayout {
  using Gm = Geo<RP, MTW>;
  static constexpr int NXP = XPieces<T>::template n<L>();
  static constexpr size_t XSZ = align128((size_t)NXP * BD * Gm::LDN * 2);
  static constexpr size_t VSZ = align128((size_t)L * BD * Gm::LDR * 2);
  static constexpr size_t GSZ = align128((size_t)L * RP * Gm::LDR * 2);
  static constexpr size_t XS = 0, GYS = XSZ, V2S = XSZ;  // g_Y chunk (final) or g_E chunk (step)
  static constexpr size_t V1S = XSZ + (XSZ > VSZ ? XSZ : VSZ);
  static constexpr size_t U1 = V1S + VSZ > GSZ ? V1S + VSZ : GSZ;
  static constexpr size_t GS = 0;
  // AF (A, then g_C) and UF (U, then g_A) are adjacent: during the sweeps both are free and together hold the
  // KS x BD reduction slices of chunk_partial (FROWS <= 2 BN rows; BN LDF floats is a multiple of 128 bytes)
  static constexpr size_t FT = (size_t)Gm::BN * Gm::LDF * 4;
  static_assert(FT % 128 == 0 && Gm::FROWS <= 2 * Gm::BN, "reduction slices must fit in AF + UF");
  static constexpr size_t PT = align128((size_t)L * Gm::BN * Gm::LDR * 2);
  static constexpr size_t AF = U1, UF = AF + FT, CNP = UF + FT, CPP = CNP + PT;
  static constexpr size_t HS = CPP + PT;
  static constexpr size_t BASE = HS;
  static constexpr size_t HSZ = align128((size_t)RP * RP * 4);
};

}  // namespace nmf

size_t nmf_bwd_smem_host(int es, int L, int RP, int MTW, bool hsm) {
  using nmf::align128;
  using nmf::BD;
  const int BN = nmf::geo_bn(RP, MTW);
  const size_t LDN = BN + 8, LDR = RP + 8, LDF = RP + 8;
  const int NXP = es == 2 ? 2 : L;  // upper bound for 16-bit types (fp16: 2 pieces)
  const size_t xsz = align128((size_t)NXP * BD * LDN * 2), vsz = align128((size_t)L * BD * LDR * 2);
  const size_t gsz = align128((size_t)L * RP * LDR * 2);
  size_t u1 = xsz + (xsz > vsz ? xsz : vsz) + vsz;
  if (gsz > u1) u1 = gsz;
  size_t tot = u1 + 2 * (size_t)BN * LDF * 4 + 2 * align128((size_t)L * BN * LDR * 2);
  if (hsm) tot += align128((size_t)RP * RP * 4);
  return tot;
}

namespace nmf {

template <typename T, int L, int RP, int MTW>
__global__ void __launch_bounds__(NTHR, 1) nmf_bwd_kernel(const NmfBwdStageParams p, int xmode, int gymode, int hsm) {
  using Gm = Geo<RP, MTW>;
  using LY = BwdLayout<T, L, RP, MTW>;
  constexpr int NXP = LY::NXP;
  constexpr int BN = Gm::BN, NT = Gm::NT, NW = Gm::NW, LDN = Gm::LDN, LDR = Gm::LDR, LDF = Gm::LDF;
  constexpr size_t PX = (size_t)BD * LDN, PV = (size_t)BD * LDR, PG = (size_t)RP * LDR, PC = (size_t)BN * LDR;
  SK_DYN_SMEM(smem);
  bf16* xs = reinterpret_cast<bf16*>(smem + LY::XS);
  bf16* gys = reinterpret_cast<bf16*>(smem + LY::GYS);
  bf16* v2s = reinterpret_cast<bf16*>(smem + LY::V2S);
  bf16* v1s = reinterpret_cast<bf16*>(smem + LY::V1S);
  bf16* gs = reinterpret_cast<bf16*>(smem + LY::GS);
  float* af = reinterpret_cast<float*>(smem + LY::AF);
  float* uf = reinterpret_cast<float*>(smem + LY::UF);
  bf16* cnp = reinterpret_cast<bf16*>(smem + LY::CNP);
  bf16* cpp = reinterpret_cast<bf16*>(smem + LY::CPP);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int P = p.P;
  const int64_t b = blockIdx.x / P;
  const int pp = blockIdx.x % P;
  const int64_t D = p.D, N = p.N;
  const int R = p.R;
  const int ntiles = (int)((N + BN - 1) / BN);
  const int nch = (int)((D + BD - 1) / BD);
  const bool fin = p.final_stage != 0;
  const bool hasgy = fin && p.has_gy;
  const T* xb = reinterpret_cast<const T*>(p.x) + b * p.x_sB;
  const T* gyb = hasgy ? reinterpret_cast<const T*>(p.gy) + b * p.gy_sB : nullptr;
  const float* bb = p.bases + b * D * R;
  const float* geb = fin ? nullptr : p.ge + b * D * R;
  const float* cnew = p.cnew + b * N * R;
  const float* cprev = p.cprev + b * N * R;
  float* pxg = p.pxg + (b * P + pp) * D * RP;
  float* pgy = hasgy ? p.pgy + (b * P + pp) * D * RP : nullptr;
  float* pgg = p.pgg + (b * P + pp) * RP * RP;
  float* gacc = hsm ? reinterpret_cast<float*>(smem + LY::HS) : pgg;
  const int wm = warp / Gm::WN, wn = warp % Gm::WN;
  const int m0 = wm * MTW * 16, n0 = wn * NW;
  const float eps = p.eps, inv_t = p.inv_t;

  for (int tile = pp; tile < ntiles; tile += P) {
    const bool first = tile == pp;
    const int64_t c0 = (int64_t)tile * BN;
    const int nv = (int)((N - c0) < BN ? (N - c0) : BN);
    const T* xt = xb + c0 * p.x_sN;
    const T* gyt = hasgy ? gyb + c0 * p.gy_sN : nullptr;

    rows_to_pieces<BN, RP, L>(cnew + c0 * R, R, nv, R, cnp, LDR, PC);
    rows_to_pieces<BN, RP, L>(cprev + c0 * R, R, nv, R, cpp, LDR, PC);

    // ---- sweep 1: A = X^T B; U = g_Y^T B (final) or X^T g_E (step); pgy += g_Y C_new (final)
    float A[MTW][NT][4], U[MTW][NT][4];
    acc_zero(A);
    acc_zero(U);
    {
      // x / g_Y chunks prefetched into registers one chunk ahead; the small bases / g_E chunks (L2-resident) are
      // loaded synchronously (fewer live registers: the backward holds A, U and the pgy fragments at once)
      TilePref<T, BD, BN> xp, gp;
      const int nr0 = (int)(D < BD ? D : BD);
      xp.load(xt, p.x_sD, p.x_sN, nr0, nv, xmode);
      if (hasgy) gp.load(gyt, p.gy_sD, p.gy_sN, nr0, nv, gymode);
      for (int c = 0; c < nch; ++c) {
        const int64_t d0 = (int64_t)c * BD;
        const int nrc = (int)((D - d0) < BD ? (D - d0) : BD);
        __syncthreads();
        xp.template store<NXP>(xs, LDN, PX, xmode);
        if (hasgy) gp.template store<NXP>(gys, LDN, PX, gymode);
        rows_to_pieces<BD, RP, L>(bb + d0 * R, R, nrc, R, v1s, LDR, PV);
        if (!fin) rows_to_pieces<BD, RP, L>(geb + d0 * R, R, nrc, R, v2s, LDR, PV);
        if (c + 1 < nch) {
          const int64_t d1 = d0 + BD;
          const int nr = (int)((D - d1) < BD ? (D - d1) : BD);
          xp.load(xt + d1 * p.x_sD, p.x_sD, p.x_sN, nr, nv, xmode);
          if (hasgy) gp.load(gyt + d1 * p.gy_sD, p.gy_sD, p.gy_sN, nr, nv, gymode);
        }
        __syncthreads();
        warp_mma<MTW, NT, true, true, NXP, L, L>(A, xs, LDN, PX, m0, v1s, LDR, PV, n0, 0, BD);
        if (hasgy) {
          warp_mma<MTW, NT, true, true, NXP, L, L>(U, gys, LDN, PX, m0, v1s, LDR, PV, n0, 0, BD);
          chunk_partial<Gm, NXP, L>(gys, PX, cnp, PC, af, pgy, d0, D, first);
        } else if (!fin) {
          warp_mma<MTW, NT, true, true, NXP, L, L>(U, xs, LDN, PX, m0, v2s, LDR, PV, n0, 0, BD);
        }
      }
    }
    __syncthreads();
    frag_to_smem(A, af, LDF, m0, n0);
    if (p.has_gcin) {
#pragma unroll
      for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int n = frag_row(m0, mt, i), r = frag_col(n0, nt, i);
            if (n < nv && r < R) U[mt][nt][i] += __ldg(p.gcin + (b * N + c0 + n) * R + r);
          }
    }
    if (!fin) {  // U += C_new S
      rows_to_pieces<RP, RP, L>(p.S + b * RP * RP, RP, RP, RP, gs, LDR, PG);
      __syncthreads();
      warp_mma<MTW, NT, false, true, L, L, L>(U, cnp, LDR, PC, m0, gs, LDR, PG, n0, 0, RP);
    }
    __syncthreads();
    rows_to_pieces<RP, RP, L>(p.G + b * RP * RP, RP, RP, RP, gs, LDR, PG);
    __syncthreads();

    // ---- Q = C_prev G + eps; g_A, g_Q, U A / Q in the fragment layout
    float Q[MTW][NT][4];
    acc_zero(Q);
    warp_mma<MTW, NT, false, true, L, L, L>(Q, cpp, LDR, PC, m0, gs, LDR, PG, n0, 0, RP);
#pragma unroll
    for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int n = frag_row(m0, mt, i), r = frag_col(n0, nt, i);
          float cpv = 0.f, cnv = 0.f;
          if (n < nv && r < R) {
            cpv = __ldg(cprev + (c0 + n) * R + r);
            cnv = __ldg(cnew + (c0 + n) * R + r);
          }
          const float u = U[mt][nt][i], q = Q[mt][nt][i] + eps;
          const float gq = -u * cnv / q;
          uf[(size_t)n * LDF + r] = u * cpv / q;
          float* ap = af + (size_t)n * LDF + r;
          *ap = u * *ap / q;
          store_pieces<L>(cnp + (size_t)n * LDR + r, PC, gq);
        }
    __syncthreads();

    // ---- g_C = U A / Q + g_Q G^T; pgg += C_prev^T g_Q
    frag_from_smem(Q, af, LDF, m0, n0);
    warp_mma<MTW, NT, false, false, L, L, L>(Q, cnp, LDR, PC, m0, gs, LDR, PG, n0, 0, RP);
    frag_to_smem(Q, af, LDF, m0, n0);
    rr_partial<Gm, L>(cpp, cnp, PC, gacc, first);
    __syncthreads();
    if (p.init) {  // g_A += inv_t C_prev (g_C - rowsum(g_C C_prev))
      for (int n = tid; n < nv; n += NTHR) {
        const float* crow = cprev + (c0 + n) * R;
        const float* grow = af + (size_t)n * LDF;
        float s = 0.f;
        for (int r = 0; r < R; ++r) s += grow[r] * __ldg(crow + r);
        float* urow = uf + (size_t)n * LDF;
        for (int r = 0; r < R; ++r) urow[r] += inv_t * __ldg(crow + r) * (grow[r] - s);
      }
      __syncthreads();
    }
    if (p.store_gc) smem_to_rows(af, LDF, p.gcout + (b * N + c0) * R, nv, R);
    if (p.store_ga) smem_to_rows(uf, LDF, p.ga + (b * N + c0) * R, nv, R);
    smem_to_pieces<BN, RP, L>(uf, LDF, cpp, LDR, PC);
    __syncthreads();

    // ---- sweep 2: pxg += X g_A
    {
      TilePref<T, BD, BN> xp;
      xp.load(xt, p.x_sD, p.x_sN, (int)(D < BD ? D : BD), nv, xmode);
      for (int c = 0; c < nch; ++c) {
        __syncthreads();
        xp.template store<NXP>(xs, LDN, PX, xmode);
        if (c + 1 < nch) {
          const int64_t d1 = (int64_t)(c + 1) * BD;
          const int nr = (int)((D - d1) < BD ? (D - d1) : BD);
          xp.load(xt + d1 * p.x_sD, p.x_sD, p.x_sN, nr, nv, xmode);
        }
        __syncthreads();
        chunk_partial<Gm, NXP, L>(xs, PX, cpp, PC, af, pxg, (int64_t)c * BD, D, first);
      }
    }
    __syncthreads();
  }

  if (pp >= ntiles) {  // no tile: the partials are zero
    for (int64_t i = tid; i < D * RP; i += NTHR) {
      pxg[i] = 0.f;
      if (hasgy) pgy[i] = 0.f;
    }
    for (int i = tid; i < RP * RP; i += NTHR) pgg[i] = 0.f;
  } else if (hsm) {
    __syncthreads();
    for (int i = tid; i < RP * RP; i += NTHR) pgg[i] = gacc[i];
  }
}

// ------------------------------------------------------------------------------------------------------------------
// g_X GEMM
// ------------------------------------------------------------------------------------------------------------------
constexpr int GX_BD = 128, GX_BN = 128;

template <typename T, int L, int RP>
struct GxLayout {
  static constexpr int KC = RP < 64 ? RP : 64;
  static constexpr int LDK = KC + 8;
  static constexpr size_t PS = (size_t)GX_BD * LDK;  // piece stride (both operands have 128 rows)
  static constexpr size_t LS = 0, RS = align128((size_t)L * PS * 2);
  static constexpr size_t OSZ = (size_t)GX_BD * (GX_BN + 8) * sizeof(T);
  static constexpr size_t TOT = RS + align128((size_t)L * PS * 2) > OSZ ? RS + align128((size_t)L * PS * 2) : OSZ;
};

template <typename T, int L, int RP>
__global__ void __launch_bounds__(NTHR, 1) nmf_gx_kernel(const NmfGxParams p, int gmode, int ntn) {
  using LY = GxLayout<T, L, RP>;
  constexpr int KC = LY::KC, LDK = LY::LDK, LDO = GX_BN + 8;
  SK_DYN_SMEM(smem);
  bf16* ls = reinterpret_cast<bf16*>(smem + LY::LS);
  bf16* rs = reinterpret_cast<bf16*>(smem + LY::RS);
  T* os = reinterpret_cast<T*>(smem);
  const int warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // 4 x 2 warps of 32 x 64
  const int tn = blockIdx.x % ntn, td = blockIdx.x / ntn;
  const int64_t D = p.D, N = p.N, B = p.B;
  const int R = p.R;
  const int64_t d0 = (int64_t)td * GX_BD, n0 = (int64_t)tn * GX_BN;
  const int nr = (int)((D - d0) < GX_BD ? (D - d0) : GX_BD);
  const int nc = (int)((N - n0) < GX_BN ? (N - n0) : GX_BN);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float acc[2][8][4];
    acc_zero(acc);
    for (int m = 0; m < p.M1 + p.M2; ++m) {
      const float* lf = m < p.M1 ? p.l1 + ((int64_t)m * B + b) * D * R : p.l2 + ((int64_t)(m - p.M1) * B + b) * D * R;
      const float* rf = m < p.M1 ? p.r1 + ((int64_t)m * B + b) * N * R : p.r2 + ((int64_t)(m - p.M1) * B + b) * N * R;
      for (int k0 = 0; k0 < R; k0 += KC) {
        __syncthreads();
        rows_to_pieces<GX_BD, KC, L>(lf + d0 * R + k0, R, nr, R - k0, ls, LDK, LY::PS);
        rows_to_pieces<GX_BN, KC, L>(rf + n0 * R + k0, R, nc, R - k0, rs, LDK, LY::PS);
        __syncthreads();
        warp_mma<2, 8, false, false, L, L, L>(acc, ls, LDK, LY::PS, wm * 32, rs, LDK, LY::PS, wn * 64, 0, KC);
      }
    }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          os[(size_t)frag_row(wm * 32, mt, i) * LDO + frag_col(wn * 64, nt, i)] = from_f<T>(acc[mt][nt][i]);
    __syncthreads();
    T* gb = reinterpret_cast<T*>(p.gx) + b * p.gx_sB + d0 * p.gx_sD + n0 * p.gx_sN;
    store_tile<T, GX_BD, GX_BN>(os, LDO, gb, p.gx_sD, p.gx_sN, nr, nc, gmode);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------------------------
template <typename T, int L, int RP, int MTW>
static void bwd_launch_t(const NmfBwdStageParams& p, cudaStream_t stream) {
  using LY = BwdLayout<T, L, RP, MTW>;
  const size_t lim = (size_t)smem_limit_bytes();
  const int hsm = LY::BASE + LY::HSZ <= lim;
  const size_t smem = LY::BASE + (hsm ? LY::HSZ : 0);
  if (smem > lim) throw std::runtime_error("nmf_bwd_stage_launch: not enough shared memory");
  const int xmode = tile_mode(p.x, p.x_sB, p.x_sD, p.x_sN, sizeof(T));
  const int gymode = (p.final_stage && p.has_gy) ? tile_mode(p.gy, p.gy_sB, p.gy_sD, p.gy_sN, sizeof(T)) : 0;
  auto kern = nmf_bwd_kernel<T, L, RP, MTW>;
  SK_SET_SMEM_ATTR(kern, smem);
  SK_LAUNCH(kern, dim3((unsigned)(p.B * p.P)), dim3(NTHR), smem, stream, p, xmode, gymode, hsm);
}

template <typename T, int L>
static void bwd_launch_l(const NmfBwdStageParams& p, cudaStream_t stream) {
  // the backward geometry is always MTW = 1 (nmf_make_geom): only that width is instantiated
  if (p.BN != geo_bn(p.RP, 1)) throw std::runtime_error("nmf_bwd_stage_launch: BN does not match the geometry");
  switch (p.RP) {
    case 16: bwd_launch_t<T, L, 16, 1>(p, stream); break;
    case 32: bwd_launch_t<T, L, 32, 1>(p, stream); break;
    case 64: bwd_launch_t<T, L, 64, 1>(p, stream); break;
    case 128: bwd_launch_t<T, L, 128, 1>(p, stream); break;
    default: throw std::runtime_error("nmf_bwd_stage_launch: bad RP");
  }
}

template <typename T, int L, int RP>
static void gx_launch_t(const NmfGxParams& p, cudaStream_t stream) {
  using LY = GxLayout<T, L, RP>;
  const size_t smem = LY::TOT;
  if (smem > (size_t)smem_limit_bytes()) throw std::runtime_error("nmf_gx_launch: not enough shared memory");
  const int gmode = tile_mode(p.gx, p.gx_sB, p.gx_sD, p.gx_sN, sizeof(T));
  const int64_t ntn = (p.N + GX_BN - 1) / GX_BN, ntd = (p.D + GX_BD - 1) / GX_BD;
  if (ntn * ntd > 0x7fffffffLL) throw std::runtime_error("nmf_gx_launch: too many tiles");
  const unsigned gy = (unsigned)(p.B < 65535 ? p.B : 65535);
  auto kern = nmf_gx_kernel<T, L, RP>;
  SK_SET_SMEM_ATTR(kern, smem);
  SK_LAUNCH(kern, dim3((unsigned)(ntn * ntd), gy), dim3(NTHR), smem, stream, p, gmode, (int)ntn);
}

template <typename T, int L>
static void gx_launch_l(const NmfGxParams& p, cudaStream_t stream) {
  switch (next_pow2_rp(p.R)) {
    case 16: gx_launch_t<T, L, 16>(p, stream); break;
    case 32: gx_launch_t<T, L, 32>(p, stream); break;
    case 64: gx_launch_t<T, L, 64>(p, stream); break;
    case 128: gx_launch_t<T, L, 128>(p, stream); break;
    default: throw std::runtime_error("nmf_gx_launch: bad R");
  }
}

}  // namespace nmf

void nmf_bwd_stage_launch(const NmfBwdStageParams& p, cudaStream_t stream) {
  using namespace nmf;
  if (p.B * p.N == 0) return;
  if (p.R < 1 || p.R > 128 || p.RP != next_pow2_rp(p.R)) throw std::runtime_error("nmf_bwd_stage_launch: bad R / RP");
  if (p.D < 1 || p.P < 1) throw std::runtime_error("nmf_bwd_stage_launch: D and P must be >= 1");
  const bool fin = p.final_stage != 0;
  if (!p.x || !p.bases || !p.cnew || !p.cprev || !p.G || !p.pxg || !p.pgg || (fin && p.has_gy && (!p.gy || !p.pgy)) ||
      (!fin && (!p.ge || !p.S)) || (p.has_gcin && !p.gcin) || (p.store_gc && !p.gcout) || (p.store_ga && !p.ga))
    throw std::runtime_error("nmf_bwd_stage_launch: null buffer");
  switch (p.dtype) {
    case NMF_F32:
      if (p.allow_tf32) bwd_launch_l<float, 2>(p, stream);
      else bwd_launch_l<float, 3>(p, stream);
      break;
    case NMF_F16: bwd_launch_l<__half, 2>(p, stream); break;
    case NMF_BF16: bwd_launch_l<__nv_bfloat16, 2>(p, stream); break;
    default: throw std::runtime_error("nmf_bwd_stage_launch: bad dtype");
  }
}

void nmf_gx_launch(const NmfGxParams& p, cudaStream_t stream) {
  using namespace nmf;
  if (p.B * p.N == 0 || p.D == 0) return;
  if (p.R < 1 || p.R > 128) throw std::runtime_error("nmf_gx_launch: bad R");
  if (!p.gx || p.M1 < 0 || p.M2 < 0 || (p.M1 > 0 && (!p.l1 || !p.r1)) || (p.M2 > 0 && (!p.l2 || !p.r2)))
    throw std::runtime_error("nmf_gx_launch: null buffer");
  switch (p.dtype) {
    case NMF_F32:
      if (p.allow_tf32) gx_launch_l<float, 2>(p, stream);
      else gx_launch_l<float, 3>(p, stream);
      break;
    case NMF_F16: gx_launch_l<__half, 2>(p, stream); break;
    case NMF_BF16: gx_launch_l<__nv_bfloat16, 2>(p, stream); break;
    default: throw std::runtime_error("nmf_gx_launch: bad dtype");
  }
}

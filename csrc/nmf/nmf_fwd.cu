// CUDA NMF2D forward: geometry, Gram / bases update (fp32 SIMT, parallel over D) and the coef pass kernel
// (bf16-piece tensor cores). Semantics: nmf_params.h; building blocks and precision scheme: nmf_common.cuh.
//
// nmf_coef_kernel, CTA (b, p) persistent over the N-tiles p, p+P, ... (BN columns each), 256 threads:
//   sweep 1 over D-chunks of 32 rows: x chunk -> bf16 pieces in shared memory (the next chunk is prefetched into
//       registers while the current one is multiplied), bases chunk -> pieces; A (BN x RP) += X^T B on tensor cores.
//   A -> shared fp32; C_in = softmax(inv_t A) (init; row max / sum kept per row) or cin -> pieces; G -> pieces;
//   den = C_in G (tensor cores); C_out = C_in A / (den + eps) in the fragment layout -> shared fp32 -> cout
//       (coalesced) and C_out pieces.
//   accum: H += C_out^T C_out (per-CTA, in shared memory if it fits, else read-modify-written in pcc);
//       sweep 2 over D-chunks: E chunk = X C_out (re-reading x, expected from L2), KS-slices summed in shared memory
//       in a fixed order, added to the CTA's (D, RP) partial pxc (the CTA's first tile writes it over).
//   recon: sweep over D-chunks: Y chunk = B C_out^T -> shared (y dtype) -> y (coalesced along its unit stride).
// Bases update (nmf_bases_launch): nmf_hsum_kernel (H = sum_p pcc, fixed order), nmf_bupd_kernel (grid (D-chunks, B):
//   E = sum_p pxc, B_out, per-chunk G partial), nmf_gsum_kernel (G = sum of the chunk partials in chunk order).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "nmf/nmf_common.cuh"

namespace nmf {

int smem_limit_bytes() {
#ifdef SEGNEXT_EMU
  return emu_smem_limit();
#else
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 48 * 1024;
  return v;
#endif
}

// ------------------------------------------------------------------------------------------------------------------
// Shared-memory layout of the coef kernel (byte offsets). U1 holds, at different times: the x chunk pieces (or the
// y staging tile) + the bases chunk pieces, or the G pieces.
// ------------------------------------------------------------------------------------------------------------------
template <typename T, int L, int RP, int MTW>
struct CoefLayout {
  using Gm = Geo<RP, MTW>;
  static constexpr int NXP = XPieces<T>::template n<L>();
  static constexpr size_t XSZ = align128(
      (size_t)NXP * BD * Gm::LDN * 2 > (size_t)BD * Gm::LDN * sizeof(T) ? (size_t)NXP * BD * Gm::LDN * 2
                                                                          : (size_t)BD * Gm::LDN * sizeof(T));
  static constexpr size_t VSZ = align128((size_t)L * BD * Gm::LDR * 2);
  static constexpr size_t GSZ = align128((size_t)L * RP * Gm::LDR * 2);
  static constexpr size_t U1 = XSZ + VSZ > GSZ ? XSZ + VSZ : GSZ;
  static constexpr size_t XS = 0, VS = XSZ, GS = 0;
  static constexpr size_t AF = U1;
  static constexpr size_t CP = AF + align128((size_t)Gm::FROWS * Gm::LDF * 4);
  static constexpr size_t RS = CP + align128((size_t)L * Gm::BN * Gm::LDR * 2);
  static constexpr size_t HS = RS + align128((size_t)Gm::BN * 2 * 4);
  static constexpr size_t BASE = HS;
  static constexpr size_t HSZ = align128((size_t)RP * RP * 4);
};

// host: bytes of the coef kernel's shared memory (x element size es)
static size_t coef_smem_host(int es, int L, int RP, int MTW, bool hsm) {
  const int WN = RP == 64 ? 2 : (RP == 128 ? 8 : 1);
  const int BN = 16 * MTW * (8 / WN);
  const size_t LDN = BN + 8, LDR = RP + 8, LDF = RP + 8;
  const int NXP = es == 2 ? 2 : L;  // upper bound for 16-bit types (fp16: 2 pieces)
  size_t xsz = align128(std::max((size_t)NXP * BD * LDN * 2, (size_t)BD * LDN * es));
  size_t vsz = align128((size_t)L * BD * LDR * 2), gsz = align128((size_t)L * RP * LDR * 2);
  size_t u1 = std::max(xsz + vsz, gsz);
  size_t tot = u1 + align128((size_t)geo_frows(RP, MTW) * LDF * 4) + align128((size_t)L * BN * LDR * 2) +
               align128((size_t)BN * 8);
  if (hsm) tot += align128((size_t)RP * RP * 4);
  return tot;
}

}  // namespace nmf

// backward smem size (defined in nmf_bwd.cu)
size_t nmf_bwd_smem_host(int es, int L, int RP, int MTW, bool hsm);

// ------------------------------------------------------------------------------------------------------------------
// Geometry
// ------------------------------------------------------------------------------------------------------------------
static int bases_chunk_rows(int64_t B, int64_t D, int RP) {
  int bd = RP <= 64 ? 64 : 16;
  while (bd > 8 && B * ((D + bd - 1) / bd) < 256) bd /= 2;
  return bd;
}

NmfGeom nmf_make_geom(int64_t B, int64_t D, int64_t N, int R, int dtype, int backward, int num_sms, int p_override,
                      int mtw_override) {
  if (R < 1 || R > 128) throw std::runtime_error("nmf (cuda): rank R must be in [1, 128], got " + std::to_string(R));
  if (dtype < NMF_F32 || dtype > NMF_BF16) throw std::runtime_error("nmf (cuda): bad dtype");
  NmfGeom g{};
  g.RP = nmf::next_pow2_rp(R);
  const int es = dtype == NMF_F32 ? 4 : 2;
  const int L = dtype == NMF_F32 ? 3 : 2;  // worst case (fp32 without TF32)
  const size_t lim = (size_t)nmf::smem_limit_bytes();
  int mtw = 0;
  for (int m = backward ? 1 : 2; m >= 1 && !mtw; --m) {
    const size_t need = backward ? nmf_bwd_smem_host(es, L, g.RP, m, false) : nmf::coef_smem_host(es, L, g.RP, m, false);
    if (need <= lim) mtw = m;
  }
  if (!backward && (mtw_override == 1 || mtw_override == 2)) mtw = mtw_override;  // tests: force the forward's width
  if (!mtw) throw std::runtime_error("nmf (cuda): not enough shared memory for R = " + std::to_string(R));
  g.BN = nmf::geo_bn(g.RP, mtw);
  g.T = (int)((N + g.BN - 1) / g.BN);
  if (g.T < 1) g.T = 1;
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  int64_t P = sms / (B > 0 ? B : 1);  // one wave of one CTA per SM
  if (p_override > 0) P = p_override;  // tests: force CTAs per sample
  if (P < 1) P = 1;
  if (P > g.T) P = g.T;
  g.P = (int)P;
  const int bd = bases_chunk_rows(B, D, g.RP);
  const int64_t nch = (D + bd - 1) / bd;
  g.work_floats = (size_t)B * g.RP * g.RP * (size_t)(1 + nch);
  return g;
}

namespace nmf {

// ------------------------------------------------------------------------------------------------------------------
// Bases update / Gram (fp32 SIMT)
// ------------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(NTHR) nmf_hsum_kernel(const float* __restrict__ pcc, float* __restrict__ hw,
                                                       float* __restrict__ H, int P, int RP, int64_t b0) {
  const int64_t b = b0 + blockIdx.y;
  const int e = blockIdx.x * NTHR + threadIdx.x;
  if (e >= RP * RP) return;
  const float* src = pcc + b * P * RP * RP + e;
  float s = 0.f;
  for (int q = 0; q < P; ++q) s += src[(int64_t)q * RP * RP];
  hw[b * RP * RP + e] = s;
  if (H) H[b * RP * RP + e] = s;
}

__global__ void __launch_bounds__(NTHR) nmf_gsum_kernel(const float* __restrict__ gp, float* __restrict__ G, int nch,
                                                       int RP, int64_t b0) {
  const int64_t b = b0 + blockIdx.y;
  const int e = blockIdx.x * NTHR + threadIdx.x;
  if (e >= RP * RP) return;
  const float* src = gp + b * nch * RP * RP + e;
  float s = 0.f;
  for (int c = 0; c < nch; ++c) s += src[(int64_t)c * RP * RP];
  G[b * RP * RP + e] = s;
}

// Gram without a workspace (nmf_bases_launch with update = 0 and work = null): thread (i, j) sums over all D rows.
__global__ void __launch_bounds__(NTHR) nmf_gram_direct_kernel(const float* __restrict__ bin, float* __restrict__ G,
                                                              int64_t D, int R, int RP, int64_t b0) {
  const int64_t b = b0 + blockIdx.y;
  const int e = blockIdx.x * NTHR + threadIdx.x;
  if (e >= RP * RP) return;
  const int i = e / RP, j = e % RP;
  float s = 0.f;
  if (i < R && j < R) {
    const float* src = bin + b * D * R;
    for (int64_t d = 0; d < D; ++d) s = fmaf(src[d * R + i], src[d * R + j], s);
  }
  G[b * RP * RP + e] = s;
}

// grid (nch, B): rows [c*BDb, (c+1)*BDb) of one sample. update: E = sum_p pxc, B_out = B_in E / (B_in H + eps);
// always: the chunk's Gram partial of B_out (or B_in) -> gp[b][c].
__global__ void __launch_bounds__(NTHR) nmf_bupd_kernel(NmfBasesParams p, const float* __restrict__ hw,
                                                       float* __restrict__ gp, int BDb, int nch, int64_t b0) {
  SK_DYN_SMEM(smem);
  const int RP = p.RP, R = p.R;
  const int LD = RP + 1;
  float* hs = reinterpret_cast<float*>(smem);   // RP x RP (update)
  float* bi = hs + (p.update ? RP * RP : 0);    // BDb x LD: B_in
  float* es = bi + BDb * LD;                    // BDb x LD: E
  float* bo = es + BDb * LD;                    // BDb x LD: B_out
  const int64_t b = b0 + blockIdx.y;
  const int c = blockIdx.x;
  const int64_t d0 = (int64_t)c * BDb;
  const int nr = (int)((p.D - d0) < BDb ? (p.D - d0) : BDb);
  const int tid = threadIdx.x;
  const float* bin = p.bin + (b * p.D + d0) * R;
  for (int e = tid; e < BDb * RP; e += NTHR) {
    const int row = e / RP, r = e % RP;
    bi[row * LD + r] = (row < nr && r < R) ? bin[(int64_t)row * R + r] : 0.f;
  }
  if (p.update) {
    for (int e = tid; e < RP * RP; e += NTHR) hs[e] = hw[b * RP * RP + e];
    for (int e = tid; e < BDb * RP; e += NTHR) {
      const int row = e / RP, r = e % RP;
      float s = 0.f;
      if (row < nr) {
        const float* src = p.pxc + (b * p.P * p.D + d0 + row) * RP + r;
        for (int q = 0; q < p.P; ++q) s += src[(int64_t)q * p.D * RP];
        if (p.store_eh && r < R) p.E[(b * p.D + d0 + row) * R + r] = s;
      }
      es[row * LD + r] = s;
    }
  }
  __syncthreads();
  float* bt = bi;
  if (p.update) {
    for (int e = tid; e < BDb * RP; e += NTHR) {
      const int row = e / RP, r = e % RP;
      float den = 0.f;
      for (int k = 0; k < RP; ++k) den = fmaf(bi[row * LD + k], hs[k * RP + r], den);
      const float v = (row < nr && r < R) ? bi[row * LD + r] * es[row * LD + r] / (den + p.eps) : 0.f;
      bo[row * LD + r] = v;
      if (row < nr && r < R) p.bout[(b * p.D + d0 + row) * R + r] = v;
    }
    __syncthreads();
    bt = bo;
  }
  float* dst = gp + (b * nch + c) * RP * RP;
  for (int e = tid; e < RP * RP; e += NTHR) {
    const int i = e / RP, j = e % RP;
    float s = 0.f;
    for (int row = 0; row < nr; ++row) s = fmaf(bt[row * LD + i], bt[row * LD + j], s);
    dst[e] = s;
  }
}

}  // namespace nmf

void nmf_bases_launch(const NmfBasesParams& p, cudaStream_t stream) {
  using namespace nmf;
  if (p.B <= 0) return;
  if (p.R < 1 || p.R > 128 || p.RP != next_pow2_rp(p.R)) throw std::runtime_error("nmf_bases_launch: bad R / RP");
  if (p.D < 1) throw std::runtime_error("nmf_bases_launch: D must be >= 1");
  if (!p.G || !p.bin) throw std::runtime_error("nmf_bases_launch: null buffer");
  // samples on gridDim.y (at most 65535): launches over chunks of samples, b0 the chunk's first
  constexpr int64_t kMaxY = 65535;
  if (!p.work && !p.update) {  // Gram only, no workspace: one pass per sample
    const unsigned blocks = (unsigned)((p.RP * p.RP + NTHR - 1) / NTHR);
    for (int64_t b0 = 0; b0 < p.B; b0 += kMaxY)
      SK_LAUNCH(nmf_gram_direct_kernel, dim3(blocks, (unsigned)std::min(kMaxY, p.B - b0)), dim3(NTHR), 0, stream,
                p.bin, p.G, p.D, p.R, p.RP, b0);
    return;
  }
  if (!p.work) throw std::runtime_error("nmf_bases_launch: null workspace");
  if (p.update && (!p.pxc || !p.pcc || !p.bout || p.P < 1 || (p.store_eh && (!p.E || !p.H))))
    throw std::runtime_error("nmf_bases_launch: null buffer for the update");
  const int RP = p.RP;
  const int bd = bases_chunk_rows(p.B, p.D, RP);
  const int nch = (int)((p.D + bd - 1) / bd);
  float* hw = p.work;
  float* gp = p.work + (size_t)p.B * RP * RP;
  const unsigned rr_blocks = (unsigned)((RP * RP + NTHR - 1) / NTHR);
  const size_t smem = ((p.update ? (size_t)RP * RP : 0) + (size_t)3 * bd * (RP + 1)) * sizeof(float);
  SK_SET_SMEM_ATTR(nmf_bupd_kernel, smem);
  for (int64_t b0 = 0; b0 < p.B; b0 += kMaxY) {
    const unsigned nb = (unsigned)std::min(kMaxY, p.B - b0);
    if (p.update)
      SK_LAUNCH(nmf_hsum_kernel, dim3(rr_blocks, nb), dim3(NTHR), 0, stream, p.pcc, hw,
                p.store_eh ? p.H : (float*)nullptr, p.P, RP, b0);
    SK_LAUNCH(nmf_bupd_kernel, dim3((unsigned)nch, nb), dim3(NTHR), smem, stream, p, (const float*)hw, gp, bd, nch,
              b0);
    SK_LAUNCH(nmf_gsum_kernel, dim3(rr_blocks, nb), dim3(NTHR), 0, stream, (const float*)gp, p.G, nch, RP, b0);
  }
}

namespace nmf {

// ------------------------------------------------------------------------------------------------------------------
// The coef pass kernel
// ------------------------------------------------------------------------------------------------------------------
SK_DEV float softmax_val(float a, float inv_t, float mx, float sum) {
  return expf(__fsub_rn(__fmul_rn(inv_t, a), mx)) / sum;
}

template <typename T, int L, int RP, int MTW>
__global__ void __launch_bounds__(NTHR, 1) nmf_coef_kernel(const NmfCoefParams p, int xmode, int ymode, int hsm) {
  using Gm = Geo<RP, MTW>;
  using LY = CoefLayout<T, L, RP, MTW>;
  constexpr int NXP = LY::NXP;
  constexpr int BN = Gm::BN, NT = Gm::NT, NW = Gm::NW, LDN = Gm::LDN, LDR = Gm::LDR, LDF = Gm::LDF;
  constexpr size_t PX = (size_t)BD * LDN, PV = (size_t)BD * LDR, PG = (size_t)RP * LDR, PC = (size_t)BN * LDR;
  SK_DYN_SMEM(smem);
  bf16* xs = reinterpret_cast<bf16*>(smem + LY::XS);
  T* ys = reinterpret_cast<T*>(smem + LY::XS);
  bf16* vs = reinterpret_cast<bf16*>(smem + LY::VS);
  bf16* gs = reinterpret_cast<bf16*>(smem + LY::GS);
  float* af = reinterpret_cast<float*>(smem + LY::AF);
  bf16* cp = reinterpret_cast<bf16*>(smem + LY::CP);
  float* rs = reinterpret_cast<float*>(smem + LY::RS);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int P = p.P;
  const int64_t b = blockIdx.x / P;
  const int pp = blockIdx.x % P;
  const int64_t D = p.D, N = p.N;
  const int R = p.R;
  const int ntiles = (int)((N + BN - 1) / BN);
  const int nch = (int)((D + BD - 1) / BD);
  const T* xb = reinterpret_cast<const T*>(p.x) + b * p.x_sB;
  const float* bb = p.bases + b * D * R;
  const float* Gb = p.G + b * RP * RP;
  float* pxc = p.accum ? p.pxc + (b * P + pp) * D * RP : nullptr;
  float* pcc = p.accum ? p.pcc + (b * P + pp) * RP * RP : nullptr;
  float* hacc = hsm ? reinterpret_cast<float*>(smem + LY::HS) : pcc;
  const int wm = warp / Gm::WN, wn = warp % Gm::WN;
  const int m0 = wm * MTW * 16, n0 = wn * NW;
  const float eps = p.eps, inv_t = p.inv_t;

  for (int tile = pp; tile < ntiles; tile += P) {
    const bool first = tile == pp;
    const int64_t c0 = (int64_t)tile * BN;
    const int nv = (int)((N - c0) < BN ? (N - c0) : BN);
    const T* xt = xb + c0 * p.x_sN;

    // ---- sweep 1: A = X^T B
    float acc[MTW][NT][4];
    acc_zero(acc);
    {
      TilePref<T, BD, BN> xp;
      RowsPref<BD, RP> vp;
      xp.load(xt, p.x_sD, p.x_sN, (int)(D < BD ? D : BD), nv, xmode);
      vp.load(bb, R, (int)(D < BD ? D : BD), R);
      for (int c = 0; c < nch; ++c) {
        __syncthreads();
        xp.template store<NXP>(xs, LDN, PX, xmode);
        vp.template store<L>(vs, LDR, PV);
        if (c + 1 < nch) {
          const int64_t d1 = (int64_t)(c + 1) * BD;
          const int nr = (int)((D - d1) < BD ? (D - d1) : BD);
          xp.load(xt + d1 * p.x_sD, p.x_sD, p.x_sN, nr, nv, xmode);
          vp.load(bb + d1 * R, R, nr, R);
        }
        __syncthreads();
        warp_mma<MTW, NT, true, true, NXP, L, L>(acc, xs, LDN, PX, m0, vs, LDR, PV, n0, 0, BD);
      }
    }
    frag_to_smem(acc, af, LDF, m0, n0);
    __syncthreads();

    // ---- C_in (pieces) and G (pieces)
    rows_to_pieces<RP, RP, L>(Gb, RP, RP, RP, gs, LDR, PG);
    if (p.init) {
      for (int n = tid; n < BN; n += NTHR) {
        const float* arow = af + (size_t)n * LDF;
        float mx = -INFINITY;
        for (int r = 0; r < R; ++r) mx = fmaxf(mx, __fmul_rn(inv_t, arow[r]));
        float sum = 0.f;
        for (int r = 0; r < R; ++r) sum += expf(__fsub_rn(__fmul_rn(inv_t, arow[r]), mx));
        rs[2 * n] = mx;
        rs[2 * n + 1] = sum;
        float* c0row = (p.store_c0 && n < nv) ? p.c0 + (b * N + c0 + n) * R : nullptr;
        for (int r = 0; r < RP; ++r) {
          const float v = (n < nv && r < R) ? softmax_val(arow[r], inv_t, mx, sum) : 0.f;
          store_pieces<L>(cp + (size_t)n * LDR + r, PC, v);
          if (c0row && r < R) c0row[r] = v;
        }
      }
    } else {
      rows_to_pieces<BN, RP, L>(p.cin + (b * N + c0) * R, R, nv, R, cp, LDR, PC);
    }
    __syncthreads();

    // ---- den = C_in G; C_out = C_in A / (den + eps)
    acc_zero(acc);
    warp_mma<MTW, NT, false, true, L, L, L>(acc, cp, LDR, PC, m0, gs, LDR, PG, n0, 0, RP);
#pragma unroll
    for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int n = frag_row(m0, mt, i), r = frag_col(n0, nt, i);
          float* ap = af + (size_t)n * LDF + r;
          float c = 0.f;
          if (n < nv && r < R) {
            c = p.init ? softmax_val(*ap, inv_t, rs[2 * n], rs[2 * n + 1]) : __ldg(p.cin + (b * N + c0 + n) * R + r);
          }
          *ap = c * *ap / (acc[mt][nt][i] + eps);
        }
    __syncthreads();
    smem_to_pieces<BN, RP, L>(af, LDF, cp, LDR, PC);
    smem_to_rows(af, LDF, p.cout + (b * N + c0) * R, nv, R);
    __syncthreads();

    if (p.accum) {
      // ---- H += C_out^T C_out; E partial += X C_out
      rr_partial<Gm, L>(cp, cp, PC, hacc, first);
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
        chunk_partial<Gm, NXP, L>(xs, PX, cp, PC, af, pxc, (int64_t)c * BD, D, first);
      }
      __syncthreads();
    }

    if (p.recon) {
      // ---- Y chunk = B C_out^T, staged in shared memory in y's dtype
      constexpr int WNR = BN >= 128 ? 8 : BN / 16;  // warps along n
      constexpr int MTR = BN >= 128 ? 2 : 1;         // m-tiles (of the 32 rows) per warp
      constexpr int NTR = BN >= 128 ? BN / 64 : 2;   // n-tiles per warp
      constexpr int WMR = BN >= 128 ? 1 : 2;
      const bool active = warp < WNR * WMR;
      const int rm0 = (warp / WNR) * 16 * MTR, rn0 = (warp % WNR) * 8 * NTR;
      T* yb = reinterpret_cast<T*>(p.y) + b * p.y_sB + c0 * p.y_sN;
      RowsPref<BD, RP> vp;
      vp.load(bb, R, (int)(D < BD ? D : BD), R);
      for (int c = 0; c < nch; ++c) {
        const int64_t d0 = (int64_t)c * BD;
        const int nr = (int)((D - d0) < BD ? (D - d0) : BD);
        __syncthreads();
        vp.template store<L>(vs, LDR, PV);
        if (c + 1 < nch) {
          const int64_t d1 = d0 + BD;
          vp.load(bb + d1 * R, R, (int)((D - d1) < BD ? (D - d1) : BD), R);
        }
        __syncthreads();
        if (active) {
          float y[MTR][NTR][4];
          acc_zero(y);
          warp_mma<MTR, NTR, false, false, L, L, L>(y, vs, LDR, PV, rm0, cp, LDR, PC, rn0, 0, RP);
#pragma unroll
          for (int mt = 0; mt < MTR; ++mt)
#pragma unroll
            for (int nt = 0; nt < NTR; ++nt)
#pragma unroll
              for (int i = 0; i < 4; ++i)
                ys[(size_t)frag_row(rm0, mt, i) * LDN + frag_col(rn0, nt, i)] = from_f<T>(y[mt][nt][i]);
        }
        __syncthreads();
        store_tile<T, BD, BN>(ys, LDN, yb + d0 * p.y_sD, p.y_sD, p.y_sN, nr, nv, ymode);
      }
      __syncthreads();
    }
  }

  if (p.accum) {
    if (pp >= ntiles) {  // no tile: the partials are zero
      for (int64_t i = tid; i < D * RP; i += NTHR) pxc[i] = 0.f;
      for (int i = tid; i < RP * RP; i += NTHR) pcc[i] = 0.f;
    } else if (hsm) {
      __syncthreads();
      for (int i = tid; i < RP * RP; i += NTHR) pcc[i] = hacc[i];
    }
  }
}

template <typename T, int L, int RP, int MTW>
static void coef_launch_t(const NmfCoefParams& p, cudaStream_t stream) {
  using LY = CoefLayout<T, L, RP, MTW>;
  const size_t lim = (size_t)smem_limit_bytes();
  int hsm = p.accum && LY::BASE + LY::HSZ <= lim;
  const size_t smem = LY::BASE + (hsm ? LY::HSZ : 0);
  if (smem > lim) throw std::runtime_error("nmf_coef_launch: not enough shared memory");
  const int xmode = tile_mode(p.x, p.x_sB, p.x_sD, p.x_sN, sizeof(T));
  const int ymode = p.recon ? tile_mode(p.y, p.y_sB, p.y_sD, p.y_sN, sizeof(T)) : 0;
  auto kern = nmf_coef_kernel<T, L, RP, MTW>;
  SK_SET_SMEM_ATTR(kern, smem);
  SK_LAUNCH(kern, dim3((unsigned)(p.B * p.P)), dim3(NTHR), smem, stream, p, xmode, ymode, hsm);
}

template <typename T, int L>
static void coef_launch_l(const NmfCoefParams& p, cudaStream_t stream) {
  const int WN = p.RP == 64 ? 2 : (p.RP == 128 ? 8 : 1);
  const int mtw = p.BN / (16 * (8 / WN));
  if (mtw != 1 && mtw != 2) throw std::runtime_error("nmf_coef_launch: BN does not match the geometry");
#define NMF_CASE(RPV)                                                 \
  case RPV:                                                           \
    if (mtw == 2) coef_launch_t<T, L, RPV, 2>(p, stream);             \
    else coef_launch_t<T, L, RPV, 1>(p, stream);                      \
    break;
  switch (p.RP) {
    NMF_CASE(16)
    NMF_CASE(32)
    NMF_CASE(64)
    NMF_CASE(128)
    default: throw std::runtime_error("nmf_coef_launch: bad RP");
  }
#undef NMF_CASE
}

}  // namespace nmf

void nmf_coef_launch(const NmfCoefParams& p, cudaStream_t stream) {
  using namespace nmf;
  if (p.B * p.N == 0) return;
  if (p.R < 1 || p.R > 128 || p.RP != next_pow2_rp(p.R)) throw std::runtime_error("nmf_coef_launch: bad R / RP");
  if (p.D < 1 || p.P < 1) throw std::runtime_error("nmf_coef_launch: D and P must be >= 1");
  if (!p.x || !p.bases || !p.G || !p.cout || (!p.init && !p.cin) || (p.init && p.store_c0 && !p.c0) ||
      (p.accum && (!p.pxc || !p.pcc)) || (p.recon && !p.y))
    throw std::runtime_error("nmf_coef_launch: null buffer");
  switch (p.dtype) {
    case NMF_F32:
      if (p.allow_tf32) coef_launch_l<float, 2>(p, stream);
      else coef_launch_l<float, 3>(p, stream);
      break;
    case NMF_F16: coef_launch_l<__half, 2>(p, stream); break;
    case NMF_BF16: coef_launch_l<__nv_bfloat16, 2>(p, stream); break;
    default: throw std::runtime_error("nmf_coef_launch: bad dtype");
  }
}

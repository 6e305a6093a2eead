// Fused MSCA forward: one kernel reads u once (halo re-reads hit L1/L2) and writes out once.
//
//   a = dw5x5(u) + b0 ; h_k = dw_1xk(a) + bh_k ; v_k = dw_kx1(h_k) + bv_k ; s = a + v7 + v11 + v21
//   out = (w3 @ s + b3) * u          (zero "same" padding for every conv: a and h_k are ZERO outside the image)
//
// Design (trade-offs; all numbers per CTA of 256 threads):
//  * A CTA owns a TH x TW spatial tile of one image and loops over the channels in groups of G. Per channel it stages
//    the u tile with a 12-pixel halo in shared memory as fp32, computes a on the tile + 10 halo (2x4 register blocks,
//    25 weights in registers), the three 1xk strips on the tile columns and the rows they are needed on (one 24-wide
//    row of a serves all three strips), then the kx1 strips and s on the tile (R-row column items). Values of a and
//    h_k outside the image are written as 0 (never computed from the halo). fp32 accumulation throughout.
//  * s for ALL channels of the tile stays in shared memory (S[CP][P+8], in the input dtype: bf16/fp16 for half
//    inputs, fp32 for fp32), because the 1x1 mix needs every input channel of a pixel. The channel mix then runs as a
//    GEMM out[Cout, P] = W3[Cout, Cin] x S[Cin, P] with 32x32 warp tiles: fp16/bf16 inputs on mma.sync m16n8k16
//    (A = conv3 weight pre-packed per lane by prep_w3_kernel, one 16-byte load per k-step; B = S via
//    ldmatrix.x4.trans), fp32 inputs on TF32 mma.m16n8k8 when allow_tf32, else on exact fp32 FMA with the same
//    fragment bookkeeping. The epilogue adds b3, multiplies by u (re-read, mostly from L2) and stores; for
//    pixel-contiguous layouts (NCHW) each warp first stages 16 channels x 32 pixels in the dead depthwise work area so
//    that loads/stores cover whole 32-byte sectors, channels_last stores straight from the fragments.
//  * The S buffer limits the tile: P*CP*sizeof(T) bytes. Larger tiles recompute less halo (depthwise MACs per
//    output: 16x32 -> 205, 16x16 -> 240, 8x16 -> 346, 8x8 -> 456, 4x8 -> 746, vs 103 without halo) but need more
//    shared memory, i.e. fewer CTAs per SM. msca_fwd_plan picks the configuration with the lowest estimated cost
//    (MACs x tile coverage of the image x 1.25 if fewer than 2 CTAs fit per SM); MscaLaunchOptions::tile_cfg (the
//    binding's argument, from SEGNEXT_MSCA_CUDA_TILE via segnext_kernels/knobs.py) forces one for tuning. These
//    weights are estimates, not measurements: tune them on the GPU.
//  * Barriers: 4 per channel group (load | a | h | v). G channels per group amortise them; G*NTC = 256.
//  * u is read through its strides (NCHW, channels_last or any view); channels_last loads map consecutive threads to
//    consecutive channels (only G channels per group: a 32-byte sector is fetched several times, from L2; unmeasured).
//    int64 offsets everywhere a tensor is indexed.
//  * Two variants of the depthwise part (compute_s_tile): fp32 FMA (above; every dtype) and, for fp16/bf16 by default,
//    tensor cores (msca_depthwise_mma.cuh: each 1-D convolution as a product with a banded matrix on mma.sync, one
//    warp per channel; about 0.4 mma per output element and channel instead of about 205 FFMA on a 16x32 tile). Tiles with
//    TH % 4 == 0 and TW in {16, 32, 64} only; msca_choose_variant decides, SEGNEXT_MSCA_CUDA_DW forces.
//  * Not measured yet (no GPU where this was written): which depthwise variant wins, tile costs, 1.25 occupancy
//    penalty, carveout, the choice of G, and whether the u halo re-reads stay in L1/L2. bench/gpu_check.sh measures
//    against eager and Triton (bench.msca's "cuda_fma" rows time the FMA variant beside the default).
#include "msca/msca_common.cuh"
#include "msca/msca_depthwise_mma.cuh"

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace msca {

// Row stride (floats) of the per-warp epilogue staging buffer [16][kStgLd]: float2 stores of the D fragments are
// conflict-free per half warp (8g + 2t distinct), row reads are contiguous.
constexpr int kStgLd = 40;
constexpr size_t kStgBytes = (size_t)(MSCA_NT / 32) * 16 * kStgLd * sizeof(float);

// DW_MMA: the depthwise part on tensor cores (msca_depthwise_mma.cuh; MODE 0 only), else on fp32 FMA (msca_common.cuh).
template <typename T, int MODE, bool DW_MMA>
__global__ void __launch_bounds__(MSCA_NT, 2) msca_fwd_kernel(const MscaFwdParams p, const MscaGeom gm) {
  MSCA_DYN_SMEM(smem);
  T* S = reinterpret_cast<T*>(smem);
  float* work = reinterpret_cast<float*>(smem + gm.s_bytes);
  const TileCtx tile = tile_ctx(gm, (long long)blockIdx.x, p.C, p.H, p.W);
  const T* u_img = reinterpret_cast<const T*>(p.u) + (int64_t)tile.b * p.u_sB;
  T* o_img = reinterpret_cast<T*>(p.out) + (int64_t)tile.b * p.o_sB;

  compute_s_tile<T, DW_MMA>(S, smem, gm, p, tile, MODE == 1);

  const int warp = threadIdx.x >> 5, lane = lane_id();
  const int g = lane >> 2, t = lane & 3;
  const int nmb = gm.CP >> 5, nnb = gm.P >> 5;
  const bool staged = p.u_sW == 1 && p.o_sW == 1 && tile.C > 1;
  float* stg = work + warp * (16 * kStgLd);  // the depthwise work area is dead after compute_s_tile's last barrier
  for (int wt = warp; wt < nmb * nnb; wt += MSCA_NT / 32) {
    const int mb = wt % nmb, nb = wt / nmb;
    float acc[2][4][4];
    acc_zero(acc);
    gemm_packedA_smemKN<T, MODE>(acc, p.workspace, mb * 2, gm.CP, S, gm.s_ld, nb * 32);
    if (staged) {
      // pixel-contiguous layouts (NCHW): stage 16 output channels x 32 pixels per warp in shared memory (the dead
      // depthwise work area) and store rows of 32 consecutive pixels: full 32-byte sectors instead of quarter ones
      const int n = nb * 32 + lane;
      const int y = tile.y0 + n / gm.TW, x = tile.x0 + n % gm.TW;
      const bool vn = y < tile.H && x < tile.W;
      const int64_t su = (int64_t)y * p.u_sH + x, so = (int64_t)y * p.o_sH + x;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            *reinterpret_cast<float2*>(stg + (g + 8 * h) * kStgLd + 8 * j + 2 * t) =
                make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        __syncwarp();
        for (int ml = 0; ml < 16; ++ml) {
          const int m = mb * 32 + 16 * i + ml;
          if (m >= tile.C) break;  // warp-uniform
          if (vn) {
            const float att = stg[ml * kStgLd + lane] + p.b3[m];
            o_img[(int64_t)m * p.o_sC + so] = from_f<T>(att * to_f(u_img[(int64_t)m * p.u_sC + su]));
          }
        }
        __syncwarp();
      }
      continue;
    }
    // other layouts (channels_last, views): straight from the fragments; for channels_last a warp store covers
    // 4 pixels x 8 consecutive channels
    int64_t su[4][2], so[4][2];
    bool vn[4][2];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int n = nb * 32 + 8 * j + 2 * t + e;
        const int y = tile.y0 + n / gm.TW, x = tile.x0 + n % gm.TW;
        vn[j][e] = y < tile.H && x < tile.W;
        su[j][e] = (int64_t)y * p.u_sH + (int64_t)x * p.u_sW;
        so[j][e] = (int64_t)y * p.o_sH + (int64_t)x * p.o_sW;
      }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = mb * 32 + 16 * i + g + 8 * h;
        if (m >= tile.C) continue;
        const float bias = p.b3[m];
        const T* uc = u_img + (int64_t)m * p.u_sC;
        T* oc = o_img + (int64_t)m * p.o_sC;
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (!vn[j][e]) continue;
            const float att = acc[i][j][2 * h + e] + bias;
            oc[so[j][e]] = from_f<T>(att * to_f(uc[su[j][e]]));
          }
      }
  }
}

}  // namespace msca

// ------------------------------------------------------------------------------------------------------------------
// Host side: tile table, geometry, plan, launcher.
// ------------------------------------------------------------------------------------------------------------------
static const MscaTileConfig kTileTable[MSCA_NUM_TILE_CFGS] = {
    {16, 32, 2, 4},  // P = 512
    {16, 16, 2, 2},  // P = 256
    {8, 16, 2, 2},   // P = 128
    {8, 8, 4, 2},    // P = 64
    {4, 8, 4, 2},    // P = 32
    {28, 16, 2, 4},  // P = 448: TH + 20 = 48 rows of a, no idle mma rows in the tensor-core variant
};

const MscaTileConfig* msca_tile_table() { return kTileTable; }

static inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Smallest multiple of 8 elements >= n that is an odd number of 16-byte units (2-byte elements): row strides whose
// 8 consecutive rows fall in 8 distinct 16-byte bank groups (conflict-free ldmatrix).
static inline int odd_units8(int n) {
  int u = (n + 7) / 8;
  if (u % 2 == 0) ++u;
  return 8 * u;
}

bool msca_tile_mma_ok(int cfg) {
  // TW in {16, 32, 64}: TW / 8 divides 32 and a u row is at most 32 groups of 4 (the loops of msca_depthwise_mma.cuh)
  return cfg >= 0 && cfg < MSCA_NUM_TILE_CFGS && kTileTable[cfg].TH % 4 == 0 && kTileTable[cfg].TW % 16 == 0 &&
         kTileTable[cfg].TW <= 64 && 32 % (kTileTable[cfg].TW / 8) == 0;
}

// Dynamic shared memory of a geometry: forward S + work area (which the epilogue staging reuses); backward mix S +
// the work area, which DATT reuses once s is computed.
static void set_smem_bytes(MscaGeom& g, int mode) {
  if (mode == 0) g.work_bytes = std::max(g.work_bytes, msca::kStgBytes);  // forward epilogue staging
  g.smem_bytes = mode == 0 ? g.s_bytes + g.work_bytes : g.s_bytes + std::max(g.s_bytes, g.work_bytes);
}

MscaGeom msca_make_geom(int cfg, int64_t B, int64_t C, int64_t H, int64_t W, int elem_bytes, int mode, int dw_mma) {
  const MscaTileConfig& tile_cfg = kTileTable[cfg];
  MscaGeom g{};
  g.cfg = cfg;
  g.TH = tile_cfg.TH; g.TW = tile_cfg.TW; g.G = tile_cfg.G; g.NTC = MSCA_NT / tile_cfg.G; g.RV = tile_cfg.RV;
  g.P = tile_cfg.TH * tile_cfg.TW;
  g.tiles_x = (int)ceil_div64(std::max<int64_t>(W, 1), tile_cfg.TW);
  g.tiles_y = (int)ceil_div64(std::max<int64_t>(H, 1), tile_cfg.TH);
  g.num_ctas = (long long)B * g.tiles_x * g.tiles_y;
  g.CP = (int)ceil_div64(std::max<int64_t>(C, 1), 32) * 32;
  g.s_ld = g.P + 8;
  g.UH = tile_cfg.TH + 24; g.UW = tile_cfg.TW + 24;
  g.AH = tile_cfg.TH + 20; g.AW = tile_cfg.TW + 20;
  const int u_f = g.UH * g.UW;
  // h row stride: a warp of the vertical phase covers 32/TW row blocks of RV rows; strides 24 (TW=16, RV=2) and
  // 12 (TW=8, RV=2) put them in disjoint banks (TW=32: one row block per warp)
  g.hs = tile_cfg.TW >= 32 ? tile_cfg.TW : tile_cfg.TW + tile_cfg.TW / 2;
  const int h_f = (g.AH + (tile_cfg.TH + 10) + (tile_cfg.TH + 6)) * g.hs;
  g.off_H11 = g.AH * g.hs;
  g.off_H7 = (g.AH + tile_cfg.TH + 10) * g.hs;
  g.off_A = (int)align_up((size_t)std::max(u_f, h_f), 4);
  g.ch_floats = (int)align_up((size_t)(g.off_A + g.AH * g.AW), 4);
  g.s_bytes = align_up((size_t)g.CP * g.s_ld * elem_bytes, 16);
  g.work_bytes = (size_t)g.G * g.ch_floats * sizeof(float);
  if (dw_mma) {
    g.dw_mma = 1;
    g.mma_MA = (tile_cfg.TH + 20 + 15) / 16 * 16;
    g.mma_nbA = (tile_cfg.TW + 20 + 7) / 8;
    g.mma_UH = g.mma_MA + 4;
    g.mma_UWc = 8 * g.mma_nbA + 8;
    g.mma_ULD = odd_units8(g.mma_UWc);
    g.mma_ALD = odd_units8(8 * g.mma_nbA);
    g.mma_HLD = odd_units8(tile_cfg.TW);
    // H21 rows [-10, THp+14), H11 [-5, THp+19), H7 [-3, THp+5): the kx1 windows of the last block of 8 output rows
    // (THp = TH rounded up to 8)
    const int THp = (tile_cfg.TH + 7) / 8 * 8;
    g.mma_off_h11 = (THp + 24) * g.mma_HLD;
    g.mma_off_h7 = 2 * (THp + 24) * g.mma_HLD;
    const int h_elems = g.mma_off_h7 + (THp + 8) * g.mma_HLD;
    g.mma_off_a = (int)align_up((size_t)std::max(g.mma_UH * g.mma_ULD, h_elems), 8);
    g.mma_warp = (int)align_up((size_t)(g.mma_off_a + g.mma_MA * g.mma_ALD), 8);
    g.work_bytes = (size_t)(MSCA_NT / 32) * g.mma_warp * elem_bytes;
  }
  set_smem_bytes(g, mode);
  return g;
}

// CTAs per SM that shared memory and registers allow (128 registers x 256 threads: at most 2); 1 KB reserved per CTA.
static int ctas_per_sm(size_t smem_bytes, int smem_limit) {
  return (int)std::min<size_t>(2, ((size_t)smem_limit + 1024) / (smem_bytes + 1024));
}

void msca_mma_double_buffer(MscaGeom& g, int mode, int elem_bytes, int smem_limit) {
  if (!g.dw_mma || g.mma_off_x1 != 0) return;
  MscaGeom d = g;
  d.mma_off_x1 = d.mma_warp;                                 // after A
  d.mma_warp = (int)align_up((size_t)(d.mma_warp + d.mma_off_a), 8);  // + one more U/H area (mma_off_a elements)
  d.work_bytes = (size_t)(MSCA_NT / 32) * d.mma_warp * elem_bytes;
  set_smem_bytes(d, mode);
  if (d.smem_bytes <= (size_t)smem_limit && ctas_per_sm(d.smem_bytes, smem_limit) >= ctas_per_sm(g.smem_bytes, smem_limit))
    g = d;
}

static double depthwise_macs_per_output(int TH, int TW) {
  const double a = (double)(TH + 20) * (TW + 20) * 25;
  const double h = (double)(TH + 20) * TW * 21 + (double)(TH + 10) * TW * 11 + (double)(TH + 6) * TW * 7;
  const double v = (double)TH * TW * 39;
  return (a + h + v) / ((double)TH * TW);
}

// Tensor-core depthwise variant: warp instructions per output element and channel, from the loop bodies of the
// sm_90 SASS of msca_depthwise_mma.cuh (interior tiles; a static count, not a timing): u tile 14 per row step of the
// cp.async loop, a 30 per 16x8 block, h 96 per 16-row x 8-column block (three strips), v 54 per 16x8 block. Scaled
// by 32 to compare with the FMA variant's MACs per output (one FFMA instruction = 32 MACs).
static double depthwise_mma_cost_per_output(int TH, int TW) {
  const int ma = (TH + 20 + 15) / 16, nba = (TW + 20 + 7) / 8, uh = 16 * ma + 4, rpi = 32 / (2 * nba + 2);
  const double instr = 14.0 * ((uh + rpi - 1) / rpi) + 30.0 * ma * nba + 96.0 * ma * (TW / 8) +
                       54.0 * ((TH + 7) / 8) * (TW / 16);
  return 32.0 * instr / ((double)TH * TW);
}

// Choose a tile configuration for the forward (mode 0) or backward-mix (mode 1) kernel. Returns -1 if none fits.
int msca_choose_tile(int forced, int64_t B, int64_t C, int64_t H, int64_t W, int elem_bytes, int mode,
                     int smem_limit, char* err, size_t errlen, int dw_mma) {
  if (forced >= 0) {
    if (forced >= MSCA_NUM_TILE_CFGS) {
      snprintf(err, errlen, "tile config %d out of range [0, %d)", forced, MSCA_NUM_TILE_CFGS);
      return -1;
    }
    if (dw_mma && !msca_tile_mma_ok(forced)) {
      snprintf(err, errlen, "tile config %d cannot run the tensor-core depthwise variant (needs TH %% 4 == 0 and "
               "TW in {16, 32, 64})", forced);
      return -1;
    }
    const MscaGeom g = msca_make_geom(forced, B, C, H, W, elem_bytes, mode, dw_mma);
    if (g.smem_bytes > (size_t)smem_limit) {
      snprintf(err, errlen, "tile config %d needs %zu bytes of shared memory for C=%lld, device allows %d", forced,
               g.smem_bytes, (long long)C, smem_limit);
      return -1;
    }
    return forced;
  }
  int best = -1;
  double best_cost = 0.0;
  for (int cfg = 0; cfg < MSCA_NUM_TILE_CFGS; ++cfg) {
    if (dw_mma && !msca_tile_mma_ok(cfg)) continue;
    const MscaGeom g = msca_make_geom(cfg, B, C, H, W, elem_bytes, mode, dw_mma);
    if (g.smem_bytes > (size_t)smem_limit) continue;
    const double coverage = (double)g.tiles_y * g.TH * g.tiles_x * g.TW / ((double)std::max<int64_t>(H, 1) *
                                                                          (double)std::max<int64_t>(W, 1));
    const bool two_per_sm = ctas_per_sm(g.smem_bytes, smem_limit) == 2;
    const double per_output =
        dw_mma ? depthwise_mma_cost_per_output(g.TH, g.TW) : depthwise_macs_per_output(g.TH, g.TW);
    const double cost = per_output * coverage * (two_per_sm ? 1.0 : 1.25);
    if (best < 0 || cost < best_cost) { best = cfg; best_cost = cost; }
  }
  if (best < 0) {
    int smallest = -1;  // the eligible config with the fewest pixels: the least shared memory
    for (int cfg = 0; cfg < MSCA_NUM_TILE_CFGS; ++cfg)
      if ((!dw_mma || msca_tile_mma_ok(cfg)) &&
          (smallest < 0 || kTileTable[cfg].TH * kTileTable[cfg].TW < kTileTable[smallest].TH * kTileTable[smallest].TW))
        smallest = cfg;
    const MscaGeom g = msca_make_geom(smallest, B, C, H, W, elem_bytes, mode, dw_mma);
    snprintf(err, errlen,
             "C=%lld channels need %zu bytes of shared memory even with the smallest tile%s (device allows %d); "
             "use backend='triton' for this size", (long long)C, g.smem_bytes,
             dw_mma ? " of the tensor-core depthwise variant" : "", smem_limit);
  }
  return best;
}

int msca_choose_variant(int dw_variant, int forced, int dtype, int64_t B, int64_t C, int64_t H, int64_t W, int mode,
                        int smem_limit, char* err, size_t errlen, int* dw_mma_out) {
  const int eb = dtype == MSCA_F32 ? 4 : 2;
  *dw_mma_out = 0;
  if (dw_variant != MSCA_DW_AUTO && dw_variant != MSCA_DW_MMA && dw_variant != MSCA_DW_FMA) {
    snprintf(err, errlen, "unknown depthwise variant %d", dw_variant);
    return -1;
  }
  if (dw_variant == MSCA_DW_MMA && dtype == MSCA_F32) {
    snprintf(err, errlen, "the tensor-core depthwise variant takes float16/bfloat16 inputs, not float32");
    return -1;
  }
  if (dw_variant == MSCA_DW_MMA || (dw_variant == MSCA_DW_AUTO && dtype != MSCA_F32 &&
                                   (forced < 0 || msca_tile_mma_ok(forced)))) {
    const int cfg = msca_choose_tile(forced, B, C, H, W, eb, mode, smem_limit, err, errlen, 1);
    if (cfg >= 0 || dw_variant == MSCA_DW_MMA) {
      *dw_mma_out = cfg >= 0;
      return cfg;
    }
  }
  return msca_choose_tile(forced, B, C, H, W, eb, mode, smem_limit, err, errlen, 0);
}

static int elem_bytes_of(int dtype) { return dtype == MSCA_F32 ? 4 : 2; }

MscaFwdPlan msca_fwd_plan(const MscaFwdParams& p) {
  MscaFwdPlan plan{};
  plan.ok = false;
  if (p.dtype != MSCA_F32 && p.dtype != MSCA_F16 && p.dtype != MSCA_BF16) {
    snprintf(plan.error, sizeof(plan.error), "unsupported dtype code %d", p.dtype);
    return plan;
  }
  if (p.C < 1 || p.B < 0 || p.H < 0 || p.W < 0) {
    snprintf(plan.error, sizeof(plan.error), "bad sizes B=%lld C=%lld H=%lld W=%lld", (long long)p.B,
             (long long)p.C, (long long)p.H, (long long)p.W);
    return plan;
  }
  if (p.C > (1 << 20) || p.H > (1 << 30) || p.W > (1 << 30)) {
    snprintf(plan.error, sizeof(plan.error), "sizes too large for the cuda backend (C=%lld H=%lld W=%lld)",
             (long long)p.C, (long long)p.H, (long long)p.W);
    return plan;
  }
  const int eb = elem_bytes_of(p.dtype);
  int dw_mma = 0;
  const int cfg = msca_choose_variant(p.dw_variant, p.tile_cfg, p.dtype, p.B, p.C, p.H, p.W, 0, p.smem_limit,
                                      plan.error, sizeof(plan.error), &dw_mma);
  if (cfg < 0) return plan;
  plan.geom = msca_make_geom(cfg, p.B, p.C, p.H, p.W, eb, 0, dw_mma);
  msca_mma_double_buffer(plan.geom, 0, eb, p.smem_limit);
  if (plan.geom.num_ctas > 0x7fffffffLL) {
    snprintf(plan.error, sizeof(plan.error), "too many tiles (%lld) for one launch", plan.geom.num_ctas);
    return plan;
  }
  const size_t pack_elem = p.dtype == MSCA_F32 ? 4 : 2;
  plan.workspace_bytes = align_up((size_t)plan.geom.CP * plan.geom.CP * pack_elem, 256);
  if (plan.geom.dw_mma) {
    plan.geom.mma_band_off = plan.workspace_bytes;
    plan.workspace_bytes += align_up(msca_band_bytes(p.C), 256);
  }
  plan.ok = true;
  return plan;
}

size_t msca_band_bytes(int64_t C) { return (size_t)C * msca::MSCA_BAND_CHUNKS * 32 * sizeof(uint4); }

template <typename T>
void launch_prep_band(const float* w0, const float* ws, int64_t C, void* dst, cudaStream_t stream) {
  const long long total = (long long)C * msca::MSCA_BAND_CHUNKS * 32;
  const int blocks = (int)std::min<long long>((total + 255) / 256, 4096);
  auto prep = msca::prep_band_kernel<T>;
  MSCA_LAUNCH(prep, dim3(blocks), dim3(256), 0, stream, w0, ws, (int)C, reinterpret_cast<uint4*>(dst));
}
template void launch_prep_band<__half>(const float*, const float*, int64_t, void*, cudaStream_t);
template void launch_prep_band<__nv_bfloat16>(const float*, const float*, int64_t, void*, cudaStream_t);

namespace {

template <typename T, int MODE>
void launch_fwd_typed(const MscaFwdParams& p, const MscaGeom& g, cudaStream_t stream) {
  const long long pack_total = (long long)g.CP * g.CP / (MODE == 0 ? 2 : 1);
  const int prep_blocks = (int)std::min<long long>((pack_total + 255) / 256, 4096);
  auto prep = msca::prep_w3_kernel<T, MODE>;
  MSCA_LAUNCH(prep, dim3(prep_blocks), dim3(256), 0, stream, p.w3, (int)p.C, g.CP, 0, p.workspace);
  if constexpr (MODE == 0) {
    if (g.dw_mma) {
      launch_prep_band<T>(p.w0, p.ws, p.C, static_cast<unsigned char*>(p.workspace) + g.mma_band_off, stream);
      auto kernel = msca::msca_fwd_kernel<T, MODE, true>;
      MSCA_SET_SMEM_ATTR(kernel, g.smem_bytes);
      MSCA_LAUNCH(kernel, dim3((unsigned)g.num_ctas), dim3(MSCA_NT), g.smem_bytes, stream, p, g);
      return;
    }
  }
  auto kernel = msca::msca_fwd_kernel<T, MODE, false>;
  MSCA_SET_SMEM_ATTR(kernel, g.smem_bytes);
  MSCA_LAUNCH(kernel, dim3((unsigned)g.num_ctas), dim3(MSCA_NT), g.smem_bytes, stream, p, g);
}

}  // namespace

void msca_fwd_launch(const MscaFwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.W == 0) return;
  const MscaFwdPlan plan = msca_fwd_plan(p);
  if (!plan.ok) throw std::runtime_error(std::string("msca_fwd_launch: ") + plan.error);
  const MscaGeom& g = plan.geom;
  switch (p.dtype) {
    case MSCA_F32:
      if (p.allow_tf32) launch_fwd_typed<float, 1>(p, g, stream);
      else launch_fwd_typed<float, 2>(p, g, stream);
      break;
    case MSCA_F16: launch_fwd_typed<__half, 0>(p, g, stream); break;
    case MSCA_BF16: launch_fwd_typed<__nv_bfloat16, 0>(p, g, stream); break;
    default: throw std::runtime_error("msca_fwd_launch: bad dtype");
  }
}

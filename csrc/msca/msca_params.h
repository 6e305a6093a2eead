// Host/device interface of the hand-written CUDA MSCA kernels (no torch headers here).
//
// binding.cpp fills these structs from tensors and calls the launchers; msca_fwd.cu / msca_bwd.cu hold the kernels.
// All pointers are device pointers; strides are in elements (int64), so any B*C*H*W fits.
//
// Packed weight layout (shared with the Triton backend, see segnext_kernels/msca/reference.py::pack_weights):
//   w0 (C, 25) fp32: conv0 5x5 taps row-major (ky*5+kx);     b0 (C,)
//   ws (C, 78) fp32: conv0_1 (1x7) | conv0_2 (7x1) | conv1_1 (1x11) | conv1_2 (11x1) | conv2_1 (1x21) | conv2_2 (21x1)
//                    at offsets 0, 7, 14, 25, 36, 57;      bs (C, 6) in the same order
//   w3 (C, C) fp32 = conv3.weight[:, :, 0, 0] (out, in);   b3 (C,)
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

enum MscaDType : int { MSCA_F32 = 0, MSCA_F16 = 1, MSCA_BF16 = 2 };
// Depthwise variant of the forward / backward-mix kernels (0 = automatic, so zero-initialised params choose).
enum MscaDwVariant : int { MSCA_DW_AUTO = 0, MSCA_DW_MMA = 1, MSCA_DW_FMA = 2 };

// Threads per CTA of every tile kernel.
constexpr int MSCA_NT = 256;
// Per-channel depthwise gradient slots in the backward partials (and their order):
//   [0,25) dw0 | 25 db0 | [26,104) dws (packed order) | [104,110) dbs (packed order)
constexpr int MSCA_NTAP = 110;
constexpr int MSCA_TAP_DB0 = 25;
constexpr int MSCA_TAP_WS = 26;
constexpr int MSCA_TAP_BS = 104;
// Number of selectable tile configurations of the forward / backward-mix kernels (see msca_tile_table()).
constexpr int MSCA_NUM_TILE_CFGS = 6;

// Geometry of one spatial tile configuration of the forward / backward-mix kernels, computed on the host
// (msca_make_geom) and read by the kernels.  A CTA owns a TH x TW tile of one image and loops over the channels in
// groups of G (NT/G threads per channel); all regions below are per channel, in floats, with the origin (row, col)
// given relative to the tile's top-left pixel.
struct MscaGeom {
  int cfg;            // index in msca_tile_table()
  int TH, TW;         // tile rows / cols (TW % 8 == 0, TH % 4 == 0)
  int G;              // channels processed together
  int NTC;            // threads per channel = MSCA_NT / G (multiple of 32)
  int RV;             // rows per item of the vertical-strip phase (2 or 4)
  int P;              // TH * TW pixels per tile (multiple of 32)
  int tiles_x, tiles_y;
  long long num_ctas; // B * tiles_y * tiles_x
  int CP;             // C rounded up to 32 (rows of S / DATT, padded GEMM dims)
  int s_ld;           // row stride (elements) of S and DATT: [CP][s_ld], pixel index p = ty*TW + tx
  int UH, UW;         // u tile: (TH+24) x (TW+24), origin (-12,-12)
  int AH, AW;         // a:      (TH+20) x (TW+20), origin (-10,-10)
  int off_A;          // float offset of a inside a channel's work area (u and the 1xk outputs share offset 0)
  int hs;             // row stride of the 1xk outputs (>= TW, % 4 == 0; padded against bank conflicts)
  int off_H11, off_H7;// h21: rows [-10,TH+10) at 0; h11: rows [-5,TH+5); h7: rows [-3,TH+3); TW used cols
  int ch_floats;      // floats per channel work area
  size_t s_bytes;     // bytes of S (= bytes of DATT)
  size_t work_bytes;  // bytes of G channel work areas
  size_t smem_bytes;  // dynamic shared memory of the kernel
  // tensor-core depthwise variant (msca_depthwise_mma.cuh; fp16/bf16 only): per-warp work areas of mma_warp elements
  // of the input dtype; all sizes in elements
  int dw_mma;           // 1: compute s with compute_s_tile_mma (tensor cores), 0: with the fp32 FMA phases above
  int mma_MA;           // rows of a computed: TH+20 rounded up to 16
  int mma_nbA;          // 8-column blocks of a computed: ceil((TW+20)/8)
  int mma_UH, mma_UWc;  // u tile rows (MA+4) and columns (8*nbA+8) stored (loaded: TH+24 x TW+24, the rest zero)
  int mma_ULD, mma_ALD, mma_HLD;  // row strides of U, A, H_k: odd multiples of 8 elements
  int mma_off_h11, mma_off_h7, mma_off_a;  // offsets in a warp's area (H21 and U at 0; H11, H7 from the U/H base)
  int mma_off_x1;       // offset of the second U/H buffer (the next channel's u tile loads into it while this one
                        // computes), 0: one buffer (msca_mma_double_buffer decides)
  int mma_warp;         // elements per warp area
  size_t mma_band_off;  // byte offset in the launch's workspace of the packed banded B fragments (prep_band_kernel)
};

struct MscaFwdParams {
  // tensors
  const void* u;      // (B, C, H, W) dtype, strides u_s*: read by the epilogue (the gate)
  const void* u_dw;   // the same values, strides udw_s*: read by the depthwise tile loads. The binding passes an NCHW
                      // copy when u is channels_last (coalesced tile loads), else u itself.
  void* out;          // (B, C, H, W) dtype, strides o_s*
  const float* w0; const float* b0; const float* ws; const float* bs; const float* w3; const float* b3;
  int64_t B, C, H, W;
  int64_t u_sB, u_sC, u_sH, u_sW;
  int64_t udw_sB, udw_sC, udw_sH, udw_sW;
  int64_t o_sB, o_sC, o_sH, o_sW;
  int dtype;          // MscaDType
  int allow_tf32;     // fp32 only: 1x1 mix on TF32 tensor cores (else exact fp32 FMA)
  int tile_cfg;       // -1: automatic, else index in msca_tile_table() (tuning / tests)
  int dw_variant;     // depthwise part: MSCA_DW_AUTO (tensor cores for fp16/bf16 where a tile allows it, else fp32
                      // FMA), MSCA_DW_MMA (an error for fp32 or where no tile allows it), MSCA_DW_FMA
  int smem_limit;     // max dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  void* workspace;    // msca_fwd_plan().workspace_bytes bytes (packed conv3 weight), 256-byte aligned
};

struct MscaFwdPlan {
  bool ok;
  char error[320];
  MscaGeom geom;
  size_t workspace_bytes;
};

struct MscaBwdParams {
  const void* g;      // grad_out, any strides g_s*
  const void* u;      // read by the epilogue of the mix kernel
  const void* u_dw;   // same values, read by the depthwise tile loads (see MscaFwdParams::u_dw)
  const float* w0; const float* b0; const float* ws; const float* bs; const float* w3; const float* b3;
  void* du;           // (B, C, H, W) dtype, strides du_s* (may be null if !need_du)
  float* dw0; float* db0; float* dws; float* dbs;  // (C,25) (C) (C,78) (C,6)   (null if !need_dwdw)
  float* dw3; float* db3;                          // (C,C) (C)                 (null if !need_w3)
  int64_t B, C, H, W;
  int64_t u_sB, u_sC, u_sH, u_sW;
  int64_t udw_sB, udw_sC, udw_sH, udw_sW;
  int64_t g_sB, g_sC, g_sH, g_sW;
  int64_t du_sB, du_sC, du_sH, du_sW;
  int dtype;
  int allow_tf32;
  int deterministic;  // accepted for the interface; this implementation is always deterministic (fixed-order
                      // per-CTA partials, no atomics)
  int need_du;        // gradient of u
  int need_dwdw;      // gradients of w0, b0, ws, bs
  int need_w3;        // gradients of w3, b3
  int tile_cfg;       // -1 automatic, else index in msca_tile_table() for the mix kernel
  int dw_variant;     // the mix kernel's recompute of s: as MscaFwdParams::dw_variant
  int smem_limit;
  void* workspace;    // msca_bwd_plan().workspace_bytes bytes
};

struct MscaBwdPlan {
  bool ok;
  char error[320];
  MscaGeom mix_geom;   // the mix kernel's (recompute s, att, d_att, d_s, dw3/db3 partials)
  long long dw_ctas;   // the depthwise-backward kernel's CTAs (16x16 tiles), tiles and shared memory
  int dw_tiles_x, dw_tiles_y;
  size_t dw_smem;
  // byte offsets inside the workspace: packed w3 and w3^T, d_s and a scratch, dw3/db3 partials of the mix kernel,
  // depthwise weight-gradient partials of the depthwise-backward kernel
  size_t off_w3a, off_w3t, off_ds, off_a, off_w3_part, off_dw_part;
  int64_t ds_sB, ds_sC, ds_sH, ds_sW;  // strides of the d_s and a scratch tensors (u's memory format, dense)
  size_t workspace_bytes;
};

// ---- Filling the params: the one way, used by every launcher (csrc/binding.cpp and the emulation's entry points,
// tests/helpers/emu/emu_main.cpp) -----------------------------------------------------------------------------------
// A (B, C, H, W) tensor argument: its data pointer and 4 strides in elements (both null for an absent tensor).
struct MscaTensorArg {
  const void* data;
  const int64_t* strides;
};
// The packed fp32 weights (layout above) and, for the backward, their gradients (null where not needed).
struct MscaWeights {
  const float* w0; const float* b0; const float* ws; const float* bs; const float* w3; const float* b3;
};
struct MscaWeightGrads { float* dw0; float* db0; float* dws; float* dbs; float* dw3; float* db3; };
// The choices of a launch, as in MscaFwdParams (tile_cfg: that of the forward or of the backward's mix kernel).
struct MscaLaunchOptions { int dtype, allow_tf32, tile_cfg, dw_variant, smem_limit; };

// sizes: B, C, H, W. u_dw.data null: the depthwise tile loads read u itself. The workspace is set after the plan.
inline MscaFwdParams msca_fwd_params(const int64_t* sizes, MscaTensorArg u, MscaTensorArg u_dw, MscaTensorArg out,
                                     const MscaWeights& w, const MscaLaunchOptions& o) {
  if (u_dw.data == nullptr) u_dw = u;
  MscaFwdParams p{};
  p.u = u.data;
  p.u_dw = u_dw.data;
  p.out = const_cast<void*>(out.data);
  p.w0 = w.w0; p.b0 = w.b0; p.ws = w.ws; p.bs = w.bs; p.w3 = w.w3; p.b3 = w.b3;
  p.B = sizes[0]; p.C = sizes[1]; p.H = sizes[2]; p.W = sizes[3];
  p.u_sB = u.strides[0]; p.u_sC = u.strides[1]; p.u_sH = u.strides[2]; p.u_sW = u.strides[3];
  p.udw_sB = u_dw.strides[0]; p.udw_sC = u_dw.strides[1]; p.udw_sH = u_dw.strides[2]; p.udw_sW = u_dw.strides[3];
  p.o_sB = out.strides[0]; p.o_sC = out.strides[1]; p.o_sH = out.strides[2]; p.o_sW = out.strides[3];
  p.dtype = o.dtype; p.allow_tf32 = o.allow_tf32; p.tile_cfg = o.tile_cfg; p.dw_variant = o.dw_variant;
  p.smem_limit = o.smem_limit;
  return p;
}

// As msca_fwd_params; g: grad_out; du.data null when !need_du (its strides then stay 0).
inline MscaBwdParams msca_bwd_params(const int64_t* sizes, MscaTensorArg g, MscaTensorArg u, MscaTensorArg u_dw,
                                     MscaTensorArg du, const MscaWeights& w, const MscaWeightGrads& dw, int need_du,
                                     int need_dwdw, int need_w3, int deterministic, const MscaLaunchOptions& o) {
  if (u_dw.data == nullptr) u_dw = u;
  MscaBwdParams p{};
  p.g = g.data;
  p.u = u.data;
  p.u_dw = u_dw.data;
  p.w0 = w.w0; p.b0 = w.b0; p.ws = w.ws; p.bs = w.bs; p.w3 = w.w3; p.b3 = w.b3;
  p.du = const_cast<void*>(du.data);
  p.dw0 = dw.dw0; p.db0 = dw.db0; p.dws = dw.dws; p.dbs = dw.dbs; p.dw3 = dw.dw3; p.db3 = dw.db3;
  p.B = sizes[0]; p.C = sizes[1]; p.H = sizes[2]; p.W = sizes[3];
  p.u_sB = u.strides[0]; p.u_sC = u.strides[1]; p.u_sH = u.strides[2]; p.u_sW = u.strides[3];
  p.udw_sB = u_dw.strides[0]; p.udw_sC = u_dw.strides[1]; p.udw_sH = u_dw.strides[2]; p.udw_sW = u_dw.strides[3];
  p.g_sB = g.strides[0]; p.g_sC = g.strides[1]; p.g_sH = g.strides[2]; p.g_sW = g.strides[3];
  if (du.strides != nullptr) {
    p.du_sB = du.strides[0]; p.du_sC = du.strides[1]; p.du_sH = du.strides[2]; p.du_sW = du.strides[3];
  }
  p.dtype = o.dtype; p.allow_tf32 = o.allow_tf32; p.deterministic = deterministic;
  p.need_du = need_du; p.need_dwdw = need_dwdw; p.need_w3 = need_w3;
  p.tile_cfg = o.tile_cfg; p.dw_variant = o.dw_variant; p.smem_limit = o.smem_limit;
  return p;
}

// Table of tile configurations {TH, TW, G, RV}.
struct MscaTileConfig { int TH, TW, G, RV; };
const MscaTileConfig* msca_tile_table();

// Geometry for tile config `cfg`; mode 0 = forward kernel, 1 = backward mix kernel (S and DATT in shared memory);
// dw_mma = 1: the tensor-core depthwise variant (elem_bytes 2, a tile with msca_tile_mma_ok).
MscaGeom msca_make_geom(int cfg, int64_t B, int64_t C, int64_t H, int64_t W, int elem_bytes, int mode, int dw_mma = 0);

// Give a tensor-core geometry (g.dw_mma) a second U/H buffer per warp when smem_limit allows it without fewer CTAs per
// SM; updates mma_off_x1, mma_warp, work_bytes and smem_bytes. mode as in msca_make_geom.
void msca_mma_double_buffer(MscaGeom& g, int mode, int elem_bytes, int smem_limit);

// Whether tile config `cfg` can run the tensor-core depthwise variant (TH % 4 == 0, TW in {16, 32, 64}).
bool msca_tile_mma_ok(int cfg);

// Tile configuration for the forward (mode 0) or backward-mix (mode 1) kernel: `forced` >= 0 checks that config,
// -1 picks the cheapest that fits. Returns -1 and writes a message to err if none fits. dw_mma = 1: only configs that
// can run the tensor-core depthwise variant, costed as such.
int msca_choose_tile(int forced, int64_t B, int64_t C, int64_t H, int64_t W, int elem_bytes, int mode,
                     int smem_limit, char* err, size_t errlen, int dw_mma = 0);

// Settle the depthwise variant and the tile of a forward / backward-mix launch (both plans use it): dw_variant as in
// MscaFwdParams. Returns the tile config (-1 with a message in err when nothing fits) and sets *dw_mma_out.
int msca_choose_variant(int dw_variant, int forced, int dtype, int64_t B, int64_t C, int64_t H, int64_t W, int mode,
                        int smem_limit, char* err, size_t errlen, int* dw_mma_out);

// Bytes of the packed banded B fragments of the tensor-core depthwise variant for C channels, and the launch of the
// kernel that writes them (T = __half or __nv_bfloat16; msca_fwd.cu).
size_t msca_band_bytes(int64_t C);
template <typename T>
void launch_prep_band(const float* w0, const float* ws, int64_t C, void* dst, cudaStream_t stream);

MscaFwdPlan msca_fwd_plan(const MscaFwdParams& p);
MscaBwdPlan msca_bwd_plan(const MscaBwdParams& p);

// Launch on `stream`. Throw std::runtime_error on an unsupported configuration (the binding validates first); the
// caller checks cudaGetLastError() afterwards. Nothing is launched when B*H*W == 0.
void msca_fwd_launch(const MscaFwdParams& p, cudaStream_t stream);
void msca_bwd_launch(const MscaBwdParams& p, cudaStream_t stream);

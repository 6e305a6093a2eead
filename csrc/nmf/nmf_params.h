// Host/device interface of the hand-written CUDA NMF2D kernels (no torch headers here).
//
// The CUDA backend runs the same algorithm, with the same buffers, as the Triton backend (segnext_kernels/
// nmf/triton.py, whose module docstring gives the math): the orchestration of the K steps and of the backward stages
// lives in Python (segnext_kernels/nmf/driver.py) and calls four launchers per backend. The launchers below have
// exactly the semantics of the Triton kernels of the same role, so both backends share one driver, one saved-tensor
// layout and one set of fake (meta) implementations.
//
// Notation (per sample b of B): X (D, N) = x[b]; bases B_k (D, R); coef C (N, R); R the rank and RP the padded rank
// max(16, next power of two >= R). All pointers are device pointers; strides are in elements (int64).
// Layouts of the small tensors (all fp32, contiguous):
//   bases, E:        (B, D, R)
//   coef, g_A, g_C:  (B, N, R)
//   G, H, S:         (B, RP, RP), zero outside [0,R)^2 (written padded by the launchers; read padded)
//   pxc / pxg / pgy: per-CTA partials (B, P, D, RP); pcc / pgg: (B, P, RP, RP). P is NmfGeom::P (the CTAs per
//                    sample of the pass kernels); the driver allocates them and never reads them except through
//                    nmf_bases_launch (pxc, pcc) or by summing over P in a fixed order (pxg, pgy, pgg).
// x, y, g_y, g_x are in the input dtype (NmfDType) with arbitrary strides. Arithmetic accumulates in fp32.
// Every launcher is deterministic (fixed-order per-CTA partials, no atomics), launches nothing when B*N == 0, and
// throws std::runtime_error on an unsupported configuration (the binding validates first); the caller checks
// cudaGetLastError() afterwards.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

enum NmfDType : int { NMF_F32 = 0, NMF_F16 = 1, NMF_BF16 = 2 };

// Geometry chosen by the CUDA backend for one problem (nmf_make_geom); the driver allocates partials and the
// workspace from it.
struct NmfGeom {
  int RP;             // padded rank
  int BN;             // columns of X per tile of the pass kernels
  int T;              // number of N-tiles = ceil(N / BN)
  int P;              // CTAs per sample of the pass kernels (each persistent over tiles p, p+P, ...), 1 <= P <= T
  size_t work_floats; // fp32 workspace of nmf_bases_launch (may be 0)
};

// backward: geometry of nmf_bwd_stage_launch (else of nmf_coef_launch); num_sms: the device's SM count.
// p_override: 0 (automatic: one wave of one CTA per SM), or the CTAs per sample to use (clamped to [1, T]);
// mtw_override: 0 (automatic), or the forward's tile width to use, 1 or 2 (BN = geo_bn(RP, MTW); the backward's is
// always 1). Tuning / tests: the Python backend passes segnext_kernels.knobs.KNOBS.nmf_cuda_p / nmf_cuda_mtw.
NmfGeom nmf_make_geom(int64_t B, int64_t D, int64_t N, int R, int dtype, int backward, int num_sms, int p_override,
                      int mtw_override);

// G = B^T B, or (update) the bases update from the partials of a coef pass:
//   H = sum_p pcc[b, p] and E = sum_p pxc[b, p] (fixed order);  B_out = B_in * E / (B_in H + eps);  G = B_out^T B_out.
// With store_eh also E (B, D, R) and H (B, RP, RP, padded) are written. Without update: B_out is not written, G =
// B_in^T B_in (pxc, pcc, E, H unused).  (Triton: _nmf_bases_kernel.)
struct NmfBasesParams {
  const float* bin;   // (B, D, R)
  float* bout;        // (B, D, R) (update)
  float* G;           // (B, RP, RP)
  const float* pxc;   // (B, P, D, RP) (update)
  const float* pcc;   // (B, P, RP, RP) (update)
  float* E;           // (B, D, R) (update && store_eh)
  float* H;           // (B, RP, RP) (update && store_eh)
  float* work;        // NmfGeom::work_floats floats
  int64_t B, D;
  int R, RP, P;
  float eps;
  int update, store_eh;
};
void nmf_bases_launch(const NmfBasesParams& p, cudaStream_t stream);

// One coef update over all N-tiles (Triton: _nmf_coef_kernel), CTA (b, p) persistent over tiles p, p+P, ...:
//   A = X^T B (tile BN x R);  init: C_in = softmax(inv_t A) over the first R columns (stored to c0 if store_c0),
//   else C_in = cin;  C_out = C_in * A / (C_in G + eps), stored to cout;
//   accum: pcc[b, p] = sum over the CTA's tiles of C_out^T C_out, pxc[b, p] = sum of X C_out (each CTA writes its
//          whole partial, zeros included where it has no contribution: nothing needs zeroing beforehand);
//   recon: y = B C_out^T in y's dtype and strides.
struct NmfCoefParams {
  const void* x;      // (B, D, N) dtype
  int64_t x_sB, x_sD, x_sN;
  const float* bases; // (B, D, R)
  const float* G;     // (B, RP, RP)
  const float* cin;   // (B, N, R) (!init)
  float* cout;        // (B, N, R)
  float* c0;          // (B, N, R) (init && store_c0)
  float* pxc;         // (B, P, D, RP) (accum)
  float* pcc;         // (B, P, RP, RP) (accum)
  void* y;            // (B, D, N) dtype (recon)
  int64_t y_sB, y_sD, y_sN;
  int64_t B, D, N;
  int R, RP, P, BN;   // from NmfGeom (backward = 0)
  float eps, inv_t;
  int dtype;          // NmfDType of x and y
  int allow_tf32;     // fp32 x only: products may use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)
  int init, store_c0, accum, recon;
};
void nmf_coef_launch(const NmfCoefParams& p, cudaStream_t stream);

// Backward of one coef update C_new = C_prev * A / (C_prev G + eps), A = X^T B, over all N-tiles
// (Triton: _nmf_bwd_kernel), CTA (b, p) persistent over tiles p, p+P, ...:
//   U (gradient reaching C_new) = final: g_Y^T B (if has_gy) [+ partial pgy[b,p] = sum g_Y C_new]
//                                 step:  X^T ge + C_new S
//                                 plus gcin if has_gcin;
//   Q = C_prev G + eps;  g_A = U C_prev / Q;  g_Q = -U C_new / Q;  g_C_prev = U A / Q + g_Q G^T;
//   pgg[b, p] = sum C_prev^T g_Q;  init: C_prev = softmax(inv_t A) (given in cprev) and
//   g_A += inv_t C_prev (g_C_prev - rowsum(g_C_prev C_prev));  pxg[b, p] = sum X g_A;
//   store_gc: gcout = g_C_prev;  store_ga: ga = g_A.
// Every CTA writes its whole pxg / pgg (and pgy when final && has_gy) partial.
struct NmfBwdStageParams {
  const void* x;      // (B, D, N) dtype
  int64_t x_sB, x_sD, x_sN;
  const void* gy;     // (B, D, N) dtype (final && has_gy)
  int64_t gy_sB, gy_sD, gy_sN;
  const float* bases; // (B, D, R): B_K (final) or B_k (step k)
  const float* ge;    // (B, D, R) g_E_k (step)
  const float* cnew;  // (B, N, R)
  const float* gcin;  // (B, N, R) (has_gcin)
  const float* S;     // (B, RP, RP) g_H + g_H^T (step)
  const float* cprev; // (B, N, R)
  const float* G;     // (B, RP, RP)
  float* gcout;       // (B, N, R) (store_gc)
  float* ga;          // (B, N, R) (store_ga)
  float* pxg;         // (B, P, D, RP)
  float* pgy;         // (B, P, D, RP) (final && has_gy)
  float* pgg;         // (B, P, RP, RP)
  int64_t B, D, N;
  int R, RP, P, BN;   // from NmfGeom (backward = 1)
  float eps, inv_t;
  int dtype, allow_tf32;
  int final_stage, has_gy, has_gcin, init, store_gc, store_ga;
};
void nmf_bwd_stage_launch(const NmfBwdStageParams& p, cudaStream_t stream);

// g_X[b] = sum_{m < M1} L1[m, b] R1[m, b]^T + sum_{m < M2} L2[m, b] R2[m, b]^T, written once in gx's dtype and
// strides; L (M, B, D, R) and R (M, B, N, R) fp32 contiguous (Triton: _nmf_gx_kernel).
struct NmfGxParams {
  const float* l1; const float* r1; int M1;
  const float* l2; const float* r2; int M2;
  void* gx;           // (B, D, N) dtype
  int64_t gx_sB, gx_sD, gx_sN;
  int64_t B, D, N;
  int R;
  int dtype, allow_tf32;
};
void nmf_gx_launch(const NmfGxParams& p, cudaStream_t stream);

// ---- Filling the params: the one way, used by every launcher (csrc/binding.cpp and the emulation's entry points,
// tests/helpers/emu/nmf_emu_main.cpp) -------------------------------------------------------------------------------
// A (B, D, N) tensor argument in the input dtype: its data pointer and 3 strides in elements (both null for an absent
// tensor: the struct's strides then stay 0).
struct NmfXArg {
  const void* data;
  const int64_t* strides;
};
// The problem and the NmfGeom values a pass launch uses (R, RP, P, BN).
struct NmfPassShape {
  int64_t B, D, N;
  int R, RP, P, BN;
};

inline NmfBasesParams nmf_bases_params(const float* bin, float* bout, float* G, const float* pxc, const float* pcc,
                                       float* E, float* H, float* work, int64_t B, int64_t D, int R, int RP, int P,
                                       float eps, int update, int store_eh) {
  NmfBasesParams p{};
  p.bin = bin; p.bout = bout; p.G = G; p.pxc = pxc; p.pcc = pcc; p.E = E; p.H = H; p.work = work;
  p.B = B; p.D = D; p.R = R; p.RP = RP; p.P = P;
  p.eps = eps;
  p.update = update; p.store_eh = store_eh;
  return p;
}

inline NmfCoefParams nmf_coef_params(NmfXArg x, const float* bases, const float* G, const float* cin, float* cout,
                                     float* c0, float* pxc, float* pcc, NmfXArg y, const NmfPassShape& s, float eps,
                                     float inv_t, int dtype, int allow_tf32, int init, int store_c0, int accum,
                                     int recon) {
  NmfCoefParams p{};
  p.x = x.data;
  p.x_sB = x.strides[0]; p.x_sD = x.strides[1]; p.x_sN = x.strides[2];
  p.bases = bases; p.G = G; p.cin = cin; p.cout = cout; p.c0 = c0; p.pxc = pxc; p.pcc = pcc;
  p.y = const_cast<void*>(y.data);
  if (y.strides != nullptr) { p.y_sB = y.strides[0]; p.y_sD = y.strides[1]; p.y_sN = y.strides[2]; }
  p.B = s.B; p.D = s.D; p.N = s.N; p.R = s.R; p.RP = s.RP; p.P = s.P; p.BN = s.BN;
  p.eps = eps; p.inv_t = inv_t;
  p.dtype = dtype; p.allow_tf32 = allow_tf32;
  p.init = init; p.store_c0 = store_c0; p.accum = accum; p.recon = recon;
  return p;
}

inline NmfBwdStageParams nmf_bwd_stage_params(NmfXArg x, NmfXArg gy, const float* bases, const float* ge,
                                              const float* cnew, const float* gcin, const float* S,
                                              const float* cprev, const float* G, float* gcout, float* ga, float* pxg,
                                              float* pgy, float* pgg, const NmfPassShape& s, float eps, float inv_t,
                                              int dtype, int allow_tf32, int final_stage, int has_gy, int has_gcin,
                                              int init, int store_gc, int store_ga) {
  NmfBwdStageParams p{};
  p.x = x.data;
  p.x_sB = x.strides[0]; p.x_sD = x.strides[1]; p.x_sN = x.strides[2];
  p.gy = gy.data;
  if (gy.strides != nullptr) { p.gy_sB = gy.strides[0]; p.gy_sD = gy.strides[1]; p.gy_sN = gy.strides[2]; }
  p.bases = bases; p.ge = ge; p.cnew = cnew; p.gcin = gcin; p.S = S; p.cprev = cprev; p.G = G;
  p.gcout = gcout; p.ga = ga; p.pxg = pxg; p.pgy = pgy; p.pgg = pgg;
  p.B = s.B; p.D = s.D; p.N = s.N; p.R = s.R; p.RP = s.RP; p.P = s.P; p.BN = s.BN;
  p.eps = eps; p.inv_t = inv_t;
  p.dtype = dtype; p.allow_tf32 = allow_tf32;
  p.final_stage = final_stage; p.has_gy = has_gy; p.has_gcin = has_gcin; p.init = init;
  p.store_gc = store_gc; p.store_ga = store_ga;
  return p;
}

inline NmfGxParams nmf_gx_params(const float* l1, const float* r1, int M1, const float* l2, const float* r2, int M2,
                                 NmfXArg gx, int64_t B, int64_t D, int64_t N, int R, int dtype, int allow_tf32) {
  NmfGxParams p{};
  p.l1 = l1; p.r1 = r1; p.M1 = M1;
  p.l2 = l2; p.r2 = r2; p.M2 = M2;
  p.gx = const_cast<void*>(gx.data);
  p.gx_sB = gx.strides[0]; p.gx_sD = gx.strides[1]; p.gx_sN = gx.strides[2];
  p.B = B; p.D = D; p.N = N; p.R = R;
  p.dtype = dtype; p.allow_tf32 = allow_tf32;
  return p;
}

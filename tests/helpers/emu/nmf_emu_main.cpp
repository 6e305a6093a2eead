// C entry points of the CPU emulation of the CUDA NMF2D kernels (tests/nmf/test_nmf_cuda_emu.py loads it with ctypes).
// Built with: g++ -std=c++17 -O1 -DSEGNEXT_EMU -shared -fPIC -x c++ csrc/nmf_fwd.cu csrc/nmf_bwd.cu
//             tests/helpers/emu/nmf_emu_main.cpp
// Arguments travel as arrays (pointers, int64s, floats, ints) in the order documented at each entry point.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "nmf_common.cuh"

extern "C" void emu_nmf_set_order(int order) { emu::S().order = order; }
extern "C" void emu_nmf_set_smem_limit(int bytes) { nmf::emu_smem_limit() = bytes; }

#define NMF_TRY(body)                                   \
  try {                                                 \
    body;                                               \
  } catch (const std::exception& e) {                   \
    snprintf(err, errlen, "%s", e.what());              \
    return 1;                                           \
  }                                                     \
  return 0;

// out: RP, BN, T, P; work: work_floats
extern "C" int emu_nmf_geom(long long B, long long D, long long N, int R, int dtype, int backward, int num_sms, int* out,
                            long long* work, char* err, int errlen) {
  NMF_TRY({
    NmfGeom g = nmf_make_geom(B, D, N, R, dtype, backward, num_sms);
    out[0] = g.RP; out[1] = g.BN; out[2] = g.T; out[3] = g.P;
    *work = (long long)g.work_floats;
  })
}

// ptrs: bin, bout, G, pxc, pcc, E, H, work; ints: B, D, R, RP, P, update, store_eh; fl: eps
extern "C" int emu_nmf_bases(void** ptrs, const long long* ints, const float* fl, char* err, int errlen) {
  NMF_TRY({
    NmfBasesParams p{};
    p.bin = (const float*)ptrs[0]; p.bout = (float*)ptrs[1]; p.G = (float*)ptrs[2]; p.pxc = (const float*)ptrs[3];
    p.pcc = (const float*)ptrs[4]; p.E = (float*)ptrs[5]; p.H = (float*)ptrs[6]; p.work = (float*)ptrs[7];
    p.B = ints[0]; p.D = ints[1]; p.R = (int)ints[2]; p.RP = (int)ints[3]; p.P = (int)ints[4];
    p.update = (int)ints[5]; p.store_eh = (int)ints[6];
    p.eps = fl[0];
    nmf_bases_launch(p, nullptr);
  })
}

// ptrs: x, bases, G, cin, cout, c0, pxc, pcc, y
// ints: x_sB, x_sD, x_sN, y_sB, y_sD, y_sN, B, D, N, R, RP, P, BN, dtype, allow_tf32, init, store_c0, accum, recon
// fl: eps, inv_t
extern "C" int emu_nmf_coef(void** ptrs, const long long* ints, const float* fl, char* err, int errlen) {
  NMF_TRY({
    NmfCoefParams p{};
    p.x = ptrs[0]; p.bases = (const float*)ptrs[1]; p.G = (const float*)ptrs[2]; p.cin = (const float*)ptrs[3];
    p.cout = (float*)ptrs[4]; p.c0 = (float*)ptrs[5]; p.pxc = (float*)ptrs[6]; p.pcc = (float*)ptrs[7];
    p.y = ptrs[8];
    p.x_sB = ints[0]; p.x_sD = ints[1]; p.x_sN = ints[2]; p.y_sB = ints[3]; p.y_sD = ints[4]; p.y_sN = ints[5];
    p.B = ints[6]; p.D = ints[7]; p.N = ints[8]; p.R = (int)ints[9]; p.RP = (int)ints[10]; p.P = (int)ints[11];
    p.BN = (int)ints[12]; p.dtype = (int)ints[13]; p.allow_tf32 = (int)ints[14]; p.init = (int)ints[15];
    p.store_c0 = (int)ints[16]; p.accum = (int)ints[17]; p.recon = (int)ints[18];
    p.eps = fl[0]; p.inv_t = fl[1];
    nmf_coef_launch(p, nullptr);
  })
}

// ptrs: x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg
// ints: x_sB, x_sD, x_sN, gy_sB, gy_sD, gy_sN, B, D, N, R, RP, P, BN, dtype, allow_tf32,
//       final, has_gy, has_gcin, init, store_gc, store_ga
// fl: eps, inv_t
extern "C" int emu_nmf_bwd(void** ptrs, const long long* ints, const float* fl, char* err, int errlen) {
  NMF_TRY({
    NmfBwdStageParams p{};
    p.x = ptrs[0]; p.gy = ptrs[1]; p.bases = (const float*)ptrs[2]; p.ge = (const float*)ptrs[3];
    p.cnew = (const float*)ptrs[4]; p.gcin = (const float*)ptrs[5]; p.S = (const float*)ptrs[6];
    p.cprev = (const float*)ptrs[7]; p.G = (const float*)ptrs[8]; p.gcout = (float*)ptrs[9]; p.ga = (float*)ptrs[10];
    p.pxg = (float*)ptrs[11]; p.pgy = (float*)ptrs[12]; p.pgg = (float*)ptrs[13];
    p.x_sB = ints[0]; p.x_sD = ints[1]; p.x_sN = ints[2]; p.gy_sB = ints[3]; p.gy_sD = ints[4]; p.gy_sN = ints[5];
    p.B = ints[6]; p.D = ints[7]; p.N = ints[8]; p.R = (int)ints[9]; p.RP = (int)ints[10]; p.P = (int)ints[11];
    p.BN = (int)ints[12]; p.dtype = (int)ints[13]; p.allow_tf32 = (int)ints[14]; p.final_stage = (int)ints[15];
    p.has_gy = (int)ints[16]; p.has_gcin = (int)ints[17]; p.init = (int)ints[18]; p.store_gc = (int)ints[19];
    p.store_ga = (int)ints[20];
    p.eps = fl[0]; p.inv_t = fl[1];
    nmf_bwd_stage_launch(p, nullptr);
  })
}

// ptrs: l1, r1, l2, r2, gx; ints: M1, M2, gx_sB, gx_sD, gx_sN, B, D, N, R, dtype, allow_tf32
extern "C" int emu_nmf_gx(void** ptrs, const long long* ints, char* err, int errlen) {
  NMF_TRY({
    NmfGxParams p{};
    p.l1 = (const float*)ptrs[0]; p.r1 = (const float*)ptrs[1]; p.l2 = (const float*)ptrs[2];
    p.r2 = (const float*)ptrs[3]; p.gx = ptrs[4];
    p.M1 = (int)ints[0]; p.M2 = (int)ints[1]; p.gx_sB = ints[2]; p.gx_sD = ints[3]; p.gx_sN = ints[4];
    p.B = ints[5]; p.D = ints[6]; p.N = ints[7]; p.R = (int)ints[8]; p.dtype = (int)ints[9];
    p.allow_tf32 = (int)ints[10];
    nmf_gx_launch(p, nullptr);
  })
}
